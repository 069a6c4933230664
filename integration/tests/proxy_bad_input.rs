//! Bad input at a real sidecar: each case gets a clear answer or a closed connection, the
//! sidecar keeps serving, and nothing panics.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use trellis_integration::{Controller, Echo, Sidecar};

fn ip(block: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, block, host))
}

const CLUSTER: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ['127.0.41.11'], conditions: {ready: true}}
";

/// Sends raw bytes and returns everything the sidecar answers until it closes or goes quiet.
fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if out.windows(4).any(|w| w == b"\r\n\r\n") && !out.starts_with(b"HTTP/1.1 100") {
            // A full head is enough for these checks; bodies are short.
            std::thread::sleep(Duration::from_millis(50));
            if let Ok(n) = s.read(&mut buf) {
                out.extend_from_slice(&buf[..n]);
            }
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn get(addr: SocketAddr, host: &str, path: &str) -> String {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_answers_and_the_sidecar_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
    let controller = Controller::start(dir.path());
    let _app = Echo::start(SocketAddr::new(ip(41, 11), 8080), "web-0").await;
    let sidecar = Sidecar::start(
        ip(41, 9),
        "shop",
        controller.addr,
        &["--max-header-bytes", "8192"],
    );
    let out = sidecar.outbound();

    // Blocking socket I/O below runs on a blocking thread so the echo app keeps running.
    let cases = tokio::task::spawn_blocking(move || {
        let ok = get(out, "web", "/");
        let huge = raw(
            out,
            format!(
                "GET / HTTP/1.1\r\nhost: web\r\nx-big: {}\r\n\r\n",
                "a".repeat(20_000)
            )
            .as_bytes(),
        );
        let malformed = raw(out, b"GET / HTTP/1.1\r\nhost web\r\n\r\n");
        let no_host = raw(out, b"GET / HTTP/1.0\r\n\r\n");
        let unknown = get(out, "no-such-service.invalid", "/");
        // A client that sends half a body and resets.
        {
            let mut s = TcpStream::connect(out).unwrap();
            s.write_all(b"POST / HTTP/1.1\r\nhost: web\r\ncontent-length: 100000\r\n\r\npartial")
                .unwrap();
            drop(s);
        }
        let after = get(out, "web", "/");
        (ok, huge, malformed, no_host, unknown, after)
    })
    .await
    .unwrap();
    let (ok, huge, malformed, no_host, unknown, after) = cases;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(huge.starts_with("HTTP/1.1 431"), "{huge}");
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    assert!(
        no_host.starts_with("HTTP/1.1 400") || no_host.starts_with("HTTP/1.0 400"),
        "{no_host}"
    );
    assert!(unknown.starts_with("HTTP/1.1 502"), "{unknown}");
    assert!(unknown.contains("trellis-proxy-error"), "{unknown}");
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");
    let metrics = sidecar.metrics().await;
    assert!(
        metrics
            .contains("trellis_proxy_errors_total{direction=\"outbound\",reason=\"bad_request\"}"),
        "{metrics}"
    );
    assert!(
        !sidecar.process.log().contains("panicked"),
        "{}",
        sidecar.process.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_controller_requests_fail_with_a_clear_503_in_bounded_time() {
    // Nothing listens on this port: the controller is unreachable.
    let nowhere = SocketAddr::new(ip(42, 1), 9);
    let sidecar = Sidecar::start(ip(42, 9), "shop", nowhere, &["--discovery-wait", "300ms"]);
    let out = sidecar.outbound();
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || get(out, "web", "/"))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("no policy"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_is_copied_both_ways_with_half_close() {
    // A TCP echo app that answers after the client half-closes (reads to EOF first).
    let app = tokio::net::TcpListener::bind(SocketAddr::new(ip(43, 11), 5432))
        .await
        .unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = app.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(b"echo:").await.unwrap();
        s.write_all(&got).await.unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x.yaml"), "").unwrap();
    let controller = Controller::start(dir.path());
    // The inbound side of a pod: a redirect-free connection names its port with the preamble,
    // as another sidecar would; 5432 is an opaque (server-speaks-first) port.
    let sidecar = Sidecar::start(ip(43, 11), "db", controller.addr, &[]);
    let inbound = SocketAddr::new(sidecar.ip, 4143);
    let reply = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(inbound).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"TRELLIS/1 5432\r\n").unwrap();
        s.write_all(b"select 1").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert_eq!(reply, "echo:select 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn await_ready_returns_once_the_sidecar_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x.yaml"), "").unwrap();
    let controller = Controller::start(dir.path());
    let sidecar = Sidecar::start(ip(44, 9), "shop", controller.addr, &[]);
    let wait = |addr: SocketAddr| {
        std::process::Command::new(trellis_integration::binary("trellis-proxy"))
            .args([
                "await-ready",
                "--admin-addr",
                &addr.to_string(),
                "--timeout",
                "2s",
            ])
            .status()
            .unwrap()
    };
    let admin = sidecar.admin();
    let (ready, absent) =
        tokio::task::spawn_blocking(move || (wait(admin), wait(SocketAddr::new(ip(44, 10), 4191))))
            .await
            .unwrap();
    assert!(ready.success());
    assert_eq!(absent.code(), Some(1));
}
