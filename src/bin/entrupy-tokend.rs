//! `entrupy-tokend`: the daemon. Parses flags, loads the config, wires signals, runs
//! [`entrupy_tokend::daemon::run`] and maps its outcome to the exit codes of SPEC 2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
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
    /// Log filter, RUST_LOG syntax (RUST_LOG wins when set).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
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
        print_summary(&location, &cfg);
        return ExitCode::SUCCESS;
    }
    logging::init(&cli.log_level);
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
        let r = daemon::run(location, cfg, daemon::Controls { shutdown, reload: reload_rx }).await;
        signals.abort();
        r
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "entrupy-tokend stops");
            eprintln!("entrupy-tokend: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

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

fn print_summary(location: &config::ConfigLocation, cfg: &config::Config) {
    let exists = location.path.exists();
    println!(
        "config: {}{}",
        location.path.display(),
        if exists { "" } else { " (not present: no sessions configured yet)" }
    );
    match config::state_dir(cfg) {
        Ok(d) => println!("state_dir: {}", d.display()),
        Err(e) => println!("state_dir: unresolved ({e})"),
    }
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
    println!(
        "rate_limit: {} logins/minute, {} logins/day per unique_user_id",
        cfg.rate_limit.logins_per_minute, cfg.rate_limit.logins_per_day
    );
    println!("sessions: {}", cfg.sessions.len());
    for s in &cfg.sessions {
        let cred = cfg.credential_for(s).map(|c| c.describe()).unwrap_or_else(|| "none".to_owned());
        println!("  {} user {} <{}> credential {}", s.id, s.unique_user_id, s.email, cred);
    }
    println!("OK");
}
