//! The loop driven in-process: tokio's paused clock (which the daemon's wall clock follows),
//! a fake peer behind [`Peers`], and a real state directory in a temporary folder. No
//! sleeping: `tokio::time::sleep` under `pause()` only moves the clock, so a test can let
//! hours pass and check to the millisecond when each request left.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::config::CredentialSource;
use crate::http::{Failure, FailureKind, LoginOk, Peer, SignRequest, Signed};
use crate::policy::{Budget, DAY};
use crate::session::State;
use crate::store::Store;

/// A peer that signs everything and logs in after `delay`, with tokens of `lifetime`, unless
/// a test makes it refuse.
#[derive(Debug)]
struct FakePeers {
    clock: Clock,
    lifetime: f64,
    delay: Duration,
    /// When each signing request arrived (daemon clock).
    signs: Mutex<Vec<f64>>,
    logins: AtomicUsize,
    /// The one app-user credential the backend accepts (`None`: any); another gets a 401.
    accepted: Mutex<Option<String>>,
    /// While set, every signing request fails with it.
    sign_fails: Mutex<Option<Failure>>,
    /// While set, every login fails with it.
    login_fails: Mutex<Option<Failure>>,
}

#[async_trait::async_trait]
impl Peers for FakePeers {
    fn has_backend(&self) -> bool {
        true
    }

    async fn sign(&self, req: &SignRequest<'_>) -> Option<Result<Signed, Failure>> {
        self.signs.lock().unwrap().push(self.clock.now());
        if let Some(ok) = self.accepted.lock().unwrap().as_deref()
            && req.credential.map(Secret::expose) != Some(ok)
        {
            return Some(Err(failure(Peer::Backend, FailureKind::Unauthorized, 401)));
        }
        if let Some(f) = self.sign_fails.lock().unwrap().clone() {
            return Some(Err(f));
        }
        Some(Ok(Signed { signed: Secret::new("signed"), username: "Ada".into(), conflict: false }))
    }

    async fn login(&self, _signed: &Secret, _now: f64) -> Result<LoginOk, Failure> {
        tokio::time::sleep(self.delay).await;
        if let Some(f) = self.login_fails.lock().unwrap().clone() {
            return Err(f);
        }
        let n = self.logins.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(LoginOk {
            token: Secret::new(format!("token-{n}")),
            expires_at: self.clock.now() + self.lifetime,
            username: None,
        })
    }
}

fn failure(peer: Peer, kind: FailureKind, status: u16) -> Failure {
    Failure { peer, kind, status: Some(status), error_code: None, description: "scripted".into() }
}

fn params() -> Params {
    Params {
        margin: 10.0,
        jitter: 0.0,
        backoff_initial: 1.0,
        backoff_max: 30.0,
        budget: Budget { per_minute: 1000, per_day: 100_000 },
        reserved_for_refresh: 0,
        pace: false,
    }
}

fn profile(id: &str, origin: Origin) -> Definition {
    Definition {
        id: id.into(),
        profile: crate::profile::Profile {
            unique_user_id: format!("user-{id}-0001"),
            email: "a@example.com".into(),
            first_name: None,
            last_name: None,
        },
        credential: Credential::None,
        origin,
    }
}

