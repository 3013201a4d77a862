//! Shared helpers for integration tests: a node on an ephemeral loopback
//! port with its own dev certificates, library clients, and a raw quinn
//! client that can send arbitrary bytes.
#![allow(dead_code)]

pub mod browser;
pub mod cluster;
pub mod failover;
pub mod redis;
pub mod redis_ha;
pub mod scenarios;
pub mod web;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quic_fabric::client::{Client, ClientConfig, Event, Socket};
use quic_fabric::node::{BusChoice, Node};
use quic_fabric::protocol::{
    self, Body, ClientId, Frame, Handshake, MessageId, Payload, Priority, error_code,
};
use quic_fabric::{NodeConfig, Server};
use tokio_util::sync::CancellationToken;

/// Generous bound for anything that should happen "soon" on a busy machine.
pub const WAIT: Duration = Duration::from_secs(10);

/// A certificate directory shared by several nodes (one CA, like a cluster).
pub struct TestCerts {
    pub dir: tempfile::TempDir,
}

impl TestCerts {
    pub fn new() -> TestCerts {
        let dir = tempfile::tempdir().unwrap();
        quic_fabric::tls::ensure_dev_certs(dir.path(), &["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        TestCerts { dir }
    }
}

/// A node running in this test process.
pub struct TestNode {
    pub addr: SocketAddr,
    /// The metrics endpoint, when the config enabled it.
    pub metrics_addr: Option<SocketAddr>,
    /// The admin API, when the config enabled it.
    pub admin_addr: Option<SocketAddr>,
    /// The web page and discovery endpoint, when the config enabled them.
    pub web_addr: Option<SocketAddr>,
    /// What pages pass as `serverCertificateHashes` (dev certificates).
    pub web_hashes: Vec<[u8; 32]>,
    pub ca: PathBuf,
    /// The node's state; `TestNode` derefs to it (`n1.id()`, `n1.bus()`).
    pub node: Arc<Node>,
    pub shutdown: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<()>>,
    _certs: tempfile::TempDir,
}

impl std::ops::Deref for TestNode {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.node
    }
}

impl TestNode {
    /// Starts a node with `tweak` applied to a loopback test config.
    pub async fn start_with(tweak: impl FnOnce(&mut NodeConfig)) -> TestNode {
        Self::start_on(BusChoice::FromConfig, None, tweak).await
    }

    /// Starts a node on the given bus; with `certs` it shares that CA dir.
    pub async fn start_on(
        bus: BusChoice,
        certs: Option<&TestCerts>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> TestNode {
        let own = tempfile::tempdir().unwrap();
        let dir = certs.map_or(own.path(), |c| c.dir.path()).to_owned();
        let mut config = NodeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            certs_dir: dir.clone(),
            name: "test-node".into(),
            // No load balancer in front: nothing to linger for.
            drain_linger: Duration::ZERO,
            ..NodeConfig::default()
        };
        tweak(&mut config);
        let server = Server::bind_with(config, bus).expect("node binds");
        let addr = server.local_addr();
        let (metrics_addr, admin_addr) = (server.metrics_addr(), server.admin_addr());
        let (web_addr, web_hashes) = (server.web_addr(), server.web_cert_hashes());
        let node = server.node();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(server.run(async move { token.cancelled().await }));
        TestNode {
            addr,
            metrics_addr,
            admin_addr,
            web_addr,
            web_hashes,
            ca: dir.join("ca.pem"),
            node,
            shutdown,
            task: Some(task),
            _certs: own,
        }
    }

    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    pub fn client_config(&self, name: &str) -> ClientConfig {
        ClientConfig::new(self.addr.to_string(), self.ca.clone()).name(name)
    }

    pub async fn connect(&self, name: &str) -> Client {
        Client::connect(&self.client_config(name))
            .await
            .unwrap_or_else(|e| panic!("client {name} connects: {e}"))
    }

    /// Connects a client from another loopback address (`127.0.0.x`), which
    /// the node sees as another host: per-IP limits and rate-limit memory
    /// are per address.
    pub async fn connect_from(&self, ip: [u8; 4], name: &str) -> Client {
        let mut config = self.client_config(name);
        config.socket = Socket::Given(
            quinn::Endpoint::client(SocketAddr::from((ip, 0))).expect("client endpoint binds"),
        );
        Client::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("client {name} connects from {ip:?}: {e}"))
    }

    /// Shuts the node down and waits for it to finish.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("node stops in time")
                .unwrap();
        }
    }
}

