//! Graceful stop: a flag the binary's signal handlers set (SIGTERM, SIGINT, SIGUSR1); the
//! training loop checks it after every training iteration and after every epoch, writes
//! `checkpoint_latest` (atomically, like every checkpoint) and returns [`Stopped`]; the binary
//! then exits with [`STOPPED_EXIT_CODE`]. `--c` continues from that checkpoint bit-exactly: a
//! stop in the middle of an epoch records the iterations done and their losses
//! ([`crate::checkpoint::MidEpoch`]), and the resumed run's training loader starts at the
//! next batch.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Exit status of `nnseg train` (and of a job of `nnseg cross_validate`) after a graceful
/// stop: `checkpoint_latest` is written and `--c` continues. 75 is `EX_TEMPFAIL` of
/// `sysexits.h`, "temporary failure; the user is invited to retry".
pub const STOPPED_EXIT_CODE: i32 = 75;

/// A request to stop, shared between signal handlers (or any other thread) and the trainer.
/// The default flag is never set by anyone but its holders.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared boolean, for `signal_hook::flag::register` and the like.
    pub fn shared(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    /// Asks the holders to stop.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where a gracefully stopped training left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// The epoch `--c` continues in.
    pub epoch: usize,
    /// Training iterations of that epoch already done (0: at the epoch's start).
    pub iterations_done: usize,
    /// The `checkpoint_latest` written.
    pub checkpoint: PathBuf,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped at epoch {} after {} training iteration(s) of it; {} written, continue \
             with --c",
            self.epoch,
            self.iterations_done,
            self.checkpoint.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_is_shared_by_its_clones() {
        let a = StopFlag::new();
        let b = a.clone();
        assert!(!b.is_requested());
        a.shared().store(true, Ordering::SeqCst);
        assert!(b.is_requested());
        assert!(!StopFlag::new().is_requested());
    }
}
