//! End-to-end tests of the simulator over real sockets: the protocol behaviour of `/sign`
//! and `/login`, every fault kind, pause, shutdown, TLS and the control endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use entrupy_sim::{Endpoint, Fault, SimConfig, Simulator};
use serde_json::json;
use support::*;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

fn now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

async fn sim() -> Simulator {
    Simulator::start(SimConfig::default()).await.unwrap()
}

#[tokio::test]
async fn sign_and_login_round_trip() {
    let sim = sim().await;
    assert!(sim.base_url().starts_with("http://127.0.0.1:"));
    assert_eq!(sim.api_url(), sim.base_url());
    assert_eq!(sim.backend_url(), format!("{}/sign", sim.base_url()));
    assert_eq!(sim.ca_pem(), None);

    let device = entrupy_sim::random_hex32();
    let authz = entrupy_sim::fresh_authorization_request(&device);
    let r = post_json(&sim, "/sign", Some("cred"), &sign_body(&authz, "user-0001", "u@example.com")).await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["username"], "OrgName-user-0001");
    let signed = j["signed_authorization_request"].as_str().unwrap();

    let sim2 = sim.clone();
    let r = login(&sim2, signed).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    let token = j["token"].as_str().unwrap();
    assert_eq!(token.len(), 40);
    let exp = j["expiration_time"].as_f64().unwrap();
    assert!((exp - (now() + 3600.0)).abs() < 5.0);
    assert_eq!(j["username"], "OrgName-user-0001");

    // serde_json's default float parsing may land one ulp off the printed value.
    let issued = sim.issued_tokens();
    assert_eq!(issued.len(), 1);
    assert_eq!((issued[0].0.as_str(), issued[0].2.as_str()), (token, "user-0001"));
    assert!((issued[0].1 - exp).abs() < 1e-6, "{} vs {exp}", issued[0].1);
    assert!(sim.token_is_valid(token));
    assert!(!sim.token_is_valid("nope"));
    let logins = sim.logins();
    assert_eq!(logins[0].device_id, device);

    let c = sim.counters();
    assert_eq!((c.sign_requests, c.sign_ok, c.sign_rejected), (1, 1, 0));
    assert_eq!((c.login_requests, c.login_ok, c.login_rejected), (1, 1, 0));
    assert_eq!(c.login_by_status.get(&200), Some(&1));

    let reqs = sim.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].endpoint, Some(Endpoint::Sign));
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/sign");
    assert_eq!(reqs[0].status, Some(200));
    assert_eq!(reqs[0].authorization.as_deref(), Some("Bearer cred"));
    assert_eq!(reqs[0].user_agent.as_deref(), Some("entrupy-tokend/test"));
    assert_eq!(reqs[0].content_type.as_deref(), Some("application/json"));
    assert!(reqs[0].body.contains("user-0001"));
    assert_eq!(reqs[1].endpoint, Some(Endpoint::Login));
    assert_eq!(reqs[1].authorization, None);
    assert_eq!(sim.requests_to(Endpoint::Login).len(), 1);
}

#[tokio::test]
async fn fractional_and_zero_token_lifetime() {
    let sim = sim().await;
    sim.set_token_lifetime(Duration::from_millis(1500));
    let r = login(&sim, &signed(&sim, "user-0001")).await;
    let exp = r.json()["expiration_time"].as_f64().unwrap();
    assert!((exp - (now() + 1.5)).abs() < 1.0);
    assert!(exp.fract() != 0.0);
    sim.set_token_lifetime(Duration::ZERO);
    let r = login(&sim, &signed(&sim, "user-0001")).await;
    let token = r.json()["token"].as_str().unwrap().to_owned();
    assert!(!sim.token_is_valid(&token));
}

#[tokio::test]
async fn replayed_signed_request_is_rejected() {
    let sim = sim().await;
    let s = sign(&sim, "user-0001", "u@example.com").await;
    assert_eq!(login(&sim, &s).await.status, 200);
    let r = login(&sim, &s).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error_code"], "invalid_signed_request");
    // The same authorization request signed again is still a replay: the nonce is spent.
    let body = sim.requests()[0].body.clone();
    let r = send(&sim, "POST", "/sign", &[("Content-Type", "application/json")], body.as_bytes()).await;
    let again = r.json()["signed_authorization_request"].as_str().unwrap().to_owned();
    assert_ne!(again, s);
    assert_eq!(login(&sim, &again).await.status, 401);
    let c = sim.counters();
    assert_eq!((c.login_ok, c.login_rejected), (1, 2));
}

