//! HTTP clients of the two peers (SPEC 4.1 and 4.2): the app backend that signs
//! authorization requests, and Entrupy's login.
//!
//! Each call makes exactly one request (reqwest's own retries are off: retrying is the
//! policy's job), with a whole-request timeout, a connect timeout and a cap on the answer's
//! size, and sorts the answer into the outcome classes of the SPEC tables. Nothing here
//! decides what to do next, and no secret reaches an error message.

use std::time::Duration;

use serde::Deserialize;

use crate::error::ErrorName;
use crate::secret::Secret;

/// Answers larger than this are rejected without being read further.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// A token longer than this is malformed (SPEC 4.2).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Expiries further ahead than this are malformed (SPEC 4.2).
pub const MAX_LIFETIME_SECS: f64 = 30.0 * 86_400.0;

/// Which peer answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The app's backend.
    Backend,
    /// Entrupy's login.
    Entrupy,
}

/// How a failed request is classified (the SPEC tables' rows).
#[derive(Debug, Clone, PartialEq)]
pub enum FailureKind {
    /// Connection failure, dropped connection or timeout: transient.
    Network,
    /// 429: wait for `retry_after` seconds (when the peer said).
    RateLimited {
        /// Seconds from now, when the answer carried a usable `Retry-After`.
        retry_after: Option<f64>,
    },
    /// Backend 401/403 (credential rejected) or Entrupy 401 (signed request rejected).
    Unauthorized,
    /// Another 4xx: permanent.
    Permanent,
    /// 5xx: transient.
    Server,
    /// An answer that does not follow the protocol: transient.
    Malformed,
}

/// A failed request: its class, its peer, and what the peer said, if anything.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Which peer failed.
    pub peer: Peer,
    /// The class of failure.
    pub kind: FailureKind,
    /// HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// The peer's `error_code`, when its answer had one.
    pub error_code: Option<String>,
    /// The peer's `description`, or our plain description of what went wrong.
    pub description: String,
}

impl Failure {
    fn new(peer: Peer, kind: FailureKind, status: Option<u16>, description: impl Into<String>) -> Self {
        Self { peer, kind, status, error_code: None, description: description.into() }
    }

    /// The D-Bus error name of this failure (SPEC 6).
    pub fn error_name(&self) -> ErrorName {
        match (&self.kind, self.peer) {
            (FailureKind::Network, _) => ErrorName::NetworkError,
            (FailureKind::RateLimited { .. }, _) => ErrorName::TooManyRequests,
            (FailureKind::Unauthorized, _) => ErrorName::Unauthorized,
            (FailureKind::Permanent | FailureKind::Server | FailureKind::Malformed, Peer::Backend) => {
                ErrorName::BackendError
            }
            (FailureKind::Permanent | FailureKind::Server | FailureKind::Malformed, Peer::Entrupy) => {
                ErrorName::ServerError
            }
        }
    }

    /// Whether the policy treats it as transient (backoff and retry).
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, FailureKind::Network | FailureKind::Server | FailureKind::Malformed)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peer = match self.peer {
            Peer::Backend => "backend",
            Peer::Entrupy => "Entrupy",
        };
        match self.status {
            Some(s) => write!(f, "{peer} answered {s}: {}", self.description),
            None => write!(f, "{peer}: {}", self.description),
        }
    }
}

/// What the backend is asked to sign.
#[derive(Debug, Clone)]
pub struct SignRequest<'a> {
    /// The fresh authorization request.
    pub authorization_request: &'a str,
    /// The user.
    pub unique_user_id: &'a str,
    /// The user's e-mail.
    pub email: &'a str,
    /// Optional names.
    pub first_name: Option<&'a str>,
    /// Optional names.
    pub last_name: Option<&'a str>,
    /// The app-user credential; `None` sends no `Authorization` header.
    pub credential: Option<&'a Secret>,
}

