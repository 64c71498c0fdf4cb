//! Cancellation shared by async tasks and blocking threads.
//!
//! Ctrl-C must leave the output directory as it was, so nothing is killed
//! mid-write: the signal sets a flag that the applier checks between entries
//! and the decoder between chunks, and wakes the async side, which drops its
//! downloads. The run then unwinds through the normal error path, which
//! removes the staging folder.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// One run's cancellation: a flag for threads, a token for tasks.
#[derive(Clone, Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    token: CancellationToken,
}

impl Cancel {
    /// A fresh, uncancelled handle.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Ask everything to stop.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.token.cancel();
    }

    /// Has [`Cancel::cancel`] been called (or the flag set by a thread)?
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed) || self.token.is_cancelled()
    }

    /// The flag blocking code polls.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.flag)
    }

    /// Resolves once cancelled.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// A handle for one attempt at a piece of work: cancelled whenever this
    /// one is, yet stoppable on its own (a failed unpack stops its decoder)
    /// without stopping the run, so the run can try again. The link lasts
    /// while the returned guard lives; it needs a Tokio runtime.
    pub fn attempt(&self) -> (Cancel, AbortOnDropHandle<()>) {
        let child = Cancel {
            flag: Arc::new(AtomicBool::new(self.is_cancelled())),
            token: self.token.child_token(),
        };
        let (flag, token) = (child.flag(), child.token.clone());
        let link = tokio::spawn(async move {
            token.cancelled().await;
            flag.store(true, Ordering::SeqCst);
        });
        (child, AbortOnDropHandle::new(link))
    }
}
