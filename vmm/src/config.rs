//! What the user asked for: the validated configuration of one VM.

use std::path::PathBuf;

use crate::arch::x86_64::cpu_template::CpuTemplate;

/// Most vCPUs: APIC ids 0..=253 (255 is the broadcast id, MADT uses 8-bit ids).
pub const MAX_CPUS: u8 = 254;
/// Least guest RAM accepted before looking at the kernel.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most guest RAM accepted (the host will refuse far less, but keep the number sane).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Default command line; `root=` is added when a disk is attached.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// Where the kernel comes from.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A disk image whose filesystem holds `/boot/vmlinuz-*` and `/boot/initrd.img-*`; it is also the root disk.
    Image(PathBuf),
    /// Kernel and optional initrd given directly.
    Direct {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
    },
}

/// The serial console's back end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// stdin/stdout; raw terminal mode when stdin is a terminal.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded; no input.
    None,
}

impl std::str::FromStr for ConsoleConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(ConsoleConfig::Stdio),
            "none" => Ok(ConsoleConfig::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(ConsoleConfig::File(path.into())),
                _ => Err(format!(
                    "invalid console '{s}': expected stdio, none or file:PATH"
                )),
            },
        }
    }
}

/// Configuration errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus must be between 1 and {MAX_CPUS}, got {0}")]
    Cpus(u32),
    #[error("--memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0}")]
    Memory(u64),
}

/// The complete description of a VM to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub boot: BootSource,
    /// Root disk (for `BootSource::Image` this is the image itself).
    pub disk: Option<PathBuf>,
    pub disk_readonly: bool,
    pub cpus: u8,
    pub memory_mib: u64,
    /// Replaces the default command line when set.
    pub cmdline: Option<String>,
    /// Appended to the command line.
    pub append: Vec<String>,
    pub cpu_template: CpuTemplate,
    pub console: ConsoleConfig,
}

impl VmConfig {
    /// Validates vCPU count and memory size.
    pub fn validate(cpus: u32, memory_mib: u64) -> Result<(u8, u64), ConfigError> {
        let cpus = u8::try_from(cpus)
            .ok()
            .filter(|c| (1..=MAX_CPUS).contains(c))
            .ok_or(ConfigError::Cpus(cpus))?;
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(ConfigError::Memory(memory_mib));
        }
        Ok((cpus, memory_mib))
    }

    /// The kernel command line: base (default or `--cmdline`), `root=` for a disk,
    /// the CPU template's guest options, then `--append`.
    pub fn kernel_cmdline(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        match &self.cmdline {
            Some(c) => parts.push(c.clone()),
            None => {
                parts.push(DEFAULT_CMDLINE.to_string());
                if self.disk.is_some() {
                    parts.push(format!(
                        "root=/dev/vda {}",
                        if self.disk_readonly { "ro" } else { "rw" }
                    ));
                }
            }
        }
        parts.extend(
            self.cpu_template
                .guest_options()
                .iter()
                .map(|s| s.to_string()),
        );
        parts.extend(self.append.iter().cloned());
        parts.retain(|p| !p.trim().is_empty());
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            boot: BootSource::Image("g.img".into()),
            disk: Some("g.img".into()),
            disk_readonly: false,
            cpus: 2,
            memory_mib: 512,
            cmdline: None,
            append: vec!["quiet".into()],
            cpu_template: CpuTemplate::Host,
            console: ConsoleConfig::Stdio,
        }
    }

    #[test]
    fn cmdline_composition() {
        let c = cfg();
        assert_eq!(
            c.kernel_cmdline(),
            format!("{DEFAULT_CMDLINE} root=/dev/vda rw quiet")
        );
        let mut c = cfg();
        c.cmdline = Some("console=ttyS0".into());
        c.cpu_template = CpuTemplate::Conservative;
        let line = c.kernel_cmdline();
        assert!(line.starts_with("console=ttyS0 noxsave"), "{line}");
        assert!(!line.contains("nosoftlockup"), "{line}");
        assert!(line.ends_with(" quiet"));
        assert!(!line.contains("root="));
    }

    #[test]
    fn cpu_and_memory_limits() {
        assert_eq!(VmConfig::validate(2, 512), Ok((2, 512)));
        assert_eq!(VmConfig::validate(0, 512), Err(ConfigError::Cpus(0)));
        assert_eq!(VmConfig::validate(255, 512), Err(ConfigError::Cpus(255)));
        assert_eq!(
            VmConfig::validate(100000, 512),
            Err(ConfigError::Cpus(100000))
        );
        assert_eq!(VmConfig::validate(1, 4), Err(ConfigError::Memory(4)));
        assert!(ConfigError::Cpus(0)
            .to_string()
            .contains("between 1 and 254"));
    }

    #[test]
    fn console_parsing() {
        assert_eq!("stdio".parse(), Ok(ConsoleConfig::Stdio));
        assert_eq!("none".parse(), Ok(ConsoleConfig::None));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(ConsoleConfig::File("/tmp/x".into()))
        );
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("tty".parse::<ConsoleConfig>().is_err());
    }
}
