//! The D-Bus service (SPEC section 6): the `Manager` and `Session` objects, the caller check,
//! and the publisher that turns session snapshots and events into `PropertiesChanged` and
//! signals.
//!
//! A thin layer: methods read the sessions' published snapshots or send them a request, and
//! map domain failures into D-Bus errors through [`Error::from`]. It owns no session state
//! and knows nothing of HTTP or the disk.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::{Connection, interface};

use crate::error::{ApiError, Error, ErrorName};
use crate::names;
use crate::session::{SessionEvent, SessionHandle, Snapshot, Update};

/// Longest string accepted from a D-Bus caller (a signed request can be long; 64 KiB).
pub const MAX_ARG_BYTES: usize = 64 * 1024;

/// Decides whether a caller may use the methods: only the daemon's own Unix user, and for
/// `GetToken`/`EnsureValid` only the allowed executables when an allow-list is configured.
#[derive(Debug)]
pub struct Access {
    /// The daemon's effective uid.
    my_uid: u32,
    /// Unique bus name → uid; unique names are never reused, so entries stay true.
    cache: Mutex<HashMap<String, u32>>,
    /// Unique bus name → the caller's executable, for the allow-list.
    exes: Mutex<HashMap<String, Option<std::path::PathBuf>>>,
    /// `[access] token_executables`; `None` lets any program of the user read tokens.
    token_executables: std::sync::RwLock<Option<Vec<std::path::PathBuf>>>,
}

/// Whether a caller with `caller_uid` may call a daemon running as `my_uid`.
pub fn caller_allowed(caller_uid: u32, my_uid: u32) -> bool {
    caller_uid == my_uid
}

impl Access {
    /// For the current process's user.
    pub fn new() -> Self {
        Access {
            my_uid: rustix::process::geteuid().as_raw(),
            cache: Mutex::new(HashMap::new()),
            exes: Mutex::new(HashMap::new()),
            token_executables: std::sync::RwLock::new(None),
        }
    }

    /// Sets the token allow-list (from the config, at start and on reload).
    pub fn set_token_executables(&self, list: Option<Vec<std::path::PathBuf>>) {
        *self.token_executables.write().unwrap_or_else(|e| e.into_inner()) = list;
    }

    /// [`Access::check`], plus the allow-list for methods that hand out tokens.
    pub async fn check_token(&self, conn: &Connection, hdr: &Header<'_>) -> Result<(), Error> {
        self.check(conn, hdr).await?;
        let allowed = self.token_executables.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (Some(allowed), Some(sender)) = (allowed, hdr.sender()) else { return Ok(()) };
        let cached = self.exes.lock().unwrap_or_else(|e| e.into_inner()).get(sender.as_str()).cloned();
        let exe = match cached {
            Some(e) => e,
            None => {
                let proxy = zbus::fdo::DBusProxy::new(conn).await?;
                let pid = proxy.get_connection_unix_process_id(zbus::names::BusName::Unique(sender.clone())).await.ok();
                let exe = pid.and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok());
                let mut exes = self.exes.lock().unwrap_or_else(|e| e.into_inner());
                if exes.len() > 4096 {
                    exes.clear();
                }
                exes.insert(sender.to_string(), exe.clone());
                exe
            }
        };
        match exe {
            Some(e) if allowed.iter().any(|a| a == &e) => Ok(()),
            Some(e) => {
                Err(Error::AccessDenied(format!("{} may not read tokens ([access] token_executables)", e.display())))
            }
            None => Err(Error::AccessDenied("cannot determine the caller's executable".into())),
        }
    }

    /// Checks the sender of `hdr`, asking the bus for its uid once per connection.
    pub async fn check(&self, conn: &Connection, hdr: &Header<'_>) -> Result<(), Error> {
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

/// What the manager object needs from the daemon: the session registry.
#[async_trait::async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Paths of all sessions, sorted by id.
    async fn list(&self) -> Vec<String>;
    /// Whether a session exists.
    async fn exists(&self, id: &str) -> bool;
    /// Adds a session over D-Bus.
    async fn add(&self, id: &str, profile: ProfileArgs) -> Result<(), ApiError>;
    /// Removes a session (cleans up and forgets it).
    async fn remove(&self, id: &str) -> Result<(), ApiError>;
    /// Every session's current snapshot (for `GetManagedObjects`).
    async fn snapshots(&self) -> Vec<Snapshot>;
}

