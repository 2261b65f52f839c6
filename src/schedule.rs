//! The periodic wall-clock sweep (`check_schedule`).
//!
//! tokio's timers run on the monotonic clock, which stops while a laptop sleeps; the sweep
//! compares the wall clock with the stored expiries at the cron schedule's instants so a late
//! timer is caught. The schedule is parsed with `croner` (the parser tokio-cron-scheduler
//! itself uses) and driven by the daemon's own timer rather than tokio-cron-scheduler, whose
//! loop wakes every 500 ms whatever the schedule (see ARCHITECTURE.md).

use chrono::{DateTime, Utc};

/// The longest single sleep of the sweep timer. A monotonic sleep does not notice a clock
/// change or a suspend; capping it bounds how late a sweep can be after either.
pub const MAX_SLEEP_SECS: f64 = 3600.0;

/// The next instant (Unix seconds) of `cron` strictly after `now`, in UTC.
pub fn next_after(cron: &croner::Cron, now: f64) -> Option<f64> {
    let secs = now.floor() as i64;
    let dt: DateTime<Utc> = DateTime::from_timestamp(secs, 0)?;
    let next = cron.find_next_occurrence(&dt, false).ok()?;
    Some(next.timestamp() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_instants() {
        let every_minute = crate::config::parse_schedule("0 * * * * *").unwrap();
        assert_eq!(next_after(&every_minute, 60.0), Some(120.0));
        assert_eq!(next_after(&every_minute, 61.5), Some(120.0));
        assert_eq!(next_after(&every_minute, 119.999), Some(120.0));
        let every_10s = crate::config::parse_schedule("*/10 * * * * *").unwrap();
        assert_eq!(next_after(&every_10s, 1_700_000_003.0), Some(1_700_000_010.0));
        let hourly = crate::config::parse_schedule("0 0 * * * *").unwrap();
        assert_eq!(next_after(&hourly, 3600.0), Some(7200.0));
    }
}
