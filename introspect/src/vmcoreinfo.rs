//! vmcoreinfo: the plain-text page the kernel prepares for crash dumps
//! (`OSRELEASE=…`, `BUILD-ID=…`, `SYMBOL(name)=hex`, `NUMBER(name)=decimal`, …). Found by
//! scanning guest RAM for a page that starts with `OSRELEASE=`; the most deterministic
//! bootstrap there is (guest-introspection.md §1.4).

use crate::memory::{GuestPhysMemory, MemError};

const PAGE: u64 = 4096;
const MAGIC: &[u8] = b"OSRELEASE=";

/// Errors finding or reading vmcoreinfo.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmcoreinfoError {
    #[error("no vmcoreinfo page in guest memory (is the kernel past its early initcalls?)")]
    NotFound,
    #[error("{0}")]
    Memory(#[from] MemError),
}

/// The parsed page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vmcoreinfo {
    /// Guest-physical address of the page.
    pub gpa: u64,
    pub fields: Vec<(String, String)>,
}

impl Vmcoreinfo {
    /// Parses the text of a vmcoreinfo page (up to the first NUL, at most one page).
    pub fn parse(gpa: u64, page: &[u8]) -> Self {
        let end = page.iter().position(|&b| b == 0).unwrap_or(page.len());
        let text = String::from_utf8_lossy(&page[..end]);
        let fields = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        Vmcoreinfo { gpa, fields }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `SYMBOL(name)=hex`.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        u64::from_str_radix(self.get(&format!("SYMBOL({name})"))?, 16).ok()
    }

    /// `NUMBER(name)=decimal`, printed signed by the kernel.
    pub fn number(&self, name: &str) -> Option<i64> {
        self.get(&format!("NUMBER({name})"))?.parse().ok()
    }

    pub fn osrelease(&self) -> Option<&str> {
        self.get("OSRELEASE")
    }

    pub fn build_id(&self) -> Option<&str> {
        self.get("BUILD-ID")
    }

    /// `KERNELOFFSET=hex`: the KASLR slide of the kernel image.
    pub fn kernel_offset(&self) -> Option<u64> {
        u64::from_str_radix(self.get("KERNELOFFSET")?, 16).ok()
    }
}

/// Scans every RAM page for the vmcoreinfo page.
pub fn find(mem: &dyn GuestPhysMemory) -> Result<Vmcoreinfo, VmcoreinfoError> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    for (start, len) in mem.regions() {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(CHUNK);
            let chunk = &mut buf[..n as usize];
            mem.read_phys(start + off, chunk)?;
            let mut p = 0usize;
            while p + MAGIC.len() <= chunk.len() {
                if &chunk[p..p + MAGIC.len()] == MAGIC {
                    let gpa = start + off + p as u64;
                    let mut page = vec![0u8; PAGE as usize];
                    mem.read_phys(gpa, &mut page)?;
                    let info = Vmcoreinfo::parse(gpa, &page);
                    if info.get("PAGESIZE").is_some() || info.symbol("_stext").is_some() {
                        return Ok(info);
                    }
                }
                p += PAGE as usize;
            }
            off += n;
        }
    }
    Err(VmcoreinfoError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::BufferMemory;

    #[test]
    fn finds_and_parses_the_page() {
        let mut ram = vec![0u8; 64 * 4096];
        ram[0x1000..0x100a].copy_from_slice(b"OSRELEASE="); // not followed by vmcoreinfo keys
        let text = b"OSRELEASE=6.1.0-53-cloud-amd64\nBUILD-ID=4409ab2b\nPAGESIZE=4096\nSYMBOL(_stext)=ffffffff95600000\nNUMBER(phys_base)=-165675008\nKERNELOFFSET=14600000\n";
        ram[0x9000..0x9000 + text.len()].copy_from_slice(text);
        let info = find(&BufferMemory(ram)).unwrap();
        assert_eq!(info.gpa, 0x9000);
        assert_eq!(info.osrelease(), Some("6.1.0-53-cloud-amd64"));
        assert_eq!(info.build_id(), Some("4409ab2b"));
        assert_eq!(info.symbol("_stext"), Some(0xffff_ffff_9560_0000));
        assert_eq!(info.number("phys_base"), Some(-165_675_008));
        assert_eq!(info.kernel_offset(), Some(0x1460_0000));
        assert_eq!(
            find(&BufferMemory(vec![0; 8192])),
            Err(VmcoreinfoError::NotFound)
        );
    }
}