#[tokio::test]
async fn tampered_stale_and_malformed_signed_requests_are_rejected() {
    let sim = sim().await;
    let mut s = signed(&sim, "user-0001");
    s.push('x');
    assert_eq!(login(&sim, &s).await.status, 401);
    // Signed by another simulator instance.
    let other = Simulator::start(SimConfig::default()).await.unwrap();
    assert_eq!(login(&sim, &signed(&other, "user-0001")).await.status, 401);

    let authz = entrupy_sim::fresh_authorization_request(&entrupy_sim::random_hex32());
    let stale = sim.sign_at(&authz, "user-0001", "u@example.com", SystemTime::now() - Duration::from_secs(301));
    let r = login(&sim, &stale).await;
    assert_eq!(r.status, 401);
    assert!(r.json()["description"].as_str().unwrap().contains("expired"));
    // Fresh again once the allowed age is raised: stale requests were not consumed.
    sim.set_signed_request_max_age(Duration::from_secs(600));
    assert_eq!(login(&sim, &stale).await.status, 200);
    sim.set_signed_request_max_age(Duration::from_secs(300));

    let old = entrupy_sim::encode_authorization_request(&entrupy_sim::AuthorizationRequest {
        v: 1,
        nonce: entrupy_sim::random_hex32(),
        issued_at: now() as i64 - 1000,
        device_id: entrupy_sim::random_hex32(),
    });
    let r = login(&sim, &sim.sign_directly(&old, "user-0001", "u@example.com")).await;
    assert_eq!(r.status, 401);

    // An authorization request with padding is not what SPEC 4.1 prescribes.
    let padded = format!("{authz}=");
    let r = login(&sim, &sim.sign_directly(&padded, "user-0001", "u@example.com")).await;
    assert_eq!(r.status, 401);
    let opaque = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("hello");
    let r = login(&sim, &sim.sign_directly(&opaque, "user-0001", "u@example.com")).await;
    assert_eq!(r.status, 401);
    assert_eq!(sim.counters().login_ok, 1);
}

#[tokio::test]
async fn login_body_must_be_exact() {
    let sim = sim().await;
    let s = signed(&sim, "user-0001");
    let extra = json!({"signed_authorization_request": s, "x": 1});
    assert_eq!(post_json(&sim, "/login", None, &extra).await.status, 400);
    let wrong_type = json!({"signed_authorization_request": 5});
    assert_eq!(post_json(&sim, "/login", None, &wrong_type).await.status, 400);
    let r = send(&sim, "POST", "/login", &[("Content-Type", "application/json")], b"nope").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_code"], "bad_request");
    let body = json!({"signed_authorization_request": s}).to_string();
    let r = send(&sim, "POST", "/login", &[("Content-Type", "text/plain")], body.as_bytes()).await;
    assert_eq!(r.status, 415);
    let r = send(&sim, "GET", "/login", &[], b"").await;
    assert_eq!(r.status, 405);
    let r = send(&sim, "POST", "/v2/login", &[], b"").await;
    assert_eq!(r.status, 404);
    assert_eq!(sim.counters().other_requests, 1);
    // The body checks did not consume the request.
    assert_eq!(login(&sim, &s).await.status, 200);
}

#[tokio::test]
async fn per_minute_limit_answers_429_with_retry_after() {
    let sim = Simulator::start(SimConfig { logins_per_minute: 2, ..SimConfig::default() }).await.unwrap();
    assert_eq!(login(&sim, &signed(&sim, "user-0001")).await.status, 200);
    assert_eq!(login(&sim, &signed(&sim, "user-0001")).await.status, 200);
    let r = login(&sim, &signed(&sim, "user-0001")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error_code"], "too_many_requests");
    let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((58..=60).contains(&ra), "{ra}");
    // Limits are per user.
    assert_eq!(login(&sim, &signed(&sim, "user-0002")).await.status, 200);
    sim.reset_rate_limits();
    assert_eq!(login(&sim, &signed(&sim, "user-0001")).await.status, 200);
    let c = sim.counters();
    assert_eq!((c.login_ok, c.login_rejected), (4, 1));
    assert_eq!(c.login_by_status.get(&429), Some(&1));
}

#[tokio::test]
async fn per_day_limit_answers_429() {
    let sim = sim().await;
    sim.set_limits(100, 1);
    assert_eq!(login(&sim, &signed(&sim, "user-0001")).await.status, 200);
    let r = login(&sim, &signed(&sim, "user-0001")).await;
    assert_eq!(r.status, 429);
    let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(ra > 86000, "{ra}");
}

#[tokio::test]
async fn profile_change_answers_409_still_signed() {
    let sim = sim().await;
    let authz = || entrupy_sim::fresh_authorization_request(&entrupy_sim::random_hex32());
    let r = post_json(&sim, "/sign", None, &sign_body(&authz(), "user-0001", "a@x.com")).await;
    assert_eq!(r.status, 200);
    let r = post_json(&sim, "/sign", None, &sign_body(&authz(), "user-0001", "b@x.com")).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["username"], "OrgName-user-0001");
    let s = r.json()["signed_authorization_request"].as_str().unwrap().to_owned();
    assert_eq!(login(&sim, &s).await.status, 200);
    // The new profile is remembered.
    let r = post_json(&sim, "/sign", None, &sign_body(&authz(), "user-0001", "b@x.com")).await;
    assert_eq!(r.status, 200);
    let mut named = sign_body(&authz(), "user-0001", "b@x.com");
    named["first_name"] = json!("Ada");
    assert_eq!(post_json(&sim, "/sign", None, &named).await.status, 409);
    assert_eq!(post_json(&sim, "/sign", None, &named).await.status, 200);
    let c = sim.counters();
    assert_eq!((c.sign_ok, c.sign_rejected), (5, 0));
    assert_eq!(c.sign_by_status.get(&409), Some(&2));
}

