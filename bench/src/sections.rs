//! The benchmark's sections, one per figure of issue 5. Each starts its own bus, simulator
//! and daemon, so that no section inherits another's connections, caches or timers.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use entrupy_sim::{Endpoint, Fault, SimConfig};
use entrupy_tokend::names::{self, BUS_NAME, SESSION_INTERFACE};
use futures_util::StreamExt;
use zbus::Connection;

use crate::Settings;
use crate::env::{self, Cfg, Env, unix_now, write_private};
use crate::measure::{self, Op, Target, median, pct_f, pct_us, snap};
use crate::minimal::{self, Flavor, MinimalService};
use crate::report::Report;

const MIB: f64 = 1024.0;

fn call(iface: &str, method: &str) -> Op {
    Op::Call { iface: iface.to_owned(), method: method.to_owned() }
}

fn get(iface: &str, prop: &str) -> Op {
    Op::Get { iface: iface.to_owned(), prop: prop.to_owned() }
}

/// A session's `IsAuthorizationValid`.
async fn is_valid(c: &Connection, id: &str) -> Result<bool> {
    let t = Target::new(BUS_NAME, &names::session_path(id), call(SESSION_INTERFACE, "IsAuthorizationValid"));
    Ok(t.run(c).await?.body().deserialize::<bool>()?)
}

/// A session's `State` property.
async fn state(c: &Connection, id: &str) -> Result<String> {
    let t = Target::new(BUS_NAME, &names::session_path(id), get(SESSION_INTERFACE, "State"));
    let v: zbus::OwnedVariant = t.run(c).await?.body().deserialize()?;
    Ok(String::try_from(v)?)
}

