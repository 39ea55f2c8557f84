//! A pure ORC unwinder for the guest's 6.1 x86_64 kernel (guest-introspection.md §4.4,
//! §5): the table decoder, the kernel's `unwind_next_frame()` rules re-expressed over a
//! [`StackReader`], and a conservative stack scan for when a trace is unreliable.
//!
//! Every byte read here comes from the guest and may be hostile: every address sum is
//! checked, every stack read must lie inside a stack the caller named, a stack kind is
//! never re-entered after the walk left it, SP must strictly increase on one stack, and
//! the walk is bounded by `max_frames`. Nothing here panics or loops forever.
//!
//! Not handled here (the caller must treat them as it sees fit):
//! - ftrace graph (`return_to_handler`) and kretprobe/rethook trampolines: the kernel
//!   recovers the real return address from per-task lists; this module reports the
//!   trampoline address as the frame's ip (it is kernel text, so the trace stays
//!   "reliable"), so a caller checking frames against functions must look for those ips;
//! - ftrace dynamic trampolines have no ORC entries: a lookup there is missing and
//!   makes the trace unreliable. Module text has its own table; the caller's
//!   [`CodeMap`] supplies it (`stacks.rs` reads it from the module, as the kernel's
//!   `orc_module_find`).

/// Most ORC entries accepted (6.1 vmlinux has about 370k).
pub const MAX_ORC_ENTRIES: usize = 4 << 20;
/// Size of one `orc_entry` in 6.1.
pub const ORC_ENTRY_SIZE: usize = 6;
/// Most bytes [`scan_stack_for`] looks at in one range.
pub const MAX_SCAN_BYTES: u64 = 64 << 10;

/// `ORC_REG_*` codes (§5.2).
pub const ORC_REG_UNDEFINED: u8 = 0;
pub const ORC_REG_PREV_SP: u8 = 1;
pub const ORC_REG_DX: u8 = 2;
pub const ORC_REG_DI: u8 = 3;
pub const ORC_REG_BP: u8 = 4;
pub const ORC_REG_SP: u8 = 5;
pub const ORC_REG_R10: u8 = 6;
pub const ORC_REG_R13: u8 = 7;
pub const ORC_REG_BP_INDIRECT: u8 = 8;
pub const ORC_REG_SP_INDIRECT: u8 = 9;

/// `UNWIND_HINT_TYPE_*` values stored in `orc_entry.type`.
pub const ORC_TYPE_CALL: u8 = 0;
pub const ORC_TYPE_REGS: u8 = 1;
pub const ORC_TYPE_REGS_PARTIAL: u8 = 2;

/// `struct pt_regs` on x86_64: size and the offsets this module reads.
const PT_REGS_SIZE: u64 = 168;
const PT_R13: u64 = 16;
const PT_BP: u64 = 32;
const PT_R10: u64 = 56;
const PT_DX: u64 = 96;
const PT_DI: u64 = 112;
const PT_IP: u64 = 128;
const PT_CS: u64 = 136;
const PT_SP: u64 = 152;
/// The iret frame (ip, cs, flags, sp, ss) is the tail of `pt_regs` from `ip` on.
const IRET_FRAME_SIZE: u64 = PT_REGS_SIZE - PT_IP;
/// `sizeof(struct inactive_task_frame)`: r15, r14, r13, r12, bx, bp, ret_addr.
const INACTIVE_FRAME_SIZE: u64 = 56;

/// Errors building an [`OrcTable`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrcError {
    #[error("ORC ip table is {0} bytes, not a multiple of 4")]
    IpTableSize(usize),
    #[error("ORC entry table is {0} bytes, not a multiple of {ORC_ENTRY_SIZE}")]
    EntryTableSize(usize),
    #[error("ORC tables disagree: {ips} ips but {entries} entries")]
    CountMismatch { ips: usize, entries: usize },
    #[error("ORC table has {0} entries (at most {MAX_ORC_ENTRIES} accepted)")]
    TooLarge(usize),
    #[error("ORC ip entry {index} at {entry_va:#x} does not give a valid address")]
    IpOverflow { index: usize, entry_va: u64 },
}

/// One decoded 6.1 `orc_entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OrcEntry {
    pub sp_offset: i16,
    pub bp_offset: i16,
    /// An `ORC_REG_*` code (4 bits).
    pub sp_reg: u8,
    /// An `ORC_REG_*` code (4 bits).
    pub bp_reg: u8,
    /// 0 CALL, 1 REGS, 2 REGS_PARTIAL (3 is invalid).
    pub kind: u8,
    pub end: bool,
}

impl OrcEntry {
    /// Decodes the 6-byte little-endian 6.1 layout (§5.2). Bits 11–15 of the flags word
    /// are unused in 6.1 and ignored.
    pub fn decode(b: [u8; ORC_ENTRY_SIZE]) -> OrcEntry {
        let flags = u16::from_le_bytes([b[4], b[5]]);
        OrcEntry {
            sp_offset: i16::from_le_bytes([b[0], b[1]]),
            bp_offset: i16::from_le_bytes([b[2], b[3]]),
            sp_reg: (flags & 0xf) as u8,
            bp_reg: ((flags >> 4) & 0xf) as u8,
            kind: ((flags >> 8) & 0x3) as u8,
            end: flags & (1 << 10) != 0,
        }
    }

    /// The inverse of [`OrcEntry::decode`] (fields are masked to their widths).
    pub fn encode(&self) -> [u8; ORC_ENTRY_SIZE] {
        let flags = u16::from(self.sp_reg & 0xf)
            | (u16::from(self.bp_reg & 0xf) << 4)
            | (u16::from(self.kind & 0x3) << 8)
            | (u16::from(self.end) << 10);
        let sp = self.sp_offset.to_le_bytes();
        let bp = self.bp_offset.to_le_bytes();
        let f = flags.to_le_bytes();
        [sp[0], sp[1], bp[0], bp[1], f[0], f[1]]
    }
}

/// The kernel's `null_orc_entry`, used for ip 0 (a call through a NULL pointer).
const NULL_ENTRY: OrcEntry = OrcEntry {
    sp_offset: 8,
    bp_offset: 0,
    sp_reg: ORC_REG_SP,
    bp_reg: ORC_REG_UNDEFINED,
    kind: ORC_TYPE_CALL,
    end: false,
};

