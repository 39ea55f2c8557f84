//! User-space fallback for instructions the in-kernel instruction emulator cannot execute.
//!
//! On a PVM host, guest kernel-mode code runs through KVM's instruction emulator, which
//! lacks some instructions; `KVM_RUN` then returns `KVM_EXIT_INTERNAL_ERROR` with
//! suberror 1 (emulation failure). The vCPU loop fetches the instruction bytes at CS:RIP
//! and hands them here together with the registers. This module decodes the instruction
//! and either emulates it (updating the registers) or tells the caller which architectural
//! exception to deliver. Everything else is an error that stops the VM with a readable
//! description.
//!
//! The module is pure: guest memory and MXCSR come in through [`GuestCpuAccess`], and no
//! KVM ioctl is made here. On any error the registers are left untouched.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, FastFormatter, Instruction, OpKind, Register,
};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

/// Longest x86 instruction, in bytes.
pub const MAX_INSN_LEN: usize = 15;

/// RFLAGS.AC (alignment check / SMAP override), bit 18.
pub const RFLAGS_AC: u64 = 1 << 18;
const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_RF: u64 = 1 << 16;
/// The arithmetic flags POPCNT defines (all cleared, then ZF set for a zero source).
const RFLAGS_ARITH: u64 = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF;

const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_LA57: u64 = 1 << 12;

/// Exception vectors this module may ask the caller to deliver.
pub mod vector {
    /// Breakpoint (`int3`), trap.
    pub const BP: u8 = 3;
    /// Invalid opcode, fault.
    pub const UD: u8 = 6;
    /// Device not available, fault.
    pub const NM: u8 = 7;
    /// Stack-segment fault (non-canonical SS-relative address), fault with error code.
    pub const SS: u8 = 12;
    /// General protection, fault with error code.
    pub const GP: u8 = 13;
}

/// MXCSR bits software may set on CPUs with DAZ (all current x86_64 CPUs): bits 16-31 are reserved.
pub const DEFAULT_MXCSR_MASK: u32 = 0x0000_ffff;

/// What the fallback needs from the vCPU besides registers: guest-virtual memory and MXCSR.
pub trait GuestCpuAccess {
    /// Reads `buf.len()` bytes at guest-virtual address `gva` (translated with the vCPU's CR3).
    fn read_gva(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), EmulateError>;
    /// Writes `data` at guest-virtual address `gva`.
    fn write_gva(&mut self, gva: u64, data: &[u8]) -> Result<(), EmulateError>;
    /// The vCPU's MXCSR.
    fn mxcsr(&mut self) -> Result<u32, EmulateError>;
    /// Sets the vCPU's MXCSR.
    fn set_mxcsr(&mut self, value: u32) -> Result<(), EmulateError>;
    /// The MXCSR bits `ldmxcsr` may set (FXSAVE's MXCSR_MASK); any other set bit is a #GP(0).
    fn mxcsr_mask(&mut self) -> u32 {
        DEFAULT_MXCSR_MASK
    }
}

/// The instructions the fallback handles, one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FallbackKind {
    Int3,
    Clac,
    Stac,
    Popcnt,
    Fwait,
    Ldmxcsr,
    Stmxcsr,
}

impl FallbackKind {
    /// Number of kinds.
    pub const COUNT: usize = 7;
    /// All kinds, in counter order.
    pub const ALL: [FallbackKind; Self::COUNT] = [
        FallbackKind::Int3,
        FallbackKind::Clac,
        FallbackKind::Stac,
        FallbackKind::Popcnt,
        FallbackKind::Fwait,
        FallbackKind::Ldmxcsr,
        FallbackKind::Stmxcsr,
    ];

    /// Short lower-case name (the mnemonic).
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackKind::Int3 => "int3",
            FallbackKind::Clac => "clac",
            FallbackKind::Stac => "stac",
            FallbackKind::Popcnt => "popcnt",
            FallbackKind::Fwait => "fwait",
            FallbackKind::Ldmxcsr => "ldmxcsr",
            FallbackKind::Stmxcsr => "stmxcsr",
        }
    }

    /// Position in [`FallbackKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for FallbackKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome of a handled emulation failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The instruction was executed: registers were updated (RIP advanced); resume the vCPU.
    Emulated(FallbackKind),
    /// Set the registers as in `regs` (RIP advanced for traps such as `int3`, unchanged for
    /// faults), then inject exception `vector`, with `error_code` if it has one.
    InjectException {
        vector: u8,
        error_code: Option<u32>,
        kind: FallbackKind,
    },
}

impl Fallback {
    /// The instruction kind, for the counters.
    pub fn kind(&self) -> FallbackKind {
        match *self {
            Fallback::Emulated(kind) | Fallback::InjectException { kind, .. } => kind,
        }
    }
}

/// Why an emulation failure could not be handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmulateError {
    #[error(
        "unsupported CPU mode at {rip:#x}: the vCPU is not in 64-bit mode \
         (cs.l={cs_l}, cs.db={cs_db}, cr0={cr0:#x}, efer={efer:#x})"
    )]
    UnsupportedMode {
        rip: u64,
        cs_l: u8,
        cs_db: u8,
        cr0: u64,
        efer: u64,
    },
    #[error("no instruction bytes could be read at {rip:#x}")]
    NoCode { rip: u64 },
    #[error("truncated instruction at {rip:#x} (only {bytes} readable)")]
    Truncated { rip: u64, bytes: String },
    #[error("invalid instruction at {rip:#x} ({bytes})")]
    Invalid { rip: u64, bytes: String },
    #[error("unsupported instruction at {rip:#x}: {text}")]
    Unsupported { rip: u64, text: String },
    #[error("cannot compute the memory operand address at {rip:#x}: {text}")]
    Address { rip: u64, text: String },
    #[error("guest state access failed: {0}")]
    Memory(String),
}

