//! The COM1 16550A UART (vm-superio), its console output and input.
//!
//! Output goes to the console sink (stdout or a file) and is scanned for the
//! kernel's panic line. Input comes from the event loop (stdin) and is queued
//! into the UART's FIFO as fast as the guest drains it.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::vstate::exit::ExitSignal;

/// An interrupt line backed by a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Wakes the input pump when the guest has drained the receive FIFO.
pub struct RxReady(pub Arc<EventFd>);

impl SerialEvents for RxReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

const PANIC_MARKER: &str = "Kernel panic - not syncing";
const MAX_LINE: usize = 512;

/// A console line the VMM waits for (e.g. to snapshot once the guest is ready).
#[derive(Debug, Clone)]
pub struct LineWatch {
    pub needle: String,
    pub seen: Arc<std::sync::atomic::AtomicBool>,
}

/// Console output sink that also watches for a kernel panic line.
pub struct ConsoleOut {
    sink: Box<dyn Write + Send>,
    line: Vec<u8>,
    exit: Arc<ExitSignal>,
    watches: Vec<LineWatch>,
}

impl ConsoleOut {
    pub fn new(sink: Box<dyn Write + Send>, exit: Arc<ExitSignal>) -> Self {
        Self {
            sink,
            line: Vec::with_capacity(128),
            exit,
            watches: Vec::new(),
        }
    }

    /// Also raises each watch's `seen` (and wakes the VMM thread) when a line contains
    /// its needle.
    pub fn with_watches(mut self, watches: Vec<LineWatch>) -> Self {
        self.watches = watches;
        self
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' || self.line.len() >= MAX_LINE {
                let text = String::from_utf8_lossy(&self.line);
                if let Some(pos) = text.find(PANIC_MARKER) {
                    self.exit.note_panic(text[pos..].trim_end().to_string());
                }
                for w in &self.watches {
                    if text.contains(&w.needle) {
                        w.seen.store(true, std::sync::atomic::Ordering::Release);
                        let _ = self.exit.eventfd().write(1);
                    }
                }
                self.line.clear();
            } else if b != b'\r' {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        // Console output must never stop the guest: a closed stdout just discards.
        match self.sink.write_all(buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Err(e) => return Err(e),
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

/// UART register offsets and bits the break emulation needs.
const DATA_OFFSET: u64 = 0;
const IIR_OFFSET: u64 = 2;
const LCR_OFFSET: u8 = 3;
const LSR_OFFSET: u64 = 5;
/// IER: receiver line status interrupt.
const IER_RLSI: u8 = 0x04;
/// IER: received data available interrupt.
const IER_RDI: u8 = 0x01;
/// LCR: divisor latch access.
const LCR_DLAB: u8 = 0x80;
/// IIR: receiver line status interrupt, FIFOs enabled (16550A).
const IIR_LINE_STATUS_FIFO: u8 = 0xc6;
/// LSR: break interrupt.
const LSR_BREAK: u8 = 0x10;

/// The receive side of the UART (`GET /vm`'s `console`): a console that does not answer
/// shows here whether the guest stopped reading (input waiting, interrupts off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReceiveStatus {
    /// IER as the guest set it (bit 0: received-data interrupt, bit 2: line status).
    pub interrupt_enable: u8,
    /// LSR as the guest would read it now, without a pending break.
    pub line_status: u8,
    /// Bytes in the receive FIFO.
    pub fifo: usize,
    /// Host input bytes waiting for room in the FIFO (or behind a break).
    pub pending_input: usize,
    pub break_in_fifo: Break,
}

/// Host input on its way to the receive FIFO, in the order it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    Byte(u8),
    Break,
}

/// Where a break condition sent to the guest stands.
///
/// A 16550A receives a break as a NUL character whose FIFO entry carries the
/// break flag; LSR shows BI while that entry is at the head of the FIFO. The
/// vm-superio UART has no per-entry flags, so the device queues the NUL only
/// into an empty FIFO and tracks the flag itself. Whichever guest path reads
/// LSR first (the interrupt handler, or the console's transmit poll, which
/// Linux makes save BI for the handler), the break then belongs to the NUL,
/// never to the character typed after it (the SysRq key).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Break {
    /// No break in the FIFO.
    #[default]
    None,
    /// The break's NUL is at the FIFO head and LSR has not reported BI yet.
    Unreported,
    /// LSR reported BI; the NUL is still to be read.
    Reported,
}

