//! Human-readable forms of `vmm patch list` and `vmm patch events` (the API's JSON is
//! printed as it is with `--json`).

use serde_json::Value;

/// `seconds since the epoch` as a UTC calendar date and time (proleptic Gregorian).
fn utc(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (the "days from civil" algorithm run backwards
    // over 400-year eras of 146,097 days).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
    )
}

/// An event time (microseconds since the epoch) as `YYYY-MM-DD HH:MM:SS.uuuuuu`.
pub fn timestamp(time_us: u64) -> String {
    let (y, mo, d, h, mi, s) = utc(time_us / 1_000_000);
    format!(
        "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{:06}",
        time_us % 1_000_000
    )
}

/// The event log, one line per event: time, bundle, what happened.
pub fn events(body: &Value) -> Vec<String> {
    let Some(list) = body["events"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|e| {
            format!(
                "{} UTC  {}: {}",
                timestamp(e["time_us"].as_u64().unwrap_or(0)),
                e["bundle"].as_str().unwrap_or("?"),
                e["what"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn yes(v: &Value) -> &'static str {
    if v.as_bool() == Some(true) {
        "yes"
    } else {
        "no"
    }
}

fn status(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => match o.get("replaced") {
            Some(r) => format!("replaced by {}", r["by"].as_str().unwrap_or("?")),
            None => "?".into(),
        },
        _ => "?".into(),
    }
}

fn le_int(bytes: &Value) -> String {
    let raw: Vec<u8> = bytes
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_u64().map(|b| b as u8))
                .collect()
        })
        .unwrap_or_default();
    patcher::system_state::show(&raw)
}

/// Bundles in stack order with their functions (as `/sys/kernel/livepatch` shows them),
/// then the system states in force.
pub fn list(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let bundles = body["bundles"].as_array().cloned().unwrap_or_default();
    if bundles.is_empty() {
        out.push("no bundles applied".into());
    }
    for b in &bundles {
        out.push(format!(
            "{} version {}: {} (replace: {}, sticky: {}, forced: {}, stack order {})",
            b["name"].as_str().unwrap_or("?"),
            b["version"],
            status(&b["status"]),
            yes(&b["replace"]),
            yes(&b["sticky"]),
            yes(&b["forced"]),
            b["stack_order"]
        ));
        if let (Some(base), Some(size)) =
            (b["memory"]["base"].as_u64(), b["memory"]["size"].as_u64())
        {
            out.push(format!(
                "  patch memory: {} KiB at {base:#x}{}",
                size / 1024,
                if b["pinned"].as_bool() == Some(true) {
                    " (pinned by a forced transition)"
                } else {
                    ""
                }
            ));
        }
        for f in b["functions"].as_array().into_iter().flatten() {
            out.push(format!(
                "  {},{}  {:#x} -> {:#x}  {}",
                f["old"].as_str().unwrap_or("?"),
                f["sympos"],
                f["site"].as_u64().unwrap_or(0),
                f["new_addr"].as_u64().unwrap_or(0),
                if f["active"].as_bool() == Some(true) {
                    "patched"
                } else {
                    "not active"
                }
            ));
        }
    }
    let states = body["states"].as_array().cloned().unwrap_or_default();
    if !states.is_empty() {
        out.push("states in force:".into());
    }
    for s in &states {
        let holders: Vec<&str> = s["holders"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let mut line = format!(
            "  state {} version {}: held by {}",
            s["id"],
            s["version"],
            holders.join(", ")
        );
        if let Some(from) = s["taken_over_from"].as_str() {
            line.push_str(&format!(" (taken over from {from})"));
        }
        for v in s["saved"].as_array().into_iter().flatten() {
            line.push_str(&format!(
                "; saved {} = {}",
                v["symbol"].as_str().unwrap_or("?"),
                le_int(&v["original"])
            ));
        }
        out.push(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_are_utc_calendar_times() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00.000000");
        // 2026-11-30 12:34:56.000789 UTC
        assert_eq!(
            timestamp(1_796_042_096_000_789),
            "2026-11-30 12:34:56.000789"
        );
        // A leap day.
        assert_eq!(timestamp(951_782_400_000_000), "2000-02-29 00:00:00.000000");
    }

    #[test]
    fn list_shows_functions_and_states() {
        let body = json!({
            "bundles": [{
                "name": "state2", "version": 2, "status": "enabled", "replace": true,
                "sticky": false, "forced": false, "stack_order": 1,
                "memory": {"base": 4096, "size": 8192}, "pinned": false,
                "functions": [{"old": "cmdline_proc_show", "sympos": 1, "site": 16,
                               "new_addr": 32, "active": true}]
            }, {
                "name": "state", "version": 1, "status": {"replaced": {"by": "state2"}},
                "replace": true, "sticky": false, "forced": false, "stack_order": 1,
                "functions": []
            }],
            "states": [{"id": 1, "version": 2, "holders": ["state2"],
                        "taken_over_from": "state",
                        "saved": [{"symbol": "console_loglevel", "addr": 1,
                                   "original": [7, 0, 0, 0]}]}]
        });
        assert_eq!(
            list(&body),
            [
                "state2 version 2: enabled (replace: yes, sticky: no, forced: no, stack order 1)",
                "  patch memory: 8 KiB at 0x1000",
                "  cmdline_proc_show,1  0x10 -> 0x20  patched",
                "state version 1: replaced by state2 (replace: yes, sticky: no, forced: no, stack order 1)",
                "states in force:",
                "  state 1 version 2: held by state2 (taken over from state); saved console_loglevel = 7",
            ]
        );
        let ev =
            json!({"events": [{"seq": 1, "time_us": 0, "bundle": "b", "what": "enabling patch"}]});
        assert_eq!(
            events(&ev),
            ["1970-01-01 00:00:00.000000 UTC  b: enabling patch"]
        );
    }
}
