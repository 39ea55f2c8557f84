//! Boot patches (`vmm run --boot-patch`): bundles applied while the guest boots, one after
//! the other, once their console line appears (or at once after a restore). Each goes
//! through the same transition as `PUT /patches`; the outcome is reported on stderr.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::time::Duration;

use crate::api::routes::ApiResponse;
use crate::builder::{progress, RunningVm};

/// How long one boot patch may wait for the guest's tasks to leave the functions it
/// changes (as `PUT /patches`'s default).
const BOOT_PATCH_DEADLINE: Duration = Duration::from_secs(15);

/// The boot patch being applied and the ones after it.
pub struct BootPatching {
    queue: VecDeque<PathBuf>,
    current: Option<(PathBuf, Receiver<ApiResponse>)>,
}

impl RunningVm {
    /// Starts the boot patches once their line was seen, then applies them in order as
    /// each transition ends.
    pub(crate) fn poll_boot_patches(&mut self) {
        let mut work = match self.boot_patching.take() {
            Some(w) => w,
            None => {
                let fired = self
                    .boot_patches
                    .as_ref()
                    .is_some_and(|b| b.watch.seen.load(Ordering::Acquire));
                if !fired {
                    return;
                }
                let Some(b) = self.boot_patches.take() else {
                    return;
                };
                self.load_kernel_held();
                BootPatching {
                    queue: b.bundles.into(),
                    current: None,
                }
            }
        };
        loop {
            if let Some((path, rx)) = &work.current {
                match rx.try_recv() {
                    Ok(answer) => report(path, &answer),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        progress(&format!("boot patch {}: no answer", path.display()))
                    }
                }
                work.current = None;
            }
            let Some(next) = work.queue.pop_front() else {
                return;
            };
            let (tx, rx) = channel();
            // The first attempt runs now; a blocked one is retried by the event loop.
            self.start_apply(
                &next.display().to_string(),
                false,
                BOOT_PATCH_DEADLINE,
                false,
                tx,
            );
            work.current = Some((next, rx));
        }
        self.boot_patching = Some(work);
    }

    /// Loads the guest kernel for the patcher (kallsyms, BTF, ORC; about 150 ms) and maps
    /// the patch area with the vCPUs held, so the guest does not run on past the line
    /// that triggered the boot patches (into the user space they may be for) meanwhile.
    fn load_kernel_held(&mut self) {
        let held = self.pause().is_ok();
        if let Err(e) = self.ensure_kernel_and_area() {
            progress(&format!("boot patches: {e}"));
        }
        if held {
            if let Err(e) = self.resume() {
                progress(&format!("boot patches: cannot resume the vCPUs: {e}"));
            }
        }
    }
}

fn report(path: &std::path::Path, answer: &ApiResponse) {
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
    if answer.status == 200 {
        progress(&format!(
            "boot patch {} applied ({})",
            body["name"].as_str().unwrap_or("?"),
            path.display()
        ));
    } else {
        progress(&format!(
            "boot patch {} failed: {}",
            path.display(),
            body["error"].as_str().unwrap_or(&answer.body)
        ));
    }
}
