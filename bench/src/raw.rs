//! The raw-quinn floor: the same TLS, transport settings and length-prefixed
//! framing as a node, with no fabric logic at all. A raw server either
//! echoes each frame back to its sender (the `rtt` floor), forwards it to
//! every other connection through a bounded queue and writer task per
//! connection (the `direct-local` and `fanout` floors), relays it
//! through a Redis channel to the other relay servers' connections (the
//! `direct-cross` floor of the same shape as the fabric's path), or
//! routes publications by channel through per-channel Redis pub/sub
//! channels (the `sparse-channels` floor).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use quic_fabric::config::{Congestion, NodeConfig};
use quic_fabric::protocol::{
    self, Body, Frame, HARD_MAX_FRAME_BYTES, LENGTH_PREFIX_BYTES, Priority,
};
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
    /// `channels:URL`: a Subscribe frame subscribes the server to the
    /// channel's Redis pub/sub channel (answered by a SubscribeAck once
    /// Redis confirmed); a Publish frame goes to the server's own
    /// subscribers of its channel and is PUBLISHed on the channel's Redis
    /// channel, from which the other servers hand it to theirs.
    Channels(String),
}

/// The Redis channel relay servers share.
const RELAY_CHANNEL: &str = "bench:relay";

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Mode> {
        match s {
            "echo" => Ok(Mode::Echo),
            "forward" => Ok(Mode::Forward),
            other => {
                if let Some(url) = other.strip_prefix("relay:") {
                    Ok(Mode::Relay(url.to_owned()))
                } else if let Some(url) = other.strip_prefix("channels:") {
                    Ok(Mode::Channels(url.to_owned()))
                } else {
                    anyhow::bail!(
                        "raw-server mode {other:?}: echo, forward, relay:URL or channels:URL"
                    )
                }
            }
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
        let channels = match &mode {
            Mode::Channels(url) => Some(ChannelRelay::start(url)?),
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
                let channels = channels.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve(conn, id, mode, peers, relay, channels).await;
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

/// Prefix of the Redis pub/sub channels channel relay servers share.
const CHANNELS_PREFIX: &str = "bench:chan:";

/// Local subscribers by channel: (connection, its writer's queue).
type Subscribers = HashMap<String, Vec<(usize, mpsc::Sender<Bytes>)>>;

/// A channel relay server's link to Redis: the least per-channel routing
/// across servers needs. A server SUBSCRIBEs to a channel's Redis channel
/// when one of its connections subscribes (it never unsubscribes: a floor
/// server lives for one measurement), and publishes through one ordered
/// queue whose writer sends what is queued as one pipeline.
struct ChannelRelay {
    /// Random per server, so a server skips its own publishes.
    id: [u8; 8],
    client: redis::Client,
    subscribers: std::sync::RwLock<Subscribers>,
    /// The subscription connection's command half, made on first use.
    sink: tokio::sync::OnceCell<redis::aio::PubSubSink>,
    /// (Redis channel, origin + frame) to PUBLISH, in order.
    publishes: mpsc::Sender<(String, Vec<u8>)>,
}

impl ChannelRelay {
    /// Starts the publishing writer (it connects at once); the
    /// subscription connection is made by the first subscribe.
    fn start(url: &str) -> anyhow::Result<Arc<ChannelRelay>> {
        let client = redis::Client::open(url)?;
        let (publishes, mut queue) = mpsc::channel::<(String, Vec<u8>)>(4096);
        let writer = client.clone();
        tokio::spawn(async move {
            let mut conn = match writer.get_multiplexed_async_connection().await {
                Ok(conn) => conn,
                Err(err) => return eprintln!("channel relay: cannot connect to Redis: {err}"),
            };
            let mut batch = Vec::with_capacity(64);
            while queue.recv_many(&mut batch, 64).await > 0 {
                let mut pipe = redis::pipe();
                for (channel, payload) in batch.drain(..) {
                    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
                }
                if let Err(err) = pipe.query_async::<()>(&mut conn).await {
                    return eprintln!("channel relay: PUBLISH failed: {err}");
                }
            }
        });
        Ok(Arc::new(ChannelRelay {
            id: quic_fabric::protocol::NodeId::new_random().0.as_bytes()[..8]
                .try_into()
                .expect("8 of 16 bytes"),
            client,
            subscribers: std::sync::RwLock::new(HashMap::new()),
            sink: tokio::sync::OnceCell::new(),
            publishes,
        }))
    }

    /// Subscribes connection `id` (writer queue `tx`) to `channel`;
    /// returns once Redis confirmed the server's subscription.
    async fn subscribe(
        self: &Arc<Self>,
        channel: &str,
        id: usize,
        tx: mpsc::Sender<Bytes>,
    ) -> anyhow::Result<()> {
        let mut sink = self.sink.get_or_try_init(|| self.listen()).await?.clone();
        // SUBSCRIBE to a channel already subscribed is a no-op for Redis,
        // and waiting for it keeps a second subscriber from being
        // answered before the first one's SUBSCRIBE is through.
        sink.subscribe(format!("{CHANNELS_PREFIX}{channel}"))
            .await?;
        self.subscribers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(channel.to_owned())
            .or_default()
            .push((id, tx));
        Ok(())
    }

    /// Opens the subscription connection; what arrives on it goes to the
    /// local subscribers of its channel.
    async fn listen(self: &Arc<Self>) -> anyhow::Result<redis::aio::PubSubSink> {
        use futures_util::StreamExt;
        let (sink, mut stream) = self.client.get_async_pubsub().await?.split();
        let relay = self.clone();
        tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                let Some(channel) = msg.get_channel_name().strip_prefix(CHANNELS_PREFIX) else {
                    continue;
                };
                let Some((from, frame)) = msg.get_payload_bytes().split_at_checked(8) else {
                    continue;
                };
                if from != relay.id {
                    relay.deliver(channel, &Bytes::copy_from_slice(frame));
                }
            }
        });
        Ok(sink)
    }

    /// Hands `frame` to every local subscriber of `channel`.
    fn deliver(&self, channel: &str, frame: &Bytes) {
        let subscribers = self.subscribers.read().unwrap_or_else(|e| e.into_inner());
        for (_, tx) in subscribers.get(channel).into_iter().flatten() {
            let _ = tx.try_send(frame.clone());
        }
    }

    /// Delivers `frame` to the local subscribers of `channel`, then queues
    /// it for the other servers' (one PUBLISH, whoever subscribes).
    async fn publish(&self, channel: &str, frame: Bytes) {
        self.deliver(channel, &frame);
        let mut payload = Vec::with_capacity(8 + frame.len());
        payload.extend_from_slice(&self.id);
        payload.extend_from_slice(&frame);
        let _ = self
            .publishes
            .send((format!("{CHANNELS_PREFIX}{channel}"), payload))
            .await;
    }

    /// Forgets connection `id`'s subscriptions.
    fn forget(&self, id: usize) {
        let mut subscribers = self.subscribers.write().unwrap_or_else(|e| e.into_inner());
        for list in subscribers.values_mut() {
            list.retain(|(conn, _)| *conn != id);
        }
        subscribers.retain(|_, list| !list.is_empty());
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
    channels: Option<Arc<ChannelRelay>>,
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
        let channels = channels.clone();
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
                    Mode::Channels(_) if frame.len() <= LENGTH_PREFIX_BYTES => {}
                    Mode::Channels(_) => {
                        let Some(channels) = &channels else { return };
                        // Routing by channel needs the channel's name: the
                        // floor decodes what it must, like the node.
                        let Ok(decoded) = protocol::decode_frame(&frame[LENGTH_PREFIX_BYTES..])
                        else {
                            continue;
                        };
                        match decoded.body {
                            Body::Subscribe { channel, .. } => {
                                if let Err(err) = channels.subscribe(&channel, id, tx.clone()).await
                                {
                                    eprintln!("channel relay: cannot subscribe: {err}");
                                    return;
                                }
                                let ack = Frame::new(
                                    Priority::Normal,
                                    Body::SubscribeAck {
                                        of: decoded.id,
                                        channel,
                                        subscribers: None,
                                    },
                                );
                                if let Ok(ack) = protocol::encode(&ack) {
                                    let _ = tx.send(ack).await;
                                }
                            }
                            Body::Publish { channel, .. } => {
                                channels.publish(&channel, frame).await
                            }
                            _ => {}
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
    if let Some(channels) = &channels {
        channels.forget(id);
    }
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
