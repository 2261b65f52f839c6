//! The one loop that owns every session (the system76-scheduler shape: events in, snapshots
//! out).
//!
//! Everything reaches it as an [`Event`]: D-Bus calls with their reply channel, the sweep,
//! resume, network and clock events, reloads, and what it started itself (finished attempts,
//! writes that reached the disk). It owns the sessions' [`Core`]s, the login [`Ledger`] and
//! the deadline queue ([`Timers`]); it steps a session's core and carries out the effects:
//! attempts run as futures in one `JoinSet`, writes go in order to the store's one writer
//! thread, snapshots are published (an `ArcSwap` per session), and changes and signals go
//! in order to the bus publisher as [`Update`]s. No lock guards session state: only this loop
//! touches it. Due deadlines come before queued calls, so callers cannot starve refreshes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::clock::{Clock, until};
use crate::error::{ApiError, ErrorName};
use crate::ledger::Ledger;
use crate::secret::Secret;
use crate::session::attempt::{self, Peers, Plan, Reservation};
use crate::session::core::{
    AttemptResult, CallId, Core, Ctx, Effect, Input, Persisted, Reply, Settings, Signal, Stamp,
};
use crate::session::{Credential, Definition, Origin, Params, Published, Snapshot, record};
use crate::sweep::SweepIndex;
use crate::timers::Timers;
use crate::writer::Writer;

/// Most sessions one daemon serves; `AddSession` beyond it is refused.
pub const MAX_SESSIONS: usize = 20_000;

/// What reaches the loop.
#[derive(Debug)]
pub enum Event {
    /// A D-Bus call to a session.
    Call(Arc<str>, Call),
    /// A D-Bus call to the manager.
    Manager(ManagerCall),
    /// The periodic `check_schedule` sweep.
    Sweep,
    /// Resume from suspend, or a wall-clock change: every session looks at the clock.
    Wake,
    /// Connectivity is back.
    NetworkUp,
    /// A new configuration (SIGHUP).
    Reload(Box<Reload>),
    /// A one-line summary, for `sd_notify` and logs.
    Status(oneshot::Sender<String>),
    /// Stop: cancel what is under way, flush, and answer when done.
    Shutdown(oneshot::Sender<()>),
    /// An attempt of the loop's ended.
    AttemptDone(Arc<str>, u64, Box<AttemptResult>),
    /// A success the loop committed reached the disk (or its write failed and was logged).
    Saved(Arc<str>, u64),
    /// The sweep read a waiting session's credential file stamp.
    CredentialChecked(Arc<str>, Option<Stamp>),
    /// A write of a session's record failed: it is written again at shutdown.
    Unsaved(Arc<str>),
}

/// A call to a session; the answer comes back on the channel.
#[derive(Debug)]
pub enum Call {
    /// `Refresh()`.
    Refresh(oneshot::Sender<Reply>),
    /// `EnsureValid(min_seconds)`.
    EnsureValid(u32, oneshot::Sender<Reply>),
    /// `LoginWithSignedRequest(signed_request)`.
    LoginSigned(Secret, oneshot::Sender<Reply>),
    /// `Cleanup()`.
    Cleanup(oneshot::Sender<Reply>),
}

/// A call to the manager.
#[derive(Debug)]
pub enum ManagerCall {
    /// Every session id, sorted.
    List(oneshot::Sender<Vec<Arc<str>>>),
    /// Whether a session exists.
    Exists(String, oneshot::Sender<bool>),
    /// `AddSession`: the snapshot channel of the new session (the bus serves its object).
    Add(Box<Definition>, oneshot::Sender<Result<Published, ApiError>>),
    /// `RemoveSession`.
    Remove(String, oneshot::Sender<Result<(), ApiError>>),
    /// Every session's snapshot (`GetManagedObjects`).
    Snapshots(oneshot::Sender<Vec<Snapshot>>),
}

/// What a reload changes.
#[derive(Debug)]
pub struct Reload {
    /// The sessions of the config file.
    pub sessions: Vec<Definition>,
    /// Policy.
    pub params: Params,
    /// The peers (a new backend URL, timeout, ...).
    pub peers: Arc<dyn Peers>,
    /// The credential of bus sessions added without one (`[backend] token_file`).
    pub default_credential: Credential,
    /// The config file, for messages.
    pub config_file: String,
}

