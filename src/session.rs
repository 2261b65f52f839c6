//! One session: its state machine ([`Core`], pure) and the runtime around it ([`spawn`]).
//!
//! [`Core`] takes `now` and returns decisions: what the public `State` is, when the next
//! automatic attempt is due, what an outcome does to the schedule. It knows no tokio, no
//! network and no disk. Around it, one task at a time owns the session's state: D-Bus
//! calls, deadlines, the wall-clock sweep, reloads and HTTP results reach it as [`Command`]s
//! or as the end of its one attempt future, so there is exactly one login attempt at a time
//! and concurrent callers share its outcome. A resting session has no task at all: its state
//! is parked in its cell and its next deadline sits in the daemon's one [`Timers`] queue. It
//! publishes a [`Snapshot`] (read by the bus without waiting on the task) and sends each
//! change and [`SessionEvent`], in order, to the daemon's one publisher.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{Instrument, debug, info, warn};

use crate::clock::{Clock, fmt_time, until};
use crate::config::CredentialSource;
use crate::error::{ApiError, ErrorName};
use crate::http::{self, Clients, Failure, FailureKind, LoginOk, Peer};
use crate::policy::{self, Budget};
use crate::secret::Secret;
use crate::store::{SessionRecord, Store, StoredProfile};

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

/// Where the session's app-user credential comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// None: signing requests go without `Authorization`.
    None,
    /// A file (or systemd credential), read at every attempt.
    Source(CredentialSource),
    /// Given to `AddSession` and kept with the state.
    Inline(Secret),
}

/// Who the session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Session id.
    pub id: String,
    /// The user.
    pub unique_user_id: String,
    /// E-mail.
    pub email: String,
    /// Optional.
    pub first_name: Option<String>,
    /// Optional.
    pub last_name: Option<String>,
    /// The app-user credential.
    pub credential: Credential,
    /// True for sessions added over D-Bus (their profile lives in the state).
    pub from_dbus: bool,
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
    /// Pace automatic refreshes of short-lived tokens (`[rate_limit] pace`).
    pub pace: bool,
}

impl Params {
    /// From the config.
    pub fn from_config(c: &crate::config::Config) -> Self {
        Params {
            margin: c.refresh.margin.as_secs_f64(),
            jitter: c.refresh.jitter.as_secs_f64(),
            backoff_initial: c.refresh.backoff_initial.as_secs_f64(),
            backoff_max: c.refresh.backoff_max.as_secs_f64(),
            budget: Budget { per_minute: c.rate_limit.logins_per_minute, per_day: c.rate_limit.logins_per_day },
            pace: c.rate_limit.pace,
        }
    }
}

/// What drives the session's automatic behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Not trying (never logged in without a backend, or after `Cleanup`).
    LoggedOut,
    /// Keeping the token valid.
    Active,
    /// The backend rejected the credential; waiting for a change or a client.
    NeedsReauth,
    /// A permanent error; waiting for a change or a client.
    Failed,
}

/// The session's state and the pure decisions on it.
#[derive(Debug, Clone)]
pub struct Core {
    /// Policy settings.
    pub params: Params,
    /// Whether a backend URL is configured (else only `LoginWithSignedRequest` logs in).
    pub has_backend: bool,
    /// What drives automatic attempts.
    pub mode: Mode,
    /// The token, when one is held (kept after expiry so `ExpiresAt` stays).
    pub token: Option<Secret>,
    /// Exact expiry.
    pub expires_at: Option<f64>,
    /// When the last login answer arrived.
    pub last_login_at: Option<f64>,
    /// The planned proactive refresh of the current token.
    pub refresh_at: Option<f64>,
    /// The planned retry after a failure, when retrying.
    pub retry_at: Option<f64>,
    /// Failures in a row (the backoff exponent).
    pub backoff_attempt: u32,
    /// No request before this (a 429's `Retry-After`).
    pub not_before: Option<f64>,
    /// As returned by the backend.
    pub username: Arc<str>,
    /// Last failure's name.
    pub last_error: Option<ErrorName>,
    /// An attempt is under way.
    pub in_flight: bool,
    /// `AuthorizationExpired` was emitted for the current token.
    pub expired_announced: bool,
    /// When the last attempt started (pacing counts retries too).
    pub last_attempt_at: Option<f64>,
    /// A client called `Cleanup` and nobody logged in since: persisted, so the session stays
    /// logged out across restarts and reloads.
    pub cleaned_up: bool,
}

/// How a finished attempt went, as the core sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Logged in.
    Success {
        /// Exact expiry.
        expires_at: f64,
        /// When the answer arrived.
        received_at: f64,
    },
    /// Transient failure (network, 5xx, malformed, Entrupy 401 after the retry).
    Transient,
    /// A 429, with the seconds to wait when known.
    RateLimited(Option<f64>),
    /// The backend rejected the credential.
    Reauthorize,
    /// Permanent.
    Permanent,
}

impl Core {
    /// A fresh core.
    pub fn new(params: Params, has_backend: bool) -> Self {
        Core {
            params,
            has_backend,
            mode: if has_backend { Mode::Active } else { Mode::LoggedOut },
            token: None,
            expires_at: None,
            last_login_at: None,
            refresh_at: None,
            retry_at: None,
            backoff_attempt: 0,
            not_before: None,
            username: Arc::from(""),
            last_error: None,
            in_flight: false,
            expired_announced: false,
            last_attempt_at: None,
            cleaned_up: false,
        }
    }

    /// Restores from a stored record, at `now`. A stored token already past its refresh point
    /// (without jitter) is due at once; one before it keeps its stored plan.
    pub fn restore(params: Params, has_backend: bool, rec: &SessionRecord, now: f64) -> Self {
        let mut c = Core::new(params, has_backend);
        c.username = rec.username.as_str().into();
        c.last_error = rec.last_error.as_deref().and_then(ErrorName::parse);
        c.last_login_at = rec.last_login_at;
        if rec.logged_out {
            c.mode = Mode::LoggedOut;
            c.cleaned_up = true;
            return c;
        }
        if let (Some(tok), Some(exp)) = (&rec.token, rec.expires_at) {
            c.token = Some(tok.clone());
            c.expires_at = Some(exp);
            c.expired_announced = now >= exp;
            let received = rec.last_login_at.unwrap_or(exp).min(exp);
            let point = policy::refresh_point(exp, received, params.margin);
            c.refresh_at = Some(match rec.refresh_at {
                Some(r) if r.is_finite() && r <= point => r,
                _ => point,
            });
            c.mode = Mode::Active;
        }
        c
    }

    /// Whether the token is valid at `now`.
    pub fn valid(&self, now: f64) -> bool {
        policy::is_valid(self.token.is_some(), self.expires_at, now)
    }

