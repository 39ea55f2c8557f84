//! Finding the kallsyms tables when vmcoreinfo does not name them (kernels before 6.0,
//! or a vmcoreinfo page the guest has damaged), by their shape alone
//! (guest-introspection.md §2.5):
//!
//! 1. The token table is anchored on its digit tokens, which are the digits themselves
//!    (`"0\0" … "9\0"`); tokens 1..=0x2f before them and 0x3a..=0xff after them are walked,
//!    and the `u16` token index that follows must agree with every token's length.
//! 2. `num_syms` is found below the token table by decoding the names stream from each
//!    candidate and checking every `kallsyms_markers` entry against the decoded records.
//! 3. What lies between the markers and the token table, and where a plausible offsets
//!    array is, tell the kernel's table order:
//!    - 6.1: offsets, relative_base, num_syms, names, markers, token_table, token_index;
//!    - 6.2–6.3, and the 6.1.y backport Debian ships: seqs_of_names (4-byte entries in
//!      6.2–6.3, 3-byte in the backport) between the markers and the token table;
//!    - 6.4 and later: num_syms, names, markers, token_table, token_index, offsets,
//!      relative_base, seqs_of_names.
//!
//! Every step is bounded: the window is at most [`MAX_WINDOW`] bytes, and all candidate
//! decodes together may step over at most [`DECODE_BUDGET`] name records.

use std::fmt;

use super::{offset_at, AddressEncoding, KallsymsError, KernelImage, Tables, MAX_SYMBOLS};
use crate::memory::GuestPhysMemory;

/// Largest window of the kernel image searched (the tables are in `.rodata`, well inside).
pub const MAX_WINDOW: u64 = 64 << 20;
/// How far below the token table `num_syms` may be (the names stream plus the markers).
const MAX_BELOW: usize = 32 << 20;
/// Name records stepped over by all candidate decodes together.
const DECODE_BUDGET: u64 = 32 << 20;
/// Longest token accepted (the kernel's are a few bytes; each expands two others).
const MAX_TOKEN: usize = 255;
/// The digit tokens 0x30..=0x39, each the digit itself.
const DIGITS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
const CHUNK: u64 = 1 << 20;

/// The table order found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// 6.1 as released.
    V61,
    /// 6.2's `kallsyms_seqs_of_names` between the markers and the token table, with
    /// entries of `seq_bytes` bytes (4 in 6.2–6.3, 3 in the 6.1.y backport).
    V62 { seq_bytes: u8 },
    /// 6.4's order: offsets and relative_base after the token index.
    V64,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::V61 => write!(f, "6.1 order"),
            Layout::V62 { seq_bytes } => {
                write!(f, "6.2 order, {seq_bytes}-byte seqs_of_names")
            }
            Layout::V64 => write!(f, "6.4 order"),
        }
    }
}

/// Tables found by [`locate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub tables: Tables,
    pub layout: Layout,
}

fn corrupt(msg: impl Into<String>) -> KallsymsError {
    KallsymsError::Corrupt(msg.into())
}

/// Reads up to [`MAX_WINDOW`] bytes of the kernel image from `text` (a kernel-image VA)
/// and locates the tables in them. The window ends early at the first unreadable MiB.
pub fn scan(
    mem: &dyn GuestPhysMemory,
    image: KernelImage,
    text: u64,
) -> Result<Located, KallsymsError> {
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; CHUNK as usize];
    while (bytes.len() as u64) < MAX_WINDOW {
        let va = text.wrapping_add(bytes.len() as u64);
        if mem.read_phys(image.pa(va), &mut chunk).is_err() {
            break;
        }
        bytes.extend_from_slice(&chunk);
    }
    if bytes.is_empty() {
        return Err(corrupt(format!(
            "the kernel image at {text:#x} (guest-physical {:#x}) is not readable",
            image.pa(text)
        )));
    }
    locate(text, &bytes)
}