/// What the loop tells the bus, in order.
#[derive(Debug)]
pub enum Update {
    /// A session's snapshot changed from the first to the second.
    Changed(Box<(Snapshot, Snapshot)>),
    /// A session's signal (its snapshot was published first).
    Signal(Arc<str>, Signal),
    /// A reload added a session: serve it and announce it.
    Added(Arc<str>, Published),
    /// A reload removed a session: stop serving it and announce it.
    Removed(Arc<str>),
}

/// One session as the loop holds it.
#[derive(Debug)]
struct Slot {
    core: Core,
    session: Arc<Definition>,
    snapshot: Published,
}

/// What the loop starts with.
#[derive(Debug)]
pub struct Setup {
    /// The login histories found on disk.
    pub ledger: Ledger,
    /// Policy.
    pub params: Params,
    /// The peers.
    pub peers: Arc<dyn Peers>,
    /// The credential of bus sessions added without one.
    pub default_credential: Credential,
    /// The config file, for messages.
    pub config_file: String,
    /// The installation's device id.
    pub device_id: Arc<str>,
    /// The wall clock.
    pub clock: Clock,
    /// The store's writer.
    pub writer: Writer,
    /// Where changes and signals go.
    pub updates: mpsc::UnboundedSender<Update>,
}

/// The loop's state.
#[derive(Debug)]
pub struct Engine {
    /// Boxed: a `BTreeMap` filled in key order leaves its nodes about half full, and a
    /// 450-byte slot in place would make that half 4 MiB with 10,000 sessions.
    sessions: BTreeMap<Arc<str>, Box<Slot>>,
    ledger: Ledger,
    timers: Timers<Instant>,
    /// What the sweep and the status line read instead of every session.
    sweep: SweepIndex,
    /// Sessions with an attempt under way or callers in line (what a shutdown cancels).
    busy: HashSet<Arc<str>>,
    /// Attempts under way and commits waiting for the disk; each yields an [`Event`].
    inflight: JoinSet<Event>,
    /// The attempt under way of each session, to cancel it.
    running: HashMap<Arc<str>, (u64, AbortHandle)>,
    /// Callers waiting for an answer.
    pending: HashMap<CallId, oneshot::Sender<Reply>>,
    next_call: CallId,
    /// Sessions whose last write failed.
    unsaved: HashSet<Arc<str>>,
    params: Params,
    peers: Arc<dyn Peers>,
    default_credential: Credential,
    config_file: String,
    device_id: Arc<str>,
    clock: Clock,
    writer: Writer,
    updates: mpsc::UnboundedSender<Update>,
}

/// `next_wake` (wall-clock seconds) as a deadline on tokio's clock.
fn deadline(next_wake: Option<f64>, now: f64) -> Option<Instant> {
    next_wake.map(|w| Instant::now() + until(now, w))
}

impl Engine {
    /// A loop with no sessions yet.
    pub fn new(s: Setup) -> Self {
        Engine {
            sessions: BTreeMap::new(),
            ledger: s.ledger,
            timers: Timers::default(),
            sweep: SweepIndex::default(),
            busy: HashSet::new(),
            inflight: JoinSet::new(),
            running: HashMap::new(),
            pending: HashMap::new(),
            next_call: 0,
            unsaved: HashSet::new(),
            params: s.params,
            peers: s.peers,
            default_credential: s.default_credential,
            config_file: s.config_file,
            device_id: s.device_id,
            clock: s.clock,
            writer: s.writer,
            updates: s.updates,
        }
    }

    fn settings(&self, session: &Definition) -> Settings {
        Settings {
            unique_user_id: Arc::from(session.profile.unique_user_id.as_str()),
            params: self.params,
            has_backend: self.peers.has_backend(),
        }
    }

