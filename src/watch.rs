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
use tracing::debug;

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

/// The name whose owner may announce a resume.
pub const LOGIND: &str = "org.freedesktop.login1";

/// The name whose owner may announce that the network is back.
pub const NETWORK_MANAGER: &str = "org.freedesktop.NetworkManager";

/// The bus itself, the only sender of `NameOwnerChanged` to believe (no client can own it).
const BUS_DRIVER: &str = "org.freedesktop.DBus";

/// The unique names that currently own [`LOGIND`] and [`NETWORK_MANAGER`], as the bus told
/// them. Any local user may send a signal with logind's path, interface and member, even to
/// the daemon's connection alone (a directed signal passes every match rule), so a signal
/// counts only when its sender is the owner of the name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Owners {
    /// The owner of [`LOGIND`].
    pub logind: Option<String>,
    /// The owner of [`NETWORK_MANAGER`].
    pub network_manager: Option<String>,
}

impl Owners {
    /// Takes in a message on the `NameOwnerChanged` subscription: only the bus's own, and only
    /// for the two names.
    pub fn update(&mut self, msg: &zbus::Message) {
        let hdr = msg.header();
        if hdr.sender().map(|s| s.as_str()) != Some(BUS_DRIVER)
            || hdr.member().map(|m| m.as_str()) != Some("NameOwnerChanged")
        {
            return;
        }
        let body = msg.body();
        let Ok((name, _old, new)) = body.deserialize::<(&str, &str, &str)>() else { return };
        let new = (!new.is_empty()).then(|| new.to_owned());
        match name {
            LOGIND => self.logind = new,
            NETWORK_MANAGER => self.network_manager = new,
            _ => {}
        }
    }

    /// What a logind or NetworkManager signal means, if it came from the name's owner.
    pub fn judge(&self, msg: &zbus::Message) -> Option<Outside> {
        let hdr = msg.header();
        let sender = hdr.sender()?.as_str();
        match (hdr.interface()?.as_str(), hdr.member()?.as_str()) {
            ("org.freedesktop.login1.Manager", "PrepareForSleep") => {
                let from_owner = self.logind.as_deref() == Some(sender);
                match msg.body().deserialize::<bool>() {
                    Ok(false) if from_owner => Some(Outside::Resumed),
                    _ => ignored(sender, from_owner),
                }
            }
            ("org.freedesktop.NetworkManager", "StateChanged") => {
                let from_owner = self.network_manager.as_deref() == Some(sender);
                match msg.body().deserialize::<u32>() {
                    Ok(state) if from_owner && state >= NM_CONNECTED_GLOBAL => Some(Outside::NetworkUp),
                    _ => ignored(sender, from_owner),
                }
            }
            _ => None,
        }
    }
}

/// Notes a signal that is not acted on; one from a non-owner is said at debug level only (a
/// flood of them must not fill the journal).
fn ignored(sender: &str, from_owner: bool) -> Option<Outside> {
    if !from_owner {
        debug!(sender, "ignored a system signal from a connection that does not own the name");
    }
    None
}

/// The current owner of `name`, `None` when it has none (or the bus cannot say).
async fn owner_of(dbus: &zbus::fdo::DBusProxy<'_>, name: &'static str) -> Option<String> {
    let name = zbus::names::BusName::try_from(name).ok()?;
    dbus.get_name_owner(name).await.ok().map(|u| u.to_string())
}

/// Connects to the system bus and subscribes to the owner changes of logind and
/// NetworkManager and to their signals, in that order; `None` without a system bus.
async fn subscribe(which: &SystemBus) -> Option<(zbus::Connection, [zbus::MessageStream; 4])> {
    let builder = match which {
        SystemBus::Off => return None,
        SystemBus::Default => zbus::connection::Builder::system(),
        SystemBus::Address(a) => zbus::connection::Builder::address(a.as_str()),
    };
    let conn = match builder.build().await {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "no system bus: resume and network changes are caught by the sweep only");
            return None;
        }
    };
    // `sender` makes the bus deliver only the owner's broadcasts (defence in depth: it
    // resolves the name when it routes, and a signal sent to the daemon's connection alone
    // passes any match rule), so [`Owners`] decides.
    let signal = |sender: &'static str, iface: &'static str, member: &'static str, path: &'static str| {
        zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(sender)
            .interface(iface)
            .member(member)
            .path(path)
            .build()
    };
    let owner_changed = |name: &'static str| {
        zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(BUS_DRIVER)
            .interface(BUS_DRIVER)
            .member("NameOwnerChanged")
            .path("/org/freedesktop/DBus")
            .arg(0, name)
            .build()
    };
    let rules = (
        owner_changed(LOGIND),
        owner_changed(NETWORK_MANAGER),
        signal(LOGIND, "org.freedesktop.login1.Manager", "PrepareForSleep", "/org/freedesktop/login1"),
        signal(NETWORK_MANAGER, "org.freedesktop.NetworkManager", "StateChanged", "/org/freedesktop/NetworkManager"),
    );
    let (Ok(logind_owner), Ok(nm_owner), Ok(sleep), Ok(nm)) = rules else { return None };
    let subscribe = |rule| zbus::MessageStream::for_match_rule(rule, &conn, QUEUE);
    let streams =
        (subscribe(logind_owner).await, subscribe(nm_owner).await, subscribe(sleep).await, subscribe(nm).await);
    let (Ok(logind_owner), Ok(nm_owner), Ok(sleep), Ok(nm)) = streams else {
        debug!("cannot subscribe to logind or NetworkManager signals");
        return None;
    };
    Some((conn, [logind_owner, nm_owner, sleep, nm]))
}

