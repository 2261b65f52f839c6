//! The HTTP clients against the simulator and small fake servers over loopback, without a
//! daemon or a bus: redirects are not followed, loopback peers bypass any proxy while other
//! peers honour it, every request carries the `User-Agent`, strings that break SPEC 4's
//! rules are malformed, and failures name the peer's host but never a secret.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use entrupy_sim::{Endpoint, Fault, SimConfig, Simulator};
use entrupy_tokend::error::ErrorName;
use entrupy_tokend::http::{self, Clients, Failure, FailureKind, Peer, ProxyConfig, SignRequest};
use entrupy_tokend::secret::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CREDENTIAL: &str = "app-user-credential-SECRET-1";

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// A listener on 127.0.0.1 that stands in for a proxy, or for wherever a redirect points:
/// it records the head (request line and headers) of every request it gets and answers 503.
struct Catcher {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Catcher {
    async fn start() -> Catcher {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                    let answer = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                    let _ = sock.write_all(answer.as_bytes()).await;
                });
            }
        });
        Catcher { addr, heads, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for Catcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn clients(api_url: &str, backend_url: &str, proxies: &ProxyConfig, timeout: Duration) -> Clients {
    let client = http::build_client_with(timeout, proxies).unwrap();
    Clients::new(client, &api_url.parse().unwrap(), Some(backend_url.parse().unwrap())).unwrap()
}

async fn sign(c: &Clients, credential: &Secret) -> Result<http::Signed, Failure> {
    let auth = entrupy_sim::fresh_authorization_request(&entrupy_sim::random_hex32());
    let req = SignRequest {
        authorization_request: &auth,
        unique_user_id: "user-0001-abcd",
        email: "user@example.com",
        first_name: None,
        last_name: None,
        credential: Some(credential),
    };
    c.sign(&req).await.expect("a backend is configured")
}

/// Signs and logs in; the answers of both.
async fn sign_and_login(c: &Clients) -> (Result<http::Signed, Failure>, Option<Result<http::LoginOk, Failure>>) {
    let signed = sign(c, &Secret::new(CREDENTIAL)).await;
    let login = match &signed {
        Ok(s) => Some(c.login(&s.signed, now()).await),
        Err(_) => None,
    };
    (signed, login)
}

/// Every text a failure shows: `Display` (the API error and the logs), the description
/// (`LoginFailed`) and the error code.
fn texts(f: &Failure) -> String {
    format!("{f} | {} | {:?} | {f:?}", f.description, f.error_code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let elsewhere = Catcher::start().await;
    let c = clients(&sim.api_url(), &sim.backend_url(), &ProxyConfig::default(), Duration::from_secs(5));
    let credential = Secret::new(CREDENTIAL);
    for status in [301, 302, 303, 307, 308] {
        let location = format!("{}/login", elsewhere.url());
        sim.push_fault(Endpoint::Sign, Fault::Redirect { status, location: location.clone() }, 1);
        let f = sign(&c, &credential).await.unwrap_err();
        assert_eq!(
            (f.kind.clone(), f.status, f.error_name()),
            (FailureKind::Malformed, Some(status), ErrorName::BackendError)
        );
        assert_eq!(
            f.to_string(),
            format!("backend answered {status}: malformed answer: a redirect, which is not followed")
        );

        let signed = sign(&c, &credential).await.unwrap().signed;
        sim.push_fault(Endpoint::Login, Fault::Redirect { status, location }, 1);
        let f = c.login(&signed, now()).await.unwrap_err();
        assert_eq!(
            (f.kind.clone(), f.status, f.error_name()),
            (FailureKind::Malformed, Some(status), ErrorName::ServerError)
        );
    }
    assert_eq!(elsewhere.heads(), Vec::<String>::new(), "a redirect was followed");
    assert_eq!(sim.counters().other_requests, 0);
    assert_eq!(sim.requests().len(), 15, "one request per call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_peers_never_go_through_the_proxy() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let proxy = Catcher::start().await;
    // A proxy for everything, and a NO_PROXY that names other hosts only.
    let proxies =
        ProxyConfig { http: Some(proxy.url()), https: Some(proxy.url()), no_proxy: "example.com, 10.0.0.0/8".into() };
    let port = sim.local_addr().port();
    for host in ["127.0.0.1", "localhost", "LocalHost"] {
        let base = format!("http://{host}:{port}");
        let c = clients(&base, &format!("{base}/sign"), &proxies, Duration::from_secs(5));
        let (signed, login) = sign_and_login(&c).await;
        assert!(signed.is_ok(), "{host}: {signed:?}");
        assert!(login.unwrap().is_ok(), "{host}");
    }
    assert_eq!(sim.counters().login_ok, 3);
    // Loopback addresses nothing listens on: refused (or unreachable), never proxied.
    for base in ["http://127.9.8.7:9", "http://[::1]:9"] {
        let c = clients(base, &format!("{base}/sign"), &proxies, Duration::from_secs(5));
        let f = sign(&c, &Secret::new(CREDENTIAL)).await.unwrap_err();
        assert_eq!(f.kind, FailureKind::Network, "{base}: {f}");
        let f = c.login(&Secret::new("signed"), now()).await.unwrap_err();
        assert_eq!(f.kind, FailureKind::Network, "{base}: {f}");
    }
    assert_eq!(proxy.heads(), Vec::<String>::new(), "a loopback request went to the proxy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_peers_go_through_the_proxy_unless_no_proxy_names_them() {
    let proxy = Catcher::start().await;
    let proxies = ProxyConfig { http: Some(proxy.url()), https: Some(proxy.url()), no_proxy: "direct.invalid".into() };
    let c = clients("https://api.peer.invalid", "http://peer.invalid/sign", &proxies, Duration::from_secs(3));
    // Plain HTTP is forwarded: the proxy's 503 comes back as the backend's.
    let f = sign(&c, &Secret::new(CREDENTIAL)).await.unwrap_err();
    assert_eq!((f.kind.clone(), f.status), (FailureKind::Server, Some(503)), "{f}");
    // HTTPS is tunnelled; the proxy refuses the tunnel.
    let f = c.login(&Secret::new("signed-request"), now()).await.unwrap_err();
    assert_eq!(f.kind, FailureKind::Network, "{f}");
    assert!(f.description.starts_with("cannot connect to api.peer.invalid:443 (Entrupy): "), "{f}");
    let heads = proxy.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    let forwarded = heads.iter().find(|h| h.starts_with("POST http://peer.invalid/sign HTTP/1.1\r\n")).unwrap();
    let ua = format!("user-agent: entrupy-tokend/{}\r\n", entrupy_tokend::names::VERSION);
    assert!(forwarded.to_ascii_lowercase().contains(&ua), "{forwarded}");
    assert!(heads.iter().any(|h| h.starts_with("CONNECT api.peer.invalid:443 HTTP/1.1\r\n")), "{heads:?}");

    // A peer NO_PROXY names is reached directly (and, being nowhere, not at all).
    let c = clients("https://direct.invalid", "http://sub.direct.invalid/sign", &proxies, Duration::from_secs(3));
    let f = sign(&c, &Secret::new(CREDENTIAL)).await.unwrap_err();
    assert_eq!(f.kind, FailureKind::Network, "{f}");
    // "cannot connect to" where the name does not resolve at once, "timed out waiting for"
    // where the resolver is slow.
    assert!(f.to_string().contains(" sub.direct.invalid:80 (backend)"), "{f}");
    let f = c.login(&Secret::new("signed-request"), now()).await.unwrap_err();
    assert_eq!(f.kind, FailureKind::Network, "{f}");
    assert_eq!(proxy.heads().len(), 2, "NO_PROXY was not honoured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_carries_the_user_agent() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let c = clients(&sim.api_url(), &sim.backend_url(), &ProxyConfig::default(), Duration::from_secs(5));
    let (signed, login) = sign_and_login(&c).await;
    assert!(signed.is_ok() && login.unwrap().is_ok());
    // Failed calls too.
    sim.push_fault(Endpoint::Sign, Fault::Status { status: 503, body: None, retry_after: None }, 1);
    assert!(sign(&c, &Secret::new(CREDENTIAL)).await.is_err());
    assert!(c.login(&Secret::new("not-signed"), now()).await.is_err());
    let ua = format!("entrupy-tokend/{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(ua, entrupy_tokend::names::user_agent());
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 4);
    for r in reqs {
        assert_eq!(r.user_agent.as_deref(), Some(ua.as_str()), "{:?} {}", r.endpoint, r.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_break_the_string_rules_are_malformed() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let c = clients(&sim.api_url(), &sim.backend_url(), &ProxyConfig::default(), Duration::from_secs(5));
    let exp = now() + 3600.0;
    let long = "x".repeat(8193);
    for body in [
        r#"{"signed_authorization_request":"sig ned","username":"u"}"#.to_owned(),
        r#"{"signed_authorization_request":"sig","username":"u\u001b[31m"}"#.to_owned(),
        format!(r#"{{"signed_authorization_request":"sig","username":"{}"}}"#, "u".repeat(257)),
        format!(r#"{{"signed_authorization_request":"{long}","username":"u"}}"#),
    ] {
        sim.push_fault(Endpoint::Sign, Fault::Body { status: 200, body: body.clone().into_bytes() }, 1);
        let f = sign(&c, &Secret::new(CREDENTIAL)).await.unwrap_err();
        assert_eq!((f.kind.clone(), f.error_name()), (FailureKind::Malformed, ErrorName::BackendError), "{body}");
    }
    for body in [
        format!(r#"{{"token":"tok\u00e9n","expiration_time":{exp}}}"#),
        format!(r#"{{"token":"tok\tn","expiration_time":{exp}}}"#),
        format!(r#"{{"token":"{long}","expiration_time":{exp}}}"#),
        format!(r#"{{"token":"t","expiration_time":{exp},"username":"a\u0085b"}}"#),
        format!(r#"{{"token":"t","expiration_time":{}}}"#, exp + 31.0 * 86_400.0),
    ] {
        sim.push_fault(Endpoint::Login, Fault::Body { status: 200, body: body.clone().into_bytes() }, 1);
        let f = c.login(&Secret::new("signed"), now()).await.unwrap_err();
        assert_eq!((f.kind.clone(), f.error_name()), (FailureKind::Malformed, ErrorName::ServerError), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_failures_name_the_peers_host() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let at = sim.local_addr().to_string();
    let c = clients(&sim.api_url(), &sim.backend_url(), &ProxyConfig::default(), Duration::from_millis(1500));
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let refused = format!("http://{free}");
    let c_refused = clients(&refused, &format!("{refused}/sign"), &ProxyConfig::default(), Duration::from_secs(5));
    let f = sign(&c_refused, &Secret::new(CREDENTIAL)).await.unwrap_err();
    assert_eq!(f.to_string(), format!("cannot connect to {free} (backend): connection refused"));
    assert_eq!((f.status, f.error_name()), (None, ErrorName::NetworkError));
    let f = c_refused.login(&Secret::new("signed"), now()).await.unwrap_err();
    assert_eq!(f.description, format!("cannot connect to {free} (Entrupy): connection refused"));

    sim.push_fault(Endpoint::Login, Fault::Drop, 1);
    let f = c.login(&Secret::new("signed"), now()).await.unwrap_err();
    assert!(f.to_string().starts_with(&format!("no answer from {at} (Entrupy): ")), "{f}");
    sim.push_fault(Endpoint::Sign, Fault::Hang, 1);
    let f = sign(&c, &Secret::new(CREDENTIAL)).await.unwrap_err();
    assert_eq!(f.to_string(), format!("timed out waiting for {at} (backend)"));
    sim.push_fault(Endpoint::Login, Fault::Trickle { bytes_per_sec: 1, total: 100 }, 1);
    let f = c.login(&Secret::new("signed"), now()).await.unwrap_err();
    assert_eq!(
        (f.kind.clone(), f.to_string()),
        (FailureKind::Network, format!("timed out waiting for {at} (Entrupy)"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_never_quote_a_secret() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let c = clients(&sim.api_url(), &sim.backend_url(), &ProxyConfig::default(), Duration::from_secs(5));
    let credential = Secret::new(CREDENTIAL);
    let signed = Secret::new("signed-request-SECRET-2");
    let quoting = |what: &str| Fault::Status {
        status: 401,
        body: Some(format!(r#"{{"error_code":"bad:{what}","description":"rejected {what}; try again"}}"#)),
        retry_after: None,
    };
    sim.push_fault(Endpoint::Sign, quoting(CREDENTIAL), 1);
    let f = sign(&c, &credential).await.unwrap_err();
    assert_eq!(f.description, "rejected [redacted]; try again");
    sim.push_fault(Endpoint::Login, quoting(signed.expose()), 1);
    let f = c.login(&signed, now()).await.unwrap_err();
    assert_eq!(
        (f.error_code.as_deref(), f.to_string().as_str()),
        (Some("bad:[redacted]"), "Entrupy answered 401: rejected [redacted]; try again")
    );

    // Malformed answers holding a token or signed request, and every other failure.
    let exp = now() + 3600.0;
    sim.push_fault(
        Endpoint::Login,
        Fault::Body {
            status: 200,
            body: format!(r#"{{"token":"token-SECRET 3","expiration_time":{exp}}}"#).into_bytes(),
        },
        1,
    );
    sim.push_fault(
        Endpoint::Login,
        Fault::Body { status: 200, body: br#"{"token":"token-SECRET-4","expiration_time":"soon"}"#.to_vec() },
        1,
    );
    sim.push_fault(
        Endpoint::Sign,
        Fault::Body {
            status: 200,
            body: br#"{"signed_authorization_request":"signed-SECRET-5","username":"\u0000"}"#.to_vec(),
        },
        1,
    );
    sim.push_fault(Endpoint::Login, Fault::Status { status: 500, body: None, retry_after: None }, 1);
    sim.push_fault(Endpoint::Login, Fault::Drop, 1);
    sim.push_fault(Endpoint::Login, Fault::Oversized { bytes: 200_000 }, 1);
    let mut all = Vec::new();
    for _ in 0..5 {
        all.push(c.login(&signed, now()).await.unwrap_err());
    }
    all.push(sign(&c, &credential).await.unwrap_err());
    for f in &all {
        let t = texts(f);
        for secret in ["SECRET", CREDENTIAL, signed.expose()] {
            assert!(!t.contains(secret), "{t}");
        }
    }
    assert_eq!(all[2].to_string(), "Entrupy answered 500: Internal Server Error");
    assert_eq!(all[4].to_string(), "Entrupy answered 200: malformed answer: larger than 64 KiB");
    assert!(matches!(all[5].kind, FailureKind::Malformed) && all[5].peer == Peer::Backend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_error_body_keeps_its_status() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let c = clients(&sim.api_url(), &sim.backend_url(), &ProxyConfig::default(), Duration::from_secs(5));
    let page = Some(format!(r#"{{"description":"{}"}}"#, "x".repeat(100_000)));
    sim.push_fault(Endpoint::Login, Fault::Status { status: 404, body: page.clone(), retry_after: None }, 1);
    let f = c.login(&Secret::new("signed"), now()).await.unwrap_err();
    assert_eq!((f.kind.clone(), f.to_string()), (FailureKind::Permanent, "Entrupy answered 404: Not Found".to_owned()));
    sim.push_fault(Endpoint::Sign, Fault::Status { status: 503, body: page, retry_after: None }, 1);
    let f = sign(&c, &Secret::new(CREDENTIAL)).await.unwrap_err();
    assert_eq!((f.kind.clone(), f.status), (FailureKind::Server, Some(503)));
}
