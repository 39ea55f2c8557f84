//! The linker: lays out a patch object's sections in the patch area the VMM reserves
//! in the guest kernel's address space, resolves its undefined symbols against the
//! guest's kallsyms and applies its relocations, checking every one for overflow.
//! `call __fentry__` sites become the 5-byte NOP, as the kernel does for its own text.

use std::collections::HashMap;

use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionIndex,
    SectionKind, SymbolKind, SymbolSection,
};

/// The NOP the kernel puts in place of `call __fentry__`.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const PAGE: u64 = 4096;

/// Why an object cannot be linked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("patch object does not parse: {0}")]
    Format(String),
    #[error("unknown symbol {0} (not in the guest's kallsyms)")]
    UnknownSymbol(String),
    #[error("symbol {name}: {detail}")]
    Symbol { name: String, detail: String },
    #[error(
        "relocation {kind} at {section}+{offset:#x} against {target} overflows (value {value:#x})"
    )]
    Overflow {
        kind: &'static str,
        section: String,
        offset: u64,
        target: String,
        value: i128,
    },
    #[error("unsupported relocation type {r_type} at {section}+{offset:#x}")]
    Unsupported {
        r_type: u32,
        section: String,
        offset: u64,
    },
    #[error("relocation at {section}+{offset:#x} is outside its section")]
    OutOfBounds { section: String, offset: u64 },
    #[error("the patch needs {needed} bytes but the patch area has {available}")]
    TooBig { needed: u64, available: u64 },
    #[error("{name} at {site:#x} is a call to __fentry__ that does not look like one")]
    BadFentry { name: String, site: u64 },
}

/// Resolves names of the guest kernel's symbols.
pub trait SymbolResolver {
    /// The address of `name` (the `sympos`-th of that name when given).
    fn resolve(&self, name: &str, sympos: Option<u32>) -> Result<u64, String>;
}

/// Which region a section goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// Read-only, executable.
    Text,
    /// Read-only, not executable.
    Rodata,
    /// Read-write, not executable (data and bss).
    Data,
}

/// A linked patch: three page-aligned images and where the functions ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedPatch {
    pub base: u64,
    pub text: Vec<u8>,
    pub rodata: Vec<u8>,
    pub data: Vec<u8>,
    /// Guest addresses of the three images.
    pub text_addr: u64,
    pub rodata_addr: u64,
    pub data_addr: u64,
    /// Address and size of every function the object defines.
    pub functions: HashMap<String, (u64, u64)>,
    /// Kernel symbols the patch refers to, resolved.
    pub imports: Vec<(String, u64)>,
    /// The object's ORC rows (from objtool's `.orc_unwind_ip` and `.orc_unwind`), with
    /// absolute ips in the text image: how an unwinder steps through the patch's code.
    pub orc: Vec<(u64, [u8; ORC_ENTRY_SIZE])>,
}

/// Bytes of one ORC entry (the kernel's 6.1 `struct orc_entry`).
pub const ORC_ENTRY_SIZE: usize = 6;

/// What an unwinder needs to know about a loaded patch's code: where its text is, its ORC
/// rows and its functions (name, address, size).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PatchCode {
    pub text: (u64, u64),
    pub orc: Vec<(u64, [u8; ORC_ENTRY_SIZE])>,
    pub functions: Vec<(String, u64, u64)>,
}

impl LinkedPatch {
    /// Total bytes of the patch area used (page-rounded images).
    pub fn size(&self) -> u64 {
        self.data_addr + round_up(self.data.len() as u64) - self.base
    }

    /// The patch's code as an unwinder sees it.
    pub fn code(&self) -> PatchCode {
        let mut functions: Vec<(String, u64, u64)> = self
            .functions
            .iter()
            .map(|(name, &(addr, size))| (name.clone(), addr, size))
            .collect();
        functions.sort_by_key(|f| f.1);
        PatchCode {
            text: (self.text_addr, self.text_addr + self.text.len() as u64),
            orc: self.orc.clone(),
            functions,
        }
    }
}

