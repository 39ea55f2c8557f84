//! CPU templates: which CPUID features the guest sees, and the guest kernel
//! options that go with them.
//!
//! On a PVM host (see `docs/pvm.md`) guest kernel code runs in KVM's instruction
//! emulator, which lacks SIMD, the xsave family, `cmpxchg16b` and a few others, and
//! CPUID is only partly under our control: bits the host KVM does not report leak
//! through. The `conservative` template therefore both masks CPUID and asks the
//! guest kernel itself to drop those features (`clearcpuid=`, `noxsave`, ...), so the
//! kernel never patches such instructions in. Everything that is specific to
//! slow, emulated guest kernels lives here and nowhere else.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A named set of CPUID masks plus the guest options it needs.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    clap::ValueEnum,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CpuTemplate {
    /// `pvm` when the host's KVM is PVM (guest kernel code emulated), else `conservative`.
    #[default]
    Auto,
    /// `conservative` plus guest options that trim boot work which takes minutes when guest
    /// kernel code is emulated, and silence watchdogs that misfire there.
    Pvm,
    /// Hide features an instruction emulator cannot execute; safe on any host.
    Conservative,
    /// Pass through everything KVM supports; for hardware-assisted KVM.
    Host,
}

/// Where a loaded `kvm_pvm` module shows up.
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// One feature bit to clear: (leaf, subleaf or None for any, register, bit, name).
struct Mask {
    leaf: u32,
    reg: Reg,
    bit: u32,
}

#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

const fn m(leaf: u32, reg: Reg, bit: u32) -> Mask {
    Mask { leaf, reg, bit }
}

/// CPUID bits hidden by the conservative template (SDM vol. 2A, CPUID).
const CONSERVATIVE_MASKS: &[Mask] = &[
    // Leaf 1 ECX: pclmulqdq, ssse3, fma, cx16, sse4.1, sse4.2, movbe, popcnt, aes, xsave, osxsave, avx, f16c, rdrand.
    m(1, Reg::Ecx, 1),
    m(1, Reg::Ecx, 9),
    m(1, Reg::Ecx, 12),
    m(1, Reg::Ecx, 13),
    m(1, Reg::Ecx, 19),
    m(1, Reg::Ecx, 20),
    m(1, Reg::Ecx, 22),
    m(1, Reg::Ecx, 23),
    m(1, Reg::Ecx, 25),
    m(1, Reg::Ecx, 26),
    m(1, Reg::Ecx, 27),
    m(1, Reg::Ecx, 28),
    m(1, Reg::Ecx, 29),
    m(1, Reg::Ecx, 30),
    // Leaf 7 EBX: fsgsbase, bmi1, hle, avx2, bmi2, invpcid, rtm, avx512f, avx512dq, rdseed, adx, smap,
    // avx512ifma, clflushopt, clwb, avx512pf, avx512er, avx512cd, sha, avx512bw, avx512vl.
    m(7, Reg::Ebx, 0),
    m(7, Reg::Ebx, 3),
    m(7, Reg::Ebx, 4),
    m(7, Reg::Ebx, 5),
    m(7, Reg::Ebx, 8),
    m(7, Reg::Ebx, 10),
    m(7, Reg::Ebx, 11),
    m(7, Reg::Ebx, 16),
    m(7, Reg::Ebx, 17),
    m(7, Reg::Ebx, 18),
    m(7, Reg::Ebx, 19),
    m(7, Reg::Ebx, 20),
    m(7, Reg::Ebx, 21),
    m(7, Reg::Ebx, 23),
    m(7, Reg::Ebx, 24),
    m(7, Reg::Ebx, 26),
    m(7, Reg::Ebx, 27),
    m(7, Reg::Ebx, 28),
    m(7, Reg::Ebx, 29),
    m(7, Reg::Ebx, 30),
    m(7, Reg::Ebx, 31),
    // Leaf 7 ECX: avx512vbmi, pku, ospke, waitpkg, avx512vbmi2, gfni, vaes, vpclmulqdq, avx512vnni,
    // avx512bitalg, avx512vpopcntdq, la57, rdpid, movdiri, movdir64b.
    m(7, Reg::Ecx, 1),
    m(7, Reg::Ecx, 3),
    m(7, Reg::Ecx, 4),
    m(7, Reg::Ecx, 5),
    m(7, Reg::Ecx, 6),
    m(7, Reg::Ecx, 8),
    m(7, Reg::Ecx, 9),
    m(7, Reg::Ecx, 10),
    m(7, Reg::Ecx, 11),
    m(7, Reg::Ecx, 12),
    m(7, Reg::Ecx, 14),
    m(7, Reg::Ecx, 16),
    m(7, Reg::Ecx, 22),
    m(7, Reg::Ecx, 27),
    m(7, Reg::Ecx, 28),
    // Extended leaf 0x8000_0001 ECX: lzcnt (abm), sse4a, xop, fma4, tbm; EDX: rdtscp.
    m(0x8000_0001, Reg::Ecx, 5),
    m(0x8000_0001, Reg::Ecx, 6),
    m(0x8000_0001, Reg::Ecx, 11),
    m(0x8000_0001, Reg::Ecx, 16),
    m(0x8000_0001, Reg::Ecx, 21),
    m(0x8000_0001, Reg::Edx, 27),
];