    /// The public state at `now`.
    pub fn state(&self, now: f64) -> State {
        if self.in_flight {
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
    /// one per `24 h / logins_per_day` once half of the day's budget is used, so the budget
    /// lasts the day. Returns the earliest next automatic attempt, `None` when not pacing.
    /// The first half is spent at the natural pace, so short runs see the SPEC's schedule.
    pub fn pace_until(&self, used_today: u32) -> Option<f64> {
        if !self.params.pace {
            return None;
        }
        let per_day = f64::from(self.params.budget.per_day);
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

    /// When the next automatic attempt may start, the budget permitting (`budget_free_at`
    /// is when the budget frees or pacing allows, `None` when free now). `None` when none is
    /// planned.
    pub fn due_at(&self, budget_free_at: Option<f64>) -> Option<f64> {
        if self.mode != Mode::Active || !self.has_backend || self.in_flight {
            return None;
        }
        let base = match (self.retry_at, self.refresh_at, self.token.is_some()) {
            (Some(r), _, _) => r,
            (None, Some(r), true) => r,
            _ => f64::NEG_INFINITY,
        };
        let due = [Some(base), self.not_before, budget_free_at].into_iter().flatten().fold(f64::NEG_INFINITY, f64::max);
        Some(due)
    }

    /// The `RefreshAt` property: the next planned attempt, 0 when none.
    pub fn refresh_at_property(&self, budget_free_at: Option<f64>, now: f64) -> f64 {
        match self.due_at(budget_free_at) {
            Some(t) if t.is_finite() => t.max(0.0),
            Some(_) => now,
            None => 0.0,
        }
    }

    /// Whether a client may start an attempt now; the error says why not.
    pub fn client_may_attempt(
        &self,
        budget_free_at: Option<f64>,
        now: f64,
        needs_backend: bool,
    ) -> Result<(), ApiError> {
        if needs_backend && !self.has_backend {
            return Err(ApiError::new(
                ErrorName::NotConfigured,
                "no [backend] url is configured; log in with LoginWithSignedRequest",
            ));
        }
        if let Some(nb) = self.not_before.filter(|nb| *nb > now) {
            return Err(ApiError::new(
                ErrorName::TooManyRequests,
                format!("rate limited upstream; retry after {} (in {:.0} s)", fmt_time(nb), (nb - now).ceil()),
            ));
        }
        if let Some(free) = budget_free_at.filter(|f| *f > now) {
            return Err(ApiError::new(
                ErrorName::TooManyRequests,
                format!("login budget spent; it frees at {} (in {:.0} s)", fmt_time(free), (free - now).ceil()),
            ));
        }
        Ok(())
    }

    /// Applies a finished attempt. `asked` is true when a client asked for it; `u` is a
    /// uniform random number for jitter. Returns true when the session newly entered
    /// `needs-reauthorization`.
    pub fn apply(&mut self, outcome: &Outcome, asked: bool, now: f64, u: f64) -> bool {
        self.in_flight = false;
        let retrying_or_unscheduled = self.retry_at.is_some() || self.refresh_at.is_none() || self.mode != Mode::Active;
        match *outcome {
            Outcome::Success { expires_at, received_at } => {
                self.mode = Mode::Active;
                self.cleaned_up = false;
                self.expires_at = Some(expires_at);
                self.last_login_at = Some(received_at);
                self.expired_announced = false;
                self.retry_at = None;
                self.backoff_attempt = 0;
                self.last_error = None;
                self.refresh_at = if self.has_backend {
                    Some(policy::refresh_at(expires_at, received_at, self.params.margin, self.params.jitter, u))
                } else {
                    None
                };
                false
            }
            Outcome::Transient | Outcome::RateLimited(_) => {
                if let Outcome::RateLimited(Some(secs)) = *outcome {
                    self.not_before = Some(now + secs);
                }
                if self.mode != Mode::Active {
                    self.mode = Mode::Active;
                }
                // A failed attempt that a client asked for leaves the automatic schedule as
                // it was, unless the session was already retrying (or had no schedule).
                if !asked || retrying_or_unscheduled {
                    let delay = policy::backoff_delay(
                        self.backoff_attempt,
                        self.params.backoff_initial,
                        self.params.backoff_max,
                        u,
                    );
                    self.backoff_attempt = self.backoff_attempt.saturating_add(1);
                    self.retry_at = Some(now + delay);
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

    /// `Cleanup`: drop the token and stop refreshing.
    pub fn cleanup(&mut self) {
        self.mode = Mode::LoggedOut;
        self.cleaned_up = true;
        self.token = None;
        self.expires_at = None;
        self.refresh_at = None;
        self.retry_at = None;
        self.backoff_attempt = 0;
        self.in_flight = false;
        self.expired_announced = false;
    }

    /// A change (credential file, config reload) lets a waiting session try again.
    pub fn unblock(&mut self) {
        if matches!(self.mode, Mode::NeedsReauth | Mode::Failed) {
            self.mode = Mode::Active;
            self.retry_at = None;
            self.backoff_attempt = 0;
        }
    }

    /// The next moment the task must look at the session: the expiry flip or the due attempt.
    pub fn next_wake(&self, budget_free_at: Option<f64>) -> Option<f64> {
        let expiry = match (self.token.is_some(), self.expires_at, self.expired_announced) {
            (true, Some(e), false) => Some(e),
            _ => None,
        };
        [expiry, self.due_at(budget_free_at)].into_iter().flatten().reduce(f64::min)
    }
}

/// What the bus layer reads without waiting on the task.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Session id.
    pub id: Arc<str>,
    /// The user.
    pub unique_user_id: String,
    /// As returned by the backend.
    pub username: Arc<str>,
    /// Public state.
    pub state: State,
    /// The token, when held.
    pub token: Option<Secret>,
    /// Exact expiry.
    pub expires_at: Option<f64>,
    /// `RefreshAt` (Unix seconds, 0 when none).
    pub refresh_at: f64,
    /// `LastLoginAt`.
    pub last_login_at: Option<f64>,
    /// `LastError`.
    pub last_error: Option<ErrorName>,
    /// `Valid` when the snapshot was taken (it changes on time, so it is part of the
    /// snapshot to make the expiry flip a change).
    pub valid: bool,
    /// Logins of this user in the last 24 h (for `status`).
    pub logins_today: u32,
    /// Whether automatic refreshes are paced to make the daily budget last.
    pub pacing: bool,
    /// The daily budget (for `status`).
    pub logins_per_day: u32,
}

impl Snapshot {
    /// Valid at `now`: a token and `now < expires_at`.
    pub fn valid(&self, now: f64) -> bool {
        policy::is_valid(self.token.is_some(), self.expires_at, now)
    }

    /// `ExpiresAt`, rounded down, 0 when none.
    pub fn expires_at_secs(&self) -> u64 {
        self.expires_at.map(|e| e.max(0.0).floor() as u64).unwrap_or(0)
    }
}

/// Signals of a session.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// `LoginSucceeded(t expires_at)`.
    LoginSucceeded(f64),
    /// `LoginFailed(s error_code, s description)`.
    LoginFailed(String, String),
    /// `AuthorizationExpired()`.
    AuthorizationExpired,
    /// `ReauthorizationRequired()`.
    ReauthorizationRequired,
}

/// What sessions tell the bus layer, in order, through one channel shared by all of them
/// (one publisher for the whole daemon keeps a resting session cheap).
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A session's snapshot changed from the first to the second (the publisher keeps no
    /// copy per session).
    Changed(Box<(Snapshot, Snapshot)>),
    /// A session's signal.
    Event(Arc<str>, SessionEvent),
}

/// Settings a session runs with; replaced on reload.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Who.
    pub profile: Profile,
    /// Policy.
    pub params: Params,
    /// HTTP clients (with or without a backend), shared by the sessions.
    pub clients: Arc<Clients>,
}

/// What the daemon shares among sessions.
#[derive(Debug)]
pub struct Shared {
    /// The state on disk; `None` when the state directory could not be used (in memory only).
    pub store: Option<Store>,
    /// Login histories per user, the budget's memory.
    pub logins: Mutex<HashMap<String, Vec<f64>>>,
    /// Serializes writes of login history files.
    pub logins_write: Mutex<()>,
    /// The installation's device id.
    pub device_id: String,
    /// The wall clock.
    pub clock: Clock,
    /// Where snapshots changes and signals go (the bus publisher).
    pub updates: mpsc::UnboundedSender<Update>,
    /// Every resting session's next deadline (served by [`Timers::run`]).
    pub timers: Arc<Timers>,
}

impl Shared {
    fn budget_free_at(&self, uid: &str, budget: Budget, now: f64) -> Option<f64> {
        let logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        budget.free_at(logins.get(uid).map(Vec::as_slice).unwrap_or(&[]), now)
    }

    fn used_today(&self, uid: &str, now: f64) -> u32 {
        let logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        logins.get(uid).map(|l| Budget::used_today(l, now) as u32).unwrap_or(0)
    }

    /// Reserves a login slot at `now` when the budget allows; the entry counts as a login
    /// until [`Shared::settle`] replaces or removes it.
    fn reserve(&self, uid: &str, budget: Budget, now: f64) -> Result<(), f64> {
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        let entry = logins.entry(uid.to_owned()).or_default();
        Budget::prune(entry, now);
        if let Some(free) = budget.free_at(entry, now) {
            return Err(free);
        }
        entry.push(now);
        Ok(())
    }

    /// Ends a reservation: a success moves it to `success_at`, a failure drops it.
    fn settle(&self, uid: &str, reserved_at: f64, success_at: Option<f64>) {
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        let entry = logins.entry(uid.to_owned()).or_default();
        if let Some(pos) = entry.iter().position(|t| *t == reserved_at) {
            match success_at {
                Some(t) => entry[pos] = t,
                None => {
                    entry.remove(pos);
                }
            }
        } else if let Some(t) = success_at {
            entry.push(t);
        }
    }

    /// Writes a user's login history as it is in memory at the time of writing; writes are
    /// serialized so a slower, older write cannot land after a newer one.
    async fn persist_logins(self: &Arc<Self>, uid: &str) {
        let Some(store) = self.store.clone() else { return };
        let uid_owned = uid.to_owned();
        let shared = self.clone();
        let res = tokio::task::spawn_blocking(move || {
            let _serial = shared.logins_write.lock().unwrap_or_else(|e| e.into_inner());
            let logins =
                shared.logins.lock().unwrap_or_else(|e| e.into_inner()).get(&uid_owned).cloned().unwrap_or_default();
            store.save_logins(&uid_owned, &logins)
        })
        .await;
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(unique_user_id = uid, error = %e, "cannot save the login history"),
            Err(e) => tracing::error!(error = %e, "login history writer failed"),
        }
    }
}

/// A request to the session's task.
#[derive(Debug)]
pub enum Command {
    /// `Refresh()`.
    Refresh(oneshot::Sender<Result<f64, ApiError>>),
    /// `EnsureValid(u)`.
    EnsureValid(u32, oneshot::Sender<Result<(Secret, f64), ApiError>>),
    /// `LoginWithSignedRequest(s)`.
    LoginSigned(Secret, oneshot::Sender<Result<f64, ApiError>>),
    /// `Cleanup()`.
    Cleanup(oneshot::Sender<()>),
    /// Look at the wall clock again (sweep, resume, clock change).
    Wake,
    /// Connectivity is back: a session waiting out a backoff tries now.
    NetworkUp,
    /// New settings (reload).
    Reconfigure(Box<Settings>, oneshot::Sender<()>),
    /// Stop: cancel what is under way, flush the state, end the task. With `forget`, the
    /// session's state file is removed too (`RemoveSession`).
    Stop {
        /// Remove the state file.
        forget: bool,
        /// Answered when done.
        done: oneshot::Sender<()>,
    },
}

/// The bus layer's handle on a session.
///
/// A resting session has no task: its state ([`Task`]) is parked in the cell, and the
/// daemon's one timer queue ([`Timers`]) holds its next deadline. A command or a deadline
/// spawns a task that takes the state, works until nothing is left to do (an attempt under
/// way keeps it alive), re-arms the deadline and parks the state again. Exactly one task
/// owns the state at any time, so a session still does one thing at a time.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    cell: Arc<Cell>,
}

/// What a session keeps between tasks.
struct Cell {
    id: Arc<str>,
    shared: Arc<Shared>,
    /// What the bus reads without waiting on the task.
    snapshot: RwLock<Snapshot>,
    mailbox: Mutex<Mailbox>,
    /// Wakes the running task when a command arrives during an attempt.
    notify: Notify,
}

impl std::fmt::Debug for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cell").field("id", &self.id).finish_non_exhaustive()
    }
}

