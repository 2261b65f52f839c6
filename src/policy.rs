//! The refresh policy as pure arithmetic (SPEC section 5): when to refresh, how long to back
//! off, whether the login budget allows a login, and what the wall clock says about validity.
//!
//! Invariant: this module does not know about the clock, the network, the disk or tokio.
//! Every function takes `now` (Unix seconds, `f64`) and, where chance is involved, a uniform
//! random number `u` in `[0, 1)` chosen by the caller, so tests can pin both.

/// Seconds in the budget's short window.
pub const MINUTE: f64 = 60.0;
/// Seconds in the budget's long window.
pub const DAY: f64 = 86_400.0;

/// When to refresh a token that expires at `expires_at`, whose login answer arrived at
/// `received_at`: `expires_at - margin - u·jitter`, or for a lifetime shorter than
/// `2 × margin`, `expires_at - lifetime/2 - u·min(jitter, lifetime/4)`; never before
/// `received_at`.
pub fn refresh_at(expires_at: f64, received_at: f64, margin: f64, jitter: f64, u: f64) -> f64 {
    let lifetime = expires_at - received_at;
    let u = u.clamp(0.0, 1.0);
    let at = if lifetime < 2.0 * margin {
        expires_at - lifetime / 2.0 - u * jitter.min(lifetime / 4.0).max(0.0)
    } else {
        expires_at - margin - u * jitter
    };
    at.max(received_at)
}

/// The refresh point without jitter: the latest moment the rule above can give. A stored
/// token found at start past this point is refreshed at once.
pub fn refresh_point(expires_at: f64, received_at: f64, margin: f64) -> f64 {
    refresh_at(expires_at, received_at, margin, 0.0, 0.0)
}

/// Valid means a token is held and `now < expires_at`, with the exact expiry.
pub fn is_valid(token_held: bool, expires_at: Option<f64>, now: f64) -> bool {
    token_held && expires_at.is_some_and(|e| now < e)
}

/// The ceiling of the `attempt`-th retry delay (attempt 0 is the first retry):
/// `initial × 2^attempt`, capped at `max`.
pub fn backoff_ceiling(attempt: u32, initial: f64, max: f64) -> f64 {
    let factor = 2f64.powi(attempt.min(1023) as i32);
    (initial * factor).min(max)
}

/// Full-jitter backoff: a delay drawn uniformly from `[0, ceiling)`, with `u` in `[0, 1)`.
/// A floor of a hundredth of `initial` keeps an unlucky draw from retrying in a tight loop.
pub fn backoff_delay(attempt: u32, initial: f64, max: f64, u: f64) -> f64 {
    let ceiling = backoff_ceiling(attempt, initial, max);
    (u.clamp(0.0, 1.0) * ceiling).max(initial / 100.0).min(ceiling)
}

/// The login budget of one `unique_user_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Successful logins allowed in any 60 s.
    pub per_minute: u32,
    /// Successful logins allowed in any 24 h.
    pub per_day: u32,
}