/// `org.freedesktop.DBus.ObjectManager` at `/com/entrupy/TokenDaemon1`. zbus's own lists
/// every node under the manager, the interface-less `/com/entrupy/TokenDaemon1/session`
/// among them; this one lists exactly the sessions. zbus still emits `InterfacesAdded` and
/// `InterfacesRemoved` when session objects come and go (it recognizes the interface name),
/// except for the sessions served at start (`ObjectServer::at_quiet`, see `daemon::run`).
pub struct ObjectManagerObject {
    registry: Arc<dyn Registry>,
}

impl std::fmt::Debug for ObjectManagerObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectManagerObject")
    }
}

impl ObjectManagerObject {
    /// An object manager over `registry`.
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Self { registry }
    }
}

type ManagedObjects = HashMap<OwnedObjectPath, HashMap<String, HashMap<String, OwnedValue>>>;

#[interface(name = "org.freedesktop.DBus.ObjectManager")]
impl ObjectManagerObject {
    /// Every session object with its interface's properties.
    #[zbus(out_args("object_paths_interfaces_and_properties"))]
    async fn get_managed_objects(&self) -> Result<ManagedObjects, Error> {
        let mut out = ManagedObjects::new();
        for snap in self.registry.snapshots().await {
            let mut props: HashMap<String, OwnedValue> = HashMap::new();
            props.insert("Id".to_owned(), OwnedValue::from(zbus::zvariant::Str::from(snap.id.to_string())));
            for (name, value) in property_values(&snap) {
                if let Ok(v) = OwnedValue::try_from(value) {
                    props.insert(name.to_owned(), v);
                }
            }
            let path = path(names::session_path(&snap.id))?;
            out.insert(path, HashMap::from([(names::SESSION_INTERFACE.to_owned(), props)]));
        }
        Ok(out)
    }

    /// A session appeared.
    #[zbus(signal)]
    async fn interfaces_added(
        emitter: &SignalEmitter<'_>,
        object_path: zbus::zvariant::ObjectPath<'_>,
        interfaces_and_properties: HashMap<&str, HashMap<&str, Value<'_>>>,
    ) -> zbus::Result<()>;

    /// A session went away.
    #[zbus(signal)]
    async fn interfaces_removed(
        emitter: &SignalEmitter<'_>,
        object_path: zbus::zvariant::ObjectPath<'_>,
        interfaces: &[&str],
    ) -> zbus::Result<()>;
}

/// `AddSession`'s profile, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileArgs {
    /// Required.
    pub unique_user_id: String,
    /// Required.
    pub email: String,
    /// Optional.
    pub first_name: Option<String>,
    /// Optional.
    pub last_name: Option<String>,
    /// Optional credential, kept with the state.
    pub backend_token: Option<crate::secret::Secret>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Validates `AddSession`'s arguments: the id, and the profile's keys, types and values.
pub fn parse_profile(id: &str, profile: &HashMap<String, OwnedValue>) -> Result<ProfileArgs, Error> {
    crate::config::validate_session_id(id).map_err(invalid)?;
    let get = |key: &str| -> Result<Option<String>, Error> {
        match profile.get(key).map(|v| &**v) {
            None => Ok(None),
            Some(Value::Str(s)) => {
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
    let args = ProfileArgs {
        unique_user_id: get("unique_user_id")?.ok_or_else(|| invalid("profile needs unique_user_id"))?,
        email: get("email")?.ok_or_else(|| invalid("profile needs email"))?,
        first_name: get("first_name")?,
        last_name: get("last_name")?,
        backend_token: get("backend_token")?.map(crate::secret::Secret::new),
    };
    if let Some(unknown) = profile.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        let shown: String = unknown.chars().take(64).collect();
        return Err(invalid(format!("unknown profile key {shown:?}; known are {}", KNOWN.join(", "))));
    }
    crate::config::validate_unique_user_id(&args.unique_user_id).map_err(invalid)?;
    crate::config::validate_email(&args.email).map_err(invalid)?;
    for n in [&args.first_name, &args.last_name].into_iter().flatten() {
        crate::config::validate_name(n).map_err(invalid)?;
    }
    if let Some(t) = &args.backend_token
        && (t.is_empty() || t.expose().chars().any(|c| c.is_control() || c == ' '))
    {
        return Err(invalid("backend_token must be non-empty, without spaces or control characters"));
    }
    Ok(args)
}

/// `com.entrupy.TokenDaemon1.Manager` at `/com/entrupy/TokenDaemon1`.
pub struct ManagerObject {
    registry: Arc<dyn Registry>,
    access: Arc<Access>,
}

impl std::fmt::Debug for ManagerObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ManagerObject")
    }
}

