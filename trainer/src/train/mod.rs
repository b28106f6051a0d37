//! The training loop: nnU-Net's `nnUNetTrainer.run_training` on candle.
//!
//! The parts: [`setup`] reads the plans and resolves the network; a [`session`] opens the
//! folders, resumes, builds the network and its [`step::Learner`], starts the loaders, writes
//! `debug.json` and runs the epochs; [`step`] is one training / validation step (shared with
//! `nnseg bench_train`); [`checkpointing`] decides what to save after an epoch and saves it;
//! [`epoch_log`] writes nnU-Net's log lines; [`hooks`] add what only some networks need
//! (RUNext's classification-presence loss, growth), so the session and the steps know neither.
//!
//! [`train`] reads the preprocessed dataset and plans, builds the network from the
//! configuration, and runs epochs of `num_iterations_per_epoch` training steps (forward,
//! deep-supervision loss, backward, gradient clipping at 12, SGD with Nesterov momentum and a
//! per-epoch poly learning rate) and `num_val_iterations_per_epoch` validation steps (loss +
//! online pseudo Dice), writing nnU-Net's results layout:
//!
//! ```text
//! results_root/DatasetXXX_Name/{trainer}__{plans}__{configuration}/
//!     plans.json  dataset.json  dataset_fingerprint.json
//!     fold_{f}/checkpoint_{best,latest,final}.safetensors  training_log_*.txt  progress.png  debug.json
//! ```

pub mod checkpointing;
pub mod epoch_log;
pub mod hooks;
pub mod live;
pub mod metrics;
mod oom;
pub mod pretrained;
mod session;
mod setup;
pub mod step;
pub mod stop;

pub use live::{IterationProgress, ProgressHook, TrainProgress};
pub use oom::{is_out_of_memory, OutOfMemoryError};
pub use stop::{StopFlag, Stopped, STOPPED_EXIT_CODE};

use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointKind};
use crate::config::{ConfigError, TrainerConfig};
use crate::data::{self, DataError, Fold, PreprocessedDataset};
use crate::growth::GrowthError;
use crate::logging::TrainingLog;
use crate::optim::OptimError;
use crate::progress::ProgressError;
use architectures::network::ArchError;
use architectures::registry::Registry;
use candle_core::{DType, Device};
use datasets::layout::ModelDir;
use epoch_log::RunLog;
use session::Session;
use setup::Setup;
use std::path::{Path, PathBuf};

/// Everything `nnseg train` needs.
#[derive(Clone)]
pub struct TrainRequest {
    /// `nnUNet_preprocessed/DatasetXXX_Name` (holds `{plans_name}.json`, `dataset.json`,
    /// `dataset_fingerprint.json`, `splits_final.json` and the data folders).
    pub preprocessed_dataset_folder: PathBuf,
    /// `nnUNet_results`.
    pub results_root: PathBuf,
    /// `DatasetXXX_Name`.
    pub dataset_name: String,
    /// Plans identifier (`nnUNetPlans`).
    pub plans_name: String,
    /// Configuration name (`3d_fullres`, `2d`, ...).
    pub configuration: String,
    pub fold: Fold,
    /// Name used in the output folder and checkpoints (`nnUNetTrainer`, a preset name, ...).
    pub trainer_name: String,
    pub config: TrainerConfig,
    pub device: Device,
    /// Resume from `checkpoint_final` / `checkpoint_latest` / `checkpoint_best` (`--c`).
    pub continue_training: bool,
    /// Only run the final validation (`--val`).
    pub validation_only: bool,
    /// Export softmax probabilities in the final validation (`--npz`).
    pub export_npz: bool,
    /// Architectures that can be built (later features register more).
    pub registry: Registry,
    /// Echo the training log to stdout.
    pub echo_log: bool,
    /// Graceful stop (see [`stop`]): checked after every training iteration and epoch.
    pub stop: StopFlag,
    /// Live progress events (iterations, loss, s/iteration, ETA) for a display.
    pub progress: Option<ProgressHook>,
    /// `-pretrained_weights`: initialise the network from this checkpoint (an nnseg
    /// `.safetensors` checkpoint or an nnU-Net `.pth`) before training (see [`pretrained`]).
    pub pretrained_weights: Option<PathBuf>,
    /// `--disable_checkpointing`: keep no checkpoint (the final validation predicts from a
    /// `checkpoint_final` written for it and removed afterwards).
    pub disable_checkpointing: bool,
    /// `--val_best`: the final validation uses `checkpoint_best` instead of
    /// `checkpoint_final`.
    pub val_best: bool,
}

