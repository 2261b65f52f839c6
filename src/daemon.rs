//! The daemon process: loads the state, starts one task per session, serves the bus, and
//! runs the main loop (shutdown, reload, the wall-clock sweep).
//!
//! [`run`] takes its shutdown trigger and reload requests from the caller (the binary wires
//! them to SIGTERM/SIGINT and SIGHUP), so tests can drive it in-process.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use zbus::Connection;

use crate::bus::{Access, ManagerObject, Notifier, ObjectManagerObject, ProfileArgs, Registry, SessionObject};
use crate::clock::{Clock, until};
use crate::config::{self, Config, ConfigLocation};
use crate::error::{ApiError, ErrorName};
use crate::http::{self, Clients};
use crate::names;
use crate::session::{self, Credential, Params, Profile, SessionHandle, Settings, Shared};
use crate::store::{SessionRecord, Store, StoredProfile};
use crate::watch::{Outside, SystemBus, WallEvent, WallTimer};

/// Most sessions one daemon serves; `AddSession` beyond it is refused.
pub const MAX_SESSIONS: usize = 20_000;

/// Why the daemon could not run, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Invalid configuration (exit 78).
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// The bus cannot be reached or the name is taken (exit 69).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (exit 1).
    #[error("{0}")]
    Other(String),
}

impl RunError {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Config(_) => 78,
            RunError::Unavailable(_) => 69,
            RunError::Other(_) => 1,
        }
    }
}

struct Entry {
    handle: SessionHandle,
    from_dbus: bool,
}

struct Inner {
    config: Config,
    clients: Arc<Clients>,
    sessions: BTreeMap<String, Entry>,
}

/// The running daemon: the registry of sessions and what they share.
pub struct Daemon {
    shared: Arc<Shared>,
    access: Arc<Access>,
    notifier: Arc<Notifier>,
    conn: Connection,
    /// New session objects are announced with `InterfacesAdded`: false only while the
    /// sessions found at start are served, before the bus name is claimed.
    announce_sessions: std::sync::atomic::AtomicBool,
    inner: tokio::sync::Mutex<Inner>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Daemon")
    }
}

fn build_clients(config: &Config) -> Result<Clients, String> {
    let client = http::build_client(config.http_timeout)?;
    Clients::new(client, &config.api_url, config.backend.as_ref().map(|b| b.url.clone()))
}

fn configured_profile(config: &Config, s: &config::SessionConfig) -> Profile {
    Profile {
        id: s.id.clone(),
        unique_user_id: s.unique_user_id.clone(),
        email: s.email.clone(),
        first_name: s.first_name.clone(),
        last_name: s.last_name.clone(),
        credential: config.credential_for(s).map(Credential::Source).unwrap_or(Credential::None),
        from_dbus: false,
    }
}

fn dbus_profile(config: &Config, id: &str, p: &StoredProfile) -> Profile {
    let credential = match &p.backend_token {
        Some(t) => Credential::Inline(t.clone()),
        None => config
            .backend
            .as_ref()
            .and_then(|b| b.token_file.clone())
            .map(Credential::Source)
            .unwrap_or(Credential::None),
    };
    Profile {
        id: id.to_owned(),
        unique_user_id: p.unique_user_id.clone(),
        email: p.email.clone(),
        first_name: p.first_name.clone(),
        last_name: p.last_name.clone(),
        credential,
        from_dbus: true,
    }
}

impl Daemon {
    fn settings(&self, inner: &Inner, profile: Profile) -> Settings {
        Settings { profile, params: Params::from_config(&inner.config), clients: inner.clients.clone() }
    }

    /// Serves a session's object (its changes reach the bus through the one publisher).
    async fn attach(&self, handle: SessionHandle) -> Result<(), zbus::Error> {
        let path = names::session_path(handle.id());
        let obj = SessionObject::new(handle, self.access.clone());
        let server = self.conn.object_server();
        if self.announce_sessions.load(std::sync::atomic::Ordering::Relaxed) {
            server.at(path.as_str(), obj).await?;
        } else {
            // Before the name is claimed, an `InterfacesAdded` per session reaches no client
            // watching the service (they read `GetManagedObjects` once the name appears) and
            // costs the bus and us about 20 us each: 200 ms of start-up with 10,000 sessions.
            server.at_quiet(path.as_str(), obj).await?;
        }
        Ok(())
    }

    async fn detach(&self, id: &str) {
        let path = names::session_path(id);
        if let Err(e) = self.conn.object_server().remove::<SessionObject, _>(path.as_str()).await {
            warn!(session = id, error = %e, "cannot remove the session's object");
        }
    }

