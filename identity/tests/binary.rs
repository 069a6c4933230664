//! The real `trellis-identity` binary: `bootstrap` to files is idempotent, and `serve` in local
//! mode certifies over HTTPS, reloads a renewed issuer, exposes metrics and stops on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use trellis_api::certify::CertifyResponse;

use common::{Version, WEB, certify, csr, uri, verify_answer};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-identity");

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        Pki {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap()
    }
    fn material_args(&self) -> Vec<String> {
        [
            ("--trust-anchors", "ca.crt"),
            ("--issuer-cert", "tls.crt"),
            ("--issuer-key", "tls.key"),
        ]
        .iter()
        .flat_map(|(flag, file)| [flag.to_string(), self.path(file).display().to_string()])
        .collect()
    }
    fn bootstrap(&self, extra: &[&str]) -> Output {
        Command::new(BIN)
            .arg("bootstrap")
            .args(self.material_args())
            .args(extra)
            .env_clear()
            .output()
            .unwrap()
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bootstrap_to_files_is_idempotent() {
    let pki = Pki::new();
    let first = pki.bootstrap(&[]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("created a new trust anchor and issuer"));
    let files = ["ca.crt", "tls.crt", "tls.key"].map(|f| pki.read(f));

    let second = pki.bootstrap(&[]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(stderr(&second).contains("already present and usable"));
    assert_eq!(["ca.crt", "tls.crt", "tls.key"].map(|f| pki.read(f)), files);

    // A settings mistake exits 2 and names the flag.
    let bad = pki.bootstrap(&["--renew-issuer"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("--renew-issuer: needs --root-key"),
        "{}",
        stderr(&bad)
    );
    // A broken issuer is an error, not silently replaced.
    std::fs::write(pki.path("tls.key"), "garbage").unwrap();
    let broken = pki.bootstrap(&[]);
    assert_eq!(broken.status.code(), Some(1));
    assert!(
        stderr(&broken).contains("fix or remove them"),
        "{}",
        stderr(&broken)
    );
    assert_eq!(pki.read("tls.key"), "garbage");
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Plain HTTP/1.1 GET on the admin port: (status, body), or None while it does not answer.
fn admin_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

struct Serving {
    child: Child,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(pki: &Pki, tokens: &Path, certify_addr: SocketAddr, admin_addr: SocketAddr) -> Serving {
    let child = Command::new(BIN)
        .arg("serve")
        .args(pki.material_args())
        .env_clear()
        // Everything else from the environment, as the chart sets it.
        .env("TRELLIS_CERTIFY_ADDR", certify_addr.to_string())
        .env("TRELLIS_ADMIN_ADDR", admin_addr.to_string())
        .env("TRELLIS_TOKEN_FILE", tokens)
        .env("TRELLIS_RELOAD_INTERVAL", "200ms")
        .env("TRELLIS_CERT_LIFETIME", "1h")
        .env("TRELLIS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Serving { child }
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_in_local_mode() {
    let pki = Pki::new();
    let root_key = pki.path("root.key").display().to_string();
    let created = pki.bootstrap(&["--root-key", &root_key]);
    assert!(created.status.success(), "{}", stderr(&created));
    let tokens = pki.path("tokens");
    std::fs::write(&tokens, "# local mode\nweb-token shop web\n").unwrap();
    let anchors = pki.read("ca.crt");

    let (certify_addr, admin_addr) = (free_port(), free_port());
    let mut serving = serve(&pki, &tokens, certify_addr, admin_addr);
    wait_until("/ready", || {
        matches!(admin_get(admin_addr, "/ready"), Some((200, _)))
    })
    .await;
    assert_eq!(admin_get(admin_addr, "/live").map(|r| r.0), Some(200));

    let (pem, key) = csr(vec![uri(WEB)], |_| {});
    let (status, body) = certify(certify_addr, &anchors, Version::Http2, &pem, "web-token").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer: CertifyResponse = serde_json::from_slice(&body).unwrap();
    verify_answer(&answer, &anchors, WEB, &key);
    assert_eq!(answer.chain, vec![pki.read("tls.crt")]);

    let (status, _) = certify(certify_addr, &anchors, Version::Http1, &pem, "nope").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Renew the issuer under the same root while identity runs: it is picked up without a
    // restart, and both certificates verify against the unchanged anchors.
    let renewed = pki.bootstrap(&["--root-key", &root_key, "--renew-issuer"]);
    assert!(renewed.status.success(), "{}", stderr(&renewed));
    assert_eq!(pki.read("ca.crt"), anchors);
    let new_issuer = pki.read("tls.crt");
    assert_ne!(vec![new_issuer.clone()], answer.chain);
    let mut latest = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while latest.is_none() {
        assert!(
            Instant::now() < deadline,
            "the renewed issuer was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, body) = certify(certify_addr, &anchors, Version::Http2, &pem, "web-token").await;
        let next: CertifyResponse = serde_json::from_slice(&body).unwrap();
        if next.chain == vec![new_issuer.clone()] {
            latest = Some(next);
        }
    }
    verify_answer(&latest.unwrap(), &anchors, WEB, &key);
    verify_answer(&answer, &anchors, WEB, &key);

    let (_, metrics) = admin_get(admin_addr, "/metrics").unwrap();
    for line in [
        "trellis_identity_certify_rejected_total{reason=\"bad_token\"} 1",
        "trellis_identity_issuer_reloads_total{result=\"applied\"} 1",
        "trellis_identity_issuer_expiry_timestamp_seconds ",
        "trellis_identity_certify_duration_seconds_count ",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert!(!metrics.contains("trellis_identity_certificates_issued_total 0"));

    // SIGTERM: not ready, drained, exit 0.
    let pid = serving.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = serving.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "identity did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}

#[test]
fn serve_refuses_bad_settings_with_the_flag_to_fix() {
    let pki = Pki::new();
    let output = Command::new(BIN)
        .args(["serve", "--token-file", "t"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--issuer-secret: say where"),
        "{}",
        stderr(&output)
    );

    // Files that do not exist: a clear error at start, exit 1.
    let output = Command::new(BIN)
        .arg("serve")
        .args(pki.material_args())
        .args([
            "--token-file",
            "t",
            "--certify-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("cannot read the trust anchors and issuer"),
        "{}",
        stderr(&output)
    );
}
