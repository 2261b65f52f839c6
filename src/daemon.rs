//! The daemon process: loads the state, starts the loop that owns every session
//! (`crate::engine`), serves the bus, claims the name, and turns the outside world
//! (SIGTERM, SIGHUP, the wall-clock sweep, resume and network signals, the watchdog) into
//! the loop's events.
//!
//! [`run`] takes its shutdown trigger and reload requests from the caller (the binary wires
//! them to SIGTERM/SIGINT and SIGHUP), so tests can drive it in-process.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use zbus::Connection;

use crate::bus::{Access, BusCtx, ManagerObject, Notifier, ObjectManagerObject};
use crate::clock::{Clock, until};
use crate::config::{self, Config, ConfigLocation};
use crate::engine::{Engine, Event, Reload, Setup};
use crate::http::{self, Clients};
use crate::ledger::Ledger;
use crate::names;
use crate::policy::Budget;
use crate::sandbox::{self, Enforcement, Plan, Status};
use crate::session::attempt::Peers;
use crate::session::{Credential, Definition, Origin, Params, Published};
use crate::store::{SessionRecord, Store, StoreError};
use crate::watch::{Outside, SystemBus, WallEvent, WallTimer};
use crate::writer::Writer;

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

fn build_peers(config: &Config) -> Result<Arc<dyn Peers>, String> {
    let client = http::build_client(config.http_timeout)?;
    let clients = Clients::new(client, &config.api_url, config.backend.as_ref().map(|b| b.url.clone()))?;
    Ok(Arc::new(clients))
}

/// The policy settings of a config.
pub fn params(c: &Config) -> Params {
    let per_day = c.rate_limit.logins_per_day;
    Params {
        margin: c.refresh.margin.as_secs_f64(),
        jitter: c.refresh.jitter.as_secs_f64(),
        backoff_initial: c.refresh.backoff_initial.as_secs_f64(),
        backoff_max: c.refresh.backoff_max.as_secs_f64(),
        budget: Budget { per_minute: c.rate_limit.logins_per_minute, per_day },
        reserved_for_refresh: c.rate_limit.reserved_for_refresh,
        pace: c.rate_limit.pace,
    }
}

/// The sessions of the config file.
fn configured(config: &Config) -> Vec<Definition> {
    config
        .sessions
        .iter()
        .map(|s| Definition {
            id: s.id.clone(),
            profile: s.profile.clone(),
            credential: config.credential_for(s).map(Credential::Source).unwrap_or(Credential::None),
            origin: Origin::Config,
        })
        .collect()
}

/// The credential of sessions added over D-Bus without one.
fn default_credential(config: &Config) -> Credential {
    config.backend.as_ref().and_then(|b| b.token_file.clone()).map(Credential::Source).unwrap_or(Credential::None)
}

fn reload_of(location: &ConfigLocation, config: &Config) -> Result<Reload, String> {
    Ok(Reload {
        sessions: configured(config),
        params: params(config),
        peers: build_peers(config)?,
        default_credential: default_credential(config),
        config_file: location.path.display().to_string(),
    })
}

/// Opens the state directory (SPEC 2): one that cannot be used is a configuration error,
/// and one that another instance holds means that instance runs.
fn open_store(config: &Config) -> Result<Store, RunError> {
    let dir = config::check_state_dir(config)?;
    Store::open(&dir).map_err(|e| match e {
        StoreError::Locked { .. } => RunError::Unavailable(format!(
            "another entrupy-tokend uses the state directory {} (it holds its lock)",
            dir.display()
        )),
        e => RunError::Config(config::ConfigError {
            file: config.file.clone(),
            key: Some("state_dir".into()),
            position: None,
            message: format!("cannot use the state directory: {e}"),
        }),
    })
}

/// What the state directory holds at start.
struct State {
    store: Store,
    device_id: String,
    ledger: Ledger,
    records: BTreeMap<String, SessionRecord>,
}

