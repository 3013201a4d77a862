//! The two doors of a node's one UDP port: native QUIC (ALPN
//! `quic-fabric/1`) and WebTransport (ALPN `h3`, for browsers). Both carry
//! exactly the same frames on unidirectional streams (PROTOCOL.md section
//! 12), so the connection code works on a [`Link`] and its [`InStream`]s and
//! [`OutStream`]s and never asks which door a client came through, except
//! to label metrics and logs.
//!
//! A native connection stays a bare `quinn::Connection` (no extra state per
//! connection); a WebTransport session is a `web_transport_quinn::Session`,
//! which adds the HTTP/3 control streams and maps stream error codes and
//! the session close (code and reason) into what browsers understand.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};
use web_transport_quinn as wt;

/// Which door a client came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Native QUIC, ALPN `quic-fabric/1`.
    Quic,
    /// WebTransport over HTTP/3, ALPN `h3`.
    WebTransport,
}

impl Transport {
    /// Both, in metric order.
    pub const ALL: [Transport; 2] = [Transport::Quic, Transport::WebTransport];

    /// The metrics label and log field.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::WebTransport => "webtransport",
        }
    }

    /// Index into per-transport counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A client's connection.
#[derive(Clone)]
pub enum Link {
    /// A native QUIC connection.
    Native(quinn::Connection),
    /// A WebTransport session (its QUIC connection carries nothing else;
    /// boxed: it is much larger, and rarer).
    Web(Box<wt::Session>),
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("transport", &self.transport())
            .field("remote", &self.quic().remote_address())
            .finish()
    }
}

/// Why a link ended or cannot be used.
#[derive(Debug, Clone)]
pub enum LinkError {
    /// The QUIC connection ended.
    Quic(quinn::ConnectionError),
    /// The browser closed the WebTransport session (with this code and
    /// reason).
    SessionClosed {
        /// The WebTransport close code.
        code: u32,
        /// The close reason.
        reason: String,
    },
    /// Anything else the WebTransport layer reports.
    Other(String),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Quic(err) => err.fmt(f),
            LinkError::SessionClosed { code, reason } => {
                write!(f, "session closed by the browser (code {code}): {reason}")
            }
            LinkError::Other(err) => f.write_str(err),
        }
    }
}

impl From<wt::SessionError> for LinkError {
    fn from(err: wt::SessionError) -> Self {
        match err {
            wt::SessionError::ConnectionError(err) => LinkError::Quic(err),
            wt::SessionError::WebTransportError(wt::WebTransportError::Closed(code, reason)) => {
                LinkError::SessionClosed { code, reason }
            }
            other => LinkError::Other(other.to_string()),
        }
    }
}

impl Link {
    /// The QUIC connection under the link (round-trip time, statistics,
    /// addresses, the peer's certificate).
    pub fn quic(&self) -> &quinn::Connection {
        match self {
            Link::Native(conn) => conn,
            Link::Web(session) => session,
        }
    }

    /// Which door the client came through.
    pub fn transport(&self) -> Transport {
        match self {
            Link::Native(_) => Transport::Quic,
            Link::Web(_) => Transport::WebTransport,
        }
    }

    /// The next stream the client opens.
    pub async fn accept_uni(&self) -> Result<InStream, LinkError> {
        match self {
            Link::Native(conn) => conn
                .accept_uni()
                .await
                .map(InStream::Native)
                .map_err(LinkError::Quic),
            Link::Web(session) => session
                .accept_uni()
                .await
                .map(|s| InStream::Web(Box::new(s)))
                .map_err(LinkError::from),
        }
    }

    /// Opens a stream to the client.
    pub async fn open_uni(&self) -> Result<OutStream, LinkError> {
        match self {
            Link::Native(conn) => conn
                .open_uni()
                .await
                .map(OutStream::Native)
                .map_err(LinkError::Quic),
            Link::Web(session) => session
                .open_uni()
                .await
                .map(|s| OutStream::Web(Box::new(s)))
                .map_err(LinkError::from),
        }
    }

