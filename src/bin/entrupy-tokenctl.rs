//! `entrupy-tokenctl`: the command-line client over D-Bus. Parses arguments and runs
//! [`entrupy_tokend::ctl::run`].

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use entrupy_tokend::ctl;

/// What `--help` ends with: the exit codes, the same for every command.
const EXIT_CODES: &str = "\
Exit status:
  0  success (is-valid: the token is valid)
  1  the daemon answered with a failure (is-valid: the token is not valid; watch: the
     session was removed)
  2  the daemon could not be asked: no session bus, the daemon is not running or its
     configuration is invalid, no such session, a wrong command line (watch: the daemon
     stopped)";

/// Control and query entrupy-tokend, the Entrupy token daemon
#[derive(Debug, Parser)]
#[command(
    name = "entrupy-tokenctl",
    version,
    about = "Control and query entrupy-tokend, the Entrupy token daemon",
    long_about = "entrupy-tokenctl asks entrupy-tokend, over the D-Bus session bus, about a session's \
Entrupy authorization: whether it is valid, the token itself, a refresh now, a login with a \
signed request; it also adds, removes and lists sessions and watches one as it changes. \
Failures are one line on standard error that says what to do next.",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Session id.
    #[arg(long, global = true, default_value = "default", value_name = "ID")]
    session: String,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Human summary: state, expiry, next refresh, last error.
    Status,
    /// Exit 0 when valid, 1 when not, 2 when the daemon could not be asked.
    IsValid,
    /// Print the token.
    Token {
        /// Refresh first unless it stays valid this long.
        #[arg(long, value_name = "SECONDS")]
        min_valid: Option<u32>,
    },
    /// Re-authorize now.
    Refresh,
    /// Print a fresh SDK authorization request.
    Request,
    /// Log in with a signed request (`login -` reads it from standard input; prefer that).
    #[command(long_about = "Log in with a signed authorization request. `-` reads it from standard input, \
less one trailing newline: prefer that form, since a command line is visible to every user of \
the machine (for example `app-sign | entrupy-tokenctl login -`).")]
    Login {
        /// The signed authorization request, or `-` to read it from standard input (preferred).
        #[arg(value_name = "SIGNED_REQUEST|-")]
        signed_request: String,
    },
    /// Drop the token and stop refreshing.
    Cleanup,
    /// List sessions.
    Sessions {
        /// Print only the ids, one a line, and nothing on failure (for shell completion).
        #[arg(long, hide = true)]
        ids: bool,
    },
    /// Add a session.
    AddSession {
        /// Session id ([a-z0-9_-]{1,64}).
        id: String,
        /// unique_user_id.
        #[arg(long)]
        user_id: String,
        /// E-mail.
        #[arg(long)]
        email: String,
        /// Given name.
        #[arg(long)]
        first_name: Option<String>,
        /// Family name.
        #[arg(long)]
        last_name: Option<String>,
    },
    /// Remove a session.
    RemoveSession {
        /// Session id.
        id: String,
    },
    /// Print each signal and property change as it happens.
    #[command(long_about = "Print each signal and property change of the session as it happens, times \
and values as `status` shows them (with --json, one object a line, each naming the session). \
Runs until interrupted, or until the session is removed (exit 1) or the daemon stops (exit 2).")]
    Watch,
}

/// Sections of the main man page that clap does not know.
const MAN_EXTRA: &str = r#".SH "EXIT STATUS"
The same for every command; a failure is one line on standard error that says what to do next.
.TP
\fB0\fR
success (\fBis\-valid\fR: the token is valid)
.TP
\fB1\fR
the daemon answered with a failure, such as com.entrupy.TokenDaemon1.Error.NotAuthorized (\fBis\-valid\fR: the token is not valid; \fBwatch\fR: the session was removed)
.TP
\fB2\fR
the daemon could not be asked: no session bus, the daemon is not running or its configuration is invalid, no such session, or a wrong command line (\fBwatch\fR: the daemon stopped)
.SH ENVIRONMENT
.TP
\fBDBUS_SESSION_BUS_ADDRESS\fR
the session bus the daemon is on
.SH "SEE ALSO"
\fBentrupy\-tokend\fR(1), \fBentrupy\-tokend.toml\fR(5), \fBbusctl\fR(1), \fBgdbus\fR(1)
"#;

fn main() -> ExitCode {
    if entrupy_tokend::generate::requested() {
        let request = entrupy_tokend::generate::Request {
            command: Cli::command(),
            man_extra: MAN_EXTRA,
            subcommand_pages: true,
            usage_exit: 2,
        };
        let sessions = entrupy_tokend::generate::DynamicValues {
            option: "--session",
            args: "sessions --ids",
            positional_of: &["remove-session"],
        };
        return entrupy_tokend::generate::run_with(request, &[sessions]);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let cmd = match command(cli.command) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("entrupy-tokenctl: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("entrupy-tokenctl: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let opts = ctl::Options { session: cli.session, json: cli.json };
    let code = runtime.block_on(ctl::run(opts, cmd));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The library's command for a parsed one; `login -` reads standard input here.
fn command(cmd: Cmd) -> Result<ctl::Command, String> {
    Ok(match cmd {
        Cmd::Status => ctl::Command::Status,
        Cmd::IsValid => ctl::Command::IsValid,
        Cmd::Token { min_valid } => ctl::Command::Token { min_valid },
        Cmd::Refresh => ctl::Command::Refresh,
        Cmd::Request => ctl::Command::Request,
        Cmd::Login { signed_request } if signed_request == "-" => {
            let stdin = std::io::stdin();
            if std::io::IsTerminal::is_terminal(&stdin) {
                eprintln!("entrupy-tokenctl: reading the signed request from standard input (end it with Ctrl-D)");
            }
            ctl::Command::Login(ctl::read_signed_request(stdin.lock())?)
        }
        Cmd::Login { signed_request } => ctl::Command::Login(signed_request),
        Cmd::Cleanup => ctl::Command::Cleanup,
        Cmd::Sessions { ids: false } => ctl::Command::Sessions,
        Cmd::Sessions { ids: true } => ctl::Command::SessionIds,
        Cmd::AddSession { id, user_id, email, first_name, last_name } => {
            ctl::Command::AddSession { id, user_id, email, first_name, last_name }
        }
        Cmd::RemoveSession { id } => ctl::Command::RemoveSession(id),
        Cmd::Watch => ctl::Command::Watch,
    })
}
