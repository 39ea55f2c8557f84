//! The bundle file: one self-describing file holding a manifest and the patch's compiled
//! code (an ELF relocatable object), protected by a SHA-256. Layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VMMPATCH` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | manifest length M |
//! | 16 | 8 | object length O |
//! | 24 | M | manifest, JSON |
//! | 24+M | O | ELF64 relocatable object |
//! | 24+M+O | 32 | SHA-256 of bytes 0..24+M+O |

use sha2::{Digest, Sha256};

use crate::manifest::{Manifest, ManifestError};

pub const MAGIC: &[u8; 8] = b"VMMPATCH";
pub const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 24;
const DIGEST: usize = 32;
/// Largest manifest accepted.
pub const MAX_MANIFEST: usize = 1 << 20;
/// Largest object accepted.
pub const MAX_OBJECT: usize = 64 << 20;

/// Errors reading or writing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a patch bundle (bad magic)")]
    BadMagic,
    #[error(
        "bundle format version {0} is not supported (this vmm reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    #[error("bundle is truncated: {found} bytes, its header needs {needed}")]
    Truncated { found: usize, needed: usize },
    #[error("bundle has {0} trailing bytes after its checksum")]
    Trailing(usize),
    #[error("bundle {what} is too large ({len} bytes, at most {max})")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("bundle checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("bundle manifest is not UTF-8")]
    ManifestEncoding,
    #[error("bundle {0}")]
    Manifest(#[from] ManifestError),
    #[error("cannot encode the manifest: {0}")]
    Encode(String),
}

/// A decoded, verified bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub manifest: Manifest,
    pub object: Vec<u8>,
}

impl Bundle {
    /// Serializes the bundle.
    pub fn encode(&self) -> Result<Vec<u8>, BundleError> {
        self.manifest.validate()?;
        let manifest = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| BundleError::Encode(e.to_string()))?;
        for (what, len, max) in [
            ("manifest", manifest.len(), MAX_MANIFEST),
            ("object", self.object.len(), MAX_OBJECT),
        ] {
            if len > max {
                return Err(BundleError::TooLarge { what, len, max });
            }
        }
        let mut out = Vec::with_capacity(HEADER + manifest.len() + self.object.len() + DIGEST);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.object.len() as u64).to_le_bytes());
        out.extend_from_slice(&manifest);
        out.extend_from_slice(&self.object);
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        Ok(out)
    }

    /// Parses and verifies a bundle: framing, checksum, then the manifest.
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(BundleError::BadMagic);
        }
        if bytes.len() < HEADER {
            return Err(BundleError::Truncated {
                found: bytes.len(),
                needed: HEADER,
            });
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(BundleError::UnsupportedVersion(version));
        }
        let manifest_len = u32_at(12) as usize;
        let mut object_len_bytes = [0u8; 8];
        object_len_bytes.copy_from_slice(&bytes[16..24]);
        let object_len = u64::from_le_bytes(object_len_bytes);
        if manifest_len > MAX_MANIFEST {
            return Err(BundleError::TooLarge {
                what: "manifest",
                len: manifest_len,
                max: MAX_MANIFEST,
            });
        }
        if object_len > MAX_OBJECT as u64 {
            return Err(BundleError::TooLarge {
                what: "object",
                len: usize::try_from(object_len).unwrap_or(usize::MAX),
                max: MAX_OBJECT,
            });
        }
        let object_len = object_len as usize;
        let needed = HEADER + manifest_len + object_len + DIGEST;
        if bytes.len() < needed {
            return Err(BundleError::Truncated {
                found: bytes.len(),
                needed,
            });
        }
        if bytes.len() > needed {
            return Err(BundleError::Trailing(bytes.len() - needed));
        }
        let body = &bytes[..needed - DIGEST];
        if Sha256::digest(body).as_slice() != &bytes[needed - DIGEST..] {
            return Err(BundleError::Checksum);
        }
        let manifest = std::str::from_utf8(&body[HEADER..HEADER + manifest_len])
            .map_err(|_| BundleError::ManifestEncoding)?;
        let manifest = Manifest::from_json(manifest)?;
        Ok(Bundle {
            manifest,
            object: body[HEADER + manifest_len..].to_vec(),
        })
    }

    /// The SHA-256 that identifies this bundle's contents (hex), as stored at its end.
    pub fn digest_hex(encoded: &[u8]) -> String {
        let tail = &encoded[encoded.len().saturating_sub(DIGEST)..];
        tail.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Bundle {
    /// A human-readable description: the manifest and the functions the object defines.
    pub fn describe(&self, encoded: &[u8]) -> String {
        let m = &self.manifest;
        let mut out = format!(
            "name:      {}\nversion:   {}\ntarget:    {}{}\nreplace:   {}\nsha256:    {}\nobject:    {} bytes\n",
            m.name,
            m.version,
            m.target.release,
            m.target
                .build_id
                .as_ref()
                .map(|b| format!(" (build ID {b})"))
                .unwrap_or_default(),
            m.replace,
            Bundle::digest_hex(encoded),
            self.object.len()
        );
        out.push_str("functions:\n");
        for f in &m.functions {
            out.push_str(&format!(
                "  {}{} -> {}\n",
                f.old,
                f.sympos.map(|p| format!(",{p}")).unwrap_or_default(),
                f.new
            ));
        }
        if !m.states.is_empty() {
            out.push_str("states:\n");
            for s in &m.states {
                out.push_str(&format!("  id {} version {}\n", s.id, s.version));
            }
        }
        out
    }
}

/// Fuzzing entry point: decoding arbitrary bytes never panics.
pub fn fuzz_decode(bytes: &[u8]) {
    let _ = Bundle::decode(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Replacement, Target};

    fn sample() -> Bundle {
        Bundle {
            manifest: Manifest {
                name: "demo".into(),
                version: 1,
                sticky: false,
                target: Target {
                    release: "6.1.0-53-cloud-amd64".into(),
                    build_id: Some("abcd".into()),
                },
                replace: false,
                functions: vec![Replacement {
                    old: "cmdline_proc_show".into(),
                    sympos: None,
                    new: "livepatch_cmdline_proc_show".into(),
                }],
                states: vec![],
                symbols: vec![],
            },
            object: b"\x7fELF fake object".to_vec(),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = sample().encode().unwrap();
        assert_eq!(Bundle::decode(&bytes).unwrap(), sample());
        assert_eq!(Bundle::digest_hex(&bytes).len(), 64);
    }

    #[test]
    fn damage_is_reported_precisely() {
        let good = sample().encode().unwrap();
        let flip = |i: usize| {
            let mut v = good.clone();
            v[i] ^= 1;
            v
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"ELF".to_vec(), "bad magic"),
            (good[..20].to_vec(), "truncated"),
            (good[..good.len() - 1].to_vec(), "truncated"),
            ([good.clone(), vec![0]].concat(), "trailing"),
            (flip(8), "format version"),
            (flip(30), "checksum"),
            (flip(good.len() - 1), "checksum"),
            (
                {
                    let mut v = good.clone();
                    v[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
                    v
                },
                "too large",
            ),
        ];
        for (bytes, want) in cases {
            let err = Bundle::decode(&bytes).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let good = sample().encode().unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut v = good.clone();
            let i = (x as usize) % v.len();
            v[i] = (x >> 32) as u8;
            v.truncate(((x >> 40) as usize) % (good.len() + 1));
            fuzz_decode(&v);
        }
    }
}
