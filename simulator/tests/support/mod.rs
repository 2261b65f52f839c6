//! A deliberately tiny HTTP/1.1 client for the simulator's own tests: it writes requests by
//! hand and reads the whole answer until the server closes, so that tests see exactly what
//! went over the wire (including no answer at all).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use entrupy_sim::Simulator;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }
}

pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Parses a complete HTTP/1.1 answer; `None` when there is no complete head.
pub fn parse(raw: &[u8]) -> Option<Resp> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    let rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_vec() };
    Some(Resp { status, headers, body })
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
    out
}

pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(req).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    Ok(raw)
}

pub async fn send(sim: &Simulator, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let s = TcpStream::connect(sim.local_addr()).await.unwrap();
    let raw = exchange(s, &request_bytes(method, path, headers, body)).await.unwrap();
    parse(&raw).unwrap_or_else(|| panic!("no HTTP answer: {raw:?}"))
}

pub async fn post_json(sim: &Simulator, path: &str, auth: Option<&str>, body: &Value) -> Resp {
    let bearer = auth.map(|a| format!("Bearer {a}"));
    let mut headers = vec![("Content-Type", "application/json"), ("User-Agent", "entrupy-tokend/test")];
    if let Some(b) = &bearer {
        headers.push(("Authorization", b.as_str()));
    }
    send(sim, "POST", path, &headers, body.to_string().as_bytes()).await
}

pub fn sign_body(authz: &str, uid: &str, email: &str) -> Value {
    serde_json::json!({"sdk_authorization_request": authz, "unique_user_id": uid, "email": email})
}

pub async fn sign(sim: &Simulator, uid: &str, email: &str) -> String {
    let authz = entrupy_sim::fresh_authorization_request(&entrupy_sim::random_hex32());
    let r = post_json(sim, "/sign", None, &sign_body(&authz, uid, email)).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()["signed_authorization_request"].as_str().unwrap().to_owned()
}

pub async fn login(sim: &Simulator, signed: &str) -> Resp {
    post_json(sim, "/login", None, &serde_json::json!({"signed_authorization_request": signed})).await
}

/// A fresh signed request made without HTTP, for login-focused tests.
pub fn signed(sim: &Simulator, uid: &str) -> String {
    let authz = entrupy_sim::fresh_authorization_request(&entrupy_sim::random_hex32());
    sim.sign_directly(&authz, uid, "user@example.com")
}

pub fn tls_connector(ca_der: Vec<u8>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.into()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

pub const SHORT: Duration = Duration::from_millis(300);
