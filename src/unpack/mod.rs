//! Turning layer streams into a tree: decompression, tar application with
//! whiteouts under a chroot-like root, and the pipeline that runs them on
//! two threads.
//!
//! Knows tar, compression and the root it writes into; not registries, and
//! not Nix: what to skip comes in as a filter from the caller.

pub mod apply;
pub mod decompress;
pub mod fsroot;
pub mod pipeline;
pub mod tar;
