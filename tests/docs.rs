//! The packaging helpers of both binaries: `--generate-man DIR` and
//! `--generate-completions SHELL` produce man pages and completion scripts from the clap
//! definitions, and stay hidden from the visible CLI. Also: `examples/config.toml`, the
//! example config shipped in the package, is valid.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

const TOKEND: &str = env!("CARGO_BIN_EXE_entrupy-tokend");
const TOKENCTL: &str = env!("CARGO_BIN_EXE_entrupy-tokenctl");
const CTL_COMMANDS: [&str; 11] = [
    "status",
    "is-valid",
    "token",
    "refresh",
    "request",
    "login",
    "cleanup",
    "sessions",
    "add-session",
    "remove-session",
    "watch",
];

fn run(exe: &str, args: &[&str]) -> Output {
    Command::new(exe).args(args).env_remove("ENTRUPY_TOKEND_CONFIG").output().unwrap()
}

fn text(o: &Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn man_page_of_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(TOKEND, &["--generate-man", dir.path().to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let page = std::fs::read_to_string(dir.path().join("entrupy-tokend.1")).unwrap();
    assert!(page.starts_with(".ie") || page.contains(".TH entrupy-tokend 1"), "{page}");
    for needle in ["check\\-config", "config", "log\\-level", "EXIT STATUS", "78", "69", "SIGHUP"] {
        assert!(page.contains(needle), "the man page lacks {needle:?}:\n{page}");
    }
    assert!(!page.contains("generate"), "the hidden flags stay out of the man page");
}

#[test]
fn man_pages_of_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(TOKENCTL, &["--generate-man", dir.path().to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let page = std::fs::read_to_string(dir.path().join("entrupy-tokenctl.1")).unwrap();
    for c in CTL_COMMANDS {
        assert!(page.contains(&c.replace('-', "\\-")), "the man page does not mention {c}:\n{page}");
        let sub = dir.path().join(format!("entrupy-tokenctl-{c}.1"));
        assert!(std::fs::metadata(&sub).is_ok_and(|m| m.len() > 0), "{} missing", sub.display());
    }
    assert!(page.contains("session") && page.contains("json") && page.contains("EXIT STATUS"));
    assert!(!page.contains("generate"), "the hidden flags stay out of the man page");
    assert!(!dir.path().join("entrupy-tokenctl-help.1").exists());
}

#[test]
fn completions_of_both_binaries() {
    for shell in ["bash", "zsh", "fish"] {
        let script = text(&run(TOKEND, &["--generate-completions", shell]));
        assert!(script.contains("check-config") && script.contains("log-level"), "{shell}:\n{script}");
        assert!(!script.contains("generate"), "{shell}: hidden flags in the completions");

        let script = text(&run(TOKENCTL, &["--generate-completions", shell]));
        for c in CTL_COMMANDS {
            assert!(script.contains(c), "{shell}: {c} missing");
        }
        assert!(script.contains("min-valid") && script.contains("user-id"), "{shell}: options missing");
        assert!(!script.contains("generate"), "{shell}: hidden flags in the completions");
    }
}

#[test]
fn the_generators_stay_hidden_and_check_their_arguments() {
    assert!(!text(&run(TOKEND, &["--help"])).contains("generate"));
    assert!(!text(&run(TOKENCTL, &["--help"])).contains("generate"));
    // Bad values are usage errors with the binaries' usual codes (1 for the daemon, 2 for the CLI).
    assert_eq!(run(TOKEND, &["--generate-completions", "nosuchshell"]).status.code(), Some(1));
    assert_eq!(run(TOKENCTL, &["--generate-completions", "nosuchshell"]).status.code(), Some(2));
    assert_eq!(run(TOKEND, &["--generate-man"]).status.code(), Some(1));
    assert_eq!(run(TOKEND, &["--generate-man", "/nonexistent/dir"]).status.code(), Some(1));
    assert_eq!(run(TOKENCTL, &["--generate-man", "/nonexistent/dir"]).status.code(), Some(1));
    // Not combinable with the daemon's flags.
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(run(TOKEND, &["--generate-man", dir.path().to_str().unwrap(), "--check-config"]).status.code(), Some(1));
}

#[test]
fn the_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config.toml");
    let o = Command::new(TOKEND)
        .args(["--check-config", "--config", path])
        .env_remove("ENTRUPY_TOKEND_CONFIG")
        .env_remove("STATE_DIRECTORY")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("sessions: 1"));
}