impl Budget {
    /// When the next login is allowed, given the times of earlier logins (any order):
    /// `None` when one is allowed now, else the moment a slot frees. A login at `t` occupies
    /// a window until `t + window` (exclusive).
    pub fn free_at(&self, logins: &[f64], now: f64) -> Option<f64> {
        let mut recent: Vec<f64> = logins.iter().copied().filter(|t| *t > now - DAY).collect();
        recent.sort_by(f64::total_cmp);
        let limit = |window: f64, max: u32| -> Option<f64> {
            let inside: Vec<f64> = recent.iter().copied().filter(|t| *t > now - window).collect();
            let max = max as usize;
            if inside.len() < max {
                None
            } else {
                // The login that must leave the window for a slot to free.
                inside.get(inside.len() - max).map(|t| t + window)
            }
        };
        match (limit(MINUTE, self.per_minute), limit(DAY, self.per_day)) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(f64::MIN).max(b.unwrap_or(f64::MIN))),
        }
    }

    /// Drops login records that no window can count any more.
    pub fn prune(logins: &mut Vec<f64>, now: f64) {
        logins.retain(|t| *t > now - DAY);
    }

    /// Logins counted in the last 24 h.
    pub fn used_today(logins: &[f64], now: f64) -> usize {
        logins.iter().filter(|t| **t > now - DAY).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refresh_at_table() {
        // (expires_at, received_at, margin, jitter, u) -> expected
        let table: &[(f64, f64, f64, f64, f64, f64)] = &[
            // Long lifetime: expires - margin - u*jitter.
            (3600.0, 0.0, 300.0, 30.0, 0.0, 3300.0),
            (3600.0, 0.0, 300.0, 30.0, 0.5, 3285.0),
            (3600.0, 0.0, 300.0, 30.0, 1.0, 3270.0),
            // Exactly 2 × margin counts as long.
            (600.0, 0.0, 300.0, 30.0, 0.0, 300.0),
            // Short lifetime: expires - lifetime/2 - u*min(jitter, lifetime/4).
            (30.0, 0.0, 300.0, 30.0, 0.0, 15.0),
            (30.0, 0.0, 300.0, 30.0, 1.0, 7.5),
            (30.0, 0.0, 10.0, 2.0, 1.0, 18.0),
            (15.0, 0.0, 10.0, 2.0, 1.0, 5.5),
            (100.0, 40.0, 60.0, 0.0, 0.7, 70.0),
            // Never before the answer arrived.
            (1.0, 0.0, 0.0, 30.0, 1.0, 0.0),
            (10.0, 0.0, 5.0, 100.0, 1.0, 0.0),
        ];
        for &(e, r, m, j, u, want) in table {
            let got = refresh_at(e, r, m, j, u);
            assert!((got - want).abs() < 1e-9, "refresh_at({e},{r},{m},{j},{u}) = {got}, want {want}");
        }
        assert_eq!(refresh_point(3600.0, 0.0, 300.0), 3300.0);
    }

    #[test]
    fn validity_uses_the_exact_expiry() {
        assert!(is_valid(true, Some(100.5), 100.4));
        assert!(!is_valid(true, Some(100.5), 100.5));
        assert!(!is_valid(false, Some(100.5), 1.0));
        assert!(!is_valid(true, None, 1.0));
    }

    #[test]
    fn backoff_table() {
        assert_eq!(backoff_ceiling(0, 2.0, 300.0), 2.0);
        assert_eq!(backoff_ceiling(3, 2.0, 300.0), 16.0);
        assert_eq!(backoff_ceiling(8, 2.0, 300.0), 300.0);
        assert_eq!(backoff_ceiling(u32::MAX, 2.0, 300.0), 300.0);
        assert_eq!(backoff_delay(3, 2.0, 300.0, 0.5), 8.0);
        assert_eq!(backoff_delay(3, 2.0, 300.0, 0.0), 0.02);
    }

    #[test]
    fn budget_table() {
        let b = Budget { per_minute: 2, per_day: 3 };
        assert_eq!(b.free_at(&[], 0.0), None);
        assert_eq!(b.free_at(&[10.0], 20.0), None);
        assert_eq!(b.free_at(&[10.0, 15.0], 20.0), Some(70.0));
        assert_eq!(b.free_at(&[10.0, 15.0], 70.0), None);
        // The day limit holds after the minute window has passed.
        assert_eq!(b.free_at(&[10.0, 15.0, 100.0], 200.0), Some(10.0 + DAY));
        // Old logins no longer count.
        assert_eq!(b.free_at(&[10.0, 15.0, 100.0], 10.0 + DAY), None);
        // Unordered input.
        assert_eq!(b.free_at(&[15.0, 10.0], 20.0), Some(70.0));
        let mut v = vec![1.0, DAY + 5.0];
        Budget::prune(&mut v, DAY + 10.0);
        assert_eq!(v, vec![DAY + 5.0]);
        assert_eq!(Budget::used_today(&[1.0, 2.0, 3.0], 2.5), 3);
    }

    proptest! {
        #[test]
        fn refresh_at_is_before_expiry_and_after_receipt(
            received in 0.0f64..1e9,
            lifetime in 0.001f64..1e6,
            margin in 0.0f64..1e5,
            jitter in 0.0f64..1e5,
            u in 0.0f64..1.0,
        ) {
            let expires = received + lifetime;
            let at = refresh_at(expires, received, margin, jitter, u);
            prop_assert!(at >= received);
            prop_assert!(at < expires || at == received);
            prop_assert!(at <= refresh_point(expires, received, margin) + 1e-6);
        }

        #[test]
        fn backoff_stays_within_bounds(attempt in 0u32..2000, initial in 0.001f64..100.0, extra in 0.0f64..1000.0, u in 0.0f64..1.0) {
            let max = initial + extra;
            let d = backoff_delay(attempt, initial, max, u);
            prop_assert!(d >= 0.0);
            prop_assert!(d <= max);
            prop_assert!(d <= initial * 2f64.powi(attempt.min(1023) as i32));
        }

        /// Simulates a client that logs in whenever the budget allows: no 60 s or 24 h window
        /// ever holds more logins than the budget.
        #[test]
        fn no_window_holds_more_than_the_budget(
            per_minute in 1u32..8,
            per_day in 1u32..40,
            steps in proptest::collection::vec(0.0f64..400.0, 1..300),
        ) {
            let b = Budget { per_minute, per_day };
            let mut logins: Vec<f64> = Vec::new();
            let mut now = 0.0;
            for step in steps {
                now += step;
                if b.free_at(&logins, now).is_none() {
                    logins.push(now);
                }
                if let Some(t) = b.free_at(&logins, now) {
                    prop_assert!(t > now);
                }
            }
            for (i, t) in logins.iter().enumerate() {
                let in_minute = logins[i..].iter().filter(|x| **x < t + MINUTE).count();
                let in_day = logins[i..].iter().filter(|x| **x < t + DAY).count();
                prop_assert!(in_minute <= per_minute as usize);
                prop_assert!(in_day <= per_day as usize);
            }
        }
    }
}
