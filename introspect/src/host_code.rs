//! Code the host placed in the guest (live-patch bundles in the VMM's patch area): its
//! text range, its own ORC table and its function symbols. The guest kernel knows nothing
//! of this code (it is neither vmlinux nor a module), so the host tells the unwinder about
//! it, as the kernel's module loader registers a livepatch module's ORC: a task sleeping
//! in a replacement function then has a reliable trace.

use crate::orc::{OrcEntry, OrcTable, ORC_ENTRY_SIZE};

/// Most functions kept per code region (a bundle's object is at most 64 MiB).
const MAX_FUNCTIONS: usize = 1 << 16;

/// One host-placed code region.
#[derive(Debug, Clone, Default)]
pub struct HostCode {
    /// Who placed it (the bundle's name), printed after its symbols as a module's name is.
    pub owner: String,
    /// `[start, end)`: the executable image.
    pub start: u64,
    pub end: u64,
    orc: OrcTable,
    /// (address, size, name), sorted by address.
    functions: Vec<(u64, u64, String)>,
}

impl HostCode {
    /// A region `[start, end)` with its ORC rows (absolute ip, raw 6.1 `orc_entry`) and
    /// its functions (name, address, size). Rows and functions outside the region are
    /// dropped: they cannot describe this code.
    pub fn new(
        owner: &str,
        start: u64,
        end: u64,
        orc_rows: &[(u64, [u8; ORC_ENTRY_SIZE])],
        functions: impl IntoIterator<Item = (String, u64, u64)>,
    ) -> HostCode {
        let inside = |a: u64| start <= a && a <= end;
        let rows: Vec<(u64, OrcEntry)> = orc_rows
            .iter()
            .filter(|(ip, _)| inside(*ip))
            .map(|&(ip, raw)| (ip, OrcEntry::decode(raw)))
            .collect();
        let mut functions: Vec<(u64, u64, String)> = functions
            .into_iter()
            .filter(|(_, addr, size)| inside(*addr) && addr.saturating_add(*size) <= end)
            .map(|(name, addr, size)| (addr, size, name))
            .take(MAX_FUNCTIONS)
            .collect();
        functions.sort();
        HostCode {
            owner: owner.to_string(),
            start,
            end,
            orc: OrcTable::from_rows(rows),
            functions,
        }
    }

    pub fn contains(&self, ip: u64) -> bool {
        self.start <= ip && ip < self.end
    }

    /// The ORC entry covering `ip` (in this region).
    pub fn orc(&self, ip: u64) -> Option<OrcEntry> {
        self.orc.find(ip).filter(|_| self.contains(ip))
    }

    /// Number of ORC rows.
    pub fn orc_len(&self) -> usize {
        self.orc.len()
    }

    /// `function+0xoff/0xsize [owner]` for an address inside one of its functions.
    pub fn symbolize(&self, ip: u64) -> Option<String> {
        let i = self.functions.partition_point(|(a, _, _)| *a <= ip);
        let (addr, size, name) = self.functions.get(i.checked_sub(1)?)?;
        (ip < addr.saturating_add(*size).max(addr.saturating_add(1)))
            .then(|| format!("{name}+{:#x}/{size:#x} [{}]", ip - addr, self.owner))
    }
}

/// The region of `regions` holding `ip`.
pub fn region_at(regions: &[HostCode], ip: u64) -> Option<&HostCode> {
    regions.iter().find(|r| r.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orc::{ORC_REG_SP, ORC_REG_UNDEFINED, ORC_TYPE_CALL};

    const BASE: u64 = 0xffff_ffff_c000_0000;

    fn entry(sp_offset: i16) -> [u8; ORC_ENTRY_SIZE] {
        OrcEntry {
            sp_offset,
            bp_offset: 0,
            sp_reg: ORC_REG_SP,
            bp_reg: ORC_REG_UNDEFINED,
            kind: ORC_TYPE_CALL,
            end: false,
        }
        .encode()
    }

    fn sample() -> HostCode {
        HostCode::new(
            "demo",
            BASE,
            BASE + 0x100,
            &[
                (BASE + 0x40, entry(16)),
                (BASE, entry(8)),
                // Outside the region: dropped.
                (BASE + 0x1000, entry(24)),
            ],
            [
                ("second".to_string(), BASE + 0x40, 0x20),
                ("first".to_string(), BASE, 0x40),
                ("outside".to_string(), BASE + 0xf0, 0x20),
            ],
        )
    }

    #[test]
    fn finds_orc_rows_and_functions_inside_the_region_only() {
        let c = sample();
        assert_eq!(c.orc_len(), 2);
        assert_eq!(c.orc(BASE + 0x10).map(|e| e.sp_offset), Some(8));
        assert_eq!(c.orc(BASE + 0x45).map(|e| e.sp_offset), Some(16));
        assert_eq!(c.orc(BASE + 0x100), None, "past the end");
        assert_eq!(c.orc(BASE - 1), None);
        assert_eq!(
            c.symbolize(BASE + 0x12).as_deref(),
            Some("first+0x12/0x40 [demo]")
        );
        assert_eq!(
            c.symbolize(BASE + 0x40).as_deref(),
            Some("second+0x0/0x20 [demo]")
        );
        assert_eq!(c.symbolize(BASE + 0x60), None, "between functions");
        assert_eq!(c.symbolize(BASE + 0xf8), None, "a function past the end");
    }

    #[test]
    fn region_lookup() {
        let regions = [sample()];
        assert!(region_at(&regions, BASE + 0xff).is_some());
        assert!(region_at(&regions, BASE + 0x100).is_none());
        assert!(region_at(&[], BASE).is_none());
    }
}
