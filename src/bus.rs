//! The D-Bus service (SPEC section 6): the `Manager` and `Session` objects, the caller check,
//! and the publisher that turns the loop's snapshot changes and signals into
//! `PropertiesChanged` and signals.
//!
//! A thin layer: methods read a session's published snapshot or send an event to the loop
//! (`crate::engine`) and wait for its answer, then map domain failures into D-Bus errors
//! through [`Error::from`]. It holds no session state and never touches the state files.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, interface};
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use crate::clock::Clock;
use crate::engine::{Call, Event, ManagerCall, Update};
use crate::error::{ApiError, Error, ErrorName};
use crate::names;
use crate::profile::Profile;
use crate::secret::Secret;
use crate::session::core::{Reply, Signal};
use crate::session::{Credential, Definition, Origin, Published, Snapshot};

/// Longest string accepted from a D-Bus caller (a signed request can be long; 64 KiB).
pub const MAX_ARG_BYTES: usize = 64 * 1024;

/// The methods that return a token or change which token a session holds: with an allow-list
/// (`[access] token_executables`), only the listed executables may call them.
pub const TOKEN_METHODS: [&str; 5] = ["GetToken", "EnsureValid", "LoginWithSignedRequest", "Refresh", "Cleanup"];

/// Decides whether a caller may use the methods: only the daemon's own Unix user, and for the
/// [`TOKEN_METHODS`] only the allowed executables when an allow-list is configured.
///
/// The executable is looked up again on every such call, never cached per unique name: a
/// connection outlives an `exec` (a program may connect, then exec another, or hand the
/// connection to a child that does).
#[derive(Debug)]
pub struct Access {
    /// The daemon's effective uid.
    my_uid: u32,
    /// Unique bus name → uid; unique names are never reused and a connection's uid is fixed
    /// when it connects, so entries stay true.
    cache: Mutex<HashMap<String, u32>>,
    /// `[access] token_executables`; `None` lets any program of the user read tokens.
    token_executables: std::sync::RwLock<Option<Vec<std::path::PathBuf>>>,
}

/// Whether a caller with `caller_uid` may call a daemon running as `my_uid`.
pub fn caller_allowed(caller_uid: u32, my_uid: u32) -> bool {
    caller_uid == my_uid
}

/// Whether `member` is one of the [`TOKEN_METHODS`].
pub fn is_token_method(member: &str) -> bool {
    TOKEN_METHODS.contains(&member)
}

/// The executable of the process behind `pidfd` (a pidfd such as the bus's `ProcessFD`).
/// The pid the pidfd refers to is read before and after the `/proc/PID/exe` link: a pidfd
/// keeps its pid number from being reused until the process is reaped, so while the pidfd
/// still shows the same live pid afterwards, the link read was that process's.
pub fn exe_of_pidfd(pidfd: &impl std::os::fd::AsRawFd) -> std::io::Result<std::path::PathBuf> {
    let pid = pid_of_pidfd(pidfd)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    if pid_of_pidfd(pidfd)? != pid {
        return Err(std::io::Error::other("the process exited while its executable was read"));
    }
    Ok(exe)
}

/// The pid a pidfd refers to, from the `Pid:` line of `/proc/self/fdinfo/FD`; an error when
/// the process is gone (the kernel shows -1) or the descriptor is not a pidfd.
fn pid_of_pidfd(pidfd: &impl std::os::fd::AsRawFd) -> std::io::Result<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .ok_or_else(|| std::io::Error::other("not a pidfd"))?
        .trim()
        .parse::<i64>()
        .map_err(std::io::Error::other)?;
    u32::try_from(pid).ok().filter(|p| *p > 0).ok_or_else(|| std::io::Error::other("the process is gone"))
}

impl Access {
    /// For the current process's user.
    pub fn new() -> Self {
        Access {
            my_uid: rustix::process::geteuid().as_raw(),
            cache: Mutex::new(HashMap::new()),
            token_executables: std::sync::RwLock::new(None),
        }
    }

    /// Sets the token allow-list (from the config, at start and on reload).
    pub fn set_token_executables(&self, list: Option<Vec<std::path::PathBuf>>) {
        *self.token_executables.write().unwrap_or_else(|e| e.into_inner()) = list;
    }

    /// [`Access::check_user`], plus the allow-list whatever the method.
    pub async fn check_token(&self, conn: &Connection, hdr: &Header<'_>) -> Result<(), Error> {
        self.check_user(conn, hdr).await?;
        self.check_executable(conn, hdr).await
    }

