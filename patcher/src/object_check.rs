//! Checks of a patch's compiled object: what the host can link and redirect, and what it
//! cannot make work (static keys, exception tables, BUG/WARN tables, alternatives,
//! `__init` code), each refused with the name of the function that uses it.

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionKind, SymbolKind};

use crate::manifest::Manifest;

/// Why an object cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("patch object is not an ELF64 x86-64 relocatable object: {0}")]
    Format(String),
    #[error("replacement function {0} is not defined in the patch object")]
    MissingFunction(String),
    #[error("{what} in {place} is not supported: {why}")]
    Unsupported {
        what: &'static str,
        place: String,
        why: &'static str,
    },
}

/// Sections the host cannot honour, with what they mean and why.
const UNSUPPORTED: &[(&str, &str, &str)] = &[
    (
        "__jump_table",
        "a static key (jump label)",
        "the host cannot register new jump-label sites with the guest kernel",
    ),
    (
        "__ex_table",
        "an exception-table entry (inline user-space access)",
        "the guest's fault handler would not find fixups outside its own tables",
    ),
    (
        "__bug_table",
        "a BUG()/WARN() site",
        "the guest's trap handler would not find the entry outside its own tables",
    ),
    (
        ".altinstructions",
        "an alternative instruction",
        "the host does not apply CPU-feature alternatives to patch code",
    ),
    (
        ".static_call_sites",
        "a static call site",
        "the host cannot register new static-call sites with the guest kernel",
    ),
    (
        ".init.text",
        "__init code",
        "init code runs only at boot; a live patch never calls it",
    ),
    (".init.data", "__initdata", "init data is freed after boot"),
    (
        ".exit.text",
        "__exit code",
        "a live patch is not a module and has no exit path",
    ),
];

/// The function symbol that contains `offset` in section `index`, as `name+0xoff`.
fn containing_function(
    file: &object::File<'_>,
    index: object::SectionIndex,
    offset: u64,
) -> Option<String> {
    file.symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.section_index() == Some(index))
        .filter(|s| s.address() <= offset && offset < s.address().saturating_add(s.size().max(1)))
        .filter_map(|s| s.name().ok().map(|n| (n.to_string(), s.address())))
        .next()
        .map(|(name, start)| format!("function {name}+{:#x}", offset.wrapping_sub(start)))
}

/// Where a relocation in an unsupported table points: the function using the feature.
fn describe_site(file: &object::File<'_>, section: &object::Section<'_, '_>) -> String {
    for (_, reloc) in section.relocations() {
        if let RelocationTarget::Symbol(idx) = reloc.target() {
            if let Ok(sym) = file.symbol_by_index(idx) {
                if let Some(sidx) = sym.section_index() {
                    let exec = file
                        .section_by_index(sidx)
                        .map(|s| s.kind() == SectionKind::Text)
                        .unwrap_or(false);
                    if exec {
                        let offset = sym.address().wrapping_add(reloc.addend() as u64);
                        if let Some(f) = containing_function(file, sidx, offset) {
                            return f;
                        }
                    }
                }
            }
        }
    }
    format!("section {}", section.name().unwrap_or("?"))
}

/// Checks `object` against `manifest`; returns the names of the functions it defines.
pub fn check(manifest: &Manifest, object: &[u8]) -> Result<Vec<String>, ObjectError> {
    let file = object::File::parse(object).map_err(|e| ObjectError::Format(e.to_string()))?;
    if file.architecture() != object::Architecture::X86_64
        || !file.is_64()
        || file.kind() != object::ObjectKind::Relocatable
    {
        return Err(ObjectError::Format(format!(
            "{:?} {:?}",
            file.architecture(),
            file.kind()
        )));
    }
    for section in file.sections() {
        let name = section.name().unwrap_or("");
        for &(table, what, why) in UNSUPPORTED {
            if name == table || (table.starts_with(".init") && name.starts_with(table)) {
                return Err(ObjectError::Unsupported {
                    what,
                    place: describe_site(&file, &section),
                    why,
                });
            }
        }
    }
    let defined: Vec<String> = file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition())
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect();
    for f in &manifest.functions {
        if !defined.iter().any(|d| d == &f.new) {
            return Err(ObjectError::MissingFunction(f.new.clone()));
        }
    }
    Ok(defined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Replacement, Target};

    fn manifest(new: &str) -> Manifest {
        Manifest {
            name: "t".into(),
            version: 1,
            sticky: false,
            target: Target {
                release: "6.1.0-53-cloud-amd64".into(),
                build_id: None,
            },
            replace: false,
            functions: vec![Replacement {
                old: "old_fn".into(),
                sympos: None,
                new: new.into(),
            }],
            states: vec![],
            symbols: vec![],
        }
    }

    /// Compiles C source with the host's C compiler (tests need gcc, as kbuild does).
    fn compile(name: &str, source: &str) -> Vec<u8> {
        let dir =
            std::env::temp_dir().join(format!("patcher-objcheck-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = dir.join("t.c");
        std::fs::write(&c, source).unwrap();
        let o = dir.join("t.o");
        let status = std::process::Command::new("cc")
            .args(["-c", "-O2", "-fno-pic", "-mcmodel=kernel", "-o"])
            .arg(&o)
            .arg(&c)
            .status()
            .expect("these tests need a C compiler (cc)");
        assert!(status.success(), "cc failed on {name}");
        let bytes = std::fs::read(&o).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        bytes
    }

    #[test]
    fn accepts_plain_code_and_finds_replacements() {
        let obj = compile(
            "ok",
            "int helper(int x) { return x * 3; }\nint new_fn(int x) { return helper(x) + 1; }\n",
        );
        let defined = check(&manifest("new_fn"), &obj).unwrap();
        assert!(defined.contains(&"new_fn".to_string()));
        assert_eq!(
            check(&manifest("absent_fn"), &obj),
            Err(ObjectError::MissingFunction("absent_fn".into()))
        );
    }

    #[test]
    fn refuses_unsupported_tables_naming_the_function() {
        let jump = compile(
            "jump",
            "int new_fn(void) { return 0; }\n\
             int uses_key(int x) {\n\
               asm volatile(\"1: nop\\n.pushsection __jump_table, \\\"aw\\\"\\n.long 1b - .\\n.popsection\");\n\
               return x + 1; }\n",
        );
        let err = check(&manifest("new_fn"), &jump).unwrap_err().to_string();
        assert!(
            err.contains("static key") && err.contains("function uses_key+0x"),
            "{err}"
        );

        let ex = compile(
            "ex",
            "int new_fn(void) { return 0; }\n\
             int reads_user(void) {\n\
               asm volatile(\"2: nop\\n.pushsection __ex_table, \\\"a\\\"\\n.long 2b - .\\n.popsection\");\n\
               return 1; }\n",
        );
        let err = check(&manifest("new_fn"), &ex).unwrap_err().to_string();
        assert!(
            err.contains("exception-table") && err.contains("reads_user"),
            "{err}"
        );

        let init = compile(
            "init",
            "int new_fn(void) { return 0; }\n__attribute__((section(\".init.text\"))) int setup_fn(void) { return 1; }\n",
        );
        let err = check(&manifest("new_fn"), &init).unwrap_err().to_string();
        assert!(err.contains("__init code"), "{err}");
    }

    #[test]
    fn refuses_non_objects() {
        assert!(matches!(
            check(&manifest("new_fn"), b"\x7fELF garbage"),
            Err(ObjectError::Format(_))
        ));
        assert!(matches!(
            check(&manifest("new_fn"), &[]),
            Err(ObjectError::Format(_))
        ));
    }
}