/// Guest kernel options of the conservative template (features), and why each is there:
/// - `noxsave`: the emulator cannot run xsave/xrstor, and CPUID masking alone does not stop the kernel;
/// - `nofsgsbase`, `clearcpuid=...`: make the kernel drop features whose CPUID bits leak from the host
///   before it patches its alternatives (SIMD crypto/RAID code, popcnt in hweight, rdpid/rdtscp, smap's clac/stac).
///   The AVX family needs no entry: it depends on xsave, which `noxsave` removes. The kernel copies the
///   value into a 128-byte buffer (`cpu_parse_early_param`), so the list must stay short;
const CONSERVATIVE_GUEST_OPTIONS: &[&str] = &[
    "noxsave",
    "nofsgsbase",
    "clearcpuid=popcnt,smap,rdtscp,rdpid,sse4_2,sse4_1,ssse3,aes,pclmulqdq,sha_ni,movbe,rdrand,rdseed,adx,bmi1,bmi2,clflushopt,clwb",
];

/// Extra guest options of the pvm template (speed on emulated-kernel hosts), and why:
/// - `initcall_blacklist=`
///   - `ftrace_check_for_weak_functions`: a boot-time ftrace check doing tens of thousands of
///     kallsyms lookups (it only hides tracing of overridden weak functions);
///   - `trace_eval_init`, `tracer_init_tracefs`: populating tracefs and rewriting enum names in
///     every trace event format runs on a workqueue that boot waits for at late_initcall_sync;
///     emulated, it takes many minutes. The guest then has no tracefs event files;
/// - `cryptomgr.notests`: skip the crypto self-tests; algorithm registration waits for them, and the
///   RSA test vectors' private-key operations take many minutes emulated (built-in X.509 certificate
///   loading then times out with -110 on top);
/// - `nosoftlockup`, `rcupdate.rcu_cpu_stall_suppress=1`: emulated kernel code is slow enough to trip
///   the soft-lockup and RCU stall detectors spuriously (single initcalls run for minutes);
/// - `tsc=reliable`: skip the clocksource watchdog, which misjudges an emulated TSC.
const PVM_GUEST_OPTIONS: &[&str] = &[
    "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,tracer_init_tracefs",
    "cryptomgr.notests",
    "nosoftlockup",
    "rcupdate.rcu_cpu_stall_suppress=1",
    "tsc=reliable",
];

impl CpuTemplate {
    /// Resolves `Auto` for this host; other templates are returned as they are.
    pub fn resolve(self) -> Self {
        self.resolve_with(std::path::Path::new(PVM_MODULE).exists())
    }

    fn resolve_with(self, host_is_pvm: bool) -> Self {
        match self {
            CpuTemplate::Auto if host_is_pvm => CpuTemplate::Pvm,
            CpuTemplate::Auto => CpuTemplate::Conservative,
            other => other,
        }
    }

    /// The template's name as accepted by `--cpu-template`.
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Auto => "auto",
            CpuTemplate::Pvm => "pvm",
            CpuTemplate::Conservative => "conservative",
            CpuTemplate::Host => "host",
        }
    }

    /// Guest kernel command-line options this template needs (`Auto` is resolved first).
    pub fn guest_options(self) -> Vec<&'static str> {
        match self.resolve() {
            CpuTemplate::Pvm => [CONSERVATIVE_GUEST_OPTIONS, PVM_GUEST_OPTIONS].concat(),
            CpuTemplate::Conservative => CONSERVATIVE_GUEST_OPTIONS.to_vec(),
            CpuTemplate::Host | CpuTemplate::Auto => Vec::new(),
        }
    }

    fn masks_cpuid(self) -> bool {
        matches!(self.resolve(), CpuTemplate::Pvm | CpuTemplate::Conservative)
    }

    fn masks_pv_wakeups(self) -> bool {
        self.resolve() == CpuTemplate::Pvm
    }

    /// Applies the template and the per-vCPU topology (APIC ids) to a CPUID table
    /// obtained from `KVM_GET_SUPPORTED_CPUID`.
    pub fn apply(self, cpuid: &mut CpuId, vcpu_id: u8, num_cpus: u8) {
        let mask = self.masks_cpuid();
        let mask_pv = self.masks_pv_wakeups();
        for entry in cpuid.as_mut_slice() {
            if mask {
                apply_masks(entry, CONSERVATIVE_MASKS);
            }
            if mask_pv && entry.function == KVM_CPUID_FEATURES {
                entry.eax &= !PV_WAKEUP_FEATURES;
            }
            set_topology(entry, vcpu_id, num_cpus);
        }
    }
}

