//! HTTP/1.1 upgrades (WebSocket and any other protocol but `h2c`): the request is routed like
//! any other, then travels on a connection of its own, to the app or across the hop between
//! sidecars (mutual TLS and the preamble, then HTTP/1.1 instead of HTTP/2), because an upgraded
//! connection is a byte stream that cannot share a multiplexed one. When the upstream answers
//! `101 Switching Protocols`, the client's connection and the upstream one are joined byte for
//! byte, as opaque TCP is, idle timeout included.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use trellis_api::Identity;

use crate::hop;
use crate::http::{self as h, Body};
use crate::proxy::Proxy;

/// Whether `req` asks to switch protocols (and not to `h2c`, which a proxy does not pass on).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    if req.version() != Version::HTTP_11 {
        return false;
    }
    let Some(proto) = req.headers().get(header::UPGRADE) else {
        return false;
    };
    if proto.as_bytes().eq_ignore_ascii_case(b"h2c") {
        return false;
    }
    req.headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// What an upgrade request needs once routed: the client's side of the connection, and the
/// protocol it asked for.
#[derive(Debug)]
pub struct Pending {
    client: OnUpgrade,
    protocol: HeaderValue,
}

impl Pending {
    /// Takes the client's pending upgrade out of `req`, if it asks for one.
    pub fn take<B>(req: &mut Request<B>) -> Option<Pending> {
        if !is_upgrade(req) {
            return None;
        }
        let protocol = req.headers().get(header::UPGRADE)?.clone();
        Some(Pending {
            client: hyper::upgrade::on(req),
            protocol,
        })
    }

    /// Sends `upstream_req` (built like any request, headers already filtered) to `addr` (its
    /// sidecar's, when it has an `identity`) on a connection of its own and, on `101`, joins the two connections in a task that holds the
    /// drain token. Any other answer goes back to the client as it is.
    pub async fn forward(
        self,
        proxy: &Arc<Proxy>,
        direction: &'static str,
        mut upstream_req: Request<Body>,
        addr: SocketAddr,
        identity: Option<&Identity>,
        grpc: bool,
    ) -> Response<Body> {
        // The connection-level headers were dropped as for any request; these two say what
        // the next hop must do.
        let headers = upstream_req.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
        headers.remove(h::ORIG_PROTO);
        *upstream_req.version_mut() = Version::HTTP_11;
        // An origin-form URI: this is a direct HTTP/1.1 connection, not a pooled client's.
        if let Some(pq) = upstream_req.uri().path_and_query().cloned() {
            *upstream_req.uri_mut() = http::Uri::from(pq);
        }
        // An endpoint with an identity runs a sidecar: the connection crosses the hop.
        let io = match hop::connect(addr, identity.is_some(), identity, &proxy.hop).await {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(error = %e, %addr, "upgrade: upstream unreachable");
                proxy.metrics.error(direction, "connect");
                return h::local(
                    StatusCode::BAD_GATEWAY,
                    "the backend could not be reached",
                    grpc,
                );
            }
        };
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await
        {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, %addr, "upgrade: handshake failed");
                proxy.metrics.error(direction, "upstream");
                return h::local(
                    StatusCode::BAD_GATEWAY,
                    "the backend could not be reached",
                    grpc,
                );
            }
        };
        // Ends on its own once the response is in and the connection is handed over.
        tokio::spawn(conn.with_upgrades());
        let mut res = match sender.send_request(upstream_req).await {
            Ok(res) => res,
            Err(e) => {
                tracing::debug!(error = %e, %addr, "upgrade: request failed");
                proxy.metrics.error(direction, "upstream");
                return h::local(
                    StatusCode::BAD_GATEWAY,
                    "the backend could not be reached",
                    grpc,
                );
            }
        };
        if res.status() != StatusCode::SWITCHING_PROTOCOLS {
            return h::from_upstream(res);
        }
        let upstream = hyper::upgrade::on(&mut res);
        let (mut parts, _) = res.into_parts();
        h::strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(proto) = parts
            .headers
            .get(header::UPGRADE)
            .cloned()
            .or(Some(self.protocol))
        {
            parts.headers.insert(header::UPGRADE, proto);
        }
        let task_proxy = proxy.clone();
        let client = self.client;
        tokio::spawn(async move {
            let _drain = task_proxy.drain.clone();
            match tokio::join!(client, upstream) {
                (Ok(client), Ok(upstream)) => {
                    crate::tcp::splice(
                        &task_proxy,
                        direction,
                        TokioIo::new(client),
                        TokioIo::new(upstream),
                        addr,
                    )
                    .await;
                }
                (c, u) => {
                    tracing::debug!(client = ?c.err(), upstream = ?u.err(), %addr, "upgrade: a side never switched");
                }
            }
        });
        Response::from_parts(parts, h::empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn upgrades_are_recognised() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert!(is_upgrade(&req(&ws)));
        assert!(!is_upgrade(&req(&[("upgrade", "websocket")])));
        assert!(!is_upgrade(&req(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c")
        ])));
        assert!(!is_upgrade(&req(&[("connection", "upgrade")])));
        let mut h2 = req(&ws);
        *h2.version_mut() = Version::HTTP_2;
        assert!(!is_upgrade(&h2));
    }
}
