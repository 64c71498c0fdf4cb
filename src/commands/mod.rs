//! One file per subcommand, end to end: each takes plain options (built by
//! [`crate::cli`] from the command line) and returns a summary to print.

pub mod cache;
pub mod extract;
pub mod fetch;
pub mod pull;
pub mod runner_config;
pub mod status;