/// Reads the state on this thread, not the blocking pool: nothing is served yet, and what
/// is read stays in the main allocator arena instead of pinning a worker thread's arena
/// (with 10,000 sessions, about 8 MiB).
fn load_state(store: Store) -> State {
    let device_id = store.device_id().unwrap_or_else(|e| {
        error!(error = %e, "cannot keep the device id; using a new one for this run");
        crate::authreq::random_hex128()
    });
    // Without the histories the budget would restart from zero: say so, and go on (the
    // vendor's own limit still holds).
    let logins = store.load_logins().unwrap_or_else(|e| {
        error!(error = %e, "cannot read the login histories; the budget starts empty");
        Default::default()
    });
    let records = store.load_sessions().unwrap_or_else(|e| {
        error!(error = %e, "cannot read the session states; sessions start afresh");
        Default::default()
    });
    for (name, e) in logins.failed.iter().chain(&records.failed) {
        error!(file = %name, error = %e, "cannot read a state file; going on without it");
    }
    State { store, device_id, ledger: Ledger::from_histories(logins.items), records: records.items }
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
    /// Whether the daemon may confine itself (`[sandbox] enabled` decides); false for a
    /// daemon run inside another program (tests), which must not confine its host.
    pub sandbox: bool,
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
            sandbox: true,
        }
    }
}

/// What the daemon needs of the file system and the network under `config` (SPEC 8).
fn plan(location: &ConfigLocation, config: &Config) -> Result<Plan, String> {
    let parent = |p: &std::path::Path| p.parent().map(std::path::Path::to_path_buf);
    let mut read_only: Vec<std::path::PathBuf> = parent(&location.path).into_iter().collect();
    let sources = config.backend.iter().filter_map(|b| b.token_file.clone());
    for src in sources.chain(config.sessions.iter().filter_map(|s| s.backend_token_file.clone())) {
        read_only.extend(src.path().ok().as_deref().and_then(parent));
    }
    for var in ["CREDENTIALS_DIRECTORY", "SSL_CERT_DIR"] {
        read_only.extend(std::env::var_os(var).map(std::path::PathBuf::from));
    }
    read_only.extend(std::env::var_os("SSL_CERT_FILE").and_then(|f| parent(std::path::Path::new(&f))));
    let proxy = http::ProxyConfig::from_env();
    let proxies = [proxy.http, proxy.https].into_iter().flatten().filter_map(|u| reqwest::Url::parse(&u).ok());
    let urls = std::iter::once(config.api_url.clone()).chain(config.backend.iter().map(|b| b.url.clone()));
    let mut tcp_ports: Vec<u16> = urls.chain(proxies).filter_map(|u| u.port_or_known_default()).collect();
    tcp_ports.sort_unstable();
    tcp_ports.dedup();
    Ok(Plan { home: Plan::home_from_env(), read_write: vec![config::state_dir(config)?], read_only, tcp_ports })
}

/// Confines the daemon (SPEC 8) when the config asks for it and a config file exists: a
/// daemon started without one runs unconfined until a reload finds one. Returns the
/// confinement in force, `None` while unconfined.
fn confine(location: &ConfigLocation, config: &Config) -> Option<Status> {
    if !config.sandbox.enabled || !location.path.is_file() {
        return None;
    }
    if config.access.token_executables.is_some() {
        // The allow-list reads the caller's /proc/PID/exe, a ptrace-level access that
        // Landlock denies towards every process outside the sandbox.
        warn!(
            "[access] token_executables is set: it needs to read other processes' /proc/PID/exe, which Landlock forbids; running unconfined"
        );
        return None;
    }
    let plan = match plan(location, config) {
        Ok(p) => p,
        Err(e) => {
            error!(error = %e, "cannot plan the confinement; running unconfined");
            return None;
        }
    };
    match sandbox::confine(&plan) {
        Ok(status) if status.enforcement == Enforcement::NotEnforced => {
            info!(%status, "no Landlock on this kernel: running unconfined");
            None
        }
        Ok(status) => {
            debug!(%status, "confined");
            Some(status)
        }
        Err(e) => {
            error!(error = %e, "cannot confine the daemon; running unconfined");
            None
        }
    }
}