    async fn start_session(
        &self,
        inner: &mut Inner,
        profile: Profile,
        record: Option<SessionRecord>,
    ) -> Result<(), ApiError> {
        let id = profile.id.clone();
        let from_dbus = profile.from_dbus;
        let settings = self.settings(inner, profile);
        let handle = session::spawn(settings, record, self.shared.clone());
        match self.attach(handle.clone()).await {
            Ok(()) => {
                inner.sessions.insert(id, Entry { handle, from_dbus });
                Ok(())
            }
            Err(e) => {
                handle.stop(false).await;
                Err(ApiError::new(ErrorName::InvalidArgument, format!("cannot serve the session on the bus: {e}")))
            }
        }
    }

    /// Wakes every session (sweep, resume, clock change).
    pub async fn wake_all(&self) {
        let inner = self.inner.lock().await;
        for e in inner.sessions.values() {
            e.handle.wake();
        }
    }

    /// The periodic sweep: wakes only the sessions whose wall-clock deadline passed unseen
    /// (a late monotonic timer after a suspend) or that wait for a credential change; a
    /// resting session costs nothing.
    pub async fn sweep(&self) {
        let now = self.shared.clock.now();
        let inner = self.inner.lock().await;
        for e in inner.sessions.values() {
            if e.handle.needs_sweep(now) {
                e.handle.wake();
            }
        }
    }

    /// Tells every session the network is back.
    pub async fn network_up(&self) {
        let inner = self.inner.lock().await;
        for e in inner.sessions.values() {
            e.handle.network_up();
        }
    }

    /// A one-line summary for `sd_notify` STATUS and logs.
    pub async fn status_line(&self) -> String {
        let inner = self.inner.lock().await;
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        for e in inner.sessions.values() {
            *counts.entry(e.handle.with_snapshot(|s| s.state.as_str())).or_default() += 1;
        }
        if counts.is_empty() {
            return "no sessions configured".to_owned();
        }
        let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        format!("{} session(s): {}", inner.sessions.len(), parts.join(", "))
    }

    /// Applies a new configuration (SIGHUP).
    pub async fn reload(&self, config: Config) {
        let mut inner = self.inner.lock().await;
        if config.state_dir != inner.config.state_dir {
            warn!("state_dir changed; the new directory is used after a restart");
        }
        match build_clients(&config) {
            Ok(c) => inner.clients = Arc::new(c),
            Err(e) => {
                error!(error = %e, "reload failed; keeping the old configuration");
                return;
            }
        }
        self.access.set_token_executables(config.access.token_executables.clone());
        self.notifier.set_enabled(config.notify.enabled);
        inner.config = config;
        let wanted: BTreeMap<String, config::SessionConfig> =
            inner.config.sessions.iter().map(|s| (s.id.clone(), s.clone())).collect();
        // Configured sessions that left the file stop (their state stays on disk).
        let gone: Vec<String> = inner
            .sessions
            .iter()
            .filter(|(id, e)| !e.from_dbus && !wanted.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(e) = inner.sessions.remove(&id) {
                info!(session = %id, "session removed from the configuration");
                e.handle.stop(false).await;
                self.detach(&id).await;
            }
        }
        for (id, sc) in &wanted {
            let profile = configured_profile(&inner.config, sc);
            if let Some(e) = inner.sessions.get_mut(id) {
                e.from_dbus = false;
                let settings = self.settings(&inner, profile);
                if let Some(e) = inner.sessions.get(id) {
                    e.handle.reconfigure(settings).await;
                }
            } else {
                info!(session = %id, "session added by the configuration");
                let record = self.load_record(id).await;
                if let Err(e) = self.start_session(&mut inner, profile, record).await {
                    error!(session = %id, error = %e, "cannot start the session");
                }
            }
        }
        let dbus: Vec<(String, SessionHandle)> =
            inner.sessions.iter().filter(|(_, e)| e.from_dbus).map(|(id, e)| (id.clone(), e.handle.clone())).collect();
        for (id, handle) in dbus {
            if let Some(rec) = self.load_record(&id).await
                && let Some(p) = rec.profile
            {
                let settings = self.settings(&inner, dbus_profile(&inner.config, &id, &p));
                handle.reconfigure(settings).await;
            }
        }
        info!(sessions = inner.sessions.len(), "configuration reloaded");
    }