/// A signed request from the backend.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The signed authorization request.
    pub signed: Secret,
    /// The username the backend gave.
    pub username: String,
    /// True for a 409: the profile conflicted upstream, the request is still signed.
    pub conflict: bool,
}

/// A successful login.
#[derive(Debug, Clone)]
pub struct LoginOk {
    /// The token.
    pub token: Secret,
    /// Unix seconds, possibly fractional.
    pub expires_at: f64,
    /// The username, when Entrupy sent one.
    pub username: Option<String>,
}

/// The two peers' clients, sharing one connection pool.
#[derive(Debug, Clone)]
pub struct Clients {
    client: reqwest::Client,
    backend_url: Option<reqwest::Url>,
    login_url: reqwest::Url,
}

/// Builds the shared reqwest client: rustls with the ring provider, the system roots
/// (honouring `SSL_CERT_FILE`), no retries, no redirects, no idle connections kept.
pub fn build_client(timeout: Duration) -> Result<reqwest::Client, String> {
    // Installing the process-wide provider fails only when one is installed already, which
    // is fine: any installed provider serves.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .retry(reqwest::retry::never())
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(crate::names::user_agent())
        // No connection pool: a login every few minutes gains nothing from keep-alive, and
        // a pool's idle reaper would wake the idle daemon twice a minute.
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

impl Clients {
    /// Clients for the configured peers.
    pub fn new(
        client: reqwest::Client,
        api_url: &reqwest::Url,
        backend_url: Option<reqwest::Url>,
    ) -> Result<Self, String> {
        let base = api_url.as_str().trim_end_matches('/');
        let login_url = reqwest::Url::parse(&format!("{base}/login")).map_err(|e| format!("bad api_url: {e}"))?;
        Ok(Self { client, backend_url, login_url })
    }

    /// Whether a backend is configured.
    pub fn has_backend(&self) -> bool {
        self.backend_url.is_some()
    }

    /// Asks the backend to sign (SPEC 4.1). `None` when no backend is configured.
    pub async fn sign(&self, req: &SignRequest<'_>) -> Option<Result<Signed, Failure>> {
        let url = self.backend_url.as_ref()?;
        let mut body = serde_json::json!({
            "sdk_authorization_request": req.authorization_request,
            "unique_user_id": req.unique_user_id,
            "email": req.email,
        });
        if let Some(f) = req.first_name {
            body["first_name"] = f.into();
        }
        if let Some(l) = req.last_name {
            body["last_name"] = l.into();
        }
        let mut rb = self.client.post(url.clone()).json_body(&body);
        if let Some(c) = req.credential {
            rb = rb.bearer_auth(c.expose());
        }
        Some(self.exchange(Peer::Backend, rb).await.and_then(|(status, bytes)| parse_signed(status, &bytes)))
    }

    /// Logs in to Entrupy with a signed request (SPEC 4.2).
    pub async fn login(&self, signed: &Secret, now: f64) -> Result<LoginOk, Failure> {
        let body = serde_json::json!({ "signed_authorization_request": signed.expose() });
        let rb = self.client.post(self.login_url.clone()).json_body(&body);
        let (status, bytes) = self.exchange(Peer::Entrupy, rb).await?;
        parse_login(status, &bytes, now)
    }

    /// Sends one request and reads at most [`MAX_BODY_BYTES`] of a 2xx/409 answer; other
    /// statuses are classified here, with the peer's error body when it has one.
    async fn exchange(&self, peer: Peer, rb: reqwest::RequestBuilder) -> Result<(u16, Vec<u8>), Failure> {
        let mut resp = rb.send().await.map_err(|e| network_failure(peer, &e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        if resp.content_length().is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(Failure::new(peer, FailureKind::Malformed, Some(status), "answer larger than the size cap"));
        }
        let mut bytes = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_BODY_BYTES {
                        return Err(Failure::new(
                            peer,
                            FailureKind::Malformed,
                            Some(status),
                            "answer larger than the size cap",
                        ));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(network_failure(peer, &e)),
            }
        }
        classify_status(peer, status, retry_after, bytes)
    }
}

/// A small extension so both calls build their JSON body the same way.
trait JsonBody {
    fn json_body(self, body: &serde_json::Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, body: &serde_json::Value) -> Self {
        self.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.to_string())
    }
}