/// The kernel's `orc_fp_entry`: a frame-pointer guess for code without ORC.
const FP_ENTRY: OrcEntry = OrcEntry {
    sp_offset: 16,
    bp_offset: -16,
    sp_reg: ORC_REG_BP,
    bp_reg: ORC_REG_PREV_SP,
    kind: ORC_TYPE_CALL,
    end: false,
};

/// The ORC tables of one object (vmlinux), with absolute ips sorted ascending.
#[derive(Debug, Clone, Default)]
pub struct OrcTable {
    ips: Vec<u64>,
    entries: Vec<OrcEntry>,
    /// The kernel's `orc_lookup` idea: for each [`LOOKUP_BLOCK`]-byte block from
    /// `ips[0]`, the number of ips before the block starts; a lookup then searches only
    /// its block's entries. Empty when the ips span too much address space.
    blocks: Vec<u32>,
}

/// Bytes of text per lookup block (the kernel's `LOOKUP_BLOCK_SIZE`).
const LOOKUP_BLOCK: u64 = 256;
/// Most lookup blocks built (4 MiB of index for 256 MiB of text).
const MAX_LOOKUP_BLOCKS: u64 = 1 << 20;

impl OrcTable {
    /// Builds the table from the raw `__start_orc_unwind_ip` bytes (s32 entries relative
    /// to their own address; `ip_table_va` is the address of the first) and the parallel
    /// `__start_orc_unwind` bytes. Out-of-order ips are sorted together with their entries
    /// (stably, so a lookup still finds the last of equal ips, as the kernel does).
    pub fn from_raw(
        ip_table_va: u64,
        ip_bytes: &[u8],
        entry_bytes: &[u8],
    ) -> Result<OrcTable, OrcError> {
        // (Not `is_multiple_of`: the workspace supports Rust 1.85.)
        let n = ip_bytes.len() / 4;
        if n * 4 != ip_bytes.len() {
            return Err(OrcError::IpTableSize(ip_bytes.len()));
        }
        let m = entry_bytes.len() / ORC_ENTRY_SIZE;
        if m * ORC_ENTRY_SIZE != entry_bytes.len() {
            return Err(OrcError::EntryTableSize(entry_bytes.len()));
        }
        if n != m {
            return Err(OrcError::CountMismatch { ips: n, entries: m });
        }
        if n > MAX_ORC_ENTRIES {
            return Err(OrcError::TooLarge(n));
        }
        let mut ips = Vec::with_capacity(n);
        for (index, chunk) in ip_bytes.chunks_exact(4).enumerate() {
            let rel = i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            // index < 4M, so index * 4 fits in u64; the sum with the table address may not.
            let entry_va = ip_table_va.checked_add(index as u64 * 4);
            let ip = entry_va.and_then(|va| va.checked_add_signed(i64::from(rel)));
            match ip {
                Some(ip) => ips.push(ip),
                None => {
                    return Err(OrcError::IpOverflow {
                        index,
                        entry_va: entry_va.unwrap_or(u64::MAX),
                    })
                }
            }
        }
        let mut entries: Vec<OrcEntry> = entry_bytes
            .chunks_exact(ORC_ENTRY_SIZE)
            .map(|c| OrcEntry::decode([c[0], c[1], c[2], c[3], c[4], c[5]]))
            .collect();
        if !ips.windows(2).all(|w| w[0] <= w[1]) {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| ips[i]);
            ips = order.iter().map(|&i| ips[i]).collect();
            entries = order.iter().map(|&i| entries[i]).collect();
        }
        let blocks = lookup_blocks(&ips);
        Ok(OrcTable {
            ips,
            entries,
            blocks,
        })
    }

    /// Builds the table from already-decoded rows (absolute ip, entry), at most
    /// [`MAX_ORC_ENTRIES`] of them; sorted stably by ip like [`OrcTable::from_raw`].
    pub fn from_rows(mut rows: Vec<(u64, OrcEntry)>) -> OrcTable {
        rows.truncate(MAX_ORC_ENTRIES);
        rows.sort_by_key(|&(ip, _)| ip);
        let (ips, entries): (Vec<u64>, Vec<OrcEntry>) = rows.into_iter().unzip();
        let blocks = lookup_blocks(&ips);
        OrcTable {
            ips,
            entries,
            blocks,
        }
    }

    /// The entry covering `ip`: the one with the greatest start address ≤ `ip` (the last
    /// of equal ones). `None` below the first entry or for an empty table.
    pub fn find(&self, ip: u64) -> Option<OrcEntry> {
        // Number of entries whose ip is <= the target; the rightmost of them covers it.
        let count = match self.block_bounds(ip) {
            Some((lo, hi)) => lo + self.ips[lo..hi].partition_point(|&start| start <= ip),
            None => self.ips.partition_point(|&start| start <= ip),
        };
        count
            .checked_sub(1)
            .and_then(|i| self.entries.get(i))
            .copied()
    }

    /// The slice of `ips` that decides a lookup of `ip`: every ip before `lo` is ≤ `ip`
    /// and every ip from `hi` on is greater.
    fn block_bounds(&self, ip: u64) -> Option<(usize, usize)> {
        let b = (ip.checked_sub(*self.ips.first()?)? / LOOKUP_BLOCK) as usize;
        let lo = *self.blocks.get(b)? as usize;
        let hi = *self.blocks.get(b + 1)? as usize;
        (lo <= hi && hi <= self.ips.len()).then_some((lo, hi))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.ips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }
}

/// `blocks[b]`: how many of the sorted `ips` lie below block `b`'s start, for every
/// block from `ips[0]` to one past the last ip's block.
fn lookup_blocks(ips: &[u64]) -> Vec<u32> {
    let (Some(&first), Some(&last)) = (ips.first(), ips.last()) else {
        return Vec::new();
    };
    let n = (last - first) / LOOKUP_BLOCK + 2;
    if n > MAX_LOOKUP_BLOCKS {
        return Vec::new();
    }
    let mut blocks = Vec::with_capacity(n as usize);
    let mut i = 0usize;
    for b in 0..n {
        let start = first + b * LOOKUP_BLOCK;
        while i < ips.len() && ips[i] < start {
            i += 1;
        }
        blocks.push(i as u32);
    }
    blocks
}

/// Where the unwinder finds code: which addresses are kernel text (the kernel's
/// `__kernel_text_address`: vmlinux text and module text) and the ORC entry covering
/// an address (the kernel's `orc_find`: vmlinux's table, or the module's own).
pub trait CodeMap {
    fn is_text(&self, ip: u64) -> bool;
    /// The ORC entry for `ip`, an address [`CodeMap::is_text`] accepted.
    fn orc(&self, ip: u64) -> Option<OrcEntry>;
}

