//! The raw-quinn floor: the same TLS, transport settings and length-prefixed
//! framing as a node, with no fabric logic at all. A raw server either
//! echoes each frame back to its sender (the `rtt` floor), forwards it to
//! every other connection through a bounded queue and writer task per
//! connection (the `direct-local` and `fanout` floors), or relays it
//! through a Redis channel to the other relay servers' connections (the
//! `direct-cross` floor of the same shape as the fabric's path).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use quic_fabric::config::{Congestion, NodeConfig};
use quic_fabric::protocol::{self, HARD_MAX_FRAME_BYTES, LENGTH_PREFIX_BYTES};
use quic_fabric::tls;

/// What a raw server does with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Send it back to its sender.
    Echo,
    /// Send it to every other connection.
    Forward,
    /// `relay:URL`: PUBLISH it on [`RELAY_CHANNEL`] of the Redis at URL;
    /// what other relay servers publish there goes to every connection.
    Relay(String),
}

/// The Redis channel relay servers share.
const RELAY_CHANNEL: &str = "bench:relay";

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Mode> {
        match s {
            "echo" => Ok(Mode::Echo),
            "forward" => Ok(Mode::Forward),
            other => match other.strip_prefix("relay:") {
                Some(url) => Ok(Mode::Relay(url.to_owned())),
                None => anyhow::bail!("raw-server mode {other:?}: echo, forward or relay:URL"),
            },
        }
    }
}

/// Runs a raw server in this process until it is killed (the child the
/// bench starts: `fabric-bench raw-server MODE ADDR CERTS`).
pub async fn serve_until_killed(
    mode: Mode,
    addr: SocketAddr,
    certs: &std::path::Path,
    congestion: Congestion,
) -> anyhow::Result<()> {
    let _server = RawServer::start(addr, certs, mode, congestion)?;
    std::future::pending::<()>().await;
    Ok(())
}

/// A raw quinn server on loopback.
pub struct RawServer {
    endpoint: quinn::Endpoint,
}

type Peers = Arc<std::sync::RwLock<Vec<(usize, mpsc::Sender<Bytes>)>>>;

impl RawServer {
    /// Starts a raw server on `addr` with the node's default transport and
    /// the dev certificates in `certs`.
    pub fn start(
        addr: SocketAddr,
        certs: &std::path::Path,
        mode: Mode,
        congestion: Congestion,
    ) -> anyhow::Result<RawServer> {
        let config = NodeConfig {
            listen: addr,
            certs_dir: certs.to_owned(),
            congestion_controller: congestion,
            ..NodeConfig::default()
        };
        // The node's endpoint (TLS, transport, socket), so only fabric logic differs.
        let endpoint = quic_fabric::server::endpoint(&config)?;
        let peers: Peers = Arc::new(std::sync::RwLock::new(Vec::new()));
        let relay = match &mode {
            Mode::Relay(url) => Some(Relay::start(url, peers.clone())?),
            _ => None,
        };
        let accept = endpoint.clone();
        tokio::spawn(async move {
            let mut next_id = 0usize;
            while let Some(incoming) = accept.accept().await {
                next_id += 1;
                let id = next_id;
                let peers = peers.clone();
                let mode = mode.clone();
                let relay = relay.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve(conn, id, mode, peers, relay).await;
                    }
                });
            }
        });
        Ok(RawServer { endpoint })
    }
}

/// A relay server's link to Redis: the least a cross-node path needs.
struct Relay {
    /// Random per server, so a server skips its own publishes.
    id: [u8; 8],
    client: redis::Client,
    publisher: tokio::sync::OnceCell<redis::aio::MultiplexedConnection>,
}

impl Relay {
    /// Connects lazily and subscribes at once; what other servers publish
    /// goes to every connection of `peers`.
    fn start(url: &str, peers: Peers) -> anyhow::Result<Arc<Relay>> {
        let relay = Arc::new(Relay {
            id: quic_fabric::protocol::NodeId::new_random().0.as_bytes()[..8]
                .try_into()
                .expect("8 of 16 bytes"),
            client: redis::Client::open(url)?,
            publisher: tokio::sync::OnceCell::new(),
        });
        let listener = relay.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut pubsub = match listener.client.get_async_pubsub().await {
                Ok(pubsub) => pubsub,
                Err(err) => return eprintln!("relay: cannot connect to Redis: {err}"),
            };
            if let Err(err) = pubsub.subscribe(RELAY_CHANNEL).await {
                return eprintln!("relay: cannot subscribe: {err}");
            }
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let payload = msg.get_payload_bytes();
                let Some((from, frame)) = payload.split_at_checked(8) else {
                    continue;
                };
                if from == listener.id {
                    continue;
                }
                let frame = Bytes::copy_from_slice(frame);
                for (_, t) in peers.read().unwrap_or_else(|e| e.into_inner()).iter() {
                    let _ = t.try_send(frame.clone());
                }
            }
        });
        Ok(relay)
    }

    /// Publishes `frame`, waiting for Redis to take it (one at a time per
    /// stream keeps the order).
    async fn publish(&self, frame: &[u8]) -> anyhow::Result<()> {
        let publisher = self
            .publisher
            .get_or_try_init(|| self.client.get_multiplexed_async_connection())
            .await?;
        let mut payload = Vec::with_capacity(8 + frame.len());
        payload.extend_from_slice(&self.id);
        payload.extend_from_slice(frame);
        redis::cmd("PUBLISH")
            .arg(RELAY_CHANNEL)
            .arg(payload)
            .query_async::<i64>(&mut publisher.clone())
            .await?;
        Ok(())
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"done");
    }
}

