//! Why the VM stopped, reported once by whichever thread sees it first.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The reason the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    Poweroff,
    /// The guest reset the machine (i8042 or ACPI reset register).
    Reset,
    /// The guest kernel panicked; holds the panic line from the console.
    GuestPanic(String),
    /// A vCPU hit a triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8 },
    /// The VMM stopped the guest because it could not continue.
    Fatal(String),
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// A snapshot was written and the VM stopped on request (`--snapshot-stop`).
    Snapshotted(String),
}

impl ExitReason {
    /// Process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Poweroff | ExitReason::Reset | ExitReason::Snapshotted(_) => 0,
            ExitReason::GuestPanic(_) => 2,
            ExitReason::TripleFault { .. } => 3,
            ExitReason::Fatal(_) => 1,
            ExitReason::Signal(sig) => 128 + sig,
        }
    }

    /// One line for the user; None for a clean stop.
    pub fn message(&self) -> Option<String> {
        match self {
            ExitReason::Poweroff | ExitReason::Reset => None,
            ExitReason::GuestPanic(line) => Some(format!("guest kernel panic: {line}")),
            ExitReason::TripleFault { vcpu } => Some(format!("vCPU {vcpu} triple fault: the guest reset the CPU after an unrecoverable exception")),
            ExitReason::Fatal(msg) => Some(msg.clone()),
            ExitReason::Signal(sig) => Some(format!("stopped by signal {sig}")),
            ExitReason::Snapshotted(dir) => Some(format!("snapshot written to {dir}; VM stopped")),
        }
    }
}

/// First-wins holder of the exit reason plus an eventfd that wakes the VMM thread.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    panic_line: Mutex<Option<String>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            panic_line: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the VMM thread.
    /// A reset that follows a console panic line is reported as the panic.
    pub fn request(&self, reason: ExitReason) {
        let reason = match reason {
            ExitReason::Reset => match self
                .panic_line
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                Some(line) => ExitReason::GuestPanic(line),
                None => ExitReason::Reset,
            },
            other => other,
        };
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        // A full eventfd counter still wakes the reader; nothing else to do on error.
        let _ = self.evt.write(1);
    }

    /// Remembers a panic line seen on the console (the guest reboots right after it).
    pub fn note_panic(&self, line: String) {
        let mut slot = self.panic_line.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(line);
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd to poll.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_panic_turns_reset_into_failure() {
        let s = ExitSignal::new().unwrap();
        s.request(ExitReason::Poweroff);
        s.request(ExitReason::Fatal("x".into()));
        assert_eq!(s.reason(), Some(ExitReason::Poweroff));
        assert_eq!(s.eventfd().read().unwrap(), 2);

        let s = ExitSignal::new().unwrap();
        s.note_panic("Kernel panic - not syncing: VFS: Unable to mount root fs".into());
        s.request(ExitReason::Reset);
        let r = s.reason().unwrap();
        assert!(matches!(r, ExitReason::GuestPanic(_)));
        assert_ne!(r.exit_code(), 0);
        assert!(r.message().unwrap().contains("Unable to mount root fs"));
        assert_eq!(ExitReason::Reset.exit_code(), 0);
        assert!(ExitReason::Poweroff.message().is_none());
    }
}