impl TrainRequest {
    /// A request with nnU-Net's defaults: plans `nnUNetPlans`, no resume, no `--val`, no
    /// `--npz`, the default registry, log echoed to stdout.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        preprocessed_dataset_folder: impl Into<PathBuf>,
        results_root: impl Into<PathBuf>,
        dataset_name: impl Into<String>,
        configuration: impl Into<String>,
        fold: Fold,
        trainer_name: impl Into<String>,
        config: TrainerConfig,
        device: Device,
    ) -> Self {
        TrainRequest {
            preprocessed_dataset_folder: preprocessed_dataset_folder.into(),
            results_root: results_root.into(),
            dataset_name: dataset_name.into(),
            plans_name: "nnUNetPlans".into(),
            configuration: configuration.into(),
            fold,
            trainer_name: trainer_name.into(),
            config,
            device,
            continue_training: false,
            validation_only: false,
            export_npz: false,
            registry: Registry::default(),
            echo_log: true,
            stop: StopFlag::new(),
            progress: None,
            pretrained_weights: None,
            disable_checkpointing: false,
            val_best: false,
        }
    }

    /// `results_root/DatasetXXX/{trainer}__{plans}__{configuration}`.
    pub fn model_folder(&self) -> PathBuf {
        self.results_root
            .join(&self.dataset_name)
            .join(datasets::layout::model_folder_name(
                &self.trainer_name,
                &self.plans_name,
                &self.configuration,
            ))
    }

    /// `model_folder/fold_{f}`.
    pub fn fold_folder(&self) -> PathBuf {
        datasets::layout::ModelDir::at(self.model_folder()).fold(self.fold)
    }
}

/// What a finished [`train`] call reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub fold_folder: PathBuf,
    pub log_file: PathBuf,
    /// Epoch training started at (0, or the resumed checkpoint's).
    pub start_epoch: usize,
    /// Epochs completed in total (= `num_epochs` after a full run).
    pub epochs_completed: usize,
    pub final_checkpoint: PathBuf,
    pub best_ema: Option<f64>,
    pub logging: TrainingLog,
    /// Mean wall time of a training iteration in this run (data wait included), seconds.
    pub mean_train_iteration_s: f64,
    /// Mean time per training iteration spent blocked on the data loader, seconds.
    pub mean_data_wait_s: f64,
    /// Mean time per training iteration spent on host→device copy, forward, loss, backward,
    /// clipping and the optimizer step, seconds (`mean_train_iteration_s − mean_data_wait_s`).
    pub mean_step_s: f64,
    /// Number of training iterations run by this call.
    pub train_iterations: usize,
    /// Set when a requested stop ended training early: `final_checkpoint` is then the
    /// `checkpoint_latest` to continue from with `--c`.
    pub stopped: Option<Stopped>,
}

