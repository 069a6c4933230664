//! The trust anchors stream: the bundle the controller trusts, applied to the sidecar's mutual
//! TLS as it changes, so that rotating the mesh's root needs no restart of meshed pods.
//!
//! The stream shares the one mutual TLS connection to the controller, whose identity and chain
//! were checked with the anchors in force: a bundle comes from nowhere else. Each bundle is
//! checked by [`MeshTls::offer_anchors`]; a refused one is logged and counted, and the anchors in
//! force stay.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use trellis_api::discovery::{TRUST_ANCHORS_PATH, TrustAnchorsUpdate};
use trellis_tls::{MeshTls, Offered, RefusedBundle};

use super::{Discovery, Inner, LineBuffer, StreamError, open};
use super::{backoff_cap, jittered};

/// A bundle refused only because it does not verify the sidecar's own certificate is offered
/// again this often: the next certificate, from the new issuer, may chain to it.
const RETRY_REFUSED: Duration = Duration::from_secs(1);

impl Discovery {
    /// Follows the controller's trust anchors stream for as long as the sidecar runs, applying
    /// each bundle to `tls`. Only for a discovery client with mutual TLS. Needs a Tokio runtime.
    pub fn follow_trust_anchors(&self, tls: MeshTls) {
        tokio::spawn(follow(self.inner.clone(), tls));
    }
}

/// Reads the stream, opening it again after every end, forever.
async fn follow(inner: Arc<Inner>, tls: MeshTls) -> Infallible {
    let mut failures = 0u32;
    loop {
        let mut received = false;
        let Err(error) = stream(&inner, &tls, &mut received).await;
        if received {
            failures = 0;
        }
        let delay = match &error {
            StreamError::Rejected { .. } => {
                // A controller that does not serve anchors (an older one) answers 404.
                tracing::warn!(%error, "trust anchors: the controller refused the stream");
                inner
                    .cfg
                    .rejected_retry
                    .mul_f64(0.5 + fastrand::f64() / 2.0)
            }
            _ => {
                if inner.controller.is_connected() {
                    tracing::info!(%error, "trust anchors: stream ended, keeping the anchors in force");
                } else {
                    tracing::debug!(%error, "trust anchors: stream ended with the connection");
                }
                failures = failures.saturating_add(1);
                jittered(backoff_cap(
                    failures - 1,
                    inner.cfg.backoff_min,
                    inner.cfg.backoff_max,
                ))
            }
        };
        tokio::time::sleep(delay).await;
    }
}

/// One request for the stream, read until it ends.
async fn stream(
    inner: &Inner,
    tls: &MeshTls,
    received: &mut bool,
) -> Result<Infallible, StreamError> {
    let uri = format!("https://{}{TRUST_ANCHORS_PATH}", inner.cfg.controller_addr);
    let mut body = open(inner, uri).await?;
    let source = format!("controller {}", inner.cfg.controller_addr);
    let mut lines = LineBuffer::new(inner.cfg.max_line);
    // The last bundle, while it is refused for not verifying the sidecar's own certificate.
    let mut pending: Option<String> = None;
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = tokio::time::sleep(RETRY_REFUSED), if pending.is_some() => {
                if let Some(pem) = pending.take() {
                    pending = offer(tls, pem, &source);
                }
                continue;
            }
        };
        let frame = match frame {
            None => return Err(StreamError::Ended),
            Some(frame) => frame.map_err(StreamError::Body)?,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        lines.extend(&data);
        while let Some(line) = lines.next_line()? {
            *received = true;
            pending = match serde_json::from_slice::<TrustAnchorsUpdate>(&line) {
                Ok(update) => offer(tls, update.pem, &source),
                Err(error) => {
                    tls.anchors
                        .refuse(&format!("not a trust anchors update: {error}"), &source);
                    None
                }
            };
        }
    }
}

/// Offers `pem`; returns it when it may be accepted later, once the sidecar is renewed.
fn offer(tls: &MeshTls, pem: String, source: &str) -> Option<String> {
    match tls.offer_anchors(&pem, source) {
        Offered::Refused(RefusedBundle::NotOwnChain(_)) => Some(pem),
        Offered::Applied | Offered::Unchanged | Offered::Refused(_) => None,
    }
}
