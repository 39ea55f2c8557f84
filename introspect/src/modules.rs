//! Loaded kernel modules and their symbols, as `/proc/kallsyms` lists them after the core
//! kernel's: the `modules` list (newest first), each module's `mod_kallsyms` (an ELF
//! symbol table, its string table and the nm-style type of each symbol), a symbol's type
//! upper-cased when the module exports it. Offsets come from BTF; the list walk, every
//! count and every string are bounded, because the guest controls all of them.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;

use crate::btf::Btf;
use crate::orc::{OrcEntry, OrcTable, ORC_ENTRY_SIZE};
use crate::virt::{walk_list, KernelMemory};

/// Most modules accepted (a distribution kernel has a few thousand to choose from).
pub const MAX_MODULES: usize = 8192;
/// Most symbols accepted per module.
pub const MAX_MODULE_SYMBOLS: u32 = 1 << 18;
/// Most exported symbols accepted per module.
const MAX_EXPORTS: u32 = 1 << 16;
/// `KSYM_NAME_LEN` in 6.1.
const KSYM_NAME_LEN: usize = 512;
/// `MODULE_STATE_UNFORMED`: the kernel skips such modules (stable since 3.8).
const MODULE_STATE_UNFORMED: u32 = 3;
/// `sizeof(Elf64_Sym)`.
const ELF64_SYM: u64 = 24;
/// Most ORC entries accepted per module (the largest 6.1 modules have a few tens of
/// thousands).
pub const MAX_MODULE_ORCS: u32 = 1 << 20;
/// Largest module core accepted (the kernel's module area is 1 GiB).
const MAX_MODULE_CORE: u64 = 1 << 30;

/// Errors reading the module list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModuleError {
    #[error("BTF lacks {0}")]
    Btf(String),
    #[error("reading {what}: {detail}")]
    Read { what: String, detail: String },
    #[error("the module list is inconsistent (a module may be loading; retry): {0}")]
    TornList(String),
    #[error("guest value out of range: {0}")]
    Range(String),
}

/// How `struct kernel_symbol` gives its value and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// `int value_offset, name_offset`: place-relative (x86-64's PREL32 form).
    Relative { value: u64, name: u64, size: u64 },
    /// `unsigned long value; const char *name`.
    Absolute { value: u64, name: u64, size: u64 },
}

/// Structure offsets the walk needs, resolved from BTF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleLayout {
    pub state: u64,
    pub list: u64,
    pub name: u64,
    pub name_len: u64,
    pub kallsyms: u64,
    pub syms: u64,
    pub num_syms: u64,
    /// `core_layout.base` and `.size` (6.1); absent in kernels that replaced the layout.
    pub core: Option<(u64, u64)>,
    /// `core_layout.text_size`: the core's text is `[base, base + text_size)`.
    pub core_text_size: Option<u64>,
    /// `arch.orc_unwind_ip`, `arch.orc_unwind` and `arch.num_orcs` (kernels built with
    /// the ORC unwinder).
    pub orc: Option<(u64, u64, u64)>,
    pub symtab: u64,
    pub num_symtab: u64,
    pub strtab: u64,
    pub typetab: u64,
    pub export: ExportFormat,
}

