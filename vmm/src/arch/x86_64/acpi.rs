//! ACPI firmware tables for the guest: RSDP, XSDT, FADT, MADT and DSDT.
//!
//! The guest kernel finds the RSDP at [`ACPI_START`] (the BIOS area it scans, and the
//! address the boot code can also hand over in `boot_params.acpi_rsdp_addr`). The tables
//! describe a *hardware-reduced* ACPI platform:
//!
//! * the MADT lists one local APIC per vCPU (this is how the guest finds and starts the
//!   application processors: there is no MP table) and the in-kernel IOAPIC;
//! * the FADT points at the DSDT, announces the sleep control/status registers used for
//!   `poweroff` and the i8042 reset as the ACPI reset register;
//! * the DSDT enumerates COM1, the i8042 keyboard controller and every virtio-mmio device
//!   (the guest gets no `virtio_mmio.device=` command-line options), plus `\_S5_`.
//!
//! Layout in guest memory (each table 16-byte aligned):
//!
//! ```text
//! ACPI_START  RSDP -> XSDT -> { FACP -> DSDT, APIC }
//! ```

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{
    ACPI_END, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_START, APIC_ADDR, COM1_IRQ,
    COM1_PORT, I8042_DATA_PORT, I8042_IRQ, IOAPIC_ADDR, IOAPIC_LAST_IRQ,
};

/// OEM identification written into every table header.
const OEM_ID: [u8; 6] = *b"VMMLP ";
const OEM_REVISION: u32 = 1;
/// FADT "hypervisor vendor identity" (ACPI 6.0+).
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"VMMLP   ";

/// Alignment of each table after the RSDP.
const TABLE_ALIGN: u64 = 16;

/// Largest CPU count: APIC ids are 0..num_cpus-1 and 0xff is the broadcast id.
pub const MAX_CPUS: u8 = 254;
/// Virtio-mmio devices are named `VR00`..`VRFF` in the DSDT.
pub const MAX_VIRTIO_DEVICES: usize = 256;

/// FADT `IAPC_BOOT_ARCH` bits (ACPI 6.5, table 5.10).
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// The i8042 command/status port; writing 0xfe there pulses the CPU reset line.
const I8042_COMMAND_PORT: u16 = I8042_DATA_PORT + 4;
const I8042_RESET_COMMAND: u8 = 0xfe;
/// COM1 occupies eight consecutive I/O ports.
const COM1_PORT_LEN: u8 = 8;

/// MADT header: local APIC address at offset 36, flags at offset 40, entries from 44.
const MADT_HEADER_LEN: u32 = 44;
const MADT_LAPIC_ADDR_OFFSET: usize = 36;
const MADT_FLAGS_OFFSET: usize = 40;
/// MADT flag: the platform also has a dual-8259 PIC (ours is KVM's in-kernel one).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT revision of ACPI 6.2+ (the one that defines the structures we emit).
const MADT_REVISION: u8 = 5;
/// MADT interrupt controller structure type 4: Local APIC NMI.
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
/// "All processors" in a Local APIC NMI structure.
const ACPI_UID_ALL_PROCESSORS: u8 = 0xff;
/// LINT1 is wired to NMI on PC-compatible systems.
const LAPIC_NMI_LINT1: u8 = 1;

/// DSDT revision 2+ selects 64-bit AML integers.
const DSDT_REVISION: u8 = 6;
/// Sleep type of S5 (soft off) announced by `\_S5_`; the sleep control device
/// (`devices::acpi_power`) powers off on SLP_TYP=5 with SLP_EN.
const S5_SLEEP_TYPE: u8 = 5;

/// One virtio-mmio transport to describe in the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioAcpi {
    /// Guest-physical base address of the register window.
    pub base: u64,
    /// Length of the register window.
    pub len: u64,
    /// GSI (= IOAPIC pin) of the device's interrupt.
    pub irq: u32,
}

/// What the ACPI tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (1..=254); vCPU i has APIC id i.
    pub num_cpus: u8,
    /// Virtio-mmio devices, in `_UID` order.
    pub virtio_mmio: Vec<VirtioMmioAcpi>,
}