/// The ORC rows of a linked object: each `.orc_unwind_ip` entry (a 32-bit offset from
/// itself, already relocated in the rodata image) with its `.orc_unwind` entry. An object
/// without them (built without objtool) has none; tables that disagree in size, or an ip
/// outside the text image, make the object malformed.
fn orc_rows(
    file: &object::File<'_>,
    offsets: &HashMap<SectionIndex, (Region, u64)>,
    rodata: &[u8],
    rodata_addr: u64,
    text: (u64, u64),
) -> Result<Vec<(u64, [u8; ORC_ENTRY_SIZE])>, LinkError> {
    let placed = |name: &str| -> Option<(usize, usize)> {
        let section = file.section_by_name(name)?;
        let &(region, off) = offsets.get(&section.index())?;
        (region == Region::Rodata).then_some((off as usize, section.size() as usize))
    };
    let (Some((ip_off, ip_len)), Some((e_off, e_len))) =
        (placed(".orc_unwind_ip"), placed(".orc_unwind"))
    else {
        return Ok(Vec::new());
    };
    let bad = |what: String| LinkError::Format(format!("ORC tables: {what}"));
    let n = ip_len / 4;
    if n * 4 != ip_len || e_len != n * ORC_ENTRY_SIZE {
        return Err(bad(format!(
            "{ip_len} bytes of ips do not match {e_len} bytes of entries"
        )));
    }
    let ips = ip_off
        .checked_add(ip_len)
        .and_then(|end| rodata.get(ip_off..end))
        .ok_or_else(|| bad("ip table outside the image".into()))?;
    let entries = e_off
        .checked_add(e_len)
        .and_then(|end| rodata.get(e_off..end))
        .ok_or_else(|| bad("entry table outside the image".into()))?;
    let mut rows = Vec::with_capacity(n);
    for (i, (ip, e)) in ips
        .chunks_exact(4)
        .zip(entries.chunks_exact(ORC_ENTRY_SIZE))
        .enumerate()
    {
        let rel = i32::from_le_bytes([ip[0], ip[1], ip[2], ip[3]]);
        let place = rodata_addr + (ip_off + i * 4) as u64;
        let addr = place.wrapping_add_signed(i64::from(rel));
        // objtool ends each text section with a terminator row at its end address.
        if addr < text.0 || addr > text.1 {
            return Err(bad(format!(
                "entry {i} is for {addr:#x}, outside the text {:#x}..{:#x}",
                text.0, text.1
            )));
        }
        let mut raw = [0u8; ORC_ENTRY_SIZE];
        raw.copy_from_slice(e);
        rows.push((addr, raw));
    }
    Ok(rows)
}

fn round_up(v: u64) -> u64 {
    v.div_ceil(PAGE) * PAGE
}

fn region_of(section: &object::Section<'_, '_>) -> Option<Region> {
    let name = section.name().ok()?;
    match section.kind() {
        SectionKind::Text => Some(Region::Text),
        SectionKind::ReadOnlyData | SectionKind::ReadOnlyString => Some(Region::Rodata),
        SectionKind::Data | SectionKind::UninitializedData => Some(Region::Data),
        _ if name.starts_with(".rodata") => Some(Region::Rodata),
        _ if name.starts_with(".data") || name.starts_with(".bss") => Some(Region::Data),
        _ => None,
    }
}

/// Where each allocated section goes within its region, and the regions' sizes.
type Layout = (HashMap<SectionIndex, (Region, u64)>, [u64; 3]);

/// Lays out each allocated section at its alignment within its region.
fn layout(file: &object::File<'_>) -> Layout {
    let mut offsets: HashMap<SectionIndex, (Region, u64)> = HashMap::new();
    let mut sizes = [0u64; 3];
    for section in file.sections() {
        let Some(region) = region_of(&section) else {
            continue;
        };
        if section.size() == 0 {
            continue;
        }
        let r = region as usize;
        let align = section.align().clamp(1, PAGE);
        let off = sizes[r].div_ceil(align).saturating_mul(align);
        offsets.insert(section.index(), (region, off));
        sizes[r] = off.saturating_add(section.size());
    }
    (offsets, sizes)
}

