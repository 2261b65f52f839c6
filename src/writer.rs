//! The store's one writer: a task that writes state files on the blocking pool, so the loop
//! never waits on a disk (an fsync takes milliseconds). Writes of the same file land in the
//! order the loop asked for them (a later write never lands before an earlier one); writes
//! of different files go in parallel, at most [`PARALLEL`] at a time, so that 10,000
//! refreshes do not queue behind one another's fsyncs.
//!
//! Each request returns a future that resolves once its write is done (or failed, with the
//! reason); the loop awaits the ones that order matters for (a reservation before its login,
//! a success before its answer) and lets the others go. Failures are logged here, with the
//! path and never a secret.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::store::{SessionRecord, Store};

/// One write.
#[derive(Debug)]
enum Write {
    Session(Box<SessionRecord>),
    Logins(String, Vec<f64>),
    Remove(String),
    /// Nothing: answered when every earlier write is done.
    Flush,
}

/// Writes at most this many files at once.
pub const PARALLEL: usize = 8;

/// Where a write's result goes.
type Done = oneshot::Sender<Result<(), String>>;

#[derive(Debug)]
struct Job {
    write: Write,
    done: Done,
}

/// The file a write goes to: writes of one key stay in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Session(String),
    Logins(String),
}

impl Write {
    fn key(&self) -> Option<Key> {
        match self {
            Write::Session(rec) => Some(Key::Session(rec.id.clone())),
            Write::Remove(id) => Some(Key::Session(id.clone())),
            Write::Logins(uid, _) => Some(Key::Logins(uid.clone())),
            Write::Flush => None,
        }
    }
}

/// The writer task's state: per key, the jobs not started yet.
struct Queues {
    store: Store,
    on_failure: OnFailure,
    jobs: HashMap<Key, VecDeque<Job>>,
    /// Keys with a job running or waiting for a slot: at most one job of a key runs.
    busy: HashSet<Key>,
    /// Keys whose front job waits for a free slot.
    waiting: VecDeque<Key>,
    running: JoinSet<(Key, Done, Result<(), String>)>,
    /// Callers of `flush`, answered once nothing is left.
    flushes: Vec<Done>,
}

impl Queues {
    fn push(&mut self, job: Job) {
        let Some(key) = job.write.key() else {
            self.flushes.push(job.done);
            self.answer_flushes();
            return;
        };
        self.jobs.entry(key.clone()).or_default().push_back(job);
        if self.busy.insert(key.clone()) {
            self.waiting.push_back(key);
            self.start_waiting();
        }
    }

    fn start_waiting(&mut self) {
        while self.running.len() < PARALLEL {
            let Some(key) = self.waiting.pop_front() else { return };
            let Some(job) = self.jobs.get_mut(&key).and_then(VecDeque::pop_front) else {
                self.busy.remove(&key);
                continue;
            };
            let (store, on_failure) = (self.store.clone(), self.on_failure.clone());
            self.running.spawn_blocking(move || {
                let Job { write, done } = job;
                // A panic must not leave the key busy for ever (its later writes and any
                // flush would wait on it): it becomes this write's error.
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write_one(&store, write, &on_failure)))
                        .unwrap_or_else(|_| Err("the state write panicked".to_owned()));
                (key, done, result)
            });
        }
    }

    fn finished(&mut self, key: Key, done: Done, result: Result<(), String>) {
        let _ = done.send(result);
        match self.jobs.get(&key) {
            // The key stays busy: its next job waits for a slot.
            Some(q) if !q.is_empty() => self.waiting.push_back(key),
            _ => {
                self.jobs.remove(&key);
                self.busy.remove(&key);
            }
        }
        self.start_waiting();
        self.answer_flushes();
    }

    fn answer_flushes(&mut self) {
        if self.busy.is_empty() && self.running.is_empty() {
            for f in self.flushes.drain(..) {
                let _ = f.send(Ok(()));
            }
        }
    }
}

/// Called with a session id when writing its record failed.
type OnFailure = Arc<dyn Fn(&str) + Send + Sync>;

/// The handle on the writer task; without a store, every write succeeds at once.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: Option<mpsc::UnboundedSender<Job>>,
}

