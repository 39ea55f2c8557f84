//! The bundle manifest: what a patch replaces, for which kernel, and what it declares.

use serde::{Deserialize, Serialize};

/// Errors in a manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest does not parse: {0}")]
    Parse(String),
    #[error("manifest: {0}")]
    Invalid(String),
}

/// One function replacement: calls to `old` run `new` instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replacement {
    /// The guest kernel function to replace, as named in kallsyms.
    pub old: String,
    /// Position among kallsyms symbols of the same name (1-based, as kpatch's sympos);
    /// required when the name is not unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sympos: Option<u32>,
    /// The replacement function, defined in the bundle's object.
    pub new: String,
}

/// Which of several same-named kernel symbols the patch code means when it refers to one
/// (kpatch writes this as `.klp.sym.vmlinux.NAME,POS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymbolRef {
    pub name: String,
    /// Position among kallsyms symbols of that name (1-based).
    pub sympos: u32,
}

/// A system state the patch introduces or understands (kernel livepatch "states").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub id: u64,
    pub version: u32,
    /// What the host does to guest memory for this state, in place of the kernel's
    /// pre/post patch/unpatch callbacks (docs/semantics.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<StateAction>,
}

/// A host-side state action: when the state is set up, the host saves the kernel
/// variable `symbol` (`size` bytes) and writes `value` into it; when the state is
/// released, the saved value is written back. The saved value belongs to the state, so a
/// bundle that takes the state over keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateAction {
    /// A data or bss symbol of the kernel image, as named in kallsyms.
    pub symbol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sympos: Option<u32>,
    /// Width of the variable in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// The value to write (signed or unsigned; it must fit `size` bytes).
    pub value: i128,
}

impl StateAction {
    /// `value` as `size` little-endian bytes (validated to fit).
    pub fn bytes(&self) -> Vec<u8> {
        self.value.to_le_bytes()[..usize::from(self.size)].to_vec()
    }

    fn fits(&self) -> bool {
        let bits = u32::from(self.size) * 8;
        let min = -(1i128 << (bits - 1));
        let max = (1i128 << bits) - 1;
        (min..=max).contains(&self.value)
    }
}

/// Most actions one state may declare.
pub const MAX_ACTIONS: usize = 64;

/// The kernel a bundle is built for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// `uname -r` of the guest kernel, e.g. `6.1.0-53-cloud-amd64`.
    pub release: String,
    /// The kernel's GNU build ID (hex). A bundle is refused by a kernel with another one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
}

/// What a bundle declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Patch name, unique among applied bundles (like a livepatch module name).
    pub name: String,
    /// Patch version: a cumulative bundle must carry a higher version than every applied
    /// bundle (unless the operator allows a downgrade); docs/semantics.md.
    #[serde(default = "one")]
    pub version: u32,
    /// A sticky bundle cannot be disabled, only superseded by a cumulative bundle.
    #[serde(default)]
    pub sticky: bool,
    pub target: Target,
    /// Cumulative ("atomic replace") bundle: it replaces every bundle applied before it.
    #[serde(default)]
    pub replace: bool,
    pub functions: Vec<Replacement>,
    #[serde(default)]
    pub states: Vec<State>,
    /// Kernel symbols the patch code refers to whose names are not unique in kallsyms.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub symbols: Vec<SymbolRef>,
}

fn one() -> u32 {
    1
}

/// Longest symbol name accepted (the kernel's KSYM_NAME_LEN is 512).
const MAX_NAME: usize = 512;
/// Most functions one bundle may replace.
pub const MAX_FUNCTIONS: usize = 4096;

/// A kernel symbol name: C identifier characters plus the `.` of compiler suffixes
/// (`.isra.0`, `.constprop.0`, `.cold`).
fn valid_symbol(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'$')
}

