//! `entrupy-tokend --check-config`: exit 0 with a summary for a valid config, 78 with a
//! message naming the file and the key for an invalid one (SPEC 2), including a state
//! directory that cannot be used and an invalid `--log-level`. Runs the built binary with a
//! private environment; needs no bus.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TOKEND: &str = env!("CARGO_BIN_EXE_entrupy-tokend");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// `entrupy-tokend --check-config` with `args`, `$HOME` and the XDG directories in `home`,
/// and none of the caller's variables that would change the outcome.
fn check(home: &Path, args: &[&str]) -> Output {
    Command::new(TOKEND)
        .arg("--check-config")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_STATE_HOME", home.join("state"))
        .output()
        .unwrap()
}

fn text(out: &Output) -> (i32, String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

#[test]
fn a_valid_config_prints_a_summary_and_creates_the_state_dir() {
    let home = tempfile::tempdir().unwrap();
    let cfg = fixture("valid.toml");
    let (code, out, err) = text(&check(home.path(), &["--config", cfg.to_str().unwrap()]));
    assert_eq!(code, 0, "{out}{err}");
    let state = home.path().join("state/entrupy-tokend");
    assert!(out.contains(&format!("state_dir: {}", state.display())), "{out}");
    assert!(out.contains("20 of them reserved") && out.contains("sandbox: disabled"), "{out}");
    assert!(out.trim_end().ends_with("OK"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn a_missing_default_file_is_valid() {
    let home = tempfile::tempdir().unwrap();
    let (code, out, err) = text(&check(home.path(), &[]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("not present"), "{out}");
}

#[test]
fn config_errors_exit_78_naming_file_key_and_place() {
    let home = tempfile::tempdir().unwrap();
    let cases = [
        ("misspelled-table.toml", ":4:2: refesh: unknown field `refesh`"),
        ("relative-state-dir.toml", ":1:13: state_dir: \"state\" is not an absolute path"),
        ("bad-cron-field.toml", ":2:18: refresh.check_schedule: invalid cron schedule"),
    ];
    for (name, says) in cases {
        let cfg = fixture(name);
        let (code, out, err) = text(&check(home.path(), &["--config", cfg.to_str().unwrap()]));
        assert_eq!(code, 78, "{name}: {out}{err}");
        assert!(err.contains(&format!("{}{says}", cfg.display())), "{name}: {err}");
        assert!(!out.contains("OK"), "{out}");
    }
}

#[test]
fn an_unusable_state_dir_exits_78() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    for state_dir in [file.clone(), file.join("below")] {
        let cfg = home.path().join("config.toml");
        std::fs::write(&cfg, format!("state_dir = {:?}\n", state_dir.display().to_string())).unwrap();
        let (code, out, err) = text(&check(home.path(), &["--config", cfg.to_str().unwrap()]));
        assert_eq!(code, 78, "{out}{err}");
        assert!(
            err.contains(&format!("{}: state_dir: state directory {}", cfg.display(), state_dir.display())),
            "{err}"
        );
        assert!(!out.contains("OK"), "{out}");
    }
    // From the environment: $XDG_STATE_HOME under a file.
    let out = Command::new(TOKEND)
        .arg("--check-config")
        .env_clear()
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env("XDG_STATE_HOME", &file)
        .output()
        .unwrap();
    let (code, _, err) = text(&out);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("(from $XDG_STATE_HOME) cannot be created"), "{err}");
}

#[test]
fn an_invalid_log_level_exits_78() {
    let home = tempfile::tempdir().unwrap();
    for level in ["verbose", "warning", "", "info,entrupy_tokend=loud"] {
        let (code, out, err) = text(&check(home.path(), &["--log-level", level]));
        assert_eq!(code, 78, "{level:?}: {out}{err}");
        assert!(err.contains("invalid --log-level") && err.contains("off, error, warn, info, debug, trace"), "{err}");
    }
    let (code, out, err) = text(&check(home.path(), &["--log-level", "debug,zbus=warn"]));
    assert_eq!(code, 0, "{out}{err}");
}
