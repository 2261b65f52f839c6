//! Outside events that tell the daemon to look at the wall clock again or retry now:
//! logind's `PrepareForSleep(false)` (resume) and NetworkManager's `StateChanged` (network
//! back) on the system bus, and the [`WallTimer`] that drives the sweep on the wall clock and
//! reports changes of the clock itself (`TFD_TIMER_CANCEL_ON_SET`).
//!
//! None of them is relied on alone: the cron sweep and the sessions' deadlines (in
//! `session::Timers`) still run.
//! Each watcher costs no wakeup while nothing happens.

use futures_util::StreamExt;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{debug, info};

/// What a watcher saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outside {
    /// The machine resumed from suspend or hibernation.
    Resumed,
    /// The wall clock was set (NTP step, `date -s`, time zone tools).
    ClockChanged,
    /// Network connectivity is back.
    NetworkUp,
}

/// Which system bus to watch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SystemBus {
    /// `$DBUS_SYSTEM_BUS_ADDRESS`, else the standard socket.
    #[default]
    Default,
    /// This address (tests use a private bus with stand-ins).
    Address(String),
    /// Do not watch.
    Off,
}

/// How many signals of each kind may wait unread.
const QUEUE: Option<std::num::NonZeroUsize> = std::num::NonZeroUsize::new(16);

/// NetworkManager's `NM_STATE_CONNECTED_GLOBAL`.
const NM_CONNECTED_GLOBAL: u32 = 70;

/// Watches logind and NetworkManager on the system bus until `tx` closes. Without a system
/// bus it returns at once (logged at debug level): nothing breaks.
pub async fn system_bus(which: SystemBus, tx: mpsc::UnboundedSender<Outside>) {
    let builder = match &which {
        SystemBus::Off => return,
        SystemBus::Default => zbus::connection::Builder::system(),
        SystemBus::Address(a) => zbus::connection::Builder::address(a.as_str()),
    };
    let conn = match builder.build().await {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "no system bus: resume and network changes are caught by the sweep only");
            return;
        }
    };
    let rule =
        |iface: &'static str, member: &'static str, path: &'static str| -> zbus::Result<zbus::MatchRule<'static>> {
            zbus::MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .interface(iface)
                .member(member)
                .path(path)
                .build()
        };
    let (sleep_rule, nm_rule) = match (
        rule("org.freedesktop.login1.Manager", "PrepareForSleep", "/org/freedesktop/login1"),
        rule("org.freedesktop.NetworkManager", "StateChanged", "/org/freedesktop/NetworkManager"),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return,
    };
    let sleep = zbus::MessageStream::for_match_rule(sleep_rule, &conn, QUEUE).await;
    let nm = zbus::MessageStream::for_match_rule(nm_rule, &conn, QUEUE).await;
    let (Ok(mut sleep), Ok(mut nm)) = (sleep, nm) else {
        debug!("cannot subscribe to logind or NetworkManager signals");
        return;
    };
    debug!("watching logind and NetworkManager on the system bus");
    loop {
        let event = tokio::select! {
            m = sleep.next() => match m {
                Some(Ok(msg)) => match msg.body().deserialize::<bool>() {
                    Ok(false) => Some(Outside::Resumed),
                    _ => None,
                },
                Some(Err(_)) => None,
                None => return,
            },
            m = nm.next() => match m {
                Some(Ok(msg)) => match msg.body().deserialize::<u32>() {
                    Ok(state) if state >= NM_CONNECTED_GLOBAL => Some(Outside::NetworkUp),
                    _ => None,
                },
                Some(Err(_)) => None,
                None => return,
            },
            _ = tx.closed() => return,
        };
        if let Some(e) = event {
            info!(event = ?e, "system event");
            if tx.send(e).is_err() {
                return;
            }
        }
    }
}

/// What a [`WallTimer`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WallEvent {
    /// The wall-clock instant it was armed for has come.
    Due,
    /// The wall clock was set; the timer must be armed again.
    ClockChanged,
}

/// A timer on the wall clock: a `CLOCK_REALTIME` timerfd armed at an absolute time with
/// `TFD_TIMER_CANCEL_ON_SET`. Unlike tokio's monotonic timers it fires at the right wall time
/// after a suspend, wakes the process exactly once (tokio's timer wheel steps a 60 s timer
/// down through its levels, three wakeups a minute), and reports clock changes.
#[derive(Debug)]
pub struct WallTimer {
    fd: AsyncFd<rustix::fd::OwnedFd>,
}

impl WallTimer {
    /// A new, unarmed timer; fails where timerfds are not available.
    pub fn new() -> std::io::Result<WallTimer> {
        use rustix::time::{TimerfdClockId, TimerfdFlags};
        let fd =
            rustix::time::timerfd_create(TimerfdClockId::Realtime, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)?;
        // `AsyncFd::new` is deprecated because an arbitrary `AsRawFd` may change its fd behind
        // tokio's back; an `OwnedFd` owned by the `AsyncFd` cannot, so the safe constructor is
        // sound here (the replacement, `register`, is `unsafe`, which this crate denies).
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd)?;
        Ok(WallTimer { fd })
    }

    /// Arms the timer for `at`, Unix seconds on the system's wall clock.
    pub fn arm(&self, at: f64) -> std::io::Result<()> {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec};
        let at = if at.is_finite() { at.max(1.0) } else { 1.0 };
        let spec = Itimerspec {
            it_interval: Timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: Timespec { tv_sec: at.floor() as i64, tv_nsec: ((at.fract()) * 1e9) as i64 },
        };
        rustix::time::timerfd_settime(
            self.fd.get_ref(),
            TimerfdTimerFlags::ABSTIME | TimerfdTimerFlags::CANCEL_ON_SET,
            &spec,
        )?;
        Ok(())
    }

    /// Waits until the armed instant, or until the wall clock is set.
    pub async fn wait(&self) -> std::io::Result<WallEvent> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8];
            match rustix::io::read(self.fd.get_ref(), &mut buf) {
                Ok(_) => return Ok(WallEvent::Due),
                Err(rustix::io::Errno::CANCELED) => return Ok(WallEvent::ClockChanged),
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}
