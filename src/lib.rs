//! hydrafy: seed a shared Nix store for GitLab docker runners straight from a
//! container registry, with no docker daemon.
//!
//! `hydrafy fetch nixos/nix@sha256:...` resolves the pinned manifest, verifies
//! every digest on the way (index, manifest, config, each layer blob and each
//! uncompressed layer against `rootfs.diff_ids`), replays the layers with
//! their whiteouts into a private staging folder, and publishes
//! `nix-backup/nix/store` and `nix-backup/nix/var/nix/db` in one rename.
//!
//! The binary is thin (it calls [`main`]); this library holds the work,
//! one folder per concern, each standing only on the ones below it:
//!
//! | folder | owns |
//! |---|---|
//! | `cli` | clap's types, their conversion to plain options, running one command to its exit status |
//! | `commands` | one file per subcommand, end to end |
//! | [`seed`] | the output directory: its state, staging, publish and merge |
//! | `blobs` | the verified blob store (the cache) and downloads into it: claims, resumes, configs |
//! | `registry` | the distribution API: HTTP, retries, auth, credentials, mirrors |
//! | `gc` | the store's lifecycle: what `gc` keeps and deletes, safely while jobs run |
//! | [`unpack`] | decompression, layer application under a root, the pipeline |
//! | [`nix`] | NAR, Nix hashes, store paths, the database and its locks, verification |
//! | [`oci`] | references, digests, platforms, manifests, image files |
//! | [`ui`] | progress and cancellation |
//! | `error` | the one error type (registry failures by kind), how it is printed, the exit status |
//!
//! The linked rooms are public for the tests, the benchmarks and the fuzz
//! target, each offering a short list from its `mod.rs`; the rest is the
//! binary's alone.

mod blobs;
mod cli;
mod commands;
mod error;
mod gc;
pub mod nix;
pub mod oci;
mod registry;
pub mod seed;
pub mod ui;
pub mod unpack;

pub use cli::main;
pub use error::{Error, Result, report};