impl ModuleLayout {
    pub fn from_btf(btf: &Btf) -> Result<Self, ModuleError> {
        let off = |ty: &str, path: &str| {
            btf.member_offset(ty, path)
                .map_err(|e| ModuleError::Btf(format!("{ty}.{path}: {e}")))
        };
        let ks_size = btf
            .type_size("kernel_symbol")
            .map_err(|e| ModuleError::Btf(format!("kernel_symbol: {e}")))?;
        let export = match btf.member_offset("kernel_symbol", "value_offset") {
            Ok(value) => ExportFormat::Relative {
                value,
                name: off("kernel_symbol", "name_offset")?,
                size: ks_size,
            },
            Err(_) => ExportFormat::Absolute {
                value: off("kernel_symbol", "value")?,
                name: off("kernel_symbol", "name")?,
                size: ks_size,
            },
        };
        Ok(ModuleLayout {
            state: off("module", "state")?,
            list: off("module", "list")?,
            name: off("module", "name")?,
            name_len: btf
                .member_size("module", "name")
                .map_err(|e| ModuleError::Btf(format!("module.name: {e}")))?,
            kallsyms: off("module", "kallsyms")?,
            syms: off("module", "syms")?,
            num_syms: off("module", "num_syms")?,
            core: btf
                .member_offset("module", "core_layout.base")
                .ok()
                .zip(btf.member_offset("module", "core_layout.size").ok()),
            core_text_size: btf.member_offset("module", "core_layout.text_size").ok(),
            orc: match (
                btf.member_offset("module", "arch.orc_unwind_ip"),
                btf.member_offset("module", "arch.orc_unwind"),
                btf.member_offset("module", "arch.num_orcs"),
            ) {
                (Ok(ips), Ok(entries), Ok(n)) => Some((ips, entries, n)),
                _ => None,
            },
            symtab: off("mod_kallsyms", "symtab")?,
            num_symtab: off("mod_kallsyms", "num_symtab")?,
            strtab: off("mod_kallsyms", "strtab")?,
            typetab: off("mod_kallsyms", "typetab")?,
            export,
        })
    }
}

/// One symbol of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSymbol {
    pub addr: u64,
    pub size: u64,
    /// nm-style type, upper case when the module exports the symbol (as /proc/kallsyms).
    pub kind: char,
    pub name: String,
}

/// One loaded module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Address of its `struct module`.
    pub addr: u64,
    pub name: String,
    /// `enum module_state`: 0 live, 1 coming, 2 going.
    pub state: u32,
    /// Its core memory (text, rodata and data), when the layout says where.
    pub core: Option<(u64, u64)>,
    /// In symbol-table order, without the unnamed ones (/proc/kallsyms skips them).
    pub symbols: Vec<ModuleSymbol>,
}

fn read_err(what: impl Into<String>) -> impl FnOnce(String) -> ModuleError {
    let what = what.into();
    move |detail| ModuleError::Read { what, detail }
}

/// Reads a NUL-terminated string of at most `max` bytes in 64-byte aligned pieces, so a
/// string that ends before an unmapped page still reads.
fn read_cstr(m: &dyn KernelMemory, va: u64, max: usize) -> Result<String, String> {
    let mut out = Vec::new();
    let mut at = va;
    while out.len() < max {
        let n = (64 - (at & 63)) as usize;
        let mut piece = vec![0u8; n.min(max - out.len())];
        m.read_virt(at, &mut piece)?;
        if let Some(end) = piece.iter().position(|&b| b == 0) {
            out.extend_from_slice(&piece[..end]);
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(&piece);
        at = at.wrapping_add(piece.len() as u64);
    }
    Err(format!("string at {va:#x} is longer than {max} bytes"))
}

/// Every module on the list headed at `modules` (the kernel's `modules` symbol), in list
/// order, except those still being formed.
pub fn enumerate(
    m: &dyn KernelMemory,
    l: &ModuleLayout,
    modules: u64,
) -> Result<Vec<Module>, ModuleError> {
    formed(m, l, modules)?
        .into_iter()
        .map(|(addr, state)| read_module(m, l, addr, state))
        .collect()
}

/// The `modules` list (bounded, loop-checked): each module's address and state, without
/// the unformed ones (still being loaded: their fields are not set yet).
fn formed(
    m: &dyn KernelMemory,
    l: &ModuleLayout,
    modules: u64,
) -> Result<Vec<(u64, u32)>, ModuleError> {
    let addrs = walk_list(m, modules, l.list, MAX_MODULES).map_err(ModuleError::TornList)?;
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let state = m
            .read_u32(addr.wrapping_add(l.state))
            .map_err(read_err(format!("module {addr:#x} state")))?;
        if state != MODULE_STATE_UNFORMED {
            out.push((addr, state));
        }
    }
    Ok(out)
}

