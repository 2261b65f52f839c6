//! `entrupy-tokenctl`: the command-line client (SPEC section 6). Parsing lives in the binary;
//! this module runs a parsed command against the bus and returns the exit code.

use std::collections::HashMap;
use std::io::Write;

use futures_util::StreamExt;
use zbus::Connection;
use zbus::Variant;
use zbus::proxy::CacheProperties;

use crate::client::{ManagerProxy, SessionProxy, short_error_name};
use crate::names;

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Human summary.
    Status,
    /// Exit 0 valid, 1 not, 2 could not ask.
    IsValid,
    /// Print the token.
    Token {
        /// With `--min-valid`.
        min_valid: Option<u32>,
    },
    /// Refresh now.
    Refresh,
    /// Print a fresh authorization request.
    Request,
    /// Log in with a signed request.
    Login(String),
    /// Drop the token.
    Cleanup,
    /// List sessions.
    Sessions,
    /// Add a session.
    AddSession {
        /// Id.
        id: String,
        /// User.
        user_id: String,
        /// E-mail.
        email: String,
        /// Optional.
        first_name: Option<String>,
        /// Optional.
        last_name: Option<String>,
    },
    /// Remove a session.
    RemoveSession(String),
    /// Print signals and property changes.
    Watch,
}

/// Global options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Session id.
    pub session: String,
    /// JSON output.
    pub json: bool,
}

enum Failure {
    /// A D-Bus error: one line, exit 1 (2 for `is-valid`).
    Bus(zbus::Error),
}

impl From<zbus::Error> for Failure {
    fn from(e: zbus::Error) -> Self {
        Failure::Bus(e)
    }
}

fn describe(e: &zbus::Error) -> String {
    if let Some((n, msg)) = crate::client::error_reply(e) {
        if n == "org.freedesktop.DBus.Error.ServiceUnknown" || n == "org.freedesktop.DBus.Error.NameHasNoOwner" {
            return format!(
                "the daemon is not running ({} has no owner); start it with `systemctl --user start entrupy-tokend` or run `entrupy-tokend`",
                names::BUS_NAME
            );
        }
        let short = short_error_name(e).unwrap_or(n);
        return match msg {
            Some(m) if !m.is_empty() => format!("{short}: {m}"),
            _ => short,
        };
    }
    match e {
        zbus::Error::InputOutput(_) | zbus::Error::Address(_) => {
            format!("cannot reach the D-Bus session bus: {e}")
        }
        other => other.to_string(),
    }
}

fn now() -> f64 {
    crate::clock::Clock::system().now()
}

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

fn local_time(t: u64) -> String {
    match chrono::DateTime::from_timestamp(t as i64, 0) {
        Some(dt) => dt.with_timezone(&chrono::Local).format("%H:%M:%S").to_string(),
        None => t.to_string(),
    }
}

async fn session_proxy<'a>(conn: &'a Connection, id: &str) -> zbus::Result<SessionProxy<'a>> {
    SessionProxy::builder(conn).path(names::session_path(id)).cache_properties(CacheProperties::No).build().await
}

async fn manager_proxy(conn: &Connection) -> zbus::Result<ManagerProxy<'_>> {
    ManagerProxy::builder(conn).cache_properties(CacheProperties::No).build().await
}

/// Runs one command and returns the process exit code.
pub async fn run(opts: Options, cmd: Command) -> i32 {
    let is_valid = cmd == Command::IsValid;
    let conn = match Connection::session().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("entrupy-tokenctl: cannot reach the D-Bus session bus: {e}");
            return if is_valid { 2 } else { 1 };
        }
    };
    match execute(&conn, &opts, cmd).await {
        Ok(code) => code,
        Err(Failure::Bus(e)) => {
            eprintln!("entrupy-tokenctl: {}", describe(&e));
            if is_valid { 2 } else { 1 }
        }
    }
}

fn print_json(v: serde_json::Value) {
    println!("{v}");
}