/// One ORC table and a text predicate: vmlinux alone.
pub struct SingleTable<'a> {
    pub table: &'a OrcTable,
    pub is_text: &'a dyn Fn(u64) -> bool,
}

impl CodeMap for SingleTable<'_> {
    fn is_text(&self, ip: u64) -> bool {
        (self.is_text)(ip)
    }

    fn orc(&self, ip: u64) -> Option<OrcEntry> {
        self.table.find(ip)
    }
}

/// Reads one 8-byte little-endian word of guest virtual memory (`None` if unmapped).
pub trait StackReader {
    fn read_u64(&self, va: u64) -> Option<u64>;
}

/// Which stack a range is. Exception stacks are told apart by their IST index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StackKind {
    Task,
    Irq,
    Exception(u8),
    Entry,
}

/// A stack the unwinder may read: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackRange {
    pub kind: StackKind,
    pub start: u64,
    pub end: u64,
}

impl StackRange {
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.start && addr.checked_add(len).is_some_and(|e| e <= self.end)
    }
}

/// The registers of an interrupted vCPU that ORC may need (from KVM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FullRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub di: u64,
    pub dx: u64,
    pub r10: u64,
    pub r13: u64,
    pub cs: u64,
}

/// Where an unwind starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnwindStart {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// `ip` is an interrupted or first instruction (look it up as is), not a return
    /// address (looked up as `ip - 1`).
    pub signal: bool,
    /// A live vCPU's full register set; `None` for a sleeping task.
    pub regs: Option<FullRegs>,
}

/// The start state of a sleeping task from its saved `thread.sp` (§4.4): `thread.sp`
/// points at an `inactive_task_frame`; `None` if its words cannot be read.
pub fn start_from_inactive_frame(
    reader: &dyn StackReader,
    thread_sp: u64,
    ret_from_fork: u64,
) -> Option<UnwindStart> {
    let sp = thread_sp.checked_add(INACTIVE_FRAME_SIZE)?;
    let bp = reader.read_u64(thread_sp.checked_add(40)?)?;
    let ip = reader.read_u64(thread_sp.checked_add(48)?)?;
    Some(UnwindStart {
        ip,
        sp,
        bp,
        signal: ip == ret_from_fork,
        regs: None,
    })
}

/// How a frame was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A return address (or the start ip of a sleeping task).
    Call,
    /// Kernel-mode registers: an interrupt or exception taken in the kernel (also the
    /// start frame of a live vCPU context).
    Regs,
    /// User-mode registers at the bottom of the kernel stack: `ip`/`sp` are user-space
    /// values, not kernel addresses. Always the last frame.
    UserRegs,
}

/// One frame of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub ip: u64,
    pub sp: u64,
    pub kind: FrameKind,
}

/// The result of an unwind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// The start frame first, then each caller.
    pub frames: Vec<Frame>,
    /// The kernel's `arch_stack_walk_reliable` would accept it (§5.5): it ended at an
    /// ORC end entry or at user-mode registers, with no error on the way.
    pub reliable: bool,
    /// Why it is unreliable (the first problem met).
    pub problem: Option<String>,
    /// It ended at user-mode registers.
    pub ended_in_user: bool,
}

/// A register set the unwinder can take register values from.
#[derive(Debug, Clone, Copy)]
enum RegsSrc {
    /// From the vCPU.
    Live(FullRegs),
    /// A full `pt_regs` on a stack (checked to lie inside one when found), by address.
    Stack(u64),
    /// Only an iret frame (REGS_PARTIAL): no general registers.
    Iret,
}

impl RegsSrc {
    fn full(&self) -> bool {
        !matches!(self, RegsSrc::Iret)
    }
}

enum Step {
    /// An ORC end entry: a clean end.
    End,
    /// A new frame (of kind `UserRegs` when user-mode registers were reached).
    Frame(Frame),
}

struct Walker<'a> {
    code: &'a dyn CodeMap,
    stacks: &'a [StackRange],
    reader: &'a dyn StackReader,
    ip: u64,
    sp: u64,
    bp: u64,
    signal: bool,
    regs: Option<RegsSrc>,
    prev_regs: Option<RegsSrc>,
    /// Index into `stacks` of the stack the walk is on.
    current: Option<usize>,
    /// Stack kinds the walk has been on (a handful: a linear search beats hashing).
    visited: Vec<StackKind>,
    /// First soft error (the walk went on with a guess).
    problem: Option<String>,
}

