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

/// When the periodic sweep must look at a session ([`Snapshot::sweep_at`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SweepAt {
    /// Nothing can pass unseen.
    Never,
    /// From this wall-clock instant (Unix seconds) on.
    At(f64),
    /// At every sweep.
    Always,
}

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

    /// From when the periodic sweep must look at this session: once a deadline (expiry,
    /// planned attempt) has passed on the wall clock without the session noticing (a late
    /// monotonic timer after a suspend), or every time while it waits for a credential
    /// change or failed.
    pub fn sweep_at(&self) -> SweepAt {
        if matches!(self.state, State::NeedsReauthorization | State::Failed) {
            return SweepAt::Always;
        }
        let expiry = if self.valid { self.expires_at } else { None };
        let attempt = (self.refresh_at > 0.0 && self.state != State::Refreshing).then_some(self.refresh_at);
        match (expiry, attempt) {
            (Some(e), Some(a)) => SweepAt::At(e.min(a)),
            (Some(t), None) | (None, Some(t)) => SweepAt::At(t),
            (None, None) => SweepAt::Never,
        }
    }
}