/// `module.name`: a fixed-size, NUL-padded array.
fn read_name(m: &dyn KernelMemory, l: &ModuleLayout, addr: u64) -> Result<String, ModuleError> {
    let mut raw = vec![0u8; l.name_len.min(256) as usize];
    m.read_virt(addr.wrapping_add(l.name), &mut raw)
        .map_err(read_err(format!("module {addr:#x} name")))?;
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Ok(String::from_utf8_lossy(&raw[..end]).into_owned())
}

fn read_module(
    m: &dyn KernelMemory,
    l: &ModuleLayout,
    addr: u64,
    state: u32,
) -> Result<Module, ModuleError> {
    let at = |off: u64| addr.wrapping_add(off);
    let name = read_name(m, l, addr)?;
    let what = |f: &str| format!("module {name} {f}");
    let core = match l.core {
        Some((base, size)) => Some((
            m.read_u64(at(base)).map_err(read_err(what("core base")))?,
            u64::from(m.read_u32(at(size)).map_err(read_err(what("core size")))?),
        )),
        None => None,
    };
    let ks = m
        .read_u64(at(l.kallsyms))
        .map_err(read_err(what("kallsyms")))?;
    let field = |off: u64, f: &str| m.read_u64(ks.wrapping_add(off)).map_err(read_err(what(f)));
    let symtab = field(l.symtab, "symtab")?;
    let strtab = field(l.strtab, "strtab")?;
    let typetab = field(l.typetab, "typetab")?;
    let count = m
        .read_u32(ks.wrapping_add(l.num_symtab))
        .map_err(read_err(what("num_symtab")))?;
    if count > MAX_MODULE_SYMBOLS {
        return Err(ModuleError::Range(format!(
            "module {name} has {count} symbols"
        )));
    }
    let mut syms = vec![0u8; (u64::from(count) * ELF64_SYM) as usize];
    m.read_virt(symtab, &mut syms)
        .map_err(read_err(what("symbol table")))?;
    let mut types = vec![0u8; count as usize];
    m.read_virt(typetab, &mut types)
        .map_err(read_err(what("symbol types")))?;
    let exported = exports(m, l, addr, &name)?;
    let mut symbols = Vec::with_capacity(count as usize);
    for (i, s) in syms.chunks_exact(ELF64_SYM as usize).enumerate() {
        let st_name = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let value = u64::from_le_bytes(s[8..16].try_into().expect("8 bytes"));
        let size = u64::from_le_bytes(s[16..24].try_into().expect("8 bytes"));
        let sym_name = read_cstr(m, strtab.wrapping_add(u64::from(st_name)), KSYM_NAME_LEN)
            .map_err(read_err(what("symbol name")))?;
        if sym_name.is_empty() {
            continue;
        }
        let letter = types[i] as char;
        let kind = if exported
            .get(&value)
            .is_some_and(|names| names.contains(&sym_name))
        {
            letter.to_ascii_uppercase()
        } else {
            letter.to_ascii_lowercase()
        };
        symbols.push(ModuleSymbol {
            addr: value,
            size,
            kind,
            name: sym_name,
        });
    }
    Ok(Module {
        addr,
        name,
        state,
        core,
        symbols,
    })
}

