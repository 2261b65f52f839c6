//! Shared test harness: a private `dbus-daemon` per test, the simulator in-process, and the
//! real `entrupy-tokend` binary as a child process with its own config and state directory.
//! Everything is torn down on drop, so tests run in parallel without sharing anything.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod proc;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use entrupy_sim::{Endpoint, Fault, SimConfig, Simulator};
use entrupy_tokend::client::{ManagerProxy, SessionProxy};
use entrupy_tokend::names;
use zbus::Connection;
use zbus::proxy::CacheProperties;

/// Path of the built daemon.
pub const TOKEND: &str = env!("CARGO_BIN_EXE_entrupy-tokend");
/// Path of the built CLI.
pub const TOKENCTL: &str = env!("CARGO_BIN_EXE_entrupy-tokenctl");

/// A private session bus with no service directories (nothing of the host is activated).
pub struct Bus {
    child: Child,
    pub dir: tempfile::TempDir,
    pub address: String,
}

impl Bus {
    pub fn start() -> Bus {
        Self::start_with_services(None)
    }

    /// A bus whose activation directory is `services` (for bus-activation tests).
    pub fn start_with_services(services: Option<&Path>) -> Bus {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bus");
        let conf = entrupy_sim::private_bus_config(&socket, services);
        let conf_path = dir.path().join("bus.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .arg("--nofork")
            .arg("--print-address=1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon must be installed (apt-get install dbus-daemon)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let address = line.trim().to_owned();
        assert!(address.starts_with("unix:"), "dbus-daemon printed {address:?}");
        Bus { child, dir, address }
    }

    pub async fn connect(&self) -> Connection {
        zbus::connection::Builder::address(self.address.as_str()).build().await.unwrap()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Captured stderr lines of a child.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<String>>);

impl Log {
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    fn attach(&self, stream: impl std::io::Read + Send + 'static) {
        let buf = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("TOKEND_TEST_ECHO").is_some() {
                    eprintln!("[tokend] {line}");
                }
                let mut b = buf.lock().unwrap();
                b.push_str(&line);
                b.push('\n');
            }
        });
    }
}

/// A test environment: bus, simulator, a directory for config, state and credentials.
pub struct Env {
    pub bus: Bus,
    pub sim: Simulator,
    pub dir: tempfile::TempDir,
    pub conn: Connection,
}

/// Options for the config the harness writes.
#[derive(Clone)]
pub struct Cfg {
    pub margin: &'static str,
    pub jitter: &'static str,
    pub backoff_initial: &'static str,
    pub backoff_max: &'static str,
    pub check_schedule: &'static str,
    pub timeout: &'static str,
    pub per_minute: u32,
    pub per_day: u32,
    pub pace: bool,
    pub backend: bool,
    pub credential: Option<&'static str>,
    pub sessions: Vec<(&'static str, &'static str, &'static str)>,
    pub extra: String,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            margin: "2s",
            jitter: "0s",
            backoff_initial: "200ms",
            backoff_max: "2s",
            check_schedule: "0 * * * * *",
            timeout: "3s",
            per_minute: 60,
            per_day: 1000,
            pace: false,
            backend: true,
            credential: Some("app-user-credential-1"),
            sessions: vec![("default", "user-0001-abcd", "user@example.com")],
            extra: String::new(),
        }
    }
}

impl Env {
    pub async fn new(sim: SimConfig) -> Env {
        let bus = Bus::start();
        let sim = Simulator::start(sim).await.unwrap();
        let conn = bus.connect().await;
        Env { bus, sim, dir: tempfile::tempdir().unwrap(), conn }
    }

