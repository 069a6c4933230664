//! The Gateway API filters that rewrite a request or answer it, as pure functions.
//!
//! The proxy applies them to live traffic and the controller's `explain` shows their effect;
//! keeping them here, free of I/O, lets both agree and lets the spec tables be unit tests.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::policy::{Header, HeaderModifier, PathModifier, RequestRedirect};

/// Why a header modifier cannot be compiled. The controller validates names and values first,
/// so a proxy seeing this means the two disagree.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("invalid header name {name:?} in a header modifier")]
    HeaderName { name: String },
    #[error("invalid value {value:?} for header {name:?} in a header modifier")]
    HeaderValue { name: String, value: String },
}

/// A [`HeaderModifier`] with its names and values parsed once per snapshot instead of once per
/// request.
///
/// [`apply`](Self::apply) runs `set`, then `add`, then `remove`, the order the Gateway API lists
/// them in. The spec does not say what a name in two lists means; with this order a header both
/// set and added keeps both values, and a header listed in `remove` never survives, whatever
/// else names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledHeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl CompiledHeaderModifier {
    pub fn compile(modifier: &HeaderModifier) -> Result<Self, FilterError> {
        Ok(Self {
            set: compile_pairs(&modifier.set)?,
            add: compile_pairs(&modifier.add)?,
            remove: modifier
                .remove
                .iter()
                .map(|name| header_name(name))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Edits `headers` in place. `add` appends a separate header line, which HTTP treats as the
    /// same as a comma-joined value.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

impl TryFrom<&HeaderModifier> for CompiledHeaderModifier {
    type Error = FilterError;

    fn try_from(modifier: &HeaderModifier) -> Result<Self, FilterError> {
        Self::compile(modifier)
    }
}

fn header_name(name: &str) -> Result<HeaderName, FilterError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| FilterError::HeaderName {
        name: name.to_string(),
    })
}

fn compile_pairs(headers: &[Header]) -> Result<Vec<(HeaderName, HeaderValue)>, FilterError> {
    headers
        .iter()
        .map(|h| {
            let value = HeaderValue::from_str(&h.value).map_err(|_| FilterError::HeaderValue {
                name: h.name.clone(),
                value: h.value.clone(),
            })?;
            Ok((header_name(&h.name)?, value))
        })
        .collect()
}

/// The path a request continues with (URLRewrite) or is redirected to (RequestRedirect).
///
/// `path` is the path alone, without the query. `matched_prefix` is the `PathPrefix` value of the
/// match that selected the rule ([`Found::prefix`](crate::matching::Found::prefix)); without one,
/// `ReplacePrefixMatch` leaves the path unchanged (the controller forbids that combination).
///
/// `ReplacePrefixMatch` replaces whole segments and ignores trailing slashes on both the prefix
/// and the replacement, so the result never has a doubled or lost `/`: with prefix `/foo`,
/// `/foo/bar` becomes `/xyz/bar` for `/xyz` and `/xyz/`, and `/bar` for `/` and the empty string.
pub fn rewrite_path(modifier: &PathModifier, path: &str, matched_prefix: Option<&str>) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(full) if full.is_empty() => "/".to_string(),
        PathModifier::ReplaceFullPath(full) => full.clone(),
        PathModifier::ReplacePrefixMatch(replacement) => {
            let Some(prefix) = matched_prefix else {
                return path.to_string();
            };
            let prefix = prefix.trim_end_matches('/');
            let Some(rest) = path
                .strip_prefix(prefix)
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            else {
                // The prefix did not select this path; rewriting anyway would cut a segment.
                return path.to_string();
            };
            let mut out = replacement.trim_end_matches('/').to_string();
            out.push_str(rest);
            if out.is_empty() {
                out.push('/');
            }
            out
        }
    }
}

/// What [`redirect_location`] needs to know about the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectRequest<'a> {
    /// `http` or `https`: how the client reached the Service.
    pub scheme: &'a str,
    /// The `Host` header, or the authority for HTTP/2; may carry a `:port`.
    pub host: &'a str,
    /// The path alone.
    pub path: &'a str,
    /// The query string without its `?`, kept in the Location as is.
    pub query: Option<&'a str>,
    /// The `PathPrefix` value of the winning match, for `ReplacePrefixMatch`.
    pub matched_prefix: Option<&'a str>,
    /// The Service port the request was sent to: in a mesh it plays the role of a Gateway's
    /// listener port when the redirect names no port and no scheme.
    pub service_port: u16,
}

/// The `Location` of a RequestRedirect answer, an absolute URL.
///
/// The port is the redirect's, else the well-known port of the redirect's scheme when it sets
/// one, else the Service port; it is left out when it is the default port of the final scheme.
pub fn redirect_location(redirect: &RequestRedirect, req: &RedirectRequest<'_>) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(req.scheme);
    let host = match &redirect.hostname {
        Some(hostname) => hostname.as_str(),
        None => strip_port(req.host),
    };
    let port = redirect
        .port
        .or_else(|| redirect.scheme.as_deref().and_then(well_known_port))
        .unwrap_or(req.service_port);
    let path = match &redirect.path {
        Some(modifier) => rewrite_path(modifier, req.path, req.matched_prefix),
        None if req.path.is_empty() => "/".to_string(),
        None => req.path.to_string(),
    };

    let mut location = String::with_capacity(scheme.len() + host.len() + path.len() + 16);
    location.push_str(scheme);
    location.push_str("://");
    // A bare IPv6 address needs brackets to be followed by a port or a path.
    let bracket = host.contains(':') && !host.starts_with('[');
    if bracket {
        location.push('[');
    }
    location.push_str(host);
    if bracket {
        location.push(']');
    }
    if well_known_port(scheme) != Some(port) {
        location.push(':');
        location.push_str(&port.to_string());
    }
    location.push_str(&path);
    if let Some(query) = req.query.filter(|q| !q.is_empty()) {
        location.push('?');
        location.push_str(query);
    }
    location
}

fn well_known_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("http") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case("https") {
        Some(443)
    } else {
        None
    }
}

/// `host:port` → `host`, `[v6]:port` → `[v6]`; a bare IPv6 address (several colons, no
/// brackets) has no port to strip.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => host.get(..=end).unwrap_or(host),
            None => host,
        };
    }
    match host.split_once(':') {
        Some((name, port)) if !port.contains(':') => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests;