fn network_failure(peer: Peer, e: &reqwest::Error) -> Failure {
    // reqwest's messages name the URL but never the body or headers, so no secret leaks;
    // still, keep only the kind of failure.
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "connection dropped while reading the answer"
    } else {
        "connection failed without an answer"
    };
    Failure::new(peer, FailureKind::Network, None, what)
}

#[derive(Deserialize)]
struct ErrorBody {
    error_code: Option<serde_json::Value>,
    description: Option<serde_json::Value>,
}

/// Sorts a status into the SPEC table's rows; 2xx and 409 pass through with their body.
pub fn classify_status(
    peer: Peer,
    status: u16,
    retry_after: Option<f64>,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), Failure> {
    if (200..300).contains(&status) || (peer == Peer::Backend && status == 409) {
        return Ok((status, body));
    }
    let kind = match (peer, status) {
        (_, 429) => FailureKind::RateLimited { retry_after },
        (Peer::Backend, 401 | 403) | (Peer::Entrupy, 401) => FailureKind::Unauthorized,
        (_, 400..=499) => FailureKind::Permanent,
        (_, 500..=599) => FailureKind::Server,
        _ => FailureKind::Malformed,
    };
    let mut f = Failure::new(peer, kind, Some(status), status_description(status));
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(&body) {
        if let Some(serde_json::Value::String(code)) = e.error_code {
            f.error_code = Some(truncate(&code, 200));
        }
        if let Some(serde_json::Value::String(d)) = e.description {
            f.description = truncate(&d, 500);
        }
    }
    Err(f)
}

fn status_description(status: u16) -> String {
    match status {
        401 => "unauthorized".to_owned(),
        403 => "forbidden".to_owned(),
        429 => "too many requests".to_owned(),
        500..=599 => format!("server error (HTTP {status})"),
        _ => format!("HTTP {status}"),
    }
}

fn truncate(s: &str, max: usize) -> String {
    let cleaned: String = s.chars().filter(|c| !c.is_control()).collect();
    if cleaned.len() <= max {
        return cleaned;
    }
    let mut end = max;
    while !cleaned.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &cleaned[..end])
}

#[derive(Deserialize)]
struct SignedBody {
    signed_authorization_request: String,
    username: String,
}

/// Parses a backend answer that passed [`classify_status`].
pub fn parse_signed(status: u16, body: &[u8]) -> Result<Signed, Failure> {
    let malformed = |what: &str| Failure::new(Peer::Backend, FailureKind::Malformed, Some(status), what.to_owned());
    let b: SignedBody =
        serde_json::from_slice(body).map_err(|e| malformed(&format!("malformed answer: {}", json_error_kind(&e))))?;
    if b.signed_authorization_request.is_empty() {
        return Err(malformed("malformed answer: empty signed_authorization_request"));
    }
    if b.signed_authorization_request.len() > MAX_BODY_BYTES || b.username.len() > 256 {
        return Err(malformed("malformed answer: field too long"));
    }
    Ok(Signed { signed: Secret::new(b.signed_authorization_request), username: b.username, conflict: status == 409 })
}

#[derive(Deserialize)]
struct LoginBody {
    token: String,
    expiration_time: f64,
    #[serde(default)]
    username: Option<String>,
}

