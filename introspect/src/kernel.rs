//! Finding the running kernel: release, build ID, KASLR offset, `phys_base` and its
//! symbol table, starting from nothing but guest memory (through vmcoreinfo).

use std::fmt;

use crate::kallsyms::{self, locate, KallsymsError, KernelImage, SymbolTable, Tables};
use crate::memory::GuestPhysMemory;
use crate::vmcoreinfo::{self, Vmcoreinfo, VmcoreinfoError};

/// Errors discovering the kernel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("{0}")]
    Vmcoreinfo(#[from] VmcoreinfoError),
    #[error("vmcoreinfo lacks {0}")]
    Missing(&'static str),
    #[error("{0}")]
    Kallsyms(#[from] KallsymsError),
    #[error("inconsistent kernel: {0}")]
    Inconsistent(String),
}

/// Where the kallsyms tables' addresses come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KallsymsFrom {
    /// vmcoreinfo's `SYMBOL(kallsyms_*)` lines when it has them (6.0 and later), else a
    /// scan of the kernel image.
    #[default]
    Auto,
    /// vmcoreinfo only.
    Vmcoreinfo,
    /// A scan of the kernel image only (`kallsyms::locate`), whatever vmcoreinfo says.
    Scan,
}

/// How the tables were found, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KallsymsFound {
    Vmcoreinfo,
    Scan(locate::Layout),
}

impl fmt::Display for KallsymsFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KallsymsFound::Vmcoreinfo => write!(f, "vmcoreinfo"),
            KallsymsFound::Scan(layout) => write!(f, "image scan ({layout})"),
        }
    }
}

/// The running kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub release: String,
    pub build_id: Option<String>,
    /// KASLR slide of the image.
    pub kaslr_offset: u64,
    pub image: KernelImage,
    pub vmcoreinfo: Vmcoreinfo,
    pub symbols: SymbolTable,
    pub kallsyms_found: KallsymsFound,
    /// `page_offset_base`, `vmalloc_base`, `vmemmap_base` (randomized by KASLR).
    pub direct_map_base: Option<u64>,
    pub vmalloc_base: Option<u64>,
    pub vmemmap_base: Option<u64>,
    /// `linux_banner` as the kernel prints it (checked against vmcoreinfo's release).
    pub banner: Option<String>,
}

/// Link-time `_text` of x86-64 kernels with `CONFIG_PHYSICAL_START=0x1000000`.
pub const LINK_TEXT: u64 = 0xffff_ffff_8100_0000;

impl Kernel {
    /// Finds the kernel in `mem` and decodes its symbols; cross-checks `_text`,
    /// `_stext` and the KASLR offset against each other.
    pub fn discover(mem: &dyn GuestPhysMemory) -> Result<Self, KernelError> {
        Self::discover_with(mem, KallsymsFrom::Auto)
    }

    /// [`Kernel::discover`], taking the kallsyms tables from `from`.
    pub fn discover_with(
        mem: &dyn GuestPhysMemory,
        from: KallsymsFrom,
    ) -> Result<Self, KernelError> {
        let info = vmcoreinfo::find(mem)?;
        let sym = |name: &'static str| info.symbol(name).ok_or(KernelError::Missing(name));
        let phys_base = info
            .number("phys_base")
            .ok_or(KernelError::Missing("NUMBER(phys_base)"))? as u64;
        let image = KernelImage { phys_base };
        let named = || -> Result<Tables, KernelError> {
            Ok(Tables {
                num_syms: sym("kallsyms_num_syms")?,
                names: sym("kallsyms_names")?,
                offsets: sym("kallsyms_offsets")?,
                relative_base: sym("kallsyms_relative_base")?,
                token_table: sym("kallsyms_token_table")?,
                token_index: sym("kallsyms_token_index")?,
            })
        };
        let scanned = || -> Result<(Tables, KallsymsFound), KernelError> {
            let offset = info
                .kernel_offset()
                .ok_or(KernelError::Missing("KERNELOFFSET"))?;
            let found = locate::scan(mem, image, LINK_TEXT.wrapping_add(offset))?;
            Ok((found.tables, KallsymsFound::Scan(found.layout)))
        };
        let (tables, kallsyms_found) = match from {
            KallsymsFrom::Vmcoreinfo => (named()?, KallsymsFound::Vmcoreinfo),
            KallsymsFrom::Scan => scanned()?,
            KallsymsFrom::Auto => match named() {
                Ok(t) => (t, KallsymsFound::Vmcoreinfo),
                Err(KernelError::Missing(_)) => scanned()?,
                Err(e) => return Err(e),
            },
        };
        let symbols = kallsyms::decode(mem, image, tables)?;
        let text = symbols
            .lookup("_text", None)
            .map_err(|e| KernelError::Inconsistent(e.to_string()))?
            .addr;
        let kaslr_offset = info.kernel_offset().unwrap_or(text.wrapping_sub(LINK_TEXT));
        if text.wrapping_sub(LINK_TEXT) != kaslr_offset {
            return Err(KernelError::Inconsistent(format!(
                "_text {text:#x} disagrees with KERNELOFFSET {kaslr_offset:#x}"
            )));
        }
        if let (Some(stext), Ok(s)) = (info.symbol("_stext"), symbols.lookup("_stext", None)) {
            if stext != s.addr {
                return Err(KernelError::Inconsistent(format!(
                    "vmcoreinfo _stext {stext:#x} != kallsyms _stext {:#x}",
                    s.addr
                )));
            }
        }
        let release = info
            .osrelease()
            .ok_or(KernelError::Missing("OSRELEASE"))?
            .to_string();
        let read_var = |name: &str| {
            let s = symbols.lookup(name, None).ok()?;
            crate::memory::read_u64(mem, image.pa(s.addr)).ok()
        };
        let banner = symbols.lookup("linux_banner", None).ok().and_then(|s| {
            let mut buf = [0u8; 256];
            mem.read_phys(image.pa(s.addr), &mut buf).ok()?;
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            Some(String::from_utf8_lossy(&buf[..end]).trim_end().to_string())
        });
        // "Linux version <release> (...)": the two sources must name the same kernel.
        if let Some(b) = &banner {
            if !b.starts_with(&format!("Linux version {release} ")) {
                return Err(KernelError::Inconsistent(format!(
                    "linux_banner {b:?} is not release {release}"
                )));
            }
        }
        Ok(Kernel {
            direct_map_base: read_var("page_offset_base"),
            vmalloc_base: read_var("vmalloc_base"),
            vmemmap_base: read_var("vmemmap_base"),
            banner,
            release,
            build_id: info.build_id().map(str::to_string),
            kaslr_offset,
            image,
            vmcoreinfo: info,
            symbols,
            kallsyms_found,
        })
    }
}