/// The next event that is a frame matching `pred`, skipping others.
pub async fn next_matching(client: &mut Client, mut pred: impl FnMut(&Frame) -> bool) -> Frame {
    tokio::time::timeout(WAIT, async {
        loop {
            match client.next_event().await {
                Some(Event::Frame(f)) if pred(&f) => return *f,
                Some(Event::Frame(_)) => continue,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("expected frame arrives in time")
}

/// Sends `text` as a Direct (Normal priority) from `sender` to `receiver`,
/// which must be acknowledged and arrive as sent, stamped with its sender;
/// returns the frame received.
pub async fn deliver(sender: &Client, receiver: &mut Client, text: &str) -> Frame {
    deliver_payload(
        sender,
        receiver,
        Payload::Text(text.into()),
        Priority::Normal,
    )
    .await
}

/// [`deliver`] for any payload and priority.
pub async fn deliver_payload(
    sender: &Client,
    receiver: &mut Client,
    payload: Payload,
    priority: Priority,
) -> Frame {
    let to = receiver.client_id();
    let id = sender
        .direct(to, payload.clone(), priority)
        .await
        .unwrap_or_else(|e| panic!("direct to {to} acknowledged: {e}"));
    let got = next_matching(receiver, |f| f.id == id).await;
    assert_eq!(got.body, Body::Direct { to, payload });
    let stamped = got.sender.as_ref().expect("the node stamps the sender");
    assert_eq!(stamped.client_id, sender.client_id());
    got
}

/// Sends a Direct from `sender` to `to` and asserts the node refuses it
/// with `code`; returns the error message.
pub async fn expect_refused(
    sender: &Client,
    to: ClientId,
    code: quic_fabric::protocol::ErrorCode,
) -> String {
    let sent = sender
        .direct(to, Payload::Text("anyone there?".into()), Priority::Normal)
        .await;
    expect_server_error(sent, code)
}

/// Asserts a Direct from `sender` to `to` is answered UNKNOWN_CLIENT,
/// naming the client it could not find.
pub async fn expect_unknown(sender: &Client, to: ClientId) {
    let message = expect_refused(sender, to, error_code::UNKNOWN_CLIENT).await;
    assert!(message.contains(&to.to_string()), "{message}");
}

/// Sends Directs numbered `0..count` from `sender` to `receiver` without
/// waiting in between; every one must be acknowledged and they must arrive
/// in the order sent. Returns the frames received, in order.
pub async fn directs_arrive_in_order(
    sender: &Client,
    receiver: &mut Client,
    count: u32,
) -> Vec<Frame> {
    let to = receiver.client_id();
    let mut pending = Vec::new();
    for i in 0..count {
        let body = Body::Direct {
            to,
            payload: Payload::Text(i.to_string()),
        };
        pending.push(sender.submit(Priority::Normal, body).await.unwrap());
    }
    for p in pending {
        assert!(matches!(p.wait().await.unwrap().body, Body::Ack { .. }));
    }
    let mut received = Vec::new();
    for i in 0..count {
        let got = next_matching(receiver, |f| matches!(f.body, Body::Direct { .. })).await;
        assert_eq!(
            got.body,
            Body::Direct {
                to,
                payload: Payload::Text(i.to_string())
            }
        );
        received.push(got);
    }
    received
}

/// Asserts no frame matching `pred` arrives before `probe` (a frame the
/// client will certainly receive later, e.g. the echo of its own Text) comes.
pub async fn assert_none_before_echo(client: &mut Client, pred: impl Fn(&Frame) -> bool) {
    let probe = client.send_text("probe").await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match client.next_event().await {
                Some(Event::Frame(f)) if f.id == probe => return,
                Some(Event::Frame(f)) => assert!(!pred(&f), "unexpected frame {f:?}"),
                other => panic!("unexpected event {other:?}"),
            }
        }
    })
    .await
    .expect("probe echo arrives");
}

/// A quinn connection that speaks raw bytes, for hostile or odd clients.
pub struct RawClient {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

impl RawClient {
    pub async fn connect(node: &TestNode) -> RawClient {
        Self::connect_with(node, |_| {}).await
    }

    pub async fn connect_with(
        node: &TestNode,
        tweak: impl FnOnce(&mut quinn::TransportConfig),
    ) -> RawClient {
        Self::try_connect_with(node, tweak)
            .await
            .expect("raw client connects")
    }

    /// Opens a stream and writes `bytes` on it (not finished).
    pub async fn send_raw(&self, bytes: &[u8]) -> quinn::SendStream {
        let mut send = self.conn.open_uni().await.unwrap();
        send.write_all(bytes).await.unwrap();
        send
    }

    /// Sends a valid v1 Handshake and returns its stream; the HandshakeAck is read by `handshake`.
    pub async fn handshake(&self, name: &str) -> (quinn::SendStream, quinn::RecvStream, Frame) {
        let send = self.send_raw(&encode(&hello(name, None))).await;
        let mut recv = tokio::time::timeout(WAIT, self.conn.accept_uni())
            .await
            .unwrap()
            .unwrap();
        let ack = read_frame(&mut recv).await.expect("handshake reply");
        (send, recv, ack)
    }

    /// Waits for the connection to close and returns its application close code.
    pub async fn closed_code(&self) -> Option<u64> {
        match tokio::time::timeout(WAIT, self.conn.closed())
            .await
            .expect("connection closes in time")
        {
            quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
            _ => None,
        }
    }

    /// Waits for the connection to close and asserts the node closed it
    /// with `code` (a `close_code`).
    pub async fn expect_closed_with(&self, code: u32) {
        assert_eq!(self.closed_code().await, Some(u64::from(code)));
    }
}

/// `config` made to notice a lost node within about a second and to
/// reconnect by itself, to `servers` in turn, buffering `events` events.
pub fn resilient(mut config: ClientConfig, servers: Vec<String>, events: usize) -> ClientConfig {
    config.servers = servers;
    config.idle_timeout = Duration::from_secs(1);
    config.keep_alive_interval = Duration::from_millis(200);
    config.event_buffer = events;
    config.reconnect = Some(quic_fabric::client::ReconnectPolicy {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        max_attempts: Some(40),
    });
    config
}

/// `frame` as bytes on a stream.
pub fn encode(frame: &Frame) -> Vec<u8> {
    protocol::encode(frame).unwrap().to_vec()
}

pub fn ping() -> Frame {
    Frame::new(Priority::High, Body::Ping)
}

/// Pings on `send` and asserts the next frame on `recv` is its Pong: the
/// stream and the connection still work.
pub async fn assert_pong(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream) {
    let p = ping();
    send.write_all(&encode(&p)).await.unwrap();
    assert_eq!(
        read_frame(recv).await.unwrap().body,
        Body::Pong { of: p.id }
    );
}

/// A v1 Handshake.
pub fn hello(name: &str, token: Option<String>) -> Frame {
    Frame::new(
        Priority::High,
        Body::Handshake(Handshake {
            min_version: 1,
            max_version: 1,
            name: name.into(),
            token,
        }),
    )
}

/// Asserts `frame` is an Error with `code`; returns the id it answers and
/// its message.
pub fn expect_error(
    frame: &Frame,
    code: quic_fabric::protocol::ErrorCode,
) -> (Option<MessageId>, String) {
    match &frame.body {
        Body::Error {
            of,
            code: got,
            message,
            ..
        } => {
            assert_eq!(*got, code, "{frame:?}");
            (*of, message.clone())
        }
        other => panic!("expected Error {code:?}, got {other:?}"),
    }
}

/// Reads one frame from a node stream; `None` at a clean end or when the
/// stream or connection fails. Fails the test after [`WAIT`].
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Option<Frame> {
    tokio::time::timeout(WAIT, next_frame(recv))
        .await
        .expect("frame in time")
}

/// Reads one frame from a node stream with no deadline (for reader tasks
/// that outlive any single wait); `None` once the stream or connection
/// ends. The node only sends valid frames.
pub async fn next_frame(recv: &mut quinn::RecvStream) -> Option<Frame> {
    use quic_fabric::protocol::stream::{Inbound, Oversized};
    match protocol::stream::read_frame(recv, protocol::HARD_MAX_FRAME_BYTES, Oversized::Skip)
        .await
        .ok()?
    {
        Inbound::Frame(frame, _) => Some(frame),
        Inbound::Finished => None,
        Inbound::Bad(err, _) => panic!("the node sent an invalid frame: {err}"),
    }
}

/// Polls `check` until it returns true, failing after `within`. For
/// conditions that have no event to wait on (state in another process or
/// in Redis); the poll interval is short and the bound generous.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Asserts that `result` is an Error frame from the node with `code`;
/// returns its message.
pub fn expect_server_error<T: std::fmt::Debug>(
    result: Result<T, quic_fabric::client::ClientError>,
    code: quic_fabric::protocol::ErrorCode,
) -> String {
    match result {
        Err(quic_fabric::client::ClientError::Server { code: got, message }) => {
            assert_eq!(got, code, "{message}");
            message
        }
        other => panic!("expected server error {code:?}, got {other:?}"),
    }
}

impl RawClient {
    /// Like [`RawClient::connect_with`], but hands back why the connection
    /// failed (for example the node refusing it before TLS) instead of
    /// panicking.
    pub async fn try_connect_with(
        node: &TestNode,
        tweak: impl FnOnce(&mut quinn::TransportConfig),
    ) -> Result<RawClient, quinn::ConnectionError> {
        Self::try_connect_to(node.addr, &node.ca, tweak).await
    }

    /// Like [`RawClient::try_connect_with`], for any node address and CA
    /// (e.g. a node process).
    pub async fn try_connect_to(
        addr: SocketAddr,
        ca: &std::path::Path,
        tweak: impl FnOnce(&mut quinn::TransportConfig),
    ) -> Result<RawClient, quinn::ConnectionError> {
        let crypto = quic_fabric::tls::client_crypto(
            &quic_fabric::tls::ServerTrust::CaFile(ca.to_owned()),
            None,
        )
        .unwrap();
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        tweak(&mut transport);
        config.transport_config(Arc::new(transport));
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        let connecting = endpoint.connect(addr, "localhost").unwrap();
        let conn = tokio::time::timeout(WAIT, connecting)
            .await
            .expect("connection attempt settles in time")?;
        Ok(RawClient { endpoint, conn })
    }

    /// [`RawClient::try_connect_with`] with default transport settings.
    pub async fn try_connect(node: &TestNode) -> Result<RawClient, quinn::ConnectionError> {
        Self::try_connect_with(node, |_| {}).await
    }
}

/// Whether `err` is the node refusing a connection attempt before TLS
/// (admission control: QUIC CONNECTION_REFUSED).
pub fn is_refused(err: &quinn::ConnectionError) -> bool {
    matches!(
        err,
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
    )
}

/// Connects a library client, retrying while the node refuses the attempt
/// (for example until it has noticed that an earlier connection ended and
/// freed its admission slot). Fails after [`WAIT`].
pub async fn connect_when_admitted(node: &TestNode, name: &str) -> Client {
    let config = node.client_config(name);
    tokio::time::timeout(WAIT, async {
        loop {
            match Client::connect(&config).await {
                Ok(client) => return client,
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("client {name} admitted in time"))
}

/// A response from [`http`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request over a fresh TCP connection (`Connection: close`),
/// enough for the node's admin and metrics listeners.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(token) = token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        let body = body.unwrap_or("");
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        String::from_utf8(raw).unwrap()
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("HTTP reply in time");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("HTTP status");
    HttpResponse {
        status,
        headers: head.to_owned(),
        body: body.to_owned(),
    }
}

/// A `fabric-node` running as a child process (so it can be killed with
/// SIGKILL or restarted on the same address), on a loopback port.
pub struct NodeProcess {
    pub child: tokio::process::Child,
    pub addr: String,
    pub certs: PathBuf,
    args: Vec<String>,
    /// Whether the node's log (stderr) is kept for [`NodeProcess::terminate`].
    keep_log: bool,
}

/// A free UDP port on loopback (free when asked; good enough for tests).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NodeProcess {
    /// Starts `fabric-node --listen 127.0.0.1:PORT --certs-dir DIR ARGS...` and
    /// waits until it answers a client.
    pub async fn start(certs: &std::path::Path, args: &[&str]) -> NodeProcess {
        Self::launch(certs, args, false).await
    }

    /// Like [`NodeProcess::start`], keeping the node's log (stderr) for
    /// [`NodeProcess::terminate`] to return.
    pub async fn start_logging(certs: &std::path::Path, args: &[&str]) -> NodeProcess {
        Self::launch(certs, args, true).await
    }

    async fn launch(certs: &std::path::Path, args: &[&str], keep_log: bool) -> NodeProcess {
        let addr = format!("127.0.0.1:{}", free_udp_port());
        let mut node = NodeProcess {
            child: Self::spawn(&addr, certs, args, keep_log),
            addr,
            certs: certs.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            keep_log,
        };
        node.wait_up().await;
        node
    }

    fn spawn(
        addr: &str,
        certs: &std::path::Path,
        args: &[&str],
        keep_log: bool,
    ) -> tokio::process::Child {
        use std::process::Stdio;
        tokio::process::Command::new(env!("CARGO_BIN_EXE_fabric-node"))
            .args(["--listen", addr, "--certs-dir"])
            .arg(certs)
            .args(args)
            // The node's own default log level, whatever the test run's.
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if keep_log {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .expect("fabric-node starts")
    }

    /// Waits until the node completes QUIC handshakes (the process may still
    /// be binding), starting it again if it exits (for example because the
    /// port was not free yet). Uses a health probe, which never becomes a
    /// client, so the node's log and its client list stay the test's.
    pub async fn wait_up(&mut self) {
        let mut probe_config = self.client_config("probe");
        probe_config.connect_timeout = Duration::from_millis(500);
        tokio::time::timeout(WAIT, async {
            loop {
                if self.child.try_wait().unwrap().is_some() {
                    let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
                    self.child = Self::spawn(&self.addr, &self.certs, &args, self.keep_log);
                }
                if quic_fabric::client::probe(&probe_config).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("node process comes up");
    }

    pub fn client_config(&self, name: &str) -> ClientConfig {
        let mut config = ClientConfig::new(self.addr.clone(), self.certs.join("ca.pem")).name(name);
        config.connect_timeout = Duration::from_secs(2);
        config
    }

    pub async fn connect(&self, name: &str) -> Client {
        Client::connect(&self.client_config(name))
            .await
            .unwrap_or_else(|e| panic!("client {name} connects to the node process: {e}"))
    }

    /// SIGKILL: no drain, no cleanup in Redis.
    pub async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL sent");
        self.child.wait().await.expect("node process reaped");
    }

    /// SIGTERM (a graceful drain), then waits for the process to exit;
    /// returns its status and, when started with
    /// [`NodeProcess::start_logging`], its log.
    pub async fn terminate(self) -> std::process::Output {
        let pid = self.child.id().expect("node process running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "SIGTERM sent");
        tokio::time::timeout(WAIT, self.child.wait_with_output())
            .await
            .expect("node exits after SIGTERM")
            .unwrap()
    }

    /// Starts the same node again on the same address (after `kill`), with
    /// the same arguments, and waits until it answers.
    pub async fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = Self::spawn(&self.addr, &self.certs, &args, self.keep_log);
        self.wait_up().await;
    }
}

/// A TCP forwarder on loopback that a test can cut (every connection
/// through it dropped, new ones closed at once) and restore: a network
/// blip between one node and Redis.
pub struct TcpProxy {
    pub addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accept = {
            let (cut, links) = (cut.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(std::sync::atomic::Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    links.lock().unwrap().push(link.abort_handle());
                }
            })
        };
        TcpProxy {
            addr,
            cut,
            links,
            accept,
        }
    }

    /// Drops every connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A UDP forwarder on loopback between clients and a node that a test can
/// cut (every datagram dropped, both ways, silently): a client that loses
/// its network.
pub struct UdpProxy {
    pub addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    /// Only what the node sends is dropped.
    down: Arc<std::sync::atomic::AtomicBool>,
    /// Where new datagrams go (see [`UdpProxy::retarget`]).
    target: Arc<std::sync::Mutex<SocketAddr>>,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl UdpProxy {
    pub async fn start(target: SocketAddr) -> UdpProxy {
        use std::sync::atomic::Ordering::SeqCst;
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let shared_target = Arc::new(std::sync::Mutex::new(target));
        let main = {
            let (cut, down, tasks) = (cut.clone(), down.clone(), tasks.clone());
            let shared_target = shared_target.clone();
            tokio::spawn(async move {
                let mut upstreams: std::collections::HashMap<
                    SocketAddr,
                    Arc<tokio::net::UdpSocket>,
                > = Default::default();
                let mut target = target;
                let mut buf = vec![0u8; 65_536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    if cut.load(SeqCst) {
                        continue;
                    }
                    let now = *shared_target.lock().unwrap();
                    if now != target {
                        // Every flow starts over towards the new target.
                        target = now;
                        upstreams.clear();
                    }
                    let up = match upstreams.get(&from) {
                        Some(up) => up.clone(),
                        None => {
                            let up =
                                Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                            up.connect(target).await.unwrap();
                            let (back, front, cut, down) =
                                (up.clone(), front.clone(), cut.clone(), down.clone());
                            let relay = tokio::spawn(async move {
                                let mut buf = vec![0u8; 65_536];
                                while let Ok(n) = back.recv(&mut buf).await {
                                    if !cut.load(SeqCst) && !down.load(SeqCst) {
                                        let _ = front.send_to(&buf[..n], from).await;
                                    }
                                }
                            });
                            tasks.lock().unwrap().push(relay.abort_handle());
                            upstreams.insert(from, up.clone());
                            up
                        }
                    };
                    let _ = up.send(&buf[..n]).await;
                }
            })
        };
        tasks.lock().unwrap().push(main.abort_handle());
        UdpProxy {
            addr,
            cut,
            down,
            target: shared_target,
            tasks,
        }
    }

    /// Sends every datagram from now on to `target`, old flows included (a
    /// load balancer whose backend went away).
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }

    /// Drops what the node sends from now on; what the client sends still
    /// reaches the node (an answer lost on the way back).
    pub fn cut_downstream(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops every datagram from now on, both ways.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}
