//! quic-fabric: a real-time message fabric over QUIC.
//!
//! Layers, bottom up: [`protocol`] (frames and codec, no I/O), [`tls`]
//! (certificates and rustls configs), [`server`] (endpoint, accept loop,
//! shutdown) with its per-connection [`connection`] handler, the
//! [`client_manager`] registry of connected clients, the [`handler`] that
//! gives each frame type its meaning, the [`router`] that delivers messages,
//! and the [`client`] library used by the `fabric` CLI and the tests.

pub mod protocol;
