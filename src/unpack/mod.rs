//! Turning layer streams into a tree: decompression, tar application with
//! whiteouts under a chroot-like root, and the pipeline that runs them on
//! two threads.
//!
//! Knows tar, compression and the root it writes into; not registries, and
//! not Nix: what to skip comes in as a filter from the caller.

pub(crate) mod apply;
pub(crate) mod decompress;
pub(crate) mod fsroot;
pub(crate) mod pipeline;
pub mod tar;

pub use apply::{Applier, ApplyOptions, ApplyStats, EntryFilter, Unfiltered};
pub use decompress::decoder;
pub use fsroot::{FsRoot, Node, normalize, remove_tree, stat_at};
pub use pipeline::{LayerInput, unpack};
