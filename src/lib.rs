//! entrupy-tokend: keeps a user's short-lived Entrupy SDK authorization token valid in the
//! background and answers local apps over D-Bus. See `ARCHITECTURE.md` for the map.

pub mod authreq;
pub mod bus;
pub mod client;
pub mod clock;
pub mod config;
pub mod credential;
pub mod ctl;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod generate;
pub mod http;
pub mod ledger;
pub mod logging;
pub mod names;
pub mod policy;
pub mod profile;
pub mod sandbox;
pub mod schedule;
pub mod secret;
pub mod session;
pub mod store;
pub mod sweep;
pub mod timers;
pub mod watch;
pub mod writer;
