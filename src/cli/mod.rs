//! The command line: clap's types and their conversion to the commands'
//! plain options ([`args`]), and running one command to its exit status
//! ([`run`]). The commands never see clap.

mod args;
mod run;

pub use args::*;
pub use run::main;
