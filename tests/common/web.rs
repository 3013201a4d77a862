//! A WebTransport test client (web-transport-quinn's own client over
//! quinn), for tests of the browser door that need no browser: it sees
//! what a browser sees (HTTP status, session close code and reason).

use quic_fabric::protocol::{self, Body, Frame, Handshake, Priority};
use web_transport_quinn as wt;

use super::{TestNode, WAIT, encode};

/// The Origin a page served by `fabric-node --web 127.0.0.1:8080` sends.
pub const LOCAL_ORIGIN: &str = "http://localhost:8080";

/// A WebTransport session to a node. Every stream the node opens is read
/// (as a browser must), and its frames come out of [`WebClient::next`] in
/// arrival order.
pub struct WebClient {
    pub session: wt::Session,
    pub send: Option<wt::SendStream>,
    frames: tokio::sync::mpsc::UnboundedReceiver<Frame>,
}

/// The session URL of `node` at `path`.
pub fn url(node: &TestNode, path: &str) -> url::Url {
    format!("https://127.0.0.1:{}{path}", node.addr.port())
        .parse()
        .unwrap()
}

/// Opens a WebTransport session to `node` at `path`, as a page of `origin`
/// would, trusting the node's dev certificate by its hash.
pub async fn try_open(
    node: &TestNode,
    path: &str,
    origin: Option<&str>,
) -> Result<wt::Session, wt::ClientError> {
    assert!(!node.web_hashes.is_empty(), "the node serves WebTransport");
    let client = wt::ClientBuilder::new()
        .with_server_certificate_hashes(node.web_hashes.iter().map(|h| h.to_vec()).collect())?;
    let mut request = wt::proto::ConnectRequest::new(url(node, path));
    if let Some(origin) = origin {
        request = request.with_header(
            wt::http::header::ORIGIN,
            wt::http::HeaderValue::from_str(origin).unwrap(),
        );
    }
    tokio::time::timeout(WAIT, client.connect(request))
        .await
        .expect("WebTransport connect ends in time")
}

impl WebClient {
    /// A session at the node's default path from a loopback page.
    pub async fn open(node: &TestNode) -> WebClient {
        let session = try_open(node, "/fabric", Some(LOCAL_ORIGIN))
            .await
            .expect("WebTransport session opens");
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        let accept = session.clone();
        tokio::spawn(async move {
            while let Ok(mut recv) = accept.accept_uni().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Ok(protocol::stream::Inbound::Frame(frame, _)) =
                        protocol::stream::read_frame(
                            &mut recv,
                            protocol::HARD_MAX_FRAME_BYTES,
                            protocol::stream::Oversized::Skip,
                        )
                        .await
                    {
                        if tx.send(frame).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WebClient {
            session,
            send: None,
            frames,
        }
    }

    /// Opens the client's first stream and writes `bytes` on it.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        if self.send.is_none() {
            self.send = Some(self.session.open_uni().await.expect("stream opens"));
        }
        let send = self.send.as_mut().unwrap();
        send.write_all(bytes).await.expect("write");
    }

    /// Sends `frame` on the client's stream.
    pub async fn send(&mut self, frame: &Frame) {
        self.send_raw(&encode(frame)).await;
    }

    /// The next frame from the node, on any of its streams; None once
    /// they all ended.
    pub async fn next(&mut self) -> Option<Frame> {
        tokio::time::timeout(WAIT, self.frames.recv())
            .await
            .expect("frame in time")
    }

    /// The next frame that `pred` accepts (others are skipped).
    pub async fn next_matching(&mut self, pred: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            let frame = self.next().await.expect("node stream open");
            if pred(&frame) {
                return frame;
            }
        }
    }

    /// Handshakes as `name` with versions 1..=3 and returns the ack.
    pub async fn handshake(&mut self, name: &str) -> protocol::HandshakeAck {
        let hello = Frame::new(
            Priority::High,
            Body::Handshake(Handshake {
                min_version: 1,
                max_version: protocol::MAX_PROTOCOL_VERSION,
                name: name.into(),
                token: None,
            }),
        );
        self.send(&hello).await;
        match self.next().await.expect("handshake answer").body {
            Body::HandshakeAck(ack) => ack,
            other => panic!("expected HandshakeAck, got {other:?}"),
        }
    }

    /// Waits for the node to close the session and returns the close code
    /// and reason the browser would see.
    pub async fn closed(&self) -> (u32, String) {
        let err = tokio::time::timeout(WAIT, self.session.closed())
            .await
            .expect("session closes in time");
        match err {
            wt::SessionError::WebTransportError(wt::WebTransportError::Closed(code, reason)) => {
                (code, reason)
            }
            other => panic!("expected a WebTransport session close, got {other:?}"),
        }
    }
}
