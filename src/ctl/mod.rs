//! `entrupy-tokenctl`: the command-line client (SPEC section 6). Parsing lives in the binary;
//! this module runs a parsed command against the bus and returns the exit code. Failures are
//! put into words in one place, [`failure`]; what a person reads is made terminal-safe by
//! [`text::clean`]; `watch` lives in its own module.

pub mod failure;
pub mod text;
mod watch;

use std::collections::HashMap;
use std::io::Read;

use zbus::Connection;
use zbus::Variant;
use zbus::proxy::CacheProperties;

use crate::client::{ManagerProxy, SessionProxy};
use crate::names;

pub use failure::{EXIT_CANNOT_ASK, EXIT_FAILED, EXIT_OK, Failure};
use text::{clean, local_time, relative};

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
    /// Print the session ids, one a line, nothing on failure (for shell completion).
    SessionIds,
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

/// The most `login -` reads from standard input; a signed request is a few KiB.
const MAX_SIGNED_REQUEST: u64 = 1 << 20;

/// Reads the signed request of `login -`: all of `input` less one trailing newline (`\n` or
/// `\r\n`). An empty request, or one over 1 MiB, is an error in words.
pub fn read_signed_request(input: impl Read) -> Result<String, String> {
    let mut buf = String::new();
    input
        .take(MAX_SIGNED_REQUEST + 1)
        .read_to_string(&mut buf)
        .map_err(|e| format!("cannot read the signed request from standard input: {e}"))?;
    if buf.len() as u64 > MAX_SIGNED_REQUEST {
        return Err("the signed request on standard input is larger than 1 MiB".to_owned());
    }
    let trimmed = buf.strip_suffix("\r\n").or_else(|| buf.strip_suffix('\n')).unwrap_or(&buf);
    if trimmed.is_empty() {
        return Err("the signed request on standard input is empty".to_owned());
    }
    Ok(trimmed.to_owned())
}

fn now() -> f64 {
    crate::clock::Clock::system().now()
}

async fn session_proxy<'a>(conn: &'a Connection, id: &str) -> zbus::Result<SessionProxy<'a>> {
    SessionProxy::builder(conn).path(names::session_path(id)).cache_properties(CacheProperties::No).build().await
}

async fn manager_proxy(conn: &Connection) -> zbus::Result<ManagerProxy<'_>> {
    ManagerProxy::builder(conn).cache_properties(CacheProperties::No).build().await
}

/// Runs one command and returns the process exit code ([`EXIT_OK`], [`EXIT_FAILED`],
/// [`EXIT_CANNOT_ASK`]); a failure is one line on stderr.
pub async fn run(opts: Options, cmd: Command) -> i32 {
    let is_valid = cmd == Command::IsValid;
    let quiet = cmd == Command::SessionIds;
    let subject = match &cmd {
        Command::RemoveSession(id) => id.clone(),
        _ => opts.session.clone(),
    };
    let result = match Connection::session().await {
        Ok(conn) => execute(&conn, &opts, cmd).await.map_err(|e| failure::explain(&e, &subject)),
        Err(e) => Err(failure::no_bus(&e)),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            if !quiet {
                eprintln!("entrupy-tokenctl: {}", f.message);
            }
            // is-valid's 1 means "not valid": a failure to ask must not look like an answer.
            if is_valid { EXIT_CANNOT_ASK } else { f.code }
        }
    }
}

fn print_json(v: serde_json::Value) {
    println!("{v}");
}

