//! What the periodic sweep and the status line need to know of the sessions, kept up to date
//! as their snapshots change, so that neither reads a resting session.
//!
//! A session at rest is memory nobody touches, and memory nobody touches goes cold: on the
//! benchmark machine, reading 10,000 sessions once a minute cost 250 ms of CPU each time,
//! against a few ms when the same pages are warm (BENCHMARKS.md, 5d). So the loop records,
//! at each new snapshot, the wall-clock instant from which the sweep must look at the
//! session, and its public state; the sweep then reads only the sessions that are due.
//!
//! Pure data, like `timers.rs`: the loop owns it and calls it with the snapshots it
//! publishes.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::session::{Snapshot, State, SweepAt};

/// A wall-clock instant (Unix seconds) with a total order, for the index.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Wall(f64);

impl Eq for Wall {}

impl PartialOrd for Wall {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Wall {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The sessions by the instant the sweep must look at them, and the count of each state.
///
/// Invariant (outside a sweep, which takes due entries out and puts them back): for each
/// session, `at` holds `(t, id)` exactly when its current snapshot's [`Snapshot::sweep_at`]
/// is `At(t)`, `always` holds `id` exactly when it is `Always`, and `states` counts the
/// current snapshots' states.
#[derive(Debug, Default)]
pub struct SweepIndex {
    at: BTreeSet<(Wall, Arc<str>)>,
    always: BTreeSet<Arc<str>>,
    states: [usize; State::ALL.len()],
}

impl SweepIndex {
    /// Records that `id`'s snapshot is now `new`; `old` is the one it replaced (`None` for a
    /// session just added).
    pub fn track(&mut self, id: &Arc<str>, old: Option<&Snapshot>, new: &Snapshot) {
        if let Some(old) = old {
            self.states[old.state.index()] = self.states[old.state.index()].saturating_sub(1);
            self.remove(id, old.sweep_at());
        }
        self.states[new.state.index()] += 1;
        self.insert(id, new.sweep_at());
    }

    /// Forgets a removed session, whose last snapshot was `last`.
    pub fn forget(&mut self, id: &Arc<str>, last: &Snapshot) {
        self.states[last.state.index()] = self.states[last.state.index()].saturating_sub(1);
        self.remove(id, last.sweep_at());
    }

    /// The sessions the sweep at `now` must look at: those whose instant passed (taken out
    /// of the index: give each back with [`SweepIndex::put_back`] once stepped) and those it
    /// looks at every time.
    pub fn take_due(&mut self, now: f64) -> Vec<Arc<str>> {
        let mut due: Vec<Arc<str>> = self.always.iter().cloned().collect();
        while let Some((t, _)) = self.at.first() {
            if t.0 > now {
                break;
            }
            if let Some((_, id)) = self.at.pop_first() {
                due.push(id);
            }
        }
        due
    }

    /// Gives back a session taken by [`SweepIndex::take_due`], with its current snapshot
    /// (its instant may still have passed: then the next sweep looks at it again).
    pub fn put_back(&mut self, id: &Arc<str>, current: &Snapshot) {
        self.insert(id, current.sweep_at());
    }

    /// How many sessions are in each state, in the order of [`State::ALL`].
    pub fn counts(&self) -> impl Iterator<Item = (State, usize)> + '_ {
        State::ALL.iter().copied().zip(self.states.iter().copied())
    }

    fn insert(&mut self, id: &Arc<str>, at: SweepAt) {
        match at {
            SweepAt::Never => {}
            SweepAt::At(t) => {
                self.at.insert((Wall(t), id.clone()));
            }
            SweepAt::Always => {
                self.always.insert(id.clone());
            }
        }
    }

    fn remove(&mut self, id: &Arc<str>, at: SweepAt) {
        match at {
            SweepAt::Never => {}
            SweepAt::At(t) => {
                self.at.remove(&(Wall(t), id.clone()));
            }
            SweepAt::Always => {
                self.always.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(state: State, valid: bool, expires_at: Option<f64>, refresh_at: f64) -> Snapshot {
        let id: Arc<str> = Arc::from("s");
        Snapshot {
            id: id.clone(),
            unique_user_id: id.clone(),
            username: id,
            state,
            token: None,
            expires_at,
            refresh_at,
            last_login_at: None,
            last_error: None,
            valid,
            logins_today: 0,
            pacing: false,
            logins_per_day: 10,
        }
    }

    #[test]
    fn the_sweep_sees_only_due_sessions_and_gives_them_back() {
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        let mut ix = SweepIndex::default();
        let planned = snap(State::Valid, true, Some(200.0), 150.0);
        let later = snap(State::Valid, true, Some(900.0), 800.0);
        let stuck = snap(State::NeedsReauthorization, false, None, 0.0);
        ix.track(&a, None, &planned);
        ix.track(&b, None, &later);
        ix.track(&c, None, &stuck);
        assert_eq!(ix.take_due(100.0), vec![c.clone()], "only the session looked at every time");
        assert_eq!(ix.take_due(150.0), vec![c.clone(), a.clone()]);
        // Not given back yet: not seen twice.
        assert_eq!(ix.take_due(160.0), vec![c.clone()]);
        ix.put_back(&a, &planned);
        assert_eq!(ix.take_due(160.0), vec![c.clone(), a.clone()], "still due: seen again");
        // The refresh happened: a new snapshot, a new instant.
        ix.put_back(&a, &planned);
        ix.track(&a, Some(&planned), &later);
        assert_eq!(ix.take_due(700.0), vec![c.clone()]);
        assert_eq!(ix.take_due(800.0), vec![c.clone(), a.clone(), b.clone()]);
    }

    #[test]
    fn counts_follow_the_snapshots_and_removals() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let mut ix = SweepIndex::default();
        let valid = snap(State::Valid, true, Some(200.0), 150.0);
        let refreshing = snap(State::Refreshing, true, Some(200.0), 150.0);
        ix.track(&a, None, &valid);
        ix.track(&b, None, &valid);
        ix.track(&b, Some(&valid), &refreshing);
        let counts: Vec<(State, usize)> = ix.counts().filter(|(_, n)| *n > 0).collect();
        assert_eq!(counts, vec![(State::Valid, 1), (State::Refreshing, 1)]);
        ix.forget(&a, &valid);
        ix.forget(&b, &refreshing);
        assert!(ix.counts().all(|(_, n)| n == 0));
        assert_eq!(ix.take_due(1e12), Vec::<Arc<str>>::new(), "nothing left behind");
    }
}
