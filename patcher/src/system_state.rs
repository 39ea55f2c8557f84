//! System states in force and their host-side actions: the kernel's livepatch states
//! (`struct klp_state`) with the pre/post patch/unpatch callbacks replaced by writes the
//! host makes to guest kernel variables inside the transition's pause.
//!
//! A state is set up by the first enabled bundle that declares it: the host saves the
//! original value of every variable the bundle's actions name, then writes the bundle's
//! values. A later bundle declaring the same id takes the state over (the saved originals
//! stay, as `klp_get_prev_state` hands over `data` in the kernel's test_klp_state2) and its
//! own values are written. The values in force are always the saved originals overlaid
//! with the top holder's values; when the last holder goes, the originals are written back
//! and the state is released. docs/semantics.md.

use serde::{Deserialize, Serialize};

/// A state action resolved against the running kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedAction {
    pub state: u64,
    pub symbol: String,
    /// Address of the variable in the guest kernel.
    pub addr: u64,
    /// The value the action writes, little-endian, as wide as the variable.
    pub value: Vec<u8>,
}

/// A variable's value from before any bundle changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedValue {
    pub symbol: String,
    pub addr: u64,
    pub original: Vec<u8>,
}

/// A state in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub id: u64,
    /// The top holder's version of the state.
    pub version: u32,
    /// Enabled bundles declaring the state, oldest first; the last one's values are in force.
    pub holders: Vec<String>,
    /// Original values saved when the state was set up (or when a holder first named a
    /// variable); written back when the state is released.
    pub saved: Vec<SavedValue>,
    /// The bundle this state was last taken over from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_over_from: Option<String>,
}

/// One write to a kernel variable, with the bytes expected there (read in the same pause).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataWrite {
    pub state: u64,
    pub symbol: String,
    pub addr: u64,
    pub expected: Vec<u8>,
    pub value: Vec<u8>,
}

/// What a transition does to system states: the events of its pre and post phases, the
/// originals it saves and the writes it makes (in the pre phase when unpatching, in the
/// post phase when patching, as the kernel's callbacks do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatePlan {
    pub pre: Vec<String>,
    pub saves: Vec<(u64, SavedValue)>,
    pub writes: Vec<DataWrite>,
    pub post: Vec<String>,
}

/// Reads `len` bytes of guest kernel memory at an address.
pub type ReadData<'a> = dyn FnMut(u64, usize) -> Result<Vec<u8>, String> + 'a;

/// A little-endian value as a signed decimal (kernel variables are mostly `int`).
pub fn show(bytes: &[u8]) -> String {
    if bytes.is_empty() || bytes.len() > 8 {
        return format!("{bytes:02x?}");
    }
    let mut b = [0u8; 8];
    b[..bytes.len()].copy_from_slice(bytes);
    let shift = 64 - 8 * bytes.len() as u32;
    let v = (i64::from_le_bytes(b) << shift) >> shift;
    v.to_string()
}

/// The values in force for a state: originals overlaid with `actions` (the top holder's).
fn in_force<'a>(
    saved: &'a [SavedValue],
    actions: &'a [&'a ResolvedAction],
) -> Vec<(&'a str, u64, &'a [u8])> {
    saved
        .iter()
        .map(|s| {
            let value = actions
                .iter()
                .find(|a| a.addr == s.addr)
                .map_or(s.original.as_slice(), |a| a.value.as_slice());
            (s.symbol.as_str(), s.addr, value)
        })
        .collect()
}

/// Writes that make `targets` the values in force, skipping those already there.
fn writes_for(
    state: u64,
    targets: &[(&str, u64, &[u8])],
    read: &mut ReadData<'_>,
) -> Result<Vec<DataWrite>, String> {
    let mut out = Vec::new();
    for &(symbol, addr, value) in targets {
        let now = read(addr, value.len()).map_err(|e| format!("{symbol}: {e}"))?;
        if now != value {
            out.push(DataWrite {
                state,
                symbol: symbol.to_string(),
                addr,
                expected: now,
                value: value.to_vec(),
            });
        }
    }
    Ok(out)
}

