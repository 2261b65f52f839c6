//! Reliability: resume from suspend (a stand-in logind on a private "system bus"), wall-clock
//! changes (an injected clock that the test jumps), network return (a stand-in
//! NetworkManager), kill -9 at random moments of the refresh cycle, and callers of another
//! Unix user. The daemon runs in-process here where the test must control its clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use entrupy_tokend::clock::Clock;
use entrupy_tokend::config::{self, ConfigLocation};
use entrupy_tokend::daemon::{self, Controls};
use entrupy_tokend::watch::{Outside, SystemBus};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);

/// A daemon running inside the test with a clock the test controls.
struct InProcess {
    clock: Clock,
    outside: mpsc::UnboundedSender<Outside>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<daemon::Stopped, daemon::RunError>>,
}

async fn in_process(env: &Env, system_bus: SystemBus) -> InProcess {
    let loc = ConfigLocation { path: env.path("config.toml"), explicit: true };
    let cfg = config::load(&loc).unwrap();
    let clock = Clock::system();
    let shutdown = CancellationToken::new();
    let (_reload_tx, reload_rx) = mpsc::unbounded_channel();
    let (outside, outside_rx) = mpsc::unbounded_channel();
    let controls = Controls {
        shutdown: shutdown.clone(),
        reload: reload_rx,
        clock: clock.clone(),
        session_bus: Some(env.bus.address.clone()),
        system_bus,
        outside: Some(outside_rx),
        // In-process: confining would confine the test runner.
        sandbox: false,
    };
    let task = tokio::spawn(daemon::run(loc, cfg, controls));
    let dbus = zbus::fdo::DBusProxy::new(&env.conn).await.unwrap();
    let ok = eventually(T, || {
        let dbus = dbus.clone();
        async move {
            dbus.name_has_owner(zbus::names::BusName::try_from(entrupy_tokend::names::BUS_NAME).unwrap())
                .await
                .unwrap_or(false)
        }
    })
    .await;
    assert!(ok, "in-process daemon did not take its name");
    InProcess { clock, outside, shutdown, task }
}

impl InProcess {
    async fn stop(self) {
        self.shutdown.cancel();
        let _stopped = self.task.await.unwrap().unwrap();
    }
}

