//! Builders shared by the unit tests: a fresh PKI and CSRs shaped as each test needs.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

use crate::bootstrap;
use crate::ca::{Authority, Material};

pub const TD: &str = "cluster.local";
pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub const DAY: Duration = Duration::from_secs(86400);

/// A root and an issuer, and the root's key PEM (to sign further issuers).
pub fn pki() -> (Material, String) {
    bootstrap::generate(TD, 3650 * DAY, 365 * DAY, SystemTime::now()).unwrap()
}

pub fn authority(material: &Material) -> Authority {
    Authority::new(material, TD, DAY, SystemTime::now()).unwrap()
}

pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// A CSR with these names, signed by `key`, after `customize` had its say.
pub fn csr_with(
    names: Vec<SanType>,
    key: &KeyPair,
    customize: impl FnOnce(&mut CertificateParams),
) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = names;
    customize(&mut params);
    params.serialize_request(key).unwrap().pem().unwrap()
}

/// A well-formed P-256 CSR for `uri_text`, and its key.
pub fn csr_for(uri_text: &str) -> (String, KeyPair) {
    let key = KeyPair::generate().unwrap();
    (csr_with(vec![uri(uri_text)], &key, |_| {}), key)
}

/// A kube client whose API server is the returned handle (`tower_test::mock`).
pub type ApiHandle =
    tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;

pub fn mock_client() -> (kube::Client, ApiHandle) {
    let (service, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    (kube::Client::new(service, "trellis-system"), handle)
}

/// The next request, checked against the expected method and path, with its JSON body.
pub async fn expect(
    handle: &mut ApiHandle,
    method: http::Method,
    path: &str,
) -> (
    serde_json::Value,
    tower_test::mock::SendResponse<http::Response<kube::client::Body>>,
) {
    let (request, send) = handle.next_request().await.expect("a request to the API");
    assert_eq!((request.method(), request.uri().path()), (&method, path));
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (body, send)
}

pub fn respond(
    send: tower_test::mock::SendResponse<http::Response<kube::client::Body>>,
    status: http::StatusCode,
    body: &impl serde::Serialize,
) {
    let bytes = serde_json::to_vec(body).unwrap();
    send.send_response(
        http::Response::builder()
            .status(status)
            .body(kube::client::Body::from(bytes))
            .unwrap(),
    );
}

/// An API `Status` failure as the API server sends it.
pub fn failure(code: u16, reason: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("secrets \"trellis-identity-issuer\" {reason}"), "reason": reason, "code": code,
    })
}

/// Dropping the last client ends kube's buffer, after which the mock sees no more requests.
pub async fn assert_no_more_requests(mut handle: ApiHandle) {
    let next = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await;
    assert!(matches!(next, Ok(None)), "unexpected extra request");
}
