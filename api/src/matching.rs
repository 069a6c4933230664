//! Which rule of which route serves a request.
//!
//! The proxy runs this per request and the controller's `explain` runs it on what-if requests,
//! so both give the same answer by construction. Everything that can be decided once per
//! policy snapshot (regex compilation, header name parsing, precedence order) is decided in
//! [`RouteTable::compile`]; [`RouteTable::find`] is then a linear scan that stops at the first
//! hit and allocates only to percent-decode a query value that a regex must see.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::marker::PhantomData;

use http::{HeaderMap, HeaderName, Method, Uri};
use percent_encoding::percent_decode_str;
use regex::bytes::Regex;

use crate::policy::{GrpcMatch, HttpMatch, NameMatch, PathMatch, Route, ValueMatch};

/// The parts of a request that matching looks at, borrowed so that the proxy need not copy them.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

impl<'a, B> From<&'a http::Request<B>> for RequestHead<'a> {
    fn from(req: &'a http::Request<B>) -> Self {
        Self {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
        }
    }
}

impl<'a> From<&'a http::request::Parts> for RequestHead<'a> {
    fn from(parts: &'a http::request::Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
        }
    }
}

/// Why a route's matches cannot be compiled. The controller checks the same things first, so a
/// proxy seeing this means the two disagree.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MatchError {
    #[error("invalid regular expression {pattern:?}: {reason}")]
    Regex { pattern: String, reason: String },
    #[error("invalid header name {name:?} in a header match")]
    HeaderName { name: String },
}

/// Checks a route regex with the compiler the proxy uses, so the controller rejects exactly
/// what the proxy could not run.
pub fn validate_regex(pattern: &str) -> Result<(), MatchError> {
    compile_regex(pattern).map(drop)
}

/// Compiles `pattern` to match a whole value.
fn compile_regex(pattern: &str) -> Result<Regex, MatchError> {
    let error = |e: regex::Error| MatchError::Regex {
        pattern: pattern.to_string(),
        reason: e.to_string(),
    };
    // Compiled alone first: `a)|(b` is invalid on its own but would parse inside the anchoring
    // group as `^(?:a)|(b)$`, an unanchored alternative.
    Regex::new(pattern).map_err(error)?;
    Regex::new(&format!("^(?:{pattern})$")).map_err(error)
}

/// The winning (route, rule, match) of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found<'t> {
    /// Position of the route in the slice given to [`RouteTable::compile`].
    pub route: usize,
    /// Position of the rule in `route.rules` (not `Rule::index`).
    pub rule: usize,
    /// Position of the match in `rule.matches` (0 for a rule sent without matches).
    pub matched: usize,
    /// The `PathMatch::Prefix` value, as written in the route, when the winning match is a
    /// prefix match: `ReplacePrefixMatch` needs it.
    pub prefix: Option<&'t str>,
}

/// The matches of a list of routes of one kind (`HttpMatch` or `GrpcMatch`), compiled and
/// sorted by precedence.
#[derive(Clone, Debug)]
pub struct RouteTable<M> {
    entries: Vec<Entry>,
    kind: PhantomData<fn() -> M>,
}

impl<M> Default for RouteTable<M> {
    /// A table without routes: matches nothing.
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            kind: PhantomData,
        }
    }
}