/// Whether a reload to `config` fits the confinement in force; if not, says that a restart
/// is needed.
fn fits_confinement(location: &ConfigLocation, config: &Config, current: Option<&Status>) -> Result<(), String> {
    let Some(status) = current else { return Ok(()) };
    let missing = status.uncovered(&plan(location, config)?);
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
    Err(format!(
        "the new configuration needs {} outside the daemon's confinement; restart the daemon to use it",
        list.join(", ")
    ))
}

/// Connects to the session bus. A plain dbus-daemon that activates us may pass its address
/// only as `DBUS_STARTER_ADDRESS`; it is used when `DBUS_SESSION_BUS_ADDRESS` is absent.
async fn connect(controls: &Controls) -> Result<Connection, RunError> {
    let starter = std::env::var("DBUS_STARTER_ADDRESS").ok().filter(|_| {
        std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none()
            && std::env::var("DBUS_STARTER_BUS_TYPE").map(|t| t == "session").unwrap_or(false)
    });
    let builder = match controls.session_bus.as_ref().or(starter.as_ref()) {
        Some(addr) => zbus::connection::Builder::address(addr.as_str()),
        None => zbus::connection::Builder::session(),
    };
    builder.build().await.map_err(|e| RunError::Unavailable(format!("cannot reach the D-Bus session bus: {e}")))
}

/// Serves the object manager, every session found at start (without announcing them: no
/// client can hear that before the name is claimed) and the manager.
async fn serve(conn: &Connection, ctx: &Arc<BusCtx>, sessions: Vec<(Arc<str>, Published)>) -> Result<(), RunError> {
    let server = conn.object_server();
    let other = |what: &str| {
        let what = what.to_owned();
        move |e: zbus::Error| RunError::Other(format!("cannot serve {what}: {e}"))
    };
    server.at(names::MANAGER_PATH, ObjectManagerObject::new(ctx.clone())).await.map_err(other("the object manager"))?;
    for (id, rx) in sessions {
        if let Err(e) = crate::bus::serve_session(conn, ctx, rx, false).await {
            error!(session = %id, error = %e, "cannot serve the session on the bus");
        }
    }
    server.at(names::MANAGER_PATH, ManagerObject::new(ctx.clone())).await.map_err(other("the manager"))?;
    Ok(())
}

/// Claims the bus name, once every object is served.
async fn claim_name(conn: &Connection) -> Result<(), RunError> {
    match conn.request_name_with_flags(names::BUS_NAME, zbus::fdo::RequestNameFlags::DO_NOT_QUEUE).await {
        Ok(zbus::fdo::RequestNameReply::PrimaryOwner | zbus::fdo::RequestNameReply::AlreadyOwner) => Ok(()),
        Ok(_) | Err(zbus::Error::NameTaken) => Err(RunError::Unavailable(format!(
            "the bus name {} is already owned: another instance runs",
            names::BUS_NAME
        ))),
        Err(e) => Err(RunError::Unavailable(format!("cannot own the bus name {}: {e}", names::BUS_NAME))),
    }
}

/// Asks the loop something and waits for the answer (`None` once it stopped).
async fn ask<T>(events: &mpsc::UnboundedSender<Event>, make: impl FnOnce(oneshot::Sender<T>) -> Event) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    events.send(make(tx)).ok()?;
    rx.await.ok()
}

/// Stops the loop (it cancels what is under way and flushes the state) and waits for it.
async fn stop_engine(events: &mpsc::UnboundedSender<Event>) {
    let _ = ask(events, Event::Shutdown).await;
}

