//! The Secret layer against kube's real client over a scripted API server, including the
//! creation race between replicas.

use http::{Method, StatusCode};

use super::*;
use crate::test_support::{assert_no_more_requests, expect, failure, mock_client, pki, respond};

const NS: &str = "trellis-system";
const NAME: &str = "trellis-identity-issuer";
const SECRET_PATH: &str = "/api/v1/namespaces/trellis-system/secrets/trellis-identity-issuer";
const SECRETS_PATH: &str = "/api/v1/namespaces/trellis-system/secrets";

fn stored(material: &Material, resource_version: &str) -> Secret {
    let mut secret = material_to_secret(NS, NAME, material);
    secret.metadata.resource_version = Some(resource_version.to_string());
    secret
}

#[test]
fn conversions() {
    let (material, _) = pki();
    let secret = material_to_secret(NS, NAME, &material);
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(secret_to_material(&secret), Ok(material.clone()));

    let mut missing = secret.clone();
    missing.data.as_mut().unwrap().remove(TLS_KEY);
    assert_eq!(
        secret_to_material(&missing),
        Err("it has no tls.key".to_string())
    );
    let mut binary = secret.clone();
    binary
        .data
        .as_mut()
        .unwrap()
        .insert(CA_CRT.into(), ByteString(vec![0xff, 0xfe]));
    assert_eq!(
        secret_to_material(&binary),
        Err("its ca.crt is not PEM text".to_string())
    );
    let mut empty = secret;
    empty
        .data
        .as_mut()
        .unwrap()
        .insert(TLS_CRT.into(), ByteString(b"\n".to_vec()));
    assert_eq!(
        secret_to_material(&empty),
        Err("its tls.crt is empty".to_string())
    );
}

#[tokio::test]
async fn creates_the_secret_when_missing() {
    let (material, _) = pki();
    let (client, mut handle) = mock_client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::NOT_FOUND, &failure(404, "NotFound"));
        let (body, send) = expect(&mut handle, Method::POST, SECRETS_PATH).await;
        respond(send, StatusCode::CREATED, &body);
        (body, handle)
    });
    let fresh = material.clone();
    let (got, outcome) = create_or_load(&secrets, NS, NAME, || Ok(fresh))
        .await
        .unwrap();
    let (body, handle) = server.await.unwrap();
    assert_eq!(outcome, Outcome::Created);
    assert_eq!(got, material);
    assert_eq!(body["type"], "kubernetes.io/tls");
    assert_eq!(body["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
    let sent: Secret = serde_json::from_value(body).unwrap();
    assert_eq!(secret_to_material(&sent), Ok(material));
    drop(secrets);
    assert_no_more_requests(handle).await;
}

#[tokio::test]
async fn losing_the_creation_race_uses_the_winners_secret() {
    let (winner, _) = pki();
    let (ours, _) = pki();
    let winners_secret = stored(&winner, "7");
    let (client, mut handle) = mock_client();
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
    let (got, outcome) = create_or_load(&secrets, NS, NAME, || Ok(ours))
        .await
        .unwrap();
    let handle = server.await.unwrap();
    assert_eq!(outcome, Outcome::LostRace);
    assert_eq!(got, winner);
    drop(secrets);
    assert_no_more_requests(handle).await;
}

#[tokio::test]
async fn an_existing_secret_is_loaded_without_generating() {
    let (material, _) = pki();
    let existing = stored(&material, "3");
    let (client, mut handle) = mock_client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::OK, &existing);
        handle
    });
    let (got, outcome) = create_or_load(&secrets, NS, NAME, || {
        panic!("must not generate when the Secret exists")
    })
    .await
    .unwrap();
    let handle = server.await.unwrap();
    assert_eq!((got, outcome), (material, Outcome::Loaded));
    drop(secrets);
    assert_no_more_requests(handle).await;
}

#[tokio::test]
async fn an_unusable_secret_is_an_error_naming_it() {
    let mut broken = material_to_secret(NS, NAME, &pki().0);
    broken.data.as_mut().unwrap().remove(CA_CRT);
    let (client, mut handle) = mock_client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::OK, &broken);
        handle
    });
    let err = read(&secrets, NS, NAME).await.unwrap_err();
    let _handle = server.await.unwrap();
    assert_eq!(
        err.to_string(),
        "Secret trellis-system/trellis-identity-issuer: it has no ca.crt"
    );
}

#[tokio::test]
async fn replace_names_the_version_and_reports_a_conflict() {
    let (material, _) = pki();
    let (client, mut handle) = mock_client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (body, send) = expect(&mut handle, Method::PUT, SECRET_PATH).await;
        assert_eq!(body["metadata"]["resourceVersion"], "5");
        respond(send, StatusCode::CONFLICT, &failure(409, "Conflict"));
        handle
    });
    let err = replace(&secrets, NS, NAME, &material, Some("5".into()))
        .await
        .unwrap_err();
    let _handle = server.await.unwrap();
    assert!(matches!(err, SecretError::Conflict(_)), "{err}");
}
