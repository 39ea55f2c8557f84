//! The stop-the-world consistency check: with every vCPU paused, a transition may write
//! only if no vCPU is executing, and no task's kernel stack returns into, any code the
//! transition changes. A reliable stack trace is checked frame by frame; where the trace
//! is not reliable, every word of the stack is treated as a possible return address
//! (conservative, as the kernel's own fallback would refuse such a task).

/// A task's kernel stack as the introspection layer reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStack {
    pub pid: i32,
    pub comm: String,
    /// Return addresses of the unwound trace, innermost first.
    pub frames: Vec<u64>,
    /// Whether the unwinder reached the end of the stack cleanly.
    pub reliable: bool,
    /// Every 8-byte word of the stack, for the conservative scan.
    pub words: Vec<u64>,
}

/// Something that keeps a transition from being written now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// A vCPU is executing inside a range being changed.
    Vcpu {
        cpu: usize,
        rip: u64,
        function: String,
    },
    /// A task would return into a range being changed.
    Task {
        pid: i32,
        comm: String,
        function: String,
        reliable: bool,
        trace: Vec<String>,
    },
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blocker::Vcpu { cpu, rip, function } => {
                write!(f, "vCPU {cpu} is executing {function} (rip {rip:#x})")
            }
            Blocker::Task {
                pid,
                comm,
                function,
                reliable,
                trace,
            } => {
                write!(
                    f,
                    "pid {pid} ({comm}) is inside {function}{}: {}",
                    if *reliable {
                        ""
                    } else {
                        " (unreliable trace, conservative scan)"
                    },
                    trace.join(" <- ")
                )
            }
        }
    }
}

fn hit(ranges: &[(u64, u64, String)], addr: u64) -> Option<&str> {
    ranges
        .iter()
        .find(|(start, end, _)| *start <= addr && addr < *end)
        .map(|(.., name)| name.as_str())
}

/// Checks a paused guest against the code ranges a transition changes.
/// Return addresses are checked as `addr - 1` so a call that is the last instruction of
/// a function still counts for that function. Only a blocking task's trace is
/// symbolized (`symbolize`: `function+0xoff/0xsize`), for its report.
pub fn check(
    busy: &[(u64, u64, String)],
    vcpu_rips: &[u64],
    tasks: &[TaskStack],
    symbolize: &mut dyn FnMut(u64) -> String,
) -> Result<(), Vec<Blocker>> {
    let mut blockers = Vec::new();
    for (cpu, &rip) in vcpu_rips.iter().enumerate() {
        if let Some(function) = hit(busy, rip) {
            blockers.push(Blocker::Vcpu {
                cpu,
                rip,
                function: function.to_string(),
            });
        }
    }
    for t in tasks {
        let candidates: &[u64] = if t.reliable { &t.frames } else { &t.words };
        if let Some(function) = candidates
            .iter()
            .find_map(|&a| hit(busy, a.wrapping_sub(1)))
        {
            blockers.push(Blocker::Task {
                pid: t.pid,
                comm: t.comm.clone(),
                function: function.to_string(),
                reliable: t.reliable,
                trace: t.frames.iter().map(|&a| symbolize(a)).collect(),
            });
        }
    }
    if blockers.is_empty() {
        Ok(())
    } else {
        Err(blockers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(a: u64) -> String {
        format!("{a:#x}")
    }

    fn busy() -> Vec<(u64, u64, String)> {
        vec![(0x1000, 0x1100, "pipe_read".into())]
    }

    fn task(pid: i32, frames: Vec<u64>, reliable: bool, words: Vec<u64>) -> TaskStack {
        TaskStack {
            pid,
            comm: format!("t{pid}"),
            frames,
            reliable,
            words,
        }
    }

    #[test]
    fn clear_guest_passes() {
        let tasks = vec![task(1, vec![0x2000, 0x3000], true, vec![0x1050])];
        // A reliable trace is trusted: a stale word inside the range does not block.
        assert_eq!(check(&busy(), &[0x5000, 0x6000], &tasks, &mut hex), Ok(()));
    }

    #[test]
    fn vcpus_and_tasks_inside_block_with_a_report() {
        let tasks = vec![
            task(7, vec![0x2000, 0x1080, 0x3000], true, vec![]),
            task(8, vec![0x2000], false, vec![0xdead, 0x1010]),
            task(9, vec![0x1100], true, vec![]), // returns into 0x10ff: inside
            task(10, vec![0x1000], true, vec![]), // returns to 0xfff: just before
        ];
        let err = check(&busy(), &[0x10ff, 0x1100], &tasks, &mut hex).unwrap_err();
        let text: Vec<String> = err.iter().map(|b| b.to_string()).collect();
        assert_eq!(err.len(), 4, "{text:?}");
        assert!(text[0].contains("vCPU 0 is executing pipe_read"));
        assert!(text[1].starts_with("pid 7 (t7) is inside pipe_read: 0x2000 <- 0x1080"));
        assert!(text[2].contains("pid 8") && text[2].contains("conservative"));
        assert!(text[3].contains("pid 9"));
    }
}
