//! The login ledger: every `unique_user_id`'s recent logins, the memory of the rate budget
//! (SPEC 5), owned by the daemon's loop.
//!
//! Pure data: the loop persists a user's history (through the store) whenever it changes, and
//! a reservation is on disk before its login request leaves. An attempt under way holds a
//! reservation, which counts against the budget like a login (the request may reach Entrupy
//! even if the daemon dies) but is not reported as a login until it succeeded.

use std::collections::HashMap;
use std::sync::Arc;

use crate::policy::{Budget, DAY};

/// One user's recent logins.
#[derive(Debug, Clone, Default, PartialEq)]
struct History {
    /// Unix seconds of successful logins (and of reservations found on disk at start, whose
    /// fate is unknown: counted as logins).
    logins: Vec<f64>,
    /// Unix seconds of the reservations of attempts under way.
    reserved: Vec<f64>,
}

/// The budget's memory for every user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ledger {
    users: HashMap<Arc<str>, History>,
}

impl Ledger {
    /// A ledger with the histories found on disk.
    pub fn from_histories(histories: impl IntoIterator<Item = (String, Vec<f64>)>) -> Self {
        let users = histories
            .into_iter()
            .map(|(uid, logins)| (Arc::from(uid), History { logins, reserved: Vec::new() }))
            .collect();
        Ledger { users }
    }

    fn all(&self, uid: &str) -> Vec<f64> {
        match self.users.get(uid) {
            Some(h) => h.logins.iter().chain(&h.reserved).copied().collect(),
            None => Vec::new(),
        }
    }

    /// When `budget` lets `uid` log in next: `None` when now.
    pub fn free_at(&self, uid: &str, budget: Budget, now: f64) -> Option<f64> {
        budget.free_at(&self.all(uid), now)
    }

    /// Successful logins of `uid` in the last 24 h (reservations under way not counted).
    pub fn logins_today(&self, uid: &str, now: f64) -> u32 {
        self.users.get(uid).map_or(0, |h| Budget::used_today(&h.logins, now) as u32)
    }

    /// Logins of the daily budget still free for `uid`, reservations counted as spent.
    pub fn remaining_today(&self, uid: &str, budget: Budget, now: f64) -> u32 {
        let used = Budget::used_today(&self.all(uid), now) as u32;
        budget.per_day.saturating_sub(used)
    }

    /// Reserves a login slot at `now` when the budget allows one; else the moment it frees.
    pub fn reserve(&mut self, uid: &Arc<str>, budget: Budget, now: f64) -> Result<(), f64> {
        if let Some(free) = self.free_at(uid, budget, now) {
            return Err(free);
        }
        let h = self.user(uid);
        h.logins.retain(|t| *t > now - DAY);
        h.reserved.push(now);
        Ok(())
    }

    /// Ends the reservation made at `reserved_at`: a success at `success_at` becomes a login;
    /// `None` (the attempt failed before a login could happen) frees the slot.
    pub fn settle(&mut self, uid: &Arc<str>, reserved_at: f64, success_at: Option<f64>) {
        let h = self.user(uid);
        if let Some(pos) = h.reserved.iter().position(|t| *t == reserved_at) {
            h.reserved.remove(pos);
        }
        if h.reserved.is_empty() {
            // Most users have no attempt under way: 10,000 idle users keep no buffer.
            h.reserved = Vec::new();
        }
        if let Some(t) = success_at {
            h.logins.push(t);
        }
    }

    /// The user's entry, keyed by the session's own `Arc` (no copy of the id per user).
    fn user(&mut self, uid: &Arc<str>) -> &mut History {
        self.users.entry(uid.clone()).or_default()
    }

    /// What is written to disk for `uid`: logins and reservations alike, so a restart counts
    /// an attempt that was under way.
    pub fn history(&self, uid: &str) -> Vec<f64> {
        self.all(uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Budget = Budget { per_minute: 2, per_day: 3 };

    #[test]
    fn reservations_count_against_the_budget_but_not_as_logins() {
        let u: Arc<str> = Arc::from("u");
        let mut l = Ledger::default();
        assert_eq!(l.reserve(&u, B, 100.0), Ok(()));
        assert_eq!(l.logins_today("u", 100.0), 0);
        assert_eq!(l.remaining_today("u", B, 100.0), 2);
        assert_eq!(l.history("u"), vec![100.0]);
        l.settle(&u, 100.0, Some(101.0));
        assert_eq!(l.logins_today("u", 101.0), 1);
        assert_eq!(l.history("u"), vec![101.0]);
        // A failed attempt gives its slot back.
        assert_eq!(l.reserve(&u, B, 102.0), Ok(()));
        l.settle(&u, 102.0, None);
        assert_eq!(l.history("u"), vec![101.0]);
    }

    #[test]
    fn the_budget_refuses_and_says_when_it_frees() {
        let (u, v): (Arc<str>, Arc<str>) = (Arc::from("u"), Arc::from("v"));
        let mut l = Ledger::from_histories([("u".to_owned(), vec![10.0, 20.0])]);
        assert_eq!(l.reserve(&u, B, 30.0), Err(70.0));
        assert_eq!(l.reserve(&u, B, 71.0), Ok(()));
        assert_eq!(l.reserve(&u, B, 200.0), Err(10.0 + DAY));
        // Another user has a budget of its own.
        assert_eq!(l.reserve(&v, B, 200.0), Ok(()));
    }
}
