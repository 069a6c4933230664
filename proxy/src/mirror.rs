//! Request mirroring: copies of a request sent to other backends, the answers ignored.
//!
//! The body is teed as it streams: every frame the client's request passes on is also queued
//! for each mirror, so the main request never waits for a mirror and nothing is stored whole.
//! A mirror's queue holds at most `--mirror-max-body-bytes`; a mirror that falls that far
//! behind loses its copy (its request is aborted, never sent short as if complete) and is
//! counted `truncated`. At most `--mirror-max-in-flight` copies run at once, each for at most
//! `--mirror-timeout`; beyond that a copy is `dropped` or `timeout`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use tokio::sync::Notify;

use crate::http::{self as h, Body, BoxError};
use crate::metrics::MirrorLabels;
use crate::policy::{Backend, Target};
use crate::proxy::Proxy;

/// Starts a copy of `req` to each of `mirrors` and returns the request to send on, whose body
/// feeds the copies as it is read.
pub fn start(proxy: &Proxy, req: Request<Incoming>, mirrors: &[&Backend]) -> Request<Body> {
    let (parts, body) = req.into_parts();
    let cap = proxy.config.args.mirror_max_body_bytes;
    let mut queues = Vec::with_capacity(mirrors.len());
    for backend in mirrors {
        let Target::Service {
            balancer, http2, ..
        } = &backend.target
        else {
            continue;
        };
        let Ok(permit) = proxy.mirror_permits.clone().try_acquire_owned() else {
            count(proxy, "dropped");
            continue;
        };
        let Some(ep) = balancer.pick() else {
            count(proxy, "failed");
            continue;
        };
        let queue = Queue::new(cap);
        // A request without a body (most GETs) is never read to its end: its copy is
        // complete already.
        if body.is_end_stream() {
            queue.finish();
        }
        let meshed = ep.identity.is_some();
        let Ok(copy) = crate::outbound::build_upstream(
            &parts,
            parts.headers.clone(),
            MirrorBody(queue.clone()).boxed_unsync(),
            &ep.authority,
            meshed,
            backend.request_headers.as_ref(),
        ) else {
            continue;
        };
        queues.push(queue.clone());
        let (upstream, metrics, http2) = (
            proxy.upstream.clone(),
            proxy.metrics.clone(),
            *http2 || meshed,
        );
        let deadline = proxy.config.args.mirror_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let sent = async {
                tokio::select! {
                    res = upstream.send(copy, http2) => match res {
                        // Read so the connection can be reused, without keeping what is read.
                        Ok(res) => {
                            h::discard(res.into_body(), cap).await;
                            "sent"
                        }
                        Err(_) if queue.truncated() => "truncated",
                        Err(_) => "failed",
                    },
                    // A copy stuck behind a mirror that stopped reading is not polled again:
                    // it ends here, and its connection with it.
                    () = queue.abandoned() => match queue.truncated() {
                        true => "truncated",
                        false => "failed",
                    },
                }
            };
            let result = tokio::time::timeout(deadline, sent)
                .await
                .unwrap_or("timeout");
            // The tee stops feeding a copy that is gone.
            queue.close();
            metrics
                .mirrors
                .get_or_create(&MirrorLabels { result })
                .inc();
        });
    }
    let body = if queues.is_empty() {
        h::incoming(body)
    } else {
        Tee {
            inner: body,
            queues,
        }
        .boxed_unsync()
    };
    Request::from_parts(parts, body)
}

fn count(proxy: &Proxy, result: &'static str) {
    proxy
        .metrics
        .mirrors
        .get_or_create(&MirrorLabels { result })
        .inc();
}

/// The client's body, passing a copy of each frame to every mirror's queue.
struct Tee {
    inner: Incoming,
    queues: Vec<Queue>,
}

impl HttpBody for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // Clients stop reading a body that says it is done (a Content-Length met), so
                // its end is known here, not from a last poll.
                let ended = self.inner.is_end_stream();
                for q in &self.queues {
                    q.push(frame);
                    if ended {
                        q.finish();
                    }
                }
            }
            Poll::Ready(None) => {
                for q in &self.queues {
                    q.finish();
                }
            }
            // A broken client body breaks the copies too: queues closed unfinished.
            Poll::Ready(Some(Err(_))) => {
                for q in &self.queues {
                    q.close();
                }
            }
            Poll::Pending => {}
        }
        polled.map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // Dropped before its end (the main request failed or was cancelled): the copies would
        // never end either.
        for q in &self.queues {
            q.close();
        }
    }
}