async fn execute(conn: &Connection, opts: &Options, cmd: Command) -> zbus::Result<i32> {
    let id = opts.session.as_str();
    match cmd {
        Command::IsValid => {
            let s = session_proxy(conn, id).await?;
            Ok(if s.is_authorization_valid().await? { EXIT_OK } else { EXIT_FAILED })
        }
        Command::Status => status(conn, id, opts.json).await,
        Command::Token { min_valid } => token(conn, id, min_valid, opts.json).await,
        Command::Refresh => {
            let exp = session_proxy(conn, id).await?.refresh().await?;
            expiry_result("refreshed", exp, opts.json);
            Ok(EXIT_OK)
        }
        Command::Request => {
            let r = session_proxy(conn, id).await?.generate_authorization_request().await?;
            if opts.json {
                print_json(serde_json::json!({ "sdk_authorization_request": r }));
            } else {
                println!("{}", clean(&r));
            }
            Ok(EXIT_OK)
        }
        Command::Login(signed) => {
            let exp = session_proxy(conn, id).await?.login_with_signed_request(&signed).await?;
            expiry_result("logged in", exp, opts.json);
            Ok(EXIT_OK)
        }
        Command::Cleanup => {
            session_proxy(conn, id).await?.cleanup().await?;
            if opts.json {
                print_json(serde_json::json!({ "ok": true }));
            }
            Ok(EXIT_OK)
        }
        Command::Sessions => sessions(conn, opts.json).await,
        Command::SessionIds => session_ids(conn).await,
        Command::AddSession { id, user_id, email, first_name, last_name } => {
            add_session(conn, &id, &user_id, &email, first_name.as_deref(), last_name.as_deref(), opts.json).await
        }
        Command::RemoveSession(id) => {
            manager_proxy(conn).await?.remove_session(&id).await?;
            Ok(EXIT_OK)
        }
        Command::Watch => watch::watch(conn, id, opts.json).await,
    }
}

/// The answer of `refresh` and `login`: the new expiry.
fn expiry_result(what: &str, exp: u64, json: bool) {
    if json {
        print_json(serde_json::json!({ "expires_at": exp }));
    } else {
        println!("{what}; expires {} at {}", relative(exp, now()), local_time(exp));
    }
}

async fn token(conn: &Connection, id: &str, min_valid: Option<u32>, json: bool) -> zbus::Result<i32> {
    let s = session_proxy(conn, id).await?;
    let (token, exp) = match min_valid {
        Some(m) => s.ensure_valid(m).await?,
        None => s.get_token().await?,
    };
    if json {
        print_json(serde_json::json!({ "token": token, "expires_at": exp }));
    } else {
        println!("{}", clean(&token));
    }
    Ok(EXIT_OK)
}

/// The properties `status` shows.
struct Status {
    state: String,
    valid: bool,
    expires: u64,
    refresh: u64,
    last_login: u64,
    last_error: String,
    username: String,
    uid: String,
    today: Option<u32>,
    per_day: Option<u32>,
    pacing: bool,
}

async fn read_status(s: &SessionProxy<'_>) -> zbus::Result<Status> {
    Ok(Status {
        state: s.state().await?,
        valid: s.valid().await?,
        expires: s.expires_at().await?,
        refresh: s.refresh_at().await?,
        last_login: s.last_login_at().await?,
        last_error: s.last_error().await?,
        username: s.username().await?,
        uid: s.unique_user_id().await?,
        // Extra properties; an older daemon without them still gets a status.
        today: s.logins_today().await.ok(),
        per_day: s.logins_per_day().await.ok(),
        pacing: s.pacing().await.unwrap_or(false),
    })
}

async fn status(conn: &Connection, id: &str, json: bool) -> zbus::Result<i32> {
    let st = read_status(&session_proxy(conn, id).await?).await?;
    if json {
        print_json(serde_json::json!({
            "session": id, "state": st.state, "valid": st.valid, "expires_at": st.expires,
            "refresh_at": st.refresh, "last_login_at": st.last_login, "last_error": st.last_error,
            "username": st.username, "unique_user_id": st.uid, "logins_today": st.today,
            "logins_per_day": st.per_day, "pacing": st.pacing,
        }));
    } else {
        print!("{}", status_text(id, &st, now()));
    }
    Ok(EXIT_OK)
}

fn status_text(id: &str, st: &Status, now: f64) -> String {
    let mut parts = vec![clean(&st.state).into_owned()];
    if st.expires > 0 {
        let verb = if (st.expires as f64) > now { "expires" } else { "expired" };
        parts.push(format!("{verb} {} at {}", relative(st.expires, now), local_time(st.expires)));
    }
    if st.refresh > 0 {
        parts.push(format!("next refresh {}", relative(st.refresh, now)));
    }
    if let (Some(t), Some(d)) = (st.today, st.per_day) {
        parts.push(format!("{t} of {d} logins used today"));
    }
    if st.pacing {
        parts.push("paced to make the daily budget last".to_owned());
    }
    if !st.last_error.is_empty() {
        parts.push(format!("last error {}", clean(&st.last_error)));
    }
    let mut out = format!("{}: {}\n", clean(id), parts.join("; "));
    if st.username.is_empty() {
        out.push_str(&format!("  user {}\n", clean(&st.uid)));
    } else {
        out.push_str(&format!("  user {} ({})\n", clean(&st.uid), clean(&st.username)));
    }
    if st.last_login > 0 {
        out.push_str(&format!("  last login {} at {}\n", relative(st.last_login, now), local_time(st.last_login)));
    }
    out
}

