//! What the user sees while a command runs, and how they stop it: progress
//! on stderr, cancellation shared by async tasks and blocking threads, and
//! how messages spell counts and command lines.

pub(crate) mod cancel;
pub(crate) mod progress;
pub(crate) mod words;

pub use progress::Recorder;
