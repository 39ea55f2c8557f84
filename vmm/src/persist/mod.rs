//! Snapshots: the state of a paused VM (vCPUs, in-kernel irqchip/PIT/clock) in a versioned,
//! checksummed state file, and guest memory in a file of its own that a restore maps
//! privately (copy-on-write, loaded lazily).

pub mod memory_file;
pub mod snapshot;
pub mod state_file;
pub mod vcpu_state;
pub mod vm_snapshot;
pub mod vm_state;

#[cfg(test)]
mod tests {
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::arch::x86_64::boot::ram_regions;
    use crate::arch::x86_64::cpu_template::CpuTemplate;
    use crate::arch::x86_64::regs;
    use crate::vstate::vm::{allocate_memory, open_kvm, Vm};

    const CODE: u64 = 0x1_0000;
    const COUNTER: u64 = 0x3000;

    /// `loop: inc qword [COUNTER]; mov rax, [COUNTER]; out 0x10, al; cmp rax, 100; jne loop;`
    /// `out 0x11, al; hlt` (with the in-kernel irqchip, `hlt` alone never exits to us).
    const LOOP: &[u8] = &[
        0x48, 0xff, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, // inc qword [0x3000]
        0x48, 0x8b, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, // mov rax, [0x3000]
        0xe6, 0x10, // out 0x10, al
        0x48, 0x83, 0xf8, 0x64, // cmp rax, 100
        0x75, 0xe8, // jne loop
        0xe6, 0x11, // out 0x11, al
        0xf4, // hlt
    ];

    fn new_vcpu(kvm: &Kvm, vm: &Vm) -> VcpuFd {
        let fd = vm.fd().create_vcpu(0).unwrap();
        let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        CpuTemplate::Host.apply(&mut cpuid, 0, 1);
        fd.set_cpuid2(&cpuid).unwrap();
        fd
    }

    /// Runs until the guest writes port 0x10 `until` times (or halts); returns the values.
    fn run(fd: &mut VcpuFd, until: usize) -> (Vec<u8>, bool) {
        let mut seen = Vec::new();
        loop {
            match fd.run().unwrap() {
                VcpuExit::IoOut(0x10, data) => {
                    seen.push(data[0]);
                    if seen.len() == until {
                        return (seen, false);
                    }
                }
                VcpuExit::IoOut(0x11, _) => return (seen, true),
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }

    /// Needs /dev/kvm. A guest is stopped in the middle of an `out`, saved (vCPU, irqchip,
    /// PIT, clock, memory file, state file), restored into a new VM over a private mapping
    /// of the memory file, and continues exactly where it stopped.
    #[test]
    fn saved_guest_resumes_in_a_new_vm() {
        let kvm = open_kvm().expect("this test needs a working /dev/kvm");
        let dir = std::env::temp_dir().join(format!("vmm-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let vm = Vm::new(&kvm, allocate_memory(&ram_regions(2 << 20)).unwrap()).unwrap();
        vm.memory().write_slice(LOOP, GuestAddress(CODE)).unwrap();
        let mut fd = new_vcpu(&kvm, &vm);
        let mut sregs = fd.get_sregs().unwrap();
        regs::setup_long_mode(vm.memory(), &mut sregs).unwrap();
        fd.set_sregs(&sregs).unwrap();
        fd.set_regs(&regs::boot_regs(GuestAddress(CODE))).unwrap();

        let (first, halted) = run(&mut fd, 40);
        assert!(!halted);
        assert_eq!(first, (1..=40).collect::<Vec<u8>>());
        vcpu_state::complete_pending_io(&mut fd, 0).unwrap();
        let indices = vcpu_state::msr_indices(&kvm).unwrap();
        let vcpu = vcpu_state::save(&fd, 0, &indices).unwrap();
        let vm_wide = vm_state::save(vm.fd()).unwrap();
        memory_file::write(vm.memory(), &dir.join("memory")).unwrap();
        let ram = memory_file::layout(vm.memory());
        state_file::write(&dir.join("state"), &(vcpu, vm_wide, ram)).unwrap();
        // The original keeps running and finishes on its own.
        let (rest, halted) = run(&mut fd, usize::MAX);
        assert!(halted && rest.len() == 60);
        drop(fd);
        drop(vm);

        let (vcpu, vm_wide, ram): (
            vcpu_state::VcpuState,
            vm_state::VmState,
            memory_file::RamLayout,
        ) = state_file::read(&dir.join("state")).unwrap();
        let memory: GuestMemoryMmap = memory_file::map_private(&dir.join("memory"), &ram).unwrap();
        let vm2 = Vm::new(&kvm, memory).unwrap();
        vm_state::restore(vm2.fd(), &vm_wide).unwrap();
        let mut fd2 = new_vcpu(&kvm, &vm2);
        vcpu_state::restore(&fd2, &vcpu).unwrap();
        let (resumed, halted) = run(&mut fd2, usize::MAX);
        assert!(halted);
        assert_eq!(resumed, (41..=100).collect::<Vec<u8>>());
        assert_eq!(
            vm2.memory().read_obj::<u64>(GuestAddress(COUNTER)).unwrap(),
            100
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
