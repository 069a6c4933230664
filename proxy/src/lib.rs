//! The Trellis sidecar proxy.
//!
//! One module per concern, named after the domain: `config` (settings), `policy` (compiled
//! discovery snapshots), `balance` (endpoint choice), `init` (the pod's traffic redirection).

pub mod balance;
pub mod config;
pub mod init;
pub mod policy;
