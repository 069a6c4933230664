//! The Trellis sidecar proxy.
//!
//! One module per concern, named after the domain: the two traffic directions (`outbound`,
//! `inbound`), what they share (`detect`, `http`, `tcp`, `hop` — the single place where a
//! connection to an endpoint is made), what decides where requests go (`discovery`, `policy`,
//! `balance`), and the rest of the sidecar (`admin`, `metrics`, the access log and spans in
//! `observe`, `config`, `run`, `init`). The workload certificate and mutual TLS live in the
//! `trellis-tls` crate, shared with the controller.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod balance;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod hop;
pub mod http;
pub mod idle;
pub mod inbound;
pub mod init;
pub mod listen;
pub mod metrics;
pub mod mirror;
pub mod observe;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod probes;
pub mod proxy;
pub mod replay;
pub mod retry;
pub mod run;
pub mod tcp;
pub mod trace;
pub mod upgrade;
