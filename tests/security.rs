//! Security: system-bus signals are heard only from the owners of logind's and
//! NetworkManager's names (a private `dbus-daemon` stands in for the system bus, with a fake
//! logind, a fake NetworkManager and an impostor), and the token allow-list is checked on
//! every call of every method that returns or changes a token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(unused_imports)]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use entrupy_tokend::watch::{LOGIND, NETWORK_MANAGER};
use zbus::Connection;

const T: Duration = Duration::from_secs(20);

const LOGIND_PATH: &str = "/org/freedesktop/login1";
const LOGIND_IFACE: &str = "org.freedesktop.login1.Manager";
const NM_PATH: &str = "/org/freedesktop/NetworkManager";
const NM_IFACE: &str = "org.freedesktop.NetworkManager";

/// Starts the daemon with `system` as its system bus and waits until it watches it.
async fn daemon_on(env: &Env, system: &Bus) -> Daemon {
    let d = env.spawn_daemon(&[("DBUS_SYSTEM_BUS_ADDRESS", system.address.as_str())]);
    d.wait_for_name(&env.conn).await;
    let watching = eventually(T, || async { d.log.text().contains("watching logind and NetworkManager") }).await;
    assert!(watching, "the daemon never watched the system bus; log:\n{}", d.log.text());
    d
}

/// The unique names on `system` other than `mine` (the daemon's watcher, here).
async fn others(system: &Connection, mine: &[&Connection]) -> Vec<String> {
    let dbus = zbus::fdo::DBusProxy::new(system).await.unwrap();
    let mine: Vec<String> = mine.iter().map(|c| c.unique_name().unwrap().to_string()).collect();
    dbus.list_names()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.to_string())
        .filter(|n| n.starts_with(':') && !mine.contains(n))
        .collect()
}

/// Sends a signal to everyone and, directed, to each of `to` (a directed signal passes every
/// match rule, so only the daemon's own check can refuse it).
async fn send<B>(from: &Connection, to: &[String], path: &str, iface: &str, member: &str, body: &B)
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    from.emit_signal(None::<&str>, path, iface, member, body).await.unwrap();
    for dest in to {
        from.emit_signal(Some(dest.as_str()), path, iface, member, body).await.unwrap();
    }
}

fn count(d: &Daemon, what: &str) -> usize {
    d.log.text().matches(what).count()
}