/// Errors from building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("invalid vCPU count {0}: the MADT describes 1 to {MAX_CPUS} CPUs (APIC id 255 is the broadcast id)")]
    InvalidCpuCount(u8),
    #[error("{0} virtio-mmio devices requested; the DSDT can name at most {MAX_VIRTIO_DEVICES}")]
    TooManyVirtioDevices(usize),
    #[error("virtio-mmio device {index}: window {base:#x}+{len:#x} is empty or not below 4 GiB (ACPI Memory32Fixed)")]
    VirtioWindowInvalid { index: usize, base: u64, len: u64 },
    #[error("virtio-mmio device {index}: IRQ {irq} is not an IOAPIC pin (0..={IOAPIC_LAST_IRQ})")]
    VirtioIrqInvalid { index: usize, irq: u32 },
    #[error("ACPI tables need {needed} bytes but the ACPI area {start:#x}..{end:#x} holds only {available}")]
    TablesTooLarge {
        needed: u64,
        available: u64,
        start: u64,
        end: u64,
    },
    #[error("cannot write ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Writes RSDP, XSDT, FADT, MADT and DSDT into guest memory in `[ACPI_START, ACPI_END)`;
/// returns the RSDP address.
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(cfg, ACPI_START, ACPI_END)?;
    for (addr, bytes) in &tables.tables {
        mem.write_slice(bytes, *addr)?;
    }
    tracing::debug!(
        "ACPI tables at {:#x}..{:#x} for {} vCPUs and {} virtio-mmio devices",
        tables.rsdp.0,
        tables.end,
        cfg.num_cpus,
        cfg.virtio_mmio.len()
    );
    Ok(tables.rsdp)
}

/// The serialized tables and where they go.
struct BuiltTables {
    rsdp: GuestAddress,
    /// (address, bytes) of every table, the RSDP first.
    tables: Vec<(GuestAddress, Vec<u8>)>,
    /// First byte past the last table.
    end: u64,
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.num_cpus == 0 || cfg.num_cpus > MAX_CPUS {
        return Err(AcpiError::InvalidCpuCount(cfg.num_cpus));
    }
    if cfg.virtio_mmio.len() > MAX_VIRTIO_DEVICES {
        return Err(AcpiError::TooManyVirtioDevices(cfg.virtio_mmio.len()));
    }
    for (index, dev) in cfg.virtio_mmio.iter().enumerate() {
        let fits_32bit = dev
            .base
            .checked_add(dev.len)
            .is_some_and(|end| end <= 1 << 32);
        if dev.len == 0 || !fits_32bit {
            return Err(AcpiError::VirtioWindowInvalid {
                index,
                base: dev.base,
                len: dev.len,
            });
        }
        if dev.irq > IOAPIC_LAST_IRQ {
            return Err(AcpiError::VirtioIrqInvalid {
                index,
                irq: dev.irq,
            });
        }
    }
    Ok(())
}

