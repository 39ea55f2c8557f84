//! The host side of the serial console: the output sink, raw terminal mode,
//! and the stdin subscriber that feeds the UART.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::ConsoleConfig;
use crate::devices::serial::SerialDevice;

/// Opens the output sink for `cfg`.
pub fn output_sink(cfg: &ConsoleConfig) -> io::Result<Box<dyn Write + Send>> {
    Ok(match cfg {
        ConsoleConfig::Stdio => Box::new(io::stdout()),
        ConsoleConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot open console file {}: {e}", path.display()),
                    )
                })?,
        ),
        ConsoleConfig::None => Box::new(io::sink()),
    })
}

/// Puts the terminal on stdin into raw mode and restores it when dropped.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Returns None when stdin is not a terminal.
    pub fn enable() -> Option<Self> {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid tty fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a tty and `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd is a tty and `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read from the same tty in `enable`.
        unsafe { libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}

/// Ctrl-A then `x` quits the VMM from a raw terminal, Ctrl-A then `b` sends a break
/// (the guest's magic SysRq prefix), Ctrl-A Ctrl-A sends one Ctrl-A (as in QEMU).
const ESCAPE: u8 = 0x01;

/// Feeds stdin into the UART and re-fills its FIFO when the guest drains it.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    rx_ready: Arc<EventFd>,
    quit: Arc<dyn Fn() + Send + Sync>,
    escape_pending: bool,
    stdin_open: bool,
}

impl ConsoleInput {
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        rx_ready: Arc<EventFd>,
        quit: Arc<dyn Fn() + Send + Sync>,
    ) -> Self {
        Self {
            serial,
            rx_ready,
            quit,
            escape_pending: false,
            stdin_open: true,
        }
    }

    /// Escapes work on a terminal and on a pipe alike (as QEMU's `mon:stdio`), so
    /// scripts can send a break too; Ctrl-A Ctrl-A sends one literal Ctrl-A.
    fn filter_escape(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        for &b in data {
            if self.escape_pending {
                self.escape_pending = false;
                match b {
                    b'x' | b'X' => (self.quit)(),
                    b'b' | b'B' => {
                        if !out.is_empty() {
                            self.serial().queue_input(&out);
                            out.clear();
                        }
                        self.serial().send_break();
                    }
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.escape_pending = true;
            } else {
                out.push(b);
            }
        }
        out
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, SerialDevice> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        // A stdin that epoll cannot watch (/dev/null, a regular file) simply gives no input.
        if let Err(e) = ops.add(Events::new(&io::stdin(), EventSet::IN)) {
            tracing::debug!("console input disabled: {e:?}");
            self.stdin_open = false;
        }
        if let Err(e) = ops.add(Events::new(self.rx_ready.as_ref(), EventSet::IN)) {
            tracing::warn!("console flow control disabled: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.rx_ready.as_raw_fd() {
            let _ = self.rx_ready.read();
            self.serial().pump_input();
            return;
        }
        let mut buf = [0u8; 256];
        let n = match io::stdin().lock().read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                return
            }
            Err(_) => 0,
        };
        if n == 0 {
            // EOF (or HUP): stop watching stdin; the guest keeps running.
            if self.stdin_open {
                let _ = ops.remove(Events::new(&io::stdin(), EventSet::IN));
                self.stdin_open = false;
            }
            return;
        }
        let data = self.filter_escape(&buf[..n]);
        if !data.is_empty() {
            self.serial().queue_input(&data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::serial::ConsoleOut;
    use crate::vstate::exit::ExitSignal;
    use std::sync::atomic::{AtomicBool, Ordering};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn escapes_quit_break_and_pass_literal_ctrl_a() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            ConsoleOut::new(Box::new(io::sink()), exit),
        )));
        let quit = Arc::new(AtomicBool::new(false));
        let q = quit.clone();
        let mut input = ConsoleInput::new(
            serial.clone(),
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            Arc::new(move || q.store(true, Ordering::SeqCst)),
        );
        assert_eq!(input.filter_escape(b"ab\x01\x01c\x01zd"), b"ab\x01c\x01zd");
        assert!(!quit.load(Ordering::SeqCst));
        // Ctrl-A b: what came before goes first, then the break; the rest waits for it.
        assert_eq!(input.filter_escape(b"x\x01bh"), b"h");
        // The break follows the `x` into the guest, once the guest has read it.
        let mut reg = [0u8];
        let mut uart = serial.lock().unwrap();
        uart.read(5, &mut reg);
        assert_eq!(reg[0] & 0x11, 0x01, "LSR: data, no break yet");
        uart.read(0, &mut reg);
        assert_eq!(reg[0], b'x');
        uart.pump_input();
        uart.read(5, &mut reg);
        assert_eq!(reg[0] & 0x10, 0x10, "break reported");
        drop(uart);
        // An escape split across reads still works.
        assert!(input.filter_escape(b"\x01").is_empty());
        assert!(input.filter_escape(b"x").is_empty());
        assert!(quit.load(Ordering::SeqCst));
    }
}
