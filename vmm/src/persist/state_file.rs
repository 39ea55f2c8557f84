//! The snapshot state file: a fixed header (magic, format version, payload length,
//! SHA-256 of the payload) followed by a JSON payload. Written atomically (temporary file,
//! fsync, rename) so a crash never leaves a half-written state file under the real name.

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// First bytes of every state file.
pub const MAGIC: &[u8; 8] = b"VMMSTATE";
/// The format this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest payload accepted (a state file holds registers and device state, not memory).
pub const MAX_PAYLOAD: u64 = 64 << 20;
const HEADER_LEN: usize = 8 + 4 + 8 + 32;

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a vmm state file (bad magic)")]
    BadMagic { path: String },
    #[error(
        "state file {path} has format version {found}; this vmm reads version {FORMAT_VERSION}"
    )]
    UnsupportedVersion { path: String, found: u32 },
    #[error("state file {path} is truncated: {found} bytes, header says {expected}")]
    Truncated {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("state file {path} is too large ({found} bytes of payload)")]
    TooLarge { path: String, found: u64 },
    #[error("state file {path} is corrupt: checksum mismatch")]
    Checksum { path: String },
    #[error("state file {path} does not decode: {detail}")]
    Decode { path: String, detail: String },
    #[error("cannot encode state: {0}")]
    Encode(String),
}

/// Encodes `state` into the file format.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, StateFileError> {
    let payload = serde_json::to_vec(state).map_err(|e| StateFileError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a state file's bytes; `path` only names it in errors.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], path: &str) -> Result<T, StateFileError> {
    let path = path.to_string();
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(StateFileError::BadMagic { path });
    }
    if bytes.len() < HEADER_LEN {
        return Err(StateFileError::Truncated {
            path,
            found: bytes.len() as u64,
            expected: HEADER_LEN as u64,
        });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(StateFileError::UnsupportedVersion {
            path,
            found: version,
        });
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(StateFileError::TooLarge { path, found: len });
    }
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(StateFileError::Truncated {
            path,
            found: bytes.len() as u64,
            expected: HEADER_LEN as u64 + len,
        });
    }
    if Sha256::digest(payload).as_slice() != &bytes[20..52] {
        return Err(StateFileError::Checksum { path });
    }
    serde_json::from_slice(payload).map_err(|e| StateFileError::Decode {
        path,
        detail: e.to_string(),
    })
}

/// Writes `state` to `path` atomically.
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let bytes = encode(state)?;
    let werr = |source| StateFileError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(werr)?;
    file.write_all(&bytes).map_err(werr)?;
    file.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)
}

/// Reads and verifies the state file at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let name = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| StateFileError::Read {
        path: name.clone(),
        source,
    })?;
    if meta.len() > MAX_PAYLOAD + HEADER_LEN as u64 {
        return Err(StateFileError::TooLarge {
            path: name,
            found: meta.len(),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| StateFileError::Read {
        path: name.clone(),
        source,
    })?;
    decode(&bytes, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u64,
        b: Vec<u8>,
    }

    fn sample() -> Sample {
        Sample {
            a: 42,
            b: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode::<Sample>(&bytes, "s").unwrap(), sample());
    }

    #[test]
    fn every_kind_of_damage_is_named() {
        let good = encode(&sample()).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "bad magic"),
            (b"NOTSTATE________________".to_vec(), "bad magic"),
            (good[..30].to_vec(), "truncated"),
            (good[..good.len() - 1].to_vec(), "truncated"),
            (
                {
                    let mut v = good.clone();
                    v[8] = 9;
                    v
                },
                "format version 9",
            ),
            (
                {
                    let mut v = good.clone();
                    let n = v.len();
                    v[n - 2] ^= 0x20;
                    v
                },
                "checksum mismatch",
            ),
            (
                {
                    let mut v = good.clone();
                    v[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
                    v
                },
                "too large",
            ),
        ];
        for (bytes, want) in cases {
            let err = decode::<Sample>(&bytes, "s").unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
            assert!(!err.contains('\n'));
        }
        // Valid framing around a payload of the wrong shape.
        let other = encode(&vec![1u8, 2]).unwrap();
        let err = decode::<Sample>(&other, "s").unwrap_err().to_string();
        assert!(err.contains("does not decode"), "{err}");
    }
}