/// Waits (on the paused clock, at most an hour of it) until a snapshot satisfies `f`.
async fn until(snapshot: &Published, f: impl Fn(&Snapshot) -> bool) {
    for _ in 0..360_000 {
        if f(&snapshot.load()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out; snapshot: {:?}", snapshot.load());
}

/// Whether two times (Unix seconds) are the same to a millisecond.
fn same(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-3
}

/// What outlives one run of the loop, as the disk and the peers outlive a daemon: the state
/// directory, the wall clock, the fake peer and the configuration.
struct World {
    dir: tempfile::TempDir,
    clock: Clock,
    peers: Arc<FakePeers>,
    params: Params,
    /// The credential of the session `default`.
    credential: Credential,
}

fn world(lifetime: f64, delay: Duration) -> World {
    let clock = Clock::following_tokio();
    let peers = Arc::new(FakePeers {
        clock: clock.clone(),
        lifetime,
        delay,
        signs: Mutex::default(),
        logins: AtomicUsize::new(0),
        accepted: Mutex::default(),
        sign_fails: Mutex::default(),
        login_fails: Mutex::default(),
    });
    World { dir: tempfile::tempdir().unwrap(), clock, peers, params: params(), credential: Credential::None }
}

impl World {
    fn session(&self) -> Definition {
        Definition { credential: self.credential.clone(), ..profile("default", Origin::Config) }
    }

    /// Starts a loop with one configured session, `default`, on what the state directory
    /// holds, as the daemon starts; `prepare` may spoil the directory after it is read.
    fn start(self, prepare: impl FnOnce(&std::path::Path)) -> Rig {
        let store = Store::open(self.dir.path()).unwrap();
        let ledger = Ledger::from_histories(store.load_logins().unwrap().items);
        let records = store.load_sessions().unwrap().items;
        prepare(self.dir.path());
        let (events, events_rx) = mpsc::unbounded_channel();
        let (updates_tx, updates) = mpsc::unbounded_channel();
        let unsaved = events.clone();
        let writer = Writer::spawn(Some(store), move |id| {
            let _ = unsaved.send(Event::Unsaved(Arc::from(id)));
        })
        .unwrap();
        let mut engine = Engine::new(Setup {
            ledger,
            params: self.params,
            peers: self.peers.clone(),
            default_credential: Credential::None,
            config_file: "config.toml".into(),
            device_id: Arc::from("0123456789abcdef0123456789abcdef"),
            clock: self.clock.clone(),
            writer,
            updates: updates_tx,
        });
        let mut served = engine.load(vec![self.session()], records);
        let snapshot = served.remove(0).1;
        let task = tokio::spawn(engine.run(events_rx));
        Rig { events, updates, world: self, snapshot, task }
    }
}

struct Rig {
    events: mpsc::UnboundedSender<Event>,
    updates: mpsc::UnboundedReceiver<Update>,
    world: World,
    snapshot: Published,
    task: tokio::task::JoinHandle<Engine>,
}

/// A loop with one configured session, `default`, on a fresh state directory; `prepare` may
/// spoil the directory before the loop starts.
fn rig(lifetime: f64, delay: Duration, prepare: impl FnOnce(&std::path::Path)) -> Rig {
    world(lifetime, delay).start(prepare)
}

impl Rig {
    fn peers(&self) -> &FakePeers {
        &self.world.peers
    }

    /// The daemon's wall clock now.
    fn now(&self) -> f64 {
        self.world.clock.now()
    }

    /// When each signing request (each attempt through the backend) arrived.
    fn signs(&self) -> Vec<f64> {
        self.peers().signs.lock().unwrap().clone()
    }

    async fn call(&self, make: impl FnOnce(oneshot::Sender<Reply>) -> Call) -> Reply {
        let (tx, rx) = oneshot::channel();
        self.events.send(Event::Call(Arc::from("default"), make(tx))).unwrap();
        rx.await.unwrap()
    }

    async fn manager<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> ManagerCall) -> T {
        let (tx, rx) = oneshot::channel();
        self.events.send(Event::Manager(make(tx))).unwrap();
        rx.await.unwrap()
    }

    /// The status line (`sd_notify` STATUS).
    async fn status(&self) -> String {
        let (tx, rx) = oneshot::channel();
        self.events.send(Event::Status(tx)).unwrap();
        rx.await.unwrap()
    }

    /// Waits (on the paused clock) until the session's snapshot satisfies `f`.
    async fn until(&mut self, f: impl Fn(&Snapshot) -> bool) {
        until(&self.snapshot, f).await;
    }

    /// Lets `d` pass on the paused clock with the daemon's sweep once a minute (the default
    /// `check_schedule`) and a resume and a network return each hour: the outside events
    /// that must not make a waiting session try again by themselves.
    async fn pass(&self, d: Duration) {
        let end = tokio::time::Instant::now() + d;
        let mut minutes = 0u64;
        while tokio::time::Instant::now() < end {
            tokio::time::sleep((end - tokio::time::Instant::now()).min(Duration::from_secs(60))).await;
            minutes += 1;
            self.events.send(Event::Sweep).unwrap();
            if minutes.is_multiple_of(60) {
                self.events.send(Event::Wake).unwrap();
                self.events.send(Event::NetworkUp).unwrap();
            }
        }
        // A sweep may have started reading a credential file off the runtime. The paused
        // clock does not move while such a read runs, nor while a task is ready to run, so
        // this returns once the read is done and the loop has handled what it found.
        tokio::time::sleep(Duration::from_millis(1)).await;
        // The loop has handled everything sent above once it answers this.
        let _ = self.manager(ManagerCall::List).await;
    }

    /// Lets the paused clock run (with [`Rig::pass`]'s outside events) until the daemon's
    /// wall clock reads `t`.
    async fn pass_until(&self, t: f64) {
        let d = t - self.now();
        assert!(d >= 0.0, "{t} is {} s in the past", -d);
        self.pass(Duration::from_secs_f64(d)).await;
    }

    /// A reload (SIGHUP) with the same configuration.
    fn reload(&self) {
        let reload = Reload {
            sessions: vec![self.world.session()],
            params: self.world.params,
            peers: self.world.peers.clone(),
            default_credential: Credential::None,
            config_file: "config.toml".into(),
        };
        self.events.send(Event::Reload(Box::new(reload))).unwrap();
    }

    /// The names of the signals the loop sent to the bus since the last look, in order.
    fn signals(&mut self) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Ok(u) = self.updates.try_recv() {
            if let Update::Signal(_, s) = u {
                out.push(match s {
                    Signal::LoginSucceeded(_) => "LoginSucceeded",
                    Signal::LoginFailed(..) => "LoginFailed",
                    Signal::AuthorizationExpired => "AuthorizationExpired",
                    Signal::ReauthorizationRequired => "ReauthorizationRequired",
                });
            }
        }
        out
    }

    /// Stops the loop as SIGTERM does and waits until the state directory is free for the
    /// next run.
    async fn stop(self) -> World {
        let (tx, rx) = oneshot::channel();
        self.events.send(Event::Shutdown(tx)).unwrap();
        rx.await.unwrap();
        self.task.await.unwrap();
        // The writer task lets go of the store (and its lock) once it has seen the loop go.
        for _ in 0..10_000 {
            match Store::open(self.world.dir.path()) {
                Err(e) if e.is_locked() => tokio::task::yield_now().await,
                // Any other error comes after the lock was taken: it is free.
                _ => return self.world,
            }
        }
        panic!("the state directory stayed locked after the loop stopped");
    }

    async fn shutdown(self) -> tempfile::TempDir {
        self.stop().await.dir
    }

    fn record(dir: &std::path::Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("sessions/default.json")).unwrap()).unwrap()
    }
}

