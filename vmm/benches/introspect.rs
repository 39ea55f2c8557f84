//! Introspection speed on a captured memory image: the test fixture's snapshot of the
//! stock Debian kernel (cold-booted by the integration tests; `VMM_BENCH_SNAPSHOT=DIR`
//! picks another). The memory file is loaded into RAM first, so reads cost what they cost
//! on a live VM's mapped guest memory.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use introspect::guest::GuestKernel;
use introspect::kernel::{KallsymsFrom, Kernel};
use introspect::memory::RegionMemory;
use vmm::introspection::cpu_regs;
use vmm::persist::snapshot::{VmSnapshot, MEMORY_FILE, STATE_FILE};

fn snapshot_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("VMM_BENCH_SNAPSHOT") {
        return Some(PathBuf::from(d));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-fixtures");
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("complete").exists())
}

fn benches(c: &mut Criterion) {
    let Some(dir) = snapshot_dir() else {
        eprintln!(
            "introspect bench: no snapshot (run the integration tests once to build the fixture, \
             or set VMM_BENCH_SNAPSHOT=DIR)"
        );
        return;
    };
    let snap: VmSnapshot = vmm::persist::state_file::read(&dir.join(STATE_FILE)).unwrap();
    let mem = RegionMemory::load(&dir.join(MEMORY_FILE), &snap.ram).unwrap();
    let regs: Vec<_> = snap.vcpus.iter().map(cpu_regs).collect();
    let gk = GuestKernel::load(&mem).unwrap();
    let traces = gk.task_traces(&mem, &regs).unwrap();
    eprintln!(
        "introspect bench: {} symbols, {} BTF types, {} ORC entries, {} tasks ({} reliable traces)",
        gk.kernel.symbols.len(),
        gk.btf.type_count(),
        gk.orc.len(),
        traces.len(),
        traces.iter().filter(|t| t.trace.trace.reliable).count()
    );

    let mut g = c.benchmark_group("introspect");
    g.sample_size(20);
    g.bench_function("find_vmcoreinfo", |b| {
        b.iter(|| introspect::vmcoreinfo::find(&mem).unwrap())
    });
    g.bench_function("discover_kernel_and_kallsyms", |b| {
        b.iter(|| Kernel::discover(&mem).unwrap())
    });
    g.bench_function("discover_kernel_and_kallsyms_by_image_scan", |b| {
        b.iter(|| Kernel::discover_with(&mem, KallsymsFrom::Scan).unwrap())
    });
    g.bench_function("cold_start_kallsyms_btf_orc", |b| {
        b.iter(|| GuestKernel::load(&mem).unwrap())
    });
    g.sample_size(100);
    let syms = &gk.kernel.symbols;
    g.bench_function("lookup_by_name", |b| {
        b.iter(|| {
            syms.lookup(std::hint::black_box("sysrq_handle_showmem"), None)
                .unwrap()
        })
    });
    let addr = syms.lookup("schedule", None).unwrap().addr + 0x20;
    g.bench_function("lookup_by_address", |b| {
        b.iter(|| syms.symbolize(std::hint::black_box(addr)).unwrap())
    });
    g.bench_function("enumerate_tasks", |b| b.iter(|| gk.tasks(&mem).unwrap()));
    g.bench_function("enumerate_tasks_and_unwind_all", |b| {
        b.iter(|| gk.task_traces(&mem, &regs).unwrap())
    });
    // What a live patch's stop-the-world check does: addresses only.
    g.bench_function("enumerate_tasks_and_unwind_all_unsymbolized", |b| {
        b.iter(|| gk.task_traces_with(&mem, &regs, false).unwrap())
    });
    // The same on one thread (the check splits the unwinding from 256 tasks on).
    g.bench_function(
        "enumerate_tasks_and_unwind_all_unsymbolized_one_thread",
        |b| {
            b.iter(|| {
                gk.task_traces_split(&mem, &regs, false, usize::MAX)
                    .unwrap()
            })
        },
    );
    g.finish();
}

criterion_group!(introspect_benches, benches);
criterion_main!(introspect_benches);