/// Watches logind and NetworkManager on the system bus until `tx` closes. Without a system
/// bus it returns at once (logged at debug level): nothing breaks.
pub async fn system_bus(which: SystemBus, tx: mpsc::UnboundedSender<Outside>) {
    let Some((conn, [mut logind_owner, mut nm_owner, mut sleep, mut nm])) = subscribe(&which).await else { return };
    // Subscribed first, asked second: a change in between is in the streams, and applying it
    // after the answer ends at the same owner.
    let Ok(dbus) = zbus::fdo::DBusProxy::new(&conn).await else { return };
    let mut owners =
        Owners { logind: owner_of(&dbus, LOGIND).await, network_manager: owner_of(&dbus, NETWORK_MANAGER).await };
    debug!(logind = ?owners.logind, network_manager = ?owners.network_manager, "watching logind and NetworkManager on the system bus");
    loop {
        // Biased: the connection hands each message to its streams in the order it arrived,
        // so with the owner changes polled first, a new owner is known before its first signal.
        let event = tokio::select! {
            biased;
            _ = tx.closed() => return,
            m = logind_owner.next() => {
                match m {
                    Some(Ok(msg)) => owners.update(&msg),
                    Some(Err(_)) => {}
                    None => return,
                }
                None
            }
            m = nm_owner.next() => {
                match m {
                    Some(Ok(msg)) => owners.update(&msg),
                    Some(Err(_)) => {}
                    None => return,
                }
                None
            }
            m = sleep.next() => match m {
                Some(Ok(msg)) => owners.judge(&msg),
                Some(Err(_)) => None,
                None => return,
            },
            m = nm.next() => match m {
                Some(Ok(msg)) => owners.judge(&msg),
                Some(Err(_)) => None,
                None => return,
            },
        };
        if let Some(e) = event {
            debug!(event = ?e, "system event");
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sleep_signal(sender: &str, going_down: bool) -> zbus::Message {
        zbus::Message::signal("/org/freedesktop/login1", "org.freedesktop.login1.Manager", "PrepareForSleep")
            .sender(sender)
            .build(&(going_down,))
            .unwrap()
    }

    fn nm_signal(sender: &str, state: u32) -> zbus::Message {
        zbus::Message::signal("/org/freedesktop/NetworkManager", "org.freedesktop.NetworkManager", "StateChanged")
            .sender(sender)
            .build(&(state,))
            .unwrap()
    }

    fn owner_changed(sender: &str, name: &str, old: &str, new: &str) -> zbus::Message {
        zbus::Message::signal("/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged")
            .sender(sender)
            .build(&(name, old, new))
            .unwrap()
    }

    #[test]
    fn only_the_owner_of_the_name_is_heard() {
        let mut owners = Owners::default();
        // No owner known: nobody is heard.
        assert_eq!(owners.judge(&sleep_signal(":1.5", false)), None);
        assert_eq!(owners.judge(&nm_signal(":1.6", 70)), None);
        owners.update(&owner_changed(BUS_DRIVER, LOGIND, "", ":1.5"));
        owners.update(&owner_changed(BUS_DRIVER, NETWORK_MANAGER, "", ":1.6"));
        assert_eq!(owners.judge(&sleep_signal(":1.5", false)), Some(Outside::Resumed));
        assert_eq!(owners.judge(&sleep_signal(":1.5", true)), None, "going to sleep is no resume");
        assert_eq!(owners.judge(&sleep_signal(":1.9", false)), None, "an impostor");
        assert_eq!(owners.judge(&sleep_signal(":1.6", false)), None, "NetworkManager does not own login1");
        assert_eq!(owners.judge(&nm_signal(":1.6", 70)), Some(Outside::NetworkUp));
        assert_eq!(owners.judge(&nm_signal(":1.6", 60)), None, "not connected globally");
        assert_eq!(owners.judge(&nm_signal(":1.9", 70)), None, "an impostor");
        // The owner leaves: its old unique name (never reused) is not heard any more.
        owners.update(&owner_changed(BUS_DRIVER, LOGIND, ":1.5", ""));
        assert_eq!(owners.logind, None);
        assert_eq!(owners.judge(&sleep_signal(":1.5", false)), None);
    }

    #[test]
    fn only_the_bus_tells_who_owns_a_name() {
        let mut owners = Owners { logind: Some(":1.5".into()), network_manager: Some(":1.6".into()) };
        let before = owners.clone();
        // A fake NameOwnerChanged from a client (sent to the daemon alone, it passes the match
        // rule) changes nothing.
        owners.update(&owner_changed(":1.9", LOGIND, ":1.5", ":1.9"));
        owners.update(&owner_changed(":1.9", NETWORK_MANAGER, ":1.6", ":1.9"));
        assert_eq!(owners, before);
        // Other names are not tracked.
        owners.update(&owner_changed(BUS_DRIVER, "org.example.Other", "", ":1.9"));
        assert_eq!(owners, before);
        owners.update(&owner_changed(BUS_DRIVER, NETWORK_MANAGER, ":1.6", ":1.7"));
        assert_eq!(owners.network_manager.as_deref(), Some(":1.7"));
        assert_eq!(owners.judge(&nm_signal(":1.6", 70)), None);
        assert_eq!(owners.judge(&nm_signal(":1.7", 70)), Some(Outside::NetworkUp));
    }
}