    async fn load_record(&self, id: &str) -> Option<SessionRecord> {
        let store = self.shared.store.clone()?;
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || store.load_session(&id).ok().flatten()).await.ok().flatten()
    }

    /// Stops every session, flushing its state.
    pub async fn shutdown(&self) {
        let mut inner = self.inner.lock().await;
        let entries: Vec<(String, Entry)> = std::mem::take(&mut inner.sessions).into_iter().collect();
        let stops = entries.iter().map(|(_, e)| e.handle.stop(false));
        futures_util::future::join_all(stops).await;
    }
}

#[async_trait::async_trait]
impl Registry for Daemon {
    async fn list(&self) -> Vec<String> {
        self.inner.lock().await.sessions.keys().map(|id| names::session_path(id)).collect()
    }

    async fn exists(&self, id: &str) -> bool {
        self.inner.lock().await.sessions.contains_key(id)
    }

    async fn add(&self, id: &str, p: ProfileArgs) -> Result<(), ApiError> {
        let mut inner = self.inner.lock().await;
        if inner.sessions.contains_key(id) {
            return Err(ApiError::new(ErrorName::AlreadyExists, format!("session {id:?} exists")));
        }
        if inner.sessions.len() >= MAX_SESSIONS {
            return Err(ApiError::new(ErrorName::InvalidArgument, format!("at most {MAX_SESSIONS} sessions")));
        }
        let stored = StoredProfile {
            unique_user_id: p.unique_user_id,
            email: p.email,
            first_name: p.first_name,
            last_name: p.last_name,
            backend_token: p.backend_token,
        };
        let record = SessionRecord {
            version: crate::store::FORMAT_VERSION,
            id: id.to_owned(),
            profile: Some(stored.clone()),
            unique_user_id: stored.unique_user_id.clone(),
            ..Default::default()
        };
        if let Some(store) = self.shared.store.clone() {
            let rec = record.clone();
            match tokio::task::spawn_blocking(move || store.save_session(&rec)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    error!(session = id, error = %e, "cannot persist the new session; it lives in memory only")
                }
                Err(e) => error!(error = %e, "state writer failed"),
            }
        }
        let profile = dbus_profile(&inner.config, id, &stored);
        info!(session = id, unique_user_id = %stored.unique_user_id, "session added over D-Bus");
        self.start_session(&mut inner, profile, Some(record)).await
    }

    async fn snapshots(&self) -> Vec<session::Snapshot> {
        self.inner.lock().await.sessions.values().map(|e| e.handle.snapshot()).collect()
    }

    async fn remove(&self, id: &str) -> Result<(), ApiError> {
        let mut inner = self.inner.lock().await;
        let Some(entry) = inner.sessions.remove(id) else {
            return Err(crate::bus::no_such_session(id));
        };
        entry.handle.stop(true).await;
        self.detach(id).await;
        info!(session = id, "session removed");
        Ok(())
    }
}

/// Opens the state directory; on failure the daemon runs from memory (logged).
fn open_store(config: &Config) -> Option<Store> {
    let dir = match config::state_dir(config) {
        Ok(d) => d,
        Err(e) => {
            error!(error = %e, "no state directory; running without saving state");
            return None;
        }
    };
    match Store::open(&dir) {
        Ok(s) => Some(s),
        Err(e) => {
            error!(error = %e, "cannot use the state directory; running without saving state");
            None
        }
    }
}

/// Sends a notification to systemd when it started us; harmless otherwise.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    let _ = sd_notify::notify(false, states);
}

/// What the main loop is told from outside, and what it runs on.
#[derive(Debug)]
pub struct Controls {
    /// Fires on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
    /// One message per SIGHUP.
    pub reload: mpsc::UnboundedReceiver<()>,
    /// The wall clock (tests shift it to simulate suspend and clock changes).
    pub clock: Clock,
    /// The session bus address; `None` uses `$DBUS_SESSION_BUS_ADDRESS`.
    pub session_bus: Option<String>,
    /// The system bus to watch for resume and network signals.
    pub system_bus: SystemBus,
    /// Extra outside events (tests inject clock changes through it).
    pub outside: Option<mpsc::UnboundedReceiver<Outside>>,
}

impl Controls {
    /// The production controls: the system clock and the standard buses.
    pub fn new(shutdown: CancellationToken, reload: mpsc::UnboundedReceiver<()>) -> Self {
        Controls {
            shutdown,
            reload,
            clock: Clock::system(),
            session_bus: None,
            system_bus: SystemBus::Default,
            outside: None,
        }
    }
}

