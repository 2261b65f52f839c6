//! D-Bus activation for real: a private session bus whose service directory holds the shipped
//! `systemd/com.entrupy.TokenDaemon1.service` (its `Exec=` pointed at the built daemon and the
//! test's config). Nobody starts the daemon; the first call does, through the bus.
//!
//! The environment: a dbus-daemon of `<type>session</type>` sets `DBUS_SESSION_BUS_ADDRESS`
//! (besides `DBUS_STARTER_ADDRESS` and `DBUS_STARTER_BUS_TYPE`) in the environment of the
//! services it starts, so `Exec=` needs no wrapper; the test proves it, since the daemon
//! finds the bus only through `DBUS_SESSION_BUS_ADDRESS`. The activated process inherits the
//! rest of the bus's environment (here the test's), so `--config` names the test's config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(unused_imports)] // the harness re-exports more than this test uses
mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use entrupy_tokend::names;

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/com.entrupy.TokenDaemon1.service");

/// The shipped activation file with `Exec=` replaced; every other line kept.
fn activation_file(exec: &str) -> String {
    let shipped = std::fs::read_to_string(SHIPPED).unwrap();
    assert!(shipped.lines().any(|l| l.trim() == "[D-Bus Service]" || l.trim() == "[D-BUS Service]"), "{shipped}");
    assert!(shipped.lines().any(|l| l.trim() == format!("Name={}", names::BUS_NAME)), "{shipped}");
    let mut out = String::new();
    let mut replaced = false;
    for line in shipped.lines() {
        if line.trim_start().starts_with("Exec=") {
            out.push_str(&format!("Exec={exec}\n"));
            replaced = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(replaced, "the shipped activation file has no Exec= line");
    out
}

/// Stops the activated daemon (found through the bus) even when the test fails midway.
struct Activated(i32);

impl Activated {
    fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.0)).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.0)).is_ok_and(|s| s.contains(") Z "))
    }

    fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if self.alive() {
            self.signal(rustix::process::Signal::KILL);
        }
    }
}

/// The environment: a simulator, and a bus that activates the built daemon with `config.toml`.
async fn activating_env() -> Env {
    let sim =
        Simulator::start(SimConfig { token_lifetime: Duration::from_secs(3600), ..Default::default() }).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services");
    std::fs::create_dir(&services).unwrap();
    let config = dir.path().join("config.toml");
    let exec = format!("{TOKEND} --config {}", config.display());
    std::fs::write(services.join(format!("{}.service", names::BUS_NAME)), activation_file(&exec)).unwrap();
    let bus = Bus::start_with_services(Some(&services));
    let conn = bus.connect().await;
    let env = Env { bus, sim, dir, conn };
    env.write_config(&Cfg { margin: "60s", ..Default::default() });
    env
}

async fn name_owner_pid(env: &Env) -> Option<u32> {
    let dbus = zbus::fdo::DBusProxy::new(&env.conn).await.unwrap();
    let name = zbus::names::BusName::try_from(names::BUS_NAME).unwrap();
    dbus.get_connection_unix_process_id(name).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_starts_the_daemon_through_the_bus() {
    let env = activating_env().await;
    assert_eq!(name_owner_pid(&env).await, None, "nothing owns the name before the first call");
    let dbus = zbus::fdo::DBusProxy::new(&env.conn).await.unwrap();
    let activatable = dbus.list_activatable_names().await.unwrap();
    assert!(activatable.iter().any(|n| n.as_str() == names::BUS_NAME), "{activatable:?}");

    // The first call: the bus starts the daemon and delivers the call once it owns the name.
    let paths = env.manager().await.list_sessions().await.expect("the bus activated the daemon");
    assert_eq!(paths.iter().map(|p| p.as_str().to_owned()).collect::<Vec<_>>(), [names::session_path("default")]);

    let pid = name_owner_pid(&env).await.expect("the activated daemon owns the name");
    let daemon = Activated(i32::try_from(pid).unwrap());
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, std::fs::canonicalize(TOKEND).unwrap(), "the owner is the built daemon");

    // It works as a started one does: it logs in through the simulator.
    let s = env.session("default").await;
    let ok = eventually(Duration::from_secs(20), || {
        let s = s.clone();
        async move { s.is_authorization_valid().await.unwrap_or(false) }
    })
    .await;
    assert!(ok, "the activated daemon logged in");
    assert!(env.sim.counters().login_ok >= 1);

    // Stop it; the name is released and the process exits.
    daemon.signal(rustix::process::Signal::TERM);
    let gone =
        eventually(Duration::from_secs(15), || async { name_owner_pid(&env).await.is_none() && !daemon.alive() }).await;
    assert!(gone, "the activated daemon stops on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_session_also_activates() {
    let env = activating_env().await;
    assert_eq!(name_owner_pid(&env).await, None);
    // IsAuthorizationValid on the session object directly: also an auto-start call.
    let s = env.session("default").await;
    let valid = s.is_authorization_valid().await.expect("the bus activated the daemon");
    let pid = name_owner_pid(&env).await.expect("the activated daemon owns the name");
    let daemon = Activated(i32::try_from(pid).unwrap());
    // The call may arrive before the first login finishes; either answer is right, and it
    // becomes valid.
    if !valid {
        let ok = eventually(Duration::from_secs(20), || {
            let s = s.clone();
            async move { s.is_authorization_valid().await.unwrap_or(false) }
        })
        .await;
        assert!(ok);
    }
    daemon.signal(rustix::process::Signal::TERM);
    let gone = eventually(Duration::from_secs(15), || async { !daemon.alive() }).await;
    assert!(gone, "the activated daemon stops on SIGTERM");
}
