//! The certify protocol between a proxy and identity, the mesh's certificate authority.
//!
//! A proxy generates a key pair, builds a PKCS#10 CSR whose only subject alternative name is
//! the URI of its [`Identity`](crate::Identity), and sends
//!
//! ```text
//! POST /v1/certify              (HTTPS, HTTP/2 or HTTP/1.1, port 8080)
//! content-type: application/json
//!
//! {"csr": "-----BEGIN CERTIFICATE REQUEST-----\n...", "token": "<projected service-account token>"}
//! ```
//!
//! The token travels in the body, not in an `Authorization` header: the request is one
//! self-contained document, and there is no second place a token could come from.
//!
//! A `200` carries a [`CertifyResponse`]; any other status carries a [`CertifyError`] whose
//! [`ErrorCode`] says what to do: fix the request (4xx) or retry later
//! ([`ErrorCode::is_retryable`]).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Path of the certify endpoint.
pub const CERTIFY_PATH: &str = "/v1/certify";
/// Port identity serves certify on.
pub const DEFAULT_PORT: u16 = 8080;
/// The audience of the projected service-account token a proxy sends; a token for any other
/// audience (such as the API server's) is refused, so a token stolen from elsewhere is useless.
pub const TOKEN_AUDIENCE: &str = "identity.trellis.dev";
/// Larger request bodies are refused: a CSR and a token fit in a few kilobytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What a workload sends to be certified.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertifyRequest {
    /// PEM `CERTIFICATE REQUEST`. Its only subject alternative name is the URI
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` of the token's service
    /// account; it asks for no basic constraints; its key is ECDSA P-256, ECDSA P-384 or
    /// Ed25519. Subject, key usages and other requested extensions are ignored: identity
    /// decides what the certificate contains.
    pub csr: String,
    /// The pod's projected service-account token for the audience [`TOKEN_AUDIENCE`] (in local
    /// mode, a token from identity's token file).
    pub token: String,
}

/// Keeps the token out of logs.
impl fmt::Debug for CertifyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifyRequest")
            .field("csr", &self.csr)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A signed certificate and what a peer needs to verify it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertifyResponse {
    /// The workload's certificate (PEM).
    pub certificate: String,
    /// The intermediate certificates (PEM), issuer first, that link `certificate` to a trust
    /// anchor. Roots are not included: peers already hold them as trust anchors.
    pub chain: Vec<String>,
    /// When `certificate` expires, in Unix seconds. Renew well before (the proxy renews at
    /// about 70 % of the lifetime).
    pub expires_at: u64,
}

impl CertifyResponse {
    /// The certificate followed by its chain: what a TLS endpoint presents.
    pub fn chain_pem(&self) -> String {
        let mut pem = self.certificate.clone();
        for cert in &self.chain {
            if !pem.is_empty() && !pem.ends_with('\n') {
                pem.push('\n');
            }
            pem.push_str(cert);
        }
        pem
    }
}

/// The body of every non-200 answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertifyError {
    /// What went wrong, for people: it names the value at fault and what was expected.
    pub error: String,
    /// What went wrong, for programs.
    pub code: ErrorCode,
}

impl CertifyError {
    pub fn new(code: ErrorCode, error: impl Into<String>) -> Self {
        CertifyError {
            error: error.into(),
            code,
        }
    }
}

impl fmt::Display for CertifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.error, self.code.as_str())
    }
}

impl std::error::Error for CertifyError {}

/// Machine-readable reason of a refusal. Each code has one HTTP status ([`ErrorCode::status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not a JSON [`CertifyRequest`], or is too large.
    BadRequest,
    /// 400: the CSR cannot be parsed, its signature is wrong, it asks for other names than
    /// the one SPIFFE URI, or it asks to be a CA.
    BadCsr,
    /// 400: the CSR's key type is not ECDSA P-256, ECDSA P-384 or Ed25519.
    UnsupportedKey,
    /// 401: the token is unknown, expired, for another audience, or not a service account's.
    BadToken,
    /// 403: the CSR asks for another identity than the token's service account.
    IdentityMismatch,
    /// 404: no such endpoint.
    NotFound,
    /// 405: certify takes `POST` only.
    MethodNotAllowed,
    /// 503: the token could not be checked (the API server is unreachable) or identity is not
    /// ready; retry with backoff.
    Unavailable,
    /// 500: signing failed; retry with backoff.
    Internal,
    /// A code this version does not know (a newer identity); treat as its HTTP status says.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadCsr => "bad_csr",
            ErrorCode::UnsupportedKey => "unsupported_key",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::IdentityMismatch => "identity_mismatch",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The HTTP status identity answers with.
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            ErrorCode::BadRequest | ErrorCode::BadCsr | ErrorCode::UnsupportedKey => {
                StatusCode::BAD_REQUEST
            }
            ErrorCode::BadToken => StatusCode::UNAUTHORIZED,
            ErrorCode::IdentityMismatch => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal | ErrorCode::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the same request may succeed later. A refused CSR or token will not: the
    /// caller has to change it (a new token is projected into the pod before the old expires).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::Unknown
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes() {
        let request: CertifyRequest =
            serde_json::from_str(r#"{"csr":"PEM","token":"secret"}"#).unwrap();
        assert_eq!(request.token, "secret");
        assert!(!format!("{request:?}").contains("secret"));

        let response = CertifyResponse {
            certificate: "LEAF\n".to_string(),
            chain: vec!["ISSUER\n".to_string()],
            expires_at: 1_700_000_000,
        };
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            serde_json::json!({"certificate": "LEAF\n", "chain": ["ISSUER\n"], "expires_at": 1_700_000_000u64})
        );
        assert_eq!(response.chain_pem(), "LEAF\nISSUER\n");

        let error = CertifyError::new(ErrorCode::IdentityMismatch, "no");
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"error":"no","code":"identity_mismatch"}"#
        );
    }

    #[test]
    fn codes_round_trip_and_unknown_codes_still_parse() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::BadCsr,
            ErrorCode::UnsupportedKey,
            ErrorCode::BadToken,
            ErrorCode::IdentityMismatch,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        let error: CertifyError =
            serde_json::from_str(r#"{"error":"x","code":"from_the_future"}"#).unwrap();
        assert_eq!(error.code, ErrorCode::Unknown);
        assert!(error.code.is_retryable());
    }

    #[test]
    fn statuses() {
        assert_eq!(ErrorCode::BadCsr.status(), 400);
        assert_eq!(ErrorCode::BadToken.status(), 401);
        assert_eq!(ErrorCode::IdentityMismatch.status(), 403);
        assert_eq!(ErrorCode::Unavailable.status(), 503);
        assert!(!ErrorCode::BadToken.is_retryable());
    }
}