/// Parses an Entrupy login answer that passed [`classify_status`], `now` being when it
/// arrived: the token must be 1 byte to 8 KiB, the expiry in the future and at most 30 days
/// ahead.
pub fn parse_login(status: u16, body: &[u8], now: f64) -> Result<LoginOk, Failure> {
    let malformed = |what: String| Failure::new(Peer::Entrupy, FailureKind::Malformed, Some(status), what);
    let b: LoginBody =
        serde_json::from_slice(body).map_err(|e| malformed(format!("malformed answer: {}", json_error_kind(&e))))?;
    if b.token.is_empty() {
        return Err(malformed("malformed answer: empty token".to_owned()));
    }
    if b.token.len() > MAX_TOKEN_BYTES {
        return Err(malformed("malformed answer: token longer than 8 KiB".to_owned()));
    }
    if !b.expiration_time.is_finite() || b.expiration_time <= now {
        return Err(malformed("malformed answer: expiration_time is not in the future".to_owned()));
    }
    if b.expiration_time > now + MAX_LIFETIME_SECS {
        return Err(malformed("malformed answer: expiration_time is more than 30 days ahead".to_owned()));
    }
    let username = b.username.filter(|u| u.len() <= 256);
    Ok(LoginOk { token: Secret::new(b.token), expires_at: b.expiration_time, username })
}

/// Describes a JSON error by its category and place, never by the text (which may hold a
/// secret).
fn json_error_kind(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let cat = match e.classify() {
        Category::Io => "I/O error",
        Category::Syntax => "not JSON",
        Category::Data => "wrong or missing fields",
        Category::Eof => "truncated JSON",
    };
    format!("{cat} at line {} column {}", e.line(), e.column())
}