/// Runs the daemon until `controls.shutdown` fires.
pub async fn run(location: ConfigLocation, config: Config, mut controls: Controls) -> Result<(), RunError> {
    let clock = controls.clock.clone();
    let started = std::time::Instant::now();
    let store = open_store(&config);
    // Read on this thread, not the blocking pool: nothing is served yet, and what is read
    // stays in the main allocator arena instead of pinning a worker thread's arena (with
    // 10,000 sessions, about 8 MiB).
    let (device_id, logins, records) = match store.as_ref() {
        Some(s) => {
            let device_id = s.device_id().unwrap_or_else(|e| {
                error!(error = %e, "cannot keep the device id; using a new one for this run");
                crate::authreq::random_hex128()
            });
            let logins = s.load_logins().unwrap_or_else(|e| {
                error!(error = %e, "cannot read the login histories");
                Default::default()
            });
            let records = s.load_sessions().unwrap_or_else(|e| {
                error!(error = %e, "cannot read the session states");
                Default::default()
            });
            (device_id, logins, records)
        }
        None => (crate::authreq::random_hex128(), Default::default(), Default::default()),
    };
    debug!(sessions = records.len(), elapsed_ms = started.elapsed().as_millis() as u64, "state loaded");
    let clients = Arc::new(build_clients(&config).map_err(RunError::Other)?);
    let (updates_tx, updates_rx) = mpsc::unbounded_channel();
    let timers = Arc::new(session::Timers::default());
    tokio::spawn(timers.clone().run());
    let shared = Arc::new(Shared {
        store,
        logins: std::sync::Mutex::new(logins.into_iter().collect()),
        logins_write: std::sync::Mutex::new(()),
        updates: updates_tx,
        timers: timers.clone(),
        device_id,
        clock: clock.clone(),
    });

    // A plain dbus-daemon that activates us may pass its address only as
    // DBUS_STARTER_ADDRESS; use it when DBUS_SESSION_BUS_ADDRESS is absent.
    let starter = std::env::var("DBUS_STARTER_ADDRESS").ok().filter(|_| {
        std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none()
            && std::env::var("DBUS_STARTER_BUS_TYPE").map(|t| t == "session").unwrap_or(false)
    });
    let builder = match controls.session_bus.as_ref().or(starter.as_ref()) {
        Some(addr) => zbus::connection::Builder::address(addr.as_str()),
        None => zbus::connection::Builder::session(),
    };
    let unavailable = |e: zbus::Error| RunError::Unavailable(format!("cannot reach the D-Bus session bus: {e}"));
    let conn = builder.map_err(unavailable)?.build().await.map_err(unavailable)?;

    let notifier = Arc::new(Notifier::new(conn.clone(), config.notify.enabled));
    tokio::spawn(crate::bus::publisher(conn.clone(), updates_rx, Some(notifier.clone())));
    let access = Arc::new(Access::new());
    access.set_token_executables(config.access.token_executables.clone());
    let daemon = Arc::new(Daemon {
        shared,
        access,
        notifier,
        conn: conn.clone(),
        announce_sessions: std::sync::atomic::AtomicBool::new(false),
        inner: tokio::sync::Mutex::new(Inner { config: config.clone(), clients, sessions: BTreeMap::new() }),
    });

    // The object manager first, so that sessions added after the name is claimed are
    // announced with InterfacesAdded.
    conn.object_server()
        .at(names::MANAGER_PATH, ObjectManagerObject::new(daemon.clone()))
        .await
        .map_err(|e| RunError::Other(format!("cannot serve the object manager: {e}")))?;
    {
        let mut inner = daemon.inner.lock().await;
        let mut records = records;
        for sc in config.sessions.clone() {
            let profile = configured_profile(&config, &sc);
            let record = records.remove(&sc.id);
            if let Err(e) = daemon.start_session(&mut inner, profile, record).await {
                error!(session = %sc.id, error = %e, "cannot start the session");
            }
        }
        for (id, rec) in records {
            if let Some(p) = rec.profile.clone() {
                let profile = dbus_profile(&config, &id, &p);
                if let Err(e) = daemon.start_session(&mut inner, profile, Some(rec)).await {
                    error!(session = %id, error = %e, "cannot start the session");
                }
            }
        }
    }

    // Sessions added from here on (AddSession, reload) are announced.
    daemon.announce_sessions.store(true, std::sync::atomic::Ordering::Relaxed);
    let server = conn.object_server();
    server
        .at(names::MANAGER_PATH, ManagerObject::new(daemon.clone(), daemon.access.clone()))
        .await
        .map_err(|e| RunError::Other(format!("cannot serve the manager: {e}")))?;

    debug!(elapsed_ms = started.elapsed().as_millis() as u64, "objects served");
    // The name is claimed only once every object is served.
    match conn.request_name_with_flags(names::BUS_NAME, zbus::fdo::RequestNameFlags::DoNotQueue.into()).await {
        Ok(zbus::fdo::RequestNameReply::PrimaryOwner | zbus::fdo::RequestNameReply::AlreadyOwner) => {}
        Ok(_) | Err(zbus::Error::NameTaken) => {
            daemon.shutdown().await;
            return Err(RunError::Unavailable(format!(
                "the bus name {} is already owned: another instance runs",
                names::BUS_NAME
            )));
        }
        Err(e) => {
            daemon.shutdown().await;
            return Err(RunError::Unavailable(format!("cannot own the bus name {}: {e}", names::BUS_NAME)));
        }
    }
    let status = daemon.status_line().await;
    info!(
        version = names::VERSION,
        name = names::BUS_NAME,
        %status,
        startup_ms = started.elapsed().as_millis() as u64,
        "ready"
    );
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);

    let (outside_tx, mut outside_rx) = mpsc::unbounded_channel();
    tokio::spawn(crate::watch::system_bus(controls.system_bus.clone(), outside_tx.clone()));
    if let Some(mut extra) = controls.outside.take() {
        let tx = outside_tx.clone();
        tokio::spawn(async move {
            while let Some(e) = extra.recv().await {
                if tx.send(e).is_err() {
                    return;
                }
            }
        });
    }
    drop(outside_tx);

    let mut cron = config.schedule().map_err(RunError::Other)?;
    let mut watchdog_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec)
        .then(|| std::time::Duration::from_micros(watchdog_usec / 2))
        .filter(|d| !d.is_zero());
    let mut watchdog_tick = watchdog.map(tokio::time::interval);
    // The sweep runs on the wall clock (a timerfd); where there is none, on tokio's timer.
    let wall = match WallTimer::new() {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "no wall-clock timer: the sweep uses a monotonic timer and clock changes go unnoticed");
            None
        }
    };
    loop {
        let now = clock.now();
        let next = crate::schedule::next_after(&cron, now).unwrap_or(now + crate::schedule::MAX_SLEEP_SECS);
        let sleep = until(now, next.min(now + crate::schedule::MAX_SLEEP_SECS));
        if let Some(w) = &wall
            && let Err(e) = w.arm(clock.to_system(next))
        {
            warn!(error = %e, "cannot arm the wall-clock timer");
        }
        tokio::select! {
            _ = controls.shutdown.cancelled() => break,
            msg = controls.reload.recv() => {
                if msg.is_none() {
                    // Nobody can ask for a reload any more; keep running until shutdown.
                    controls.reload = mpsc::unbounded_channel().1;
                    continue;
                }
                notify(&[sd_notify::NotifyState::Reloading]);
                match config::load(&location) {
                    Ok(new) => {
                        if let Ok(c) = new.schedule() {
                            cron = c;
                        }
                        daemon.reload(new).await;
                    }
                    Err(e) => error!(error = %e, "reload failed; keeping the old configuration"),
                }
                let status = daemon.status_line().await;
                notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
            }
            Some(event) = outside_rx.recv() => match event {
                Outside::Resumed | Outside::ClockChanged => daemon.wake_all().await,
                Outside::NetworkUp => daemon.network_up().await,
            },
            event = async {
                match &wall {
                    Some(w) => w.wait().await.unwrap_or(WallEvent::Due),
                    None => {
                        tokio::time::sleep(sleep).await;
                        WallEvent::Due
                    }
                }
            } => match event {
                WallEvent::ClockChanged => {
                    info!("the wall clock was changed");
                    daemon.wake_all().await;
                }
                WallEvent::Due if clock.now() + 0.5 >= next => {
                    daemon.sweep().await;
                    let status = daemon.status_line().await;
                    notify(&[sd_notify::NotifyState::Status(&status)]);
                }
                WallEvent::Due => {}
            },
            _ = async {
                match watchdog_tick.as_mut() {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => notify(&[sd_notify::NotifyState::Watchdog]),
        }
    }

    info!("shutting down");
    notify(&[sd_notify::NotifyState::Stopping]);
    daemon.shutdown().await;
    let _ = conn.release_name(names::BUS_NAME).await;
    Ok(())
}
