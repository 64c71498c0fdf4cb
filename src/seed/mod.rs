//! The output directory (DIR): what it holds (the state file), staging beside
//! it, and publishing a result into it, by one rename or by a merge.

pub(crate) mod delta;
pub(crate) mod layers;
pub(crate) mod output;
pub(crate) mod publish;
pub(crate) mod state;

pub use state::{ImageRecord, Layout, State};
