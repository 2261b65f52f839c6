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

/// Checks a `--log-level` value: `RUST_LOG` syntax in which every directive names a level,
/// either alone (`debug`) or for a target (`entrupy_tokend=trace`). `EnvFilter` alone would
/// take a misspelt level such as `verbose` or `warning` for a target name and enable that
/// target only, so that the daemon would then print nothing at all.
pub fn check_level(spec: &str) -> Result<(), String> {
    const HINT: &str =
        "use one of off, error, warn, info, debug, trace, or directives such as info,entrupy_tokend=debug";
    if spec.trim().is_empty() {
        return Err(format!("empty; {HINT}"));
    }
    EnvFilter::try_new(spec).map_err(|e| format!("{spec:?} is not a log filter ({e}); {HINT}"))?;
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, level)| level).trim();
        // `LevelFilter` takes the empty string for `trace`; a directive must name its level.
        if level.is_empty() || level.parse::<tracing_subscriber::filter::LevelFilter>().is_err() {
            return Err(format!("{directive:?} names no level; {HINT}"));
        }
    }
    Ok(())
}

/// Installs the global subscriber. `level` is a `RUST_LOG`-style filter (the `--log-level`
/// flag); `RUST_LOG` wins when set.
pub fn init(level: &str) {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty() && EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| level.to_owned());
    let filter = filter(&spec);
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
    let fields = tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        if field.name() == "message" { write!(w, "{text}") } else { write!(w, "{}={}", field.name(), quoted(&text)) }
    })
    .delimited(" ");
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .fmt_fields(fields);
    if under_systemd {
        let _ = tracing_subscriber::registry().with(filter).with(fmt.without_time()).try_init();
    } else {
        let _ = tracing_subscriber::registry().with(filter).with(fmt).try_init();
    }
}

/// A field's value as a log line shows it, the same way whether it was recorded with
/// `Display` or `Debug`: bare when it is one word (`session=default`), quoted when it is
/// empty or holds a space, a quote or an `=` (`error="connection refused"`).
pub fn quoted(text: &str) -> String {
    // A string recorded with `Debug` comes quoted; take it back to its text when it has no
    // escape in it.
    let raw = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains(['\\', '"']) => inner,
        Some(_) => return text.to_owned(),
        None => text,
    };
    if raw.is_empty() || raw.contains(|c: char| c.is_whitespace() || c == '"' || c == '=') {
        format!("{raw:?}")
    } else {
        raw.to_owned()
    }
}

/// The filter for `spec`. zbus is built without its `tracing` feature, so it logs nothing;
/// should a dependency ever turn the feature on, its per-call INFO span (which formatted
/// every incoming message, about 15% of the bus throughput when it was on) stays held to
/// warnings unless the filter names zbus.
fn filter(spec: &str) -> EnvFilter {
    let filter = EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new("info"));
    if spec.contains("zbus") {
        return filter;
    }
    match "zbus=warn".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directives(spec: &str) -> Vec<String> {
        let mut d: Vec<String> = filter(spec).to_string().split(',').map(str::to_owned).collect();
        d.sort();
        d
    }

    #[test]
    fn log_levels_are_checked() {
        for ok in ["info", "DEBUG", "warn", "off", "trace", "info,entrupy_tokend=debug", "error,zbus=trace", "info,"] {
            assert_eq!(check_level(ok), Ok(()), "{ok}");
        }
        for bad in ["", " ", "verbose", "warning", "info,entrupy_tokend", "entrupy_tokend=loud", "info=", "[{"] {
            let e = check_level(bad).unwrap_err();
            assert!(e.contains("use one of off, error, warn, info, debug, trace"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn zbus_is_held_to_warnings_unless_named() {
        assert_eq!(directives("info"), ["info", "zbus=warn"]);
        assert_eq!(directives("debug,entrupy_tokend=trace"), ["debug", "entrupy_tokend=trace", "zbus=warn"]);
        assert_eq!(directives("info,zbus=trace"), ["info", "zbus=trace"]);
        assert_eq!(directives("entrupy_tokend=loud"), ["info", "zbus=warn"]);
    }

    #[test]
    fn values_are_quoted_the_same_way_however_they_were_recorded() {
        assert_eq!(quoted("default"), "default");
        assert_eq!(quoted("\"carol\""), "carol");
        assert_eq!(quoted("connection refused"), "\"connection refused\"");
        assert_eq!(quoted("\"connection refused\""), "\"connection refused\"");
        assert_eq!(quoted(""), "\"\"");
        assert_eq!(quoted("a=b"), "\"a=b\"");
        assert_eq!(quoted("\"say \\\"hi\\\"\""), "\"say \\\"hi\\\"\"");
    }
}