/// Plans the state side of applying `bundle` (declaring `declared` (id, version) with
/// `actions`) over the states now in force. `replace` retires every other holder.
pub fn plan_apply(
    states: &std::collections::BTreeMap<u64, StateRecord>,
    bundle: &str,
    declared: &[(u64, u32)],
    actions: &[ResolvedAction],
    read: &mut ReadData<'_>,
) -> Result<StatePlan, String> {
    let mut plan = StatePlan::default();
    for &(id, version) in declared {
        let mine: Vec<&ResolvedAction> = actions.iter().filter(|a| a.state == id).collect();
        let mut saved = match states.get(&id) {
            Some(rec) => {
                let from = rec.holders.last().map_or("?", String::as_str);
                plan.pre.push(format!(
                    "state {id}: taking over from {from} (version {} to {version}); saved values kept",
                    rec.version
                ));
                rec.saved.clone()
            }
            None => {
                plan.pre
                    .push(format!("state {id}: setting up (version {version})"));
                Vec::new()
            }
        };
        for a in &mine {
            if saved.iter().any(|s| s.addr == a.addr) {
                continue;
            }
            let original = read(a.addr, a.value.len()).map_err(|e| format!("{}: {e}", a.symbol))?;
            plan.pre.push(format!(
                "state {id}: saved {} = {}",
                a.symbol,
                show(&original)
            ));
            let value = SavedValue {
                symbol: a.symbol.clone(),
                addr: a.addr,
                original,
            };
            plan.saves.push((id, value.clone()));
            saved.push(value);
        }
        let writes = writes_for(id, &in_force(&saved, &mine), read)?;
        for w in &writes {
            plan.post.push(format!(
                "state {id}: {} = {} (was {})",
                w.symbol,
                show(&w.value),
                show(&w.expected)
            ));
        }
        if writes.is_empty() && !mine.is_empty() {
            plan.post
                .push(format!("state {id}: values already in force for {bundle}"));
        }
        plan.writes.extend(writes);
    }
    Ok(plan)
}