fn err_name(reply: &Reply) -> Option<ErrorName> {
    match reply {
        Reply::Err(e) => Some(e.name),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_refresh_starts_on_time() {
    let mut r = rig(100.0, Duration::ZERO, |_| {});
    r.until(|s| s.state == State::Valid).await;
    let first = r.peers().signs.lock().unwrap()[0];
    let expires = r.snapshot.load().expires_at.unwrap();
    assert!((expires - first - 100.0).abs() < 0.01);
    r.until(|s| s.expires_at.is_some_and(|e| e > expires)).await;
    let signs = r.peers().signs.lock().unwrap().clone();
    assert_eq!(signs.len(), 2, "{signs:?}");
    // Planned at expiry - margin; the paused clock makes the start exact.
    assert!((signs[1] - (expires - 10.0)).abs() < 0.01, "started at {} for {}", signs[1], expires - 10.0);
    assert_eq!(r.peers().logins.load(Ordering::SeqCst), 2);
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_thousand_waiters_share_one_refresh() {
    let mut r = rig(300.0, Duration::from_millis(500), |_| {});
    r.until(|s| s.state == State::Valid).await;
    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let (tx, rx) = oneshot::channel();
            let call = if i % 2 == 0 { Call::Refresh(tx) } else { Call::EnsureValid(3600, tx) };
            r.events.send(Event::Call(Arc::from("default"), call)).unwrap();
            rx
        })
        .collect();
    let mut expiries = std::collections::BTreeSet::new();
    for rx in calls {
        match rx.await.unwrap() {
            Reply::Expiry(e) | Reply::Token(_, e) => expiries.insert(e.to_bits()),
            other => panic!("{other:?}"),
        };
    }
    assert_eq!(expiries.len(), 1, "one refresh served every caller");
    assert_eq!(r.peers().logins.load(Ordering::SeqCst), 2, "the first login and one refresh");
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn reload_rules() {
    let mut r = rig(300.0, Duration::ZERO, |_| {});
    r.until(|s| s.state == State::Valid).await;
    // A session of the config file cannot be removed over D-Bus.
    let e = r.manager(|tx| ManagerCall::Remove("default".into(), tx)).await.unwrap_err();
    assert_eq!(e.name, ErrorName::InvalidArgument);
    assert!(e.message.contains("config.toml"), "{}", e.message);
    // One added over D-Bus can.
    let rx = r.manager(|tx| ManagerCall::Add(Box::new(profile("bus", Origin::Bus)), tx)).await.unwrap();
    assert_eq!(rx.load().id.as_ref(), "bus");
    // A reload whose file names `other` instead of `default`: `default` goes as
    // RemoveSession would remove it (its state too), `other` comes, `bus` stays.
    let reload = Reload {
        sessions: vec![profile("other", Origin::Config)],
        params: params(),
        peers: r.world.peers.clone(),
        default_credential: Credential::None,
        config_file: "config.toml".into(),
    };
    r.events.send(Event::Reload(Box::new(reload))).unwrap();
    let ids = r.manager(ManagerCall::List).await;
    let ids: Vec<&str> = ids.iter().map(|i| i.as_ref()).collect();
    assert_eq!(ids, ["bus", "other"]);
    let (mut seen, mut other) = (Vec::new(), None);
    while let Ok(u) = r.updates.try_recv() {
        match u {
            Update::Added(id, rx) => {
                seen.push(format!("+{id}"));
                other = Some(rx);
            }
            Update::Removed(id) => seen.push(format!("-{id}")),
            _ => {}
        }
    }
    assert_eq!(seen, ["-default", "+other"]);
    until(&other.unwrap(), |s| s.state == State::Valid).await;
    assert_eq!(r.manager(|tx| ManagerCall::Remove("bus".into(), tx)).await, Ok(()));
    let dir = r.shutdown().await;
    assert!(!dir.path().join("sessions/default.json").exists(), "the removed session's state is gone");
    assert!(!dir.path().join("sessions/bus.json").exists());
    assert!(dir.path().join("sessions/other.json").exists());
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_writes_what_could_not_be_written_before() {
    // The sessions directory is a file: every record write fails.
    let mut r = rig(300.0, Duration::ZERO, |d| {
        std::fs::remove_dir(d.join("sessions")).unwrap();
        std::fs::write(d.join("sessions"), "").unwrap();
    });
    r.until(|s| s.state == State::Valid).await;
    let token = r.snapshot.load().token.clone().unwrap();
    // The disk comes back before the daemon stops.
    std::fs::remove_file(r.world.dir.path().join("sessions")).unwrap();
    std::fs::create_dir(r.world.dir.path().join("sessions")).unwrap();
    let dir = r.shutdown().await;
    assert_eq!(Rig::record(dir.path())["token"], token.expose());
}

#[tokio::test(start_paused = true)]
async fn a_reservation_that_cannot_be_written_sends_no_login() {
    // The logins directory is a file: the budget's reservation cannot be written.
    let mut r = rig(300.0, Duration::ZERO, |d| {
        std::fs::remove_dir(d.join("logins")).unwrap();
        std::fs::write(d.join("logins"), "").unwrap();
    });
    r.until(|s| s.last_error == Some(ErrorName::Cancelled)).await;
    assert_eq!(r.peers().logins.load(Ordering::SeqCst), 0, "no login without its reservation on disk");
    assert_eq!(r.snapshot.load().state, State::Expired);
    let reply = r.call(Call::Refresh).await;
    assert!(matches!(reply, Reply::Err(ref e) if e.name == ErrorName::Cancelled), "{reply:?}");
    assert_eq!(r.peers().logins.load(Ordering::SeqCst), 0);
    r.shutdown().await;
}

/// A log of what the code under test says through `tracing`, while the guard of
/// [`Logs::capture`] lives (the test's current-thread runtime runs the loop on the test's
/// thread, where the subscriber is set).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn count(&self, what: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap()).matches(what).count()
    }
}

/// tests/faults.rs `backend_401_needs_reauthorization_until_the_credential_changes`: after
/// the backend rejects the credential, nothing tries again by itself (not the backoff, the
/// sweeps, a resume or the network) until the credential file changes; a client's `Refresh`
/// makes exactly one attempt, and the rejection is announced once.
#[tokio::test(start_paused = true)]
async fn a_rejected_credential_waits_for_a_change_of_the_file_or_a_client() {
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("credential");
    let write = |content: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&file, content).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    write("stale");
    let mut w = world(300.0, Duration::ZERO);
    w.credential = Credential::Source(CredentialSource::File(file.clone()));
    *w.peers.accepted.lock().unwrap() = Some("good".into());
    let mut r = w.start(|_| {});
    r.until(|s| s.state == State::NeedsReauthorization).await;
    assert_eq!(r.signs().len(), 1);
    assert_eq!(r.signals(), ["LoginFailed", "ReauthorizationRequired"]);
    assert_eq!(r.snapshot.load().last_error, Some(ErrorName::Unauthorized));
    assert_eq!(r.snapshot.load().refresh_at, 0.0, "no attempt planned");
    // A day with a sweep each minute: the backoff (1 s, at most 30 s) would have tried
    // thousands of times.
    r.pass(Duration::from_secs_f64(DAY)).await;
    assert_eq!(r.signs().len(), 1, "no automatic retry while the credential is rejected");
    assert!(r.signals().is_empty());
    // A client's Refresh makes exactly one attempt; the rejection is not announced again.
    let reply = r.call(Call::Refresh).await;
    assert_eq!(err_name(&reply), Some(ErrorName::Unauthorized), "{reply:?}");
    assert_eq!(r.signs().len(), 2);
    assert_eq!(r.signals(), ["LoginFailed"]);
    assert_eq!(r.snapshot.load().state, State::NeedsReauthorization);
    r.pass(Duration::from_secs(3600)).await;
    assert_eq!(r.signs().len(), 2, "nor after a client's attempt");
    // The file changes: the next sweep sees it and tries again, with the new credential.
    write("good");
    let changed = r.now();
    r.pass(Duration::from_secs(60)).await;
    r.until(|s| s.state == State::Valid).await;
    let signs = r.signs();
    assert_eq!(signs.len(), 3);
    assert!(same(signs[2], changed + 60.0), "tried at {} for the sweep at {}", signs[2], changed + 60.0);
    assert_eq!(r.signals(), ["LoginSucceeded"]);
    r.shutdown().await;
}

