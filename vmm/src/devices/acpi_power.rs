//! The HW-reduced ACPI sleep control/status registers. The guest powers off by
//! writing SLP_TYP=5 (S5, from the DSDT's `_S5_`) with SLP_EN to the control register.

use std::sync::Arc;

use super::bus::BusDevice;
use crate::vstate::exit::{ExitReason, ExitSignal};

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// Sleep type the DSDT's `\_S5_` package announces.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Two one-byte registers: control at offset 0, status at offset 1.
pub struct AcpiPower {
    exit: Arc<ExitSignal>,
}

impl AcpiPower {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.len() != 1 {
            return;
        }
        let value = data[0];
        if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE {
            self.exit.request(ExitReason::Poweroff);
        } else {
            tracing::debug!("ACPI sleep control write {value:#x} ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_other_states_do_not() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = AcpiPower::new(exit.clone());
        dev.write(0, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        dev.write(0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]);
        dev.write(1, &[0xff]);
        assert!(exit.reason().is_none());
        dev.write(0, &[(S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::Poweroff));
    }
}
