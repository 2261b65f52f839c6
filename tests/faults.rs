//! Every row of the SPEC 4.1 (backend) and 4.2 (Entrupy login) tables, against the
//! simulator's scripted faults: what the daemon does, what callers and `LastError` see, what
//! `LoginFailed` carries, and that a valid token stays served throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

const T: Duration = Duration::from_secs(20);

fn status(status: u16, body: Option<&str>, retry_after: Option<&str>) -> Fault {
    Fault::Status { status, body: body.map(str::to_owned), retry_after: retry_after.map(str::to_owned) }
}

/// A daemon with a valid token of `lifetime`, ready for a client-triggered refresh.
async fn logged_in(lifetime: u64, cfg: Cfg) -> (Env, Daemon) {
    let env = Env::with_lifetime(Duration::from_secs(lifetime)).await;
    env.write_config(&cfg);
    let d = env.start_daemon().await;
    assert!(state_is(&env, "default", "valid").await, "log:\n{}", d.log.text());
    (env, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_back_off_and_recover_keeping_the_valid_token() {
    let (env, d) =
        logged_in(300, Cfg { margin: "30s", backoff_initial: "100ms", backoff_max: "400ms", ..Default::default() })
            .await;
    let s = env.session("default").await;
    let (token, _) = s.get_token().await.unwrap();
    let mut failed = s.receive_login_failed().await.unwrap();
    let table: Vec<(Endpoint, Fault, &str)> = vec![
        (Endpoint::Sign, status(503, None, None), "BackendError"),
        (Endpoint::Sign, Fault::MalformedJson, "BackendError"),
        (Endpoint::Sign, Fault::Drop, "NetworkError"),
        (
            Endpoint::Sign,
            Fault::Body { status: 200, body: br#"{"signed_authorization_request":5,"username":"x"}"#.to_vec() },
            "BackendError",
        ),
        (Endpoint::Login, status(500, Some(r#"{"error_code":"internal","description":"boom"}"#), None), "ServerError"),
        (Endpoint::Login, Fault::MalformedJson, "ServerError"),
        (Endpoint::Login, Fault::Drop, "NetworkError"),
        (Endpoint::Login, Fault::Body { status: 200, body: b"\xff\xfe\xfd".to_vec() }, "ServerError"),
        (
            Endpoint::Login,
            Fault::Body { status: 200, body: br#"{"token":"t","expiration_time":NaN}"#.to_vec() },
            "ServerError",
        ),
        (
            Endpoint::Login,
            Fault::Body { status: 200, body: br#"{"token":"t","expiration_time":-5}"#.to_vec() },
            "ServerError",
        ),
        (
            Endpoint::Login,
            Fault::Body { status: 200, body: br#"{"token":"t","expiration_time":99999999999}"#.to_vec() },
            "ServerError",
        ),
        (
            Endpoint::Login,
            Fault::Body { status: 200, body: br#"{"token":"","expiration_time":99999999999}"#.to_vec() },
            "ServerError",
        ),
        (Endpoint::Login, Fault::Oversized { bytes: 4 * 1024 * 1024 }, "ServerError"),
    ];
    for (ep, fault, name) in table {
        let before = env.sim.counters().login_ok;
        env.sim.push_fault(ep, fault.clone(), 1);
        assert_eq!(err_name(s.refresh().await), name, "{ep:?} {fault:?}");
        assert_eq!(s.last_error().await.unwrap(), name);
        let f = tokio::time::timeout(T, failed.next()).await.unwrap().unwrap();
        let args = f.args().unwrap();
        assert!(!args.error_code.is_empty() && !args.description.is_empty());
        // The token that is still valid stays served.
        assert_eq!(s.get_token().await.unwrap().0, token, "{fault:?} erased a valid token");
        assert!(s.is_authorization_valid().await.unwrap());
        // A client's failed attempt leaves the schedule as it was: no automatic retry storm.
        assert_eq!(env.sim.counters().login_ok, before);
    }
    // The body of the 500 was passed on.
    let exp = s.refresh().await.unwrap();
    assert!(exp > 0);
    assert_eq!(s.last_error().await.unwrap(), "", "a success clears LastError");
    assert!(!d.log.text().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_failed_carries_the_peers_error_body() {
    let (env, _d) = logged_in(300, Cfg { margin: "30s", ..Default::default() }).await;
    let s = env.session("default").await;
    let mut failed = s.receive_login_failed().await.unwrap();
    env.sim.push_fault(
        Endpoint::Login,
        status(502, Some(r#"{"error_code":"upstream_down","description":"try later"}"#), None),
        1,
    );
    assert_eq!(err_name(s.refresh().await), "ServerError");
    let f = tokio::time::timeout(T, failed.next()).await.unwrap().unwrap();
    let a = f.args().unwrap();
    assert_eq!((a.error_code.as_str(), a.description.as_str()), ("upstream_down", "try later"));
    // Only a description: the code is filled in as if absent.
    env.sim.push_fault(Endpoint::Login, status(502, Some(r#"{"description":"only this"}"#), None), 1);
    assert_eq!(err_name(s.refresh().await), "ServerError");
    let a = tokio::time::timeout(T, failed.next()).await.unwrap().unwrap();
    let a = a.args().unwrap();
    assert_eq!((a.error_code.as_str(), a.description.as_str()), ("ServerError", "only this"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_retries_follow_the_backoff_after_expiry() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg { backoff_initial: "200ms", backoff_max: "800ms", ..Default::default() });
    env.sim.push_fault(Endpoint::Sign, status(503, None, None), 6);
    let d = env.start_daemon().await;
    let s = env.session("default").await;
    assert!(state_is(&env, "default", "valid").await, "recovers after the faults; log:\n{}", d.log.text());
    let c = env.sim.counters();
    assert_eq!(c.sign_requests, 7, "six failures, then the success");
    let reqs = env.sim.requests_to(Endpoint::Sign);
    for pair in reqs.windows(2) {
        let gap = pair[1].received_at.duration_since(pair[0].received_at).unwrap();
        assert!(gap < Duration::from_millis(2500), "retry later than the cap allows: {gap:?}");
        assert!(gap >= Duration::from_millis(1), "no tight loop");
    }
    assert_eq!(s.last_error().await.unwrap(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_401_needs_reauthorization_until_the_credential_changes() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.sim.set_accepted_credentials(Some(vec!["good-credential".into()]));
    env.write_config(&Cfg { backoff_initial: "100ms", backoff_max: "200ms", ..Default::default() });
    let mut signals = session_signals(&env).await;
    let d = env.spawn_daemon(&[]);
    d.wait_for_name(&env.conn).await;
    let s = env.session("default").await;
    assert!(state_is(&env, "default", "needs-reauthorization").await, "log:\n{}", d.log.text());
    assert_eq!(s.last_error().await.unwrap(), "Unauthorized");
    // No automatic attempt is planned. That none comes over hours of sweeps, resumes and
    // network returns is checked on the paused clock:
    // engine::tests::a_rejected_credential_waits_for_a_change_of_the_file_or_a_client.
    assert_eq!(s.refresh_at().await.unwrap(), 0);
    assert_eq!(next_signal(&mut signals).await, "LoginFailed");
    assert_eq!(next_signal(&mut signals).await, "ReauthorizationRequired");
    // A client's Refresh makes exactly one attempt.
    let n = env.sim.counters().sign_requests;
    assert_eq!(err_name(s.refresh().await), "Unauthorized");
    assert_eq!(env.sim.counters().sign_requests, n + 1);
    // The credential file changes: the next sweep (or, at once, the reload) tries again.
    env.credential_file("backend-credential", "good-credential");
    d.signal(rustix::process::Signal::HUP);
    assert!(state_is(&env, "default", "valid").await, "log:\n{}", d.log.text());
    // Between the two: the client's failure, announced without a second
    // ReauthorizationRequired, and no automatic attempt in between.
    assert_eq!(next_signal(&mut signals).await, "LoginFailed", "log:\n{}", d.log.text());
    assert_eq!(next_signal(&mut signals).await, "LoginSucceeded", "log:\n{}", d.log.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_403_emits_reauthorization_required_and_other_4xx_fails() {
    let (env, _d) = logged_in(300, Cfg { margin: "30s", ..Default::default() }).await;
    let s = env.session("default").await;
    let mut reauth = s.receive_reauthorization_required().await.unwrap();
    env.sim.push_fault(Endpoint::Sign, status(403, None, None), 1);
    assert_eq!(err_name(s.refresh().await), "Unauthorized");
    tokio::time::timeout(T, reauth.next()).await.expect("ReauthorizationRequired").unwrap();
    assert_eq!(s.state().await.unwrap(), "needs-reauthorization");
    assert!(s.valid().await.unwrap(), "the old token still serves");
    assert!(s.refresh().await.unwrap() > 0, "Refresh works from needs-reauthorization");
    assert_eq!(s.state().await.unwrap(), "valid");

    env.sim.push_fault(
        Endpoint::Sign,
        status(400, Some(r#"{"error_code":"bad_profile","description":"no"}"#), None),
        1,
    );
    assert_eq!(err_name(s.refresh().await), "BackendError");
    assert_eq!(s.state().await.unwrap(), "failed");
    s.refresh().await.unwrap();
    env.sim.push_fault(Endpoint::Login, status(404, None, None), 1);
    assert_eq!(err_name(s.refresh().await), "ServerError");
    assert_eq!(s.state().await.unwrap(), "failed");
    // No automatic attempt is planned after a permanent error. That none comes, even after
    // the token expires, is checked on the paused clock:
    // engine::tests::a_permanent_error_is_not_retried_until_a_client_asks.
    assert_eq!(s.refresh_at().await.unwrap(), 0, "no automatic retry after a permanent error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entrupy_401_gets_one_fresh_signed_request_at_once() {
    let (env, _d) = logged_in(300, Cfg { margin: "30s", ..Default::default() }).await;
    let s = env.session("default").await;
    let c0 = env.sim.counters();
    env.sim.push_fault(
        Endpoint::Login,
        status(401, Some(r#"{"error_code":"expired","description":"stale"}"#), None),
        1,
    );
    s.refresh().await.unwrap();
    let c1 = env.sim.counters();
    assert_eq!(c1.sign_requests - c0.sign_requests, 2, "a fresh signed request");
    assert_eq!(c1.login_requests - c0.login_requests, 2, "and one more login at once");
    env.sim.push_fault(Endpoint::Login, status(401, None, None), 2);
    assert_eq!(err_name(s.refresh().await), "Unauthorized");
    assert_eq!(s.state().await.unwrap(), "valid", "Entrupy's 401 is not the backend's: no re-authorization");
    let c2 = env.sim.counters();
    assert_eq!(c2.login_requests - c1.login_requests, 2, "then no more at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_holds_every_attempt_until_retry_after() {
    for ep in [Endpoint::Sign, Endpoint::Login] {
        let (env, _d) = logged_in(300, Cfg { margin: "30s", ..Default::default() }).await;
        let s = env.session("default").await;
        env.sim.push_fault(
            ep,
            status(429, Some(r#"{"error_code":"too_many_requests","description":"slow down"}"#), Some("2")),
            1,
        );
        let t0 = Instant::now();
        assert_eq!(err_name(s.refresh().await), "TooManyRequests");
        let n = env.sim.counters();
        // While Retry-After holds, client requests fail at once without a request.
        let e = s.refresh().await.unwrap_err();
        assert_eq!(entrupy_tokend::client::short_error_name(&e).unwrap(), "TooManyRequests");
        assert!(format!("{e}").contains("retry after"), "{e}");
        assert_eq!(err_name(s.ensure_valid(3600).await), "TooManyRequests");
        assert_eq!(env.sim.counters(), n, "{ep:?}: no request before Retry-After");
        assert!(s.is_authorization_valid().await.unwrap());
        // After Retry-After the client may try again.
        let ok = eventually(T, || {
            let s = s.clone();
            async move { s.refresh().await.is_ok() }
        })
        .await;
        assert!(ok);
        assert!(t0.elapsed() >= Duration::from_millis(1900), "{ep:?}: retried before Retry-After");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_upstream_times_out_and_validity_answers_at_once() {
    let (env, _d) = logged_in(300, Cfg { margin: "30s", timeout: "1500ms", ..Default::default() }).await;
    let s = env.session("default").await;
    env.sim.push_fault(Endpoint::Login, Fault::Hang, 1);
    let s2 = s.clone();
    let call = tokio::spawn(async move { s2.refresh().await });
    assert!(eventually(T, || async { s.state().await.unwrap() == "refreshing" }).await);
    for _ in 0..20 {
        let t = Instant::now();
        assert!(s.is_authorization_valid().await.unwrap());
        assert!(s.valid().await.unwrap());
        assert!(t.elapsed() < Duration::from_secs(1), "IsAuthorizationValid waited on HTTP");
    }
    assert_eq!(err_name(call.await.unwrap()), "NetworkError");
    // A body that trickles in is cut by the whole-request timeout too.
    env.sim.push_fault(Endpoint::Sign, Fault::Trickle { bytes_per_sec: 1, total: 100 }, 1);
    let t = Instant::now();
    assert_eq!(err_name(s.refresh().await), "NetworkError");
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_profile_conflict_still_logs_in() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg {
        margin: "30s",
        sessions: vec![("first", "shared-user-01", "a@example.com")],
        ..Default::default()
    });
    let d = env.start_daemon().await;
    assert!(state_is(&env, "first", "valid").await);
    use std::collections::HashMap;
    use zbus::Variant;
    let mut p: HashMap<&str, Variant<'_>> = HashMap::new();
    p.insert("unique_user_id", Variant::from("shared-user-01"));
    p.insert("email", Variant::from("changed@example.com"));
    env.manager().await.add_session("second", p).await.unwrap();
    assert!(state_is(&env, "second", "valid").await, "log:\n{}", d.log.text());
    assert_eq!(env.sim.counters().sign_by_status.get(&409), Some(&1));
    assert!(d.log.text().contains("409"), "a warning is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_budget_holds_across_sessions_and_restarts() {
    let env = Env::with_lifetime(Duration::from_secs(300)).await;
    env.write_config(&Cfg {
        margin: "30s",
        per_minute: 2,
        per_day: 3,
        sessions: vec![("a", "budget-user-01", "a@example.com"), ("b", "budget-user-01", "b@example.com")],
        ..Default::default()
    });
    let mut d = env.start_daemon().await;
    assert!(state_is(&env, "a", "valid").await && state_is(&env, "b", "valid").await);
    let a = env.session("a").await;
    let e = a.refresh().await.unwrap_err();
    assert_eq!(entrupy_tokend::client::short_error_name(&e).unwrap(), "TooManyRequests");
    assert!(format!("{e}").contains("frees at"), "the message says when: {e}");
    d.stop();
    let _d = env.start_daemon().await;
    let a = env.session("a").await;
    assert_eq!(err_name(a.refresh().await), "TooManyRequests", "counted across restarts");
    assert_eq!(env.sim.counters().login_ok, 2);
    assert!(a.refresh_at().await.unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_test_ca() {
    let env = Env::new(SimConfig { tls: true, token_lifetime: Duration::from_secs(300), ..Default::default() }).await;
    assert!(env.sim.api_url().starts_with("https://"));
    env.write_config(&Cfg { margin: "30s", ..Default::default() });
    let d = env.start_daemon().await;
    assert!(state_is(&env, "default", "valid").await, "log:\n{}", d.log.text());
    // It logged in over TLS while confined (DNS, the trust store and the peer's port all
    // reachable under Landlock), where the kernel has Landlock.
    let log = d.log.text();
    if log.contains("sandbox=none") {
        println!("SKIPPED the confinement part: no Landlock on this kernel");
    } else {
        assert!(log.contains("sandbox=\"landlock abi"), "the daemon confined itself:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let env = Env::with_lifetime(Duration::from_secs(3)).await;
    env.write_config(&Cfg { margin: "1s", ..Default::default() });
    let mut d = env.start_daemon().await;
    let s = env.session("default").await;
    // Several cycles, failures with bodies, and a rejected signed request.
    assert!(eventually(T, || async { env.sim.counters().login_ok >= 3 }).await);
    env.sim.push_fault(Endpoint::Login, status(500, Some(r#"{"error_code":"x","description":"y"}"#), None), 1);
    let _ = s.refresh().await;
    let req = s.generate_authorization_request().await.unwrap();
    let signed = env.sim.sign_directly(&req, "user-0001-abcd", "user@example.com");
    let _ = s.login_with_signed_request(&signed).await;
    let _ = s.login_with_signed_request(&signed).await;
    d.stop();
    let log = d.log.text();
    assert!(log.contains("logged in"), "the log was captured:\n{log}");
    for (token, _, _) in env.sim.issued_tokens() {
        assert!(!log.contains(&token), "a token reached the log");
    }
    for r in env.sim.requests() {
        if let Some(a) = &r.authorization {
            assert!(!log.contains(a.trim_start_matches("Bearer ")), "the credential reached the log");
        }
        if r.endpoint == Some(Endpoint::Login)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&r.body)
            && let Some(sr) = v["signed_authorization_request"].as_str()
        {
            assert!(!log.contains(sr), "a signed request reached the log");
        }
    }
    assert!(!log.contains("app-user-credential-1"));
    assert!(!log.contains(&signed));
}
