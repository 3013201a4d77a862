//! quic-fabric: a real-time message fabric over QUIC.
//!
//! Layers, bottom up: [`protocol`] (frames and codec, no I/O), [`tls`]
//! (certificates and rustls configs), [`server`] (endpoint, accept loop,
//! shutdown) with its per-connection handler in `connection`, the
//! [`client_manager`] registry of connected clients, the [`handler`] that
//! gives each frame type its meaning, the [`router`] that delivers messages,
//! and the [`client`] library used by the `fabric` CLI and the tests.

// Nothing that comes from the network or from Redis may panic the node:
// no unwrap()/expect() outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod client;
pub mod client_manager;
pub mod config;
mod connection;
pub mod handler;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod router;
pub mod server;
pub mod stats;
pub mod telemetry;
pub mod tls;

pub use config::{NodeArgs, NodeConfig};
pub use server::Server;
