//! A request body that can be sent again: retries and fail-over stand on it.
//!
//! Nothing is stored whole before it is sent. The first attempt reads the client's body as it
//! streams, and every data frame it passes on is also kept (reference-counted `Bytes`, not a
//! copy) until the kept bytes would pass the cap (`--retry-max-body-bytes`). A clone made for
//! another attempt sends what was kept, then reads on from the client where the last reader
//! stopped. Past the cap the kept frames are freed and replay is given up: the attempt that is
//! reading goes on unharmed, and [`ReplayBody::is_replayable`] says no further attempt can be
//! made. A clone that would need freed frames fails instead of sending a short body.
//!
//! Until its first byte is read any body can be sent again, whatever its size: that is the
//! case of a failed connect. A cap of 0 keeps nothing and allows exactly that.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::http::{Body, BoxError};

/// Default of `--retry-max-body-bytes`.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024;

/// One attempt's view of a shared, replayable body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// Data frames this reader has passed on.
    pos: usize,
    /// Bytes this reader has passed on, for its size hint.
    sent: u64,
    trailers_sent: bool,
}

struct Shared {
    /// The rest of the client's body, not read yet.
    inner: Body,
    /// The data frames read so far, while replay is possible.
    kept: Vec<Bytes>,
    kept_bytes: usize,
    /// Data frames read from the client in all.
    read: usize,
    trailers: Option<HeaderMap>,
    /// The client's body has ended (trailers, if any, are in `trailers`).
    ended: bool,
    /// The cap was passed: `kept` is freed and no new reader may start.
    given_up: bool,
    /// Whether frames are kept at all: not for a body announced larger than the cap.
    keep: bool,
    cap: usize,
    /// The client's size hint, for the readers' own.
    hint: SizeHint,
}

/// Why a clone cannot send its body.
#[derive(Debug, thiserror::Error)]
#[error("the request body passed the retry buffer's cap and cannot be sent again")]
pub struct ReplayGivenUp;

