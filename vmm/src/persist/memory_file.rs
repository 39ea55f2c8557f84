//! Guest memory in a file: written region after region, restored by a private
//! (copy-on-write) mapping so pages load lazily and the file is never modified.

use std::fs::File;
use std::io::{BufWriter, Write};
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

/// Writes every region of `mem` to `path`, in order. The vCPUs must be paused.
pub fn write(mem: &GuestMemoryMmap, path: &Path) -> Result<(), MemoryFileError> {
    let werr = |source| MemoryFileError::Write {
        path: path.display().to_string(),
        source,
    };
    let file = File::create(path).map_err(werr)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut chunk = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let mut offset = 0u64;
        while offset < region.len() {
            let n = (region.len() - offset).min(chunk.len() as u64) as usize;
            let addr = GuestAddress(region.start_addr().0 + offset);
            vm_memory::Bytes::read_slice(mem, &mut chunk[..n], addr)
                .map_err(|e| werr(std::io::Error::other(format!("reading guest memory: {e}"))))?;
            out.write_all(&chunk[..n]).map_err(werr)?;
            offset += n as u64;
        }
    }
    let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
    file.sync_all().map_err(werr)
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
        write(&mem, &path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0x6000);

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