/// The module's exported names by value: `mod->syms[0..num_syms]`, the list the
/// kernel's `is_exported` consults (GPL-only exports are not in it).
fn exports(
    m: &dyn KernelMemory,
    l: &ModuleLayout,
    addr: u64,
    name: &str,
) -> Result<HashMap<u64, Vec<String>>, ModuleError> {
    let what = |f: &str| format!("module {name} {f}");
    let base = m
        .read_u64(addr.wrapping_add(l.syms))
        .map_err(read_err(what("syms")))?;
    let n = m
        .read_u32(addr.wrapping_add(l.num_syms))
        .map_err(read_err(what("num_syms")))?;
    if n > MAX_EXPORTS {
        return Err(ModuleError::Range(format!(
            "module {name} exports {n} symbols"
        )));
    }
    let mut out: HashMap<u64, Vec<String>> = HashMap::with_capacity(n as usize);
    for i in 0..u64::from(n) {
        let (value, name_ptr) = match l.export {
            ExportFormat::Relative { value, name, size } => {
                let ks = base.wrapping_add(i * size);
                let rel = |off: u64, f: &str| {
                    m.read_i32(ks.wrapping_add(off))
                        .map(|d| ks.wrapping_add(off).wrapping_add(d as i64 as u64))
                        .map_err(read_err(what(f)))
                };
                (rel(value, "export value")?, rel(name, "export name")?)
            }
            ExportFormat::Absolute { value, name, size } => {
                let ks = base.wrapping_add(i * size);
                let abs =
                    |off: u64, f: &str| m.read_u64(ks.wrapping_add(off)).map_err(read_err(what(f)));
                (abs(value, "export value")?, abs(name, "export name")?)
            }
        };
        let export_name =
            read_cstr(m, name_ptr, KSYM_NAME_LEN).map_err(read_err(what("export name")))?;
        out.entry(value).or_default().push(export_name);
    }
    Ok(out)
}

/// Where one module's code is, and where its ORC tables are: what an unwinder needs,
/// read without the module's symbols.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleCode {
    /// Address of its `struct module`.
    pub addr: u64,
    pub state: u32,
    pub name: String,
    /// The core memory, `[base, base + size)` (text, then read-only data, then data).
    pub core: (u64, u64),
    /// The core text, `[base, base + text_size)`.
    pub text: (u64, u64),
    /// `orc_unwind_ip`, `orc_unwind` and `num_orcs`, when the module has ORC tables.
    pub orc: Option<(u64, u64, u32)>,
}

/// Every module's code ranges and ORC pointers (list order, unformed modules skipped).
/// Needs the 6.1 `core_layout`; without it the list is empty.
pub fn code_ranges(
    m: &dyn KernelMemory,
    l: &ModuleLayout,
    modules: u64,
) -> Result<Vec<ModuleCode>, ModuleError> {
    let (Some((base_off, size_off)), Some(text_off)) = (l.core, l.core_text_size) else {
        return Ok(Vec::new());
    };
    let formed = formed(m, l, modules)?;
    let mut out = Vec::with_capacity(formed.len());
    for (addr, state) in formed {
        let at = |off: u64| addr.wrapping_add(off);
        let name = read_name(m, l, addr)?;
        let what = |f: &str| format!("module {name} {f}");
        let base = m
            .read_u64(at(base_off))
            .map_err(read_err(what("core base")))?;
        let size = u64::from(
            m.read_u32(at(size_off))
                .map_err(read_err(what("core size")))?,
        );
        let text_size = u64::from(
            m.read_u32(at(text_off))
                .map_err(read_err(what("text size")))?,
        );
        let end = base.checked_add(size).filter(|_| size <= MAX_MODULE_CORE);
        let Some(end) = end.filter(|_| text_size <= size) else {
            return Err(ModuleError::Range(format!(
                "module {name}: core {base:#x} size {size:#x} text {text_size:#x}"
            )));
        };
        let orc = match l.orc {
            Some((ips, entries, n)) => {
                let ips = m
                    .read_u64(at(ips))
                    .map_err(read_err(what("orc_unwind_ip")))?;
                let entries = m
                    .read_u64(at(entries))
                    .map_err(read_err(what("orc_unwind")))?;
                let n = m.read_u32(at(n)).map_err(read_err(what("num_orcs")))?;
                (ips != 0 && entries != 0 && n != 0).then_some((ips, entries, n))
            }
            None => None,
        };
        out.push(ModuleCode {
            addr,
            state,
            name,
            core: (base, end),
            text: (base, base + text_size),
            orc,
        });
    }
    Ok(out)
}

