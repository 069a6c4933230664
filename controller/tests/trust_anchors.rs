//! The trust anchors stream (`GET /v1/trust-anchors`) over real mutual TLS on loopback: the
//! bundle the controller holds at once and after each change, to mesh workloads only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use trellis_api::Identity;
use trellis_api::discovery::{ErrorBody, NDJSON, TRUST_ANCHORS_PATH, Target, TrustAnchorsUpdate};
use trellis_api::policy::OutboundPolicy;
use trellis_controller::discovery::{Options, Policies, serve_with_options};
use trellis_tls::{ALPN_H2, MeshTls, Offered};

const TD: &str = "cluster.local";

struct NoServices;

impl Policies for NoServices {
    fn outbound(&self, _: &str, _: &Target) -> OutboundPolicy {
        OutboundPolicy::NotAService { identity: None }
    }
}

struct Root(CertifiedIssuer<'static, KeyPair>);

impl Root {
    fn new() -> Root {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Root(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    fn pem(&self) -> String {
        self.0.pem()
    }

    /// A workload trusting `anchors`, certified by this root as `id` (no SAN when `None`).
    fn workload(&self, anchors: &str, id: Option<&Identity>) -> MeshTls {
        let tls = MeshTls::new(anchors, TD).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        if let Some(id) = id {
            params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        }
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.0).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        tls.credentials
            .set(&tls.provider, vec![cert.der().clone()], der)
            .unwrap();
        tls
    }
}

fn controller_id() -> Identity {
    Identity::new(TD, "trellis-system", "trellis-controller")
}

async fn start(
    tls: Option<&MeshTls>,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_index, rx) = watch::channel(Arc::new(NoServices));
    let options = Options {
        anchors: tls.map(|t| t.anchors.subscribe()),
        ..Options::default()
    };
    let server = tls.map(|t| t.server_config(&[ALPN_H2]));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = serve_with_options(listener, rx, server, options, async {
            let _ = stopped.await;
        })
        .await;
        drop(_index);
    });
    (addr, stop, task)
}

/// Asks for the stream as `tls`'s workload (plaintext without).
async fn ask(addr: SocketAddr, tls: Option<&MeshTls>) -> http::Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let request = Request::get(format!("https://controller{TRUST_ANCHORS_PATH}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    match tls {
        Some(tls) => {
            let client = tls.peer_client(&controller_id(), &[ALPN_H2]).unwrap();
            let stream = client.connect(tcp).await.unwrap();
            let (mut send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(request).await.unwrap()
        }
        None => {
            let (mut send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(request).await.unwrap()
        }
    }
}

/// The next line of the stream, as a bundle.
async fn next(body: &mut Incoming, buf: &mut Vec<u8>) -> String {
    let read = async {
        loop {
            if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                return serde_json::from_slice::<TrustAnchorsUpdate>(&line)
                    .unwrap()
                    .pem;
            }
            let frame = body.frame().await.expect("stream ended").unwrap();
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .expect("no bundle within 2s")
}

async fn error(response: http::Response<Incoming>) -> (StatusCode, String) {
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice::<ErrorBody>(&body).unwrap().error,
    )
}

#[tokio::test]
async fn the_bundle_comes_at_once_and_after_each_change() {
    let (a, b) = (Root::new(), Root::new());
    let controller = a.workload(&a.pem(), Some(&controller_id()));
    let proxy = a.workload(&a.pem(), Some(&Identity::new(TD, "shop", "web")));
    let (addr, stop, task) = start(Some(&controller)).await;

    let response = ask(addr, Some(&proxy)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], NDJSON);
    let (mut body, mut buf) = (response.into_body(), Vec::new());
    assert_eq!(next(&mut body, &mut buf).await, a.pem());

    let both = format!("{}{}", a.pem(), b.pem());
    assert_eq!(controller.offer_anchors(&both, "test"), Offered::Applied);
    assert_eq!(next(&mut body, &mut buf).await, both);
    // A refused bundle is not passed on.
    assert!(matches!(
        controller.offer_anchors("garbage", "test"),
        Offered::Refused(_)
    ));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), body.frame())
            .await
            .is_err(),
        "nothing is sent for a refused bundle"
    );

    // A client certified under B is accepted now that the controller trusts B.
    let under_b = b.workload(&both, Some(&Identity::new(TD, "shop", "api")));
    let response = ask(addr, Some(&under_b)).await;
    let (mut body, mut buf) = (response.into_body(), Vec::new());
    assert_eq!(next(&mut body, &mut buf).await, both);

    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn only_mesh_workloads_get_the_stream() {
    let a = Root::new();
    let controller = a.workload(&a.pem(), Some(&controller_id()));
    let (addr, stop, task) = start(Some(&controller)).await;
    let unnamed = a.workload(&a.pem(), None);
    let (status, message) = error(ask(addr, Some(&unnamed)).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("mesh workloads only"), "{message}");
    let _ = stop.send(());
    task.await.unwrap();

    // A plaintext controller has no anchors to hand out.
    let (addr, stop, task) = start(None).await;
    let (status, message) = error(ask(addr, None).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(message.contains("mutual TLS only"), "{message}");
    let _ = stop.send(());
    task.await.unwrap();
}
