//! Probes of what this host's KVM really does, run in a throw-away two-page guest.
//!
//! The one probe so far answers: does `SYSCALL` executed by guest user mode (CPL 3) enter
//! the guest kernel at `MSR_LSTAR` in kernel mode (CPL 0), as on every x86-64 CPU?
//! On hosts whose KVM is PVM with native guest user mode it does not: the vCPU jumps to
//! LSTAR but stays at CPL 3, so the guest takes a page fault on its own syscall entry and
//! the first system call of `/init` kills it. A VMM cannot repair that from user space
//! (docs/pvm.md), so `vmm run` warns about it and `vmm host-check` reports it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::boot::ram_regions;
use crate::arch::x86_64::cpu_template::CpuTemplate;
use crate::arch::x86_64::regs::{gdt_entry, segment_from_gdt};
use crate::vstate::vcpu::{install_kick_handler, kick_signal};
use crate::vstate::vm::{allocate_memory, Vm};

/// Errors while running a probe guest.
#[derive(Debug, thiserror::Error)]
pub enum HostCheckError {
    #[error("cannot create the probe VM: {0}")]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error("cannot write probe guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM refused the probe vCPU setup ({what}): {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot install the vCPU kick handler: {0}")]
    Kick(#[from] crate::vstate::vcpu::VcpuError),
}

/// What `SYSCALL` from guest user mode did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSyscall {
    /// Entered LSTAR with the kernel code segment: the architecture's behaviour.
    EntersKernel,
    /// Jumped to LSTAR but stayed in user mode (the guest then faults on its entry code).
    StaysInUserMode,
    /// The probe guest ended some other way (described).
    Inconclusive(&'static str),
}

impl UserSyscall {
    /// One line for people.
    pub fn describe(self) -> String {
        match self {
            UserSyscall::EntersKernel => {
                "SYSCALL from guest user mode enters the kernel: ok".into()
            }
            UserSyscall::StaysInUserMode => {
                "SYSCALL from guest user mode does not enter kernel mode \
                 (this KVM jumps to LSTAR at CPL 3): guest user space dies at its first system call \
                 unless the pvm-syscall live patch completes it (vmm run --boot-patch)"
                    .into()
            }
            UserSyscall::Inconclusive(why) => format!("SYSCALL probe inconclusive: {why}"),
        }
    }
}

const GDT: u64 = 0x500;
const TSS: u64 = 0x1000;
const IDT: u64 = 0x2000;
const PML4: u64 = 0x3000;
const PDPT_LOW: u64 = 0x4000;
const PD_LOW: u64 = 0x5000;
const PDPT_HIGH: u64 = 0x6000;
const PD_HIGH: u64 = 0x7000;
const USER_STACK: u64 = 0x8000;
const KERNEL_STACK: u64 = 0x9000;
const KERNEL_CODE: u64 = 0x1_0000;
const LSTAR_CODE: u64 = 0x1_1000;
const FAULT_CODE: u64 = 0x1_2000;
const USER_CODE: u64 = 0x2_0000;
/// LSTAR points at the kernel-only alias of `LSTAR_CODE` in the top 2 GiB, like Linux's.
const KERNEL_ALIAS: u64 = 0xffff_ffff_8000_0000;
const PORT_ENTERED: u16 = 0x11;
const PORT_FAULTED: u16 = 0x12;

const KERNEL_CS: u16 = 0x10;
const USER_DS: u8 = 0x2b;
const USER_CS: u8 = 0x33;

fn mov_ecx(value: u32) -> Vec<u8> {
    let mut v = vec![0xb9];
    v.extend_from_slice(&value.to_le_bytes());
    v
}

fn wrmsr(index: u32, value: u64) -> Vec<u8> {
    let mut v = mov_ecx(index);
    v.push(0xb8); // mov eax, imm32
    v.extend_from_slice(&(value as u32).to_le_bytes());
    v.push(0xba); // mov edx, imm32
    v.extend_from_slice(&((value >> 32) as u32).to_le_bytes());
    v.extend_from_slice(&[0x0f, 0x30]);
    v
}

/// Kernel code: EFER.SCE, STAR, LSTAR, SFMASK, then `iretq` to user mode.
fn kernel_code() -> Vec<u8> {
    let mut v = mov_ecx(0xc000_0080);
    v.extend_from_slice(&[0x0f, 0x32, 0x83, 0xc8, 0x01, 0x0f, 0x30]); // rdmsr; or eax,1; wrmsr
    v.extend(wrmsr(0xc000_0081, 0x0023_0010_0000_0000)); // STAR: kernel CS 0x10, user base 0x23
    v.extend(wrmsr(0xc000_0082, KERNEL_ALIAS + LSTAR_CODE)); // LSTAR
    v.extend(wrmsr(0xc000_0084, 0x4_7700)); // SFMASK: TF IF DF IOPL NT AC
    v.extend_from_slice(&[0x6a, USER_DS]); // push ss
    v.push(0x68); // push imm32 (rsp)
    v.extend_from_slice(&(USER_STACK as u32).to_le_bytes());
    v.extend_from_slice(&[0x68, 0x02, 0x02, 0x00, 0x00]); // push rflags 0x202
    v.extend_from_slice(&[0x6a, USER_CS]); // push cs
    v.push(0x68); // push rip
    v.extend_from_slice(&(USER_CODE as u32).to_le_bytes());
    v.extend_from_slice(&[0x48, 0xcf]); // iretq
    v
}

/// Writes the probe guest: GDT with kernel and user segments and a TSS, an IDT whose every
/// exception vector reports on `PORT_FAULTED`, identity-mapped low 2 MiB (user-accessible)
/// and a kernel-only alias of it at `KERNEL_ALIAS`.
fn write_guest(mem: &vm_memory::GuestMemoryMmap) -> Result<[u64; 9], HostCheckError> {
    let gdt = [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff),       // 0x10 kernel code
        gdt_entry(0xc093, 0, 0xfffff),       // 0x18 kernel data
        gdt_entry(0xc0fb, 0, 0xfffff),       // 0x23 user code (32-bit)
        gdt_entry(0xc0f3, 0, 0xfffff),       // 0x2b user data
        gdt_entry(0xa0fb, 0, 0xfffff),       // 0x33 user code (64-bit)
        gdt_entry(0x008b, TSS as u32, 0x67), // 0x38 TSS (busy), low half
        0,                                   // TSS high half
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT + 8 * i as u64))?;
    }
    mem.write_obj(KERNEL_STACK, GuestAddress(TSS + 4))?; // rsp0
    for vector in 0..32u64 {
        let lo = (FAULT_CODE & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (0x8e00 << 32)
            | (((FAULT_CODE >> 16) & 0xffff) << 48);
        mem.write_obj(lo, GuestAddress(IDT + 16 * vector))?;
        mem.write_obj(0u64, GuestAddress(IDT + 16 * vector + 8))?;
    }
    mem.write_obj(PDPT_LOW | 0x7, GuestAddress(PML4))?;
    mem.write_obj(PD_LOW | 0x7, GuestAddress(PDPT_LOW))?;
    mem.write_obj(0x87u64, GuestAddress(PD_LOW))?; // 2 MiB at 0, user-accessible
    mem.write_obj(PDPT_HIGH | 0x3, GuestAddress(PML4 + 511 * 8))?;
    mem.write_obj(PD_HIGH | 0x3, GuestAddress(PDPT_HIGH + 510 * 8))?;
    mem.write_obj(0x83u64, GuestAddress(PD_HIGH))?; // 2 MiB at 0, kernel only
    mem.write_slice(&kernel_code(), GuestAddress(KERNEL_CODE))?;
    // LSTAR: mov eax, cs; out PORT_ENTERED, al; hlt
    mem.write_slice(
        &[0x8c, 0xc8, 0xe6, PORT_ENTERED as u8, 0xf4],
        GuestAddress(LSTAR_CODE),
    )?;
    // Exceptions: mov al, 0xee; out PORT_FAULTED, al; hlt
    mem.write_slice(
        &[0xb0, 0xee, 0xe6, PORT_FAULTED as u8, 0xf4],
        GuestAddress(FAULT_CODE),
    )?;
    // User: syscall; jmp $
    mem.write_slice(&[0x0f, 0x05, 0xeb, 0xfe], GuestAddress(USER_CODE))?;
    Ok(gdt)
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HostCheckError {
    move |source| HostCheckError::Kvm { what, source }
}

/// Runs the user-mode `SYSCALL` probe: a few thousand guest instructions, well under a
/// second even where guest kernel code is emulated.
/// A 2 MiB probe VM whose single vCPU is in 64-bit kernel mode at `KERNEL_CODE` (identity
/// mapped, IDT reporting every exception on `PORT_FAULTED`). Also used by KVM tests that
/// need a few guest instructions.
pub(crate) fn kernel_mode_guest(kvm: &Kvm) -> Result<(Vm, kvm_ioctls::VcpuFd), HostCheckError> {
    let memory = allocate_memory(&ram_regions(2 << 20))?;
    let vm = Vm::new(kvm, memory)?;
    let gdt = write_guest(vm.memory())?;
    let fd = vm.fd().create_vcpu(0).map_err(kvm_err("create vCPU"))?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("supported CPUID"))?;
    CpuTemplate::Host.apply(&mut cpuid, 0, 1);
    fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    let mut sregs = fd.get_sregs().map_err(kvm_err("get sregs"))?;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 32 * 16 - 1;
    sregs.cs = segment_from_gdt(gdt[2], 2);
    let data = segment_from_gdt(gdt[3], 3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment_from_gdt(gdt[7], 7);
    sregs.cr3 = PML4;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 1 | (1 << 4) | (1 << 31); // PE ET PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME LMA
    fd.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: KERNEL_CODE,
        rsp: KERNEL_STACK,
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(kvm_err("set regs"))?;

    Ok((vm, fd))
}

/// Where `kernel_mode_guest`'s vCPU starts (KVM tests place their code there).
#[cfg(test)]
pub(crate) const PROBE_CODE: u64 = KERNEL_CODE;

pub fn probe_user_syscall(kvm: &Kvm) -> Result<UserSyscall, HostCheckError> {
    let (_vm, mut fd) = kernel_mode_guest(kvm)?;
    // A watchdog kicks the vCPU out of KVM_RUN if the probe guest spins.
    install_kick_handler()?;
    let done = Arc::new(AtomicBool::new(false));
    let target = ThreadKick::current();
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !done.load(Ordering::Acquire) {
                if std::time::Instant::now() >= deadline {
                    target.kick();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut outcome = UserSyscall::Inconclusive("no report from the probe guest");
    for _ in 0..64 {
        match fd.run() {
            Ok(VcpuExit::IoOut(PORT_ENTERED, data)) => {
                outcome = if u16::from(data[0]) == KERNEL_CS {
                    UserSyscall::EntersKernel
                } else {
                    UserSyscall::StaysInUserMode
                };
                break;
            }
            Ok(VcpuExit::IoOut(PORT_FAULTED, _)) => {
                // The entry code at LSTAR faulted: it ran with user privileges.
                outcome = UserSyscall::StaysInUserMode;
                break;
            }
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::IoIn(..)) => {}
            Ok(VcpuExit::Hlt) => {
                outcome = UserSyscall::Inconclusive("probe guest halted without a report");
                break;
            }
            Ok(VcpuExit::Shutdown) => {
                outcome = UserSyscall::Inconclusive("probe guest triple-faulted");
                break;
            }
            Ok(VcpuExit::InternalError) => {
                outcome = UserSyscall::Inconclusive("KVM could not emulate the probe guest");
                break;
            }
            Ok(_) => {
                outcome = UserSyscall::Inconclusive("unexpected exit from the probe guest");
                break;
            }
            Err(e) if e.errno() == libc::EINTR => {
                outcome = UserSyscall::Inconclusive("probe guest did not report within 10 s");
                break;
            }
            Err(e) => {
                return Err(HostCheckError::Kvm {
                    what: "KVM_RUN",
                    source: e,
                })
            }
        }
    }
    done.store(true, Ordering::Release);
    let _ = watchdog.join();
    Ok(outcome)
}

/// A handle to send the kick signal to one thread.
struct ThreadKick(libc::pthread_t);

impl ThreadKick {
    fn current() -> Self {
        // SAFETY: pthread_self has no preconditions and always succeeds.
        ThreadKick(unsafe { libc::pthread_self() })
    }

    fn kick(&self) {
        // SAFETY: the target thread outlives the watchdog (the probe joins it before
        // returning), and the kick signal has a handler installed.
        unsafe { libc::pthread_kill(self.0, kick_signal()) };
    }
}

// SAFETY: a pthread_t is an opaque id that may be used from any thread.
unsafe impl Send for ThreadKick {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vm::open_kvm;

    #[test]
    fn probe_code_is_well_formed() {
        let code = kernel_code();
        assert_eq!(&code[code.len() - 2..], &[0x48, 0xcf]);
        let w = wrmsr(0xc000_0082, 0xffff_ffff_8001_1000);
        assert_eq!(
            w,
            [
                0xb9, 0x82, 0, 0, 0xc0, 0xb8, 0, 0x10, 1, 0x80, 0xba, 0xff, 0xff, 0xff, 0xff, 0x0f,
                0x30
            ]
        );
    }

    /// Needs /dev/kvm; fails (never skips) without it. On a hardware-assisted KVM the
    /// architecture's answer is required; on PVM either definite answer is accepted and
    /// printed, because it is exactly what the probe exists to find out.
    #[test]
    fn user_syscall_probe_gives_a_definite_answer() {
        let kvm = open_kvm().expect("this test needs a working /dev/kvm");
        let outcome = probe_user_syscall(&kvm).unwrap();
        eprintln!("{}", outcome.describe());
        assert!(
            !matches!(outcome, UserSyscall::Inconclusive(_)),
            "{}",
            outcome.describe()
        );
        if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
            assert_eq!(outcome, UserSyscall::EntersKernel);
        }
    }
}
