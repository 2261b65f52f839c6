//! Child processes for the tests that drive the binaries: output captured by reader
//! threads, signals, and the helpers the process and tokenctl tests share.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::*;

/// How long a child gets to print what a test waits for.
const T: Duration = Duration::from_secs(30);

pub fn assert_no_panic(what: &str, stderr: &str) {
    assert!(!stderr.contains("panicked at") && !stderr.contains("RUST_BACKTRACE"), "{what} panicked:\n{stderr}");
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A shared buffer filled by a reader thread.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<String>>);

impl Captured {
    pub fn attach(stream: impl Read + Send + 'static) -> Captured {
        let c = Captured::default();
        let buf = c.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let mut b = buf.lock().unwrap();
                b.push_str(&line);
                b.push('\n');
            }
        });
        c
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

/// A child process that is killed on drop.
pub struct Proc {
    child: Option<Child>,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stdout = Captured::attach(child.stdout.take().unwrap());
        let stderr = Captured::attach(child.stderr.take().unwrap());
        Proc { child: Some(child), stdout, stderr }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid()) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    pub fn running(&mut self) -> bool {
        self.child.as_mut().map(|c| c.try_wait().unwrap().is_none()).unwrap_or(false)
    }

    /// Waits (without blocking the runtime) for the exit; kills and panics after `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let c = self.child.as_mut().expect("already reaped");
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                self.child = None;
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("process did not exit in {timeout:?}; stderr:\n{}", self.stderr.text());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until stdout satisfies `f`; panics with what it printed after `T`.
    pub async fn expect_stdout(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let seen = eventually(T, || {
            let t = self.stdout.text();
            let ok = f(&t);
            async move { ok }
        })
        .await;
        let out = self.stdout.text();
        assert!(seen, "{what}; stdout:\n{out}\nstderr:\n{}", self.stderr.text());
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Asserts success and returns stdout.
pub fn ok(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed with {:?}; stdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

pub async fn session_ids(env: &Env) -> Vec<String> {
    let paths = env.manager().await.list_sessions().await.unwrap();
    paths.iter().map(|p| p.to_string()).collect()
}

/// A running daemon (harness) with a valid token of `lifetime` seconds.
pub async fn live(lifetime: u64) -> (Env, Daemon) {
    let env = Env::with_lifetime(Duration::from_secs(lifetime)).await;
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let d = env.start_daemon().await;
    wait_state(&env, "default", "valid").await;
    (env, d)
}
