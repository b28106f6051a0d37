//! Live progress of a training run for a display (the binary draws a per-epoch progress bar on
//! stderr from these events). The training log file is not affected: it keeps nnU-Net's lines.

use std::sync::Arc;

/// What the epoch loop reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrainProgress {
    /// An epoch's training iterations start (`epoch` counts from 0).
    EpochStart {
        epoch: usize,
        num_epochs: usize,
        iterations: usize,
    },
    /// A training iteration finished.
    Iteration(IterationProgress),
    /// The epoch's validation iterations start.
    Validation { epoch: usize, iterations: usize },
    /// The epoch's steps are done; its log lines come next.
    EpochEnd { epoch: usize },
}

/// One finished training iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IterationProgress {
    pub epoch: usize,
    pub num_epochs: usize,
    /// Iterations of this epoch done (1-based).
    pub done: usize,
    pub iterations: usize,
    /// This iteration's training loss.
    pub loss: f64,
    /// Mean wall time of a training iteration in this run (data wait included).
    pub seconds_per_iteration: f64,
    /// Estimated seconds until the fold's last epoch ends (final validation not included).
    pub fold_eta_s: f64,
}

/// A callback receiving [`TrainProgress`] events (called on the training thread).
#[derive(Clone)]
pub struct ProgressHook(pub Arc<dyn Fn(&TrainProgress) + Send + Sync>);

impl ProgressHook {
    pub fn new(f: impl Fn(&TrainProgress) + Send + Sync + 'static) -> Self {
        ProgressHook(Arc::new(f))
    }

    pub fn emit(&self, event: TrainProgress) {
        (self.0)(&event)
    }
}

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

/// Seconds left in the fold: the rest of this epoch's training iterations at
/// `seconds_per_iteration`, plus `epochs_after` whole epochs at `mean_epoch_s` (the mean
/// duration of the epochs logged so far, validation included) or, before any epoch has ended,
/// at `iterations × seconds_per_iteration`.
pub fn fold_eta_s(
    seconds_per_iteration: f64,
    (done, iterations): (usize, usize),
    epochs_after: usize,
    mean_epoch_s: Option<f64>,
) -> f64 {
    let left_in_epoch = iterations.saturating_sub(done) as f64 * seconds_per_iteration;
    let epoch_s = mean_epoch_s
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(iterations as f64 * seconds_per_iteration);
    left_in_epoch + epochs_after as f64 * epoch_s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_counts_the_rest_of_the_epoch_and_the_epochs_after() {
        // 10 of 25 iterations done at 0.5 s, 3 more epochs of 20 s each
        assert_eq!(fold_eta_s(0.5, (10, 25), 3, Some(20.0)), 7.5 + 60.0);
        // no epoch finished yet: an epoch is estimated from the iterations
        assert_eq!(fold_eta_s(0.5, (10, 25), 2, None), 7.5 + 25.0);
        assert_eq!(fold_eta_s(0.5, (10, 25), 2, Some(f64::NAN)), 7.5 + 25.0);
        // last iteration of the last epoch
        assert_eq!(fold_eta_s(0.5, (25, 25), 0, Some(20.0)), 0.0);
    }

    #[test]
    fn hook_receives_events() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let hook = ProgressHook::new(move |e| s.lock().unwrap().push(*e));
        hook.emit(TrainProgress::EpochEnd { epoch: 3 });
        assert_eq!(
            *seen.lock().unwrap(),
            vec![TrainProgress::EpochEnd { epoch: 3 }]
        );
    }
}
