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
    watch: Option<LineWatch>,
}

impl ConsoleOut {
    pub fn new(sink: Box<dyn Write + Send>, exit: Arc<ExitSignal>) -> Self {
        Self {
            sink,
            line: Vec::with_capacity(128),
            exit,
            watch: None,
        }
    }

    /// Also raises `watch.seen` (and wakes the VMM thread) when a line contains its needle.
    pub fn with_watch(mut self, watch: Option<LineWatch>) -> Self {
        self.watch = watch;
        self
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' || self.line.len() >= MAX_LINE {
                let text = String::from_utf8_lossy(&self.line);
                if let Some(pos) = text.find(PANIC_MARKER) {
                    self.exit.note_panic(text[pos..].trim_end().to_string());
                }
                if let Some(w) = &self.watch {
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
const IIR_OFFSET: u64 = 2;
const LSR_OFFSET: u64 = 5;
/// IIR: receiver line status interrupt, FIFOs enabled (16550A).
const IIR_LINE_STATUS_FIFO: u8 = 0xc6;
/// LSR: break interrupt.
const LSR_BREAK: u8 = 0x10;

/// Where a break condition sent to the guest stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Break {
    None,
    /// Raised; the guest has not read IIR yet.
    Raised,
    /// IIR reported a line-status interrupt; the next LSR read reports the break.
    Reported,
}

/// The UART as seen from the bus, plus pending host input.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, RxReady, ConsoleOut>,
    pending_input: VecDeque<u8>,
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

    /// Sends a break condition, as a terminal's BREAK key does. Linux's serial console
    /// treats the next character (within 5 s) as a magic SysRq key. Host input queued
    /// after the break reaches the guest only once the guest has seen the break, so the
    /// SysRq key is not swallowed with it.
    pub fn send_break(&mut self) {
        self.brk = Break::Raised;
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.write(1) {
                tracing::warn!("serial: cannot raise the break interrupt: {e}");
            }
        }
    }

    /// Queues host input; moves as much as fits into the UART FIFO now.
    pub fn queue_input(&mut self, data: &[u8]) {
        self.pending_input.extend(data);
        self.pump_input();
    }

    /// Moves pending input into the FIFO (called when the guest drained it).
    pub fn pump_input(&mut self) {
        if self.brk != Break::None {
            return;
        }
        while !self.pending_input.is_empty() {
            let room = self.uart.fifo_capacity();
            if room == 0 {
                break;
            }
            let n = room.min(self.pending_input.len());
            let chunk: Vec<u8> = self.pending_input.iter().take(n).copied().collect();
            match self.uart.enqueue_raw_bytes(&chunk) {
                Ok(done) if done > 0 => {
                    self.pending_input.drain(..done);
                }
                _ => break,
            }
        }
    }

    /// Bytes of host input not yet accepted by the guest.
    pub fn pending_input(&self) -> usize {
        self.pending_input.len()
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
            pending_input: self.pending_input.iter().copied().collect(),
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
        let line = irq.try_clone().ok();
        let uart = Serial::from_state(&state, IrqTrigger(irq), RxReady(rx_ready), out)
            .map_err(|e| SerialSnapshotError(format!("{e:?}")))?;
        Ok(Self {
            uart,
            pending_input: snap.pending_input.iter().copied().collect(),
            irq: line,
            brk: Break::None,
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = match (offset, self.brk) {
                (IIR_OFFSET, Break::Raised) => {
                    self.brk = Break::Reported;
                    IIR_LINE_STATUS_FIFO
                }
                (LSR_OFFSET, Break::Raised | Break::Reported) => {
                    self.brk = Break::None;
                    let lsr = self.uart.read(LSR_OFFSET as u8) | LSR_BREAK;
                    self.pump_input();
                    lsr
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
    fn snapshot_keeps_registers_fifo_and_pending_input() {
        let (mut dev, _, _, _) = device();
        dev.write(3, &[0x03]); // LCR: 8N1
        dev.write(7, &[0x5a]); // scratch
        dev.write(1, &[0x01]); // IER: receive interrupts
        dev.queue_input(&[b'x'; 100]);
        let snap = dev.save_state();
        assert_eq!(snap.fifo.len(), 64);
        assert_eq!(snap.pending_input.len(), 36);

        let (_, out, exit, rx) = device();
        let mut restored = SerialDevice::restore(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            rx,
            ConsoleOut::new(Box::new(out), exit),
            &snap,
        )
        .unwrap();
        assert_eq!(restored.save_state(), snap);
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        restored.read(0, &mut b);
        assert_eq!(b[0], b'x');

        let mut bad = snap.clone();
        bad.fifo = vec![0; 65];
        let (_, out, exit, rx) = device();
        let err = SerialDevice::restore(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            rx,
            ConsoleOut::new(Box::new(out), exit),
            &bad,
        )
        .err()
        .expect("an over-full FIFO is refused")
        .to_string();
        assert!(err.contains("serial snapshot"), "{err}");
    }

    #[test]
    fn break_is_reported_once_and_input_waits_for_it() {
        let (mut dev, _, _, _) = device();
        dev.write(1, &[0x05]); // IER: receive data + line status interrupts
        dev.send_break();
        dev.queue_input(b"t");
        let mut b = [0u8];
        dev.read(5, &mut b);
        assert_eq!(b[0] & 0x11, 0x10, "LSR: break, no data yet");
        // The SysRq key follows the break.
        dev.read(5, &mut b);
        assert_eq!(b[0] & 0x11, 0x01, "LSR: data, break reported only once");
        dev.read(0, &mut b);
        assert_eq!(b[0], b't');

        // Through the interrupt path: IIR says line status first.
        dev.send_break();
        dev.read(2, &mut b);
        assert_eq!(b[0], 0xc6);
        dev.read(5, &mut b);
        assert_eq!(b[0] & 0x10, 0x10);
        dev.read(5, &mut b);
        assert_eq!(b[0] & 0x10, 0);
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
