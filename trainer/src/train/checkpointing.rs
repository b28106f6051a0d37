//! When to write which checkpoint ([`CheckpointPolicy`], a pure decision, as burn's
//! checkpointing strategies) and writing it ([`CheckpointSaver`]).
//!
//! nnU-Net's policy: `checkpoint_best` whenever the EMA pseudo Dice improves,
//! `checkpoint_latest` every `save_every` epochs (not after the last one), and at the end
//! `checkpoint_final` with `checkpoint_latest` deleted.

use super::step::Learner;
use super::{io_err, TrainError};
use crate::checkpoint::{
    Checkpoint, CheckpointKind, CheckpointMeta, MidEpoch, NetworkMeta, CHECKPOINT_FORMAT,
};
use crate::config::TrainerConfig;
use crate::logging::TrainingLog;
use std::path::PathBuf;

/// What to do with one checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointAction {
    Save(CheckpointKind),
    Delete(CheckpointKind),
}

/// nnU-Net's checkpoint policy; tracks the best EMA pseudo Dice.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointPolicy {
    save_every: usize,
    num_epochs: usize,
    best_ema: Option<f64>,
}

impl CheckpointPolicy {
    /// `best_ema`: the best EMA pseudo Dice so far (from a resumed checkpoint).
    pub fn new(save_every: usize, num_epochs: usize, best_ema: Option<f64>) -> Self {
        CheckpointPolicy {
            save_every: save_every.max(1),
            num_epochs,
            best_ema,
        }
    }

    pub fn best_ema(&self) -> Option<f64> {
        self.best_ema
    }

    /// What to save after `epochs_done` epochs, the last of which ended with EMA pseudo Dice
    /// `ema`: `Best` first (when `ema` is a new best), then `Latest` (every `save_every`
    /// epochs, except after the last epoch, which gets `Final`).
    pub fn after_epoch(&mut self, epochs_done: usize, ema: f64) -> Vec<CheckpointAction> {
        let mut actions = vec![];
        if ema.is_finite() && self.best_ema.is_none_or(|b| ema > b) {
            self.best_ema = Some(ema);
            actions.push(CheckpointAction::Save(CheckpointKind::Best));
        }
        if epochs_done.is_multiple_of(self.save_every) && epochs_done != self.num_epochs {
            actions.push(CheckpointAction::Save(CheckpointKind::Latest));
        }
        actions
    }

    /// What to do when training ends.
    pub fn at_end(&self) -> Vec<CheckpointAction> {
        vec![
            CheckpointAction::Save(CheckpointKind::Final),
            CheckpointAction::Delete(CheckpointKind::Latest),
        ]
    }
}

/// The training state a checkpoint records besides the tensors.
#[derive(Debug, Clone, Copy)]
pub struct TrainingState<'a> {
    /// Epochs done (the epoch a resumed run starts at).
    pub epoch: usize,
    pub logging: &'a TrainingLog,
    pub best_ema: Option<f64>,
    pub network: &'a NetworkMeta,
    /// Set when a graceful stop saves in the middle of epoch `epoch`.
    pub mid_epoch: Option<&'a MidEpoch>,
}

/// Writes the checkpoints of one fold.
#[derive(Debug, Clone)]
pub struct CheckpointSaver {
    fold_folder: PathBuf,
    trainer_name: String,
    init_args: serde_json::Value,
    mirror_axes: Vec<usize>,
    trainer_config: TrainerConfig,
    /// `--disable_checkpointing`: [`CheckpointSaver::save`] writes nothing.
    disabled: bool,
}

impl CheckpointSaver {
    /// `init_args`: nnU-Net's trainer arguments (plans, configuration, fold, dataset_json,
    /// device); `mirror_axes`: the axes inference may mirror.
    pub fn new(
        fold_folder: PathBuf,
        trainer_name: &str,
        init_args: serde_json::Value,
        mirror_axes: Vec<usize>,
        trainer_config: &TrainerConfig,
    ) -> Self {
        CheckpointSaver {
            fold_folder,
            trainer_name: trainer_name.to_string(),
            init_args,
            mirror_axes,
            trainer_config: trainer_config.clone(),
            disabled: false,
        }
    }

