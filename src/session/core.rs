//! The pure session core: one session's state machine (SPEC 5 and 6).
//!
//! [`Core::step`] takes an [`Input`] (a client's call, a deadline, a finished attempt, ...)
//! with `now`, a uniform random number and the login [`Ledger`], changes the state and
//! returns the [`Effect`]s the loop must carry out, in order: write the ledger or the
//! session's record, start or cancel an attempt, emit a signal, answer a caller. Every
//! decision about a session is made here; the loop only carries the effects out. It knows no
//! tokio, no D-Bus, no HTTP and no disk (a test reads this file to keep it so), so its tests
//! are tables of inputs and effects.
//!
//! Crash safety is in the order of effects: a reservation is written ([`Effect::SaveLedger`])
//! before the attempt that needs it starts, and the attempt waits for that write before it
//! sends the login; a success is first written ([`Effect::Commit`]) and only applied,
//! published and answered when the loop reports it on disk ([`Input::Saved`]).

use std::collections::VecDeque;
use std::sync::Arc;

use tracing::{info, warn};

use crate::clock::fmt_time;
use crate::error::{ApiError, ErrorName};
use crate::ledger::Ledger;
use crate::policy::{self, Budget};
use crate::secret::Secret;

/// Most callers that may wait on one session's attempt; more get `TooManyRequests`.
pub const MAX_WAITERS: usize = 16_384;
/// Most `LoginWithSignedRequest` callers waiting their turn on one session.
pub const MAX_SIGNED_QUEUE: usize = 256;

/// The public `State` property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No token, not trying.
    LoggedOut,
    /// A valid token, no attempt under way.
    Valid,
    /// An attempt under way.
    Refreshing,
    /// No valid token, waiting to retry.
    Expired,
    /// The backend rejected the credential.
    NeedsReauthorization,
    /// A permanent error.
    Failed,
}

impl State {
    /// Every state, in the order of [`State::index`].
    pub const ALL: [State; 6] =
        [State::LoggedOut, State::Valid, State::Refreshing, State::Expired, State::NeedsReauthorization, State::Failed];

    /// The position in [`State::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The SPEC's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            State::LoggedOut => "logged-out",
            State::Valid => "valid",
            State::Refreshing => "refreshing",
            State::Expired => "expired",
            State::NeedsReauthorization => "needs-reauthorization",
            State::Failed => "failed",
        }
    }
}

/// Policy settings, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Refresh margin.
    pub margin: f64,
    /// Refresh jitter.
    pub jitter: f64,
    /// First backoff delay.
    pub backoff_initial: f64,
    /// Backoff cap.
    pub backoff_max: f64,
    /// Login budget per user.
    pub budget: Budget,
    /// The last logins of the daily budget, kept for the daemon's own refreshes.
    pub reserved_for_refresh: u32,
    /// Pace automatic refreshes of short-lived tokens (`[rate_limit] pace`).
    pub pace: bool,
}

/// What a session is told when its settings change (reload).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The user (whose budget the session spends).
    pub unique_user_id: Arc<str>,
    /// Policy.
    pub params: Params,
    /// Whether a backend URL is configured (else only `LoginWithSignedRequest` logs in).
    pub has_backend: bool,
}

/// Identifies a caller waiting for an answer; the loop maps it to the caller's reply channel.
pub type CallId = u64;

/// The identity of a credential file's content (modification time, size, inode), read by
/// the loop: a change lets a session that waits for one try again.
pub type Stamp = (i64, i64, u64, u64);

/// What reaches a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// `Refresh()`.
    Refresh(CallId),
    /// `EnsureValid(min_seconds)`.
    EnsureValid(CallId, u32),
    /// `LoginWithSignedRequest(signed_request)`.
    LoginSigned(CallId, Secret),
    /// `Cleanup()`.
    Cleanup(CallId),
    /// A deadline came, or the wall clock may have jumped: look at the clock.
    Tick,
    /// The sweep read the credential file's stamp (for a session that waits for a change).
    CredentialChecked(Option<Stamp>),
    /// Connectivity is back.
    NetworkUp,
    /// New settings (reload).
    Reconfigure(Settings),
    /// The attempt `id` ended.
    AttemptDone(u64, AttemptResult),
    /// The success of attempt `id` reached the disk (or the write failed and was logged).
    Saved(u64),
    /// The daemon stops, or the session is removed: cancel what is under way.
    Stop(String),
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    /// Logged in.
    Ok(Success),
    /// Failed.
    Err(AttemptFailure),
}