/// tests/faults.rs `backend_403_emits_reauthorization_required_and_other_4xx_fails`: after a
/// permanent error (another 4xx of either peer) nothing tries again by itself, not even when
/// the token it kept expires; a client can.
#[tokio::test(start_paused = true)]
async fn a_permanent_error_is_not_retried_until_a_client_asks() {
    for (sign, f, name) in [
        (true, failure(Peer::Backend, FailureKind::Permanent, 400), ErrorName::BackendError),
        (false, failure(Peer::Entrupy, FailureKind::Permanent, 404), ErrorName::ServerError),
    ] {
        let mut r = rig(300.0, Duration::ZERO, |_| {});
        r.until(|s| s.state == State::Valid).await;
        let peers = r.world.peers.clone();
        let fails = if sign { &peers.sign_fails } else { &peers.login_fails };
        *fails.lock().unwrap() = Some(f);
        r.signals();
        let reply = r.call(Call::Refresh).await;
        assert_eq!(err_name(&reply), Some(name), "{reply:?}");
        assert_eq!(r.snapshot.load().state, State::Failed);
        assert_eq!(r.snapshot.load().refresh_at, 0.0, "{name:?}: no attempt planned");
        assert_eq!(r.signals(), ["LoginFailed"]);
        // The token expires 300 s after the login; a day later, still nothing was tried.
        r.pass(Duration::from_secs_f64(DAY)).await;
        assert_eq!(r.signs().len(), 2, "{name:?}: no automatic retry after a permanent error");
        assert_eq!(r.signals(), ["AuthorizationExpired"]);
        assert_eq!(r.snapshot.load().state, State::Failed);
        *fails.lock().unwrap() = None;
        assert!(matches!(r.call(Call::Refresh).await, Reply::Expiry(_)), "{name:?}: a client may try");
        assert_eq!(r.snapshot.load().state, State::Valid);
        assert_eq!(r.signs().len(), 3);
        r.shutdown().await;
    }
}

