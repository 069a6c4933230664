//! Types and logic shared by the Trellis proxy and control plane.
//!
//! Nothing here depends on Kubernetes crates: the proxy links this crate, and the request
//! matcher in [`matching`] is the one both the proxy and the controller's `explain` run, so
//! that what `explain` says is what the proxy does.

pub mod certify;
pub mod discovery;
pub mod filters;
pub mod identity;
pub mod matching;
pub mod policy;
pub mod probes;
pub mod time;

pub use identity::Identity;
