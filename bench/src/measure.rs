//! Measuring tools: D-Bus calls timed in the client, percentiles, and a process's context
//! switches, CPU time and memory from `/proc`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use zbus::Connection;
use zbus::message::Message;

/// One kind of call.
#[derive(Debug, Clone)]
pub enum Op {
    /// `org.freedesktop.DBus.Peer.Ping`, answered by zbus itself.
    Ping,
    /// A method without arguments.
    Call { iface: String, method: String },
    /// `org.freedesktop.DBus.Properties.Get(iface, prop)`.
    Get { iface: String, prop: String },
}

/// A call to one object of one service.
#[derive(Debug, Clone)]
pub struct Target {
    pub dest: String,
    pub path: String,
    pub op: Op,
}

impl Target {
    pub fn new(dest: &str, path: &str, op: Op) -> Target {
        Target { dest: dest.to_owned(), path: path.to_owned(), op }
    }

    pub async fn run(&self, c: &Connection) -> zbus::Result<Message> {
        let (dest, path) = (Some(self.dest.as_str()), self.path.as_str());
        match &self.op {
            Op::Ping => c.call_method(dest, path, Some("org.freedesktop.DBus.Peer"), "Ping", &()).await,
            Op::Call { iface, method } => c.call_method(dest, path, Some(iface.as_str()), method.as_str(), &()).await,
            Op::Get { iface, prop } => {
                c.call_method(dest, path, Some("org.freedesktop.DBus.Properties"), "Get", &(iface, prop)).await
            }
        }
    }

    /// Latency of one call in nanoseconds.
    pub async fn timed(&self, c: &Connection) -> zbus::Result<u64> {
        let t = Instant::now();
        self.run(c).await?;
        Ok(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

/// `n` rounds of one call to each target in turn, after `warmup` rounds, on one connection,
/// so that machine noise hits every target alike. Latencies in ns, one vector per target.
pub async fn interleaved(c: &Connection, targets: &[Target], warmup: usize, n: usize) -> Result<Vec<Vec<u64>>> {
    for _ in 0..warmup {
        for t in targets {
            t.run(c).await.with_context(|| format!("warm-up call {t:?}"))?;
        }
    }
    let mut lat = vec![Vec::with_capacity(n); targets.len()];
    for _ in 0..n {
        for (t, v) in targets.iter().zip(&mut lat) {
            v.push(t.timed(c).await.with_context(|| format!("call {t:?}"))?);
        }
    }
    Ok(lat)
}

/// The `p`-quantile (0..=1) of nanosecond samples, in microseconds (nearest rank).
pub fn pct_us(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1] as f64 / 1e3
}

/// The `p`-quantile of floats (nearest rank).
pub fn pct_f(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The median of floats.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    pct_f(&mut v, 0.5)
}

/// What `clients` concurrent clients, each on its own connection calling `target` in a loop,
/// reached in `secs`.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub calls_per_s: f64,
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

pub async fn throughput(address: &str, target: &Target, clients: usize, secs: f64) -> Result<Throughput> {
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let c = crate::env::connect(address).await?;
        let (b, t) = (barrier.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..200 {
                t.run(&c).await?;
            }
            b.wait().await;
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let (mut lat, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < end {
                match t.timed(&c).await {
                    Ok(ns) => lat.push(ns),
                    Err(_) => errors += 1,
                }
            }
            Ok::<_, zbus::Error>((lat, errors))
        }));
    }
    barrier.wait().await;
    let t0 = Instant::now();
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (lat, e) = t.await??;
        all.extend(lat);
        errors += e;
    }
    let wall = t0.elapsed().as_secs_f64();
    let calls_per_s = all.len() as f64 / wall;
    Ok(Throughput { calls_per_s, errors, p50_us: pct_us(&mut all, 0.5), p99_us: pct_us(&mut all, 0.99) })
}

/// A process's counters at one moment.
#[derive(Debug, Clone)]
pub struct ProcSnap {
    /// Per thread: (voluntary, involuntary context switches, schedstat run time in ns).
    pub tasks: HashMap<u32, (u64, u64, u64)>,
    /// utime + stime in clock ticks (includes threads that exited).
    pub ticks: u64,
    pub main_ctx: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub at: Instant,
}

