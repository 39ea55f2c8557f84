//! The kernel's own symbol table (kallsyms), decoded from guest memory
//! (guest-introspection.md §2). Addresses are base-relative, with or without absolute
//! per-cpu symbols (`KALLSYMS_ABSOLUTE_PERCPU`, x86-64 until 6.14); `locate` finds the
//! tables in any of the 6.1, 6.1.y-backport, 6.2 and 6.4+ orders when vmcoreinfo does not
//! name them. Every count and length comes from the guest and is bounded before use.

pub mod locate;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use crate::memory::{read_u32, read_u64, GuestPhysMemory, MemError};

/// Start of the kernel image window (`__START_KERNEL_map`).
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// Most symbols accepted (the kernel's format allows 2^24 via 3-byte seqs).
pub const MAX_SYMBOLS: u32 = 1 << 22;
/// Largest names stream accepted.
const MAX_NAMES_BYTES: u64 = 64 << 20;

/// Errors decoding kallsyms.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KallsymsError {
    #[error("{0}")]
    Memory(#[from] MemError),
    #[error("kallsyms tables look wrong: {0}")]
    Corrupt(String),
}

/// Translates kernel-image virtual addresses with `phys_base` (no page walk needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelImage {
    pub phys_base: u64,
}

impl KernelImage {
    pub fn pa(&self, va: u64) -> u64 {
        va.wrapping_sub(START_KERNEL_MAP)
            .wrapping_add(self.phys_base)
    }
}

/// Where the tables are (virtual addresses), e.g. from vmcoreinfo's `SYMBOL(kallsyms_*)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tables {
    pub num_syms: u64,
    pub names: u64,
    pub offsets: u64,
    pub relative_base: u64,
    pub token_table: u64,
    pub token_index: u64,
}

/// One symbol, as `/proc/kallsyms` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub addr: u64,
    pub kind: char,
    pub name: String,
    /// Distance to the next symbol at a higher address (0 for the last and per-cpu ones).
    pub size: u64,
    /// 1-based position among symbols of the same name, in kallsyms order (kpatch's sympos).
    pub sympos: u32,
}

/// Why a name lookup failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("no symbol {0} in the guest's kallsyms")]
    NotFound(String),
    #[error("{name} is ambiguous: {count} symbols have that name; give its sympos (1..={count})")]
    Ambiguous { name: String, count: usize },
    #[error("{name} has no sympos {pos} (there are {count})")]
    NoSuchPos {
        name: String,
        pos: u32,
        count: usize,
    },
}

#[cfg(test)]
impl Symbol {
    /// A local text symbol (`t`) for tests; the table fills in size and sympos.
    pub(crate) fn text(addr: u64, name: &str) -> Self {
        Symbol {
            addr,
            kind: 't',
            name: name.into(),
            size: 0,
            sympos: 0,
        }
    }
}

/// The decoded table with O(1) name and O(log n) address lookups.
#[derive(Debug, Clone)]
pub struct SymbolTable {
    symbols: Vec<Symbol>,
    /// Name hash (SipHash with a random key, so a hostile guest cannot make names
    /// collide) → first symbol with that hash; `same_hash` chains the rest in kallsyms
    /// order. No second copy of any name is kept.
    hasher: RandomState,
    by_name: HashMap<u64, u32>,
    same_hash: Vec<u32>,
    /// Indices of non-per-cpu symbols sorted by address.
    by_addr: Vec<u32>,
    /// Their addresses, in the same order: the address lookup's binary search reads
    /// this contiguous array instead of chasing indices into `symbols`.
    sorted_addrs: Vec<u64>,
}

/// End of a `same_hash` chain.
const NO_NEXT: u32 = u32::MAX;

fn corrupt(msg: impl Into<String>) -> KallsymsError {
    KallsymsError::Corrupt(msg.into())
}

fn read_vec(mem: &dyn GuestPhysMemory, gpa: u64, len: u64) -> Result<Vec<u8>, KallsymsError> {
    let mut v = vec![0u8; usize::try_from(len).map_err(|_| corrupt("length"))?];
    mem.read_phys(gpa, &mut v)?;
    Ok(v)
}

