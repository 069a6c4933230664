//! The Kubernetes layer against kube's real client over a scripted API server
//! (`tower_test::mock`): every request is checked, every answer is what the API server sends.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

use super::*;
use crate::cert::{self, RENEW_BEFORE, VALIDITY};

const NS: &str = "trellis-system";
const NAME: &str = "trellis-injector-tls";
const SECRET_PATH: &str = "/api/v1/namespaces/trellis-system/secrets/trellis-injector-tls";
const SECRETS_PATH: &str = "/api/v1/namespaces/trellis-system/secrets";
const CONFIG_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/trellis-injector";

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn client() -> (kube::Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, NS), handle)
}

fn names() -> Vec<String> {
    cert::dns_names("trellis-injector", NS)
}

/// The next request, checked against the expected method and path, with its JSON body.
async fn expect(
    handle: &mut ApiHandle,
    method: Method,
    path: &str,
) -> (Value, SendResponse<Response<Body>>) {
    let (request, send) = handle.next_request().await.expect("a request to the API");
    assert_eq!((request.method(), request.uri().path()), (&method, path));
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (body, send)
}

fn respond(send: SendResponse<Response<Body>>, status: StatusCode, body: &impl serde::Serialize) {
    let bytes = serde_json::to_vec(body).unwrap();
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(bytes))
            .unwrap(),
    );
}

fn failure(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("secrets \"{NAME}\" {reason}"), "reason": reason, "code": code,
    })
}

fn secret(cert: &ServingCert, managed: bool, resource_version: &str) -> Secret {
    let mut secret = cert::to_secret(NAME, NS, cert);
    secret.metadata.resource_version = Some(resource_version.to_string());
    if !managed {
        secret.metadata.labels = None;
    }
    secret
}

/// A certificate generated long enough ago to be in its renewal window.
fn expiring() -> ServingCert {
    let issued = SystemTime::now() - (VALIDITY - RENEW_BEFORE + Duration::from_secs(3600));
    cert::generate(&names(), issued, None).unwrap()
}

/// Dropping the last client ends kube's buffer, after which the mock reports no more requests.
async fn assert_no_more_requests<K>(api: Api<K>, mut handle: ApiHandle) {
    drop(api);
    let next = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await;
    assert!(matches!(next, Ok(None)), "unexpected extra request");
}

#[tokio::test]
async fn creates_the_secret_when_missing() {
    let (client, mut handle) = client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::NOT_FOUND, &failure(404, "NotFound"));
        let (body, send) = expect(&mut handle, Method::POST, SECRETS_PATH).await;
        assert_eq!(
            body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "trellis-injector"
        );
        assert_eq!(body["type"], "kubernetes.io/tls");
        respond(send, StatusCode::CREATED, &body);
        (body, handle)
    });
    let (created, source) = load_or_create(&secrets, NS, NAME, &names(), SystemTime::now())
        .await
        .unwrap();
    let (body, handle) = server.await.unwrap();
    assert_eq!(source, Source::Created);
    let sent: Secret = serde_json::from_value(body).unwrap();
    assert_eq!(cert::from_secret(&sent).unwrap(), created);
    assert_no_more_requests(secrets, handle).await;
}

#[tokio::test]
async fn losing_the_creation_race_uses_the_winners_secret() {
    let winner = cert::generate(&names(), SystemTime::now(), None).unwrap();
    let winners_secret = secret(&winner, true, "1");
    let (client, mut handle) = client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::NOT_FOUND, &failure(404, "NotFound"));
        let (_, send) = expect(&mut handle, Method::POST, SECRETS_PATH).await;
        respond(send, StatusCode::CONFLICT, &failure(409, "AlreadyExists"));
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::OK, &winners_secret);
        handle
    });
    let (loaded, source) = load_or_create(&secrets, NS, NAME, &names(), SystemTime::now())
        .await
        .unwrap();
    let handle = server.await.unwrap();
    assert_eq!(source, Source::LostRace);
    assert_eq!(loaded, winner);
    assert_no_more_requests(secrets, handle).await;
}

#[tokio::test]
async fn a_valid_secret_is_loaded_as_is() {
    let current = cert::generate(&names(), SystemTime::now(), None).unwrap();
    let stored = secret(&current, true, "5");
    let (client, mut handle) = client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::OK, &stored);
        handle
    });
    let result = load_or_create(&secrets, NS, NAME, &names(), SystemTime::now()).await;
    let handle = server.await.unwrap();
    assert_eq!(result.unwrap(), (current, Source::Loaded));
    assert_no_more_requests(secrets, handle).await;
}

#[tokio::test]
async fn an_expiring_secret_is_renewed_on_the_version_read() {
    let old = expiring();
    let stored = secret(&old, true, "7");
    let (client, mut handle) = client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::OK, &stored);
        let (body, send) = expect(&mut handle, Method::PUT, SECRET_PATH).await;
        assert_eq!(body["metadata"]["resourceVersion"], "7");
        respond(send, StatusCode::OK, &body);
        (body, handle)
    });
    let (renewed, source) = load_or_create(&secrets, NS, NAME, &names(), SystemTime::now())
        .await
        .unwrap();
    let (body, handle) = server.await.unwrap();
    assert_eq!(
        source,
        Source::Renewed("it expires within 30 days".to_string())
    );
    assert_ne!(renewed.cert_pem, old.cert_pem);
    // The bundle trusts the new CA first and still the old one.
    assert!(renewed.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(renewed.ca_pem.ends_with(&old.ca_pem));
    let sent: Secret = serde_json::from_value(body).unwrap();
    assert_eq!(cert::from_secret(&sent).unwrap(), renewed);
    assert_no_more_requests(secrets, handle).await;
}