/// Runs the daemon until `controls.shutdown` fires.
pub async fn run(location: ConfigLocation, config: Config, mut controls: Controls) -> Result<Stopped, RunError> {
    let started = std::time::Instant::now();
    let clock = controls.clock.clone();
    let loaded = load_state(open_store(&config)?);
    let confinement = if controls.sandbox { confine(&location, &config) } else { None };
    debug!(sessions = loaded.records.len(), elapsed_ms = started.elapsed().as_millis() as u64, "state loaded");
    let (events, events_rx) = mpsc::unbounded_channel();
    let (updates, updates_rx) = mpsc::unbounded_channel();
    let unsaved = events.clone();
    let writer = Writer::spawn(Some(loaded.store), move |id| {
        let _ = unsaved.send(Event::Unsaved(Arc::from(id)));
    })
    .map_err(|e| RunError::Other(format!("cannot start the state writer: {e}")))?;
    let device_id: Arc<str> = Arc::from(loaded.device_id.as_str());
    let mut engine = Engine::new(Setup {
        ledger: loaded.ledger,
        params: params(&config),
        peers: build_peers(&config).map_err(RunError::Other)?,
        default_credential: default_credential(&config),
        config_file: location.path.display().to_string(),
        device_id: device_id.clone(),
        clock: clock.clone(),
        writer,
        updates,
    });
    let initial = engine.load(configured(&config), loaded.records);

    let conn = connect(&controls).await?;
    let access = Arc::new(Access::new());
    access.set_token_executables(config.access.token_executables.clone());
    let ctx = Arc::new(BusCtx {
        events: events.clone(),
        access,
        clock: clock.clone(),
        device_id,
        default_credential: std::sync::RwLock::new(default_credential(&config)),
    });
    let notifier = Arc::new(Notifier::new(conn.clone(), config.notify.enabled));
    serve(&conn, &ctx, initial).await?;
    debug!(elapsed_ms = started.elapsed().as_millis() as u64, "objects served");
    tokio::spawn(crate::bus::publisher(conn.clone(), ctx.clone(), updates_rx, Some(notifier.clone())));
    let engine_task = tokio::spawn(engine.run(events_rx));
    if let Err(e) = claim_name(&conn).await {
        stop_engine(&events).await;
        return Err(e);
    }
    let status = ask(&events, Event::Status).await.unwrap_or_default();
    let sandbox = match &confinement {
        Some(c) => format!("Landlock ABI {} ({:?})", c.abi, c.enforcement).to_lowercase(),
        None => "none".to_owned(),
    };
    info!(
        version = names::VERSION,
        name = names::BUS_NAME,
        %status,
        %sandbox,
        startup_ms = started.elapsed().as_millis() as u64,
        "ready"
    );
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);

    let outside = outside_events(&mut controls);
    let main =
        MainLoop { location, config, controls, events: events.clone(), ctx, notifier, clock, outside, confinement };
    main.run().await?;

    info!("shutting down");
    notify(&[sd_notify::NotifyState::Stopping]);
    stop_engine(&events).await;
    let engine = engine_task.await.inspect_err(|e| error!(error = %e, "the session loop ended abnormally")).ok();
    let _ = conn.release_name(names::BUS_NAME).await;
    Ok(Stopped { _sessions: engine })
}

/// What is left of a daemon that stopped cleanly: its sessions, every change of them on disk.
/// Dropping it frees them; a process that exits next need not (the binary does not: freeing
/// 10,000 sessions reads every page of them, cold after an idle hour, and that cost more
/// than the rest of the shutdown; BENCHMARKS.md).
#[derive(Debug)]
#[must_use]
pub struct Stopped {
    _sessions: Option<Engine>,
}