/// A successful login.
#[derive(Debug, Clone, PartialEq)]
pub struct Success {
    /// The token.
    pub token: Secret,
    /// Exact expiry.
    pub expires_at: f64,
    /// The username, when a peer gave one.
    pub username: Option<String>,
    /// When the login answer arrived.
    pub received_at: f64,
}

/// A failed attempt, classified by the attempt runner.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptFailure {
    /// What it means for the schedule.
    pub outcome: Outcome,
    /// The caller's error (and `LastError`).
    pub error: ApiError,
    /// `LoginFailed`'s error code.
    pub code: String,
    /// `LoginFailed`'s description.
    pub description: String,
    /// The credential file's stamp when it was read (to notice a change later).
    pub stamp: Option<Stamp>,
}

/// What a failure means for the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Network, 5xx, malformed, Entrupy 401 after the retry: back off and retry.
    Transient,
    /// A 429, with the seconds to wait when known.
    RateLimited(Option<f64>),
    /// The backend rejected the credential (or it is unusable): wait for a change.
    Reauthorize,
    /// Permanent: wait for a change.
    Permanent,
    /// The attempt could not be made safely (its reservation could not be written): back
    /// off as for a transient failure.
    NotSent,
}

/// An answer to a caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `Refresh`, `LoginWithSignedRequest`: the new expiry.
    Expiry(f64),
    /// `EnsureValid`: the token and its expiry.
    Token(Secret, f64),
    /// `Cleanup`.
    Done,
    /// The call failed.
    Err(ApiError),
}

/// Signals of a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// `LoginSucceeded(t expires_at)`.
    LoginSucceeded(f64),
    /// `LoginFailed(s error_code, s description)`.
    LoginFailed(String, String),
    /// `AuthorizationExpired()`.
    AuthorizationExpired,
    /// `ReauthorizationRequired()`.
    ReauthorizationRequired,
}

/// Which login an attempt makes.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptKind {
    /// Through the backend (an Entrupy 401 gets one more fresh signed request).
    Backend,
    /// With a caller's signed request.
    Signed(Secret),
}

/// What the loop must do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Write the user's login history (the ledger changed).
    SaveLedger,
    /// Start attempt `id`; its login waits for the `SaveLedger` before it.
    Start(u64, AttemptKind),
    /// Drop attempt `id` (its result will be ignored).
    Cancel(u64),
    /// Write the session's record.
    Save,
    /// Write the ledger and this record (the success of attempt `id`, not yet applied),
    /// then report [`Input::Saved`].
    Commit(u64, Box<Persisted>),
    /// Publish the snapshot, then emit the signal.
    Signal(Signal),
    /// Answer a caller.
    Reply(CallId, Reply),
}

/// What a session keeps across restarts (the store adds who it is).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Persisted {
    /// As returned by a peer.
    pub username: String,
    /// The token, when one is held.
    pub token: Option<Secret>,
    /// Exact expiry.
    pub expires_at: Option<f64>,
    /// When the last login answer arrived.
    pub last_login_at: Option<f64>,
    /// The planned refresh.
    pub refresh_at: Option<f64>,
    /// The last failure.
    pub last_error: Option<ErrorName>,
    /// After `Cleanup`: no automatic login, also after a restart.
    pub logged_out: bool,
}

/// What drives the session's automatic behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not trying (never logged in without a backend, or after `Cleanup`).
    LoggedOut,
    /// Keeping the token valid.
    Active,
    /// The backend rejected the credential; waiting for a change or a client.
    NeedsReauth,
    /// A permanent error; waiting for a change or a client.
    Failed,
}

/// A caller waiting for the attempt under way.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Waiter {
    /// Answered with the expiry.
    Expiry(CallId),
    /// Answered with the token.
    Token(CallId),
}

/// The attempt under way.
#[derive(Debug, Clone, PartialEq)]
struct Attempt {
    id: u64,
    /// A client asked for it (its failure leaves the schedule alone).
    asked: bool,
    /// With a client's signed request.
    signed: bool,
    /// The ledger's reservation.
    reserved_at: f64,
    waiters: Vec<Waiter>,
    /// Logged in; waiting for the success to reach the disk.
    saving: Option<(Success, Option<f64>)>,
}

