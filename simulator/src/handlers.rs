//! Request handling: routing, the request log, pause and faults, and the two protocol
//! endpoints — the app backend's `POST /sign` (SPEC 4.1) and Entrupy's `POST /login`
//! (SPEC 4.2) — plus the `/_sim/*` control endpoints the binary's scripts use.
//!
//! The endpoints are deliberately strict where a real server could be, because the point
//! of the simulator is to make daemon bugs visible: wrong content type, extra or mistyped
//! fields, a malformed or reused authorization request, a stale signed request, and logins
//! beyond Entrupy's per-user limits are all rejected.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use rand::RngCore as _;
use serde_json::{Value, json};

use crate::body::SimBody;
use crate::fault::{Endpoint, Fault};
use crate::signing::{SignedPayload, decode_authorization_request};
use crate::state::{LoginRecord, Profile, Shared, unix_now};

/// The organisation part of every username: `OrgName-<unique_user_id>`.
pub const ORG_NAME: &str = "OrgName";

/// Request bodies beyond this are answered 413 without being read further.
const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// Returned from the service to make hyper close the connection without an answer.
#[derive(Debug)]
pub(crate) struct DropConnection;

impl fmt::Display for DropConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for DropConnection {}

type Resp = Response<SimBody>;

fn response(status: u16, content_type: Option<&'static str>, body: SimBody) -> Resp {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(ct) = content_type {
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    r
}

fn json_response(status: u16, v: &Value) -> Resp {
    response(status, Some("application/json"), SimBody::full(v.to_string()))
}

fn error_response(status: u16, code: &str, description: &str) -> Resp {
    json_response(status, &json!({"error_code": code, "description": description}))
}