/// One mirror's frames in flight, bounded in bytes.
#[derive(Clone)]
struct Queue(Arc<Mutex<State>>, Arc<Notify>);

struct State {
    frames: VecDeque<Frame<Bytes>>,
    bytes: usize,
    cap: usize,
    /// The client's body ended: once `frames` is empty, so does the copy.
    finished: bool,
    /// Abandoned: the copy fails at its next read.
    closed: bool,
    truncated: bool,
    waker: Option<Waker>,
}

impl Queue {
    fn new(cap: usize) -> Self {
        let state = State {
            frames: VecDeque::new(),
            bytes: 0,
            cap,
            finished: false,
            closed: false,
            truncated: false,
            waker: None,
        };
        Queue(Arc::new(Mutex::new(state)), Arc::new(Notify::new()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn push(&self, frame: &Frame<Bytes>) {
        let mut s = self.lock();
        if s.closed || s.finished {
            return;
        }
        let copy = if let Some(data) = frame.data_ref() {
            if s.bytes + data.len() > s.cap {
                s.truncated = true;
                self.abandon(&mut s);
                return;
            }
            s.bytes += data.len();
            // A reference-counted view of the same bytes, not a copy.
            Frame::data(data.clone())
        } else if let Some(trailers) = frame.trailers_ref() {
            Frame::trailers(trailers.clone())
        } else {
            return;
        };
        s.frames.push_back(copy);
        wake(&mut s);
    }

    fn finish(&self) {
        let mut s = self.lock();
        s.finished = true;
        wake(&mut s);
    }

    fn close(&self) {
        let mut s = self.lock();
        if !s.finished && !s.closed {
            self.abandon(&mut s);
        }
        wake(&mut s);
    }

    fn abandon(&self, s: &mut State) {
        s.closed = true;
        s.frames.clear();
        s.bytes = 0;
        wake(s);
        self.1.notify_one();
    }

    /// Resolves once the copy has been abandoned.
    async fn abandoned(&self) {
        self.1.notified().await;
    }

    fn truncated(&self) -> bool {
        self.lock().truncated
    }
}

fn wake(s: &mut State) {
    if let Some(w) = s.waker.take() {
        w.wake();
    }
}

/// The body of a mirror's copy, read from its queue.
struct MirrorBody(Queue);

#[derive(Debug, thiserror::Error)]
#[error("the mirror's copy of the request body was abandoned")]
struct Abandoned;

impl HttpBody for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = self.0.lock();
        if s.closed {
            return Poll::Ready(Some(Err(Box::new(Abandoned))));
        }
        if let Some(frame) = s.frames.pop_front() {
            if let Some(d) = frame.data_ref() {
                s.bytes -= d.len();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if s.finished {
            return Poll::Ready(None);
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let s = self.0.lock();
        s.finished && s.frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Frame<Bytes> {
        Frame::data(Bytes::from(vec![b'x'; n]))
    }

    async fn read_all(q: Queue) -> Result<usize, BoxError> {
        let collected = MirrorBody(q).collect().await?;
        Ok(collected.to_bytes().len())
    }

    #[tokio::test]
    async fn a_copy_gets_every_frame_then_ends() {
        let q = Queue::new(100);
        q.push(&data(40));
        q.push(&data(40));
        let reader = tokio::spawn(read_all(q.clone()));
        q.push(&data(20));
        q.finish();
        assert_eq!(reader.await.unwrap().unwrap(), 100);
        assert!(!q.truncated());
    }

    #[tokio::test]
    async fn a_copy_that_falls_behind_is_abandoned_not_cut_short() {
        let q = Queue::new(100);
        q.push(&data(60));
        q.push(&data(60));
        q.finish();
        assert!(q.truncated());
        assert!(read_all(q).await.is_err());
    }

    #[tokio::test]
    async fn a_client_body_that_never_ends_fails_the_copy() {
        let q = Queue::new(100);
        q.push(&data(10));
        let reader = tokio::spawn(read_all(q.clone()));
        q.close();
        assert!(reader.await.unwrap().is_err());
    }
}