impl ModuleCode {
    /// Reads the module's ORC tables (at most [`MAX_MODULE_ORCS`] entries). The kernel
    /// sorts them when it loads the module; [`OrcTable`] sorts them again if not.
    pub fn orc_table(&self, m: &dyn KernelMemory) -> Result<Option<OrcTable>, ModuleError> {
        let Some((ips_va, entries_va, n)) = self.orc else {
            return Ok(None);
        };
        if n > MAX_MODULE_ORCS {
            return Err(ModuleError::Range(format!(
                "module {} has {n} ORC entries",
                self.name
            )));
        }
        let mut ips = vec![0u8; n as usize * 4];
        m.read_virt(ips_va, &mut ips)
            .map_err(read_err(format!("module {} ORC ip table", self.name)))?;
        let mut entries = vec![0u8; n as usize * ORC_ENTRY_SIZE];
        m.read_virt(entries_va, &mut entries)
            .map_err(read_err(format!("module {} ORC table", self.name)))?;
        OrcTable::from_raw(ips_va, &ips, &entries)
            .map(Some)
            .map_err(|e| ModuleError::Range(format!("module {}: {e}", self.name)))
    }
}

/// The symbol covering `ip` in a module's core text, by the kernel's rule
/// (`find_kallsyms_symbol`): the first symbol with the greatest value not above `ip`
/// (a symbol at 0 never counts), its size running to the next greater value or to the
/// end of the text. Returns the symbol, the offset and the size.
pub fn symbol_at(
    symbols: &[ModuleSymbol],
    text: (u64, u64),
    ip: u64,
) -> Option<(&ModuleSymbol, u64, u64)> {
    let mut best: Option<&ModuleSymbol> = None;
    let mut best_val = 0u64;
    let mut next_val = text.1;
    for s in symbols {
        if s.addr <= ip && s.addr > best_val {
            best = Some(s);
            best_val = s.addr;
        }
        if s.addr > ip && s.addr < next_val {
            next_val = s.addr;
        }
    }
    best.map(|s| (s, ip - s.addr, next_val.wrapping_sub(s.addr)))
}

/// The modules of one paused guest (or snapshot), read only when asked: the code ranges
/// when an address outside vmlinux first needs them, a module's ORC table or symbols when
/// an address inside it first needs them. For the unwinder, whose traces rarely leave
/// vmlinux. A list that cannot be read counts as no modules (a trace through module
/// code is then unreliable).
pub struct LazyModules<'a> {
    mem: &'a dyn KernelMemory,
    list: Option<(u64, &'a ModuleLayout)>,
    code: OnceCell<Vec<ModuleCode>>,
    orcs: RefCell<HashMap<u64, Option<OrcTable>>>,
    symbols: RefCell<HashMap<u64, Option<Vec<ModuleSymbol>>>>,
}