async fn execute(conn: &Connection, opts: &Options, cmd: Command) -> Result<i32, Failure> {
    let id = opts.session.as_str();
    match cmd {
        Command::IsValid => {
            let s = session_proxy(conn, id).await?;
            Ok(if s.is_authorization_valid().await? { 0 } else { 1 })
        }
        Command::Status => {
            let s = session_proxy(conn, id).await?;
            let state = s.state().await?;
            let valid = s.valid().await?;
            let expires = s.expires_at().await?;
            let refresh = s.refresh_at().await?;
            let last_login = s.last_login_at().await?;
            let last_error = s.last_error().await?;
            let username = s.username().await?;
            let uid = s.unique_user_id().await?;
            // Extra properties; an older daemon without them still gets a status.
            let today = s.logins_today().await.ok();
            let per_day = s.logins_per_day().await.ok();
            let pacing = s.pacing().await.unwrap_or(false);
            if opts.json {
                print_json(serde_json::json!({
                    "session": id, "state": state, "valid": valid, "expires_at": expires,
                    "refresh_at": refresh, "last_login_at": last_login, "last_error": last_error,
                    "username": username, "unique_user_id": uid, "logins_today": today,
                    "logins_per_day": per_day, "pacing": pacing,
                }));
                return Ok(0);
            }
            let now = now();
            let mut parts = vec![state.clone()];
            if expires > 0 {
                let verb = if (expires as f64) > now { "expires" } else { "expired" };
                parts.push(format!("{verb} {} at {}", relative(expires, now), local_time(expires)));
            }
            if refresh > 0 {
                parts.push(format!("next refresh {}", relative(refresh, now)));
            }
            if let (Some(t), Some(d)) = (today, per_day) {
                parts.push(format!("{t} of {d} logins used today"));
            }
            if pacing {
                parts.push("paced to make the daily budget last".to_owned());
            }
            if !last_error.is_empty() {
                parts.push(format!("last error {last_error}"));
            }
            println!("{id}: {}", parts.join("; "));
            if !username.is_empty() {
                println!("  user {uid} ({username})");
            } else {
                println!("  user {uid}");
            }
            if last_login > 0 {
                println!("  last login {} at {}", relative(last_login, now), local_time(last_login));
            }
            Ok(0)
        }
        Command::Token { min_valid } => {
            let s = session_proxy(conn, id).await?;
            let (token, exp) = match min_valid {
                Some(m) => s.ensure_valid(m).await?,
                None => s.get_token().await?,
            };
            if opts.json {
                print_json(serde_json::json!({ "token": token, "expires_at": exp }));
            } else {
                println!("{token}");
            }
            Ok(0)
        }
        Command::Refresh => {
            let s = session_proxy(conn, id).await?;
            let exp = s.refresh().await?;
            if opts.json {
                print_json(serde_json::json!({ "expires_at": exp }));
            } else {
                println!("refreshed; expires {} at {}", relative(exp, now()), local_time(exp));
            }
            Ok(0)
        }
        Command::Request => {
            let s = session_proxy(conn, id).await?;
            let r = s.generate_authorization_request().await?;
            if opts.json {
                print_json(serde_json::json!({ "sdk_authorization_request": r }));
            } else {
                println!("{r}");
            }
            Ok(0)
        }
        Command::Login(signed) => {
            let s = session_proxy(conn, id).await?;
            let exp = s.login_with_signed_request(&signed).await?;
            if opts.json {
                print_json(serde_json::json!({ "expires_at": exp }));
            } else {
                println!("logged in; expires {} at {}", relative(exp, now()), local_time(exp));
            }
            Ok(0)
        }
        Command::Cleanup => {
            session_proxy(conn, id).await?.cleanup().await?;
            if opts.json {
                print_json(serde_json::json!({ "ok": true }));
            }
            Ok(0)
        }
        Command::Sessions => {
            let m = manager_proxy(conn).await?;
            let paths = m.list_sessions().await?;
            let mut rows = Vec::new();
            for p in paths {
                let s =
                    SessionProxy::builder(conn).path(p.clone()).cache_properties(CacheProperties::No).build().await?;
                rows.push((s.id().await?, s.state().await?, s.valid().await?, s.expires_at().await?, p.to_string()));
            }
            if opts.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(id, st, v, e, p)| serde_json::json!({"id": id, "state": st, "valid": v, "expires_at": e, "path": p}))
                    .collect();
                print_json(serde_json::Value::Array(v));
            } else {
                for (id, st, _, e, _) in rows {
                    let exp = if e > 0 { format!(" (expires {})", relative(e, now())) } else { String::new() };
                    println!("{id}\t{st}{exp}");
                }
            }
            Ok(0)
        }
        Command::AddSession { id, user_id, email, first_name, last_name } => {
            let m = manager_proxy(conn).await?;
            let mut profile: HashMap<&str, Variant<'_>> = HashMap::new();
            profile.insert("unique_user_id", Variant::from(user_id.as_str()));
            profile.insert("email", Variant::from(email.as_str()));
            if let Some(f) = &first_name {
                profile.insert("first_name", Variant::from(f.as_str()));
            }
            if let Some(l) = &last_name {
                profile.insert("last_name", Variant::from(l.as_str()));
            }
            let p = m.add_session(&id, profile).await?;
            if opts.json {
                print_json(serde_json::json!({ "id": id, "path": p.to_string() }));
            } else {
                println!("{p}");
            }
            Ok(0)
        }
        Command::RemoveSession(id) => {
            manager_proxy(conn).await?.remove_session(&id).await?;
            Ok(0)
        }
        Command::Watch => watch(conn, id, opts.json).await,
    }
}