fn with_retry_after(mut r: Resp, value: &str) -> Resp {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn header_string(h: &HeaderMap, name: header::HeaderName) -> Option<String> {
    h.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Resolves when the simulator shuts down.
async fn shutdown_signal(shared: &Shared) {
    crate::server::until_true(&mut shared.shutdown.subscribe()).await;
}

/// The hyper service function.
pub(crate) async fn serve(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, DropConnection> {
    let received_at = SystemTime::now();
    let path = req.uri().path().to_owned();
    if let Some(rest) = path.strip_prefix("/_sim/") {
        let method = req.method().clone();
        let body = read_body(req.into_body()).await.map_err(|_| DropConnection)?;
        return Ok(crate::control::handle(&shared, &method, rest, &body));
    }
    let endpoint = match path.as_str() {
        "/sign" => Some(Endpoint::Sign),
        "/login" => Some(Endpoint::Login),
        _ => None,
    };
    let method = req.method().clone();
    let headers = req.headers().clone();
    let path_and_query = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or(path);
    let (body, too_large) = match read_body(req.into_body()).await {
        Ok(b) => (b, false),
        Err(BodyError::TooLarge) => (Bytes::new(), true),
        Err(BodyError::Gone) => return Err(DropConnection),
    };

    let idx = {
        let mut st = shared.lock();
        st.requests.push(crate::state::RequestRecord {
            endpoint,
            method: method.to_string(),
            path: path_and_query,
            status: None,
            user_agent: header_string(&headers, header::USER_AGENT),
            authorization: header_string(&headers, header::AUTHORIZATION),
            content_type: header_string(&headers, header::CONTENT_TYPE),
            body: String::from_utf8_lossy(&body).into_owned(),
            received_at,
        });
        match endpoint {
            Some(Endpoint::Sign) => st.counters.sign_requests += 1,
            Some(Endpoint::Login) => st.counters.login_requests += 1,
            None => st.counters.other_requests += 1,
        }
        st.requests.len() - 1
    };
    shared.bump();

    let Some(endpoint) = endpoint else {
        let r = error_response(404, "not_found", "no such endpoint");
        finish(&shared, idx, None, 404, false);
        return Ok(r);
    };

    // A paused simulator holds requests as an unresponsive server would.
    {
        let mut paused = shared.paused.subscribe();
        tokio::select! {
            _ = async { let _ = paused.wait_for(|p| !*p).await; } => {}
            _ = shutdown_signal(&shared) => return Err(DropConnection),
        }
    }

    let fault = shared.lock().faults.take(endpoint);
    let r = match fault {
        None => None,
        Some(Fault::Delay { ms }) => {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => None,
                _ = shutdown_signal(&shared) => return Err(DropConnection),
            }
        }
        Some(Fault::Hang) => {
            shutdown_signal(&shared).await;
            return Err(DropConnection);
        }
        Some(Fault::Drop) => return Err(DropConnection),
        Some(Fault::Status { status, body, retry_after }) => {
            let mut r = match body {
                Some(b) => response(status, Some("application/json"), SimBody::full(b)),
                None => response(status, None, SimBody::empty()),
            };
            if let Some(ra) = retry_after {
                r = with_retry_after(r, &ra);
            }
            Some(r)
        }
        Some(Fault::MalformedJson) => Some(response(
            200,
            Some("application/json"),
            SimBody::full(&b"{\"token\": \"abc\", \"expiration_time\": "[..]),
        )),
        Some(Fault::Redirect { status, location }) => {
            let mut r = error_response(status, "moved", "see Location");
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            Some(r)
        }
        Some(Fault::Body { status, body }) => Some(response(status, Some("application/json"), SimBody::full(body))),
        Some(Fault::Oversized { bytes }) => Some(response(200, Some("application/json"), SimBody::oversized(bytes))),
        Some(Fault::Trickle { bytes_per_sec, total }) => {
            Some(response(200, Some("application/json"), SimBody::trickle(bytes_per_sec, total)))
        }
    };
    if let Some(r) = r {
        let status = r.status().as_u16();
        finish(&shared, idx, Some(endpoint), status, false);
        return Ok(r);
    }

    let (r, ok) = if too_large {
        (error_response(413, "payload_too_large", "request body too large"), false)
    } else if method != Method::POST {
        let mut r = error_response(405, "method_not_allowed", "use POST");
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        (r, false)
    } else {
        match endpoint {
            Endpoint::Sign => handle_sign(&shared, &headers, &body),
            Endpoint::Login => handle_login(&shared, &headers, &body),
        }
    };
    finish(&shared, idx, Some(endpoint), r.status().as_u16(), ok);
    Ok(r)
}

/// Records the answer in the request log and counters.
fn finish(shared: &Shared, idx: usize, endpoint: Option<Endpoint>, status: u16, ok: bool) {
    let line = {
        let mut st = shared.lock();
        let line = st.requests.get_mut(idx).map(|rec| {
            rec.status = Some(status);
            format!("{} {}", rec.method, rec.path)
        });
        let c = &mut st.counters;
        match endpoint {
            Some(Endpoint::Sign) => {
                *c.sign_by_status.entry(status).or_default() += 1;
                if ok {
                    c.sign_ok += 1;
                } else if status != 200 && status != 409 {
                    c.sign_rejected += 1;
                }
            }
            Some(Endpoint::Login) => {
                *c.login_by_status.entry(status).or_default() += 1;
                if ok {
                    c.login_ok += 1;
                } else if status != 200 {
                    c.login_rejected += 1;
                }
            }
            None => {}
        }
        line
    };
    shared.bump();
    if shared.verbose.load(Ordering::Relaxed) {
        eprintln!("entrupy-sim: {} -> {status}", line.unwrap_or_default());
    }
}

pub(crate) enum BodyError {
    TooLarge,
    Gone,
}

pub(crate) async fn read_body(b: Incoming) -> Result<Bytes, BodyError> {
    match Limited::new(b, MAX_REQUEST_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Gone),
    }
}

fn is_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// SPEC: 8-40 characters of `A-Za-z0-9@.+_-`.
fn valid_unique_user_id(s: &str) -> bool {
    (8..=40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"@.+_-".contains(&b))
}

fn username(uid: &str) -> String {
    format!("{ORG_NAME}-{uid}")
}

/// Gets a required string field, or an optional one (absent or null is `None`).
fn string_field(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{key} must be a string")),
    }
}

