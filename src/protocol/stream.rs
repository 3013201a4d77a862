//! Reading frames from a byte stream: the one place that turns a QUIC
//! stream's bytes into frames, used by the node, the client library, the
//! benchmark, the tests and the fuzzer (which feeds it plain byte slices).
//!
//! The reader works on anything that implements [`AsyncRead`] (a
//! `quinn::RecvStream`, or `&[u8]`). Memory grows with the bytes that
//! actually arrive, never with what a length prefix claims: a peer that
//! announces a large frame and goes silent holds no more than it sent.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::codec::peek_message_id;
use super::{CodecError, Frame, HARD_MAX_FRAME_BYTES, LENGTH_PREFIX_BYTES, MessageId};

/// How long the reader waits for the id of a frame it refuses from its
/// length prefix, to name it in the refusal.
const ID_PEEK_WAIT: Duration = Duration::from_millis(200);

/// What reading one frame gave.
#[derive(Debug)]
pub enum Inbound {
    /// A decoded frame and its size on the wire (prefix included).
    Frame(Frame, usize),
    /// A frame that could not be decoded (with its id, when readable). The
    /// stream is still in sync, except after [`Oversized::Refuse`].
    Bad(CodecError, Option<MessageId>),
    /// The stream ended cleanly, between two frames.
    Finished,
}

/// What to do with a frame above the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversized {
    /// Read its payload and throw it away (up to [`HARD_MAX_FRAME_BYTES`]),
    /// so the stream stays in sync: for peers the node serves.
    Skip,
    /// Report it at once, after a brief look at its id, without reading
    /// its payload: for peers that have not handshaken, which must not
    /// make the node read large frames.
    Refuse,
}

/// Reading failed so that the stream can no longer be used.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream or its connection failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// A length prefix beyond anything the reader would skip over.
    #[error("frame length {0} is beyond the {HARD_MAX_FRAME_BYTES}-byte hard limit")]
    Untrustworthy(usize),
}

/// Reads one frame of at most `max` payload bytes from `stream`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    stream: &mut R,
    max: usize,
    oversized: Oversized,
) -> Result<Inbound, ReadError> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    if !read_exact_or_end(stream, &mut prefix).await? {
        return Ok(Inbound::Finished);
    }
    match super::decode_length(prefix, max) {
        Ok(len) => {
            let payload = read_payload(stream, len).await?;
            Ok(match super::decode_frame(&payload) {
                Ok(frame) => Inbound::Frame(frame, LENGTH_PREFIX_BYTES + len),
                Err(err) => {
                    let id = err.message_id();
                    Inbound::Bad(err, id)
                }
            })
        }
        Err(CodecError::FrameTooLarge { len, max }) if oversized == Oversized::Refuse => {
            let mut id = [0u8; 16];
            let head = len.min(id.len());
            // Boxed: this rare path's future would otherwise sit in every
            // idle reader task.
            let peek = Box::pin(tokio::time::timeout(
                ID_PEEK_WAIT,
                stream.read_exact(&mut id[..head]),
            ))
            .await;
            let id = match peek {
                Ok(Ok(_)) => peek_message_id(&id[..head]),
                _ => None,
            };
            Ok(Inbound::Bad(CodecError::FrameTooLarge { len, max }, id))
        }
        Err(CodecError::FrameTooLarge { len, max }) if len <= HARD_MAX_FRAME_BYTES => {
            let mut id = [0u8; 16];
            let head = len.min(id.len());
            if !read_exact_or_end(stream, &mut id[..head]).await? {
                return Err(ReadError::Truncated);
            }
            let left = (len - head) as u64;
            let skipped = tokio::io::copy(&mut stream.take(left), &mut tokio::io::sink()).await?;
            if skipped < left {
                return Err(ReadError::Truncated);
            }
            let id = peek_message_id(&id[..head]);
            Ok(Inbound::Bad(CodecError::FrameTooLarge { len, max }, id))
        }
        Err(CodecError::FrameTooLarge { len, .. }) => Err(ReadError::Untrustworthy(len)),
        Err(other) => Ok(Inbound::Bad(other, None)),
    }
}

/// Reads one frame without decoding it: its bytes, length prefix
/// included, or `None` at the stream's end. For relays that pass frames on
/// untouched (the benchmark's raw floor); `max` bounds the length prefix.
pub async fn read_frame_bytes<R: AsyncRead + Unpin>(
    stream: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, ReadError> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    if !read_exact_or_end(stream, &mut prefix).await? {
        return Ok(None);
    }
    let len = match super::decode_length(prefix, max) {
        Ok(len) => len,
        Err(_) => return Err(ReadError::Untrustworthy(u32::from_be_bytes(prefix) as usize)),
    };
    let mut frame = Vec::with_capacity(LENGTH_PREFIX_BYTES + len.min(PREALLOCATE_BYTES));
    frame.extend_from_slice(&prefix);
    stream.take(len as u64).read_to_end(&mut frame).await?;
    if frame.len() < LENGTH_PREFIX_BYTES + len {
        return Err(ReadError::Truncated);
    }
    Ok(Some(frame))
}

