//! Locating the kernel and initrd inside a raw guest disk image.
//!
//! The VMM boots an unmodified distribution kernel (e.g. Debian 12's
//! `linux-image-cloud-amd64`) straight from a cloud-style raw disk image,
//! without a bootloader. This module opens the image **read-only**, finds
//! the ext4 root filesystem in it, and reads `/boot/vmlinuz-<version>` and
//! `/boot/initrd.img-<version>` for the newest installed kernel.
//!
//! Supported layouts:
//! * a whole-disk ext4 filesystem (superblock at byte 1024 of the image);
//! * an MBR-partitioned disk: the first primary partition of type `0x83`
//!   (logical partitions inside extended partitions are not searched);
//! * a GPT-partitioned disk (protective MBR with a type `0xEE` entry, GPT
//!   header at LBA 1, 512-byte sectors): the first partition whose type is
//!   "Linux filesystem data" (`0FC63DAF-8483-4772-8E79-3D69D8477DE4`) or
//!   "x86-64 root" (`4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709`). The header and
//!   entry-array CRC32s are **not** verified and the backup GPT is never
//!   consulted; every field that is used is bounds-checked instead.
//!
//! Every number read from the image is treated as untrusted: all offsets and
//! sizes are checked with overflow-free arithmetic, allocations are capped,
//! and malformed input yields a [`GuestImageError`], never a panic.
//!
//! The filesystem itself is parsed by the `ext4-view` crate, which is handed
//! a byte window (offset, length) of the image through its [`Ext4Read`]
//! trait. Before that, the superblock geometry is sanity-checked here so that
//! a hostile superblock cannot make `ext4-view` reserve a huge block-group
//! descriptor table up front.

use std::cmp::Ordering;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ext4_view::{Ext4, Ext4Error, Ext4Read};

/// Largest kernel image that will be loaded.
pub const MAX_KERNEL_SIZE: u64 = 256 << 20;
/// Largest initrd that will be loaded.
pub const MAX_INITRD_SIZE: u64 = 1 << 30;

/// Sector size assumed for MBR and GPT partition tables.
const SECTOR_SIZE: u64 = 512;
/// Byte offset of the ext4 superblock from the start of the filesystem.
const EXT4_SUPERBLOCK_OFFSET: u64 = 1024;
/// Size of the ext4 superblock.
const EXT4_SUPERBLOCK_SIZE: usize = 1024;
/// Offset of `s_magic` inside the superblock, and its value.
const EXT4_MAGIC_OFFSET: usize = 0x38;
const EXT4_MAGIC: u16 = 0xEF53;

/// MBR partition type for Linux native filesystems.
const MBR_TYPE_LINUX: u8 = 0x83;
/// MBR partition type of a GPT protective entry.
const MBR_TYPE_GPT_PROTECTIVE: u8 = 0xEE;

/// GPT header signature.
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// Bounds accepted for the GPT header's fields.
const GPT_MIN_HEADER_SIZE: u32 = 92;
const GPT_MIN_ENTRY_SIZE: u32 = 128;
const GPT_MAX_ENTRY_SIZE: u32 = 4096;
const GPT_MAX_ENTRIES: u32 = 4096;

/// Upper bound on the number of block groups accepted before handing the
/// filesystem to `ext4-view` (it allocates one descriptor per group up
/// front). 2^20 groups is ~128 TiB with 4 KiB blocks.
const MAX_BLOCK_GROUPS: u64 = 1 << 20;
/// Upper bound on the number of `/boot` entries examined.
const MAX_BOOT_DIR_ENTRIES: usize = 65536;

/// Encodes a GUID given in its textual field order into the mixed-endian
/// on-disk layout used by GPT (first three fields little-endian).
const fn gpt_guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// GPT type "Linux filesystem data", 0FC63DAF-8483-4772-8E79-3D69D8477DE4.
const GPT_TYPE_LINUX_DATA: [u8; 16] = gpt_guid(
    0x0FC6_3DAF,
    0x8483,
    0x4772,
    [0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4],
);
/// GPT type "Linux root (x86-64)", 4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709.
const GPT_TYPE_LINUX_ROOT_X86_64: [u8; 16] = gpt_guid(
    0x4F68_BCE3,
    0xE8CD,
    0x4DB1,
    [0x96, 0xE7, 0xFB, 0xCA, 0xF9, 0x84, 0xB7, 0x09],
);

/// Partition table scheme a partition was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionScheme {
    /// DOS/MBR partition table.
    Mbr,
    /// GUID partition table.
    Gpt,
}

impl fmt::Display for PartitionScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PartitionScheme::Mbr => "MBR",
            PartitionScheme::Gpt => "GPT",
        })
    }
}

/// The partition holding the root filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionInfo {
    /// 1-based number of the partition table entry (as in `/dev/vda<N>`).
    pub index: u32,
    /// Offset of the partition from the start of the image, in bytes.
    pub start: u64,
    /// Size of the partition, in bytes.
    pub size: u64,
    /// Partition table the entry came from.
    pub scheme: PartitionScheme,
}

/// Kernel and initrd found in a guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// Contents of the kernel image (a bzImage for x86 Debian kernels).
    pub kernel: Vec<u8>,
    /// Contents of the matching initrd, if one exists.
    pub initrd: Option<Vec<u8>>,
    /// Path of the kernel inside the guest filesystem, e.g.
    /// `/boot/vmlinuz-6.1.0-9-cloud-amd64`.
    pub kernel_path: String,
    /// Path of the initrd inside the guest filesystem.
    pub initrd_path: Option<String>,
    /// The partition the filesystem was found in; `None` for a whole-disk
    /// filesystem.
    pub partition: Option<PartitionInfo>,
}

impl BootFiles {
    /// The kernel version string (the part after `vmlinuz-`).
    pub fn kernel_version(&self) -> &str {
        self.kernel_path
            .rsplit('/')
            .next()
            .and_then(|name| name.strip_prefix("vmlinuz-"))
            .unwrap_or(&self.kernel_path)
    }
}

/// Problems found while parsing an MBR or GPT partition table.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Reading the partition table from the image failed.
    #[error("cannot read partition table: {0}")]
    Io(#[from] io::Error),
    /// The protective MBR announces a GPT, but LBA 1 holds no GPT header.
    #[error("protective MBR found, but LBA 1 has no GPT header (\"EFI PART\" signature missing)")]
    MissingGptHeader,
    /// The GPT header has a field outside the accepted range.
    #[error("invalid GPT header: {0}")]
    BadGptHeader(String),
    /// The Linux partition's entry points outside the image.
    #[error("partition table entry {index} lies outside the disk")]
    OutsideDisk {
        /// 1-based entry number.
        index: u32,
    },
    /// The Linux partition's entry is self-contradictory.
    #[error("partition table entry {index} is invalid: {reason}")]
    BadEntry {
        /// 1-based entry number.
        index: u32,
        /// What is wrong with it.
        reason: String,
    },
    /// A valid partition table without any Linux partition.
    #[error(
        "no ext4 filesystem found (not ext4, and the {scheme} partition table has no Linux partition)"
    )]
    NoLinuxPartition {
        /// The partition table that was searched.
        scheme: PartitionScheme,
    },
}

