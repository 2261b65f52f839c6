//! One login attempt as a future the loop drives: read the credential, have the backend
//! sign a fresh authorization request, wait for the budget reservation to be on disk, log in
//! to Entrupy, and classify the result for the core.
//!
//! The peers are behind [`Peers`] so that the loop's tests can answer with a fake one; the
//! daemon uses [`Clients`](crate::http::Clients). Nothing here changes a session: the result
//! goes back to the loop as an event.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::core::{AttemptFailure, AttemptKind, AttemptResult, Outcome, Stamp, Success};
use super::{Credential, Definition};
use crate::clock::Clock;
use crate::config::CredentialSource;
use crate::error::{ApiError, ErrorName};
use crate::http::{self, Failure, FailureKind, LoginOk, Peer, SignRequest, Signed};
use crate::secret::Secret;

/// How long reading a credential file may take (a hung network home must not hold an
/// attempt forever).
pub const CREDENTIAL_READ_LIMIT: Duration = Duration::from_secs(5);

/// The two peers of SPEC 4.
#[async_trait::async_trait]
pub trait Peers: Send + Sync + std::fmt::Debug {
    /// Whether a backend is configured.
    fn has_backend(&self) -> bool;
    /// Asks the backend to sign; `None` when no backend is configured.
    async fn sign(&self, req: &SignRequest<'_>) -> Option<Result<Signed, Failure>>;
    /// Logs in to Entrupy.
    async fn login(&self, signed: &Secret, now: f64) -> Result<LoginOk, Failure>;
}

#[async_trait::async_trait]
impl Peers for http::Clients {
    fn has_backend(&self) -> bool {
        http::Clients::has_backend(self)
    }

    async fn sign(&self, req: &SignRequest<'_>) -> Option<Result<Signed, Failure>> {
        http::Clients::sign(self, req).await
    }