/// The UART as seen from the bus, plus pending host input.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, RxReady, ConsoleOut>,
    pending_input: VecDeque<Rx>,
    /// A second handle on the interrupt line, for line-status (break) interrupts, which
    /// the vm-superio UART does not model.
    irq: Option<EventFd>,
    brk: Break,
}

impl SerialDevice {
    pub fn new(irq: EventFd, rx_ready: Arc<EventFd>, out: ConsoleOut) -> Self {
        let line = irq.try_clone().ok();
        Self {
            uart: Serial::with_events(IrqTrigger(irq), RxReady(rx_ready), out),
            pending_input: VecDeque::new(),
            irq: line,
            brk: Break::None,
        }
    }

    /// Sends a break condition, as a terminal's BREAK key does, after the input
    /// queued before it. Linux's serial console treats the next character (within
    /// 5 s) as a magic SysRq key.
    pub fn send_break(&mut self) {
        self.pending_input.push_back(Rx::Break);
        self.pump_input();
    }

    /// Queues host input; moves as much as fits into the UART FIFO now.
    pub fn queue_input(&mut self, data: &[u8]) {
        self.pending_input.extend(data.iter().map(|&b| Rx::Byte(b)));
        self.pump_input();
    }

    /// Moves pending input into the FIFO (called when the guest drained it). A
    /// break waits for an empty FIFO, and what follows it waits until the guest
    /// has read the break's NUL.
    pub fn pump_input(&mut self) {
        while self.brk == Break::None {
            match self.pending_input.front() {
                None => return,
                Some(Rx::Break) => {
                    if !self.fifo_is_empty() || !self.enqueue(&[0]) {
                        return;
                    }
                    self.pending_input.pop_front();
                    self.brk = Break::Unreported;
                    self.raise_line_status();
                }
                Some(Rx::Byte(_)) => {
                    let chunk: Vec<u8> = self
                        .pending_input
                        .iter()
                        .take(self.uart.fifo_capacity())
                        .map_while(|rx| match rx {
                            Rx::Byte(b) => Some(*b),
                            Rx::Break => None,
                        })
                        .collect();
                    if chunk.is_empty() || !self.enqueue(&chunk) {
                        return;
                    }
                    self.pending_input.drain(..chunk.len());
                }
            }
        }
    }

    /// Puts `bytes` into the FIFO whole; false (and nothing queued) when they do not fit.
    fn enqueue(&mut self, bytes: &[u8]) -> bool {
        if self.uart.fifo_capacity() < bytes.len() {
            return false;
        }
        // Loopback mode takes nothing (Ok(0)); the input then waits.
        matches!(self.uart.enqueue_raw_bytes(bytes), Ok(n) if n == bytes.len())
    }

    fn fifo_is_empty(&self) -> bool {
        self.uart.state().in_buffer.is_empty()
    }

    /// The vm-superio UART raised the data interrupt for the NUL if the guest
    /// enabled it; a guest that only enabled line-status interrupts gets one here.
    fn raise_line_status(&self) {
        let ier = self.uart.state().interrupt_enable;
        if ier & IER_RLSI != 0 && ier & IER_RDI == 0 {
            if let Some(irq) = &self.irq {
                if let Err(e) = irq.write(1) {
                    tracing::warn!("serial: cannot raise the break interrupt: {e}");
                }
            }
        }
    }

    /// Where the receive side stands, for the VM status: what the guest enabled and sees,
    /// and what host input waits for it.
    pub fn receive_status(&self) -> ReceiveStatus {
        let s = self.uart.state();
        ReceiveStatus {
            interrupt_enable: s.interrupt_enable,
            line_status: s.line_status,
            fifo: s.in_buffer.len(),
            pending_input: self.pending_input(),
            break_in_fifo: self.brk,
        }
    }

    /// Bytes of host input not yet accepted by the guest.
    pub fn pending_input(&self) -> usize {
        self.pending_input
            .iter()
            .filter(|rx| matches!(rx, Rx::Byte(_)))
            .count()
    }
}

