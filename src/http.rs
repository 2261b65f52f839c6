//! HTTP clients of the two peers (SPEC 4.1 and 4.2): the app backend that signs
//! authorization requests, and Entrupy's login.
//!
//! Each call makes exactly one request (reqwest's own retries are off: retrying is the
//! policy's job), with a whole-request timeout, a connect timeout and a cap on the answer's
//! size, follows no redirect, sends loopback requests past any proxy, checks every string a
//! peer sends before it is used, and sorts the answer into the outcome classes of the SPEC
//! tables. Nothing here decides what to do next, and no secret (token, signed request,
//! app-user credential) reaches an error message.

use std::time::Duration;

use serde::Deserialize;

use crate::error::ErrorName;
use crate::secret::Secret;

/// Answers larger than this are rejected without being read further.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// A token or signed request longer than this is malformed (SPEC 4).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// A username of more characters than this is malformed (SPEC 4).
pub const MAX_USERNAME_CHARS: usize = 256;
/// Expiries further ahead than this are malformed (SPEC 4.2).
pub const MAX_LIFETIME_SECS: f64 = 30.0 * 86_400.0;
/// Longest text kept of a peer's `error_code` and `description`, in bytes.
const MAX_ERROR_CODE_BYTES: usize = 200;
const MAX_DESCRIPTION_BYTES: usize = 500;

/// Which peer answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The app's backend.
    Backend,
    /// Entrupy's login.
    Entrupy,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Peer::Backend => "backend",
            Peer::Entrupy => "Entrupy",
        })
    }
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
    /// An answer that does not follow the protocol (a redirect, a bad body, a string that
    /// breaks the SPEC 4 rules): transient.
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
    /// The peer's `description`, or our plain description of what went wrong (`LoginFailed`
    /// carries it). Without a status it is a whole sentence that names the peer and its
    /// host; with one, it does not repeat the status, which [`Display`](std::fmt::Display)
    /// puts in front.
    pub description: String,
}

impl Failure {
    fn new(peer: Peer, kind: FailureKind, status: Option<u16>, description: impl Into<String>) -> Self {
        Self { peer, kind, status, error_code: None, description: description.into() }
    }

    fn malformed(peer: Peer, status: u16, what: impl std::fmt::Display) -> Self {
        Self::new(peer, FailureKind::Malformed, Some(status), format!("malformed answer: {what}"))
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
}

/// `backend answered 503: Service Unavailable`, or, without an answer, the description
/// alone (`cannot connect to 127.0.0.1:8443 (backend): connection refused`).
impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "{} answered {s}: {}", self.peer, self.description),
            None => f.write_str(&self.description),
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

/// A signed request from the backend, its strings checked ([`check_opaque`],
/// [`check_username`]).
#[derive(Debug, Clone)]
pub struct Signed {
    /// The signed authorization request.
    pub signed: Secret,
    /// The username the backend gave.
    pub username: String,
    /// True for a 409: the profile conflicted upstream, the request is still signed.
    pub conflict: bool,
}

/// A successful login, its strings checked ([`check_opaque`], [`check_username`]).
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

/// Where requests to peers off this machine go (SPEC 4: the usual proxy variables).
///
/// Read once, when the client is built. A loopback peer is always reached directly,
/// whatever these say ([`build_client_with`]).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Proxy URL for `http://` peers (`HTTP_PROXY`, else `ALL_PROXY`).
    pub http: Option<String>,
    /// Proxy URL for `https://` peers (`HTTPS_PROXY`, else `ALL_PROXY`).
    pub https: Option<String>,
    /// Peers reached directly (`NO_PROXY`): comma-separated host names (with their
    /// subdomains), IP addresses, networks (`10.0.0.0/8`), or `*` for all.
    pub no_proxy: String,
}

impl ProxyConfig {
    /// The proxy variables of this process's environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The proxy variables as `var` gives them, read as reqwest reads the environment: the
    /// upper-case name first, then the lower-case one; an empty value counts as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        // Under CGI a request's `Proxy:` header arrives as HTTP_PROXY ("httpoxy"), so reqwest
        // then ignores every proxy variable; so does this.
        if var("REQUEST_METHOD").is_some() {
            return Self::default();
        }
        let first = |names: [&str; 2]| names.into_iter().find_map(|n| var(n).filter(|v| !v.trim().is_empty()));
        let all = first(["ALL_PROXY", "all_proxy"]);
        Self {
            http: first(["HTTP_PROXY", "http_proxy"]).or_else(|| all.clone()),
            https: first(["HTTPS_PROXY", "https_proxy"]).or(all),
            no_proxy: first(["NO_PROXY", "no_proxy"]).unwrap_or_default(),
        }
    }
}

