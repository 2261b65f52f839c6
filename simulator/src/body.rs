//! The response body type: either a complete buffer (sent with `Content-Length`) or a
//! stream fed by a producer task through a small channel (sent chunked).
//!
//! Streaming is what makes the `Oversized` and `Trickle` faults honest: the bytes are
//! generated as the client reads them, so a client that stops reading (size cap, timeout)
//! stops the producer too, through channel back-pressure and closure.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// A response body.
#[derive(Debug)]
pub(crate) enum SimBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl SimBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        SimBody::Full(Some(b.into()))
    }

    pub fn empty() -> Self {
        SimBody::Full(None)
    }

    /// About `bytes` bytes of `{"token":"<spaces>"}`, produced in 64 KiB chunks.
    pub fn oversized(bytes: usize) -> Self {
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            const CHUNK: usize = 64 * 1024;
            if tx.send(Bytes::from_static(b"{\"token\":\"")).await.is_err() {
                return;
            }
            let spaces = Bytes::from(vec![b' '; CHUNK]);
            let mut left = bytes;
            while left > 0 {
                let n = left.min(CHUNK);
                if tx.send(spaces.slice(..n)).await.is_err() {
                    return;
                }
                left -= n;
            }
            let _ = tx.send(Bytes::from_static(b"\"}")).await;
        });
        SimBody::Stream(rx)
    }

    /// `total` bytes of `{"padding":"   ..."}` (cut to `total`), one byte at a time at
    /// `bytes_per_sec`.
    pub fn trickle(bytes_per_sec: u32, total: usize) -> Self {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let prefix = b"{\"padding\":\"";
            let interval = Duration::from_secs(1) / bytes_per_sec.max(1);
            for i in 0..total {
                let byte = if total >= prefix.len() + 2 && i >= total - 2 {
                    b"\"}"[i + 2 - total]
                } else {
                    prefix.get(i).copied().unwrap_or(b' ')
                };
                if tx.send(Bytes::copy_from_slice(&[byte])).await.is_err() {
                    return;
                }
                if i + 1 < total {
                    tokio::time::sleep(interval).await;
                }
            }
        });
        SimBody::Stream(rx)
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            SimBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, SimBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SimBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            SimBody::Full(None) => SizeHint::with_exact(0),
            SimBody::Stream(_) => SizeHint::default(),
        }
    }
}