/// tests/reliability.rs `without_pacing_the_budget_alone_holds_refreshes_back`: 3 s tokens
/// refreshed 1 s before expiry with 3 logins a day: a refresh every 2 s until the budget is
/// spent, then nothing until the first login leaves the 24-hour window, at that very moment.
#[tokio::test(start_paused = true)]
async fn without_pacing_the_budget_alone_holds_refreshes_back() {
    let mut w = world(3.0, Duration::ZERO);
    w.params = Params { margin: 1.0, budget: Budget { per_minute: 5, per_day: 3 }, ..params() };
    let mut r = w.start(|_| {});
    r.until(|s| s.logins_today == 3).await;
    let signs = r.signs();
    let t0 = signs[0];
    assert_eq!(signs.len(), 3);
    assert!(same(signs[1], t0 + 2.0) && same(signs[2], t0 + 4.0), "{signs:?}");
    r.until(|s| s.state == State::Expired).await;
    let s = r.snapshot.load();
    assert!(same(s.refresh_at, t0 + DAY), "RefreshAt shows when the budget frees: {}", s.refresh_at - t0);
    assert!(!s.pacing);
    let reply = r.call(Call::Refresh).await;
    assert_eq!(err_name(&reply), Some(ErrorName::TooManyRequests), "{reply:?}");
    r.pass_until(t0 + DAY - 0.01).await;
    assert_eq!(r.signs().len(), 3, "nothing before the budget frees");
    r.pass(Duration::from_millis(20)).await;
    r.until(|s| s.state == State::Valid).await;
    let signs = r.signs();
    assert_eq!(signs.len(), 4);
    assert!(same(signs[3], t0 + DAY), "refreshed {} s after the budget freed", signs[3] - (t0 + DAY));
    r.shutdown().await;
}

