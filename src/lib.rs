//! hydrafy: seed a shared Nix store for GitLab docker runners straight from a
//! container registry, with no docker daemon.
//!
//! `hydrafy fetch nixos/nix@sha256:...` resolves the pinned manifest, verifies
//! every digest on the way (index, manifest, config, each layer blob and each
//! uncompressed layer against `rootfs.diff_ids`), replays the layers with
//! their whiteouts into a private staging folder, and publishes
//! `nix-backup/nix/store` and `nix-backup/nix/var/nix/db` in one rename.
//!
//! The binary is thin; this library holds the work, one module per concern:
//!
//! | module | owns |
//! |---|---|
//! | [`reference`](mod@reference), [`digest`], [`platform`] | what the user names, parsed and validated |
//! | [`manifest`] | manifests, indexes, configs, media types |
//! | [`registry`], [`auth`], [`credentials`] | the distribution API, token auth, retries, mirrors |
//! | [`blobstore`], [`cache`] | verified content-addressed blobs (the cache), `hydrafy cache` |
//! | [`decompress`] | gzip/zstd/plain by media type and magic bytes |
//! | [`fsroot`], [`apply`] | chroot-like path resolution and layer application |
//! | [`unpack`] | the decode/apply pipeline across two threads |
//! | [`output`], [`state`] | staging, atomic publish, what DIR holds |
//! | [`resolve`] | an image's manifest chain, fetched or read, verified |
//! | [`download`] | concurrent verified downloads feeding the pipeline |
//! | [`publish`] | DIR made to hold the result: one rename, or a merge |
//! | [`fetch`] | the `fetch` command, end to end |
//! | [`pull`], [`extract`], [`layout`] | air-gapped hosts: image files written and read |
//! | [`nar`], [`nixhash`] | Nix's archive format and hash notations |
//! | [`nixdb`] | the Nix database: reading it, merging an image into a seed |
//! | [`verify`] | the `verify` command: a store checked against its database |
//! | [`gc`], [`status`], [`noatime`] | the `gc` and `status` commands: a store kept within a budget while jobs run |
//! | [`runner_config`] | the `runner-config` command: gitlab-runner's config.toml |
//! | [`progress`], [`cancel`], [`cli`], [`error`] | the user interface around it |

pub mod apply;
pub mod auth;
pub mod blobstore;
pub mod cache;
pub mod cancel;
pub mod cli;
pub mod credentials;
pub mod decompress;
pub mod digest;
pub mod download;
pub mod error;
pub mod extract;
pub mod fetch;
pub mod fsroot;
pub mod gc;
pub mod layout;
pub mod manifest;
pub mod nar;
pub mod nixdb;
pub mod nixhash;
pub mod noatime;
pub mod output;
pub mod platform;
pub mod progress;
pub mod publish;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod resolve;
pub mod runner_config;
pub mod state;
pub mod status;
pub mod unpack;
pub mod verify;

pub use error::{Error, Result};
