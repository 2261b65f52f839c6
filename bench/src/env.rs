//! The bench's world: a private `dbus-daemon` with generous limits, the simulator in-process
//! (on the bench's runtime), and the release `entrupy-tokend` as a child process with its own
//! config and state directory. Everything is torn down on drop.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use entrupy_sim::{SimConfig, Simulator};
use entrupy_tokend::names;
use futures_util::StreamExt;
use zbus::Connection;

/// A private session bus.
pub struct Bus {
    child: Child,
    _dir: tempfile::TempDir,
    pub address: String,
}

impl Bus {
    /// Starts `dbus-daemon` with the test harness's configuration (generous limits, no
    /// service directories) and reads its address.
    pub fn start() -> Result<Bus> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("bus");
        let conf = entrupy_sim::private_bus_config(&socket, None);
        let conf_path = dir.path().join("bus.conf");
        std::fs::write(&conf_path, conf)?;
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .arg("--nofork")
            .arg("--print-address=1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("dbus-daemon must be installed (apt-get install dbus-daemon)")?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout of dbus-daemon"))?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let address = line.trim().to_owned();
        if !address.starts_with("unix:") {
            let _ = child.kill();
            bail!("dbus-daemon printed {address:?}");
        }
        Ok(Bus { child, _dir: dir, address })
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new connection to `address`.
pub async fn connect(address: &str) -> Result<Connection> {
    Ok(zbus::connection::Builder::address(address).method_timeout(Duration::from_secs(60)).build().await?)
}

/// The daemon as a child process.
pub struct Tokend {
    child: Option<Child>,
    pub pid: u32,
    pub log: PathBuf,
}

impl Tokend {
    /// SIGTERM and wait (SIGKILL after 20 s).
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match c.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
            }
        }
    }

    /// SIGTERM, then the time until the process has exited (polled every millisecond);
    /// `None` when it had to be killed.
    pub fn stop_timed(&mut self) -> Option<Duration> {
        let mut c = self.child.take()?;
        let pid = rustix::process::Pid::from_raw(self.pid as i32)?;
        let t0 = Instant::now();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok()?;
        let deadline = t0 + Duration::from_secs(20);
        loop {
            match c.try_wait() {
                Ok(Some(_)) => return Some(t0.elapsed()),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return None;
                }
            }
        }
    }

    /// The last lines of the daemon's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Tokend {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The daemon's config, as the bench writes it.
#[derive(Debug, Clone)]
pub struct Cfg {
    /// `[[session]]` entries: (id, unique_user_id, email).
    pub sessions: Vec<(String, String, String)>,
    /// Raw `[refresh]` body; `None` keeps every default (sweep once a minute).
    pub refresh: Option<String>,
    /// `[rate_limit]` (per minute, per day); `None` keeps the defaults.
    pub rate: Option<(u32, u32)>,
    /// `[backend] timeout`; `None` keeps the default.
    pub timeout: Option<String>,
}

impl Cfg {
    /// One configured session `default`, every default otherwise.
    pub fn one_session() -> Cfg {
        Cfg {
            sessions: vec![("default".into(), "bench-user-0001".into(), "bench@example.com".into())],
            refresh: None,
            rate: None,
            timeout: None,
        }
    }
}

/// Bus, simulator, directory, the bench's own connection.
pub struct Env {
    pub bus: Bus,
    pub sim: Simulator,
    pub dir: tempfile::TempDir,
    pub conn: Connection,
    pub tokend: PathBuf,
    /// `RUST_LOG` for the daemon; `None` keeps its default (info).
    pub log_filter: Option<String>,
}

impl Env {
    pub async fn new(sim: SimConfig, tokend: &Path) -> Result<Env> {
        let bus = Bus::start()?;
        let sim = Simulator::start(sim).await?;
        let conn = connect(&bus.address).await?;
        // ENTRUPY_BENCH_KEEP=1 keeps each section's directory (config, state, daemon logs).
        let keep = std::env::var_os("ENTRUPY_BENCH_KEEP").is_some();
        let dir = tempfile::Builder::new().prefix("entrupy-bench-").disable_cleanup(keep).tempdir()?;
        if keep {
            println!("      keeping {}", dir.path().display());
        }
        Ok(Env { bus, sim, dir, conn, tokend: tokend.to_owned(), log_filter: None })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// Writes `config.toml` (and the backend credential file, mode 0600).
    pub fn write_config(&self, c: &Cfg) -> Result<PathBuf> {
        let cred = self.path("backend-credential");
        write_private(&cred, b"bench-app-user-credential\n")?;
        let mut t = format!(
            "state_dir = {:?}\n\n[entrupy]\napi_url = {:?}\n\n[backend]\nurl = {:?}\ntoken_file = {:?}\n",
            self.state_dir().display().to_string(),
            self.sim.api_url(),
            self.sim.backend_url(),
            cred.display().to_string()
        );
        if let Some(timeout) = &c.timeout {
            t.push_str(&format!("timeout = {timeout:?}\n"));
        }
        t.push('\n');
        if let Some(r) = &c.refresh {
            t.push_str(&format!("[refresh]\n{r}\n\n"));
        }
        if let Some((m, d)) = c.rate {
            t.push_str(&format!("[rate_limit]\nlogins_per_minute = {m}\nlogins_per_day = {d}\n\n"));
        }
        for (id, uid, email) in &c.sessions {
            t.push_str(&format!("[[session]]\nid = {id:?}\nunique_user_id = {uid:?}\nemail = {email:?}\n\n"));
        }
        let p = self.path("config.toml");
        std::fs::write(&p, t)?;
        Ok(p)
    }

    /// Spawns the daemon with `config.toml`; its log (default level, info) goes to a file.
    pub fn spawn(&self) -> Result<Tokend> {
        let n = SPAWNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.path(&format!("tokend-{n}.log"));
        let mut cmd = Command::new(&self.tokend);
        cmd.env_clear();
        if let Some(f) = &self.log_filter {
            cmd.env("RUST_LOG", f);
        }
        let child = cmd
            .arg("--config")
            .arg(self.path("config.toml"))
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus.address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", self.tokend.display()))?;
        let pid = child.id();
        Ok(Tokend { child: Some(child), pid, log })
    }

    /// Spawns the daemon and waits for its bus name. Returns the time from just before the
    /// spawn to the arrival of `NameOwnerChanged` for the name (subscribed beforehand).
    pub async fn start(&self) -> Result<(Tokend, Duration)> {
        let dbus = zbus::fdo::DBusProxy::new(&self.conn).await?;
        let mut owners = dbus.receive_name_owner_changed_with_args(&[(0, names::BUS_NAME)]).await?;
        let t0 = Instant::now();
        let mut d = self.spawn()?;
        let got = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(sig) = owners.next().await {
                if let Ok(a) = sig.args()
                    && a.new_owner().is_some()
                {
                    return true;
                }
            }
            false
        })
        .await;
        let elapsed = t0.elapsed();
        if !matches!(got, Ok(true)) {
            let tail = d.log_tail();
            d.stop();
            bail!("the daemon did not take its bus name within 60 s; log tail:\n{tail}");
        }
        Ok((d, elapsed))
    }
}

/// Writes a file with mode 0600.
pub fn write_private(p: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(p)?;
    f.write_all(bytes)?;
    Ok(())
}

static SPAWNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Unix seconds now.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}
