//! One session: how it is defined ([`Definition`]), its pure state machine ([`core`]), the login
//! attempt the loop drives for it ([`attempt`]), what the bus reads of it ([`snapshot`]) and
//! what is kept of it on disk ([`record`]).
//!
//! The daemon's loop (`crate::engine`) owns every session's [`core::Core`]; nothing here
//! holds a lock or a task.

pub mod attempt;
pub mod core;
pub mod record;
pub mod snapshot;

pub use self::core::{Params, State};
pub use self::snapshot::{Published, Snapshot, SweepAt};

use crate::config::CredentialSource;
use crate::profile::Profile;
use crate::secret::Secret;

/// Where the session's app-user credential comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// None: signing requests go without `Authorization`.
    None,
    /// A file (or systemd credential), read at every attempt.
    Source(CredentialSource),
    /// Given to `AddSession` and kept with the state.
    Inline(Secret),
}

/// Where a session was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// In the config file: changed there, removed by a reload.
    Config,
    /// Added over D-Bus: its profile is kept with its state.
    Bus,
}

/// A session as the loop knows it: its id, its user, its credential and where it was
/// defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    /// Session id.
    pub id: String,
    /// Who the user is.
    pub profile: Profile,
    /// The app-user credential.
    pub credential: Credential,
    /// Where it was defined.
    pub origin: Origin,
}
