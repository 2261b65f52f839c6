//! The token lifecycle end to end: a real daemon on a private bus, over real HTTP against the
//! simulator. First login, proactive refresh cycles, restarts, Cleanup, EnsureValid, shared
//! attempts, LoginWithSignedRequest, signals and property changes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_login_serves_a_valid_token_with_the_wire_format_of_the_spec() {
    let env = Env::with_lifetime(Duration::from_secs(120)).await;
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let _d = env.start_daemon().await;
    wait_state(&env, "default", "valid").await;
    let s = env.session("default").await;
    assert!(s.is_authorization_valid().await.unwrap());
    assert!(s.valid().await.unwrap());
    let (token, exp) = s.get_token().await.unwrap();
    assert!(env.sim.token_is_valid(&token), "the daemon serves the token the simulator issued");
    let sim_exp = env.sim.token_expiration(&token).unwrap();
    assert_eq!(exp, sim_exp.floor() as u64, "expires_at is rounded down");
    assert_eq!(s.expires_at().await.unwrap(), exp);
    assert_eq!(s.username().await.unwrap(), "OrgName-user-0001-abcd");
    assert_eq!(s.unique_user_id().await.unwrap(), "user-0001-abcd");
    assert_eq!(s.id().await.unwrap(), "default");
    assert_eq!(s.last_error().await.unwrap(), "");
    let last_login = s.last_login_at().await.unwrap() as f64;
    assert!((now() - last_login).abs() < 30.0);
    let refresh_at = s.refresh_at().await.unwrap();
    assert!(refresh_at + 1 >= exp - 30 && refresh_at <= exp, "refresh_at {refresh_at} for exp {exp}");

    let reqs = env.sim.requests();
    let sign = reqs.iter().find(|r| r.endpoint == Some(Endpoint::Sign)).unwrap();
    let login = reqs.iter().find(|r| r.endpoint == Some(Endpoint::Login)).unwrap();
    let ua = format!("entrupy-tokend/{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(sign.user_agent.as_deref(), Some(ua.as_str()));
    assert_eq!(login.user_agent.as_deref(), Some(ua.as_str()));
    assert_eq!(sign.authorization.as_deref(), Some("Bearer app-user-credential-1"));
    assert_eq!(sign.content_type.as_deref(), Some("application/json"));
    assert_eq!(login.content_type.as_deref(), Some("application/json"));
    let sb: serde_json::Value = serde_json::from_str(&sign.body).unwrap();
    assert_eq!(sb["unique_user_id"], "user-0001-abcd");
    assert_eq!(sb["email"], "user@example.com");
    let lb: serde_json::Value = serde_json::from_str(&login.body).unwrap();
    assert_eq!(lb.as_object().unwrap().len(), 1, "login body is exactly the signed request: {lb}");
    assert!(lb["signed_authorization_request"].is_string());
    let logins = env.sim.logins();
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0].device_id.len(), 32);
    assert_eq!(env.sim.counters().login_ok, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proactive_refresh_keeps_the_token_valid_with_one_login_per_cycle() {
    let env = Env::with_lifetime(Duration::from_secs(4)).await;
    env.write_config(&Cfg { margin: "2s", jitter: "0s", ..Default::default() });
    let d = env.start_daemon().await;
    wait_state(&env, "default", "valid").await;
    let s = env.session("default").await;
    // Two proactive refreshes of the real process, watched over the bus (many cycles, each
    // on time, are checked on the paused clock:
    // engine::tests::cycle_after_cycle_one_refresh_each_and_never_invalid).
    let start = std::time::Instant::now();
    let mut invalid_seen = 0;
    while env.sim.logins().len() < 3 {
        assert!(start.elapsed() < T, "no two refreshes in {T:?}; log:\n{}", d.log.text());
        if !s.is_authorization_valid().await.unwrap() {
            invalid_seen += 1;
        }
        // How often the bus is asked, not a wait for something.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(s.is_authorization_valid().await.unwrap());
    assert_eq!(invalid_seen, 0, "the token was never invalid in between; log:\n{}", d.log.text());
    let logins = env.sim.logins();
    for pair in logins.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at).unwrap().as_secs_f64();
        assert!(gap > 1.2, "two logins {gap:.2} s apart: more than one login per cycle");
    }
    assert_eq!(env.sim.counters().login_rejected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_costs_no_login_and_keeps_the_token() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let mut d = env.start_daemon().await;
    wait_state(&env, "default", "valid").await;
    let (token, exp) = env.session("default").await.get_token().await.unwrap();
    assert!(d.stop().success(), "SIGTERM exits 0");
    let mode = std::fs::metadata(env.state_dir().join("sessions/default.json")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
    let d2 = env.start_daemon().await;
    let s = env.session("default").await;
    assert_eq!(s.get_token().await.unwrap(), (token, exp));
    // A login decided at start would be under way by now ("refreshing"). That none comes
    // before the stored plan is checked on the paused clock:
    // engine::tests::a_restart_keeps_the_token_and_its_refresh_plan.
    loop_caught_up(&env).await;
    assert_eq!(s.state().await.unwrap(), "valid");
    assert_eq!(env.sim.counters().login_requests, 1, "no login after the restart; log:\n{}", d2.log.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_token_past_its_refresh_point_is_refreshed_at_start() {
    let env = Env::with_lifetime(Duration::from_secs(4)).await;
    env.write_config(&Cfg { margin: "5s", ..Default::default() });
    let mut d = env.start_daemon().await;
    wait_state(&env, "default", "valid").await;
    d.stop();
    let (_, expires, _) = env.sim.issued_tokens().remove(0);
    // Lifetime 4 s < 2 × margin: the refresh point is 2 s after the login. Real time: the
    // stored token must pass it on the wall clock while no daemon runs (how a restart before
    // and after the point plans is checked on the paused clock:
    // engine::tests::a_stored_token_past_its_refresh_point_is_refreshed_at_start).
    let past_point = expires - 4.0 + 2.2 - now();
    tokio::time::sleep(Duration::from_secs_f64(past_point.max(0.0))).await;
    let _d2 = env.start_daemon().await;
    let ok = eventually(T, || async { env.sim.counters().login_ok == 2 }).await;
    assert!(ok, "the stored token was refreshed");
    let second = env.sim.logins()[1].at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(second < expires, "refreshed at start, {:.2} s before the stored token expired", expires - second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_share_one_login() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let _d = env.start_daemon().await;
    wait_state(&env, "default", "valid").await;
    assert_eq!(env.sim.counters().login_ok, 1);
    // Hold the signing request so all callers arrive while the attempt is under way.
    env.sim.push_fault(Endpoint::Sign, Fault::Delay { ms: 800 }, 1);
    let s = env.session("default").await;
    let calls = (0..100).map(|_| {
        let s = s.clone();
        async move { s.refresh().await }
    });
    let results = futures_util::future::join_all(calls).await;
    let first = results[0].as_ref().unwrap();
    for r in &results {
        assert_eq!(r.as_ref().unwrap(), first, "every caller gets the one attempt's expiry");
    }
    assert_eq!(env.sim.counters().login_ok, 2, "100 concurrent Refresh calls, one login");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_valid_refreshes_only_when_needed() {
    let env = Env::with_lifetime(Duration::from_secs(60)).await;
    env.write_config(&Cfg { margin: "5s", ..Default::default() });
    let _d = env.start_daemon().await;
    wait_state(&env, "default", "valid").await;
    let s = env.session("default").await;
    let (t1, e1) = s.ensure_valid(10).await.unwrap();
    assert_eq!(env.sim.counters().login_ok, 1, "enough time left: no login");
    // More than any token covers: one refresh, and the fresh token comes back as it is.
    let (t2, e2) = s.ensure_valid(3600).await.unwrap();
    assert_ne!(t1, t2);
    assert!(e2 >= e1);
    assert_eq!(env.sim.counters().login_ok, 2, "at most one refresh");
    let many = (0..200).map(|_| {
        let s = s.clone();
        async move { s.ensure_valid(30).await.unwrap() }
    });
    futures_util::future::join_all(many).await;
    assert_eq!(env.sim.counters().login_ok, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_drops_the_token_and_survives_a_restart() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let mut d = env.start_daemon().await;
    wait_state(&env, "default", "valid").await;
    let s = env.session("default").await;
    s.cleanup().await.unwrap();
    assert_eq!(s.state().await.unwrap(), "logged-out");
    assert!(!s.valid().await.unwrap());
    assert_eq!(s.expires_at().await.unwrap(), 0);
    assert_eq!(s.refresh_at().await.unwrap(), 0);
    assert_eq!(err_name(s.get_token().await), "NotAuthorized");
    d.stop();
    let _d2 = env.start_daemon().await;
    let s = env.session("default").await;
    // A login decided at start would be under way by now. That none comes later is checked
    // on the paused clock:
    // engine::tests::cleanup_holds_across_a_reload_and_a_restart_until_a_client_asks.
    loop_caught_up(&env).await;
    assert_eq!(s.state().await.unwrap(), "logged-out", "Cleanup is persisted");
    assert_eq!(env.sim.counters().login_ok, 1);
    let exp = s.refresh().await.unwrap();
    assert!(exp > 0);
    assert_eq!(s.state().await.unwrap(), "valid");
    assert_eq!(env.sim.counters().login_ok, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_backend_only_signed_requests_log_in() {
    let env = Env::with_lifetime(Duration::from_secs(2)).await;
    env.write_config(&Cfg { backend: false, ..Default::default() });
    let _d = env.start_daemon().await;
    let s = env.session("default").await;
    assert_eq!(s.state().await.unwrap(), "logged-out");
    let mut failed = s.receive_login_failed().await.unwrap();
    assert_eq!(err_name(s.refresh().await), "NotConfigured");
    assert_eq!(err_name(s.ensure_valid(1).await), "NotConfigured");
    assert_eq!(s.last_error().await.unwrap(), "", "NotConfigured is not a login attempt");

    let request = s.generate_authorization_request().await.unwrap();
    let signed = env.sim.sign_directly(&request, "user-0001-abcd", "user@example.com");
    let mut succeeded = s.receive_login_succeeded().await.unwrap();
    let mut expired = s.receive_authorization_expired().await.unwrap();
    let exp = s.login_with_signed_request(&signed).await.unwrap();
    let sig = tokio::time::timeout(T, succeeded.next()).await.unwrap().unwrap();
    assert_eq!(sig.args().unwrap().expires_at, exp);
    assert!(s.is_authorization_valid().await.unwrap());
    assert_eq!(s.refresh_at().await.unwrap(), 0, "nothing can refresh without a backend");
    // The same signed request again is a replay: Entrupy's 401 goes back to the caller.
    assert_eq!(err_name(s.login_with_signed_request(&signed).await), "Unauthorized");
    // The first LoginFailed is this one: none came for NotConfigured above.
    let f = tokio::time::timeout(T, failed.next()).await.unwrap().unwrap();
    let code = f.args().unwrap().error_code.to_string();
    assert!(!code.is_empty() && code != "NotConfigured", "{code}");
    assert!(s.is_authorization_valid().await.unwrap(), "a failed login keeps a valid token");
    // Valid turns false on time, with AuthorizationExpired, though nothing else happens.
    tokio::time::timeout(Duration::from_secs(10), expired.next()).await.expect("AuthorizationExpired").unwrap();
    let late = now() - exp as f64;
    assert!(late < 2.5, "expired {late:.2} s after the (rounded-down) expiry");
    assert!(!s.valid().await.unwrap());
    assert_eq!(s.expires_at().await.unwrap(), exp, "ExpiresAt keeps the old expiry");
    assert_eq!(err_name(s.get_token().await), "NotAuthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_changed_and_signals_follow_a_refresh() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let _d = env.start_daemon().await;
    wait_state(&env, "default", "valid").await;
    let s = env.session("default").await;
    let props = zbus::fdo::PropertiesProxy::builder(&env.conn)
        .destination(entrupy_tokend::names::BUS_NAME)
        .path(entrupy_tokend::names::session_path("default"))
        .build()
        .await
        .unwrap();
    let mut changes = props.receive_properties_changed().await.unwrap();
    let mut succeeded = s.receive_login_succeeded().await.unwrap();
    let old = s.expires_at().await.unwrap();
    // Longer tokens from now on: ExpiresAt (whole seconds) changes without a second passing.
    env.sim.set_token_lifetime(Duration::from_secs(600));
    let exp = s.refresh().await.unwrap();
    assert!(exp > old);
    let sig = tokio::time::timeout(T, succeeded.next()).await.unwrap().unwrap();
    assert_eq!(sig.args().unwrap().expires_at, exp);
    let mut seen: std::collections::HashMap<String, zbus::OwnedVariant> = std::collections::HashMap::new();
    while !seen.contains_key("ExpiresAt") {
        let c = tokio::time::timeout(T, changes.next()).await.expect("PropertiesChanged").unwrap();
        let args = c.args().unwrap();
        assert_eq!(args.interface_name.as_str(), "com.entrupy.TokenDaemon1.Session");
        for (k, v) in args.changed_properties.iter() {
            seen.insert(k.to_string(), zbus::OwnedVariant::try_from(v.try_clone().unwrap()).unwrap());
        }
    }
    assert_eq!(u64::try_from(&seen["ExpiresAt"]).unwrap(), exp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_adds_lists_and_removes_sessions() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let mut d = env.start_daemon().await;
    let m = env.manager().await;
    assert_eq!(m.version().await.unwrap(), env!("CARGO_PKG_VERSION"));
    let list = m.list_sessions().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].as_str(), "/com/entrupy/TokenDaemon1/session/default");
    assert_eq!(err_name(m.get_session("nope").await), "NoSuchSession");
    use std::collections::HashMap;
    use zbus::Variant;
    let om = env.object_manager().await;
    let mut added = om.receive_interfaces_added().await.unwrap();
    let mut removed = om.receive_interfaces_removed().await.unwrap();
    let profile = |uid: &'static str| {
        let mut p: HashMap<&str, Variant<'_>> = HashMap::new();
        p.insert("unique_user_id", Variant::from(uid));
        p.insert("email", Variant::from("second@example.com"));
        p.insert("first_name", Variant::from("Grace"));
        p
    };
    let path = m.add_session("my-id", profile("user-0002-abcd")).await.unwrap();
    assert_eq!(path.as_str(), "/com/entrupy/TokenDaemon1/session/my_2did");
    let a = tokio::time::timeout(T, added.next()).await.unwrap().unwrap();
    assert_eq!(a.args().unwrap().object_path.as_str(), path.as_str());
    assert_eq!(err_name(m.add_session("my-id", profile("user-0002-abcd")).await), "AlreadyExists");
    assert_eq!(err_name(m.add_session("Bad Id", profile("user-0002-abcd")).await), "InvalidArgument");
    assert_eq!(err_name(m.add_session("x", profile("short")).await), "InvalidArgument");
    let mut bad = profile("user-0002-abcd");
    bad.insert("colour", Variant::from("red"));
    assert_eq!(err_name(m.add_session("x", bad).await), "InvalidArgument");
    let mut bad = profile("user-0002-abcd");
    bad.insert("email", Variant::from(5u32));
    assert_eq!(err_name(m.add_session("x", bad).await), "InvalidArgument");
    let mut bad = profile("user-0002-abcd");
    bad.remove("email");
    assert_eq!(err_name(m.add_session("x", bad).await), "InvalidArgument");
    assert_eq!(m.list_sessions().await.unwrap().len(), 2, "failed adds change nothing");
    // GetManagedObjects lists exactly the sessions, with their properties.
    let objects = om.get_managed_objects().await.unwrap();
    let mut paths: Vec<String> = objects.keys().map(|p| p.to_string()).collect();
    paths.sort();
    assert_eq!(paths, ["/com/entrupy/TokenDaemon1/session/default", "/com/entrupy/TokenDaemon1/session/my_2did"]);
    let props = &objects.values().next().unwrap()["com.entrupy.TokenDaemon1.Session"];
    for p in ["Id", "UniqueUserId", "Username", "State", "Valid", "ExpiresAt", "RefreshAt", "LastLoginAt", "LastError"]
    {
        assert!(props.contains_key(p), "GetManagedObjects lacks {p}");
    }
    assert_eq!(m.get_session("my-id").await.unwrap().as_str(), path.as_str());
    wait_state(&env, "my-id", "valid").await;

    // Persisted: it comes back after a restart.
    d.stop();
    let mut d = env.start_daemon().await;
    assert_eq!(m.list_sessions().await.unwrap().len(), 2);
    wait_state(&env, "my-id", "valid").await;
    m.remove_session("my-id").await.unwrap();
    let r = tokio::time::timeout(T, removed.next()).await.unwrap().unwrap();
    assert_eq!(r.args().unwrap().object_path.as_str(), path.as_str());
    assert_eq!(err_name(m.remove_session("my-id").await), "NoSuchSession");
    assert_eq!(m.list_sessions().await.unwrap().len(), 1);
    d.stop();
    let _d = env.start_daemon().await;
    assert_eq!(m.list_sessions().await.unwrap().len(), 1, "RemoveSession forgets the session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_configured_later_starts_a_session_that_was_only_waiting_for_one() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg { backend: false, ..Default::default() });
    let mut d = env.start_daemon().await;
    assert_eq!(env.session("default").await.state().await.unwrap(), "logged-out");
    d.stop();
    // A restart with a backend: the session was never cleaned up, so it logs in.
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let d = env.start_daemon().await;
    wait_state(&env, "default", "valid").await;
    // Cleanup, then a reload: Cleanup wins until a client asks.
    let s = env.session("default").await;
    s.cleanup().await.unwrap();
    d.signal(rustix::process::Signal::HUP);
    // The loop logs this after it stepped every session with the new configuration: a
    // login the reload started would be under way. That none comes later is checked on the
    // paused clock:
    // engine::tests::cleanup_holds_across_a_reload_and_a_restart_until_a_client_asks.
    let reloaded = eventually(T, || async { d.log.text().contains("configuration reloaded") }).await;
    assert!(reloaded, "log:\n{}", d.log.text());
    assert_eq!(s.state().await.unwrap(), "logged-out");
    assert_eq!(env.sim.counters().login_ok, 1);
}

/// The sessions found at start are served before the name is claimed and are not announced
/// one by one (nobody watching the service could receive it); `GetManagedObjects` lists
/// them, and a session added later is announced.
#[tokio::test]
async fn sessions_found_at_start_are_listed_not_announced() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg::default());
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.ObjectManager")
        .member("InterfacesAdded")
        .build()
        .unwrap();
    let mut signals = zbus::MessageStream::for_match_rule(rule, &env.conn, None).await.unwrap();
    let _d = env.start_daemon().await;
    let om = env.object_manager().await;
    let objects = om.get_managed_objects().await.unwrap();
    let paths: Vec<&str> = objects.keys().map(|p| p.as_str()).collect();
    assert_eq!(paths, ["/com/entrupy/TokenDaemon1/session/default"]);
    let mut profile = std::collections::HashMap::new();
    profile.insert("unique_user_id", zbus::Variant::from("user-0002-abcd"));
    profile.insert("email", zbus::Variant::from("second@example.com"));
    let added = env.manager().await.add_session("later", profile).await.unwrap();
    // The first InterfacesAdded the bus delivered is the added session's.
    let msg = tokio::time::timeout(T, signals.next()).await.unwrap().unwrap().unwrap();
    type Interfaces = std::collections::HashMap<String, std::collections::HashMap<String, zbus::OwnedVariant>>;
    let (path, _): (zbus::OwnedObjectPath, Interfaces) = msg.body().deserialize().unwrap();
    assert_eq!(path.as_str(), added.as_str());
}
