//! Function redirection at the fentry site: the first five bytes of every traceable
//! function in this kernel are the NOP ftrace leaves in place of `call __fentry__`.
//! A redirection replaces them with `jmp rel32` to the new function and keeps the
//! original bytes so reverting restores them exactly.

use iced_x86::{Decoder, DecoderOptions, Mnemonic};

/// Length of the fentry site and of `jmp rel32`.
pub const SITE_LEN: usize = 5;

/// Why a site cannot be redirected or reverted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RedirectError {
    #[error("{func} is {size} bytes long, too short for a {SITE_LEN}-byte redirection")]
    TooShort { func: String, size: u64 },
    #[error("{func} is already redirected (jmp at its entry): another patch or tool owns it")]
    AlreadyRedirected { func: String },
    #[error("{func} is being traced (ftrace call at its entry); disable the guest's tracer first")]
    Traced { func: String },
    #[error("{func} has a breakpoint at its entry (kprobe or text_poke in progress)")]
    Breakpoint { func: String },
    #[error("{func} does not start with the fentry NOP (found {found}); it cannot be redirected")]
    NoFentryNop { func: String, found: String },
    #[error("{func}: the new code at {target:#x} is out of rel32 reach of {site:#x}")]
    OutOfReach {
        func: String,
        site: u64,
        target: u64,
    },
    #[error("{func} was changed by someone else since it was redirected (found {found})")]
    Tampered { func: String, found: String },
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `jmp rel32` from `site` to `target`.
pub fn jmp_rel32(site: u64, target: u64) -> Option<[u8; SITE_LEN]> {
    let rel = (target as i128) - (site as i128 + SITE_LEN as i128);
    let rel = i32::try_from(rel).ok()?;
    let r = rel.to_le_bytes();
    Some([0xe9, r[0], r[1], r[2], r[3]])
}

/// Whether `bytes` decode as one 5-byte NOP (any encoding the kernel may use).
pub fn is_five_byte_nop(bytes: &[u8; SITE_LEN], site: u64) -> bool {
    let mut decoder = Decoder::with_ip(64, bytes, site, DecoderOptions::NONE);
    let insn = decoder.decode();
    !insn.is_invalid() && insn.len() == SITE_LEN && insn.mnemonic() == Mnemonic::Nop
}

/// One planned write: at `site`, `expected` bytes become `replacement`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteWrite {
    pub site: u64,
    pub expected: [u8; SITE_LEN],
    pub replacement: [u8; SITE_LEN],
}

/// Plans redirecting function `func` (entry `site`, `size` bytes, currently holding
/// `current`) to `target`.
pub fn plan_redirect(
    func: &str,
    site: u64,
    size: u64,
    current: [u8; SITE_LEN],
    target: u64,
) -> Result<SiteWrite, RedirectError> {
    let func = func.to_string();
    if size < SITE_LEN as u64 {
        return Err(RedirectError::TooShort { func, size });
    }
    if !is_five_byte_nop(&current, site) {
        return Err(match current[0] {
            0xe9 => RedirectError::AlreadyRedirected { func },
            0xe8 => RedirectError::Traced { func },
            0xcc => RedirectError::Breakpoint { func },
            _ => RedirectError::NoFentryNop {
                func,
                found: hex(&current),
            },
        });
    }
    let replacement =
        jmp_rel32(site, target).ok_or(RedirectError::OutOfReach { func, site, target })?;
    Ok(SiteWrite {
        site,
        expected: current,
        replacement,
    })
}

/// Plans moving an existing redirection at `site` (currently `jmp` to `from`) to `to`,
/// as when a stacked or replacing patch takes over a function.
pub fn plan_retarget(
    func: &str,
    site: u64,
    current: [u8; SITE_LEN],
    from: u64,
    to: u64,
) -> Result<SiteWrite, RedirectError> {
    let ours = jmp_rel32(site, from);
    if ours != Some(current) {
        return Err(RedirectError::Tampered {
            func: func.to_string(),
            found: hex(&current),
        });
    }
    let replacement = jmp_rel32(site, to).ok_or(RedirectError::OutOfReach {
        func: func.to_string(),
        site,
        target: to,
    })?;
    Ok(SiteWrite {
        site,
        expected: current,
        replacement,
    })
}