    /// The check for every method: [`Access::check_user`], plus the allow-list when the
    /// called member is one of the [`TOKEN_METHODS`]. Keyed on the message's own member, so
    /// no method can be given the weaker check by mistake.
    pub async fn check(&self, conn: &Connection, hdr: &Header<'_>) -> Result<(), Error> {
        self.check_user(conn, hdr).await?;
        if hdr.member().is_some_and(|m| is_token_method(m.as_str())) {
            self.check_executable(conn, hdr).await?;
        }
        Ok(())
    }

    /// Checks the caller's executable against the allow-list, asking the bus afresh. With the
    /// bus's `ProcessFD` (dbus-broker; dbus-daemon from the 1.15 series) a reused pid cannot
    /// pass; without it, the `ProcessID` is used.
    async fn check_executable(&self, conn: &Connection, hdr: &Header<'_>) -> Result<(), Error> {
        let allowed = self.token_executables.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (Some(allowed), Some(sender)) = (allowed, hdr.sender()) else { return Ok(()) };
        let unknown = || Error::AccessDenied("cannot determine the caller's executable".into());
        let proxy = zbus::fdo::DBusProxy::new(conn).await?;
        let creds = proxy
            .get_connection_credentials(zbus::names::BusName::Unique(sender.clone()))
            .await
            .map_err(|_| unknown())?;
        let pid = creds.process_id();
        let exe = match creds.into_process_fd() {
            Some(fd) => exe_of_pidfd(&fd),
            None => match pid {
                Some(p) => std::fs::read_link(format!("/proc/{p}/exe")),
                None => Err(std::io::Error::other("no process id")),
            },
        };
        let exe = exe.map_err(|_| unknown())?;
        if allowed.iter().any(|a| a == &exe) {
            Ok(())
        } else {
            let member = hdr.member().map(|m| m.to_string()).unwrap_or_default();
            Err(Error::AccessDenied(format!("{} may not call {member} ([access] token_executables)", exe.display())))
        }
    }

    /// Checks that the sender of `hdr` runs as the daemon's user, asking the bus for its uid
    /// once per connection.
    pub async fn check_user(&self, conn: &Connection, hdr: &Header<'_>) -> Result<(), Error> {
        let Some(sender) = hdr.sender() else {
            // A peer-to-peer connection has no sender; there is no bus to ask.
            return Ok(());
        };
        let cached = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(sender.as_str()).copied();
        let uid = match cached {
            Some(uid) => uid,
            None => {
                let proxy = zbus::fdo::DBusProxy::new(conn).await?;
                let uid = proxy
                    .get_connection_unix_user(zbus::names::BusName::Unique(sender.clone()))
                    .await
                    .map_err(|_| Error::AccessDenied("cannot determine the caller's user".into()))?;
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() > 4096 {
                    // Bounded memory over months of short-lived clients.
                    cache.clear();
                }
                cache.insert(sender.to_string(), uid);
                uid
            }
        };
        if caller_allowed(uid, self.my_uid) {
            Ok(())
        } else {
            Err(Error::AccessDenied(format!("uid {uid} may not use the daemon of uid {}", self.my_uid)))
        }
    }
}

impl Default for Access {
    fn default() -> Self {
        Self::new()
    }
}

/// What every object shares: the way to the loop, the caller check, the clock and the
/// device id.
#[derive(Debug)]
pub struct BusCtx {
    /// The loop's inbox.
    pub events: mpsc::UnboundedSender<Event>,
    /// The caller check.
    pub access: Arc<Access>,
    /// The wall clock.
    pub clock: Clock,
    /// The installation's device id.
    pub device_id: Arc<str>,
    /// The credential of sessions added without one (`[backend] token_file`); replaced on
    /// reload.
    pub default_credential: std::sync::RwLock<Credential>,
}

impl BusCtx {
    /// Sends an event and waits for the loop's answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Event) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        let stopped = || Error::Cancelled("the daemon is shutting down".into());
        self.events.send(make(tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }
}

/// `org.freedesktop.DBus.ObjectManager` at `/com/entrupy/TokenDaemon1`. zbus's own (behind
/// its `object-manager` feature, which the daemon does not use) would list the
/// interface-less `/com/entrupy/TokenDaemon1/session` node too and announce every session
/// served at start, before any client could hear it; this one lists exactly the sessions,
/// and [`announce_added`] and [`announce_removed`] announce those that come and go later.
#[derive(Debug)]
pub struct ObjectManagerObject {
    ctx: Arc<BusCtx>,
}

impl ObjectManagerObject {
    /// The object manager.
    pub fn new(ctx: Arc<BusCtx>) -> Self {
        Self { ctx }
    }
}

type ManagedObjects = HashMap<OwnedObjectPath, HashMap<String, HashMap<String, OwnedVariant>>>;

#[interface(name = "org.freedesktop.DBus.ObjectManager")]
impl ObjectManagerObject {
    /// Every session object with its interface's properties.
    #[zbus(out_args("object_paths_interfaces_and_properties"))]
    async fn get_managed_objects(&self) -> Result<ManagedObjects, Error> {
        let mut out = ManagedObjects::new();
        for snap in self.ctx.ask(|tx| Event::Manager(ManagerCall::Snapshots(tx))).await? {
            let props: HashMap<String, OwnedVariant> = interface_properties(&snap)
                .into_iter()
                .filter_map(|(name, value)| Some((name.to_owned(), OwnedVariant::try_from(value).ok()?)))
                .collect();
            let path = path(names::session_path(&snap.id))?;
            out.insert(path, HashMap::from([(names::SESSION_INTERFACE.to_owned(), props)]));
        }
        Ok(out)
    }

