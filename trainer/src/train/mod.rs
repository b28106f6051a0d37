//! The training loop: nnU-Net's `nnUNetTrainer.run_training` on candle.
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

pub mod metrics;
mod oom;

pub use oom::{is_out_of_memory, OutOfMemoryError};

use crate::amp::forward_autocast;
use crate::checkpoint::{
    find_resume_checkpoint, Checkpoint, CheckpointError, CheckpointKind, CheckpointMeta,
    NetworkMeta, CHECKPOINT_FORMAT,
};
use crate::config::{ConfigError, TrainerConfig};
use crate::data::{self, DataError, Fold, LabelInfo, PreprocessedDataset};
use crate::logging::{now_seconds, LogFile, TrainingLog};
use crate::loss::{self, DcAndBceLoss, DcAndCeLoss, DeepSupervisionLoss, LossOptions, SegLoss};
use crate::optim::{poly_lr, OptimError, SgdNesterov, SgdOptions};
use crate::progress::{plot_progress, ProgressError};
use architectures::registry::{ArchError, NetworkIo, Registry};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use metrics::DiceCounts;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

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
        }
    }

    /// `results_root/DatasetXXX/{trainer}__{plans}__{configuration}`.
    pub fn model_folder(&self) -> PathBuf {
        self.results_root.join(&self.dataset_name).join(format!(
            "{}__{}__{}",
            self.trainer_name, self.plans_name, self.configuration
        ))
    }

    /// `model_folder/fold_{f}`.
    pub fn fold_folder(&self) -> PathBuf {
        self.model_folder().join(format!("fold_{}", self.fold))
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
    #[error("{0}")]
    Unsupported(String),
    #[error("{}: {message}", path.display())]
    Resume { path: PathBuf, message: String },
    #[error("{0}")]
    Setup(String),
    /// A device allocation failed in a training step (see [`OutOfMemoryError`]).
    #[error(transparent)]
    OutOfMemory(Box<OutOfMemoryError>),
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

/// Everything set up before the first epoch.
struct Setup {
    plans: plans::Plans,
    cfg: plans::Configuration,
    ds_json: plans::DatasetJson,
    spec: plans::ArchitectureSpec,
    io: NetworkIo,
    labels: LabelInfo,
    batch_size: usize,
    ds_scales: Vec<Vec<f64>>,
    mirror_axes: Vec<usize>,
}

fn prepare(req: &TrainRequest) -> Result<Setup, TrainError> {
    req.config.validate()?;
    let pre = &req.preprocessed_dataset_folder;
    let plans_path = pre.join(format!("{}.json", req.plans_name));
    let (plans, cfg) = plans::Plans::load_configuration(&plans_path, &req.configuration)?;
    let ds_json = plans::DatasetJson::load(&pre.join("dataset.json"))?;
    // resolved now so an unknown network name fails before anything is written
    let spec = req.config.network_spec(&cfg.architecture, &req.registry)?;
    let io = NetworkIo {
        in_channels: architectures::import::num_input_channels(&cfg, &ds_json),
        num_classes: ds_json.num_segmentation_heads(),
        deep_supervision: req.config.enable_deep_supervision,
    };
    let dim = cfg.patch_size.len();
    if !(dim == 2 || dim == 3) {
        return Err(TrainError::Setup(format!(
            "{}: configurations.{}.patch_size must have 2 or 3 entries, found {:?}",
            plans_path.display(),
            req.configuration,
            cfg.patch_size
        )));
    }
    let ds_scales = if req.config.enable_deep_supervision {
        let strides = spec.strides(dim).map_err(|e| {
            TrainError::Setup(format!(
                "{}: deep supervision needs the pooling `strides` of the architecture: {e}",
                plans_path.display()
            ))
        })?;
        data::ds_scales_from_strides(&strides)
    } else {
        vec![vec![1.0; dim]]
    };
    let batch_size = req.config.batch_size.unwrap_or(cfg.batch_size);
    let mirror_axes = req.config.resolved_mirror_axes(dim);
    let labels = LabelInfo::from_dataset_json(&ds_json);
    Ok(Setup {
        plans,
        cfg,
        ds_json,
        spec,
        io,
        labels,
        batch_size,
        ds_scales,
        mirror_axes,
    })
}

/// The trainable variables (batch-norm running statistics excluded), sorted by name.
fn trainable_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<(String, Var)> = data
        .iter()
        .filter(|(n, _)| !is_buffer_name(n.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn network_weights(varmap: &VarMap) -> HashMap<String, Tensor> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

fn load_weights(
    varmap: &VarMap,
    weights: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<(), TrainError> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut missing: Vec<&String> = data.keys().filter(|k| !weights.contains_key(*k)).collect();
    missing.sort();
    let mut unexpected: Vec<&String> = weights.keys().filter(|k| !data.contains_key(*k)).collect();
    unexpected.sort();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(TrainError::Resume {
            path: path.to_path_buf(),
            message: format!(
                "checkpoint does not match the network: missing {missing:?}, unexpected {unexpected:?}"
            ),
        });
    }
    for (name, var) in data.iter() {
        let t = &weights[name];
        if t.dims() != var.dims() {
            return Err(TrainError::Resume {
                path: path.to_path_buf(),
                message: format!(
                    "weight `{name}` has shape {:?}, the network expects {:?}",
                    t.dims(),
                    var.dims()
                ),
            });
        }
        let t = t
            .to_device(var.device())
            .and_then(|t| t.to_dtype(var.dtype()))
            .ctx(|| format!("loading weight `{name}`"))?;
        var.set(&t).ctx(|| format!("loading weight `{name}`"))?;
    }
    Ok(())
}

fn make_loss(setup: &Setup) -> DeepSupervisionLoss {
    let opts = LossOptions {
        batch_dice: setup.cfg.batch_dice,
        ignore_label: setup.labels.ignore_label,
        ..LossOptions::default()
    };
    let inner: Box<dyn SegLoss> = if setup.labels.regions.is_some() {
        Box::new(DcAndBceLoss::new(opts))
    } else {
        Box::new(DcAndCeLoss::new(opts))
    };
    let n_outputs = if setup.io.deep_supervision {
        setup.ds_scales.len()
    } else {
        1
    };
    DeepSupervisionLoss::new(inner, loss::deep_supervision_weights(n_outputs))
}

/// A host batch as device tensors: input and one target per output resolution.
fn to_tensors(
    batch: data::HostBatch,
    device: &Device,
) -> Result<(Tensor, Vec<Tensor>), TrainError> {
    let x = Tensor::from_vec(batch.data, batch.data_shape.clone(), device)
        .ctx(|| format!("batch input of shape {:?}", batch.data_shape))?;
    let mut targets = Vec::with_capacity(batch.targets.len());
    for (values, shape) in batch.targets {
        targets.push(
            Tensor::from_vec(values, shape.clone(), device)
                .ctx(|| format!("batch target of shape {shape:?}"))?,
        );
    }
    Ok((x, targets))
}

fn fmt_list(v: &[f64]) -> String {
    let items: Vec<String> = v.iter().map(|x| py_float(round4(*x))).collect();
    format!("[{}]", items.join(", "))
}

/// Python's `str(float)` for the values we log (`0.0`, `0.1234`, `nan`).
fn py_float(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else {
        format!("{x:?}")
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn copy_json(src: &Path, dst: &Path) -> Result<(), TrainError> {
    let bytes = std::fs::read(src).map_err(io_err(src))?;
    plans::io::write_atomic(dst, &bytes)?;
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Trains one fold (see the module documentation).
pub fn train(req: &TrainRequest) -> Result<TrainSummary, TrainError> {
    if req.continue_training && req.validation_only {
        return Err(TrainError::Setup(
            "--c (continue training) and --val (validation only) cannot be combined".into(),
        ));
    }
    if req.validation_only {
        return validation_only(req);
    }
    let setup = prepare(req)?;
    let oom = oom::OomInfo {
        dataset: req.dataset_name.clone(),
        configuration: req.configuration.clone(),
        plans_file: req
            .preprocessed_dataset_folder
            .join(format!("{}.json", req.plans_name)),
        network: setup.spec.network_class_name.clone(),
        patch_size: setup.cfg.patch_size.clone(),
        batch_size: setup.batch_size,
        bf16: req.config.amp.compute_dtype(&req.device) != DType::F32,
    };
    train_prepared(req, setup).map_err(|e| oom.classify(e))
}

/// [`train`] after [`prepare`].
fn train_prepared(req: &TrainRequest, setup: Setup) -> Result<TrainSummary, TrainError> {
    let cfgt = &req.config;
    let device = &req.device;

    // output folders and the json copies nnU-Net makes at on_train_start
    let model_folder = req.model_folder();
    let fold_folder = req.fold_folder();
    std::fs::create_dir_all(&fold_folder).map_err(io_err(&fold_folder))?;
    let pre = &req.preprocessed_dataset_folder;
    copy_json(
        &pre.join(format!("{}.json", req.plans_name)),
        &model_folder.join("plans.json"),
    )?;
    copy_json(
        &pre.join("dataset.json"),
        &model_folder.join("dataset.json"),
    )?;
    let fp = pre.join("dataset_fingerprint.json");
    if fp.is_file() {
        copy_json(&fp, &model_folder.join("dataset_fingerprint.json"))?;
    }
    let mut log = LogFile::create(&fold_folder, req.echo_log).map_err(io_err(&fold_folder))?;
    let log_path = log.path().to_path_buf();
    let mut say = |m: &str| log.log(m).map_err(io_err(&log_path));

    // a resumed growable network is rebuilt with the widths its checkpoint recorded
    let resume = if req.continue_training {
        match find_resume_checkpoint(&fold_folder) {
            Some((kind, path)) => Some((kind, Checkpoint::load(&path, device)?, path)),
            None => None,
        }
    } else {
        None
    };
    let mut setup = setup;
    if let Some((_, ck, _)) = &resume {
        if let Some(g) = ck.meta.network.arch_kwargs.get(GROWN_WIDTHS) {
            setup
                .spec
                .arch_kwargs
                .insert(GROWN_WIDTHS.into(), g.clone());
        }
    }

    // network, optimizer, loss
    let (varmap, mut network) =
        req.registry
            .build_initialized(&setup.spec, &setup.io, cfgt.seed, device)?;
    let vars = trainable_vars(&varmap);
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut optimizer = SgdNesterov::new(
        vars.clone(),
        SgdOptions {
            lr: cfgt.initial_lr,
            momentum: cfgt.momentum,
            weight_decay: cfgt.weight_decay,
            nesterov: true,
        },
    );
    let mut clip_vars: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let compute_dtype = cfgt.amp.compute_dtype(device);
    let growth = if cfgt.growth.enabled() {
        if network.as_growable().is_none() {
            return Err(TrainError::Setup(format!(
                "growth options are set but network {} cannot grow (use -tr growable_unet)",
                setup.spec.network_class_name
            )));
        }
        Some(
            crate::growth::GrowthSchedule::new(cfgt.growth.clone())
                .map_err(|e| TrainError::Setup(e.to_string()))?,
        )
    } else {
        None
    };
    if setup.io.deep_supervision {
        // Networks other than nnU-Net's may have fewer decoder resolutions than the plan has
        // strides: train on the first k deep-supervision scales (one probe forward pass).
        let n_out = probe_output_count(network.as_ref(), &setup, device, compute_dtype)?;
        if n_out == 0 || n_out > setup.ds_scales.len() {
            return Err(TrainError::Setup(format!(
                "network {} returns {n_out} output(s) with deep supervision on; the plan's \
                 strides allow 1 to {}",
                setup.spec.network_class_name,
                setup.ds_scales.len()
            )));
        }
        setup.ds_scales.truncate(n_out);
    }
    let setup = setup;
    let ds_loss = make_loss(&setup);

    let init_args = json!({
        "plans": setup.plans.plans_name,
        "configuration": req.configuration,
        "fold": req.fold.to_string(),
        "dataset_json": setup.ds_json.to_json(),
        "device": format!("{:?}", device.location()),
    });
    let mut network_meta = NetworkMeta {
        network_class_name: setup.spec.network_class_name.clone(),
        arch_kwargs: setup.spec.arch_kwargs.clone(),
        input_channels: setup.io.in_channels,
        num_segmentation_heads: setup.io.num_classes,
        enable_deep_supervision: setup.io.deep_supervision,
    };

    // resume
    let mut logging = TrainingLog::default();
    let mut best_ema: Option<f64> = None;
    let mut start_epoch = 0usize;
    if req.continue_training {
        match resume {
            Some((kind, ck, path)) => {
                if ck.meta.network != network_meta {
                    return Err(TrainError::Resume {
                        path,
                        message: "the checkpoint was trained with a different network \
                                  (architecture, channels or heads) than this configuration builds"
                            .into(),
                    });
                }
                load_weights(&varmap, &ck.network_weights, &path)?;
                optimizer.load_state(ck.optimizer_state)?;
                start_epoch = ck.meta.current_epoch;
                logging = ck.meta.logging;
                logging.truncate(start_epoch);
                best_ema = ck.meta.best_ema;
                say(&format!(
                    "Resuming from {} ({:?}) at epoch {start_epoch}",
                    path.display(),
                    kind
                ))?;
            }
            None => say(
                "WARNING: Cannot continue training because there seems to be no checkpoint \
                 available to continue from. Starting a new training...",
            )?,
        }
    }

    // data
    let data_folder = pre.join(&setup.cfg.data_identifier);
    data::require_complete(&data_folder, &setup.plans, &req.configuration)?;
    let dataset = Arc::new(match &setup.cfg.previous_stage {
        None => PreprocessedDataset::open(&data_folder)?,
        Some(prev) => PreprocessedDataset::open_with_prev_stage(
            &data_folder,
            data::cascade::PrevStage {
                folder: crate::predict::prev_stage_folder(&model_folder, prev, &req.configuration)
                    .map_err(Box::new)?,
                foreground_labels: setup.ds_json.foreground_labels(),
            },
        )?,
    });
    let case_ids = dataset.case_ids().to_vec();
    let splits = data::load_or_create_splits(pre, &case_ids)?;
    let split = data::select_fold(&splits, req.fold, &case_ids)?;
    if split.train.is_empty() || split.val.is_empty() {
        return Err(TrainError::Setup(format!(
            "fold {}: {} training and {} validation cases; both must be non-empty",
            req.fold,
            split.train.len(),
            split.val.len()
        )));
    }

    let num_workers = cfgt.num_workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().saturating_sub(1).clamp(1, 12))
            .unwrap_or(2)
    });
    // Bit-exact resume: batch k of a loader depends only on (seed, k), so a run resumed at
    // epoch e continues both batch streams where the uninterrupted run would be after e
    // epochs. Together with the exact weights, momentum buffers and the per-epoch poly LR
    // stored/recomputed from the checkpoint, `1 epoch + --c 1 epoch` gives the same weights
    // as `2 epochs` on CPU. Nothing else in a step is random for nnU-Net's default networks
    // (no dropout); a plans file that enables `dropout_op` draws from candle's device RNG,
    // which is not checkpointed, so such a resumed run is statistically but not bitwise
    // equal.
    let loader_seed = cfgt.seed;
    let train_first_batch = (start_epoch as u64) * (cfgt.num_iterations_per_epoch as u64);
    let val_first_batch = (start_epoch as u64) * (cfgt.num_val_iterations_per_epoch as u64);
    let mut aug = data::AugmentationConfig::nnunet_default(&setup.cfg.patch_size);
    aug.mirror_axes = setup.mirror_axes.clone();
    let train_opts = data::LoaderOptions {
        patch_size: setup.cfg.patch_size.clone(),
        batch_size: setup.batch_size,
        oversample_foreground_percent: cfgt.oversample_foreground_percent,
        ds_scales: setup.ds_scales.clone(),
        seed: loader_seed,
        first_batch: train_first_batch,
        num_workers,
        queue_len: num_workers.max(6),
        augment: cfgt.data_augmentation,
        augmentation: Some(aug),
        use_mask_for_norm: setup.cfg.use_mask_for_norm.clone(),
    };
    let growth_batch_opts = data::LoaderOptions {
        augment: false,
        ..train_opts.clone()
    };
    let val_opts = data::LoaderOptions {
        seed: loader_seed ^ 0x5555_5555,
        first_batch: val_first_batch,
        num_workers: (num_workers / 2).max(1),
        queue_len: (num_workers / 2).max(1),
        augment: false,
        ..train_opts.clone()
    };
    let mut train_loader = data::BackgroundLoader::new(
        dataset.clone(),
        split.train.clone(),
        train_opts,
        setup.labels.clone(),
    )?;
    let mut val_loader = data::BackgroundLoader::new(
        dataset.clone(),
        split.val.clone(),
        val_opts,
        setup.labels.clone(),
    )?;

    // debug.json (nnU-Net dumps the trainer's attributes)
    let debug = json!({
        "trainer_name": req.trainer_name,
        "trainer_config": cfgt,
        "plans_name": req.plans_name,
        "configuration": req.configuration,
        "configuration_manager": setup.cfg.to_json(),
        "fold": req.fold.to_string(),
        "device": format!("{:?}", device.location()),
        "compute_dtype": compute_dtype.as_str(),
        "network_class_name": setup.spec.network_class_name,
        "num_input_channels": setup.io.in_channels,
        "num_segmentation_heads": setup.io.num_classes,
        "trainable_parameters": n_params,
        "batch_size": setup.batch_size,
        "patch_size": setup.cfg.patch_size,
        "deep_supervision_scales": setup.ds_scales,
        "deep_supervision_weights": ds_loss.weights(),
        "inference_allowed_mirroring_axes": setup.mirror_axes,
        "loss": if setup.labels.regions.is_some() { "DC_and_BCE_loss" } else { "DC_and_CE_loss" },
        "num_train_cases": split.train.len(),
        "num_val_cases": split.val.len(),
        "loader_workers": num_workers,
        "seed": cfgt.seed,
        "hostname": hostname(),
        "nnseg_version": env!("CARGO_PKG_VERSION"),
    });
    plans::io::write_json_atomic(&fold_folder.join("debug.json"), &debug)?;

    let make_meta = |epoch: usize,
                     logging: &TrainingLog,
                     best: Option<f64>,
                     network_meta: &NetworkMeta| CheckpointMeta {
        format: CHECKPOINT_FORMAT.into(),
        trainer_name: req.trainer_name.clone(),
        current_epoch: epoch,
        logging: logging.clone(),
        best_ema: best,
        init_args: init_args.clone(),
        inference_allowed_mirroring_axes: setup.mirror_axes.clone(),
        trainer_config: cfgt.clone(),
        network: network_meta.clone(),
    };
    let save = |kind: CheckpointKind,
                epoch: usize,
                logging: &TrainingLog,
                best: Option<f64>,
                optimizer: &SgdNesterov,
                network_meta: &NetworkMeta|
     -> Result<(), TrainError> {
        let ck = Checkpoint {
            meta: make_meta(epoch, logging, best, network_meta),
            network_weights: network_weights(&varmap),
            optimizer_state: optimizer.state(),
        };
        ck.save(&fold_folder.join(kind.file_name()))?;
        Ok(())
    };

    if start_epoch == 0 {
        say(&format!(
            "nnseg {}: trainer {}, configuration {}, fold {}, {} training / {} validation cases, \
             batch size {}, patch size {:?}, {} trainable parameters",
            env!("CARGO_PKG_VERSION"),
            req.trainer_name,
            req.configuration,
            req.fold,
            split.train.len(),
            split.val.len(),
            setup.batch_size,
            setup.cfg.patch_size,
            n_params
        ))?;
        say("progress.png: blue = train loss, red = val loss, green dashed = pseudo dice, green solid = EMA pseudo dice (right axis); then epoch time [s]; then learning rate")?;
    }

    say(&crate::amp::describe(compute_dtype))?;

    let fg_count = setup
        .labels
        .regions
        .as_ref()
        .map(|r| r.len())
        .unwrap_or(setup.io.num_classes.saturating_sub(1));
    let mut iter_time = 0.0f64;
    let mut wait_time = 0.0f64;
    let mut iters = 0usize;
    #[cfg(feature = "cuda")]
    let mut gpu_peak = 0u64;
    for epoch in start_epoch..cfgt.num_epochs {
        let epoch_start = now_seconds();
        let lr = poly_lr(cfgt.initial_lr, epoch, cfgt.num_epochs, cfgt.poly_exponent);
        optimizer.set_lr(lr);
        say("")?;
        say(&format!("Epoch {epoch}"))?;
        say(&format!(
            "Current learning rate: {}",
            py_float((lr * 1e5).round() / 1e5)
        ))?;

        // training
        let mut train_losses = Vec::with_capacity(cfgt.num_iterations_per_epoch);
        let mut class_losses: Vec<f64> = vec![];
        let (mut epoch_wait, mut epoch_step) = (0.0f64, 0.0f64);
        for it in 0..cfgt.num_iterations_per_epoch {
            let t0 = Instant::now();
            let batch = train_loader
                .next()
                .ok_or_else(|| TrainError::Setup("the training data loader stopped".into()))??;
            let waited = t0.elapsed().as_secs_f64();
            let (x, targets) = to_tensors(batch, device)?;
            let out = forward_autocast(network.as_ref(), &x, true, compute_dtype)
                .ctx(|| format!("epoch {epoch}, iteration {it}: forward"))?;
            let outputs = out.seg;
            check_outputs(&outputs, &targets)?;
            let mut l = ds_loss
                .loss_ds(&outputs, &targets)
                .ctx(|| format!("epoch {epoch}, iteration {it}: loss"))?;
            if let Some(cl) = &out.class_logits {
                let bce = class_presence_loss(cl, &targets[0], &setup.labels, fg_count)
                    .ctx(|| format!("epoch {epoch}, iteration {it}: classification loss"))?;
                class_losses.push(
                    bce.to_dtype(DType::F64)
                        .and_then(|t| t.to_scalar::<f64>())
                        .ctx(|| format!("epoch {epoch}, iteration {it}: loss value"))?,
                );
                l = (l + bce.affine(cfgt.class_loss_weight, 0.0))
                    .ctx(|| format!("epoch {epoch}, iteration {it}: loss"))?;
            }
            let mut grads = l
                .backward()
                .ctx(|| format!("epoch {epoch}, iteration {it}: backward"))?;
            crate::optim::clip_grad_norm(&clip_vars, &mut grads, cfgt.grad_clip_norm)
                .ctx(|| format!("epoch {epoch}, iteration {it}: gradient clipping"))?;
            optimizer
                .step(&grads)
                .ctx(|| format!("epoch {epoch}, iteration {it}: optimizer step"))?;
            let lv = l
                .to_dtype(DType::F64)
                .and_then(|t| t.to_scalar::<f64>())
                .ctx(|| format!("epoch {epoch}, iteration {it}: loss value"))?;
            train_losses.push(lv);
            let total = t0.elapsed().as_secs_f64();
            epoch_wait += waited;
            epoch_step += total - waited;
            iter_time += total;
            wait_time += waited;
            iters += 1;
        }

        // validation
        let mut val_losses = Vec::with_capacity(cfgt.num_val_iterations_per_epoch);
        let mut counts = DiceCounts::zeros(fg_count);
        for it in 0..cfgt.num_val_iterations_per_epoch {
            let batch = val_loader
                .next()
                .ok_or_else(|| TrainError::Setup("the validation data loader stopped".into()))??;
            let (x, targets) = to_tensors(batch, device)?;
            let outputs = forward_autocast(network.as_ref(), &x, false, compute_dtype)
                .ctx(|| format!("epoch {epoch}, validation iteration {it}: forward"))?
                .seg;
            check_outputs(&outputs, &targets)?;
            let l = ds_loss
                .loss_ds(&outputs, &targets)
                .and_then(|l| l.to_dtype(DType::F64))
                .and_then(|l| l.to_scalar::<f64>())
                .ctx(|| format!("epoch {epoch}, validation iteration {it}: loss"))?;
            val_losses.push(l);
            let c = if setup.labels.regions.is_some() {
                metrics::region_counts(
                    &outputs[0],
                    &targets[0],
                    setup.labels.ignore_label.is_some(),
                )
            } else {
                metrics::label_counts(&outputs[0], &targets[0], setup.labels.ignore_label)
            }
            .ctx(|| format!("epoch {epoch}, validation iteration {it}: pseudo dice"))?;
            counts.add(&c);
        }

        // on_epoch_end
        let mean = |v: &[f64]| {
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        logging.train_losses.push(mean(&train_losses));
        logging.val_losses.push(mean(&val_losses));
        logging.lrs.push(lr);
        let dice = counts.dice();
        let ema = logging.push_dice(dice.clone());
        logging.epoch_start_timestamps.push(epoch_start);
        let epoch_end = now_seconds();
        logging.epoch_end_timestamps.push(epoch_end);
        say(&format!(
            "train_loss {}",
            py_float(round4(mean(&train_losses)))
        ))?;
        say(&format!("val_loss {}", py_float(round4(mean(&val_losses)))))?;
        if !class_losses.is_empty() {
            say(&format!(
                "train classification BCE (weight {}) {}",
                py_float(cfgt.class_loss_weight),
                py_float(round4(mean(&class_losses)))
            ))?;
        }
        say(&format!("Pseudo dice {}", fmt_list(&dice)))?;
        say(&format!(
            "Epoch time: {} s",
            py_float(((epoch_end - epoch_start) * 100.0).round() / 100.0)
        ))?;
        let n_it = cfgt.num_iterations_per_epoch.max(1) as f64;
        say(&format!(
            "Per training iteration: data wait {:.4} s, step {:.4} s",
            epoch_wait / n_it,
            epoch_step / n_it
        ))?;
        #[cfg(feature = "cuda")]
        if let Some(m) = crate::gpu_memory::take_peak(device) {
            gpu_peak = gpu_peak.max(m.used());
            say(&m.log_line(gpu_peak))?;
        }
        let done = epoch + 1;
        // growth happens at the end of an epoch, before its checkpoints, so every checkpoint
        // records the widths its weights have
        let due = growth
            .as_ref()
            .map(|g| g.due(epoch, &logging.val_losses))
            .unwrap_or_default();
        if !due.is_empty() {
            // a fixed batch built outside the loaders' streams keeps resume bit-exact
            let batch = data::build_batch(
                &dataset,
                &split.train,
                &growth_batch_opts,
                None,
                &setup.labels,
                u64::MAX - epoch as u64,
            )?;
            let (gx, gt) = to_tensors(batch, device)?;
            let mut loss_fn = |n: &dyn architectures::registry::SegNetwork| {
                let out = n.forward(&gx, true)?;
                ds_loss.loss_ds(&out, &gt)
            };
            let report = crate::growth::apply_growth(
                network.as_mut(),
                &varmap,
                &mut optimizer,
                &due,
                &cfgt.growth,
                cfgt.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9),
                &mut loss_fn,
            )
            .map_err(|e| TrainError::Setup(format!("epoch {epoch}: {e}")))?;
            for (k, v) in &report.grown_kwargs {
                network_meta.arch_kwargs.insert(k.clone(), v.clone());
            }
            clip_vars = optimizer.vars().iter().map(|(_, v)| v.clone()).collect();
            say(&report.log_line())?;
        }
        if ema.is_finite() && best_ema.is_none_or(|b| ema > b) {
            best_ema = Some(ema);
            say(&format!(
                "Yayy! New best EMA pseudo Dice: {}",
                py_float(round4(ema))
            ))?;
            save(
                CheckpointKind::Best,
                done,
                &logging,
                best_ema,
                &optimizer,
                &network_meta,
            )?;
        }
        if done % cfgt.save_every == 0 && done != cfgt.num_epochs {
            save(
                CheckpointKind::Latest,
                done,
                &logging,
                best_ema,
                &optimizer,
                &network_meta,
            )?;
        }
        plot_progress(&logging, &fold_folder.join("progress.png"))?;
    }

    // on_train_end
    let final_path = fold_folder.join(CheckpointKind::Final.file_name());
    let epochs_completed = cfgt.num_epochs.max(start_epoch);
    save(
        CheckpointKind::Final,
        epochs_completed,
        &logging,
        best_ema,
        &optimizer,
        &network_meta,
    )?;
    let latest = fold_folder.join(CheckpointKind::Latest.file_name());
    if latest.is_file() {
        std::fs::remove_file(&latest).map_err(io_err(&latest))?;
    }
    if logging.epochs() > 0 {
        plot_progress(&logging, &fold_folder.join("progress.png"))?;
    }
    say("Training done.")?;
    // nnU-Net's perform_actual_validation: predict the fold's validation cases with the final
    // checkpoint into fold_X/validation/ and evaluate them (validation/summary.json)
    final_validation(req, &split.val, num_workers, &mut say)?;
    let per_iter = |t: f64| if iters > 0 { t / iters as f64 } else { 0.0 };
    Ok(TrainSummary {
        fold_folder,
        log_file: log_path,
        start_epoch,
        epochs_completed,
        final_checkpoint: final_path,
        best_ema,
        logging,
        mean_train_iteration_s: per_iter(iter_time),
        mean_data_wait_s: per_iter(wait_time),
        mean_step_s: per_iter(iter_time - wait_time),
        train_iterations: iters,
    })
}

/// Predicts the fold's validation cases with `checkpoint_final` into `fold_X/validation/` and
/// evaluates them (`validation/summary.json`), logging the mean Dice.
fn final_validation(
    req: &TrainRequest,
    val_cases: &[String],
    num_workers: usize,
    say: &mut dyn FnMut(&str) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let pre = &req.preprocessed_dataset_folder;
    let validation = crate::predict::validate_fold(
        &req.model_folder(),
        req.fold,
        "checkpoint_final",
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
            say("Validation complete")?;
            say(&format!(
                "Mean Validation Dice:  {}",
                py_float(s.foreground_dice())
            ))?;
        }
        None => say(&format!(
            "WARNING: {} does not exist: the {} validation predictions in {} were not evaluated",
            pre.join("gt_segmentations").display(),
            validation.predictions.len(),
            req.fold_folder().join("validation").display()
        ))?,
    }
    Ok(())
}

/// `--val`: only the final validation of an already trained fold (nnU-Net's
/// `only_run_validation`), from `checkpoint_final`.
fn validation_only(req: &TrainRequest) -> Result<TrainSummary, TrainError> {
    let setup = prepare(req)?;
    let fold_folder = req.fold_folder();
    let final_path = fold_folder.join(CheckpointKind::Final.file_name());
    if !final_path.is_file() {
        return Err(TrainError::Setup(format!(
            "--val: {} does not exist; train fold {} first (or continue it with --c)",
            final_path.display(),
            req.fold
        )));
    }
    let ck = Checkpoint::load(&final_path, &Device::Cpu)?;
    let pre = &req.preprocessed_dataset_folder;
    let data_folder = pre.join(&setup.cfg.data_identifier);
    let dataset = PreprocessedDataset::open(&data_folder)?;
    let case_ids = dataset.case_ids().to_vec();
    let splits = data::load_or_create_splits(pre, &case_ids)?;
    let split = data::select_fold(&splits, req.fold, &case_ids)?;
    let mut log = LogFile::create(&fold_folder, req.echo_log).map_err(io_err(&fold_folder))?;
    let log_path = log.path().to_path_buf();
    let mut say = |m: &str| log.log(m).map_err(io_err(&log_path));
    say(&format!(
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
    final_validation(req, &split.val, num_workers, &mut say)?;
    Ok(TrainSummary {
        fold_folder,
        log_file: log_path,
        start_epoch: ck.meta.current_epoch,
        epochs_completed: ck.meta.current_epoch,
        final_checkpoint: final_path,
        best_ema: ck.meta.best_ema,
        logging: ck.meta.logging,
        mean_train_iteration_s: 0.0,
        mean_data_wait_s: 0.0,
        mean_step_s: 0.0,
        train_iterations: 0,
    })
}

/// `arch_kwargs` key of a grown network's widths (see `architectures::growable`).
const GROWN_WIDTHS: &str = "grown_widths";

/// Number of outputs the network returns in training mode (deep supervision on), from one
/// forward pass of a zero batch of one patch without gradients.
fn probe_output_count(
    network: &dyn architectures::registry::SegNetwork,
    setup: &Setup,
    device: &Device,
    compute_dtype: DType,
) -> Result<usize, TrainError> {
    let mut shape = vec![1, setup.io.in_channels];
    shape.extend(&setup.cfg.patch_size);
    let x =
        Tensor::zeros(shape, DType::F32, device).ctx(|| "deep-supervision probe".to_string())?;
    let out = forward_autocast(network, &x, false, compute_dtype)
        .ctx(|| "deep-supervision probe: forward".to_string())?;
    Ok(out.seg.len())
}

/// BCE of an image-level classification head against "which foreground classes (or regions)
/// occur in the patch", derived from the full-resolution target (no extra annotation).
fn class_presence_loss(
    class_logits: &Tensor,
    target: &Tensor,
    labels: &LabelInfo,
    fg_count: usize,
) -> candle_core::Result<Tensor> {
    let (b, n) = class_logits.dims2()?;
    if n != fg_count {
        candle_core::bail!(
            "the classification head has {n} outputs but the dataset has {fg_count} \
             foreground classes/regions"
        );
    }
    let flat = target.flatten_from(1)?; // (B, C_t * voxels)
    let mut cols = Vec::with_capacity(n);
    if labels.regions.is_some() {
        // target (B, R(+1 ignore), *sp) of 0/1 per region
        let per = target.dims()[1];
        let t = target.reshape((b, per, ()))?;
        for r in 0..n {
            cols.push(t.narrow(1, r, 1)?.squeeze(1)?.max(1)?.gt(0.5)?);
        }
    } else {
        for c in 1..=n {
            cols.push(flat.eq(c as f64)?.max(1)?);
        }
    }
    let presence = Tensor::stack(&cols, 1)?.to_dtype(class_logits.dtype())?;
    crate::loss::bce_with_logits(class_logits, &presence)
}

/// The network's outputs and the loader's targets must pair up (one target per output
/// resolution, same spatial shape).
fn check_outputs(outputs: &[Tensor], targets: &[Tensor]) -> Result<(), TrainError> {
    if outputs.len() != targets.len() {
        return Err(TrainError::Setup(format!(
            "the network returns {} output(s) but the data loader produces {} deep-supervision \
             target(s); the architecture's `strides` and its outputs disagree",
            outputs.len(),
            targets.len()
        )));
    }
    for (i, (o, t)) in outputs.iter().zip(targets).enumerate() {
        if o.dims()[2..] != t.dims()[2..] {
            return Err(TrainError::Setup(format!(
                "output {i} has spatial shape {:?} but its target has {:?}",
                &o.dims()[2..],
                &t.dims()[2..]
            )));
        }
    }
    Ok(())
}

/// Batch-norm running statistics: buffers, not trained (as
/// `architectures::registry::ParamInfo::trainable`).
fn is_buffer_name(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

#[cfg(test)]
mod tests;
