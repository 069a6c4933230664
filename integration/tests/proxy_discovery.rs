//! The proxy's discovery client against the real `trellis-controller` in local mode: compiled
//! policies by address and by name, edits, outages and reconnects, refused destinations, idle
//! destinations, and one connection for every destination.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod proxy_discovery_support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_discovery_support::{
    Relay, client, eventually, is_web_service, metric, policy_where, prefixes, write,
};
use trellis_api::discovery::Target;
use trellis_api::policy::OutboundPolicy;
use trellis_integration::manifests::{SERVICE, route};
use trellis_integration::{Controller, Process, binary};
use trellis_proxy::policy::{PolicyKind, Routing, Target as BackendTarget};

const WAIT: Duration = Duration::from_secs(5);
const IDLE: Duration = Duration::from_secs(60);

fn target(s: &str) -> Target {
    s.parse().unwrap()
}

#[tokio::test]
async fn service_policies_by_address_and_name_follow_edits_over_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", SERVICE);
    let controller = Controller::start(dir.path());
    let relay = Relay::start(controller.addr).await;
    let (discovery, registry) = client(&relay.addr.to_string(), "shop", IDLE);

    let mut by_ip = discovery.subscribe(&target("10.96.0.10:80"));
    let mut by_name = discovery.subscribe(&target("web.shop:80"));
    for sub in [&mut by_ip, &mut by_name] {
        let policy = sub.wait(WAIT).await.expect("no policy from the controller");
        assert!(is_web_service(&policy), "{policy:?}");
        // Compiled: the Service's own endpoints, with their expected identity.
        let PolicyKind::Service(svc) = &policy.kind else {
            unreachable!()
        };
        let Routing::Passthrough(backend) = &svc.routing else {
            panic!("expected passthrough: {policy:?}");
        };
        let BackendTarget::Service { balancer, .. } = &backend.target else {
            panic!("expected the Service as backend: {policy:?}");
        };
        let endpoints: Vec<_> = balancer
            .endpoints()
            .iter()
            .map(|e| {
                (
                    e.addr.to_string(),
                    e.identity.as_ref().map(ToString::to_string),
                )
            })
            .collect();
        let meshed = Some("spiffe://cluster.local/ns/shop/sa/web".to_string());
        assert_eq!(endpoints, [("10.1.0.5:8080".to_string(), meshed)]);
    }
    // Asking again shares the destination's stream and its policy.
    let again = discovery.subscribe(&target("10.96.0.10:80"));
    assert!(Arc::ptr_eq(
        &again.current().unwrap(),
        &by_ip.current().unwrap()
    ));

    let start = Instant::now();
    write(dir.path(), "route.yaml", &route("/api"));
    for sub in [&mut by_ip, &mut by_name] {
        let routed = policy_where(sub, Duration::from_secs(1), "the /api route", |p| {
            prefixes(p).is_some()
        })
        .await;
        assert_eq!(prefixes(&routed).unwrap(), [r#"Prefix("/api")"#]);
        assert!(
            matches!(&routed.kind, PolicyKind::Service(s) if matches!(s.routing, Routing::Http(_)))
        );
    }
    eprintln!("edit applied after {:?}", start.elapsed());

    assert_eq!(
        relay.count(),
        1,
        "every destination must share one connection"
    );
    assert_eq!(metric(&registry, "trellis_discovery_streams"), Some(2.0));
    assert_eq!(metric(&registry, "trellis_discovery_connected"), Some(1.0));
    assert_eq!(
        metric(&registry, "trellis_discovery_reconnects_total"),
        Some(0.0)
    );
    let applied = r#"trellis_discovery_updates_total{result="applied"}"#;
    assert_eq!(metric(&registry, applied), Some(4.0));
    let invalid = r#"trellis_discovery_updates_total{result="invalid"}"#;
    assert_eq!(metric(&registry, invalid), Some(0.0));
    let stamp = metric(&registry, "trellis_discovery_last_update_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - stamp).abs() < 10.0, "{stamp} vs {now}");

    let snapshot = discovery.snapshot();
    let targets: Vec<&str> = snapshot.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(targets, ["10.96.0.10:80", "web.shop:80"]);
    assert!(
        snapshot
            .iter()
            .all(|(_, p)| matches!(p, Some(OutboundPolicy::Service(_))))
    );
}

#[tokio::test]
async fn keeps_the_last_policy_while_the_controller_is_down_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", SERVICE);
    let mut controller = Controller::start(dir.path());
    let addr = controller.addr;
    let (discovery, registry) = client(&addr.to_string(), "shop", IDLE);
    let mut sub = discovery.subscribe(&target("10.96.0.10:80"));
    let before = sub.wait(WAIT).await.expect("no first policy");
    assert!(
        is_web_service(&before) && prefixes(&before).is_none(),
        "{before:?}"
    );

    controller.process.kill();
    eventually("the client to notice", WAIT, || {
        metric(&registry, "trellis_discovery_connected") == Some(0.0)
    })
    .await;
    // Edited while the controller is down: nobody can tell the proxy yet.
    write(dir.path(), "route.yaml", &route("/v2"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        Arc::ptr_eq(&sub.current().unwrap(), &before),
        "the last policy must stay"
    );
    assert!(matches!(
        discovery.snapshot()[0].1,
        Some(OutboundPolicy::Service(_))
    ));

    // Back on the same port: the client reconnects by itself and gets the new state.
    let _controller = Controller::start_on(dir.path(), addr);
    let after = policy_where(&mut sub, WAIT, "the /v2 route", |p| prefixes(p).is_some()).await;
    assert_eq!(prefixes(&after).unwrap(), [r#"Prefix("/v2")"#]);
    assert_eq!(metric(&registry, "trellis_discovery_connected"), Some(1.0));
    assert_eq!(
        metric(&registry, "trellis_discovery_reconnects_total"),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_refused_destination_harms_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", SERVICE);
    let controller = Controller::start(dir.path());
    let relay = Relay::start(controller.addr).await;

    // Not a namespace name: the controller answers 400 for every destination.
    let (refused, refused_registry) = client(&relay.addr.to_string(), "Not_A_Namespace", IDLE);
    let mut bad = refused.subscribe(&target("web.shop:80"));
    assert!(bad.wait(Duration::from_secs(1)).await.is_none());
    assert_eq!(refused.snapshot(), [("web.shop:80".to_string(), None)]);
    // The connection stays up and usable: a 400 is about one stream, not the connection.
    let invalid = r#"trellis_discovery_updates_total{result="invalid"}"#;
    assert_eq!(metric(&refused_registry, invalid), Some(0.0));
    assert_eq!(
        metric(&refused_registry, "trellis_discovery_connected"),
        Some(1.0)
    );

    // Another client of the same controller is unaffected.
    let (good, _registry) = client(&relay.addr.to_string(), "shop", IDLE);
    let mut sub = good.subscribe(&target("web.shop:80"));
    assert!(is_web_service(&sub.wait(WAIT).await.unwrap()));
    assert_eq!(relay.count(), 2);
    assert!(bad.current().is_none());
}

/// The address in a `listening on ADDR` log line.
fn listening_addr(line: &str) -> SocketAddr {
    let addr = line.rsplit("listening on ").next().unwrap();
    let addr: String = addr.chars().take_while(|c| !c.is_whitespace()).collect();
    addr.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_destinations_are_dropped_and_their_streams_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", SERVICE);
    let mut cmd = Command::new(binary("trellis-controller"));
    cmd.arg("serve")
        .arg("--manifests")
        .arg(dir.path())
        .args(["--discovery-addr", "127.0.0.1:0"])
        .env_remove("TRELLIS_TRUST_DOMAIN")
        .env_remove("TRELLIS_CLUSTER_DOMAIN")
        .env("TRELLIS_LOG", "info,trellis_controller::discovery=debug");
    let controller = Arc::new(Process::spawn(cmd));
    let addr = listening_addr(&controller.wait_for_log("listening on", WAIT));
    let idle = Duration::from_secs(1);
    let (discovery, registry) = client(&addr.to_string(), "shop", idle);
    let t = target("10.96.0.10:80");

    let mut sub = discovery.subscribe(&t);
    sub.wait(WAIT).await.expect("no policy");
    let opened = {
        let c = controller.clone();
        tokio::task::spawn_blocking(move || c.wait_for_log("discovery stream opened", WAIT))
    };
    opened.await.unwrap();

    // A subscription alive keeps the destination however long it lasts.
    tokio::time::sleep(idle * 2).await;
    assert_eq!(discovery.snapshot().len(), 1);

    // Each new subscription restarts the idle time.
    drop(sub);
    tokio::time::sleep(idle * 3 / 5).await;
    drop(discovery.subscribe(&t));
    tokio::time::sleep(idle * 3 / 5).await;
    assert_eq!(discovery.snapshot().len(), 1, "dropped before it was idle");
    assert_eq!(metric(&registry, "trellis_discovery_streams"), Some(1.0));

    // Unused for `idle`: dropped, and its stream cancelled at the controller.
    eventually("the idle destination to go", Duration::from_secs(2), || {
        discovery.snapshot().is_empty()
    })
    .await;
    assert_eq!(metric(&registry, "trellis_discovery_streams"), Some(0.0));
    let closed = {
        let c = controller.clone();
        tokio::task::spawn_blocking(move || c.wait_for_log("discovery stream closed", WAIT))
    };
    closed.await.unwrap();

    // Asked again, it starts anew.
    let mut sub = discovery.subscribe(&t);
    assert!(is_web_service(&sub.wait(WAIT).await.unwrap()));
    assert_eq!(metric(&registry, "trellis_discovery_streams"), Some(1.0));
}