    /// A saver that writes no checkpoint when `disabled` (`--disable_checkpointing`, as
    /// nnU-Net's `save_checkpoint` does then).
    pub fn disabled(self, disabled: bool) -> Self {
        CheckpointSaver { disabled, ..self }
    }

    /// Whether checkpoints are written.
    pub fn is_enabled(&self) -> bool {
        !self.disabled
    }

    /// The file of a checkpoint kind.
    pub fn path(&self, kind: CheckpointKind) -> PathBuf {
        self.fold_folder.join(kind.file_name())
    }

    /// Carries out `actions` with the learner's current weights and optimizer state.
    pub fn apply(
        &self,
        actions: &[CheckpointAction],
        state: TrainingState<'_>,
        learner: &Learner,
    ) -> Result<(), TrainError> {
        for action in actions {
            match *action {
                CheckpointAction::Save(kind) => self.save(kind, state, learner)?,
                CheckpointAction::Delete(kind) => self.delete(kind)?,
            }
        }
        Ok(())
    }

    /// Writes one checkpoint (atomically); nothing when disabled.
    pub fn save(
        &self,
        kind: CheckpointKind,
        state: TrainingState<'_>,
        learner: &Learner,
    ) -> Result<(), TrainError> {
        if self.disabled {
            return Ok(());
        }
        self.write(kind, state, learner)
    }

    /// Writes one checkpoint (atomically), also when disabled: the final validation of a run
    /// with `--disable_checkpointing` predicts from a `checkpoint_final` it removes afterwards.
    pub fn write(
        &self,
        kind: CheckpointKind,
        state: TrainingState<'_>,
        learner: &Learner,
    ) -> Result<(), TrainError> {
        let ck = Checkpoint {
            meta: CheckpointMeta {
                format: CHECKPOINT_FORMAT.into(),
                trainer_name: self.trainer_name.clone(),
                current_epoch: state.epoch,
                logging: state.logging.clone(),
                best_ema: state.best_ema,
                init_args: self.init_args.clone(),
                inference_allowed_mirroring_axes: self.mirror_axes.clone(),
                trainer_config: self.trainer_config.clone(),
                network: state.network.clone(),
                mid_epoch: state.mid_epoch.cloned(),
            },
            network_weights: learner.network_weights(),
            optimizer_state: learner.optimizer.state(),
        };
        ck.save(&self.path(kind))?;
        Ok(())
    }

    /// Removes a checkpoint if it exists.
    pub fn delete(&self, kind: CheckpointKind) -> Result<(), TrainError> {
        let path = self.path(kind);
        if path.is_file() {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CheckpointAction::*;
    use CheckpointKind::*;

    #[test]
    fn best_is_saved_when_the_ema_improves() {
        let mut p = CheckpointPolicy::new(50, 1000, None);
        assert_eq!(p.after_epoch(1, f64::NAN), vec![]);
        assert_eq!(p.best_ema(), None);
        assert_eq!(p.after_epoch(2, 0.3), vec![Save(Best)]);
        assert_eq!(p.after_epoch(3, 0.3), vec![], "equal is not better");
        assert_eq!(p.after_epoch(4, 0.2), vec![]);
        assert_eq!(p.after_epoch(5, 0.4), vec![Save(Best)]);
        assert_eq!(p.best_ema(), Some(0.4));
        // a resumed run keeps its best
        let mut r = CheckpointPolicy::new(50, 1000, Some(0.5));
        assert_eq!(r.after_epoch(6, 0.45), vec![]);
    }

    #[test]
    fn latest_every_save_every_epochs_but_not_at_the_end() {
        let mut p = CheckpointPolicy::new(2, 6, Some(1.0));
        let latest: Vec<usize> = (1..=6)
            .filter(|&d| p.after_epoch(d, 0.0) == vec![Save(Latest)])
            .collect();
        assert_eq!(latest, vec![2, 4]);
        let mut p = CheckpointPolicy::new(1, 3, None);
        assert_eq!(p.after_epoch(1, 0.5), vec![Save(Best), Save(Latest)]);
        assert_eq!(p.after_epoch(3, 0.6), vec![Save(Best)]);
        assert_eq!(p.at_end(), vec![Save(Final), Delete(Latest)]);
    }
}