impl Manifest {
    /// Parses and validates a JSON manifest.
    pub fn from_json(text: &str) -> Result<Self, ManifestError> {
        let m: Manifest =
            serde_json::from_str(text).map_err(|e| ManifestError::Parse(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Checks everything that does not need the kernel or the object.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |msg: String| Err(ManifestError::Invalid(msg));
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return bad(format!(
                "name {:?} must be 1-64 characters of letters, digits, '_' or '-'",
                self.name
            ));
        }
        if self.version == 0 {
            return bad("version must be at least 1".into());
        }
        if self.target.release.is_empty() || self.target.release.len() > 64 {
            return bad("target.release must be the guest's `uname -r`".into());
        }
        if let Some(id) = &self.target.build_id {
            if id.is_empty()
                || id.len() > 128
                || id.len() % 2 != 0
                || !id.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return bad(format!("target.build_id {id:?} is not a hex build ID"));
            }
        }
        if self.functions.is_empty() && !self.replace {
            return bad("functions is empty (only a replace bundle may carry no functions)".into());
        }
        if self.functions.len() > MAX_FUNCTIONS {
            return bad(format!("more than {MAX_FUNCTIONS} functions"));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.functions {
            for (what, name) in [("old", &f.old), ("new", &f.new)] {
                if !valid_symbol(name) {
                    return bad(format!(
                        "{what} function name {name:?} is not a symbol name"
                    ));
                }
            }
            if f.sympos == Some(0) {
                return bad(format!("{}: sympos counts from 1", f.old));
            }
            if !seen.insert((f.old.as_str(), f.sympos.unwrap_or(1))) {
                return bad(format!(
                    "{}{} is replaced twice",
                    f.old,
                    f.sympos.map(|p| format!(",{p}")).unwrap_or_default()
                ));
            }
        }
        if self.symbols.len() > MAX_FUNCTIONS {
            return bad(format!("more than {MAX_FUNCTIONS} symbols"));
        }
        let mut refs = std::collections::HashSet::new();
        for r in &self.symbols {
            if !valid_symbol(&r.name) {
                return bad(format!("symbol name {:?} is not a symbol name", r.name));
            }
            if r.sympos == 0 {
                return bad(format!("symbol {}: sympos counts from 1", r.name));
            }
            if !refs.insert(r.name.as_str()) {
                return bad(format!("symbol {} is given a position twice", r.name));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for s in &self.states {
            if s.id == 0 {
                return bad("state id 0 is reserved (ids start at 1, as in the kernel)".into());
            }
            if !ids.insert(s.id) {
                return bad(format!("state {} is declared twice", s.id));
            }
            if s.actions.len() > MAX_ACTIONS {
                return bad(format!("state {}: more than {MAX_ACTIONS} actions", s.id));
            }
            for a in &s.actions {
                if !valid_symbol(&a.symbol) {
                    return bad(format!(
                        "state {}: {:?} is not a symbol name",
                        s.id, a.symbol
                    ));
                }
                if a.sympos == Some(0) {
                    return bad(format!(
                        "state {}: {}: sympos counts from 1",
                        s.id, a.symbol
                    ));
                }
                if ![1, 2, 4, 8].contains(&a.size) {
                    return bad(format!(
                        "state {}: {}: size must be 1, 2, 4 or 8 bytes",
                        s.id, a.symbol
                    ));
                }
                if !a.fits() {
                    return bad(format!(
                        "state {}: {}: value {} does not fit {} bytes",
                        s.id, a.symbol, a.value, a.size
                    ));
                }
            }
        }
        let mut vars = std::collections::HashSet::new();
        for a in self.states.iter().flat_map(|s| &s.actions) {
            if !vars.insert((a.symbol.as_str(), a.sympos.unwrap_or(1))) {
                return bad(format!("{} is written by two state actions", a.symbol));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "name": "cmdline-demo",
        "version": 2,
        "target": {"release": "6.1.0-53-cloud-amd64", "build_id": "00ff"},
        "replace": true,
        "functions": [{"old": "cmdline_proc_show", "new": "livepatch_cmdline_proc_show"},
                      {"old": "show_val.isra.0", "sympos": 2, "new": "new_show_val"}],
        "states": [{"id": 7, "version": 1,
                    "actions": [{"symbol": "console_loglevel", "size": 4, "value": 15}]}],
        "symbols": [{"name": "pgd_val", "sympos": 2}]
    }"#;

    #[test]
    fn negative_and_unsigned_values_encode_little_endian() {
        let a = |size, value| StateAction {
            symbol: "v".into(),
            sympos: None,
            size,
            value,
        };
        assert_eq!(a(4, -1).bytes(), vec![0xff; 4]);
        assert_eq!(a(1, 255).bytes(), vec![0xff]);
        assert_eq!(a(8, u64::MAX as i128).bytes(), vec![0xff; 8]);
        assert!(!a(1, 256).fits() && a(1, -128).fits() && !a(1, -129).fits());
    }

    #[test]
    fn parses_a_complete_manifest() {
        let m = Manifest::from_json(GOOD).unwrap();
        assert_eq!(m.version, 2);
        assert!(m.replace);
        assert_eq!(m.functions[1].sympos, Some(2));
        assert_eq!(
            m.states,
            vec![State {
                id: 7,
                version: 1,
                actions: vec![StateAction {
                    symbol: "console_loglevel".into(),
                    sympos: None,
                    size: 4,
                    value: 15
                }]
            }]
        );
        assert_eq!(m.states[0].actions[0].bytes(), vec![15, 0, 0, 0]);
        let round = Manifest::from_json(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(round, m);
    }

    #[test]
    fn rejects_bad_manifests_with_a_reason() {
        let cases = [
            (GOOD.replace("cmdline-demo", "bad name"), "name"),
            (GOOD.replace("\"version\": 2", "\"version\": 0"), "version"),
            (GOOD.replace("00ff", "xyz"), "build_id"),
            (GOOD.replace("\"sympos\": 2", "\"sympos\": 0"), "sympos"),
            (
                GOOD.replace("show_val.isra.0", "cmdline_proc_show")
                    .replace("\"sympos\": 2, ", ""),
                "replaced twice",
            ),
            (
                GOOD.replace(
                    "\"states\": [",
                    "\"states\": [{\"id\": 7, \"version\": 2}, ",
                ),
                "declared twice",
            ),
            (
                GOOD.replace("livepatch_cmdline_proc_show", "1abc"),
                "not a symbol",
            ),
            (
                GOOD.replace("\"replace\": true", "\"replcae\": true"),
                "unknown field",
            ),
            ("{".to_string(), "parse"),
            (GOOD.replace("\"id\": 7", "\"id\": 0"), "id 0"),
            (GOOD.replace("\"id\": 7", "\"id\": -1"), "parse"),
            (GOOD.replace("\"version\": 1,", "\"version\": -1,"), "parse"),
            (GOOD.replace("\"size\": 4", "\"size\": 3"), "1, 2, 4 or 8"),
            (
                GOOD.replace("\"value\": 15", "\"value\": 4294967296"),
                "does not fit",
            ),
            (
                GOOD.replace("\"value\": 15", "\"value\": -2147483649"),
                "does not fit",
            ),
            (GOOD.replace("console_loglevel", "9x"), "not a symbol"),
            (
                GOOD.replace(
                    "\"value\": 15}",
                    "\"value\": 15}, {\"symbol\": \"console_loglevel\", \"size\": 4, \"value\": 1}",
                ),
                "two state actions",
            ),
            (GOOD.replace("\"sympos\": 2}]\n", "\"sympos\": 0}]\n"), "sympos counts from 1"),
            (
                GOOD.replace(
                    "{\"name\": \"pgd_val\", \"sympos\": 2}",
                    "{\"name\": \"pgd_val\", \"sympos\": 2}, {\"name\": \"pgd_val\", \"sympos\": 1}",
                ),
                "given a position twice",
            ),
            (GOOD.replace("\"pgd_val\"", "\"pgd val\""), "not a symbol name"),
        ];
        for (text, want) in cases {
            let err = Manifest::from_json(&text)
                .map(|_| panic!("accepted, expected {want}: {text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