impl Walker<'_> {
    fn current_stack(&self) -> Option<StackRange> {
        self.current.and_then(|i| self.stacks.get(i)).copied()
    }

    fn note(&mut self, problem: String) {
        if self.problem.is_none() {
            self.problem = Some(problem);
        }
    }

    /// `stack_access_ok`: `[addr, addr + len)` must lie in the current stack, or in
    /// another one whose kind the walk has not been on yet (which becomes current).
    fn access_ok(&mut self, addr: u64, len: u64) -> bool {
        if let Some(s) = self.current.and_then(|i| self.stacks.get(i)) {
            if s.contains(addr, len) {
                return true;
            }
        }
        let Some(i) = self.stacks.iter().position(|s| s.contains(addr, len)) else {
            return false;
        };
        let kind = self.stacks[i].kind;
        if self.visited.contains(&kind) {
            return false;
        }
        self.visited.push(kind);
        self.current = Some(i);
        true
    }

    fn deref(&mut self, addr: u64, what: &str) -> Result<u64, String> {
        if !self.access_ok(addr, 8) {
            return Err(format!(
                "{what} at {addr:#x} is not on an allowed stack (ip {:#x})",
                self.ip
            ));
        }
        self.reader
            .read_u64(addr)
            .ok_or_else(|| format!("{what} at {addr:#x} is unreadable (ip {:#x})", self.ip))
    }

    /// `get_reg`: from full registers, or from the previous full registers when only an
    /// iret frame is current.
    fn get_reg(&self, off: u64) -> Option<u64> {
        let regs = self.regs?;
        let src = if regs.full() { regs } else { self.prev_regs? };
        match src {
            RegsSrc::Iret => None,
            RegsSrc::Live(r) => Some(match off {
                PT_R13 => r.r13,
                PT_BP => r.bp,
                PT_R10 => r.r10,
                PT_DX => r.dx,
                PT_DI => r.di,
                PT_IP => r.ip,
                PT_CS => r.cs,
                PT_SP => r.sp,
                _ => return None,
            }),
            // The whole pt_regs was checked to be on a stack when it was found.
            RegsSrc::Stack(base) => self.reader.read_u64(base.checked_add(off)?),
        }
    }

    fn step(&mut self) -> Result<Step, String> {
        let ip = self.ip;
        let lookup = if self.signal { ip } else { ip.wrapping_sub(1) };
        let orc = if ip == 0 || lookup == 0 {
            NULL_ENTRY
        } else {
            let found = if self.code.is_text(lookup) {
                self.code.orc(lookup)
            } else {
                None
            };
            match found {
                Some(e) => e,
                None => {
                    self.note(format!(
                        "no ORC for ip {ip:#x}: guessed with frame pointers"
                    ));
                    FP_ENTRY
                }
            }
        };

        if orc.sp_reg == ORC_REG_UNDEFINED {
            return if orc.end {
                Ok(Step::End)
            } else {
                Err(format!("ORC for ip {ip:#x} is undefined (no end mark)"))
            };
        }

        let off = i64::from(orc.sp_offset);
        let overflow = || format!("stack address overflow at ip {ip:#x}");
        let reg = |w: &Self, off: u64, name: &str| {
            w.get_reg(off)
                .ok_or_else(|| format!("ORC for ip {ip:#x} needs {name}: no full registers"))
        };
        let cfa = match orc.sp_reg {
            ORC_REG_SP => self.sp.checked_add_signed(off).ok_or_else(overflow)?,
            ORC_REG_BP => self.bp.checked_add_signed(off).ok_or_else(overflow)?,
            ORC_REG_SP_INDIRECT => self
                .deref(self.sp, "indirect stack pointer")?
                .checked_add_signed(off)
                .ok_or_else(overflow)?,
            ORC_REG_BP_INDIRECT => {
                let at = self.bp.checked_add_signed(off).ok_or_else(overflow)?;
                self.deref(at, "indirect frame base")?
            }
            ORC_REG_R10 => reg(self, PT_R10, "R10")?,
            ORC_REG_R13 => reg(self, PT_R13, "R13")?,
            ORC_REG_DI => reg(self, PT_DI, "DI")?,
            ORC_REG_DX => reg(self, PT_DX, "DX")?,
            r => return Err(format!("ORC for ip {ip:#x} has unknown sp_reg {r}")),
        };

        let prev_sp = self.sp;
        let prev_stack = self.current_stack().map(|s| s.kind);
        let old_bp = self.bp;
        let (kind, user) = match orc.kind {
            ORC_TYPE_CALL => {
                let ret_at = cfa.checked_sub(8).ok_or_else(overflow)?;
                self.ip = self.deref(ret_at, "return address")?;
                self.sp = cfa;
                self.regs = None;
                self.prev_regs = None;
                self.signal = false;
                (FrameKind::Call, false)
            }
            ORC_TYPE_REGS => {
                if !self.access_ok(cfa, PT_REGS_SIZE) {
                    return Err(format!(
                        "pt_regs at {cfa:#x} is not on an allowed stack (ip {ip:#x})"
                    ));
                }
                let regs_ip = cfa.checked_add(PT_IP).ok_or_else(overflow)?;
                let (new_ip, cs, new_sp) = self.read_iret(regs_ip)?;
                self.ip = new_ip;
                self.sp = new_sp;
                self.regs = Some(RegsSrc::Stack(cfa));
                self.prev_regs = None;
                self.signal = true;
                (FrameKind::Regs, cs & 3 != 0)
            }
            ORC_TYPE_REGS_PARTIAL => {
                if !self.access_ok(cfa, IRET_FRAME_SIZE) {
                    return Err(format!(
                        "iret frame at {cfa:#x} is not on an allowed stack (ip {ip:#x})"
                    ));
                }
                let (new_ip, cs, new_sp) = self.read_iret(cfa)?;
                self.ip = new_ip;
                self.sp = new_sp;
                if let Some(r) = self.regs.filter(RegsSrc::full) {
                    self.prev_regs = Some(r);
                }
                self.regs = Some(RegsSrc::Iret);
                self.signal = true;
                (FrameKind::Regs, cs & 3 != 0)
            }
            t => return Err(format!("ORC for ip {ip:#x} has unknown type {t}")),
        };

        let bp_off = i64::from(orc.bp_offset);
        match orc.bp_reg {
            ORC_REG_UNDEFINED => {
                if let Some(v) = self.get_reg(PT_BP) {
                    self.bp = v;
                }
            }
            ORC_REG_PREV_SP => {
                let at = cfa.checked_add_signed(bp_off).ok_or_else(overflow)?;
                self.bp = self.deref(at, "saved frame pointer")?;
            }
            ORC_REG_BP => {
                let at = old_bp.checked_add_signed(bp_off).ok_or_else(overflow)?;
                self.bp = self.deref(at, "saved frame pointer")?;
            }
            r => return Err(format!("ORC for ip {ip:#x} has unknown bp_reg {r}")),
        }

        let frame = Frame {
            ip: self.ip,
            sp: self.sp,
            kind: if user { FrameKind::UserRegs } else { kind },
        };
        if user {
            return Ok(Step::Frame(frame));
        }

        // Stop loops on bad data: on the same stack, SP must go up.
        if let Some(s) = self.current_stack() {
            if Some(s.kind) == prev_stack && s.contains(self.sp, 8) && self.sp <= prev_sp {
                return Err(format!(
                    "stack going the wrong way at ip {ip:#x}: sp {prev_sp:#x} -> {:#x}",
                    self.sp
                ));
            }
        }
        Ok(Step::Frame(frame))
    }

    /// Reads ip, cs and sp of an iret frame starting at `at` (the caller checked that
    /// the frame lies on a stack, so `at + 24` does not overflow).
    fn read_iret(&self, at: u64) -> Result<(u64, u64, u64), String> {
        let word = |off: u64| {
            at.checked_add(off)
                .and_then(|a| self.reader.read_u64(a))
                .ok_or_else(|| format!("registers at {at:#x} are unreadable (ip {:#x})", self.ip))
        };
        Ok((word(0)?, word(PT_CS - PT_IP)?, word(PT_SP - PT_IP)?))
    }
}

