//! The `entrupy-sim` binary: runs a simulator until SIGTERM/SIGINT, for the demo script.
//! It prints one line, `entrupy-sim listening api_url=<url> backend_url=<url>`, once it
//! accepts connections (after writing the CA with `--tls --ca-out`), so a script can wait
//! for that line and parse the URLs from it. Faults are injected over `POST /_sim/fault`.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use entrupy_sim::{SimConfig, Simulator};

/// How to inject faults, for `--help` (what `control.rs` accepts).
const FAULTS: &str = r#"Endpoints:
  POST {api_url}/login   Entrupy's login (SPEC 4.2)
  POST {api_url}/sign    the app backend's signing (SPEC 4.1); backend_url points here

Fault injection, over HTTP on the same port (control requests are neither logged nor counted):
  POST /_sim/fault   queue a fault for the next requests to one endpoint, a JSON object:
      "endpoint": "login" | "sign"     (required)
      "count": N                       how many requests suffer it (default 1); faults queue
                                       per endpoint and apply in order
      and either an HTTP status:
      "status": 503, "retry_after": "5", "body": "{...}"   (retry_after and body optional)
      or "kind":
        "hang"       never answer (until the client gives up)
        "drop"       close the connection without an answer
        "malformed"  a 200 whose body is not JSON
        "oversized"  a 200 of about "bytes" bytes, chunked
        "trickle"    a "total"-byte body at "bytes_per_sec"
        "delay"      wait "ms" milliseconds, then answer normally
        "redirect"   a redirect to "location" ("status", default 302)
        "status"     as with "status" above
  POST /_sim/clear   drop every pending fault
  POST /_sim/pause   {"paused": true|false}: hold requests until released
  GET  /_sim/stats   the counters, the pending faults per endpoint, and whether paused

Example:
  curl -s -d '{"endpoint":"login","status":503,"count":2,"retry_after":"5"}' "$api_url/_sim/fault"
  curl -s -d '{"endpoint":"sign","kind":"hang"}' "$api_url/_sim/fault""#;

/// Simulator of Entrupy's login API and of an app backend that signs SDK authorization
/// requests.
#[derive(Debug, Parser)]
#[command(version, after_help = FAULTS)]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Lifetime of issued tokens (`30s`, `500ms`, `5m`, `1h`).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    token_lifetime: Duration,
    /// Successful logins per user in any 60 s window.
    #[arg(long, default_value_t = 5)]
    logins_per_minute: u32,
    /// Successful logins per user in any 24 h window.
    #[arg(long, default_value_t = 100)]
    logins_per_day: u32,
    /// How old a signed request may be at /login.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    signed_request_max_age: Duration,
    /// A bearer credential the backend accepts (repeatable); without any, all are accepted.
    #[arg(long = "credential", value_name = "TOKEN")]
    credentials: Vec<String>,
    /// Serve HTTPS with a freshly generated test CA.
    #[arg(long)]
    tls: bool,
    /// Where to write the test CA certificate (PEM) in TLS mode.
    #[arg(long, value_name = "PATH", requires = "tls")]
    ca_out: Option<PathBuf>,
    /// Do not log each request on stderr.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = SimConfig {
        token_lifetime: args.token_lifetime,
        logins_per_minute: args.logins_per_minute,
        logins_per_day: args.logins_per_day,
        accepted_credentials: (!args.credentials.is_empty()).then_some(args.credentials),
        signed_request_max_age: args.signed_request_max_age,
        tls: args.tls,
        port: args.port,
    };
    let sim = Simulator::start(cfg).await?;
    sim.set_verbose(!args.quiet);
    if let (Some(path), Some(pem)) = (&args.ca_out, sim.ca_pem()) {
        std::fs::write(path, pem).with_context(|| format!("cannot write the CA certificate to {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "entrupy-sim listening api_url={} backend_url={}", sim.api_url(), sim.backend_url())?;
    out.flush()?;
    drop(out);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    sim.shutdown();
    Ok(())
}