/// The image bytes from kernel VA `base` (8-byte aligned, so index and VA alignment agree).
struct Window<'a> {
    base: u64,
    bytes: &'a [u8],
}

fn align8(i: usize) -> usize {
    (i + 7) & !7
}

impl Window<'_> {
    fn u16_at(&self, i: usize) -> Option<u16> {
        Some(u16::from_le_bytes(
            self.bytes.get(i..i + 2)?.try_into().ok()?,
        ))
    }
    fn u32_at(&self, i: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.bytes.get(i..i + 4)?.try_into().ok()?,
        ))
    }
    fn u64_at(&self, i: usize) -> Option<u64> {
        Some(u64::from_le_bytes(
            self.bytes.get(i..i + 8)?.try_into().ok()?,
        ))
    }
    fn va(&self, i: usize) -> u64 {
        self.base.wrapping_add(i as u64)
    }
}

/// Finds the tables in `bytes`, the kernel image from VA `base`.
pub fn locate(base: u64, bytes: &[u8]) -> Result<Located, KallsymsError> {
    if base & 7 != 0 {
        return Err(corrupt(format!(
            "image window {base:#x} is not 8-byte aligned"
        )));
    }
    let bytes = &bytes[..bytes.len().min(MAX_WINDOW as usize)];
    let w = Window { base, bytes };
    let tokens: Vec<(usize, usize)> = memchr::memmem::find_iter(bytes, DIGITS)
        .filter_map(|hit| token_table_at(&w, hit))
        .collect();
    let (tt, ti) = match tokens.as_slice() {
        [one] => *one,
        [] => return Err(corrupt("no kallsyms token table in the kernel image")),
        many => {
            return Err(corrupt(format!(
                "{} places look like the kallsyms token table",
                many.len()
            )))
        }
    };
    let mut budget = DECODE_BUDGET;
    let lowest = tt.saturating_sub(MAX_BELOW);
    let mut q = (tt & !7).checked_sub(8);
    while let Some(at) = q.filter(|&at| at >= lowest) {
        if let Some(found) = try_num_syms(&w, at, tt, ti, &mut budget)? {
            return Ok(found);
        }
        q = at.checked_sub(8);
    }
    Err(corrupt(format!(
        "found the kallsyms token table at {:#x} but no names stream below it",
        w.va(tt)
    )))
}

/// If the digit tokens at `hit` belong to a token table, its start and its index's start.
fn token_table_at(w: &Window, hit: usize) -> Option<(usize, usize)> {
    let b = w.bytes;
    // Back over tokens 0x2f..=1: each ends with the NUL just before the next one's start.
    let mut start = hit;
    for _ in 1..0x30 {
        let nul = start.checked_sub(1)?;
        if b[nul] != 0 {
            return None;
        }
        let lo = nul.saturating_sub(MAX_TOKEN + 1);
        let prev = b[lo..nul].iter().rposition(|&c| c == 0)? + lo;
        if prev + 1 == nul {
            return None; // an empty token
        }
        start = prev + 1;
    }
    let first = start;
    // Forward over tokens 1..=255.
    let mut starts = [0usize; 256];
    let mut lens = [0usize; 256];
    let mut p = first;
    for k in 1..256 {
        let len = b
            .get(p..)?
            .iter()
            .take(MAX_TOKEN + 1)
            .position(|&c| c == 0)?;
        if len == 0 {
            return None;
        }
        (starts[k], lens[k]) = (p, len);
        p += len + 1;
    }
    // The index follows at the next 8-byte boundary: entry 0 is 0, and consecutive
    // entries differ by each token's length plus its NUL.
    let ti = align8(p);
    let index = |k: usize| w.u16_at(ti + 2 * k).map(usize::from);
    if index(0)? != 0 {
        return None;
    }
    for (k, len) in lens.iter().enumerate().take(255).skip(1) {
        if index(k + 1)?.checked_sub(index(k)?)? != len + 1 {
            return None;
        }
    }
    let tt = first.checked_sub(index(1)?)?;
    if tt & 7 != 0 || tt >= first || b[tt..first - 1].contains(&0) {
        return None;
    }
    // Every lower-case letter occurs in kernel symbol names, so it is its own token.
    if !(b'a'..=b'z').all(|c| lens[c as usize] == 1 && b[starts[c as usize]] == c) {
        return None;
    }
    Some((tt, ti))
}