/// Proxy URLs may carry a user name and password: shown without them.
impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hide = |p: &Option<String>| {
            p.as_deref().map(|p| match p.rsplit_once('@') {
                Some((_, host)) => format!("[redacted]@{host}"),
                None => p.to_owned(),
            })
        };
        f.debug_struct("ProxyConfig")
            .field("http", &hide(&self.http))
            .field("https", &hide(&self.https))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// The loopback hosts of SPEC 3, in `NO_PROXY` syntax (`localhost` also covers its
/// subdomains, which resolve to loopback too, RFC 6761).
const LOOPBACK_NO_PROXY: &str = "127.0.0.0/8,::1,localhost";

/// Builds the shared reqwest client with the proxies of the environment
/// ([`ProxyConfig::from_env`]); see [`build_client_with`].
pub fn build_client(timeout: Duration) -> Result<reqwest::Client, String> {
    build_client_with(timeout, &ProxyConfig::from_env())
}

/// Builds the shared reqwest client: rustls with the ring provider, the system roots
/// (honouring `SSL_CERT_FILE`), no retries, no redirects, no idle connections kept,
/// `User-Agent: entrupy-tokend/<version>`, and `proxies` for every peer but a loopback one.
pub fn build_client_with(timeout: Duration, proxies: &ProxyConfig) -> Result<reqwest::Client, String> {
    // Installing the process-wide provider fails only when one is installed already, which
    // is fine: any installed provider serves.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .retry(reqwest::retry::never())
        // A redirect is not part of either protocol (SPEC 4); following a 307 would also send
        // the credential or the signed request to wherever `Location` points. The 3xx itself
        // comes back, and `classify_status` calls it malformed.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(crate::names::user_agent())
        // No connection pool: a login every few minutes gains nothing from keep-alive, and
        // a pool's idle reaper would wake the idle daemon twice a minute.
        .pool_max_idle_per_host(0)
        // reqwest's own reading of the proxy variables exempts no host: with HTTP_PROXY set,
        // a request to an `http://localhost` backend went to the proxy, bearer credential in
        // clear text. So the environment is read in `ProxyConfig` instead, and every proxy
        // gets NO_PROXY plus the loopback hosts as its exceptions. (A `Proxy::custom` cannot
        // do this alone: reqwest 0.13 ignores the `no_proxy` of a custom proxy.)
        .no_proxy();
    let except = reqwest::NoProxy::from_string(&if proxies.no_proxy.trim().is_empty() {
        LOOPBACK_NO_PROXY.to_owned()
    } else {
        format!("{},{LOOPBACK_NO_PROXY}", proxies.no_proxy)
    });
    // The value is not quoted: it may hold the proxy's password.
    if let Some(p) = &proxies.http {
        let proxy = reqwest::Proxy::http(p.as_str()).map_err(|_| "HTTP_PROXY (or ALL_PROXY) is not a proxy URL")?;
        builder = builder.proxy(proxy.no_proxy(except.clone()));
    }
    if let Some(p) = &proxies.https {
        let proxy = reqwest::Proxy::https(p.as_str()).map_err(|_| "HTTPS_PROXY (or ALL_PROXY) is not a proxy URL")?;
        builder = builder.proxy(proxy.no_proxy(except));
    }
    builder.build().map_err(|e| format!("cannot build the HTTP client: {e}"))
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
        let sent = req.credential.map(Secret::expose);
        let answer = self.exchange(Peer::Backend, url, rb, sent.as_slice()).await;
        Some(answer.and_then(|(status, bytes)| parse_signed(status, &bytes)))
    }

    /// Logs in to Entrupy with a signed request (SPEC 4.2).
    pub async fn login(&self, signed: &Secret, now: f64) -> Result<LoginOk, Failure> {
        let body = serde_json::json!({ "signed_authorization_request": signed.expose() });
        let rb = self.client.post(self.login_url.clone()).json_body(&body);
        let (status, bytes) = self.exchange(Peer::Entrupy, &self.login_url, rb, &[signed.expose()]).await?;
        parse_login(status, &bytes, now)
    }

    /// Sends one request and reads at most [`MAX_BODY_BYTES`] of the answer; 2xx and
    /// backend 409 answers come back with their body, other statuses are classified here,
    /// with the peer's error body when it has one. `sent` are the secrets the request
    /// carried, blanked out should the peer's error description quote them.
    async fn exchange(
        &self,
        peer: Peer,
        url: &reqwest::Url,
        rb: reqwest::RequestBuilder,
        sent: &[&str],
    ) -> Result<(u16, Vec<u8>), Failure> {
        let mut resp = rb.send().await.map_err(|e| network_failure(peer, url, &e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        let mut bytes = Vec::new();
        let mut oversized = resp.content_length().is_some_and(|n| n > MAX_BODY_BYTES as u64);
        while !oversized {
            match resp.chunk().await {
                Ok(Some(chunk)) if bytes.len() + chunk.len() > MAX_BODY_BYTES => oversized = true,
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => return Err(network_failure(peer, url, &e)),
            }
        }
        if oversized {
            if passes(peer, status) {
                return Err(Failure::malformed(peer, status, "larger than 64 KiB"));
            }
            // The error body is optional; its status still says what happened.
            bytes.clear();
        }
        classify(peer, status, retry_after, bytes, sent)
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

/// `host:port` of a peer's URL, for messages (the URL is from the config, which holds no
/// credential in URLs).
fn authority(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("?");
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

fn network_failure(peer: Peer, url: &reqwest::Url, e: &reqwest::Error) -> Failure {
    let at = format!("{} ({peer})", authority(url));
    let cause = root_cause(e);
    let what = if e.is_connect() {
        format!("cannot connect to {at}: {cause}")
    } else if e.is_timeout() {
        format!("timed out waiting for {at}")
    } else if e.is_body() || e.is_decode() {
        format!("the connection to {at} broke while reading the answer: {cause}")
    } else {
        format!("no answer from {at}: {cause}")
    };
    Failure::new(peer, FailureKind::Network, None, what)
}

/// The innermost cause of a request error: `connection refused`, `connection closed before
/// message completed`, `invalid peer certificate: UnknownIssuer`. Never reqwest's own text,
/// which repeats the URL; none of these quote a header or a body, so no secret.
fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    if std::ptr::addr_eq(cause, e) {
        return "no further detail".to_owned();
    }
    let text = match cause.downcast_ref::<std::io::Error>() {
        // An OS error: its kind reads better than `Connection refused (os error 111)`.
        Some(io) if io.get_ref().is_none() => io.kind().to_string(),
        _ => cause.to_string(),
    };
    clean_text(&text, &[], MAX_DESCRIPTION_BYTES)
}

#[derive(Deserialize)]
struct ErrorBody {
    error_code: Option<serde_json::Value>,
    description: Option<serde_json::Value>,
}

/// Whether a status's answer goes on to be parsed: 2xx, and the backend's 409.
fn passes(peer: Peer, status: u16) -> bool {
    (200..300).contains(&status) || (peer == Peer::Backend && status == 409)
}

/// Sorts a status into the SPEC table's rows; 2xx and backend 409 pass through with their
/// body. Anything else the tables do not name (1xx, 3xx: no redirect is followed) is a
/// malformed answer.
pub fn classify_status(
    peer: Peer,
    status: u16,
    retry_after: Option<f64>,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), Failure> {
    classify(peer, status, retry_after, body, &[])
}

fn classify(
    peer: Peer,
    status: u16,
    retry_after: Option<f64>,
    body: Vec<u8>,
    sent: &[&str],
) -> Result<(u16, Vec<u8>), Failure> {
    if passes(peer, status) {
        return Ok((status, body));
    }
    let kind = match (peer, status) {
        (_, 429) => FailureKind::RateLimited { retry_after },
        (Peer::Backend, 401 | 403) | (Peer::Entrupy, 401) => FailureKind::Unauthorized,
        (_, 400..=499) => FailureKind::Permanent,
        (_, 500..=599) => FailureKind::Server,
        (_, 300..=399) => return Err(Failure::malformed(peer, status, "a redirect, which is not followed")),
        _ => return Err(Failure::malformed(peer, status, "a status the protocol does not use")),
    };
    let mut f = Failure::new(peer, kind, Some(status), status_description(status));
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(&body) {
        if let Some(serde_json::Value::String(code)) = e.error_code {
            f.error_code = Some(clean_text(&code, sent, MAX_ERROR_CODE_BYTES));
        }
        if let Some(serde_json::Value::String(d)) = e.description {
            f.description = clean_text(&d, sent, MAX_DESCRIPTION_BYTES);
        }
    }
    Err(f)
}

/// Our description of a status without an error body: its reason phrase (the status itself
/// is shown beside it, [`Failure`]'s `Display`).
fn status_description(status: u16) -> String {
    let reason = reqwest::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason());
    match (reason, status) {
        (Some(r), _) => r.to_owned(),
        (None, 400..=499) => "client error".to_owned(),
        (None, _) => "server error".to_owned(),
    }
}

/// A peer's text made fit for a log line: any secret the request carried blanked out (a
/// peer may quote what it rejects), control characters dropped, at most `max` bytes.
fn clean_text(s: &str, sent: &[&str], max: usize) -> String {
    let mut text = s.to_owned();
    for secret in sent.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "[redacted]");
    }
    let cleaned: String = text.chars().filter(|c| !c.is_control()).collect();
    if cleaned.len() <= max {
        return cleaned;
    }
    let mut end = max;
    while !cleaned.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &cleaned[..end])
}

