//! Client proxies of the D-Bus API, generated from the same names the daemon serves; used by
//! `entrupy-tokenctl`, the examples and the tests.

use std::collections::HashMap;

use zbus::proxy;
use zbus::{OwnedObjectPath, Variant};

/// `com.entrupy.TokenDaemon1.Manager`.
#[proxy(
    interface = "com.entrupy.TokenDaemon1.Manager",
    default_service = "com.entrupy.TokenDaemon1",
    default_path = "/com/entrupy/TokenDaemon1"
)]
pub trait Manager {
    /// All sessions.
    fn list_sessions(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    /// One session's path.
    fn get_session(&self, id: &str) -> zbus::Result<OwnedObjectPath>;
    /// Adds a session.
    fn add_session(&self, id: &str, profile: HashMap<&str, Variant<'_>>) -> zbus::Result<OwnedObjectPath>;
    /// Removes a session.
    fn remove_session(&self, id: &str) -> zbus::Result<()>;
    /// The daemon's version.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

/// `com.entrupy.TokenDaemon1.Session`.
#[proxy(interface = "com.entrupy.TokenDaemon1.Session", default_service = "com.entrupy.TokenDaemon1")]
pub trait Session {
    /// Valid now?
    fn is_authorization_valid(&self) -> zbus::Result<bool>;
    /// Token and expiry.
    fn get_token(&self) -> zbus::Result<(String, u64)>;
    /// Token valid for at least `min_seconds`.
    fn ensure_valid(&self, min_seconds: u32) -> zbus::Result<(String, u64)>;
    /// Re-authorize now.
    fn refresh(&self) -> zbus::Result<u64>;
    /// A fresh authorization request.
    fn generate_authorization_request(&self) -> zbus::Result<String>;
    /// Log in with a signed request.
    fn login_with_signed_request(&self, signed_request: &str) -> zbus::Result<u64>;
    /// Drop the token.
    fn cleanup(&self) -> zbus::Result<()>;
    /// Id.
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    /// User.
    #[zbus(property)]
    fn unique_user_id(&self) -> zbus::Result<String>;
    /// Username.
    #[zbus(property)]
    fn username(&self) -> zbus::Result<String>;
    /// State.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// Valid.
    #[zbus(property)]
    fn valid(&self) -> zbus::Result<bool>;
    /// Expiry.
    #[zbus(property)]
    fn expires_at(&self) -> zbus::Result<u64>;
    /// Next refresh.
    #[zbus(property)]
    fn refresh_at(&self) -> zbus::Result<u64>;
    /// Last login.
    #[zbus(property)]
    fn last_login_at(&self) -> zbus::Result<u64>;
    /// Last error.
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;
    /// Extra: logins of this user in the last 24 h.
    #[zbus(property)]
    fn logins_today(&self) -> zbus::Result<u32>;
    /// Extra: the daily login budget.
    #[zbus(property)]
    fn logins_per_day(&self) -> zbus::Result<u32>;
    /// Extra: refreshes are paced.
    #[zbus(property)]
    fn pacing(&self) -> zbus::Result<bool>;
    /// Signal.
    #[zbus(signal)]
    fn login_succeeded(&self, expires_at: u64) -> zbus::Result<()>;
    /// Signal.
    #[zbus(signal)]
    fn login_failed(&self, error_code: String, description: String) -> zbus::Result<()>;
    /// Signal.
    #[zbus(signal)]
    fn authorization_expired(&self) -> zbus::Result<()>;
    /// Signal.
    #[zbus(signal)]
    fn reauthorization_required(&self) -> zbus::Result<()>;
}

/// The short error name of a D-Bus error from the daemon (`NetworkError`), or the full name
/// for other errors.
pub fn short_error_name(e: &zbus::Error) -> Option<String> {
    let (name, _) = error_reply(e)?;
    Some(name.strip_prefix(&format!("{}.", crate::names::ERROR_PREFIX)).unwrap_or(&name).to_owned())
}

/// The name and message of a D-Bus error reply, `None` for other failures. zbus reports the
/// names that `org.freedesktop.DBus.Error` defines (`ServiceUnknown`, ...) as `Error::FDO`
/// and the others as `Error::MethodError`.
pub fn error_reply(e: &zbus::Error) -> Option<(String, Option<String>)> {
    use zbus::DBusError as _;
    match e {
        zbus::Error::MethodError(name, msg, _) => Some((name.to_string(), msg.clone())),
        zbus::Error::FDO(f) => Some((f.name().to_string(), f.description().map(str::to_owned))),
        _ => None,
    }
}