fn failed(frames: Vec<Frame>, problem: String) -> Trace {
    Trace {
        frames,
        reliable: false,
        problem: Some(problem),
        ended_in_user: false,
    }
}

/// Unwinds from `start` with the kernel's ORC rules (§5.3), reading only inside `stacks`.
/// The first frame is the start ip; at most `max_frames` frames are returned. A trace
/// that did not end at an ORC end entry or at user-mode registers, or met any error
/// (including a frame whose ip is not text by `code`), is unreliable.
pub fn unwind(
    code: &dyn CodeMap,
    start: &UnwindStart,
    stacks: &[StackRange],
    reader: &dyn StackReader,
    max_frames: usize,
) -> Trace {
    if max_frames == 0 {
        return failed(Vec::new(), "no frames allowed (max_frames is 0)".into());
    }
    // A vCPU in user mode has no live kernel frames.
    if let Some(r) = start.regs.filter(|r| r.cs & 3 != 0) {
        return Trace {
            frames: vec![Frame {
                ip: r.ip,
                sp: r.sp,
                kind: FrameKind::UserRegs,
            }],
            reliable: true,
            problem: None,
            ended_in_user: true,
        };
    }
    let first = Frame {
        ip: start.ip,
        sp: start.sp,
        kind: if start.regs.is_some() {
            FrameKind::Regs
        } else {
            FrameKind::Call
        },
    };
    // Most kernel traces have fewer than 16 frames: one allocation for them.
    let mut frames = Vec::with_capacity(16.min(max_frames));
    frames.push(first);
    let Some(current) = stacks.iter().position(|s| s.contains(start.sp, 1)) else {
        return failed(
            frames,
            format!("start sp {:#x} is on none of the given stacks", start.sp),
        );
    };
    let mut w = Walker {
        code,
        stacks,
        reader,
        ip: start.ip,
        sp: start.sp,
        bp: start.bp,
        signal: start.signal,
        regs: start.regs.map(RegsSrc::Live),
        prev_regs: None,
        current: Some(current),
        visited: vec![stacks[current].kind],
        problem: None,
    };
    if !code.is_text(start.ip) {
        w.note(format!("start ip {:#x} is not kernel text", start.ip));
    }
    let mut ended_in_user = false;
    let mut finished = false;
    loop {
        match w.step() {
            Ok(Step::End) => {
                finished = true;
                break;
            }
            Ok(Step::Frame(f)) => {
                if frames.len() >= max_frames {
                    w.note(format!("more than {max_frames} frames"));
                    break;
                }
                frames.push(f);
                if f.kind == FrameKind::UserRegs {
                    ended_in_user = true;
                    finished = true;
                    break;
                }
                if !code.is_text(f.ip) {
                    w.note(format!(
                        "return address {:#x} (at sp {:#x}) is not kernel text",
                        f.ip, f.sp
                    ));
                }
            }
            Err(e) => {
                w.note(e);
                break;
            }
        }
    }
    let problem = w.problem;
    Trace {
        frames,
        reliable: finished && problem.is_none(),
        problem: if finished || problem.is_some() {
            problem
        } else {
            Some("the walk did not reach the end of the stack".into())
        },
        ended_in_user,
    }
}

