//! `entrupy-tokend`: the daemon. Parses flags, loads the config, wires signals, runs
//! [`entrupy_tokend::daemon::run`] and maps its outcome to the exit codes of SPEC 2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use entrupy_tokend::{config, daemon, logging};
use tokio_util::sync::CancellationToken;

/// Keeps a user's Entrupy SDK authorization token valid and serves it over D-Bus.
#[derive(Debug, Parser)]
#[command(name = "entrupy-tokend", version, about)]
struct Cli {
    /// Config file (default: $ENTRUPY_TOKEND_CONFIG, else $XDG_CONFIG_HOME/entrupy-tokend/config.toml).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the config, print a summary, and exit 0 (valid) or 78 (invalid).
    #[arg(long)]
    check_config: bool,
    /// Log level (off, error, warn, info, debug, trace) or RUST_LOG-style directives that each
    /// name a level, such as info,entrupy_tokend=debug (RUST_LOG wins when set).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    if entrupy_tokend::generate::requested() {
        return entrupy_tokend::generate::run(entrupy_tokend::generate::Request {
            command: Cli::command(),
            man_extra: MAN_EXTRA,
            subcommand_pages: false,
            usage_exit: 1,
        });
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Err(e) = logging::check_level(&cli.log_level) {
        eprintln!("entrupy-tokend: invalid --log-level: {e}");
        return ExitCode::from(EX_CONFIG);
    }
    let location = match config::locate(cli.config.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("entrupy-tokend: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let cfg = match config::load(&location) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("entrupy-tokend: invalid configuration: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if cli.check_config {
        // The daemon's start makes the same check; here it also creates the directory.
        let state_dir = match config::check_state_dir(&cfg) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("entrupy-tokend: invalid configuration: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        };
        print_summary(&location, &cfg, &state_dir);
        return ExitCode::SUCCESS;
    }
    logging::init(&cli.log_level);
    // No core file can hold a token, and other processes of the user cannot ptrace us.
    if let Err(e) = entrupy_tokend::sandbox::make_non_dumpable() {
        tracing::warn!(error = %e, "cannot mark the process non-dumpable");
    }
    serve(location, cfg)
}

/// Runs the daemon until SIGTERM or SIGINT; the exit code of SPEC 2.
fn serve(location: config::ConfigLocation, cfg: config::Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("entrupy-tokend: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
        let signals = spawn_signal_handlers(shutdown.clone(), reload_tx)?;
        let r = daemon::run(location, cfg, daemon::Controls::new(shutdown, reload_rx)).await;
        signals.abort();
        r
    });
    // The process exits now, and the OS takes its memory back at once. Freeing it first (the
    // runtime with its tasks and the bus objects, the sessions) reads every page of it,
    // which after an idle hour are cold: with 10,000 sessions that made most of a shutdown.
    std::mem::forget(runtime);
    match result {
        Ok(stopped) => {
            std::mem::forget(stopped);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("entrupy-tokend: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

/// Sections of the man page that clap does not know.
const MAN_EXTRA: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
clean shutdown (SIGTERM or SIGINT), or a valid configuration with \fB\-\-check\-config\fR
.TP
\fB1\fR
any other error
.TP
\fB69\fR
the session bus cannot be reached, or the name com.entrupy.TokenDaemon1 is owned by another instance
.TP
\fB78\fR
invalid configuration; the message names the file, the key and, for syntax errors, line and column
.SH SIGNALS
SIGTERM and SIGINT stop the daemon cleanly; SIGHUP reloads the configuration.
.SH ENVIRONMENT
.TP
\fBENTRUPY_TOKEND_CONFIG\fR
config file when \fB\-\-config\fR is not given
.TP
\fBDBUS_SESSION_BUS_ADDRESS\fR
the session bus
.TP
\fBSTATE_DIRECTORY\fR, \fBXDG_STATE_HOME\fR, \fBXDG_CONFIG_HOME\fR
where state and config are looked for
.TP
\fBCREDENTIALS_DIRECTORY\fR
where \fIcredential:NAME\fR paths are read from (systemd's LoadCredential=)
.TP
\fBRUST_LOG\fR
log filter; wins over \fB\-\-log\-level\fR
.TP
\fBSSL_CERT_FILE\fR
an extra CA bundle
.SH FILES
.TP
\fI$XDG_CONFIG_HOME/entrupy\-tokend/config.toml\fR
the default config file (an example is in /usr/share/doc/entrupy\-tokend/config.toml)
.TP
\fI$XDG_STATE_HOME/entrupy\-tokend/\fR
the state directory (mode 0700; files 0600)
.TP
\fI/usr/share/dbus\-1/interfaces/com.entrupy.TokenDaemon1.xml\fR
the D\-Bus API, documented
.SH "SEE ALSO"
\fBentrupy\-tokenctl\fR(1), \fBsystemctl\fR(1), \fBjournalctl\fR(1), \fBbusctl\fR(1)
"#;

/// SIGTERM/SIGINT cancel `shutdown`; SIGHUP asks for a reload.
fn spawn_signal_handlers(
    shutdown: CancellationToken,
    reload: tokio::sync::mpsc::UnboundedSender<()>,
) -> Result<tokio::task::JoinHandle<()>, daemon::RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let err = |e: std::io::Error| daemon::RunError::Other(format!("cannot install signal handlers: {e}"));
    let mut term = signal(SignalKind::terminate()).map_err(err)?;
    let mut int = signal(SignalKind::interrupt()).map_err(err)?;
    let mut hup = signal(SignalKind::hangup()).map_err(err)?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT"); shutdown.cancel(); }
                _ = hup.recv() => { tracing::info!("SIGHUP: reloading the configuration"); let _ = reload.send(()); }
            }
        }
    }))
}

fn print_summary(location: &config::ConfigLocation, cfg: &config::Config, state_dir: &std::path::Path) {
    let exists = location.path.exists();
    println!(
        "config: {}{}",
        location.path.display(),
        if exists { "" } else { " (not present: no sessions configured yet)" }
    );
    println!("state_dir: {}", state_dir.display());
    println!("entrupy.api_url: {}", cfg.api_url);
    match &cfg.backend {
        Some(b) => println!(
            "backend.url: {}{}",
            b.url,
            b.token_file.as_ref().map(|t| format!(" (credential {})", t.describe())).unwrap_or_default()
        ),
        None => println!("backend: none (sessions log in only with LoginWithSignedRequest)"),
    }
    println!("http timeout: {}", humantime::format_duration(cfg.http_timeout));
    let r = &cfg.refresh;
    println!(
        "refresh: margin {}, jitter {}, check_schedule {:?}, backoff {}..{}",
        humantime::format_duration(r.margin),
        humantime::format_duration(r.jitter),
        r.check_schedule,
        humantime::format_duration(r.backoff_initial),
        humantime::format_duration(r.backoff_max)
    );
    let rl = &cfg.rate_limit;
    println!(
        "rate_limit: {} logins/minute, {} logins/day per unique_user_id, {} of them reserved for refreshes",
        rl.logins_per_minute, rl.logins_per_day, rl.reserved_for_refresh
    );
    println!("sandbox: {}", if cfg.sandbox.enabled { "enabled (Landlock)" } else { "disabled" });
    println!("sessions: {}", cfg.sessions.len());
    for s in &cfg.sessions {
        let cred = cfg.credential_for(s).map(|c| c.describe()).unwrap_or_else(|| "none".to_owned());
        println!("  {} user {} <{}> credential {}", s.id, s.profile.unique_user_id, s.profile.email, cred);
    }
    println!("OK");
}
