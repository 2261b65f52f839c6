//! The daemon's wall clock: where its logic reads `now`.
//!
//! The loop, the attempts and the bus get `now` (Unix seconds as `f64`) from a [`Clock`];
//! the core gets it as an argument. (Edges that stamp files or parse HTTP dates read the
//! system clock themselves.) Tests and the reliability checks can shift the daemon's wall
//! clock through an offset, which behaves like a clock change (`date -s`) without touching
//! the machine's clock, or make it follow tokio's clock, so that `tokio::time::pause()`
//! moves both the timers and the wall clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The daemon's wall clock.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Milliseconds added to the system clock (0 in production).
    offset_ms: Arc<AtomicI64>,
    /// For tests: the wall time at a tokio instant, from which the clock follows tokio's
    /// (possibly paused) clock instead of the system's.
    follows: Option<(f64, tokio::time::Instant)>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that starts at the system's time and then moves with tokio's clock (tests
    /// under `tokio::time::pause()`).
    pub fn following_tokio() -> Self {
        Clock { offset_ms: Arc::default(), follows: Some((system_now(), tokio::time::Instant::now())) }
    }

    /// Unix seconds now, with sub-second precision.
    pub fn now(&self) -> f64 {
        let base = match self.follows {
            Some((wall, at)) => wall + at.elapsed().as_secs_f64(),
            None => system_now(),
        };
        base + self.offset_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Shifts the clock by `ms` (a simulated clock change).
    pub fn shift_ms(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// This clock's time `t` on the system's wall clock (they differ by the test offset).
    pub fn to_system(&self, t: f64) -> f64 {
        t - self.offset_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

fn system_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Seconds until `target` as a `Duration`, zero when it has passed (and for NaN).
pub fn until(now: f64, target: f64) -> std::time::Duration {
    let secs = target - now;
    if secs.is_finite() && secs > 0.0 {
        std::time::Duration::from_secs_f64(secs.min(1e9))
    } else {
        std::time::Duration::ZERO
    }
}

/// Formats Unix seconds as an RFC 3339 UTC time, for messages.
pub fn fmt_time(t: f64) -> String {
    let secs = t.max(0.0).floor() as u64;
    httpdate_like(secs)
}

fn httpdate_like(secs: u64) -> String {
    match chrono::DateTime::from_timestamp(secs as i64, 0) {
        Some(dt) => dt.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => secs.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_shifts_the_clock() {
        let c = Clock::system();
        let a = c.now();
        c.shift_ms(3_600_000);
        let b = c.now();
        assert!(b - a >= 3599.0 && b - a < 3700.0);
        assert_eq!(until(10.0, 5.0), std::time::Duration::ZERO);
        assert_eq!(until(10.0, f64::NAN), std::time::Duration::ZERO);
        assert_eq!(until(10.0, 12.5), std::time::Duration::from_millis(2500));
        assert_eq!(fmt_time(0.0), "1970-01-01T00:00:00Z");
    }
}
