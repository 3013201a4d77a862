//! quic-fabric: a real-time message fabric over QUIC.
//!
//! The modules, bottom up (each uses only those above it in this list,
//! plus the client library's own `client`):
//!
//! - [`protocol`]: frame types, the pure codec, reading frames from a
//!   stream (`protocol::stream`), JSON views; no other module of the crate.
//! - [`config`] (settings), [`tls`] (certificates, rustls and QUIC endpoint
//!   keys), [`stats`] (counters), [`telemetry`] (logging).
//! - [`auth`] (JWT verification) and [`limits`] (rate limits, admission).
//! - [`bus`]: the cluster bus, in memory or through Redis; it sees the
//!   node's clients only through `bus::LocalPresence`.
//! - [`outbound`] (a client's queues and writers), [`registry`] (the
//!   clients connected to this node, the seed's ClientManager) and
//!   [`channels`] (their channel subscriptions and the namespace rules).
//! - [`router`]: where a message goes, locally and across the cluster.
//! - [`node`]: the node's state and operations (join and leave, the
//!   cluster event loop, drain, the admin operations).
//! - [`handler`] (what each frame type does) and `connection` (one client
//!   connection: handshake, stream readers, orderly end).
//! - [`metrics`] and [`admin`]: the HTTP listeners.
//! - [`server`]: the QUIC endpoint, accept loop and shutdown (the seed's
//!   QuicWebSocketServer).
//! - [`client`] (the client library) and [`cli`] (the `fabric` CLI), which
//!   use `protocol` and `tls` (and `auth`, to mint dev tokens) only.

// Nothing that comes from the network or from Redis may panic the node:
// no unwrap()/expect() outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod auth;
pub mod bus;
pub mod channels;
pub mod cli;
pub mod client;
pub mod config;
mod connection;
pub mod handler;
pub mod limits;
pub mod link;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod protocol;
pub mod registry;
pub mod router;
pub mod server;
pub mod session;
pub mod stats;
pub mod telemetry;
pub mod tls;
pub mod udp;
pub mod web;

pub use config::{NodeArgs, NodeConfig};
pub use node::Node;
pub use server::Server;