/// Checks a token or signed request from a peer (SPEC 4): 1 to 8192 bytes of visible ASCII
/// (0x21-0x7E). Such a string can go in a header, a log-free D-Bus reply and the state file
/// as it is. The error says what is wrong, never what the string holds.
pub fn check_opaque(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        Err("is empty")
    } else if s.len() > MAX_TOKEN_BYTES {
        Err("is longer than 8192 bytes")
    } else if !s.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        Err("holds a byte other than visible ASCII")
    } else {
        Ok(())
    }
}

/// Checks a username from a peer (SPEC 4): at most 256 characters, none of them a control
/// character (U+0000-U+001F, U+007F-U+009F), since it is shown to users and logged.
pub fn check_username(s: &str) -> Result<(), &'static str> {
    if s.chars().nth(MAX_USERNAME_CHARS).is_some() {
        Err("is longer than 256 characters")
    } else if s.chars().any(|c| matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}')) {
        Err("holds a control character")
    } else {
        Ok(())
    }
}

#[derive(Deserialize)]
struct SignedBody {
    signed_authorization_request: String,
    username: String,
}

/// Parses a backend answer that passed [`classify_status`]: the signed request must pass
/// [`check_opaque`] and the username [`check_username`].
pub fn parse_signed(status: u16, body: &[u8]) -> Result<Signed, Failure> {
    let malformed = |what: &dyn std::fmt::Display| Failure::malformed(Peer::Backend, status, what);
    let b: SignedBody = serde_json::from_slice(body).map_err(|e| malformed(&json_error_kind(&e)))?;
    check_opaque(&b.signed_authorization_request)
        .map_err(|why| malformed(&format_args!("signed_authorization_request {why}")))?;
    check_username(&b.username).map_err(|why| malformed(&format_args!("username {why}")))?;
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
/// arrived: the token must pass [`check_opaque`], a username [`check_username`], and the
/// expiry must be in the future and at most 30 days ahead.
pub fn parse_login(status: u16, body: &[u8], now: f64) -> Result<LoginOk, Failure> {
    let malformed = |what: &dyn std::fmt::Display| Failure::malformed(Peer::Entrupy, status, what);
    let b: LoginBody = serde_json::from_slice(body).map_err(|e| malformed(&json_error_kind(&e)))?;
    check_opaque(&b.token).map_err(|why| malformed(&format_args!("token {why}")))?;
    // Both tests are false for a NaN on either side, so a NaN is never accepted.
    let in_future = b.expiration_time > now;
    if !in_future {
        return Err(malformed(&"expiration_time is not in the future"));
    }
    let within_30_days = b.expiration_time <= now + MAX_LIFETIME_SECS;
    if !within_30_days {
        return Err(malformed(&"expiration_time is more than 30 days ahead"));
    }
    if let Some(u) = &b.username {
        check_username(u).map_err(|why| malformed(&format_args!("username {why}")))?;
    }
    Ok(LoginOk { token: Secret::new(b.token), expires_at: b.expiration_time, username: b.username })
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

/// Parses `Retry-After` (seconds, or an HTTP date) into seconds from `now`, at most a week.
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
    use proptest::prelude::*;

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
            (Peer::Backend, 307, Some(Malformed), ErrorName::BackendError),
            (Peer::Backend, 308, Some(Malformed), ErrorName::BackendError),
            (Peer::Entrupy, 401, Some(Unauthorized), ErrorName::Unauthorized),
            (Peer::Entrupy, 403, Some(Permanent), ErrorName::ServerError),
            (Peer::Entrupy, 409, Some(Permanent), ErrorName::ServerError),
            (Peer::Entrupy, 429, Some(RateLimited { retry_after: Some(3.0) }), ErrorName::TooManyRequests),
            (Peer::Entrupy, 500, Some(Server), ErrorName::ServerError),
            (Peer::Entrupy, 301, Some(Malformed), ErrorName::ServerError),
            (Peer::Entrupy, 302, Some(Malformed), ErrorName::ServerError),
            (Peer::Entrupy, 303, Some(Malformed), ErrorName::ServerError),
            (Peer::Entrupy, 101, Some(Malformed), ErrorName::ServerError),
            (Peer::Entrupy, 600, Some(Malformed), ErrorName::ServerError),
        ];
        for (peer, status, want, name) in table {
            match (classify_status(*peer, *status, Some(3.0), Vec::new()), want) {
                (Ok(_), None) => {}
                (Err(f), Some(k)) => {
                    assert_eq!(&f.kind, k, "{peer:?} {status}");
                    assert_eq!(f.error_name(), *name, "{peer:?} {status}");
                    assert_eq!(f.status, Some(*status));
                }
                (got, _) => panic!("{peer:?} {status}: got {got:?}"),
            }
        }
    }

    #[test]
    fn a_redirect_is_malformed_even_with_an_error_body() {
        let body = br#"{"error_code":"moved","description":"see Location"}"#.to_vec();
        let f = classify_status(Peer::Backend, 307, None, body).unwrap_err();
        assert_eq!(f.to_string(), "backend answered 307: malformed answer: a redirect, which is not followed");
        assert_eq!((f.kind, f.error_code), (FailureKind::Malformed, None));
    }

    #[test]
    fn error_bodies_are_passed_on() {
        let body = br#"{"error_code":"invalid_signed_request","description":"already used"}"#.to_vec();
        let f = classify_status(Peer::Entrupy, 401, None, body).unwrap_err();
        assert_eq!(f.error_code.as_deref(), Some("invalid_signed_request"));
        assert_eq!(f.description, "already used");
        assert_eq!(f.to_string(), "Entrupy answered 401: already used");
        let f = classify_status(Peer::Entrupy, 400, None, br#"{"description":"only this"}"#.to_vec()).unwrap_err();
        assert_eq!((f.error_code, f.description.as_str()), (None, "only this"));
        let body = br#"{"error_code":"a\u0000b","description":"line\none\u009b"}"#.to_vec();
        let f = classify_status(Peer::Entrupy, 400, None, body).unwrap_err();
        assert_eq!((f.error_code.as_deref(), f.description.as_str()), (Some("ab"), "lineone"));
        let long = format!(r#"{{"description":"{}"}}"#, "é".repeat(400));
        let f = classify_status(Peer::Backend, 500, None, long.into_bytes()).unwrap_err();
        assert!(f.description.len() <= MAX_DESCRIPTION_BYTES + '…'.len_utf8() && f.description.ends_with('…'));
    }

    #[test]
    fn messages_mention_the_status_once() {
        for (peer, status, text) in [
            (Peer::Entrupy, 503, "Entrupy answered 503: Service Unavailable"),
            (Peer::Entrupy, 500, "Entrupy answered 500: Internal Server Error"),
            (Peer::Backend, 403, "backend answered 403: Forbidden"),
            (Peer::Backend, 429, "backend answered 429: Too Many Requests"),
            (Peer::Backend, 599, "backend answered 599: server error"),
            (Peer::Backend, 499, "backend answered 499: client error"),
        ] {
            let f = classify_status(peer, status, None, b"<html>".to_vec()).unwrap_err();
            assert_eq!(f.to_string(), text);
            assert_eq!(f.to_string().matches(&status.to_string()).count(), 1, "{f}");
            assert!(!f.description.contains(&status.to_string()), "{f:?}");
        }
        let f = parse_login(200, b"{", 0.0).unwrap_err();
        assert_eq!(f.to_string(), "Entrupy answered 200: malformed answer: truncated JSON at line 1 column 1");
        let f = Failure::new(Peer::Backend, FailureKind::Network, None, "cannot connect to h:1 (backend): x");
        assert_eq!(f.to_string(), "cannot connect to h:1 (backend): x");
    }

    #[test]
    fn a_peer_quoting_what_was_sent_is_redacted() {
        let signed = "eyJzaWduZWQi.c2ln";
        let body = format!(r#"{{"error_code":"bad {signed}","description":"rejected {signed} (used)"}}"#);
        let f = classify(Peer::Entrupy, 401, None, body.into_bytes(), &[signed, ""]).unwrap_err();
        assert_eq!(f.description, "rejected [redacted] (used)");
        assert_eq!(f.error_code.as_deref(), Some("bad [redacted]"));
        // Before truncation, so no prefix of a long secret survives either.
        let long = "S".repeat(MAX_TOKEN_BYTES);
        let body = format!(r#"{{"description":"x{long}"}}"#);
        let f = classify(Peer::Backend, 403, None, body.into_bytes(), &[&long]).unwrap_err();
        assert_eq!(f.description, "x[redacted]");
    }

    #[test]
    fn string_checks() {
        assert_eq!(check_opaque("a"), Ok(()));
        assert_eq!(check_opaque("!~AZaz09-_.+/="), Ok(()));
        assert_eq!(check_opaque(&"x".repeat(8192)), Ok(()));
        for bad in ["", " ", "a b", "a\tb", "a\u{7f}", "é", "a\0", "tok\r\n"] {
            assert!(check_opaque(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_opaque(&"x".repeat(8193)), Err("is longer than 8192 bytes"));
        assert_eq!(check_username(""), Ok(()));
        assert_eq!(check_username("OrgName-user 0001 é ü 中"), Ok(()));
        // Characters, not bytes: 256 two-byte characters are fine.
        assert_eq!(check_username(&"é".repeat(256)), Ok(()));
        assert_eq!(check_username(&"é".repeat(257)), Err("is longer than 256 characters"));
        assert_eq!(check_username("\u{a0}\u{200b}"), Ok(()));
        for bad in ["a\0", "a\n", "\u{1f}", "\u{7f}", "\u{80}", "\u{9f}", "x\u{85}y"] {
            assert_eq!(check_username(bad), Err("holds a control character"), "{bad:?}");
        }
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
        let ok = parse_login(200, br#"{"token":"t","expiration_time":1030,"username":null}"#, now).unwrap();
        assert_eq!(ok.username, None);
        let edge = format!(r#"{{"token":"{}","expiration_time":{}}}"#, "x".repeat(8192), now + MAX_LIFETIME_SECS);
        assert!(parse_login(200, edge.as_bytes(), now).is_ok());
        let long = format!(r#"{{"token":"{}","expiration_time":1030}}"#, "x".repeat(MAX_TOKEN_BYTES + 1));
        let long_user = format!(r#"{{"token":"t","expiration_time":1030,"username":"{}"}}"#, "u".repeat(257));
        for bad in [
            br#"{"token":"","expiration_time":1030}"#.as_slice(),
            br#"{"token":"t k","expiration_time":1030}"#,
            br#"{"token":"t\u0000","expiration_time":1030}"#,
            br#"{"token":"caf\u00e9","expiration_time":1030}"#,
            br#"{"token":"t","expiration_time":1030,"username":"a\u0007"}"#,
            br#"{"token":"t","expiration_time":1030,"username":"a\u0085"}"#,
            br#"{"token":"t","expiration_time":1030,"username":5}"#,
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
            long_user.as_bytes(),
        ] {
            let f = parse_login(200, bad, now).unwrap_err();
            assert_eq!(f.kind, FailureKind::Malformed, "{:?}", String::from_utf8_lossy(bad));
            assert_eq!(f.error_name(), ErrorName::ServerError);
            assert!(f.description.starts_with("malformed answer: "), "{f}");
        }
        let too_far = format!(r#"{{"token":"t","expiration_time":{}}}"#, now + MAX_LIFETIME_SECS + 1.0);
        assert!(parse_login(200, too_far.as_bytes(), now).is_err());
        for body in [
            br#"{"token":"s3cr3t-token","expiration_time":"x"}"#.as_slice(),
            br#"{"token":"s3cr3t token","expiration_time":1030}"#,
        ] {
            let f = parse_login(200, body, now).unwrap_err();
            assert!(!f.to_string().contains("s3cr3t"), "{f}");
        }
    }

    #[test]
    fn signed_answers() {
        let s = parse_signed(200, br#"{"signed_authorization_request":"sig","username":"Org-u"}"#).unwrap();
        assert_eq!((s.signed.expose(), s.username.as_str(), s.conflict), ("sig", "Org-u", false));
        assert!(parse_signed(409, br#"{"signed_authorization_request":"sig","username":"Org-u"}"#).unwrap().conflict);
        let s = parse_signed(200, br#"{"signed_authorization_request":"sig","username":""}"#).unwrap();
        assert_eq!(s.username, "");
        let long = format!(r#"{{"signed_authorization_request":"{}","username":"x"}}"#, "s".repeat(8193));
        for bad in [
            br#"{"username":"x"}"#.as_slice(),
            br#"{"signed_authorization_request":"","username":"x"}"#,
            br#"{"signed_authorization_request":"s g","username":"x"}"#,
            br#"{"signed_authorization_request":"s\u007f","username":"x"}"#,
            br#"{"signed_authorization_request":"sig","username":"x\ny"}"#,
            br#"{"signed_authorization_request":"sig"}"#,
            long.as_bytes(),
            b"nope",
        ] {
            let f = parse_signed(200, bad).unwrap_err();
            assert_eq!((f.kind.clone(), f.error_name()), (FailureKind::Malformed, ErrorName::BackendError));
        }
        let f = parse_signed(200, br#"{"signed_authorization_request":"top secret","username":"x"}"#).unwrap_err();
        assert!(!f.to_string().contains("secret"), "{f}");
        assert_eq!(
            f.description,
            "malformed answer: signed_authorization_request holds a byte other than visible ASCII"
        );
    }

    #[test]
    fn proxy_config_reads_the_usual_variables() {
        let from = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
            ProxyConfig::from_vars(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        };
        assert_eq!(from(&[]), ProxyConfig::default());
        let p = from(&[("HTTPS_PROXY", "http://p:3128"), ("http_proxy", "http://q:8080"), ("NO_PROXY", "corp")]);
        assert_eq!(p.https.as_deref(), Some("http://p:3128"));
        assert_eq!(p.http.as_deref(), Some("http://q:8080"));
        assert_eq!(p.no_proxy, "corp");
        // Upper case wins; an empty value is unset; ALL_PROXY fills in.
        let p =
            from(&[("HTTP_PROXY", "http://a"), ("http_proxy", "http://b"), ("HTTPS_PROXY", ""), ("all_proxy", "c")]);
        assert_eq!((p.http.as_deref(), p.https.as_deref()), (Some("http://a"), Some("c")));
        assert_eq!(from(&[("HTTP_PROXY", "http://a"), ("REQUEST_METHOD", "GET")]), ProxyConfig::default());
        let p = ProxyConfig { https: Some("http://user:pa55@proxy:3128".into()), ..Default::default() };
        let shown = format!("{p:?}");
        assert!(!shown.contains("pa55") && shown.contains("proxy:3128"), "{shown}");
    }

    #[test]
    fn a_proxy_variable_that_is_no_url_is_an_error_without_its_value() {
        let p = ProxyConfig { https: Some("http://us:pa55@[::1".into()), ..Default::default() };
        let e = build_client_with(Duration::from_secs(1), &p).unwrap_err();
        assert!(e.contains("HTTPS_PROXY") && !e.contains("pa55"), "{e}");
        let p = ProxyConfig { http: Some("proxy.corp:3128".into()), no_proxy: "x, y".into(), ..Default::default() };
        assert!(build_client_with(Duration::from_secs(1), &p).is_ok(), "a URL without scheme means http://");
    }

    #[test]
    fn retry_after_forms() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("5", now), Some(5.0));
        assert_eq!(parse_retry_after(" 120 ", now), Some(120.0));
        assert_eq!(parse_retry_after("99999999999999999999", now), None);
        assert_eq!(parse_retry_after("9999999999", now), Some(7.0 * 86_400.0));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(30.0));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(0.0));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    // Property tests. Each checks a parser against an oracle written here independently of
    // the code under test, and never panics; `PROPTEST_CASES` sets how many cases run.

    /// SPEC 4's rule for tokens and signed requests, restated.
    fn opaque_ok(s: &str) -> bool {
        (1..=8192).contains(&s.len()) && s.bytes().all(|b| b > b' ' && b < 0x7f)
    }

    /// SPEC 4's rule for usernames, restated.
    fn username_ok(s: &str) -> bool {
        s.chars().count() <= 256 && s.chars().all(|c| !(c <= '\u{1f}' || ('\u{7f}'..='\u{9f}').contains(&c)))
    }

    /// Strings near both sides of the token rules: visible ASCII, around the length limit,
    /// one stray character in a good string, and anything at all.
    fn opaque_like() -> impl Strategy<Value = String> {
        prop_oneof![
            "[!-~]{0,40}",
            (8185usize..8200, any::<u8>()).prop_map(|(n, b)| char::from(b'!' + b % 94).to_string().repeat(n)),
            ("[!-~]{1,40}", any::<prop::sample::Index>(), any::<char>()).prop_map(|(mut s, i, c)| {
                s.insert(i.index(s.len() + 1), c);
                s
            }),
            any::<String>(),
        ]
    }

    /// Usernames near both sides of the rules: printable text, around 256 characters of one
    /// or two bytes, a stray control character, and anything at all.
    fn username_like() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,40}",
            (250usize..262, prop::bool::ANY).prop_map(|(n, wide)| if wide { "é" } else { "u" }.repeat(n)),
            ("\\PC{0,20}", any::<prop::sample::Index>(), prop::char::range('\0', '\u{a0}')).prop_map(|(s, i, c)| {
                let mut chars: Vec<char> = s.chars().collect();
                chars.insert(i.index(chars.len() + 1), c);
                chars.into_iter().collect()
            }),
            any::<String>(),
        ]
    }

    /// An expiration time as the peer would write it, near the accepted window or anywhere.
    fn expiry_like(now: f64) -> impl Strategy<Value = String> {
        prop_oneof![
            (now - 10.0..now + MAX_LIFETIME_SECS + 10.0).prop_map(|x| format!("{x}")),
            prop::sample::select(vec![now, now + MAX_LIFETIME_SECS]).prop_map(|x| format!("{x}")),
            any::<f64>().prop_map(|x| format!("{x:?}")),
            any::<i64>().prop_map(|x| x.to_string()),
            "[0-9eE.+-]{1,12}",
        ]
    }

    proptest! {
        /// Arbitrary bytes and statuses never panic, whatever is returned follows the rules,
        /// and a failure's text never quotes the body (which may hold a token).
        #[test]
        fn arbitrary_answers_never_panic_or_leak(body in prop::collection::vec(any::<u8>(), 0..300), status in any::<u16>(), now in any::<f64>()) {
            let mut b = body.clone();
            b.extend_from_slice(b"SECRETMARKER");
            for body in [&body, &b] {
                match parse_login(status, body, now) {
                    Ok(ok) => {
                        prop_assert!(opaque_ok(ok.token.expose()));
                        prop_assert!(ok.username.as_deref().is_none_or(username_ok));
                        prop_assert!(ok.expires_at > now && ok.expires_at <= now + MAX_LIFETIME_SECS);
                    }
                    Err(f) => prop_assert!(!f.to_string().contains("SECRETMARKER")),
                }
                match parse_signed(status, body) {
                    Ok(s) => prop_assert!(opaque_ok(s.signed.expose()) && username_ok(&s.username)),
                    Err(f) => prop_assert!(!f.to_string().contains("SECRETMARKER")),
                }
            }
            for peer in [Peer::Entrupy, Peer::Backend] {
                match classify(peer, status, None, b.clone(), &["SECRETMARKER"]) {
                    Ok((s, _)) => prop_assert!(passes(peer, s)),
                    Err(f) => {
                        prop_assert_eq!(f.status, Some(status));
                        prop_assert!(!f.to_string().contains("SECRETMARKER"));
                    }
                }
            }
        }

        /// A login answer is accepted exactly when its token, username and expiry follow
        /// the rules, and the values come back unchanged.
        #[test]
        fn login_answers_follow_the_rules(token in opaque_like(), username in prop::option::of(username_like()), exp in expiry_like(1.7e9)) {
            let now = 1.7e9;
            let mut body = format!(r#"{{"token":{},"expiration_time":{exp}"#, serde_json::to_string(&token).unwrap());
            if let Some(u) = &username {
                body.push_str(&format!(r#","username":{}"#, serde_json::to_string(u).unwrap()));
            }
            body.push('}');
            // The expiry as the same JSON parser reads it (it may be one ulp off the text).
            let read: Option<f64> = serde_json::from_str(&exp).ok();
            let valid = opaque_ok(&token)
                && username.as_deref().is_none_or(username_ok)
                && read.is_some_and(|e| e > now && e <= now + MAX_LIFETIME_SECS);
            match parse_login(200, body.as_bytes(), now) {
                Ok(ok) => {
                    prop_assert!(valid, "accepted {body:?}");
                    prop_assert_eq!(ok.token.expose(), token.as_str());
                    prop_assert_eq!(ok.username, username);
                    prop_assert_eq!(Some(ok.expires_at), read);
                }
                Err(f) => {
                    prop_assert!(!valid, "rejected {body:?}: {f}");
                    prop_assert_eq!(f.kind.clone(), FailureKind::Malformed);
                    prop_assert_eq!(f.error_name(), ErrorName::ServerError);
                    prop_assert!(token.len() < 16 || !f.to_string().contains(&token));
                }
            }
        }

        /// A signing answer is accepted exactly when its signed request and username follow
        /// the rules.
        #[test]
        fn signed_answers_follow_the_rules(signed in opaque_like(), username in username_like(), conflict in any::<bool>()) {
            let body = serde_json::json!({"signed_authorization_request": signed, "username": username}).to_string();
            let status = if conflict { 409 } else { 200 };
            let valid = opaque_ok(&signed) && username_ok(&username);
            match parse_signed(status, body.as_bytes()) {
                Ok(s) => {
                    prop_assert!(valid, "accepted {body:?}");
                    prop_assert_eq!((s.signed.expose(), s.username.as_str(), s.conflict), (signed.as_str(), username.as_str(), conflict));
                }
                Err(f) => {
                    prop_assert!(!valid, "rejected {body:?}: {f}");
                    prop_assert_eq!((f.kind.clone(), f.error_name()), (FailureKind::Malformed, ErrorName::BackendError));
                    prop_assert!(signed.len() < 16 || !f.to_string().contains(&signed));
                }
            }
        }

        /// The string checks agree with SPEC 4's rules on any string.
        #[test]
        fn string_checks_follow_the_rules(s in prop_oneof![opaque_like(), username_like()]) {
            prop_assert_eq!(check_opaque(&s).is_ok(), opaque_ok(&s));
            prop_assert_eq!(check_username(&s).is_ok(), username_ok(&s));
        }

        /// `Retry-After` never panics and is never negative or over a week.
        #[test]
        fn arbitrary_retry_after_never_panics(
            v in prop_oneof!["\\PC{0,40}", any::<u64>().prop_map(|n| n.to_string()), any::<u32>().prop_map(|s| httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(s.into())))],
            now in any::<u32>(),
        ) {
            let now = std::time::UNIX_EPOCH + Duration::from_secs(now.into());
            if let Some(s) = parse_retry_after(&v, now) {
                prop_assert!((0.0..=7.0 * 86_400.0).contains(&s));
            }
        }
    }
}