async fn sessions(conn: &Connection, json: bool) -> zbus::Result<i32> {
    let paths = manager_proxy(conn).await?.list_sessions().await?;
    let mut rows = Vec::new();
    for p in paths {
        let s = SessionProxy::builder(conn).path(p.clone()).cache_properties(CacheProperties::No).build().await?;
        rows.push((s.id().await?, s.state().await?, s.valid().await?, s.expires_at().await?, p.to_string()));
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(id, st, v, e, p)| serde_json::json!({"id": id, "state": st, "valid": v, "expires_at": e, "path": p}))
            .collect();
        print_json(serde_json::Value::Array(v));
    } else {
        for (id, st, _, e, _) in rows {
            let exp = if e > 0 { format!(" (expires {})", relative(e, now())) } else { String::new() };
            println!("{}\t{}{exp}", clean(&id), clean(&st));
        }
    }
    Ok(EXIT_OK)
}

/// The ids of the sessions, one a line, for the shell completion. The ids come from the
/// object paths (no property reads), so this stays fast.
async fn session_ids(conn: &Connection) -> zbus::Result<i32> {
    let paths = manager_proxy(conn).await?.list_sessions().await?;
    let prefix = format!("{}/", names::SESSION_PATH_PREFIX);
    for p in paths {
        if let Some(id) = p.as_str().strip_prefix(&prefix).and_then(names::decode_path_element) {
            println!("{}", clean(&id));
        }
    }
    Ok(EXIT_OK)
}

async fn add_session(
    conn: &Connection,
    id: &str,
    user_id: &str,
    email: &str,
    first_name: Option<&str>,
    last_name: Option<&str>,
    json: bool,
) -> zbus::Result<i32> {
    let mut profile: HashMap<&str, Variant<'_>> = HashMap::new();
    profile.insert("unique_user_id", Variant::from(user_id));
    profile.insert("email", Variant::from(email));
    if let Some(f) = first_name {
        profile.insert("first_name", Variant::from(f));
    }
    if let Some(l) = last_name {
        profile.insert("last_name", Variant::from(l));
    }
    let p = manager_proxy(conn).await?.add_session(id, profile).await?;
    if json {
        print_json(serde_json::json!({ "id": id, "path": p.to_string() }));
    } else {
        println!("{p}");
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_dash_reads_stdin_less_one_newline() {
        assert_eq!(read_signed_request(&b"abc.def\n"[..]).unwrap(), "abc.def");
        assert_eq!(read_signed_request(&b"abc.def\r\n"[..]).unwrap(), "abc.def");
        assert_eq!(read_signed_request(&b"abc.def\n\n"[..]).unwrap(), "abc.def\n");
        assert_eq!(read_signed_request(&b"abc.def"[..]).unwrap(), "abc.def");
        assert!(read_signed_request(&b"\n"[..]).unwrap_err().contains("empty"));
        let big = vec![b'a'; (MAX_SIGNED_REQUEST + 1) as usize];
        assert!(read_signed_request(&big[..]).unwrap_err().contains("1 MiB"));
    }

    #[test]
    fn status_text_escapes_what_the_daemon_sent() {
        let st = Status {
            state: "failed".into(),
            valid: false,
            expires: 0,
            refresh: 0,
            last_login: 0,
            last_error: "Server\u{1b}[2JError".into(),
            username: "eve\u{1b}]0;owned\u{7}".into(),
            uid: "user-0001".into(),
            today: Some(2),
            per_day: Some(100),
            pacing: false,
        };
        let out = status_text("default", &st, 1000.0);
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        assert!(out.contains("last error Server\\u{1b}[2JError"), "{out}");
        assert!(out.contains("user user-0001 (eve\\u{1b}]0;owned\\u{7})"), "{out}");
        assert!(out.contains("2 of 100 logins used today"), "{out}");
    }
}