/// Errors from [`find_boot_files`]. Every message is a single line that
/// names the image.
#[derive(Debug, thiserror::Error)]
pub enum GuestImageError {
    /// The image could not be opened.
    #[error("cannot open disk image {}: {source}", .path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading from the image failed.
    #[error("{}: cannot read disk image: {source}", .path.display())]
    Read {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Neither a whole-disk ext4 filesystem nor a partition table.
    #[error("{}: no ext4 filesystem found (not ext4, and no MBR/GPT Linux partition)", .path.display())]
    NotExt4 {
        /// The image path.
        path: PathBuf,
    },
    /// The partition table is malformed, or has no Linux partition.
    #[error("{}: {source}", .path.display())]
    PartitionTable {
        /// The image path.
        path: PathBuf,
        /// What is wrong with the partition table.
        source: PartitionError,
    },
    /// The Linux partition does not hold an ext4 filesystem.
    #[error(
        "{}: {} partition {} is a Linux partition but holds no ext4 filesystem",
        .path.display(), .partition.scheme, .partition.index
    )]
    PartitionNotExt4 {
        /// The image path.
        path: PathBuf,
        /// The partition that was examined.
        partition: PartitionInfo,
    },
    /// The ext4 filesystem is damaged.
    #[error("{}: corrupt ext4 filesystem: {detail}", .path.display())]
    Corrupt {
        /// The image path.
        path: PathBuf,
        /// What is damaged.
        detail: String,
    },
    /// The filesystem uses features `ext4-view` cannot read.
    #[error("{}: unsupported ext4 filesystem: {detail}", .path.display())]
    Unsupported {
        /// The image path.
        path: PathBuf,
        /// The unsupported feature(s).
        detail: String,
    },
    /// The filesystem has no `/boot` directory.
    #[error("{}: no /boot directory in the filesystem", .path.display())]
    NoBootDir {
        /// The image path.
        path: PathBuf,
    },
    /// `/boot` contains no kernel.
    #[error("{}: no /boot/vmlinuz-* in the filesystem", .path.display())]
    NoKernel {
        /// The image path.
        path: PathBuf,
    },
    /// A boot file could not be read (not a regular file, encrypted, ...).
    #[error("{}: cannot read {file} from the filesystem: {detail}", .path.display())]
    ReadFile {
        /// The image path.
        path: PathBuf,
        /// Path inside the guest filesystem.
        file: String,
        /// Why it could not be read.
        detail: String,
    },
    /// A boot file exceeds its size cap.
    #[error("{}: {file} is too large ({size} bytes, limit {limit} bytes)", .path.display())]
    FileTooLarge {
        /// The image path.
        path: PathBuf,
        /// Path inside the guest filesystem.
        file: String,
        /// Size recorded in the filesystem.
        size: u64,
        /// The applicable cap.
        limit: u64,
    },
    /// The kernel file is empty.
    #[error("{}: {file} is empty", .path.display())]
    EmptyFile {
        /// The image path.
        path: PathBuf,
        /// Path inside the guest filesystem.
        file: String,
    },
}

/// Positioned, read-only access to a disk image. Implemented for host files
/// and for in-memory byte buffers (tests).
pub(crate) trait DiskSource {
    /// Total size of the disk in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`; fails if the range is not entirely inside
    /// the disk.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

fn out_of_range(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "read of {len} bytes at offset {offset} is beyond the end of the disk ({size} bytes)"
        ),
    )
}

impl DiskSource for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| Some((start, start.checked_add(buf.len())?)))
            .and_then(|(start, end)| self.get(start..end))
            .ok_or_else(|| out_of_range(offset, buf.len(), self.size()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl DiskSource for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.as_slice().read_exact_at(offset, buf)
    }
}

/// A host image file opened read-only, with its size fixed at open time.
pub(crate) struct HostImage {
    file: File,
    size: u64,
}

impl HostImage {
    /// Opens `path` read-only. Directories are rejected here so the error
    /// is reported as an open error.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        // `File::open` opens with O_RDONLY: the image is never writable
        // through this handle.
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "is a directory",
            ));
        }
        // `metadata().len()` is 0 for block devices; seeking to the end
        // gives the real size for both files and devices.
        let size = {
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))?
        };
        Ok(Self { file, size })
    }
}

impl DiskSource for HostImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let in_range = offset
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.size);
        if !in_range {
            return Err(out_of_range(offset, buf.len(), self.size));
        }
        FileExt::read_exact_at(&self.file, buf, offset)
    }
}

/// Error returned by [`WindowReader`] to `ext4-view`.
#[derive(Debug)]
enum WindowReadError {
    /// The filesystem asked for bytes outside its window.
    OutOfRange {
        offset: u64,
        len: usize,
        window: u64,
    },
    /// The host read failed.
    Io(io::Error),
}

impl fmt::Display for WindowReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WindowReadError::OutOfRange {
                offset,
                len,
                window,
            } => write!(
                f,
                "filesystem data out of bounds (read of {len} bytes at offset {offset}, \
                 filesystem area is {window} bytes)"
            ),
            WindowReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for WindowReadError {}

/// Exposes the byte range `[start, start + len)` of a disk to `ext4-view`
/// as if it were the whole device.
struct WindowReader<R> {
    disk: R,
    start: u64,
    len: u64,
}

impl<R: DiskSource> Ext4Read for WindowReader<R> {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let out_of_range = || WindowReadError::OutOfRange {
            offset: start_byte,
            len: dst.len(),
            window: self.len,
        };
        let in_range = start_byte
            .checked_add(dst.len() as u64)
            .is_some_and(|end| end <= self.len);
        let abs = self
            .start
            .checked_add(start_byte)
            .filter(|_| in_range)
            .ok_or_else(out_of_range)?;
        self.disk
            .read_exact_at(abs, dst)
            .map_err(|e| Box::new(WindowReadError::Io(e)) as _)
    }
}

fn le16(b: &[u8], off: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        v.copy_from_slice(s);
    }
    u16::from_le_bytes(v)
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

/// Reads the first sector, or `None` if the disk is shorter than a sector.
fn read_mbr<R: DiskSource + ?Sized>(disk: &R) -> io::Result<Option<[u8; 512]>> {
    if disk.size() < SECTOR_SIZE {
        return Ok(None);
    }
    let mut mbr = [0u8; 512];
    disk.read_exact_at(0, &mut mbr)?;
    Ok(Some(mbr))
}

/// One primary MBR entry.
struct MbrEntry {
    status: u8,
    kind: u8,
    start_lba: u32,
    sectors: u32,
}

/// Parses the four primary entries if `mbr` carries the `55 AA` boot
/// signature.
fn mbr_entries(mbr: &[u8; 512]) -> Option<[MbrEntry; 4]> {
    if mbr[510] != 0x55 || mbr[511] != 0xAA {
        return None;
    }
    Some(std::array::from_fn(|i| {
        let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
        MbrEntry {
            status: e[0],
            kind: e[4],
            start_lba: le32(e, 8),
            sectors: le32(e, 12),
        }
    }))
}

/// Whether `mbr` is a (protective or hybrid) MBR announcing a GPT.
pub(crate) fn is_protective_mbr(mbr: &[u8; 512]) -> bool {
    mbr_entries(mbr)
        .is_some_and(|entries| entries.iter().any(|e| e.kind == MBR_TYPE_GPT_PROTECTIVE))
}

/// Finds the root filesystem partition of `disk`.
///
/// Returns `Ok(None)` if the disk has no recognisable partition table
/// (no `55 AA` signature, or entries with impossible status bytes, as in a
/// filesystem boot sector), `Ok(Some(_))` for the first Linux partition,
/// and an error for a damaged table or one without a Linux partition.
/// GPT CRC32 fields are ignored.
pub(crate) fn find_linux_partition<R: DiskSource + ?Sized>(
    disk: &R,
) -> Result<Option<PartitionInfo>, PartitionError> {
    let Some(mbr) = read_mbr(disk)? else {
        return Ok(None);
    };
    let Some(entries) = mbr_entries(&mbr) else {
        return Ok(None);
    };
    if entries.iter().any(|e| e.kind == MBR_TYPE_GPT_PROTECTIVE) {
        return parse_gpt(disk).map(Some);
    }
    let used = || entries.iter().filter(|e| e.kind != 0);
    if used().next().is_none() || used().any(|e| e.status != 0x00 && e.status != 0x80) {
        return Ok(None);
    }
    let disk_size = disk.size();
    for (i, e) in entries.iter().enumerate() {
        if e.kind != MBR_TYPE_LINUX || e.sectors == 0 {
            continue;
        }
        let index = i as u32 + 1;
        if e.start_lba == 0 {
            return Err(PartitionError::BadEntry {
                index,
                reason: "starts at sector 0 (overlaps the MBR)".into(),
            });
        }
        // u32 * 512 cannot overflow u64.
        let start = u64::from(e.start_lba) * SECTOR_SIZE;
        let size = u64::from(e.sectors) * SECTOR_SIZE;
        if start.checked_add(size).is_none_or(|end| end > disk_size) {
            return Err(PartitionError::OutsideDisk { index });
        }
        return Ok(Some(PartitionInfo {
            index,
            start,
            size,
            scheme: PartitionScheme::Mbr,
        }));
    }
    Err(PartitionError::NoLinuxPartition {
        scheme: PartitionScheme::Mbr,
    })
}