impl<'a> LazyModules<'a> {
    /// `list`: the `modules` head and the layout; `None` when they are unknown.
    pub fn new(mem: &'a dyn KernelMemory, list: Option<(u64, &'a ModuleLayout)>) -> Self {
        LazyModules {
            mem,
            list,
            code: OnceCell::new(),
            orcs: RefCell::new(HashMap::new()),
            symbols: RefCell::new(HashMap::new()),
        }
    }

    fn code(&self) -> &[ModuleCode] {
        self.code.get_or_init(|| {
            self.list
                .and_then(|(head, l)| code_ranges(self.mem, l, head).ok())
                .unwrap_or_default()
        })
    }

    /// The module whose core memory holds `addr` (the kernel's `__module_address`).
    pub fn module_at(&self, addr: u64) -> Option<&ModuleCode> {
        self.code()
            .iter()
            .find(|c| c.core.0 <= addr && addr < c.core.1)
    }

    /// `addr` is in some module's core text.
    pub fn is_text(&self, addr: u64) -> bool {
        self.module_at(addr)
            .is_some_and(|c| c.text.0 <= addr && addr < c.text.1)
    }

    /// The ORC entry for `ip` from its module's own table.
    pub fn orc(&self, ip: u64) -> Option<OrcEntry> {
        let c = self.module_at(ip)?;
        let mut orcs = self.orcs.borrow_mut();
        orcs.entry(c.addr)
            .or_insert_with(|| c.orc_table(self.mem).ok().flatten())
            .as_ref()
            .and_then(|t| t.find(ip))
    }

    /// `function+0xoff/0xsize [module]`, as the kernel prints a module text address.
    pub fn symbolize(&self, ip: u64) -> Option<String> {
        let c = self.module_at(ip)?;
        if !(c.text.0 <= ip && ip < c.text.1) {
            return None;
        }
        let (_, l) = self.list?;
        let mut cache = self.symbols.borrow_mut();
        let symbols = cache
            .entry(c.addr)
            .or_insert_with(|| {
                read_module(self.mem, l, c.addr, c.state)
                    .ok()
                    .map(|m| m.symbols)
            })
            .as_ref()?;
        let (s, off, size) = symbol_at(symbols, c.text, ip)?;
        Some(format!("{}+{off:#x}/{size:#x} [{}]", s.name, c.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virt::SparseMemory;

    const L: ModuleLayout = ModuleLayout {
        state: 0,
        list: 8,
        name: 24,
        name_len: 56,
        kallsyms: 80,
        syms: 88,
        num_syms: 96,
        core: Some((104, 112)),
        core_text_size: Some(116),
        orc: Some((120, 128, 136)),
        symtab: 0,
        num_symtab: 8,
        strtab: 16,
        typetab: 24,
        export: ExportFormat::Relative {
            value: 0,
            name: 4,
            size: 12,
        },
    };
    const HEAD: u64 = 0xffff_ffff_8200_0000;

    /// A module at `addr` with symbols (name, value, type); the first `exports` of them
    /// exported.
    fn add_module(
        mem: &mut SparseMemory,
        addr: u64,
        name: &str,
        syms: &[(&str, u64, u8)],
        exports: usize,
    ) {
        let ks = addr + 0x1000;
        let symtab = addr + 0x2000;
        let strtab = addr + 0x4000;
        let typetab = addr + 0x5000;
        let ksymtab = addr + 0x6000;
        mem.write_u32(addr + L.state, 0);
        mem.write(addr + L.name, name.as_bytes());
        mem.write_u64(addr + L.kallsyms, ks);
        mem.write_u64(addr + 104, 0xffff_ffff_c000_0000);
        mem.write_u32(addr + 112, 0x3000);
        mem.write_u64(ks, symtab);
        mem.write_u32(ks + 8, syms.len() as u32 + 1);
        mem.write_u64(ks + 16, strtab);
        mem.write_u64(ks + 24, typetab);
        // Symbol 0 is the unnamed null symbol, as in every ELF symbol table.
        let mut str_off = 1u32;
        for (i, (n, v, t)) in syms.iter().enumerate() {
            let e = symtab + 24 * (i as u64 + 1);
            mem.write_u32(e, str_off);
            mem.write_u64(e + 8, *v);
            mem.write_u64(e + 16, 0x10);
            mem.write(strtab + u64::from(str_off), n.as_bytes());
            mem.write(typetab + i as u64 + 1, &[*t]);
            if i < exports {
                let k = ksymtab + 12 * i as u64;
                mem.write_u32(k, v.wrapping_sub(k) as u32);
                mem.write_u32(
                    k + 4,
                    (strtab + u64::from(str_off)).wrapping_sub(k + 4) as u32,
                );
            }
            str_off += n.len() as u32 + 1;
        }
        mem.write_u64(addr + L.syms, ksymtab);
        mem.write_u32(addr + L.num_syms, exports as u32);
    }

    fn link(mem: &mut SparseMemory, nodes: &[u64]) {
        // A circular list through HEAD and each module's `list` member.
        let lists: Vec<u64> = std::iter::once(HEAD)
            .chain(nodes.iter().map(|a| a + L.list))
            .collect();
        for (i, &n) in lists.iter().enumerate() {
            mem.write_u64(n, lists[(i + 1) % lists.len()]);
        }
    }

    #[test]
    fn lists_modules_and_symbols_like_proc_kallsyms() {
        let mut mem = SparseMemory::new();
        let a = 0xffff_ffff_c010_0000;
        let b = 0xffff_ffff_c020_0000;
        add_module(
            &mut mem,
            a,
            "virtio_blk",
            &[
                ("virtblk_probe", 0xffff_ffff_c000_1000, b't'),
                ("init_module", 0xffff_ffff_c000_2000, b't'),
            ],
            0,
        );
        add_module(
            &mut mem,
            b,
            "virtio",
            &[
                ("register_virtio_driver", 0xffff_ffff_c000_0100, b't'),
                ("virtio_dev_probe", 0xffff_ffff_c000_0200, b't'),
            ],
            1,
        );
        link(&mut mem, &[a, b]);
        let mods = enumerate(&mem, &L, HEAD).unwrap();
        assert_eq!(mods.len(), 2);
        assert_eq!(mods[0].name, "virtio_blk");
        let names: Vec<(&str, char)> = mods[1]
            .symbols
            .iter()
            .map(|s| (s.name.as_str(), s.kind))
            .collect();
        // The exported one is upper case; the null symbol is left out.
        assert_eq!(
            names,
            [("register_virtio_driver", 'T'), ("virtio_dev_probe", 't')]
        );
        assert_eq!(mods[0].core, Some((0xffff_ffff_c000_0000, 0x3000)));
    }

    const CORE: u64 = 0xffff_ffff_c000_0000;

    /// The module's two ORC rows, relative to their slots as the kernel stores them.
    fn add_orc(mem: &mut SparseMemory, addr: u64, rows: &[(u64, OrcEntry)]) -> (u64, u64) {
        let (ips, ents) = (addr + 0x7000, addr + 0x7100);
        for (i, (ip, e)) in rows.iter().enumerate() {
            let slot = ips + 4 * i as u64;
            mem.write_u32(slot, ip.wrapping_sub(slot) as u32);
            mem.write(ents + 6 * i as u64, &e.encode());
        }
        mem.write_u64(addr + 120, ips);
        mem.write_u64(addr + 128, ents);
        mem.write_u32(addr + 136, rows.len() as u32);
        (ips, ents)
    }

    #[test]
    fn module_code_orc_and_symbols_follow_the_kernel() {
        let mut mem = SparseMemory::new();
        let a = 0xffff_ffff_c010_0000;
        add_module(
            &mut mem,
            a,
            "virtio_blk",
            &[
                ("virtblk_probe", CORE + 0x100, b't'),
                ("virtblk_alias", CORE + 0x100, b't'),
                ("virtblk_remove", CORE + 0x400, b't'),
                ("virtblk_data", CORE + 0x2100, b'd'),
            ],
            0,
        );
        mem.write_u32(a + 116, 0x2000);
        let e1 = OrcEntry {
            sp_reg: 4,
            sp_offset: 8,
            kind: 0,
            ..OrcEntry::default()
        };
        let e2 = OrcEntry {
            sp_offset: 24,
            ..e1
        };
        let (ips, ents) = add_orc(&mut mem, a, &[(CORE + 0x400, e2), (CORE + 0x100, e1)]);
        link(&mut mem, &[a]);
        assert_eq!(
            code_ranges(&mem, &L, HEAD).unwrap(),
            [ModuleCode {
                addr: a,
                state: 0,
                name: "virtio_blk".into(),
                core: (CORE, CORE + 0x3000),
                text: (CORE, CORE + 0x2000),
                orc: Some((ips, ents, 2)),
            }]
        );
        let lazy = LazyModules::new(&mem, Some((HEAD, &L)));
        assert!(lazy.is_text(CORE) && lazy.is_text(CORE + 0x1fff));
        assert!(!lazy.is_text(CORE + 0x2000) && !lazy.is_text(CORE - 1));
        // Out-of-order rows are sorted.
        assert_eq!(lazy.orc(CORE + 0x200), Some(e1));
        assert_eq!(lazy.orc(CORE + 0x500), Some(e2));
        assert_eq!(lazy.orc(CORE + 0x50), None);
        // The first of equal values wins; the size runs to the next greater value, and
        // for the last text symbol to the end of the text (not to the data symbol).
        assert_eq!(
            lazy.symbolize(CORE + 0x123).as_deref(),
            Some("virtblk_probe+0x23/0x300 [virtio_blk]")
        );
        assert_eq!(
            lazy.symbolize(CORE + 0x500).as_deref(),
            Some("virtblk_remove+0x100/0x1c00 [virtio_blk]")
        );
        assert_eq!(lazy.symbolize(CORE + 0x50), None, "below every symbol");
        assert_eq!(lazy.symbolize(CORE + 0x2100), None, "data, not text");
    }

    #[test]
    fn hostile_module_code_is_refused_or_ignored() {
        let mut mem = SparseMemory::new();
        let a = 0xffff_ffff_c010_0000;
        add_module(&mut mem, a, "m", &[("f", CORE + 0x10, b't')], 0);
        link(&mut mem, &[a]);
        // Text larger than the core.
        mem.write_u32(a + 116, 0x4000);
        assert!(matches!(
            code_ranges(&mem, &L, HEAD),
            Err(ModuleError::Range(_))
        ));
        let lazy = LazyModules::new(&mem, Some((HEAD, &L)));
        assert!(
            !lazy.is_text(CORE + 0x10),
            "an unreadable list is no modules"
        );
        // A huge ORC count.
        mem.write_u32(a + 116, 0x1000);
        add_orc(&mut mem, a, &[(CORE + 0x10, OrcEntry::default())]);
        mem.write_u32(a + 136, u32::MAX);
        let code = code_ranges(&mem, &L, HEAD).unwrap();
        assert!(matches!(
            code[0].orc_table(&mem),
            Err(ModuleError::Range(_))
        ));
        let lazy = LazyModules::new(&mem, Some((HEAD, &L)));
        assert!(lazy.is_text(CORE + 0x10));
        assert_eq!(lazy.orc(CORE + 0x10), None);
        // A core that wraps around the address space.
        mem.write_u64(a + 104, u64::MAX - 0x100);
        assert!(code_ranges(&mem, &L, HEAD).is_err());
        // No layout, no modules.
        assert!(LazyModules::new(&mem, None).module_at(CORE).is_none());
    }

    #[test]
    fn hostile_lists_and_counts_are_errors() {
        let mut mem = SparseMemory::new();
        let a = 0xffff_ffff_c010_0000;
        add_module(&mut mem, a, "m", &[("f", 1, b't')], 0);
        // A cycle that never returns to the head.
        mem.write_u64(HEAD, a + L.list);
        mem.write_u64(a + L.list, a + L.list);
        assert!(matches!(
            enumerate(&mem, &L, HEAD),
            Err(ModuleError::TornList(_))
        ));
        // A huge symbol count.
        link(&mut mem, &[a]);
        mem.write_u32(a + 0x1000 + 8, u32::MAX);
        assert!(matches!(
            enumerate(&mem, &L, HEAD),
            Err(ModuleError::Range(_))
        ));
        // A symbol name that never ends.
        mem.write_u32(a + 0x1000 + 8, 2);
        mem.write(a + 0x4000 + 1, &[b'x'; 600]);
        assert!(enumerate(&mem, &L, HEAD).is_err());
        // An unreadable list.
        assert!(enumerate(&SparseMemory::new(), &L, HEAD).is_err());
    }
}