async fn watch(conn: &Connection, id: &str, json: bool) -> Result<i32, Failure> {
    let path = names::session_path(id);
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(names::BUS_NAME)
        .path(path.as_str())
        .build()?;
    let mut stream = zbus::MessageStream::for_match_rule(rule, conn, std::num::NonZeroUsize::new(256)).await?;
    // Make sure the session exists before waiting.
    let s = session_proxy(conn, id).await?;
    let state = s.state().await?;
    if json {
        print_json(serde_json::json!({"event": "State", "value": state}));
    } else {
        println!("{id}: State = {state}");
    }
    let _ = std::io::stdout().flush();
    while let Some(msg) = stream.next().await {
        let Ok(msg) = msg else { continue };
        let hdr = msg.header();
        let member = hdr.member().map(|m| m.to_string()).unwrap_or_default();
        let body = msg.body();
        if member == "PropertiesChanged" {
            if let Ok((_iface, changed, _inv)) =
                body.deserialize::<(String, HashMap<String, zbus::OwnedVariant>, Vec<String>)>()
            {
                let mut keys: Vec<_> = changed.into_iter().collect();
                keys.sort_by(|a, b| a.0.cmp(&b.0));
                for (k, v) in keys {
                    if json {
                        print_json(serde_json::json!({"event": k, "value": value_json(&v)}));
                    } else {
                        println!("{id}: {k} = {}", value_text(&v));
                    }
                }
            }
        } else {
            let args: String = match member.as_str() {
                "LoginSucceeded" => body.deserialize::<u64>().map(|e| format!("({e})")).unwrap_or_default(),
                "LoginFailed" => {
                    body.deserialize::<(String, String)>().map(|(c, d)| format!("({c:?}, {d:?})")).unwrap_or_default()
                }
                _ => "()".to_owned(),
            };
            if json {
                print_json(serde_json::json!({"event": member, "args": args}));
            } else {
                println!("{id}: {member}{args}");
            }
        }
        let _ = std::io::stdout().flush();
    }
    Ok(0)
}

fn value_text(v: &Variant<'_>) -> String {
    match v {
        Variant::Str(s) => format!("{:?}", s.as_str()),
        Variant::U64(n) => n.to_string(),
        Variant::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

fn value_json(v: &Variant<'_>) -> serde_json::Value {
    match v {
        Variant::Str(s) => serde_json::Value::from(s.as_str()),
        Variant::U64(n) => serde_json::Value::from(*n),
        Variant::Bool(b) => serde_json::Value::from(*b),
        other => serde_json::Value::from(other.to_string()),
    }
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
    }
}