/// Parses the primary GPT (header at LBA 1) and returns its first Linux
/// partition.
fn parse_gpt<R: DiskSource + ?Sized>(disk: &R) -> Result<PartitionInfo, PartitionError> {
    let disk_size = disk.size();
    if disk_size < 2 * SECTOR_SIZE {
        return Err(PartitionError::BadGptHeader(format!(
            "disk is too small ({disk_size} bytes) to hold a GPT header at LBA 1"
        )));
    }
    let mut hdr = [0u8; 512];
    disk.read_exact_at(SECTOR_SIZE, &mut hdr)?;
    if &hdr[0..8] != GPT_SIGNATURE {
        return Err(PartitionError::MissingGptHeader);
    }
    let bad = |s: String| Err(PartitionError::BadGptHeader(s));
    let header_size = le32(&hdr, 12);
    if !(GPT_MIN_HEADER_SIZE..=SECTOR_SIZE as u32).contains(&header_size) {
        return bad(format!(
            "header size {header_size} not in {GPT_MIN_HEADER_SIZE}..=512"
        ));
    }
    let entries_lba = le64(&hdr, 72);
    let num_entries = le32(&hdr, 80);
    let entry_size = le32(&hdr, 84);
    if !(GPT_MIN_ENTRY_SIZE..=GPT_MAX_ENTRY_SIZE).contains(&entry_size) || entry_size & 7 != 0 {
        return bad(format!(
            "entry size {entry_size} is not a multiple of 8 in \
             {GPT_MIN_ENTRY_SIZE}..={GPT_MAX_ENTRY_SIZE}"
        ));
    }
    if num_entries > GPT_MAX_ENTRIES {
        return bad(format!(
            "{num_entries} entries exceeds the limit of {GPT_MAX_ENTRIES}"
        ));
    }
    if entries_lba < 2 {
        return bad(format!(
            "entry array at LBA {entries_lba} overlaps the MBR or header"
        ));
    }
    let array_start = entries_lba.checked_mul(SECTOR_SIZE);
    // Both factors are capped above, so the product fits easily.
    let array_len = u64::from(num_entries) * u64::from(entry_size);
    if array_start
        .and_then(|s| s.checked_add(array_len))
        .is_none_or(|end| end > disk_size)
    {
        return bad(format!(
            "entry array ({num_entries} x {entry_size} bytes at LBA {entries_lba}) lies outside the disk"
        ));
    }
    let array_start = array_start.unwrap_or_default();

    // Only the first 128 bytes of an entry are defined; larger entries are
    // padding for future use.
    let mut entry = [0u8; GPT_MIN_ENTRY_SIZE as usize];
    for i in 0..num_entries {
        let off = array_start + u64::from(i) * u64::from(entry_size);
        disk.read_exact_at(off, &mut entry)?;
        let kind = &entry[0..16];
        if kind != GPT_TYPE_LINUX_DATA && kind != GPT_TYPE_LINUX_ROOT_X86_64 {
            continue;
        }
        let index = i + 1;
        let first = le64(&entry, 32);
        let last = le64(&entry, 40);
        if first < 2 {
            return Err(PartitionError::BadEntry {
                index,
                reason: format!("starts at LBA {first} (overlaps the GPT header)"),
            });
        }
        if last < first {
            return Err(PartitionError::BadEntry {
                index,
                reason: format!("last LBA {last} is before first LBA {first}"),
            });
        }
        let start = first.checked_mul(SECTOR_SIZE);
        let end = last
            .checked_add(1)
            .and_then(|l| l.checked_mul(SECTOR_SIZE))
            .filter(|&end| end <= disk_size);
        let (Some(start), Some(end)) = (start, end) else {
            return Err(PartitionError::OutsideDisk { index });
        };
        return Ok(PartitionInfo {
            index,
            start,
            size: end - start,
            scheme: PartitionScheme::Gpt,
        });
    }
    Err(PartitionError::NoLinuxPartition {
        scheme: PartitionScheme::Gpt,
    })
}

/// Reads the superblock of the filesystem that would start at `start`, if
/// the window is large enough and carries the ext4 magic.
fn read_ext4_superblock<R: DiskSource + ?Sized>(
    disk: &R,
    start: u64,
    len: u64,
) -> io::Result<Option<Vec<u8>>> {
    let needed = EXT4_SUPERBLOCK_OFFSET + EXT4_SUPERBLOCK_SIZE as u64;
    if len < needed {
        return Ok(None);
    }
    let Some(sb_start) = start.checked_add(EXT4_SUPERBLOCK_OFFSET) else {
        return Ok(None);
    };
    let mut sb = vec![0u8; EXT4_SUPERBLOCK_SIZE];
    disk.read_exact_at(sb_start, &mut sb)?;
    if le16(&sb, EXT4_MAGIC_OFFSET) != EXT4_MAGIC {
        return Ok(None);
    }
    Ok(Some(sb))
}

/// Sanity-checks superblock geometry against the window holding it.
///
/// `ext4-view` validates the superblock itself, but sizes its block-group
/// descriptor table from `s_blocks_count` before reading any descriptor, so
/// an absurd block count could make it attempt a multi-gigabyte allocation.
/// Like the Linux kernel ("block count exceeds size of device"), reject a
/// filesystem that claims to be larger than its partition.
pub(crate) fn check_superblock_geometry(sb: &[u8], window_len: u64) -> Result<(), String> {
    let blocks_lo = u64::from(le32(sb, 0x04));
    let first_data_block = u64::from(le32(sb, 0x14));
    let log_block_size = le32(sb, 0x18);
    let blocks_per_group = u64::from(le32(sb, 0x20));
    let incompat = le32(sb, 0x60);
    let blocks_hi = if incompat & 0x80 != 0 {
        u64::from(le32(sb, 0x150))
    } else {
        0
    };
    let blocks = (blocks_hi << 32) | blocks_lo;
    // Valid ext4 block sizes are 1 KiB ..= 64 KiB.
    if log_block_size > 6 {
        return Err(format!(
            "invalid block size (s_log_block_size = {log_block_size})"
        ));
    }
    let block_size = 1024u64 << log_block_size;
    let fs_bytes = blocks
        .checked_mul(block_size)
        .ok_or_else(|| format!("block count {blocks} is impossibly large"))?;
    if fs_bytes > window_len {
        return Err(format!(
            "superblock claims {blocks} blocks of {block_size} bytes ({fs_bytes} bytes), \
             but only {window_len} bytes are available"
        ));
    }
    if blocks_per_group == 0 {
        return Err("zero blocks per group".into());
    }
    let groups = blocks
        .saturating_sub(first_data_block)
        .div_ceil(blocks_per_group);
    if groups > MAX_BLOCK_GROUPS {
        return Err(format!(
            "{groups} block groups exceeds the limit of {MAX_BLOCK_GROUPS}"
        ));
    }
    Ok(())
}

