//! The VMM's side of guest introspection: a live VM's (or a snapshot's) memory and vCPU
//! registers as `introspect`'s two inputs, the guest kernel loaded once per VM, and the
//! task/stack report the API and the CLI print (`vmm ps`, `vmm stack`).

use std::path::Path;
use std::time::{Duration, Instant};

use introspect::cpu::{CpuRegs, Vcpus};
use introspect::guest::{GuestError, GuestKernel, TaskStackTrace};
use introspect::host_code::HostCode;
use introspect::kallsyms::{LookupError, Symbol, SymbolTable};
use introspect::memory::{FileMemory, GuestPhysMemory, MemError};
use introspect::modules::{Module, ModuleCode, ModuleSymbol};
use introspect::orc::FrameKind;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::{PATCH_AREA_SIZE, PATCH_AREA_START, PATCH_TABLE_START};
use crate::arch::x86_64::regs::MSR_KERNEL_GS_BASE;
use crate::builder::RunningVm;
use crate::persist::snapshot::{VmSnapshot, MEMORY_FILE, STATE_FILE};
use crate::persist::vcpu_state::{KernelView, VcpuState};
use kvm_bindings::{kvm_regs, kvm_sregs};

/// Guest-physical memory of a live VM.
pub struct LiveMemory<'a>(pub &'a GuestMemoryMmap);

impl GuestPhysMemory for LiveMemory<'_> {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        // The walks read many small pieces: one region lookup and one volatile copy
        // (`get_slice`), rather than `read_slice`'s general iteration over regions
        // (three times slower for 8 bytes). A read across regions takes the general path.
        if let Ok(slice) = self.0.get_slice(GuestAddress(gpa), buf.len()) {
            if slice.copy_to(buf) == buf.len() {
                return Ok(());
            }
        }
        self.0
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemError::Unbacked(gpa))
    }

    fn regions(&self) -> Vec<(u64, u64)> {
        self.0.iter().map(|r| (r.start_addr().0, r.len())).collect()
    }
}

/// The registers introspection reads, from a saved (or paused) vCPU.
pub fn cpu_regs(s: &VcpuState) -> CpuRegs {
    regs_of(
        &s.regs,
        &s.sregs,
        s.msrs
            .iter()
            .find(|(i, _)| *i == MSR_KERNEL_GS_BASE)
            .map_or(0, |(_, v)| *v),
    )
}

/// The same from the light register read of a paused vCPU.
pub fn view_regs(v: &KernelView) -> CpuRegs {
    regs_of(&v.regs, &v.sregs, v.kernel_gs_base)
}

fn regs_of(regs: &kvm_regs, sregs: &kvm_sregs, kernel_gs_base: u64) -> CpuRegs {
    CpuRegs {
        rip: regs.rip,
        rsp: regs.rsp,
        rbp: regs.rbp,
        rdi: regs.rdi,
        rdx: regs.rdx,
        r10: regs.r10,
        r13: regs.r13,
        cs: sregs.cs.selector,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        gs_base: sregs.gs.base,
        kernel_gs_base,
    }
}

/// A snapshot opened for offline introspection.
pub struct SnapshotView {
    pub memory: FileMemory,
    pub regs: Vec<CpuRegs>,
    /// The code of the live patches applied when the snapshot was taken.
    pub host_code: Vec<HostCode>,
}

/// The code of the applied live-patch bundles, for the unwinder and the symbolizer.
pub fn host_code(ledger: &patcher::ledger::Ledger) -> Vec<HostCode> {
    ledger
        .patch_code()
        .map(|(name, code)| {
            HostCode::new(
                name,
                code.text.0,
                code.text.1,
                &code.orc,
                code.functions.iter().cloned(),
            )
        })
        .collect()
}

impl SnapshotView {
    pub fn open(dir: &Path) -> Result<Self, String> {
        let snap: VmSnapshot = crate::persist::state_file::read(&dir.join(STATE_FILE))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let memory = FileMemory::open(&dir.join(MEMORY_FILE), &snap.ram)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(SnapshotView {
            memory,
            regs: snap.vcpus.iter().map(cpu_regs).collect(),
            host_code: snap
                .live_patch
                .as_ref()
                .map(|lp| host_code(&lp.ledger))
                .unwrap_or_default(),
        })
    }
}

fn trace_json(t: &TaskStackTrace) -> Value {
    let tr = &t.trace;
    json!({
        "frames": tr.trace.frames.iter().zip(&tr.symbols)
            .filter(|(f, _)| f.kind != FrameKind::UserRegs)
            .map(|(f, s)| json!({
            "ip": format!("{:#x}", f.ip),
            "symbol": s,
        })).collect::<Vec<_>>(),
        "reliable": tr.trace.reliable,
        "problem": tr.trace.problem,
        "ended_in_user": tr.trace.ended_in_user,
    })
}