/// Handles one emulation failure at `regs.rip`.
///
/// `code` holds the bytes fetched at CS:RIP (up to 15; fewer near an unreadable page).
/// On `Ok`, `regs` holds the registers to set before resuming or injecting; on `Err`,
/// `regs` is unchanged.
pub fn handle_emulation_failure(
    code: &[u8],
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    cpu: &mut dyn GuestCpuAccess,
) -> Result<Fallback, EmulateError> {
    if sregs.cs.l == 0 {
        return Err(EmulateError::UnsupportedMode {
            rip: regs.rip,
            cs_l: sregs.cs.l,
            cs_db: sregs.cs.db,
            cr0: sregs.cr0,
            efer: sregs.efer,
        });
    }
    let decoded = Decoded::new(code, regs.rip)?;
    let mut new = *regs;
    let outcome = Emulator {
        d: &decoded,
        regs: &mut new,
        sregs,
        cpu,
    }
    .run()?;
    *regs = new;
    Ok(outcome)
}

/// One-line description of the instruction at `rip`, for fatal-stop messages, e.g.
/// `0xffffffff81234567: rdseed rax (48 0f c7 f8)`.
pub fn describe(code: &[u8], rip: u64) -> String {
    match Decoded::new(code, rip) {
        Ok(d) => format!("{rip:#x}: {}", d.text()),
        Err(EmulateError::NoCode { .. }) => format!("{rip:#x}: no instruction bytes readable"),
        Err(EmulateError::Truncated { bytes, .. }) => {
            format!("{rip:#x}: truncated instruction ({bytes})")
        }
        Err(_) => format!("{rip:#x}: invalid instruction ({})", hex_bytes(clamp(code))),
    }
}

/// Compact register dump for fatal-stop messages.
pub fn format_regs(regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    let mut s = String::with_capacity(600);
    let _ = write!(
        s,
        "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        format_segment(&sregs.cs),
    );
    let gprs = [
        ("rax", regs.rax),
        ("rbx", regs.rbx),
        ("rcx", regs.rcx),
        ("rdx", regs.rdx),
        ("rsi", regs.rsi),
        ("rdi", regs.rdi),
        ("rbp", regs.rbp),
        ("r8", regs.r8),
        ("r9", regs.r9),
        ("r10", regs.r10),
        ("r11", regs.r11),
        ("r12", regs.r12),
        ("r13", regs.r13),
        ("r14", regs.r14),
        ("r15", regs.r15),
    ];
    for (name, value) in gprs {
        let _ = write!(s, " {name}={value:#x}");
    }
    s
}

fn format_segment(seg: &kvm_segment) -> String {
    format!(
        "{:#x}(base={:#x} l={} db={} dpl={})",
        seg.selector, seg.base, seg.l, seg.db, seg.dpl
    )
}

/// Per-kind counters of handled emulation failures, shared by all vCPUs.
#[derive(Debug, Default)]
pub struct FallbackStats {
    counts: [AtomicU64; FallbackKind::COUNT],
}