/// Converts an `ext4-view` error into a [`GuestImageError`]; `file` names
/// the guest file being accessed, if any.
fn ext4_error(path: &Path, file: Option<&str>, err: Ext4Error) -> GuestImageError {
    let path = path.to_path_buf();
    let context = |detail: String| match file {
        Some(f) => format!("{detail} (while reading {f})"),
        None => detail,
    };
    match err {
        Ext4Error::Io(inner) => match inner.downcast::<WindowReadError>() {
            Ok(w) => match *w {
                WindowReadError::Io(source) => GuestImageError::Read { path, source },
                out_of_range => GuestImageError::Corrupt {
                    path,
                    detail: context(out_of_range.to_string()),
                },
            },
            Err(other) => GuestImageError::Corrupt {
                path,
                detail: context(other.to_string()),
            },
        },
        Ext4Error::Corrupt(c) => GuestImageError::Corrupt {
            path,
            detail: context(c.to_string()),
        },
        Ext4Error::Incompatible(i) => GuestImageError::Unsupported {
            path,
            detail: i.to_string(),
        },
        other => match file {
            Some(f) => GuestImageError::ReadFile {
                path,
                file: f.to_string(),
                detail: other.to_string(),
            },
            None => GuestImageError::Corrupt {
                path,
                detail: other.to_string(),
            },
        },
    }
}

/// Compares kernel version strings the way humans expect: runs of ASCII
/// digits are compared numerically (`53` > `9`), everything else bytewise.
/// Versions that differ only in leading zeros are ordered bytewise so the
/// result is a total order consistent with equality.
pub(crate) fn compare_versions(a: &str, b: &str) -> Ordering {
    fn next_chunk<'a>(s: &mut &'a [u8]) -> Option<&'a [u8]> {
        let first = *s.first()?;
        let digit = first.is_ascii_digit();
        let n = s
            .iter()
            .position(|c| c.is_ascii_digit() != digit)
            .unwrap_or(s.len());
        let (chunk, rest) = s.split_at(n);
        *s = rest;
        Some(chunk)
    }
    fn numeric(a: &[u8], b: &[u8]) -> Ordering {
        fn strip(s: &[u8]) -> &[u8] {
            let z = s.iter().take_while(|&&c| c == b'0').count();
            &s[z..]
        }
        let (a, b) = (strip(a), strip(b));
        a.len().cmp(&b.len()).then_with(|| a.cmp(b))
    }

    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (next_chunk(&mut x), next_chunk(&mut y)) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(p), Some(q)) => {
                let both_digits = p[0].is_ascii_digit() && q[0].is_ascii_digit();
                let ord = if both_digits { numeric(p, q) } else { p.cmp(q) };
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

/// Reads a whole guest file, refusing files larger than `limit`.
fn read_guest_file(
    fs: &Ext4,
    image: &Path,
    file: &str,
    limit: u64,
) -> Result<Vec<u8>, GuestImageError> {
    let mut f = fs
        .open(file)
        .map_err(|e| ext4_error(image, Some(file), e))?;
    let size = f.metadata().len();
    if size > limit {
        return Err(GuestImageError::FileTooLarge {
            path: image.to_path_buf(),
            file: file.to_string(),
            size,
            limit,
        });
    }
    // `limit` is at most 1 GiB, so this cannot truncate on 64-bit hosts;
    // treat a failure as "too large" anyway.
    let len = usize::try_from(size).map_err(|_| GuestImageError::FileTooLarge {
        path: image.to_path_buf(),
        file: file.to_string(),
        size,
        limit,
    })?;
    let mut data = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = f
            .read_bytes(&mut data[filled..])
            .map_err(|e| ext4_error(image, Some(file), e))?;
        if n == 0 {
            return Err(GuestImageError::Corrupt {
                path: image.to_path_buf(),
                detail: format!("{file} ended after {filled} of {len} bytes"),
            });
        }
        filled += n;
    }
    Ok(data)
}

/// Where the filesystem lives on the disk.
struct FsLocation {
    /// Byte offset of the filesystem.
    start: u64,
    /// Size of the area holding it.
    len: u64,
    /// The partition, or `None` for a whole-disk filesystem.
    partition: Option<PartitionInfo>,
    /// The raw superblock (magic already checked).
    superblock: Vec<u8>,
}

/// Finds the ext4 filesystem on `disk`.
fn locate_filesystem<R: DiskSource + ?Sized>(
    disk: &R,
    path: &Path,
) -> Result<FsLocation, GuestImageError> {
    let read_err = |source| GuestImageError::Read {
        path: path.to_path_buf(),
        source,
    };
    let disk_size = disk.size();
    let protective = read_mbr(disk)
        .map_err(read_err)?
        .is_some_and(|m| is_protective_mbr(&m));
    // A whole-disk filesystem is recognised by its superblock magic. A disk
    // with a protective MBR is GPT even if LBA 2 happens to hold 0xEF53
    // (that would be the first character of entry 1's name).
    if !protective {
        if let Some(superblock) = read_ext4_superblock(disk, 0, disk_size).map_err(read_err)? {
            return Ok(FsLocation {
                start: 0,
                len: disk_size,
                partition: None,
                superblock,
            });
        }
    }
    let partition = find_linux_partition(disk)
        .map_err(|source| match source {
            PartitionError::Io(source) => read_err(source),
            source => GuestImageError::PartitionTable {
                path: path.to_path_buf(),
                source,
            },
        })?
        .ok_or_else(|| GuestImageError::NotExt4 {
            path: path.to_path_buf(),
        })?;
    let superblock = read_ext4_superblock(disk, partition.start, partition.size)
        .map_err(read_err)?
        .ok_or_else(|| GuestImageError::PartitionNotExt4 {
            path: path.to_path_buf(),
            partition,
        })?;
    Ok(FsLocation {
        start: partition.start,
        len: partition.size,
        partition: Some(partition),
        superblock,
    })
}