struct Mailbox {
    queue: VecDeque<Command>,
    /// The session's state while no task runs it (`None` while one does, or once stopped).
    parked: Option<Box<Task>>,
    /// Stopped: commands are refused.
    closed: bool,
    /// The session's entry in the timer queue.
    timer: Option<TimerKey>,
}

/// Most commands waiting for a session's task; more get `TooManyRequests` (waiters on an
/// attempt are capped separately by [`MAX_WAITERS`]).
const MAX_QUEUED_COMMANDS: usize = MAX_WAITERS + MAX_SIGNED_QUEUE;

/// A poisoned lock only means another thread panicked while holding it; the data (plain
/// values, each update complete) is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn gone() -> ApiError {
    ApiError::new(ErrorName::Cancelled, "the session was stopped")
}

impl Cell {
    /// Queues a command and makes sure a task will read it.
    fn send(self: &Arc<Self>, cmd: Command) -> Result<(), (Command, ApiError)> {
        let mut mb = lock(&self.mailbox);
        if mb.closed {
            return Err((cmd, gone()));
        }
        if mb.queue.len() >= MAX_QUEUED_COMMANDS {
            return Err((cmd, too_many_waiters()));
        }
        mb.queue.push_back(cmd);
        self.run_task(mb);
        Ok(())
    }

    /// A deadline passed: run the session's task (it looks at the clock).
    fn fire(self: &Arc<Self>, key: TimerKey) {
        let mut mb = lock(&self.mailbox);
        if mb.timer == Some(key) {
            mb.timer = None;
        }
        self.run_task(mb);
    }

    /// Spawns the session's task with the parked state, or wakes the task that holds it.
    fn run_task(self: &Arc<Self>, mut mb: MutexGuard<'_, Mailbox>) {
        let parked = mb.parked.take();
        drop(mb);
        match parked {
            Some(task) => spawn_task(self.clone(), task),
            None => self.notify.notify_one(),
        }
    }

    /// Refuses further commands and leaves the timer queue; returns what was parked and
    /// queued (dropping the queue tells those callers the session stopped).
    fn close(&self, mut mb: MutexGuard<'_, Mailbox>) -> (Option<Box<Task>>, VecDeque<Command>) {
        mb.closed = true;
        let parked = mb.parked.take();
        let queue = std::mem::take(&mut mb.queue);
        let timer = mb.timer.take();
        drop(mb);
        if let Some(key) = timer {
            self.shared.timers.cancel(key);
        }
        (parked, queue)
    }
}

/// When a task must look at the session again, on tokio's clock: `next_wake` (wall-clock
/// seconds) seen from `now`.
fn deadline(next_wake: Option<f64>, now: f64) -> Option<tokio::time::Instant> {
    next_wake.map(|w| tokio::time::Instant::now() + until(now, w))
}

fn spawn_task(cell: Arc<Cell>, task: Box<Task>) {
    let span = tracing::info_span!(
        "session",
        session = %task.settings.profile.id,
        unique_user_id = %task.settings.profile.unique_user_id
    );
    tokio::spawn(run(cell, task).instrument(span));
}

impl SessionHandle {
    /// Session id.
    pub fn id(&self) -> &str {
        &self.cell.id
    }

    /// The daemon's wall clock, now.
    pub fn now(&self) -> f64 {
        self.cell.shared.clock.now()
    }

    /// The installation's device id.
    pub fn device_id(&self) -> &str {
        &self.cell.shared.device_id
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Snapshot {
        read(&self.cell.snapshot).clone()
    }

    /// Runs `f` on the current snapshot without copying it.
    pub fn with_snapshot<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        f(&read(&self.cell.snapshot))
    }

    /// `IsAuthorizationValid()`, from the wall clock and the snapshot.
    pub fn is_valid(&self) -> bool {
        read(&self.cell.snapshot).valid(self.cell.shared.clock.now())
    }

