//! hydrafy's integration tests: one binary, one module per area, shared helpers in `support`.

mod support;

mod airgap;
mod airgap_delta;
mod cli;
mod differential;
mod fetch;
mod gc;
mod go_tar;
mod hostile;
mod image_files;
mod jobs;
mod jobs_gc;
mod merge;
mod nixdb;
mod parallel_apply;
mod registry;
mod runner_config;
mod verify;