#[tokio::test]
async fn backend_credentials() {
    let sim = Simulator::start(SimConfig { accepted_credentials: Some(vec!["good".into()]), ..SimConfig::default() })
        .await
        .unwrap();
    let body = sign_body(
        &entrupy_sim::fresh_authorization_request(&entrupy_sim::random_hex32()),
        "user-0001",
        "u@example.com",
    );
    let r = post_json(&sim, "/sign", None, &body).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error_code"], "unauthorized");
    assert_eq!(post_json(&sim, "/sign", Some("bad"), &body).await.status, 401);
    assert_eq!(post_json(&sim, "/sign", Some("good"), &body).await.status, 200);
    sim.set_accepted_credentials(Some(vec!["other".into()]));
    assert_eq!(post_json(&sim, "/sign", Some("good"), &body).await.status, 401);
    sim.set_accepted_credentials(None);
    assert_eq!(post_json(&sim, "/sign", None, &body).await.status, 200);
    let c = sim.counters();
    assert_eq!((c.sign_ok, c.sign_rejected), (2, 3));
}

#[tokio::test]
async fn sign_body_validation() {
    let sim = sim().await;
    let authz = entrupy_sim::fresh_authorization_request(&entrupy_sim::random_hex32());
    let cases = [
        json!({"sdk_authorization_request": authz, "unique_user_id": "user-0001"}),
        json!({"sdk_authorization_request": authz, "unique_user_id": 12345678, "email": "u@x.com"}),
        json!({"sdk_authorization_request": authz, "unique_user_id": "short", "email": "u@x.com"}),
        json!({"sdk_authorization_request": authz, "unique_user_id": "user 0001", "email": "u@x.com"}),
        json!({"sdk_authorization_request": "", "unique_user_id": "user-0001", "email": "u@x.com"}),
        json!({"sdk_authorization_request": authz, "unique_user_id": "user-0001", "email": "u@x.com", "first_name": 1}),
        json!(["not", "an", "object"]),
    ];
    for c in cases {
        let r = post_json(&sim, "/sign", None, &c).await;
        assert_eq!(r.status, 400, "{c}");
        assert_eq!(r.json()["error_code"], "bad_request");
    }
    let ok = sign_body(&authz, "user-0001", "u@x.com").to_string();
    let r = send(&sim, "POST", "/sign", &[], ok.as_bytes()).await;
    assert_eq!(r.status, 415);
    let r = send(&sim, "GET", "/sign", &[], b"").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = send(&sim, "POST", "/sign", &[("Content-Type", "application/json; charset=utf-8")], ok.as_bytes()).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn status_fault_is_consumed_count_times() {
    let sim = sim().await;
    sim.push_fault(
        Endpoint::Login,
        Fault::Status {
            status: 503,
            body: Some(r#"{"error_code":"unavailable","description":"down"}"#.into()),
            retry_after: Some("7".into()),
        },
        2,
    );
    sim.push_fault(
        Endpoint::Login,
        Fault::Status { status: 429, body: None, retry_after: Some("Wed, 21 Oct 2015 07:28:00 GMT".into()) },
        1,
    );
    assert_eq!(sim.pending_faults(Endpoint::Login), 3);
    for _ in 0..2 {
        let r = login(&sim, &signed(&sim, "user-0001")).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("7"));
        assert_eq!(r.json()["error_code"], "unavailable");
    }
    let r = login(&sim, &signed(&sim, "user-0001")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("Wed, 21 Oct 2015 07:28:00 GMT"));
    assert!(r.body.is_empty());
    // The sign endpoint was never affected, and the queue is now empty.
    assert!(!sign(&sim, "user-0001", "u@x.com").await.is_empty());
    assert_eq!(login(&sim, &signed(&sim, "user-0001")).await.status, 200);
    let c = sim.counters();
    assert_eq!((c.login_requests, c.login_ok, c.login_rejected), (4, 1, 3));

    sim.push_fault(Endpoint::Sign, Fault::Hang, 5);
    sim.clear_faults();
    assert_eq!(sim.pending_faults(Endpoint::Sign), 0);
}

#[tokio::test]
async fn hang_holds_the_connection_until_shutdown() {
    let sim = sim().await;
    sim.push_fault(Endpoint::Sign, Fault::Hang, 1);
    let addr = sim.local_addr();
    let req = request_bytes("POST", "/sign", &[], b"{}");
    let task = tokio::spawn(async move {
        let s = TcpStream::connect(addr).await.unwrap();
        exchange(s, &req).await
    });
    assert!(sim.wait_for(SHORT, |c| c.sign_requests == 1).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!task.is_finished());
    assert_eq!(sim.requests()[0].status, None);
    sim.shutdown();
    let raw = tokio::time::timeout(SHORT, task).await.unwrap().unwrap();
    // Closed (or reset) without any HTTP answer.
    assert!(raw.map(|r| r.is_empty()).unwrap_or(true));
}

#[tokio::test]
async fn drop_closes_without_answer() {
    let sim = sim().await;
    sim.push_fault(Endpoint::Login, Fault::Drop, 1);
    let s = TcpStream::connect(sim.local_addr()).await.unwrap();
    let body = json!({"signed_authorization_request": signed(&sim, "user-0001")}).to_string();
    let req = request_bytes("POST", "/login", &[("Content-Type", "application/json")], body.as_bytes());
    let raw = tokio::time::timeout(SHORT, exchange(s, &req)).await.unwrap();
    assert!(raw.map(|r| r.is_empty()).unwrap_or(true));
    let c = sim.counters();
    assert_eq!((c.login_requests, c.login_ok, c.login_rejected), (1, 0, 0));
    assert_eq!(sim.requests()[0].status, None);
    // The fault was used once: the same signed request (not consumed) now succeeds.
    let s = serde_json::from_str::<serde_json::Value>(&body).unwrap();
    assert_eq!(login(&sim, s["signed_authorization_request"].as_str().unwrap()).await.status, 200);
}

#[tokio::test]
async fn malformed_and_raw_bodies() {
    let sim = sim().await;
    sim.push_fault(Endpoint::Login, Fault::MalformedJson, 1);
    let r = login(&sim, &signed(&sim, "user-0001")).await;
    assert_eq!(r.status, 200);
    assert!(serde_json::from_slice::<serde_json::Value>(&r.body).is_err());

    let raw = vec![b'{', 0xff, 0xfe, b'}'];
    sim.push_fault(Endpoint::Sign, Fault::Body { status: 200, body: raw.clone() }, 1);
    let r = post_json(&sim, "/sign", None, &json!({})).await;
    assert_eq!((r.status, r.body), (200, raw));

    let nan = br#"{"token":"t","expiration_time":NaN}"#.to_vec();
    sim.push_fault(Endpoint::Login, Fault::Body { status: 200, body: nan.clone() }, 1);
    let r = login(&sim, "x").await;
    assert_eq!(r.body, nan);
    assert_eq!(sim.counters().login_ok, 0);
}

#[tokio::test]
async fn oversized_body_is_streamed_chunked() {
    let sim = sim().await;
    sim.push_fault(Endpoint::Login, Fault::Oversized { bytes: 10 << 20 }, 1);
    let s = TcpStream::connect(sim.local_addr()).await.unwrap();
    let raw = exchange(s, &request_bytes("POST", "/login", &[], b"")).await.unwrap();
    let r = parse(&raw).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.body.len(), (10 << 20) + 12);
    assert!(r.body.starts_with(b"{\"token\":\"   "));
    assert!(r.body.ends_with(b"  \"}"));
}