impl ManagerObject {
    /// A manager over `registry`.
    pub fn new(registry: Arc<dyn Registry>, access: Arc<Access>) -> Self {
        Self { registry, access }
    }
}

fn path(p: String) -> Result<OwnedObjectPath, Error> {
    OwnedObjectPath::try_from(p).map_err(|e| Error::ZBus(e.into()))
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
        self.access.check(conn, &hdr).await?;
        self.registry.list().await.into_iter().map(path).collect()
    }

    /// The object path of the session `id`.
    #[zbus(out_args("path"))]
    async fn get_session(
        &self,
        id: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, Error> {
        self.access.check(conn, &hdr).await?;
        if id.len() > 64 || !self.registry.exists(id).await {
            let shown: String = id.chars().take(64).collect();
            return Err(Error::NoSuchSession(format!("no session {shown:?}")));
        }
        path(names::session_path(id))
    }

    /// Adds and persists a session.
    #[zbus(out_args("path"))]
    async fn add_session(
        &self,
        id: &str,
        profile: HashMap<String, OwnedValue>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, Error> {
        self.access.check(conn, &hdr).await?;
        let args = parse_profile(id, &profile)?;
        self.registry.add(id, args).await?;
        path(names::session_path(id))
    }

    /// Cleans up and forgets a session.
    async fn remove_session(
        &self,
        id: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.access.check(conn, &hdr).await?;
        Ok(self.registry.remove(id).await?)
    }

    /// The daemon's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        names::VERSION.to_owned()
    }
}

/// `com.entrupy.TokenDaemon1.Session` at `/com/entrupy/TokenDaemon1/session/<id>`.
#[derive(Debug)]
pub struct SessionObject {
    handle: SessionHandle,
    access: Arc<Access>,
}

impl SessionObject {
    /// The object of a session.
    pub fn new(handle: SessionHandle, access: Arc<Access>) -> Self {
        Self { handle, access }
    }
}