/// Whether `num_syms` is at `q`: decodes the names stream after it and checks the markers,
/// then decides the layout. `Ok(None)` means "not here".
fn try_num_syms(
    w: &Window,
    q: usize,
    tt: usize,
    ti: usize,
    budget: &mut u64,
) -> Result<Option<Located>, KallsymsError> {
    let Some(n) = w.u32_at(q) else {
        return Ok(None);
    };
    if n == 0 || n > MAX_SYMBOLS || w.u32_at(q + 4) != Some(0) {
        return Ok(None);
    }
    let names = q + 8;
    let mut pos = names;
    let mut expected = Vec::new();
    for i in 0..n {
        if *budget == 0 {
            return Err(corrupt(
                "gave up searching for the kallsyms names stream (too many candidates)",
            ));
        }
        *budget -= 1;
        if i % 256 == 0 {
            expected.push((pos - names) as u64);
        }
        let Some(&b0) = w.bytes.get(pos) else {
            return Ok(None);
        };
        let (len, hdr) = if b0 & 0x80 != 0 {
            let Some(&b1) = w.bytes.get(pos + 1) else {
                return Ok(None);
            };
            ((usize::from(b0) & 0x7f) | (usize::from(b1) << 7), 2)
        } else {
            (usize::from(b0), 1)
        };
        if len == 0 {
            return Ok(None);
        }
        pos += hdr + len;
        if pos > tt {
            return Ok(None);
        }
    }
    let markers = align8(pos);
    for (j, &want) in expected.iter().enumerate() {
        if w.u32_at(markers + 4 * j).map(u64::from) != Some(want) {
            return Ok(None);
        }
    }
    let after = align8(markers + 4 * expected.len());
    let n_us = n as usize;
    // Offsets below num_syms (before 6.4) or after the token index (6.4 and later).
    let below = |layout| {
        let rb = q.checked_sub(8)?;
        Some((layout, rb.checked_sub(align8(4 * n_us))?, rb))
    };
    let above = || {
        let offsets = align8(ti + 512);
        Some((Layout::V64, offsets, align8(offsets + 4 * n_us)))
    };
    let candidates: Vec<(Layout, usize, usize)> = if after == tt {
        [below(Layout::V61), above()]
            .into_iter()
            .flatten()
            .collect()
    } else if align8(after + 3 * n_us) == tt {
        below(Layout::V62 { seq_bytes: 3 }).into_iter().collect()
    } else if align8(after + 4 * n_us) == tt {
        below(Layout::V62 { seq_bytes: 4 }).into_iter().collect()
    } else {
        return Ok(None);
    };
    let plausible: Vec<_> = candidates
        .into_iter()
        .filter(|&(_, offsets, rb)| offsets_plausible(w, offsets, rb, n_us))
        .collect();
    let (layout, offsets, rb) = match plausible.as_slice() {
        [one] => *one,
        [] => return Ok(None),
        _ => {
            return Err(corrupt(format!(
                "kallsyms at {:#x}: both the 6.1 and the 6.4 table order fit",
                w.va(q)
            )))
        }
    };
    Ok(Some(Located {
        tables: Tables {
            num_syms: w.va(q),
            names: w.va(names),
            offsets: w.va(offsets),
            relative_base: w.va(rb),
            token_table: w.va(tt),
            token_index: w.va(ti),
        },
        layout,
    }))
}

