//! Token checks: the pure decision on a TokenReview, the token file, and the TokenReview call
//! through kube's real client against a scripted API server (`tower_test::mock`).

use std::collections::BTreeMap;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::authentication::v1::UserInfo;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use super::*;

const AUD: &str = "identity.trellis.dev";
const REVIEWS_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

fn status(authenticated: bool, audiences: &[&str], username: &str) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(authenticated),
        audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
        user: Some(UserInfo {
            username: Some(username.to_string()),
            extra: Some(BTreeMap::from([
                (EXTRA_POD_NAME.to_string(), vec!["web-7d9f".to_string()]),
                (EXTRA_POD_UID.to_string(), vec!["0b1c".to_string()]),
            ])),
            ..Default::default()
        }),
        error: None,
    }
}

/// The namespace and service account a review proves, or why not.
type Expected = Result<(&'static str, &'static str), TokenError>;

#[test]
fn review_decisions() {
    let web = "system:serviceaccount:shop:web";
    let unauthenticated = TokenReviewStatus {
        authenticated: Some(false),
        error: Some("token has been invalidated".into()),
        ..Default::default()
    };
    let cases: Vec<(&str, Option<TokenReviewStatus>, Expected)> = vec![
        (
            "a service account's token",
            Some(status(true, &[AUD], web)),
            Ok(("shop", "web")),
        ),
        (
            "one of several audiences",
            Some(status(true, &["https://kubernetes.default.svc", AUD], web)),
            Ok(("shop", "web")),
        ),
        (
            "a dotted service account name",
            Some(status(true, &[AUD], "system:serviceaccount:shop:web.v2")),
            Ok(("shop", "web.v2")),
        ),
        (
            "unauthenticated",
            Some(unauthenticated),
            Err(TokenError::Unauthenticated(
                "token has been invalidated".into(),
            )),
        ),
        (
            "authenticated missing",
            Some(TokenReviewStatus::default()),
            Err(TokenError::Unauthenticated("no reason given".into())),
        ),
        (
            "no status",
            None,
            Err(TokenError::Unauthenticated(
                "the review has no status".into(),
            )),
        ),
        (
            "wrong audience",
            Some(status(true, &["https://kubernetes.default.svc"], web)),
            Err(TokenError::WrongAudience {
                expected: AUD.into(),
                got: vec!["https://kubernetes.default.svc".into()],
            }),
        ),
        (
            "no audiences",
            Some(TokenReviewStatus {
                audiences: None,
                ..status(true, &[], web)
            }),
            Err(TokenError::WrongAudience {
                expected: AUD.into(),
                got: vec![],
            }),
        ),
        (
            "a user, not a service account",
            Some(status(true, &[AUD], "alice@example.com")),
            Err(TokenError::NotServiceAccount("alice@example.com".into())),
        ),
        (
            "a node",
            Some(status(true, &[AUD], "system:node:worker-1")),
            Err(TokenError::NotServiceAccount("system:node:worker-1".into())),
        ),
        (
            "no service account name",
            Some(status(true, &[AUD], "system:serviceaccount:shop")),
            Err(TokenError::NotServiceAccount(
                "system:serviceaccount:shop".into(),
            )),
        ),
        (
            "extra colon",
            Some(status(true, &[AUD], "system:serviceaccount:shop:web:x")),
            Err(TokenError::NotServiceAccount(
                "system:serviceaccount:shop:web:x".into(),
            )),
        ),
        (
            "invalid namespace",
            Some(status(true, &[AUD], "system:serviceaccount:Shop:web")),
            Err(TokenError::NotServiceAccount(
                "system:serviceaccount:Shop:web".into(),
            )),
        ),
    ];
    for (name, status, expected) in cases {
        let got = check_review(status.as_ref(), AUD);
        let got = got
            .as_ref()
            .map(|sa| (sa.namespace.as_str(), sa.name.as_str()))
            .map_err(Clone::clone);
        assert_eq!(got, expected, "{name}");
    }
    let bound = check_review(Some(&status(true, &[AUD], web)), AUD).unwrap();
    assert_eq!(bound.pod.as_deref(), Some("web-7d9f"));
    assert_eq!(
        bound.identity("cluster.local").to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
}

#[test]
fn codes() {
    assert_eq!(TokenError::Unknown.code(), ErrorCode::BadToken);
    assert_eq!(
        TokenError::Unavailable("x".into()).code(),
        ErrorCode::Unavailable
    );
}

#[test]
fn token_file() {
    let table = TokenTable::parse(
        "# local mode tokens\n\
         \n\
         web-token   shop web\n\
         \tadmin-token shop admin.v2  \n",
    )
    .unwrap();
    assert_eq!(table.len(), 2);
    assert_eq!(
        table.check("web-token"),
        Ok(ServiceAccount {
            namespace: "shop".into(),
            name: "web".into(),
            pod: None
        })
    );
    assert_eq!(table.check("admin-token").unwrap().name, "admin.v2");
    assert_eq!(table.check("nobody"), Err(TokenError::Unknown));
    assert_eq!(table.check(""), Err(TokenError::Empty));
    assert!(
        !format!("{table:?}").contains("web-token"),
        "tokens stay out of logs"
    );

    for (text, expected) in [
        (
            "a shop\n",
            "line 1: expected `token namespace serviceaccount`, found 2 fields",
        ),
        (
            "a shop web extra\n",
            "line 1: expected `token namespace serviceaccount`, found 4 fields",
        ),
        (
            "a Shop web\n",
            "line 1: \"Shop\" is not a valid namespace name",
        ),
        (
            "a shop we_b\n",
            "line 1: \"we_b\" is not a valid service account name",
        ),
        (
            "a shop web\n# c\na shop api\n",
            "line 3: this token is already listed on an earlier line",
        ),
        (
            "# nothing\n\n",
            "no tokens: every line is empty or a comment",
        ),
    ] {
        assert_eq!(
            TokenTable::parse(text).unwrap_err().to_string(),
            expected,
            "{text:?}"
        );
    }
}

#[test]
fn token_file_reloads_and_keeps_the_old_table_when_broken() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens");
    std::fs::write(&path, "t1 shop web\n").unwrap();
    let local = LocalTokens::load(&path).unwrap();
    assert_eq!(local.reload(), Ok(false));
    std::fs::write(&path, "t2 shop web\n").unwrap();
    assert_eq!(local.reload(), Ok(true));
    assert_eq!(local.table().check("t1"), Err(TokenError::Unknown));
    std::fs::write(&path, "t3 shop\n").unwrap();
    assert!(local.reload().is_err());
    assert!(local.table().check("t2").is_ok());
    assert!(LocalTokens::load(&dir.path().join("missing")).is_err());
}

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn reviewer() -> (TokenReviewer, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (
        TokenReviewer::new(kube::Client::new(service, "default"), AUD),
        handle,
    )
}