/// One session's state and every decision on it.
#[derive(Debug, Clone)]
pub struct Core {
    settings: Settings,
    mode: Mode,
    /// Kept after expiry so that `ExpiresAt` stays.
    token: Option<Secret>,
    expires_at: Option<f64>,
    last_login_at: Option<f64>,
    /// The planned proactive refresh of the current token.
    refresh_at: Option<f64>,
    /// The planned retry after a failure, when retrying.
    retry_at: Option<f64>,
    /// Failures in a row (the backoff exponent).
    backoff_attempt: u32,
    /// No request before this (a 429's `Retry-After`).
    not_before: Option<f64>,
    username: Arc<str>,
    last_error: Option<ErrorName>,
    /// `AuthorizationExpired` was emitted for the current token.
    expired_announced: bool,
    /// A client called `Cleanup` and nobody logged in since.
    cleaned_up: bool,
    /// When the last attempt started (pacing counts retries too).
    last_attempt_at: Option<f64>,
    /// When a network return last ended a backoff wait (at most once per `backoff_initial`).
    last_network_kick: Option<f64>,
    attempt: Option<Attempt>,
    next_attempt_id: u64,
    /// `LoginWithSignedRequest` callers waiting for their turn.
    signed_queue: VecDeque<(CallId, Secret)>,
    /// The credential file's stamp at the last rejection.
    credential_stamp: Option<Stamp>,
    /// Pacing was announced in the log (once per episode).
    pacing_logged: bool,
}

/// Everything a step needs from outside: the time, chance and the shared ledger.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// Unix seconds.
    pub now: f64,
    /// A uniform random number in `[0, 1)` (jitter, backoff).
    pub u: f64,
    /// The login budget's memory, shared by all sessions.
    pub ledger: &'a mut Ledger,
}

fn error(name: ErrorName, message: impl Into<String>) -> ApiError {
    ApiError::new(name, message)
}

fn in_secs(t: f64, now: f64) -> String {
    format!("{} (in {:.0} s)", fmt_time(t), (t - now).max(0.0).ceil())
}

impl Core {
    /// A session never logged in.
    pub fn new(settings: Settings) -> Self {
        let mode = if settings.has_backend { Mode::Active } else { Mode::LoggedOut };
        Core {
            settings,
            mode,
            token: None,
            expires_at: None,
            last_login_at: None,
            refresh_at: None,
            retry_at: None,
            backoff_attempt: 0,
            not_before: None,
            username: Arc::from(""),
            last_error: None,
            expired_announced: false,
            cleaned_up: false,
            last_attempt_at: None,
            last_network_kick: None,
            attempt: None,
            next_attempt_id: 0,
            signed_queue: VecDeque::new(),
            credential_stamp: None,
            pacing_logged: false,
        }
    }

    /// A session as it was kept, at `now`. A stored token already past its refresh point
    /// (without jitter) is due at once; one before it keeps its stored plan.
    pub fn restore(settings: Settings, p: &Persisted, now: f64) -> Self {
        let mut c = Core::new(settings);
        c.username = p.username.as_str().into();
        c.last_error = p.last_error;
        c.last_login_at = p.last_login_at;
        if p.logged_out {
            c.mode = Mode::LoggedOut;
            c.cleaned_up = true;
            return c;
        }
        if let (Some(tok), Some(exp)) = (&p.token, p.expires_at) {
            c.token = Some(tok.clone());
            c.expires_at = Some(exp);
            c.expired_announced = now >= exp;
            let received = p.last_login_at.unwrap_or(exp).min(exp);
            let point = policy::refresh_point(exp, received, c.settings.params.margin);
            c.refresh_at = Some(match p.refresh_at {
                Some(r) if r.is_finite() && r <= point => r,
                _ => point,
            });
            c.mode = Mode::Active;
        } else if !c.settings.has_backend {
            c.mode = Mode::LoggedOut;
        }
        c
    }