/// Conservative scan: every aligned 8-byte word from `from_sp` (clamped into `range`)
/// to `range.end` whose value lies in any `[start, end)` of `targets`, as (slot address,
/// value). Unreadable words are skipped; at most [`MAX_SCAN_BYTES`] are looked at.
pub fn scan_stack_for(
    reader: &dyn StackReader,
    range: &StackRange,
    from_sp: u64,
    targets: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let Some(first) = from_sp.max(range.start).checked_next_multiple_of(8) else {
        return out;
    };
    let limit = range
        .end
        .min(first.saturating_add(MAX_SCAN_BYTES))
        .saturating_sub(7);
    let mut slot = first;
    while slot < limit {
        if let Some(v) = reader.read_u64(slot) {
            if targets.iter().any(|&(s, e)| s <= v && v < e) {
                out.push((slot, v));
            }
        }
        slot += 8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const T: u64 = 0xffff_ffff_8100_0000; // text
    const T_END: u64 = T + 0x10_0000;
    const S: u64 = 0xffff_c900_0001_0000; // task stack
    const I: u64 = 0xffff_c900_0020_0000; // IRQ stack
    const F0: u64 = T + 0x100; // call, frame 16
    const F1: u64 = T + 0x200; // call, frame 8
    const F2: u64 = T + 0x300; // end of stack (ret_from_fork-like)
    const SYS: u64 = T + 0x500; // sp points at pt_regs (REGS)
    const SWITCH: u64 = T + 0x600; // SP_INDIRECT + 16
    const FP: u64 = T + 0x700; // frame-pointer style (BP + 16, bp at PREV_SP - 16)
    const R10F: u64 = T + 0x800; // CFA in R10
    const BACK: u64 = T + 0x900; // CFA below SP: bad data
    const IRET: u64 = T + 0xa00; // sp points at an iret frame
    const TERM: u64 = T + 0xb00; // section terminator

    struct Mem(HashMap<u64, u64>);
    impl StackReader for Mem {
        fn read_u64(&self, va: u64) -> Option<u64> {
            self.0.get(&va).copied()
        }
    }
    fn mem(words: &[(u64, u64)]) -> Mem {
        Mem(words.iter().copied().collect())
    }

    fn e(sp_reg: u8, sp_offset: i16, kind: u8) -> OrcEntry {
        OrcEntry {
            sp_offset,
            bp_offset: 0,
            sp_reg,
            bp_reg: ORC_REG_UNDEFINED,
            kind,
            end: false,
        }
    }

    /// Builds through `from_raw`, so the relative-ip encoding is exercised too.
    fn build(rows: &[(u64, OrcEntry)]) -> OrcTable {
        let va = T + 0x80_0000;
        let mut ips = Vec::new();
        let mut ents = Vec::new();
        for (i, (ip, entry)) in rows.iter().enumerate() {
            let rel = ip.wrapping_sub(va + 4 * i as u64) as i64;
            ips.extend_from_slice(&(rel as i32).to_le_bytes());
            ents.extend_from_slice(&entry.encode());
        }
        OrcTable::from_raw(va, &ips, &ents).unwrap()
    }

    fn table() -> OrcTable {
        let end = OrcEntry {
            end: true,
            ..OrcEntry::default()
        };
        let fp = OrcEntry {
            bp_reg: ORC_REG_PREV_SP,
            bp_offset: -16,
            ..e(ORC_REG_BP, 16, ORC_TYPE_CALL)
        };
        build(&[
            (F0, e(ORC_REG_SP, 16, ORC_TYPE_CALL)),
            (F1, e(ORC_REG_SP, 8, ORC_TYPE_CALL)),
            (F2, end),
            (SYS, e(ORC_REG_SP, 0, ORC_TYPE_REGS)),
            (SWITCH, e(ORC_REG_SP_INDIRECT, 16, ORC_TYPE_CALL)),
            (FP, fp),
            (R10F, e(ORC_REG_R10, 0, ORC_TYPE_CALL)),
            (BACK, e(ORC_REG_SP, -16, ORC_TYPE_CALL)),
            (IRET, e(ORC_REG_SP, 0, ORC_TYPE_REGS_PARTIAL)),
            (TERM, OrcEntry::default()),
        ])
    }

    fn task() -> StackRange {
        StackRange {
            kind: StackKind::Task,
            start: S,
            end: S + 0x4000,
        }
    }
    fn irq() -> StackRange {
        StackRange {
            kind: StackKind::Irq,
            start: I,
            end: I + 0x4000,
        }
    }
    fn text(a: u64) -> bool {
        (T..T_END).contains(&a)
    }
    fn sleeping(ip: u64, sp: u64, bp: u64) -> UnwindStart {
        UnwindStart {
            ip,
            sp,
            bp,
            signal: false,
            regs: None,
        }
    }
    fn run(start: &UnwindStart, stacks: &[StackRange], m: &Mem) -> Trace {
        let t = table();
        unwind(
            &SingleTable {
                table: &t,
                is_text: &text,
            },
            start,
            stacks,
            m,
            64,
        )
    }
    fn ips(t: &Trace) -> Vec<u64> {
        t.frames.iter().map(|f| f.ip).collect()
    }
    fn kernel_regs() -> FullRegs {
        FullRegs {
            cs: 0x10,
            ..FullRegs::default()
        }
    }

    #[test]
    fn entry_layout() {
        let call = OrcEntry::decode([8, 0, 0xf0, 0xff, 0x05, 0x00]);
        assert_eq!(call, {
            let mut c = e(ORC_REG_SP, 8, ORC_TYPE_CALL);
            c.bp_offset = -16;
            c
        });
        let end = OrcEntry::decode([0, 0, 0, 0, 0x00, 0x04]);
        assert!(end.end && end.sp_reg == ORC_REG_UNDEFINED);
        let regs = OrcEntry::decode([0, 0, 0, 0, 0x15, 0x02]);
        assert_eq!((regs.sp_reg, regs.bp_reg, regs.kind), (5, 1, 2));
        for b in [[1, 2, 3, 4, 0x97, 0x06], [0xff; 6]] {
            let mut masked = b;
            masked[5] &= 0x07;
            assert_eq!(OrcEntry::decode(b).encode(), masked);
        }
    }

    #[test]
    fn three_call_frames_end_at_end_entry() {
        let m = mem(&[(S + 0x3008, F1 + 0x50), (S + 0x3010, F2 + 0x50)]);
        let t = run(&sleeping(F0 + 0x50, S + 0x3000, 0), &[task()], &m);
        assert_eq!(ips(&t), [F0 + 0x50, F1 + 0x50, F2 + 0x50]);
        assert_eq!(t.frames[2].sp, S + 0x3018);
        assert!(t.frames.iter().all(|f| f.kind == FrameKind::Call));
        assert!(t.reliable, "{:?}", t.problem);
        assert!(!t.ended_in_user && t.problem.is_none());
    }

    fn pt_regs(base: u64, ip: u64, cs: u64, sp: u64) -> Vec<(u64, u64)> {
        vec![
            (base + PT_IP, ip),
            (base + PT_CS, cs),
            (base + PT_SP, sp),
            (base + PT_BP, 0x1234),
        ]
    }

    #[test]
    fn user_regs_end_the_walk() {
        let mut w = vec![(S + 0x3008, SYS + 0x50)];
        w.extend(pt_regs(S + 0x3010, 0x40_1000, 0x33, 0x7ffc_0000));
        let t = run(&sleeping(F0 + 0x50, S + 0x3000, 0), &[task()], &mem(&w));
        assert_eq!(ips(&t), [F0 + 0x50, SYS + 0x50, 0x40_1000]);
        assert_eq!(t.frames[2].kind, FrameKind::UserRegs);
        assert_eq!(t.frames[2].sp, 0x7ffc_0000);
        assert!(t.reliable && t.ended_in_user, "{:?}", t.problem);
    }

    #[test]
    fn kernel_regs_midway_are_reliable() {
        let mut w = vec![(S + 0x3008, SYS + 0x50), (S + 0x3108, F2 + 0x10)];
        w.extend(pt_regs(S + 0x3010, F0 + 0x60, 0x10, S + 0x3100));
        let t = run(&sleeping(F0 + 0x50, S + 0x3000, 0), &[task()], &mem(&w));
        assert_eq!(ips(&t), [F0 + 0x50, SYS + 0x50, F0 + 0x60, F2 + 0x10]);
        assert_eq!(t.frames[2].kind, FrameKind::Regs);
        assert!(t.reliable && !t.ended_in_user, "{:?}", t.problem);
    }

    #[test]
    fn iret_frame_with_user_cs_ends_the_walk() {
        let w = [
            (S + 0x3008, IRET + 0x8),
            (S + 0x3010, 0x40_2000),
            (S + 0x3018, 0x2b),
            (S + 0x3028, 0x7ffd_0000),
        ];
        let t = run(&sleeping(F0 + 0x50, S + 0x3000, 0), &[task()], &mem(&w));
        assert_eq!(ips(&t), [F0 + 0x50, IRET + 0x8, 0x40_2000]);
        assert!(t.reliable && t.ended_in_user, "{:?}", t.problem);
    }

    #[test]
    fn irq_stack_to_task_stack_via_sp_indirect() {
        let m = mem(&[
            (I + 0x3f08, SWITCH + 0x20),
            (I + 0x3f10, S + 0x3000), // the interrupted task-stack sp
            (S + 0x3008, F2 + 0x8),
        ]);
        let start = UnwindStart {
            ip: F0 + 0x40,
            sp: I + 0x3f00,
            bp: 0,
            signal: true,
            regs: Some(kernel_regs()),
        };
        let t = run(&start, &[task(), irq()], &m);
        assert_eq!(ips(&t), [F0 + 0x40, SWITCH + 0x20, F2 + 0x8]);
        assert_eq!(t.frames[0].kind, FrameKind::Regs);
        assert_eq!(t.frames[2].sp, S + 0x3010);
        assert!(t.reliable, "{:?}", t.problem);
        // Without the IRQ stack among the allowed ones, nothing can be read.
        let t = run(&start, &[task()], &m);
        assert!(!t.reliable && t.frames.len() == 1);
    }

    #[test]
    fn missing_orc_guesses_with_frame_pointer() {
        let bp = S + 0x3020;
        let m = mem(&[(bp, 0), (bp + 8, F2 + 0x10)]);
        // Below the first entry: text, but no ORC.
        let t = run(&sleeping(T + 0x10, S + 0x3000, bp), &[task()], &m);
        assert_eq!(ips(&t), [T + 0x10, F2 + 0x10]);
        assert!(!t.reliable);
        assert!(t.problem.unwrap().contains("no ORC"));
    }

    /// vmlinux plus one module with its own table, as `stacks.rs` composes them.
    struct WithModule {
        core: OrcTable,
        module: OrcTable,
    }
    const MODULE: u64 = 0xffff_ffff_c000_0000;
    impl CodeMap for WithModule {
        fn is_text(&self, ip: u64) -> bool {
            text(ip) || (MODULE..MODULE + 0x1000).contains(&ip)
        }
        fn orc(&self, ip: u64) -> Option<OrcEntry> {
            if text(ip) {
                self.core.find(ip)
            } else {
                self.module.find(ip)
            }
        }
    }

    #[test]
    fn module_frames_unwind_with_the_module_table() {
        // F0 returns into module code (frame 8 by the module's table), which returns to F2.
        let m = mem(&[(S + 0x3008, MODULE + 0x150), (S + 0x3010, F2 + 0x50)]);
        let start = sleeping(F0 + 0x50, S + 0x3000, 0);
        let module = build(&[
            (MODULE + 0x100, e(ORC_REG_SP, 8, ORC_TYPE_CALL)),
            (MODULE + 0x200, OrcEntry::default()),
        ]);
        let code = WithModule {
            core: table(),
            module,
        };
        let t = unwind(&code, &start, &[task()], &m, 64);
        assert_eq!(ips(&t), [F0 + 0x50, MODULE + 0x150, F2 + 0x50]);
        assert!(t.reliable, "{:?}", t.problem);
        // vmlinux's table alone does not know the module: not text, unreliable.
        let t = run(&start, &[task()], &m);
        assert!(!t.reliable);
        assert!(t.problem.unwrap().contains("not kernel text"));
    }

    #[test]
    fn return_address_outside_text_is_unreliable() {
        let m = mem(&[(S + 0x3008, 0xdead_0000)]);
        let t = run(&sleeping(F0 + 0x50, S + 0x3000, 0), &[task()], &m);
        assert_eq!(ips(&t)[..2], [F0 + 0x50, 0xdead_0000]);
        assert!(!t.reliable);
        assert!(t.problem.unwrap().contains("not kernel text"));
    }

    #[test]
    fn sp_going_backwards_stops() {
        let m = mem(&[(S + 0x2fe8, BACK + 0x8)]);
        let t = run(&sleeping(BACK + 0x8, S + 0x3000, 0), &[task()], &m);
        assert_eq!(t.frames.len(), 1);
        assert!(!t.reliable);
        assert!(t.problem.unwrap().contains("wrong way"));
    }

    #[test]
    fn self_referencing_frame_terminates() {
        let bp = S + 0x3000;
        // Saved bp points to itself and the return address leads back into the same code.
        let m = mem(&[(bp, bp), (bp + 8, FP + 0x10)]);
        let t = run(&sleeping(FP + 0x10, S + 0x2ff0, bp), &[task()], &m);
        assert!(!t.reliable);
        assert!(t.frames.len() <= 3, "{:?}", t.frames);
    }

    #[test]
    fn frame_limit_makes_it_unreliable() {
        // Every slot returns into F1, so each frame is 8 bytes higher: 2k frames.
        let words: Vec<_> = (0..0x800).map(|i| (S + 8 * i, F1 + 1)).collect();
        let m = mem(&words);
        let orc = table();
        let code = SingleTable {
            table: &orc,
            is_text: &text,
        };
        let t = unwind(&code, &sleeping(F1 + 1, S, 0), &[task()], &m, 10);
        assert_eq!(t.frames.len(), 10);
        assert!(!t.reliable);
        assert!(t.problem.unwrap().contains("more than 10"));
        let t = unwind(&code, &sleeping(F1 + 1, S, 0), &[task()], &m, 0);
        assert!(t.frames.is_empty() && !t.reliable);
    }

    #[test]
    fn revisiting_a_stack_kind_is_refused() {
        let m = mem(&[
            (S + 0x3008, SWITCH + 0x20),
            (S + 0x3010, I + 0x3f00), // task -> IRQ
            (I + 0x3f08, SWITCH + 0x20),
            (I + 0x3f10, S + 0x3100), // IRQ -> task again
            (S + 0x3108, F2 + 0x8),
        ]);
        let t = run(&sleeping(F0 + 0x50, S + 0x3000, 0), &[task(), irq()], &m);
        assert_eq!(ips(&t), [F0 + 0x50, SWITCH + 0x20, SWITCH + 0x20]);
        assert!(!t.reliable);
        assert!(t.problem.unwrap().contains("not on an allowed stack"));
    }

    #[test]
    fn register_based_cfa_needs_full_regs() {
        let m = mem(&[(S + 0x3018, F2 + 0x8)]);
        let t = run(
            &UnwindStart {
                signal: true,
                ..sleeping(R10F + 0x4, S + 0x3000, 0)
            },
            &[task()],
            &m,
        );
        assert!(!t.reliable);
        assert!(t.problem.unwrap().contains("R10"));
        let live = UnwindStart {
            ip: R10F + 0x4,
            sp: S + 0x3000,
            bp: 0,
            signal: true,
            regs: Some(FullRegs {
                r10: S + 0x3020,
                ..kernel_regs()
            }),
        };
        let t = run(&live, &[task()], &m);
        assert_eq!(ips(&t), [R10F + 0x4, F2 + 0x8]);
        assert!(t.reliable, "{:?}", t.problem);
    }

    #[test]
    fn undefined_without_end_and_bad_starts() {
        let t = run(&sleeping(TERM + 0x10, S + 0x3000, 0), &[task()], &mem(&[]));
        assert!(!t.reliable && t.problem.unwrap().contains("undefined"));
        let t = run(&sleeping(F0 + 0x50, I, 0), &[task()], &mem(&[]));
        assert!(!t.reliable && t.problem.unwrap().contains("none of the given stacks"));
        let user = UnwindStart {
            ip: 0x40_0000,
            sp: 0x7fff_0000,
            bp: 0,
            signal: true,
            regs: Some(FullRegs {
                ip: 0x40_0000,
                sp: 0x7fff_0000,
                cs: 0x33,
                ..FullRegs::default()
            }),
        };
        let t = run(&user, &[task()], &mem(&[]));
        assert!(t.reliable && t.ended_in_user && t.frames[0].kind == FrameKind::UserRegs);
    }

    #[test]
    fn inactive_frame_start() {
        let sp = S + 0x3e00;
        let m = mem(&[(sp + 40, 0xbbbb), (sp + 48, F0 + 0x50)]);
        let s = start_from_inactive_frame(&m, sp, F2).unwrap();
        assert_eq!(s, sleeping(F0 + 0x50, sp + 56, 0xbbbb));
        let m = mem(&[(sp + 40, 0), (sp + 48, F2)]);
        assert!(start_from_inactive_frame(&m, sp, F2).unwrap().signal);
        assert!(start_from_inactive_frame(&m, sp + 8, F2).is_none());
        assert!(start_from_inactive_frame(&m, u64::MAX - 50, F2).is_none());
    }

    #[test]
    fn scan_finds_planted_words_only() {
        let m = mem(&[
            (S + 0x2000, F0 + 0x20), // below from_sp
            (S + 0x3008, F0 + 0x20),
            (S + 0x3010, F1 + 0x20), // outside the targets
            (S + 0x3ff8, F0 + 0xff),
            (S + 0x4000, F0 + 0x20), // past the stack
        ]);
        let targets = [(F0, F1), (0, 0)];
        let found = scan_stack_for(&m, &task(), S + 0x3001, &targets);
        assert_eq!(found, [(S + 0x3008, F0 + 0x20), (S + 0x3ff8, F0 + 0xff)]);
        assert_eq!(scan_stack_for(&m, &task(), 0, &targets).len(), 3);
        assert!(scan_stack_for(&m, &task(), S + 0x5000, &targets).is_empty());
        assert!(scan_stack_for(&m, &task(), u64::MAX, &targets).is_empty());
        let huge = StackRange {
            kind: StackKind::Task,
            start: 0,
            end: u64::MAX,
        };
        assert!(scan_stack_for(&m, &huge, u64::MAX - 3, &targets).is_empty());
        // Capped at MAX_SCAN_BYTES: a word 64 KiB above from_sp is not looked at.
        let mut far = m;
        far.0.insert(S + MAX_SCAN_BYTES, F0);
        assert_eq!(scan_stack_for(&far, &huge, S, &targets).len(), 4);
        assert_eq!(scan_stack_for(&far, &huge, S + 8, &targets).len(), 5);
    }

    #[test]
    fn from_raw_checks_sizes() {
        use OrcError::*;
        let ent = [0u8; 12];
        assert_eq!(
            OrcTable::from_raw(T, &[0; 8], &ent[..6]).unwrap_err(),
            CountMismatch { ips: 2, entries: 1 }
        );
        assert_eq!(
            OrcTable::from_raw(T, &[0; 3], &[]).unwrap_err(),
            IpTableSize(3)
        );
        assert_eq!(
            OrcTable::from_raw(T, &[0; 4], &ent[..7]).unwrap_err(),
            EntryTableSize(7)
        );
        assert!(matches!(
            OrcTable::from_raw(u64::MAX - 3, &[0, 0, 0, 1], &ent[..6]),
            Err(IpOverflow { index: 0, .. })
        ));
        assert!(matches!(
            OrcTable::from_raw(u64::MAX - 3, &[0; 8], &ent),
            Err(IpOverflow { index: 1, .. })
        ));
    }

    #[test]
    fn block_index_agrees_with_a_plain_search() {
        // Irregular ips, duplicates included, over several blocks and a wide gap.
        let mut rows = Vec::new();
        let mut ip = T;
        for i in 0..400u64 {
            ip += (i * 37) % 300;
            rows.push((ip, e(ORC_REG_SP, (i % 100) as i16, ORC_TYPE_CALL)));
        }
        rows.push((ip + 0x10_0000, e(ORC_REG_BP, 8, ORC_TYPE_CALL)));
        let t = build(&rows);
        assert!(!t.blocks.is_empty());
        for probe in (T - 0x300..ip + 0x10_0400).step_by(7) {
            let plain = t.ips.partition_point(|&s| s <= probe);
            let want = plain.checked_sub(1).map(|i| t.entries[i]);
            assert_eq!(t.find(probe), want, "ip {probe:#x}");
        }
    }

    #[test]
    fn find_rightmost_at_or_below() {
        let empty = OrcTable::from_raw(T, &[], &[]).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        assert_eq!(empty.find(T), None);
        assert_eq!(OrcTable::default().find(0), None);

        let t = table();
        assert_eq!(t.len(), 10);
        assert_eq!(t.find(F0 - 1), None);
        assert_eq!(t.find(F0), Some(e(ORC_REG_SP, 16, ORC_TYPE_CALL)));
        assert_eq!(t.find(F1 - 1), Some(e(ORC_REG_SP, 16, ORC_TYPE_CALL)));
        assert_eq!(t.find(F1 + 0x80), Some(e(ORC_REG_SP, 8, ORC_TYPE_CALL)));
        assert_eq!(t.find(u64::MAX), Some(OrcEntry::default()));

        // Out of order and duplicated ips: sorted together, the last duplicate wins.
        let a = e(ORC_REG_SP, 8, 0);
        let b = e(ORC_REG_SP, 24, 0);
        let c = e(ORC_REG_BP, 16, 0);
        let t = build(&[(F1, b), (F0, a), (F1, c)]);
        assert_eq!(t.find(F0 + 1), Some(a));
        assert_eq!(t.find(F1), Some(c));
    }
}
