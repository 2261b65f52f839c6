//! Error names of the public API and the D-Bus error enum (SPEC section 6).
//!
//! The runtime reports failures as an [`ErrorName`] with a message; the bus layer turns them
//! into [`Error`] through one mapping, [`Error::from_name`]. Messages never hold a secret.

/// The short error names of SPEC 6, as shown in `LastError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorName {
    /// No valid token.
    NotAuthorized,
    /// A bad argument.
    InvalidArgument,
    /// No session with that id.
    NoSuchSession,
    /// A session with that id exists.
    AlreadyExists,
    /// A 429 from either peer, or the daemon's own budget.
    TooManyRequests,
    /// Backend 401/403, or Entrupy 401 after the retry.
    Unauthorized,
    /// Connection failure, dropped connection or timeout.
    NetworkError,
    /// Backend 5xx, other 4xx, malformed answer.
    BackendError,
    /// Entrupy 5xx, other 4xx, malformed answer.
    ServerError,
    /// No backend URL.
    NotConfigured,
    /// A `Cleanup` or shutdown during the call.
    Cancelled,
    /// Caller of another Unix user (or not on the allow-list).
    AccessDenied,
}

impl ErrorName {
    /// Every name, for tests and parsing.
    pub const ALL: [ErrorName; 12] = [
        ErrorName::NotAuthorized,
        ErrorName::InvalidArgument,
        ErrorName::NoSuchSession,
        ErrorName::AlreadyExists,
        ErrorName::TooManyRequests,
        ErrorName::Unauthorized,
        ErrorName::NetworkError,
        ErrorName::BackendError,
        ErrorName::ServerError,
        ErrorName::NotConfigured,
        ErrorName::Cancelled,
        ErrorName::AccessDenied,
    ];

    /// The short name (`NetworkError`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorName::NotAuthorized => "NotAuthorized",
            ErrorName::InvalidArgument => "InvalidArgument",
            ErrorName::NoSuchSession => "NoSuchSession",
            ErrorName::AlreadyExists => "AlreadyExists",
            ErrorName::TooManyRequests => "TooManyRequests",
            ErrorName::Unauthorized => "Unauthorized",
            ErrorName::NetworkError => "NetworkError",
            ErrorName::BackendError => "BackendError",
            ErrorName::ServerError => "ServerError",
            ErrorName::NotConfigured => "NotConfigured",
            ErrorName::Cancelled => "Cancelled",
            ErrorName::AccessDenied => "AccessDenied",
        }
    }

    /// Parses a short name back.
    pub fn parse(s: &str) -> Option<ErrorName> {
        ErrorName::ALL.into_iter().find(|n| n.as_str() == s)
    }
}

impl std::fmt::Display for ErrorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure of a request to a session or the manager: its public name and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {message}")]
pub struct ApiError {
    /// The public error name.
    pub name: ErrorName,
    /// Human words; never a secret.
    pub message: String,
}

impl ApiError {
    /// An error with this name and message.
    pub fn new(name: ErrorName, message: impl Into<String>) -> Self {
        Self { name, message: message.into() }
    }
}

/// The D-Bus errors: `com.entrupy.TokenDaemon1.Error.<Name>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "com.entrupy.TokenDaemon1.Error")]
pub enum Error {
    /// A zbus-level failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No valid token.
    NotAuthorized(String),
    /// A bad argument.
    InvalidArgument(String),
    /// No such session.
    NoSuchSession(String),
    /// The session exists.
    AlreadyExists(String),
    /// Rate limited.
    TooManyRequests(String),
    /// Credential or signed request rejected.
    Unauthorized(String),
    /// Network failure.
    NetworkError(String),
    /// Backend failure.
    BackendError(String),
    /// Entrupy failure.
    ServerError(String),
    /// No backend configured.
    NotConfigured(String),
    /// Cancelled by cleanup or shutdown.
    Cancelled(String),
    /// Caller not allowed.
    AccessDenied(String),
}

impl Error {
    /// The one mapping from domain failures to D-Bus errors.
    pub fn from_name(name: ErrorName, message: String) -> Self {
        match name {
            ErrorName::NotAuthorized => Error::NotAuthorized(message),
            ErrorName::InvalidArgument => Error::InvalidArgument(message),
            ErrorName::NoSuchSession => Error::NoSuchSession(message),
            ErrorName::AlreadyExists => Error::AlreadyExists(message),
            ErrorName::TooManyRequests => Error::TooManyRequests(message),
            ErrorName::Unauthorized => Error::Unauthorized(message),
            ErrorName::NetworkError => Error::NetworkError(message),
            ErrorName::BackendError => Error::BackendError(message),
            ErrorName::ServerError => Error::ServerError(message),
            ErrorName::NotConfigured => Error::NotConfigured(message),
            ErrorName::Cancelled => Error::Cancelled(message),
            ErrorName::AccessDenied => Error::AccessDenied(message),
        }
    }
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Self {
        Error::from_name(e.name, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError as _;

    #[test]
    fn names_round_trip_and_map_to_dbus_names() {
        for n in ErrorName::ALL {
            assert_eq!(ErrorName::parse(n.as_str()), Some(n));
            let e = Error::from_name(n, "m".into());
            assert_eq!(e.name().as_str(), format!("com.entrupy.TokenDaemon1.Error.{}", n.as_str()));
        }
    }
}