/// The app backend: checks the app-user credential, validates the user, remembers the
/// profile, and signs the request.
fn handle_sign(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> (Resp, bool) {
    let mut st = shared.lock();
    if let Some(accepted) = &st.accepted_credentials {
        let presented =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| accepted.iter().any(|a| a == p)) {
            return (error_response(401, "unauthorized", "missing or unknown app-user credential"), false);
        }
    }
    if !is_json_content_type(headers) {
        return (error_response(415, "unsupported_media_type", "Content-Type must be application/json"), false);
    }
    let bad = |d: &str| (error_response(400, "bad_request", d), false);
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return bad("body must be a JSON object");
    };
    let fields = (|| -> Result<_, String> {
        let need =
            |k: &str| -> Result<String, String> { string_field(&obj, k)?.ok_or_else(|| format!("{k} is required")) };
        Ok((
            need("sdk_authorization_request")?,
            need("unique_user_id")?,
            need("email")?,
            string_field(&obj, "first_name")?,
            string_field(&obj, "last_name")?,
        ))
    })();
    let (authz, uid, email, first_name, last_name) = match fields {
        Ok(f) => f,
        Err(e) => return bad(&e),
    };
    if authz.is_empty() {
        return bad("sdk_authorization_request must not be empty");
    }
    if !valid_unique_user_id(&uid) {
        return bad("unique_user_id must be 8-40 characters of A-Za-z0-9@.+_-");
    }
    if !email.contains('@') {
        return bad("email is not an email address");
    }

    let profile = Profile { email: email.clone(), first_name, last_name };
    // Entrupy sets the profile on the first call; a later difference is a conflict, but
    // the request is still signed (and, here, the new profile remembered).
    let conflict = st.profiles.insert(uid.clone(), profile.clone()).is_some_and(|old| old != profile);
    drop(st);
    let signed = shared.signer.sign(&SignedPayload {
        sdk_authorization_request: authz,
        unique_user_id: uid.clone(),
        email,
        signed_at: unix_now(),
    });
    let body = json!({"signed_authorization_request": signed, "username": username(&uid)});
    (json_response(if conflict { 409 } else { 200 }, &body), true)
}

/// Entrupy's login: verifies the signed request, its freshness and single use, enforces
/// the per-user limits on successful logins, and issues a token.
fn handle_login(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> (Resp, bool) {
    let invalid = |d: &str| (error_response(401, "invalid_signed_request", d), false);
    if !is_json_content_type(headers) {
        return (error_response(415, "unsupported_media_type", "Content-Type must be application/json"), false);
    }
    let signed = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) if obj.len() == 1 => match obj.get("signed_authorization_request") {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        },
        _ => String::new(),
    };
    if signed.is_empty() {
        return (
            error_response(
                400,
                "bad_request",
                r#"body must be exactly {"signed_authorization_request": "<non-empty string>"}"#,
            ),
            false,
        );
    }
    let payload = match shared.signer.verify(&signed) {
        Ok(p) => p,
        Err(e) => return invalid(e),
    };

    let mut st = shared.lock();
    let now = unix_now();
    let max_age = st.signed_request_max_age.as_secs_f64();
    if now - payload.signed_at > max_age {
        return invalid("signed request has expired");
    }
    let authz = match decode_authorization_request(&payload.sdk_authorization_request) {
        Ok(a) => a,
        Err(e) => return invalid(&e),
    };
    let age = now - authz.issued_at as f64;
    if age > max_age {
        return invalid("sdk authorization request has expired");
    }
    if -age > max_age {
        return invalid("sdk authorization request is issued in the future");
    }
    if st.used_nonces.contains(&authz.nonce) {
        return invalid("signed request has already been used");
    }
    // A request that got this far is spent, even if the rate limit turns it away: a
    // correct client makes a fresh one for every attempt.
    st.used_nonces.insert(authz.nonce.clone());
    let uid = payload.unique_user_id;
    let mono_now = Instant::now();
    if let Err(wait) = st.login_budget(&uid, mono_now) {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let r = error_response(429, "too_many_requests", "too many successful logins for this user; retry later");
        return (with_retry_after(r, &secs.max(1).to_string()), false);
    }
    st.login_history.entry(uid.clone()).or_default().push_back(mono_now);
    let token = random_token();
    let expiration_time = now + st.token_lifetime.as_secs_f64();
    st.logins.push(LoginRecord {
        token: token.clone(),
        expiration_time,
        unique_user_id: uid.clone(),
        device_id: authz.device_id,
        nonce: authz.nonce,
        issued_at: authz.issued_at,
        at: SystemTime::now(),
    });
    let body = json!({"token": token, "expiration_time": expiration_time, "username": username(&uid)});
    (json_response(200, &body), true)
}

/// 240 random bits as 40 URL-safe characters.
fn random_token() -> String {
    use base64::Engine as _;
    let mut b = [0u8; 30];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}
