//! Workload certificates of the Trellis mesh, shared by every binary that speaks mutual TLS
//! with a SPIFFE identity: the proxy (between sidecars, and to the controller) and the
//! controller (its discovery port).
//!
//! [`mesh`] holds the TLS configurations and the peer checks; [`anchors`] the trust anchors
//! they verify with, replaceable at run time; [`identity`] obtains and renews the certificate
//! from the mesh CA. Free of Kubernetes crates, so that the proxy stays small.

pub mod anchors;
pub mod identity;
pub mod mesh;

pub use anchors::{AnchorSet, Offered, RefusedBundle, TrustAnchors};
pub use identity::{CertifyFailure, IdentityConfig};
pub use mesh::{ALPN_H2, CertificateState, Credentials, MeshTls, PeerClient, TlsError};