/// Training errors; each names the file, case or setting involved.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Plans(#[from] plans::PlansError),
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Progress(#[from] ProgressError),
    /// Another training holds this fold.
    #[error(transparent)]
    FoldLock(#[from] crate::fold_lock::FoldLockError),
    /// Invalid growth options, or a network that cannot grow.
    #[error(transparent)]
    Growth(Box<GrowthError>),
    /// Growing the network after an epoch failed.
    #[error("epoch {epoch}: {source}")]
    GrowthAtEpoch {
        epoch: usize,
        #[source]
        source: Box<GrowthError>,
    },
    #[error("final validation: {0}")]
    Predict(#[from] Box<crate::predict::PredictError>),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("--c (continue training) and --val (validation only) cannot be combined")]
    ContinueWithValidationOnly,
    #[error(
        "-pretrained_weights {} and --c cannot be combined: continue a training or start one \
         from pretrained weights",
        path.display()
    )]
    PretrainedWithContinue { path: PathBuf },
    #[error("--val_best cannot be combined with --disable_checkpointing (no checkpoint_best is written)")]
    ValBestWithoutCheckpoints,
    #[error("-pretrained_weights {}: {message}", path.display())]
    Pretrained { path: PathBuf, message: String },
    #[error(
        "{}: configurations.{configuration}.patch_size must have 2 or 3 entries, found \
         {patch_size:?}",
        plans_file.display()
    )]
    PatchDims {
        plans_file: PathBuf,
        configuration: String,
        patch_size: Vec<usize>,
    },
    #[error(
        "{}: deep supervision needs the pooling `strides` of the architecture: {source}",
        plans_file.display()
    )]
    DeepSupervisionStrides {
        plans_file: PathBuf,
        #[source]
        source: Box<ArchError>,
    },
    #[error(
        "network {network} returns {outputs} output(s) with deep supervision on; the plan's \
         strides allow 1 to {max}"
    )]
    DeepSupervisionOutputs {
        network: String,
        outputs: usize,
        max: usize,
    },
    #[error("fold {fold}: {train} training and {val} validation cases; both must be non-empty")]
    EmptyFold {
        fold: Fold,
        train: usize,
        val: usize,
    },
    #[error("--val: {} does not exist; train fold {fold} first (or continue it with --c)", path.display())]
    NoFinalCheckpoint { path: PathBuf, fold: Fold },
    #[error(
        "{}: the checkpoint was trained with a different network (architecture, channels or \
         heads) than this configuration builds",
        path.display()
    )]
    NetworkMismatch { path: PathBuf },
    #[error(
        "{}: checkpoint does not match the network: missing {missing:?}, unexpected \
         {unexpected:?}",
        path.display()
    )]
    WeightNames {
        path: PathBuf,
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    #[error(
        "{}: the checkpoint has weights the network does not build without deep supervision \
         ({}): it was written when deep-supervision heads were always built; predict from it \
         (inference ignores them) or train this fold anew",
        path.display(),
        names.join(", ")
    )]
    UnbuiltHeads { path: PathBuf, names: Vec<String> },
    #[error("{}: weight `{name}` has shape {found:?}, the network expects {expected:?}", path.display())]
    WeightShape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A data-loader thread ended (`training` or `validation`).
    #[error("the {0} data loader stopped")]
    LoaderStopped(&'static str),
    #[error(
        "the network returns {outputs} output(s) but the data loader produces {targets} \
         deep-supervision target(s); the architecture's `strides` and its outputs disagree"
    )]
    OutputCount { outputs: usize, targets: usize },
    #[error("output {output} has spatial shape {found:?} but its target has {expected:?}")]
    OutputShape {
        output: usize,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A device allocation failed in a training step (see [`OutOfMemoryError`]).
    #[error(transparent)]
    OutOfMemory(Box<OutOfMemoryError>),
}

impl From<GrowthError> for TrainError {
    fn from(e: GrowthError) -> Self {
        TrainError::Growth(Box::new(e))
    }
}

trait Ctx<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, TrainError>;
}

