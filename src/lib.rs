//! hydrafy: seed a shared Nix store for GitLab docker runners straight from a
//! container registry, with no docker daemon.
//!
//! `hydrafy fetch nixos/nix@sha256:...` resolves the pinned manifest, verifies
//! every digest on the way (index, manifest, config, each layer blob and each
//! uncompressed layer against `rootfs.diff_ids`), replays the layers with
//! their whiteouts into a private staging folder, and publishes
//! `nix-backup/nix/store` and `nix-backup/nix/var/nix/db` in one rename.
//!
//! The binary is thin; this library holds the work, one folder per concern,
//! each standing only on the ones below it:
//!
//! | folder | owns |
//! |---|---|
//! | [`cli`] | clap's types and their conversion to plain options |
//! | [`commands`] | one file per subcommand, end to end |
//! | [`seed`] | the output directory: its state, staging, publish and merge |
//! | [`blobs`] | the verified blob store (the cache) and downloads into it |
//! | [`registry`] | the distribution API: HTTP, retries, auth, credentials, mirrors |
//! | [`unpack`] | decompression, layer application under a root, the pipeline |
//! | [`gc`] | the store's lifecycle: what `gc` keeps and deletes, safely while jobs run |
//! | [`nix`] | NAR, Nix hashes, the database and its locks, verification |
//! | [`oci`] | references, digests, platforms, manifests, image files |
//! | [`ui`] | progress and cancellation |
//! | [`error`] | the one error type (registry failures by kind), how it is printed, the exit status |

pub mod blobs;
pub mod cli;
pub mod commands;
pub mod error;
pub mod gc;
pub mod nix;
pub mod oci;
pub mod registry;
pub mod seed;
pub mod ui;
pub mod unpack;

pub use error::{Error, Result};