/// Builds all tables for the area `[start, end)`; the RSDP goes at `start`.
fn build_tables(cfg: &AcpiConfig, start: u64, end: u64) -> Result<BuiltTables, AcpiError> {
    validate(cfg)?;

    // Tables whose content does not depend on where the others are.
    let dsdt = build_dsdt(cfg);
    let madt = build_madt(cfg.num_cpus);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    // Header plus one 64-bit entry for each of FADT and MADT.
    let xsdt_len = 36 + 2 * 8;

    let rsdp_addr = start;
    let xsdt_addr = align_up(rsdp_addr + Rsdp::len() as u64, TABLE_ALIGN);
    let fadt_addr = align_up(xsdt_addr + xsdt_len, TABLE_ALIGN);
    let madt_addr = align_up(fadt_addr + fadt_len, TABLE_ALIGN);
    let dsdt_addr = align_up(madt_addr + madt.len() as u64, TABLE_ALIGN);
    let tables_end = dsdt_addr + dsdt.len() as u64;
    if tables_end > end {
        return Err(AcpiError::TablesTooLarge {
            needed: tables_end - start,
            available: end.saturating_sub(start),
            start,
            end,
        });
    }

    let fadt = build_fadt(dsdt_addr);

    let mut xsdt = XSDT::new(OEM_ID, *b"VMMLPXSD", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    Ok(BuiltTables {
        rsdp: GuestAddress(rsdp_addr),
        tables: vec![
            (GuestAddress(rsdp_addr), rsdp),
            (GuestAddress(xsdt_addr), xsdt),
            (GuestAddress(fadt_addr), fadt),
            (GuestAddress(madt_addr), madt.as_slice().to_vec()),
            (GuestAddress(dsdt_addr), dsdt.as_slice().to_vec()),
        ],
        end: tables_end,
    })
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// An 8-bit system-I/O register.
fn io_port_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"VMMLPFAC", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        // No PM1/GPE blocks, no SCI: power management goes through the sleep registers.
        .flag(Flags::HwReducedAcpi)
        // Set means "no fixed-feature power/sleep button".
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    // The 8042 bit keeps Linux probing the i8042 (we emulate one, used for reset);
    // there is no VGA.
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT).into();
    fadt.reset_reg = io_port_gas(I8042_COMMAND_PORT);
    fadt.reset_value = I8042_RESET_COMMAND;
    // `poweroff` writes SLP_TYP|SLP_EN to the control register (ACPICA's extended sleep).
    fadt.sleep_control_reg = io_port_gas(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_port_gas(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    to_bytes(&fadt.finalize())
}

/// The MADT.
///
/// Built on the crate's generic [`Sdt`] rather than its `MADT` type because the latter
/// cannot set the MADT flags (PCAT_COMPAT) and has no Local APIC NMI structure. The
/// local APIC and IOAPIC structures come from the crate; the 6-byte Local APIC NMI
/// structure is encoded here (ACPI 6.5, 5.2.12.7).
///
/// Deliberately no Interrupt Source Override for ISA IRQ0 -> GSI 2: the VMM does not
/// install its own GSI routing, so KVM's default routing (`kvm_setup_default_irq_routing`)
/// is in effect, which connects GSI i to IOAPIC pin i (and PIC pin i % 8), and the
/// in-kernel PIT raises GSI 0. The PIT therefore arrives on IOAPIC pin 0, which is the
/// identity mapping the guest assumes without an override. (An override to GSI 2 is only
/// correct when the VMM routes GSI 0 to IOAPIC pin 2, as QEMU does.) Besides, in
/// hardware-reduced mode Linux installs the null legacy PIC and skips the PIT timer
/// setup, so the PIT is not the guest's clock event device anyway.
fn build_madt(num_cpus: u8) -> Sdt {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        *b"VMMLPAPI",
        OEM_REVISION,
    );
    madt.write_u32(MADT_LAPIC_ADDR_OFFSET, APIC_ADDR as u32);
    madt.write_u32(MADT_FLAGS_OFFSET, MADT_PCAT_COMPAT);
    for cpu in 0..num_cpus {
        madt.append_slice(&to_bytes(&ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&to_bytes(&IoApic::new(0, IOAPIC_ADDR as u32, 0)));
    let mut nmi = vec![MADT_TYPE_LOCAL_APIC_NMI, 6, ACPI_UID_ALL_PROCESSORS];
    // MPS INTI flags 0: polarity and trigger mode conform to the bus.
    nmi.extend_from_slice(&0u16.to_le_bytes());
    nmi.push(LAPIC_NMI_LINT1);
    madt.append_slice(&nmi);
    madt
}

/// The DSDT: `\_S5_` and the `\_SB_` devices.
fn build_dsdt(cfg: &AcpiConfig) -> Sdt {
    let mut aml = Vec::new();

    // Name (\_S5, Package () { 5, 0, 0, 0 }): SLP_TYPa = 5, SLP_TYPb = 0, two reserved.
    let s5 = Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    Name::new("\\_S5_".into(), &s5).to_aml_bytes(&mut aml);

    let mut sb = Vec::new();

    // COM1: 16550 UART.
    let com1_io = IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_LEN);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &0u32),
            &Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut sb);

    // The i8042 keyboard controller: data port, command/status port, IRQ 1.
    let kbd_data = IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let kbd_cmd = IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    let kbd_irq = Interrupt::new(true, true, false, false, I8042_IRQ);
    let kbd_crs = ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    Device::new(
        "PS2K".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &Name::new("_UID".into(), &0u32),
            &Name::new("_CRS".into(), &kbd_crs),
        ],
    )
    .to_aml_bytes(&mut sb);

    // virtio-mmio transports (Linux matches "LNRO0005" in drivers/virtio/virtio_mmio.c).
    for (index, dev) in cfg.virtio_mmio.iter().enumerate() {
        // `validate` checked that the window is below 4 GiB and that index < 256.
        let mem = Memory32Fixed::new(true, dev.base as u32, dev.len as u32);
        // Consumer, edge-triggered, active-high, exclusive.
        let irq = Interrupt::new(true, true, false, false, dev.irq);
        let crs = ResourceTemplate::new(vec![&mem, &irq]);
        let name = format!("VR{index:02X}");
        Device::new(
            Path::new(&name),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &(index as u32)),
                &Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut sb);
    }

    aml.extend_from_slice(&Scope::raw("\\_SB_".into(), sb));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"VMMLPDSD",
        OEM_REVISION,
    );
    dsdt.append_slice(&aml);
    dsdt
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{VIRTIO_FIRST_IRQ, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START};
    use vm_memory::GuestMemoryMmap;

    // FADT field offsets (ACPI 6.5, table 5.9), to check the crate's layout independently.
    const FADT_IAPC_BOOT_ARCH: usize = 109;
    const FADT_FLAGS: usize = 112;
    const FADT_RESET_REG: usize = 116;
    const FADT_RESET_VALUE: usize = 128;
    const FADT_X_DSDT: usize = 140;
    const FADT_SLEEP_CONTROL_REG: usize = 244;
    const FADT_SLEEP_STATUS_REG: usize = 256;
    const FADT_HYPERVISOR_ID: usize = 268;
    const FADT_LEN: usize = 276;
    const FADT_FLAG_PWR_BUTTON: u32 = 1 << 4;
    const FADT_FLAG_SLP_BUTTON: u32 = 1 << 5;
    const FADT_FLAG_RESET_REG_SUP: u32 = 1 << 10;
    const FADT_FLAG_HW_REDUCED: u32 = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn virtio(n: usize) -> Vec<VirtioMmioAcpi> {
        (0..n)
            .map(|i| VirtioMmioAcpi {
                base: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SLOT_SIZE,
                len: VIRTIO_MMIO_SLOT_SIZE,
                irq: VIRTIO_FIRST_IRQ + i as u32,
            })
            .collect()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Reads a whole SDT (header `length`), checks its checksum and signature.
    fn read_table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        assert_eq!(addr % 8, 0, "table at {addr:#x} is not 8-byte aligned");
        assert!((ACPI_START..ACPI_END).contains(&addr));
        let header = read(mem, addr, 36);
        assert_eq!(&header[0..4], signature, "signature at {addr:#x}");
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36);
        assert!(addr + len as u64 <= ACPI_END, "table runs past ACPI_END");
        let table = read(mem, addr, len);
        assert_eq!(sum(&table), 0, "checksum of {signature:?}");
        table
    }

    /// Builds the tables into fresh guest memory and checks everything we promise.
    fn check(num_cpus: u8, num_virtio: usize) {
        let mem = mem();
        let cfg = AcpiConfig {
            num_cpus,
            virtio_mmio: virtio(num_virtio),
        };
        let rsdp_addr = create_acpi_tables(&mem, &cfg).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(ACPI_START));

        // RSDP (revision 2, 36 bytes).
        let rsdp = read(&mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP checksum");
        assert_eq!(sum(&rsdp[0..36]), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");

        // XSDT -> FACP, APIC.
        let xsdt = read_table(&mem, u64_at(&rsdp, 24), b"XSDT");
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(entries.len(), 2);
        let fadt = read_table(&mem, entries[0], b"FACP");
        let madt = read_table(&mem, entries[1], b"APIC");

        // FADT.
        assert_eq!(fadt.len(), FADT_LEN);
        let flags = u32_at(&fadt, FADT_FLAGS);
        assert_ne!(flags & FADT_FLAG_HW_REDUCED, 0);
        assert_ne!(flags & FADT_FLAG_PWR_BUTTON, 0);
        assert_ne!(flags & FADT_FLAG_SLP_BUTTON, 0);
        assert_ne!(flags & FADT_FLAG_RESET_REG_SUP, 0);
        assert_eq!(u16_at(&fadt, FADT_IAPC_BOOT_ARCH), 0b110);
        let gas = |off: usize| {
            (
                fadt[off],
                fadt[off + 1],
                fadt[off + 3],
                u64_at(&fadt, off + 4),
            )
        };
        // (space = system I/O, 8 bits, byte access, port)
        assert_eq!(gas(FADT_SLEEP_CONTROL_REG), (1, 8, 1, 0x3c0));
        assert_eq!(gas(FADT_SLEEP_STATUS_REG), (1, 8, 1, 0x3c1));
        assert_eq!(gas(FADT_RESET_REG), (1, 8, 1, 0x64));
        assert_eq!(fadt[FADT_RESET_VALUE], 0xfe);
        assert_eq!(
            &fadt[FADT_HYPERVISOR_ID..FADT_HYPERVISOR_ID + 8],
            b"VMMLP   "
        );
        let dsdt = read_table(&mem, u64_at(&fadt, FADT_X_DSDT), b"DSDT");

        // MADT.
        assert_eq!(u32_at(&madt, 36), APIC_ADDR as u32);
        assert_eq!(u32_at(&madt, 40), MADT_PCAT_COMPAT);
        let mut apic_ids = Vec::new();
        let mut ioapics = Vec::new();
        let mut nmis = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            assert!(
                len >= 2 && off + len <= madt.len(),
                "bad MADT entry at {off}"
            );
            let e = &madt[off..off + len];
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!(e[2], e[3], "processor uid = apic id");
                    assert_eq!(u32_at(e, 4), 1, "enabled");
                    apic_ids.push(e[3]);
                }
                1 => {
                    assert_eq!(len, 12);
                    ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8)));
                }
                2 => panic!("unexpected interrupt source override (see build_madt)"),
                4 => {
                    assert_eq!(len, 6);
                    nmis.push((e[2], u16_at(e, 3), e[5]));
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(apic_ids, (0..num_cpus).collect::<Vec<_>>());
        assert_eq!(ioapics, vec![(0, IOAPIC_ADDR as u32, 0)]);
        assert_eq!(nmis, vec![(0xff, 0, 1)]);

        // DSDT.
        let aml = &dsdt[36..];
        assert!(dsdt[8] >= 2, "DSDT revision selects 64-bit integers");
        // Name (\_S5_, Package (4) { 5, Zero, Zero, Zero }).
        assert!(contains(
            aml,
            &[0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0, 0, 0]
        ));
        // _HID EISAID("PNP0501") / ("PNP0303") as DWordConst: "PNP" = 0x41d0, then 0x0501.
        assert!(contains(
            aml,
            &[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01]
        ));
        assert!(contains(
            aml,
            &[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x03, 0x03]
        ));
        // COM1 IO(Decode16, 0x3f8, 0x3f8, 1, 8) and Interrupt(...) {4}.
        assert!(contains(
            aml,
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        ));
        assert!(contains(aml, &[0x89, 0x06, 0x00, 0x03, 0x01, 4, 0, 0, 0]));
        // i8042 ports 0x60 and 0x64, IRQ 1.
        assert!(contains(
            aml,
            &[0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01]
        ));
        assert!(contains(
            aml,
            &[0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01]
        ));
        assert!(contains(aml, &[0x89, 0x06, 0x00, 0x03, 0x01, 1, 0, 0, 0]));
        let hid_count = aml
            .windows(9)
            .filter(|w| *w == b"LNRO0005\0".as_slice())
            .count();
        assert_eq!(hid_count, num_virtio);
        for (i, dev) in cfg.virtio_mmio.iter().enumerate() {
            assert!(contains(aml, format!("VR{i:02X}").as_bytes()));
            // Memory32Fixed(ReadWrite, base, len).
            let mut mem32 = vec![0x86, 0x09, 0x00, 0x01];
            mem32.extend_from_slice(&(dev.base as u32).to_le_bytes());
            mem32.extend_from_slice(&(dev.len as u32).to_le_bytes());
            assert!(contains(aml, &mem32));
            // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {irq}.
            let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
            irq.extend_from_slice(&dev.irq.to_le_bytes());
            assert!(contains(aml, &irq));
        }
    }

    #[test]
    fn acpi_tables_one_cpu_one_virtio() {
        check(1, 1);
    }

    #[test]
    fn acpi_tables_two_cpus_two_virtio() {
        check(2, 2);
    }

    #[test]
    fn acpi_tables_254_cpus() {
        check(254, 2);
    }

    #[test]
    fn acpi_tables_no_virtio() {
        check(4, 0);
    }

    #[test]
    fn acpi_tables_max_config_fits() {
        let cfg = AcpiConfig {
            num_cpus: MAX_CPUS,
            virtio_mmio: virtio((IOAPIC_LAST_IRQ - VIRTIO_FIRST_IRQ + 1) as usize),
        };
        assert_eq!(cfg.virtio_mmio.len(), 19);
        let built = build_tables(&cfg, ACPI_START, ACPI_END).unwrap();
        assert!(built.end <= ACPI_END);
        for (addr, bytes) in &built.tables {
            assert_eq!(addr.0 % TABLE_ALIGN, 0);
            assert!(addr.0 + bytes.len() as u64 <= built.end);
        }
        check(MAX_CPUS, 19);
    }

    #[test]
    fn acpi_tables_too_large_for_area() {
        let cfg = AcpiConfig {
            num_cpus: MAX_CPUS,
            virtio_mmio: virtio(19),
        };
        let err = build_tables(&cfg, ACPI_START, ACPI_START + 0x400)
            .err()
            .unwrap();
        assert!(matches!(
            err,
            AcpiError::TablesTooLarge {
                available: 0x400,
                ..
            }
        ));
        assert!(err.to_string().contains("ACPI area"));
    }

    #[test]
    fn acpi_rejects_bad_cpu_counts() {
        let mem = mem();
        for n in [0u8, 255] {
            let cfg = AcpiConfig {
                num_cpus: n,
                virtio_mmio: Vec::new(),
            };
            let err = create_acpi_tables(&mem, &cfg).unwrap_err();
            assert!(
                matches!(err, AcpiError::InvalidCpuCount(c) if c == n),
                "{err}"
            );
        }
    }

    #[test]
    fn acpi_rejects_bad_virtio_devices() {
        let mem = mem();
        let bad = [
            VirtioMmioAcpi {
                base: 0xffff_f000,
                len: 0x2000,
                irq: 5,
            },
            VirtioMmioAcpi {
                base: VIRTIO_MMIO_START,
                len: 0,
                irq: 5,
            },
        ];
        for dev in bad {
            let cfg = AcpiConfig {
                num_cpus: 1,
                virtio_mmio: vec![dev],
            };
            let err = create_acpi_tables(&mem, &cfg).unwrap_err();
            assert!(
                matches!(err, AcpiError::VirtioWindowInvalid { .. }),
                "{err}"
            );
        }
        let cfg = AcpiConfig {
            num_cpus: 1,
            virtio_mmio: vec![VirtioMmioAcpi {
                base: VIRTIO_MMIO_START,
                len: VIRTIO_MMIO_SLOT_SIZE,
                irq: 24,
            }],
        };
        let err = create_acpi_tables(&mem, &cfg).unwrap_err();
        assert!(
            matches!(err, AcpiError::VirtioIrqInvalid { index: 0, irq: 24 }),
            "{err}"
        );
    }

    #[test]
    fn acpi_reports_guest_memory_errors() {
        // RAM that does not cover the ACPI area.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let cfg = AcpiConfig {
            num_cpus: 1,
            virtio_mmio: Vec::new(),
        };
        let err = create_acpi_tables(&mem, &cfg).unwrap_err();
        assert!(matches!(err, AcpiError::GuestMemory(_)), "{err}");
    }
}