/// Parses `Retry-After` (seconds, or an HTTP date) into seconds from `now`.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<f64> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(secs.min(7 * 86_400) as f64);
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).map(|d| d.as_secs_f64()).unwrap_or(0.0).min(7.0 * 86_400.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_follow_the_spec_tables() {
        use FailureKind::*;
        let table: &[(Peer, u16, Option<FailureKind>, ErrorName)] = &[
            (Peer::Backend, 200, None, ErrorName::BackendError),
            (Peer::Backend, 409, None, ErrorName::BackendError),
            (Peer::Backend, 401, Some(Unauthorized), ErrorName::Unauthorized),
            (Peer::Backend, 403, Some(Unauthorized), ErrorName::Unauthorized),
            (Peer::Backend, 429, Some(RateLimited { retry_after: Some(3.0) }), ErrorName::TooManyRequests),
            (Peer::Backend, 400, Some(Permanent), ErrorName::BackendError),
            (Peer::Backend, 404, Some(Permanent), ErrorName::BackendError),
            (Peer::Backend, 503, Some(Server), ErrorName::BackendError),
            (Peer::Entrupy, 401, Some(Unauthorized), ErrorName::Unauthorized),
            (Peer::Entrupy, 403, Some(Permanent), ErrorName::ServerError),
            (Peer::Entrupy, 409, Some(Permanent), ErrorName::ServerError),
            (Peer::Entrupy, 429, Some(RateLimited { retry_after: Some(3.0) }), ErrorName::TooManyRequests),
            (Peer::Entrupy, 500, Some(Server), ErrorName::ServerError),
            (Peer::Entrupy, 302, Some(Malformed), ErrorName::ServerError),
        ];
        for (peer, status, want, name) in table {
            match (classify_status(*peer, *status, Some(3.0), Vec::new()), want) {
                (Ok(_), None) => {}
                (Err(f), Some(k)) => {
                    assert_eq!(&f.kind, k, "{peer:?} {status}");
                    assert_eq!(f.error_name(), *name, "{peer:?} {status}");
                }
                (got, _) => panic!("{peer:?} {status}: got {got:?}"),
            }
        }
    }

    #[test]
    fn error_bodies_are_passed_on() {
        let body = br#"{"error_code":"invalid_signed_request","description":"already used"}"#.to_vec();
        let f = classify_status(Peer::Entrupy, 401, None, body).unwrap_err();
        assert_eq!(f.error_code.as_deref(), Some("invalid_signed_request"));
        assert_eq!(f.description, "already used");
        let f = classify_status(Peer::Entrupy, 500, None, b"<html>".to_vec()).unwrap_err();
        assert_eq!(f.error_code, None);
        assert!(f.description.contains("500"));
        let f = classify_status(Peer::Entrupy, 400, None, br#"{"description":"only this"}"#.to_vec()).unwrap_err();
        assert_eq!((f.error_code, f.description.as_str()), (None, "only this"));
    }

    #[test]
    fn login_answers() {
        let now = 1000.0;
        let ok = parse_login(200, br#"{"token":"t0k","expiration_time":1030.5,"username":"u"}"#, now).unwrap();
        assert_eq!(ok.token.expose(), "t0k");
        assert_eq!(ok.expires_at, 1030.5);
        assert_eq!(ok.username.as_deref(), Some("u"));
        let ok = parse_login(200, br#"{"token":"t","expiration_time":1030}"#, now).unwrap();
        assert_eq!(ok.username, None);
        let long = format!(r#"{{"token":"{}","expiration_time":1030}}"#, "x".repeat(MAX_TOKEN_BYTES + 1));
        for bad in [
            br#"{"token":"","expiration_time":1030}"#.as_slice(),
            br#"{"token":"t","expiration_time":999}"#,
            br#"{"token":"t","expiration_time":1000}"#,
            br#"{"token":"t","expiration_time":-5}"#,
            br#"{"token":"t","expiration_time":1e300}"#,
            br#"{"token":"t","expiration_time":"1030"}"#,
            br#"{"token":5,"expiration_time":1030}"#,
            br#"{"token":"t","expiration_time":NaN}"#,
            br#"{"token":"t"}"#,
            b"\xff\xfe",
            b"",
            long.as_bytes(),
        ] {
            let f = parse_login(200, bad, now).unwrap_err();
            assert_eq!(f.kind, FailureKind::Malformed, "{:?}", String::from_utf8_lossy(bad));
            assert_eq!(f.error_name(), ErrorName::ServerError);
            assert!(f.is_transient());
        }
        let f = parse_login(200, br#"{"token":"s3cr3t-token","expiration_time":"x"}"#, now).unwrap_err();
        assert!(!f.to_string().contains("s3cr3t"), "{f}");
    }

    #[test]
    fn signed_answers() {
        let s = parse_signed(200, br#"{"signed_authorization_request":"sig","username":"Org-u"}"#).unwrap();
        assert_eq!((s.signed.expose(), s.username.as_str(), s.conflict), ("sig", "Org-u", false));
        assert!(parse_signed(409, br#"{"signed_authorization_request":"sig","username":"Org-u"}"#).unwrap().conflict);
        for bad in
            [br#"{"username":"x"}"#.as_slice(), br#"{"signed_authorization_request":"","username":"x"}"#, b"nope"]
        {
            let f = parse_signed(200, bad).unwrap_err();
            assert_eq!(f.error_name(), ErrorName::BackendError);
            assert!(f.is_transient());
        }
    }

    proptest::proptest! {
        /// Fuzzing by property: arbitrary answers never panic, and a malformed answer's
        /// description never quotes the body (which may hold a token).
        #[test]
        fn arbitrary_answers_never_panic_or_leak(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300), status in 100u16..600) {
            let marker = b"SECRETMARKER";
            let mut b = body.clone();
            b.extend_from_slice(marker);
            if let Err(f) = parse_login(200, &b, 0.0) {
                proptest::prop_assert!(!f.to_string().contains("SECRETMARKER"));
            }
            let _ = parse_signed(200, &b);
            let _ = classify_status(Peer::Entrupy, status, None, body.clone());
            let _ = classify_status(Peer::Backend, status, None, body);
        }

        #[test]
        fn arbitrary_retry_after_never_panics(v in "\\PC{0,40}") {
            if let Some(s) = parse_retry_after(&v, std::time::SystemTime::now()) {
                proptest::prop_assert!((0.0..=7.0 * 86_400.0).contains(&s));
            }
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("5", now), Some(5.0));
        assert_eq!(parse_retry_after(" 120 ", now), Some(120.0));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(30.0));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(0.0));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
