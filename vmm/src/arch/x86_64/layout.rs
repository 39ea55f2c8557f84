//! Guest-physical memory layout of an x86_64 VM.
//!
//! ```text
//! 0x0000_0000 .. 0x0009_f000  low RAM (GDT, IDT, zero page, boot page tables, cmdline, AP trampoline)
//! 0x0009_f000 .. 0x0010_0000  reserved: live-patch page table, EBDA, ACPI tables (RSDP at 0xe_0000), BIOS area
//! 0x0010_0000 .. min(RAM, 3 GiB)  RAM (kernel loaded at 1 MiB, initrd at the top)
//! 0xc000_0000 .. 0xfec0_0000  32-bit MMIO hole: virtio-mmio slots from 0xd000_0000
//! 0xfec0_0000                 IOAPIC, 0xfee0_0000 LAPIC
//! 0x1_0000_0000 ..            RAM above 4 GiB, when the guest has more than 3 GiB
//! ```

/// Global descriptor table used for the 64-bit boot entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty) used for the 64-bit boot entry.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux boot protocol "zero page" (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, PDPT, then four page directories (identity map of 4 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line the Linux boot protocol lets us pass (`cmdline_size` of 6.1 is 2047).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The page table that maps the live-patch area into the guest kernel's address space.
/// Reserved in the e820 map, and below 1 MiB, which the kernel always keeps in its
/// direct map: a guest walking its own kernel page tables (the boot-time W+X check,
/// `/sys/kernel/debug/page_tables`) reads it through `__va()` like any table of its own.
/// RAM below it is usable by the guest.
pub const PATCH_TABLE_START: u64 = 0x9_f000;
/// Start of the Extended BIOS Data Area.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables live in the reserved area below 1 MiB; the RSDP is at its start.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the area reserved for ACPI tables (exclusive).
pub const ACPI_END: u64 = 0x10_0000;
/// Start of high memory; the bzImage protected-mode kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (RAM stops here and resumes at 4 GiB).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = 0x4000_0000;
/// First virtio-mmio device slot.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// IOAPIC MMIO base.
/// Guest-physical memory the VMM keeps for live-patch code: inside the MMIO hole, not
/// in the e820 map, so the guest never allocates or maps it by itself.
pub const PATCH_AREA_START: u64 = 0xe000_0000;
pub const PATCH_AREA_SIZE: u64 = 2 << 20;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS for real-mode emulation (three pages below the BIOS ROM area).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Start of RAM above the MMIO hole.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;

/// Legacy I/O ports and interrupt lines.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_IRQ: u32 = 1;
/// The i8042 controller occupies 0x60..0x65 (data at 0x60, command/status at 0x64).
pub const I8042_PORT_LEN: u16 = 5;
/// ACPI sleep control register (HW-reduced ACPI): writing SLP_TYP=5|SLP_EN powers off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
/// First GSI handed out to virtio-mmio devices (GSIs 5..=23 are free legacy lines).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// Last usable IOAPIC pin.
pub const IOAPIC_LAST_IRQ: u32 = 23;
