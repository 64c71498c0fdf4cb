//! Nix's own formats and rules: NAR serialisation, hash notations, the
//! database (reading it, merging into it, its locks), and checking a store
//! against it as `nix-store --verify --check-contents` does.

pub mod db;
pub mod hash;
pub mod nar;
pub mod noatime;
pub mod store_path;
pub mod verify;
