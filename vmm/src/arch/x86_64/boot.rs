//! The Linux x86 boot protocol: loading a bzImage, the zero page and the e820 map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

/// e820 entry types (`arch/x86/include/uapi/asm/e820.h`).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `XLF_KERNEL_64`: the kernel has the 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Boot protocol 2.12 is the first with `xloadflags`; the 64-bit entry needs it.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// Headroom beyond the decompressed kernel and the initrd that we require of guest RAM.
const MIN_RUNTIME_HEADROOM: u64 = 32 << 20;

/// Errors from loading the kernel and writing the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{0} is not a bzImage kernel (no \"HdrS\" boot header)")]
    NotBzImage(String),
    #[error("{path}: boot protocol {major}.{minor:02} is too old; a 64-bit bzImage (protocol 2.12 or newer) is required")]
    OldProtocol {
        path: String,
        major: u16,
        minor: u16,
    },
    #[error("{0}: the kernel has no 64-bit entry point (XLF_KERNEL_64 not set)")]
    Not64Bit(String),
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("memory too small: {given_mib} MiB given, {what} at least {needed_mib} MiB")]
    MemoryTooSmall {
        given_mib: u64,
        needed_mib: u64,
        what: &'static str,
    },
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("initrd of {size} bytes does not fit in low guest memory")]
    InitrdTooLarge { size: usize },
    #[error("cannot write boot data to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Where the kernel ended up, and what the guest needs to find its initrd.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub header: setup_header,
    /// 64-bit entry point (load address + 0x200).
    pub entry: GuestAddress,
}

/// Reads the setup header of a bzImage (at 0x1f1) without loading it.
pub fn read_setup_header(image: &[u8], path: &str) -> Result<setup_header, BootError> {
    const HDR_OFFSET: usize = 0x1f1;
    let size = std::mem::size_of::<setup_header>();
    let bytes = image
        .get(HDR_OFFSET..HDR_OFFSET + size)
        .ok_or_else(|| BootError::NotBzImage(path.to_string()))?;
    let mut header = setup_header::default();
    vm_memory::ByteValued::as_mut_slice(&mut header).copy_from_slice(bytes);
    if header.header != KERNEL_HDR_MAGIC {
        return Err(BootError::NotBzImage(path.to_string()));
    }
    if header.version < MIN_BOOT_PROTOCOL {
        return Err(BootError::OldProtocol {
            path: path.to_string(),
            major: header.version >> 8,
            minor: header.version & 0xff,
        });
    }
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Not64Bit(path.to_string()));
    }
    Ok(header)
}

/// The least guest RAM with which this kernel (and initrd) can boot: the
/// decompression footprint (`init_size`) above 1 MiB, the initrd and some headroom.
pub fn min_memory(header: &setup_header, initrd_len: usize) -> u64 {
    let kernel_footprint = u64::from(header.init_size).max(u64::from(header.pref_address as u32));
    HIMEM_START + kernel_footprint + initrd_len as u64 + MIN_RUNTIME_HEADROOM
}

/// Loads a bzImage into guest memory at 1 MiB.
pub fn load_bzimage(
    mem: &GuestMemoryMmap,
    image: &[u8],
    path: &str,
    mem_size: u64,
    initrd_len: usize,
) -> Result<LoadedKernel, BootError> {
    let header = read_setup_header(image, path)?;
    let needed = min_memory(&header, initrd_len);
    if mem_size < needed {
        return Err(BootError::MemoryTooSmall {
            given_mib: mem_size >> 20,
            needed_mib: needed.div_ceil(1 << 20),
            what: if initrd_len > 0 {
                "this kernel and its initrd need"
            } else {
                "this kernel needs"
            },
        });
    }
    let mut cursor = std::io::Cursor::new(image);
    let result = BzImage::load(mem, Some(GuestAddress(HIMEM_START)), &mut cursor, None).map_err(
        |source| BootError::Load {
            path: path.to_string(),
            source,
        },
    )?;
    let header = result.setup_header.unwrap_or(header);
    Ok(LoadedKernel {
        header,
        entry: result.kernel_load.unchecked_add(0x200),
    })
}

/// Places the initrd page-aligned at the top of low RAM, below the kernel's
/// `initrd_addr_max`, and returns its address.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    header: &setup_header,
    initrd: &[u8],
    kernel_end: u64,
) -> Result<GuestAddress, BootError> {
    let low_top = mem_size.min(MMIO_HOLE_START);
    let max = if header.initrd_addr_max == 0 {
        0x37ff_ffff
    } else {
        u64::from(header.initrd_addr_max)
    };
    let top = low_top.min(max + 1);
    let size = initrd.len() as u64;
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(BootError::InitrdTooLarge { size: initrd.len() })?;
    mem.write_slice(initrd, GuestAddress(addr))?;
    Ok(GuestAddress(addr))
}

/// The e820 map for a guest with `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, PATCH_TABLE_START, E820_RAM),
        entry(
            PATCH_TABLE_START,
            HIMEM_START - PATCH_TABLE_START,
            E820_RESERVED,
        ),
    ];
    let low_end = mem_size.min(MMIO_HOLE_START);
    map.push(entry(HIMEM_START, low_end - HIMEM_START, E820_RAM));
    if mem_size > MMIO_HOLE_START {
        map.push(entry(RAM_64BIT_START, mem_size - MMIO_HOLE_START, E820_RAM));
    }
    map
}

