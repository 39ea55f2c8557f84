//! Snapshot state files may be damaged or crafted: decoding must never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmm::persist::state_file::decode::<(
        vmm::persist::vcpu_state::VcpuState,
        vmm::persist::vm_state::VmState,
        vmm::persist::memory_file::RamLayout,
    )>(data, "fuzz");
});
