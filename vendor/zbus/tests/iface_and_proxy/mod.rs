pub mod client;
pub mod helpers;
pub mod iface;
pub mod types;
