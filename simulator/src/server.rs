//! The [`Simulator`] handle, the listener and the per-connection tasks.
//!
//! The handle is cheap to clone; the server shuts down when the last clone is dropped or
//! when `shutdown()` is called. Shutdown stops accepting, releases held requests by
//! closing their connections, and ends every connection task, so a test that finishes
//! leaves nothing running on its runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::config::SimConfig;
use crate::fault::{Endpoint, Fault};
use crate::signing::SignedPayload;
use crate::state::{Counters, LoginRecord, RequestRecord, Shared, unix_now};

/// A running simulator. Clones share the same server.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls: Option<(String, Vec<u8>)>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator").field("base_url", &self.base_url()).finish_non_exhaustive()
    }
}

impl Simulator {
    /// Binds 127.0.0.1:`cfg.port` and starts serving on the current tokio runtime.
    pub async fn start(cfg: SimConfig) -> anyhow::Result<Simulator> {
        let tls = if cfg.tls { Some(crate::tls::generate()?) } else { None };
        let listener = TcpListener::bind(("127.0.0.1", cfg.port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(&cfg));
        let acceptor = tls.as_ref().map(|t| tokio_rustls::TlsAcceptor::from(t.server_config.clone()));
        tokio::spawn(accept_loop(listener, shared.clone(), acceptor));
        Ok(Simulator { inner: Arc::new(Handle { shared, addr, tls: tls.map(|t| (t.ca_pem, t.ca_der)) }) })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The socket address the simulator listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` in TLS mode (the name the
    /// certificate is issued for).
    pub fn base_url(&self) -> String {
        let port = self.inner.addr.port();
        if self.inner.tls.is_some() { format!("https://localhost:{port}") } else { format!("http://127.0.0.1:{port}") }
    }

    /// The value for `[entrupy] api_url`; login is `POST {api_url}/login`.
    pub fn api_url(&self) -> String {
        self.base_url()
    }

    /// The value for `[backend] url`: `{base_url}/sign`.
    pub fn backend_url(&self) -> String {
        format!("{}/sign", self.base_url())
    }

    /// The test CA certificate (PEM) in TLS mode.
    pub fn ca_pem(&self) -> Option<String> {
        self.inner.tls.as_ref().map(|(pem, _)| pem.clone())
    }

    /// The test CA certificate (DER) in TLS mode.
    pub fn ca_der(&self) -> Option<Vec<u8>> {
        self.inner.tls.as_ref().map(|(_, der)| der.clone())
    }

    /// Lifetime of tokens issued from now on (may be fractional, or zero to issue tokens
    /// that are already expired).
    pub fn set_token_lifetime(&self, d: Duration) {
        self.shared().lock().token_lifetime = d;
    }

    /// Entrupy's per-user limits on successful logins, from now on.
    pub fn set_limits(&self, logins_per_minute: u32, logins_per_day: u32) {
        let mut st = self.shared().lock();
        st.logins_per_minute = logins_per_minute;
        st.logins_per_day = logins_per_day;
    }

    /// Forgets the login history, so every user has a full budget again.
    pub fn reset_rate_limits(&self) {
        self.shared().lock().login_history.clear();
    }

    /// How old a signed request may be at `/login`.
    pub fn set_signed_request_max_age(&self, d: Duration) {
        self.shared().lock().signed_request_max_age = d;
    }

    /// The backend's accepted bearer credentials; `None` accepts any or none.
    pub fn set_accepted_credentials(&self, c: Option<Vec<String>>) {
        self.shared().lock().accepted_credentials = c;
    }

    /// While paused, requests to `/sign` and `/login` are received (and logged with no
    /// status) but held unanswered; unpausing processes them normally.
    pub fn set_paused(&self, paused: bool) {
        self.shared().paused.send_replace(paused);
    }

    /// Print one line per answered request on stderr.
    pub fn set_verbose(&self, verbose: bool) {
        self.shared().verbose.store(verbose, Ordering::Relaxed);
    }

    /// The next `count` requests to `ep` (after any faults already queued) suffer `fault`.
    pub fn push_fault(&self, ep: Endpoint, fault: Fault, count: u32) {
        self.shared().lock().faults.push(ep, fault, count);
    }

    /// Drops every pending fault of both endpoints.
    pub fn clear_faults(&self) {
        self.shared().lock().faults.clear();
    }

    /// How many uses of faults are still queued for `ep`.
    pub fn pending_faults(&self, ep: Endpoint) -> u32 {
        self.shared().lock().faults.pending(ep)
    }

    pub fn counters(&self) -> Counters {
        self.shared().lock().counters.clone()
    }

    /// Every request received so far, in arrival order (control requests excluded).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared().lock().requests.clone()
    }

    /// The received requests to one endpoint.
    pub fn requests_to(&self, ep: Endpoint) -> Vec<RequestRecord> {
        let st = self.shared().lock();
        st.requests.iter().filter(|r| r.endpoint == Some(ep)).cloned().collect()
    }

    /// `(token, expiration_time, unique_user_id)` of every token issued, oldest first.
    pub fn issued_tokens(&self) -> Vec<(String, f64, String)> {
        let st = self.shared().lock();
        st.logins.iter().map(|l| (l.token.clone(), l.expiration_time, l.unique_user_id.clone())).collect()
    }

    /// The expiration time the token was issued with, if this simulator issued it.
    pub fn token_expiration(&self, token: &str) -> Option<f64> {
        let st = self.shared().lock();
        st.logins.iter().find(|l| l.token == token).map(|l| l.expiration_time)
    }

    /// Whether the simulator issued `token` and it has not expired by the wall clock.
    pub fn token_is_valid(&self, token: &str) -> bool {
        self.token_expiration(token).is_some_and(|exp| unix_now() < exp)
    }

    /// Full details of every successful login, oldest first.
    pub fn logins(&self) -> Vec<LoginRecord> {
        self.shared().lock().logins.clone()
    }

    /// A validly signed request, as the backend would answer, without an HTTP call and
    /// without touching the backend's profile store.
    pub fn sign_directly(&self, sdk_authorization_request: &str, unique_user_id: &str, email: &str) -> String {
        self.sign_at(sdk_authorization_request, unique_user_id, email, SystemTime::now())
    }

    /// Like [`Simulator::sign_directly`], but as if signed at `signed_at` (to make a
    /// stale signed request).
    pub fn sign_at(
        &self,
        sdk_authorization_request: &str,
        unique_user_id: &str,
        email: &str,
        signed_at: SystemTime,
    ) -> String {
        let signed_at = signed_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.shared().signer.sign(&SignedPayload {
            sdk_authorization_request: sdk_authorization_request.to_owned(),
            unique_user_id: unique_user_id.to_owned(),
            email: email.to_owned(),
            signed_at,
        })
    }

    /// Waits until `pred` holds for the counters, or `timeout` passes; returns whether it
    /// held. Wakes on every logged request and answer, so tests need not poll or sleep.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Counters) -> bool) -> bool {
        let mut rx = self.shared().changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.counters()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives as long as `self`, so only the timeout ends the wait.
                Ok(Err(_)) | Err(_) => return pred(&self.counters()),
            }
        }
    }

    /// Stops the server: no new connections, and open ones (held requests included) are
    /// closed.
    pub fn shutdown(&self) {
        self.shared().shutdown.send_replace(true);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, acceptor: Option<tokio_rustls::TlsAcceptor>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let stream = tokio::select! {
            _ = until_true(&mut shutdown) => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // Typically EMFILE; pausing avoids a busy loop while it lasts.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(connection(stream, shared.clone(), acceptor.clone()));
    }
}

async fn connection(stream: TcpStream, shared: Arc<Shared>, acceptor: Option<tokio_rustls::TlsAcceptor>) {
    let _ = stream.set_nodelay(true);
    let mut shutdown = shared.shutdown.subscribe();
    if *shutdown.borrow() {
        return;
    }
    match acceptor {
        None => serve_io(stream, shared, &mut shutdown).await,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
            let tls = tokio::select! {
                _ = until_true(&mut shutdown) => return,
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    // A failed handshake is the client's business (e.g. an untrusted CA).
                    _ => return,
                },
            };
            serve_io(tls, shared, &mut shutdown).await;
        }
    }
}

async fn serve_io<I>(io: I, shared: Arc<Shared>, shutdown: &mut tokio::sync::watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| crate::handlers::serve(shared.clone(), req));
    let conn =
        hyper::server::conn::http1::Builder::new().timer(TokioTimer::new()).serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        _ = until_true(shutdown) => {}
        // Errors are client disconnects, malformed requests and the deliberate drops.
        _ = conn => {}
    }
}

/// Resolves once the watched flag is true (or its sender is gone). Returns nothing, so that
/// no borrow of the channel is held across an await in a `select!`.
pub(crate) async fn until_true(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