/// Decodes kallsyms.
pub fn decode(
    mem: &dyn GuestPhysMemory,
    image: KernelImage,
    t: Tables,
) -> Result<SymbolTable, KallsymsError> {
    let n = read_u32(mem, image.pa(t.num_syms))?;
    if n == 0 || n > MAX_SYMBOLS {
        return Err(corrupt(format!("num_syms = {n}")));
    }
    let relative_base = read_u64(mem, image.pa(t.relative_base))?;
    // Tokens: 256 NUL-terminated strings, indexed by u16 offsets.
    if t.token_index <= t.token_table || t.token_index - t.token_table > 64 * 1024 {
        return Err(corrupt("token table bounds"));
    }
    let table = read_vec(mem, image.pa(t.token_table), t.token_index - t.token_table)?;
    let index = read_vec(mem, image.pa(t.token_index), 512)?;
    let mut tokens: Vec<&[u8]> = Vec::with_capacity(256);
    for i in 0..256 {
        let off = u16::from_le_bytes([index[2 * i], index[2 * i + 1]]) as usize;
        let rest = table
            .get(off..)
            .ok_or_else(|| corrupt(format!("token {i} offset {off} past the table")))?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        tokens.push(&rest[..end]);
    }
    // Names: the stream ends before the token table in every known layout.
    if t.token_table <= t.names || t.token_table - t.names > MAX_NAMES_BYTES {
        return Err(corrupt("names bounds"));
    }
    let names = read_vec(mem, image.pa(t.names), t.token_table - t.names)?;
    let offsets = read_vec(mem, image.pa(t.offsets), u64::from(n) * 4)?;
    let encoding = AddressEncoding::detect(&offsets);
    let mut symbols = Vec::with_capacity(n as usize);
    let mut pos = 0usize;
    let mut expanded = Vec::with_capacity(64);
    for i in 0..n as usize {
        let b0 = *names
            .get(pos)
            .ok_or_else(|| corrupt("names stream ends early"))? as usize;
        let (len, hdr) = if b0 & 0x80 != 0 {
            let b1 = *names
                .get(pos + 1)
                .ok_or_else(|| corrupt("names stream ends early"))? as usize;
            ((b0 & 0x7f) | (b1 << 7), 2)
        } else {
            (b0, 1)
        };
        let codes = names
            .get(pos + hdr..pos + hdr + len)
            .ok_or_else(|| corrupt(format!("name {i} runs past the stream")))?;
        pos += hdr + len;
        expanded.clear();
        for &c in codes {
            expanded.extend_from_slice(tokens[c as usize]);
            if expanded.len() > 1024 {
                return Err(corrupt(format!("name {i} expands beyond 1024 bytes")));
            }
        }
        let (&kind, name) = expanded
            .split_first()
            .ok_or_else(|| corrupt(format!("name {i} is empty")))?;
        symbols.push(Symbol {
            addr: encoding.address(offset_at(&offsets, i), relative_base),
            kind: kind as char,
            name: String::from_utf8_lossy(name).into_owned(),
            size: 0,
            sympos: 0,
        });
    }
    Ok(SymbolTable::new(symbols))
}

/// How `kallsyms_offsets` encodes addresses (scripts/kallsyms.c `--absolute-percpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressEncoding {
    /// A non-negative entry is an absolute per-cpu offset; a negative one is
    /// `relative_base - 1 - entry`.
    AbsolutePercpu,
    /// Every entry is an unsigned offset above `relative_base`.
    BaseRelative,
}

