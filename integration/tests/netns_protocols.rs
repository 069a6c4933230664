//! Protocols that are not request/response HTTP, between pods in network namespaces with
//! interception (see `trellis_integration::netns`): bytes that are not HTTP sent to a Service
//! port that has HTTP routes reach one of its endpoints over the mutual TLS hop instead of being
//! dropped, and a server-first protocol on a port declared opaque (Service annotation for the
//! client's sidecar, `--opaque-ports` for the server's) answers without the detection delay.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use trellis_integration::netns::{Mesh, PodSpec, ServiceSpec, available};

const SERVER: &str = "server-0";
const CLIENT: &str = "client-0";

/// HTTP routes on both Services' ports: they route HTTP only.
const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mixed, namespace: proto}
spec:
  parentRefs: [{group: "", kind: Service, name: mixed, port: 80}]
  rules:
  - backendRefs: [{name: mixed, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: db, namespace: proto}
spec:
  parentRefs: [{group: "", kind: Service, name: db, port: 7000}]
  rules:
  - backendRefs: [{name: db, port: 7000}]
"#;

fn mesh() -> Mesh {
    // A long detection timeout makes a detection wait unmistakable.
    Mesh::builder(5)
        .pod(
            PodSpec::meshed(SERVER, "proto", "server")
                .tcp(7000)
                .tcp(7001)
                .proxy_flag("--detect-timeout", "2s")
                // As the injector sets it from the pod's `trellis.dev/opaque-ports: "7000"`.
                .proxy_flag("--opaque-ports", "7000"),
        )
        .pod(PodSpec::meshed(CLIENT, "proto", "client").proxy_flag("--detect-timeout", "2s"))
        .service(
            ServiceSpec::new("mixed", "proto")
                .port("data", 80, 7001)
                .endpoints(&[SERVER]),
        )
        .service(
            ServiceSpec::new("db", "proto")
                .port("db", 7000, 7000)
                .annotation("trellis.dev/opaque-ports", "7000")
                .endpoints(&[SERVER]),
        )
        .routes(ROUTES)
        .start()
}

#[test]
fn protocols_that_are_not_http_cross_the_mesh() {
    if !available() {
        return;
    }
    let mesh = mesh();
    let client = mesh.pod(CLIENT);
    let server_ip = mesh.pod(SERVER).ip;

    // A client-first protocol that is not HTTP (a TLS ClientHello would do the same) to a port
    // with HTTP routes: to the Service's endpoint, through both sidecars.
    let reply = client.tcp_first("mixed.proto:80", "PING not http\n");
    assert_eq!(reply.error, None, "{reply:?}\n{}", mesh.logs());
    assert!(
        reply.greeting.starts_with(&format!(
            "hello from {SERVER} to {server_ip}:7001 from 127.0.0.6:"
        )),
        "{reply:?}"
    );
    assert_eq!(reply.echo, "PING not http\n");

    // A server-first protocol on a declared opaque port: neither sidecar waits for the
    // client to speak (each would wait 2 s).
    let reply = client.tcp("db.proto:7000", "select 1");
    assert_eq!(reply.error, None, "{reply:?}");
    assert!(
        reply.greeting.starts_with("hello from server-0"),
        "{reply:?}"
    );
    assert_eq!(reply.echo, "select 1");
    assert!(
        reply.greeting_ms < 1500,
        "greeting after {} ms",
        reply.greeting_ms
    );

    // The same server-first protocol on a port nobody declared: it works, after detection
    // gave up waiting on both sidecars (2 s each).
    let reply = client.tcp("mixed.proto:80", "late");
    assert_eq!(reply.error, None, "{reply:?}");
    assert!(
        reply.greeting_ms >= 3500,
        "greeting after {} ms",
        reply.greeting_ms
    );
}
