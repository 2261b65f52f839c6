//! The man pages: `entrupy-tokenctl(1)` (generated from clap) names itself, not the daemon,
//! and its DESCRIPTION says more than its NAME line; `entrupy-tokend.toml(5)` (written by
//! hand in `man/`) lints clean, documents every key that `src/config.rs` accepts, and its
//! EXAMPLE is a valid config. The lint needs `mandoc` (preferred) or `groff`; without either
//! the lint tests print why and pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const TOKENCTL: &str = env!("CARGO_BIN_EXE_entrupy-tokenctl");
const CONFIG_PAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/man/entrupy-tokend.toml.5");

fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Lints a page: `mandoc -T lint` at `level` and above, else `groff -ww -man` with nothing
/// on stderr. `None` (and a printed reason) when neither tool is installed.
fn lint(page: &Path, mandoc_level: &str) -> Option<Result<(), String>> {
    if let Some(mandoc) = tool("mandoc") {
        let out = Command::new(mandoc).args(["-T", "lint", "-W", mandoc_level]).arg(page).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        return Some(if out.status.success() && text.trim().is_empty() { Ok(()) } else { Err(text) });
    }
    if let Some(groff) = tool("groff") {
        let out = Command::new(groff).args(["-ww", "-man", "-z"]).arg(page).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        return Some(if out.status.success() && text.trim().is_empty() { Ok(()) } else { Err(text) });
    }
    eprintln!("SKIP lint of {}: neither mandoc nor groff is installed (apt-get install mandoc)", page.display());
    None
}

/// A roff text with the escapes this page uses turned back into plain characters.
fn plain(roff: &str) -> String {
    roff.replace("\\-", "-").replace("\\(aq", "'").replace("\\*(Aq", "'").replace("\\fR", "").replace("\\fB", "")
}

#[test]
fn the_config_page_lints_clean() {
    if let Some(r) = lint(Path::new(CONFIG_PAGE), "warning") {
        r.unwrap_or_else(|e| panic!("{CONFIG_PAGE}:\n{e}"));
    }
}

/// Every key of every `struct Raw*` in src/config.rs (the tables the parser accepts).
fn config_keys() -> Vec<(String, String)> {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/config.rs")).unwrap();
    let mut keys = Vec::new();
    let mut current: Option<String> = None;
    for line in src.lines() {
        if let Some(rest) = line.strip_prefix("struct Raw") {
            current = rest.split_whitespace().next().map(str::to_owned);
        } else if line.starts_with('}') {
            current = None;
        } else if let (Some(s), Some(field)) = (&current, line.strip_prefix("    "))
            && let Some((name, _)) = field.split_once(':')
            && !name.starts_with('#')
            && !name.starts_with('/')
        {
            keys.push((s.clone(), name.trim().to_owned()));
        }
    }
    assert!(keys.len() > 20, "found too few keys in src/config.rs: {keys:?}");
    keys
}

#[test]
fn the_config_page_documents_every_key() {
    let page = std::fs::read_to_string(CONFIG_PAGE).unwrap();
    for (table, key) in config_keys() {
        let (header, entry) = match table.as_str() {
            "Config"
                if ["entrupy", "backend", "refresh", "rate_limit", "notify", "sandbox", "access"]
                    .contains(&key.as_str()) =>
            {
                (format!(".SH \"[{key}]\""), None)
            }
            "Config" if key == "session" => (".SH \"[[session]]\"".to_owned(), None),
            _ => (String::new(), Some(format!(".B {key}\n"))),
        };
        if !header.is_empty() {
            assert!(page.contains(&header), "no section {header} for {table}.{key}");
        }
        if let Some(entry) = entry {
            assert!(page.contains(&entry), "the page does not document {table}.{key} (no `{}`)", entry.trim());
        }
    }
    // The defaults the issue asked to spell out.
    let text = plain(&page);
    assert!(text.contains("Default: a tenth of\n.BR logins_per_day"), "reserved_for_refresh's default");
    for needle in ["reserved_for_refresh", "token_executables", "[sandbox]", "[notify]", ".B pace"] {
        assert!(text.contains(needle), "{needle}");
    }
}

#[test]
fn the_config_page_example_is_a_valid_config() {
    let page = std::fs::read_to_string(CONFIG_PAGE).unwrap();
    let start = page.find("\n.EX\n").expect("an EXAMPLE between .EX and .EE") + 5;
    let end = start + page[start..].find("\n.EE\n").unwrap();
    let example = plain(&page[start..end]);
    let c =
        entrupy_tokend::config::parse(&example, "the man page's example").unwrap_or_else(|e| panic!("{e}\n{example}"));
    assert_eq!(c.rate_limit.reserved_for_refresh, 10);
    assert!(c.sandbox.enabled && c.notify.enabled);
    assert_eq!(c.sessions.len(), 1);
    // Every key of the file appears in the example.
    for (_, key) in config_keys() {
        assert!(example.contains(&format!("{key} =")) || example.contains(&format!("[{key}]")), "{key}");
    }
}

#[test]
fn the_deb_package_installs_the_config_page() {
    let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/package-deb")).unwrap();
    assert!(script.contains("man/entrupy-tokend.toml.5"), "package-deb copies the page");
    assert!(script.contains("/usr/share/man/man5/entrupy-tokend.toml.5.gz"), "package-deb checks it is packaged");
}

#[test]
fn the_tokenctl_page_names_the_client_and_describes_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(TOKENCTL).arg("--generate-man").arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page_path = dir.path().join("entrupy-tokenctl.1");
    let page = std::fs::read_to_string(&page_path).unwrap();
    let section = |name: &str| -> String {
        let start =
            page.find(&format!(".SH {name}\n")).unwrap_or_else(|| panic!("no {name}:\n{page}")) + name.len() + 5;
        let end = page[start..].find("\n.SH").map(|e| start + e).unwrap_or(page.len());
        plain(page[start..end].trim())
    };
    let name = section("NAME");
    assert!(name.starts_with("entrupy-tokenctl - "), "{name}");
    assert!(!name.contains("Keeps a user"), "NAME describes the client, not the daemon: {name}");
    let what = name.trim_start_matches("entrupy-tokenctl - ");
    let description = section("DESCRIPTION");
    assert!(!description.starts_with(what) && description.len() > 2 * what.len(), "{description}");
    let exit = section("\"EXIT STATUS\"");
    assert!(exit.contains("could not be asked"), "{exit}");
    assert!(page.contains("entrupy\\-tokend.toml\\fR(5)"), "SEE ALSO names the config page");
    if let Some(r) = lint(&page_path, "error") {
        r.unwrap_or_else(|e| panic!("entrupy-tokenctl.1:\n{e}"));
    }
}
