//! What the bus reads of a session without asking the loop: a [`Snapshot`], published by
//! the loop after every change.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::core::{Core, State};
use crate::error::ErrorName;
use crate::ledger::Ledger;
use crate::policy;
use crate::secret::Secret;

/// A session's published snapshot: the loop swaps in a new one after every change, the bus
/// reads it without a lock and without waiting (about 200 bytes a session; a `watch`
/// channel's shared state is three times that, 4 MiB more with 10,000 sessions).
pub type Published = Arc<ArcSwap<Snapshot>>;

/// A session as the bus shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Session id.
    pub id: Arc<str>,
    /// The user.
    pub unique_user_id: Arc<str>,
    /// As returned by a peer.
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
    /// Successful logins of this user in the last 24 h.
    pub logins_today: u32,
    /// Whether automatic refreshes are paced to make the daily budget last.
    pub pacing: bool,
    /// The daily budget.
    pub logins_per_day: u32,
}

impl Snapshot {
    /// The snapshot of `core` at `now`.
    pub fn of(id: &Arc<str>, core: &Core, ledger: &Ledger, now: f64) -> Self {
        let uid = core.unique_user_id();
        Snapshot {
            id: id.clone(),
            unique_user_id: uid.clone(),
            username: core.username().clone(),
            state: core.state(now),
            token: core.token().cloned(),
            expires_at: core.expires_at(),
            refresh_at: core.refresh_at_property(ledger, now),
            last_login_at: core.last_login_at(),
            last_error: core.last_error(),
            valid: core.valid(now),
            logins_today: ledger.logins_today(uid, now),
            pacing: core.pacing(ledger, now),
            logins_per_day: core.logins_per_day(),
        }
    }

    /// Valid at `now`: a token and `now < expires_at`.
    pub fn valid(&self, now: f64) -> bool {
        policy::is_valid(self.token.is_some(), self.expires_at, now)
    }

    /// `ExpiresAt`, rounded down, 0 when none.
    pub fn expires_at_secs(&self) -> u64 {
        self.expires_at.map(|e| e.max(0.0).floor() as u64).unwrap_or(0)
    }

    /// Whether the periodic sweep at `now` must look at this session: a deadline (expiry,
    /// planned attempt) passed without the session noticing (a late monotonic timer after a
    /// suspend), or it waits for a credential change.
    pub fn needs_sweep(&self, now: f64) -> bool {
        let expiry_missed = self.valid && self.expires_at.is_some_and(|e| now >= e);
        let attempt_missed = self.refresh_at > 0.0 && now >= self.refresh_at && self.state != State::Refreshing;
        expiry_missed || attempt_missed || matches!(self.state, State::NeedsReauthorization | State::Failed)
    }
}