    /// `GetToken()`.
    pub fn get_token(&self) -> Result<(Secret, f64), ApiError> {
        let snap = read(&self.cell.snapshot);
        match (&snap.token, snap.expires_at) {
            (Some(t), Some(e)) if self.cell.shared.clock.now() < e => Ok((t.clone(), e)),
            _ => Err(ApiError::new(ErrorName::NotAuthorized, "no valid token")),
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.cell.send(make(tx)).map_err(|(_, e)| e)?;
        rx.await.map_err(|_| gone())
    }

    /// `EnsureValid(min_seconds)`: answered from the snapshot when it suffices.
    pub async fn ensure_valid(&self, min_seconds: u32) -> Result<(Secret, f64), ApiError> {
        if let Ok((t, e)) = self.get_token()
            && e - self.cell.shared.clock.now() >= f64::from(min_seconds)
        {
            return Ok((t, e));
        }
        self.ask(|tx| Command::EnsureValid(min_seconds, tx)).await?
    }

    /// `Refresh()`.
    pub async fn refresh(&self) -> Result<f64, ApiError> {
        self.ask(Command::Refresh).await?
    }

    /// `LoginWithSignedRequest(signed)`.
    pub async fn login_with_signed(&self, signed: Secret) -> Result<f64, ApiError> {
        self.ask(|tx| Command::LoginSigned(signed, tx)).await?
    }

    /// `Cleanup()`.
    pub async fn cleanup(&self) -> Result<(), ApiError> {
        self.ask(Command::Cleanup).await
    }

    /// Whether the sweep at `now` must wake this session: a deadline (expiry, planned
    /// attempt) passed without the session noticing, or it waits for a credential change.
    pub fn needs_sweep(&self, now: f64) -> bool {
        let s = read(&self.cell.snapshot);
        let expiry_missed = s.valid && s.expires_at.is_some_and(|e| now >= e);
        let attempt_missed = s.refresh_at > 0.0 && now >= s.refresh_at && s.state != State::Refreshing;
        expiry_missed || attempt_missed || matches!(s.state, State::NeedsReauthorization | State::Failed)
    }

    /// Asks the session to look at the wall clock again; never waits.
    pub fn wake(&self) {
        let _ = self.cell.send(Command::Wake);
    }

    /// Tells the session the network is back; never waits.
    pub fn network_up(&self) {
        let _ = self.cell.send(Command::NetworkUp);
    }

    /// Applies new settings.
    pub async fn reconfigure(&self, settings: Settings) {
        let _ = self.ask(|tx| Command::Reconfigure(Box::new(settings), tx)).await;
    }

    /// Stops the session after flushing its state; with `forget`, removes the state too. A
    /// resting session whose state is saved stops at once, without a task.
    pub async fn stop(&self, forget: bool) {
        {
            let mb = lock(&self.cell.mailbox);
            if mb.closed {
                return;
            }
            if !forget && mb.queue.is_empty() && mb.parked.as_ref().is_some_and(|t| !t.unsaved) {
                self.cell.close(mb);
                return;
            }
        }
        let _ = self.ask(|done| Command::Stop { forget, done }).await;
    }
}

/// The daemon's one timer queue: every resting session's next deadline (expiry flip or
/// automatic attempt), served by one task ([`Timers::run`]) that spawns a session's task
/// when its deadline comes. 10,000 resting sessions cost 10,000 entries, not 10,000 timers.
#[derive(Debug, Default)]
pub struct Timers {
    queue: Mutex<TimerQueue>,
    /// The earliest deadline moved earlier.
    notify: Notify,
}

#[derive(Debug, Default)]
struct TimerQueue {
    entries: BTreeMap<TimerKey, Weak<Cell>>,
    seq: u64,
}

/// A deadline and a sequence number that makes it unique.
type TimerKey = (tokio::time::Instant, u64);

impl Timers {
    /// Moves a session's deadline (`slot` is its current entry) to `at`, or removes it.
    fn set(&self, cell: &Arc<Cell>, slot: &mut Option<TimerKey>, at: Option<tokio::time::Instant>) {
        let mut q = lock(&self.queue);
        if let Some(old) = slot.take() {
            q.entries.remove(&old);
        }
        let Some(at) = at else { return };
        q.seq += 1;
        let key = (at, q.seq);
        let earlier = q.entries.first_key_value().is_none_or(|(first, _)| key < *first);
        q.entries.insert(key, Arc::downgrade(cell));
        *slot = Some(key);
        drop(q);
        if earlier {
            self.notify.notify_one();
        }
    }

    fn cancel(&self, key: TimerKey) {
        lock(&self.queue).entries.remove(&key);
    }

    /// Serves the queue; runs for the life of the daemon.
    pub async fn run(self: Arc<Self>) {
        loop {
            let next = lock(&self.queue).entries.first_key_value().map(|(k, _)| k.0);
            let notified = self.notify.notified();
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = notified => continue,
                    }
                }
                None => {
                    notified.await;
                    continue;
                }
            }
            let now = tokio::time::Instant::now();
            let due: Vec<(TimerKey, Weak<Cell>)> = {
                let mut q = lock(&self.queue);
                let later = q.entries.split_off(&(now, u64::MAX));
                std::mem::replace(&mut q.entries, later).into_iter().collect()
            };
            for (key, cell) in due {
                if let Some(cell) = cell.upgrade() {
                    cell.fire(key);
                }
            }
        }
    }
}
/// A caller waiting for the attempt under way.
#[derive(Debug)]
enum Waiter {
    Refresh(oneshot::Sender<Result<f64, ApiError>>),
    Ensure(oneshot::Sender<Result<(Secret, f64), ApiError>>),
    Signed(oneshot::Sender<Result<f64, ApiError>>),
}

#[derive(Debug)]
enum AttemptKind {
    Backend,
    Signed(Secret),
}

#[derive(Debug)]
struct Success {
    login: LoginOk,
    username: Option<String>,
    received_at: f64,
}

#[derive(Debug)]
enum AttemptError {
    Http(Failure),
    NotConfigured,
    Credential(String),
}

type AttemptFuture = Pin<Box<dyn Future<Output = Result<Success, AttemptError>> + Send>>;

struct Attempt {
    fut: AttemptFuture,
    asked: bool,
    reserved_at: f64,
    waiters: Vec<Waiter>,
}

/// The task's state.
struct Task {
    /// Session id (shared with the cell and the snapshot).
    id: Arc<str>,
    settings: Settings,
    core: Core,
    shared: Arc<Shared>,
    attempt: Option<Box<Attempt>>,
    /// `LoginWithSignedRequest` callers waiting for their turn.
    signed_queue: VecDeque<(Secret, oneshot::Sender<Result<f64, ApiError>>)>,
    /// Where the snapshot is published (the cell owns the task while it rests, hence weak).
    cell: Weak<Cell>,
    /// Modification stamp of the credential file at the last rejection.
    credential_stamp: Option<(i64, i64, u64, u64)>,
    /// Pacing was announced in the log (once per episode).
    pacing_logged: bool,
    /// The last save failed (full disk, read-only directory): retried at the next change
    /// and at shutdown.
    unsaved: bool,
}

fn file_stamp(src: &CredentialSource) -> Option<(i64, i64, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(src.path().ok()?).ok()?;
    Some((m.mtime(), m.mtime_nsec(), m.len(), m.ino()))
}

