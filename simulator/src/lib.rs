//! A realistic fake of the two peers of `entrupy-tokend`: the app's backend that signs SDK
//! authorization requests (`POST /sign`, SPEC 4.1) and Entrupy's login (`POST /login`,
//! SPEC 4.2), on one HTTP (or HTTPS) listener on 127.0.0.1.
//!
//! It is strict where the real services are (signatures, single-use and fresh signed
//! requests, per-user login limits with `Retry-After`, profile conflicts), logs every
//! request for assertions, and can be scripted to misbehave ([`Fault`]), so that a daemon
//! bug shows up in tests. The daemon's integration tests use it in-process on tokio; the
//! `entrupy-sim` binary serves the demo script.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use entrupy_sim::{Endpoint, Fault, SimConfig, Simulator};
//! let sim = Simulator::start(SimConfig::default()).await?;
//! sim.push_fault(Endpoint::Login, Fault::Status { status: 503, body: None, retry_after: None }, 1);
//! // point the daemon at sim.api_url() and sim.backend_url() ...
//! assert_eq!(sim.counters().login_ok, 0);
//! # Ok(()) }
//! ```

mod body;
mod config;
mod control;
mod fault;
mod handlers;
mod server;
mod signing;
mod state;
mod tls;

pub use config::SimConfig;
pub use fault::{Endpoint, Fault};
pub use handlers::ORG_NAME;
pub use server::Simulator;
pub use signing::{
    AuthorizationRequest, decode_authorization_request, encode_authorization_request, fresh_authorization_request,
    random_hex32,
};
pub use state::{Counters, LoginRecord, RequestRecord};

/// The configuration of a private session `dbus-daemon` for tests and benchmarks: listens on
/// `socket`, no standard service directories (nothing of the host is activated; `services`
/// adds one, for activation tests), any user may connect and own names, and limits generous
/// enough for thousands of concurrent calls.
pub fn private_bus_config(socket: &std::path::Path, services: Option<&std::path::Path>) -> String {
    let servicedir = services.map(|s| format!("<servicedir>{}</servicedir>", s.display())).unwrap_or_default();
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  {servicedir}
  <limit name="max_replies_per_connection">50000</limit>
  <limit name="max_connections_per_user">10000</limit>
  <limit name="max_match_rules_per_connection">50000</limit>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_message_size">33554432</limit>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
        socket.display()
    )
}