/// Guest RAM regions `(start, size)` for a guest with `mem_size` bytes of RAM.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem_size > MMIO_HOLE_START {
        regions.push((
            GuestAddress(RAM_64BIT_START),
            (mem_size - MMIO_HOLE_START) as usize,
        ));
    }
    regions
}

/// Everything the zero page records.
pub struct ZeroPageConfig<'a> {
    pub header: setup_header,
    pub cmdline: &'a str,
    pub initrd: Option<(GuestAddress, usize)>,
    pub rsdp: GuestAddress,
    pub mem_size: u64,
}

/// Writes the command line and the zero page (`struct boot_params`).
pub fn write_zero_page(mem: &GuestMemoryMmap, cfg: &ZeroPageConfig) -> Result<(), BootError> {
    let cmdline = cfg.cmdline.as_bytes();
    let max = (cfg.header.cmdline_size as usize).clamp(255, CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    mem.write_slice(cmdline, GuestAddress(CMDLINE_START))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64))?;

    let mut params = boot_params {
        hdr: cfg.header,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if let Some((addr, size)) = cfg.initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = cfg.rsdp.raw_value();
    let map = e820_map(cfg.mem_size);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage(version: u16, xloadflags: u16, init_size: u32) -> Vec<u8> {
        let mut image = vec![0u8; 0x4000];
        let mut hdr = setup_header {
            setup_sects: 4,
            header: KERNEL_HDR_MAGIC,
            version,
            xloadflags,
            init_size,
            loadflags: 1,
            code32_start: HIMEM_START as u32,
            ..Default::default()
        };
        hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        let bytes = vm_memory::ByteValued::as_slice(&hdr);
        image[0x1f1..0x1f1 + bytes.len()].copy_from_slice(bytes);
        image
    }

    #[test]
    fn e820_small_guest() {
        let map = e820_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            (map[0].addr, map[0].size, map[0].r#type),
            (0, PATCH_TABLE_START, E820_RAM)
        );
        assert_eq!({ map[1].r#type }, E820_RESERVED);
        assert!(map[1].addr <= PATCH_TABLE_START && PATCH_TABLE_START < map[1].addr + map[1].size);
        assert!(map[1].addr <= EBDA_START);
        assert!(map[1].addr <= ACPI_START && map[1].addr + map[1].size >= ACPI_END);
        assert_eq!(
            (map[2].addr, map[2].addr + map[2].size),
            (HIMEM_START, 512 << 20)
        );
    }

    #[test]
    fn e820_large_guest_skips_mmio_hole() {
        let map = e820_map(6 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_HOLE_START);
        assert_eq!(
            (map[3].addr, map[3].size),
            (RAM_64BIT_START, (6 << 30) - MMIO_HOLE_START)
        );
        let total: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(total, (6 << 30) - (HIMEM_START - PATCH_TABLE_START));
        let regions = ram_regions(6 << 30);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].0, GuestAddress(RAM_64BIT_START));
    }

    #[test]
    fn setup_header_validation() {
        assert!(read_setup_header(&fake_bzimage(0x020f, 1, 0x100_0000), "k").is_ok());
        assert!(matches!(
            read_setup_header(&[0u8; 100], "k"),
            Err(BootError::NotBzImage(_))
        ));
        assert!(matches!(
            read_setup_header(&vec![0u8; 0x1000], "k"),
            Err(BootError::NotBzImage(_))
        ));
        assert!(matches!(
            read_setup_header(&fake_bzimage(0x0206, 1, 0), "k"),
            Err(BootError::OldProtocol { .. })
        ));
        assert!(matches!(
            read_setup_header(&fake_bzimage(0x020f, 0, 0), "k"),
            Err(BootError::Not64Bit(_))
        ));
    }

    #[test]
    fn memory_too_small_is_reported() {
        let image = fake_bzimage(0x020f, 1, 0x3377000);
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(32 << 20)).unwrap();
        let err = load_bzimage(&mem, &image, "k", 32 << 20, 1 << 20).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("memory too small: 32 MiB given"), "{msg}");
    }

    #[test]
    fn zero_page_round_trip() {
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(128 << 20)).unwrap();
        let image = fake_bzimage(0x020f, 1, 0x100_0000);
        let k = load_bzimage(&mem, &image, "k", 128 << 20, 0).unwrap();
        assert_eq!(k.entry, GuestAddress(HIMEM_START + 0x200));
        let initrd = vec![0xabu8; 10_000];
        let at = load_initrd(&mem, 128 << 20, &k.header, &initrd, HIMEM_START + 0x4000).unwrap();
        assert_eq!(at.raw_value() & 0xfff, 0);
        assert!(at.raw_value() + 10_000 <= 128 << 20);
        write_zero_page(
            &mem,
            &ZeroPageConfig {
                header: k.header,
                cmdline: "console=ttyS0",
                initrd: Some((at, initrd.len())),
                rsdp: GuestAddress(ACPI_START),
                mem_size: 128 << 20,
            },
        )
        .unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.ramdisk_image } as u64, at.raw_value());
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ params.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(params.e820_entries, 3);
        let mut cmd = [0u8; 14];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
    }

    #[test]
    fn overlong_cmdline_is_rejected() {
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(64 << 20)).unwrap();
        let header = setup_header {
            cmdline_size: 2047,
            ..Default::default()
        };
        let long = "x".repeat(3000);
        let err = write_zero_page(
            &mem,
            &ZeroPageConfig {
                header,
                cmdline: &long,
                initrd: None,
                rsdp: GuestAddress(ACPI_START),
                mem_size: 64 << 20,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::CmdlineTooLong { len: 3000, .. }));
    }
}