/// Resume and network signals from the system bus, and the tests' injected events.
fn outside_events(controls: &mut Controls) -> mpsc::UnboundedReceiver<Outside> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(crate::watch::system_bus(controls.system_bus.clone(), tx.clone()));
    if let Some(mut extra) = controls.outside.take() {
        tokio::spawn(async move {
            while let Some(e) = extra.recv().await {
                if tx.send(e).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

/// The daemon's main loop: everything from outside the process becomes an event of the
/// session loop.
struct MainLoop {
    location: ConfigLocation,
    config: Config,
    controls: Controls,
    events: mpsc::UnboundedSender<Event>,
    ctx: Arc<BusCtx>,
    notifier: Arc<Notifier>,
    clock: Clock,
    outside: mpsc::UnboundedReceiver<Outside>,
    /// The confinement in force, `None` while unconfined.
    confinement: Option<Status>,
}

impl MainLoop {
    async fn run(mut self) -> Result<(), RunError> {
        let mut cron = self.config.schedule().map_err(RunError::Other)?;
        let mut watchdog_usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec)
            .then(|| std::time::Duration::from_micros(watchdog_usec / 2))
            .filter(|d| !d.is_zero());
        let mut watchdog_tick = watchdog.map(tokio::time::interval);
        // The sweep runs on the wall clock (a timerfd); where there is none, on tokio's timer.
        let wall = WallTimer::new()
            .inspect_err(|e| {
                warn!(error = %e, "no wall-clock timer: the sweep uses a monotonic timer and clock changes go unnoticed");
            })
            .ok();
        loop {
            let now = self.clock.now();
            let next = crate::schedule::next_after(&cron, now).unwrap_or(now + crate::schedule::MAX_SLEEP_SECS);
            let sleep = until(now, next.min(now + crate::schedule::MAX_SLEEP_SECS));
            if let Some(w) = &wall
                && let Err(e) = w.arm(self.clock.to_system(next))
            {
                warn!(error = %e, "cannot arm the wall-clock timer");
            }
            tokio::select! {
                _ = self.controls.shutdown.cancelled() => return Ok(()),
                msg = self.controls.reload.recv() => match msg {
                    Some(()) => {
                        if let Some(c) = self.reload().await {
                            cron = c;
                        }
                    }
                    // Nobody can ask for a reload any more; keep running until shutdown.
                    None => self.controls.reload = mpsc::unbounded_channel().1,
                },
                Some(event) = self.outside.recv() => {
                    let _ = self.events.send(match event {
                        Outside::Resumed | Outside::ClockChanged => Event::Wake,
                        Outside::NetworkUp => Event::NetworkUp,
                    });
                }
                event = wall_event(wall.as_ref(), sleep) => match event {
                    WallEvent::ClockChanged => {
                        info!("the wall clock was changed");
                        let _ = self.events.send(Event::Wake);
                    }
                    WallEvent::Due if self.clock.now() + 0.5 >= next => {
                        let _ = self.events.send(Event::Sweep);
                        let status = ask(&self.events, Event::Status).await.unwrap_or_default();
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
    }

    /// SIGHUP: reads the config again; an invalid one keeps the old. Returns the new sweep
    /// schedule.
    async fn reload(&mut self) -> Option<croner::Cron> {
        notify(&[sd_notify::NotifyState::Reloading]);
        let result = config::load(&self.location).map_err(|e| e.to_string()).and_then(|new| {
            fits_confinement(&self.location, &new, self.confinement.as_ref())?;
            let cron = new.schedule()?;
            Ok((reload_of(&self.location, &new)?, new, cron))
        });
        let cron = match result {
            Ok((reload, new, cron)) => {
                if new.state_dir != self.config.state_dir {
                    warn!("state_dir changed; the new directory is used after a restart");
                }
                self.ctx.access.set_token_executables(new.access.token_executables.clone());
                self.notifier.set_enabled(new.notify.enabled);
                *self.ctx.default_credential.write().unwrap_or_else(|e| e.into_inner()) = default_credential(&new);
                if self.confinement.is_none() && self.controls.sandbox {
                    self.confinement = confine(&self.location, &new);
                }
                self.config = new;
                let _ = self.events.send(Event::Reload(Box::new(reload)));
                Some(cron)
            }
            Err(e) => {
                error!(error = %e, "reload failed; keeping the old configuration");
                None
            }
        };
        let status = ask(&self.events, Event::Status).await.unwrap_or_default();
        notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
        cron
    }
}

/// The next event of the wall-clock timer, or a monotonic sleep where there is none.
async fn wall_event(wall: Option<&WallTimer>, sleep: std::time::Duration) -> WallEvent {
    match wall {
        Some(w) => w.wait().await.unwrap_or(WallEvent::Due),
        None => {
            tokio::time::sleep(sleep).await;
            WallEvent::Due
        }
    }
}
