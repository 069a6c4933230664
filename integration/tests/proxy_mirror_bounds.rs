//! Mirrors and retries never buffer without bound or hold the client's request: a chunked
//! body is mirrored as it streams, a mirror that stops reading loses its copy (counted) while
//! the client's request completes, copies in flight are capped and timed out, and a retried
//! error answer with an endless body is cut off.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use trellis_integration::netns::metric;
use trellis_integration::{Controller, Echo, Sidecar};

fn ip(block: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, block, host))
}

/// `web` (the echo app at .11) mirrored to `sink` (.12, a server the test controls); `flaky`
/// (.13) retried on 503.
fn cluster(block: u8) -> String {
    let mut out = String::new();
    for (name, host) in [("web", 11), ("sink", 12), ("flaky", 13)] {
        out += &trellis_integration::plain_service(block, name, &[host]);
    }
    out += "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: sink, port: 80}}}]
    backendRefs: [{name: web, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: flaky, port: 80}]
  rules:
  - backendRefs: [{name: flaky, port: 80}]
    retry: {codes: [503], attempts: 2}
";
    out
}

/// A mirror backend that reads request heads (and bodies only when `read_bodies`), counts
/// requests, and never answers.
fn sink(addr: SocketAddr, read_bodies: bool) -> Arc<AtomicUsize> {
    let seen = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind(addr).unwrap();
    let count = seen.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                while read_bodies && matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                // Holds the connection, answering nothing, until the peer goes.
                std::thread::sleep(Duration::from_secs(60));
            });
        }
    });
    seen
}

/// A backend answering 503 with a body that never ends.
fn endless_503(addr: SocketAddr) -> Arc<AtomicUsize> {
    let seen = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind(addr).unwrap();
    let count = seen.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                count.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n",
                );
                let chunk = format!("{:x}\r\n{}\r\n", 1024, "x".repeat(1024));
                while s.write_all(chunk.as_bytes()).is_ok() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
    });
    seen
}

