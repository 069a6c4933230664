//! Leader election against kube's real client and a scripted API server, in order: create,
//! renew, release; a lost Lease stops leadership at once; a standby takes over an expired one.
//! Timings are scaled down (a 600 ms Lease renewed every 100 ms; others' Leases last 1 s).

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower_test::mock::{self, Handle, SendResponse};

use super::fake_api::PATIENCE;
use super::leader::{self, LeaseTiming};

const NS: &str = "trellis-system";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases/trellis-controller";
const DURATION: Duration = Duration::from_millis(600);

type ApiHandle = Handle<Request<Body>, Response<Body>>;

struct Replica {
    handle: ApiHandle,
    leader: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn replica(identity: &str) -> Replica {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let leases: Api<Lease> = Api::namespaced(kube::Client::new(service, NS), NS);
    let (leader_tx, leader) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let timing = LeaseTiming {
        duration: DURATION,
        renew_every: Duration::from_millis(100),
        retry_every: Duration::from_millis(50),
    };
    let task = tokio::spawn(leader::run(
        leases,
        "trellis-controller".to_string(),
        identity.to_string(),
        timing,
        leader_tx,
        stop_rx,
    ));
    Replica {
        handle,
        leader,
        stop,
        task,
    }
}

/// The next request, checked against the expected method and path, with its JSON body.
async fn expect(
    handle: &mut ApiHandle,
    method: Method,
    path: &str,
) -> (Value, SendResponse<Response<Body>>) {
    let (request, send) = tokio::time::timeout(PATIENCE, handle.next_request())
        .await
        .expect("a request in time")
        .expect("a request");
    assert_eq!((request.method(), request.uri().path()), (&method, path));
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (body, send)
}

fn respond(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn failure(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("leases.coordination.k8s.io \"trellis-controller\": {reason}"),
        "reason": reason, "code": code
    })
}

/// The Lease as the API server returns it after a write of `body`, at `rv`.
fn stored(mut body: Value, rv: &str) -> Value {
    body["apiVersion"] = json!("coordination.k8s.io/v1");
    body["kind"] = json!("Lease");
    body["metadata"]["namespace"] = json!(NS);
    body["metadata"]["resourceVersion"] = json!(rv);
    body
}

/// A Lease another replica holds for one second.
fn held_by(holder: &str, rv: &str, transitions: i32, renewed: &str) -> Value {
    stored(
        json!({
            "metadata": {"name": "trellis-controller"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 1,
                     "acquireTime": "2026-01-01T00:00:00.000000Z",
                     "renewTime": renewed, "leaseTransitions": transitions}
        }),
        rv,
    )
}

async fn becomes(leader: &mut watch::Receiver<bool>, leading: bool) {
    tokio::time::timeout(PATIENCE, leader.wait_for(|l| *l == leading))
        .await
        .expect("leadership in time")
        .unwrap();
}

#[tokio::test]
async fn creates_renews_and_releases_the_lease() {
    let mut r = replica("pod-a");
    let (_, send) = expect(&mut r.handle, Method::GET, LEASE).await;
    respond(send, StatusCode::NOT_FOUND, &failure(404, "NotFound"));

    let (body, send) = expect(&mut r.handle, Method::POST, LEASES).await;
    assert_eq!(body["metadata"]["name"], "trellis-controller");
    assert_eq!(body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 1, "600 ms rounds up");
    assert_eq!(body["spec"]["leaseTransitions"], 0);
    assert!(body["spec"]["renewTime"].is_string());
    assert!(!*r.leader.borrow());
    respond(send, StatusCode::CREATED, &stored(body, "1"));
    becomes(&mut r.leader, true).await;

    // Renewals update the version last written, with no read in between.
    for (version, next) in [("1", "2"), ("2", "3")] {
        let (body, send) = expect(&mut r.handle, Method::PUT, LEASE).await;
        assert_eq!(body["metadata"]["resourceVersion"], version);
        assert_eq!(body["spec"]["holderIdentity"], "pod-a");
        assert_eq!(body["spec"]["leaseTransitions"], 0);
        respond(send, StatusCode::OK, &stored(body, next));
        assert!(*r.leader.borrow());
    }

    // On stop the Lease is released so that a standby need not wait for it to expire.
    r.stop.send_replace(true);
    let (body, send) = expect(&mut r.handle, Method::PUT, LEASE).await;
    assert_eq!(body["metadata"]["resourceVersion"], "3");
    assert!(body["spec"].get("holderIdentity").is_none(), "{body}");
    respond(send, StatusCode::OK, &stored(body, "4"));
    tokio::time::timeout(PATIENCE, r.task)
        .await
        .unwrap()
        .unwrap();
    assert!(!*r.leader.borrow());
}