#[tokio::test]
async fn trickle_body_arrives_slowly() {
    let sim = sim().await;
    sim.push_fault(Endpoint::Login, Fault::Trickle { bytes_per_sec: 40, total: 16 }, 1);
    let mut s = TcpStream::connect(sim.local_addr()).await.unwrap();
    let start = Instant::now();
    let req = request_bytes("POST", "/login", &[], b"");
    tokio::io::AsyncWriteExt::write_all(&mut s, &req).await.unwrap();
    // The head comes at once; the body does not.
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(n > 0);
    let mut raw = buf[..n].to_vec();
    s.read_to_end(&mut raw).await.unwrap();
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    let r = parse(&raw).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"{\"padding\":\"  \"}");
}

#[tokio::test]
async fn delay_then_normal_processing() {
    let sim = sim().await;
    sim.push_fault(Endpoint::Sign, Fault::Delay { ms: 200 }, 1);
    let start = Instant::now();
    sign(&sim, "user-0001", "u@x.com").await;
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(sim.counters().sign_ok, 1);
}

#[tokio::test]
async fn pause_holds_requests_until_resumed() {
    let sim = sim().await;
    sim.set_paused(true);
    let s = signed(&sim, "user-0001");
    let sim2 = sim.clone();
    let task = tokio::spawn(async move { login(&sim2, &s).await.status });
    assert!(sim.wait_for(SHORT, |c| c.login_requests == 1).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!task.is_finished());
    assert_eq!(sim.requests()[0].status, None);
    sim.set_paused(false);
    assert_eq!(task.await.unwrap(), 200);
    assert!(sim.wait_for(SHORT, |c| c.login_ok == 1).await);
    assert!(!sim.wait_for(Duration::from_millis(50), |c| c.login_ok == 2).await);
}

