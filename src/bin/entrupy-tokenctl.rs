//! `entrupy-tokenctl`: the command-line client over D-Bus. Parses arguments and runs
//! [`entrupy_tokend::ctl::run`].

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use entrupy_tokend::ctl;

/// Ask entrupy-tokend about a session's Entrupy authorization.
#[derive(Debug, Parser)]
#[command(name = "entrupy-tokenctl", version, about)]
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
    /// Log in with a signed request.
    Login {
        /// The signed authorization request.
        signed_request: String,
    },
    /// Drop the token and stop refreshing.
    Cleanup,
    /// List sessions.
    Sessions,
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
    Watch,
}

/// Sections of the main man page that clap does not know.
const MAN_EXTRA: &str = r#".SH "EXIT STATUS"
0 on success. \fBis\-valid\fR exits 0 when the token is valid, 1 when it is not, 2 when the daemon could not be asked. Every other command exits non\-zero after one line on stderr when the call fails (a D\-Bus error such as com.entrupy.TokenDaemon1.Error.NotAuthorized); 2 for a usage error.
.SH ENVIRONMENT
.TP
\fBDBUS_SESSION_BUS_ADDRESS\fR
the session bus the daemon is on
.SH "SEE ALSO"
\fBentrupy\-tokend\fR(1), \fBbusctl\fR(1), \fBgdbus\fR(1)
"#;

fn main() -> ExitCode {
    if entrupy_tokend::generate::requested() {
        return entrupy_tokend::generate::run(entrupy_tokend::generate::Request {
            command: Cli::command(),
            man_extra: MAN_EXTRA,
            subcommand_pages: true,
            usage_exit: 2,
        });
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let cmd = match cli.command {
        Cmd::Status => ctl::Command::Status,
        Cmd::IsValid => ctl::Command::IsValid,
        Cmd::Token { min_valid } => ctl::Command::Token { min_valid },
        Cmd::Refresh => ctl::Command::Refresh,
        Cmd::Request => ctl::Command::Request,
        Cmd::Login { signed_request } => ctl::Command::Login(signed_request),
        Cmd::Cleanup => ctl::Command::Cleanup,
        Cmd::Sessions => ctl::Command::Sessions,
        Cmd::AddSession { id, user_id, email, first_name, last_name } => {
            ctl::Command::AddSession { id, user_id, email, first_name, last_name }
        }
        Cmd::RemoveSession { id } => ctl::Command::RemoveSession(id),
        Cmd::Watch => ctl::Command::Watch,
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