/// Plans the state side of disabling `bundle` (declaring `declared` ids): each state goes
/// back to the holder below (its values) or, with no holder left, to the originals.
/// `actions_of(bundle, id)` gives a holder's resolved actions.
pub fn plan_disable<'a>(
    states: &'a std::collections::BTreeMap<u64, StateRecord>,
    bundle: &str,
    declared: &[u64],
    actions_of: &dyn Fn(&str, u64) -> Vec<&'a ResolvedAction>,
    read: &mut ReadData<'_>,
) -> Result<StatePlan, String> {
    let mut plan = StatePlan::default();
    for &id in declared {
        let Some(rec) = states.get(&id) else {
            continue;
        };
        let rest: Vec<&String> = rec.holders.iter().filter(|h| *h != bundle).collect();
        let on_top = rec.holders.last().is_some_and(|h| h == bundle);
        let writes = match rest.last() {
            None => {
                let w = writes_for(id, &in_force(&rec.saved, &[]), read)?;
                for w in &w {
                    plan.pre.push(format!(
                        "state {id}: {} restored to {} (was {})",
                        w.symbol,
                        show(&w.value),
                        show(&w.expected)
                    ));
                }
                plan.post.push(format!("state {id}: released"));
                w
            }
            Some(below) if on_top => {
                plan.pre
                    .push(format!("state {id}: handing back to {below}"));
                let theirs = actions_of(below, id);
                let w = writes_for(id, &in_force(&rec.saved, &theirs), read)?;
                for w in &w {
                    plan.pre.push(format!(
                        "state {id}: {} = {} (was {})",
                        w.symbol,
                        show(&w.value),
                        show(&w.expected)
                    ));
                }
                w
            }
            Some(_) => {
                let top = rec.holders.last().map_or("?", String::as_str);
                plan.pre
                    .push(format!("state {id}: stays with {top}; nothing to write"));
                Vec::new()
            }
        };
        plan.writes.extend(writes);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    const LOGLEVEL: u64 = 0xffff_ffff_82a0_0000;

    fn action(value: i32) -> ResolvedAction {
        ResolvedAction {
            state: 1,
            symbol: "console_loglevel".into(),
            addr: LOGLEVEL,
            value: value.to_le_bytes().to_vec(),
        }
    }

    struct Mem(HashMap<u64, Vec<u8>>);
    impl Mem {
        fn read(&self) -> impl FnMut(u64, usize) -> Result<Vec<u8>, String> + '_ {
            |addr, len| {
                self.0
                    .get(&addr)
                    .filter(|v| v.len() == len)
                    .cloned()
                    .ok_or_else(|| format!("{addr:#x} unreadable"))
            }
        }
    }

    #[test]
    fn set_up_saves_the_original_and_writes_after_patching() {
        let mem = Mem([(LOGLEVEL, 7i32.to_le_bytes().to_vec())].into());
        let plan = plan_apply(
            &BTreeMap::new(),
            "state",
            &[(1, 1)],
            &[action(15)],
            &mut mem.read(),
        )
        .unwrap();
        assert_eq!(plan.saves[0].1.original, 7i32.to_le_bytes());
        assert_eq!(plan.writes.len(), 1);
        assert_eq!(plan.writes[0].value, 15i32.to_le_bytes());
        assert_eq!(
            plan.pre,
            [
                "state 1: setting up (version 1)",
                "state 1: saved console_loglevel = 7"
            ]
        );
        assert_eq!(plan.post, ["state 1: console_loglevel = 15 (was 7)"]);
    }

    #[test]
    fn a_take_over_keeps_the_saved_original() {
        let states: BTreeMap<u64, StateRecord> = [(
            1,
            StateRecord {
                id: 1,
                version: 1,
                holders: vec!["state".into()],
                saved: vec![SavedValue {
                    symbol: "console_loglevel".into(),
                    addr: LOGLEVEL,
                    original: 7i32.to_le_bytes().to_vec(),
                }],
                taken_over_from: None,
            },
        )]
        .into();
        let mem = Mem([(LOGLEVEL, 15i32.to_le_bytes().to_vec())].into());
        let plan =
            plan_apply(&states, "state2", &[(1, 2)], &[action(15)], &mut mem.read()).unwrap();
        assert!(plan.saves.is_empty(), "{plan:?}");
        assert!(plan.writes.is_empty());
        assert!(plan.pre[0].contains("taking over from state (version 1 to 2)"));
        // A holder with another value writes it; releasing restores the true original.
        let plan = plan_apply(&states, "state2", &[(1, 2)], &[action(4)], &mut mem.read()).unwrap();
        assert_eq!(plan.writes[0].value, 4i32.to_le_bytes());
        let none = |_: &str, _: u64| Vec::new();
        let plan = plan_disable(&states, "state", &[1], &none, &mut mem.read()).unwrap();
        assert_eq!(plan.writes[0].value, 7i32.to_le_bytes());
        assert_eq!(plan.post, ["state 1: released"]);
    }

    #[test]
    fn disabling_the_top_holder_hands_the_state_back() {
        let below = action(4);
        let states: BTreeMap<u64, StateRecord> = [(
            1,
            StateRecord {
                id: 1,
                version: 1,
                holders: vec!["low".into(), "top".into()],
                saved: vec![SavedValue {
                    symbol: "console_loglevel".into(),
                    addr: LOGLEVEL,
                    original: 7i32.to_le_bytes().to_vec(),
                }],
                taken_over_from: Some("low".into()),
            },
        )]
        .into();
        let mem = Mem([(LOGLEVEL, 15i32.to_le_bytes().to_vec())].into());
        let of = |b: &str, _: u64| if b == "low" { vec![&below] } else { Vec::new() };
        let plan = plan_disable(&states, "top", &[1], &of, &mut mem.read()).unwrap();
        assert_eq!(plan.writes[0].value, 4i32.to_le_bytes());
        // The lower holder going first changes nothing in the guest.
        let plan = plan_disable(&states, "low", &[1], &of, &mut mem.read()).unwrap();
        assert!(plan.writes.is_empty());
    }

    #[test]
    fn an_unreadable_variable_fails_the_plan() {
        let mem = Mem(HashMap::new());
        let err = plan_apply(
            &BTreeMap::new(),
            "b",
            &[(1, 1)],
            &[action(1)],
            &mut mem.read(),
        )
        .unwrap_err();
        assert!(err.contains("console_loglevel"), "{err}");
    }

    #[test]
    fn values_show_as_signed_integers() {
        assert_eq!(show(&[0xff, 0xff, 0xff, 0xff]), "-1");
        assert_eq!(show(&[15]), "15");
        assert_eq!(show(&[0x80]), "-128");
    }
}