    /// Adds a session (from the config, the state, `AddSession` or a reload) and returns its
    /// snapshot channel. It starts working at the loop's first turn.
    pub fn insert(&mut self, session: Definition, kept: Option<&Persisted>) -> Published {
        let now = self.clock.now();
        let settings = self.settings(&session);
        let core = match kept {
            Some(p) => Core::restore(settings, p, now),
            None => Core::new(settings),
        };
        let id: Arc<str> = Arc::from(session.id.as_str());
        let first = Snapshot::of(&id, &core, &self.ledger, now);
        self.sweep.track(&id, None, &first);
        let snapshot: Published = Arc::new(arc_swap::ArcSwap::from_pointee(first));
        self.timers.set(&id, deadline(core.next_wake(&self.ledger, now), now));
        self.sessions.insert(id, Box::new(Slot { core, session: Arc::new(session), snapshot: snapshot.clone() }));
        snapshot
    }

    /// Adds the sessions of the config file and those found in the state (`records`, by
    /// id); returns their snapshot channels, for the bus to serve.
    pub fn load(
        &mut self,
        configured: Vec<Definition>,
        mut records: BTreeMap<String, crate::store::SessionRecord>,
    ) -> Vec<(Arc<str>, Published)> {
        let mut out = Vec::with_capacity(configured.len() + records.len());
        for p in configured {
            let kept = records.remove(&p.id).and_then(|r| record::persisted(&r, &p.profile.unique_user_id));
            let id: Arc<str> = Arc::from(p.id.as_str());
            out.push((id, self.insert(p, kept.as_ref())));
        }
        for (id, mut rec) in records {
            // A record without a profile belonged to a configured session that left the
            // config file; it has nothing to serve.
            let Some(sp) = rec.profile.take() else { continue };
            let session = self.bus_session(&id, sp);
            let kept = record::persisted(&rec, &session.profile.unique_user_id);
            out.push((Arc::from(id.as_str()), self.insert(session, kept.as_ref())));
        }
        out
    }

    fn bus_session(&self, id: &str, p: crate::store::StoredProfile) -> Definition {
        Definition {
            id: id.to_owned(),
            profile: p.profile,
            credential: p.backend_token.map(Credential::Inline).unwrap_or_else(|| self.default_credential.clone()),
            origin: Origin::Bus,
        }
    }

