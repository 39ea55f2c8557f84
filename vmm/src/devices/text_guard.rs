//! Guards live-patched kernel text against guest writes. The pages holding redirected
//! function entries are read-only KVM memory slots (the user-space face of EPT/NPT write
//! protection), so a guest store to them exits to the VMM as an MMIO write and lands here.
//! A write that touches a redirection site is dropped (and counted); any other write to
//! those pages — the kernel's own `text_poke` of a neighbouring static key, say — is
//! carried out, so the guest keeps working.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::bus::BusDevice;

/// Page size of the protection.
pub const PAGE: u64 = 4096;

/// The protected sites and what guest writes did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GuardState {
    /// Guest-physical start → length of each protected site.
    sites: BTreeMap<u64, u64>,
    /// Guest writes dropped because they touched a site.
    pub dropped: u64,
    /// Guest writes to a protected page outside any site, carried out.
    pub passed: u64,
}

impl GuardState {
    pub fn protect(&mut self, gpa: u64, len: u64) {
        self.sites.insert(gpa, len);
    }

    pub fn unprotect(&mut self, gpa: u64) {
        self.sites.remove(&gpa);
    }

    pub fn sites(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.sites.iter().map(|(&a, &l)| (a, l))
    }

    /// Every page a site touches.
    pub fn pages(&self) -> std::collections::BTreeSet<u64> {
        let mut pages = std::collections::BTreeSet::new();
        for (&a, &l) in &self.sites {
            let mut p = a & !(PAGE - 1);
            while p < a.saturating_add(l) {
                pages.insert(p);
                p += PAGE;
            }
        }
        pages
    }

    /// Whether `[gpa, gpa + len)` touches a site.
    pub fn touches_site(&self, gpa: u64, len: u64) -> bool {
        let end = gpa.saturating_add(len);
        // The last site starting below `end` is the only one that can overlap.
        self.sites
            .range(..end)
            .next_back()
            .is_some_and(|(&a, &l)| a.saturating_add(l) > gpa)
    }
}

/// The MMIO-bus face of the guard over one RAM region.
pub struct TextGuard {
    base: u64,
    mem: GuestMemoryMmap,
    state: Arc<Mutex<GuardState>>,
}

impl TextGuard {
    pub fn new(base: u64, mem: GuestMemoryMmap, state: Arc<Mutex<GuardState>>) -> Self {
        TextGuard { base, mem, state }
    }
}

impl BusDevice for TextGuard {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Read-only slots are readable; a read only exits here if KVM chose to. Serve RAM.
        if self
            .mem
            .read_slice(data, GuestAddress(self.base + offset))
            .is_err()
        {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let gpa = self.base + offset;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.touches_site(gpa, data.len() as u64) {
            st.dropped += 1;
            if st.dropped == 1 {
                tracing::warn!(
                    "guest write of {} bytes at {gpa:#x} touches a live-patch redirection: dropped",
                    data.len()
                );
            }
            return;
        }
        st.passed += 1;
        drop(st);
        if let Err(e) = self.mem.write_slice(data, GuestAddress(gpa)) {
            tracing::warn!("guest write at {gpa:#x} to a protected page failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> (TextGuard, GuestMemoryMmap, Arc<Mutex<GuardState>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let state = Arc::new(Mutex::new(GuardState::default()));
        state.lock().unwrap().protect(0x1ffe, 5); // straddles two pages
        (TextGuard::new(0, mem.clone(), state.clone()), mem, state)
    }

    #[test]
    fn writes_to_a_site_are_dropped_and_others_carried_out() {
        let (mut g, mem, state) = guard();
        g.write(0x1ffc, &[0xaa; 4]); // overlaps the site's first bytes
        g.write(0x2002, &[0xbb; 2]); // overlaps its last byte
        g.write(0x1ff0, &[0xcc; 8]); // same page, outside the site
        g.write(0x2003, &[0xdd; 1]); // just after the site
        let mut b = [0u8; 0x20];
        mem.read_slice(&mut b, GuestAddress(0x1ff0)).unwrap();
        assert_eq!(&b[..8], &[0xcc; 8]);
        assert_eq!(&b[8..0x13], &[0; 11], "site and its neighbours untouched");
        assert_eq!(b[0x13], 0xdd);
        let st = state.lock().unwrap();
        assert_eq!((st.dropped, st.passed), (2, 2));
    }

    #[test]
    fn pages_cover_every_site_byte() {
        let (_, _, state) = guard();
        let mut st = state.lock().unwrap();
        assert_eq!(st.pages().into_iter().collect::<Vec<_>>(), [0x1000, 0x2000]);
        st.protect(0x3000, 5);
        assert!(st.touches_site(0x3004, 1));
        assert!(!st.touches_site(0x3005, 1));
        assert!(!st.touches_site(0x2fff, 1));
        st.unprotect(0x1ffe);
        assert_eq!(st.pages().into_iter().collect::<Vec<_>>(), [0x3000]);
    }
}