/// Sends a chunked POST of `len` bytes through the sidecar and returns the head of the
/// answer and how long the whole exchange took.
fn chunked_post(out: SocketAddr, host: &str, len: usize) -> (String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(out).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(
        format!("POST / HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let piece = vec![b'p'; 16 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(piece.len());
        s.write_all(format!("{n:x}\r\n").as_bytes()).unwrap();
        s.write_all(&piece[..n]).unwrap();
        s.write_all(b"\r\n").unwrap();
        left -= n;
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

fn get_head(out: SocketAddr, host: &str) -> (String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(out).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap_or(0);
    (
        String::from_utf8_lossy(&buf[..n]).into_owned(),
        started.elapsed(),
    )
}

/// The controller on [`cluster`]`(block)` and a client sidecar at `.9` with `flags`; the
/// directory must outlive them.
fn sidecar(block: u8, flags: &[&str]) -> (tempfile::TempDir, Controller, Sidecar) {
    let dir = trellis_integration::scratch_dir();
    std::fs::write(dir.path().join("cluster.yaml"), cluster(block)).unwrap();
    let controller = Controller::start(dir.path());
    let sidecar = Sidecar::start(ip(block, 9), "shop", controller.addr, flags);
    (dir, controller, sidecar)
}

fn mirrors(text: &str, result: &str) -> f64 {
    metric(text, "trellis_mirrors_total", &[("result", result)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_stops_reading_loses_its_copy_not_the_clients_request() {
    let block = 83;
    let _web = Echo::start(SocketAddr::new(ip(block, 11), 8080), "web-0").await;
    let sunk = sink(SocketAddr::new(ip(block, 12), 8080), false);
    let flags = [
        "--mirror-max-body-bytes",
        "65536",
        "--mirror-timeout",
        "30s",
    ];
    let (_dir, _controller, sidecar) = sidecar(block, &flags);
    let out = sidecar.outbound();

    // 32 MiB, chunked: far more than the sink's socket buffers and the copy's 64 KiB queue.
    let (answer, took) = tokio::task::spawn_blocking(move || chunked_post(out, "web", 32 << 20))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"body_len\":33554432"), "{answer}");
    assert!(
        took < Duration::from_secs(15),
        "the client's request took {took:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = sidecar.metrics().await;
    while mirrors(&text, "truncated") < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = sidecar.metrics().await;
    }
    assert_eq!(sunk.load(Ordering::SeqCst), 1, "the copy was started");
    assert_eq!(mirrors(&text, "truncated"), 1.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_are_mirrored_and_copies_in_flight_are_capped_and_timed_out() {
    let block = 84;
    let _web = Echo::start(SocketAddr::new(ip(block, 11), 8080), "web-0").await;
    let sunk = sink(SocketAddr::new(ip(block, 12), 8080), true);
    let flags = ["--mirror-max-in-flight", "2", "--mirror-timeout", "1s"];
    let (_dir, _controller, sidecar) = sidecar(block, &flags);
    let out = sidecar.outbound();

    let answers = tokio::task::spawn_blocking(move || {
        (0..5)
            .map(|_| chunked_post(out, "web", 10_000).0)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for answer in &answers {
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    // Two copies (chunked bodies, once skipped) are in flight at the sink, which never
    // answers; the other three were dropped. After the mirror timeout, both are abandoned.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = sidecar.metrics().await;
    assert_eq!(sunk.load(Ordering::SeqCst), 2);
    assert_eq!(mirrors(&text, "dropped"), 3.0, "{text}");
    assert_eq!(mirrors(&text, "timeout"), 2.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_error_with_an_endless_body_is_cut_off() {
    let block = 85;
    let attempts = endless_503(SocketAddr::new(ip(block, 13), 8080));
    let (_dir, _controller, sidecar) = sidecar(block, &[]);
    let out = sidecar.outbound();
    let (head, took) = tokio::task::spawn_blocking(move || get_head(out, "flaky"))
        .await
        .unwrap();
    // Three attempts; the first two answers are read for at most a second each, then
    // dropped; the last goes to the client as it streams.
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// Several mirrors on one rule, a fraction (GEP-3171), a mirror on a backendRef, and a gRPC
/// call (a streamed HTTP/2 body) mirrored whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_mirrors_fractions_backend_mirrors_and_grpc() {
    use trellis_integration::mesh::{Mesh, send};
    use trellis_integration::{body, empty, http1_client, http2_client};
    const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: mirror, port: 80}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}, fraction: {numerator: 1, denominator: 4}}}
    backendRefs:
    - name: echo-v1
      port: 80
      filters:
      - {type: RequestMirror, requestMirror: {backendRef: {name: mirror, port: 80}, percent: 50}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo-grpc, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: mirror, port: 7070}}}]
    backendRefs: [{name: echo-v1, port: 7070}]
"#;
    let mesh = Mesh::start(87, ROUTES).await;
    let (mirror, v2) = (&mesh.apps["mirror-0"], &mesh.apps["echo-v2-0"]);
    let client = http1_client();
    const N: usize = 400;
    for i in 0..N {
        // Half without a body: a GET's copy is complete at once.
        let payload = if i % 2 == 0 { body("x") } else { empty() };
        let (status, _, echoed) =
            send(&client, mesh.request("echo", "/").body(payload).unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(echoed.unwrap().pod, "echo-v1-0");
    }
    // Copies are sent beside the requests: wait for the last ones.
    let settle = |want: usize| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        while mirror.count() < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    settle(N + N / 2 - 40).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The rule's mirror takes every request, the backend's half: 400 + ~200.
    let mirrored = mirror.count();
    assert!(
        (N + N / 2 - 40..=N + N / 2 + 40).contains(&mirrored),
        "{mirrored}"
    );
    // The fraction takes a quarter: ~100.
    let quarter = v2.count();
    assert!((60..=140).contains(&quarter), "{quarter}");

    // gRPC: the body streams over HTTP/2 and the mirror gets all of it.
    let before = mirror.count();
    let grpc = http2_client();
    let payload = vec![0u8; 5 + 20_000];
    let req = http::Request::post(format!("http://{}/proto.Echo/Echo", mesh.client.outbound()))
        .header("host", "echo:7070")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body(payload))
        .unwrap();
    let (status, headers, echoed) = send(&grpc, req).await;
    assert_eq!(
        (status.as_u16(), &headers["grpc-status"]),
        (200, &"0".parse().unwrap())
    );
    assert_eq!(echoed.unwrap().body_len, 20_005);
    settle(before + 1).await;
    assert_eq!(mirror.count(), before + 1);
    let text = mesh.client.metrics().await;
    assert!(
        !text.contains("trellis_mirrors_total{result=\"failed\"}"),
        "{text}"
    );
    assert!(
        text.contains("trellis_mirrors_total{result=\"sent\"}"),
        "{text}"
    );
}
