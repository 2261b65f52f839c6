//! The client examples in `examples/` against a live daemon: each one says the token is
//! valid, prints the expiry the daemon serves (and the token's length, never the token), and
//! prints `LoginSucceeded` and `ReauthorizationRequired` when the test makes them happen while
//! it listens. The Python example is skipped without `gi`, the shell one without busctl or
//! gdbus.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(unused_imports)] // the harness re-exports more than this test uses
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
/// How long each example listens for signals.
const LISTEN_SECS: u64 = 6;

/// The built `rust_client` example, next to the daemon binary: `target/<profile>/examples/`.
/// `cargo test` builds examples, but `cargo test --test examples` does not, so this builds it
/// (a no-op when it is up to date).
fn rust_client() -> PathBuf {
    let profile_dir = Path::new(TOKEND).parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(env!("CARGO_MANIFEST_DIR")).args(["build", "--quiet", "--example", "rust_client"]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let st = build.status().unwrap();
    assert!(st.success(), "cargo build --example rust_client failed");
    let exe = profile_dir.join("examples").join("rust_client");
    assert!(exe.exists(), "{} not found", exe.display());
    exe
}

fn have(program: &str, arg: &str) -> bool {
    Command::new(program).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// A running example whose stdout lines arrive on a channel.
struct Running {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    fn start(mut cmd: Command, env: &Env) -> Running {
        let mut child = cmd
            .env("DBUS_SESSION_BUS_ADDRESS", &env.bus.address)
            .env("ENTRUPY_SESSION", "default")
            .env_remove("ENTRUPY_LISTEN_SECONDS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || std::io::read_to_string(err).unwrap_or_default());
        Running { child, lines, seen: Vec::new(), stderr }
    }

    /// Waits for a line starting with `prefix` and returns it.
    fn expect(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("no line starting with {prefix:?}; output so far:\n{}", self.seen.join("\n"));
                }
            }
        }
    }

    /// Waits for the exit (the listening time bounds it) and returns the whole output.
    fn finish(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(LISTEN_SECS + 30);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the example did not end after its listening time; output:\n{}", self.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.seen.extend(self.lines.iter());
        let stderr = self.stderr.join().unwrap();
        let out = self.seen.join("\n");
        assert!(status.success(), "the example failed ({status}); stdout:\n{out}\nstderr:\n{stderr}");
        out
    }
}

/// Runs one example (already started with `--listen LISTEN_SECS 120`) through the scenario.
async fn scenario(env: &Env, mut cmd: Command) {
    let s = env.session("default").await;
    cmd.args(["--session", "default", "--listen", &LISTEN_SECS.to_string(), "120"]);
    let mut run = Running::start(cmd, env);
    let t = Duration::from_secs(30);

    assert_eq!(run.expect("session default:", t), "session default: /com/entrupy/TokenDaemon1/session/default");
    assert_eq!(run.expect("IsAuthorizationValid:", t), "IsAuthorizationValid: true");
    let ensured = run.expect("EnsureValid(120):", t);
    let expires_at = s.expires_at().await.unwrap();
    let (token, _) = s.get_token().await.unwrap();
    assert!(
        ensured.starts_with(&format!("EnsureValid(120): token of {} bytes, expires_at {expires_at} (", token.len())),
        "{ensured:?}, the daemon says {expires_at}"
    );
    run.expect("listening for signals", t);

    // A refresh while the example listens: LoginSucceeded with the new expiry.
    let new_exp = s.refresh().await.unwrap();
    let line = run.expect("LoginSucceeded", t);
    assert!(line.starts_with(&format!("LoginSucceeded expires_at={new_exp} ")), "{line:?}, expected {new_exp}");

    // The backend rejects the credential: ReauthorizationRequired.
    env.sim.set_accepted_credentials(Some(vec!["somebody-else".to_owned()]));
    assert_eq!(err_name(s.refresh().await), "Unauthorized");
    run.expect("ReauthorizationRequired", t);

    let out = run.finish();
    assert!(!out.contains(&token), "an example printed the token:\n{out}");
    assert!(out.ends_with("done"), "{out}");
}

async fn env_with_daemon() -> (Env, Daemon) {
    let env = Env::with_lifetime(Duration::from_secs(3600)).await;
    env.write_config(&Cfg { margin: "60s", ..Default::default() });
    let d = env.start_daemon().await;
    let s = env.session("default").await;
    let ok = eventually(Duration::from_secs(20), || {
        let s = s.clone();
        async move { s.valid().await.unwrap_or(false) }
    })
    .await;
    assert!(ok, "the session never became valid; log:\n{}", d.log.text());
    (env, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_example() {
    let exe = rust_client();
    let (env, _d) = env_with_daemon().await;
    scenario(&env, Command::new(exe)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_example() {
    let ok = Command::new("/usr/bin/python3").args(["-c", "import gi"]).status().is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED: /usr/bin/python3 -c 'import gi' fails (apt-get install python3-gi)");
        return;
    }
    let (env, _d) = env_with_daemon().await;
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(format!("{EXAMPLES}/python_client.py"));
    scenario(&env, cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_client_example() {
    if !have("busctl", "--version") || !have("gdbus", "help") {
        println!("SKIPPED: the shell example needs busctl and gdbus (or busctl monitor)");
        return;
    }
    let (env, _d) = env_with_daemon().await;
    let mut cmd = Command::new("bash");
    cmd.arg(format!("{EXAMPLES}/shell_client.sh"));
    scenario(&env, cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_client_example_with_busctl_monitor() {
    if !have("busctl", "--version") {
        println!("SKIPPED: the shell example needs busctl");
        return;
    }
    let (env, _d) = env_with_daemon().await;
    let mut cmd = Command::new("bash");
    cmd.arg(format!("{EXAMPLES}/shell_client.sh")).env("ENTRUPY_MONITOR", "busctl");
    scenario(&env, cmd).await;
}

#[test]
fn examples_fail_on_a_missing_daemon() {
    // No daemon on the bus: every example exits non-zero with a message.
    let bus = Bus::start();
    let mut cmds = vec![Command::new(rust_client())];
    if Command::new("/usr/bin/python3").args(["-c", "import gi"]).status().is_ok_and(|s| s.success()) {
        let mut c = Command::new("/usr/bin/python3");
        c.arg(format!("{EXAMPLES}/python_client.py"));
        cmds.push(c);
    }
    if have("busctl", "--version") {
        let mut c = Command::new("bash");
        c.arg(format!("{EXAMPLES}/shell_client.sh"));
        cmds.push(c);
    }
    for mut c in cmds {
        let out = c
            .args(["--listen", "1"])
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{c:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{c:?} says why");
    }
}