impl Writer {
    /// Starts the writer task for `store` (on the current tokio runtime); `on_failure` hears
    /// of records that could not be written.
    pub fn spawn(store: Option<Store>, on_failure: impl Fn(&str) + Send + Sync + 'static) -> std::io::Result<Writer> {
        let Some(store) = store else { return Ok(Writer { tx: None }) };
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let on_failure: OnFailure = Arc::new(on_failure);
        let mut q = Queues {
            store,
            on_failure,
            jobs: HashMap::new(),
            busy: HashSet::new(),
            waiting: VecDeque::new(),
            running: JoinSet::new(),
            flushes: Vec::new(),
        };
        tokio::spawn(async move {
            let mut open = true;
            while open || !q.running.is_empty() {
                tokio::select! {
                    job = rx.recv(), if open => match job {
                        Some(job) => q.push(job),
                        None => open = false,
                    },
                    Some(done) = q.running.join_next(), if !q.running.is_empty() => match done {
                        Ok((key, done, result)) => q.finished(key, done, result),
                        // Only when the runtime shuts down (panics are caught above).
                        Err(e) => tracing::error!(error = %e, "a state write was cancelled"),
                    },
                }
            }
        });
        Ok(Writer { tx: Some(tx) })
    }

    fn send(&self, write: Write) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        let sent = match &self.tx {
            Some(tx) => tx.send(Job { write, done }).map_err(|_| "the state writer stopped".to_owned()),
            None => done.send(Ok(())).map_err(|_| "unreachable".to_owned()),
        };
        async move {
            sent?;
            rx.await.unwrap_or_else(|_| Err("the state writer stopped".into()))
        }
    }

    /// Writes a session's record.
    pub fn save_session(&self, rec: SessionRecord) -> impl Future<Output = Result<(), String>> + Send + 'static {
        self.send(Write::Session(Box::new(rec)))
    }

    /// Writes a user's login history.
    pub fn save_logins(
        &self,
        uid: String,
        logins: Vec<f64>,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        self.send(Write::Logins(uid, logins))
    }

    /// Deletes a session's state.
    pub fn remove_session(&self, id: String) -> impl Future<Output = Result<(), String>> + Send + 'static {
        self.send(Write::Remove(id))
    }

    /// Resolves when every write asked for so far is done.
    pub fn flush(&self) -> impl Future<Output = Result<(), String>> + Send + 'static {
        self.send(Write::Flush)
    }
}

fn write_one(store: &Store, write: Write, on_failure: &OnFailure) -> Result<(), String> {
    let (result, session) = match write {
        Write::Session(rec) => (store.save_session(&rec), Some(rec.id.clone())),
        Write::Logins(uid, logins) => (store.save_logins(&uid, &logins), None),
        Write::Remove(id) => (store.remove_session(&id), None),
        Write::Flush => (Ok(()), None),
    };
    result.map_err(|e| {
        tracing::error!(error = %e, "cannot save the state; it is kept in memory and written again at shutdown");
        if let Some(id) = session {
            on_failure(&id);
        }
        e.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_of_one_file_land_in_order_and_flush_waits_for_all() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::spawn(Some(Store::open(dir.path()).unwrap()), |_| {}).unwrap();
        for i in 0..40 {
            for id in ["a", "b", "c"] {
                let rec = SessionRecord { id: id.into(), username: format!("v{i}"), ..Default::default() };
                drop(w.save_session(rec));
            }
            drop(w.save_logins("user-0001".into(), vec![f64::from(i)]));
        }
        w.flush().await.unwrap();
        for id in ["a", "b", "c"] {
            let text = std::fs::read_to_string(dir.path().join(format!("sessions/{id}.json"))).unwrap();
            let rec: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(rec["username"], "v39", "{id}: the last write won");
        }
        let text = std::fs::read_to_string(dir.path().join("logins/user-0001.json")).unwrap();
        assert!(text.contains("39"), "{text}");
        // A removal after a save of the same session comes after it.
        drop(w.save_session(SessionRecord { id: "a".into(), ..Default::default() }));
        w.remove_session("a".into()).await.unwrap();
        assert!(!dir.path().join("sessions/a.json").exists());
    }
}