/// Answers the next TokenReview with `status` (HTTP) and `body`, returning what was asked.
async fn answer_review(handle: &mut ApiHandle, code: StatusCode, body: Value) -> Value {
    let (request, send) = handle.next_request().await.expect("a TokenReview");
    assert_eq!(
        (request.method(), request.uri().path()),
        (&Method::POST, REVIEWS_PATH)
    );
    let asked: Value =
        serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
    let mut answer = body;
    if code.is_success() {
        answer["spec"] = asked["spec"].clone();
    }
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&answer).unwrap()))
            .unwrap(),
    );
    asked
}

fn review_answer(status: Value) -> Value {
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {}, "status": status})
}

#[tokio::test]
async fn token_review_through_the_api() {
    let (reviewer, mut handle) = reviewer();
    let server = tokio::spawn(async move {
        let asked = answer_review(
            &mut handle,
            StatusCode::CREATED,
            review_answer(json!({
                "authenticated": true,
                "audiences": [AUD],
                "user": {
                    "username": "system:serviceaccount:shop:web",
                    "extra": {EXTRA_POD_NAME: ["web-0"], EXTRA_POD_UID: ["1234"]},
                },
            })),
        )
        .await;
        (asked, handle)
    });
    let account = reviewer.review("the-token").await.unwrap();
    let (asked, _handle) = server.await.unwrap();
    assert_eq!(
        asked["spec"],
        json!({"token": "the-token", "audiences": [AUD]})
    );
    assert_eq!(
        (account.namespace.as_str(), account.name.as_str()),
        ("shop", "web")
    );
    assert_eq!(account.pod.as_deref(), Some("web-0"));
}

#[tokio::test]
async fn unauthenticated_review_is_refused() {
    let (reviewer, mut handle) = reviewer();
    let server = tokio::spawn(async move {
        answer_review(
            &mut handle,
            StatusCode::CREATED,
            review_answer(json!({
                "authenticated": false,
                "error": "pod \"web-0\" not found",
            })),
        )
        .await;
        handle
    });
    let err = reviewer.review("stale").await.unwrap_err();
    let _handle = server.await.unwrap();
    assert_eq!(
        err,
        TokenError::Unauthenticated("pod \"web-0\" not found".into())
    );
    assert_eq!(err.code(), ErrorCode::BadToken);
}

#[tokio::test]
async fn an_api_error_is_unavailable_not_a_bad_token() {
    let (reviewer, mut handle) = reviewer();
    let server = tokio::spawn(async move {
        answer_review(
            &mut handle,
            StatusCode::FORBIDDEN,
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "tokenreviews.authentication.k8s.io is forbidden", "reason": "Forbidden",
                "code": 403,
            }),
        )
        .await;
        handle
    });
    let err = reviewer.review("t").await.unwrap_err();
    let _handle = server.await.unwrap();
    assert!(
        matches!(&err, TokenError::Unavailable(m) if m.contains("forbidden")),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::Unavailable);
}

#[tokio::test]
async fn an_empty_token_is_not_sent() {
    let (reviewer, _handle) = reviewer();
    assert_eq!(reviewer.review("").await, Err(TokenError::Empty));
}
