//! The one place where `entrupy-tokenctl` turns a failed call into words a person
//! understands, with a next step, and into an exit code. Every command, `status` and `watch`
//! included, reports its failures through [`explain`].

use crate::client::error_reply;
use crate::names;

use super::text::clean;

/// Exit code: the command did what was asked (`is-valid`: the token is valid).
pub const EXIT_OK: i32 = 0;
/// Exit code: the daemon answered with a failure (`is-valid`: the token is not valid;
/// `watch`: the session was removed).
pub const EXIT_FAILED: i32 = 1;
/// Exit code: the daemon could not be asked: no session bus, the daemon is not running or
/// cannot start, the session does not exist, or the command line is wrong (`watch`: the
/// daemon went away).
pub const EXIT_CANNOT_ASK: i32 = 2;

/// The exit code dbus-daemon reports for an activated daemon whose config is invalid
/// (`EX_CONFIG`, SPEC section 2).
const EXIT_CONFIG: &str = "78";

/// A failure as `entrupy-tokenctl` reports it: one line for stderr and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// One line, without the program name; safe for a terminal.
    pub message: String,
    /// [`EXIT_FAILED`] or [`EXIT_CANNOT_ASK`].
    pub code: i32,
}

impl Failure {
    fn cannot_ask(message: String) -> Failure {
        Failure { message, code: EXIT_CANNOT_ASK }
    }
}

/// The daemon is not running (nobody owns its name and the bus cannot start it).
pub fn not_running() -> String {
    format!(
        "the daemon is not running ({} has no owner): start it with `systemctl --user start entrupy-tokend`, or run `entrupy-tokend`",
        names::BUS_NAME
    )
}

/// `session` does not exist.
pub fn no_session(session: &str) -> String {
    format!("no session {:?} (entrupy-tokenctl sessions lists them)", clean(session))
}

/// The session bus cannot be reached at all (no address, no socket, a refused handshake).
pub fn no_bus(e: &zbus::Error) -> Failure {
    Failure::cannot_ask(format!(
        "cannot reach the D-Bus session bus ({}): check DBUS_SESSION_BUS_ADDRESS",
        clean(&e.to_string())
    ))
}

/// Explains a failed call about `session` (the session the command names).
pub fn explain(e: &zbus::Error, session: &str) -> Failure {
    let Some((name, message)) = error_reply(e) else { return explain_local(e) };
    let message = message.unwrap_or_default();
    let fdo = name.strip_prefix("org.freedesktop.DBus.Error.");
    let ours = name.strip_prefix(names::ERROR_PREFIX).and_then(|n| n.strip_prefix('.'));
    match (fdo, ours) {
        (Some("ServiceUnknown" | "NameHasNoOwner"), _) => Failure::cannot_ask(not_running()),
        (Some("UnknownObject"), _) | (_, Some("NoSuchSession")) => Failure::cannot_ask(no_session(session)),
        (Some("Spawn.ChildExited"), _) if message.split_whitespace().last() == Some(EXIT_CONFIG) => {
            Failure::cannot_ask("the daemon's configuration is invalid: run `entrupy-tokend --check-config`".to_owned())
        }
        (Some(spawn), _) if spawn.starts_with("Spawn.") => Failure::cannot_ask(format!(
            "the bus could not start the daemon ({}): see `journalctl --user -u entrupy-tokend`",
            clean(&message)
        )),
        (_, Some(short)) => Failure { message: daemon_error(short, &message), code: EXIT_FAILED },
        _ => {
            let text = if message.is_empty() { name } else { format!("{name}: {message}") };
            Failure { message: clean(&text).into_owned(), code: EXIT_FAILED }
        }
    }
}

/// A failure that is not an error reply: the bus itself is out of reach.
fn explain_local(e: &zbus::Error) -> Failure {
    match e {
        zbus::Error::InputOutput(_) | zbus::Error::Address(_) | zbus::Error::Handshake(_) => Failure::cannot_ask(
            format!("cannot reach the D-Bus session bus ({}): check DBUS_SESSION_BUS_ADDRESS", clean(&e.to_string())),
        ),
        other => Failure { message: clean(&other.to_string()).into_owned(), code: EXIT_FAILED },
    }
}

/// One of the daemon's own errors (`com.entrupy.TokenDaemon1.Error.<short>`): its short name
/// and message, and what to do next where there is something to do.
fn daemon_error(short: &str, message: &str) -> String {
    let hint = match short {
        "NotAuthorized" => Some("log in with `entrupy-tokenctl refresh` or `entrupy-tokenctl login -`"),
        "NotConfigured" => {
            Some("set [backend] url in the config, or log in with a signed request: `entrupy-tokenctl login -`")
        }
        "Unauthorized" => Some("the backend refused the credential: check its token file"),
        "NetworkError" => Some("check the network; the daemon keeps retrying"),
        _ => None,
    };
    let mut line = short.to_owned();
    if !message.is_empty() {
        line.push_str(": ");
        line.push_str(&clean(message));
    }
    if let Some(h) = hint {
        line.push_str("; ");
        line.push_str(h);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method_error(name: &str, msg: &str) -> zbus::Error {
        let name = zbus::names::OwnedErrorName::try_from(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        // A real reply message is not needed to tell the cases apart; build one anyway.
        let reply = zbus::message::Message::method_call("/", "M").build(&()).unwrap_or_else(|e| panic!("{e}"));
        zbus::Error::MethodError(name, Some(msg.to_owned()), reply)
    }

    #[test]
    fn explains_bus_errors_with_a_next_step() {
        let e = zbus::Error::FDO(Box::new(zbus::fdo::Error::ServiceUnknown("x".into())));
        let f = explain(&e, "default");
        assert_eq!(f.code, EXIT_CANNOT_ASK);
        assert!(f.message.starts_with("the daemon is not running"), "{}", f.message);
        let e = zbus::Error::FDO(Box::new(zbus::fdo::Error::UnknownObject("x".into())));
        assert_eq!(explain(&e, "work").message, "no session \"work\" (entrupy-tokenctl sessions lists them)");
        let e = method_error("com.entrupy.TokenDaemon1.Error.NoSuchSession", "no session \"x\"");
        assert_eq!(explain(&e, "x").message, no_session("x"));
        let e = zbus::Error::FDO(Box::new(zbus::fdo::Error::SpawnChildExited(
            "Process com.entrupy.TokenDaemon1 exited with status 78".into(),
        )));
        let f = explain(&e, "default");
        assert_eq!(f.message, "the daemon's configuration is invalid: run `entrupy-tokend --check-config`");
        assert_eq!(f.code, EXIT_CANNOT_ASK);
        let e = zbus::Error::FDO(Box::new(zbus::fdo::Error::SpawnChildExited("exited with status 1".into())));
        assert!(explain(&e, "d").message.starts_with("the bus could not start the daemon"));
    }

    #[test]
    fn daemon_errors_keep_their_short_name_and_lose_control_characters() {
        let e = method_error("com.entrupy.TokenDaemon1.Error.ServerError", "entrupy answered 503\u{1b}[2J");
        let f = explain(&e, "default");
        assert_eq!(f.code, EXIT_FAILED);
        assert_eq!(f.message, "ServerError: entrupy answered 503\\u{1b}[2J");
        let f = explain(&method_error("com.entrupy.TokenDaemon1.Error.NotAuthorized", "no valid token"), "d");
        assert!(f.message.starts_with("NotAuthorized: no valid token; log in with"), "{}", f.message);
    }
}
