//! The loop driven in-process: tokio's paused clock (which the daemon's wall clock follows),
//! a fake peer behind [`Peers`], and a real state directory in a temporary folder. No
//! sleeping: `tokio::time::sleep` under `pause()` only moves the clock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::http::{Failure, LoginOk, SignRequest, Signed};
use crate::policy::Budget;
use crate::session::State;
use crate::store::Store;

/// A peer that signs everything and logs in after `delay`, with tokens of `lifetime`.
#[derive(Debug)]
struct FakePeers {
    clock: Clock,
    lifetime: f64,
    delay: Duration,
    /// When each signing request arrived (daemon clock).
    signs: Mutex<Vec<f64>>,
    logins: AtomicUsize,
}

#[async_trait::async_trait]
impl Peers for FakePeers {
    fn has_backend(&self) -> bool {
        true
    }

    async fn sign(&self, _req: &SignRequest<'_>) -> Option<Result<Signed, Failure>> {
        self.signs.lock().unwrap().push(self.clock.now());
        Some(Ok(Signed { signed: Secret::new("signed"), username: "Ada".into(), conflict: false }))
    }

    async fn login(&self, _signed: &Secret, _now: f64) -> Result<LoginOk, Failure> {
        tokio::time::sleep(self.delay).await;
        let n = self.logins.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(LoginOk {
            token: Secret::new(format!("token-{n}")),
            expires_at: self.clock.now() + self.lifetime,
            username: None,
        })
    }
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

struct Rig {
    events: mpsc::UnboundedSender<Event>,
    updates: mpsc::UnboundedReceiver<Update>,
    peers: Arc<FakePeers>,
    dir: tempfile::TempDir,
    snapshot: Published,
    task: tokio::task::JoinHandle<()>,
}

/// A loop with one configured session, `default`; `prepare` may spoil the state directory
/// before the loop starts.
fn rig(lifetime: f64, delay: Duration, prepare: impl FnOnce(&std::path::Path)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    prepare(dir.path());
    let (events, events_rx) = mpsc::unbounded_channel();
    let (updates_tx, updates) = mpsc::unbounded_channel();
    let unsaved = events.clone();
    let writer = Writer::spawn(Some(store), move |id| {
        let _ = unsaved.send(Event::Unsaved(Arc::from(id)));
    })
    .unwrap();
    let clock = Clock::following_tokio();
    let peers = Arc::new(FakePeers {
        clock: clock.clone(),
        lifetime,
        delay,
        signs: Mutex::default(),
        logins: AtomicUsize::new(0),
    });
    let mut engine = Engine::new(Setup {
        ledger: Ledger::default(),
        params: params(),
        peers: peers.clone(),
        default_credential: Credential::None,
        config_file: "config.toml".into(),
        device_id: Arc::from("0123456789abcdef0123456789abcdef"),
        clock: clock.clone(),
        writer,
        updates: updates_tx,
    });
    let mut served = engine.load(vec![profile("default", Origin::Config)], BTreeMap::new());
    let snapshot = served.remove(0).1;
    let task = tokio::spawn(engine.run(events_rx));
    Rig { events, updates, peers, dir, snapshot, task }
}

impl Rig {
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

    /// Waits (on the paused clock) until the session's snapshot satisfies `f`.
    async fn until(&mut self, f: impl Fn(&Snapshot) -> bool) {
        until(&self.snapshot, f).await;
    }

    async fn shutdown(self) -> tempfile::TempDir {
        let (tx, rx) = oneshot::channel();
        self.events.send(Event::Shutdown(tx)).unwrap();
        rx.await.unwrap();
        self.task.await.unwrap();
        self.dir
    }

    fn record(dir: &std::path::Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("sessions/default.json")).unwrap()).unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn a_refresh_starts_on_time() {
    let mut r = rig(100.0, Duration::ZERO, |_| {});
    r.until(|s| s.state == State::Valid).await;
    let first = r.peers.signs.lock().unwrap()[0];
    let expires = r.snapshot.load().expires_at.unwrap();
    assert!((expires - first - 100.0).abs() < 0.01);
    r.until(|s| s.expires_at.is_some_and(|e| e > expires)).await;
    let signs = r.peers.signs.lock().unwrap().clone();
    assert_eq!(signs.len(), 2, "{signs:?}");
    // Planned at expiry - margin; the paused clock makes the start exact.
    assert!((signs[1] - (expires - 10.0)).abs() < 0.01, "started at {} for {}", signs[1], expires - 10.0);
    assert_eq!(r.peers.logins.load(Ordering::SeqCst), 2);
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
    assert_eq!(r.peers.logins.load(Ordering::SeqCst), 2, "the first login and one refresh");
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
        peers: r.peers.clone(),
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
    std::fs::remove_file(r.dir.path().join("sessions")).unwrap();
    std::fs::create_dir(r.dir.path().join("sessions")).unwrap();
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
    assert_eq!(r.peers.logins.load(Ordering::SeqCst), 0, "no login without its reservation on disk");
    assert_eq!(r.snapshot.load().state, State::Expired);
    let reply = r.call(Call::Refresh).await;
    assert!(matches!(reply, Reply::Err(ref e) if e.name == ErrorName::Cancelled), "{reply:?}");
    assert_eq!(r.peers.logins.load(Ordering::SeqCst), 0);
    r.shutdown().await;
}