impl std::fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody")
            .field("pos", &self.pos)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl ReplayBody {
    /// Wraps `body`, keeping at most `cap` bytes for replay. A body that announces more than
    /// `cap` bytes is never kept: it can be sent again only while none of it was read.
    pub fn new(body: Body, cap: usize) -> Self {
        let hint = body.size_hint();
        let ended = body.is_end_stream();
        let shared = Shared {
            inner: body,
            kept: Vec::new(),
            kept_bytes: 0,
            read: 0,
            trailers: None,
            ended,
            given_up: false,
            keep: hint.lower() <= cap as u64,
            cap,
            hint,
        };
        Self {
            shared: Arc::new(Mutex::new(shared)),
            pos: 0,
            sent: 0,
            trailers_sent: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        match self.shared.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Whether another attempt could still send this body whole.
    pub fn is_replayable(&self) -> bool {
        !self.lock().given_up
    }

    /// A reader for another attempt, from the first byte; `None` once replay is given up.
    pub fn replay(&self) -> Option<ReplayBody> {
        if self.lock().given_up {
            return None;
        }
        Some(ReplayBody {
            shared: self.shared.clone(),
            pos: 0,
            sent: 0,
            trailers_sent: false,
        })
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut s = match this.shared.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if this.pos < s.read {
            // Behind the client's body: send what was kept, if it still is.
            let Some(data) = s.kept.get(this.pos).cloned() else {
                return Poll::Ready(Some(Err(Box::new(ReplayGivenUp))));
            };
            this.pos += 1;
            this.sent += data.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if s.ended {
            if !this.trailers_sent
                && let Some(t) = s.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        // Level with the client's body: read on, keeping what is read.
        let frame = match Pin::new(&mut s.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if s.inner.is_end_stream() {
            s.ended = true;
        }
        let frame = match frame.into_data() {
            Ok(mut data) => {
                let data = data.copy_to_bytes(data.remaining());
                s.read += 1;
                this.pos += 1;
                this.sent += data.len() as u64;
                if !s.given_up {
                    if !s.keep || s.kept_bytes + data.len() > s.cap {
                        s.given_up = true;
                        s.kept = Vec::new();
                        s.kept_bytes = 0;
                    } else {
                        s.kept_bytes += data.len();
                        s.kept.push(data.clone());
                    }
                }
                Frame::data(data)
            }
            Err(frame) => match frame.into_trailers() {
                Ok(t) => {
                    s.ended = true;
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                    Frame::trailers(t)
                }
                // Neither data nor trailers: passed on as it is.
                Err(other) => other,
            },
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let s = self.lock();
        self.pos >= s.read && s.ended && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.lock();
        let mut hint = SizeHint::new();
        hint.set_lower(s.hint.lower().saturating_sub(self.sent));
        if let Some(upper) = s.hint.upper() {
            hint.set_upper(upper.saturating_sub(self.sent));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body fed frame by frame by the test; it ends when the sender is dropped.
    struct Fed(mpsc::Receiver<Frame<Bytes>>);

    impl HttpBody for Fed {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx).map(|f| f.map(Ok))
        }
    }

    fn channel() -> (mpsc::Sender<Frame<Bytes>>, Body) {
        let (tx, rx) = mpsc::channel::<Frame<Bytes>>(16);
        (tx, Fed(rx).boxed_unsync())
    }

    async fn read_all(mut b: ReplayBody) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError> {
        let mut out = Vec::new();
        let mut trailers = None;
        while let Some(frame) = b.frame().await {
            let frame = frame?;
            match frame.into_data() {
                Ok(d) => out.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        Ok((out, trailers))
    }

    #[tokio::test]
    async fn a_clone_replays_what_was_sent_then_reads_on() {
        let (tx, body) = channel();
        let mut first = ReplayBody::new(body, 1024);
        tx.send(Frame::data(Bytes::from_static(b"abc")))
            .await
            .unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "abc");
        // The first attempt fails here; the second starts over and continues.
        let second = first.replay().unwrap();
        drop(first);
        tx.send(Frame::data(Bytes::from_static(b"def")))
            .await
            .unwrap();
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        tx.send(Frame::trailers(t)).await.unwrap();
        drop(tx);
        let (data, trailers) = read_all(second).await.unwrap();
        assert_eq!(data, b"abcdef");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
    }

    #[tokio::test]
    async fn past_the_cap_the_first_reader_goes_on_and_replay_is_given_up() {
        let (tx, body) = channel();
        let mut first = ReplayBody::new(body, 4);
        let early = first.replay().unwrap();
        for chunk in [&b"abc"[..], b"def", b"ghi"] {
            tx.send(Frame::data(Bytes::from_static(chunk)))
                .await
                .unwrap();
        }
        drop(tx);
        assert!(first.is_replayable());
        let mut got = Vec::new();
        while let Some(f) = first.frame().await {
            got.extend_from_slice(&f.unwrap().into_data().unwrap());
        }
        assert_eq!(got, b"abcdefghi");
        assert!(!first.is_replayable());
        assert!(first.replay().is_none());
        // A reader made before the cap passed fails rather than sending a short body.
        assert!(read_all(early).await.is_err());
    }

    #[tokio::test]
    async fn a_body_announced_over_the_cap_is_never_kept() {
        let body = crate::http::full(Bytes::from(vec![b'x'; 100]));
        let b = ReplayBody::new(body, 10);
        // Nothing read yet (a failed connect): it can still go elsewhere, whole.
        assert!(b.is_replayable());
        let first = b.replay().unwrap();
        assert_eq!(read_all(first).await.unwrap().0.len(), 100);
        assert!(!b.is_replayable());
        assert!(b.replay().is_none());
    }

    #[tokio::test]
    async fn a_cap_of_zero_allows_only_a_body_never_read() {
        let (tx, body) = channel();
        let b = ReplayBody::new(body, 0);
        let untouched = b.replay().unwrap();
        drop(untouched);
        let mut second = b.replay().unwrap();
        tx.send(Frame::data(Bytes::from_static(b"a")))
            .await
            .unwrap();
        assert_eq!(
            second.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        assert!(!b.is_replayable());
    }

    #[tokio::test]
    async fn empty_and_exact_bodies_keep_their_size_hints() {
        let b = ReplayBody::new(crate::http::empty(), 10);
        assert!(b.is_end_stream());
        let b = ReplayBody::new(crate::http::full(Bytes::from_static(b"12345")), 10);
        assert_eq!(b.size_hint().exact(), Some(5));
        let again = b.replay().unwrap();
        assert_eq!(read_all(b).await.unwrap().0, b"12345");
        assert_eq!(again.size_hint().exact(), Some(5));
        assert!(!again.is_end_stream());
        assert_eq!(read_all(again).await.unwrap().0, b"12345");
    }
}