/// Starts a session. `record` is what the store kept of it, if anything. No task runs
/// until a command or the session's first deadline.
pub fn spawn(settings: Settings, record: Option<SessionRecord>, shared: Arc<Shared>) -> SessionHandle {
    let now = shared.clock.now();
    let has_backend = settings.clients.has_backend();
    let mut core = match &record {
        Some(rec) if rec.unique_user_id == settings.profile.unique_user_id || rec.unique_user_id.is_empty() => {
            Core::restore(settings.params, has_backend, rec, now)
        }
        // The stored token belongs to another user: start afresh.
        _ => Core::new(settings.params, has_backend),
    };
    if core.mode == Mode::Active && !has_backend && core.token.is_none() {
        core.mode = Mode::LoggedOut;
    }
    if core.token.is_some() || core.mode == Mode::Active {
        debug!(
            session = %settings.profile.id,
            state = core.state(now).as_str(),
            expires_at = %core.expires_at.map(fmt_time).unwrap_or_else(|| "none".into()),
            "session loaded"
        );
    }
    let id: Arc<str> = settings.profile.id.as_str().into();
    let snap = build_snapshot(&id, &settings, &core, &shared, now);
    let (hold, _) = hold(&core, &shared, &settings.profile.unique_user_id, now);
    let wake = deadline(core.next_wake(hold), now);
    let cell = Arc::new(Cell {
        id: id.clone(),
        shared: shared.clone(),
        snapshot: RwLock::new(snap),
        mailbox: Mutex::new(Mailbox { queue: VecDeque::new(), parked: None, closed: false, timer: None }),
        notify: Notify::new(),
    });
    let task = Box::new(Task {
        id,
        settings,
        core,
        shared,
        cell: Arc::downgrade(&cell),
        attempt: None,
        signed_queue: VecDeque::new(),
        credential_stamp: None,
        pacing_logged: false,
        unsaved: false,
    });
    {
        let mut mb = lock(&cell.mailbox);
        cell.shared.timers.set(&cell, &mut mb.timer, wake);
        mb.parked = Some(task);
    }
    SessionHandle { cell }
}

/// A session's task: answers the queued commands, runs the time-driven work and the attempt
/// under way, and parks the state again when nothing is left to do.
async fn run(cell: Arc<Cell>, mut task: Box<Task>) {
    loop {
        let cmd = lock(&cell.mailbox).queue.pop_front();
        if let Some(cmd) = cmd {
            match cmd {
                Command::Stop { forget, done } => {
                    Box::pin(task.stop(forget)).await;
                    // Callers still in line learn that the session stopped.
                    drop(cell.close(lock(&cell.mailbox)));
                    let _ = done.send(());
                    return;
                }
                cmd => Box::pin(task.handle(cmd)).await,
            }
            // A long queue (thousands of callers at once) must not keep the bus waiting.
            tokio::task::consume_budget().await;
            continue;
        }
        let now = task.now();
        task.tick(now);
        task.publish(now);
        if let Some(attempt) = task.attempt.as_mut() {
            let notified = cell.notify.notified();
            tokio::select! {
                result = &mut attempt.fut => Box::pin(task.finish(result)).await,
                _ = notified => {}
            }
            continue;
        }
        let hold = task.hold(now);
        let wake = deadline(task.core.next_wake(hold), now);
        let mut mb = lock(&cell.mailbox);
        if !mb.queue.is_empty() {
            continue;
        }
        // A burst of callers leaves a large buffer behind; a resting session keeps none.
        if mb.queue.capacity() > 0 {
            mb.queue = VecDeque::new();
        }
        cell.shared.timers.set(&cell, &mut mb.timer, wake);
        mb.parked = Some(task);
        return;
    }
}
/// When the next automatic attempt is held back to: the budget, or pacing.
fn hold(core: &Core, shared: &Shared, uid: &str, now: f64) -> (Option<f64>, bool) {
    let free = shared.budget_free_at(uid, core.params.budget, now);
    let pace = core.pace_until(shared.used_today(uid, now));
    let hold = [free, pace].into_iter().flatten().reduce(f64::max);
    (hold, pace.is_some())
}

fn build_snapshot(id: &Arc<str>, settings: &Settings, core: &Core, shared: &Shared, now: f64) -> Snapshot {
    let uid = &settings.profile.unique_user_id;
    let (free, pacing) = hold(core, shared, uid, now);
    Snapshot {
        id: id.clone(),
        unique_user_id: uid.clone(),
        username: core.username.clone(),
        state: core.state(now),
        token: core.token.clone(),
        expires_at: core.expires_at,
        refresh_at: core.refresh_at_property(free, now),
        last_login_at: core.last_login_at,
        last_error: core.last_error,
        valid: core.valid(now),
        logins_today: shared.used_today(uid, now),
        pacing,
        logins_per_day: core.params.budget.per_day,
    }
}

impl Task {
    fn now(&self) -> f64 {
        self.shared.clock.now()
    }

    fn budget_free_at(&self, now: f64) -> Option<f64> {
        self.shared.budget_free_at(&self.settings.profile.unique_user_id, self.core.params.budget, now)
    }

    /// What holds automatic attempts back: the budget and pacing (clients are not paced).
    fn hold(&mut self, now: f64) -> Option<f64> {
        let (h, pacing) = hold(&self.core, &self.shared, &self.settings.profile.unique_user_id, now);
        if pacing && !self.pacing_logged {
            let interval = policy::DAY / f64::from(self.core.params.budget.per_day);
            warn!(
                interval_s = interval.round(),
                logins_per_day = self.core.params.budget.per_day,
                "token lifetime too short for the daily login budget: pacing refreshes to one per {:.0} s",
                interval
            );
        }
        self.pacing_logged = pacing;
        h
    }

    /// Time-driven work: the expiry flip and a due automatic attempt.
    fn tick(&mut self, now: f64) {
        if let (Some(_), Some(exp), false) = (&self.core.token, self.core.expires_at, self.core.expired_announced)
            && now >= exp
        {
            self.core.expired_announced = true;
            warn!(event = "authorization_expired", expires_at = %fmt_time(exp), "authorization expired");
            self.emit(now, SessionEvent::AuthorizationExpired);
        }
        let hold = self.hold(now);
        if self.attempt.is_none()
            && let Some(due) = self.core.due_at(hold)
            && now >= due
        {
            self.start(AttemptKind::Backend, false, now, Vec::new());
        }
    }

    /// Publishes the snapshot first, so a client reacting to the signal reads the new state.
    fn emit(&self, now: f64, ev: SessionEvent) {
        self.publish(now);
        let _ = self.shared.updates.send(Update::Event(self.id.clone(), ev));
    }

    fn publish(&self, now: f64) {
        let Some(cell) = self.cell.upgrade() else { return };
        let snap = build_snapshot(&self.id, &self.settings, &self.core, &self.shared, now);
        let changed = {
            let mut current = write(&cell.snapshot);
            (*current != snap).then(|| {
                let old = std::mem::replace(&mut *current, snap.clone());
                Box::new((old, snap))
            })
        };
        if let Some(c) = changed {
            let _ = self.shared.updates.send(Update::Changed(c));
        }
    }

    /// Starts an attempt, reserving a login slot first. Returns the waiters back when the
    /// budget does not allow one (the caller decides what they get).
    fn start(&mut self, kind: AttemptKind, asked: bool, now: f64, waiters: Vec<Waiter>) {
        let uid = self.settings.profile.unique_user_id.clone();
        match self.shared.reserve(&uid, self.core.params.budget, now) {
            Ok(()) => {}
            Err(free) => {
                // Only reachable when the budget changed between the check and here.
                let e = budget_error(free, now);
                for w in waiters {
                    answer_err(w, e.clone());
                }
                return;
            }
        };
        self.core.in_flight = true;
        self.core.last_attempt_at = Some(now);
        let ctx = AttemptCtx {
            clients: self.settings.clients.clone(),
            profile: self.settings.profile.clone(),
            shared: self.shared.clone(),
        };
        debug!(event = "login_attempt", attempt = self.core.backoff_attempt + 1, asked, "login attempt");
        self.attempt =
            Some(Box::new(Attempt { fut: Box::pin(run_attempt(kind, ctx)), asked, reserved_at: now, waiters }));
    }