    /// Runs until [`Event::Shutdown`] (or until every sender is gone).
    /// Returns itself, stopped and saved: the caller frees it, or exits without (see
    /// [`crate::daemon::Stopped`]).
    pub async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) -> Self {
        let sleep = tokio::time::sleep_until(Instant::now());
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        loop {
            let next = self.timers.earliest();
            if next != armed
                && let Some(at) = next
            {
                sleep.as_mut().reset(at);
            }
            armed = next;
            // Due deadlines come first, however many calls are queued.
            if next.is_some_and(|at| at <= Instant::now()) {
                self.fire_due();
                tokio::task::consume_budget().await;
                continue;
            }
            tokio::select! {
                biased;
                () = &mut sleep, if armed.is_some() => self.fire_due(),
                Some(done) = self.inflight.join_next(), if !self.inflight.is_empty() => match done {
                    Ok(event) => self.handle(event),
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => error!(error = %e, "an attempt failed unexpectedly"),
                },
                event = events.recv() => match event {
                    Some(Event::Shutdown(done)) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return self;
                    }
                    Some(event) => self.handle(event),
                    None => {
                        self.shutdown().await;
                        return self;
                    }
                },
            }
        }
    }

    fn fire_due(&mut self) {
        for id in self.timers.take_due(Instant::now()) {
            self.step(&id, Input::Tick);
        }
    }

    /// Handles one event (everything but `Shutdown`).
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Call(id, call) => self.call(&id, call),
            Event::Manager(call) => self.manager(call),
            Event::Sweep => self.sweep(),
            Event::Wake => self.each(|| Input::Tick),
            Event::NetworkUp => self.each(|| Input::NetworkUp),
            Event::Reload(r) => self.reload(*r),
            Event::Status(tx) => {
                let _ = tx.send(self.status_line());
            }
            Event::Shutdown(done) => {
                // Handled by `run`; answered here only when called directly.
                let _ = done.send(());
            }
            Event::AttemptDone(id, attempt, result) => {
                if self.running.get(&id).is_some_and(|(a, _)| *a == attempt) {
                    self.running.remove(&id);
                }
                self.step(&id, Input::AttemptDone(attempt, *result));
            }
            Event::Saved(id, attempt) => self.step(&id, Input::Saved(attempt)),
            Event::CredentialChecked(id, stamp) => self.step(&id, Input::CredentialChecked(stamp)),
            Event::Unsaved(id) => {
                self.unsaved.insert(id);
            }
        }
    }

    fn call(&mut self, id: &Arc<str>, call: Call) {
        if !self.sessions.contains_key(id) {
            let tx = match call {
                Call::Refresh(tx) | Call::EnsureValid(_, tx) | Call::LoginSigned(_, tx) | Call::Cleanup(tx) => tx,
            };
            let _ = tx.send(Reply::Err(ApiError::new(ErrorName::NoSuchSession, format!("no session {id:?}"))));
            return;
        }
        self.next_call += 1;
        let c = self.next_call;
        let (input, tx) = match call {
            Call::Refresh(tx) => (Input::Refresh(c), tx),
            Call::EnsureValid(min, tx) => (Input::EnsureValid(c, min), tx),
            Call::LoginSigned(s, tx) => (Input::LoginSigned(c, s), tx),
            Call::Cleanup(tx) => (Input::Cleanup(c), tx),
        };
        self.pending.insert(c, tx);
        self.step(id, input);
    }

    /// Steps every session (resume, clock change, network back; rare).
    fn each(&mut self, input: impl Fn() -> Input) {
        let ids: Vec<Arc<str>> = self.sessions.keys().cloned().collect();
        for id in ids {
            self.step(&id, input());
        }
    }

    /// The sweep wakes only the sessions whose wall-clock deadline passed unseen or that
    /// wait for a credential change, and reads no other (see `sweep.rs`).
    fn sweep(&mut self) {
        let now = self.clock.now();
        for id in self.sweep.take_due(now) {
            let Some(slot) = self.sessions.get(&id) else { continue };
            let src = match (&slot.session.credential, slot.core.waits_for_change()) {
                (Credential::Source(src), true) => Some(src.clone()),
                _ => None,
            };
            match src {
                // Read off this thread: a hung network home must not stall the loop.
                Some(src) => {
                    let sid = id.clone();
                    self.inflight.spawn(async move { Event::CredentialChecked(sid, attempt::read_stamp(&src).await) });
                }
                // Due by the index's invariant: its instant passed, or it is looked at always.
                None => self.step(&id, Input::Tick),
            }
            if let Some(slot) = self.sessions.get(&id) {
                self.sweep.put_back(&id, &slot.snapshot.load());
            }
        }
    }

    /// Steps one session and carries out the effects, then publishes and re-arms it.
    fn step(&mut self, id: &Arc<str>, input: Input) {
        let now = self.clock.now();
        let Some(slot) = self.sessions.get_mut(id) else { return };
        // Every line the core logs names its session.
        let _span = tracing::info_span!("session", session = %id).entered();
        let mut cx = Ctx { now, u: rand::random(), ledger: &mut self.ledger };
        let effects = slot.core.step(input, &mut cx);
        let mut reservation: Option<Reservation> = None;
        for effect in effects {
            self.effect(id, effect, &mut reservation);
        }
        self.publish(id, now);
        if let Some(slot) = self.sessions.get(id) {
            self.timers.set(id, deadline(slot.core.next_wake(&self.ledger, now), now));
            if slot.core.busy() {
                self.busy.insert(id.clone());
            } else {
                self.busy.remove(id);
            }
        }
    }

    fn effect(&mut self, id: &Arc<str>, effect: Effect, reservation: &mut Option<Reservation>) {
        let Some(slot) = self.sessions.get(id) else { return };
        match effect {
            Effect::SaveLedger => {
                let uid = slot.core.unique_user_id().to_string();
                let history = self.ledger.history(&uid);
                *reservation = Some(Box::pin(self.writer.save_logins(uid, history)));
            }
            Effect::Start(attempt, kind) => {
                let plan = Plan {
                    kind,
                    session: slot.session.clone(),
                    device_id: self.device_id.clone(),
                    peers: self.peers.clone(),
                    clock: self.clock.clone(),
                };
                let res = reservation.take().unwrap_or_else(|| Box::pin(async { Ok(()) }));
                let sid = id.clone();
                let handle = self
                    .inflight
                    .spawn(async move { Event::AttemptDone(sid, attempt, Box::new(attempt::run(plan, res).await)) });
                self.running.insert(id.clone(), (attempt, handle));
            }
            Effect::Cancel(attempt) => {
                if let Some((a, handle)) = self.running.remove(id) {
                    if a == attempt {
                        handle.abort();
                    } else {
                        self.running.insert(id.clone(), (a, handle));
                    }
                }
            }
            Effect::Save => {
                let rec = record::to_record(&slot.session, &slot.core.persisted());
                drop(self.writer.save_session(rec));
            }
            Effect::Commit(attempt, persisted) => {
                let uid = slot.core.unique_user_id().to_string();
                let rec = record::to_record(&slot.session, &persisted);
                let logins = self.writer.save_logins(uid.clone(), self.ledger.history(&uid));
                let session = self.writer.save_session(rec);
                let sid = id.clone();
                // Different files are written in parallel: wait for both.
                self.inflight.spawn(async move {
                    let _ = futures_util::future::join(logins, session).await;
                    Event::Saved(sid, attempt)
                });
            }
            Effect::Signal(signal) => {
                self.publish(id, self.clock.now());
                let _ = self.updates.send(Update::Signal(id.clone(), signal));
            }
            Effect::Reply(call, reply) => {
                if let Some(tx) = self.pending.remove(&call) {
                    let _ = tx.send(reply);
                }
            }
        }
    }

    /// Publishes the session's snapshot when it changed.
    fn publish(&mut self, id: &Arc<str>, now: f64) {
        let Some(slot) = self.sessions.get(id) else { return };
        let snap = Snapshot::of(id, &slot.core, &self.ledger, now);
        if **slot.snapshot.load() == snap {
            return;
        }
        let old = slot.snapshot.swap(Arc::new(snap.clone()));
        self.sweep.track(id, Some(&old), &snap);
        let _ = self.updates.send(Update::Changed(Box::new((Arc::unwrap_or_clone(old), snap))));
    }

    fn manager(&mut self, call: ManagerCall) {
        match call {
            ManagerCall::List(tx) => {
                let _ = tx.send(self.sessions.keys().cloned().collect());
            }
            ManagerCall::Exists(id, tx) => {
                let _ = tx.send(self.sessions.contains_key(id.as_str()));
            }
            ManagerCall::Snapshots(tx) => {
                let _ = tx.send(self.sessions.values().map(|s| Snapshot::clone(&s.snapshot.load())).collect());
            }
            ManagerCall::Add(profile, tx) => {
                let _ = tx.send(self.add(*profile));
            }
            ManagerCall::Remove(id, tx) => {
                let _ = tx.send(self.remove_by_client(&id));
            }
        }
    }

    fn add(&mut self, session: Definition) -> Result<Published, ApiError> {
        if self.sessions.contains_key(session.id.as_str()) {
            return Err(ApiError::new(ErrorName::AlreadyExists, format!("session {:?} exists", session.id)));
        }
        if self.sessions.len() >= MAX_SESSIONS {
            return Err(ApiError::new(ErrorName::InvalidArgument, format!("at most {MAX_SESSIONS} sessions")));
        }
        info!(session = %session.id, unique_user_id = %session.profile.unique_user_id, "session added over D-Bus");
        let id: Arc<str> = Arc::from(session.id.as_str());
        let rx = self.insert(session, None);
        self.step(&id, Input::Tick);
        if let Some(slot) = self.sessions.get(&id) {
            // Persisted at once: a session added over D-Bus lives in the state.
            drop(self.writer.save_session(record::to_record(&slot.session, &slot.core.persisted())));
        }
        Ok(rx)
    }

    fn remove_by_client(&mut self, id: &str) -> Result<(), ApiError> {
        let Some(slot) = self.sessions.get(id) else {
            return Err(crate::bus::no_such_session(id));
        };
        if slot.session.origin == Origin::Config {
            return Err(ApiError::new(
                ErrorName::InvalidArgument,
                format!(
                    "session {id:?} is defined in the config file {}; remove it there and reload \
                     (systemctl --user reload entrupy-tokend)",
                    self.config_file
                ),
            ));
        }
        self.forget(id, "cancelled: the session was removed");
        Ok(())
    }

    /// Removes a session: cancels what is under way and deletes its state.
    fn forget(&mut self, id: &str, why: &str) {
        let Some(id) = self.sessions.get_key_value(id).map(|(k, _)| k.clone()) else { return };
        self.step(&id, Input::Stop(why.to_owned()));
        if let Some(slot) = self.sessions.remove(&id) {
            self.sweep.forget(&id, &slot.snapshot.load());
        }
        self.busy.remove(&id);
        self.timers.set(&id, None);
        self.unsaved.remove(&id);
        drop(self.writer.remove_session(id.to_string()));
        info!(session = %id, "session removed");
    }

    fn reload(&mut self, r: Reload) {
        self.params = r.params;
        self.peers = r.peers;
        self.default_credential = r.default_credential;
        self.config_file = r.config_file;
        let wanted: BTreeMap<String, Definition> = r.sessions.into_iter().map(|p| (p.id.clone(), p)).collect();
        // Configured sessions that left the file go as `RemoveSession` would remove them.
        let gone: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|(id, s)| s.session.origin == Origin::Config && !wanted.contains_key(id.as_ref()))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.forget(&id, "cancelled: the session left the configuration");
            let _ = self.updates.send(Update::Removed(id));
        }
        let ids: Vec<Arc<str>> = self.sessions.keys().cloned().collect();
        for id in ids {
            let Some(slot) = self.sessions.get_mut(&id) else { continue };
            let session = match wanted.get(id.as_ref()) {
                Some(p) => p.clone(),
                None => {
                    let mut p = (*slot.session).clone();
                    if !matches!(p.credential, Credential::Inline(_)) {
                        p.credential = self.default_credential.clone();
                    }
                    p
                }
            };
            let settings = self.settings(&session);
            if let Some(slot) = self.sessions.get_mut(&id) {
                slot.session = Arc::new(session);
            }
            self.step(&id, Input::Reconfigure(settings));
        }
        for (id, p) in wanted {
            if self.sessions.contains_key(id.as_str()) {
                continue;
            }
            info!(session = %id, "session added by the configuration");
            let rx = self.insert(p, None);
            let id: Arc<str> = Arc::from(id.as_str());
            let _ = self.updates.send(Update::Added(id.clone(), rx));
            self.step(&id, Input::Tick);
        }
        info!(sessions = self.sessions.len(), "configuration reloaded");
    }

    /// A one-line summary for `sd_notify` STATUS and logs (from the counts kept as
    /// sessions change: it reads no session).
    pub fn status_line(&self) -> String {
        if self.sessions.is_empty() {
            return "no sessions configured".to_owned();
        }
        let mut parts: Vec<(&'static str, usize)> =
            self.sweep.counts().filter(|(_, n)| *n > 0).map(|(state, n)| (state.as_str(), n)).collect();
        parts.sort_unstable();
        let parts: Vec<String> = parts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        format!("{} session(s): {}", self.sessions.len(), parts.join(", "))
    }

    /// Cancels what is under way, writes what could not be written before, and waits for
    /// the writer. Every change was written when it happened, so a daemon with 10,000
    /// sessions stops without 10,000 writes.
    async fn shutdown(&mut self) {
        // Only a session with an attempt or callers in line has anything to cancel.
        let busy: Vec<Arc<str>> = self.busy.iter().cloned().collect();
        for id in busy {
            self.step(&id, Input::Stop("cancelled: the daemon is shutting down".into()));
        }
        self.inflight.abort_all();
        for id in std::mem::take(&mut self.unsaved) {
            if let Some(slot) = self.sessions.get(&id) {
                drop(self.writer.save_session(record::to_record(&slot.session, &slot.core.persisted())));
            }
        }
        if let Err(e) = self.writer.flush().await {
            warn!(error = %e, "the state writer stopped early");
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