/// Plans restoring the `original` bytes at `site`, which must still hold the `jmp` to
/// `target` written earlier.
pub fn plan_revert(
    func: &str,
    site: u64,
    current: [u8; SITE_LEN],
    target: u64,
    original: [u8; SITE_LEN],
) -> Result<SiteWrite, RedirectError> {
    if jmp_rel32(site, target) != Some(current) {
        return Err(RedirectError::Tampered {
            func: func.to_string(),
            found: hex(&current),
        });
    }
    Ok(SiteWrite {
        site,
        expected: current,
        replacement: original,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
    const SITE: u64 = 0xffff_ffff_8100_1000;

    #[test]
    fn redirects_the_fentry_nop_and_reverts_exactly() {
        let target = 0xffff_ffff_c000_0040;
        let w = plan_redirect("f", SITE, 64, NOP5, target).unwrap();
        assert_eq!(w.replacement[0], 0xe9);
        let rel = i32::from_le_bytes(w.replacement[1..].try_into().unwrap());
        assert_eq!(SITE as i64 + 5 + i64::from(rel), target as i64);
        let back = plan_revert("f", SITE, w.replacement, target, NOP5).unwrap();
        assert_eq!(back.replacement, NOP5);
        // Backwards jumps work too.
        assert!(plan_redirect("f", SITE, 64, NOP5, SITE - 0x1000).is_ok());
    }

    #[test]
    fn other_five_byte_nops_are_accepted() {
        assert!(is_five_byte_nop(&NOP5, SITE));
        assert!(!is_five_byte_nop(&[0x90, 0x90, 0x90, 0x90, 0x90], SITE));
        assert!(!is_five_byte_nop(&[0x55, 0x48, 0x89, 0xe5, 0x90], SITE));
    }

    #[test]
    fn refuses_sites_it_does_not_own() {
        let cases: [([u8; 5], &str); 4] = [
            ([0xe9, 1, 2, 3, 4], "already redirected"),
            ([0xe8, 1, 2, 3, 4], "traced"),
            ([0xcc, 0x1f, 0x44, 0, 0], "breakpoint"),
            ([0x55, 0x48, 0x89, 0xe5, 0x53], "found 55 48 89 e5 53"),
        ];
        for (bytes, want) in cases {
            let err = plan_redirect("victim", SITE, 64, bytes, SITE + 0x100)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want) && err.contains("victim"), "{err}");
        }
        assert!(matches!(
            plan_redirect("tiny", SITE, 4, NOP5, SITE + 0x100),
            Err(RedirectError::TooShort { .. })
        ));
        assert!(matches!(
            plan_redirect("far", SITE, 64, NOP5, SITE - (1 << 33)),
            Err(RedirectError::OutOfReach { .. })
        ));
    }

    #[test]
    fn retarget_and_revert_check_the_site_is_still_ours() {
        let a = 0xffff_ffff_c000_0000;
        let b = 0xffff_ffff_c000_1000;
        let w = plan_redirect("f", SITE, 64, NOP5, a).unwrap();
        let r = plan_retarget("f", SITE, w.replacement, a, b).unwrap();
        assert_eq!(r.replacement, jmp_rel32(SITE, b).unwrap());
        assert!(matches!(
            plan_retarget("f", SITE, w.replacement, b, a),
            Err(RedirectError::Tampered { .. })
        ));
        assert!(matches!(
            plan_revert("f", SITE, NOP5, a, NOP5),
            Err(RedirectError::Tampered { .. })
        ));
    }
}