    /// A simulator with tokens of `lifetime`, 5/min and 100/day limits.
    pub async fn with_lifetime(lifetime: Duration) -> Env {
        Env::new(SimConfig { token_lifetime: lifetime, ..Default::default() }).await
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// Writes a credential file with mode 0600 and returns its path.
    pub fn credential_file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// Renders and writes `config.toml`.
    pub fn write_config(&self, c: &Cfg) -> PathBuf {
        let mut t = format!(
            "state_dir = {:?}\n\n[entrupy]\napi_url = {:?}\n\n",
            self.state_dir().display().to_string(),
            self.sim.api_url()
        );
        if c.backend {
            t.push_str(&format!("[backend]\nurl = {:?}\ntimeout = {:?}\n", self.sim.backend_url(), c.timeout));
            if let Some(cred) = c.credential {
                let p = self.credential_file("backend-credential", cred);
                t.push_str(&format!("token_file = {:?}\n", p.display().to_string()));
            }
            t.push('\n');
        }
        t.push_str(&format!(
            "[refresh]\nmargin = {:?}\njitter = {:?}\ncheck_schedule = {:?}\nbackoff_initial = {:?}\nbackoff_max = {:?}\n\n",
            c.margin, c.jitter, c.check_schedule, c.backoff_initial, c.backoff_max
        ));
        t.push_str(&format!(
            "[rate_limit]\nlogins_per_minute = {}\nlogins_per_day = {}\npace = {}\n\n",
            c.per_minute, c.per_day, c.pace
        ));
        t.push_str(&c.extra);
        for (id, uid, email) in &c.sessions {
            t.push_str(&format!("[[session]]\nid = {id:?}\nunique_user_id = {uid:?}\nemail = {email:?}\n\n"));
        }
        let p = self.path("config.toml");
        std::fs::write(&p, t).unwrap();
        p
    }

    /// Starts the daemon on this env's bus with `config.toml` and waits for its bus name.
    pub async fn start_daemon(&self) -> Daemon {
        let d = self.spawn_daemon(&[]);
        d.wait_for_name(&self.conn).await;
        d
    }

    /// Spawns the daemon without waiting.
    pub fn spawn_daemon(&self, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(TOKEND);
        cmd.arg("--config")
            .arg(self.path("config.toml"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus.address)
            .env("RUST_LOG", "debug,zbus=info,hyper=info,reqwest=info,rustls=info,h2=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(ca) = self.sim.ca_pem() {
            let p = self.path("ca.pem");
            std::fs::write(&p, ca).unwrap();
            cmd.env("SSL_CERT_FILE", p);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let log = Log::default();
        log.attach(child.stderr.take().unwrap());
        Daemon { child: Some(child), log }
    }

    pub async fn session(&self, id: &str) -> SessionProxy<'static> {
        SessionProxy::builder(&self.conn)
            .path(names::session_path(id))
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .unwrap()
    }

    pub async fn manager(&self) -> ManagerProxy<'static> {
        ManagerProxy::builder(&self.conn).cache_properties(CacheProperties::No).build().await.unwrap()
    }

    pub async fn object_manager(&self) -> zbus::fdo::ObjectManagerProxy<'static> {
        zbus::fdo::ObjectManagerProxy::builder(&self.conn)
            .destination(names::BUS_NAME)
            .path(names::MANAGER_PATH)
            .build()
            .await
            .unwrap()
    }

    /// Runs `entrupy-tokenctl` against this bus.
    pub fn tokenctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(TOKENCTL)
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus.address)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

/// The daemon child process.
pub struct Daemon {
    child: Option<Child>,
    pub log: Log,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub async fn wait_for_name(&self, conn: &Connection) {
        let dbus = zbus::fdo::DBusProxy::new(conn).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let name = zbus::names::BusName::try_from(names::BUS_NAME).unwrap();
            if dbus.name_has_owner(name).await.unwrap_or(false) {
                return;
            }
            assert!(Instant::now() < deadline, "daemon did not take its name; log:\n{}", self.log.text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid()) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        self.wait(Duration::from_secs(15))
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit (kills it after `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("daemon already reaped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("daemon did not exit in {timeout:?}; log:\n{}", self.log.text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it is true or `timeout` passes; returns whether it became true.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether session `id` reaches `want` within 20 s.
pub async fn state_is(env: &Env, id: &str, want: &str) -> bool {
    let s = env.session(id).await;
    eventually(Duration::from_secs(20), || {
        let s = s.clone();
        async move { s.state().await.map(|v| v == want).unwrap_or(false) }
    })
    .await
}

/// Waits for session `id` to reach `state`; fails the test after 20 s.
pub async fn wait_state(env: &Env, id: &str, state: &str) {
    if !state_is(env, id, state).await {
        let now = env.session(id).await.state().await;
        panic!("session {id} never reached {state}; it is {now:?}");
    }
}

/// The short D-Bus error name of a failed call.
pub fn err_name<T: std::fmt::Debug>(r: zbus::Result<T>) -> String {
    match r {
        Err(e) => entrupy_tokend::client::short_error_name(&e).unwrap_or_else(|| format!("{e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// Unix seconds now.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Writes a string to a file, flushing.
pub fn write(p: &Path, s: &str) {
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(s.as_bytes()).unwrap();
}

/// The daemon's introspection XML at `path`.
pub async fn introspect(env: &Env, path: &str) -> String {
    let proxy = zbus::fdo::IntrospectableProxy::builder(&env.conn)
        .destination(names::BUS_NAME)
        .path(path)
        .build()
        .await
        .unwrap();
    proxy.introspect().await.unwrap()
}

/// Every signal of the session interface the daemon emits from now on, in the order it
/// emitted them (subscribe before the events to be seen). The daemon emits the signals in
/// the order its loop decided them, so once a later signal has come, one that did not come
/// before it was never sent: no waiting "a while" for something not to happen.
pub async fn session_signals(env: &Env) -> zbus::MessageStream {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(names::SESSION_INTERFACE)
        .build()
        .unwrap();
    zbus::MessageStream::for_match_rule(rule, &env.conn, None).await.unwrap()
}

/// The member name of the next signal on `stream`; fails the test after 20 s.
pub async fn next_signal(stream: &mut zbus::MessageStream) -> String {
    use futures_util::StreamExt;
    let msg = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("no signal within 20 s")
        .unwrap()
        .unwrap();
    msg.header().member().unwrap().to_string()
}

/// Returns once the daemon's loop has handled everything due or queued before this call: it
/// serves due deadlines before calls, and `ListSessions` is a call it answers. What the loop
/// decided at start (a login or not) is visible after it.
pub async fn loop_caught_up(env: &Env) {
    env.manager().await.list_sessions().await.unwrap();
}