/// Sends one more impostor signal, to the daemon alone, and waits until the daemon logs that
/// it ignored it: the daemon takes these signals in the order they reach it, so everything
/// sent before (a duplicate of the owner's signal, a late impostor) has been judged too. No
/// waiting a while for something not to happen.
async fn settle<B>(
    impostor: &Connection,
    watcher: &[String],
    path: &str,
    iface: &str,
    member: &str,
    body: &B,
    d: &Daemon,
) where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    let before = count(d, "ignored a system signal");
    impostor.emit_signal(Some(watcher[0].as_str()), path, iface, member, body).await.unwrap();
    let judged = eventually(T, || async { count(d, "ignored a system signal") > before }).await;
    assert!(judged, "the last signal was never judged; log:\n{}", d.log.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_of_login1_announces_a_resume() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let system = Bus::start();
    // logind owns its name before the daemon starts: the daemon learns it with GetNameOwner.
    let logind = system.connect().await;
    logind.request_name(LOGIND).await.unwrap();
    let impostor = system.connect().await;
    let d = daemon_on(&env, &system).await;
    let watcher = others(&impostor, &[&logind, &impostor]).await;
    assert_eq!(watcher.len(), 1, "the daemon's system-bus connection: {watcher:?}");

    send(&impostor, &watcher, LOGIND_PATH, LOGIND_IFACE, "PrepareForSleep", &(false,)).await;
    // A fake NameOwnerChanged (sent to the daemon alone) does not make the impostor the owner.
    let me = impostor.unique_name().unwrap().to_string();
    let old = logind.unique_name().unwrap().to_string();
    send(
        &impostor,
        &watcher,
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "NameOwnerChanged",
        &(LOGIND, old.as_str(), me.as_str()),
    )
    .await;
    send(&impostor, &watcher, LOGIND_PATH, LOGIND_IFACE, "PrepareForSleep", &(false,)).await;
    let refused = eventually(T, || async { count(&d, "ignored a system signal") >= 2 }).await;
    assert!(refused, "the directed fakes reached the daemon and were ignored; log:\n{}", d.log.text());
    assert_eq!(count(&d, "system event"), 0, "an impostor woke the daemon; log:\n{}", d.log.text());

    logind.emit_signal(None::<&str>, LOGIND_PATH, LOGIND_IFACE, "PrepareForSleep", &(false,)).await.unwrap();
    let woke = eventually(T, || async { d.log.text().contains("system event event=Resumed") }).await;
    assert!(woke, "logind's resume was heard; log:\n{}", d.log.text());
    settle(&impostor, &watcher, LOGIND_PATH, LOGIND_IFACE, "PrepareForSleep", &(false,), &d).await;
    assert_eq!(count(&d, "system event"), 1, "only logind's signal counted; log:\n{}", d.log.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_of_networkmanager_announces_the_network() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let system = Bus::start();
    let impostor = system.connect().await;
    let d = daemon_on(&env, &system).await;
    let watcher = others(&impostor, &[&impostor]).await;
    assert_eq!(watcher.len(), 1, "the daemon's system-bus connection: {watcher:?}");

    // No NetworkManager yet: nobody is heard.
    send(&impostor, &watcher, NM_PATH, NM_IFACE, "StateChanged", &(70u32,)).await;
    assert!(eventually(T, || async { count(&d, "ignored a system signal") >= 1 }).await);

    // NetworkManager appears after the daemon started: NameOwnerChanged tells the daemon.
    let nm = system.connect().await;
    nm.request_name(NETWORK_MANAGER).await.unwrap();
    send(&impostor, &watcher, NM_PATH, NM_IFACE, "StateChanged", &(70u32,)).await;
    assert!(eventually(T, || async { count(&d, "ignored a system signal") >= 2 }).await);
    assert_eq!(count(&d, "system event"), 0, "an impostor was heard; log:\n{}", d.log.text());
    nm.emit_signal(None::<&str>, NM_PATH, NM_IFACE, "StateChanged", &(70u32,)).await.unwrap();
    let heard = eventually(T, || async { d.log.text().contains("system event event=NetworkUp") }).await;
    assert!(heard, "NetworkManager's StateChanged was heard; log:\n{}", d.log.text());

    // NetworkManager goes away: its old name is not heard any more, nor is the impostor.
    let gone = nm.unique_name().unwrap().to_string();
    drop(nm);
    let nm2 = system.connect().await;
    nm2.request_name(NETWORK_MANAGER).await.unwrap();
    send(&impostor, &watcher, NM_PATH, NM_IFACE, "StateChanged", &(70u32,)).await;
    assert!(eventually(T, || async { count(&d, "ignored a system signal") >= 3 }).await);
    nm2.emit_signal(None::<&str>, NM_PATH, NM_IFACE, "StateChanged", &(70u32,)).await.unwrap();
    assert!(eventually(T, || async { count(&d, "system event event=NetworkUp") == 2 }).await);
    settle(&impostor, &watcher, NM_PATH, NM_IFACE, "StateChanged", &(70u32,), &d).await;
    assert_eq!(count(&d, "system event"), 2, "{gone} and the impostor were not heard; log:\n{}", d.log.text());
}

/// Runs a D-Bus method of the session `default` as `busctl`, an executable not on the list.
fn busctl(env: &Env, member: &str, args: &[&str]) -> std::process::Output {
    Command::new("busctl")
        .arg(format!("--address={}", env.bus.address))
        .args(["call", "com.entrupy.TokenDaemon1", "/com/entrupy/TokenDaemon1/session/default"])
        .args(["com.entrupy.TokenDaemon1.Session", member])
        .args(args)
        .output()
        .unwrap()
}

fn allow_only_this_test(env: &Env) {
    let me = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    env.write_config(&Cfg {
        margin: "30s",
        extra: format!("[access]\ntoken_executables = [{:?}]\n", me.display().to_string()),
        ..Default::default()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_guards_every_method_that_returns_or_changes_a_token() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    allow_only_this_test(&env);
    let d = env.start_daemon().await;
    let s = env.session("default").await;
    assert!(eventually(T, || async { s.state().await.unwrap() == "valid" }).await, "log:\n{}", d.log.text());

    // Another executable of the same user: every method that returns or changes the token is
    // refused, and the token is left as it was.
    let token = s.get_token().await.unwrap();
    for (member, args) in [
        ("GetToken", &[][..]),
        ("EnsureValid", &["u", "10"][..]),
        ("Refresh", &[][..]),
        ("Cleanup", &[][..]),
        ("LoginWithSignedRequest", &["s", "signed-by-someone-else"][..]),
    ] {
        let out = busctl(&env, member, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{member} was allowed: {}", String::from_utf8_lossy(&out.stdout));
        assert!(stderr.contains("may not call"), "{member}: {stderr}");
    }
    for member in ["IsAuthorizationValid", "GenerateAuthorizationRequest"] {
        let out = busctl(&env, member, &[]);
        assert!(out.status.success(), "{member} stays open: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(s.get_token().await.unwrap(), token, "the refused calls changed nothing");
    assert_eq!(env.sim.counters().login_ok, 1);

    // The allowed executable may call them all.
    assert_eq!(s.ensure_valid(10).await.unwrap(), token);
    let exp = s.refresh().await.unwrap();
    let request = s.generate_authorization_request().await.unwrap();
    let signed = env.sim.sign_directly(&request, "user-0001-abcd", "user@example.com");
    assert!(s.login_with_signed_request(&signed).await.unwrap() >= exp);
    s.cleanup().await.unwrap();
    assert_eq!(s.state().await.unwrap(), "logged-out");
}

/// Not a test by itself: run by [`the_allow_list_is_checked_on_every_call`] as a child, it
/// connects to the bus socket named by `SECURITY_HELPER_BUS`, says its descriptor, and execs
/// `sleep` when told to (the connection, held by the test, outlives the exec).
#[test]
fn connect_then_exec_helper() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let Some(path) = std::env::var_os("SECURITY_HELPER_BUS") else { return };
    let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
    println!("HELPER_FD={}", stream.as_raw_fd());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let e = Command::new("sleep").arg("60").exec();
    panic!("cannot exec sleep: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_is_checked_on_every_call() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    allow_only_this_test(&env);
    let d = env.start_daemon().await;
    let s = env.session("default").await;
    assert!(eventually(T, || async { s.state().await.unwrap() == "valid" }).await, "log:\n{}", d.log.text());

    // A child (this test program, so allowed) connects to the bus; this test takes the
    // connection over with pidfd_getfd and talks on it. The bus knows the connection as the
    // child's, whatever the child runs later.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "connect_then_exec_helper", "--nocapture", "--test-threads=1"])
        .env("SECURITY_HELPER_BUS", env.bus.dir.path().join("bus"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let child_pid = child.id();
    let _reap = Reap(child);
    let fd: i32 = stdout
        .lines()
        .map(|l| l.unwrap())
        .find_map(|l| l.split("HELPER_FD=").nth(1).map(|n| n.trim().parse().unwrap()))
        .expect("the helper said its descriptor");
    let pid = rustix::process::Pid::from_raw(child_pid as i32).unwrap();
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
    let socket = match rustix::process::pidfd_getfd(&pidfd, fd, rustix::process::PidfdGetfdFlags::empty()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skipped: pidfd_getfd is not allowed here: {e}");
            return;
        }
    };
    let conn =
        zbus::connection::Builder::unix_stream(std::os::unix::net::UnixStream::from(socket)).build().await.unwrap();
    let theirs = entrupy_tokend::client::SessionProxy::builder(&conn)
        .path(entrupy_tokend::names::session_path("default"))
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    let token = theirs.get_token().await.expect("the child runs the allowed executable");

    // The child execs another program; the same connection (same unique name) asks again.
    let before = std::fs::read_link(format!("/proc/{child_pid}/exe")).unwrap();
    writeln!(stdin, "exec").unwrap();
    let execed = eventually(T, || async {
        std::fs::read_link(format!("/proc/{child_pid}/exe")).map(|e| e != before).unwrap_or(false)
    })
    .await;
    assert!(execed, "the child exec'd sleep");
    assert_eq!(err_name(theirs.get_token().await), "AccessDenied", "the executable is checked on every call");
    assert_eq!(err_name(theirs.ensure_valid(10).await), "AccessDenied");
    assert!(theirs.is_authorization_valid().await.unwrap(), "other methods stay open");
    assert_eq!(s.get_token().await.unwrap(), token, "the test program itself is still allowed");
}