async fn logins_reach(env: &Env, n: u64, within: Duration) -> bool {
    eventually(within, || async { env.sim.counters().login_ok >= n }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_suspend_refreshes_within_two_seconds() {
    let env = Env::with_lifetime(Duration::from_secs(60)).await;
    env.write_config(&Cfg { margin: "5s", ..Default::default() });
    let system = Bus::start();
    let d = in_process(&env, SystemBus::Address(system.address.clone())).await;
    assert!(logins_reach(&env, 1, T).await);
    let s = env.session("default").await;
    assert!(eventually(T, || async { s.is_authorization_valid().await.unwrap() }).await);

    // A two-minute suspend: the wall clock jumps, the monotonic timers do not notice.
    d.clock.shift_ms(120_000);
    assert!(!s.is_authorization_valid().await.unwrap(), "Valid tells the wall-clock truth at once");
    // New tokens must outlive the shifted clock.
    env.sim.set_token_lifetime(Duration::from_secs(600));
    let logind = system.connect().await;
    // Only the owner of logind's name is heard.
    logind.request_name(entrupy_tokend::watch::LOGIND).await.unwrap();
    let t0 = Instant::now();
    logind
        .emit_signal(
            None::<()>,
            "/org/freedesktop/login1",
            "org.freedesktop.login1.Manager",
            "PrepareForSleep",
            &(false,),
        )
        .await
        .unwrap();
    assert!(logins_reach(&env, 2, Duration::from_secs(5)).await, "the resume started a refresh");
    assert!(t0.elapsed() < Duration::from_secs(4), "refresh started {:?} after resume", t0.elapsed());
    assert!(eventually(T, || async { s.is_authorization_valid().await.unwrap() }).await);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_change_is_noticed_at_once() {
    let env = Env::with_lifetime(Duration::from_secs(60)).await;
    env.write_config(&Cfg { margin: "5s", ..Default::default() });
    let d = in_process(&env, SystemBus::Off).await;
    assert!(logins_reach(&env, 1, T).await);
    let s = env.session("default").await;
    assert!(eventually(T, || async { s.state().await.unwrap() == "valid" }).await);
    env.sim.set_token_lifetime(Duration::from_secs(600));
    d.clock.shift_ms(58_000);
    // What the CLOCK_REALTIME timerfd reports when the clock is set.
    d.outside.send(Outside::ClockChanged).unwrap();
    assert!(logins_reach(&env, 2, Duration::from_secs(4)).await, "the refresh due by the new clock started");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_return_ends_a_backoff_wait() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg { backoff_initial: "40s", backoff_max: "60s", ..Default::default() });
    env.sim.push_fault(Endpoint::Sign, Fault::Drop, 20);
    let system = Bus::start();
    let d = in_process(&env, SystemBus::Address(system.address.clone())).await;
    let s = env.session("default").await;
    // Wait until the session waits out a long backoff (full jitter may draw short ones first).
    let long_wait = eventually(Duration::from_secs(30), || async {
        let r = s.refresh_at().await.unwrap() as f64;
        s.state().await.unwrap() == "expired" && r - now() > 8.0
    })
    .await;
    assert!(long_wait, "the session never waited out a long backoff");
    env.sim.clear_faults();
    let nm = system.connect().await;
    // Only the owner of NetworkManager's name is heard.
    nm.request_name(entrupy_tokend::watch::NETWORK_MANAGER).await.unwrap();
    let t0 = Instant::now();
    nm.emit_signal(
        None::<()>,
        "/org/freedesktop/NetworkManager",
        "org.freedesktop.NetworkManager",
        "StateChanged",
        &(70u32,),
    )
    .await
    .unwrap();
    assert!(eventually(Duration::from_secs(5), || async { s.state().await.unwrap() == "valid" }).await);
    assert!(t0.elapsed() < Duration::from_secs(4), "retried {:?} after the network came back", t0.elapsed());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_keeps_the_budget() {
    // The simulator enforces the same budget as the daemon: a daemon that exceeded it after
    // a crash would meet a 429.
    let env = Env::new(SimConfig {
        token_lifetime: Duration::from_millis(2500),
        logins_per_minute: 12,
        logins_per_day: 1000,
        ..Default::default()
    })
    .await;
    env.write_config(&Cfg { margin: "1s", per_minute: 12, per_day: 1000, ..Default::default() });
    let mut last_given: Option<(String, u64)> = None;
    for i in 0..50u64 {
        let mut d = env.spawn_daemon(&[]);
        d.wait_for_name(&env.conn).await;
        let s = env.session("default").await;
        if let Some((_, exp)) = &last_given
            && (now() + 0.3) < *exp as f64
        {
            // A token a client was given is still valid: the restarted daemon serves one.
            assert!(s.is_authorization_valid().await.unwrap(), "iteration {i}: a valid token was lost");
        }
        // Let the cycle run a random while, ask for the token, and kill mid-way. Real time:
        // the kills must land at moments of the real process's refresh cycle (mid-request,
        // mid-write), which no in-process clock reaches.
        let wait = (i * 7919 % 900) + 50;
        tokio::time::sleep(Duration::from_millis(wait / 2)).await;
        if let Ok(t) = s.get_token().await {
            last_given = Some(t);
        }
        tokio::time::sleep(Duration::from_millis(wait / 2)).await;
        d.kill9();
    }
    let _d = env.start_daemon().await;
    let c = env.sim.counters();
    assert_eq!(c.login_by_status.get(&429), None, "the daemon never exceeded Entrupy's budget: {c:?}");
    let logins = env.sim.logins();
    for (i, l) in logins.iter().enumerate() {
        let in_minute =
            logins[i..].iter().filter(|x| x.at.duration_since(l.at).unwrap() < Duration::from_secs(60)).count();
        assert!(in_minute <= 12);
    }
    assert!(c.login_ok >= 5, "refreshes happened between the kills");
    // Every state file still loads: the daemon starts and knows its session.
    assert_eq!(env.manager().await.list_sessions().await.unwrap().len(), 1);
    let leftovers: Vec<_> = std::fs::read_dir(env.state_dir().join("sessions"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("corrupt"))
        .collect();
    assert!(leftovers.is_empty(), "no state file was corrupted: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_of_another_user_get_access_denied() {
    if !rustix::process::geteuid().is_root() || std::process::Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root and setpriv to call as another user");
        return;
    }
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let _d = env.start_daemon().await;
    // Let uid 65534 reach the bus socket.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.bus.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(env.bus.dir.path().join("bus"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "busctl"])
        .arg(format!("--address={}", env.bus.address))
        .args([
            "call",
            "com.entrupy.TokenDaemon1",
            "/com/entrupy/TokenDaemon1/session/default",
            "com.entrupy.TokenDaemon1.Session",
            "GetToken",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("Access denied") && !stderr.contains("entrupy") && stderr.contains("connect") {
        eprintln!("skipped: the bus refused the other user's connection: {stderr}");
        return;
    }
    assert!(!out.status.success(), "another user got a token");
    assert!(stderr.contains("AccessDenied") || stderr.contains("may not use"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pacing_the_budget_alone_holds_refreshes_back() {
    let env = Env::with_lifetime(Duration::from_secs(3)).await;
    env.write_config(&Cfg { margin: "1s", per_minute: 5, per_day: 3, ..Default::default() });
    let d = env.start_daemon().await;
    let s = env.session("default").await;
    // The SPEC's schedule: a refresh every 2 s while the budget allows, then a wait that
    // RefreshAt shows (the first login's 24 h later).
    assert!(logins_reach(&env, 3, T).await, "log:\n{}", d.log.text());
    let first = env.sim.logins()[0].at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(
        eventually(T, || async {
            let r = s.refresh_at().await.unwrap() as f64;
            (r - (first + 86_400.0)).abs() < 5.0
        })
        .await,
        "RefreshAt shows when the budget frees: {:?}",
        s.refresh_at().await
    );
    assert!(!s.pacing().await.unwrap());
    // RefreshAt above is the daemon's plan; that nothing comes before it, and the refresh
    // comes at that moment, is checked on the paused clock:
    // engine::tests::without_pacing_the_budget_alone_holds_refreshes_back.
    assert_eq!(env.sim.counters().login_ok, 3);
    assert_eq!(err_name(s.refresh().await), "TooManyRequests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_tokens_are_paced_so_the_daily_budget_lasts() {
    let env = Env::with_lifetime(Duration::from_secs(3)).await;
    env.write_config(&Cfg { margin: "1s", per_minute: 5, per_day: 4, pace: true, ..Default::default() });
    let d = env.start_daemon().await;
    let s = env.session("default").await;
    // Half the budget goes at the natural pace (a login every 2 s)...
    assert!(logins_reach(&env, 2, T).await);
    assert!(eventually(T, || async { s.pacing().await.unwrap() }).await, "log:\n{}", d.log.text());
    // ...then one per 24 h / 4 after the last attempt: RefreshAt shows it. That nothing
    // comes before it, though the token expires, that it comes then, and that the log says
    // so only once, is checked on the paused clock:
    // engine::tests::short_tokens_are_paced_so_the_daily_budget_lasts.
    let second = env.sim.logins()[1].at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let r = s.refresh_at().await.unwrap() as f64;
    assert!((r - (second + 86_400.0 / 4.0)).abs() < 5.0, "RefreshAt {r} for the login at {second}");
    assert_eq!(env.sim.counters().login_ok, 2);
    assert!(eventually(T, || async { d.log.text().contains("pacing refreshes") }).await, "said in the logs");
    assert_eq!(d.log.text().matches("pacing refreshes").count(), 1);
    let out = env.tokenctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("paced") && text.contains("2 of 4 logins used today"), "{text}");
    // A client can still ask for a login (clients are not paced; the budget still holds).
    s.refresh().await.unwrap();
}

/// A stand-in `org.freedesktop.Notifications` that records `Notify` calls.
struct Notifications {
    calls: Calls,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl Notifications {
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        _app_name: &str,
        _replaces_id: u32,
        _app_icon: &str,
        summary: &str,
        body: &str,
        _actions: Vec<String>,
        _hints: std::collections::HashMap<String, zbus::OwnedVariant>,
        _expire_timeout: i32,
    ) -> u32 {
        let mut c = self.calls.lock().unwrap();
        c.push((summary.to_owned(), body.to_owned()));
        c.len() as u32
    }
}

type Calls = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// Serves the stand-in notification server on the env's bus; returns it and its call log.
async fn notification_server(env: &Env) -> (zbus::Connection, Calls) {
    let calls = Calls::default();
    let server = zbus::connection::Builder::address(env.bus.address.as_str())
        .name("org.freedesktop.Notifications")
        .serve_at("/org/freedesktop/Notifications", Notifications { calls: calls.clone() })
        .build()
        .await
        .unwrap();
    (server, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_desktop_notification_when_reauthorization_is_required() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    let (_server, calls) = notification_server(&env).await;
    env.sim.set_accepted_credentials(Some(vec!["another-credential".into()]));
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let mut signals = session_signals(&env).await;
    let _d = env.start_daemon().await;
    let s = env.session("default").await;
    assert!(eventually(T, || async { s.state().await.unwrap() == "needs-reauthorization" }).await);
    assert_eq!(next_signal(&mut signals).await, "LoginFailed");
    assert_eq!(next_signal(&mut signals).await, "ReauthorizationRequired");
    assert!(eventually(T, || async { calls.lock().unwrap().len() == 1 }).await, "one notification");
    assert!(calls.lock().unwrap()[0].1.contains("default"), "it names the session");
    // Still rejected: the state does not change, so no second ReauthorizationRequired, and
    // no second notification (the daemon sends one with each of those signals). A success
    // after it closes the window: no ReauthorizationRequired came between.
    assert_eq!(err_name(s.refresh().await), "Unauthorized");
    env.sim.set_accepted_credentials(None);
    s.refresh().await.unwrap();
    assert_eq!(next_signal(&mut signals).await, "LoginFailed");
    assert_eq!(next_signal(&mut signals).await, "LoginSucceeded");
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_harmless_without_a_server_and_can_be_disabled() {
    // No notification server on the bus: the session still reaches its state, nothing breaks.
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.sim.set_accepted_credentials(Some(vec!["another-credential".into()]));
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let d = env.start_daemon().await;
    let s = env.session("default").await;
    assert!(eventually(T, || async { s.state().await.unwrap() == "needs-reauthorization" }).await);
    assert!(!s.is_authorization_valid().await.unwrap());
    assert!(!d.log.text().contains("panicked"));

    // `[notify] enabled = false`: a server is there but gets nothing.
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    let (_server, calls) = notification_server(&env).await;
    env.sim.set_accepted_credentials(Some(vec!["another-credential".into()]));
    env.write_config(&Cfg { margin: "30s", extra: "[notify]\nenabled = false\n".into(), ..Default::default() });
    let mut signals = session_signals(&env).await;
    let _d = env.start_daemon().await;
    let s = env.session("default").await;
    assert_eq!(next_signal(&mut signals).await, "LoginFailed");
    // The daemon hands the notification to its own task just before it emits this signal.
    assert_eq!(next_signal(&mut signals).await, "ReauthorizationRequired");
    assert_eq!(s.state().await.unwrap(), "needs-reauthorization");
    // Real time: a call that is not sent has no event to wait for; one that was would reach
    // the server within milliseconds of the signal.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(calls.lock().unwrap().is_empty(), "disabled notifications are not sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_allow_list_admits_only_named_executables() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg {
        margin: "30s",
        extra: "[access]\ntoken_executables = [\"/usr/bin/some-other-app\"]\n".into(),
        ..Default::default()
    });
    let d = env.start_daemon().await;
    let s = env.session("default").await;
    assert!(eventually(T, || async { s.state().await.unwrap() == "valid" }).await);
    assert_eq!(err_name(s.get_token().await), "AccessDenied");
    assert_eq!(err_name(s.ensure_valid(10).await), "AccessDenied");
    assert!(s.is_authorization_valid().await.unwrap(), "other methods stay open");
    // This test program is on the list after a reload: now it may read the token.
    let me = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    env.write_config(&Cfg {
        margin: "30s",
        extra: format!("[access]\ntoken_executables = [{:?}]\n", me.display().to_string()),
        ..Default::default()
    });
    d.signal(rustix::process::Signal::HUP);
    assert!(
        eventually(T, || async { s.get_token().await.is_ok() }).await,
        "the allowed executable reads the token; log:\n{}",
        d.log.text()
    );
}
