//! Guest-physical memory as the library sees it: one small trait, and implementations
//! for a byte buffer (tests, dumps loaded in memory) and for a file laid out as a list of
//! RAM regions (a snapshot's memory file or a raw dump).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Errors reading guest memory.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemError {
    #[error("guest-physical address {0:#x} is not backed by RAM")]
    Unbacked(u64),
    #[error("reading guest memory at {addr:#x}: {detail}")]
    Io { addr: u64, detail: String },
}

/// Reads guest-physical memory. `Sync`: a walk may read it from several threads.
pub trait GuestPhysMemory: Sync {
    /// Fills `buf` from guest-physical address `gpa`; fails if any byte is not RAM.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// The RAM regions (start, length), for scans.
    fn regions(&self) -> Vec<(u64, u64)>;
}

/// Memory held in a buffer, starting at guest-physical 0.
pub struct BufferMemory(pub Vec<u8>);

impl GuestPhysMemory for BufferMemory {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let start = usize::try_from(gpa).map_err(|_| MemError::Unbacked(gpa))?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= self.0.len())
            .ok_or(MemError::Unbacked(gpa))?;
        buf.copy_from_slice(&self.0[start..end]);
        Ok(())
    }

    fn regions(&self) -> Vec<(u64, u64)> {
        vec![(0, self.0.len() as u64)]
    }
}

/// Memory in a file that holds the RAM regions back to back (vmm's snapshot memory file;
/// a QEMU `pmemsave` of the low RAM is the single-region case).
pub struct FileMemory {
    file: File,
    /// (guest-physical start, length, file offset)
    regions: Vec<(u64, u64, u64)>,
}

impl FileMemory {
    pub fn open(path: &Path, layout: &[(u64, u64)]) -> Result<Self, MemError> {
        let file = File::open(path).map_err(|e| MemError::Io {
            addr: 0,
            detail: format!("{}: {e}", path.display()),
        })?;
        let mut regions = Vec::with_capacity(layout.len());
        let mut off = 0u64;
        for &(start, len) in layout {
            regions.push((start, len, off));
            off = off.saturating_add(len);
        }
        Ok(FileMemory { file, regions })
    }
}

impl GuestPhysMemory for FileMemory {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len() as u64;
        let &(start, _, off) = self
            .regions
            .iter()
            .find(|&&(s, l, _)| gpa >= s && gpa.checked_add(len).is_some_and(|e| e <= s + l))
            .ok_or(MemError::Unbacked(gpa))?;
        self.file
            .read_exact_at(buf, off + (gpa - start))
            .map_err(|e| MemError::Io {
                addr: gpa,
                detail: e.to_string(),
            })
    }

    fn regions(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|&(s, l, _)| (s, l)).collect()
    }
}

/// Memory held in buffers per RAM region (a dump or snapshot memory file loaded whole,
/// which reads like a live VM's mapped memory).
pub struct RegionMemory {
    /// (guest-physical start, bytes)
    regions: Vec<(u64, Vec<u8>)>,
}

impl RegionMemory {
    pub fn new(regions: Vec<(u64, Vec<u8>)>) -> Self {
        RegionMemory { regions }
    }

    /// Loads a file laid out as `FileMemory` expects.
    pub fn load(path: &Path, layout: &[(u64, u64)]) -> Result<Self, MemError> {
        let file = FileMemory::open(path, layout)?;
        let mut regions = Vec::with_capacity(layout.len());
        for &(start, len) in layout {
            let size = usize::try_from(len).map_err(|_| MemError::Unbacked(start))?;
            let mut buf = vec![0u8; size];
            file.read_phys(start, &mut buf)?;
            regions.push((start, buf));
        }
        Ok(RegionMemory { regions })
    }
}

impl GuestPhysMemory for RegionMemory {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        for (start, bytes) in &self.regions {
            let Some(off) = gpa.checked_sub(*start) else {
                continue;
            };
            let Ok(off) = usize::try_from(off) else {
                continue;
            };
            if let Some(src) = off
                .checked_add(buf.len())
                .and_then(|end| bytes.get(off..end))
            {
                buf.copy_from_slice(src);
                return Ok(());
            }
        }
        Err(MemError::Unbacked(gpa))
    }

    fn regions(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|(s, b)| (*s, b.len() as u64))
            .collect()
    }
}

/// Little-endian integer readers over any memory.
pub fn read_u32(mem: &dyn GuestPhysMemory, gpa: u64) -> Result<u32, MemError> {
    let mut b = [0u8; 4];
    mem.read_phys(gpa, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub fn read_u64(mem: &dyn GuestPhysMemory, gpa: u64) -> Result<u64, MemError> {
    let mut b = [0u8; 8];
    mem.read_phys(gpa, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_bounds() {
        let m = BufferMemory(vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(read_u32(&m, 4).unwrap(), 0x0807_0605);
        assert_eq!(read_u32(&m, 5), Err(MemError::Unbacked(5)));
        assert_eq!(read_u64(&m, u64::MAX), Err(MemError::Unbacked(u64::MAX)));
    }

    #[test]
    fn region_memory_reads_inside_one_region_only() {
        let m = RegionMemory::new(vec![(0x1000, vec![1, 2, 3, 4]), (0x9000, vec![9; 8])]);
        assert_eq!(read_u32(&m, 0x1000).unwrap(), 0x0403_0201);
        assert_eq!(read_u64(&m, 0x9000).unwrap(), 0x0909_0909_0909_0909);
        assert!(read_u32(&m, 0x1001).is_err(), "past the region's end");
        assert!(read_u32(&m, 0x0fff).is_err());
        assert!(read_u64(&m, u64::MAX - 3).is_err());
        assert_eq!(m.regions(), vec![(0x1000, 4), (0x9000, 8)]);
    }

    #[test]
    fn file_regions_map_to_offsets() {
        let path = std::env::temp_dir().join(format!("introspect-mem-{}", std::process::id()));
        let mut data = vec![0u8; 0x3000];
        data[0x2000] = 0xab; // second region's first byte
        std::fs::write(&path, &data).unwrap();
        let m = FileMemory::open(&path, &[(0, 0x2000), (0x10_0000, 0x1000)]).unwrap();
        let mut b = [0u8];
        m.read_phys(0x10_0000, &mut b).unwrap();
        assert_eq!(b[0], 0xab);
        assert!(
            m.read_phys(0x1fff, &mut [0u8; 2]).is_err(),
            "a read across a hole fails"
        );
        assert!(m.read_phys(0x2000, &mut b).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