/// The task list (and, with `stacks`, every task's trace) as the API returns it.
pub fn tasks_report(
    gk: &GuestKernel,
    mem: &dyn GuestPhysMemory,
    vcpus: &dyn Vcpus,
    stacks: bool,
) -> Result<Value, String> {
    let list = gk.task_traces(mem, vcpus).map_err(|e| e.to_string())?;
    let tasks: Vec<Value> = list
        .iter()
        .map(|t| {
            let k = &t.task;
            let mut v = json!({
                "pid": k.pid,
                "tgid": k.tgid,
                "comm": k.comm,
                "state": k.state_letter().to_string(),
                "cpu": k.cpu,
                "current_on": k.current_on,
                "kthread": k.is_kthread(),
                "idle": k.is_idle(),
                "task": format!("{:#x}", k.addr),
                "stack": format!("{:#x}", k.stack),
                "saved_sp": format!("{:#x}", k.saved_sp),
            });
            if stacks {
                v["trace"] = trace_json(t);
            }
            v
        })
        .collect();
    Ok(json!({ "tasks": tasks }))
}

/// `/proc/kallsyms` lines: every symbol (the core kernel's, then each module's with its
/// name in brackets, as the kernel lists them), or the named ones (`name` or
/// `name,sympos`; a name the core kernel lacks is looked up in the modules).
pub fn symbol_lines(
    table: &SymbolTable,
    modules: &[Module],
    names: &[String],
) -> Result<Vec<String>, String> {
    let line = |s: &Symbol| format!("{:016x} {} {}", s.addr, s.kind, s.name);
    let module_line = |m: &Module, s: &ModuleSymbol| {
        format!("{:016x} {} {}\t[{}]", s.addr, s.kind, s.name, m.name)
    };
    if names.is_empty() {
        let core = table.symbols().iter().map(line);
        let mods = modules
            .iter()
            .flat_map(|m| m.symbols.iter().map(move |s| module_line(m, s)));
        return Ok(core.chain(mods).collect());
    }
    names
        .iter()
        .map(|n| {
            let (name, pos) = match n.split_once(',') {
                Some((a, b)) => (
                    a,
                    Some(b.parse::<u32>().map_err(|_| format!("bad sympos in {n}"))?),
                ),
                None => (n.as_str(), None),
            };
            match table.lookup(name, pos) {
                Ok(s) => Ok(line(s)),
                Err(e @ LookupError::NotFound(_)) if pos.is_none() => modules
                    .iter()
                    .find_map(|m| {
                        let s = m.symbols.iter().find(|s| s.name == name)?;
                        Some(module_line(m, s))
                    })
                    .ok_or_else(|| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .collect()
}

/// `GET /kernel/symbols`'s answer. A module list that cannot be read (a module
/// half-loaded when the vCPUs stopped, or a damaged list) does not hide the core kernel's
/// symbols: they are listed and `modules_error` says why the modules are not.
pub fn symbols_report(
    gk: &GuestKernel,
    modules: Result<Vec<Module>, GuestError>,
    names: &[String],
) -> Result<Value, String> {
    let (modules, error) = match modules {
        Ok(m) => (m, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let lines = symbol_lines(&gk.kernel.symbols, &modules, names)?;
    Ok(json!({ "symbols": lines, "modules_error": error }))
}

/// `vmm modules` / `GET /kernel/modules`: each loaded module as `/proc/modules` gives it
/// (name, core size, state, core address), with its text size and ORC entry count.
pub fn modules_report(modules: Result<Vec<ModuleCode>, GuestError>) -> Result<Value, String> {
    let modules = modules.map_err(|e| e.to_string())?;
    let list: Vec<Value> = modules
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "size": m.core.1 - m.core.0,
                "state": match m.state {
                    0 => "Live",
                    1 => "Loading",
                    2 => "Unloading",
                    _ => "unknown",
                },
                "address": format!("{:#x}", m.core.0),
                "text_size": m.text.1 - m.text.0,
                "orc_entries": m.orc.map_or(0, |o| o.2),
            })
        })
        .collect();
    Ok(json!({ "modules": list }))
}

/// The kernel summary `vmm kernel` prints.
pub fn kernel_report(gk: &GuestKernel) -> Value {
    let k = &gk.kernel;
    json!({
        "release": k.release,
        "build_id": k.build_id,
        "kaslr_offset": format!("{:#x}", k.kaslr_offset),
        "phys_base": format!("{:#x}", k.image.phys_base),
        "direct_map_base": k.direct_map_base.map(|v| format!("{v:#x}")),
        "vmalloc_base": k.vmalloc_base.map(|v| format!("{v:#x}")),
        "vmemmap_base": k.vmemmap_base.map(|v| format!("{v:#x}")),
        "banner": k.banner,
        "paging_levels": gk.page_tables.levels(),
        "symbols": k.symbols.len(),
        "kallsyms_found": k.kallsyms_found.to_string(),
        "btf_types": gk.btf.type_count(),
        "orc_entries": gk.orc.len(),
    })
}

/// How long the guest kernel's tables stay loaded without use.
pub const KERNEL_CACHE_IDLE: Duration = Duration::from_secs(30);

/// Gives the heap's free pages back to the host (the allocator keeps them otherwise).
fn release_free_heap() {
    // SAFETY: malloc_trim only releases free memory of glibc's heap; it touches no
    // memory this program uses and takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A guest kernel being loaded on a thread of its own.
pub type KernelPreload = std::thread::JoinHandle<Result<GuestKernel, String>>;

impl RunningVm {
    /// Starts loading the guest kernel (kallsyms, BTF, ORC, task layout: read-only kernel
    /// tables, so reading them while the vCPUs run is sound) on a thread of its own, so
    /// that the first patch or introspection request does not wait for it. Called after a
    /// restore, where the kernel is known to be up; a cold-booted VM loads on first use.
    pub fn preload_guest_kernel(&mut self) {
        let mem = self.vm.memory().clone();
        self.kernel_used_at = Instant::now();
        self.kernel_loading = std::thread::Builder::new()
            .name("kernel-preload".into())
            .spawn(move || GuestKernel::load(&LiveMemory(&mem)).map_err(|e| e.to_string()))
            .ok();
    }

    /// The guest kernel: the preloaded one when the preload worked, else loaded now (it is
    /// read-only kernel data, valid for the life of this boot).
    pub fn guest_kernel(&mut self) -> Result<&GuestKernel, String> {
        if self.kernel.is_none() {
            if let Some(Ok(Ok(gk))) = self.kernel_loading.take().map(|h| h.join()) {
                self.kernel = Some(gk);
            }
        }
        if self.kernel.is_none() {
            let gk = GuestKernel::load(&LiveMemory(self.vm.memory()))
                .map_err(|e| format!("cannot find the guest kernel in memory: {e}"))?;
            self.kernel = Some(gk);
        }
        self.kernel_used_at = Instant::now();
        let gk = self.kernel.as_mut().expect("loaded above");
        gk.set_host_code(host_code(&self.ledger));
        Ok(gk)
    }

    /// Drops the guest kernel's tables (kallsyms, BTF, ORC: tens of MiB of host memory)
    /// once nothing has used them for [`KERNEL_CACHE_IDLE`] and no patch transition needs
    /// them; the next use loads them again (tens of milliseconds).
    pub(crate) fn drop_idle_guest_kernel(&mut self) {
        let loaded = self.kernel.is_some()
            || self
                .kernel_loading
                .as_ref()
                .is_some_and(|h| h.is_finished());
        if !loaded
            || self.patch_in_flight.is_some()
            || self.boot_patching.is_some()
            || self.kernel_used_at.elapsed() < KERNEL_CACHE_IDLE
        {
            return;
        }
        self.kernel = None;
        if let Some(preload) = self.kernel_loading.take() {
            let _ = preload.join();
        }
        release_free_heap();
        tracing::debug!("guest kernel tables dropped after {KERNEL_CACHE_IDLE:?} unused");
    }

    /// `GET /tasks`: pauses the vCPUs for the walk (unless already paused).
    pub fn tasks_json(&mut self, stacks: bool) -> Result<Value, String> {
        self.guest_kernel()?;
        let gk = self.kernel.as_ref().expect("loaded");
        self.with_paused(|p| {
            let regs: Vec<CpuRegs> = p
                .kernel_views()
                .map_err(|e| e.to_string())?
                .iter()
                .map(view_regs)
                .collect();
            tasks_report(gk, &LiveMemory(p.memory()), &regs, stacks)
        })
        .map_err(|e| e.to_string())?
    }

    /// `GET /kernel/symbols[?names=A;B,2]`: the module list is read with the vCPUs
    /// paused (modules come and go), unless every name is found in vmlinux.
    pub fn symbols_json(&mut self, names: &[String]) -> Result<Value, String> {
        self.guest_kernel()?;
        let gk = self.kernel.as_ref().expect("loaded");
        // Names that vmlinux has are answered without pausing the guest for the module walk.
        if !names.is_empty() {
            if let Ok(lines) = symbol_lines(&gk.kernel.symbols, &[], names) {
                return Ok(json!({ "symbols": lines, "modules_error": null }));
            }
        }
        let modules = self
            .with_paused(|p| gk.modules(&LiveMemory(p.memory())))
            .map_err(|e| e.to_string())?;
        symbols_report(gk, modules, names)
    }

    /// `GET /kernel/modules`: the module list is read with the vCPUs paused.
    pub fn modules_json(&mut self) -> Result<Value, String> {
        self.guest_kernel()?;
        let gk = self.kernel.as_ref().expect("loaded");
        let modules = self
            .with_paused(|p| gk.module_code(&LiveMemory(p.memory())))
            .map_err(|e| e.to_string())?;
        modules_report(modules)
    }

    /// `GET /kernel`.
    pub fn kernel_json(&mut self) -> Result<Value, String> {
        self.guest_kernel().map(kernel_report)
    }

    /// `GET /kernel/digest`: SHA-256 of the kernel's core text (`_stext`..`_etext`) and
    /// of the whole patch area, read in one pause so the two belong to one instant. What a
    /// refused patch must leave exactly as it was.
    pub fn kernel_digest_json(&mut self) -> Result<Value, String> {
        self.guest_kernel()?;
        let gk = self.kernel.as_ref().expect("loaded");
        let sym = |n: &str| {
            gk.kernel
                .symbols
                .lookup(n, None)
                .map(|s| s.addr)
                .map_err(|e| e.to_string())
        };
        let (start, end) = (sym("_stext")?, sym("_etext")?);
        if end <= start || end - start > 256 << 20 {
            return Err(format!("kernel text {start:#x}..{end:#x} is implausible"));
        }
        let text_pa = gk.kernel.image.pa(start);
        let digest = |mem: &GuestMemoryMmap, pa: u64, len: u64| -> Result<String, String> {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                mem.read_slice(&mut buf[..n], GuestAddress(pa + done))
                    .map_err(|e| format!("guest memory at {:#x}: {e}", pa + done))?;
                hasher.update(&buf[..n]);
                done += n as u64;
            }
            Ok(hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect())
        };
        // The area's page table (its PTEs are part of what a patch changes).
        let table = self.patch_area.map_or(PATCH_TABLE_START, |a| a.table_gpa);
        let (text, area, ptes) = self
            .with_paused(|p| {
                Ok::<_, String>((
                    digest(p.memory(), text_pa, end - start)?,
                    digest(p.memory(), PATCH_AREA_START, PATCH_AREA_SIZE)?,
                    digest(p.memory(), table, 4096)?,
                ))
            })
            .map_err(|e| e.to_string())??;
        Ok(json!({
            "kernel_text": { "start": format!("{start:#x}"), "end": format!("{end:#x}"), "sha256": text },
            "patch_area": { "start": format!("{PATCH_AREA_START:#x}"), "size": PATCH_AREA_SIZE, "sha256": area },
            "patch_table": { "start": format!("{table:#x}"), "size": 4096, "sha256": ptes },
        }))
    }

    /// `GET /kernel/text?symbol=NAME[,SYMPOS]`: the function's bytes as they are now.
    pub fn kernel_text_json(&mut self, symbol: &str) -> Result<Value, String> {
        let (name, pos) = match symbol.split_once(',') {
            Some((n, p)) => (
                n,
                Some(
                    p.parse::<u32>()
                        .map_err(|_| format!("bad sympos in {symbol}"))?,
                ),
            ),
            None => (symbol, None),
        };
        let gk = self.guest_kernel()?;
        let s = gk
            .kernel
            .symbols
            .lookup(name, pos)
            .map_err(|e| e.to_string())?;
        let (addr, size) = (s.addr, s.size.min(64 << 10));
        if !(0xffff_ffff_8000_0000..0xffff_ffff_c000_0000).contains(&addr) {
            return Err(format!("{name} ({addr:#x}) is not in the kernel image"));
        }
        let pa = gk.kernel.image.pa(addr);
        let mut buf = vec![0u8; size as usize];
        self.vm
            .memory()
            .read_slice(&mut buf, GuestAddress(pa))
            .map_err(|e| format!("{name}: {e}"))?;
        let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
        Ok(json!({ "symbol": name, "addr": format!("{addr:#x}"), "size": size, "bytes": hex }))
    }
}
