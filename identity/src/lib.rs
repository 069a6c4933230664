//! The Trellis identity service: the mesh's certificate authority. It checks a workload's
//! service-account token and signs its CSR into a short-lived SPIFFE certificate.
//!
//! One module per concept: [`ca`] is the authority itself (trust anchors, issuer, CSR checks,
//! signing) and does no I/O; [`tokens`] turns a token into a service account; [`limits`] bounds what callers can make it do; [`secret`] reads
//! and writes the issuer Secret; [`reload`] keeps the authority current; [`server`] serves
//! certify and [`admin`] health and metrics; [`bootstrap`] and [`run`] are the subcommands.

pub use trellis_admin as admin;
pub mod bootstrap;
pub mod ca;
pub mod config;
pub mod limits;
pub mod metrics;
pub mod reload;
pub mod run;
pub mod secret;
pub mod server;
pub mod tokens;

#[cfg(test)]
mod test_support;