#[tokio::test]
async fn shutdown_and_drop_stop_the_listener() {
    let sim = sim().await;
    let addr = sim.local_addr();
    sim.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());

    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let addr = sim.local_addr();
    let clone = sim.clone();
    drop(sim);
    // A clone keeps it alive.
    assert_eq!(send(&clone, "GET", "/_sim/stats", &[], b"").await.status, 200);
    drop(clone);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn tls_mode_serves_https_with_the_test_ca() {
    let sim = Simulator::start(SimConfig { tls: true, ..SimConfig::default() }).await.unwrap();
    assert!(sim.base_url().starts_with("https://localhost:"));
    assert!(sim.ca_pem().unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
    let connector = tls_connector(sim.ca_der().unwrap());
    let authz = entrupy_sim::fresh_authorization_request(&entrupy_sim::random_hex32());
    let body = sign_body(&authz, "user-0001", "u@x.com").to_string();
    for name in ["localhost", "127.0.0.1"] {
        let tcp = TcpStream::connect(sim.local_addr()).await.unwrap();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let tls = connector.connect(server_name, tcp).await.unwrap();
        let raw =
            exchange(tls, &request_bytes("POST", "/sign", &[("Content-Type", "application/json")], body.as_bytes()))
                .await
                .unwrap_or_default();
        let r = parse(&raw).unwrap();
        assert_eq!(r.status, 200);
    }
    // A client that does not trust the test CA fails the handshake.
    let other = Simulator::start(SimConfig { tls: true, ..SimConfig::default() }).await.unwrap();
    let connector = tls_connector(other.ca_der().unwrap());
    let tcp = TcpStream::connect(sim.local_addr()).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    assert!(connector.connect(server_name, tcp).await.is_err());
}

#[tokio::test]
async fn control_endpoints() {
    let sim = sim().await;
    let fault = json!({"endpoint":"login","status":503,"count":1,"retry_after":"5","body":"{\"error_code\":\"x\",\"description\":\"y\"}"});
    let r = post_json(&sim, "/_sim/fault", None, &fault).await;
    assert_eq!(r.status, 200);
    let r = post_json(&sim, "/_sim/fault", None, &json!({"endpoint":"sign","kind":"drop","count":3})).await;
    assert_eq!(r.status, 200);
    let r = post_json(&sim, "/_sim/fault", None, &json!({"endpoint":"nowhere"})).await;
    assert_eq!(r.status, 400);

    let r = login(&sim, &signed(&sim, "user-0001")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("5"));

    let stats = send(&sim, "GET", "/_sim/stats", &[], b"").await.json();
    assert_eq!(stats["counters"]["login_requests"], 1);
    assert_eq!(stats["counters"]["login_rejected"], 1);
    assert_eq!(stats["pending_faults"]["sign"], 3);
    let r = send(&sim, "POST", "/_sim/clear", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(sim.pending_faults(Endpoint::Sign), 0);
    let r = post_json(&sim, "/_sim/pause", None, &json!({"paused": false})).await;
    assert_eq!(r.status, 200);
    // Control requests are not part of the log.
    assert_eq!(sim.requests().len(), 1);
}