async fn serve(
    conn: quinn::Connection,
    id: usize,
    mode: Mode,
    peers: Peers,
    relay: Option<Arc<Relay>>,
) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
    peers
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, tx.clone()));
    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        let Ok(mut send) = writer_conn.open_uni().await else {
            return;
        };
        let mut batch = Vec::with_capacity(64);
        while rx.recv_many(&mut batch, 64).await > 0 {
            if send.write_all_chunks(&mut batch).await.is_err() {
                return;
            }
            batch.clear();
        }
    });
    while let Ok(mut recv) = conn.accept_uni().await {
        let peers = peers.clone();
        let tx = tx.clone();
        let mode = mode.clone();
        let relay = relay.clone();
        tokio::spawn(async move {
            while let Some(frame) = read(&mut recv).await {
                match &mode {
                    Mode::Echo => {
                        let _ = tx.send(frame).await;
                    }
                    // Empty frames only announce a client's stream.
                    Mode::Forward if frame.len() <= LENGTH_PREFIX_BYTES => {}
                    Mode::Forward => {
                        // The least a forwarder can do: one try_send per
                        // peer under a read lock, like the node's broadcast.
                        for (peer, t) in peers.read().unwrap_or_else(|e| e.into_inner()).iter() {
                            if *peer != id {
                                let _ = t.try_send(frame.clone());
                            }
                        }
                    }
                    Mode::Relay(_) if frame.len() <= LENGTH_PREFIX_BYTES => {}
                    Mode::Relay(_) => {
                        if let Some(relay) = &relay
                            && relay.publish(&frame).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
    }
    peers
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(p, _)| *p != id);
    writer.abort();
}

/// Reads one length-prefixed frame (prefix included in the result),
/// undecoded: the floor relays bytes.
pub async fn read(recv: &mut quinn::RecvStream) -> Option<Bytes> {
    protocol::stream::read_frame_bytes(recv, HARD_MAX_FRAME_BYTES)
        .await
        .ok()
        .flatten()
        .map(Bytes::from)
}

/// A raw client: one outgoing stream, one incoming stream.
pub struct RawClient {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: Option<quinn::RecvStream>,
}

impl RawClient {
    /// Connects with the client library's TLS and transport settings.
    pub async fn connect(addr: SocketAddr, ca: &std::path::Path) -> anyhow::Result<RawClient> {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        Self::connect_on(endpoint, addr, ca).await
    }

    /// Connects from a fresh endpoint with `congestion` control.
    pub async fn connect_with(
        addr: SocketAddr,
        ca: &std::path::Path,
        congestion: Congestion,
    ) -> anyhow::Result<RawClient> {
        let endpoint = quinn::Endpoint::client((std::net::Ipv4Addr::UNSPECIFIED, 0).into())?;
        Self::connect_inner(endpoint, addr, ca, congestion).await
    }

    /// Like `connect`, from a (possibly shared) endpoint.
    pub async fn connect_on(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        ca: &std::path::Path,
    ) -> anyhow::Result<RawClient> {
        Self::connect_inner(endpoint, addr, ca, Congestion::default()).await
    }

    async fn connect_inner(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        ca: &std::path::Path,
        congestion: Congestion,
    ) -> anyhow::Result<RawClient> {
        let crypto = tls::client_crypto(&tls::ServerTrust::CaFile(ca.to_owned()), None)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(0u32.into())
            .max_concurrent_uni_streams(3u32.into())
            .keep_alive_interval(Some(std::time::Duration::from_secs(5)))
            .mtu_discovery_config(Some(quic_fabric::udp::mtu_discovery()))
            .congestion_controller_factory(congestion.factory());
        config.transport_config(Arc::new(transport));
        let conn = endpoint.connect_with(config, addr, "localhost")?.await?;
        let mut send = conn.open_uni().await?;
        // Announce ourselves so the server opens its stream back.
        send.write_all(&0u32.to_be_bytes()).await?;
        Ok(RawClient {
            _endpoint: endpoint,
            conn,
            send,
            recv: None,
        })
    }

    /// Writes one frame.
    pub async fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        self.send.write_all(frame).await?;
        Ok(())
    }

    /// Reads the next frame sent by the server (skipping empty announcements).
    pub async fn recv(&mut self) -> anyhow::Result<Bytes> {
        next_frame(&self.conn, &mut self.recv).await
    }

    /// Splits into a sending and a receiving half, for concurrent use.
    pub fn split(self) -> (RawSend, RawRecv) {
        (
            RawSend {
                _endpoint: self._endpoint,
                send: self.send,
            },
            RawRecv {
                conn: self.conn,
                recv: self.recv,
            },
        )
    }
}

/// The sending half of a [`RawClient`].
pub struct RawSend {
    _endpoint: quinn::Endpoint,
    send: quinn::SendStream,
}

impl RawSend {
    /// Writes one frame.
    pub async fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        self.send.write_all(frame).await?;
        Ok(())
    }
}

/// The receiving half of a [`RawClient`].
pub struct RawRecv {
    conn: quinn::Connection,
    recv: Option<quinn::RecvStream>,
}

impl RawRecv {
    /// Reads the next frame sent by the server (skipping empty announcements).
    pub async fn recv(&mut self) -> anyhow::Result<Bytes> {
        next_frame(&self.conn, &mut self.recv).await
    }
}

/// The next non-empty frame on the server's stream, accepted on first use.
async fn next_frame(
    conn: &quinn::Connection,
    recv: &mut Option<quinn::RecvStream>,
) -> anyhow::Result<Bytes> {
    let recv = match recv {
        Some(r) => r,
        None => recv.insert(conn.accept_uni().await?),
    };
    loop {
        let frame = read(recv)
            .await
            .ok_or_else(|| anyhow::anyhow!("raw stream ended"))?;
        if frame.len() > LENGTH_PREFIX_BYTES {
            return Ok(frame);
        }
    }
}
