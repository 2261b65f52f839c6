//! Outside events that tell the daemon to look at the wall clock again or retry now:
//! logind's `PrepareForSleep(false)` (resume) and NetworkManager's `StateChanged` (network
//! back) on the system bus, and changes of the wall clock itself (a `CLOCK_REALTIME` timerfd
//! armed with `TFD_TIMER_CANCEL_ON_SET`, which the kernel cancels whenever the clock is set).
//!
//! None of them is relied on alone: the cron sweep and each session's own timer still run.
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
    let conn = match builder {
        Ok(b) => b.build().await,
        Err(e) => Err(e),
    };
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "no system bus: resume and network changes are caught by the sweep only");
            return;
        }
    };
    let rule =
        |iface: &'static str, member: &'static str, path: &'static str| -> zbus::Result<zbus::MatchRule<'static>> {
            Ok(zbus::MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .interface(iface)?
                .member(member)?
                .path(path)?
                .build())
        };
    let (sleep_rule, nm_rule) = match (
        rule("org.freedesktop.login1.Manager", "PrepareForSleep", "/org/freedesktop/login1"),
        rule("org.freedesktop.NetworkManager", "StateChanged", "/org/freedesktop/NetworkManager"),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return,
    };
    let sleep = zbus::MessageStream::for_match_rule(sleep_rule, &conn, Some(16)).await;
    let nm = zbus::MessageStream::for_match_rule(nm_rule, &conn, Some(16)).await;
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

/// Reports every change of the wall clock until `tx` closes. Returns at once (logged) when
/// timerfds are not available.
pub async fn clock_changes(tx: mpsc::UnboundedSender<Outside>) {
    use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
    let fd =
        match rustix::time::timerfd_create(TimerfdClockId::Realtime, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC) {
            Ok(fd) => fd,
            Err(e) => {
                debug!(error = %e, "no timerfd: clock changes are caught by the sweep only");
                return;
            }
        };
    let arm = |fd: &rustix::fd::OwnedFd| -> rustix::io::Result<()> {
        // An absolute expiry a year ahead: it never fires in practice, but the kernel
        // cancels it (ECANCELED on read) whenever the realtime clock is set.
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
        let spec = Itimerspec {
            it_interval: Timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: Timespec { tv_sec: now.tv_sec + 365 * 86_400, tv_nsec: 0 },
        };
        rustix::time::timerfd_settime(fd, TimerfdTimerFlags::ABSTIME | TimerfdTimerFlags::CANCEL_ON_SET, &spec)
            .map(|_| ())
    };
    if let Err(e) = arm(&fd) {
        debug!(error = %e, "cannot arm the clock-change timer");
        return;
    }
    // `AsyncFd::new` is deprecated because an arbitrary `AsRawFd` may change its fd behind
    // tokio's back; an `OwnedFd` owned by the `AsyncFd` cannot, so the safe constructor is
    // sound here (the replacement, `register`, is `unsafe`, which this crate denies).
    #[allow(deprecated)]
    let afd = match AsyncFd::new(fd) {
        Ok(a) => a,
        Err(e) => {
            debug!(error = %e, "cannot register the clock-change timer");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            g = afd.readable() => match g {
                Ok(g) => g,
                Err(_) => return,
            },
            _ = tx.closed() => return,
        };
        let mut buf = [0u8; 8];
        match rustix::io::read(afd.get_ref(), &mut buf) {
            Err(rustix::io::Errno::CANCELED) => {
                info!("the wall clock was changed");
                if tx.send(Outside::ClockChanged).is_err() {
                    return;
                }
                if arm(afd.get_ref()).is_err() {
                    return;
                }
            }
            Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
            Ok(_) => {
                if arm(afd.get_ref()).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}
