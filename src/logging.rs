//! Log output: journald with structured fields when stderr is the journal stream, else
//! readable lines on stderr (without our own timestamps when systemd adds them).
//!
//! In the journal every field carries the `ENTRUPY_` prefix: `ENTRUPY_SESSION`,
//! `ENTRUPY_UNIQUE_USER_ID`, `ENTRUPY_EVENT`, `ENTRUPY_EXPIRES_AT`, `ENTRUPY_REFRESH_AT`,
//! `ENTRUPY_ATTEMPT`, `ENTRUPY_ERROR_CLASS`, `ENTRUPY_NEXT_ATTEMPT`.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// Whether stderr is connected to the journal (`JOURNAL_STREAM` names its device and inode).
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let v = v.to_string_lossy().into_owned();
    let Some((dev, ino)) = v.split_once(':') else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// Installs the global subscriber. `level` is a `RUST_LOG`-style filter (the `--log-level`
/// flag); `RUST_LOG` wins when set.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if stderr_is_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(
                journald
                    .with_syslog_identifier("entrupy-tokend".to_owned())
                    .with_field_prefix(Some("ENTRUPY".to_owned())),
            )
            .try_init();
        return;
    }
    let under_systemd = std::env::var_os("INVOCATION_ID").is_some() || std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(ansi);
    if under_systemd {
        let _ = tracing_subscriber::registry().with(filter).with(fmt.without_time()).try_init();
    } else {
        let _ = tracing_subscriber::registry().with(filter).with(fmt).try_init();
    }
}