/// Fills `buf`; `false` when the stream ended before its first byte,
/// [`ReadError::Truncated`] when it ended inside.
async fn read_exact_or_end<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut [u8],
) -> Result<bool, ReadError> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]).await? {
            0 if filled == 0 => return Ok(false),
            0 => return Err(ReadError::Truncated),
            n => filled += n,
        }
    }
    Ok(true)
}

/// Most buffer reserved for a payload before its bytes arrive.
const PREALLOCATE_BYTES: usize = 64 * 1024;

/// Reads `len` payload bytes; beyond [`PREALLOCATE_BYTES`] the buffer grows
/// as they arrive.
async fn read_payload<R: AsyncRead + Unpin>(
    stream: &mut R,
    len: usize,
) -> Result<Vec<u8>, ReadError> {
    let mut payload = Vec::with_capacity(len.min(PREALLOCATE_BYTES));
    stream.take(len as u64).read_to_end(&mut payload).await?;
    if payload.len() < len {
        return Err(ReadError::Truncated);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Body, DEFAULT_MAX_FRAME_BYTES, Priority, encode};

    fn ping() -> Frame {
        Frame::new(Priority::High, Body::Ping)
    }

    async fn read_all(mut bytes: &[u8], max: usize, oversized: Oversized) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match read_frame(&mut bytes, max, oversized).await {
                Ok(Inbound::Frame(frame, size)) => {
                    seen.push(format!("{} {size}", frame.body.name()))
                }
                Ok(Inbound::Bad(err, id)) => seen.push(format!("bad {err} {}", id.is_some())),
                Ok(Inbound::Finished) => return seen,
                Err(err) => {
                    seen.push(format!("error {err}"));
                    return seen;
                }
            }
        }
    }

    #[tokio::test]
    async fn frames_oversized_ones_and_the_end_of_a_stream() {
        let small = encode(&ping()).unwrap();
        let big = encode(&Frame::new(
            Priority::Low,
            Body::Binary { data: vec![7; 100] },
        ))
        .unwrap();
        let stream = [small.as_ref(), big.as_ref(), small.as_ref()].concat();
        // Within the maximum: three frames.
        let seen = read_all(&stream, DEFAULT_MAX_FRAME_BYTES, Oversized::Skip).await;
        assert_eq!(seen, ["ping 37", "binary 145", "ping 37"]);
        // The big one skipped, the stream kept in sync, its id recovered.
        let seen = read_all(&stream, 64, Oversized::Skip).await;
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen[1].starts_with("bad frame of 141 bytes") && seen[1].ends_with("true"));
        assert_eq!(seen[2], "ping 37");
        // Refused from its prefix: not read, so the stream is given up after it.
        let mut rest = &stream[small.len()..];
        let refused = read_frame(&mut rest, 64, Oversized::Refuse).await.unwrap();
        assert!(matches!(
            refused,
            Inbound::Bad(CodecError::FrameTooLarge { .. }, Some(_))
        ));
    }

    #[tokio::test]
    async fn a_relay_reads_frames_as_bytes() {
        let small = encode(&ping()).unwrap();
        let stream = [small.as_ref(), small.as_ref()].concat();
        let mut rest = stream.as_slice();
        for _ in 0..2 {
            let bytes = read_frame_bytes(&mut rest, 64).await.unwrap().unwrap();
            assert_eq!(bytes, small.as_ref());
        }
        assert!(read_frame_bytes(&mut rest, 64).await.unwrap().is_none());
        let mut cut = &small[..10];
        assert!(matches!(
            read_frame_bytes(&mut cut, 64).await,
            Err(ReadError::Truncated)
        ));
        let mut big = small.as_ref();
        assert!(matches!(
            read_frame_bytes(&mut big, 8).await,
            Err(ReadError::Untrustworthy(_))
        ));
    }

    #[tokio::test]
    async fn truncation_and_lying_prefixes() {
        let small = encode(&ping()).unwrap();
        for cut in 1..small.len() {
            let seen = read_all(&small[..cut], DEFAULT_MAX_FRAME_BYTES, Oversized::Skip).await;
            assert_eq!(seen, ["error stream ended inside a frame"], "cut at {cut}");
        }
        let huge = ((HARD_MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        let seen = read_all(&huge, DEFAULT_MAX_FRAME_BYTES, Oversized::Skip).await;
        assert!(seen[0].starts_with("error frame length"), "{seen:?}");
        // A prefix claiming 16 MiB with 3 bytes behind it holds 3 bytes.
        let claim = [
            (HARD_MAX_FRAME_BYTES as u32).to_be_bytes().as_slice(),
            &[1, 2, 3],
        ]
        .concat();
        let seen = read_all(&claim, HARD_MAX_FRAME_BYTES, Oversized::Skip).await;
        assert_eq!(seen, ["error stream ended inside a frame"]);
    }
}