impl AddressEncoding {
    /// With absolute per-cpu symbols every ordinary symbol (`_text` first, at -1) is
    /// negative; plain base-relative entries are offsets within a kernel image (< 2 GiB),
    /// so none is negative.
    pub fn detect(offsets: &[u8]) -> Self {
        let negative = offsets
            .chunks_exact(4)
            .any(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) < 0);
        if negative {
            AddressEncoding::AbsolutePercpu
        } else {
            AddressEncoding::BaseRelative
        }
    }

    pub fn address(self, entry: i32, relative_base: u64) -> u64 {
        match self {
            AddressEncoding::AbsolutePercpu if entry >= 0 => entry as u64,
            AddressEncoding::AbsolutePercpu => relative_base
                .wrapping_sub(1)
                .wrapping_sub(entry as i64 as u64),
            AddressEncoding::BaseRelative => relative_base.wrapping_add(u64::from(entry as u32)),
        }
    }

    /// Whether the entry names an absolute (per-cpu) symbol rather than an image address.
    pub fn is_absolute(self, entry: i32) -> bool {
        self == AddressEncoding::AbsolutePercpu && entry >= 0
    }
}

/// Entry `i` of a little-endian `i32` array (the caller has checked the length).
fn offset_at(offsets: &[u8], i: usize) -> i32 {
    i32::from_le_bytes([
        offsets[4 * i],
        offsets[4 * i + 1],
        offsets[4 * i + 2],
        offsets[4 * i + 3],
    ])
}

