//! The kernel's BTF (`.BTF`, `__start_BTF`..`__stop_BTF`): type sizes and member offsets
//! for the structures the task walk and unwinder read (guest-introspection.md §3).
//!
//! The blob comes from guest memory and is hostile. Parsing checks the header, keeps every
//! section in bounds, walks every type record of every kind (ids are implicit, so one
//! mis-sized record would shift all later ids) and caps the type count and total size.
//! Queries follow type references with a depth bound and a step budget, so cycles and
//! pathological nesting end in an error, never a loop; nothing here panics on any input.

use std::collections::{HashMap, HashSet};

/// Largest blob accepted (6.1.187's is about 4 MiB).
pub const MAX_BTF_SIZE: usize = 64 << 20;
/// Most type records accepted (6.1.187 has 95,057).
pub const MAX_TYPES: usize = 1 << 20;
/// Longest chain of typedefs/qualifiers/arrays, and deepest nesting of anonymous members.
pub const MAX_DEPTH: u32 = 32;
/// Most members visited by one member-path query (a real one visits a few hundred).
const MAX_STEPS: u32 = 1 << 18;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const RECORD_LEN: usize = 12;

const KIND_INT: u8 = 1;
const KIND_PTR: u8 = 2;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_FWD: u8 = 7;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC: u8 = 12;
const KIND_FUNC_PROTO: u8 = 13;
const KIND_VAR: u8 = 14;
const KIND_DATASEC: u8 = 15;
const KIND_FLOAT: u8 = 16;
const KIND_DECL_TAG: u8 = 17;
const KIND_TYPE_TAG: u8 = 18;
const KIND_ENUM64: u8 = 19;

/// Errors parsing BTF or resolving a type or member in it.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum BtfError {
    #[error("BTF blob of {0} bytes is larger than the {MAX_BTF_SIZE} accepted")]
    TooLarge(usize),
    #[error("BTF blob of {0} bytes is shorter than its header")]
    Truncated(usize),
    #[error("bad BTF magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported BTF version {0}")]
    BadVersion(u8),
    #[error("bad BTF header: {0}")]
    BadHeader(&'static str),
    #[error("more than {MAX_TYPES} BTF types")]
    TooManyTypes,
    #[error("BTF type {id} has unknown kind {kind}")]
    UnknownKind { id: u32, kind: u8 },
    #[error("BTF type {id} (kind {kind}, vlen {vlen}) runs past the type section")]
    TruncatedType { id: u32, kind: u8, vlen: u16 },
    #[error("BTF type {id}: name offset {off:#x} is outside the string section")]
    BadName { id: u32, off: u32 },
    #[error("no BTF type named {0}")]
    NoType(String),
    #[error("BTF type id {0} does not exist")]
    BadTypeId(u32),
    #[error("{ty} has no member {member}")]
    NoMember { ty: String, member: String },
    #[error("{member}: BTF type {id} is not a struct or union")]
    NotComposite { id: u32, member: String },
    #[error("BTF type {0} has no size")]
    NoSize(u32),
    #[error("size of BTF type {0} overflows")]
    Overflow(u32),
    #[error("BTF type chain deeper than {MAX_DEPTH} at type {0} (a cycle?)")]
    TooDeep(u32),
    #[error("BTF member lookup gave up after {MAX_STEPS} members")]
    TooComplex,
    #[error("bad member path {0:?}")]
    BadPath(String),
}

/// One type record: the common 12 bytes and its kind-specific trailer.
struct Record<'a> {
    name_off: u32,
    kind: u8,
    kind_flag: bool,
    /// `size` or `type`, depending on the kind.
    size_type: u32,
    trailer: &'a [u8],
}

/// A member of a struct or union, after decoding `offset` by the kind_flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u64,
}

/// State of one member-path query.
struct Search {
    /// Members left to visit.
    budget: u32,
    /// Structs/unions already searched for the current path component.
    seen: HashSet<u32>,
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Trailer length of a record of `kind` with `vlen`, or None for an unknown kind.
fn trailer_len(kind: u8, vlen: u16) -> Option<usize> {
    let vlen = usize::from(vlen);
    Some(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        _ => return None,
    })
}

/// Parsed BTF: copies of the type and string sections, each record's position, and a
/// name index of the named types a caller may ask for.
#[derive(Debug, Clone)]
pub struct Btf {
    types: Vec<u8>,
    strings: Vec<u8>,
    /// `records[id - 1]` is where type `id` starts in `types`.
    records: Vec<u32>,
    /// First struct or union of each name.
    aggregates: HashMap<String, u32>,
    /// First typedef, enum, int, float or forward declaration of each name.
    others: HashMap<String, u32>,
}