    /// What is kept across restarts.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            username: self.username.to_string(),
            token: self.token.clone(),
            expires_at: self.expires_at,
            last_login_at: self.last_login_at,
            refresh_at: self.refresh_at,
            last_error: self.last_error,
            logged_out: self.cleaned_up,
        }
    }

    /// The user whose budget this session spends.
    pub fn unique_user_id(&self) -> &Arc<str> {
        &self.settings.unique_user_id
    }

    /// The token, when one is held (valid or not).
    pub fn token(&self) -> Option<&Secret> {
        self.token.as_ref()
    }

    /// Exact expiry of the token held.
    pub fn expires_at(&self) -> Option<f64> {
        self.expires_at
    }

    /// When the last login answer arrived.
    pub fn last_login_at(&self) -> Option<f64> {
        self.last_login_at
    }

    /// As returned by a peer.
    pub fn username(&self) -> &Arc<str> {
        &self.username
    }

    /// The last failure.
    pub fn last_error(&self) -> Option<ErrorName> {
        self.last_error
    }

    /// The daily budget.
    pub fn logins_per_day(&self) -> u32 {
        self.settings.params.budget.per_day
    }

    /// Whether the token is valid at `now`.
    pub fn valid(&self, now: f64) -> bool {
        policy::is_valid(self.token.is_some(), self.expires_at, now)
    }

    /// Whether the session waits for a change of its credential (the sweep reads the file).
    pub fn waits_for_change(&self) -> bool {
        matches!(self.mode, Mode::NeedsReauth | Mode::Failed)
    }

    /// Whether something is under way (an attempt or callers in line).
    pub fn busy(&self) -> bool {
        self.attempt.is_some() || !self.signed_queue.is_empty()
    }

    /// The public state at `now`.
    pub fn state(&self, now: f64) -> State {
        if self.attempt.is_some() {
            return State::Refreshing;
        }
        match self.mode {
            Mode::LoggedOut => State::LoggedOut,
            Mode::NeedsReauth => State::NeedsReauthorization,
            Mode::Failed => State::Failed,
            Mode::Active if self.valid(now) => State::Valid,
            Mode::Active => State::Expired,
        }
    }

    /// Pacing: when the token lifetime is so short that refreshing before every expiry would
    /// spend more than the daily budget, automatic attempts (retries included) are spread to
    /// one per `24 h / logins_per_day` once half of the day's budget is used. Returns the
    /// earliest next automatic attempt, `None` when not pacing.
    pub fn pace_until(&self, used_today: u32) -> Option<f64> {
        let p = &self.settings.params;
        if !p.pace {
            return None;
        }
        let per_day = f64::from(p.budget.per_day);
        let interval = policy::DAY / per_day;
        let natural = match (self.refresh_at, self.last_login_at) {
            (Some(r), Some(l)) => r - l,
            _ => return None,
        };
        if natural >= interval || f64::from(used_today) < per_day / 2.0 {
            return None;
        }
        let last = self.last_attempt_at.or(self.last_login_at)?;
        Some(last + interval)
    }

    /// What holds automatic attempts back: the budget, or pacing.
    pub fn hold(&self, ledger: &Ledger, now: f64) -> Option<f64> {
        let uid = &self.settings.unique_user_id;
        let free = ledger.free_at(uid, self.settings.params.budget, now);
        let pace = self.pace_until(ledger.logins_today(uid, now));
        [free, pace].into_iter().flatten().reduce(f64::max)
    }

    /// Whether automatic refreshes are being paced.
    pub fn pacing(&self, ledger: &Ledger, now: f64) -> bool {
        self.pace_until(ledger.logins_today(&self.settings.unique_user_id, now)).is_some()
    }

    /// When the next automatic attempt may start, `hold` permitting; `None` when none is
    /// planned (negative infinity: at once).
    fn due_at(&self, hold: Option<f64>) -> Option<f64> {
        if self.mode != Mode::Active || !self.settings.has_backend || self.attempt.is_some() {
            return None;
        }
        let base = match (self.retry_at, self.refresh_at, self.token.is_some()) {
            (Some(r), _, _) => r,
            (None, Some(r), true) => r,
            _ => f64::NEG_INFINITY,
        };
        Some([Some(base), self.not_before, hold].into_iter().flatten().fold(f64::NEG_INFINITY, f64::max))
    }

    /// The `RefreshAt` property: the next planned attempt, 0 when none.
    pub fn refresh_at_property(&self, ledger: &Ledger, now: f64) -> f64 {
        match self.due_at(self.hold(ledger, now)) {
            Some(t) if t.is_finite() => t.max(0.0),
            Some(_) => now,
            None => 0.0,
        }
    }

    /// The next moment the session must look at the clock: the expiry flip or the due
    /// attempt.
    pub fn next_wake(&self, ledger: &Ledger, now: f64) -> Option<f64> {
        let expiry = match (self.token.is_some(), self.expires_at, self.expired_announced) {
            (true, Some(e), false) => Some(e),
            _ => None,
        };
        [expiry, self.due_at(self.hold(ledger, now))].into_iter().flatten().reduce(f64::min)
    }

    /// Carries `input` through, returning what the loop must do, in order.
    pub fn step(&mut self, input: Input, cx: &mut Ctx<'_>) -> Vec<Effect> {
        let mut fx = Vec::new();
        match input {
            Input::Refresh(call) => self.client_attempt(Waiter::Expiry(call), cx, &mut fx),
            Input::EnsureValid(call, min) => match (&self.token, self.expires_at) {
                (Some(t), Some(e)) if e - cx.now >= f64::from(min) => {
                    fx.push(Effect::Reply(call, Reply::Token(t.clone(), e)));
                }
                _ => self.client_attempt(Waiter::Token(call), cx, &mut fx),
            },
            Input::LoginSigned(call, signed) => self.login_signed(call, signed, cx, &mut fx),
            Input::Cleanup(call) => {
                self.cancel("cancelled by Cleanup", cx, &mut fx);
                self.cleanup();
                info!("cleaned up: token dropped, refreshing stopped");
                fx.push(Effect::Save);
                fx.push(Effect::Reply(call, Reply::Done));
            }
            Input::Tick => self.tick(cx, &mut fx),
            Input::CredentialChecked(stamp) => {
                if self.waits_for_change() && stamp != self.credential_stamp {
                    info!("credential file changed: trying again");
                    self.unblock();
                }
                self.tick(cx, &mut fx);
            }
            Input::NetworkUp => {
                let kick_allowed = self
                    .last_network_kick
                    .is_none_or(|t| cx.now - t >= self.settings.params.backoff_initial || cx.now < t);
                if kick_allowed && self.retry_at.is_some_and(|r| r > cx.now) {
                    info!("network is back: retrying now");
                    self.retry_at = Some(cx.now);
                    self.last_network_kick = Some(cx.now);
                }
                self.tick(cx, &mut fx);
            }
            Input::Reconfigure(settings) => self.reconfigure(settings, cx, &mut fx),
            Input::AttemptDone(id, result) => self.attempt_done(id, result, cx, &mut fx),
            Input::Saved(id) => self.saved(id, cx, &mut fx),
            Input::Stop(why) => self.cancel(&why, cx, &mut fx),
        }
        fx
    }

    /// Time-driven work: the expiry flip and a due automatic attempt.
    fn tick(&mut self, cx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        if let (Some(_), Some(exp), false) = (&self.token, self.expires_at, self.expired_announced)
            && cx.now >= exp
        {
            self.expired_announced = true;
            warn!(event = "authorization_expired", expires_at = %fmt_time(exp), "authorization expired");
            fx.push(Effect::Signal(Signal::AuthorizationExpired));
        }
        let hold = self.hold(cx.ledger, cx.now);
        self.log_pacing(cx);
        if let Some(due) = self.due_at(hold)
            && cx.now >= due
        {
            self.start(AttemptKind::Backend, false, Vec::new(), cx, fx);
        }
    }

    fn log_pacing(&mut self, cx: &Ctx<'_>) {
        let pacing = self.pacing(cx.ledger, cx.now);
        if pacing && !self.pacing_logged {
            let per_day = self.settings.params.budget.per_day;
            let interval = policy::DAY / f64::from(per_day);
            warn!(
                interval_s = interval.round(),
                logins_per_day = per_day,
                "token lifetime too short for the daily login budget: pacing refreshes to one per {interval:.0} s"
            );
        }
        self.pacing_logged = pacing;
    }

    /// Whether a client may start an attempt now; the error says why not. Clients cannot
    /// spend the last `reserved_for_refresh` logins of the day: they keep the token valid.
    fn client_may_attempt(&self, cx: &Ctx<'_>, needs_backend: bool) -> Result<(), ApiError> {
        let (now, p) = (cx.now, &self.settings.params);
        if needs_backend && !self.settings.has_backend {
            return Err(error(
                ErrorName::NotConfigured,
                "no [backend] url is configured; log in with LoginWithSignedRequest",
            ));
        }
        if let Some(nb) = self.not_before.filter(|nb| *nb > now) {
            return Err(error(
                ErrorName::TooManyRequests,
                format!("rate limited upstream; retry after {}", in_secs(nb, now)),
            ));
        }
        let uid = &self.settings.unique_user_id;
        if let Some(free) = cx.ledger.free_at(uid, p.budget, now) {
            return Err(budget_error(free, now));
        }
        if p.reserved_for_refresh > 0 && cx.ledger.remaining_today(uid, p.budget, now) <= p.reserved_for_refresh {
            let free = reserve_frees_at(cx.ledger, uid, p, now);
            return Err(error(
                ErrorName::TooManyRequests,
                format!(
                    "only {} logins of today's budget of {} are left, and they are kept for automatic refreshes; \
                     clients may log in again at {}",
                    cx.ledger.remaining_today(uid, p.budget, now),
                    p.budget.per_day,
                    in_secs(free, now)
                ),
            ));
        }
        Ok(())
    }

    /// `Refresh` or `EnsureValid`: join the attempt under way, or start one.
    fn client_attempt(&mut self, waiter: Waiter, cx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        if let Some(a) = self.attempt.as_mut() {
            if a.waiters.len() >= MAX_WAITERS {
                fx.push(reply_err(waiter, too_many_waiters()));
            } else {
                a.waiters.push(waiter);
            }
            return;
        }
        match self.client_may_attempt(cx, true) {
            Ok(()) => self.start(AttemptKind::Backend, true, vec![waiter], cx, fx),
            Err(e) => fx.push(reply_err(waiter, e)),
        }
    }

    /// `LoginWithSignedRequest`: wait for the attempt under way (its success serves this
    /// caller too), or log in with the caller's request.
    fn login_signed(&mut self, call: CallId, signed: Secret, cx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        if self.attempt.is_some() {
            if self.signed_queue.len() >= MAX_SIGNED_QUEUE {
                fx.push(Effect::Reply(call, Reply::Err(too_many_waiters())));
            } else {
                self.signed_queue.push_back((call, signed));
            }
            return;
        }
        match self.client_may_attempt(cx, false) {
            Ok(()) => self.start(AttemptKind::Signed(signed), true, vec![Waiter::Expiry(call)], cx, fx),
            Err(e) => fx.push(Effect::Reply(call, Reply::Err(e))),
        }
    }

    /// Starts an attempt after reserving a login slot.
    fn start(&mut self, kind: AttemptKind, asked: bool, waiters: Vec<Waiter>, cx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        if let Err(free) = cx.ledger.reserve(&self.settings.unique_user_id, self.settings.params.budget, cx.now) {
            // Only reachable when a client's check passed and the budget is spent: say so.
            let e = budget_error(free, cx.now);
            fx.extend(waiters.into_iter().map(|w| reply_err(w, e.clone())));
            return;
        }
        self.next_attempt_id += 1;
        let id = self.next_attempt_id;
        self.last_attempt_at = Some(cx.now);
        let signed = matches!(kind, AttemptKind::Signed(_));
        tracing::debug!(event = "login_attempt", attempt = self.backoff_attempt + 1, asked, "login attempt");
        self.attempt = Some(Attempt { id, asked, signed, reserved_at: cx.now, waiters, saving: None });
        fx.push(Effect::SaveLedger);
        fx.push(Effect::Start(id, kind));
    }

    /// Cancels the attempt under way and the callers in line.
    fn cancel(&mut self, why: &str, cx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        if let Some(a) = self.attempt.take() {
            fx.push(Effect::Cancel(a.id));
            // The request may have reached Entrupy: the slot stays counted, as a login.
            cx.ledger.settle(&self.settings.unique_user_id, a.reserved_at, Some(a.reserved_at));
            let e = error(ErrorName::Cancelled, why);
            fx.extend(a.waiters.into_iter().map(|w| reply_err(w, e.clone())));
        }
        let e = error(ErrorName::Cancelled, why);
        fx.extend(self.signed_queue.drain(..).map(|(call, _)| Effect::Reply(call, Reply::Err(e.clone()))));
    }

    /// `Cleanup`: drop the token and stop refreshing.
    fn cleanup(&mut self) {
        self.mode = Mode::LoggedOut;
        self.cleaned_up = true;
        self.token = None;
        self.expires_at = None;
        self.refresh_at = None;
        self.retry_at = None;
        self.backoff_attempt = 0;
        self.expired_announced = false;
    }

    /// A change (credential file, config reload) lets a waiting session try again.
    fn unblock(&mut self) {
        if self.waits_for_change() {
            self.mode = Mode::Active;
            self.retry_at = None;
            self.backoff_attempt = 0;
        }
    }

    /// New settings: a new user drops the token; otherwise the session tries again and a
    /// shorter margin moves the refresh earlier.
    fn reconfigure(&mut self, settings: Settings, cx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        let uid_changed = settings.unique_user_id != self.settings.unique_user_id;
        let has_backend = settings.has_backend;
        self.settings = settings;
        if uid_changed {
            self.cancel("cancelled: the session's user changed", cx, fx);
            let (mode, cleaned_up) = (self.mode, self.cleaned_up);
            self.cleanup();
            self.cleaned_up = cleaned_up;
            self.mode = if mode == Mode::LoggedOut { Mode::LoggedOut } else { Mode::Active };
            self.username = Arc::from("");
        } else {
            self.unblock();
            if let (Some(exp), Some(rx)) = (self.expires_at, self.last_login_at) {
                let point = policy::refresh_point(exp, rx, self.settings.params.margin);
                self.refresh_at = Some(self.refresh_at.map_or(point, |r| r.min(point)));
            }
        }
        if has_backend && self.mode == Mode::LoggedOut && !self.cleaned_up {
            // Logged out only for want of a backend: one is configured now.
            self.mode = Mode::Active;
        }
        if !has_backend {
            if self.mode == Mode::Active && self.token.is_none() {
                self.mode = Mode::LoggedOut;
            }
            self.retry_at = None;
        }
        fx.push(Effect::Save);
        self.tick(cx, fx);
    }

    fn attempt_done(&mut self, id: u64, result: AttemptResult, cx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        let Some(reserved_at) =
            self.attempt.as_ref().filter(|a| a.id == id && a.saving.is_none()).map(|a| a.reserved_at)
        else {
            return; // cancelled meanwhile
        };
        let uid = self.settings.unique_user_id.clone();
        match result {
            AttemptResult::Ok(s) => {
                cx.ledger.settle(&uid, reserved_at, Some(s.received_at));
                let refresh_at = self.settings.has_backend.then(|| {
                    let p = &self.settings.params;
                    policy::refresh_at(s.expires_at, s.received_at, p.margin, p.jitter, cx.u)
                });
                let mut record = self.persisted();
                record.token = Some(s.token.clone());
                record.expires_at = Some(s.expires_at);
                record.last_login_at = Some(s.received_at);
                record.refresh_at = refresh_at;
                record.last_error = None;
                record.logged_out = false;
                if let Some(name) = &s.username {
                    record.username = name.clone();
                }
                if let Some(a) = self.attempt.as_mut() {
                    a.saving = Some((s, refresh_at));
                }
                fx.push(Effect::Commit(id, Box::new(record)));
            }
            AttemptResult::Err(f) => {
                cx.ledger.settle(&uid, reserved_at, None);
                fx.push(Effect::SaveLedger);
                self.failed(f, cx, fx);
            }
        }
    }

    /// The success of the attempt reached the disk: apply it, tell everyone.
    fn saved(&mut self, id: u64, cx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        let Some(a) = self.attempt.take_if(|a| a.id == id && a.saving.is_some()) else { return };
        let Some((s, refresh_at)) = a.saving else { return };
        self.mode = Mode::Active;
        self.cleaned_up = false;
        self.token = Some(s.token.clone());
        self.expires_at = Some(s.expires_at);
        self.last_login_at = Some(s.received_at);
        self.expired_announced = false;
        self.retry_at = None;
        self.backoff_attempt = 0;
        self.last_error = None;
        self.refresh_at = refresh_at;
        if let Some(name) = s.username {
            self.username = name.into();
        }
        info!(
            event = "login_succeeded",
            expires_at = %fmt_time(s.expires_at),
            refresh_at = %refresh_at.map(fmt_time).unwrap_or_else(|| "none".into()),
            "logged in"
        );
        fx.push(Effect::Signal(Signal::LoginSucceeded(s.expires_at)));
        for w in a.waiters {
            fx.push(match w {
                Waiter::Expiry(call) => Effect::Reply(call, Reply::Expiry(s.expires_at)),
                Waiter::Token(call) => Effect::Reply(call, Reply::Token(s.token.clone(), s.expires_at)),
            });
        }
        // Callers with a signed request of their own: served by this success.
        fx.extend(self.signed_queue.drain(..).map(|(call, _)| Effect::Reply(call, Reply::Expiry(s.expires_at))));
        self.tick(cx, fx);
    }

    fn failed(&mut self, f: AttemptFailure, cx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        let Some(a) = self.attempt.take() else { return };
        // A client's own signed request that Entrupy rejects says nothing about the backend
        // credential or the schedule.
        let affects_schedule = !(a.signed && a.asked) || matches!(f.outcome, Outcome::RateLimited(_));
        let newly_reauth = affects_schedule && self.apply_failure(f.outcome, a.asked, cx);
        self.last_error = Some(f.error.name);
        if f.stamp.is_some() {
            self.credential_stamp = f.stamp;
        }
        fx.push(Effect::Save);
        let next = self.due_at(self.hold(cx.ledger, cx.now)).map(|t| fmt_time(t.max(cx.now)));
        warn!(
            event = "login_failed",
            error_class = f.error.name.as_str(),
            error = %f.error.message,
            next_attempt = %next.unwrap_or_else(|| "none (waiting for a change or a client)".into()),
            "login failed"
        );
        fx.push(Effect::Signal(Signal::LoginFailed(f.code, f.description)));
        if newly_reauth {
            warn!(event = "reauthorization_required", "the backend rejected the credential: re-authorization required");
            fx.push(Effect::Signal(Signal::ReauthorizationRequired));
        }
        fx.extend(a.waiters.into_iter().map(|w| reply_err(w, f.error.clone())));
        // The next signed-request caller in line gets its turn.
        while let Some((call, signed)) = self.signed_queue.pop_front() {
            match self.client_may_attempt(cx, false) {
                Ok(()) => {
                    self.start(AttemptKind::Signed(signed), true, vec![Waiter::Expiry(call)], cx, fx);
                    return;
                }
                Err(e) => fx.push(Effect::Reply(call, Reply::Err(e))),
            }
        }
        self.tick(cx, fx);
    }

    /// Applies a failure to the schedule; true when the session newly entered
    /// `needs-reauthorization`.
    fn apply_failure(&mut self, outcome: Outcome, asked: bool, cx: &Ctx<'_>) -> bool {
        let retrying_or_unscheduled = self.retry_at.is_some() || self.refresh_at.is_none() || self.mode != Mode::Active;
        match outcome {
            Outcome::Transient | Outcome::RateLimited(_) | Outcome::NotSent => {
                if let Outcome::RateLimited(Some(secs)) = outcome {
                    self.not_before = Some(cx.now + secs);
                }
                self.mode = Mode::Active;
                // A failed attempt that a client asked for leaves the automatic schedule as
                // it was, unless the session was already retrying (or had no schedule).
                if !asked || retrying_or_unscheduled {
                    let p = &self.settings.params;
                    let delay = policy::backoff_delay(self.backoff_attempt, p.backoff_initial, p.backoff_max, cx.u);
                    self.backoff_attempt = self.backoff_attempt.saturating_add(1);
                    self.retry_at = Some(cx.now + delay);
                }
                false
            }
            Outcome::Reauthorize => {
                let newly = self.mode != Mode::NeedsReauth;
                self.mode = Mode::NeedsReauth;
                self.retry_at = None;
                self.backoff_attempt = 0;
                newly
            }
            Outcome::Permanent => {
                self.mode = Mode::Failed;
                self.retry_at = None;
                self.backoff_attempt = 0;
                false
            }
        }
    }
}

/// When the reserve of the daily budget stops holding clients back: when enough of today's
/// logins leave the 24-hour window.
fn reserve_frees_at(ledger: &Ledger, uid: &str, p: &Params, now: f64) -> f64 {
    let mut history = ledger.history(uid);
    history.retain(|t| *t > now - policy::DAY);
    history.sort_by(f64::total_cmp);
    let remaining = p.budget.per_day.saturating_sub(history.len() as u32);
    // One more than the reserve must be free; each login that leaves frees one.
    let needed = (p.reserved_for_refresh + 1).saturating_sub(remaining) as usize;
    history.get(needed.saturating_sub(1)).map_or(now, |t| t + policy::DAY)
}

fn budget_error(free: f64, now: f64) -> ApiError {
    error(ErrorName::TooManyRequests, format!("login budget spent; it frees at {}", in_secs(free, now)))
}

fn too_many_waiters() -> ApiError {
    error(ErrorName::TooManyRequests, "too many callers are waiting on this session; try again shortly")
}

fn reply_err(w: Waiter, e: ApiError) -> Effect {
    match w {
        Waiter::Expiry(call) | Waiter::Token(call) => Effect::Reply(call, Reply::Err(e)),
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