impl<M> RouteTable<M> {
    /// The highest-precedence match of the request, if any.
    pub fn find(&self, req: &RequestHead<'_>) -> Option<Found<'_>> {
        self.find_all(req).next()
    }

    /// Every match of the request, best first: lets `explain` show what the winner shadows.
    pub fn find_all<'t>(&'t self, req: &RequestHead<'_>) -> impl Iterator<Item = Found<'t>> {
        let view = View::new(req);
        self.entries
            .iter()
            .filter(move |e| e.cond.matches(&view))
            .map(Entry::found)
    }
}

impl RouteTable<HttpMatch> {
    /// HTTPRoute precedence: Exact path; then RegularExpression path (our choice: longer pattern
    /// first); then PathPrefix with the most characters; then method present; then more header
    /// matches; then more query matches; then slice order of route, rule and match.
    pub fn compile(routes: &[Route<HttpMatch>]) -> Result<Self, MatchError> {
        Self::build(routes, |m| {
            let (target, class, len) = match &m.path {
                PathMatch::Exact(p) => (Target::Exact(p.clone()), 0, p.len()),
                PathMatch::Regex(p) => (Target::Regex(compile_regex(p)?), 1, p.len()),
                PathMatch::Prefix(p) => {
                    let len = p.trim_end_matches('/').len();
                    let raw = p.clone();
                    (Target::Prefix { raw, len }, 2, len)
                }
            };
            let rank = (
                class,
                Reverse(len),
                u8::from(m.method.is_none()),
                Reverse(m.headers.len()),
                Reverse(m.query_params.len()),
            );
            let cond = Cond {
                target,
                method: m.method.clone(),
                headers: compile_headers(&m.headers)?,
                query: compile_query(&m.query_params)?,
            };
            Ok((rank, cond))
        })
    }
}

impl RouteTable<GrpcMatch> {
    /// GRPCRoute precedence: the most characters in an exactly matching service, then in an
    /// exactly matching method (a regex ranks after any exact match and before no match,
    /// longer pattern first), then more header matches, then slice order.
    pub fn compile(routes: &[Route<GrpcMatch>]) -> Result<Self, MatchError> {
        Self::build(routes, |m| {
            let (service, method) = match &m.method {
                Some(mm) => (mm.service.as_ref(), mm.method.as_ref()),
                None => (None, None),
            };
            let (service_class, service_len) = grpc_rank(service);
            let (method_class, method_len) = grpc_rank(method);
            let rank = (
                service_class,
                Reverse(service_len),
                method_class,
                Reverse(method_len),
                Reverse(m.headers.len()),
            );
            let cond = Cond {
                target: Target::Grpc {
                    service: service.map(ValueCond::compile).transpose()?,
                    method: method.map(ValueCond::compile).transpose()?,
                },
                method: None,
                headers: compile_headers(&m.headers)?,
                query: Vec::new(),
            };
            Ok((rank, cond))
        })
    }
}

impl<M: Default> RouteTable<M> {
    /// Flattens every (route, rule, match) and sorts by rank. A rule sent without matches
    /// (the controller never does) gets the kind's default match rather than matching nothing.
    fn build(
        routes: &[Route<M>],
        mut compile: impl FnMut(&M) -> Result<(Rank, Cond), MatchError>,
    ) -> Result<Self, MatchError> {
        let default = [M::default()];
        let mut ranked = Vec::new();
        for (route, r) in routes.iter().enumerate() {
            for (rule, rl) in r.rules.iter().enumerate() {
                let matches = if rl.matches.is_empty() {
                    &default[..]
                } else {
                    &rl.matches[..]
                };
                for (matched, m) in matches.iter().enumerate() {
                    let (rank, cond) = compile(m)?;
                    let entry = Entry {
                        route,
                        rule,
                        matched,
                        cond,
                    };
                    ranked.push((rank, entry));
                }
            }
        }
        // Stable: equal ranks keep slice order, which is route, then rule, then match order.
        ranked.sort_by_key(|(rank, _)| *rank);
        Ok(Self {
            entries: ranked.into_iter().map(|(_, entry)| entry).collect(),
            kind: PhantomData,
        })
    }
}

/// Smaller sorts first. The meaning of each position depends on the route kind.
type Rank = (u8, Reverse<usize>, u8, Reverse<usize>, Reverse<usize>);

fn grpc_rank(value: Option<&ValueMatch>) -> (u8, usize) {
    match value {
        Some(ValueMatch::Exact(v)) => (0, v.len()),
        Some(ValueMatch::Regex(v)) => (1, v.len()),
        None => (2, 0),
    }
}

fn compile_headers(headers: &[NameMatch]) -> Result<Vec<HeaderCond>, MatchError> {
    headers
        .iter()
        .map(|h| {
            let name =
                HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| MatchError::HeaderName {
                    name: h.name.clone(),
                })?;
            Ok(HeaderCond {
                name,
                value: ValueCond::compile(&h.value)?,
            })
        })
        .collect()
}

fn compile_query(params: &[NameMatch]) -> Result<Vec<QueryCond>, MatchError> {
    params
        .iter()
        .map(|q| {
            Ok(QueryCond {
                name: q.name.clone(),
                value: ValueCond::compile(&q.value)?,
            })
        })
        .collect()
}

/// What is computed once per request rather than once per entry.
struct View<'r> {
    method: &'r str,
    path: &'r str,
    query: Option<&'r str>,
    headers: &'r HeaderMap,
    uri: &'r Uri,
    /// `(service, method)` when the path has the gRPC form `/<service>/<method>`.
    grpc: Option<(&'r str, &'r str)>,
}