fn field(text: &str, key: &str) -> u64 {
    let parse = |l: &str| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok();
    text.lines().find_map(parse).unwrap_or(0)
}

pub fn snap(pid: u32) -> Result<ProcSnap> {
    let dir = format!("/proc/{pid}");
    let status = std::fs::read_to_string(format!("{dir}/status")).with_context(|| format!("pid {pid}"))?;
    let stat = std::fs::read_to_string(format!("{dir}/stat"))?;
    let f: Vec<&str> =
        stat.rsplit_once(')').ok_or_else(|| anyhow!("bad /proc/PID/stat"))?.1.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    let ticks = num(11) + num(12);
    let mut tasks = HashMap::new();
    for e in std::fs::read_dir(format!("{dir}/task"))? {
        let Some(tid) = e?.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let st = std::fs::read_to_string(format!("{dir}/task/{tid}/status"));
        let ss = std::fs::read_to_string(format!("{dir}/task/{tid}/schedstat"));
        let (Ok(st), Ok(ss)) = (st, ss) else { continue };
        let ns = ss.split_whitespace().next().and_then(|x| x.parse().ok()).unwrap_or(0);
        tasks.insert(tid, (field(&st, "voluntary_ctxt_switches"), field(&st, "nonvoluntary_ctxt_switches"), ns));
    }
    let main_ctx = field(&status, "voluntary_ctxt_switches") + field(&status, "nonvoluntary_ctxt_switches");
    Ok(ProcSnap {
        tasks,
        ticks,
        main_ctx,
        rss_kib: field(&status, "VmRSS"),
        hwm_kib: field(&status, "VmHWM"),
        at: Instant::now(),
    })
}

/// The difference of two snapshots, per minute.
#[derive(Debug, Clone, Copy)]
pub struct Idle {
    pub secs: f64,
    pub wakeups_per_min: f64,
    pub voluntary_per_min: f64,
    pub involuntary_per_min: f64,
    pub main_per_min: f64,
    pub cpu_ms_per_min_sched: f64,
    pub cpu_ms_per_min_ticks: f64,
    pub threads: (usize, usize),
}

pub fn idle(before: &ProcSnap, after: &ProcSnap) -> Idle {
    let secs = after.at.duration_since(before.at).as_secs_f64();
    let per_min = |x: f64| x * 60.0 / secs;
    let (mut vol, mut inv, mut ns) = (0u64, 0u64, 0u64);
    for (tid, &(v, i, n)) in &after.tasks {
        let (v0, i0, n0) = before.tasks.get(tid).copied().unwrap_or_default();
        vol += v.saturating_sub(v0);
        inv += i.saturating_sub(i0);
        ns += n.saturating_sub(n0);
    }
    let tick_ms = 1000.0 / clk_tck();
    Idle {
        secs,
        wakeups_per_min: per_min((vol + inv) as f64),
        voluntary_per_min: per_min(vol as f64),
        involuntary_per_min: per_min(inv as f64),
        main_per_min: per_min(after.main_ctx.saturating_sub(before.main_ctx) as f64),
        cpu_ms_per_min_sched: per_min(ns as f64 / 1e6),
        cpu_ms_per_min_ticks: per_min(after.ticks.saturating_sub(before.ticks) as f64 * tick_ms),
        threads: (before.tasks.len(), after.tasks.len()),
    }
}

/// Clock ticks per second (`_SC_CLK_TCK`).
pub fn clk_tck() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// CPU seconds of a process (utime + stime, all threads, exited ones included).
pub fn cpu_secs(s: &ProcSnap) -> f64 {
    s.ticks as f64 / clk_tck()
}

/// Resident memory split from `/proc/PID/smaps_rollup`: (anonymous KiB, file-backed KiB).
pub fn rss_split(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let (rss, anon) = (field(&text, "Rss"), field(&text, "Anonymous"));
    (anon, rss.saturating_sub(anon))
}