impl<T> Ctx<T> for candle_core::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, TrainError> {
        self.map_err(|source| TrainError::Candle {
            context: context(),
            source,
        })
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Trains one fold (see the module documentation).
pub fn train(req: &TrainRequest) -> Result<TrainSummary, TrainError> {
    if req.continue_training && req.validation_only {
        return Err(TrainError::ContinueWithValidationOnly);
    }
    if let (Some(path), true) = (&req.pretrained_weights, req.continue_training) {
        return Err(TrainError::PretrainedWithContinue { path: path.clone() });
    }
    if req.val_best && req.disable_checkpointing {
        return Err(TrainError::ValBestWithoutCheckpoints);
    }
    if req.validation_only {
        return validation_only(req);
    }
    let setup = Setup::prepare(req)?;
    let oom = oom::OomInfo {
        dataset: req.dataset_name.clone(),
        configuration: req.configuration.clone(),
        plans_file: setup.plans_file.clone(),
        network: setup.spec.network_class_name.clone(),
        patch_size: setup.cfg.patch_size.clone(),
        batch_size: setup.batch_size,
        bf16: req.config.amp.compute_dtype(&req.device) != DType::F32,
    };
    let run = || Session::open(req, setup)?.run();
    run().map_err(|e| oom.classify(e))
}

/// The checkpoint the final validation predicts with: `checkpoint_best` with `--val_best`,
/// else `checkpoint_final`.
fn validation_checkpoint(req: &TrainRequest) -> CheckpointKind {
    if req.val_best {
        CheckpointKind::Best
    } else {
        CheckpointKind::Final
    }
}

/// Predicts the fold's validation cases with `checkpoint_final` (`checkpoint_best` with
/// `--val_best`) into `fold_X/validation/` and evaluates them (`validation/summary.json`),
/// logging the mean Dice.
fn final_validation(
    req: &TrainRequest,
    val_cases: &[String],
    num_workers: usize,
    log: &mut RunLog,
) -> Result<(), TrainError> {
    let pre = &req.preprocessed_dataset_folder;
    let kind = validation_checkpoint(req);
    if req.val_best {
        log.say(&format!("--val_best: validating with {}", kind.file_name()))?;
    }
    let stem = kind.file_name().trim_end_matches(".safetensors");
    let validation = crate::predict::validate_fold(
        &req.model_folder(),
        req.fold,
        stem,
        pre,
        val_cases,
        req.export_npz,
        num_workers,
        &req.device,
        req.config.amp,
        &req.registry,
    )
    .map_err(Box::new)?;
    match &validation.summary {
        Some(s) => {
            log.say("Validation complete")?;
            log.say(&format!(
                "Mean Validation Dice:  {}",
                epoch_log::py_float(s.foreground_dice())
            ))?;
        }
        None => log.say(&format!(
            "WARNING: {} does not exist: the {} validation predictions in {} were not evaluated",
            datasets::layout::PreprocessedDir::new(pre)
                .gt_segmentations()
                .display(),
            validation.predictions.len(),
            ModelDir::at(req.model_folder())
                .validation(req.fold)
                .display()
        ))?,
    }
    Ok(())
}

/// `--val`: only the final validation of an already trained fold (nnU-Net's
/// `only_run_validation`), from `checkpoint_final` (`checkpoint_best` with `--val_best`).
fn validation_only(req: &TrainRequest) -> Result<TrainSummary, TrainError> {
    let setup = Setup::prepare(req)?;
    let fold_folder = req.fold_folder();
    let final_path = fold_folder.join(validation_checkpoint(req).file_name());
    if !final_path.is_file() {
        return Err(TrainError::NoFinalCheckpoint {
            path: final_path,
            fold: req.fold,
        });
    }
    // one writer per fold: --val rewrites the fold's validation/ (held until it returns)
    let _lock = crate::fold_lock::FoldLock::acquire(&fold_folder)?;
    session::remove_stale_temp_files(&[&fold_folder])?;
    let ck = Checkpoint::load(&final_path, &Device::Cpu)?;
    let pre = &req.preprocessed_dataset_folder;
    let data_folder = pre.join(&setup.cfg.data_identifier);
    data::require_complete(&data_folder, &setup.plans, &req.configuration)?;
    let dataset = PreprocessedDataset::open(&data_folder)?;
    let case_ids = dataset.case_ids().to_vec();
    let splits = data::load_or_create_splits(pre, &case_ids)?;
    let split = data::select_fold(&splits, req.fold, &case_ids)?;
    let mut log = RunLog::create(&fold_folder, req.echo_log)?;
    log.say(&format!(
        "--val: validating fold {} with {} (epoch {}), {} cases",
        req.fold,
        final_path.display(),
        ck.meta.current_epoch,
        split.val.len()
    ))?;
    let num_workers = req.config.num_workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().clamp(1, 12))
            .unwrap_or(2)
    });
    final_validation(req, &split.val, num_workers, &mut log)?;
    Ok(TrainSummary {
        fold_folder,
        log_file: log.path().to_path_buf(),
        start_epoch: ck.meta.current_epoch,
        epochs_completed: ck.meta.current_epoch,
        final_checkpoint: final_path,
        best_ema: ck.meta.best_ema,
        logging: ck.meta.logging,
        mean_train_iteration_s: 0.0,
        mean_data_wait_s: 0.0,
        mean_step_s: 0.0,
        train_iterations: 0,
        stopped: None,
    })
}

#[cfg(test)]
mod tests;
