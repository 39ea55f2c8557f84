//! `vmm bundle build`: compiles a patch's C sources against the guest kernel's headers
//! with kbuild (so they get exactly the kernel's compiler flags: -mfentry, retpolines,
//! return thunks, -mcmodel=kernel), checks the object and wraps it with its manifest.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::bundle::Bundle;
use crate::manifest::Manifest;
use crate::object_check::{self, ObjectError};

/// Errors while building a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("source {0}: only .c and .h files can be built")]
    SourceKind(String),
    #[error("two sources are named {0}; source file names must be unique")]
    DuplicateSource(String),
    #[error("no .c source given")]
    NoSource,
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel headers {dir} are for {found}, the manifest targets {wanted}")]
    WrongHeaders {
        dir: String,
        found: String,
        wanted: String,
    },
    #[error("no kernel headers for {release} in {dir}: install linux-headers-{release} (or pass --kernel-headers)")]
    NoHeaders { release: String, dir: String },
    #[error("installing linux-headers-{release} failed: {detail}")]
    Install { release: String, detail: String },
    #[error("kbuild failed:\n{0}")]
    Compile(String),
    #[error("{0}")]
    Object(#[from] ObjectError),
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub manifest: Manifest,
    pub sources: Vec<PathBuf>,
    /// Kernel headers (a kbuild tree); default `/usr/src/linux-headers-<release>`.
    pub kernel_headers: Option<PathBuf>,
    /// Install Debian's `linux-headers-<release>` with apt-get when the default tree is
    /// missing.
    pub install_headers: bool,
    /// Where to build; a fresh temporary directory when `None`.
    pub work_dir: Option<PathBuf>,
}

/// Name of the linked object kbuild produces.
const OBJECT: &str = "vmm_patch";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn progress(msg: &str) {
    eprintln!("bundle: {msg}");
}

/// The release (`uname -r`) a kbuild tree builds for: `UTS_RELEASE` of
/// `include/generated/utsrelease.h` (Debian's `include/config/kernel.release` holds the
/// upstream version instead).
fn headers_release(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("include/generated/utsrelease.h")).ok()?;
    let rest = text.split("UTS_RELEASE").nth(1)?;
    let start = rest.find('"')? + 1;
    let len = rest[start..].find('"')?;
    Some(rest[start..start + len].to_string())
}