/// Polls until `f` holds, or fails after `timeout` with `what`.
async fn until<F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + timeout;
    while !f().await {
        if Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

async fn wait_valid(env: &Env, id: &str) -> Result<()> {
    until(Duration::from_secs(30), "a valid token", || async { is_valid(&env.conn, id).await.unwrap_or(false) }).await
}

/// Runs the `dbus-limits` tool and returns its standard output.
async fn run_tool(tool: PathBuf, args: Vec<String>) -> Result<String> {
    let shown = format!("{} {}", tool.display(), args.join(" "));
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(&tool).args(&args).output()).await??;
    if !out.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The number after `key` in the first line of `text` that starts with `key`.
fn after(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|l| l.trim_start().strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn fmt_list(v: &[f64], digits: usize) -> String {
    v.iter().map(|x| format!("{x:.digits$}")).collect::<Vec<_>>().join(", ")
}

// ------------------------------------------------------------------------------------------
// 1. Latency

pub async fn latency(s: &Settings, rep: &mut Report) -> Result<()> {
    let env = Env::new(SimConfig::default(), &s.tokend).await?;
    env.write_config(&Cfg { timeout: Some("8s".into()), ..Cfg::one_session() })?;
    let (mut d, _) = env.start().await?;
    wait_valid(&env, "default").await?;
    let _m = MinimalService::start(&env.bus.address, Flavor::Multi)?;
    let sp = names::session_path("default");
    let targets = vec![
        Target::new(BUS_NAME, &sp, Op::Ping),
        Target::new(BUS_NAME, &sp, call(SESSION_INTERFACE, "IsAuthorizationValid")),
        Target::new(BUS_NAME, &sp, get(SESSION_INTERFACE, "Valid")),
        Target::new(minimal::NAME, minimal::PATH, Op::Ping),
        Target::new(minimal::NAME, minimal::PATH, call(minimal::IFACE, "IsValid")),
        Target::new(minimal::NAME, minimal::PATH, get(minimal::IFACE, "Valid")),
    ];
    let c = env::connect(&env.bus.address).await?;
    let mut r: [Vec<f64>; 8] = Default::default();
    let mut ping = (Vec::new(), Vec::new());
    for i in 0..s.repeat {
        let mut lat = measure::interleaved(&c, &targets, s.warmup, s.calls).await?;
        let q: Vec<(f64, f64)> = lat.iter_mut().map(|v| (pct_us(v, 0.5), pct_us(v, 0.99))).collect();
        rep.detail(format!(
            "latency repeat {}: {} calls each, p50/p99 us: daemon Ping {:.1}/{:.1}, IsAuthorizationValid {:.1}/{:.1}, \
             Get(Valid) {:.1}/{:.1}; minimal service Ping {:.1}/{:.1}, IsValid {:.1}/{:.1}, Get(Valid) {:.1}/{:.1}; loadavg {}",
            i + 1,
            s.calls,
            q[0].0,
            q[0].1,
            q[1].0,
            q[1].1,
            q[2].0,
            q[2].1,
            q[3].0,
            q[3].1,
            q[4].0,
            q[4].1,
            q[5].0,
            q[5].1,
            loadavg()
        ));
        ping.0.push(q[0].0);
        ping.1.push(q[0].1);
        let pairs = [(1, 0), (2, 0), (4, 3), (5, 3)];
        for (k, (m, p)) in pairs.iter().enumerate() {
            r[2 * k].push(q[*m].0 / q[*p].0);
            r[2 * k + 1].push(q[*m].1 / q[*p].1);
        }
    }
    let method = format!(
        "one client connection; sequential calls interleaved call by call (daemon Ping, IsAuthorizationValid, \
         Get(Valid), then Ping/IsValid/Get on a minimal zbus service), {} rounds after {} warm-up rounds; \
         latency timed in the client; ratio of percentiles; median of {} repeat(s)",
        s.calls, s.warmup, s.repeat
    );
    let m = |v: &Vec<f64>| median(v);
    let abs = format!("Ping p50 {:.0} us, p99 {:.0} us", m(&ping.0), m(&ping.1));
    rep.figure(
        "1a",
        "IsAuthorizationValid p50 / Peer.Ping p50",
        "<= 1.10",
        format!("{:.3} (repeats: {}; {abs})", m(&r[0]), fmt_list(&r[0], 3)),
        Some(m(&r[0]) <= 1.10),
        &method,
    );
    rep.figure(
        "1b",
        "IsAuthorizationValid p99 / Peer.Ping p99",
        "<= 1.30",
        format!("{:.3} (repeats: {})", m(&r[1]), fmt_list(&r[1], 3)),
        Some(m(&r[1]) <= 1.30),
        "as 1a",
    );
    rep.figure(
        "1c",
        "Properties.Get(Valid) p50 / Peer.Ping p50",
        "<= 1.10",
        format!("{:.3} (repeats: {})", m(&r[2]), fmt_list(&r[2], 3)),
        Some(m(&r[2]) <= 1.10),
        "as 1a",
    );
    rep.figure(
        "1d",
        "Properties.Get(Valid) p99 / Peer.Ping p99",
        "<= 1.30",
        format!("{:.3} (repeats: {})", m(&r[3]), fmt_list(&r[3], 3)),
        Some(m(&r[3]) <= 1.30),
        "as 1a",
    );
    rep.figure(
        "1e",
        "reference: minimal zbus service, IsValid and Get(Valid) / its Ping",
        "-",
        format!("IsValid p50 {:.3} p99 {:.3}; Get p50 {:.3} p99 {:.3}", m(&r[4]), m(&r[5]), m(&r[6]), m(&r[7])),
        None,
        "as 1a, same run",
    );
    if let Some(tool) = &s.dbus_limits {
        let args = [
            "--address",
            &env.bus.address,
            "target",
            "--dest",
            BUS_NAME,
            "--path",
            &sp,
            "--iface",
            SESSION_INTERFACE,
            "--method",
            "IsAuthorizationValid",
            "-n",
            &s.calls.to_string(),
            "--warmup",
            &s.warmup.to_string(),
        ];
        let out = run_tool(tool.clone(), args.iter().map(|a| a.to_string()).collect()).await?;
        for l in out.lines() {
            rep.detail(format!("dbus-limits target: {l}"));
        }
        let p50 = after(&out, "ratio p50=").unwrap_or(f64::NAN);
        let p99 = out.lines().find_map(|l| l.split("p99=").nth(1)?.trim().parse::<f64>().ok()).unwrap_or(f64::NAN);
        rep.figure(
            "1x",
            "cross-check (dbus-limits target): IsAuthorizationValid / Ping",
            "p50 <= 1.10, p99 <= 1.30",
            format!("p50 {p50:.2}, p99 {p99:.2}"),
            Some(p50 <= 1.10 && p99 <= 1.30),
            &format!("the shared tool dbus-limits `target` on the same daemon and bus, {} pairs", s.calls),
        );
    }
    d.stop();
    Ok(())
}

// ------------------------------------------------------------------------------------------
// 2. Throughput

pub async fn throughput(s: &Settings, rep: &mut Report) -> Result<()> {
    let env = Env::new(SimConfig::default(), &s.tokend).await?;
    env.write_config(&Cfg { timeout: Some("8s".into()), ..Cfg::one_session() })?;
    let (mut d, _) = env.start().await?;
    wait_valid(&env, "default").await?;
    let addr = env.bus.address.clone();
    let _mm = MinimalService::start(&addr, Flavor::Multi)?;
    let _mc = MinimalService::start(&addr, Flavor::Current)?;
    let sp = names::session_path("default");
    let dt = Target::new(BUS_NAME, &sp, call(SESSION_INTERFACE, "IsAuthorizationValid"));
    let mt = Target::new(minimal::NAME, minimal::PATH, call(minimal::IFACE, "IsValid"));
    let ct = Target::new(minimal::NAME_CURRENT, minimal::PATH, call(minimal::IFACE, "IsValid"));
    let (mut ratio, mut ratio_hang, mut ratio_cur) = (Vec::new(), Vec::new(), Vec::new());
    let (mut errors, mut errors_hang) = (0, 0);
    let (mut daemon_rates, mut min_rates) = (Vec::new(), Vec::new());
    for i in 0..s.repeat {
        let s0 = snap(_mm.pid())?;
        let a = measure::throughput(&addr, &mt, s.clients, s.tput_secs).await?;
        let s1 = snap(_mm.pid())?;
        let d0 = snap(d.pid)?;
        let b = measure::throughput(&addr, &dt, s.clients, s.tput_secs).await?;
        let d1 = snap(d.pid)?;
        let c0 = snap(_mc.pid())?;
        let c = measure::throughput(&addr, &ct, s.clients, s.tput_secs).await?;
        let c1 = snap(_mc.pid())?;
        // Service CPU per answered call (schedstat of all threads), the cost behind the rate.
        let per_call = |x: &measure::ProcSnap, y: &measure::ProcSnap, t: &measure::Throughput| {
            measure::idle(x, y).cpu_ms_per_min_sched / 60.0 * y.at.duration_since(x.at).as_secs_f64() * 1e3
                / (t.calls_per_s * s.tput_secs)
        };
        rep.detail(format!(
            "throughput repeat {}: service CPU per call: minimal(multi) {:.1} us, daemon {:.1} us, minimal(current) {:.1} us",
            i + 1,
            per_call(&s0, &s1, &a),
            per_call(&d0, &d1, &b),
            per_call(&c0, &c1, &c)
        ));
        // A login that hangs upstream, with a Refresh waiting on it.
        let before = env.sim.counters().login_requests;
        env.sim.push_fault(Endpoint::Login, Fault::Hang, 1);
        let rc = env::connect(&addr).await?;
        let refresh = Target::new(BUS_NAME, &sp, call(SESSION_INTERFACE, "Refresh"));
        let pending = tokio::spawn(async move { refresh.run(&rc).await.map(|_| ()) });
        until(Duration::from_secs(10), "the login to hang upstream", || async {
            env.sim.counters().login_requests > before
        })
        .await?;
        let st0 = state(&env.conn, "default").await?;
        let h = measure::throughput(&addr, &dt, s.clients, s.tput_secs).await?;
        let st1 = state(&env.conn, "default").await?;
        let refresh_result = pending.await?;
        rep.detail(format!(
            "throughput repeat {}: minimal(multi-thread) {:.0}/s p50 {:.0} us; daemon {:.0}/s p50 {:.0} us p99 {:.0} us, {} errors; \
             minimal(current-thread) {:.0}/s; daemon during hung login (State {st0} -> {st1}) {:.0}/s p50 {:.0} us, \
             {} errors; the hung Refresh ended with {}; loadavg {}",
            i + 1,
            a.calls_per_s,
            a.p50_us,
            b.calls_per_s,
            b.p50_us,
            b.p99_us,
            b.errors,
            c.calls_per_s,
            h.calls_per_s,
            h.p50_us,
            h.errors,
            match &refresh_result {
                Ok(()) => "success".to_owned(),
                Err(e) => entrupy_tokend::client::short_error_name(e).unwrap_or_else(|| e.to_string()),
            },
            loadavg()
        ));
        if st0 != "refreshing" || st1 != "refreshing" {
            rep.detail(format!("warning: the session was not refreshing throughout repeat {} ({st0}, {st1})", i + 1));
        }
        ratio.push(b.calls_per_s / a.calls_per_s);
        ratio_hang.push(h.calls_per_s / a.calls_per_s);
        ratio_cur.push(b.calls_per_s / c.calls_per_s);
        daemon_rates.push(b.calls_per_s);
        min_rates.push(a.calls_per_s);
        errors += b.errors;
        errors_hang += h.errors;
        // Let the session settle (its failed Refresh leaves the schedule as it was).
        until(Duration::from_secs(20), "the session to be valid again", || async {
            state(&env.conn, "default").await.map(|s| s == "valid").unwrap_or(false)
        })
        .await?;
    }
    let method = format!(
        "{} clients, each on its own connection calling in a loop for {} s (after 200 warm-up calls), \
         alternated in one run: minimal zbus service (multi-thread tokio, IsValid returning a stored bool, own \
         bus name, own process), daemon IsAuthorizationValid, minimal service on a current-thread runtime, daemon \
         during a hung login; calls/s = completed calls / wall time; median of {} repeat(s)",
        s.clients, s.tput_secs, s.repeat
    );
    let r = median(&ratio);
    rep.figure(
        "2a",
        "throughput: daemon / minimal zbus service",
        ">= 0.90, no error",
        format!(
            "{r:.3} ({:.0} vs {:.0} calls/s; repeats {}), {errors} errors",
            median(&daemon_rates),
            median(&min_rates),
            fmt_list(&ratio, 3)
        ),
        Some(r >= 0.90 && errors == 0),
        &method,
    );
    let rh = median(&ratio_hang);
    rep.figure(
        "2b",
        "throughput while a login hangs upstream (Fault::Hang + Refresh in flight) / minimal",
        ">= 0.90, no error",
        format!("{rh:.3} (repeats {}), {errors_hang} errors", fmt_list(&ratio_hang, 3)),
        Some(rh >= 0.90 && errors_hang == 0),
        "as 2a; the simulator holds /login open (Fault::Hang) while a Refresh waits on it; State checked `refreshing` before and after",
    );
    rep.figure(
        "2c",
        "reference: daemon / minimal service on a current-thread runtime",
        "-",
        format!("{:.3} (repeats {})", median(&ratio_cur), fmt_list(&ratio_cur, 3)),
        None,
        "as 2a, same run",
    );
    d.stop();
    punctuality_under_load(s, rep).await
}

/// Refresh punctuality while clients call as fast as they can (the loop serves due deadlines
/// before queued calls): a session refreshing every 3 s while 8 connections call
/// IsAuthorizationValid in a tight loop.
async fn punctuality_under_load(s: &Settings, rep: &mut Report) -> Result<()> {
    let (lifetime, margin) = (4.0, 1.0);
    let sim = SimConfig {
        token_lifetime: Duration::from_secs_f64(lifetime),
        logins_per_minute: 1000,
        logins_per_day: 100_000,
        ..Default::default()
    };
    let env = Env::new(sim, &s.tokend).await?;
    env.write_config(&Cfg {
        refresh: Some(format!("margin = \"{margin}s\"\njitter = \"0s\"")),
        rate: Some((1000, 100_000)),
        ..Cfg::one_session()
    })?;
    let (mut d, _) = env.start().await?;
    wait_valid(&env, "default").await?;
    let secs = if s.quick { 10.0 } else { 30.0 };
    let sp = names::session_path("default");
    let dt = Target::new(BUS_NAME, &sp, call(SESSION_INTERFACE, "IsAuthorizationValid"));
    let (w0, clients) = (unix_now(), 8);
    let load = measure::throughput(&env.bus.address, &dt, clients, secs).await?;
    let w1 = unix_now();
    let tokens = env.sim.issued_tokens();
    let signs = env.sim.requests_to(Endpoint::Sign);
    d.stop();
    // The i-th signing request (from 0) refreshes the token of the (i-1)-th login, planned at
    // its expiry less the margin (no jitter).
    let mut late_ms = Vec::new();
    for (i, r) in signs.iter().enumerate().skip(1) {
        let Some((_, exp, _)) = tokens.get(i - 1) else { break };
        let planned = exp - margin;
        if planned < w0 + 0.5 || planned > w1 {
            continue;
        }
        let received = r.received_at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        late_ms.push((received - planned) * 1e3);
    }
    let n = late_ms.len();
    let (p50, p99, max) = (pct_f(&mut late_ms, 0.5), pct_f(&mut late_ms, 0.99), pct_f(&mut late_ms, 1.0));
    rep.figure(
        "2d",
        &format!("refresh start after its planned instant, p99, while {clients} clients call in a tight loop"),
        "<= 100 ms",
        format!(
            "{p99:.1} ms (p50 {p50:.1}, max {max:.1}; {n} refreshes; load {:.0} calls/s, {} errors)",
            load.calls_per_s, load.errors
        ),
        Some(n > 0 && p99 <= 100.0),
        "simulator tokens of 4 s, margin 1 s, no jitter: a refresh every 3 s; 8 connections call \
         IsAuthorizationValid back to back for the window (30 s; 10 s with --quick); lateness = the simulator \
         receiving the /sign request minus the previous token's expiry less the margin, for refreshes planned \
         inside the window",
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// 3. Idle cost and 4. memory with one session

pub async fn idle(s: &Settings, rep: &mut Report) -> Result<()> {
    let env = Env::new(SimConfig::default(), &s.tokend).await?;
    env.write_config(&Cfg::one_session())?;
    let (mut d, _) = env.start().await?;
    wait_valid(&env, "default").await?;
    let reference = MinimalService::start(&env.bus.address, Flavor::Current)?;
    // Let the blocking pool's threads (state writes) time out (10 s keep-alive).
    let settle = 12;
    println!("      settling {settle} s, then measuring {} s", s.idle_secs);
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let tool = s.dbus_limits.as_ref().map(|t| {
        let args =
            vec!["idle".to_owned(), "--pid".into(), d.pid.to_string(), "--seconds".into(), s.idle_secs.to_string()];
        tokio::spawn(run_tool(t.clone(), args))
    });
    let (b, rb) = (snap(d.pid)?, snap(reference.pid())?);
    tokio::time::sleep(Duration::from_secs(s.idle_secs)).await;
    let (a, ra) = (snap(d.pid)?, snap(reference.pid())?);
    let i = measure::idle(&b, &a);
    let ri = measure::idle(&rb, &ra);
    let (anon, file) = measure::rss_split(d.pid);
    let (ranon, rfile) = measure::rss_split(reference.pid());
    rep.detail(format!(
        "idle: RSS split (smaps_rollup): daemon {:.1} MiB anonymous + {:.1} MiB file-backed (binary, libraries); \
         reference minimal service {:.1} + {:.1} MiB (RSS {:.1} MiB)",
        anon as f64 / MIB,
        file as f64 / MIB,
        ranon as f64 / MIB,
        rfile as f64 / MIB,
        ra.rss_kib as f64 / MIB
    ));
    rep.detail(format!(
        "idle: {:.1} s window, threads {} -> {}; {:.2} voluntary + {:.2} involuntary switches/min (main thread {:.2}); \
         CPU {:.3} ms/min (schedstat), {:.1} ms/min (utime+stime ticks); reference minimal service (current-thread): \
         {:.2} wakeups/min, {:.3} ms/min",
        i.secs,
        i.threads.0,
        i.threads.1,
        i.voluntary_per_min,
        i.involuntary_per_min,
        i.main_per_min,
        i.cpu_ms_per_min_sched,
        i.cpu_ms_per_min_ticks,
        ri.wakeups_per_min,
        ri.cpu_ms_per_min_sched
    ));
    let method = format!(
        "one valid session, default config (check_schedule once a minute, token refresh ~55 min away), {settle} s \
         settle, then a {:.0} s window: context switches summed over /proc/PID/task/*/status, CPU from per-thread \
         schedstat",
        i.secs
    );
    let enough = i.secs >= 60.0;
    rep.figure(
        "3a",
        "idle wakeups per minute (all threads)",
        "<= 3",
        format!("{:.2}", i.wakeups_per_min),
        Some(i.wakeups_per_min <= 3.0 && enough),
        &method,
    );
    rep.figure(
        "3b",
        "idle CPU per minute",
        "< 1 ms",
        format!("{:.3} ms", i.cpu_ms_per_min_sched),
        Some(i.cpu_ms_per_min_sched < 1.0 && enough),
        "as 3a",
    );
    rep.figure(
        "4a",
        "RSS with one session (VmHWM)",
        "<= 10 MiB",
        format!("{:.1} MiB (VmHWM {:.1} MiB)", a.rss_kib as f64 / MIB, a.hwm_kib as f64 / MIB),
        Some(a.rss_kib as f64 <= 10.0 * MIB),
        "VmRSS and VmHWM from /proc/PID/status after the idle window",
    );
    if let Some(t) = tool {
        let out = t.await??;
        for l in out.lines() {
            rep.detail(format!("dbus-limits idle: {l}"));
        }
        let w = after(&out, "wakeups/min").unwrap_or(f64::NAN);
        let cpu = out
            .lines()
            .find(|l| l.contains("schedstat"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        rep.figure(
            "3x",
            "cross-check (dbus-limits idle --pid): wakeups/min, CPU ms/min",
            "<= 3, < 1 ms",
            format!("{w:.2} wakeups/min, {cpu:.3} ms/min"),
            Some(w <= 3.0 && cpu < 1.0),
            "the shared tool dbus-limits `idle --pid` over the same window",
        );
    }
    d.stop();
    Ok(())
}

// ------------------------------------------------------------------------------------------
// 5. Scale (and 4. memory with many sessions)

pub async fn scale(s: &Settings, rep: &mut Report) -> Result<()> {
    let n = s.sessions;
    let mut env = Env::new(SimConfig::default(), &s.tokend).await?;
    // One extra debug line per refresh (`login attempt`), for the daemon-side figure 5b'.
    env.log_filter = Some("info,entrupy_tokend::session=debug".into());
    env.write_config(&Cfg { sessions: Vec::new(), ..Cfg::one_session() })?;
    // The state of sessions added over D-Bus (`AddSession` persists the profile with the
    // record): what a daemon with many sessions finds at start.
    let state = env.state_dir();
    for sub in ["sessions", "logins"] {
        std::fs::create_dir_all(state.join(sub))?;
    }
    write_private(
        &state.join("installation.json"),
        serde_json::json!({"version": 1, "device_id": "0123456789abcdef0123456789abcdef"}).to_string().as_bytes(),
    )?;
    let lead = 15.0 + n as f64 / 1000.0;
    let base = unix_now() + lead;
    let spread = s.spread as f64;
    let mut planned: HashMap<String, f64> = HashMap::with_capacity(n);
    let tw = Instant::now();
    for i in 0..n {
        let (id, uid) = (format!("s{i:05}"), format!("bench-user-{i:05}"));
        // A permutation, so that file order is not refresh order.
        let k = (i * 7919) % n.max(1);
        let at = base + spread * k as f64 / n as f64;
        let expires = at + 600.0;
        let rec = serde_json::json!({
            "version": 1,
            "id": id,
            "profile": {
                "unique_user_id": uid,
                "email": format!("{uid}@example.com"),
                "first_name": "Bench",
                "last_name": format!("User {i}"),
                "backend_token": format!("bench-app-user-credential-{i:05}"),
            },
            "unique_user_id": uid,
            "username": format!("EntrupyBench-{uid}"),
            "token": format!("stored-token-{i:05}-0123456789abcdef0123456789abcdef"),
            "expires_at": expires,
            "last_login_at": expires - 3600.0,
            "refresh_at": at,
            "last_error": null,
            "logged_out": false,
        });
        write_private(&state.join("sessions").join(format!("{id}.json")), serde_json::to_vec_pretty(&rec)?.as_slice())?;
        planned.insert(uid, at);
    }
    rep.detail(format!("scale: wrote {n} session files in {:.2} s", tw.elapsed().as_secs_f64()));
    let (mut d, startup) = env.start().await?;
    let paths: Vec<zbus::OwnedObjectPath> = env
        .conn
        .call_method(Some(BUS_NAME), names::MANAGER_PATH, Some(names::MANAGER_INTERFACE), "ListSessions", &())
        .await?
        .body()
        .deserialize()?;
    rep.figure(
        "5a",
        &format!("start to bus name acquired, {n} sessions loaded from state"),
        "<= 300 ms",
        format!("{:.0} ms ({} sessions listed)", startup.as_secs_f64() * 1e3, paths.len()),
        Some(startup.as_secs_f64() <= 0.300 && paths.len() == n),
        "state dir with sessions/<id>.json records as AddSession persists them (profile with backend_token, \
         token, expires_at, last_login_at, refresh_at) plus installation.json; time from just before spawning \
         the release binary to the bench receiving NameOwnerChanged for the name (subscribed beforehand); \
         ListSessions checked",
    );
    let before_first = base - 1.0 - unix_now();
    if before_first > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(before_first)).await;
    }
    let loaded = snap(d.pid)?;
    let (anon, file) = measure::rss_split(d.pid);
    rep.detail(format!(
        "scale: RSS split when loaded: {:.1} MiB anonymous + {:.1} MiB file-backed",
        anon as f64 / MIB,
        file as f64 / MIB
    ));
    rep.detail(format!(
        "scale: loaded, before the first refresh: RSS {:.1} MiB, VmHWM {:.1} MiB, threads {}, CPU so far {:.2} s",
        loaded.rss_kib as f64 / MIB,
        loaded.hwm_kib as f64 / MIB,
        loaded.tasks.len(),
        measure::cpu_secs(&loaded)
    ));
    let deadline = Instant::now() + Duration::from_secs_f64(spread + 1.0 + 180.0);
    let mut last_print = Instant::now();
    loop {
        let c = env.sim.counters();
        if c.login_ok as usize >= n || Instant::now() > deadline {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(15) {
            println!("      {} of {n} refreshed (sign {}, login {})", c.login_ok, c.sign_requests, c.login_requests);
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let done = snap(d.pid)?;
    let counters = env.sim.counters();
    let mut late_ms = Vec::with_capacity(n);
    let mut seen = HashSet::with_capacity(n);
    for r in env.sim.requests_to(Endpoint::Sign) {
        let Ok(body) = serde_json::from_str::<serde_json::Value>(&r.body) else { continue };
        let Some(uid) = body.get("unique_user_id").and_then(|u| u.as_str()) else { continue };
        let Some(at) = planned.get(uid) else { continue };
        if !seen.insert(uid.to_owned()) {
            continue;
        }
        let received = r.received_at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        late_ms.push((received - at) * 1e3);
    }
    let refreshed = counters.login_ok as usize;
    let (p50, p99, max, min) =
        (pct_f(&mut late_ms, 0.5), pct_f(&mut late_ms, 0.99), pct_f(&mut late_ms, 1.0), pct_f(&mut late_ms, 0.0));
    rep.detail(format!(
        "scale: {refreshed} logins for {n} sessions ({} sign requests, {} login requests, {} sign answers other than 200); \
         lateness ms min {min:.1} p50 {p50:.1} p99 {p99:.1} max {max:.1}",
        counters.sign_requests,
        counters.login_requests,
        counters.sign_rejected
    ));
    rep.figure(
        "5b",
        &format!("refresh start after its planned instant, p99 ({n} refreshes over {spread:.0} s)"),
        "<= 100 ms",
        format!("{p99:.1} ms (p50 {p50:.1}, max {max:.1}; {} of {n} started)", late_ms.len()),
        Some(p99 <= 100.0 && late_ms.len() == n),
        "refresh_at written in each state file (so no jitter), spread evenly in a permuted order; start = the \
         simulator receiving the session's /sign request (so it includes the daemon persisting the login \
         reservation with fsync, and the HTTP connection)",
    );
    // The daemon's own view: its "login attempt" log line (debug) for each session.
    let by_id: HashMap<String, f64> =
        planned.iter().filter_map(|(uid, at)| Some((format!("s{}", uid.strip_prefix("bench-user-")?), *at))).collect();
    let mut timer_ms = attempt_lateness(&d.log, &by_id);
    let (t50, t99, tmax) = (pct_f(&mut timer_ms, 0.5), pct_f(&mut timer_ms, 0.99), pct_f(&mut timer_ms, 1.0));
    rep.figure(
        "5b'",
        "same, at the daemon: its `login attempt` log line after the planned instant, p99",
        "<= 100 ms",
        format!("{t99:.1} ms (p50 {t50:.1}, max {tmax:.1}; {} lines)", timer_ms.len()),
        Some(t99 <= 100.0 && timer_ms.len() == n),
        "timestamp of the daemon's debug line `login attempt` (RUST_LOG=info,entrupy_tokend::session=debug in this section) (written when the session's task starts the \
         attempt, before the reservation is persisted) minus the planned refresh_at",
    );
    let cpu = measure::cpu_secs(&done) - measure::cpu_secs(&loaded);
    let window = done.at.duration_since(loaded.at).as_secs_f64();
    rep.figure(
        "5c",
        "daemon CPU per refresh",
        "report",
        format!(
            "{:.2} ms ({cpu:.2} s CPU over {window:.0} s for {refreshed} refreshes)",
            cpu * 1e3 / refreshed.max(1) as f64
        ),
        None,
        "utime+stime of the daemon (/proc/PID/stat, all threads incl. exited) over the refresh window, divided by \
         the logins; includes the minute sweeps and the state writes",
    );
    rep.figure(
        "4b",
        &format!("RSS with {n} sessions (VmHWM)"),
        "<= 40 MiB",
        format!(
            "{:.1} MiB loaded, {:.1} MiB after all refreshes (VmHWM {:.1} MiB)",
            loaded.rss_kib as f64 / MIB,
            done.rss_kib as f64 / MIB,
            done.hwm_kib as f64 / MIB
        ),
        Some(loaded.rss_kib.max(done.rss_kib) as f64 <= 40.0 * MIB),
        "VmRSS/VmHWM from /proc/PID/status, after loading (before the first refresh) and after the refreshes",
    );
    if !s.quick {
        tokio::time::sleep(Duration::from_secs(12)).await;
        let b = snap(d.pid)?;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let a = snap(d.pid)?;
        let i = measure::idle(&b, &a);
        rep.figure(
            "5d",
            &format!("idle cost with {n} sessions"),
            "report",
            format!(
                "{:.1} wakeups/min, {:.1} ms CPU/min, RSS {:.1} MiB",
                i.wakeups_per_min,
                i.cpu_ms_per_min_sched.max(i.cpu_ms_per_min_ticks),
                a.rss_kib as f64 / MIB
            ),
            None,
            "as 3a, 60 s window after the refreshes (one minute sweep in it)",
        );
    }
    let t = Instant::now();
    d.stop();
    rep.detail(format!("scale: SIGTERM to exit with {n} sessions: {:.0} ms", t.elapsed().as_secs_f64() * 1e3));
    Ok(())
}

/// For each session id in `planned`, the delay (ms) of its first `login attempt` log line
/// after the planned instant. Log lines look like
/// `2026-01-01T10:00:00.123456Z DEBUG session{session=s00042 ...}: login attempt attempt=1 asked=false`.
fn attempt_lateness(log: &std::path::Path, planned: &HashMap<String, f64>) -> Vec<f64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.contains("login attempt")) {
        let Some(stamp) = line.split_whitespace().next() else { continue };
        let Ok(t) = chrono::DateTime::parse_from_rfc3339(stamp) else { continue };
        let Some(id) = line.split("session=").nth(1).and_then(|r| r.split(['}', ' ', ':']).next()) else { continue };
        let Some(at) = planned.get(id) else { continue };
        if seen.insert(id.to_owned()) {
            out.push((t.timestamp_micros() as f64 / 1e6 - at) * 1e3);
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// 6. Logins

pub async fn logins(s: &Settings, rep: &mut Report) -> Result<()> {
    let (life_ms, margin_ms, jitter_ms) = if s.quick { (4000u64, 1500u64, 500u64) } else { (8000, 3000, 1000) };
    let cycles = 10u64;
    let sim = SimConfig {
        token_lifetime: Duration::from_millis(life_ms),
        logins_per_minute: 60,
        logins_per_day: 100_000,
        ..Default::default()
    };
    let env = Env::new(sim, &s.tokend).await?;
    env.write_config(&Cfg {
        refresh: Some(format!("margin = \"{margin_ms}ms\"\njitter = \"{jitter_ms}ms\"")),
        rate: Some((30, 10_000)),
        ..Cfg::one_session()
    })?;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(SESSION_INTERFACE)
        .member("AuthorizationExpired")
        .build()?;
    let mut expired_stream =
        zbus::MessageStream::for_match_rule(rule, &env.conn, std::num::NonZeroUsize::new(64)).await?;
    let expired = Arc::new(AtomicU64::new(0));
    let counter = expired.clone();
    let watcher = tokio::spawn(async move {
        while let Some(m) = expired_stream.next().await {
            if m.is_ok() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let (mut d, _) = env.start().await?;
    if !env.sim.wait_for(Duration::from_secs(20), |c| c.login_ok >= 1).await {
        bail!("no first login; log:\n{}", d.log_tail());
    }
    let t0 = Instant::now();
    let timeout = Duration::from_millis(life_ms * (cycles + 3) * 2);
    if !env.sim.wait_for(timeout, |c| c.login_ok > cycles).await {
        bail!("fewer than {cycles} refreshes in {timeout:?}; counters {:?}", env.sim.counters());
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let mut logins = env.sim.logins();
    logins.sort_by_key(|l| l.at);
    let at = |l: &entrupy_sim::LoginRecord| l.at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut exactly_one = 0;
    let mut per_cycle = Vec::new();
    for i in 0..cycles as usize {
        let (start, end) = (at(&logins[i]), logins[i].expiration_time);
        let k = logins.iter().filter(|l| at(l) > start && at(l) < end).count();
        per_cycle.push(k.to_string());
        if k == 1 {
            exactly_one += 1;
        }
    }
    let c = env.sim.counters();
    let exp = expired.load(Ordering::Relaxed);
    rep.detail(format!(
        "logins: {cycles} cycles of a {life_ms} ms token (margin {margin_ms} ms, jitter {jitter_ms} ms) in {elapsed:.1} s; \
         logins inside each token's lifetime: [{}]; counters: sign {} login {} login_ok {}",
        per_cycle.join(", "),
        c.sign_requests,
        c.login_requests,
        c.login_ok
    ));
    let clean = c.login_requests == c.login_ok && c.sign_requests == c.login_requests;
    rep.figure(
        "6a",
        &format!("exactly one login per token cycle, over {cycles} cycles"),
        "10/10",
        format!("{exactly_one}/{cycles}; {exp} AuthorizationExpired; no extra requests: {clean}"),
        Some(exactly_one == cycles && exp == 0 && clean),
        &format!(
            "simulator tokens of {life_ms} ms, margin {margin_ms} ms, jitter {jitter_ms} ms; for each of the first {cycles} \
             tokens, the logins issued during its lifetime (from the simulator's login log) are counted; \
             AuthorizationExpired signals counted; sign/login request counts compared"
        ),
    );
    // 1,000 concurrent EnsureValid callers.
    env.sim.set_token_lifetime(Duration::from_secs(3600));
    let sp = names::session_path("default");
    let cleanup = Target::new(BUS_NAME, &sp, call(SESSION_INTERFACE, "Cleanup"));
    cleanup.run(&env.conn).await?;
    // Wait for the refresh that may be under way to end, so that the count starts clean.
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.sim.push_fault(Endpoint::Login, Fault::Delay { ms: 500 }, 1);
    let before = env.sim.counters().login_ok;
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(env::connect(&env.bus.address).await?);
    }
    let t = Instant::now();
    let mut calls = Vec::new();
    for c in &conns {
        for _ in 0..100 {
            let sp = sp.clone();
            calls.push(async move {
                let m = c
                    .call_method(Some(BUS_NAME), sp.as_str(), Some(SESSION_INTERFACE), "EnsureValid", &(60u32))
                    .await?;
                Ok::<_, anyhow::Error>(m.body().deserialize::<(String, u64)>()?.0)
            });
        }
    }
    let results = futures_util::future::join_all(calls).await;
    let took = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let made = env.sim.counters().login_ok - before;
    let ok: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let distinct: HashSet<&String> = ok.iter().copied().collect();
    let first_err =
        results.iter().find_map(|r| r.as_ref().err()).map(|e| format!("; first error: {e:#}")).unwrap_or_default();
    rep.figure(
        "6b",
        "1,000 concurrent EnsureValid callers",
        "one login",
        format!(
            "{made} login(s); {} of 1000 answered, {} distinct token(s), {took:.2} s{first_err}",
            ok.len(),
            distinct.len()
        ),
        Some(made == 1 && ok.len() == 1000 && distinct.len() == 1),
        "after Cleanup (no token), 10 connections x 100 EnsureValid(60) sent at once; the simulator delays the \
         login by 500 ms so that callers arrive while it is under way; logins counted by the simulator",
    );
    watcher.abort();
    d.stop();
    Ok(())
}

// ------------------------------------------------------------------------------------------
// 7. Size, start-up, build

pub async fn startup(s: &Settings, rep: &mut Report) -> Result<()> {
    let size = std::fs::metadata(&s.tokend)?.len();
    let tmp = tempfile::tempdir()?;
    let stripped = tmp.path().join("stripped");
    let strip_ok = std::process::Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&s.tokend)
        .status()
        .map(|st| st.success())
        .unwrap_or(false);
    let stripped_size = if strip_ok { std::fs::metadata(&stripped).map(|m| m.len()).ok() } else { None };
    rep.figure(
        "7a",
        "binary size, stripped",
        "report",
        match stripped_size {
            Some(z) => format!("{:.2} MiB ({size} bytes as built; {z} bytes after `strip`)", size as f64 / MIB / MIB),
            None => format!("{:.2} MiB ({size} bytes)", size as f64 / MIB / MIB),
        },
        None,
        "file size of target/release/entrupy-tokend ([profile.release] strip = \"symbols\", lto = \"fat\", codegen-units = 1); \
         `strip -o` re-checked",
    );
    let env = Env::new(SimConfig::default(), &s.tokend).await?;
    env.write_config(&Cfg::one_session())?;
    let runs = if s.quick { 3 } else { 7 };
    let (mut ms, mut stop_ms) = (Vec::new(), Vec::new());
    let mut rss = 0;
    for i in 0..runs {
        let (mut d, t) = env.start().await?;
        ms.push(t.as_secs_f64() * 1e3);
        if i == 0 {
            wait_valid(&env, "default").await?;
        }
        rss = snap(d.pid).map(|p| p.rss_kib).unwrap_or(0);
        stop_ms.extend(d.stop_timed().map(|t| t.as_secs_f64() * 1e3));
    }
    rep.figure(
        "7b",
        "start-up time with one session (to bus name acquired)",
        "report",
        format!(
            "{:.1} ms median (runs: {} ms); RSS just after start {:.1} MiB",
            median(&ms),
            fmt_list(&ms, 1),
            rss as f64 / MIB
        ),
        None,
        "time from just before spawning the release binary to NameOwnerChanged at the bench (subscribed \
         beforehand); first run without state (logs in after the name), later runs with the stored token",
    );
    let worst = stop_ms.iter().copied().fold(0.0, f64::max);
    rep.figure(
        "7d",
        "SIGTERM to exit, one session",
        "<= 100 ms",
        format!("{:.1} ms median, {worst:.1} ms worst (runs: {} ms)", median(&stop_ms), fmt_list(&stop_ms, 1)),
        Some(stop_ms.len() == runs && worst <= 100.0),
        "as 7b; after each start, SIGTERM to the daemon, then the time until the process has exited (polled \
         every millisecond)",
    );
    if let Some(b) = s.build_secs {
        rep.figure(
            "7c",
            "build time of the bench command (cargo build --release --workspace)",
            "report",
            format!("{b:.1} s"),
            None,
            "wall time of the `cargo build` step in scripts/bench (incremental: 0-few s when nothing changed)",
        );
    }
    Ok(())
}

pub async fn build(s: &Settings, rep: &mut Report) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ws = s.workspace.clone();
    let target = dir.path().to_owned();
    println!("      clean release build of entrupy-tokend in {} (takes minutes)", target.display());
    let t = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("cargo")
            .args(["build", "--release", "--locked", "--offline", "-p", "entrupy-tokend", "--bin", "entrupy-tokend"])
            .arg("--target-dir")
            .arg(&target)
            .current_dir(&ws)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
    })
    .await?
    .context("cannot run cargo")?;
    if !status.success() {
        return Err(anyhow!("cargo build failed ({status})"));
    }
    let secs = t.elapsed().as_secs_f64();
    rep.figure(
        "7d",
        "clean release build of the daemon",
        "report",
        format!(
            "{secs:.0} s on {} cores, loadavg after {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            loadavg()
        ),
        None,
        "cargo build --release --locked --offline -p entrupy-tokend --bin entrupy-tokend into an empty target dir \
         (dependencies compiled too; crates already downloaded)",
    );
    Ok(())
}
