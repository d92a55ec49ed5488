//! Reading fixed-size headers so that a server shutdown can interrupt an idle connection, and
//! skipping payloads the server refuses, without ever buffering more than a small fixed amount.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

/// How a header read ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderRead {
    /// The buffer is full.
    Complete,
    /// The peer closed the connection before sending the first byte of a header.
    Closed,
    /// The server is shutting down and no byte of the next header had arrived.
    Stopped,
}

/// Fill `buf` from `reader`, unless `stop` turns true first.
///
/// A stop wins even in the middle of a header: the connection is then closed, and nothing in
/// a half-received message was acknowledged, so dropping it loses nothing a client was told
/// it had. Without that, a client that stalls mid-message would hold a shutdown forever. The
/// peer closing mid-header is an `UnexpectedEof` error.
///
/// # Cancel safety
///
/// Not cancel safe once a header has started: dropping the future then loses the bytes read
/// so far. Each inner `read` is cancel safe, which is what makes `stop` safe to race against.
pub(crate) async fn read_header_or_stop<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<HeaderRead> {
    let mut filled = 0;
    while filled < buf.len() {
        let Some(unfilled) = buf.get_mut(filled..) else {
            break;
        };
        let count = tokio::select! {
            biased;
            () = stop_signalled(stop) => return Ok(HeaderRead::Stopped),
            count = reader.read(unfilled) => count?,
        };
        if count == 0 {
            if filled == 0 {
                return Ok(HeaderRead::Closed);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "peer closed the connection in the middle of a header",
            ));
        }
        filled += count;
    }
    Ok(HeaderRead::Complete)
}

/// Run `io` unless `stop` turns true first; `None` means stopped.
///
/// # Cancel safety
///
/// Whatever `io` has done when a stop wins is lost, so use it only where the stream is
/// abandoned after a stop.
pub(crate) async fn unless_stopped<T>(
    stop: &mut watch::Receiver<bool>,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<Option<T>> {
    tokio::select! {
        biased;
        () = stop_signalled(stop) => Ok(None),
        done = io => done.map(Some),
    }
}

/// Read and drop exactly `length_bytes` bytes through a fixed-size buffer.
pub(crate) async fn discard<R: AsyncRead + Unpin>(reader: &mut R, length_bytes: u64) -> std::io::Result<()> {
    let mut limited = reader.take(length_bytes);
    let copied = tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
    if copied < length_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "peer closed the connection in the middle of a payload",
        ));
    }
    Ok(())
}

/// Resolve once `stop` is true; never resolve if its sender is gone without having said so,
/// which is how a connection served outside [`crate::NbdServer::serve`] runs until it ends.
///
/// # Cancel safety
///
/// Cancel safe.
pub(crate) async fn stop_signalled(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stopping| *stopping).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn header_read_reports_close_stop_and_short_headers() {
        let (_keep, mut stop) = watch::channel(false);
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&[1, 2, 3, 4]).await.unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(
            read_header_or_stop(&mut server, &mut buf, &mut stop).await.unwrap(),
            HeaderRead::Complete
        );
        assert_eq!(buf, [1, 2, 3, 4]);

        client.write_all(&[9]).await.unwrap();
        drop(client);
        let error = read_header_or_stop(&mut server, &mut buf, &mut stop).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);

        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert_eq!(read_header_or_stop(&mut server, &mut buf, &mut stop).await.unwrap(), HeaderRead::Closed);

        let (_client, mut server) = tokio::io::duplex(64);
        let (stopper, mut stop) = watch::channel(false);
        stopper.send(true).unwrap();
        assert_eq!(read_header_or_stop(&mut server, &mut buf, &mut stop).await.unwrap(), HeaderRead::Stopped);
    }

    /// Hands out two bytes, then signals a stop and never delivers more.
    struct StopsMidHeader {
        delivered: bool,
        stopper: watch::Sender<bool>,
    }

    impl AsyncRead for StopsMidHeader {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.delivered {
                self.stopper.send_replace(true);
                return std::task::Poll::Pending;
            }
            self.delivered = true;
            buf.put_slice(&[1, 2]);
            std::task::Poll::Ready(Ok(()))
        }
    }

    // Regression: a stop used to be honoured only before a header's first byte, so a client
    // that sent half a header and stalled held up a shutdown forever.
    #[tokio::test]
    async fn a_stop_interrupts_a_half_received_header() {
        let (stopper, mut stop) = watch::channel(false);
        let mut reader = StopsMidHeader { delivered: false, stopper };
        let mut buf = [0u8; 4];
        let reading = read_header_or_stop(&mut reader, &mut buf, &mut stop);
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), reading)
            .await
            .expect("the stop ends the read")
            .unwrap();
        assert_eq!(read, HeaderRead::Stopped);
        assert_eq!(buf[..2], [1, 2], "the stop came after part of the header");
    }

    #[tokio::test]
    async fn unless_stopped_abandons_a_stalled_read_and_passes_results_through() {
        let (_client, mut server) = tokio::io::duplex(64);
        let (stopper, mut stop) = watch::channel(false);
        stopper.send(true).unwrap();
        let mut buf = [0u8; 8];
        let read = unless_stopped(&mut stop, server.read_exact(&mut buf)).await;
        assert!(read.unwrap().is_none());

        let (_, mut running) = watch::channel(false);
        let done = unless_stopped(&mut running, async { Ok(7) }).await;
        assert_eq!(done.unwrap(), Some(7));
    }

    #[tokio::test]
    async fn discard_consumes_exactly_the_payload() {
        // The payload is larger than the pipe, so the writer runs beside the reader.
        let (mut client, mut server) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            client.write_all(&vec![7u8; 100_000]).await.unwrap();
            client.write_all(&[42]).await.unwrap();
        });
        discard(&mut server, 100_000).await.unwrap();
        let mut next = [0u8; 1];
        server.read_exact(&mut next).await.unwrap();
        assert_eq!(next, [42]);
        writer.await.unwrap();
        let error = discard(&mut server, 10).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
