//! The output directory (DIR): what it holds (the state file), staging beside
//! it, and publishing a result into it, by one rename or by a merge.

pub mod layers;
pub mod output;
pub mod publish;
pub mod state;
