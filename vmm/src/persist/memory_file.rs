//! Guest memory in a file: written region after region, restored by a private
//! (copy-on-write) mapping so pages load lazily and the file is never modified.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

/// Errors while writing or mapping a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write memory file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open memory file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("memory file {path} has {found} bytes, the snapshot needs {expected}")]
    WrongSize {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("cannot map memory file {path}: {detail}")]
    Map { path: String, detail: String },
}

/// Guest RAM layout: (guest physical start, length) of each region, in order.
pub type RamLayout = Vec<(u64, u64)>;

/// The layout of `mem`, as stored in the state file.
pub fn layout(mem: &GuestMemoryMmap) -> RamLayout {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

const PAGE: usize = 4096;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Writes every region of `mem` to `path`, in order, as a sparse file: pages that are all
/// zero are left as holes (they read back as zeros). The vCPUs must be paused. The file
/// is not synced: the caller calls [`sync`] once the guest runs again, so the guest is
/// not stopped while the disk catches up.
pub fn write(mem: &GuestMemoryMmap, path: &Path) -> Result<File, MemoryFileError> {
    let werr = |source| MemoryFileError::Write {
        path: path.display().to_string(),
        source,
    };
    let file = File::create(path).map_err(werr)?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(werr)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let mut offset = 0u64;
        while offset < region.len() {
            let n = (region.len() - offset).min(chunk.len() as u64) as usize;
            let addr = GuestAddress(region.start_addr().0 + offset);
            vm_memory::Bytes::read_slice(mem, &mut chunk[..n], addr)
                .map_err(|e| werr(std::io::Error::other(format!("reading guest memory: {e}"))))?;
            for (start, end) in data_runs(&chunk[..n]) {
                file.write_all_at(&chunk[start..end], file_offset + start as u64)
                    .map_err(werr)?;
            }
            offset += n as u64;
            file_offset += n as u64;
        }
    }
    Ok(file)
}

/// Flushes a memory file written by [`write`] to the disk.
pub fn sync(file: &File, path: &Path) -> Result<(), MemoryFileError> {
    file.sync_all().map_err(|source| MemoryFileError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Byte ranges of `buf` that hold data: runs of pages that are not all zero.
fn data_runs(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in buf.chunks(PAGE).enumerate() {
        if page == &ZERO_PAGE[..page.len()] {
            continue;
        }
        let (start, end) = (i * PAGE, i * PAGE + page.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// Maps `path` privately as guest memory with `layout`. Writes by the guest stay in this
/// process (copy-on-write); pages are read from the file on first touch.
pub fn map_private(path: &Path, layout: &RamLayout) -> Result<GuestMemoryMmap, MemoryFileError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| MemoryFileError::Open {
        path: name.clone(),
        source,
    })?;
    let found = file
        .metadata()
        .map_err(|source| MemoryFileError::Open {
            path: name.clone(),
            source,
        })?
        .len();
    let expected: u64 = layout.iter().map(|r| r.1).sum();
    if found != expected {
        return Err(MemoryFileError::WrongSize {
            path: name,
            found,
            expected,
        });
    }
    let file = Arc::new(file);
    let map_err = |detail: String| MemoryFileError::Map {
        path: name.clone(),
        detail,
    };
    let mut regions = Vec::with_capacity(layout.len());
    let mut offset = 0u64;
    for &(start, len) in layout {
        let size = usize::try_from(len).map_err(|e| map_err(e.to_string()))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(size, ())
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| map_err(format!("region at {start:#x} overflows")))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn data_runs_skip_zero_pages_and_merge_neighbours() {
        let mut buf = vec![0u8; 6 * PAGE + 100];
        buf[PAGE] = 1;
        buf[2 * PAGE + 5] = 2;
        buf[5 * PAGE - 1] = 3;
        buf[6 * PAGE + 99] = 4;
        assert_eq!(
            data_runs(&buf),
            [
                (PAGE, 3 * PAGE),
                (4 * PAGE, 5 * PAGE),
                (6 * PAGE, 6 * PAGE + 100)
            ]
        );
        assert!(data_runs(&[0u8; 3 * PAGE]).is_empty());
    }

    #[test]
    fn round_trip_is_private_and_checks_size() {
        let dir = std::env::temp_dir().join(format!("vmm-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x10_0000), 0x2000),
        ])
        .unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x3ffc)).unwrap();
        mem.write_obj(0xaabbu16, GuestAddress(0x10_1000)).unwrap();
        let file = write(&mem, &path).unwrap();
        sync(&file, &path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0x6000);
        // Only the two pages with data were written; the rest are holes.
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated <= 0x2000 + 0x1000, "{allocated} bytes allocated");

        let restored = map_private(&path, &layout(&mem)).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x3ffc)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            restored.read_obj::<u16>(GuestAddress(0x10_1000)).unwrap(),
            0xaabb
        );
        // Guest writes do not reach the file.
        restored.write_obj(0u32, GuestAddress(0x3ffc)).unwrap();
        let again = map_private(&path, &layout(&mem)).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x3ffc)).unwrap(),
            0x1122_3344
        );

        let wrong = vec![(0u64, 0x8000u64)];
        let err = map_private(&path, &wrong).unwrap_err().to_string();
        assert!(
            err.contains("has 24576 bytes, the snapshot needs 32768"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