impl Btf {
    /// Parses and validates a raw BTF blob (as in `/sys/kernel/btf/vmlinux`).
    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        if bytes.len() > MAX_BTF_SIZE {
            return Err(BtfError::TooLarge(bytes.len()));
        }
        if bytes.len() < HEADER_LEN {
            return Err(BtfError::Truncated(bytes.len()));
        }
        let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
        if magic != MAGIC {
            return Err(BtfError::BadMagic(magic));
        }
        if bytes[2] != 1 {
            return Err(BtfError::BadVersion(bytes[2]));
        }
        let field = |at| le32(bytes, at).map(|v| v as usize).unwrap_or(usize::MAX);
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (field(4), field(8), field(12), field(16), field(20));
        if hdr_len < HEADER_LEN || hdr_len > bytes.len() {
            return Err(BtfError::BadHeader("hdr_len out of range"));
        }
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off)?;
            bytes.get(start..start.checked_add(len)?)
        };
        let types =
            section(type_off, type_len).ok_or(BtfError::BadHeader("type section out of bounds"))?;
        let strings =
            section(str_off, str_len).ok_or(BtfError::BadHeader("string section out of bounds"))?;
        if strings.first() != Some(&0) || strings.last() != Some(&0) {
            return Err(BtfError::BadHeader(
                "string section does not start and end with NUL",
            ));
        }

        let mut records = Vec::new();
        let mut pos = 0usize;
        while pos < types.len() {
            if records.len() >= MAX_TYPES {
                return Err(BtfError::TooManyTypes);
            }
            let id = records.len() as u32 + 1;
            let (name_off, info) = match (le32(types, pos), le32(types, pos + 4)) {
                (Some(n), Some(i)) if pos + RECORD_LEN <= types.len() => (n, i),
                _ => {
                    return Err(BtfError::TruncatedType {
                        id,
                        kind: 0,
                        vlen: 0,
                    })
                }
            };
            let kind = ((info >> 24) & 0x1f) as u8;
            let vlen = (info & 0xffff) as u16;
            let trailer = trailer_len(kind, vlen).ok_or(BtfError::UnknownKind { id, kind })?;
            let end = pos + RECORD_LEN + trailer; // both at most 64 MiB: no overflow
            if end > types.len() {
                return Err(BtfError::TruncatedType { id, kind, vlen });
            }
            if name_off as usize >= strings.len() {
                return Err(BtfError::BadName { id, off: name_off });
            }
            records.push(pos as u32);
            pos = end;
        }

        let mut btf = Btf {
            types: types.to_vec(),
            strings: strings.to_vec(),
            records,
            aggregates: HashMap::new(),
            others: HashMap::new(),
        };
        btf.index_names();
        Ok(btf)
    }

    fn index_names(&mut self) {
        let mut aggregates = HashMap::new();
        let mut others = HashMap::new();
        for id in 1..=self.records.len() as u32 {
            let Some(r) = self.record(id) else { continue };
            let map = match r.kind {
                KIND_STRUCT | KIND_UNION => &mut aggregates,
                KIND_TYPEDEF | KIND_ENUM | KIND_ENUM64 | KIND_INT | KIND_FLOAT | KIND_FWD => {
                    &mut others
                }
                _ => continue,
            };
            match std::str::from_utf8(self.str_at(r.name_off)) {
                Ok(name) if !name.is_empty() => {
                    map.entry(name.to_string()).or_insert(id);
                }
                _ => {}
            }
        }
        self.aggregates = aggregates;
        self.others = others;
    }

    /// Number of types (ids 1..=type_count; 0 is void).
    pub fn type_count(&self) -> usize {
        self.records.len()
    }

    /// The NUL-terminated string at `off` (empty if out of bounds).
    fn str_at(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// Name of type `id` (empty for anonymous types), if it exists and is UTF-8.
    pub fn name_of(&self, id: u32) -> Option<&str> {
        let r = self.record(id)?;
        std::str::from_utf8(self.str_at(r.name_off)).ok()
    }

    /// The record of type `id` (None for void and ids past the end).
    fn record(&self, id: u32) -> Option<Record<'_>> {
        let start = *self.records.get((id as usize).checked_sub(1)?)? as usize;
        let name_off = le32(&self.types, start)?;
        let info = le32(&self.types, start + 4)?;
        let size_type = le32(&self.types, start + 8)?;
        let kind = ((info >> 24) & 0x1f) as u8;
        let vlen = (info & 0xffff) as u16;
        let body = start + RECORD_LEN;
        let trailer = self
            .types
            .get(body..body.checked_add(trailer_len(kind, vlen)?)?)?;
        Some(Record {
            name_off,
            kind,
            kind_flag: info & (1 << 31) != 0,
            size_type,
            trailer,
        })
    }

    fn record_or_err(&self, id: u32) -> Result<Record<'_>, BtfError> {
        self.record(id).ok_or(BtfError::BadTypeId(id))
    }

    /// Id of the type called `name`: a struct or union if there is one, else a typedef,
    /// enum, int, float or forward declaration.
    pub fn type_by_name(&self, name: &str) -> Option<u32> {
        self.aggregates
            .get(name)
            .or_else(|| self.others.get(name))
            .copied()
    }

    fn lookup(&self, name: &str) -> Result<u32, BtfError> {
        self.type_by_name(name)
            .ok_or_else(|| BtfError::NoType(name.to_string()))
    }

    /// Follows typedefs and qualifiers (const, volatile, restrict, type tags).
    fn strip(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_DEPTH {
            if id == 0 {
                return Ok(0);
            }
            let r = self.record_or_err(id)?;
            match r.kind {
                KIND_TYPEDEF | KIND_CONST | KIND_VOLATILE | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = r.size_type
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::TooDeep(id))
    }

    /// The members of struct/union `id`, or None if it is not one.
    fn members(&self, id: u32) -> Option<impl Iterator<Item = Member> + '_> {
        let r = self.record(id)?;
        if r.kind != KIND_STRUCT && r.kind != KIND_UNION {
            return None;
        }
        let kind_flag = r.kind_flag;
        Some(r.trailer.chunks_exact(12).map(move |m| {
            let offset = le32(m, 8).unwrap_or(0);
            Member {
                name_off: le32(m, 0).unwrap_or(0),
                type_id: le32(m, 4).unwrap_or(0),
                // With kind_flag, bits 24..31 are the bitfield size.
                bit_offset: u64::from(if kind_flag {
                    offset & 0x00ff_ffff
                } else {
                    offset
                }),
            }
        }))
    }

    fn is_composite(&self, id: u32) -> bool {
        self.record(id)
            .is_some_and(|r| r.kind == KIND_STRUCT || r.kind == KIND_UNION)
    }

    /// Finds member `name` of struct/union `id`, looking inside anonymous members.
    /// Returns its bit offset from the start of `id` and its type. Each anonymous type is
    /// searched at most once per name (`search.seen`), so self-containing or shared
    /// anonymous types cannot make the search fan out.
    fn find_member(
        &self,
        id: u32,
        name: &[u8],
        depth: u32,
        search: &mut Search,
    ) -> Result<Option<(u64, u32)>, BtfError> {
        if depth >= MAX_DEPTH {
            return Err(BtfError::TooDeep(id));
        }
        if !search.seen.insert(id) {
            return Ok(None);
        }
        let Some(members) = self.members(id) else {
            return Ok(None);
        };
        for m in members {
            search.budget = search.budget.checked_sub(1).ok_or(BtfError::TooComplex)?;
            let mname = self.str_at(m.name_off);
            if mname == name {
                return Ok(Some((m.bit_offset, m.type_id)));
            }
            if mname.is_empty() {
                let inner = self.strip(m.type_id)?;
                if self.is_composite(inner) {
                    if let Some((off, ty)) = self.find_member(inner, name, depth + 1, search)? {
                        return Ok(Some((m.bit_offset.saturating_add(off), ty)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Resolves a dotted member path from type `type_name`: its bit offset and type id.
    fn resolve_path(&self, type_name: &str, path: &str) -> Result<(u64, u32), BtfError> {
        let mut cur = self.lookup(type_name)?;
        let mut bits = 0u64;
        let mut search = Search {
            budget: MAX_STEPS,
            seen: HashSet::new(),
        };
        for component in path.split('.') {
            if component.is_empty() {
                return Err(BtfError::BadPath(path.to_string()));
            }
            let composite = self.strip(cur)?;
            if !self.is_composite(composite) {
                return Err(BtfError::NotComposite {
                    id: composite,
                    member: component.to_string(),
                });
            }
            let (off, ty) = self
                .find_member(composite, component.as_bytes(), 0, &mut search)?
                .ok_or_else(|| BtfError::NoMember {
                    ty: match self.name_of(composite) {
                        Some(n) if !n.is_empty() => n.to_string(),
                        _ => format!("{type_name} (type {composite})"),
                    },
                    member: component.to_string(),
                })?;
            bits = bits.saturating_add(off);
            cur = ty;
            search.seen.clear();
        }
        Ok((bits, cur))
    }

    /// Byte offset of a dotted member path such as `thread.sp` in `type_name`. Anonymous
    /// structs and unions are transparent; a bitfield gives the byte holding its first bit.
    pub fn member_offset(&self, type_name: &str, path: &str) -> Result<u64, BtfError> {
        Ok(self.resolve_path(type_name, path)?.0 / 8)
    }

    /// Size in bytes of the type of a member path (a bitfield gives its underlying type's).
    pub fn member_size(&self, type_name: &str, path: &str) -> Result<u64, BtfError> {
        let (_, ty) = self.resolve_path(type_name, path)?;
        self.size_of(ty)
    }

    /// Size in bytes of the type called `type_name`.
    pub fn type_size(&self, type_name: &str) -> Result<u64, BtfError> {
        self.size_of(self.lookup(type_name)?)
    }

    /// Size in bytes of type `id`: arrays are nelems × element, pointers 8.
    pub fn size_of(&self, mut id: u32) -> Result<u64, BtfError> {
        let mut count = 1u64;
        for _ in 0..MAX_DEPTH {
            let r = self.record(id).ok_or(if id == 0 {
                BtfError::NoSize(0)
            } else {
                BtfError::BadTypeId(id)
            })?;
            let size = match r.kind {
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT
                | KIND_DATASEC => u64::from(r.size_type),
                KIND_PTR => 8,
                KIND_ARRAY => {
                    let elem = le32(r.trailer, 0).ok_or(BtfError::BadTypeId(id))?;
                    let nelems = le32(r.trailer, 8).ok_or(BtfError::BadTypeId(id))?;
                    count = count
                        .checked_mul(u64::from(nelems))
                        .ok_or(BtfError::Overflow(id))?;
                    id = elem;
                    continue;
                }
                KIND_TYPEDEF | KIND_CONST | KIND_VOLATILE | KIND_RESTRICT | KIND_TYPE_TAG
                | KIND_VAR => {
                    id = r.size_type;
                    continue;
                }
                _ => return Err(BtfError::NoSize(id)),
            };
            return count.checked_mul(size).ok_or(BtfError::Overflow(id));
        }
        Err(BtfError::TooDeep(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Assembles little BTF blobs.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        count: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                count: 0,
            }
        }

        fn name(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn raw(
            &mut self,
            name: &str,
            kind: u8,
            kflag: bool,
            vlen: u16,
            st: u32,
            tail: &[u32],
        ) -> u32 {
            let name_off = self.name(name);
            let info = (u32::from(kind) << 24) | u32::from(vlen) | if kflag { 1 << 31 } else { 0 };
            for w in [name_off, info, st].iter().chain(tail) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.count += 1;
            self.count
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.raw(name, KIND_INT, false, 0, size, &[size * 8])
        }
        fn ptr(&mut self, to: u32) -> u32 {
            self.raw("", KIND_PTR, false, 0, to, &[])
        }
        fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.raw(name, KIND_TYPEDEF, false, 0, to, &[])
        }
        fn modifier(&mut self, kind: u8, to: u32) -> u32 {
            self.raw("", kind, false, 0, to, &[])
        }
        fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            self.raw("", KIND_ARRAY, false, 0, 0, &[elem, index, n])
        }
        /// Members are (name, type, offset word) — bits, or bitfield-encoded with `kflag`.
        fn aggregate(
            &mut self,
            kind: u8,
            name: &str,
            size: u32,
            kflag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut tail = Vec::new();
            for &(n, t, off) in members {
                tail.extend([self.name(n), t, off]);
            }
            self.raw(name, kind, kflag, members.len() as u16, size, &tail)
        }
        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.aggregate(KIND_STRUCT, name, size, false, members)
        }

        fn build(&self) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend_from_slice(&MAGIC.to_le_bytes());
            b.extend_from_slice(&[1, 0]);
            let tl = self.types.len() as u32;
            for w in [24u32, 0, tl, tl, self.strings.len() as u32] {
                b.extend_from_slice(&w.to_le_bytes());
            }
            b.extend_from_slice(&self.types);
            b.extend_from_slice(&self.strings);
            b
        }
    }

    /// A cut-down task_struct with the 6.1.187 offsets of §3.3.
    fn task_btf() -> (Vec<u8>, u32) {
        let mut b = Builder::new();
        let u32_t = b.int("unsigned int", 4);
        let u64_t = b.int("long unsigned int", 8);
        let ti = b.strukt(
            "thread_info",
            24,
            &[
                ("flags", u64_t, 0),
                ("syscall_work", u64_t, 64),
                ("status", u32_t, 128),
                ("cpu", u32_t, 160),
            ],
        );
        let ts = b.strukt(
            "thread_struct",
            4096,
            &[("es", u64_t, 0), ("sp", u64_t, 24 * 8)],
        );
        let void_p = b.ptr(0);
        let char_t = b.int("char", 1);
        let comm = b.array(char_t, u32_t, 16);
        let task = b.strukt(
            "task_struct",
            9728,
            &[
                ("thread_info", ti, 0),
                ("__state", u32_t, 24 * 8),
                ("stack", void_p, 32 * 8),
                ("comm", comm, 2976 * 8),
                ("thread", ts, 5312 * 8),
            ],
        );
        (b.build(), task)
    }

    #[test]
    fn nested_paths_sizes_and_names() {
        let (blob, task) = task_btf();
        let btf = Btf::parse(&blob).unwrap();
        assert_eq!(btf.type_count(), task as usize);
        assert_eq!(btf.type_by_name("task_struct"), Some(task));
        assert_eq!(btf.name_of(task), Some("task_struct"));
        assert_eq!(btf.member_offset("task_struct", "thread.sp"), Ok(5336));
        assert_eq!(btf.member_offset("task_struct", "thread_info.cpu"), Ok(20));
        assert_eq!(btf.member_offset("task_struct", "__state"), Ok(24));
        assert_eq!(btf.member_size("task_struct", "thread_info"), Ok(24));
        assert_eq!(btf.member_size("task_struct", "stack"), Ok(8));
        assert_eq!(btf.member_size("task_struct", "comm"), Ok(16));
        assert_eq!(btf.type_size("task_struct"), Ok(9728));
        assert_eq!(btf.type_size("unsigned int"), Ok(4));
        assert_eq!(
            btf.member_offset("task_struct", "thread.nope"),
            Err(BtfError::NoMember {
                ty: "thread_struct".into(),
                member: "nope".into()
            })
        );
        assert!(matches!(
            btf.member_offset("task_struct", "stack.x"),
            Err(BtfError::NotComposite { .. })
        ));
        assert_eq!(
            btf.member_offset("nothing", "x"),
            Err(BtfError::NoType("nothing".into()))
        );
        for bad in ["", "thread.", ".sp", "thread..sp"] {
            assert_eq!(
                btf.member_offset("task_struct", bad),
                Err(BtfError::BadPath(bad.into()))
            );
        }
    }

    #[test]
    fn anonymous_members_are_transparent() {
        let mut b = Builder::new();
        let u32_t = b.int("u32", 4);
        let u64_t = b.int("u64", 8);
        let inner = b.strukt("", 8, &[("lo", u32_t, 0), ("hi", u32_t, 32)]);
        let un = b.aggregate(
            KIND_UNION,
            "",
            8,
            false,
            &[("whole", u64_t, 0), ("", inner, 0)],
        );
        let named = b.strukt("pair", 8, &[("a", u32_t, 0), ("b", u32_t, 32)]);
        b.strukt(
            "outer",
            32,
            &[("first", u64_t, 0), ("", un, 64), ("p", named, 128)],
        );
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.member_offset("outer", "whole"), Ok(8));
        assert_eq!(btf.member_offset("outer", "hi"), Ok(12));
        assert_eq!(btf.member_size("outer", "hi"), Ok(4));
        assert_eq!(btf.member_offset("outer", "p.b"), Ok(20));
        // Named members are not searched implicitly.
        assert!(btf.member_offset("outer", "b").is_err());
    }

    #[test]
    fn typedef_and_qualifier_chain() {
        let mut b = Builder::new();
        let u64_t = b.int("u64", 8);
        let s = b.strukt("inner_s", 16, &[("x", u64_t, 0), ("y", u64_t, 64)]);
        let tag = b.raw("user", KIND_TYPE_TAG, false, 0, s, &[]);
        let r = b.modifier(KIND_RESTRICT, tag);
        let v = b.modifier(KIND_VOLATILE, r);
        let c = b.modifier(KIND_CONST, v);
        let t1 = b.typedef("inner_t", c);
        let t2 = b.typedef("alias_t", t1);
        b.strukt("holder", 24, &[("pad", u64_t, 0), ("in", t2, 64)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.type_by_name("alias_t"), Some(t2));
        assert_eq!(btf.member_offset("alias_t", "y"), Ok(8));
        assert_eq!(btf.type_size("alias_t"), Ok(16));
        assert_eq!(btf.member_offset("holder", "in.y"), Ok(16));
        assert_eq!(btf.member_size("holder", "in"), Ok(16));
    }

    #[test]
    fn struct_names_win_over_typedefs() {
        let mut b = Builder::new();
        let u64_t = b.int("u64", 8);
        let fwd = b.raw("foo", KIND_FWD, false, 0, 0, &[]);
        b.typedef("foo", fwd);
        let s = b.strukt("foo", 8, &[("v", u64_t, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.type_by_name("foo"), Some(s));
        assert_eq!(btf.member_offset("foo", "v"), Ok(0));
    }

    #[test]
    fn bitfields_with_kind_flag() {
        let mut b = Builder::new();
        let u32_t = b.int("u32", 4);
        let u64_t = b.int("u64", 8);
        // struct { u32 a:3; u32 b:5; u32 c:30 /* at bit 35 */; u64 d; }
        b.aggregate(
            KIND_STRUCT,
            "bits",
            16,
            true,
            &[
                ("a", u32_t, 3 << 24),
                ("b", u32_t, (5 << 24) | 3),
                ("c", u32_t, (30 << 24) | 35),
                ("d", u64_t, 64),
            ],
        );
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.member_offset("bits", "a"), Ok(0));
        assert_eq!(btf.member_offset("bits", "b"), Ok(0));
        assert_eq!(btf.member_offset("bits", "c"), Ok(4));
        assert_eq!(btf.member_offset("bits", "d"), Ok(8));
        assert_eq!(btf.member_size("bits", "c"), Ok(4));
    }

    #[test]
    fn array_sizes() {
        let mut b = Builder::new();
        let u32_t = b.int("u32", 4);
        let u64_t = b.int("u64", 8);
        let a16 = b.array(u64_t, u32_t, 16);
        let row = b.array(u32_t, u32_t, 3);
        let grid = b.array(row, u32_t, 4);
        let p = b.ptr(grid);
        let ptrs = b.array(p, u32_t, 2);
        let big = b.array(u64_t, u32_t, u32::MAX);
        let huge = b.array(big, u32_t, u32::MAX);
        let overflow = b.array(huge, u32_t, u32::MAX);
        b.strukt(
            "arrays",
            0,
            &[
                ("a", a16, 0),
                ("g", grid, 1024),
                ("p", ptrs, 1408),
                ("o", overflow, 1536),
            ],
        );
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.member_size("arrays", "a"), Ok(128));
        assert_eq!(btf.member_size("arrays", "g"), Ok(48));
        assert_eq!(btf.member_size("arrays", "p"), Ok(16));
        assert_eq!(btf.member_offset("arrays", "p"), Ok(176));
        assert_eq!(btf.size_of(big), Ok(u64::from(u32::MAX) * 8));
        assert!(matches!(
            btf.member_size("arrays", "o"),
            Err(BtfError::Overflow(_))
        ));
    }

    #[test]
    fn every_kind_keeps_ids_aligned() {
        let mut b = Builder::new();
        // Comments: type id, then kind code where it differs.
        let int = b.int("int", 4); // 1 INT
        let p = b.ptr(int); // 2 PTR
        b.array(int, int, 2); // 3 ARRAY
        b.strukt("s1", 4, &[("m", int, 0)]); // 4 STRUCT
        b.aggregate(KIND_UNION, "u1", 4, false, &[("m", int, 0), ("n", p, 0)]); // 5 UNION
        b.raw("e", KIND_ENUM, false, 2, 4, &[1, 0, 2, 1]); // 6 ENUM
        b.raw("f", KIND_FWD, false, 0, 0, &[]); // 7 FWD
        b.typedef("t", int); // 8 TYPEDEF
        b.modifier(KIND_VOLATILE, int); // 9 VOLATILE
        b.modifier(KIND_CONST, int); // 10 CONST
        b.modifier(KIND_RESTRICT, p); // 11 RESTRICT
        let proto = b.raw("", KIND_FUNC_PROTO, false, 3, int, &[0, int, 0, p, 0, 0]); // 12: FUNC_PROTO (13)
        b.raw("fn", KIND_FUNC, false, 0, proto, &[]); // 13: FUNC (12)
        let var = b.raw("v", KIND_VAR, false, 0, int, &[1]); // 14 VAR
        b.raw(".data", KIND_DATASEC, false, 1, 4, &[var, 0, 4]); // 15 DATASEC
        b.raw("double", KIND_FLOAT, false, 0, 8, &[]); // 16 FLOAT
        b.raw("tag", KIND_DECL_TAG, false, 0, var, &[u32::MAX]); // 17 DECL_TAG
        b.raw("tt", KIND_TYPE_TAG, false, 0, p, &[]); // 18 TYPE_TAG
        b.raw("e64", KIND_ENUM64, false, 2, 8, &[1, 0, 0, 2, 1, 1]); // 19 ENUM64
        let last = b.strukt("last", 16, &[("x", int, 0), ("y", p, 64)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(last, 20);
        assert_eq!(btf.type_count(), 20);
        assert_eq!(btf.type_by_name("last"), Some(20));
        assert_eq!(btf.member_offset("last", "y"), Ok(8));
        assert_eq!(btf.type_size("double"), Ok(8));
        assert_eq!(btf.type_size("e64"), Ok(8));
        assert_eq!(btf.size_of(var), Ok(4));
        assert_eq!(btf.type_size("f"), Err(BtfError::NoSize(7)));
        assert_eq!(btf.size_of(0), Err(BtfError::NoSize(0)));
        assert_eq!(btf.size_of(21), Err(BtfError::BadTypeId(21)));
        for kind in [0u8, 20, 31] {
            let mut b = Builder::new();
            b.int("int", 4);
            b.raw("x", kind, false, 0, 0, &[]);
            assert_eq!(
                Btf::parse(&b.build()).unwrap_err(),
                BtfError::UnknownKind { id: 2, kind }
            );
        }
    }

    #[test]
    fn header_checks() {
        let (blob, _) = task_btf();
        assert!(Btf::parse(&blob).is_ok());
        let mut bad = blob.clone();
        bad[0] = 0x9e;
        assert_eq!(Btf::parse(&bad).unwrap_err(), BtfError::BadMagic(0xeb9e));
        let mut bad = blob.clone();
        bad[2] = 2;
        assert_eq!(Btf::parse(&bad).unwrap_err(), BtfError::BadVersion(2));
        let mut bad = blob.clone();
        bad[4] = 16; // hdr_len 16
        assert!(matches!(Btf::parse(&bad), Err(BtfError::BadHeader(_))));
        let mut bad = blob.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes()); // str_len
        assert!(matches!(Btf::parse(&bad), Err(BtfError::BadHeader(_))));
        let mut bad = blob.clone();
        bad[16..20].copy_from_slice(&(u32::MAX - 3).to_le_bytes()); // str_off near 4 GiB
        assert!(matches!(Btf::parse(&bad), Err(BtfError::BadHeader(_))));
        // The string section must begin with NUL.
        let mut bad = blob.clone();
        let str_off = 24 + u32::from_le_bytes(blob[16..20].try_into().unwrap()) as usize;
        bad[str_off] = b'x';
        assert!(matches!(Btf::parse(&bad), Err(BtfError::BadHeader(_))));
        // A name offset outside the strings.
        let mut bad = blob.clone();
        bad[24..28].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert_eq!(
            Btf::parse(&bad).unwrap_err(),
            BtfError::BadName {
                id: 1,
                off: 0x10_0000
            }
        );
        assert_eq!(
            Btf::parse(&blob[..10]).unwrap_err(),
            BtfError::Truncated(10)
        );
        assert_eq!(
            Btf::parse(&vec![0u8; MAX_BTF_SIZE + 1]).unwrap_err(),
            BtfError::TooLarge(MAX_BTF_SIZE + 1)
        );
    }

    #[test]
    fn truncated_blobs_fail_cleanly() {
        let (blob, _) = task_btf();
        for len in 0..blob.len() {
            assert!(Btf::parse(&blob[..len]).is_err(), "prefix of {len} bytes");
        }
        // A type section cut mid-record (header lengths consistent with the cut).
        let mut b = Builder::new();
        b.int("int", 4);
        let mut blob = b.build();
        let tl = 14u32; // 16-byte record cut to 14
        blob[12..16].copy_from_slice(&tl.to_le_bytes());
        blob[16..20].copy_from_slice(&tl.to_le_bytes());
        blob.drain(24 + 14..24 + 16);
        assert_eq!(
            Btf::parse(&blob).unwrap_err(),
            BtfError::TruncatedType {
                id: 1,
                kind: KIND_INT,
                vlen: 0
            }
        );
    }

    #[test]
    fn huge_vlen_is_refused() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.raw("s", KIND_STRUCT, false, 0xffff, 4, &[0, int, 0]);
        assert_eq!(
            Btf::parse(&b.build()).unwrap_err(),
            BtfError::TruncatedType {
                id: 2,
                kind: KIND_STRUCT,
                vlen: 0xffff
            }
        );
    }

    #[test]
    fn cycles_end_in_errors() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        // typedef T T;
        let t = b.typedef("loop_t", 2);
        assert_eq!(t, 2);
        // A pair of const types pointing at each other.
        b.modifier(KIND_CONST, 4); // 3
        b.modifier(KIND_CONST, 3); // 4
        b.strukt("uses_pair", 8, &[("p", 3, 0)]);
        // A struct whose anonymous members are the struct itself, many times over.
        let me = b.count + 1;
        let members: Vec<(&str, u32, u32)> = (0..8).map(|_| ("", me, 0)).collect();
        let mut with_x = members.clone();
        with_x.push(("x", int, 0));
        assert_eq!(b.strukt("selfish", 4, &members), me);
        b.strukt("finds_x_late", 4, &with_x);
        // An array of itself.
        let arr = b.count + 1;
        b.array(arr, int, 2);
        b.typedef("arr_t", arr);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.member_offset("loop_t", "x"), Err(BtfError::TooDeep(2)));
        assert_eq!(btf.type_size("loop_t"), Err(BtfError::TooDeep(2)));
        assert!(matches!(
            btf.member_offset("uses_pair", "p.q"),
            Err(BtfError::TooDeep(_))
        ));
        assert!(matches!(
            btf.member_size("uses_pair", "p"),
            Err(BtfError::TooDeep(_))
        ));
        assert!(matches!(
            btf.member_offset("selfish", "x"),
            Err(BtfError::NoMember { .. })
        ));
        assert_eq!(btf.member_offset("finds_x_late", "x"), Ok(0));
        assert!(matches!(
            btf.type_size("arr_t"),
            Err(BtfError::TooDeep(_) | BtfError::Overflow(_))
        ));
    }

    #[test]
    fn anonymous_fan_out_and_depth_are_bounded() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        // 30 levels, each with 8 anonymous members of the next: 8^30 paths, 30 types.
        let first = b.count + 1;
        for level in 0..30u32 {
            let next = first + level + 1;
            let members: Vec<(&str, u32, u32)> = if level == 29 {
                vec![("y", int, 0)]
            } else {
                (0..8).map(|i| ("", next, i * 8)).collect()
            };
            b.strukt(if level == 0 { "fan" } else { "" }, 64, &members);
        }
        // 40 nested anonymous structs, x at the bottom: deeper than MAX_DEPTH.
        let top = b.count + 1;
        for level in 0..40u32 {
            let m = if level == 39 {
                ("x", int, 0)
            } else {
                ("", top + level + 1, 8)
            };
            b.strukt(if level == 0 { "deep" } else { "" }, 64, &[m]);
        }
        // Members to visit beyond the budget: anonymous structs full of anonymous ints.
        let wide = b.count + 1;
        let ints: Vec<(&str, u32, u32)> = (0..60_000).map(|_| ("", int, 0)).collect();
        for _ in 0..5 {
            b.strukt("", 4, &ints);
        }
        let outer: Vec<(&str, u32, u32)> = (0..5).map(|i| ("", wide + i, 0)).collect();
        b.strukt("wide", 4, &outer);
        let btf = Btf::parse(&b.build()).unwrap();
        let start = std::time::Instant::now();
        assert!(matches!(
            btf.member_offset("fan", "x"),
            Err(BtfError::NoMember { .. })
        ));
        assert_eq!(btf.member_offset("fan", "y"), Ok(0));
        assert!(matches!(
            btf.member_offset("deep", "x"),
            Err(BtfError::TooDeep(_))
        ));
        assert_eq!(btf.member_offset("wide", "x"), Err(BtfError::TooComplex));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn bad_member_type_ids_are_errors() {
        let mut b = Builder::new();
        b.strukt("dangling", 8, &[("m", 1000, 0), ("", 999, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.member_offset("dangling", "m"), Ok(0));
        assert_eq!(
            btf.member_size("dangling", "m"),
            Err(BtfError::BadTypeId(1000))
        );
        assert_eq!(
            btf.member_offset("dangling", "zz"),
            Err(BtfError::BadTypeId(999))
        );
        assert!(matches!(
            btf.member_offset("dangling", "m.x"),
            Err(BtfError::BadTypeId(1000))
        ));
    }
}
