//! The simulator's start-up configuration. Most of it can also be changed while the
//! simulator runs, through the setters on [`crate::Simulator`].

use std::time::Duration;

/// How a simulator instance behaves when started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// How long an issued token lives (`expiration_time = now + token_lifetime`).
    pub token_lifetime: Duration,
    /// Successful logins allowed per unique_user_id in any 60 s window.
    pub logins_per_minute: u32,
    /// Successful logins allowed per unique_user_id in any 24 h window.
    pub logins_per_day: u32,
    /// Bearer credentials the backend accepts; `None` accepts any or none.
    pub accepted_credentials: Option<Vec<String>>,
    /// How old a signed request (and the authorization request inside it) may be at
    /// `/login`.
    pub signed_request_max_age: Duration,
    /// Serve HTTPS with a freshly generated test CA instead of plain HTTP.
    pub tls: bool,
    /// The port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            token_lifetime: Duration::from_secs(3600),
            logins_per_minute: 5,
            logins_per_day: 100,
            accepted_credentials: None,
            signed_request_max_age: Duration::from_secs(300),
            tls: false,
            port: 0,
        }
    }
}
