//! The Trellis controller: turns Services, EndpointSlices, Pods and Gateway API mesh routes into
//! the outbound policy each proxy applies, and into route status.
//!
//! The model ([`index`]) is pure: it never does I/O, so the same code serves the cluster
//! watches, the local manifest directory and the offline `check` and `explain` tools.

pub mod check;
pub mod discovery;
pub mod doctor;
pub mod explain;
pub mod identity;
pub mod index;
pub mod kubernetes;
pub mod manifests;
pub mod objects;
pub mod serve;
pub mod sidecar;
pub mod source;
pub mod stat;
pub mod status;
pub mod subscriptions;

pub use index::Index;
pub use objects::Objects;
