//! ARCHITECTURE.md's invariants that are about the shape of the source, checked by reading
//! it (the behavioural ones have their tests beside the code they are about).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// A file's code without its tests (`#[cfg(test)]` modules come last) and comments.
fn code(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or("").to_owned();
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

#[test]
fn the_bus_holds_no_session_state() {
    let bus = code(&root().join("src/bus.rs"));
    for forbidden in [
        "Core",
        "Ledger",
        "crate::store",
        "Store",
        "fs::write",
        "OpenOptions",
        "Mutex<Snapshot",
        "RwLock<Snapshot",
        "Timers",
    ] {
        assert!(!bus.contains(forbidden), "src/bus.rs mentions {forbidden}");
    }
}

#[test]
fn secrets_are_exposed_only_where_they_must_be() {
    let mut files = Vec::new();
    sources(&root().join("src"), &mut files);
    let allowed = ["src/http.rs", "src/bus.rs", "src/secret.rs"];
    for f in files {
        let rel = f.strip_prefix(root()).unwrap().to_string_lossy().into_owned();
        if f.to_string_lossy().ends_with("_tests.rs") || allowed.contains(&rel.as_str()) {
            continue;
        }
        assert!(!code(&f).contains(".expose()"), "{rel} exposes a secret");
    }
}

#[test]
fn every_source_file_is_on_the_code_map() {
    let map = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let mut files = Vec::new();
    sources(&root().join("src"), &mut files);
    for f in files {
        let rel = f.strip_prefix(root().join("src")).unwrap().to_string_lossy().into_owned();
        if rel == "lib.rs" || rel.starts_with("bin/") {
            continue;
        }
        let module = rel.trim_end_matches(".rs");
        let named = map.contains(&format!("`{rel}`"))
            || map.contains(&format!("`{module}`"))
            || map.contains(&format!("`{}`", rel.trim_end_matches("/mod.rs")));
        assert!(named, "src/{rel} is not on ARCHITECTURE.md's code map");
    }
}

/// The body of `fn name(` in `text` (up to the next function at the same indentation).
fn body<'a>(text: &'a str, name: &str) -> &'a str {
    let start = text.find(&format!("fn {name}(")).unwrap_or_else(|| panic!("no fn {name}"));
    let rest = &text[start..];
    let end = rest[1..].find("\n    fn ").or_else(|| rest[1..].find("\n    pub fn ")).map_or(rest.len(), |e| e + 1);
    &rest[..end]
}

#[test]
fn the_periodic_work_reads_no_resting_session() {
    let engine = code(&root().join("src/engine.rs"));
    for f in ["sweep", "status_line"] {
        let b = body(&engine, f);
        for every in ["sessions.iter()", "sessions.values()", "sessions.keys()", "sessions.iter_mut()"] {
            assert!(!b.contains(every), "engine::{f} walks every session ({every}); use the SweepIndex");
        }
        assert!(b.contains("self.sweep."), "engine::{f} reads the SweepIndex");
    }
}
