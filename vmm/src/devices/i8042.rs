//! A minimal i8042 keyboard controller: enough for Linux's probe and for
//! the reset line (command 0xFE, or output-port bit 0 cleared), which is how
//! `reboot=k` and the ACPI reset register restart the machine.

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::vstate::exit::{ExitReason, ExitSignal};

const OFF_DATA: u64 = 0;
const OFF_STATUS: u64 = 4;

const SR_OBF: u8 = 1 << 0;
const SR_SYS: u8 = 1 << 2;
const SR_CMD: u8 = 1 << 3;
const SR_KEYLOCK: u8 = 1 << 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const CTR_KBD_INT: u8 = 1 << 0;
const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const OUTP_RESET_LINE: u8 = 1 << 0;
const MAX_QUEUE: usize = 16;

/// The controller's state.
pub struct I8042 {
    status: u8,
    ctr: u8,
    outp: u8,
    pending_cmd: Option<u8>,
    queue: VecDeque<u8>,
    irq: EventFd,
    exit: Arc<ExitSignal>,
}

impl I8042 {
    pub fn new(irq: EventFd, exit: Arc<ExitSignal>) -> Self {
        Self {
            status: SR_SYS | SR_KEYLOCK,
            ctr: CTR_KBD_INT | 0x04,
            outp: OUTP_RESET_LINE | 0x02,
            pending_cmd: None,
            queue: VecDeque::new(),
            irq,
            exit,
        }
    }

    fn push(&mut self, byte: u8, from_keyboard: bool) {
        if self.queue.len() < MAX_QUEUE {
            self.queue.push_back(byte);
        }
        if from_keyboard && self.ctr & CTR_KBD_INT != 0 {
            let _ = self.irq.write(1);
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CTR => self.push(self.ctr, false),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending_cmd = Some(cmd),
            CMD_SELF_TEST => self.push(0x55, false),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(0x00, false),
            CMD_READ_OUTP => self.push(self.outp, false),
            CMD_RESET_CPU => self.exit.request(ExitReason::Reset),
            CMD_DISABLE_AUX | CMD_ENABLE_AUX | CMD_DISABLE_KBD | CMD_ENABLE_KBD => {}
            _ => tracing::debug!("i8042: ignoring command {cmd:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending_cmd.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(CMD_WRITE_OUTP) => {
                self.outp = value;
                if value & OUTP_RESET_LINE == 0 {
                    self.exit.request(ExitReason::Reset);
                }
            }
            _ => {
                // A command for the keyboard itself: acknowledge it.
                self.push(KBD_ACK, true);
                if value == KBD_RESET {
                    self.push(KBD_SELF_TEST_OK, true);
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            OFF_DATA => self.queue.pop_front().unwrap_or(0),
            OFF_STATUS => self.status | if self.queue.is_empty() { 0 } else { SR_OBF },
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            OFF_STATUS => {
                self.status |= SR_CMD;
                self.command(data[0]);
            }
            OFF_DATA => {
                self.status &= !SR_CMD;
                self.data(data[0]);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn dev() -> (I8042, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        (
            I8042::new(EventFd::new(EFD_NONBLOCK).unwrap(), exit.clone()),
            exit,
        )
    }

    fn read(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn probe_sequence() {
        let (mut d, exit) = dev();
        assert_eq!(read(&mut d, 4) & SR_OBF, 0);
        d.write(4, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut d, 4) & SR_OBF, 0);
        assert_eq!(read(&mut d, 0), 0x55);
        d.write(4, &[CMD_WRITE_CTR]);
        d.write(0, &[0x45]);
        d.write(4, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, 0), 0x45);
        assert!(exit.reason().is_none());
    }

    #[test]
    fn reset_command_and_output_port_reset() {
        let (mut d, exit) = dev();
        d.write(4, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        let (mut d, exit) = dev();
        d.write(4, &[CMD_WRITE_OUTP]);
        d.write(0, &[0x02]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn keyboard_commands_are_acked_with_interrupt() {
        let (mut d, _) = dev();
        d.write(0, &[KBD_RESET]);
        assert_eq!(read(&mut d, 0), KBD_ACK);
        assert_eq!(read(&mut d, 0), KBD_SELF_TEST_OK);
        assert_eq!(d.irq.read().unwrap(), 2);
        // Wrong-width accesses are ignored.
        d.write(4, &[CMD_RESET_CPU, 0]);
    }
}