impl<'r> View<'r> {
    fn new(req: &RequestHead<'r>) -> Self {
        let path = req.uri.path();
        let grpc = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'));
        Self {
            method: req.method.as_str(),
            path,
            query: req.uri.query(),
            headers: req.headers,
            uri: req.uri,
            grpc,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    route: usize,
    rule: usize,
    matched: usize,
    cond: Cond,
}

impl Entry {
    fn found(&self) -> Found<'_> {
        Found {
            route: self.route,
            rule: self.rule,
            matched: self.matched,
            prefix: match &self.cond.target {
                Target::Prefix { raw, .. } => Some(raw),
                _ => None,
            },
        }
    }
}

/// One compiled match: every part must hold.
#[derive(Clone, Debug)]
struct Cond {
    target: Target,
    method: Option<String>,
    headers: Vec<HeaderCond>,
    query: Vec<QueryCond>,
}

impl Cond {
    fn matches(&self, req: &View<'_>) -> bool {
        self.method.as_deref().is_none_or(|m| m == req.method)
            && self.target.matches(req)
            && self.headers.iter().all(|h| h.matches(req))
            && self.query.iter().all(|q| q.matches(req.query))
    }
}

#[derive(Clone, Debug)]
enum Target {
    Exact(String),
    /// `len` is the length of `raw` without trailing slashes: the part compared with the path.
    Prefix {
        raw: String,
        len: usize,
    },
    Regex(Regex),
    Grpc {
        service: Option<ValueCond>,
        method: Option<ValueCond>,
    },
}

impl Target {
    fn matches(&self, req: &View<'_>) -> bool {
        match self {
            Target::Exact(p) => req.path == p.as_str(),
            Target::Prefix { raw, len } => {
                let prefix = raw.get(..*len).unwrap_or(raw);
                // `/` (empty once trimmed) matches everything, even a non-origin-form target.
                prefix.is_empty()
                    || req
                        .path
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Target::Regex(re) => re.is_match(req.path.as_bytes()),
            Target::Grpc { service, method } => match req.grpc {
                Some((s, m)) => {
                    service.as_ref().is_none_or(|c| c.matches(s.as_bytes()))
                        && method.as_ref().is_none_or(|c| c.matches(m.as_bytes()))
                }
                None => service.is_none() && method.is_none(),
            },
        }
    }
}

#[derive(Clone, Debug)]
enum ValueCond {
    Exact(String),
    Regex(Regex),
}

impl ValueCond {
    fn compile(value: &ValueMatch) -> Result<Self, MatchError> {
        Ok(match value {
            ValueMatch::Exact(v) => ValueCond::Exact(v.clone()),
            ValueMatch::Regex(p) => ValueCond::Regex(compile_regex(p)?),
        })
    }

    fn matches(&self, value: &[u8]) -> bool {
        match self {
            ValueCond::Exact(v) => v.as_bytes() == value,
            ValueCond::Regex(re) => re.is_match(value),
        }
    }

    /// Matches a raw query value, percent-decoding it without allocating unless a regex must
    /// see a value that contains `%`.
    fn matches_encoded(&self, raw: &str) -> bool {
        match self {
            ValueCond::Exact(v) => percent_decode_str(raw).eq(v.bytes()),
            ValueCond::Regex(re) => re.is_match(&Cow::<[u8]>::from(percent_decode_str(raw))),
        }
    }
}

#[derive(Clone, Debug)]
struct HeaderCond {
    name: HeaderName,
    value: ValueCond,
}

impl HeaderCond {
    /// Any one value of a repeated header is enough. A `Host` match falls back to the URI's
    /// authority, where HTTP/2 carries it.
    fn matches(&self, req: &View<'_>) -> bool {
        let mut present = false;
        for value in req.headers.get_all(&self.name) {
            if self.value.matches(value.as_bytes()) {
                return true;
            }
            present = true;
        }
        !present
            && self.name == http::header::HOST
            && req
                .uri
                .authority()
                .is_some_and(|a| self.value.matches(a.as_str().as_bytes()))
    }
}

#[derive(Clone, Debug)]
struct QueryCond {
    name: String,
    value: ValueCond,
}

impl QueryCond {
    /// Only the first occurrence of the name counts; `+` is not a space.
    fn matches(&self, query: Option<&str>) -> bool {
        let Some(query) = query else { return false };
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(name, _)| percent_decode_str(name).eq(self.name.bytes()))
            .is_some_and(|(_, value)| self.value.matches_encoded(value))
    }
}

#[cfg(test)]
mod tests;
