//! Everything the simulator remembers between requests, behind one mutex: the settings a
//! test may change while it runs, the backend's user profiles, Entrupy's used nonces,
//! login history (for the rate limits) and issued tokens, the fault queues, and the
//! request log and counters that tests assert on.
//!
//! Critical sections are short and never await, so a `std::sync::Mutex` serves both the
//! async request handlers and the synchronous test-facing accessors.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use crate::config::SimConfig;
use crate::fault::{Endpoint, FaultQueues};
use crate::signing::Signer;

/// Request counts, as `counters()` and `GET /_sim/stats` report them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Requests received at `/sign` (after their body was read), faulted ones included.
    pub sign_requests: u64,
    /// Signed answers from normal processing (200, or 409 on a profile change).
    pub sign_ok: u64,
    /// `/sign` answers with a status other than 200 or 409, faults included.
    pub sign_rejected: u64,
    /// Requests received at `/login`, faulted ones included.
    pub login_requests: u64,
    /// Tokens issued (a 200 from normal processing).
    pub login_ok: u64,
    /// `/login` answers with a status other than 200, faults included.
    pub login_rejected: u64,
    /// Requests to any other path (answered 404), a sign of a wrong URL in the client.
    pub other_requests: u64,
    /// How often `/sign` answered each status.
    pub sign_by_status: BTreeMap<u16, u64>,
    /// How often `/login` answered each status.
    pub login_by_status: BTreeMap<u16, u64>,
}

/// One request as received, for tests to inspect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `None` for a path that is neither `/sign` nor `/login`.
    pub endpoint: Option<Endpoint>,
    pub method: String,
    /// The path and query as sent.
    pub path: String,
    /// The status answered; `None` while the request is held (pause, `Hang`, `Delay`) and
    /// for one that got no HTTP answer at all (`Hang`, `Drop`).
    pub status: Option<u16>,
    pub user_agent: Option<String>,
    /// The `Authorization` header value, verbatim.
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    /// The raw body, lossily decoded as UTF-8.
    pub body: String,
    pub received_at: SystemTime,
}

/// One successful login at `/login`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoginRecord {
    pub token: String,
    /// Fractional Unix seconds, as answered.
    pub expiration_time: f64,
    pub unique_user_id: String,
    /// From the SDK authorization request the daemon generated.
    pub device_id: String,
    pub nonce: String,
    pub issued_at: i64,
    /// When the token was issued.
    pub at: SystemTime,
}

/// The current wall clock as fractional Unix seconds.
pub(crate) fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Profile {
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// The mutable state; see the module documentation.
#[derive(Debug)]
pub(crate) struct State {
    pub token_lifetime: Duration,
    pub logins_per_minute: u32,
    pub logins_per_day: u32,
    pub accepted_credentials: Option<Vec<String>>,
    pub signed_request_max_age: Duration,
    pub faults: FaultQueues,
    pub counters: Counters,
    pub requests: Vec<RequestRecord>,
    pub profiles: HashMap<String, Profile>,
    pub used_nonces: HashSet<String>,
    /// Successful logins per unique_user_id, oldest first, pruned to the last 24 h.
    pub login_history: HashMap<String, VecDeque<Instant>>,
    pub logins: Vec<LoginRecord>,
}

impl State {
    pub fn new(cfg: &SimConfig) -> Self {
        State {
            token_lifetime: cfg.token_lifetime,
            logins_per_minute: cfg.logins_per_minute,
            logins_per_day: cfg.logins_per_day,
            accepted_credentials: cfg.accepted_credentials.clone(),
            signed_request_max_age: cfg.signed_request_max_age,
            faults: FaultQueues::default(),
            counters: Counters::default(),
            requests: Vec::new(),
            profiles: HashMap::new(),
            used_nonces: HashSet::new(),
            login_history: HashMap::new(),
            logins: Vec::new(),
        }
    }

    /// Whether one more successful login for `uid` fits Entrupy's limits at `now`; if not,
    /// how long until a slot frees in every window that is full.
    pub fn login_budget(&mut self, uid: &str, now: Instant) -> Result<(), Duration> {
        const MINUTE: Duration = Duration::from_secs(60);
        const DAY: Duration = Duration::from_secs(24 * 3600);
        let history = self.login_history.entry(uid.to_owned()).or_default();
        while history.front().is_some_and(|t| now.saturating_duration_since(*t) >= DAY) {
            history.pop_front();
        }
        let wait_for = |window: Duration, limit: u32| -> Option<Duration> {
            let in_window: Vec<Instant> =
                history.iter().copied().filter(|t| now.saturating_duration_since(*t) < window).collect();
            let limit = limit as usize;
            if in_window.len() < limit {
                return None;
            }
            if limit == 0 {
                // No login is ever allowed; tell the client to come back after a window.
                return Some(window);
            }
            // The slot frees when enough of the oldest logins have left the window that
            // fewer than `limit` remain.
            let freeing = in_window[in_window.len() - limit];
            Some(window.saturating_sub(now.saturating_duration_since(freeing)))
        };
        let waits = [wait_for(MINUTE, self.logins_per_minute), wait_for(DAY, self.logins_per_day)];
        match waits.into_iter().flatten().max() {
            Some(w) => Err(w),
            None => Ok(()),
        }
    }
}

/// The state shared by the handle and the connection tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub signer: Signer,
    state: Mutex<State>,
    /// Set to true once to stop the listener, held requests and connections.
    pub shutdown: watch::Sender<bool>,
    /// While true, requests to `/sign` and `/login` are held before processing.
    pub paused: watch::Sender<bool>,
    /// Bumped on every change to the request log, so tests can wait without sleeping.
    pub changes: watch::Sender<u64>,
    /// Log every answered request on stderr (the binary turns this on).
    pub verbose: AtomicBool,
}

impl Shared {
    pub fn new(cfg: &SimConfig) -> Self {
        Shared {
            signer: Signer::random(),
            state: Mutex::new(State::new(cfg)),
            shutdown: watch::Sender::new(false),
            paused: watch::Sender::new(false),
            changes: watch::Sender::new(0),
            verbose: AtomicBool::new(false),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock (in a test thread) leaves the data usable: every
        // update is a single assignment or push, never a half-done multi-step change.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn minute_and_day_limits() {
        let cfg = SimConfig { logins_per_minute: 2, logins_per_day: 3, ..SimConfig::default() };
        let mut s = State::new(&cfg);
        let t0 = Instant::now();
        let push = |s: &mut State, t| s.login_history.entry("u".into()).or_default().push_back(t);
        assert!(s.login_budget("u", t0).is_ok());
        push(&mut s, t0);
        push(&mut s, t0 + Duration::from_secs(10));
        let wait = s.login_budget("u", t0 + Duration::from_secs(20)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(40));
        assert!(s.login_budget("u", t0 + Duration::from_secs(60)).is_ok());
        push(&mut s, t0 + Duration::from_secs(61));
        let wait = s.login_budget("u", t0 + Duration::from_secs(200)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(24 * 3600 - 200));
        // Another user has its own budget.
        assert!(s.login_budget("v", t0 + Duration::from_secs(200)).is_ok());
        // A zero limit never allows a login.
        s.logins_per_minute = 0;
        assert!(s.login_budget("v", t0).is_err());
    }
}
