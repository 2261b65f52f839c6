//! The state directory's lock across processes (SPEC section 2): while one process holds a
//! `Store` on a directory, another process's `Store::open` of it fails with
//! `StoreError::Locked` (the daemon exits 69 on it); once the first lets go, it succeeds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use entrupy_tokend::store::{Store, StoreError};

const CHILD: &str = "ENTRUPY_STORE_TEST_CHILD";

/// Runs this test again in a child process, which opens `dir` and reports the outcome in its
/// exit status.
fn open_in_another_process(dir: &std::path::Path, expect: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_second_process_is_locked_out", "--test-threads=1", "--nocapture"])
        .env(CHILD, format!("{expect}:{}", dir.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child expecting {expect}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_second_process_is_locked_out() {
    if let Ok(role) = std::env::var(CHILD) {
        let (expect, dir) = role.split_once(':').unwrap();
        match (expect, Store::open(std::path::Path::new(dir))) {
            ("locked", Err(e @ StoreError::Locked { .. })) => assert!(e.to_string().contains("lock"), "{e}"),
            ("free", Ok(_)) => {}
            (expect, other) => panic!("expected {expect}, got {other:?}"),
        }
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    open_in_another_process(tmp.path(), "locked");
    drop(store);
    open_in_another_process(tmp.path(), "free");
}
