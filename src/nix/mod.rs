//! Nix's own formats and rules: NAR serialisation, hash notations, the
//! database (reading it, merging into it, its locks), and checking a store
//! against it as `nix-store --verify --check-contents` does.

pub(crate) mod db;
pub(crate) mod hash;
pub(crate) mod nar;
pub(crate) mod noatime;
pub(crate) mod store_path;
pub(crate) mod verify;

pub use db::Merge;
pub use nar::dump;
