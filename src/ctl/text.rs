//! How `entrupy-tokenctl` writes for a person: relative and local times, and strings from the
//! daemon made safe for a terminal. Pure; nothing here talks to the bus.

use std::borrow::Cow;

/// "in 42 min" / "3 s ago" for a Unix time.
pub fn relative(t: u64, now: f64) -> String {
    let d = t as f64 - now;
    let a = d.abs();
    let amount = if a < 90.0 {
        format!("{:.0} s", a)
    } else if a < 5400.0 {
        format!("{:.0} min", a / 60.0)
    } else if a < 172_800.0 {
        format!("{:.1} h", a / 3600.0)
    } else {
        format!("{:.1} days", a / 86_400.0)
    };
    if d >= 0.0 { format!("in {amount}") } else { format!("{amount} ago") }
}

/// `HH:MM:SS` in the local time zone.
pub fn local_time(t: u64) -> String {
    match chrono::DateTime::from_timestamp(t as i64, 0) {
        Some(dt) => dt.with_timezone(&chrono::Local).format("%H:%M:%S").to_string(),
        None => t.to_string(),
    }
}

/// "in 42 min at 12:34:56" for a timestamp, "none" for 0 (the API's "no time").
pub fn when(t: u64, now: f64) -> String {
    if t == 0 { "none".to_owned() } else { format!("{} at {}", relative(t, now), local_time(t)) }
}

/// Characters that change what a terminal shows without being text: C0 and C1 controls
/// (escape sequences start with ESC or CSI), DEL, and the bidirectional overrides that
/// reorder what follows them.
fn unsafe_for_terminal(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A string from the daemon (a username, an error description, ...) as it may be printed
/// on a terminal: every control character escaped the way Rust writes it (`\u{1b}`, `\n`),
/// so that a peer cannot move the cursor, retitle the window or hide text. Strings without
/// such characters are returned as they are. JSON output does not need this: its escaping
/// already covers control characters.
pub fn clean(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_for_terminal) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_for_terminal(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times() {
        assert_eq!(relative(100, 58.0), "in 42 s");
        assert_eq!(relative(100 + 42 * 60, 100.0), "in 42 min");
        assert_eq!(relative(100, 130.0), "30 s ago");
        assert_eq!(relative(100 + 7200, 100.0), "in 2.0 h");
        assert_eq!(when(0, 100.0), "none");
        assert!(when(160, 100.0).starts_with("in 60 s at "));
    }

    #[test]
    fn clean_escapes_what_a_terminal_would_obey() {
        assert!(matches!(clean("Ada Lovelace"), Cow::Borrowed(_)));
        assert_eq!(clean("Zoë 日本"), "Zoë 日本");
        assert_eq!(clean("a\u{1b}]0;pwned\u{7}b"), "a\\u{1b}]0;pwned\\u{7}b");
        assert_eq!(clean("\u{1b}[2J\u{1b}[31mred"), "\\u{1b}[2J\\u{1b}[31mred");
        assert_eq!(clean("line\nbreak\r\ttab"), "line\\nbreak\\r\\ttab");
        assert_eq!(clean("\u{9b}31m c1 csi"), "\\u{9b}31m c1 csi");
        assert_eq!(clean("del\u{7f}"), "del\\u{7f}");
        assert_eq!(clean("abc\u{202e}fed"), "abc\\u{202e}fed");
    }
}