/// Core of [`find_boot_files`] over any disk source; `path` is only used
/// in error messages.
pub(crate) fn find_boot_files_in<R: DiskSource + 'static>(
    disk: R,
    path: &Path,
) -> Result<BootFiles, GuestImageError> {
    let FsLocation {
        start,
        len,
        partition,
        superblock,
    } = locate_filesystem(&disk, path)?;

    let corrupt = |detail: String| GuestImageError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    check_superblock_geometry(&superblock, len).map_err(corrupt)?;

    let fs = Ext4::load(Box::new(WindowReader { disk, start, len }))
        .map_err(|e| ext4_error(path, None, e))?;

    let boot = match fs.read_dir("/boot") {
        Ok(dir) => dir,
        Err(Ext4Error::NotFound | Ext4Error::NotADirectory) => {
            return Err(GuestImageError::NoBootDir {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(ext4_error(path, Some("/boot"), e)),
    };

    let mut kernels: Vec<String> = Vec::new();
    let mut initrds: Vec<String> = Vec::new();
    for (n, entry) in boot.enumerate() {
        if n >= MAX_BOOT_DIR_ENTRIES {
            return Err(corrupt(format!(
                "/boot has more than {MAX_BOOT_DIR_ENTRIES} entries"
            )));
        }
        let entry = entry.map_err(|e| ext4_error(path, Some("/boot"), e))?;
        let Ok(name) = entry.file_name().as_str() else {
            continue;
        };
        // Regular files, or symlinks that `open` will follow; skip
        // directories and special files.
        let usable = entry
            .file_type()
            .is_ok_and(|t| t.is_regular_file() || t.is_symlink());
        if !usable {
            continue;
        }
        if let Some(v) = name.strip_prefix("vmlinuz-").filter(|v| !v.is_empty()) {
            kernels.push(v.to_string());
        } else if let Some(v) = name.strip_prefix("initrd.img-").filter(|v| !v.is_empty()) {
            initrds.push(v.to_string());
        }
    }

    let version = kernels
        .into_iter()
        .max_by(|a, b| compare_versions(a, b))
        .ok_or_else(|| GuestImageError::NoKernel {
            path: path.to_path_buf(),
        })?;

    let kernel_path = format!("/boot/vmlinuz-{version}");
    let kernel = read_guest_file(&fs, path, &kernel_path, MAX_KERNEL_SIZE)?;
    if kernel.is_empty() {
        return Err(GuestImageError::EmptyFile {
            path: path.to_path_buf(),
            file: kernel_path,
        });
    }

    let (initrd, initrd_path) = if initrds.contains(&version) {
        let p = format!("/boot/initrd.img-{version}");
        (
            Some(read_guest_file(&fs, path, &p, MAX_INITRD_SIZE)?),
            Some(p),
        )
    } else {
        tracing::warn!(
            "{}: no /boot/initrd.img-{version}; booting {kernel_path} without an initrd",
            path.display()
        );
        (None, None)
    };

    Ok(BootFiles {
        kernel,
        initrd,
        kernel_path,
        initrd_path,
        partition,
    })
}

/// Finds and reads the newest kernel (and its initrd) in the raw disk image
/// at `path`. The image is opened read-only and never modified.
pub fn find_boot_files(path: &Path) -> Result<BootFiles, GuestImageError> {
    let disk = HostImage::open(path).map_err(|source| GuestImageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    find_boot_files_in(disk, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};

    // ---------------------------------------------------------------
    // Helpers
    // ---------------------------------------------------------------

    /// A unique scratch directory under the system temp dir, removed on
    /// drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, AtomicOrdering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("vmm-guest-image-{}-{name}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Locates `mkfs.ext4`, failing loudly if e2fsprogs is missing.
    fn mkfs_ext4() -> PathBuf {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        dirs.extend(["/sbin", "/usr/sbin", "/usr/local/sbin"].map(PathBuf::from));
        dirs.into_iter()
            .map(|d| d.join("mkfs.ext4"))
            .find(|p| p.is_file())
            .expect(
                "mkfs.ext4 not found in PATH, /sbin, /usr/sbin or /usr/local/sbin: \
                 install e2fsprogs (e.g. `apt-get install e2fsprogs`) to run the \
                 guest_image filesystem tests",
            )
    }

    /// A file or directory to place in a test filesystem.
    enum Node<'a> {
        File(&'a str, Vec<u8>),
        Dir(&'a str),
    }

    /// Builds an 8 MiB ext4 image populated with `nodes` and returns its
    /// bytes. `extra` is passed to mkfs.ext4 (e.g. `-b 4096`).
    fn make_ext4(tmp: &TempDir, nodes: &[Node<'_>], extra: &[&str]) -> Vec<u8> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, AtomicOrdering::Relaxed);
        let root = tmp.path().join(format!("root{n}"));
        std::fs::create_dir_all(&root).unwrap();
        for node in nodes {
            match node {
                Node::File(p, data) => {
                    let p = root.join(p);
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    std::fs::write(p, data).unwrap();
                }
                Node::Dir(p) => std::fs::create_dir_all(root.join(p)).unwrap(),
            }
        }
        let img = tmp.path().join(format!("fs{n}.ext4"));
        let out = std::process::Command::new(mkfs_ext4())
            .args(["-q", "-F"])
            .args(extra)
            .arg("-d")
            .arg(&root)
            .arg(&img)
            .arg("8M")
            .output()
            .expect("run mkfs.ext4");
        assert!(
            out.status.success(),
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(&img).unwrap()
    }

    /// Deterministic pseudo-random bytes (content and fuzzing).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// Recognisable multi-block file contents.
    fn content(tag: &str, len: usize) -> Vec<u8> {
        tag.bytes().cycle().take(len).collect()
    }

    /// The standard /boot of the tests: two kernels, two initrds, noise.
    fn debian_like_boot() -> Vec<Node<'static>> {
        vec![
            Node::File(
                "boot/vmlinuz-6.1.0-9-cloud-amd64",
                content("old kernel ", 150_000),
            ),
            Node::File(
                "boot/initrd.img-6.1.0-9-cloud-amd64",
                content("old initrd ", 70_000),
            ),
            Node::File(
                "boot/vmlinuz-6.1.0-53-cloud-amd64",
                content("new kernel ", 200_000),
            ),
            Node::File(
                "boot/initrd.img-6.1.0-53-cloud-amd64",
                content("new initrd ", 90_000),
            ),
            Node::File("boot/config-6.1.0-53-cloud-amd64", b"CONFIG_X=y\n".to_vec()),
            Node::File(
                "boot/System.map-6.1.0-53-cloud-amd64",
                b"ffff t x\n".to_vec(),
            ),
            // A directory that sorts newest must be ignored.
            Node::Dir("boot/vmlinuz-99.0"),
            Node::Dir("boot/grub"),
            Node::File("etc/hostname", b"guest\n".to_vec()),
        ]
    }

    fn check_newest(files: &BootFiles) {
        assert_eq!(files.kernel_path, "/boot/vmlinuz-6.1.0-53-cloud-amd64");
        assert_eq!(files.kernel_version(), "6.1.0-53-cloud-amd64");
        assert_eq!(files.kernel, content("new kernel ", 200_000));
        assert_eq!(
            files.initrd_path.as_deref(),
            Some("/boot/initrd.img-6.1.0-53-cloud-amd64")
        );
        assert_eq!(
            files.initrd.as_deref(),
            Some(&content("new initrd ", 90_000)[..])
        );
    }

    /// Runs [`find_boot_files`] and asserts the image file is unchanged.
    fn lookup(path: &Path) -> Result<BootFiles, GuestImageError> {
        let before = std::fs::read(path).ok();
        let result = find_boot_files(path);
        assert_eq!(
            std::fs::read(path).ok(),
            before,
            "find_boot_files modified {}",
            path.display()
        );
        result
    }

    fn write_image(tmp: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// One MBR entry: (status, type, start LBA, sector count).
    type MbrSpec = (u8, u8, u32, u32);

    fn mbr(entries: &[MbrSpec]) -> [u8; 512] {
        let mut m = [0u8; 512];
        for (i, &(status, kind, start, sectors)) in entries.iter().enumerate() {
            let e = &mut m[446 + 16 * i..446 + 16 * (i + 1)];
            e[0] = status;
            e[4] = kind;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&sectors.to_le_bytes());
        }
        m[510] = 0x55;
        m[511] = 0xAA;
        m
    }

    /// Parses "XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX" into GPT's on-disk
    /// byte order (independently of [`gpt_guid`]).
    fn guid(s: &str) -> [u8; 16] {
        let hex: Vec<u8> = s
            .split('-')
            .flat_map(|part| {
                (0..part.len())
                    .step_by(2)
                    .map(move |i| u8::from_str_radix(&part[i..i + 2], 16).unwrap())
            })
            .collect();
        assert_eq!(hex.len(), 16);
        let mut g = [0u8; 16];
        g[0..4].copy_from_slice(&[hex[3], hex[2], hex[1], hex[0]]);
        g[4..6].copy_from_slice(&[hex[5], hex[4]]);
        g[6..8].copy_from_slice(&[hex[7], hex[6]]);
        g[8..16].copy_from_slice(&hex[8..16]);
        g
    }

    const LINUX_DATA: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
    const LINUX_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
    const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
    const EFI_SYSTEM: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

    /// Builds a GPT disk of `sectors` sectors: protective MBR, header at
    /// LBA 1, 128 entries of 128 bytes at LBA 2. The header and entry CRC32
    /// fields are left zero: the parser does not check them. `parts` is
    /// (type GUID, first LBA, last LBA) per entry slot.
    fn gpt_disk(sectors: u64, parts: &[(&str, u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; (sectors * 512) as usize];
        let pm = mbr(&[(0, 0xEE, 1, (sectors - 1).min(u64::from(u32::MAX)) as u32)]);
        d[..512].copy_from_slice(&pm);
        let h = &mut d[512..1024];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[32..40].copy_from_slice(&(sectors - 1).to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(sectors.saturating_sub(34)).to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        for (i, &(kind, first, last)) in parts.iter().enumerate() {
            let e = &mut d[1024 + 128 * i..1024 + 128 * (i + 1)];
            e[0..16].copy_from_slice(&guid(kind));
            e[16] = i as u8 + 1; // unique GUID, arbitrary
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        }
        d
    }

    fn set_gpt_header_u32(d: &mut [u8], off: usize, v: u32) {
        d[512 + off..512 + off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn set_gpt_header_u64(d: &mut [u8], off: usize, v: u64) {
        d[512 + off..512 + off + 8].copy_from_slice(&v.to_le_bytes());
    }

    // ---------------------------------------------------------------
    // Version ordering
    // ---------------------------------------------------------------

    #[test]
    fn version_digit_runs_compare_numerically() {
        use Ordering::*;
        let cases = [
            ("6.1.0-53-cloud-amd64", "6.1.0-9-cloud-amd64", Greater),
            ("6.1.0-10-amd64", "6.1.0-9-amd64", Greater),
            ("6.10.0-1", "6.9.0-1", Greater),
            ("6.1.0-9-cloud-amd64", "6.1.0-9-cloud-amd64", Equal),
            ("5.10.0-28-cloud-amd64", "6.1.0-9-cloud-amd64", Less),
            ("6.1.0", "6.1.0-1", Less),
            ("6.1.0-9-cloud-amd64", "6.1.0-9-amd64", Greater),
            // Huge digit runs must not overflow.
            (
                "1.99999999999999999999999999",
                "1.100000000000000000000000000",
                Less,
            ),
            // Leading zeros: numerically equal, ordered deterministically.
            ("1.01", "1.1", Less),
            ("", "0", Less),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn version_sort_picks_newest_debian_kernel() {
        let mut v = vec![
            "6.1.0-9-cloud-amd64",
            "6.1.0-53-cloud-amd64",
            "6.1.0-18-cloud-amd64",
            "5.10.0-30-cloud-amd64",
            "6.1.0-10-cloud-amd64",
        ];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            v,
            [
                "5.10.0-30-cloud-amd64",
                "6.1.0-9-cloud-amd64",
                "6.1.0-10-cloud-amd64",
                "6.1.0-18-cloud-amd64",
                "6.1.0-53-cloud-amd64",
            ]
        );
    }

    // ---------------------------------------------------------------
    // Partition tables (in memory)
    // ---------------------------------------------------------------

    #[test]
    fn gpt_type_guid_constants_match_their_text_form() {
        assert_eq!(GPT_TYPE_LINUX_DATA, guid(LINUX_DATA));
        assert_eq!(GPT_TYPE_LINUX_ROOT_X86_64, guid(LINUX_ROOT_X86_64));
    }

    #[test]
    fn mbr_first_linux_partition_is_used() {
        let mut disk = vec![0u8; 8192 * 512];
        disk[..512].copy_from_slice(&mbr(&[
            (0x80, 0x0C, 63, 1000),   // FAT32
            (0x00, 0x82, 1100, 900),  // swap
            (0x00, 0x83, 2048, 4096), // Linux
            (0x00, 0x83, 6144, 2048), // second Linux, ignored
        ]));
        let p = find_linux_partition(&disk[..]).unwrap().unwrap();
        assert_eq!(
            p,
            PartitionInfo {
                index: 3,
                start: 2048 * 512,
                size: 4096 * 512,
                scheme: PartitionScheme::Mbr,
            }
        );
    }

    #[test]
    fn mbr_partition_outside_disk_is_an_error() {
        let mut disk = vec![0u8; 4096 * 512];
        disk[..512].copy_from_slice(&mbr(&[(0, 0x83, 2048, 4096)]));
        let err = find_linux_partition(&disk[..]).unwrap_err();
        assert!(matches!(err, PartitionError::OutsideDisk { index: 1 }));
        assert_eq!(
            err.to_string(),
            "partition table entry 1 lies outside the disk"
        );

        // Maximal values must not overflow.
        disk[..512].copy_from_slice(&mbr(&[(0, 0x83, u32::MAX, u32::MAX)]));
        assert!(matches!(
            find_linux_partition(&disk[..]),
            Err(PartitionError::OutsideDisk { index: 1 })
        ));

        disk[..512].copy_from_slice(&mbr(&[(0, 0x83, 0, 10)]));
        assert!(matches!(
            find_linux_partition(&disk[..]),
            Err(PartitionError::BadEntry { index: 1, .. })
        ));
    }

    #[test]
    fn mbr_without_linux_partition() {
        let mut disk = vec![0u8; 4096 * 512];
        disk[..512].copy_from_slice(&mbr(&[(0x80, 0x07, 2048, 1024)]));
        let err = find_linux_partition(&disk[..]).unwrap_err();
        assert!(matches!(
            err,
            PartitionError::NoLinuxPartition {
                scheme: PartitionScheme::Mbr
            }
        ));
        // A zero-sized Linux entry counts as unused.
        disk[..512].copy_from_slice(&mbr(&[(0x80, 0x83, 2048, 0), (0, 0x07, 2048, 8)]));
        assert!(find_linux_partition(&disk[..]).is_err());
    }

    #[test]
    fn not_a_partition_table() {
        // No 55 AA signature.
        assert!(find_linux_partition(&[0u8; 4096][..]).unwrap().is_none());
        // Shorter than one sector, including empty.
        for len in [0, 1, 100, 511] {
            assert!(find_linux_partition(&vec![0u8; len][..]).unwrap().is_none());
        }
        // Signature but no entries.
        assert!(find_linux_partition(&mbr(&[])[..]).unwrap().is_none());
        // Signature with impossible status bytes (e.g. a FAT boot sector).
        let bs = mbr(&[(0x12, 0x83, 1, 1)]);
        assert!(find_linux_partition(&bs[..]).unwrap().is_none());
    }

    #[test]
    fn gpt_first_linux_partition_is_used() {
        let disk = gpt_disk(
            8192,
            &[
                (BIOS_BOOT, 34, 2047),
                (EFI_SYSTEM, 2048, 4095),
                (LINUX_DATA, 4096, 8191 - 34),
                (LINUX_DATA, 100, 200),
            ],
        );
        let p = find_linux_partition(&disk[..]).unwrap().unwrap();
        assert_eq!(
            p,
            PartitionInfo {
                index: 3,
                start: 4096 * 512,
                size: (8191 - 34 - 4096 + 1) * 512,
                scheme: PartitionScheme::Gpt,
            }
        );
    }

    #[test]
    fn gpt_x86_64_root_type_is_accepted() {
        let disk = gpt_disk(
            4096,
            &[(EFI_SYSTEM, 34, 100), (LINUX_ROOT_X86_64, 2048, 4000)],
        );
        let p = find_linux_partition(&disk[..]).unwrap().unwrap();
        assert_eq!(
            (p.index, p.start, p.scheme),
            (2, 2048 * 512, PartitionScheme::Gpt)
        );
    }

    #[test]
    fn gpt_without_linux_partition() {
        let disk = gpt_disk(4096, &[(EFI_SYSTEM, 34, 100)]);
        let err = find_linux_partition(&disk[..]).unwrap_err();
        assert!(matches!(
            err,
            PartitionError::NoLinuxPartition {
                scheme: PartitionScheme::Gpt
            }
        ));
        assert!(err
            .to_string()
            .contains("GPT partition table has no Linux partition"));
    }

    #[test]
    fn protective_mbr_requires_gpt_header() {
        // Protective MBR, but LBA 1 is zeros.
        let mut disk = vec![0u8; 4096 * 512];
        disk[..512].copy_from_slice(&mbr(&[(0, 0xEE, 1, 4095)]));
        assert!(is_protective_mbr(&mbr(&[(0, 0xEE, 1, 4095)])));
        assert!(matches!(
            find_linux_partition(&disk[..]),
            Err(PartitionError::MissingGptHeader)
        ));
        // Protective MBR on a disk too small to have LBA 1.
        assert!(matches!(
            find_linux_partition(&disk[..512]),
            Err(PartitionError::BadGptHeader(_))
        ));
        // A protective entry wins over a Linux MBR entry (hybrid MBR).
        let mut hybrid = gpt_disk(4096, &[(LINUX_DATA, 2048, 4000)]);
        hybrid[..512].copy_from_slice(&mbr(&[(0, 0x83, 34, 100), (0, 0xEE, 1, 4095)]));
        let p = find_linux_partition(&hybrid[..]).unwrap().unwrap();
        assert_eq!((p.scheme, p.index), (PartitionScheme::Gpt, 1));
    }

    #[test]
    fn gpt_header_fields_are_bounds_checked() {
        let good = gpt_disk(4096, &[(LINUX_DATA, 2048, 4000)]);
        let header_err = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut d = good.clone();
            f(&mut d);
            match find_linux_partition(&d[..]) {
                Err(PartitionError::BadGptHeader(msg)) => msg,
                other => panic!("expected BadGptHeader, got {other:?}"),
            }
        };
        // Header size.
        header_err(&|d| set_gpt_header_u32(d, 12, 0));
        header_err(&|d| set_gpt_header_u32(d, 12, 513));
        // Entry size.
        for size in [0, 8, 127, 129, 8192, u32::MAX] {
            header_err(&|d| set_gpt_header_u32(d, 84, size));
        }
        // Entry count.
        let msg = header_err(&|d| set_gpt_header_u32(d, 80, u32::MAX));
        assert!(msg.contains("exceeds the limit"), "{msg}");
        // Array location.
        header_err(&|d| set_gpt_header_u64(d, 72, 0));
        header_err(&|d| set_gpt_header_u64(d, 72, 1));
        header_err(&|d| set_gpt_header_u64(d, 72, u64::MAX));
        header_err(&|d| set_gpt_header_u64(d, 72, u64::MAX / 512));
        header_err(&|d| set_gpt_header_u64(d, 72, 4095));
        // Allowed extremes still parse: 4096 entries of 128 bytes would
        // need 1024 sectors; 4096 x 4096 is too big for this disk.
        let mut d = good.clone();
        set_gpt_header_u32(&mut d, 80, 4096);
        assert!(find_linux_partition(&d[..]).unwrap().is_some());
        let mut d = good.clone();
        set_gpt_header_u32(&mut d, 80, 0);
        assert!(matches!(
            find_linux_partition(&d[..]),
            Err(PartitionError::NoLinuxPartition { .. })
        ));
    }

    #[test]
    fn gpt_entry_bounds_are_checked() {
        let outside = |first: u64, last: u64| {
            let d = gpt_disk(4096, &[(LINUX_DATA, first, last)]);
            find_linux_partition(&d[..]).unwrap_err()
        };
        let err = outside(2048, 4096);
        assert_eq!(
            err.to_string(),
            "partition table entry 1 lies outside the disk"
        );
        assert!(matches!(
            outside(2048, u64::MAX),
            PartitionError::OutsideDisk { index: 1 }
        ));
        assert!(matches!(
            outside(u64::MAX, u64::MAX),
            PartitionError::OutsideDisk { index: 1 }
        ));
        assert!(matches!(
            outside(3000, 2000),
            PartitionError::BadEntry { index: 1, .. }
        ));
        assert!(matches!(
            outside(0, 100),
            PartitionError::BadEntry { index: 1, .. }
        ));
        // Last sector of the disk is fine.
        let d = gpt_disk(4096, &[(LINUX_DATA, 2048, 4095)]);
        assert_eq!(
            find_linux_partition(&d[..]).unwrap().unwrap().size,
            2048 * 512
        );
    }

    #[test]
    fn truncated_partition_tables_do_not_panic() {
        let gpt = gpt_disk(4096, &[(EFI_SYSTEM, 34, 100), (LINUX_DATA, 2048, 4095)]);
        let mut m = vec![0u8; 4096 * 512];
        m[..512].copy_from_slice(&mbr(&[(0, 0x83, 2048, 2048)]));
        for disk in [&gpt, &m] {
            for len in (0..=20 * 1024).chain([disk.len() - 1, disk.len()]) {
                let r = find_linux_partition(&disk[..len]);
                if len < disk.len() && len >= 512 {
                    assert!(r.is_err(), "len {len}: {r:?}");
                }
            }
        }
    }

    #[test]
    fn garbage_partition_tables_do_not_panic() {
        let mut rng = Lcg(0x5eed);
        for i in 0..3000 {
            let len = (rng.next() % 8192) as usize;
            let mut d = rng.bytes(len);
            if len >= 512 && i % 2 == 0 {
                d[510] = 0x55;
                d[511] = 0xAA;
                if i % 4 == 0 {
                    d[446 + 4] = 0xEE;
                }
                if len >= 520 && i % 8 == 0 {
                    d[512..520].copy_from_slice(b"EFI PART");
                }
            }
            let _ = find_linux_partition(&d[..]);
            let _ = find_boot_files_in(d, Path::new("garbage.img"));
        }
        // Mutations of a valid GPT.
        let gpt = gpt_disk(4096, &[(LINUX_DATA, 2048, 4095)]);
        for _ in 0..3000 {
            let mut d = gpt[..2048 * 512].to_vec();
            for _ in 0..(1 + rng.next() % 8) {
                let at = (rng.next() % 1536) as usize;
                d[at] = rng.next() as u8;
            }
            let _ = find_linux_partition(&d[..]);
        }
    }

    #[test]
    fn superblock_geometry_is_checked() {
        let mut sb = vec![0u8; 1024];
        sb[0x04..0x08].copy_from_slice(&8192u32.to_le_bytes()); // blocks
        sb[0x14..0x18].copy_from_slice(&1u32.to_le_bytes()); // first data block
        sb[0x20..0x24].copy_from_slice(&8192u32.to_le_bytes()); // blocks/group
        assert!(check_superblock_geometry(&sb, 8 << 20).is_ok());
        assert!(check_superblock_geometry(&sb, (8 << 20) - 1).is_err());
        // Absurd block size.
        let mut bad = sb.clone();
        bad[0x18..0x1C].copy_from_slice(&40u32.to_le_bytes());
        assert!(check_superblock_geometry(&bad, u64::MAX).is_err());
        // 64-bit block count that overflows bytes.
        let mut bad = sb.clone();
        bad[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        bad[0x150..0x154].copy_from_slice(&u32::MAX.to_le_bytes());
        bad[0x18..0x1C].copy_from_slice(&6u32.to_le_bytes());
        assert!(check_superblock_geometry(&bad, u64::MAX).is_err());
        // Too many groups for the window, and zero blocks per group.
        let mut bad = sb.clone();
        bad[0x20..0x24].copy_from_slice(&1u32.to_le_bytes());
        bad[0x04..0x08].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(check_superblock_geometry(&bad, u64::MAX)
            .unwrap_err()
            .contains("block groups"));
        let mut bad = sb;
        bad[0x20..0x24].copy_from_slice(&0u32.to_le_bytes());
        assert!(check_superblock_geometry(&bad, u64::MAX).is_err());
    }

    // ---------------------------------------------------------------
    // Real ext4 images (built with mkfs.ext4 at test time)
    // ---------------------------------------------------------------

    #[test]
    fn whole_disk_ext4_newest_kernel_and_matching_initrd() {
        let tmp = TempDir::new("whole");
        let img = make_ext4(&tmp, &debian_like_boot(), &[]);
        let path = write_image(&tmp, "disk.img", &img);
        let files = lookup(&path).unwrap();
        check_newest(&files);
        assert_eq!(files.partition, None);
    }

    #[test]
    fn missing_initrd_boots_without_one() {
        let tmp = TempDir::new("noinitrd");
        let img = make_ext4(
            &tmp,
            &[
                Node::File("boot/vmlinuz-6.1.0-53-cloud-amd64", content("k", 5000)),
                // Initrd for a different version only.
                Node::File("boot/initrd.img-6.1.0-9-cloud-amd64", content("i", 5000)),
            ],
            &[],
        );
        let path = write_image(&tmp, "disk.img", &img);
        let files = lookup(&path).unwrap();
        assert_eq!(files.kernel_path, "/boot/vmlinuz-6.1.0-53-cloud-amd64");
        assert_eq!(files.kernel, content("k", 5000));
        assert_eq!(files.initrd, None);
        assert_eq!(files.initrd_path, None);
    }

    #[test]
    fn no_kernel_in_boot_is_an_error() {
        let tmp = TempDir::new("nokernel");
        let img = make_ext4(
            &tmp,
            &[
                Node::File("boot/initrd.img-6.1.0-9-cloud-amd64", content("i", 100)),
                Node::File("boot/vmlinuz-", content("k", 100)), // no version
                Node::Dir("boot/vmlinuz-6.1.0-9-cloud-amd64"),  // not a file
            ],
            &[],
        );
        let path = write_image(&tmp, "disk.img", &img);
        let err = lookup(&path).unwrap_err();
        assert!(matches!(err, GuestImageError::NoKernel { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("{}: no /boot/vmlinuz-* in the filesystem", path.display())
        );

        let img = make_ext4(&tmp, &[Node::File("etc/hostname", b"x".to_vec())], &[]);
        let path = write_image(&tmp, "noboot.img", &img);
        let err = lookup(&path).unwrap_err();
        assert!(matches!(err, GuestImageError::NoBootDir { .. }), "{err}");
    }

    #[test]
    fn mbr_partitioned_disk() {
        let tmp = TempDir::new("mbr");
        let fs = make_ext4(&tmp, &debian_like_boot(), &[]);
        let fs_sectors = (fs.len() / 512) as u32;
        let mut disk = vec![0u8; 2048 * 512 + fs.len()];
        disk[..512].copy_from_slice(&mbr(&[(0x80, 0x83, 2048, fs_sectors)]));
        disk[2048 * 512..].copy_from_slice(&fs);
        let path = write_image(&tmp, "mbr.img", &disk);
        let files = lookup(&path).unwrap();
        check_newest(&files);
        assert_eq!(
            files.partition,
            Some(PartitionInfo {
                index: 1,
                start: 2048 * 512,
                size: fs.len() as u64,
                scheme: PartitionScheme::Mbr,
            })
        );

        // The same table on a truncated disk: the entry lies outside.
        let path = write_image(&tmp, "short.img", &disk[..disk.len() - 512]);
        let err = lookup(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: partition table entry 1 lies outside the disk",
                path.display()
            )
        );
    }

    #[test]
    fn gpt_partitioned_disk() {
        let tmp = TempDir::new("gpt");
        // Debian cloud images use 4 KiB blocks.
        let fs = make_ext4(&tmp, &debian_like_boot(), &["-b", "4096"]);
        let first = 2048u64;
        let last = first + fs.len() as u64 / 512 - 1;
        // Room for a (never written) backup GPT after the partition.
        let sectors = last + 1 + 33;
        let mut disk = gpt_disk(sectors, &[(BIOS_BOOT, 34, 2047), (LINUX_DATA, first, last)]);
        disk[(first * 512) as usize..((last + 1) * 512) as usize].copy_from_slice(&fs);
        let path = write_image(&tmp, "gpt.img", &disk);
        let files = lookup(&path).unwrap();
        check_newest(&files);
        assert_eq!(
            files.partition,
            Some(PartitionInfo {
                index: 2,
                start: first * 512,
                size: fs.len() as u64,
                scheme: PartitionScheme::Gpt,
            })
        );
    }

    #[test]
    fn linux_partition_without_ext4() {
        let tmp = TempDir::new("noext4part");
        let disk = gpt_disk(8192, &[(LINUX_DATA, 2048, 8000)]);
        let path = write_image(&tmp, "gpt.img", &disk);
        let err = lookup(&path).unwrap_err();
        assert!(
            matches!(err, GuestImageError::PartitionNotExt4 { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("GPT partition 1"), "{err}");
    }

    #[test]
    fn not_ext4_is_an_error() {
        let tmp = TempDir::new("notext4");
        let expected = |p: &Path| {
            format!(
                "{}: no ext4 filesystem found (not ext4, and no MBR/GPT Linux partition)",
                p.display()
            )
        };
        for (name, bytes) in [
            ("random.img", Lcg(7).bytes(1 << 20)),
            ("zeros.img", vec![0u8; 1 << 20]),
            ("empty.img", Vec::new()),
            ("tiny.img", b"hello".to_vec()),
        ] {
            let path = write_image(&tmp, name, &bytes);
            let err = lookup(&path).unwrap_err();
            assert!(
                matches!(err, GuestImageError::NotExt4 { .. }),
                "{name}: {err}"
            );
            assert_eq!(err.to_string(), expected(&path));
        }
    }

    #[test]
    fn missing_file_or_directory_is_an_open_error() {
        let tmp = TempDir::new("missing");
        let path = tmp.path().join("does-not-exist.img");
        let err = lookup(&path).unwrap_err();
        assert!(matches!(err, GuestImageError::Open { .. }));
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("cannot open disk image {}: ", path.display())),
            "{msg}"
        );
        assert!(msg.contains("No such file or directory"), "{msg}");

        let err = find_boot_files(tmp.path()).unwrap_err();
        assert!(matches!(err, GuestImageError::Open { .. }), "{err}");
    }

    #[test]
    fn corrupt_ext4_is_an_error() {
        let tmp = TempDir::new("corrupt");
        let img = make_ext4(&tmp, &debian_like_boot(), &[]);
        let corrupt_prefix = |p: &Path| format!("{}: corrupt ext4 filesystem: ", p.display());

        // Scribble over the superblock but keep the magic, so it is still
        // recognised as ext4.
        let mut bad = img.clone();
        for (i, b) in bad[1024..2048].iter_mut().enumerate() {
            if !(0x38..0x3A).contains(&i) {
                *b ^= 0x5A;
            }
        }
        let path = write_image(&tmp, "sb.img", &bad);
        let err = lookup(&path).unwrap_err();
        assert!(err.to_string().starts_with(&corrupt_prefix(&path)), "{err}");

        // Scribble over the block group descriptors (block 2 with 1 KiB
        // blocks), leaving the superblock intact.
        let mut bad = img.clone();
        for b in &mut bad[2048..3072] {
            *b = 0xA5;
        }
        let path = write_image(&tmp, "gdt.img", &bad);
        let err = lookup(&path).unwrap_err();
        assert!(err.to_string().starts_with(&corrupt_prefix(&path)), "{err}");

        // Superblock claims a filesystem larger than the image.
        let path = write_image(&tmp, "trunc.img", &img[..img.len() / 2]);
        let err = lookup(&path).unwrap_err();
        assert!(err.to_string().starts_with(&corrupt_prefix(&path)), "{err}");
    }

    #[test]
    fn mutated_ext4_never_panics() {
        // Without metadata checksums, mutations reach the deeper parsers
        // instead of being rejected by a checksum.
        let tmp = TempDir::new("fuzz");
        for extra in [&["-O", "^metadata_csum"][..], &["-b", "4096"][..]] {
            let img = make_ext4(&tmp, &debian_like_boot(), extra);
            // Mutate metadata only: 1 KiB chunks that are neither all zero
            // nor file contents (superblock, descriptors, bitmaps, inodes,
            // extent and directory blocks).
            let chunks: Vec<usize> = (0..img.len() / 1024)
                .filter(|&c| {
                    let b = &img[c * 1024..(c + 1) * 1024];
                    let is_text = |pat: &[u8]| b.windows(pat.len()).any(|w| w == pat);
                    b.iter().any(|&x| x != 0) && !is_text(b"kernel ") && !is_text(b"initrd ")
                })
                .collect();
            assert!(chunks.len() > 4, "found {} metadata chunks", chunks.len());
            let mut rng = Lcg(0xf00d);
            for _ in 0..400 {
                let mut d = img.clone();
                for _ in 0..(1 + rng.next() % 8) {
                    let chunk = chunks[(rng.next() as usize) % chunks.len()];
                    let at = chunk * 1024 + (rng.next() % 1021) as usize;
                    match rng.next() % 4 {
                        0 => d[at] = rng.next() as u8,
                        1 => d[at] ^= 1 << (rng.next() % 8),
                        2 => d[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes()),
                        _ => d[at..at + 4].copy_from_slice(&0x8000_0000u32.to_le_bytes()),
                    }
                }
                let _ = find_boot_files_in(d, Path::new("fuzz.img"));
            }
        }
    }
}