/// The UART registers and receive FIFO, plus host input not yet in the FIFO.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub fifo: Vec<u8>,
    pub pending_input: Vec<u8>,
    /// Breaks waiting in `pending_input`: each is sent before the byte at this index
    /// (an index equal to its length: after all of it). Absent in older snapshots.
    #[serde(default)]
    pub pending_breaks: Vec<usize>,
    /// Whether the FIFO head is a break's NUL, and whether LSR reported it.
    #[serde(default)]
    pub break_in_fifo: Break,
}

/// A serial snapshot that does not fit a 16550A.
#[derive(Debug, thiserror::Error)]
#[error("serial snapshot does not fit the UART: {0}")]
pub struct SerialSnapshotError(String);

impl SerialDevice {
    /// The device state for a snapshot.
    pub fn save_state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            fifo: s.in_buffer,
            pending_input: self
                .pending_input
                .iter()
                .filter_map(|rx| match rx {
                    Rx::Byte(b) => Some(*b),
                    Rx::Break => None,
                })
                .collect(),
            pending_breaks: self
                .pending_input
                .iter()
                .scan(0usize, |bytes, rx| {
                    Some(match rx {
                        Rx::Byte(_) => {
                            *bytes += 1;
                            None
                        }
                        Rx::Break => Some(*bytes),
                    })
                })
                .flatten()
                .collect(),
            break_in_fifo: self.brk,
        }
    }

    /// A device in the state `snap` describes, wired to new host-side ends.
    pub fn restore(
        irq: EventFd,
        rx_ready: Arc<EventFd>,
        out: ConsoleOut,
        snap: &SerialSnapshot,
    ) -> Result<Self, SerialSnapshotError> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: snap.baud_divisor_low,
            baud_divisor_high: snap.baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer: snap.fifo.clone(),
        };
        if snap.break_in_fifo != Break::None && snap.fifo.first() != Some(&0) {
            return Err(SerialSnapshotError(
                "a break is recorded but the FIFO does not start with its NUL".into(),
            ));
        }
        let mut pending = VecDeque::with_capacity(snap.pending_input.len());
        let mut breaks = snap.pending_breaks.iter().copied().peekable();
        for (i, &b) in snap.pending_input.iter().enumerate() {
            while breaks.next_if(|&at| at <= i).is_some() {
                pending.push_back(Rx::Break);
            }
            pending.push_back(Rx::Byte(b));
        }
        for at in breaks {
            if at > snap.pending_input.len() {
                return Err(SerialSnapshotError(format!(
                    "a pending break at {at} lies beyond the {} pending bytes",
                    snap.pending_input.len()
                )));
            }
            pending.push_back(Rx::Break);
        }
        let line = irq.try_clone().ok();
        let uart = Serial::from_state(&state, IrqTrigger(irq), RxReady(rx_ready), out)
            .map_err(|e| SerialSnapshotError(format!("{e:?}")))?;
        Ok(Self {
            uart,
            pending_input: pending,
            irq: line,
            brk: snap.break_in_fifo,
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            let dlab = self.uart.read(LCR_OFFSET) & LCR_DLAB != 0;
            data[0] = match (offset, self.brk) {
                // A pending line-status interrupt outranks received data.
                (IIR_OFFSET, Break::Unreported)
                    if self.uart.state().interrupt_enable & IER_RLSI != 0 =>
                {
                    IIR_LINE_STATUS_FIFO
                }
                // BI, like the error bits, is cleared by the LSR read that reports it.
                (LSR_OFFSET, Break::Unreported) => {
                    self.brk = Break::Reported;
                    self.uart.read(LSR_OFFSET as u8) | LSR_BREAK
                }
                // The guest takes the break's NUL; what followed the break may come in.
                (DATA_OFFSET, Break::Unreported | Break::Reported) if !dlab => {
                    let nul = self.uart.read(DATA_OFFSET as u8);
                    self.brk = Break::None;
                    self.pump_input();
                    nul
                }
                _ => self.uart.read(offset as u8),
            };
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A device restored from `snap`, on fresh host-side ends.
    fn restore(snap: &SerialSnapshot) -> Result<SerialDevice, SerialSnapshotError> {
        let (_, out, exit, rx) = device();
        SerialDevice::restore(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            rx,
            ConsoleOut::new(Box::new(out), exit),
            snap,
        )
    }

    fn device() -> (SerialDevice, Shared, Arc<ExitSignal>, Arc<EventFd>) {
        let out = Shared::default();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let rx = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let dev = SerialDevice::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            rx.clone(),
            ConsoleOut::new(Box::new(out.clone()), exit.clone()),
        );
        (dev, out, exit, rx)
    }

    #[test]
    fn output_reaches_sink_and_panics_are_noted() {
        let (mut dev, out, exit, _) = device();
        for b in b"hello\r\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\r\n" {
            dev.write(0, &[*b]);
        }
        assert!(out.0.lock().unwrap().starts_with(b"hello"));
        exit.request(crate::vstate::exit::ExitReason::Reset);
        assert_eq!(
            exit.reason(),
            Some(crate::vstate::exit::ExitReason::GuestPanic(
                "Kernel panic - not syncing: Attempted to kill init!".into()
            ))
        );
    }

    #[test]
    fn each_watch_fires_on_its_own_line() {
        use std::sync::atomic::Ordering;
        let exit = Arc::new(ExitSignal::new().unwrap());
        let watch = |needle: &str| LineWatch {
            needle: needle.into(),
            seen: Default::default(),
        };
        let (snap, patch) = (watch("Freeing unused"), watch("Run /init as init process"));
        let mut out = ConsoleOut::new(Box::new(io::sink()), exit)
            .with_watches(vec![snap.clone(), patch.clone()]);
        out.write_all(b"[ 202.28] Freeing unused kernel image (initmem) memory: 2604K\r\n")
            .unwrap();
        assert!(snap.seen.load(Ordering::Acquire));
        assert!(!patch.seen.load(Ordering::Acquire));
        // A line split across writes still counts once it is complete.
        out.write_all(b"[ 213.64] Run /init as").unwrap();
        assert!(!patch.seen.load(Ordering::Acquire));
        out.write_all(b" init process\r\n").unwrap();
        assert!(patch.seen.load(Ordering::Acquire));
    }

    #[test]
    fn snapshot_keeps_registers_fifo_and_pending_input() {
        let (mut dev, _, _, _) = device();
        dev.write(3, &[0x03]); // LCR: 8N1
        dev.write(7, &[0x5a]); // scratch
        dev.write(1, &[0x01]); // IER: receive interrupts
        dev.queue_input(&[b'x'; 100]);
        let snap = dev.save_state();
        assert_eq!(snap.fifo.len(), 64);
        assert_eq!(snap.pending_input.len(), 36);

        let mut restored = restore(&snap).unwrap();
        assert_eq!(restored.save_state(), snap);
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        restored.read(0, &mut b);
        assert_eq!(b[0], b'x');

        let mut bad = snap.clone();
        bad.fifo = vec![0; 65];
        let err = restore(&bad)
            .err()
            .expect("an over-full FIFO is refused")
            .to_string();
        assert!(err.contains("serial snapshot"), "{err}");
    }

    /// What Linux's 8250 driver (6.1, `serial8250_handle_irq` / `_rx_chars` /
    /// `_read_char` and `uart_handle_break` / `uart_prepare_sysrq_char`) does with
    /// the registers, reduced to what the break and SysRq paths depend on.
    #[derive(Default)]
    struct Linux8250 {
        lsr_saved_flags: u8,
        sysrq_armed: bool,
        sysrq: Vec<u8>,
        chars: Vec<u8>,
    }

    const LSR_DR: u8 = 0x01;
    const LSR_ERROR_BITS: u8 = 0x1e;

    impl Linux8250 {
        fn lsr_in(&mut self, dev: &mut SerialDevice) -> u8 {
            let mut b = [0u8];
            dev.read(LSR_OFFSET, &mut b);
            let lsr = self.lsr_saved_flags | b[0];
            self.lsr_saved_flags = lsr & LSR_ERROR_BITS;
            lsr
        }

        /// `serial8250_console_write` polls LSR for THRE after each character.
        fn console_putc(&mut self, dev: &mut SerialDevice) {
            self.lsr_in(dev);
            dev.write(DATA_OFFSET, b"x");
        }

        fn interrupt(&mut self, dev: &mut SerialDevice) {
            let mut b = [0u8];
            dev.read(IIR_OFFSET, &mut b);
            if b[0] & 1 != 0 {
                return;
            }
            let mut lsr = self.lsr_in(dev);
            for _ in 0..256 {
                if lsr & (LSR_DR | LSR_BREAK) == 0 {
                    break;
                }
                self.read_char(dev, lsr);
                dev.read(LSR_OFFSET, &mut b);
                lsr = b[0];
            }
        }

        fn read_char(&mut self, dev: &mut SerialDevice, mut lsr: u8) {
            let mut b = [0u8];
            if lsr & LSR_DR != 0 {
                dev.read(DATA_OFFSET, &mut b);
            }
            lsr |= self.lsr_saved_flags;
            self.lsr_saved_flags = 0;
            if lsr & LSR_BREAK != 0 {
                self.sysrq_armed = !self.sysrq_armed;
                if self.sysrq_armed {
                    return;
                }
            }
            if std::mem::take(&mut self.sysrq_armed) && b[0] != 0 {
                self.sysrq.push(b[0]);
                return;
            }
            self.chars.push(b[0]);
        }
    }

    const IER_OFFSET: u64 = 1;

    /// IER as Linux sets it while the port is open.
    fn open_port(dev: &mut SerialDevice) {
        dev.write(IER_OFFSET, &[IER_RDI | IER_RLSI]);
    }

    #[test]
    fn break_then_key_is_a_sysrq_through_the_interrupt_handler() {
        let (mut dev, _, _, _) = device();
        open_port(&mut dev);
        dev.send_break();
        dev.queue_input(b"h");
        let mut linux = Linux8250::default();
        linux.interrupt(&mut dev);
        assert_eq!(linux.sysrq, b"h");
        assert!(linux.chars.is_empty(), "{:?}", linux.chars);
        assert_eq!(dev.pending_input(), 0);
    }

    #[test]
    fn a_console_write_that_sees_the_break_first_does_not_eat_the_key() {
        // The guest prints while the break arrives: its transmit poll reads LSR
        // (and saves BI) before the interrupt handler runs.
        let (mut dev, _, _, _) = device();
        open_port(&mut dev);
        dev.send_break();
        dev.queue_input(b"h");
        let mut linux = Linux8250::default();
        linux.console_putc(&mut dev);
        linux.console_putc(&mut dev);
        linux.interrupt(&mut dev);
        assert_eq!(linux.sysrq, b"h");
        assert!(linux.chars.is_empty(), "{:?}", linux.chars);
    }

    #[test]
    fn input_keeps_its_order_around_a_break() {
        let (mut dev, _, _, _) = device();
        open_port(&mut dev);
        dev.queue_input(b"ab");
        dev.send_break();
        dev.queue_input(b"tc");
        assert_eq!(dev.pending_input(), 2, "the key waits behind the break");
        let mut linux = Linux8250::default();
        linux.interrupt(&mut dev);
        // The FIFO drained: the break goes in next (the VMM's rx_ready pump).
        dev.pump_input();
        linux.interrupt(&mut dev);
        assert_eq!(linux.chars, b"abc");
        assert_eq!(linux.sysrq, b"t");
    }

    #[test]
    fn iir_reports_the_break_as_line_status_until_lsr_is_read() {
        let (mut dev, _, _, _) = device();
        open_port(&mut dev);
        dev.send_break();
        let mut b = [0u8];
        dev.read(IIR_OFFSET, &mut b);
        assert_eq!(b[0], IIR_LINE_STATUS_FIFO);
        dev.read(LSR_OFFSET, &mut b);
        assert_eq!(b[0] & (LSR_BREAK | LSR_DR), LSR_BREAK | LSR_DR);
        dev.read(LSR_OFFSET, &mut b);
        assert_eq!(b[0] & LSR_BREAK, 0, "BI is reported once");
        dev.read(DATA_OFFSET, &mut b);
        assert_eq!(b[0], 0, "a break is received as NUL");
    }

    #[test]
    fn a_snapshot_keeps_breaks_in_the_fifo_and_in_the_queue() {
        let (mut dev, _, _, _) = device();
        open_port(&mut dev);
        dev.send_break();
        dev.queue_input(b"h");
        dev.send_break();
        dev.queue_input(b"l");
        dev.send_break();
        let snap = dev.save_state();
        assert_eq!(snap.fifo, [0]);
        assert_eq!(snap.break_in_fifo, Break::Unreported);
        assert_eq!(snap.pending_input, b"hl");
        assert_eq!(snap.pending_breaks, [1, 2]);

        let mut restored = restore(&snap).unwrap();
        assert_eq!(restored.save_state(), snap);
        let mut linux = Linux8250::default();
        for _ in 0..4 {
            linux.interrupt(&mut restored);
            restored.pump_input();
        }
        assert_eq!(linux.sysrq, b"hl");
        assert!(linux.chars.is_empty(), "{:?}", linux.chars);

        let mut bad = snap.clone();
        bad.pending_breaks = vec![3];
        assert!(restore(&bad).is_err());
    }

    /// Random host input, breaks, guest register accesses, flow-control wake-ups and
    /// snapshot round trips: the guest receives exactly what the host sent, in order, a
    /// break as one NUL, and LSR shows BI only when that NUL is next.
    #[test]
    fn random_traffic_arrives_in_order_with_breaks_as_flagged_nuls() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let (mut dev, _, _, _) = device();
            let mut sent: Vec<Option<u8>> = Vec::new(); // None: a break
            let mut got: Vec<Option<u8>> = Vec::new();
            let mut bi_pending = false;
            let mut dlab = false;
            let guest_reads = |dev: &mut SerialDevice, got: &mut Vec<Option<u8>>, bi: &mut bool| {
                let mut b = [0u8];
                dev.read(LSR_OFFSET, &mut b);
                *bi |= b[0] & LSR_BREAK != 0;
                if b[0] & LSR_DR != 0 {
                    dev.read(DATA_OFFSET, &mut b);
                    got.push(if std::mem::take(bi) {
                        assert_eq!(b[0], 0, "round {round}: BI with a data byte");
                        None
                    } else {
                        Some(b[0])
                    });
                }
            };
            for _ in 0..400 {
                match rand(9) {
                    0 => {
                        let data: Vec<u8> =
                            (0..1 + rand(100)).map(|_| 1 + rand(255) as u8).collect();
                        sent.extend(data.iter().map(|&b| Some(b)));
                        dev.queue_input(&data);
                    }
                    1 => {
                        sent.push(None);
                        dev.send_break();
                    }
                    2 | 3 if !dlab => guest_reads(&mut dev, &mut got, &mut bi_pending),
                    4 => dev.read(IIR_OFFSET, &mut [0u8]),
                    5 => dev.pump_input(),
                    6 => dev.write(IER_OFFSET, &[rand(16) as u8]),
                    7 => {
                        dlab = !dlab;
                        dev.write(LCR_OFFSET as u64, &[if dlab { 0x83 } else { 0x03 }]);
                    }
                    8 => {
                        let snap = dev.save_state();
                        dev = restore(&snap).unwrap();
                        assert_eq!(dev.save_state(), snap);
                    }
                    _ => {}
                }
                assert!(dev.save_state().fifo.len() <= 64);
            }
            dev.write(LCR_OFFSET as u64, &[0x03]);
            for _ in 0..sent.len() * 2 + 10 {
                dev.pump_input();
                guest_reads(&mut dev, &mut got, &mut bi_pending);
            }
            assert_eq!(got, sent, "round {round}");
        }
    }

    #[test]
    fn input_beyond_fifo_waits_for_guest() {
        let (mut dev, _, _, _) = device();
        let input = vec![b'a'; 200];
        dev.queue_input(&input);
        assert_eq!(dev.pending_input(), 200 - 64);
        // The guest reads the whole FIFO through the data register.
        let mut got = 0;
        let mut b = [0u8];
        loop {
            dev.read(5, &mut b); // LSR
            if b[0] & 1 == 0 {
                break;
            }
            dev.read(0, &mut b);
            got += 1;
        }
        assert_eq!(got, 64);
        dev.pump_input();
        assert_eq!(dev.pending_input(), 200 - 128);
    }
}
