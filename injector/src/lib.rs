//! The Trellis injector: the mutating admission webhook that adds the sidecar to pods, and the
//! same injection offline (`trellis-injector inject`).
//!
//! One module per concept: [`annotations`] reads a pod's settings, [`probes`] finds the ports
//! the kubelet probes, [`sidecar`] builds what is added, [`patch`] decides and writes the
//! JSONPatch, [`admission`] turns an AdmissionReview into an answer, [`webhook`] and [`admin`]
//! serve it, [`cert`] and [`cluster`] manage the serving certificate, [`inject_cmd`] and
//! [`serve`] are the subcommands.

pub use trellis_admin as admin;
pub mod admission;
pub mod annotations;
pub mod cert;
pub mod cluster;
pub mod config;
pub mod inject_cmd;
pub mod metrics;
pub mod patch;
pub mod probes;
pub mod serve;
pub mod sidecar;
pub mod webhook;
