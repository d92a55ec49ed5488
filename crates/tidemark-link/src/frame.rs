//! Length-prefixed frames on a QUIC stream.
//!
//! Wire format, repeated until the stream ends:
//!
//! | bytes | field |
//! | --- | --- |
//! | 4 | frame length in bytes, u32 big-endian, at most [`FRAME_BYTES_MAX`] |
//! | length | the frame |
//!
//! The stream's clean end (FIN) between two frames ends the sequence; an end anywhere else is
//! a truncated frame. Frames carry no checksum here: the replication protocol checksums its
//! batches over their content, and QUIC's AEAD protects the bytes on the wire.

use quinn::{RecvStream, SendStream, VarInt};

use crate::{LinkError, Peer};

/// Largest frame a reader accepts and a writer sends, in bytes.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Bytes a reader allocates for a frame before any of its body has arrived. The buffer then
/// grows with the data received, so a header claiming a large length costs nothing until the
/// bytes are actually sent.
pub const FRAME_PREALLOCATION_BYTES_MAX: usize = 64 * 1024;
/// Application error code with which a reader stops a stream that broke the frame rules.
pub const STREAM_STOP_CODE_PROTOCOL: u32 = 1;

/// Length of the frame header.
const HEADER_BYTES: usize = 4;

/// The sending half of a framed stream.
#[derive(Debug)]
pub struct FrameWriter {
    stream: SendStream,
    peer: Peer,
    /// Set while a frame is being written; still set afterwards only if that write was cancelled.
    writing: bool,
}

impl FrameWriter {
    pub(crate) fn new(stream: SendStream, peer: Peer) -> FrameWriter {
        FrameWriter { stream, peer, writing: false }
    }

    /// Sends one frame. Returns once the frame is in quinn's send buffer, which is bounded by
    /// the connection's send window: a full window makes this wait (back-pressure).
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a send cancelled after it started writing leaves part of a frame on the
    /// stream. Every later `send` on this writer then fails with [`LinkError::WriterPoisoned`];
    /// drop the writer (the partner's reader will see a truncated frame) and open a new stream.
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), LinkError> {
        let stream_id = self.stream_id();
        if self.writing {
            return Err(LinkError::WriterPoisoned { peer: self.peer, stream: stream_id });
        }
        let length = match u32::try_from(frame.len()) {
            Ok(length) if frame.len() <= FRAME_BYTES_MAX => length,
            _ => {
                return Err(LinkError::FrameTooLargeToSend {
                    peer: self.peer,
                    stream: stream_id,
                    frame_bytes: frame.len() as u64,
                    limit_bytes: FRAME_BYTES_MAX as u64,
                })
            }
        };
        self.writing = true;
        let peer = self.peer;
        self.stream
            .write_all(&length.to_be_bytes())
            .await
            .map_err(|e| LinkError::from_write(peer, stream_id, e))?;
        self.stream.write_all(frame).await.map_err(|e| LinkError::from_write(peer, stream_id, e))?;
        self.writing = false;
        Ok(())
    }

    /// Ends the stream cleanly after the frames sent, and waits until the partner has
    /// acknowledged all of them (not until its application has read them).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe in effect: the stream's end is already queued when the wait begins, and is
    /// delivered even if the wait is dropped.
    pub async fn finish(mut self) -> Result<(), LinkError> {
        let stream_id = self.stream_id();
        if self.writing {
            return Err(LinkError::WriterPoisoned { peer: self.peer, stream: stream_id });
        }
        self.stream.finish().map_err(|_| LinkError::StreamClosed { peer: self.peer, stream: stream_id })?;
        match self.stream.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(LinkError::StreamAborted {
                peer: self.peer,
                stream: stream_id,
                action: "stopped",
                code: code.into_inner(),
            }),
            Err(quinn::StoppedError::ConnectionLost(e)) => Err(LinkError::from_connection(self.peer, e)),
            Err(quinn::StoppedError::ZeroRttRejected) => {
                Err(LinkError::StreamClosed { peer: self.peer, stream: stream_id })
            }
        }
    }

    /// The partner this stream goes to.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    fn stream_id(&self) -> u64 {
        self.stream.id().index()
    }

    #[cfg(test)]
    pub(crate) fn raw(&mut self) -> &mut SendStream {
        &mut self.stream
    }
}

