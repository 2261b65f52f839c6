//! The `/_sim/*` control endpoints, so that a demo script driving the binary can inject
//! faults and read the counters over HTTP. Their requests are not logged or counted: they
//! are not part of either protocol.
//!
//! - `POST /_sim/fault` `{"endpoint":"login"|"sign", "count":N?, ...}` with either
//!   `"status":503, "retry_after":"5"?, "body":"..."?` or `"kind":` one of `hang`, `drop`,
//!   `malformed`, `oversized` (`"bytes"`), `trickle` (`"bytes_per_sec"`, `"total"`),
//!   `delay` (`"ms"`), `redirect` (`"location"`, `"status"`, 302 when not given), `status`.
//! - `POST /_sim/clear` drops all pending faults.
//! - `POST /_sim/pause` `{"paused": true|false}` holds or releases requests.
//! - `GET /_sim/stats` answers the counters and the pending fault counts.

use hyper::Method;
use serde_json::{Value, json};

use crate::fault::{Endpoint, Fault};
use crate::state::Shared;

type Resp = hyper::Response<crate::body::SimBody>;

fn reply(status: u16, v: Value) -> Resp {
    let mut r = hyper::Response::new(crate::body::SimBody::full(v.to_string()));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn bad(msg: impl Into<String>) -> Resp {
    reply(400, json!({"error_code": "bad_request", "description": msg.into()}))
}

pub(crate) fn handle(shared: &Shared, method: &Method, what: &str, body: &[u8]) -> Resp {
    match (method.as_str(), what) {
        ("GET", "stats") => {
            let st = shared.lock();
            let counters = serde_json::to_value(&st.counters).unwrap_or(Value::Null);
            reply(
                200,
                json!({
                    "counters": counters,
                    "pending_faults": {
                        "sign": st.faults.pending(Endpoint::Sign),
                        "login": st.faults.pending(Endpoint::Login),
                    },
                    "paused": *shared.paused.borrow(),
                }),
            )
        }
        ("POST", "clear") => {
            shared.lock().faults.clear();
            reply(200, json!({"ok": true}))
        }
        ("POST", "pause") => match serde_json::from_slice::<Value>(body) {
            Ok(v) => match v.get("paused").and_then(Value::as_bool) {
                Some(p) => {
                    shared.paused.send_replace(p);
                    reply(200, json!({"ok": true, "paused": p}))
                }
                None => bad("expected {\"paused\": true|false}"),
            },
            Err(e) => bad(e.to_string()),
        },
        ("POST", "fault") => {
            match serde_json::from_slice::<Value>(body).map_err(|e| e.to_string()).and_then(|v| parse_fault(&v)) {
                Ok((ep, fault, count)) => {
                    shared.lock().faults.push(ep, fault, count);
                    reply(200, json!({"ok": true}))
                }
                Err(e) => bad(e),
            }
        }
        _ => reply(404, json!({"error_code": "not_found", "description": "no such control endpoint"})),
    }
}

/// Parses the JSON fault description documented on the module.
pub(crate) fn parse_fault(v: &Value) -> Result<(Endpoint, Fault, u32), String> {
    let endpoint = match v.get("endpoint").and_then(Value::as_str) {
        Some("login") => Endpoint::Login,
        Some("sign") => Endpoint::Sign,
        _ => return Err("endpoint must be \"login\" or \"sign\"".into()),
    };
    let count = match v.get("count") {
        None => 1,
        Some(c) => c.as_u64().and_then(|c| u32::try_from(c).ok()).ok_or("count must be a non-negative integer")?,
    };
    let uint = |k: &str| -> Result<u64, String> {
        v.get(k).and_then(Value::as_u64).ok_or_else(|| format!("{k} must be a non-negative integer"))
    };
    let string = |k: &str| -> Result<Option<String>, String> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            // A number is accepted for retry_after, as scripts naturally write it.
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(format!("{k} must be a string")),
        }
    };
    let kind = match v.get("kind").and_then(Value::as_str) {
        Some(k) => k,
        None if v.get("status").is_some() => "status",
        None => return Err("give a status or a kind".into()),
    };
    let as_u32 = |x: u64, k: &str| u32::try_from(x).map_err(|_| format!("{k} is too large"));
    let fault = match kind {
        "status" => Fault::Status {
            status: u16::try_from(uint("status")?).map_err(|_| "status is too large")?,
            body: string("body")?,
            retry_after: string("retry_after")?,
        },
        "hang" => Fault::Hang,
        "drop" => Fault::Drop,
        "malformed" => Fault::MalformedJson,
        "oversized" => Fault::Oversized { bytes: usize::try_from(uint("bytes")?).map_err(|_| "bytes is too large")? },
        "trickle" => Fault::Trickle {
            bytes_per_sec: as_u32(uint("bytes_per_sec")?, "bytes_per_sec")?,
            total: usize::try_from(uint("total")?).map_err(|_| "total is too large")?,
        },
        "delay" => Fault::Delay { ms: uint("ms")? },
        "redirect" => Fault::Redirect {
            status: match v.get("status") {
                None => 302,
                Some(_) => u16::try_from(uint("status")?).map_err(|_| "status is too large")?,
            },
            location: string("location")?.ok_or("a redirect needs a location")?,
        },
        other => return Err(format!("unknown fault kind {other:?}")),
    };
    Ok((endpoint, fault, count))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_script_faults() {
        let (ep, f, n) =
            parse_fault(&json!({"endpoint":"login","status":503,"count":2,"retry_after":"5","body":"{}"})).unwrap();
        assert_eq!(ep, Endpoint::Login);
        assert_eq!(n, 2);
        assert_eq!(f, Fault::Status { status: 503, body: Some("{}".into()), retry_after: Some("5".into()) });
        let (ep, f, n) = parse_fault(&json!({"endpoint":"sign","kind":"hang"})).unwrap();
        assert_eq!((ep, f, n), (Endpoint::Sign, Fault::Hang, 1));
        assert_eq!(parse_fault(&json!({"endpoint":"sign","kind":"drop"})).unwrap().1, Fault::Drop);
        assert_eq!(parse_fault(&json!({"endpoint":"sign","kind":"malformed"})).unwrap().1, Fault::MalformedJson);
        assert_eq!(
            parse_fault(&json!({"endpoint":"sign","kind":"redirect","location":"http://127.0.0.1:1/x"})).unwrap().1,
            Fault::Redirect { status: 302, location: "http://127.0.0.1:1/x".into() }
        );
        assert!(parse_fault(&json!({"endpoint":"sign","kind":"redirect"})).is_err());
        assert!(parse_fault(&json!({"endpoint":"x","kind":"hang"})).is_err());
        assert!(parse_fault(&json!({"endpoint":"login"})).is_err());
        assert!(parse_fault(&json!({"endpoint":"login","kind":"nope"})).is_err());
    }
}