    async fn handle(&mut self, cmd: Command) {
        let now = self.now();
        match cmd {
            Command::Refresh(tx) => self.client_attempt(Waiter::Refresh(tx), now),
            Command::EnsureValid(min, tx) => {
                if let (Some(t), Some(e)) = (&self.core.token, self.core.expires_at)
                    && e - now >= f64::from(min)
                {
                    let _ = tx.send(Ok((t.clone(), e)));
                    return;
                }
                self.client_attempt(Waiter::Ensure(tx), now);
            }
            Command::LoginSigned(signed, tx) => {
                if self.attempt.is_some() {
                    // Wait for the attempt under way; its success serves this caller too.
                    if self.signed_queue.len() >= MAX_SIGNED_QUEUE {
                        let _ = tx.send(Err(too_many_waiters()));
                        return;
                    }
                    self.signed_queue.push_back((signed, tx));
                    return;
                }
                if let Err(e) = self.core.client_may_attempt(self.budget_free_at(now), now, false) {
                    let _ = tx.send(Err(e));
                    return;
                }
                self.start(AttemptKind::Signed(signed), true, now, vec![Waiter::Signed(tx)]);
            }
            Command::Cleanup(tx) => {
                self.cancel_attempt("cancelled by Cleanup");
                self.core.cleanup();
                info!("cleaned up: token dropped, refreshing stopped");
                self.persist().await;
                let _ = tx.send(());
            }
            Command::Wake => {
                self.check_credential_change();
            }
            Command::NetworkUp => {
                if self.core.retry_at.is_some_and(|r| r > now) {
                    info!("network is back: retrying now");
                    self.core.retry_at = Some(now);
                }
            }
            Command::Reconfigure(settings, done) => {
                self.reconfigure(*settings, now).await;
                let _ = done.send(());
            }
            Command::Stop { .. } => {}
        }
    }

    /// `Refresh` or `EnsureValid`: join the attempt under way, or start one.
    fn client_attempt(&mut self, waiter: Waiter, now: f64) {
        if let Some(a) = self.attempt.as_mut() {
            if a.waiters.len() >= MAX_WAITERS {
                answer_err(waiter, too_many_waiters());
                return;
            }
            a.waiters.push(waiter);
            return;
        }
        if let Err(e) = self.core.client_may_attempt(self.budget_free_at(now), now, true) {
            answer_err(waiter, e);
            return;
        }
        self.start(AttemptKind::Backend, true, now, vec![waiter]);
    }

    fn check_credential_change(&mut self) {
        if !matches!(self.core.mode, Mode::NeedsReauth | Mode::Failed) {
            return;
        }
        if let Credential::Source(src) = &self.settings.profile.credential {
            let stamp = file_stamp(src);
            if stamp != self.credential_stamp {
                info!(credential = %src.describe(), "credential file changed: trying again");
                self.core.unblock();
            }
        }
    }

    async fn reconfigure(&mut self, settings: Settings, now: f64) {
        let uid_changed = settings.profile.unique_user_id != self.settings.profile.unique_user_id;
        let has_backend = settings.clients.has_backend();
        self.settings = settings;
        self.core.params = self.settings.params;
        self.core.has_backend = has_backend;
        if uid_changed {
            self.cancel_attempt("cancelled: the session's user changed");
            let (mode, cleaned_up) = (self.core.mode, self.core.cleaned_up);
            self.core.cleanup();
            self.core.cleaned_up = cleaned_up;
            self.core.mode = if mode == Mode::LoggedOut || !has_backend { Mode::LoggedOut } else { Mode::Active };
            self.core.username = Arc::from("");
        } else {
            self.core.unblock();
            if let (Some(exp), Some(rx)) = (self.core.expires_at, self.core.last_login_at) {
                let point = policy::refresh_point(exp, rx, self.core.params.margin);
                self.core.refresh_at = Some(self.core.refresh_at.map_or(point, |r| r.min(point)));
            }
        }
        if has_backend && self.core.mode == Mode::LoggedOut && !self.core.cleaned_up {
            // Logged out only for want of a backend: one is configured now.
            self.core.mode = Mode::Active;
        }
        if !has_backend && self.core.mode == Mode::Active && !self.core.valid(now) {
            self.core.retry_at = None;
        }
        self.persist().await;
    }

    fn cancel_attempt(&mut self, why: &str) {
        if let Some(a) = self.attempt.take() {
            self.core.in_flight = false;
            // The request may have reached Entrupy: the reserved slot stays counted.
            for w in a.waiters {
                answer_err(w, ApiError::new(ErrorName::Cancelled, why));
            }
        }
        for (_, tx) in self.signed_queue.drain(..) {
            let _ = tx.send(Err(ApiError::new(ErrorName::Cancelled, why)));
        }
    }

    async fn stop(&mut self, forget: bool) {
        self.cancel_attempt("cancelled: the daemon is shutting down");
        if forget {
            if let Some(store) = self.shared.store.clone() {
                let id = self.settings.profile.id.clone();
                match tokio::task::spawn_blocking(move || store.remove_session(&id)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot remove the session's state"),
                    Err(e) => tracing::error!(error = %e, "state writer failed"),
                }
            }
        } else if self.unsaved {
            // Every change is saved when it happens; only a failed save is retried here, so
            // a daemon with 10,000 sessions stops without 10,000 writes.
            self.persist().await;
        }
    }