fn secs(t: f64) -> u64 {
    if t.is_finite() && t > 0.0 { t.floor() as u64 } else { 0 }
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
        self.access.check(conn, &hdr).await?;
        Ok(self.handle.is_valid())
    }

    /// The token and its expiry as one `(st)` struct (SPEC 6); `NotAuthorized` when not
    /// valid.
    #[zbus(out_args("token"))]
    async fn get_token(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<((String, u64),), Error> {
        self.access.check_token(conn, &hdr).await?;
        let (t, e) = self.handle.get_token()?;
        Ok(((t.expose().to_owned(), secs(e)),))
    }

    /// A token valid for at least `min_seconds` more, refreshing first if needed; one
    /// `(st)` struct like `GetToken`.
    #[zbus(out_args("token"))]
    async fn ensure_valid(
        &self,
        min_seconds: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<((String, u64),), Error> {
        self.access.check_token(conn, &hdr).await?;
        let (t, e) = self.handle.ensure_valid(min_seconds).await?;
        Ok(((t.expose().to_owned(), secs(e)),))
    }

    /// Re-authorizes now; returns the new expiry.
    #[zbus(out_args("expires_at"))]
    async fn refresh(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u64, Error> {
        self.access.check(conn, &hdr).await?;
        Ok(secs(self.handle.refresh().await?))
    }

    /// A fresh SDK authorization request, for apps that call the backend themselves.
    #[zbus(out_args("sdk_authorization_request"))]
    async fn generate_authorization_request(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, Error> {
        self.access.check(conn, &hdr).await?;
        Ok(crate::authreq::generate(self.handle.now(), self.handle.device_id()))
    }

    /// Logs in with a request the caller had signed.
    #[zbus(out_args("expires_at"))]
    async fn login_with_signed_request(
        &self,
        signed: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u64, Error> {
        self.access.check(conn, &hdr).await?;
        if signed.is_empty() {
            return Err(invalid("the signed request is empty"));
        }
        if signed.len() > MAX_ARG_BYTES {
            return Err(invalid(format!("the signed request is longer than {MAX_ARG_BYTES} bytes")));
        }
        let s = crate::secret::Secret::new(signed);
        Ok(secs(self.handle.login_with_signed(s).await?))
    }

    /// Drops the token and stops refreshing.
    async fn cleanup(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.access.check(conn, &hdr).await?;
        Ok(self.handle.cleanup().await?)
    }

    /// Session id.
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.handle.id().to_owned()
    }

    /// The user.
    #[zbus(property)]
    fn unique_user_id(&self) -> String {
        self.handle.with_snapshot(|s| s.unique_user_id.clone())
    }

    /// As returned by the backend.
    #[zbus(property)]
    fn username(&self) -> String {
        self.handle.with_snapshot(|s| s.username.to_string())
    }

    /// `logged-out`, `valid`, `refreshing`, `expired`, `needs-reauthorization` or `failed`.
    #[zbus(property)]
    fn state(&self) -> String {
        self.handle.with_snapshot(|s| s.state.as_str().to_owned())
    }

    /// Whether the token is valid now.
    #[zbus(property)]
    fn valid(&self) -> bool {
        self.handle.is_valid()
    }

    /// Expiry, Unix seconds rounded down; 0 for none.
    #[zbus(property)]
    fn expires_at(&self) -> u64 {
        self.handle.with_snapshot(|s| s.expires_at_secs())
    }

    /// Next planned refresh; 0 for none.
    #[zbus(property)]
    fn refresh_at(&self) -> u64 {
        self.handle.with_snapshot(|s| secs(s.refresh_at))
    }

    /// When the last login answer arrived; 0 for none.
    #[zbus(property)]
    fn last_login_at(&self) -> u64 {
        self.handle.with_snapshot(|s| secs(s.last_login_at.unwrap_or(0.0)))
    }

    /// Short name of the last failure, `""` for none.
    #[zbus(property)]
    fn last_error(&self) -> String {
        self.handle.with_snapshot(|s| s.last_error.map(|e| e.as_str().to_owned()).unwrap_or_default())
    }

    /// Extra (not in SPEC 6): successful logins of this user in the last 24 h.
    #[zbus(property)]
    fn logins_today(&self) -> u32 {
        self.handle.with_snapshot(|s| s.logins_today)
    }

    /// Extra (not in SPEC 6): the daily login budget of this user.
    #[zbus(property)]
    fn logins_per_day(&self) -> u32 {
        self.handle.with_snapshot(|s| s.logins_per_day)
    }

    /// Extra (not in SPEC 6): whether refreshes are paced to make the daily budget last.
    #[zbus(property)]
    fn pacing(&self) -> bool {
        self.handle.with_snapshot(|s| s.pacing)
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

/// The property values of a snapshot, as D-Bus values, for change detection.
fn property_values(s: &Snapshot) -> Vec<(&'static str, Value<'static>)> {
    vec![
        ("UniqueUserId", Value::from(s.unique_user_id.clone())),
        ("Username", Value::from(s.username.to_string())),
        ("State", Value::from(s.state.as_str().to_owned())),
        ("Valid", Value::from(s.valid)),
        ("ExpiresAt", Value::from(s.expires_at_secs())),
        ("RefreshAt", Value::from(secs(s.refresh_at))),
        ("LastLoginAt", Value::from(secs(s.last_login_at.unwrap_or(0.0)))),
        ("LastError", Value::from(s.last_error.map(|e| e.as_str()).unwrap_or("").to_owned())),
        ("LoginsToday", Value::from(s.logins_today)),
        ("LoginsPerDay", Value::from(s.logins_per_day)),
        ("Pacing", Value::from(s.pacing)),
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
        let hints: HashMap<&str, Value<'_>> = HashMap::from([("urgency", Value::U8(1))]);
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

/// The one publisher of the daemon: turns every session's [`Update`]s into
/// `PropertiesChanged` (only the properties that changed) and signals, in the order the
/// sessions sent them, until the channel closes.
pub async fn publisher(
    conn: Connection,
    mut updates: mpsc::UnboundedReceiver<Update>,
    notifier: Option<Arc<Notifier>>,
) {
    while let Some(update) = updates.recv().await {
        match update {
            Update::Changed(change) => {
                let (old, new) = *change;
                let changed: HashMap<&str, Value<'_>> = property_values(&new)
                    .into_iter()
                    .zip(property_values(&old))
                    .filter(|(a, b)| a.1 != b.1)
                    .map(|(a, _)| a)
                    .collect();
                if changed.is_empty() {
                    continue;
                }
                let Some(emitter) = emitter_for(&conn, &new.id) else { continue };
                let iface = zbus::names::InterfaceName::from_static_str_unchecked(names::SESSION_INTERFACE);
                if let Err(e) =
                    zbus::fdo::Properties::properties_changed(&emitter, iface, changed, Cow::Borrowed(&[])).await
                {
                    tracing::debug!(error = %e, "cannot emit PropertiesChanged");
                }
            }
            Update::Event(id, event) => {
                let Some(emitter) = emitter_for(&conn, &id) else { continue };
                let res = match event {
                    SessionEvent::LoginSucceeded(exp) => SessionObject::login_succeeded(&emitter, secs(exp)).await,
                    SessionEvent::LoginFailed(code, desc) => SessionObject::login_failed(&emitter, &code, &desc).await,
                    SessionEvent::AuthorizationExpired => SessionObject::authorization_expired(&emitter).await,
                    SessionEvent::ReauthorizationRequired => {
                        if let Some(n) = notifier.clone() {
                            tokio::spawn(async move { n.reauthorization_required(&id).await });
                        }
                        SessionObject::reauthorization_required(&emitter).await
                    }
                };
                if let Err(e) = res {
                    tracing::debug!(error = %e, "cannot emit a signal");
                }
            }
        }
    }
}

fn emitter_for<'a>(conn: &Connection, id: &str) -> Option<SignalEmitter<'a>> {
    let path = zbus::zvariant::ObjectPath::try_from(names::session_path(id)).ok()?;
    Some(SignalEmitter::from_parts(conn.clone(), path))
}

/// The error a caller gets for an unknown session.
pub fn no_such_session(id: &str) -> ApiError {
    let shown: String = id.chars().take(64).collect();
    ApiError::new(ErrorName::NoSuchSession, format!("no session {shown:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> OwnedValue {
        OwnedValue::try_from(Value::from(s)).unwrap()
    }

    proptest::proptest! {
        /// Fuzzing by property: arbitrary ids and profiles are accepted or refused with
        /// `InvalidArgument`, never a panic, and a refused credential is never quoted.
        #[test]
        fn arbitrary_profiles_never_panic(id in "\\PC{0,80}", keys in proptest::collection::vec(("\\PC{0,20}", "\\PC{0,60}"), 0..6)) {
            let mut p: HashMap<String, OwnedValue> = HashMap::new();
            for (k, v) in keys {
                p.insert(k, OwnedValue::try_from(Value::from(v.as_str())).unwrap());
            }
            match parse_profile(&id, &p) {
                Ok(args) => {
                    proptest::prop_assert!(crate::config::validate_session_id(&id).is_ok());
                    proptest::prop_assert!(crate::config::validate_unique_user_id(&args.unique_user_id).is_ok());
                }
                Err(Error::InvalidArgument(m)) => {
                    if let Some(Value::Str(t)) = p.get("backend_token").map(|v| &**v)
                        && t.len() > 8
                    {
                        proptest::prop_assert!(!m.contains(t.as_str()));
                    }
                }
                Err(other) => proptest::prop_assert!(false, "unexpected error {other:?}"),
            }
        }
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
        let ok = parse_profile("new", &p).unwrap();
        assert_eq!(ok.unique_user_id, "user-0001x");
        assert!(matches!(parse_profile("Bad", &p), Err(Error::InvalidArgument(_))));
        let mut q = p.clone();
        q.insert("color".to_owned(), v("red"));
        assert!(matches!(parse_profile("new", &q), Err(Error::InvalidArgument(m)) if m.contains("color")));
        let mut q = p.clone();
        q.insert("first_name".to_owned(), OwnedValue::from(5u32));
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