/// How many bytes of the patch area `object` needs once linked (its three page-rounded
/// images), so that a place can be chosen before linking.
pub fn footprint(object: &[u8]) -> Result<u64, LinkError> {
    let file = object::File::parse(object).map_err(|e| LinkError::Format(e.to_string()))?;
    let (_, sizes) = layout(&file);
    sizes
        .iter()
        .try_fold(0u64, |acc, &s| {
            acc.checked_add(s.checked_next_multiple_of(PAGE)?)
        })
        .ok_or_else(|| LinkError::Format("section sizes overflow".into()))
}

/// Links `object` at `base` (page aligned) into an area of `area_size` bytes.
/// `sympos` gives the position for kernel symbols whose names are not unique.
pub fn link(
    object: &[u8],
    base: u64,
    area_size: u64,
    resolver: &dyn SymbolResolver,
    sympos: &HashMap<String, u32>,
) -> Result<LinkedPatch, LinkError> {
    let file = object::File::parse(object).map_err(|e| LinkError::Format(e.to_string()))?;
    let (offsets, sizes) = layout(&file);
    // Sizes come from the object's headers: bound them before any arithmetic or
    // allocation depends on them.
    if sizes.iter().any(|&s| s > area_size) {
        return Err(LinkError::TooBig {
            needed: sizes.iter().fold(0u64, |a, &s| a.saturating_add(s)),
            available: area_size,
        });
    }
    let text_addr = base;
    let rodata_addr = text_addr + round_up(sizes[0]);
    let data_addr = rodata_addr + round_up(sizes[1]);
    let needed = data_addr + round_up(sizes[2]) - base;
    if needed > area_size {
        return Err(LinkError::TooBig {
            needed,
            available: area_size,
        });
    }
    let region_addr = |r: Region| match r {
        Region::Text => text_addr,
        Region::Rodata => rodata_addr,
        Region::Data => data_addr,
    };
    let mut images = [
        vec![0u8; sizes[0] as usize],
        vec![0u8; sizes[1] as usize],
        vec![0u8; sizes[2] as usize],
    ];
    for section in file.sections() {
        let Some(&(region, off)) = offsets.get(&section.index()) else {
            continue;
        };
        if section.kind() == SectionKind::UninitializedData {
            continue;
        }
        let data = section
            .data()
            .map_err(|e| LinkError::Format(e.to_string()))?;
        let img = &mut images[region as usize];
        let dst = (off as usize)
            .checked_add(data.len())
            .and_then(|end| img.get_mut(off as usize..end))
            .ok_or_else(|| LinkError::Format("section data larger than its header says".into()))?;
        dst.copy_from_slice(data);
    }
    let section_addr = |idx: SectionIndex| -> Option<u64> {
        offsets
            .get(&idx)
            .map(|&(region, off)| region_addr(region) + off)
    };

    // Symbols: defined ones by layout, undefined ones through kallsyms.
    let mut functions = HashMap::new();
    let mut imports: Vec<(String, u64)> = Vec::new();
    let mut symbol_value = |sym: &object::Symbol<'_, '_>| -> Result<Option<u64>, LinkError> {
        let name = sym.name().unwrap_or("");
        match sym.section() {
            SymbolSection::Section(idx) => {
                Ok(section_addr(idx).map(|a| a.wrapping_add(sym.address())))
            }
            SymbolSection::Absolute => Ok(Some(sym.address())),
            SymbolSection::Undefined => {
                if let Some((_, v)) = imports.iter().find(|(n, _)| n == name) {
                    return Ok(Some(*v));
                }
                let v = resolver
                    .resolve(name, sympos.get(name).copied())
                    .map_err(|detail| {
                        if detail.is_empty() {
                            LinkError::UnknownSymbol(name.to_string())
                        } else {
                            LinkError::Symbol {
                                name: name.to_string(),
                                detail,
                            }
                        }
                    })?;
                imports.push((name.to_string(), v));
                Ok(Some(v))
            }
            _ => Ok(None),
        }
    };
    for sym in file.symbols() {
        if sym.kind() == SymbolKind::Text && sym.is_definition() {
            if let (Ok(name), Some(addr)) = (sym.name(), symbol_value(&sym)?) {
                functions.insert(name.to_string(), (addr, sym.size()));
            }
        }
    }

    // Relocations of placed sections.
    for section in file.sections() {
        let Some(&(region, off)) = offsets.get(&section.index()) else {
            continue;
        };
        let sname = section.name().unwrap_or("?").to_string();
        for (r_off, reloc) in section.relocations() {
            let RelocationTarget::Symbol(sidx) = reloc.target() else {
                return Err(LinkError::Format(format!(
                    "relocation without symbol in {sname}"
                )));
            };
            let sym = file
                .symbol_by_index(sidx)
                .map_err(|e| LinkError::Format(e.to_string()))?;
            let target_name = match sym.kind() {
                SymbolKind::Section => sym
                    .section_index()
                    .and_then(|i| file.section_by_index(i).ok())
                    .and_then(|s| s.name().ok().map(str::to_string))
                    .unwrap_or_default(),
                _ => sym.name().unwrap_or("").to_string(),
            };
            let RelocationFlags::Elf { r_type } = reloc.flags() else {
                return Err(LinkError::Format("not an ELF relocation".into()));
            };
            let img = &mut images[region as usize];
            let Some(at) = off.checked_add(r_off).and_then(|a| usize::try_from(a).ok()) else {
                return Err(LinkError::OutOfBounds {
                    section: sname,
                    offset: r_off,
                });
            };
            let place = region_addr(region).wrapping_add(at as u64);
            let width = match r_type {
                object::elf::R_X86_64_64 => 8,
                _ => 4,
            };
            if at.saturating_add(width) > img.len()
                || r_off.saturating_add(width as u64) > section.size()
            {
                return Err(LinkError::OutOfBounds {
                    section: sname,
                    offset: r_off,
                });
            }
            // `call __fentry__` becomes the 5-byte NOP.
            if target_name == "__fentry__" && region == Region::Text {
                if at == 0 || img[at - 1] != 0xe8 {
                    return Err(LinkError::BadFentry {
                        name: sname,
                        site: place,
                    });
                }
                img[at - 1..at + 4].copy_from_slice(&NOP5);
                continue;
            }
            let s =
                symbol_value(&sym)?.ok_or_else(|| LinkError::UnknownSymbol(target_name.clone()))?;
            let a = i128::from(reloc.addend());
            let overflow = |kind: &'static str, value: i128| LinkError::Overflow {
                kind,
                section: sname.clone(),
                offset: r_off,
                target: target_name.clone(),
                value,
            };
            match r_type {
                object::elf::R_X86_64_64 => {
                    let v = (i128::from(s) + a) as u64;
                    img[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
                object::elf::R_X86_64_PC32 | object::elf::R_X86_64_PLT32 => {
                    // RIP-relative addressing wraps modulo 2^64: a per-CPU variable (a
                    // small offset, `%gs:sym(%rip)`) is reached from the top 2 GiB the way
                    // the kernel's own text reaches it.
                    let v = (i128::from(s) + a - i128::from(place)) as u64 as i64;
                    let v =
                        i32::try_from(v).map_err(|_| overflow("R_X86_64_PC32", i128::from(v)))?;
                    img[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                object::elf::R_X86_64_32S => {
                    // Sign-extended: the value read back as i32 must equal S + A as u64.
                    let v = (i128::from(s) + a) as u64 as i64;
                    let v =
                        i32::try_from(v).map_err(|_| overflow("R_X86_64_32S", i128::from(v)))?;
                    img[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                object::elf::R_X86_64_32 => {
                    let v = i128::from(s) + a;
                    let v = u32::try_from(v).map_err(|_| overflow("R_X86_64_32", v))?;
                    img[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                other => {
                    return Err(LinkError::Unsupported {
                        r_type: other,
                        section: sname,
                        offset: r_off,
                    })
                }
            }
        }
    }
    let orc = orc_rows(
        &file,
        &offsets,
        &images[1],
        rodata_addr,
        (text_addr, text_addr + sizes[0]),
    )?;
    let [text, rodata, data] = images;
    Ok(LinkedPatch {
        base,
        text,
        rodata,
        data,
        text_addr,
        rodata_addr,
        data_addr,
        functions,
        imports,
        orc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    struct Kallsyms(HashMap<&'static str, u64>);
    impl SymbolResolver for Kallsyms {
        fn resolve(&self, name: &str, sympos: Option<u32>) -> Result<u64, String> {
            match (name, sympos) {
                ("dup", None) => Err("ambiguous: 2 symbols of that name; give sympos".into()),
                ("dup", Some(2)) => Ok(0xffff_ffff_8100_2000),
                _ => self.0.get(name).copied().ok_or_default(),
            }
        }
    }
    trait OkOrDefault<T> {
        fn ok_or_default(self) -> Result<T, String>;
    }
    impl<T> OkOrDefault<T> for Option<T> {
        fn ok_or_default(self) -> Result<T, String> {
            self.ok_or_else(String::new)
        }
    }

    const BASE: u64 = 0xffff_ffff_c100_0000;
    const KFUNC: u64 = 0xffff_ffff_8123_4560;
    const THUNK: u64 = 0xffff_ffff_81e0_1940;

    fn kallsyms() -> Kallsyms {
        Kallsyms(
            [
                ("kfunc", KFUNC),
                ("__x86_return_thunk", THUNK),
                ("kernel_counter", 0xffff_ffff_8250_0000),
            ]
            .into_iter()
            .collect(),
        )
    }

    fn compile(name: &str, source: &str) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("patcher-link-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("t.c"), source).unwrap();
        let status = std::process::Command::new("cc")
            .args([
                "-c",
                "-O2",
                "-fno-pic",
                "-mcmodel=kernel",
                "-mfentry",
                "-pg",
                "-fno-asynchronous-unwind-tables",
                "-o",
            ])
            .arg(dir.join("t.o"))
            .arg(dir.join("t.c"))
            .status()
            .expect("these tests need a C compiler (cc)");
        assert!(status.success());
        let bytes = std::fs::read(dir.join("t.o")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        bytes
    }

    const SRC: &str = "extern int kfunc(const char *s);\n\
        extern int kernel_counter;\n\
        static int calls;\n\
        int new_fn(void) { calls++; kernel_counter++; return kfunc(\"patched\") + calls; }\n";

    #[test]
    fn links_calls_data_and_strings_and_nops_fentry() {
        let obj = compile("ok", SRC);
        let p = link(&obj, BASE, 1 << 20, &kallsyms(), &HashMap::new()).unwrap();
        let (addr, size) = p.functions["new_fn"];
        assert_eq!(addr, BASE);
        assert_eq!(&p.text[..5], &NOP5, "fentry call became a NOP");
        let mut saw_call = false;
        let mut saw_string = false;
        let code = &p.text[..size as usize];
        let mut d = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
        for insn in &mut d {
            if matches!(insn.mnemonic(), Mnemonic::Call | Mnemonic::Jmp)
                && insn.near_branch64() == KFUNC
            {
                saw_call = true;
            }
            if insn.immediate32() as i32 as i64 as u64 == p.rodata_addr
                || insn.memory_displacement64() == p.rodata_addr
            {
                saw_string = true;
            }
        }
        assert!(saw_call, "call to kfunc relocated");
        assert!(saw_string, "string address relocated into rodata");
        let s = p.rodata.windows(7).position(|w| w == b"patched");
        assert!(s.is_some());
        assert!(p
            .imports
            .iter()
            .any(|(n, v)| n == "kernel_counter" && *v == 0xffff_ffff_8250_0000));
        assert_eq!(p.data_addr % 4096, 0);
        assert!(p.size() <= 3 * 4096);
    }

    #[test]
    fn per_cpu_references_wrap_around_like_the_kernels_own() {
        // `%gs:sym(%rip)` to a per-CPU offset (kallsyms gives cpu_number as 0x19160):
        // the displacement is reached modulo 2^64 from the top 2 GiB.
        let obj = compile(
            "percpu",
            "int new_fn(void) { int v; \
             asm(\"movl %%gs:cpu_number(%%rip), %0\" : \"=r\"(v)); return v; }\n",
        );
        let resolver = Kallsyms([("cpu_number", 0x19160)].into_iter().collect());
        let p = link(&obj, BASE, 1 << 20, &resolver, &HashMap::new()).unwrap();
        let (addr, size) = p.functions["new_fn"];
        let d = Decoder::with_ip(64, &p.text[..size as usize], addr, DecoderOptions::NONE);
        let mov = d
            .into_iter()
            .find(|i| i.mnemonic() == Mnemonic::Mov && i.is_ip_rel_memory_operand())
            .expect("the per-CPU load");
        assert_eq!(mov.ip_rel_memory_address(), 0x19160);
    }

    #[test]
    fn reports_unknown_symbols_overflow_and_size() {
        let obj = compile(
            "unknown",
            "extern int nowhere(void);\nint new_fn(void) { return nowhere(); }\n",
        );
        assert_eq!(
            link(&obj, BASE, 1 << 20, &kallsyms(), &HashMap::new()),
            Err(LinkError::UnknownSymbol("nowhere".into()))
        );
        let obj = compile(
            "dup",
            "extern int dup(void);\nint new_fn(void) { return dup(); }\n",
        );
        let err = link(&obj, BASE, 1 << 20, &kallsyms(), &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("dup") && err.contains("sympos"), "{err}");
        let pos = [("dup".to_string(), 2)].into_iter().collect();
        assert!(link(&obj, BASE, 1 << 20, &kallsyms(), &pos).is_ok());

        // Placed 8 GiB below the kernel, a call to it cannot reach.
        let obj = compile("far", SRC);
        let err = link(
            &obj,
            0xffff_fffd_c000_0000,
            1 << 20,
            &kallsyms(),
            &HashMap::new(),
        )
        .unwrap_err();
        assert!(matches!(err, LinkError::Overflow { .. }), "{err}");
        assert!(matches!(
            link(&obj, BASE, 4096, &kallsyms(), &HashMap::new()),
            Err(LinkError::TooBig { .. })
        ));
    }

    /// Compiles `source` and links it at `BASE` into a 1 MiB area.
    fn link_source(name: &str, source: &str) -> Result<LinkedPatch, LinkError> {
        link(
            &compile(name, source),
            BASE,
            1 << 20,
            &kallsyms(),
            &HashMap::new(),
        )
    }

    /// An object with objtool-style ORC tables (written by hand here: rows for `new_fn`
    /// and for 4 bytes into it).
    fn orc_source(ips: &str, entries: &str) -> String {
        format!(
            "int new_fn(int x) {{ return x * 3 + 1; }}\n\
             __asm__(\".pushsection .orc_unwind_ip,\\\"a\\\"\\n{ips}.popsection\\n\"\n\
             \".pushsection .orc_unwind,\\\"a\\\"\\n{entries}.popsection\\n\");\n"
        )
    }

    #[test]
    fn carries_the_objects_orc_rows_with_absolute_ips() {
        let src = orc_source(
            ".long new_fn - .\\n.long new_fn + 4 - .\\n",
            ".short 8, 0, 0x0005\\n.short 16, 0, 0x0005\\n",
        );
        let p = link_source("orc", &src).unwrap();
        let (addr, _) = p.functions["new_fn"];
        assert_eq!(
            p.orc,
            vec![(addr, [8, 0, 0, 0, 5, 0]), (addr + 4, [16, 0, 0, 0, 5, 0])]
        );
        let code = p.code();
        assert_eq!(code.text, (p.text_addr, p.text_addr + p.text.len() as u64));
        assert_eq!(code.orc, p.orc);
        assert!(code
            .functions
            .iter()
            .any(|f| f.0 == "new_fn" && f.1 == addr));
        // Without the tables (no objtool), there are no rows.
        let plain = link_source("no-orc", SRC);
        assert!(plain.unwrap().orc.is_empty());
    }

    #[test]
    fn refuses_orc_tables_that_disagree_or_point_outside_the_text() {
        let short = orc_source(
            ".long new_fn - .\\n.long new_fn + 4 - .\\n",
            ".short 8, 0, 0x0005\\n",
        );
        let err = link_source("orc-short", &short).unwrap_err().to_string();
        assert!(
            err.contains("ORC tables") && err.contains("do not match"),
            "{err}"
        );
        let outside = orc_source(".long new_fn + 0x10000 - .\\n", ".short 8, 0, 0x0005\\n");
        let err = link_source("orc-out", &outside).unwrap_err().to_string();
        assert!(err.contains("outside the text"), "{err}");
    }
}