    /// Closes the link with a PROTOCOL.md close code and reason. A browser
    /// sees them as the WebTransport session's `closeCode` and `reason`
    /// (the session close is sent before the QUIC connection closes, in the
    /// background).
    pub fn close(&self, code: u32, reason: &str) {
        match self {
            Link::Native(conn) => conn.close(code.into(), reason.as_bytes()),
            // The capsule carries at most 1024 bytes of reason.
            Link::Web(session) => session.close(code, truncate(reason, 1024).as_bytes()),
        }
    }

    /// Whether the link has ended already.
    pub fn is_closed(&self) -> bool {
        self.quic().close_reason().is_some()
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A stream the client opened.
pub enum InStream {
    /// On a native connection.
    Native(quinn::RecvStream),
    /// On a WebTransport session (boxed: it is larger and rarer).
    Web(Box<wt::RecvStream>),
}

impl InStream {
    /// Asks the client to stop sending on this stream (STOP_SENDING with a
    /// PROTOCOL.md close code; WebTransport maps it into its code space).
    pub fn stop(&mut self, code: u32) {
        match self {
            InStream::Native(s) => {
                let _ = s.stop(code.into());
            }
            InStream::Web(s) => {
                let _ = s.stop(code);
            }
        }
    }
}

impl AsyncRead for InStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            InStream::Native(s) => Pin::new(s).poll_read(cx, buf),
            InStream::Web(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

/// A stream the node opened to the client.
pub enum OutStream {
    /// On a native connection.
    Native(quinn::SendStream),
    /// On a WebTransport session.
    Web(Box<wt::SendStream>),
}

impl fmt::Debug for OutStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutStream::Native(s) => s.fmt(f),
            OutStream::Web(s) => s.fmt(f),
        }
    }
}

/// Why a write failed.
#[derive(Debug, Clone)]
pub enum WriteError {
    /// The client stopped the stream (STOP_SENDING) with this code.
    Stopped(u64),
    /// The connection or stream is gone.
    Closed(String),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Stopped(code) => write!(f, "stopped by the peer (code {code})"),
            WriteError::Closed(why) => f.write_str(why),
        }
    }
}

impl From<quinn::WriteError> for WriteError {
    fn from(err: quinn::WriteError) -> Self {
        match err {
            quinn::WriteError::Stopped(code) => WriteError::Stopped(code.into_inner()),
            other => WriteError::Closed(other.to_string()),
        }
    }
}

impl From<wt::WriteError> for WriteError {
    fn from(err: wt::WriteError) -> Self {
        match err {
            wt::WriteError::Stopped(code) => WriteError::Stopped(code.into()),
            wt::WriteError::InvalidStopped(code) => WriteError::Stopped(code.into_inner()),
            other => WriteError::Closed(other.to_string()),
        }
    }
}

impl OutStream {
    /// Sets the stream's send priority (higher first).
    pub fn set_priority(&self, priority: i32) {
        match self {
            OutStream::Native(s) => {
                let _ = s.set_priority(priority);
            }
            OutStream::Web(s) => {
                let _ = s.set_priority(priority);
            }
        }
    }

    /// Writes some of `bufs`; returns how many whole chunks went out.
    pub async fn write_chunks(&mut self, bufs: &mut [Bytes]) -> Result<usize, WriteError> {
        match self {
            OutStream::Native(s) => Ok(s.write_chunks(bufs).await?.chunks),
            OutStream::Web(s) => Ok(s.write_chunks(bufs).await?.chunks),
        }
    }

    /// Writes all of `buf`.
    pub async fn write_all(&mut self, buf: &[u8]) -> Result<(), WriteError> {
        match self {
            OutStream::Native(s) => Ok(s.write_all(buf).await?),
            OutStream::Web(s) => Ok(s.write_all(buf).await?),
        }
    }

    /// Finishes the stream (FIN) and waits until the peer has it all or
    /// stopped it.
    pub async fn finish_and_wait(&mut self) {
        match self {
            OutStream::Native(s) => {
                let _ = s.finish();
                let _ = s.stopped().await;
            }
            OutStream::Web(s) => {
                let _ = s.finish();
                let _ = s.stopped().await;
            }
        }
    }
}
