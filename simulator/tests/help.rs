//! `entrupy-sim --help` documents the fault injection: every control endpoint and every
//! fault kind that `/_sim/fault` accepts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn help_documents_every_fault_kind_and_control_endpoint() {
    let out = Command::new(env!("CARGO_BIN_EXE_entrupy-sim")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in
        ["/_sim/fault", "/_sim/clear", "/_sim/pause", "/_sim/stats", "\"endpoint\"", "\"count\"", "retry_after"]
    {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
    for kind in ["hang", "drop", "malformed", "oversized", "trickle", "delay", "redirect", "status"] {
        assert!(help.contains(&format!("\"{kind}\"")), "--help lacks the fault kind {kind}:\n{help}");
    }
    // Each kind documented is one the control endpoint accepts, with the fields the help names.
    let src = include_str!("../src/control.rs");
    for kind in ["hang", "drop", "malformed", "oversized", "trickle", "delay", "redirect"] {
        assert!(src.contains(&format!("\"{kind}\" =>")), "control.rs does not accept {kind}");
    }
    for field in ["bytes_per_sec", "total", "ms", "location", "bytes"] {
        assert!(help.contains(&format!("\"{field}\"")), "--help lacks the field {field}");
        assert!(src.contains(&format!("\"{field}\"")), "control.rs does not read {field}");
    }
}