    async fn login(&self, signed: &Secret, now: f64) -> Result<LoginOk, Failure> {
        http::Clients::login(self, signed, now).await
    }
}

/// Everything an attempt needs, taken when it starts.
#[derive(Debug)]
pub struct Plan {
    /// Which login.
    pub kind: AttemptKind,
    /// Which session, for whom.
    pub session: Arc<Definition>,
    /// The installation's device id (in every authorization request).
    pub device_id: Arc<str>,
    /// The peers.
    pub peers: Arc<dyn Peers>,
    /// The wall clock.
    pub clock: Clock,
}

/// Why an attempt failed, before classification.
#[derive(Debug)]
enum Error {
    Http(Failure),
    NotConfigured,
    Credential(String),
    Reservation(String),
}

/// Resolves when the ledger's reservation is on disk; an error says why it could not be.
pub type Reservation = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Runs the attempt. The login request waits for `reservation`; the signing request (which
/// costs no login) does not.
pub async fn run(plan: Plan, reservation: Reservation) -> AttemptResult {
    let stamp = match &plan.session.credential {
        Credential::Source(src) => read_stamp(src).await,
        _ => None,
    };
    match attempt(&plan, reservation).await {
        Ok(s) => AttemptResult::Ok(s),
        Err(e) => AttemptResult::Err(classify(e, stamp)),
    }
}

/// Waits for the reservation (once).
async fn reserved(r: &mut Option<Reservation>) -> Result<(), Error> {
    match r.take() {
        Some(f) => f.await.map_err(Error::Reservation),
        None => Ok(()),
    }
}

async fn attempt(plan: &Plan, reservation: Reservation) -> Result<Success, Error> {
    let mut reservation = Some(reservation);
    match &plan.kind {
        AttemptKind::Signed(signed) => {
            reserved(&mut reservation).await?;
            login(plan, signed, None).await
        }
        AttemptKind::Backend => {
            if !plan.peers.has_backend() {
                return Err(Error::NotConfigured);
            }
            let credential = credential(&plan.session.credential).await?;
            for tries in 1..=2 {
                let auth = crate::authreq::generate(plan.clock.now(), &plan.device_id);
                let p = &plan.session.profile;
                let req = SignRequest {
                    authorization_request: &auth,
                    unique_user_id: &p.unique_user_id,
                    email: &p.email,
                    first_name: p.first_name.as_deref(),
                    last_name: p.last_name.as_deref(),
                    credential: credential.as_ref(),
                };
                let signed = plan.peers.sign(&req).await.ok_or(Error::NotConfigured)?.map_err(Error::Http)?;
                if signed.conflict {
                    warn!("the backend reported a profile conflict (409); the request is still signed");
                }
                reserved(&mut reservation).await?;
                match login(plan, &signed.signed, Some(signed.username.clone())).await {
                    Err(Error::Http(f)) if f.kind == FailureKind::Unauthorized && tries < 2 => {
                        warn!("Entrupy rejected the signed request (401); trying once more with a fresh one");
                    }
                    other => return other,
                }
            }
            Err(Error::NotConfigured)
        }
    }
}

async fn login(plan: &Plan, signed: &Secret, username: Option<String>) -> Result<Success, Error> {
    let login = plan.peers.login(signed, plan.clock.now()).await.map_err(Error::Http)?;
    let received_at = plan.clock.now();
    Ok(Success { token: login.token, expires_at: login.expires_at, username: login.username.or(username), received_at })
}

/// The credential to send, read off the runtime thread with a time limit.
async fn credential(c: &Credential) -> Result<Option<Secret>, Error> {
    let src = match c {
        Credential::None => return Ok(None),
        Credential::Inline(s) => return Ok(Some(s.clone())),
        Credential::Source(src) => src.clone(),
    };
    let describe = src.describe();
    let read = tokio::task::spawn_blocking(move || read_credential(&src));
    match tokio::time::timeout(CREDENTIAL_READ_LIMIT, read).await {
        Ok(Ok(Ok(secret))) => Ok(Some(secret)),
        Ok(Ok(Err(msg))) => Err(Error::Credential(msg)),
        Ok(Err(e)) => Err(Error::Credential(format!("cannot read credential {describe}: {e}"))),
        Err(_) => Err(Error::Credential(format!(
            "reading credential {describe} took longer than {} s",
            CREDENTIAL_READ_LIMIT.as_secs()
        ))),
    }
}

/// Reads a credential file the SPEC 3 way (`crate::credential`): the file it opened must be
/// regular, the user's, private and small; its content less one trailing newline, with no
/// control character.
fn read_credential(src: &CredentialSource) -> Result<Secret, String> {
    crate::credential::read(src).map_err(|e| e.to_string())
}

/// The credential file's stamp (to notice a change later), read off the runtime thread.
pub async fn read_stamp(src: &CredentialSource) -> Option<Stamp> {
    let src = src.clone();
    let read = tokio::task::spawn_blocking(move || file_stamp(&src));
    tokio::time::timeout(CREDENTIAL_READ_LIMIT, read).await.ok()?.ok()?
}

/// A credential file's modification time, size and inode.
pub fn file_stamp(src: &CredentialSource) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(src.path().ok()?).ok()?;
    Some((m.mtime(), m.mtime_nsec(), m.len(), m.ino()))
}

/// What a failure means for the schedule, the caller and `LoginFailed`.
fn classify(err: Error, stamp: Option<Stamp>) -> AttemptFailure {
    let (outcome, error, code, description) = match err {
        Error::NotConfigured => {
            let e = ApiError::new(ErrorName::NotConfigured, "no [backend] url is configured");
            (Outcome::Permanent, e.clone(), e.name.as_str().to_owned(), e.message)
        }
        Error::Credential(msg) => {
            // SPEC 3: an unusable credential file waits for a change, as a rejected one does.
            let e = ApiError::new(ErrorName::NotConfigured, msg);
            (Outcome::Reauthorize, e.clone(), e.name.as_str().to_owned(), e.message)
        }
        Error::Reservation(msg) => {
            let e = ApiError::new(
                ErrorName::Cancelled,
                format!("no login was sent: the login budget could not be saved ({msg})"),
            );
            (Outcome::NotSent, e.clone(), e.name.as_str().to_owned(), e.message)
        }
        Error::Http(f) => {
            let outcome = match (&f.kind, f.peer) {
                (FailureKind::RateLimited { retry_after }, _) => Outcome::RateLimited(*retry_after),
                (FailureKind::Unauthorized, Peer::Backend) => Outcome::Reauthorize,
                (FailureKind::Unauthorized, Peer::Entrupy) => Outcome::Transient,
                (FailureKind::Permanent, _) => Outcome::Permanent,
                _ => Outcome::Transient,
            };
            let name = f.error_name();
            let code = f.error_code.clone().unwrap_or_else(|| name.as_str().to_owned());
            (outcome, ApiError::new(name, f.to_string()), code, f.description.clone())
        }
    };
    AttemptFailure { outcome, error, code, description, stamp }
}