impl SymbolTable {
    /// Builds the indexes; computes sizes and sympos.
    pub fn new(mut symbols: Vec<Symbol>) -> Self {
        // Indices are u32: decode() caps the count far below that.
        symbols.truncate(u32::MAX as usize - 1);
        let hasher = RandomState::new();
        let mut by_name: HashMap<u64, u32> = HashMap::with_capacity(symbols.len());
        // hash → (last index with it, sympos of that one)
        let mut last: HashMap<u64, (u32, u32)> = HashMap::with_capacity(symbols.len());
        let mut same_hash = vec![NO_NEXT; symbols.len()];
        for i in 0..symbols.len() {
            let h = hasher.hash_one(symbols[i].name.as_str());
            let idx = i as u32;
            let pos = match last.get(&h).copied() {
                None => {
                    by_name.insert(h, idx);
                    1
                }
                Some((prev, prev_pos)) => {
                    same_hash[prev as usize] = idx;
                    if symbols[prev as usize].name == symbols[i].name {
                        prev_pos + 1
                    } else {
                        // Two names with one hash (a 2^-64 event): count this name's
                        // earlier symbols along the chain.
                        let mut n = 1;
                        let mut j = by_name[&h];
                        while j != idx {
                            if symbols[j as usize].name == symbols[i].name {
                                n += 1;
                            }
                            j = same_hash[j as usize];
                        }
                        n
                    }
                }
            };
            last.insert(h, (idx, pos));
            symbols[i].sympos = pos;
        }
        let mut by_addr: Vec<u32> = (0..symbols.len() as u32)
            .filter(|&i| !symbols[i as usize].kind.eq_ignore_ascii_case(&'a'))
            .collect();
        by_addr.sort_by_key(|&i| (symbols[i as usize].addr, i));
        // Size: distance to the next higher address (one pass from the end, so a run of
        // symbols at one address costs no more than any other).
        let mut next_higher: Option<u64> = None;
        let mut run_addr: Option<u64> = None;
        for &i in by_addr.iter().rev() {
            let i = i as usize;
            let a = symbols[i].addr;
            if run_addr != Some(a) {
                next_higher = run_addr;
                run_addr = Some(a);
            }
            symbols[i].size = next_higher.map_or(0, |b| b - a);
        }
        let sorted_addrs = by_addr.iter().map(|&i| symbols[i as usize].addr).collect();
        SymbolTable {
            symbols,
            hasher,
            by_name,
            same_hash,
            by_addr,
            sorted_addrs,
        }
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// All symbols, in kallsyms order.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// A symbol by name; `sympos` is required when the name is not unique.
    pub fn lookup(&self, name: &str, sympos: Option<u32>) -> Result<&Symbol, LookupError> {
        let h = self.hasher.hash_one(name);
        let mut next = self.by_name.get(&h).copied().unwrap_or(NO_NEXT);
        let (mut count, mut found) = (0usize, None);
        while next != NO_NEXT {
            let s = &self.symbols[next as usize];
            if s.name == name {
                count += 1;
                if sympos.is_some_and(|p| p == s.sympos) || (sympos.is_none() && count == 1) {
                    found = Some(s);
                }
            }
            next = self.same_hash[next as usize];
        }
        match (sympos, count, found) {
            (_, 0, _) => Err(LookupError::NotFound(name.to_string())),
            (None, 1, Some(s)) => Ok(s),
            (None, count, _) => Err(LookupError::Ambiguous {
                name: name.to_string(),
                count,
            }),
            (Some(_), _, Some(s)) => Ok(s),
            (Some(pos), count, None) => Err(LookupError::NoSuchPos {
                name: name.to_string(),
                pos,
                count,
            }),
        }
    }

    /// The symbol containing `addr` and the offset into it (nearest symbol at or below).
    /// Of several symbols at that address, the first in the kernel's table, as the
    /// kernel's own lookup picks it (`get_symbol_pos`: the table is sorted so that the
    /// preferred name of an address comes first).
    pub fn symbolize(&self, addr: u64) -> Option<(&Symbol, u64)> {
        let at = *self.sorted_addrs.get(
            self.sorted_addrs
                .partition_point(|&a| a <= addr)
                .checked_sub(1)?,
        )?;
        let first = self.sorted_addrs.partition_point(|&a| a < at);
        let s = &self.symbols[*self.by_addr.get(first)? as usize];
        Some((s, addr - s.addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::BufferMemory;

    /// Lays out a tiny kallsyms the way the kernel does, at image VAs.
    fn build(names: &[&str], addrs: &[i64], base: u64) -> (BufferMemory, Tables, KernelImage) {
        // Tokens: code c < 128 is the character itself; 0x80 = "_s", 0x81 = "ys".
        let mut tokens: Vec<Vec<u8>> = (0..256u32).map(|c| vec![c as u8]).collect();
        tokens[0x80] = b"_s".to_vec();
        tokens[0x81] = b"ys".to_vec();
        let mut mem = vec![0u8; 0x10000];
        let phys = 0x1000u64; // PA of START_KERNEL_MAP + 0x1000... image placed so pa(va)=va-map+phys_base
        let image = KernelImage { phys_base: 0 };
        let va = |pa: u64| START_KERNEL_MAP + pa;
        let mut w = phys as usize;
        let offsets = w;
        for &a in addrs {
            mem[w..w + 4].copy_from_slice(&(a as i32).to_le_bytes());
            w += 4;
        }
        w = (w + 7) & !7;
        let rb = w;
        mem[w..w + 8].copy_from_slice(&base.to_le_bytes());
        w += 8;
        let ns = w;
        mem[w..w + 4].copy_from_slice(&(names.len() as u32).to_le_bytes());
        w += 8;
        let nm = w;
        for n in names {
            let mut codes = Vec::new();
            let b = n.as_bytes();
            let mut k = 0;
            while k < b.len() {
                if b[k..].starts_with(b"_s") {
                    codes.push(0x80u8);
                    k += 2;
                } else if b[k..].starts_with(b"ys") {
                    codes.push(0x81);
                    k += 2;
                } else {
                    codes.push(b[k]);
                    k += 1;
                }
            }
            mem[w] = codes.len() as u8;
            mem[w + 1..w + 1 + codes.len()].copy_from_slice(&codes);
            w += 1 + codes.len();
        }
        w = (w + 7) & !7;
        let tt = w;
        let mut idx = Vec::new();
        for t in &tokens {
            idx.push((w - tt) as u16);
            mem[w..w + t.len()].copy_from_slice(t);
            w += t.len() + 1;
        }
        w = (w + 7) & !7;
        let ti = w;
        for (i, o) in idx.iter().enumerate() {
            mem[w + 2 * i..w + 2 * i + 2].copy_from_slice(&o.to_le_bytes());
        }
        let t = Tables {
            num_syms: va(ns as u64),
            names: va(nm as u64),
            offsets: va(offsets as u64),
            relative_base: va(rb as u64),
            token_table: va(tt as u64),
            token_index: va(ti as u64),
        };
        (BufferMemory(mem), t, image)
    }

    #[test]
    fn decodes_names_addresses_types_sizes_and_sympos() {
        let base = 0xffff_ffff_9000_0000u64;
        let (mem, t, image) = build(
            &[
                "T_text",
                "Ta_sys_call",
                "tshow_val",
                "tshow_val",
                "Acurrent_task",
                "T_etext",
            ],
            &[-1, -0x101, -0x201, -0x301, 0x1fb80, -0x1001],
            base,
        );
        let table = decode(&mem, image, t).unwrap();
        assert_eq!(table.len(), 6);
        let text = table.lookup("_text", None).unwrap();
        assert_eq!((text.addr, text.kind, text.size), (base, 'T', 0x100));
        assert_eq!(table.lookup("a_sys_call", None).unwrap().addr, base + 0x100);
        assert_eq!(table.lookup("current_task", None).unwrap().addr, 0x1fb80);
        assert!(matches!(
            table.lookup("show_val", None),
            Err(LookupError::Ambiguous { count: 2, .. })
        ));
        let second = table.lookup("show_val", Some(2)).unwrap();
        assert_eq!((second.addr, second.sympos), (base + 0x300, 2));
        assert!(table.lookup("show_val", Some(3)).is_err());
        assert!(table.lookup("nope", None).is_err());
        let (s, off) = table.symbolize(base + 0x123).unwrap();
        assert_eq!((s.name.as_str(), off), ("a_sys_call", 0x23));
        assert!(table.symbolize(base - 1).is_none());
    }

    #[test]
    fn sizes_skip_symbols_at_the_same_address() {
        let sym = Symbol::text;
        let t = SymbolTable::new(vec![
            sym(0x30, "last"),
            sym(0x10, "alias_a"),
            sym(0x10, "alias_b"),
            sym(0x20, "mid"),
        ]);
        let size = |n: &str| t.lookup(n, None).unwrap().size;
        assert_eq!(
            [size("alias_a"), size("alias_b"), size("mid"), size("last")],
            [0x10, 0x10, 0x10, 0]
        );
        // An address several symbols share takes the first of them in the table, as
        // the kernel prints it (`common_interrupt_return`, not the section marker
        // `__irqentry_text_end` at the same address).
        assert_eq!(
            t.symbolize(0x18).map(|(s, o)| (s.name.as_str(), o)),
            Some(("alias_a", 8))
        );
        assert_eq!(
            t.symbolize(0x10).map(|(s, o)| (s.name.as_str(), o)),
            Some(("alias_a", 0))
        );
        assert_eq!(
            t.symbolize(0x2f).map(|(s, o)| (s.name.as_str(), o)),
            Some(("mid", 0xf))
        );
        assert!(t.symbolize(0xf).is_none());
    }

    #[test]
    fn garbage_tables_fail_without_panicking() {
        let (mem, t, image) = build(&["T_text"], &[-1], 0xffff_ffff_9000_0000);
        let mut bad = t;
        bad.token_index = bad.token_table; // empty token table
        assert!(decode(&mem, image, bad).is_err());
        let mut raw = mem.0.clone();
        // num_syms huge
        let ns = image.pa(t.num_syms) as usize;
        raw[ns..ns + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&BufferMemory(raw.clone()), image, t).is_err());
        // num_syms larger than the names stream
        raw[ns..ns + 4].copy_from_slice(&5000u32.to_le_bytes());
        assert!(decode(&BufferMemory(raw.clone()), image, t).is_err());
        // random bytes everywhere
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..200 {
            let mut r = mem.0.clone();
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % r.len();
                r[i] = (x >> 40) as u8;
            }
            let _ = decode(&BufferMemory(r), image, t);
        }
    }
}