    /// A session appeared.
    #[zbus(signal)]
    async fn interfaces_added(
        emitter: &SignalEmitter<'_>,
        object_path: zbus::ObjectPath<'_>,
        interfaces_and_properties: HashMap<&str, HashMap<&str, Variant<'_>>>,
    ) -> zbus::Result<()>;

    /// A session went away.
    #[zbus(signal)]
    async fn interfaces_removed(
        emitter: &SignalEmitter<'_>,
        object_path: zbus::ObjectPath<'_>,
        interfaces: &[&str],
    ) -> zbus::Result<()>;
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Validates `AddSession`'s arguments: the id, and the profile's keys, types and values.
/// Returns the profile and the credential to keep with the state, if one was given.
pub fn parse_profile(id: &str, profile: &HashMap<String, OwnedVariant>) -> Result<(Profile, Option<Secret>), Error> {
    crate::config::validate_session_id(id).map_err(invalid)?;
    let get = |key: &str| -> Result<Option<String>, Error> {
        match profile.get(key).map(|v| &**v) {
            None => Ok(None),
            Some(Variant::Str(s)) => {
                if s.len() > MAX_ARG_BYTES {
                    return Err(invalid(format!("profile key {key:?} is longer than {MAX_ARG_BYTES} bytes")));
                }
                Ok(Some(s.as_str().to_owned()))
            }
            Some(other) => {
                Err(invalid(format!("profile key {key:?} must be a string (s), got {}", other.value_signature())))
            }
        }
    };
    const KNOWN: [&str; 5] = ["unique_user_id", "email", "first_name", "last_name", "backend_token"];
    let parsed = Profile {
        unique_user_id: get("unique_user_id")?.ok_or_else(|| invalid("profile needs unique_user_id"))?,
        email: get("email")?.ok_or_else(|| invalid("profile needs email"))?,
        first_name: get("first_name")?,
        last_name: get("last_name")?,
    };
    let backend_token = get("backend_token")?.map(Secret::new);
    if let Some(unknown) = profile.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        let shown: String = unknown.chars().take(64).collect();
        return Err(invalid(format!("unknown profile key {shown:?}; known are {}", KNOWN.join(", "))));
    }
    parsed.validate().map_err(|(_, m)| invalid(m))?;
    if let Some(t) = &backend_token
        && (t.is_empty() || t.expose().chars().any(|c| c.is_control() || c == ' '))
    {
        return Err(invalid("backend_token must be non-empty, without spaces or control characters"));
    }
    Ok((parsed, backend_token))
}

/// Checks `LoginWithSignedRequest`'s argument as a peer's string (SPEC 4): 1 to 8192 bytes of
/// visible ASCII. The message says what is wrong, never what the argument holds (a secret).
pub fn check_signed_request(signed_request: &str) -> Result<(), Error> {
    crate::http::check_opaque(signed_request).map_err(|why| invalid(format!("the signed request {why}")))
}

/// `com.entrupy.TokenDaemon1.Manager` at `/com/entrupy/TokenDaemon1`.
#[derive(Debug)]
pub struct ManagerObject {
    ctx: Arc<BusCtx>,
}

impl ManagerObject {
    /// The manager.
    pub fn new(ctx: Arc<BusCtx>) -> Self {
        Self { ctx }
    }
}

fn path(p: String) -> Result<OwnedObjectPath, Error> {
    OwnedObjectPath::try_from(p).map_err(Error::ZBus)
}

#[interface(name = "com.entrupy.TokenDaemon1.Manager")]
impl ManagerObject {
    /// The object paths of all sessions.
    #[zbus(out_args("sessions"))]
    async fn list_sessions(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<OwnedObjectPath>, Error> {
        self.ctx.access.check(conn, &hdr).await?;
        let ids = self.ctx.ask(|tx| Event::Manager(ManagerCall::List(tx))).await?;
        ids.iter().map(|id| path(names::session_path(id))).collect()
    }

    /// The object path of the session `id`.
    #[zbus(out_args("path"))]
    async fn get_session(
        &self,
        id: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, Error> {
        self.ctx.access.check(conn, &hdr).await?;
        let known = id.len() <= 64 && self.ctx.ask(|tx| Event::Manager(ManagerCall::Exists(id.to_owned(), tx))).await?;
        if !known {
            return Err(no_such_session(id).into());
        }
        path(names::session_path(id))
    }

    /// Adds and persists a session.
    #[zbus(out_args("path"))]
    async fn add_session(
        &self,
        id: &str,
        profile: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, Error> {
        self.ctx.access.check(conn, &hdr).await?;
        let (profile, backend_token) = parse_profile(id, &profile)?;
        let default_credential = self.ctx.default_credential.read().unwrap_or_else(|e| e.into_inner()).clone();
        let session = Definition {
            id: id.to_owned(),
            profile,
            credential: backend_token.map(Credential::Inline).unwrap_or(default_credential),
            origin: Origin::Bus,
        };
        let rx = self.ctx.ask(|tx| Event::Manager(ManagerCall::Add(Box::new(session), tx))).await??;
        serve_session(conn, &self.ctx, rx, true).await?;
        path(names::session_path(id))
    }

    /// Cleans up and forgets a session added over D-Bus.
    async fn remove_session(
        &self,
        id: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.ctx.access.check(conn, &hdr).await?;
        self.ctx.ask(|tx| Event::Manager(ManagerCall::Remove(id.to_owned(), tx))).await??;
        unserve_session(conn, id).await;
        Ok(())
    }

    /// The daemon's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        names::VERSION.to_owned()
    }
}

/// Serves a session's object; `announce` sends `InterfacesAdded` (not for the sessions
/// served at start, before the name is claimed: no client could hear it).
pub async fn serve_session(
    conn: &Connection,
    ctx: &Arc<BusCtx>,
    snapshot: Published,
    announce: bool,
) -> Result<(), Error> {
    let snap = snapshot.load_full();
    let obj = SessionObject { id: snap.id.clone(), snapshot, ctx: ctx.clone() };
    conn.object_server().at(names::session_path(&snap.id), obj).await?;
    if announce {
        announce_added(conn, &snap).await;
    }
    Ok(())
}

/// Stops serving a session's object and announces it.
pub async fn unserve_session(conn: &Connection, id: &str) {
    match conn.object_server().remove::<SessionObject, _>(names::session_path(id)).await {
        Ok(_) => announce_removed(conn, id).await,
        Err(e) => tracing::warn!(session = id, error = %e, "cannot remove the session's object"),
    }
}

/// `com.entrupy.TokenDaemon1.Session` at `/com/entrupy/TokenDaemon1/session/<id>`.
#[derive(Debug)]
pub struct SessionObject {
    id: Arc<str>,
    snapshot: Published,
    ctx: Arc<BusCtx>,
}

fn secs(t: f64) -> u64 {
    if t.is_finite() && t > 0.0 { t.floor() as u64 } else { 0 }
}

impl SessionObject {
    async fn call(&self, make: impl FnOnce(oneshot::Sender<Reply>) -> Call) -> Result<Reply, Error> {
        let id = self.id.clone();
        match self.ctx.ask(|tx| Event::Call(id, make(tx))).await? {
            Reply::Err(e) => Err(e.into()),
            reply => Ok(reply),
        }
    }

    async fn token_call(&self, make: impl FnOnce(oneshot::Sender<Reply>) -> Call) -> Result<(String, u64), Error> {
        match self.call(make).await? {
            Reply::Token(t, e) => Ok((t.expose().to_owned(), secs(e))),
            other => Err(unexpected(other)),
        }
    }

    async fn expiry_call(&self, make: impl FnOnce(oneshot::Sender<Reply>) -> Call) -> Result<u64, Error> {
        match self.call(make).await? {
            Reply::Expiry(e) => Ok(secs(e)),
            other => Err(unexpected(other)),
        }
    }
}

/// The loop answered a call with the wrong kind of reply: an invariant broken, said plainly.
fn unexpected(r: Reply) -> Error {
    let kind = match r {
        Reply::Expiry(_) => "an expiry",
        Reply::Token(..) => "a token",
        Reply::Done => "done",
        Reply::Err(_) => "an error",
    };
    Error::Cancelled(format!("internal error: the session answered with {kind}"))
}

#[interface(name = "com.entrupy.TokenDaemon1.Session")]
impl SessionObject {
    /// Whether a token is held and has not expired.
    #[zbus(out_args("valid"))]
    async fn is_authorization_valid(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<bool, Error> {
        self.ctx.access.check(conn, &hdr).await?;
        Ok(self.snapshot.load().valid(self.ctx.clock.now()))
    }

    /// The token and its expiry; `NotAuthorized` when not valid.
    #[zbus(out_args("token", "expires_at"))]
    async fn get_token(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(String, u64), Error> {
        self.ctx.access.check_token(conn, &hdr).await?;
        let snap = self.snapshot.load();
        match (&snap.token, snap.expires_at) {
            (Some(t), Some(e)) if self.ctx.clock.now() < e => Ok((t.expose().to_owned(), secs(e))),
            _ => Err(Error::NotAuthorized("no valid token".into())),
        }
    }

    /// A token valid for at least `min_seconds` more, refreshing first if needed.
    #[zbus(out_args("token", "expires_at"))]
    async fn ensure_valid(
        &self,
        min_seconds: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(String, u64), Error> {
        self.ctx.access.check_token(conn, &hdr).await?;
        self.token_call(|tx| Call::EnsureValid(min_seconds, tx)).await
    }

    /// Re-authorizes now; returns the new expiry.
    #[zbus(out_args("expires_at"))]
    async fn refresh(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u64, Error> {
        self.ctx.access.check(conn, &hdr).await?;
        self.expiry_call(Call::Refresh).await
    }

    /// A fresh SDK authorization request, for apps that call the backend themselves.
    #[zbus(out_args("sdk_authorization_request"))]
    async fn generate_authorization_request(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, Error> {
        self.ctx.access.check(conn, &hdr).await?;
        Ok(crate::authreq::generate(self.ctx.clock.now(), &self.ctx.device_id))
    }

    /// Logs in with a request the caller had signed.
    #[zbus(out_args("expires_at"))]
    async fn login_with_signed_request(
        &self,
        signed_request: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u64, Error> {
        self.ctx.access.check(conn, &hdr).await?;
        check_signed_request(signed_request)?;
        let s = Secret::new(signed_request);
        self.expiry_call(|tx| Call::LoginSigned(s, tx)).await
    }

    /// Drops the token and stops refreshing.
    async fn cleanup(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.ctx.access.check(conn, &hdr).await?;
        self.call(Call::Cleanup).await.map(drop)
    }

    /// Session id.
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.id.to_string()
    }

    /// The user.
    #[zbus(property)]
    fn unique_user_id(&self) -> String {
        self.snapshot.load().unique_user_id.to_string()
    }

    /// As returned by the backend.
    #[zbus(property)]
    fn username(&self) -> String {
        self.snapshot.load().username.to_string()
    }

    /// `logged-out`, `valid`, `refreshing`, `expired`, `needs-reauthorization` or `failed`.
    #[zbus(property)]
    fn state(&self) -> String {
        self.snapshot.load().state.as_str().to_owned()
    }

    /// Whether the token is valid now.
    #[zbus(property)]
    fn valid(&self) -> bool {
        self.snapshot.load().valid(self.ctx.clock.now())
    }

    /// Expiry, Unix seconds rounded down; 0 for none.
    #[zbus(property)]
    fn expires_at(&self) -> u64 {
        self.snapshot.load().expires_at_secs()
    }

    /// Next planned refresh; 0 for none.
    #[zbus(property)]
    fn refresh_at(&self) -> u64 {
        secs(self.snapshot.load().refresh_at)
    }

    /// When the last login answer arrived; 0 for none.
    #[zbus(property)]
    fn last_login_at(&self) -> u64 {
        secs(self.snapshot.load().last_login_at.unwrap_or(0.0))
    }

    /// Short name of the last failure, `""` for none.
    #[zbus(property)]
    fn last_error(&self) -> String {
        self.snapshot.load().last_error.map(|e| e.as_str().to_owned()).unwrap_or_default()
    }

    /// Extra (not in the contract): successful logins of this user in the last 24 h.
    #[zbus(property)]
    fn logins_today(&self) -> u32 {
        self.snapshot.load().logins_today
    }

    /// Extra (not in the contract): the daily login budget of this user.
    #[zbus(property)]
    fn logins_per_day(&self) -> u32 {
        self.snapshot.load().logins_per_day
    }

    /// Extra (not in the contract): whether refreshes are paced to make the daily budget
    /// last.
    #[zbus(property)]
    fn pacing(&self) -> bool {
        self.snapshot.load().pacing
    }

    /// `didLoginUserSuccessfully`.
    #[zbus(signal)]
    pub async fn login_succeeded(emitter: &SignalEmitter<'_>, expires_at: u64) -> zbus::Result<()>;

    /// `didLoginUserFailWithError`.
    #[zbus(signal)]
    pub async fn login_failed(emitter: &SignalEmitter<'_>, error_code: &str, description: &str) -> zbus::Result<()>;

    /// `Valid` went false because time ran out.
    #[zbus(signal)]
    pub async fn authorization_expired(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;

    /// The daemon cannot re-authorize by itself.
    #[zbus(signal)]
    pub async fn reauthorization_required(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;
}

/// Every property of a session's interface, `Id` included (`GetManagedObjects`,
/// `InterfacesAdded`).
fn interface_properties(s: &Snapshot) -> Vec<(&'static str, Variant<'static>)> {
    let mut props = property_values(s);
    props.push(("Id", Variant::from(s.id.to_string())));
    props
}

/// The property values of a snapshot, as D-Bus values, for change detection.
fn property_values(s: &Snapshot) -> Vec<(&'static str, Variant<'static>)> {
    vec![
        ("UniqueUserId", Variant::from(s.unique_user_id.to_string())),
        ("Username", Variant::from(s.username.to_string())),
        ("State", Variant::from(s.state.as_str().to_owned())),
        ("Valid", Variant::from(s.valid)),
        ("ExpiresAt", Variant::from(s.expires_at_secs())),
        ("RefreshAt", Variant::from(secs(s.refresh_at))),
        ("LastLoginAt", Variant::from(secs(s.last_login_at.unwrap_or(0.0)))),
        ("LastError", Variant::from(s.last_error.map(|e| e.as_str()).unwrap_or("").to_owned())),
        ("LoginsToday", Variant::from(s.logins_today)),
        ("LoginsPerDay", Variant::from(s.logins_per_day)),
        ("Pacing", Variant::from(s.pacing)),
    ]
}

/// Desktop notifications through `org.freedesktop.Notifications` when a session cannot
/// re-authorize by itself, as GNOME Online Accounts does. One per entry into
/// `needs-reauthorization` (the signal is emitted once per entry); a later one for the same
/// session replaces the earlier. Harmless without a notification server.
#[derive(Debug)]
pub struct Notifier {
    conn: Connection,
    enabled: std::sync::atomic::AtomicBool,
    /// Session id → notification id, so a new notification replaces the old one.
    ids: Mutex<HashMap<String, u32>>,
}

impl Notifier {
    /// A notifier on the session bus `conn`.
    pub fn new(conn: Connection, enabled: bool) -> Self {
        Notifier { conn, enabled: std::sync::atomic::AtomicBool::new(enabled), ids: Mutex::new(HashMap::new()) }
    }

    /// Turns notifications on or off (`[notify] enabled`, also on reload).
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, std::sync::atomic::Ordering::Relaxed);
    }

    /// Tells the user that `session` needs re-authorization.
    pub async fn reauthorization_required(&self, session: &str) {
        if !self.enabled.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let replaces = self.ids.lock().unwrap_or_else(|e| e.into_inner()).get(session).copied().unwrap_or(0);
        let hints: HashMap<&str, Variant<'_>> = HashMap::from([("urgency", Variant::U8(1))]);
        let body = format!(
            "Entrupy sign-in for session \u{201c}{session}\u{201d} was rejected by the app's backend. Sign in again in the app."
        );
        let reply = self
            .conn
            .call_method(
                Some("org.freedesktop.Notifications"),
                "/org/freedesktop/Notifications",
                Some("org.freedesktop.Notifications"),
                "Notify",
                &(
                    "entrupy-tokend",
                    replaces,
                    "dialog-password",
                    "Entrupy sign-in needed",
                    body,
                    Vec::<&str>::new(),
                    hints,
                    -1i32,
                ),
            )
            .await;
        match reply.and_then(|m| m.body().deserialize::<u32>()) {
            Ok(id) => {
                self.ids.lock().unwrap_or_else(|e| e.into_inner()).insert(session.to_owned(), id);
            }
            Err(e) => tracing::debug!(error = %e, "no desktop notification (no notification server?)"),
        }
    }
}

/// The one publisher of the daemon: turns the loop's [`Update`]s into `PropertiesChanged`
/// (only the properties that changed) and signals, in the order the loop sent them, and
/// serves or stops serving the sessions a reload added or removed, until the channel closes.
pub async fn publisher(
    conn: Connection,
    ctx: Arc<BusCtx>,
    mut updates: mpsc::UnboundedReceiver<Update>,
    notifier: Option<Arc<Notifier>>,
) {
    while let Some(update) = updates.recv().await {
        match update {
            Update::Changed(change) => properties_changed(&conn, &change.0, &change.1).await,
            Update::Signal(id, signal) => {
                if signal == Signal::ReauthorizationRequired
                    && let Some(n) = notifier.clone()
                {
                    let id = id.clone();
                    tokio::spawn(async move { n.reauthorization_required(&id).await });
                }
                emit(&conn, &id, signal).await;
            }
            Update::Added(_, rx) => {
                if let Err(e) = serve_session(&conn, &ctx, rx, true).await {
                    tracing::error!(error = %e, "cannot serve a session on the bus");
                }
            }
            Update::Removed(id) => unserve_session(&conn, &id).await,
        }
    }
}

async fn properties_changed(conn: &Connection, old: &Snapshot, new: &Snapshot) {
    let changed: HashMap<&str, Variant<'_>> = property_values(new)
        .into_iter()
        .zip(property_values(old))
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, _)| a)
        .collect();
    if changed.is_empty() {
        return;
    }
    let Some(emitter) = emitter_for(conn, &new.id) else { return };
    let iface = zbus::names::InterfaceName::from_static_str_unchecked(names::SESSION_INTERFACE);
    if let Err(e) = zbus::fdo::Properties::properties_changed(&emitter, iface, changed, Cow::Borrowed(&[])).await {
        tracing::debug!(error = %e, "cannot emit PropertiesChanged");
    }
}

async fn emit(conn: &Connection, id: &str, signal: Signal) {
    let Some(emitter) = emitter_for(conn, id) else { return };
    let res = match signal {
        Signal::LoginSucceeded(exp) => SessionObject::login_succeeded(&emitter, secs(exp)).await,
        Signal::LoginFailed(code, desc) => SessionObject::login_failed(&emitter, &code, &desc).await,
        Signal::AuthorizationExpired => SessionObject::authorization_expired(&emitter).await,
        Signal::ReauthorizationRequired => SessionObject::reauthorization_required(&emitter).await,
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "cannot emit a signal");
    }
}

fn emitter_for<'a>(conn: &Connection, id: &str) -> Option<SignalEmitter<'a>> {
    let path = zbus::ObjectPath::try_from(names::session_path(id)).ok()?;
    Some(SignalEmitter::from_parts(conn.clone(), path))
}

/// `InterfacesAdded` for a session served after start (zbus without its `object-manager`
/// feature sends none itself).
pub async fn announce_added(conn: &Connection, snap: &Snapshot) {
    let Ok(path) = zbus::ObjectPath::try_from(names::session_path(&snap.id)) else { return };
    let props: HashMap<&str, Variant<'_>> = interface_properties(snap).into_iter().collect();
    let interfaces = HashMap::from([(names::SESSION_INTERFACE, props)]);
    let Some(emitter) = manager_emitter(conn) else { return };
    if let Err(e) = ObjectManagerObject::interfaces_added(&emitter, path, interfaces).await {
        tracing::debug!(error = %e, "cannot emit InterfacesAdded");
    }
}

/// `InterfacesRemoved` for a session that went away.
pub async fn announce_removed(conn: &Connection, id: &str) {
    let Ok(path) = zbus::ObjectPath::try_from(names::session_path(id)) else { return };
    let Some(emitter) = manager_emitter(conn) else { return };
    if let Err(e) = ObjectManagerObject::interfaces_removed(&emitter, path, &[names::SESSION_INTERFACE]).await {
        tracing::debug!(error = %e, "cannot emit InterfacesRemoved");
    }
}

fn manager_emitter<'a>(conn: &Connection) -> Option<SignalEmitter<'a>> {
    let path = zbus::ObjectPath::try_from(names::MANAGER_PATH).ok()?;
    Some(SignalEmitter::from_parts(conn.clone(), path))
}

/// The error a caller gets for an unknown session.
pub fn no_such_session(id: &str) -> ApiError {
    let shown: String = id.chars().take(64).collect();
    ApiError::new(ErrorName::NoSuchSession, format!("no session {shown:?}"))
}

#[cfg(test)]
mod tests {
    use proptest::strategy::Strategy;

    use super::*;

    fn v(s: &str) -> OwnedVariant {
        OwnedVariant::try_from(Variant::from(s)).unwrap()
    }

    proptest::proptest! {
        /// Fuzzing by property: arbitrary ids and profiles are accepted or refused with
        /// `InvalidArgument`, never a panic, and a refused credential is never quoted.
        #[test]
        fn arbitrary_profiles_never_panic(id in "\\PC{0,80}", keys in proptest::collection::vec(("\\PC{0,20}", "\\PC{0,60}"), 0..6)) {
            let mut p: HashMap<String, OwnedVariant> = HashMap::new();
            for (k, v) in keys {
                p.insert(k, OwnedVariant::try_from(Variant::from(v.as_str())).unwrap());
            }
            match parse_profile(&id, &p) {
                Ok((profile, _)) => {
                    proptest::prop_assert!(crate::config::validate_session_id(&id).is_ok());
                    proptest::prop_assert!(profile.validate().is_ok());
                }
                Err(Error::InvalidArgument(m)) => {
                    if let Some(Variant::Str(t)) = p.get("backend_token").map(|v| &**v)
                        && t.len() > 8
                    {
                        proptest::prop_assert!(!m.contains(t.as_str()));
                    }
                }
                Err(other) => proptest::prop_assert!(false, "unexpected error {other:?}"),
            }
        }
    }

    proptest::proptest! {
        /// `LoginWithSignedRequest` takes 1 to 8192 bytes of visible ASCII and nothing else;
        /// a refusal is `InvalidArgument` and never quotes the argument.
        #[test]
        fn signed_requests_are_visible_ascii_of_1_to_8192_bytes(
            s in proptest::prop_oneof![
                "[!-~]{0,40}",
                "[!-~]{8180,8200}",
                "\\PC{0,40}",
                proptest::collection::vec(proptest::num::u8::ANY, 0..40)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ]
        ) {
            let ok = (1..=8192).contains(&s.len()) && s.bytes().all(|b| (0x21..=0x7e).contains(&b));
            match check_signed_request(&s) {
                Ok(()) => proptest::prop_assert!(ok),
                Err(Error::InvalidArgument(m)) => {
                    proptest::prop_assert!(!ok);
                    proptest::prop_assert!(s.len() < 4 || !m.contains(s.as_str()), "{m:?} quotes the argument");
                }
                Err(other) => proptest::prop_assert!(false, "unexpected error {other:?}"),
            }
        }
    }

    #[test]
    fn signed_request_edges() {
        assert!(check_signed_request("a").is_ok());
        assert!(check_signed_request(&"~".repeat(8192)).is_ok());
        for bad in ["", " ", "a b", "tab\tx", "caf\u{e9}", "nul\0x", "del\u{7f}"] {
            assert!(matches!(check_signed_request(bad), Err(Error::InvalidArgument(_))), "{bad:?}");
        }
        let long = "x".repeat(8193);
        assert!(matches!(check_signed_request(&long), Err(Error::InvalidArgument(m)) if !m.contains("xxxx")));
    }

    #[test]
    fn the_allow_list_guards_every_method_that_returns_or_changes_a_token() {
        for m in ["GetToken", "EnsureValid", "LoginWithSignedRequest", "Refresh", "Cleanup"] {
            assert!(is_token_method(m), "{m}");
        }
        for m in ["IsAuthorizationValid", "GenerateAuthorizationRequest", "ListSessions", "Get", "GetAll"] {
            assert!(!is_token_method(m), "{m}");
        }
    }

    #[test]
    fn a_pidfd_gives_the_executable_only_while_its_process_lives() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
        let want = std::fs::read_link(format!("/proc/{}/exe", child.id())).unwrap();
        assert_eq!(exe_of_pidfd(&fd).unwrap(), want);
        child.kill().unwrap();
        child.wait().unwrap();
        // Reaped: the pid may be reused now, and the pidfd says so.
        assert!(exe_of_pidfd(&fd).is_err());
        // A descriptor that is not a pidfd is refused.
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(exe_of_pidfd(&file).is_err());
    }

    #[test]
    fn only_the_same_user_is_allowed() {
        assert!(caller_allowed(1000, 1000));
        assert!(!caller_allowed(1001, 1000));
        assert!(!caller_allowed(0, 1000));
    }

    #[test]
    fn profile_validation() {
        let mut p = HashMap::new();
        p.insert("unique_user_id".to_owned(), v("user-0001x"));
        p.insert("email".to_owned(), v("a@b.c"));
        let (ok, _) = parse_profile("new", &p).unwrap();
        assert_eq!(ok.unique_user_id, "user-0001x");
        assert!(matches!(parse_profile("Bad", &p), Err(Error::InvalidArgument(_))));
        let mut q = p.clone();
        q.insert("color".to_owned(), v("red"));
        assert!(matches!(parse_profile("new", &q), Err(Error::InvalidArgument(m)) if m.contains("color")));
        let mut q = p.clone();
        q.insert("first_name".to_owned(), OwnedVariant::from(5u32));
        assert!(matches!(parse_profile("new", &q), Err(Error::InvalidArgument(m)) if m.contains("first_name")));
        let mut q = p.clone();
        q.remove("email");
        assert!(matches!(parse_profile("new", &q), Err(Error::InvalidArgument(m)) if m.contains("email")));
        let mut q = p.clone();
        q.insert("unique_user_id".to_owned(), v("short"));
        assert!(matches!(parse_profile("new", &q), Err(Error::InvalidArgument(_))));
        let mut q = p;
        q.insert("backend_token".to_owned(), v("tok en"));
        assert!(matches!(parse_profile("new", &q), Err(Error::InvalidArgument(m)) if !m.contains("tok en")));
    }
}
