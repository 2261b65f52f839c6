//! `entrupy-tokenctl watch`: prints each property change and signal of one session as it
//! happens, in the words `status` uses (or one JSON object a line), until the session is
//! removed (exit 1) or the daemon goes away (exit 2).

use std::collections::HashMap;
use std::io::Write;
use std::num::NonZeroUsize;

use futures_util::StreamExt;
use zbus::message::Type;
use zbus::{Connection, MatchRule, Message, MessageStream, Variant};

use super::failure::{EXIT_CANNOT_ASK, EXIT_FAILED};
use super::text::{clean, when};
use super::{now, session_proxy};
use crate::names;

/// A value as `watch` shows it.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Text(String),
    Number(u64),
    Bool(bool),
    /// A Unix time (0: none).
    Time(u64),
    /// A type the daemon does not send today, shown as D-Bus writes it.
    Other(String),
}

/// One line of `watch`.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Property(String, Value),
    Signal(String, Vec<Value>),
    /// `InterfacesRemoved` for the session's path: the last line.
    Removed,
    /// The daemon's bus name lost its owner: the last line.
    DaemonStopped,
}

/// The properties whose values are Unix times.
const TIME_PROPERTIES: [&str; 3] = ["ExpiresAt", "RefreshAt", "LastLoginAt"];

fn value(name: &str, v: &Variant<'_>) -> Value {
    match v {
        Variant::U64(n) if TIME_PROPERTIES.contains(&name) => Value::Time(*n),
        Variant::U64(n) => Value::Number(*n),
        Variant::U32(n) => Value::Number(u64::from(*n)),
        Variant::Bool(b) => Value::Bool(*b),
        Variant::Str(s) => Value::Text(s.as_str().to_owned()),
        other => Value::Other(other.to_string()),
    }
}