#[tokio::test]
async fn a_standby_takes_over_after_expiry_and_a_lost_lease_stops_leading_at_once() {
    let mut r = replica("pod-b");
    let other = held_by("pod-a", "7", 1, "2026-01-01T00:00:00.000000Z");
    let mut leased = tokio::time::Instant::now();

    // pod-a holds it and stops renewing: pod-b reads the same record until it expired.
    let mut reads = 0;
    let body = loop {
        let (request, send) = tokio::time::timeout(PATIENCE, r.handle.next_request())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(request.uri().path(), LEASE);
        if request.method() == Method::GET {
            if reads == 0 {
                leased = Instant::now();
            }
            reads += 1;
            respond(send, StatusCode::OK, &other);
            assert!(!*r.leader.borrow());
            continue;
        }
        assert_eq!(request.method(), Method::PUT);
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        respond(send, StatusCode::OK, &stored(body.clone(), "8"));
        break body;
    };
    // pod-a's own duration (1 s) counts.
    let waited = leased.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "took over after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "took over only after {waited:?}"
    );
    assert!(reads >= 3, "{reads} reads");
    assert_eq!(body["metadata"]["resourceVersion"], "7");
    assert_eq!(body["spec"]["holderIdentity"], "pod-b");
    assert_eq!(body["spec"]["leaseTransitions"], 2);
    becomes(&mut r.leader, true).await;

    // The next renewal finds that pod-c wrote the Lease: leadership ends before anything else.
    let (_, send) = expect(&mut r.handle, Method::PUT, LEASE).await;
    respond(send, StatusCode::CONFLICT, &failure(409, "Conflict"));
    becomes(&mut r.leader, false).await;
    let (_, send) = expect(&mut r.handle, Method::GET, LEASE).await;
    respond(
        send,
        StatusCode::OK,
        &held_by("pod-c", "9", 3, "2026-01-01T00:01:00.000000Z"),
    );
    // pod-c's Lease is valid: pod-b only reads it.
    let (_, send) = expect(&mut r.handle, Method::GET, LEASE).await;
    assert!(!*r.leader.borrow());
    r.stop.send_replace(true);
    drop(send);
    tokio::time::timeout(PATIENCE, r.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_failed_renewal_stops_leading_until_a_renewal_succeeds() {
    let mut r = replica("pod-a");
    let (_, send) = expect(&mut r.handle, Method::GET, LEASE).await;
    respond(
        send,
        StatusCode::OK,
        &held_by("pod-a", "3", 0, "2026-01-01T00:00:00.000000Z"),
    );
    // Still named in the Lease (a restart): renewed without a transition.
    let (body, send) = expect(&mut r.handle, Method::PUT, LEASE).await;
    assert_eq!(body["spec"]["leaseTransitions"], 0);
    assert_eq!(
        body["spec"]["acquireTime"], "2026-01-01T00:00:00.000000Z",
        "a renewal keeps the acquire time"
    );
    respond(send, StatusCode::OK, &stored(body, "4"));
    becomes(&mut r.leader, true).await;

    let (_, send) = expect(&mut r.handle, Method::PUT, LEASE).await;
    respond(
        send,
        StatusCode::INTERNAL_SERVER_ERROR,
        &failure(500, "InternalError"),
    );
    becomes(&mut r.leader, false).await;

    // After a failure the Lease is read again; still ours, so it is renewed.
    let (_, send) = expect(&mut r.handle, Method::GET, LEASE).await;
    respond(
        send,
        StatusCode::OK,
        &held_by("pod-a", "4", 0, "2026-01-01T00:00:01.000000Z"),
    );
    let (body, send) = expect(&mut r.handle, Method::PUT, LEASE).await;
    assert_eq!(body["metadata"]["resourceVersion"], "4");
    respond(send, StatusCode::OK, &stored(body, "5"));
    becomes(&mut r.leader, true).await;
    r.stop.send_replace(true);
    let (_, send) = expect(&mut r.handle, Method::PUT, LEASE).await;
    respond(
        send,
        StatusCode::OK,
        &held_by("", "6", 0, "2026-01-01T00:00:02.000000Z"),
    );
    tokio::time::timeout(PATIENCE, r.task)
        .await
        .unwrap()
        .unwrap();
}
