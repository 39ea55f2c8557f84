//! The ORC unwinder reads a guest's ORC tables and stacks, all of them hostile: building
//! the table, unwinding from any start and scanning must never panic or run unbounded.
//!
//! Input: a small header (entry count, start state, limits), then the ORC table rows
//! (2-byte ip offset into a fake text window + 6-byte orc_entry each), then a stack image
//! split between a task stack and an IRQ stack. Stack words whose top byte is a tag are
//! read as pointers into text / the task stack / the IRQ stack so the fuzzer reaches
//! deep walks without guessing 64-bit addresses.
#![no_main]
use introspect::orc::{self, FullRegs, OrcTable, StackKind, StackRange, StackReader, UnwindStart};

const TEXT: u64 = 0xffff_ffff_8100_0000;
const TEXT_LEN: u64 = 0x1_0000;
const TASK: u64 = 0xffff_c900_0001_0000;
const IRQ: u64 = 0xffff_c900_0020_0000;
const ORC_IP_VA: u64 = 0xffff_ffff_8200_0000;

struct Cursor<'a>(&'a [u8]);
impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u64 {
        u64::from(u16::from_le_bytes(self.take()))
    }
    /// A value that is usually a plausible address (text or stack) and sometimes raw.
    fn addr(&mut self) -> u64 {
        let tag = self.u8();
        let low = self.u16();
        match tag % 4 {
            0 => TEXT + low,
            1 => TASK + low,
            2 => IRQ + low,
            _ => u64::from_le_bytes(self.take()),
        }
    }
}

struct Image {
    task: Vec<u8>,
    irq: Vec<u8>,
}

fn tagged(raw: u64) -> u64 {
    let low = raw & 0xffff;
    match raw >> 56 {
        0xaa => TEXT + low,
        0xbb => TASK + low,
        0xcc => IRQ + low,
        _ => raw,
    }
}

impl StackReader for Image {
    fn read_u64(&self, va: u64) -> Option<u64> {
        let (base, bytes) = if va >= IRQ {
            (IRQ, &self.irq)
        } else {
            (TASK, &self.task)
        };
        let off = usize::try_from(va.checked_sub(base)?).ok()?;
        let w = bytes.get(off..off.checked_add(8)?)?;
        Some(tagged(u64::from_le_bytes(w.try_into().ok()?)))
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut c = Cursor(data);
    let n = usize::from(c.u8() % 48);
    let flags = c.u8();
    let max_frames = usize::from(c.u8() % 80);
    let start_ip = c.addr();
    let start_sp = c.addr();
    let start_bp = c.addr();
    let regs = FullRegs {
        ip: start_ip,
        sp: start_sp,
        bp: start_bp,
        di: c.addr(),
        dx: c.addr(),
        r10: c.addr(),
        r13: c.addr(),
        cs: u64::from(c.u8()),
    };
    let scan_from = c.addr();
    let target = (c.addr(), c.addr());

    // The table, built through the same raw decoder the guest's bytes go through.
    let mut ip_bytes = Vec::with_capacity(n * 4);
    let mut entry_bytes = Vec::with_capacity(n * 6);
    for i in 0..n {
        let ip = TEXT + c.u16() % TEXT_LEN;
        let rel = ip.wrapping_sub(ORC_IP_VA + 4 * i as u64) as i64 as i32;
        ip_bytes.extend_from_slice(&rel.to_le_bytes());
        entry_bytes.extend_from_slice(&c.take::<6>());
    }
    let table = match OrcTable::from_raw(ORC_IP_VA, &ip_bytes, &entry_bytes) {
        Ok(t) => t,
        Err(_) => return,
    };
    // Also the raw decoder on raw bytes (odd sizes, overflowing ips).
    let _ = OrcTable::from_raw(
        u64::MAX - 64,
        &c.0[..c.0.len().min(40)],
        &c.0[..c.0.len().min(30)],
    );

    let rest = c.0;
    let split = rest.len() / 2;
    let image = Image {
        task: rest[..split].to_vec(),
        irq: rest[split..].to_vec(),
    };
    let mut stacks = vec![StackRange {
        kind: StackKind::Task,
        start: TASK,
        end: TASK + image.task.len() as u64,
    }];
    if flags & 4 != 0 {
        stacks.push(StackRange {
            kind: if flags & 8 != 0 {
                StackKind::Irq
            } else {
                StackKind::Exception(flags >> 4)
            },
            start: IRQ,
            end: IRQ + image.irq.len() as u64,
        });
    }
    let is_text = |a: u64| (TEXT..TEXT + TEXT_LEN).contains(&a);

    let start = if flags & 16 != 0 {
        match orc::start_from_inactive_frame(&image, start_sp, start_ip) {
            Some(s) => s,
            None => return,
        }
    } else {
        UnwindStart {
            ip: start_ip,
            sp: start_sp,
            bp: start_bp,
            signal: flags & 1 != 0,
            regs: (flags & 2 != 0).then_some(regs),
        }
    };
    let code = orc::SingleTable {
        table: &table,
        is_text: &is_text,
    };
    let trace = orc::unwind(&code, &start, &stacks, &image, max_frames);
    assert!(trace.frames.len() <= max_frames);
    assert_eq!(trace.reliable, trace.problem.is_none());
    if trace.ended_in_user {
        assert_eq!(
            trace.frames.last().map(|f| f.kind),
            Some(orc::FrameKind::UserRegs)
        );
    }

    for range in &stacks {
        let found = orc::scan_stack_for(&image, range, scan_from, &[target]);
        assert!(found.len() <= (range.end - range.start) as usize / 8 + 1);
        for (slot, v) in found {
            assert!(slot >= range.start && slot + 8 <= range.end);
            assert!(target.0 <= v && v < target.1);
        }
    }
});