/// tests/reliability.rs `short_tokens_are_paced_so_the_daily_budget_lasts`: with pacing, 3 s
/// tokens and 4 logins a day, half the budget goes at the natural pace, then automatic
/// attempts come one per 24 h / 4 after the last; said once in the log; clients are not
/// paced.
#[tokio::test(start_paused = true)]
async fn short_tokens_are_paced_so_the_daily_budget_lasts() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let mut w = world(3.0, Duration::ZERO);
    w.params = Params { margin: 1.0, budget: Budget { per_minute: 5, per_day: 4 }, pace: true, ..params() };
    let mut r = w.start(|_| {});
    r.until(|s| s.pacing).await;
    let signs = r.signs();
    let t0 = signs[0];
    assert_eq!(signs.len(), 2);
    assert!(same(signs[1], t0 + 2.0), "{signs:?}");
    let paced = t0 + 2.0 + DAY / 4.0;
    assert!(same(r.snapshot.load().refresh_at, paced), "RefreshAt shows the paced attempt");
    r.pass_until(paced - 0.01).await;
    assert_eq!(r.signs().len(), 2, "nothing before the paced attempt, though the token expired");
    assert_eq!(r.snapshot.load().state, State::Expired);
    r.pass(Duration::from_millis(20)).await;
    r.until(|s| s.state == State::Valid).await;
    let signs = r.signs();
    assert_eq!(signs.len(), 3);
    assert!(same(signs[2], paced), "the paced attempt came {} s late", signs[2] - paced);
    assert_eq!(logs.count("pacing refreshes"), 1, "said once, however many ticks and logins since");
    // A client is not paced (the budget still holds: one login of four is left).
    let asked = r.now();
    assert!(matches!(r.call(Call::Refresh).await, Reply::Expiry(_)));
    assert!(same(r.signs()[3], asked));
    r.shutdown().await;
}