/// Whether `offsets` holds `n` entries that decode, against the kernel address at `rb`, to
/// image addresses in kallsyms order: non-decreasing, and the first one is the base itself.
fn offsets_plausible(w: &Window, offsets: usize, rb: usize, n: usize) -> bool {
    let (Some(base), Some(raw)) = (w.u64_at(rb), w.bytes.get(offsets..offsets + 4 * n)) else {
        return false;
    };
    if base >> 32 != 0xffff_ffff {
        return false;
    }
    let encoding = AddressEncoding::detect(raw);
    let mut prev = None;
    for i in 0..n {
        let entry = offset_at(raw, i);
        if encoding.is_absolute(entry) {
            continue;
        }
        let addr = encoding.address(entry, base);
        match prev {
            None if addr != base => return false,
            Some(p) if addr < p => return false,
            _ => prev = Some(addr),
        }
    }
    prev.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kallsyms::{decode, START_KERNEL_MAP};
    use crate::memory::BufferMemory;

    const BASE: u64 = 0xffff_ffff_9000_0000;

    /// Symbols for the synthetic tables: 601 of them, so there are three markers.
    fn symbols() -> Vec<(String, i64)> {
        let mut v = vec![("A".to_string() + "fixed_percpu_data", 0)];
        v.push(("T_text".into(), -1));
        for i in 1..600 {
            v.push((format!("tfunc_{i}"), -1 - 0x10 * i));
        }
        v
    }

    /// Writes the tables in `layout` order (with `encoding`) after `lead` bytes of noise,
    /// the way scripts/kallsyms.c lays them out, and returns the image bytes.
    fn image(layout: Layout, encoding: AddressEncoding, lead: usize) -> Vec<u8> {
        let syms = symbols();
        let n = syms.len();
        let mut out = vec![0u8; lead];
        // Noise that must not be mistaken for tables: a stray digit run and small numbers.
        out[8..28].copy_from_slice(DIGITS);
        for (i, chunk) in out[64..].chunks_exact_mut(8).enumerate().take(200) {
            chunk[..4].copy_from_slice(&(1000 + i as u32).to_le_bytes());
        }
        let pad = |out: &mut Vec<u8>| out.resize(align8(out.len()), 0);
        let offsets = |out: &mut Vec<u8>| {
            pad(out);
            for (name, off) in &syms {
                let entry = match encoding {
                    AddressEncoding::AbsolutePercpu => *off as i32,
                    // Plain base-relative: every symbol above the base.
                    AddressEncoding::BaseRelative if name.starts_with('A') => 0,
                    AddressEncoding::BaseRelative => (-1 - off) as i32,
                };
                out.extend_from_slice(&entry.to_le_bytes());
            }
            pad(out);
            out.extend_from_slice(&BASE.to_le_bytes());
        };
        let names_and_markers = |out: &mut Vec<u8>| {
            pad(out);
            out.extend_from_slice(&(n as u32).to_le_bytes());
            pad(out);
            let start = out.len();
            let mut markers = Vec::new();
            for (i, (name, _)) in syms.iter().enumerate() {
                if i % 256 == 0 {
                    markers.push((out.len() - start) as u32);
                }
                // Codes: "func_" is token 0x80; other bytes are themselves.
                let mut codes = Vec::new();
                let mut rest = name.as_bytes();
                while !rest.is_empty() {
                    if rest.starts_with(b"func_") {
                        codes.push(0x80);
                        rest = &rest[5..];
                    } else {
                        codes.push(rest[0]);
                        rest = &rest[1..];
                    }
                }
                out.push(codes.len() as u8);
                out.extend_from_slice(&codes);
            }
            pad(out);
            for m in markers {
                out.extend_from_slice(&m.to_le_bytes());
            }
        };
        let tokens = |out: &mut Vec<u8>| {
            pad(out);
            let start = out.len();
            let mut index = Vec::new();
            for c in 0..256u32 {
                index.push((out.len() - start) as u16);
                match c {
                    0 => out.extend_from_slice(b"zz"),
                    0x80 => out.extend_from_slice(b"func_"),
                    c => out.push(c as u8),
                }
                out.push(0);
            }
            pad(out);
            for i in index {
                out.extend_from_slice(&i.to_le_bytes());
            }
        };
        let seqs = |out: &mut Vec<u8>, bytes: usize| {
            pad(out);
            out.extend(std::iter::repeat_n(0u8, bytes * n));
        };
        match layout {
            Layout::V61 => {
                offsets(&mut out);
                names_and_markers(&mut out);
                tokens(&mut out);
            }
            Layout::V62 { seq_bytes } => {
                offsets(&mut out);
                names_and_markers(&mut out);
                seqs(&mut out, seq_bytes as usize);
                tokens(&mut out);
            }
            Layout::V64 => {
                names_and_markers(&mut out);
                tokens(&mut out);
                offsets(&mut out);
                seqs(&mut out, 3);
            }
        }
        out.resize(out.len() + 4096, 0);
        out
    }

    #[test]
    fn finds_and_decodes_every_layout_and_encoding() {
        let layouts = [
            Layout::V61,
            Layout::V62 { seq_bytes: 3 },
            Layout::V62 { seq_bytes: 4 },
            Layout::V64,
        ];
        for layout in layouts {
            for encoding in [
                AddressEncoding::AbsolutePercpu,
                AddressEncoding::BaseRelative,
            ] {
                let bytes = image(layout, encoding, 4096);
                let found = locate(BASE, &bytes).unwrap_or_else(|e| panic!("{layout}: {e}"));
                assert_eq!(found.layout, layout);
                // Decode through guest memory: the image at guest-physical 0.
                let phys_base = BASE.wrapping_sub(START_KERNEL_MAP).wrapping_neg();
                let image = KernelImage { phys_base };
                let table = decode(&BufferMemory(bytes), image, found.tables).unwrap();
                assert_eq!(table.len(), 601, "{layout}");
                assert_eq!(table.lookup("_text", None).unwrap().addr, BASE);
                let f = table.lookup("func_599", None).unwrap();
                assert_eq!(
                    (f.kind, f.addr),
                    ('t', BASE + 0x10 * 599),
                    "{layout} {encoding:?}"
                );
                let percpu = table.lookup("fixed_percpu_data", None).unwrap();
                let want = match encoding {
                    AddressEncoding::AbsolutePercpu => 0,
                    AddressEncoding::BaseRelative => BASE,
                };
                assert_eq!(percpu.addr, want, "{layout} {encoding:?}");
            }
        }
    }

    #[test]
    fn refuses_images_without_tables_or_with_two() {
        let bytes = image(Layout::V61, AddressEncoding::AbsolutePercpu, 4096);
        // The lead-in noise alone has a digit run but no token table.
        let err = locate(BASE, &bytes[..4096]).unwrap_err().to_string();
        assert!(err.contains("no kallsyms token table"), "{err}");
        let mut twice = bytes.clone();
        twice.extend_from_slice(&bytes);
        let err = locate(BASE, &twice).unwrap_err().to_string();
        assert!(err.contains("2 places"), "{err}");
        assert!(locate(BASE + 4, &bytes).is_err());
        assert!(locate(BASE, &[]).is_err());
    }

    #[test]
    fn damaged_tables_fail_without_panicking() {
        let bytes = image(Layout::V64, AddressEncoding::AbsolutePercpu, 4096);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let mut b = bytes.clone();
            for _ in 0..16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % b.len();
                b[i] = (x >> 40) as u8;
            }
            if let Ok(found) = locate(BASE, &b) {
                // Whatever was accepted must be inside the window.
                assert!(found.tables.token_index < BASE + b.len() as u64);
            }
        }
    }
}
