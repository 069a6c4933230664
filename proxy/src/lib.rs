//! The Trellis sidecar proxy.
//!
//! One module per flow, after the domain: `init` programs the pod's traffic redirection.

pub mod init;
