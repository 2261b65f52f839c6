//! The deadline queue: every session's next deadline (the expiry flip, a planned refresh, a
//! retry), owned by the daemon's loop, which sleeps until the earliest one.
//!
//! 10,000 resting sessions cost 10,000 entries here and one timer in the runtime. The time
//! type is a parameter so that this stays pure (the loop uses tokio's `Instant`, tests use
//! numbers).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Deadlines of sessions, by id.
#[derive(Debug)]
pub struct Timers<T> {
    queue: BTreeSet<(T, Arc<str>)>,
    by_id: HashMap<Arc<str>, T>,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Timers { queue: BTreeSet::new(), by_id: HashMap::new() }
    }
}

impl<T: Ord + Copy> Timers<T> {
    /// Sets (or with `None` clears) the deadline of `id`.
    pub fn set(&mut self, id: &Arc<str>, at: Option<T>) {
        if let Some(old) = self.by_id.get(id).copied() {
            if Some(old) == at {
                return;
            }
            self.queue.remove(&(old, id.clone()));
            self.by_id.remove(id);
        }
        if let Some(at) = at {
            self.queue.insert((at, id.clone()));
            self.by_id.insert(id.clone(), at);
        }
    }

    /// The earliest deadline.
    pub fn earliest(&self) -> Option<T> {
        self.queue.first().map(|(t, _)| *t)
    }

    /// Removes and returns the sessions whose deadline is at or before `now`.
    pub fn take_due(&mut self, now: T) -> Vec<Arc<str>> {
        let mut due = Vec::new();
        while let Some((t, _)) = self.queue.first() {
            if *t > now {
                break;
            }
            if let Some((_, id)) = self.queue.pop_first() {
                self.by_id.remove(&id);
                due.push(id);
            }
        }
        due
    }

    /// How many sessions have a deadline.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no session has a deadline.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_move_and_come_due_in_order() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let mut t = Timers::default();
        t.set(&a, Some(10));
        t.set(&b, Some(5));
        assert_eq!(t.earliest(), Some(5));
        t.set(&b, Some(20));
        assert_eq!(t.earliest(), Some(10));
        assert_eq!(t.take_due(9), Vec::<Arc<str>>::new());
        assert_eq!(t.take_due(10), vec![a.clone()]);
        assert_eq!(t.len(), 1);
        t.set(&b, None);
        assert!(t.is_empty());
        assert_eq!(t.earliest(), None);
    }
}
