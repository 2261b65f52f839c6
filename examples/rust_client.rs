//! A desktop app's view of entrupy-tokend, in Rust with the crate's zbus proxies.
//!
//! ```sh
//! cargo run --example rust_client -- [--session ID] [--listen SECONDS] [MIN_SECONDS]
//! ```
//!
//! 1. asks `IsAuthorizationValid`,
//! 2. calls `EnsureValid(MIN_SECONDS)` (default 60) and prints the expiry (never the token,
//!    only its length),
//! 3. prints the session's signals (`LoginSucceeded`, `LoginFailed`, `AuthorizationExpired`,
//!    `ReauthorizationRequired`) for SECONDS (default 30), then exits 0.
//!
//! The bus is the session bus of `$DBUS_SESSION_BUS_ADDRESS`. The session defaults to
//! `$ENTRUPY_SESSION`, else `default`; the listening time to `$ENTRUPY_LISTEN_SECONDS`.
//! Any D-Bus error is printed on stderr with its short name (`NotAuthorized`, ...) and the
//! example exits 1; a usage error exits 2.

use std::process::ExitCode;
use std::time::Duration;

use entrupy_tokend::client::{ManagerProxy, SessionProxy, short_error_name};
use futures_util::StreamExt;

const USAGE: &str = "usage: rust_client [--session ID] [--listen SECONDS] [MIN_SECONDS]";

#[derive(Debug)]
struct Args {
    session: String,
    min_seconds: u32,
    listen: Duration,
}

fn parse_args() -> Result<Args, String> {
    let number = |what: &str, v: Option<String>| -> Result<u64, String> {
        let v = v.ok_or_else(|| format!("{what} needs a value"))?;
        v.parse().map_err(|_| format!("{what}: not a number of seconds: {v:?}"))
    };
    let mut args = Args {
        session: std::env::var("ENTRUPY_SESSION").unwrap_or_else(|_| "default".to_owned()),
        min_seconds: 60,
        listen: Duration::from_secs(30),
    };
    if let Ok(v) = std::env::var("ENTRUPY_LISTEN_SECONDS") {
        args.listen = Duration::from_secs(number("ENTRUPY_LISTEN_SECONDS", Some(v))?);
    }
    let mut argv = std::env::args().skip(1);
    while let Some(a) = argv.next() {
        match a.as_str() {
            "--session" => args.session = argv.next().ok_or("--session needs a value")?,
            "--listen" => args.listen = Duration::from_secs(number("--listen", argv.next())?),
            "-h" | "--help" => return Err(String::new()),
            _ if !a.starts_with('-') => {
                args.min_seconds = u32::try_from(number("MIN_SECONDS", Some(a))?).map_err(|e| e.to_string())?
            }
            _ => return Err(format!("unknown option {a}")),
        }
    }
    Ok(args)
}

/// `2026-01-01T12:00:00Z` for a Unix time.
fn utc(t: u64) -> String {
    i64::try_from(t)
        .ok()
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "?".to_owned())
}

/// One line for a failed call: the daemon's short error name and its message.
fn describe(e: &zbus::Error) -> String {
    match (entrupy_tokend::client::error_reply(e), short_error_name(e)) {
        (Some((_, Some(msg))), Some(name)) => format!("{name}: {msg}"),
        (_, Some(name)) => name,
        _ => e.to_string(),
    }
}

async fn run(args: Args) -> Result<(), String> {
    let call = |what: &'static str| move |e: zbus::Error| format!("{what}: {}", describe(&e));
    // The session bus, from $DBUS_SESSION_BUS_ADDRESS.
    let conn = zbus::Connection::session().await.map_err(call("cannot connect to the session bus"))?;
    let manager = ManagerProxy::new(&conn).await.map_err(call("Manager"))?;
    let path = manager.get_session(&args.session).await.map_err(call("GetSession"))?;
    let session = SessionProxy::builder(&conn).path(path.clone()).build().await.map_err(call("Session"))?;
    println!("session {}: {}", args.session, path.as_str());

    // Subscribe before anything else, so no signal is lost between the calls below and the
    // listening.
    let mut succeeded = session.receive_login_succeeded().await.map_err(call("subscribe"))?;
    let mut failed = session.receive_login_failed().await.map_err(call("subscribe"))?;
    let mut expired = session.receive_authorization_expired().await.map_err(call("subscribe"))?;
    let mut reauth = session.receive_reauthorization_required().await.map_err(call("subscribe"))?;

    let valid = session.is_authorization_valid().await.map_err(call("IsAuthorizationValid"))?;
    println!("IsAuthorizationValid: {valid}");

    let (token, expires_at) = session.ensure_valid(args.min_seconds).await.map_err(call("EnsureValid"))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // A real app hands `token` to the Entrupy SDK; it is a secret, so it is not printed.
    println!(
        "EnsureValid({}): token of {} bytes, expires_at {expires_at} ({}, in {} s)",
        args.min_seconds,
        token.len(),
        utc(expires_at),
        expires_at.saturating_sub(now)
    );
    drop(token);

    println!("listening for signals for {} s", args.listen.as_secs());
    let deadline = tokio::time::sleep(args.listen);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            Some(s) = succeeded.next() => {
                let a = s.args().map_err(call("LoginSucceeded"))?;
                println!("LoginSucceeded expires_at={} ({})", a.expires_at, utc(a.expires_at));
            }
            Some(s) = failed.next() => {
                let a = s.args().map_err(call("LoginFailed"))?;
                println!("LoginFailed error_code={} description={}", a.error_code, a.description);
            }
            Some(_) = expired.next() => println!("AuthorizationExpired"),
            Some(_) = reauth.next() => println!("ReauthorizationRequired"),
        }
    }
    println!("done");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("rust_client: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rust_client: {e}");
            ExitCode::from(1)
        }
    }
}