/// tests/lifecycle.rs `proactive_refresh_keeps_the_token_valid_with_one_login_per_cycle`:
/// over many cycles, each refresh starts at `expiry - margin`, one login per cycle, and the
/// token (with logins that take 2 s) is never invalid in between.
#[tokio::test(start_paused = true)]
async fn cycle_after_cycle_one_refresh_each_and_never_invalid() {
    let mut r = rig(100.0, Duration::from_secs(2), |_| {});
    r.until(|s| s.state == State::Valid).await;
    let mut invalid = 0;
    while r.signs().len() < 21 {
        if !r.snapshot.load().valid(r.now()) {
            invalid += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.until(|s| s.state == State::Valid).await;
    assert_eq!(invalid, 0, "the token was invalid at some point between refreshes");
    let signs = r.signs();
    // Each login answers 2 s after the request with a token of 100 s; the next request
    // leaves 10 s (the margin) before that token expires.
    for pair in signs.windows(2) {
        assert!(same(pair[1] - pair[0], 92.0), "refreshes {} s apart", pair[1] - pair[0]);
    }
    assert_eq!(r.peers().logins.load(Ordering::SeqCst), signs.len(), "one login per cycle");
    r.shutdown().await;
}

/// tests/lifecycle.rs `a_restart_costs_no_login_and_keeps_the_token`: a restart before the
/// refresh point serves the stored token at once and sends nothing until the stored plan.
#[tokio::test(start_paused = true)]
async fn a_restart_keeps_the_token_and_its_refresh_plan() {
    let mut r = rig(300.0, Duration::ZERO, |_| {});
    r.until(|s| s.state == State::Valid).await;
    let t0 = r.signs()[0];
    let before = Snapshot::clone(&r.snapshot.load());
    assert!(same(before.refresh_at, t0 + 290.0));
    let w = r.stop().await;
    tokio::time::sleep(Duration::from_secs(100)).await;
    let r = w.start(|_| {});
    let s = r.snapshot.load();
    assert_eq!((s.state, &s.token), (State::Valid, &before.token));
    // Read back from the state file exactly (serde_json's `float_roundtrip`).
    assert_eq!(s.expires_at, before.expires_at);
    assert!(same(s.refresh_at, t0 + 290.0), "the stored plan is kept");
    r.pass_until(t0 + 289.99).await;
    assert_eq!(r.signs().len(), 1, "no login after the restart before the plan");
    r.pass(Duration::from_millis(20)).await;
    let signs = r.signs();
    assert_eq!(signs.len(), 2);
    assert!(same(signs[1], t0 + 290.0), "refreshed at {} for the plan at {}", signs[1], t0 + 290.0);
    r.shutdown().await;
}

/// tests/lifecycle.rs `a_stored_token_past_its_refresh_point_is_refreshed_at_start`: 6 s
/// tokens with a 5 s margin are refreshed 3 s after the login. A restart before that keeps the
/// plan; a restart after it refreshes at once, while the stored token is still valid.
#[tokio::test(start_paused = true)]
async fn a_stored_token_past_its_refresh_point_is_refreshed_at_start() {
    let mut w = world(6.0, Duration::ZERO);
    w.params = Params { margin: 5.0, ..params() };
    let mut r = w.start(|_| {});
    r.until(|s| s.state == State::Valid).await;
    let t0 = r.signs()[0];
    let w = r.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Before the point: the plan holds.
    let mut r = w.start(|_| {});
    r.pass_until(t0 + 2.99).await;
    assert_eq!(r.signs().len(), 1);
    r.pass(Duration::from_millis(20)).await;
    r.until(|s| s.expires_at.is_some_and(|e| e > t0 + 7.0)).await;
    let t1 = r.signs()[1];
    assert!(same(t1, t0 + 3.0), "refreshed at {} s, planned at 3 s", t1 - t0);
    // After the point (3 s after the new login), and before the expiry (6 s after it).
    let w = r.stop().await;
    tokio::time::sleep(Duration::from_secs_f64(t1 + 3.5 - w.clock.now())).await;
    let restarted = w.clock.now();
    let mut r = w.start(|_| {});
    assert!(r.snapshot.load().valid(restarted), "the stored token is still valid");
    r.until(|s| s.expires_at.is_some_and(|e| e > t1 + 7.0)).await;
    let signs = r.signs();
    assert_eq!(signs.len(), 3);
    assert!(same(signs[2], restarted), "refreshed {} s after the start", signs[2] - restarted);
    r.shutdown().await;
}

/// tests/lifecycle.rs `cleanup_drops_the_token_and_survives_a_restart` and
/// `a_backend_configured_later_starts_a_session_that_was_only_waiting_for_one`: after
/// `Cleanup`, no reload, restart, sweep, resume or network return logs in again; a client's
/// `Refresh` does, and the refreshes go on from there.
#[tokio::test(start_paused = true)]
async fn cleanup_holds_across_a_reload_and_a_restart_until_a_client_asks() {
    let mut r = rig(300.0, Duration::ZERO, |_| {});
    r.until(|s| s.state == State::Valid).await;
    assert_eq!(r.call(Call::Cleanup).await, Reply::Done);
    assert_eq!(r.snapshot.load().state, State::LoggedOut);
    r.reload();
    r.pass(Duration::from_secs_f64(DAY)).await;
    assert_eq!(r.snapshot.load().state, State::LoggedOut, "a reload does not undo Cleanup");
    let mut r = r.stop().await.start(|_| {});
    assert_eq!(r.snapshot.load().state, State::LoggedOut, "Cleanup is persisted");
    r.pass(Duration::from_secs_f64(DAY)).await;
    assert_eq!(r.signs().len(), 1, "no login after Cleanup");
    assert!(matches!(r.call(Call::Refresh).await, Reply::Expiry(_)));
    assert_eq!(r.snapshot.load().state, State::Valid);
    let asked = r.signs()[1];
    r.until(|s| s.last_login_at.is_some_and(|t| t > asked + 1.0)).await;
    assert!(same(r.signs()[2], asked + 290.0), "refreshing again after the client's login");
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_sweep_catches_a_refresh_missed_in_a_suspend() {
    let mut r = rig(300.0, Duration::ZERO, |_| {});
    r.until(|s| s.state == State::Valid).await;
    let t0 = r.signs()[0];
    assert!(same(r.snapshot.load().refresh_at, t0 + 290.0));
    // A sweep before the plan does nothing.
    r.events.send(Event::Sweep).unwrap();
    let _ = r.manager(ManagerCall::List).await;
    assert_eq!(r.signs().len(), 1);
    // A suspend: the wall clock moves 10 minutes, the monotonic timers stand still (and no
    // resume signal comes). The refresh and the expiry passed unseen; the next sweep sees it.
    r.world.clock.shift_ms(600_000);
    let _ = r.manager(ManagerCall::List).await;
    assert_eq!(r.signs().len(), 1, "the monotonic timer has not fired");
    r.events.send(Event::Sweep).unwrap();
    r.until(|s| s.state == State::Valid && s.expires_at.is_some_and(|e| e > t0 + 600.0)).await;
    let signs = r.signs();
    assert_eq!(signs.len(), 2, "one attempt, at the sweep: {signs:?}");
    // At the sweep (the reservation's write on the blocking pool lets the paused clock move
    // a few ms).
    assert!((0.0..1.0).contains(&(signs[1] - (t0 + 600.0))), "tried at {} after the suspend", signs[1] - t0);
    // The status line counts the sessions without reading them.
    let status = r.status().await;
    assert_eq!(status, "1 session(s): 1 valid");
    r.shutdown().await;
}
