//! `entrupy-bench`: the performance benchmark of issue 5. On a private `dbus-daemon`, with the
//! simulator in-process and the release `entrupy-tokend` as a child process, it measures
//! latency, throughput, idle cost, memory, scale, logins and the build figures, prints each
//! with the method that produced it, and writes `BENCHMARKS.md`.
//!
//! Times on a shared machine are noisy: every comparison is a ratio inside one run (the two
//! things compared interleaved or alternated), repeated, and the median is quoted.

mod env;
mod measure;
mod minimal;
mod report;
mod sections;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

/// Benchmark of entrupy-tokend (release build) against the bus's own limits.
#[derive(Debug, Parser)]
#[command(name = "entrupy-bench", about)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Sub>,
    /// Run only these sections (comma-separated). Default: all (`build` only without --quick).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Section>,
    /// Shorter runs (fewer calls, one repeat, shorter windows); figures are indicative only.
    #[arg(long)]
    quick: bool,
    /// Repeats of the latency and throughput measurements (default 3, 1 with --quick).
    #[arg(long)]
    repeat: Option<usize>,
    /// Sequential calls of each kind per latency repeat (default 20000, 5000 with --quick).
    #[arg(long)]
    calls: Option<usize>,
    /// Idle window in seconds (default 120, 60 with --quick; at least 60 for the figure).
    #[arg(long)]
    idle_secs: Option<u64>,
    /// Sessions for the scale section.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Seconds over which the scale section's refreshes are spread (default 180, 60 with --quick).
    #[arg(long)]
    spread: Option<u64>,
    /// The daemon binary (default: `entrupy-tokend` next to this binary).
    #[arg(long)]
    tokend: Option<PathBuf>,
    /// The independent `dbus-limits` tool, to cross-check latency and idle figures.
    #[arg(long, env = "DBUS_LIMITS")]
    dbus_limits: Option<PathBuf>,
    /// Seconds the calling script's `cargo build --release --workspace` took (reported).
    #[arg(long)]
    build_secs: Option<f64>,
    /// Where to write the report (default: BENCHMARKS.md in the workspace root).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print only; do not write the report.
    #[arg(long)]
    no_write: bool,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Internal: run the minimal reference service (started by the bench itself).
    #[command(hide = true)]
    MinimalService {
        #[arg(long)]
        address: String,
        #[arg(long, value_enum)]
        flavor: minimal::Flavor,
    },
}

/// A part of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Section {
    /// Figure 1: IsAuthorizationValid and Properties.Get(Valid) vs Peer.Ping.
    Latency,
    /// Figure 2: 8 clients, vs a minimal zbus service; also while a login hangs.
    Throughput,
    /// Figure 3 (and 4 with one session): wakeups and CPU while idle.
    Idle,
    /// Figure 4: the idle and scale sections, which report memory.
    Memory,
    /// Figure 5 (and 4 with many sessions): sessions loaded from state, refresh punctuality.
    Scale,
    /// Figure 6: one login per token cycle; 1,000 concurrent EnsureValid.
    Logins,
    /// Figure 7: binary size, start-up time with one session.
    Startup,
    /// Figure 7: a clean release build of the daemon, timed.
    Build,
}

/// Everything the sections need to know.
#[derive(Debug, Clone)]
pub struct Settings {
    pub quick: bool,
    pub repeat: usize,
    pub calls: usize,
    pub warmup: usize,
    pub clients: usize,
    pub tput_secs: f64,
    pub idle_secs: u64,
    pub sessions: usize,
    pub spread: u64,
    pub tokend: PathBuf,
    pub dbus_limits: Option<PathBuf>,
    pub build_secs: Option<f64>,
    pub workspace: PathBuf,
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("entrupy-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Sub::MinimalService { address, flavor }) = &cli.cmd {
        return minimal::serve(address, *flavor);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default();
    let tokend = match &cli.tokend {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("entrupy-tokend"))
            .context("cannot find the directory of entrupy-bench")?,
    };
    if !tokend.is_file() {
        anyhow::bail!(
            "{} does not exist: run `cargo build --release --workspace` (scripts/bench does)",
            tokend.display()
        );
    }
    let quick = cli.quick;
    let settings = Settings {
        quick,
        repeat: cli.repeat.unwrap_or(if quick { 1 } else { 3 }).max(1),
        calls: cli.calls.unwrap_or(if quick { 5_000 } else { 20_000 }),
        warmup: if quick { 500 } else { 1_000 },
        clients: 8,
        tput_secs: 5.0,
        idle_secs: cli.idle_secs.unwrap_or(if quick { 60 } else { 120 }),
        sessions: cli.sessions,
        spread: cli.spread.unwrap_or(if quick { 60 } else { 180 }),
        tokend,
        dbus_limits: cli.dbus_limits.clone(),
        build_secs: cli.build_secs,
        workspace: workspace.clone(),
    };
    let mut sections: Vec<Section> = if cli.only.is_empty() {
        let mut all = vec![
            Section::Startup,
            Section::Latency,
            Section::Throughput,
            Section::Idle,
            Section::Logins,
            Section::Scale,
        ];
        if !quick {
            all.push(Section::Build);
        }
        all
    } else {
        cli.only.clone()
    };
    if let Some(i) = sections.iter().position(|s| *s == Section::Memory) {
        sections.remove(i);
        for s in [Section::Idle, Section::Scale] {
            if !sections.contains(&s) {
                sections.push(s);
            }
        }
    }
    let mut rep = report::Report::new(&settings, std::env::args().collect());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(async {
        for s in &sections {
            println!("\n=== {s:?} ===");
            let r = match s {
                Section::Latency => sections::latency(&settings, &mut rep).await,
                Section::Throughput => sections::throughput(&settings, &mut rep).await,
                Section::Idle => sections::idle(&settings, &mut rep).await,
                Section::Scale => sections::scale(&settings, &mut rep).await,
                Section::Logins => sections::logins(&settings, &mut rep).await,
                Section::Startup => sections::startup(&settings, &mut rep).await,
                Section::Build => sections::build(&settings, &mut rep).await,
                Section::Memory => Ok(()),
            };
            if let Err(e) = r {
                eprintln!("section {s:?} failed: {e:#}");
                rep.failed(&format!("{s:?}"), &format!("{e:#}"));
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result?;
    let text = rep.render();
    println!("\n{}", rep.table());
    if !cli.no_write {
        let out = cli.out.clone().unwrap_or_else(|| workspace.join("BENCHMARKS.md"));
        std::fs::write(&out, text).with_context(|| format!("cannot write {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
