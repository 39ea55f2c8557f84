//! The JSON view of a paused vCPU's registers (`GET /vm/vcpus`, docs/api.md).

use kvm_bindings::{kvm_dtable, kvm_segment};
use serde_json::{json, Value};

use crate::persist::vcpu_state::VcpuState;

/// MSRs shown by name (value `null` when KVM does not save that MSR on this host).
/// FS_BASE, GS_BASE and EFER come from the special registers, which KVM keeps in sync.
pub const NAMED_MSRS: &[(&str, u32)] = &[
    ("kernel_gs_base", 0xc000_0102),
    ("lstar", 0xc000_0082),
    ("star", 0xc000_0081),
    ("cstar", 0xc000_0083),
    ("syscall_mask", 0xc000_0084),
    ("sysenter_cs", 0x174),
    ("sysenter_esp", 0x175),
    ("sysenter_eip", 0x176),
    ("tsc", 0x10),
    ("pat", 0x277),
];

fn segment(s: &kvm_segment) -> Value {
    json!({
        "selector": s.selector, "base": s.base, "limit": s.limit, "type": s.type_,
        "present": s.present, "dpl": s.dpl, "db": s.db, "s": s.s, "l": s.l, "g": s.g,
        "unusable": s.unusable,
    })
}

fn table(t: &kvm_dtable) -> Value {
    json!({ "base": t.base, "limit": t.limit })
}

/// Registers, control registers, segments, descriptor tables and the named MSRs of one
/// vCPU; every number is an unsigned integer.
pub fn vcpu_json(s: &VcpuState) -> Value {
    let r = &s.regs;
    let sr = &s.sregs;
    let mut msrs = serde_json::Map::new();
    for (name, index) in NAMED_MSRS {
        let value = s.msrs.iter().find(|m| m.0 == *index).map(|m| m.1);
        msrs.insert((*name).to_string(), json!(value));
    }
    msrs.insert("gs_base".into(), json!(sr.gs.base));
    msrs.insert("fs_base".into(), json!(sr.fs.base));
    msrs.insert("efer".into(), json!(sr.efer));
    json!({
        "id": s.id,
        "mp_state": s.mp_state.mp_state,
        "regs": {
            "rip": r.rip, "rflags": r.rflags, "rsp": r.rsp, "rbp": r.rbp,
            "rax": r.rax, "rbx": r.rbx, "rcx": r.rcx, "rdx": r.rdx, "rsi": r.rsi, "rdi": r.rdi,
            "r8": r.r8, "r9": r.r9, "r10": r.r10, "r11": r.r11,
            "r12": r.r12, "r13": r.r13, "r14": r.r14, "r15": r.r15,
        },
        "sregs": {
            "cr0": sr.cr0, "cr2": sr.cr2, "cr3": sr.cr3, "cr4": sr.cr4, "cr8": sr.cr8,
            "efer": sr.efer, "apic_base": sr.apic_base,
            "cs": segment(&sr.cs), "ds": segment(&sr.ds), "es": segment(&sr.es),
            "fs": segment(&sr.fs), "gs": segment(&sr.gs), "ss": segment(&sr.ss),
            "tr": segment(&sr.tr), "ldt": segment(&sr.ldt),
            "gdt": table(&sr.gdt), "idt": table(&sr.idt),
        },
        "msrs": msrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_registers_segments_and_msrs() {
        // Every KVM state struct is plain data with a Default.
        let mut s = VcpuState {
            id: 1,
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Vec::new(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![(0xc000_0102, 0xffff_8880_1234_0000), (0xc000_0082, 0x42)],
            events: Default::default(),
        };
        s.regs.rip = 0xffff_ffff_8100_0000;
        s.sregs.cr0 = 0x8005_0033;
        s.sregs.cs.selector = 0x10;
        s.sregs.cs.l = 1;
        s.sregs.gs.base = 0x77;
        s.sregs.efer = 0xd01;
        let v = vcpu_json(&s);
        assert_eq!(v["id"], 1);
        assert_eq!(v["regs"]["rip"], 0xffff_ffff_8100_0000u64);
        assert_eq!(v["sregs"]["cr0"], 0x8005_0033u64);
        assert_eq!(v["sregs"]["cs"]["selector"], 0x10);
        assert_eq!(v["sregs"]["cs"]["l"], 1);
        assert_eq!(v["msrs"]["kernel_gs_base"], 0xffff_8880_1234_0000u64);
        assert_eq!(v["msrs"]["lstar"], 0x42);
        assert_eq!(v["msrs"]["gs_base"], 0x77);
        assert_eq!(v["msrs"]["efer"], 0xd01);
        assert!(v["msrs"]["sysenter_eip"].is_null());
    }
}