/// The receiving half of a framed stream.
#[derive(Debug)]
pub struct FrameReader {
    stream: RecvStream,
    peer: Peer,
    frame_bytes_max: usize,
    /// The header of the frame being read, and how much of it has arrived.
    header: [u8; HEADER_BYTES],
    header_filled: usize,
    /// The body being read: `body[..body_filled]` has arrived, the rest is zeroed room for more.
    body: Vec<u8>,
    body_filled: usize,
}

impl FrameReader {
    pub(crate) fn new(stream: RecvStream, peer: Peer) -> FrameReader {
        FrameReader::with_limit(stream, peer, FRAME_BYTES_MAX)
    }

    pub(crate) fn with_limit(stream: RecvStream, peer: Peer, frame_bytes_max: usize) -> FrameReader {
        FrameReader {
            stream,
            peer,
            frame_bytes_max,
            header: [0; HEADER_BYTES],
            header_filled: 0,
            body: Vec::new(),
            body_filled: 0,
        }
    }

    /// Receives the next frame, or `None` when the partner ended the stream cleanly between
    /// frames.
    ///
    /// A header announcing more than [`FRAME_BYTES_MAX`] bytes fails with
    /// [`LinkError::FrameTooLarge`] before anything is allocated for it, and the stream is
    /// stopped. A stream that ends inside a frame fails with [`LinkError::FrameTruncated`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a partly received frame is kept in the reader, and the next call continues
    /// it. Nothing is lost when `recv` is used in `tokio::select!`.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, LinkError> {
        let stream_id = self.stream.id().index();
        let peer = self.peer;
        while self.header_filled < HEADER_BYTES {
            let room = self.header.get_mut(self.header_filled..).unwrap_or_default();
            match self.stream.read(room).await {
                Ok(Some(n)) => self.header_filled += n,
                Ok(None) if self.header_filled == 0 => return Ok(None),
                Ok(None) => {
                    return Err(LinkError::FrameTruncated {
                        peer,
                        stream: stream_id,
                        received_bytes: self.header_filled as u64,
                        expected_bytes: HEADER_BYTES as u64,
                    })
                }
                Err(e) => return Err(LinkError::from_read(peer, stream_id, e)),
            }
        }
        let claimed = u32::from_be_bytes(self.header) as usize;
        if claimed > self.frame_bytes_max {
            // The rest of the stream cannot be framed any more: tell the sender to stop.
            let _ = self.stream.stop(VarInt::from_u32(STREAM_STOP_CODE_PROTOCOL));
            return Err(LinkError::FrameTooLarge {
                peer,
                stream: stream_id,
                claimed_bytes: claimed as u64,
                limit_bytes: self.frame_bytes_max as u64,
            });
        }
        while self.body_filled < claimed {
            if self.body_filled == self.body.len() {
                // Grow by what has arrived so far (doubling), never past the claimed length.
                let grown = self
                    .body
                    .len()
                    .saturating_mul(2)
                    .clamp(FRAME_PREALLOCATION_BYTES_MAX.min(claimed), claimed);
                // `reserve_exact`, because `resize` alone may round the capacity up past it.
                self.body.reserve_exact(grown - self.body.len());
                self.body.resize(grown, 0);
            }
            let room = self.body.get_mut(self.body_filled..).unwrap_or_default();
            match self.stream.read(room).await {
                Ok(Some(n)) => self.body_filled += n,
                Ok(None) => {
                    return Err(LinkError::FrameTruncated {
                        peer,
                        stream: stream_id,
                        received_bytes: self.body_filled as u64,
                        expected_bytes: claimed as u64,
                    })
                }
                Err(e) => return Err(LinkError::from_read(peer, stream_id, e)),
            }
        }
        let mut frame = std::mem::take(&mut self.body);
        frame.truncate(claimed);
        self.body_filled = 0;
        self.header_filled = 0;
        Ok(Some(frame))
    }

    /// The partner this stream comes from.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// Bytes currently allocated for the frame being received.
    #[cfg(test)]
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.body.capacity()
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // Tests index freely; the lint guards the library code.
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::{Connection, Identity, Link, LinkProfile, PinnedPeers};

    /// Two links that trust each other, one connection between them, and the temporary
    /// directories their identities live in.
    struct Pair {
        client: Connection,
        server: Connection,
        _links: (Link, Link),
        _dirs: (tempfile::TempDir, tempfile::TempDir),
    }

    async fn pair() -> Pair {
        let dir_a = tempfile::tempdir().expect("tempdir");
        let dir_b = tempfile::tempdir().expect("tempdir");
        let a = Identity::load_or_create(dir_a.path(), "site-a").expect("identity a");
        let b = Identity::load_or_create(dir_b.path(), "site-b").expect("identity b");
        let localhost = "127.0.0.1:0".parse().expect("addr");
        let link_a =
            Link::bind(localhost, &a, Arc::new(PinnedPeers::new([b.fingerprint()])), LinkProfile::default())
                .expect("bind a");
        let link_b =
            Link::bind(localhost, &b, Arc::new(PinnedPeers::new([a.fingerprint()])), LinkProfile::default())
                .expect("bind b");
        let (client, server) =
            tokio::join!(link_a.connect(link_b.local_addr(), b.fingerprint()), link_b.accept());
        Pair {
            client: client.expect("connect"),
            server: server.expect("accept"),
            _links: (link_a, link_b),
            _dirs: (dir_a, dir_b),
        }
    }

    /// Opens a stream from the client, writes `raw` bytes on it unframed, and returns the
    /// client's writer and the server's reader.
    async fn raw_stream(pair: &Pair, raw: &[u8]) -> (FrameWriter, FrameReader) {
        let (mut writer, _reader) = pair.client.open_stream().await.expect("open");
        writer.raw().write_all(raw).await.expect("write raw");
        let (_writer, reader) = pair.server.accept_stream().await.expect("accept stream");
        (writer, reader)
    }

    #[tokio::test]
    async fn oversized_claim_is_refused_before_allocating() {
        let pair = pair().await;
        for claimed in [FRAME_BYTES_MAX as u32 + 1, u32::MAX] {
            let (writer, mut reader) = raw_stream(&pair, &claimed.to_be_bytes()).await;
            let err = reader.recv().await.expect_err("oversized frame");
            match &err {
                LinkError::FrameTooLarge { claimed_bytes, limit_bytes, .. } => {
                    assert_eq!(*claimed_bytes, u64::from(claimed));
                    assert_eq!(*limit_bytes, FRAME_BYTES_MAX as u64);
                }
                other => panic!("expected FrameTooLarge, got {other}"),
            }
            assert!(err.to_string().contains("over the limit"), "{err}");
            assert_eq!(reader.buffered_capacity(), 0, "nothing allocated");
            // The reader stopped the stream, and the sender is told so.
            let finished = writer.finish().await.expect_err("stream was stopped");
            assert!(
                matches!(
                    finished,
                    LinkError::StreamAborted {
                        action: "stopped",
                        code,
                        ..
                    } if code == u64::from(STREAM_STOP_CODE_PROTOCOL)
                ),
                "{finished}"
            );
        }
    }

    #[tokio::test]
    async fn large_claim_allocates_only_what_arrives() {
        let pair = pair().await;
        let claimed = 60 * 1024 * 1024u32;
        let mut raw = claimed.to_be_bytes().to_vec();
        raw.extend_from_slice(&[7u8; 10]);
        let (mut writer, mut reader) = raw_stream(&pair, &raw).await;
        // The frame cannot complete: recv keeps waiting, with only a small buffer allocated.
        let pending = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await;
        assert!(pending.is_err(), "an incomplete frame must not be returned");
        assert!(reader.buffered_capacity() <= FRAME_PREALLOCATION_BYTES_MAX);
        writer.raw().finish().expect("finish");
        let err = tokio::time::timeout(Duration::from_secs(10), reader.recv())
            .await
            .expect("a truncated stream must not hang")
            .expect_err("truncated");
        match err {
            LinkError::FrameTruncated { received_bytes, expected_bytes, .. } => {
                assert_eq!(received_bytes, 10);
                assert_eq!(expected_bytes, u64::from(claimed));
            }
            other => panic!("expected FrameTruncated, got {other}"),
        }
        assert!(reader.buffered_capacity() <= FRAME_PREALLOCATION_BYTES_MAX);
    }

    #[tokio::test]
    async fn truncated_header_is_an_error() {
        let pair = pair().await;
        let (mut writer, mut reader) = raw_stream(&pair, &[0, 0]).await;
        writer.raw().finish().expect("finish");
        let err = tokio::time::timeout(Duration::from_secs(10), reader.recv())
            .await
            .expect("a truncated stream must not hang")
            .expect_err("truncated header");
        assert!(
            matches!(err, LinkError::FrameTruncated { received_bytes: 2, expected_bytes: 4, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn recv_is_cancel_safe() {
        let pair = pair().await;
        let frame: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let length = u32::try_from(frame.len()).expect("length");
        let mut raw = length.to_be_bytes()[..3].to_vec();
        let (mut writer, mut reader) = raw_stream(&pair, &raw).await;
        // Cancel a recv with three header bytes in, then again with part of the body in.
        let pending = tokio::time::timeout(Duration::from_millis(100), reader.recv()).await;
        assert!(pending.is_err());
        raw.clear();
        raw.push(length.to_be_bytes()[3]);
        raw.extend_from_slice(&frame[..100_000]);
        writer.raw().write_all(&raw).await.expect("write");
        let pending = tokio::time::timeout(Duration::from_millis(100), reader.recv()).await;
        assert!(pending.is_err());
        writer.raw().write_all(&frame[100_000..]).await.expect("write");
        let received = reader.recv().await.expect("recv").expect("a frame");
        assert_eq!(received, frame);
        writer.finish().await.expect("finish");
        assert_eq!(reader.recv().await.expect("clean end"), None);
    }

    #[tokio::test]
    async fn writer_refuses_oversized_frames_and_stays_usable() {
        let pair = pair().await;
        let (mut writer, _) = pair.client.open_stream().await.expect("open");
        let too_big = vec![0u8; FRAME_BYTES_MAX + 1];
        let err = writer.send(&too_big).await.expect_err("too big");
        assert!(
            matches!(err, LinkError::FrameTooLargeToSend { frame_bytes, .. } if frame_bytes == too_big.len() as u64),
            "{err}"
        );
        writer.send(b"still fine").await.expect("send");
        let (_, mut reader) = pair.server.accept_stream().await.expect("accept");
        assert_eq!(reader.recv().await.expect("recv").as_deref(), Some(&b"still fine"[..]));
    }

    #[tokio::test]
    async fn cancelled_send_poisons_the_writer() {
        let pair = pair().await;
        let (mut writer, _) = pair.client.open_stream().await.expect("open");
        // Larger than the stream window, so the send cannot finish before the peer reads.
        let frame = vec![1u8; 40 * 1024 * 1024];
        let cancelled = tokio::time::timeout(Duration::from_millis(200), writer.send(&frame)).await;
        assert!(cancelled.is_err(), "the send should still be waiting for window");
        let err = writer.send(b"more").await.expect_err("poisoned");
        assert!(matches!(err, LinkError::WriterPoisoned { .. }), "{err}");
    }
}