    async fn finish(&mut self, result: Result<Success, AttemptError>) {
        let Some(attempt) = self.attempt.take() else { return };
        let now = self.now();
        let u: f64 = rand::random();
        let uid = self.settings.profile.unique_user_id.clone();
        match result {
            Ok(s) => {
                self.shared.settle(&uid, attempt.reserved_at, Some(s.received_at));
                self.core.token = Some(s.login.token.clone());
                if let Some(name) = s.username.clone() {
                    self.core.username = name.into();
                }
                self.core.apply(
                    &Outcome::Success { expires_at: s.login.expires_at, received_at: s.received_at },
                    attempt.asked,
                    now,
                    u,
                );
                // Durable before anyone is given the token: a kill -9 now loses nothing.
                self.shared.persist_logins(&uid).await;
                self.persist().await;
                info!(
                    event = "login_succeeded",
                    expires_at = %fmt_time(s.login.expires_at),
                    refresh_at = %self.core.refresh_at.map(fmt_time).unwrap_or_else(|| "none".into()),
                    "logged in"
                );
                self.emit(now, SessionEvent::LoginSucceeded(s.login.expires_at));
                let exp = s.login.expires_at;
                for w in attempt.waiters {
                    match w {
                        Waiter::Refresh(tx) | Waiter::Signed(tx) => {
                            let _ = tx.send(Ok(exp));
                        }
                        Waiter::Ensure(tx) => {
                            let _ = tx.send(Ok((s.login.token.clone(), exp)));
                        }
                    }
                }
                for (_, tx) in self.signed_queue.drain(..) {
                    let _ = tx.send(Ok(exp));
                }
            }
            Err(err) => {
                self.shared.settle(&uid, attempt.reserved_at, None);
                self.shared.persist_logins(&uid).await;
                let (outcome, api, code, description) = self.classify(&err);
                let signed_attempt = attempt.waiters.iter().any(|w| matches!(w, Waiter::Signed(_)));
                // A client's own signed request that Entrupy rejects says nothing about the
                // backend credential or the schedule.
                let outcome = if signed_attempt && attempt.asked && !matches!(outcome, Outcome::RateLimited(_)) {
                    None
                } else {
                    Some(outcome)
                };
                let newly_reauth = match &outcome {
                    Some(o) => self.core.apply(o, attempt.asked, now, u),
                    None => {
                        self.core.in_flight = false;
                        false
                    }
                };
                self.core.last_error = Some(api.name);
                if let Credential::Source(src) = &self.settings.profile.credential {
                    self.credential_stamp = file_stamp(src);
                }
                self.persist().await;
                let hold = self.hold(now);
                let next = self.core.due_at(hold).map(|t| fmt_time(t.max(now)));
                warn!(
                    event = "login_failed",
                    error_class = api.name.as_str(),
                    error = %api.message,
                    next_attempt = %next.unwrap_or_else(|| "none (waiting for a change or a client)".into()),
                    "login failed"
                );
                self.emit(now, SessionEvent::LoginFailed(code, description));
                if newly_reauth {
                    warn!(
                        event = "reauthorization_required",
                        "the backend rejected the credential: re-authorization required"
                    );
                    self.emit(now, SessionEvent::ReauthorizationRequired);
                }
                for w in attempt.waiters {
                    answer_err(w, api.clone());
                }
                // The next signed-request caller in line gets its turn.
                if let Some((signed, tx)) = self.signed_queue.pop_front() {
                    let now = self.now();
                    match self.core.client_may_attempt(self.budget_free_at(now), now, false) {
                        Ok(()) => self.start(AttemptKind::Signed(signed), true, now, vec![Waiter::Signed(tx)]),
                        Err(e) => {
                            let _ = tx.send(Err(e.clone()));
                            for (_, tx) in self.signed_queue.drain(..) {
                                let _ = tx.send(Err(e.clone()));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Maps an attempt's error to the core's outcome, the API error, and `LoginFailed`'s
    /// code and description.
    fn classify(&self, err: &AttemptError) -> (Outcome, ApiError, String, String) {
        match err {
            AttemptError::NotConfigured => {
                let e = ApiError::new(ErrorName::NotConfigured, "no [backend] url is configured");
                (Outcome::Permanent, e.clone(), e.name.as_str().to_owned(), e.message)
            }
            AttemptError::Credential(msg) => {
                let e = ApiError::new(ErrorName::Unauthorized, msg.clone());
                (Outcome::Reauthorize, e.clone(), e.name.as_str().to_owned(), e.message)
            }
            AttemptError::Http(f) => {
                let outcome = match (&f.kind, f.peer) {
                    (FailureKind::RateLimited { retry_after }, _) => Outcome::RateLimited(*retry_after),
                    (FailureKind::Unauthorized, Peer::Backend) => Outcome::Reauthorize,
                    (FailureKind::Unauthorized, Peer::Entrupy) => Outcome::Transient,
                    (FailureKind::Permanent, _) => Outcome::Permanent,
                    _ => Outcome::Transient,
                };
                let name = f.error_name();
                let api = ApiError::new(name, f.to_string());
                let code = f.error_code.clone().unwrap_or_else(|| name.as_str().to_owned());
                (outcome, api, code, f.description.clone())
            }
        }
    }

    async fn persist(&mut self) {
        let Some(store) = self.shared.store.clone() else { return };
        let p = &self.settings.profile;
        let rec = SessionRecord {
            version: crate::store::FORMAT_VERSION,
            id: p.id.clone(),
            profile: p.from_dbus.then(|| StoredProfile {
                unique_user_id: p.unique_user_id.clone(),
                email: p.email.clone(),
                first_name: p.first_name.clone(),
                last_name: p.last_name.clone(),
                backend_token: match &p.credential {
                    Credential::Inline(s) => Some(s.clone()),
                    _ => None,
                },
            }),
            unique_user_id: p.unique_user_id.clone(),
            username: self.core.username.to_string(),
            token: self.core.token.clone(),
            expires_at: self.core.expires_at,
            last_login_at: self.core.last_login_at,
            refresh_at: self.core.refresh_at,
            last_error: self.core.last_error.map(|e| e.as_str().to_owned()),
            logged_out: self.core.cleaned_up,
        };
        let saved = match tokio::task::spawn_blocking(move || store.save_session(&rec)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot save the session's state; it is kept in memory");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "state writer failed");
                false
            }
        };
        self.unsaved = !saved;
    }
}

/// Most callers that may wait on one session's attempt; more get `TooManyRequests`.
pub const MAX_WAITERS: usize = 16_384;
/// Most `LoginWithSignedRequest` callers waiting their turn on one session.
pub const MAX_SIGNED_QUEUE: usize = 256;

fn too_many_waiters() -> ApiError {
    ApiError::new(ErrorName::TooManyRequests, "too many callers are waiting on this session; try again shortly")
}

fn budget_error(free: f64, now: f64) -> ApiError {
    ApiError::new(
        ErrorName::TooManyRequests,
        format!("login budget spent; it frees at {} (in {:.0} s)", fmt_time(free), (free - now).ceil()),
    )
}

fn answer_err(w: Waiter, e: ApiError) {
    match w {
        Waiter::Refresh(tx) | Waiter::Signed(tx) => {
            let _ = tx.send(Err(e));
        }
        Waiter::Ensure(tx) => {
            let _ = tx.send(Err(e));
        }
    }
}

struct AttemptCtx {
    clients: Arc<Clients>,
    profile: Profile,
    /// The device id, the clock and the login budget.
    shared: Arc<Shared>,
}

/// One login attempt: persist the reservation, then sign and log in (for the daemon's own
/// refreshes, an Entrupy 401 gets one more fresh signed request at once).
async fn run_attempt(kind: AttemptKind, ctx: AttemptCtx) -> Result<Success, AttemptError> {
    let p = &ctx.profile;
    // The budget reservation is on disk before the login request leaves, so a crash cannot
    // lose a login. Signing costs no login, so the write overlaps the signing request.
    let mut reservation = Some(Box::pin(ctx.shared.persist_logins(&p.unique_user_id)));
    match kind {
        AttemptKind::Signed(signed) => {
            if let Some(r) = reservation.take() {
                r.await;
            }
            let login = ctx.clients.login(&signed, ctx.shared.clock.now()).await.map_err(AttemptError::Http)?;
            let received_at = ctx.shared.clock.now();
            let username = login.username.clone();
            Ok(Success { login, username, received_at })
        }
        AttemptKind::Backend => {
            if !ctx.clients.has_backend() {
                return Err(AttemptError::NotConfigured);
            }
            let credential = match &p.credential {
                Credential::None => None,
                Credential::Inline(s) => Some(s.clone()),
                Credential::Source(src) => Some(read_credential(src).map_err(AttemptError::Credential)?),
            };
            let mut tries = 0;
            loop {
                tries += 1;
                let auth = crate::authreq::generate(ctx.shared.clock.now(), &ctx.shared.device_id);
                let req = http::SignRequest {
                    authorization_request: &auth,
                    unique_user_id: &p.unique_user_id,
                    email: &p.email,
                    first_name: p.first_name.as_deref(),
                    last_name: p.last_name.as_deref(),
                    credential: credential.as_ref(),
                };
                let sign = ctx.clients.sign(&req);
                let signed = match reservation.take() {
                    Some(r) => tokio::join!(r, sign).1,
                    None => sign.await,
                };
                let signed = match signed {
                    None => return Err(AttemptError::NotConfigured),
                    Some(r) => r.map_err(AttemptError::Http)?,
                };
                if signed.conflict {
                    warn!("the backend reported a profile conflict (409); the request is still signed");
                }
                match ctx.clients.login(&signed.signed, ctx.shared.clock.now()).await {
                    Ok(login) => {
                        let received_at = ctx.shared.clock.now();
                        return Ok(Success { login, username: Some(signed.username), received_at });
                    }
                    Err(f) if f.kind == FailureKind::Unauthorized && tries < 2 => {
                        warn!("Entrupy rejected the signed request (401); trying once more with a fresh one");
                    }
                    Err(f) => return Err(AttemptError::Http(f)),
                }
            }
        }
    }
}

/// Reads a credential file: trimmed, non-empty, and still private.
fn read_credential(src: &CredentialSource) -> Result<Secret, String> {
    let path = crate::config::check_credential_file(src)?;
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("cannot read credential file {}: {e}", path.display()))?;
    let t = text.trim();
    if t.is_empty() {
        return Err(format!("credential file {} is empty", path.display()));
    }
    Ok(Secret::new(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            margin: 10.0,
            jitter: 2.0,
            backoff_initial: 2.0,
            backoff_max: 60.0,
            budget: Budget { per_minute: 5, per_day: 100 },
            pace: true,
        }
    }

    fn logged_in(now: f64) -> Core {
        let mut c = Core::new(params(), true);
        c.token = Some(Secret::new("t"));
        c.apply(&Outcome::Success { expires_at: now + 100.0, received_at: now }, false, now, 0.0);
        c
    }

    #[test]
    fn fresh_session_is_due_at_once_and_states_follow() {
        let c = Core::new(params(), true);
        assert_eq!(c.state(0.0), State::Expired);
        assert_eq!(c.due_at(None), Some(f64::NEG_INFINITY));
        let c = Core::new(params(), false);
        assert_eq!(c.state(0.0), State::LoggedOut);
        assert_eq!(c.due_at(None), None);
        let c = logged_in(1000.0);
        assert_eq!(c.state(1000.0), State::Valid);
        assert_eq!(c.due_at(None), Some(1090.0));
        assert_eq!(c.state(1100.0), State::Expired);
        assert_eq!(c.next_wake(None), Some(1090.0));
    }

    #[test]
    fn budget_and_retry_after_push_the_due_time() {
        let mut c = logged_in(1000.0);
        assert_eq!(c.due_at(Some(1095.0)), Some(1095.0));
        c.not_before = Some(1200.0);
        assert_eq!(c.due_at(None), Some(1200.0));
        assert_eq!(c.client_may_attempt(None, 1100.0, true).unwrap_err().name, ErrorName::TooManyRequests);
        assert!(c.client_may_attempt(None, 1200.0, true).is_ok());
        assert_eq!(c.client_may_attempt(Some(1300.0), 1200.0, true).unwrap_err().name, ErrorName::TooManyRequests);
        let c = Core::new(params(), false);
        assert_eq!(c.client_may_attempt(None, 0.0, true).unwrap_err().name, ErrorName::NotConfigured);
        assert!(c.client_may_attempt(None, 0.0, false).is_ok());
    }

    #[test]
    fn outcomes_table() {
        // Automatic transient failure: backoff grows.
        let mut c = logged_in(1000.0);
        c.apply(&Outcome::Transient, false, 1090.0, 0.5);
        assert_eq!(c.retry_at, Some(1091.0));
        c.apply(&Outcome::Transient, false, 1091.0, 0.5);
        assert_eq!(c.retry_at, Some(1093.0));
        assert_eq!(c.backoff_attempt, 2);
        // Success resets the backoff.
        c.apply(&Outcome::Success { expires_at: 1200.0, received_at: 1100.0 }, false, 1100.0, 0.0);
        assert_eq!((c.retry_at, c.backoff_attempt), (None, 0));
        assert_eq!(c.refresh_at, Some(1190.0));

        // A client's failed attempt leaves the schedule as it was...
        let mut c = logged_in(1000.0);
        c.apply(&Outcome::Transient, true, 1010.0, 0.5);
        assert_eq!((c.retry_at, c.refresh_at), (None, Some(1090.0)));
        // ...unless the session was already retrying.
        c.apply(&Outcome::Transient, false, 1090.0, 0.5);
        c.apply(&Outcome::Transient, true, 1091.0, 0.5);
        assert_eq!(c.backoff_attempt, 2);

        // 429 holds the next attempt.
        let mut c = logged_in(1000.0);
        c.apply(&Outcome::RateLimited(Some(30.0)), false, 1090.0, 0.0);
        assert_eq!(c.not_before, Some(1120.0));
        assert_eq!(c.due_at(None), Some(1120.0));

        // 401/403 from the backend: needs re-authorization, once.
        let mut c = logged_in(1000.0);
        assert!(c.apply(&Outcome::Reauthorize, false, 1090.0, 0.0));
        assert!(!c.apply(&Outcome::Reauthorize, true, 1091.0, 0.0));
        assert_eq!(c.state(1091.0), State::NeedsReauthorization);
        assert_eq!(c.due_at(None), None);
        c.unblock();
        assert_eq!(c.state(1091.0), State::Valid);

        // Permanent: failed, no retry.
        let mut c = logged_in(1000.0);
        c.apply(&Outcome::Permanent, false, 1090.0, 0.0);
        assert_eq!(c.state(1090.0), State::Failed);
        assert_eq!(c.due_at(None), None);

        // Cleanup stops everything.
        let mut c = logged_in(1000.0);
        c.cleanup();
        assert_eq!(c.state(1000.0), State::LoggedOut);
        assert_eq!((c.expires_at, c.due_at(None)), (None, None));
        assert_eq!(c.refresh_at_property(None, 1000.0), 0.0);
    }

    /// Storm regression (Vault Agent once sent hundreds of failing renewals a second): with
    /// the upstream failing for three hours of simulated time, attempts stay within what the
    /// backoff allows, keep going at the capped interval after expiry, and never loop tightly.
    #[test]
    fn a_failing_upstream_for_hours_stays_within_the_backoff() {
        let p = Params {
            margin: 300.0,
            jitter: 30.0,
            backoff_initial: 2.0,
            backoff_max: 300.0,
            budget: Budget { per_minute: 5, per_day: 100 },
            pace: true,
        };
        let mut c = Core::new(p, true);
        c.token = Some(Secret::new("t"));
        c.apply(&Outcome::Success { expires_at: 3600.0, received_at: 0.0 }, false, 0.0, 0.0);
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let end = 3.0 * 3600.0 + 3300.0;
        let mut now = 0.0;
        let mut attempts = Vec::new();
        loop {
            let due = c.due_at(None).unwrap();
            now = f64::max(now, due);
            if now > end {
                break;
            }
            c.in_flight = true;
            attempts.push(now);
            c.apply(&Outcome::Transient, false, now, rand());
        }
        assert_eq!(attempts[0], 3300.0, "the first attempt is the planned refresh");
        let gaps: Vec<f64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| *g >= 0.02), "never a tight loop");
        assert!(gaps.iter().all(|g| *g <= 300.0), "never longer than the cap");
        // Expected about 10800 s / 150 s plus the ramp-up; far from a storm either way.
        assert!(attempts.len() < 200, "{} attempts in three hours", attempts.len());
        assert!(attempts.len() > 36, "kept trying after expiry: {} attempts", attempts.len());
        assert!(*attempts.last().unwrap() > end - 300.0, "still trying at the end");
        assert_eq!(c.state(end), State::Expired);
    }

    #[test]
    fn pacing_spreads_logins_once_half_the_budget_is_used() {
        let mut p = params();
        p.budget = Budget { per_minute: 5, per_day: 100 };
        let mut c = Core::new(p, true);
        c.token = Some(Secret::new("t"));
        // 100 s tokens with a 10 s margin: a refresh every 90 s, 960 a day: too many.
        c.apply(&Outcome::Success { expires_at: 1100.0, received_at: 1000.0 }, false, 1000.0, 0.0);
        c.last_attempt_at = Some(999.0);
        assert_eq!(c.pace_until(10), None, "the first half of the budget goes at the natural pace");
        assert_eq!(c.pace_until(50), Some(999.0 + 864.0));
        // Long-lived tokens are never paced.
        c.apply(&Outcome::Success { expires_at: 5000.0, received_at: 1000.0 }, false, 1000.0, 0.0);
        assert_eq!(c.pace_until(99), None);
    }

    #[test]
    fn restore_refreshes_only_past_the_refresh_point() {
        let rec = SessionRecord {
            token: Some(Secret::new("t")),
            expires_at: Some(1100.0),
            last_login_at: Some(1000.0),
            refresh_at: Some(1089.0),
            ..Default::default()
        };
        let c = Core::restore(params(), true, &rec, 1050.0);
        assert_eq!(c.due_at(None), Some(1089.0));
        assert_eq!(c.state(1050.0), State::Valid);
        let c = Core::restore(params(), true, &rec, 1095.0);
        assert!(c.due_at(None).unwrap() <= 1095.0);
        let out = SessionRecord { logged_out: true, ..rec };
        let c = Core::restore(params(), true, &out, 1050.0);
        assert_eq!(c.state(1050.0), State::LoggedOut);
        assert_eq!(c.due_at(None), None);
    }
}
