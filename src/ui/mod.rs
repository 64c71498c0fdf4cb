//! What the user sees while a command runs, and how they stop it: progress
//! on stderr and cancellation shared by async tasks and blocking threads.

pub(crate) mod cancel;
pub(crate) mod progress;

pub use progress::Recorder;