fn apply_masks(entry: &mut kvm_cpuid_entry2, masks: &[Mask]) {
    // Leaf 7 masks apply to subleaf 0 only.
    if entry.function == 7 && entry.index != 0 {
        return;
    }
    for mask in masks.iter().filter(|m| m.leaf == entry.function) {
        let reg = match mask.reg {
            Reg::Ebx => &mut entry.ebx,
            Reg::Ecx => &mut entry.ecx,
            Reg::Edx => &mut entry.edx,
        };
        *reg &= !(1 << mask.bit);
    }
    // Without xsave the xsave leaf must not advertise state components.
    if entry.function == 0xd {
        entry.eax = 0;
        entry.ebx = 0;
        entry.ecx = 0;
        entry.edx = 0;
    }
}

/// KVM's paravirtual feature leaf (`KVM_CPUID_FEATURES`).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// Paravirtual features that replace cross-CPU wakeups with hypercalls: PV_UNHALT (7, PV
/// spinlock kicks), PV_TLB_FLUSH (9), PV_SEND_IPI (11), PV_SCHED_YIELD (13). On PVM a 2-vCPU boot
/// hung with one vCPU waiting in smp_call_function for an IPI the other never served; without
/// these the guest sends plain x2APIC IPIs through the in-kernel LAPIC.
const PV_WAKEUP_FEATURES: u32 = (1 << 7) | (1 << 9) | (1 << 11) | (1 << 13);

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

fn set_topology(entry: &mut kvm_cpuid_entry2, vcpu_id: u8, num_cpus: u8) {
    match entry.function {
        1 => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
            entry.ebx = (entry.ebx & 0x0000_ffff)
                | (u32::from(vcpu_id) << 24)
                | (u32::from(num_cpus) << 16);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if num_cpus > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            }
        }
        0xb | 0x1f => entry.edx = u32::from(vcpu_id),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    fn table() -> CpuId {
        CpuId::from_entries(&[
            entry(1, 0),
            entry(7, 0),
            entry(7, 1),
            entry(0xd, 0),
            entry(0x8000_0001, 0),
            entry(0xb, 0),
        ])
        .unwrap()
    }

    #[test]
    fn conservative_hides_emulator_hostile_features() {
        let mut cpuid = table();
        CpuTemplate::Conservative.apply(&mut cpuid, 1, 2);
        let e = cpuid.as_slice();
        let leaf1 = e[0];
        assert_eq!(leaf1.ecx & (1 << 13), 0, "cx16");
        assert_eq!(leaf1.ecx & (1 << 26), 0, "xsave");
        assert_eq!(leaf1.ecx & (1 << 23), 0, "popcnt");
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(leaf1.ebx >> 24, 1, "apic id");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 2, "logical count");
        let leaf7 = e[1];
        assert_eq!(leaf7.ebx & 1, 0, "fsgsbase");
        assert_eq!(leaf7.ebx & (1 << 20), 0, "smap");
        assert_eq!(leaf7.ecx & (1 << 22), 0, "rdpid");
        assert_eq!(e[2].ebx, u32::MAX, "leaf 7 subleaf 1 untouched");
        assert_eq!((e[3].eax, e[3].ebx), (0, 0), "xsave leaf emptied");
        assert_eq!(e[4].edx & (1 << 27), 0, "rdtscp");
        assert_eq!(e[5].edx, 1, "x2apic id");
        assert!(CpuTemplate::Conservative
            .guest_options()
            .contains(&"noxsave"));
    }

    #[test]
    fn clearcpuid_fits_the_kernels_buffer() {
        // arch/x86/kernel/cpu/common.c reads the value into `char arg[128]`: longer lists are cut.
        let value = CONSERVATIVE_GUEST_OPTIONS
            .iter()
            .find_map(|o| o.strip_prefix("clearcpuid="))
            .unwrap();
        assert!(
            value.len() < 128,
            "clearcpuid value is {} bytes",
            value.len()
        );
        for must in ["popcnt", "smap", "rdtscp", "rdpid", "sse4_2"] {
            assert!(value.split(',').any(|f| f == must), "{must} missing");
        }
    }

    #[test]
    fn auto_resolves_by_host_kind() {
        assert_eq!(CpuTemplate::Auto.resolve_with(true), CpuTemplate::Pvm);
        assert_eq!(
            CpuTemplate::Auto.resolve_with(false),
            CpuTemplate::Conservative
        );
        assert_eq!(CpuTemplate::Host.resolve_with(true), CpuTemplate::Host);
        let pvm = CpuTemplate::Pvm.guest_options();
        assert!(pvm.contains(&"noxsave") && pvm.contains(&"nosoftlockup"));
        let conservative = CpuTemplate::Conservative.guest_options();
        assert!(conservative.contains(&"noxsave") && !conservative.contains(&"nosoftlockup"));
        let mut cpuid = table();
        CpuTemplate::Pvm.apply(&mut cpuid, 0, 1);
        assert_eq!(
            cpuid.as_slice()[0].ecx & (1 << 13),
            0,
            "pvm masks like conservative"
        );
    }

    #[test]
    fn host_template_only_sets_topology() {
        let mut cpuid = table();
        CpuTemplate::Host.apply(&mut cpuid, 0, 1);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx, u32::MAX);
        assert_eq!(e[0].ebx >> 24, 0);
        assert_eq!(e[1].ebx, u32::MAX);
        assert!(CpuTemplate::Host.guest_options().is_empty());
    }
}