fn locate_headers(req: &BuildRequest) -> Result<PathBuf, BuildError> {
    let release = &req.manifest.target.release;
    let dir = req
        .kernel_headers
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/usr/src/linux-headers-{release}")));
    if headers_release(&dir).is_none() && req.kernel_headers.is_none() && req.install_headers {
        progress(&format!("installing linux-headers-{release} with apt-get"));
        let out = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .arg(format!("linux-headers-{release}"))
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map_err(|e| BuildError::Install {
                release: release.clone(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(BuildError::Install {
                release: release.clone(),
                detail: err.lines().last().unwrap_or("apt-get failed").to_string(),
            });
        }
    }
    match headers_release(&dir) {
        None => Err(BuildError::NoHeaders {
            release: release.clone(),
            dir: dir.display().to_string(),
        }),
        Some(found) if &found != release => Err(BuildError::WrongHeaders {
            dir: dir.display().to_string(),
            found,
            wanted: release.clone(),
        }),
        Some(_) => Ok(dir),
    }
}

/// Copies the sources into `work` and writes its Kbuild file.
fn stage_sources(sources: &[PathBuf], work: &Path) -> Result<(), BuildError> {
    let mut objs = Vec::new();
    let mut names = std::collections::HashSet::new();
    for src in sources {
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| BuildError::SourceKind(src.display().to_string()))?;
        let stem = match name.rsplit_once('.') {
            Some((stem, "c")) => Some(stem),
            Some((_, "h")) => None,
            _ => return Err(BuildError::SourceKind(src.display().to_string())),
        };
        if !names.insert(name.to_string()) || stem == Some(OBJECT) {
            return Err(BuildError::DuplicateSource(name.to_string()));
        }
        let data = std::fs::read(src).map_err(io(src))?;
        let dst = work.join(name);
        std::fs::write(&dst, data).map_err(io(&dst))?;
        if let Some(stem) = stem {
            objs.push(format!("{stem}.o"));
        }
    }
    if objs.is_empty() {
        return Err(BuildError::NoSource);
    }
    let kbuild = work.join("Kbuild");
    std::fs::write(
        &kbuild,
        format!("obj-m := {OBJECT}.o\n{OBJECT}-y := {}\n", objs.join(" ")),
    )
    .map_err(io(&kbuild))
}

/// Builds a bundle: kbuild, object checks, manifest.
pub fn build(req: &BuildRequest) -> Result<Bundle, BuildError> {
    req.manifest.validate()?;
    let headers = locate_headers(req)?;
    let temp;
    let work = match &req.work_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = std::env::temp_dir().join(format!(
                "vmm-bundle-{}-{}",
                std::process::id(),
                req.manifest.name
            ));
            temp
        }
    };
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io(&work))?;
    }
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    stage_sources(&req.sources, &work)?;
    progress(&format!(
        "compiling {} source(s) against {}",
        req.sources.len(),
        headers.display()
    ));
    let out = Command::new("make")
        .arg("-C")
        .arg(&headers)
        .arg(format!("M={}", work.display()))
        .arg(format!("{OBJECT}.o"))
        .output()
        .map_err(io(Path::new("make")))?;
    if !out.status.success() {
        let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
        log.push_str(&String::from_utf8_lossy(&out.stderr));
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        return Err(BuildError::Compile(
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        ));
    }
    let obj_path = work.join(format!("{OBJECT}.o"));
    let object = std::fs::read(&obj_path).map_err(io(&obj_path))?;
    object_check::check(&req.manifest, &object)?;
    if req.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    progress(&format!(
        "built {} ({} bytes of object, {} function(s))",
        req.manifest.name,
        object.len(),
        req.manifest.functions.len()
    ));
    Ok(Bundle {
        manifest: req.manifest.clone(),
        object,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_rejects_bad_source_sets() {
        let dir = std::env::temp_dir().join(format!("patcher-stage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.c");
        std::fs::write(&a, "int x;").unwrap();
        let h = dir.join("a.h");
        std::fs::write(&h, "").unwrap();
        let work = dir.join("work");
        std::fs::create_dir_all(&work).unwrap();
        assert!(matches!(
            stage_sources(&[dir.join("a.txt")], &work),
            Err(BuildError::SourceKind(_))
        ));
        assert!(matches!(
            stage_sources(&[a.clone(), a.clone()], &work),
            Err(BuildError::DuplicateSource(_))
        ));
        assert!(matches!(
            stage_sources(std::slice::from_ref(&h), &work),
            Err(BuildError::NoSource)
        ));
        stage_sources(&[a, h], &work).unwrap();
        let kbuild = std::fs::read_to_string(work.join("Kbuild")).unwrap();
        assert_eq!(kbuild, "obj-m := vmm_patch.o\nvmm_patch-y := a.o\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn headers_for_another_release_are_refused() {
        let dir = std::env::temp_dir().join(format!("patcher-hdr-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("include/generated")).unwrap();
        std::fs::write(
            dir.join("include/generated/utsrelease.h"),
            "#define UTS_RELEASE \"6.1.0-1-amd64\"\n",
        )
        .unwrap();
        let req = BuildRequest {
            manifest: Manifest::from_json(
                r#"{"name":"x","target":{"release":"6.1.0-53-cloud-amd64"},"functions":[{"old":"a","new":"b"}]}"#,
            )
            .unwrap(),
            sources: vec![],
            kernel_headers: Some(dir.clone()),
            install_headers: false,
            work_dir: None,
        };
        let err = build(&req).unwrap_err().to_string();
        assert!(err.contains("are for 6.1.0-1-amd64"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
