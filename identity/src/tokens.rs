//! Who is asking: a token turned into the namespace and service account it proves.
//!
//! In a cluster the API server decides, through a TokenReview; [`check_review`] is the pure
//! decision on its answer and [`TokenReviewer`] the thin layer that asks. In local mode a
//! token file maps tokens to service accounts ([`TokenTable`]).
//!
//! Bound tokens: a projected token is bound to its pod, and names it in the review's
//! `user.extra` (`authentication.kubernetes.io/pod-name`, `.../pod-uid`). The API server only
//! answers `authenticated: true` for such a token while that pod (with that UID) still exists,
//! so a token copied out of a deleted pod is refused without identity looking the pod up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use trellis_api::Identity;
use trellis_api::certify::ErrorCode;

/// A TokenReview that takes longer is answered 503, and the proxy retries.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// The prefix of every service account's user name.
const SA_PREFIX: &str = "system:serviceaccount:";
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// A workload's service account, as a token proved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    /// The pod a bound token belongs to, for logs.
    pub pod: Option<String>,
}

impl ServiceAccount {
    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &self.namespace, &self.name)
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is empty")]
    Empty,
    #[error("the token is unknown")]
    Unknown,
    #[error("the API server did not authenticate the token: {0}")]
    Unauthenticated(String),
    #[error(
        "the token is not for the audience {expected:?} (its audiences: {got:?}); mount a \
         projected service-account token with audience {expected:?}"
    )]
    WrongAudience { expected: String, got: Vec<String> },
    #[error(
        "the token belongs to {0:?}, which is not a service account \
         (system:serviceaccount:<namespace>:<name>)"
    )]
    NotServiceAccount(String),
    #[error("the token could not be checked: {0}")]
    Unavailable(String),
}

impl TokenError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Unavailable(_) => ErrorCode::Unavailable,
            _ => ErrorCode::BadToken,
        }
    }
}

/// The decision on a TokenReview's answer: authenticated, for `audience`, a service account.
pub fn check_review(
    status: Option<&TokenReviewStatus>,
    audience: &str,
) -> Result<ServiceAccount, TokenError> {
    let Some(status) = status else {
        return Err(TokenError::Unauthenticated(
            "the review has no status".to_string(),
        ));
    };
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "no reason given".to_string());
        return Err(TokenError::Unauthenticated(why));
    }
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(TokenError::WrongAudience {
            expected: audience.to_string(),
            got: audiences,
        });
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or("");
    let (namespace, name) = parse_username(username)
        .ok_or_else(|| TokenError::NotServiceAccount(username.to_string()))?;
    let pod = user
        .and_then(|u| u.extra.as_ref())
        .and_then(|extra| extra.get(EXTRA_POD_NAME))
        .and_then(|names| names.first())
        .cloned();
    Ok(ServiceAccount {
        namespace: namespace.to_string(),
        name: name.to_string(),
        pod,
    })
}

/// `system:serviceaccount:<namespace>:<name>` with valid Kubernetes names.
pub fn parse_username(username: &str) -> Option<(&str, &str)> {
    let (namespace, name) = username.strip_prefix(SA_PREFIX)?.split_once(':')?;
    (is_dns_label(namespace) && is_dns_subdomain(name)).then_some((namespace, name))
}

/// A namespace name: a DNS-1123 label.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A service account name: a DNS-1123 subdomain.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Asks the API server about tokens. Needs `create` on `tokenreviews.authentication.k8s.io`.
#[derive(Clone)]
pub struct TokenReviewer {
    reviews: Api<TokenReview>,
    audience: String,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: &str) -> Self {
        TokenReviewer {
            reviews: Api::all(client),
            audience: audience.to_string(),
        }
    }

    pub async fn review(&self, token: &str) -> Result<ServiceAccount, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = tokio::time::timeout(
            REVIEW_TIMEOUT,
            self.reviews.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| {
            TokenError::Unavailable(format!(
                "the TokenReview took longer than {}s",
                REVIEW_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| TokenError::Unavailable(format!("TokenReview failed: {e}")))?;
        check_review(answer.status.as_ref(), &self.audience)
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenFileError {
    #[error("{path}: {problem}")]
    Read { path: String, problem: String },
    #[error("line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("no tokens: every line is empty or a comment")]
    Empty,
}

/// The tokens of a local-mode token file: one `token namespace serviceaccount` per line,
/// `#` starts a comment line.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TokenTable {
    tokens: HashMap<String, ServiceAccount>,
}

/// Keeps the tokens out of logs.
impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenTable({} tokens)", self.tokens.len())
    }
}

impl TokenTable {
    pub fn parse(text: &str) -> Result<Self, TokenFileError> {
        let mut tokens = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |problem: String| TokenFileError::Line {
                line: line_no,
                problem,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [token, namespace, name] = fields[..] else {
                return Err(bad(format!(
                    "expected `token namespace serviceaccount`, found {} fields",
                    fields.len()
                )));
            };
            if !is_dns_label(namespace) {
                return Err(bad(format!("{namespace:?} is not a valid namespace name")));
            }
            if !is_dns_subdomain(name) {
                return Err(bad(format!("{name:?} is not a valid service account name")));
            }
            let account = ServiceAccount {
                namespace: namespace.to_string(),
                name: name.to_string(),
                pod: None,
            };
            if tokens.insert(token.to_string(), account).is_some() {
                return Err(bad("this token is already listed on an earlier line".into()));
            }
        }
        if tokens.is_empty() {
            return Err(TokenFileError::Empty);
        }
        Ok(TokenTable { tokens })
    }

    pub fn check(&self, token: &str) -> Result<ServiceAccount, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        self.tokens.get(token).cloned().ok_or(TokenError::Unknown)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A token file whose table can be replaced while requests are served.
#[derive(Debug)]
pub struct LocalTokens {
    path: PathBuf,
    table: RwLock<Arc<TokenTable>>,
}

impl LocalTokens {
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        Ok(LocalTokens {
            path: path.to_path_buf(),
            table: RwLock::new(Arc::new(read_table(path)?)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn table(&self) -> Arc<TokenTable> {
        // A poisoned lock still holds a whole Arc: a writer cannot leave it half-assigned.
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rereads the file; a file that no longer parses leaves the current table in place.
    /// Returns whether the table changed.
    pub fn reload(&self) -> Result<bool, TokenFileError> {
        let fresh = read_table(&self.path)?;
        if *self.table() == fresh {
            return Ok(false);
        }
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        Ok(true)
    }
}

fn read_table(path: &Path) -> Result<TokenTable, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| TokenFileError::Read {
        path: path.display().to_string(),
        problem: e.to_string(),
    })?;
    TokenTable::parse(&text).map_err(|e| TokenFileError::Read {
        path: path.display().to_string(),
        problem: e.to_string(),
    })
}

/// Where tokens are checked.
#[derive(Debug)]
pub enum Tokens {
    Review(TokenReviewer),
    Local(LocalTokens),
}

impl Tokens {
    pub async fn check(&self, token: &str) -> Result<ServiceAccount, TokenError> {
        match self {
            Tokens::Review(reviewer) => reviewer.review(token).await,
            Tokens::Local(local) => local.table().check(token),
        }
    }
}

#[cfg(test)]
#[path = "tokens_tests.rs"]
mod tests;
