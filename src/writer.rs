//! The store's one writer: a task that writes state files, one at a time on the blocking
//! pool, in the order the loop asks for them, so a later write of a file never lands before
//! an earlier one, and the loop never waits on a disk (an fsync takes milliseconds).
//!
//! Each request returns a future that resolves once its write is done (or failed, with the
//! reason); the loop awaits the ones that order matters for (a reservation before its login,
//! a success before its answer) and lets the others go. Failures are logged here, with the
//! path and never a secret.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

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

#[derive(Debug)]
struct Job {
    write: Write,
    done: oneshot::Sender<Result<(), String>>,
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
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let (store, on_failure) = (store.clone(), on_failure.clone());
                let result = tokio::task::spawn_blocking(move || write(&store, job.write, &on_failure))
                    .await
                    .unwrap_or_else(|e| Err(format!("the state writer failed: {e}")));
                let _ = job.done.send(result);
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

fn write(store: &Store, write: Write, on_failure: &OnFailure) -> Result<(), String> {
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