#[tokio::test]
async fn a_renewal_conflict_reloads_the_other_replicas_renewal() {
    let stored = secret(&expiring(), true, "7");
    let winner = cert::generate(&names(), SystemTime::now(), None).unwrap();
    let winners_secret = secret(&winner, true, "8");
    let (client, mut handle) = client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::OK, &stored);
        let (_, send) = expect(&mut handle, Method::PUT, SECRET_PATH).await;
        respond(send, StatusCode::CONFLICT, &failure(409, "Conflict"));
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::OK, &winners_secret);
        handle
    });
    let result = load_or_create(&secrets, NS, NAME, &names(), SystemTime::now()).await;
    let handle = server.await.unwrap();
    assert_eq!(result.unwrap(), (winner, Source::LostRace));
    assert_no_more_requests(secrets, handle).await;
}

#[tokio::test]
async fn a_secret_the_injector_did_not_create_is_never_overwritten() {
    let old = expiring();
    let usable = secret(&old, false, "3");
    let mut broken = secret(&old, false, "3");
    if let Some(data) = broken.data.as_mut() {
        data.insert(cert::TLS_KEY.to_string(), ByteString(b"garbage".to_vec()));
    }
    let (client, mut handle) = client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        for stored in [usable, broken] {
            let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
            respond(send, StatusCode::OK, &stored);
        }
        handle
    });
    let now = SystemTime::now();
    // Expiring but foreign: served as it is (with a warning), not replaced.
    let first = load_or_create(&secrets, NS, NAME, &names(), now)
        .await
        .unwrap();
    assert_eq!(first, (old, Source::Loaded));
    let second = load_or_create(&secrets, NS, NAME, &names(), now)
        .await
        .unwrap_err();
    let message = second.to_string();
    assert!(
        message.starts_with("Secret trellis-system/trellis-injector-tls exists but cannot be used"),
        "{message}"
    );
    assert!(
        message.ends_with("fix it, or delete it and the injector creates a new one"),
        "{message}"
    );
    let handle = server.await.unwrap();
    assert_no_more_requests(secrets, handle).await;
}

#[tokio::test]
async fn api_errors_are_reported() {
    let (client, mut handle) = client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::FORBIDDEN, &failure(403, "Forbidden"));
        handle
    });
    let error = load_or_create(&secrets, NS, NAME, &names(), SystemTime::now())
        .await
        .unwrap_err();
    assert!(matches!(error, ClusterError::Api(_)), "{error}");
    let handle = server.await.unwrap();
    assert_no_more_requests(secrets, handle).await;
}

fn configuration(ca_bundle: Option<&str>) -> MutatingWebhookConfiguration {
    MutatingWebhookConfiguration {
        metadata: kube::api::ObjectMeta {
            name: Some("trellis-injector".to_string()),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: "inject.trellis.dev".to_string(),
            admission_review_versions: vec!["v1".to_string()],
            side_effects: "None".to_string(),
            client_config: WebhookClientConfig {
                ca_bundle: ca_bundle.map(|b| ByteString(b.as_bytes().to_vec())),
                ..Default::default()
            },
            ..Default::default()
        }]),
    }
}

#[tokio::test]
async fn a_stale_ca_bundle_is_patched() {
    let ca = cert::generate(&names(), SystemTime::now(), None)
        .unwrap()
        .ca_pem;
    let current = configuration(Some("stale"));
    let (client, mut handle) = client();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    let expected_ca = ca.clone();
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, CONFIG_PATH).await;
        respond(send, StatusCode::OK, &current);
        let (request, send) = handle.next_request().await.unwrap();
        assert_eq!(
            (request.method(), request.uri().path()),
            (&Method::PATCH, CONFIG_PATH)
        );
        assert_eq!(
            request.headers()["content-type"],
            "application/json-patch+json"
        );
        let body: Value =
            serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
        let mut patched = serde_json::to_value(&current).unwrap();
        let ops: json_patch::Patch = serde_json::from_value(body).unwrap();
        json_patch::patch(&mut patched, &ops).unwrap();
        let fixed: MutatingWebhookConfiguration = serde_json::from_value(patched).unwrap();
        assert_eq!(cert::ca_bundle_patch(&fixed, &expected_ca), None);
        respond(send, StatusCode::OK, &fixed);
        handle
    });
    let result = sync_ca_bundle(&configs, "trellis-injector", &ca).await;
    let handle = server.await.unwrap();
    assert_eq!(result.unwrap(), CaBundle::Patched);
    assert_no_more_requests(configs, handle).await;
}

#[tokio::test]
async fn an_already_correct_ca_bundle_is_left_alone() {
    let ca = "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n";
    let current = configuration(Some(ca));
    let (client, mut handle) = client();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, CONFIG_PATH).await;
        respond(send, StatusCode::OK, &current);
        handle
    });
    let result = sync_ca_bundle(&configs, "trellis-injector", ca).await;
    let handle = server.await.unwrap();
    assert_eq!(result.unwrap(), CaBundle::AlreadyCurrent);
    assert_no_more_requests(configs, handle).await;
}

#[tokio::test]
async fn a_missing_configuration_is_reported_not_created() {
    let (client, mut handle) = client();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, CONFIG_PATH).await;
        respond(send, StatusCode::NOT_FOUND, &failure(404, "NotFound"));
        handle
    });
    let result = sync_ca_bundle(&configs, "trellis-injector", "ca").await;
    let handle = server.await.unwrap();
    assert_eq!(result.unwrap(), CaBundle::Missing);
    assert_no_more_requests(configs, handle).await;
}