impl FallbackStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one handled instruction of `kind`.
    pub fn record(&self, kind: FallbackKind) {
        self.counts[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Count for `kind`.
    pub fn get(&self, kind: FallbackKind) -> u64 {
        self.counts[kind.index()].load(Ordering::Relaxed)
    }

    /// Sum over all kinds.
    pub fn total(&self) -> u64 {
        FallbackKind::ALL.iter().map(|&k| self.get(k)).sum()
    }

    /// `(kind, count)` for every kind, in [`FallbackKind::ALL`] order.
    pub fn snapshot(&self) -> [(FallbackKind, u64); FallbackKind::COUNT] {
        FallbackKind::ALL.map(|k| (k, self.get(k)))
    }

    /// One line for the debug log, e.g. `total=5 int3=1 clac=2 stac=2 popcnt=0 ...`.
    pub fn summary(&self) -> String {
        let snapshot = self.snapshot();
        let total: u64 = snapshot.iter().map(|&(_, n)| n).sum();
        let mut s = format!("total={total}");
        for (kind, n) in snapshot {
            let _ = write!(s, " {kind}={n}");
        }
        s
    }
}

/// At most [`MAX_INSN_LEN`] bytes of `code`.
fn clamp(code: &[u8]) -> &[u8] {
    &code[..code.len().min(MAX_INSN_LEN)]
}

fn hex_bytes(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Decodes one 64-bit instruction: `Ok(None)` when `code` holds no complete valid
/// instruction, `Err` only if the decoder cannot be created.
fn decode_one(code: &[u8], rip: u64) -> Result<Option<Instruction>, iced_x86::IcedError> {
    let mut decoder = Decoder::try_with_ip(64, code, rip, DecoderOptions::NONE)?;
    let insn = decoder.decode();
    let ok = decoder.last_error() == DecoderError::None && !insn.is_invalid();
    Ok(ok.then_some(insn))
}

/// A successfully decoded instruction and its bytes.
struct Decoded<'a> {
    insn: Instruction,
    bytes: &'a [u8],
}

impl<'a> Decoded<'a> {
    fn new(code: &'a [u8], rip: u64) -> Result<Self, EmulateError> {
        let code = clamp(code);
        if code.is_empty() {
            return Err(EmulateError::NoCode { rip });
        }
        let invalid = || EmulateError::Invalid {
            rip,
            bytes: hex_bytes(code),
        };
        let insn = decode_one(code, rip).map_err(|_| invalid())?;
        match insn {
            Some(insn) => {
                let len = insn.len().min(code.len());
                Ok(Self {
                    insn,
                    bytes: &code[..len],
                })
            }
            None => {
                // iced reports "no more bytes" for some invalid encodings too: decide with
                // the bytes zero-padded to the maximum length whether more bytes would
                // have made a valid instruction longer than what was readable.
                let mut padded = [0u8; MAX_INSN_LEN];
                padded[..code.len()].copy_from_slice(code);
                match decode_one(&padded, rip) {
                    Ok(Some(p)) if p.len() > code.len() => Err(EmulateError::Truncated {
                        rip,
                        bytes: hex_bytes(code),
                    }),
                    _ => Err(invalid()),
                }
            }
        }
    }

    fn rip(&self) -> u64 {
        self.insn.ip()
    }

    /// `mnemonic operands (bytes)`.
    fn text(&self) -> String {
        let mut formatter = FastFormatter::new();
        formatter
            .options_mut()
            .set_space_after_operand_separator(true);
        formatter.options_mut().set_use_hex_prefix(true);
        let mut s = String::new();
        formatter.format(&self.insn, &mut s);
        let _ = write!(s, " ({})", hex_bytes(self.bytes));
        s
    }

    fn unsupported(&self) -> EmulateError {
        EmulateError::Unsupported {
            rip: self.rip(),
            text: self.text(),
        }
    }
}

struct Emulator<'a, 'b> {
    d: &'a Decoded<'b>,
    regs: &'a mut kvm_regs,
    sregs: &'a kvm_sregs,
    cpu: &'a mut dyn GuestCpuAccess,
}

impl Emulator<'_, '_> {
    fn run(mut self) -> Result<Fallback, EmulateError> {
        let insn = &self.d.insn;
        match insn.code() {
            Code::Int3 => {
                // Trap: the exception is delivered with RIP past the instruction.
                self.regs.rip = insn.next_ip();
                Ok(Fallback::InjectException {
                    vector: vector::BP,
                    error_code: None,
                    kind: FallbackKind::Int3,
                })
            }
            Code::Clac => {
                self.regs.rflags &= !RFLAGS_AC;
                Ok(self.complete(FallbackKind::Clac))
            }
            Code::Stac => {
                self.regs.rflags |= RFLAGS_AC;
                Ok(self.complete(FallbackKind::Stac))
            }
            Code::Wait => {
                if self.sregs.cr0 & (CR0_MP | CR0_TS) == (CR0_MP | CR0_TS) {
                    return Ok(fault(vector::NM, None, FallbackKind::Fwait));
                }
                Ok(self.complete(FallbackKind::Fwait))
            }
            Code::Popcnt_r16_rm16 => self.popcnt(2),
            Code::Popcnt_r32_rm32 => self.popcnt(4),
            Code::Popcnt_r64_rm64 => self.popcnt(8),
            Code::Ldmxcsr_m32 => self.mxcsr_insn(FallbackKind::Ldmxcsr),
            Code::Stmxcsr_m32 => self.mxcsr_insn(FallbackKind::Stmxcsr),
            _ => Err(self.d.unsupported()),
        }
    }

    /// Finishes an executed instruction: RIP past it, RFLAGS.RF cleared.
    fn complete(&mut self, kind: FallbackKind) -> Fallback {
        self.regs.rip = self.d.insn.next_ip();
        self.regs.rflags &= !RFLAGS_RF;
        Fallback::Emulated(kind)
    }

    /// Linear address of memory operand `operand` (segment base included).
    fn memory_address(&self, operand: u32) -> Result<u64, EmulateError> {
        let insn = &self.d.insn;
        if insn.op_kind(operand) != OpKind::Memory {
            return Err(self.d.unsupported());
        }
        let regs: &kvm_regs = self.regs;
        let sregs = self.sregs;
        let next_ip = insn.next_ip();
        insn.virtual_address(operand, 0, |reg, _, _| {
            register_value(reg, regs, sregs, next_ip)
        })
        .ok_or_else(|| EmulateError::Address {
            rip: self.d.rip(),
            text: self.d.text(),
        })
    }

    /// The #GP(0) / #SS(0) a non-canonical access of `len` bytes at `addr` raises, if any.
    fn canonical_fault(&self, addr: u64, len: usize, kind: FallbackKind) -> Option<Fallback> {
        let bits = if self.sregs.cr4 & CR4_LA57 != 0 {
            57
        } else {
            48
        };
        let last = addr.wrapping_add(len.saturating_sub(1) as u64);
        if is_canonical(addr, bits) && is_canonical(last, bits) {
            return None;
        }
        let vec = if self.d.insn.memory_segment() == Register::SS {
            vector::SS
        } else {
            vector::GP
        };
        Some(fault(vec, Some(0), kind))
    }

    fn popcnt(&mut self, size: usize) -> Result<Fallback, EmulateError> {
        let kind = FallbackKind::Popcnt;
        let insn = &self.d.insn;
        let mask = size_mask(size);
        let src = match insn.op1_kind() {
            OpKind::Register => {
                read_gpr(self.regs, insn.op1_register()).ok_or_else(|| self.d.unsupported())?
            }
            OpKind::Memory => {
                let addr = self.memory_address(1)?;
                if let Some(f) = self.canonical_fault(addr, size, kind) {
                    return Ok(f);
                }
                let mut buf = [0u8; 8];
                self.cpu.read_gva(addr, &mut buf[..size])?;
                u64::from_le_bytes(buf)
            }
            _ => return Err(self.d.unsupported()),
        } & mask;
        let count = u64::from(src.count_ones());
        write_gpr(self.regs, insn.op0_register(), count).ok_or_else(|| self.d.unsupported())?;
        self.regs.rflags &= !RFLAGS_ARITH;
        if src == 0 {
            self.regs.rflags |= RFLAGS_ZF;
        }
        Ok(self.complete(kind))
    }

    fn mxcsr_insn(&mut self, kind: FallbackKind) -> Result<Fallback, EmulateError> {
        let (cr0, cr4) = (self.sregs.cr0, self.sregs.cr4);
        if cr0 & CR0_EM != 0 || cr4 & CR4_OSFXSR == 0 {
            return Ok(fault(vector::UD, None, kind));
        }
        if cr0 & CR0_TS != 0 {
            return Ok(fault(vector::NM, None, kind));
        }
        let addr = self.memory_address(0)?;
        if let Some(f) = self.canonical_fault(addr, 4, kind) {
            return Ok(f);
        }
        if kind == FallbackKind::Ldmxcsr {
            let mut buf = [0u8; 4];
            self.cpu.read_gva(addr, &mut buf)?;
            let value = u32::from_le_bytes(buf);
            if value & !self.cpu.mxcsr_mask() != 0 {
                return Ok(fault(vector::GP, Some(0), kind));
            }
            self.cpu.set_mxcsr(value)?;
        } else {
            let value = self.cpu.mxcsr()?;
            self.cpu.write_gva(addr, &value.to_le_bytes())?;
        }
        Ok(self.complete(kind))
    }
}

/// A fault: RIP stays at the faulting instruction.
fn fault(vector: u8, error_code: Option<u32>, kind: FallbackKind) -> Fallback {
    Fallback::InjectException {
        vector,
        error_code,
        kind,
    }
}

fn is_canonical(addr: u64, bits: u32) -> bool {
    let shift = 64 - bits;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

fn size_mask(size: usize) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// Value of a register for effective-address computation.
fn register_value(reg: Register, regs: &kvm_regs, sregs: &kvm_sregs, next_ip: u64) -> Option<u64> {
    match reg {
        // In 64-bit mode only FS and GS have a base.
        Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
        Register::FS => Some(sregs.fs.base),
        Register::GS => Some(sregs.gs.base),
        // RIP-relative operands are relative to the next instruction.
        Register::RIP => Some(next_ip),
        Register::EIP => Some(next_ip & 0xffff_ffff),
        r if r.is_gpr() => read_gpr(regs, r),
        _ => None,
    }
}

macro_rules! gpr_field {
    ($full:expr, $($place:tt)+) => {
        match $full {
            Register::RAX => Some($($place)+.rax),
            Register::RCX => Some($($place)+.rcx),
            Register::RDX => Some($($place)+.rdx),
            Register::RBX => Some($($place)+.rbx),
            Register::RSP => Some($($place)+.rsp),
            Register::RBP => Some($($place)+.rbp),
            Register::RSI => Some($($place)+.rsi),
            Register::RDI => Some($($place)+.rdi),
            Register::R8 => Some($($place)+.r8),
            Register::R9 => Some($($place)+.r9),
            Register::R10 => Some($($place)+.r10),
            Register::R11 => Some($($place)+.r11),
            Register::R12 => Some($($place)+.r12),
            Register::R13 => Some($($place)+.r13),
            Register::R14 => Some($($place)+.r14),
            Register::R15 => Some($($place)+.r15),
            _ => None,
        }
    };
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

/// Value of a general-purpose register of any size (zero-extended).
fn read_gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    if !reg.is_gpr() {
        return None;
    }
    let full = *gpr_field!(reg.full_register(), &regs)?;
    Some(match reg.size() {
        8 => full,
        4 | 2 => full & size_mask(reg.size()),
        1 if is_high_byte(reg) => (full >> 8) & 0xff,
        1 => full & 0xff,
        _ => return None,
    })
}

/// Writes a general-purpose register with x86-64 semantics: 32-bit writes zero-extend,
/// 16- and 8-bit writes keep the other bits.
fn write_gpr(regs: &mut kvm_regs, reg: Register, value: u64) -> Option<()> {
    if !reg.is_gpr() {
        return None;
    }
    let size = reg.size();
    let slot = gpr_field!(reg.full_register(), &mut regs)?;
    *slot = match size {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => (*slot & !0xffff) | (value & 0xffff),
        1 if is_high_byte(reg) => (*slot & !0xff00) | ((value & 0xff) << 8),
        1 => (*slot & !0xff) | (value & 0xff),
        _ => return None,
    };
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const RIP: u64 = 0xffff_ffff_8123_4567;
    const RFLAGS_FIXED: u64 = 1 << 1;

    /// Byte-granular fake guest memory; unmapped bytes fail the access.
    #[derive(Default)]
    struct FakeCpu {
        mem: HashMap<u64, u8>,
        mxcsr: u32,
        /// Every address reads as a pattern and accepts writes (for the fuzz test).
        permissive: bool,
        reads: usize,
        writes: usize,
    }

    impl FakeCpu {
        fn new() -> Self {
            Self {
                mxcsr: 0x1f80,
                ..Self::default()
            }
        }

        fn map(&mut self, gva: u64, data: &[u8]) {
            for (i, &b) in data.iter().enumerate() {
                self.mem.insert(gva.wrapping_add(i as u64), b);
            }
        }

        fn read_u32(&self, gva: u64) -> u32 {
            let mut b = [0u8; 4];
            for (i, byte) in b.iter_mut().enumerate() {
                *byte = self.mem[&(gva + i as u64)];
            }
            u32::from_le_bytes(b)
        }
    }

    impl GuestCpuAccess for FakeCpu {
        fn read_gva(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
            self.reads += 1;
            for (i, byte) in buf.iter_mut().enumerate() {
                let a = gva.wrapping_add(i as u64);
                *byte = match self.mem.get(&a) {
                    Some(&b) => b,
                    None if self.permissive => (a as u8).wrapping_mul(31),
                    None => {
                        return Err(EmulateError::Memory(format!(
                            "guest address {a:#x} is not mapped"
                        )))
                    }
                };
            }
            Ok(())
        }

        fn write_gva(&mut self, gva: u64, data: &[u8]) -> Result<(), EmulateError> {
            self.writes += 1;
            for i in 0..data.len() {
                let a = gva.wrapping_add(i as u64);
                if !self.permissive && !self.mem.contains_key(&a) {
                    return Err(EmulateError::Memory(format!(
                        "guest address {a:#x} is not mapped"
                    )));
                }
            }
            self.map(gva, data);
            Ok(())
        }

        fn mxcsr(&mut self) -> Result<u32, EmulateError> {
            Ok(self.mxcsr)
        }

        fn set_mxcsr(&mut self, value: u32) -> Result<(), EmulateError> {
            self.mxcsr = value;
            Ok(())
        }
    }

    fn regs() -> kvm_regs {
        kvm_regs {
            rip: RIP,
            rflags: RFLAGS_FIXED,
            rsp: 0xffff_c900_0001_3f00,
            ..Default::default()
        }
    }

    fn sregs64() -> kvm_sregs {
        let mut s = kvm_sregs::default();
        s.cs.l = 1;
        s.cs.selector = 0x10;
        s.cs.present = 1;
        s.cr0 = 0x8005_0033; // PG WP NE ET MP PE
        s.cr4 = 0x0031_06f0 | CR4_OSFXSR;
        s.efer = 0xd01;
        s
    }

    fn run(code: &[u8], regs: &mut kvm_regs, cpu: &mut FakeCpu) -> Result<Fallback, EmulateError> {
        handle_emulation_failure(code, regs, &sregs64(), cpu)
    }

    #[test]
    fn int3_advances_rip_and_injects_bp() {
        let mut r = regs();
        let out = run(&[0xcc, 0x90, 0x90], &mut r, &mut FakeCpu::new()).unwrap();
        assert_eq!(
            out,
            Fallback::InjectException {
                vector: 3,
                error_code: None,
                kind: FallbackKind::Int3
            }
        );
        assert_eq!(r.rip, RIP + 1);
    }

    #[test]
    fn clac_and_stac_flip_ac_and_advance_by_3() {
        let mut r = regs();
        r.rflags = RFLAGS_FIXED | RFLAGS_ZF;
        let out = run(&[0x0f, 0x01, 0xcb], &mut r, &mut FakeCpu::new()).unwrap();
        assert_eq!(out, Fallback::Emulated(FallbackKind::Stac));
        assert_eq!(r.rip, RIP + 3);
        assert_eq!(r.rflags, RFLAGS_FIXED | RFLAGS_ZF | RFLAGS_AC);

        let out = run(&[0x0f, 0x01, 0xca, 0xcc], &mut r, &mut FakeCpu::new()).unwrap();
        assert_eq!(out, Fallback::Emulated(FallbackKind::Clac));
        assert_eq!(r.rip, RIP + 6);
        assert_eq!(r.rflags, RFLAGS_FIXED | RFLAGS_ZF);
    }

    #[test]
    fn popcnt_reg64() {
        let mut r = regs();
        r.rax = 0xdead;
        r.rcx = 0xf000_0000_0000_00ff;
        let out = run(&[0xf3, 0x48, 0x0f, 0xb8, 0xc1], &mut r, &mut FakeCpu::new()).unwrap();
        assert_eq!(out, Fallback::Emulated(FallbackKind::Popcnt));
        assert_eq!(r.rax, 12);
        assert_eq!(r.rcx, 0xf000_0000_0000_00ff);
        assert_eq!(r.rip, RIP + 5);
    }

    #[test]
    fn popcnt_extended_registers() {
        // popcnt r8, r15
        let mut r = regs();
        r.r8 = u64::MAX;
        r.r15 = 0x0101_0101_0101_0101;
        run(&[0xf3, 0x4d, 0x0f, 0xb8, 0xc7], &mut r, &mut FakeCpu::new()).unwrap();
        assert_eq!(r.r8, 8);
        assert_eq!(r.rip, RIP + 5);
    }

    #[test]
    fn popcnt_reg32_zero_extends() {
        // popcnt eax, ecx: only the low 32 bits of rcx count, upper rax bits are cleared.
        let mut r = regs();
        r.rax = 0xffff_ffff_ffff_ffff;
        r.rcx = 0xffff_ffff_0000_0007;
        run(&[0xf3, 0x0f, 0xb8, 0xc1], &mut r, &mut FakeCpu::new()).unwrap();
        assert_eq!(r.rax, 3);
        assert_eq!(r.rip, RIP + 4);
    }

    #[test]
    fn popcnt_reg16_preserves_upper_bits() {
        // popcnt ax, cx
        let mut r = regs();
        r.rax = 0x1122_3344_5566_7788;
        r.rcx = 0xffff_ffff_ffff_0003;
        run(&[0x66, 0xf3, 0x0f, 0xb8, 0xc1], &mut r, &mut FakeCpu::new()).unwrap();
        assert_eq!(r.rax, 0x1122_3344_5566_0002);
        assert_eq!(r.rip, RIP + 5);
    }

    #[test]
    fn popcnt_memory_source_base_plus_displacement() {
        // popcnt rax, [rdi+8]
        let mut r = regs();
        r.rdi = 0xffff_8880_0000_1000;
        let mut cpu = FakeCpu::new();
        cpu.map(
            0xffff_8880_0000_1008,
            &0x8000_0000_0000_0003u64.to_le_bytes(),
        );
        run(&[0xf3, 0x48, 0x0f, 0xb8, 0x47, 0x08], &mut r, &mut cpu).unwrap();
        assert_eq!(r.rax, 3);
        assert_eq!(r.rip, RIP + 6);
    }

    #[test]
    fn popcnt_memory_source_32bit_reads_four_bytes() {
        // popcnt ecx, [rsi+rbx*4-4]
        let mut r = regs();
        r.rsi = 0x10_0000;
        r.rbx = 2;
        let mut cpu = FakeCpu::new();
        cpu.map(0x10_0004, &[0xff, 0x00, 0x00, 0x01]); // 9 bits; the next bytes are unmapped
        run(&[0xf3, 0x0f, 0xb8, 0x4c, 0x9e, 0xfc], &mut r, &mut cpu).unwrap();
        assert_eq!(r.rcx, 9);
    }

    #[test]
    fn popcnt_rip_relative_source() {
        // popcnt rdx, [rip+0x100]
        let code = [0xf3, 0x48, 0x0f, 0xb8, 0x15, 0x00, 0x01, 0x00, 0x00];
        let mut r = regs();
        let mut cpu = FakeCpu::new();
        cpu.map(RIP + code.len() as u64 + 0x100, &0xffu64.to_le_bytes());
        run(&code, &mut r, &mut cpu).unwrap();
        assert_eq!(r.rdx, 8);
        assert_eq!(r.rip, RIP + 9);
    }

    #[test]
    fn popcnt_fs_and_gs_segment_bases() {
        let mut sregs = sregs64();
        sregs.gs.base = 0xffff_8881_0000_0000;
        sregs.fs.base = 0x7f00_0000_0000;
        let mut cpu = FakeCpu::new();
        cpu.map(0xffff_8881_0000_0010, &0x7u64.to_le_bytes());
        cpu.map(0x7f00_0000_0010, &0x3u64.to_le_bytes());
        let mut r = regs();
        r.rdi = 0x10;
        // popcnt rax, gs:[rdi]
        handle_emulation_failure(
            &[0x65, 0xf3, 0x48, 0x0f, 0xb8, 0x07],
            &mut r,
            &sregs,
            &mut cpu,
        )
        .unwrap();
        assert_eq!(r.rax, 3);
        // popcnt rax, fs:[rdi]
        handle_emulation_failure(
            &[0x64, 0xf3, 0x48, 0x0f, 0xb8, 0x07],
            &mut r,
            &sregs,
            &mut cpu,
        )
        .unwrap();
        assert_eq!(r.rax, 2);
        assert_eq!(r.rip, RIP + 12);
    }

    #[test]
    fn popcnt_address_size_override_truncates_address() {
        // popcnt rax, [edi+8]
        let mut r = regs();
        r.rdi = 0xffff_ffff_0000_2000;
        let mut cpu = FakeCpu::new();
        cpu.map(0x2008, &1u64.to_le_bytes());
        run(
            &[0x67, 0xf3, 0x48, 0x0f, 0xb8, 0x47, 0x08],
            &mut r,
            &mut cpu,
        )
        .unwrap();
        assert_eq!(r.rax, 1);
    }

    #[test]
    fn popcnt_zero_source_sets_zf_only() {
        let mut r = regs();
        r.rax = 77;
        r.rcx = 0;
        r.rflags =
            RFLAGS_FIXED | RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_SF | RFLAGS_OF | RFLAGS_AC;
        run(&[0xf3, 0x48, 0x0f, 0xb8, 0xc1], &mut r, &mut FakeCpu::new()).unwrap();
        assert_eq!(r.rax, 0);
        assert_eq!(r.rflags, RFLAGS_FIXED | RFLAGS_ZF | RFLAGS_AC);
    }

    #[test]
    fn popcnt_nonzero_source_clears_flags() {
        let mut r = regs();
        r.rcx = 0x8000_0000_0000_0000;
        r.rflags = RFLAGS_FIXED | RFLAGS_ARITH | RFLAGS_RF | (1 << 9); // IF survives, RF is cleared
        run(&[0xf3, 0x48, 0x0f, 0xb8, 0xc1], &mut r, &mut FakeCpu::new()).unwrap();
        assert_eq!(r.rax, 1);
        assert_eq!(r.rflags, RFLAGS_FIXED | (1 << 9));
    }

    #[test]
    fn popcnt_unmapped_memory_is_an_error_and_leaves_regs_alone() {
        let mut r = regs();
        r.rdi = 0x5000;
        let before = r;
        let err = run(
            &[0xf3, 0x48, 0x0f, 0xb8, 0x47, 0x08],
            &mut r,
            &mut FakeCpu::new(),
        )
        .unwrap_err();
        assert!(matches!(err, EmulateError::Memory(_)), "{err}");
        assert_eq!(r, before);
    }

    #[test]
    fn popcnt_non_canonical_address_faults() {
        let mut r = regs();
        r.rdi = 0x8000_0000_0000_0000;
        let before = r;
        let out = run(&[0xf3, 0x48, 0x0f, 0xb8, 0x07], &mut r, &mut FakeCpu::new()).unwrap();
        assert_eq!(
            out,
            Fallback::InjectException {
                vector: 13,
                error_code: Some(0),
                kind: FallbackKind::Popcnt
            }
        );
        assert_eq!(r, before);
        // SS-relative (rsp base) non-canonical access is #SS(0).
        r.rsp = 0x0000_8000_0000_0000;
        let out = run(
            &[0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x24],
            &mut r,
            &mut FakeCpu::new(),
        )
        .unwrap();
        assert_eq!(
            out,
            Fallback::InjectException {
                vector: 12,
                error_code: Some(0),
                kind: FallbackKind::Popcnt
            }
        );
    }

    #[test]
    fn fwait_is_a_nop() {
        let mut r = regs();
        let before = r;
        let out = run(&[0x9b, 0xdb, 0xe3], &mut r, &mut FakeCpu::new()).unwrap();
        assert_eq!(out, Fallback::Emulated(FallbackKind::Fwait));
        assert_eq!(r.rip, RIP + 1);
        assert_eq!(r.rflags, before.rflags);
        assert_eq!(r.rax, before.rax);
    }

    #[test]
    fn fwait_with_ts_and_mp_is_nm() {
        let mut sregs = sregs64();
        sregs.cr0 |= CR0_TS | CR0_MP;
        let mut r = regs();
        let out = handle_emulation_failure(&[0x9b], &mut r, &sregs, &mut FakeCpu::new()).unwrap();
        assert_eq!(
            out,
            Fallback::InjectException {
                vector: 7,
                error_code: None,
                kind: FallbackKind::Fwait
            }
        );
        assert_eq!(r.rip, RIP);
    }

    #[test]
    fn ldmxcsr_stmxcsr_round_trip() {
        let mut cpu = FakeCpu::new();
        let mut r = regs();
        r.rax = 0xffff_c900_0000_0100;
        cpu.map(r.rax, &0x9fc0u32.to_le_bytes());
        // ldmxcsr [rax]
        let out = run(&[0x0f, 0xae, 0x10], &mut r, &mut cpu).unwrap();
        assert_eq!(out, Fallback::Emulated(FallbackKind::Ldmxcsr));
        assert_eq!(cpu.mxcsr, 0x9fc0);
        assert_eq!(r.rip, RIP + 3);
        // stmxcsr [rax+4]
        cpu.map(r.rax + 4, &[0; 4]);
        let out = run(&[0x0f, 0xae, 0x58, 0x04], &mut r, &mut cpu).unwrap();
        assert_eq!(out, Fallback::Emulated(FallbackKind::Stmxcsr));
        assert_eq!(cpu.read_u32(r.rax + 4), 0x9fc0);
        assert_eq!(r.rip, RIP + 7);
        // and back from a RIP-relative slot: ldmxcsr [rip+0x20]
        let mut r2 = regs();
        cpu.map(RIP + 7 + 0x20, &0x1f80u32.to_le_bytes());
        run(
            &[0x0f, 0xae, 0x15, 0x20, 0x00, 0x00, 0x00],
            &mut r2,
            &mut cpu,
        )
        .unwrap();
        assert_eq!(cpu.mxcsr, 0x1f80);
    }

    #[test]
    fn ldmxcsr_reserved_bit_is_gp_without_rip_change() {
        let mut cpu = FakeCpu::new();
        let mut r = regs();
        r.rbx = 0x20_0000;
        cpu.map(r.rbx, &0x0001_1f80u32.to_le_bytes());
        let before = r;
        let out = run(&[0x0f, 0xae, 0x13], &mut r, &mut cpu).unwrap();
        assert_eq!(
            out,
            Fallback::InjectException {
                vector: 13,
                error_code: Some(0),
                kind: FallbackKind::Ldmxcsr
            }
        );
        assert_eq!(r, before);
        assert_eq!(cpu.mxcsr, 0x1f80);
    }

    #[test]
    fn ldmxcsr_honours_a_narrower_mask() {
        struct NoDaz(FakeCpu);
        impl GuestCpuAccess for NoDaz {
            fn read_gva(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
                self.0.read_gva(gva, buf)
            }
            fn write_gva(&mut self, gva: u64, data: &[u8]) -> Result<(), EmulateError> {
                self.0.write_gva(gva, data)
            }
            fn mxcsr(&mut self) -> Result<u32, EmulateError> {
                self.0.mxcsr()
            }
            fn set_mxcsr(&mut self, value: u32) -> Result<(), EmulateError> {
                self.0.set_mxcsr(value)
            }
            fn mxcsr_mask(&mut self) -> u32 {
                0xffbf
            }
        }
        let mut cpu = NoDaz(FakeCpu::new());
        let mut r = regs();
        cpu.0.map(0x1000, &0x1fc0u32.to_le_bytes()); // DAZ set
        r.rbx = 0x1000;
        let out =
            handle_emulation_failure(&[0x0f, 0xae, 0x13], &mut r, &sregs64(), &mut cpu).unwrap();
        assert_eq!(out, fault(vector::GP, Some(0), FallbackKind::Ldmxcsr));
    }

    #[test]
    fn mxcsr_instructions_check_cr0_and_cr4() {
        let mut cpu = FakeCpu::new();
        cpu.map(0x1000, &0x1f80u32.to_le_bytes());
        let mut r = regs();
        r.rax = 0x1000;
        let mut sregs = sregs64();
        sregs.cr0 |= CR0_TS;
        let out = handle_emulation_failure(&[0x0f, 0xae, 0x18], &mut r, &sregs, &mut cpu).unwrap();
        assert_eq!(out, fault(vector::NM, None, FallbackKind::Stmxcsr));
        let mut sregs = sregs64();
        sregs.cr4 &= !CR4_OSFXSR;
        let out = handle_emulation_failure(&[0x0f, 0xae, 0x10], &mut r, &sregs, &mut cpu).unwrap();
        assert_eq!(out, fault(vector::UD, None, FallbackKind::Ldmxcsr));
        assert_eq!(r.rip, RIP);
        assert_eq!(cpu.reads + cpu.writes, 0);
    }

    #[test]
    fn unsupported_instruction_is_described() {
        let mut r = regs();
        let before = r;
        let code = [0x48, 0x0f, 0xc7, 0xf8, 0x90, 0x90];
        let err = run(&code, &mut r, &mut FakeCpu::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported instruction at 0xffffffff81234567: rdseed rax (48 0f c7 f8)"
        );
        assert!(matches!(err, EmulateError::Unsupported { rip: RIP, .. }));
        assert_eq!(r, before);
        assert_eq!(
            describe(&code, RIP),
            "0xffffffff81234567: rdseed rax (48 0f c7 f8)"
        );
        // VEX ldmxcsr is not handled either.
        let err = run(&[0xc5, 0xf8, 0xae, 0x10], &mut r, &mut FakeCpu::new()).unwrap_err();
        assert!(err.to_string().contains("vldmxcsr"), "{err}");
    }

    #[test]
    fn invalid_bytes_are_an_error() {
        let mut r = regs();
        let code = [0x0f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        let err = run(&[0x06], &mut r, &mut FakeCpu::new()).unwrap_err(); // push es: invalid in 64-bit mode
        assert!(matches!(err, EmulateError::Invalid { .. }), "{err}");
        let d = describe(&[0x06], RIP);
        assert!(d.contains("invalid instruction (06)"), "{d}");
        let _ = run(&code, &mut r, &mut FakeCpu::new());
        assert_eq!(r, regs());
    }

    #[test]
    fn truncated_bytes_are_an_error() {
        let full = [0xf3, 0x48, 0x0f, 0xb8, 0x15, 0x00, 0x01, 0x00, 0x00];
        for n in 1..full.len() {
            let mut r = regs();
            let err = run(&full[..n], &mut r, &mut FakeCpu::new()).unwrap_err();
            assert!(matches!(err, EmulateError::Truncated { .. }), "{n}: {err}");
            assert_eq!(r, regs());
            assert!(describe(&full[..n], RIP).contains("truncated"));
        }
        let err = run(&[], &mut regs(), &mut FakeCpu::new()).unwrap_err();
        assert_eq!(err, EmulateError::NoCode { rip: RIP });
        assert!(describe(&[], RIP).contains("no instruction bytes"));
        let err = run(&[0x0f, 0x01], &mut regs(), &mut FakeCpu::new()).unwrap_err();
        assert!(err.to_string().contains("0f 01"), "{err}");
    }

    #[test]
    fn longer_than_15_bytes_is_ignored_past_15() {
        // 14 prefixes + int3 = 15 bytes is valid; trailing bytes are ignored.
        let mut code = vec![0x66; 14];
        code.push(0xcc);
        code.extend_from_slice(&[0xcc; 10]);
        let mut r = regs();
        // iced decodes prefixed int3; the length must be 15.
        if let Ok(out) = run(&code, &mut r, &mut FakeCpu::new()) {
            assert_eq!(out.kind(), FallbackKind::Int3);
            assert_eq!(r.rip, RIP + 15);
        }
    }

    #[test]
    fn non_64_bit_mode_is_an_error() {
        let mut sregs = sregs64();
        sregs.cs.l = 0;
        sregs.cs.db = 1;
        let mut r = regs();
        let err =
            handle_emulation_failure(&[0xcc], &mut r, &sregs, &mut FakeCpu::new()).unwrap_err();
        assert!(matches!(
            err,
            EmulateError::UnsupportedMode {
                cs_l: 0,
                cs_db: 1,
                ..
            }
        ));
        assert!(err.to_string().contains("not in 64-bit mode"));
        assert_eq!(r, regs());
    }

    #[test]
    fn counters_increment_per_kind() {
        let stats = FallbackStats::new();
        assert_eq!(stats.total(), 0);
        let mut cpu = FakeCpu::new();
        let mut r = regs();
        for code in [
            &[0xccu8][..],
            &[0x0f, 0x01, 0xca],
            &[0x0f, 0x01, 0xca],
            &[0x9b],
            &[0xf3, 0x0f, 0xb8, 0xc1],
        ] {
            stats.record(run(code, &mut r, &mut cpu).unwrap().kind());
        }
        assert_eq!(stats.get(FallbackKind::Int3), 1);
        assert_eq!(stats.get(FallbackKind::Clac), 2);
        assert_eq!(stats.get(FallbackKind::Stac), 0);
        assert_eq!(stats.get(FallbackKind::Fwait), 1);
        assert_eq!(stats.get(FallbackKind::Popcnt), 1);
        assert_eq!(stats.total(), 5);
        assert_eq!(
            stats.summary(),
            "total=5 int3=1 clac=2 stac=0 popcnt=1 fwait=1 ldmxcsr=0 stmxcsr=0"
        );
        // Shared by several threads.
        let stats = std::sync::Arc::new(FallbackStats::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = stats.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| s.record(FallbackKind::Popcnt)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(stats.get(FallbackKind::Popcnt), 4000);
    }

    #[test]
    fn kinds_are_listed_once_in_index_order() {
        for (i, k) in FallbackKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(k.to_string(), k.as_str());
        }
    }

    #[test]
    fn format_regs_is_compact_and_complete() {
        let mut r = regs();
        r.r15 = 0xabc;
        let s = format_regs(&r, &sregs64());
        for field in [
            "rip=0xffffffff81234567",
            "rsp=",
            "rflags=0x2",
            "cr0=0x80050033",
            "cr3=",
            "cr4=",
            "efer=0xd01",
            "cs=0x10(",
            "l=1",
            "rax=",
            "rbp=",
            "r15=0xabc",
        ] {
            assert!(s.contains(field), "{field} missing in {s}");
        }
        assert!(!s.contains('\n'));
    }

    #[test]
    fn gpr_helpers_handle_all_sizes() {
        let mut r = regs();
        r.rbx = 0x1122_3344_5566_7788;
        assert_eq!(read_gpr(&r, Register::BH), Some(0x77));
        assert_eq!(read_gpr(&r, Register::BL), Some(0x88));
        assert_eq!(read_gpr(&r, Register::BX), Some(0x7788));
        assert_eq!(read_gpr(&r, Register::EBX), Some(0x5566_7788));
        write_gpr(&mut r, Register::BH, 0x1ff).unwrap();
        assert_eq!(r.rbx, 0x1122_3344_5566_ff88);
        write_gpr(&mut r, Register::R11D, 0x1_0000_0001).unwrap();
        assert_eq!(r.r11, 1);
        assert_eq!(read_gpr(&r, Register::XMM0), None);
        assert_eq!(write_gpr(&mut r, Register::CR0, 0), None);
    }

    /// xorshift64*: deterministic pseudo-random numbers for the fuzz test.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_bytes_and_registers_never_panic() {
        let templates: [&[u8]; 8] = [
            &[0xf3, 0x48, 0x0f, 0xb8],
            &[0xf3, 0x0f, 0xb8],
            &[0x66, 0xf3, 0x0f, 0xb8],
            &[0x0f, 0xae],
            &[0x0f, 0x01],
            &[0x65, 0xf3, 0x4c, 0x0f, 0xb8],
            &[0x67, 0x0f, 0xae],
            &[],
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut handled = 0;
        for i in 0..20_000 {
            let mut code = templates[rng.below(templates.len() as u64) as usize].to_vec();
            let extra = rng.below(17) as usize;
            code.extend((0..extra).map(|_| rng.next() as u8));
            code.truncate(rng.below(20) as usize);
            let mut r = kvm_regs::default();
            for slot in [
                &mut r.rax,
                &mut r.rbx,
                &mut r.rcx,
                &mut r.rdx,
                &mut r.rsi,
                &mut r.rdi,
                &mut r.rsp,
                &mut r.rbp,
                &mut r.r8,
                &mut r.r9,
                &mut r.r10,
                &mut r.r11,
                &mut r.r12,
                &mut r.r13,
                &mut r.r14,
                &mut r.r15,
                &mut r.rip,
                &mut r.rflags,
            ] {
                *slot = match rng.below(4) {
                    0 => 0,
                    1 => u64::MAX - rng.below(16),
                    _ => rng.next(),
                };
            }
            let mut sregs = sregs64();
            sregs.cs.l = u8::from(rng.below(16) != 0);
            sregs.cr0 = rng.next();
            sregs.cr4 = rng.next();
            sregs.fs.base = rng.next();
            sregs.gs.base = rng.next();
            let mut cpu = FakeCpu::new();
            cpu.permissive = i % 2 == 0;
            let before = r;
            let _ = describe(&code, r.rip);
            let _ = format_regs(&r, &sregs);
            match handle_emulation_failure(&code, &mut r, &sregs, &mut cpu) {
                Err(e) => {
                    assert_eq!(r, before, "{e}");
                    assert!(!e.to_string().is_empty());
                }
                Ok(Fallback::Emulated(_)) => {
                    let len = r.rip.wrapping_sub(before.rip);
                    assert!((1..=15).contains(&len), "{code:02x?}");
                    handled += 1;
                }
                Ok(Fallback::InjectException { kind, .. }) => {
                    let len = r.rip.wrapping_sub(before.rip);
                    if kind == FallbackKind::Int3 {
                        assert!((1..=15).contains(&len));
                    } else {
                        assert_eq!(r, before);
                    }
                    handled += 1;
                }
            }
        }
        assert!(handled > 100, "only {handled} handled");
    }
}