fn rule(b: zbus::match_rule::Builder<'static>) -> zbus::Result<MatchRule<'static>> {
    b.msg_type(Type::Signal).build()
}

/// Subscribes to what `watch` prints: the session's own signals, `InterfacesRemoved` from
/// the object manager, and the owner changes of the daemon's name.
async fn subscribe(conn: &Connection, path: &str) -> zbus::Result<Vec<MessageStream>> {
    let session = rule(MatchRule::builder().sender(names::BUS_NAME).path(path.to_owned()))?;
    let removed = rule(
        MatchRule::builder()
            .sender(names::BUS_NAME)
            .path(names::MANAGER_PATH)
            .interface("org.freedesktop.DBus.ObjectManager")
            .member("InterfacesRemoved"),
    )?;
    let owner = rule(
        MatchRule::builder()
            .sender("org.freedesktop.DBus")
            .interface("org.freedesktop.DBus")
            .member("NameOwnerChanged")
            .arg(0, names::BUS_NAME),
    )?;
    let mut streams = Vec::new();
    for r in [session, removed, owner] {
        streams.push(MessageStream::for_match_rule(r, conn, NonZeroUsize::new(256)).await?);
    }
    Ok(streams)
}

/// Runs `watch` for session `id`.
pub(super) async fn watch(conn: &Connection, id: &str, json: bool) -> zbus::Result<i32> {
    let path = names::session_path(id);
    let mut stream = futures_util::stream::select_all(subscribe(conn, &path).await?);
    // Subscribed first, then read: no change can fall between the two. A missing session or
    // daemon fails here, in the words of every other command.
    let state = session_proxy(conn, id).await?.state().await?;
    print(id, &Event::Property("State".to_owned(), Value::Text(state)), json);
    while let Some(msg) = stream.next().await {
        let Ok(msg) = msg else { continue };
        for event in events(&msg, &path) {
            print(id, &event, json);
            match event {
                Event::Removed => return Ok(EXIT_FAILED),
                Event::DaemonStopped => return Ok(EXIT_CANNOT_ASK),
                _ => {}
            }
        }
    }
    eprintln!("entrupy-tokenctl: the connection to the D-Bus session bus closed");
    Ok(EXIT_CANNOT_ASK)
}

/// What one message means for the session at `path`.
fn events(msg: &Message, path: &str) -> Vec<Event> {
    let hdr = msg.header();
    let member = hdr.member().map(|m| m.to_string()).unwrap_or_default();
    let body = msg.body();
    match member.as_str() {
        "NameOwnerChanged" => match body.deserialize::<(String, String, String)>() {
            Ok((_, _, new)) if new.is_empty() => vec![Event::DaemonStopped],
            _ => vec![],
        },
        "InterfacesRemoved" => match body.deserialize::<(zbus::ObjectPath<'_>, Vec<String>)>() {
            Ok((p, _)) if p.as_str() == path => vec![Event::Removed],
            _ => vec![],
        },
        "PropertiesChanged" => {
            let Ok((_, changed, _)) = body.deserialize::<(String, HashMap<String, Variant<'_>>, Vec<String>)>() else {
                return vec![];
            };
            let mut props: Vec<_> = changed.iter().map(|(k, v)| Event::Property(k.clone(), value(k, v))).collect();
            props.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
            props
        }
        "LoginSucceeded" => {
            vec![Event::Signal(member, body.deserialize::<u64>().map(|t| vec![Value::Time(t)]).unwrap_or_default())]
        }
        "LoginFailed" => {
            let args = body
                .deserialize::<(String, String)>()
                .map(|(c, d)| vec![Value::Text(c), Value::Text(d)])
                .unwrap_or_default();
            vec![Event::Signal(member, args)]
        }
        _ => vec![Event::Signal(member, vec![])],
    }
}

fn print(id: &str, event: &Event, json: bool) {
    let line = if json { json_line(id, event).to_string() } else { text_line(id, event, now()) };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn value_text(v: &Value, now: f64) -> String {
    match v {
        Value::Text(s) if s.is_empty() => "(none)".to_owned(),
        Value::Text(s) | Value::Other(s) => clean(s).into_owned(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Time(t) => when(*t, now),
    }
}

fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Text(s) | Value::Other(s) => serde_json::Value::from(s.as_str()),
        Value::Number(n) | Value::Time(n) => serde_json::Value::from(*n),
        Value::Bool(b) => serde_json::Value::from(*b),
    }
}

/// The human line: `default: ExpiresAt = in 59 min at 12:00:00`,
/// `default: LoginFailed: ServerError: ...`.
fn text_line(id: &str, event: &Event, now: f64) -> String {
    let id = clean(id);
    match event {
        Event::Property(name, v) => format!("{id}: {name} = {}", value_text(v, now)),
        Event::Signal(name, args) if name == "LoginSucceeded" && args.len() == 1 => {
            format!("{id}: {name}: expires {}", value_text(&args[0], now))
        }
        Event::Signal(name, args) if args.is_empty() => format!("{id}: {}", clean(name)),
        Event::Signal(name, args) => {
            let args: Vec<String> = args.iter().map(|a| value_text(a, now)).collect();
            format!("{id}: {}: {}", clean(name), args.join(": "))
        }
        Event::Removed => format!("{id}: the session was removed"),
        Event::DaemonStopped => format!("{id}: the daemon stopped ({} has no owner any more)", names::BUS_NAME),
    }
}

/// The JSON line: every line names its session and its `event` (`property`, `signal`,
/// `removed`, `daemon-stopped`); numbers and times are numbers, signal arguments an array.
fn json_line(id: &str, event: &Event) -> serde_json::Value {
    match event {
        Event::Property(name, v) => {
            serde_json::json!({"session": id, "event": "property", "name": name, "value": value_json(v)})
        }
        Event::Signal(name, args) => {
            let args: Vec<_> = args.iter().map(value_json).collect();
            serde_json::json!({"session": id, "event": "signal", "name": name, "args": args})
        }
        Event::Removed => serde_json::json!({"session": id, "event": "removed"}),
        Event::DaemonStopped => serde_json::json!({"session": id, "event": "daemon-stopped"}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_lines_read_like_status() {
        let now = 1_000_000.0;
        let p = |n: &str, v: Value| text_line("default", &Event::Property(n.into(), v), now);
        assert!(p("ExpiresAt", Value::Time(1_003_540)).starts_with("default: ExpiresAt = in 59 min at "));
        assert_eq!(p("ExpiresAt", Value::Time(0)), "default: ExpiresAt = none");
        assert_eq!(p("LoginsToday", Value::Number(2)), "default: LoginsToday = 2");
        assert_eq!(p("State", Value::Text("valid".into())), "default: State = valid");
        assert_eq!(p("LastError", Value::Text(String::new())), "default: LastError = (none)");
        assert_eq!(p("Username", Value::Text("a\u{1b}[2Jb".into())), "default: Username = a\\u{1b}[2Jb");
        let failed = Event::Signal("LoginFailed".into(), vec![Value::Text("x".into()), Value::Text("d\u{7}".into())]);
        assert_eq!(text_line("default", &failed, now), "default: LoginFailed: x: d\\u{7}");
        let ok = Event::Signal("LoginSucceeded".into(), vec![Value::Time(1_000_060)]);
        assert!(text_line("w", &ok, now).starts_with("w: LoginSucceeded: expires in 60 s at "));
        assert_eq!(
            text_line("w", &Event::Signal("AuthorizationExpired".into(), vec![]), now),
            "w: AuthorizationExpired"
        );
        assert_eq!(text_line("w", &Event::Removed, now), "w: the session was removed");
    }

    #[test]
    fn json_lines_name_the_session_and_keep_numbers() {
        let v = json_line("default", &Event::Property("ExpiresAt".into(), Value::Time(17)));
        assert_eq!(v, serde_json::json!({"session": "default", "event": "property", "name": "ExpiresAt", "value": 17}));
        let v = json_line("d", &Event::Signal("LoginSucceeded".into(), vec![Value::Time(5)]));
        assert_eq!(v, serde_json::json!({"session": "d", "event": "signal", "name": "LoginSucceeded", "args": [5]}));
        let v = json_line("d", &Event::Signal("AuthorizationExpired".into(), vec![]));
        assert_eq!(v["args"], serde_json::json!([]));
        assert_eq!(json_line("d", &Event::DaemonStopped)["event"], "daemon-stopped");
    }
}
