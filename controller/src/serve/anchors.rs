//! Follows the trust anchors file the controller was started with (in a cluster, `ca.crt` of
//! the issuer Secret, which the kubelet updates in place), so that a root rotation reaches the
//! controller's own mutual TLS and, through the discovery stream, every proxy, without restarts.
//!
//! The file is compared by content, not mtime: a Secret volume changes by a symlink swap. A new
//! bundle goes through the same checks as in a proxy ([`MeshTls::offer_anchors`]); one that
//! does not verify the controller's own certificate is offered again at each poll, since the
//! controller's next certificate, from a new issuer, may chain to it.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use trellis_tls::{MeshTls, Offered, RefusedBundle};

/// Reads `path` every `interval` and offers a changed bundle to `tls`, until `stop` is set.
pub async fn follow(
    path: PathBuf,
    tls: MeshTls,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let source = format!("file {}", path.display());
    // The content last offered, and whether it may pass later (after a renewal).
    let mut offered: Option<(String, bool)> = None;
    let mut unreadable: Option<String> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let pem = match tokio::fs::read_to_string(&path).await {
            Ok(pem) => pem,
            Err(e) => {
                // Once per distinct error: a missing file stays missing for many polls.
                let message = e.to_string();
                if unreadable.as_ref() != Some(&message) {
                    tracing::warn!(%source, error = %message, "trust anchors: cannot read the file; the anchors in use stay");
                    unreadable = Some(message);
                }
                continue;
            }
        };
        unreadable = None;
        if offered
            .as_ref()
            .is_some_and(|(last, retry)| *last == pem && !retry)
        {
            continue;
        }
        let retry = matches!(
            tls.offer_anchors(&pem, &source),
            Offered::Refused(RefusedBundle::NotOwnChain(_))
        );
        offered = Some((pem, retry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let pem = issuer.pem();
        (issuer, pem)
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}");
    }

    #[tokio::test]
    async fn a_changed_file_replaces_the_anchors_and_garbage_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        let ((_, a), (_, b)) = (root(), root());
        std::fs::write(&path, &a).unwrap();
        let tls = MeshTls::new(&a, "cluster.local").unwrap();
        let mut changes = tls.anchors.subscribe();
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(follow(
            path.clone(),
            tls.clone(),
            Duration::from_millis(10),
            stop,
        ));

        let both = format!("{a}{b}");
        std::fs::write(&path, &both).unwrap();
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(changes.borrow_and_update().pem(), both);

        // Garbage and a vanished file leave the anchors as they are.
        std::fs::write(&path, "not a certificate").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!changes.has_changed().unwrap());
        assert_eq!(tls.anchors.current().pem(), both);

        std::fs::write(&path, &b).unwrap();
        eventually("B alone is applied", || tls.anchors.current().pem() == b).await;
        stop_tx.send_replace(true);
        task.await.unwrap();
    }
}
