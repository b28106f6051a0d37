//! A training session: everything between [`Setup`] and the final validation.
//!
//! [`Session::open`] does nnU-Net's `on_train_start`: the output folders and JSON copies, the
//! log, resuming from a checkpoint (`--c`), the network and its [`Learner`], the data loaders
//! and `debug.json`. [`Session::run`] runs the epochs (training steps, validation steps, the
//! epoch log, the hooks, the checkpoint policy), writes `checkpoint_final` and validates the
//! fold.

use super::checkpointing::{CheckpointPolicy, CheckpointSaver, TrainingState};
use super::epoch_log::{self, EpochRecord, RunLog};
use super::hooks::{EpochEnd, Hooks};
use super::live::{self, IterationProgress, TrainProgress};
use super::metrics::DiceCounts;
use super::setup::Setup;
use super::step::{nnunet_loss, probe_output_count, to_tensors, Learner, StepAt};
use super::stop::Stopped;
use super::{final_validation, io_err, TrainError, TrainRequest, TrainSummary};
use crate::checkpoint::{
    find_resume_checkpoint, Checkpoint, CheckpointKind, MidEpoch, NetworkMeta,
};
use crate::data::{self, BackgroundLoader, LoaderOptions, PreprocessedDataset, Split};
use crate::fold_lock::FoldLock;
use crate::logging::{now_seconds, TrainingLog};
use crate::loss::LossOptions;
use crate::optim::poly_lr;
use crate::progress::plot_progress;
use candle_core::Tensor;
use datasets::layout::{ModelDir, PreprocessedDir};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A checkpoint found for `--c`.
struct Resume {
    kind: CheckpointKind,
    checkpoint: Checkpoint,
    path: PathBuf,
}

/// The data side of a session.
struct SessionData {
    dataset: Arc<PreprocessedDataset>,
    split: Split,
    train_loader: BackgroundLoader,
    val_loader: BackgroundLoader,
    /// Options of the fixed batches the hooks get (the training loader's, unaugmented).
    fixed_batch_opts: LoaderOptions,
    num_workers: usize,
}

/// Accumulated timing of the training iterations of this run.
#[derive(Debug, Default)]
struct Timing {
    data_wait_s: f64,
    step_s: f64,
    iterations: usize,
}

/// An open training run.
pub(super) struct Session<'r> {
    req: &'r TrainRequest,
    setup: Setup,
    fold_folder: PathBuf,
    log: RunLog,
    learner: Learner,
    hooks: Hooks,
    network_meta: NetworkMeta,
    logging: TrainingLog,
    policy: CheckpointPolicy,
    saver: CheckpointSaver,
    start_epoch: usize,
    /// A resumed graceful stop's partial epoch (`start_epoch`), consumed by its first epoch.
    resumed_mid_epoch: Option<MidEpoch>,
    data: SessionData,
    timing: Timing,
    #[cfg(feature = "cuda")]
    gpu_peak: u64,
    /// Released when the session ends.
    _fold_lock: FoldLock,
}

/// Creates the fold folder, takes its lock (one writer per fold, held as long as the returned
/// guard lives) and copies the JSON files nnU-Net copies at `on_train_start`.
fn open_folders(req: &TrainRequest, setup: &Setup) -> Result<(PathBuf, FoldLock), TrainError> {
    let model_folder = req.model_folder();
    let fold_folder = req.fold_folder();
    std::fs::create_dir_all(&fold_folder).map_err(io_err(&fold_folder))?;
    let lock = FoldLock::acquire(&fold_folder)?;
    remove_stale_temp_files(&[&fold_folder, &model_folder])?;
    let pre = PreprocessedDir::new(&req.preprocessed_dataset_folder);
    let model = ModelDir::at(&model_folder);
    copy_json(&setup.plans_file, &model.plans_json())?;
    copy_json(&pre.dataset_json(), &model.dataset_json())?;
    let fp = pre.fingerprint();
    if fp.is_file() {
        copy_json(&fp, &model.fingerprint())?;
    }
    Ok((fold_folder, lock))
}

/// Removes the temp files a killed run left in `folders` (checkpoints, debug.json, ...; see
/// `predict::outputs::remove_stale_temp_files`).
pub(super) fn remove_stale_temp_files(folders: &[&Path]) -> Result<(), TrainError> {
    for f in folders {
        crate::predict::outputs::remove_stale_temp_files(f)
            .map_err(|e| Box::new(crate::predict::PredictError::from(e)))?;
    }
    Ok(())
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

/// The checkpoint `--c` resumes from (final, latest, best), if any.
fn find_resume(req: &TrainRequest, fold_folder: &Path) -> Result<Option<Resume>, TrainError> {
    if !req.continue_training {
        return Ok(None);
    }
    match find_resume_checkpoint(fold_folder) {
        Some((kind, path)) => Ok(Some(Resume {
            kind,
            checkpoint: Checkpoint::load(&path, &req.device)?,
            path,
        })),
        None => Ok(None),
    }
}

/// Builds the network (with what the hooks need) and its learner. Networks other than
/// nnU-Net's may have fewer decoder resolutions than the plan has strides: deep supervision
/// then trains on the first k scales (one probe forward pass).
fn build_learner(
    req: &TrainRequest,
    setup: &mut Setup,
    hooks: &mut Hooks,
    resumed: Option<&NetworkMeta>,
) -> Result<Learner, TrainError> {
    let cfg = &req.config;
    hooks.before_build(&mut setup.spec, resumed);
    let (varmap, network) =
        req.registry
            .build_initialized(&setup.spec, &setup.io, cfg.seed, &req.device)?;
    hooks.attach(network.as_ref(), &setup.spec, &setup.io)?;
    let compute_dtype = cfg.amp.compute_dtype(&req.device);
    if setup.io.deep_supervision {
        let n_out = probe_output_count(
            network.as_ref(),
            setup.io.in_channels,
            &setup.cfg.patch_size,
            &req.device,
            compute_dtype,
        )?;
        if n_out == 0 || n_out > setup.ds_scales.len() {
            return Err(TrainError::DeepSupervisionOutputs {
                network: setup.spec.network_class_name.clone(),
                outputs: n_out,
                max: setup.ds_scales.len(),
            });
        }
        setup.ds_scales.truncate(n_out);
    }
    let options = LossOptions {
        batch_dice: setup.cfg.batch_dice,
        ignore_label: setup.labels.ignore_label,
        ..LossOptions::default()
    };
    let loss = nnunet_loss(
        options,
        setup.labels.regions.is_some(),
        setup.ds_scales.len(),
    );
    Ok(Learner::new(network, varmap, loss, cfg, &req.device))
}

/// Opens the dataset (with the previous stage's predictions for a cascade) and the fold.
fn open_dataset(
    req: &TrainRequest,
    setup: &Setup,
) -> Result<(Arc<PreprocessedDataset>, Split), TrainError> {
    let pre = &req.preprocessed_dataset_folder;
    let data_folder = pre.join(&setup.cfg.data_identifier);
    data::require_complete(&data_folder, &setup.plans, &req.configuration)?;
    let dataset = Arc::new(match &setup.cfg.previous_stage {
        None => PreprocessedDataset::open(&data_folder)?,
        Some(prev) => PreprocessedDataset::open_with_prev_stage(
            &data_folder,
            data::cascade::PrevStage {
                folder: crate::predict::prev_stage_folder(
                    &req.model_folder(),
                    prev,
                    &req.configuration,
                )
                .map_err(Box::new)?,
                foreground_labels: setup.ds_json.foreground_labels(),
            },
        )?,
    });
    let case_ids = dataset.case_ids().to_vec();
    // the final validation's reference: refused now (before any splits are made) rather
    // than after training
    data::require_ground_truth(pre, &setup.plans, &req.configuration, &case_ids)?;
    let splits = data::load_or_create_splits(pre, &case_ids)?;
    let split = data::select_fold(&splits, req.fold, &case_ids)?;
    dataset.require_prev_stage(&[split.train.as_slice(), split.val.as_slice()].concat())?;
    if split.train.is_empty() || split.val.is_empty() {
        return Err(TrainError::EmptyFold {
            fold: req.fold,
            train: split.train.len(),
            val: split.val.len(),
        });
    }
    Ok((dataset, split))
}

/// The training and validation loaders, started where a run of `start_epoch` epochs left
/// them.
///
/// Bit-exact resume: batch k of a loader depends only on (seed, k), so a run resumed at
/// epoch e continues both batch streams where the uninterrupted run would be after e epochs.
/// Together with the exact weights, momentum buffers and the per-epoch poly LR
/// stored/recomputed from the checkpoint, `1 epoch + --c 1 epoch` gives the same weights as
/// `2 epochs` on CPU. Nothing else in a step is random for nnU-Net's default networks (no
/// dropout); a plans file that enables `dropout_op` draws from candle's device RNG, which is
/// not checkpointed, so such a resumed run is statistically but not bitwise equal.
///
/// A run resumed from a graceful stop in the middle of an epoch (`iterations_done` training
/// iterations into `start_epoch`) starts its training loader that many batches further.
fn open_data(
    req: &TrainRequest,
    setup: &Setup,
    start_epoch: usize,
    iterations_done: usize,
) -> Result<SessionData, TrainError> {
    let cfg = &req.config;
    let (dataset, split) = open_dataset(req, setup)?;
    let num_workers = cfg.num_workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().saturating_sub(1).clamp(1, 12))
            .unwrap_or(2)
    });
    let mut aug = data::AugmentationConfig::nnunet_default(&setup.cfg.patch_size);
    aug.mirror_axes = setup.mirror_axes.clone();
    let train_opts = LoaderOptions {
        patch_size: setup.cfg.patch_size.clone(),
        batch_size: setup.batch_size,
        oversample_foreground_percent: cfg.oversample_foreground_percent,
        ds_scales: setup.ds_scales.clone(),
        seed: cfg.seed,
        first_batch: (start_epoch as u64) * (cfg.num_iterations_per_epoch as u64)
            + iterations_done as u64,
        num_workers,
        queue_len: num_workers.max(6),
        augment: cfg.data_augmentation,
        augmentation: Some(aug),
        use_mask_for_norm: setup.cfg.use_mask_for_norm.clone(),
    };
    let fixed_batch_opts = LoaderOptions {
        augment: false,
        ..train_opts.clone()
    };
    let val_opts = LoaderOptions {
        seed: cfg.seed ^ 0x5555_5555,
        first_batch: (start_epoch as u64) * (cfg.num_val_iterations_per_epoch as u64),
        num_workers: (num_workers / 2).max(1),
        queue_len: (num_workers / 2).max(1),
        augment: false,
        ..train_opts.clone()
    };
    let loader = |cases: &[String], opts| {
        BackgroundLoader::new(dataset.clone(), cases.to_vec(), opts, setup.labels.clone())
    };
    Ok(SessionData {
        train_loader: loader(&split.train, train_opts)?,
        val_loader: loader(&split.val, val_opts)?,
        dataset,
        split,
        fixed_batch_opts,
        num_workers,
    })
}

impl<'r> Session<'r> {
    /// nnU-Net's `on_train_start` (see the module documentation).
    pub fn open(req: &'r TrainRequest, mut setup: Setup) -> Result<Self, TrainError> {
        let mut hooks = Hooks::for_config(&req.config, &setup.labels)?;
        let (fold_folder, fold_lock) = open_folders(req, &setup)?;
        let mut log = RunLog::create(&fold_folder, req.echo_log)?;
        let resume = find_resume(req, &fold_folder)?;
        let resumed_meta = resume.as_ref().map(|r| &r.checkpoint.meta.network);
        let mut learner = build_learner(req, &mut setup, &mut hooks, resumed_meta)?;
        let network_meta = NetworkMeta {
            network_class_name: setup.spec.network_class_name.clone(),
            arch_kwargs: setup.spec.arch_kwargs.clone(),
            input_channels: setup.io.in_channels,
            num_segmentation_heads: setup.io.num_classes,
            enable_deep_supervision: setup.io.deep_supervision,
        };
        let init_args = json!({
            "plans": setup.plans.plans_name,
            "configuration": req.configuration,
            "fold": req.fold.to_string(),
            "dataset_json": setup.ds_json.to_json(),
            "device": format!("{:?}", req.device.location()),
        });
        let saver = CheckpointSaver::new(
            fold_folder.clone(),
            &req.trainer_name,
            init_args,
            setup.mirror_axes.clone(),
            &req.config,
        )
        .disabled(req.disable_checkpointing);
        let point = apply_resume(req, resume, &mut learner, &network_meta, &mut log)?;
        if let Some(path) = &req.pretrained_weights {
            let weights = super::pretrained::read_weights(path)?;
            let report = super::pretrained::load_pretrained(&learner.varmap, &weights, path)?;
            log.say_all(&report.log_lines(path))?;
        }
        let iterations_done = point.mid_epoch.as_ref().map_or(0, |m| m.iterations_done);
        let start_epoch = point.epoch;
        let data = open_data(req, &setup, start_epoch, iterations_done)?;
        let mut session = Session {
            policy: CheckpointPolicy::new(
                req.config.save_every,
                req.config.num_epochs,
                point.best_ema,
            ),
            req,
            setup,
            fold_folder,
            log,
            learner,
            hooks,
            network_meta,
            logging: point.logging,
            saver,
            start_epoch,
            resumed_mid_epoch: point.mid_epoch,
            data,
            timing: Timing::default(),
            #[cfg(feature = "cuda")]
            gpu_peak: 0,
            _fold_lock: fold_lock,
        };
        session.write_debug_json()?;
        session.log_start()?;
        Ok(session)
    }

    /// `debug.json` (nnU-Net dumps the trainer's attributes).
    fn write_debug_json(&self) -> Result<(), TrainError> {
        let (req, s) = (self.req, &self.setup);
        let debug = json!({
            "trainer_name": req.trainer_name,
            "trainer_config": req.config,
            "plans_name": req.plans_name,
            "configuration": req.configuration,
            "configuration_manager": s.cfg.to_json(),
            "fold": req.fold.to_string(),
            "device": format!("{:?}", req.device.location()),
            "compute_dtype": self.learner.compute_dtype.as_str(),
            "network_class_name": s.spec.network_class_name,
            "num_input_channels": s.io.in_channels,
            "num_segmentation_heads": s.io.num_classes,
            "trainable_parameters": self.learner.trainable_parameters(),
            "batch_size": s.batch_size,
            "patch_size": s.cfg.patch_size,
            "deep_supervision_scales": s.ds_scales,
            "deep_supervision_weights": self.learner.loss.weights(),
            "inference_allowed_mirroring_axes": s.mirror_axes,
            "loss": if s.labels.regions.is_some() { "DC_and_BCE_loss" } else { "DC_and_CE_loss" },
            "num_train_cases": self.data.split.train.len(),
            "num_val_cases": self.data.split.val.len(),
            "loader_workers": self.data.num_workers,
            "seed": req.config.seed,
            "hostname": hostname(),
            "nnseg_version": env!("CARGO_PKG_VERSION"),
        });
        plans::io::write_json_atomic(&self.fold_folder.join("debug.json"), &debug)?;
        Ok(())
    }

    fn log_start(&mut self) -> Result<(), TrainError> {
        if self.start_epoch == 0 {
            let lines = epoch_log::run_start_lines(
                &self.req.trainer_name,
                &self.req.configuration,
                &self.req.fold.to_string(),
                self.data.split.train.len(),
                self.data.split.val.len(),
                self.setup.batch_size,
                &self.setup.cfg.patch_size,
                self.learner.trainable_parameters(),
            );
            self.log.say_all(&lines)?;
        }
        self.log
            .say(&crate::amp::describe(self.learner.compute_dtype))
    }

    /// Runs the remaining epochs, writes `checkpoint_final` and validates the fold; on a
    /// requested stop (see [`super::stop`]) writes `checkpoint_latest` and returns early.
    pub fn run(mut self) -> Result<TrainSummary, TrainError> {
        for epoch in self.start_epoch..self.req.config.num_epochs {
            if let Some(stopped) = self.run_epoch(epoch)? {
                let latest = self.saver.path(CheckpointKind::Latest);
                return Ok(self.summary(epoch, latest, Some(stopped)));
            }
        }
        self.finish()
    }

    /// One epoch; `Some` when a stop was requested (the state is saved).
    fn run_epoch(&mut self, epoch: usize) -> Result<Option<Stopped>, TrainError> {
        let cfg = &self.req.config;
        let start = now_seconds();
        let lr = poly_lr(cfg.initial_lr, epoch, cfg.num_epochs, cfg.poly_exponent);
        self.learner.optimizer.set_lr(lr);
        self.log.say_all(&epoch_log::epoch_start_lines(epoch, lr))?;
        let resumed = self.resumed_mid_epoch.take();
        let (mut record, stop) = self.train_part(epoch, resumed)?;
        if stop {
            let mid = MidEpoch {
                iterations_done: record.train_losses.len(),
                train_losses: record.train_losses,
            };
            return self.save_stop(epoch, Some(mid)).map(Some);
        }
        let (val_losses, counts) = self.val_part(epoch)?;
        // on_epoch_end
        record.start = start;
        record.val_losses = val_losses;
        record.dice = counts.dice();
        self.logging
            .train_losses
            .push(epoch_log::mean(&record.train_losses));
        self.logging
            .val_losses
            .push(epoch_log::mean(&record.val_losses));
        self.logging.lrs.push(lr);
        let ema = self.logging.push_dice(record.dice.clone());
        self.logging.epoch_start_timestamps.push(start);
        record.end = now_seconds();
        self.logging.epoch_end_timestamps.push(record.end);
        let hook_lines = self.hooks.epoch_lines();
        self.emit(TrainProgress::EpochEnd { epoch });
        self.log
            .say_all(&epoch_log::epoch_end_lines(&record, hook_lines))?;
        self.log_gpu_memory()?;
        // hooks change the network before the epoch's checkpoints, so every checkpoint
        // records the network its weights belong to
        let lines = self.after_epoch_hooks(epoch)?;
        self.log.say_all(&lines)?;
        self.checkpoints_after_epoch(epoch + 1, ema)?;
        plot_progress(&self.logging, &self.fold_folder.join("progress.png"))?;
        if self.req.stop.is_requested() {
            return self.save_stop(epoch + 1, None).map(Some);
        }
        Ok(None)
    }

    /// Writes `checkpoint_latest` for a graceful stop at `epoch` (`mid`: inside it).
    fn save_stop(&mut self, epoch: usize, mid: Option<MidEpoch>) -> Result<Stopped, TrainError> {
        let state = TrainingState {
            mid_epoch: mid.as_ref(),
            ..self.state(epoch)
        };
        self.saver
            .save(CheckpointKind::Latest, state, &self.learner)?;
        let stopped = Stopped {
            epoch,
            iterations_done: mid.map_or(0, |m| m.iterations_done),
            checkpoint: self.saver.path(CheckpointKind::Latest),
        };
        self.log.say(&format!("Stop requested: {stopped}"))?;
        if !self.saver.is_enabled() {
            self.log.say(
                "--disable_checkpointing: no checkpoint was written, this run cannot be \
                 continued with --c",
            )?;
        }
        Ok(stopped)
    }

    /// The training iterations of an epoch (from where a resumed stop left it); `true` with
    /// the iterations done so far when a stop was requested.
    fn train_part(
        &mut self,
        epoch: usize,
        resumed: Option<MidEpoch>,
    ) -> Result<(EpochRecord, bool), TrainError> {
        let n = self.req.config.num_iterations_per_epoch;
        let (first, train_losses) = match resumed {
            Some(m) => (m.iterations_done, m.train_losses),
            None => (0, Vec::with_capacity(n)),
        };
        let mut record = EpochRecord {
            train_losses,
            ..EpochRecord::default()
        };
        self.emit(TrainProgress::EpochStart {
            epoch,
            num_epochs: self.req.config.num_epochs,
            iterations: n,
        });
        for it in first..n {
            let t0 = Instant::now();
            let batch = self
                .data
                .train_loader
                .next()
                .ok_or(TrainError::LoaderStopped("training"))??;
            let waited = t0.elapsed().as_secs_f64();
            let (x, targets) = to_tensors(batch, &self.req.device)?;
            let at = StepAt::train(epoch, it);
            let loss = self.learner.train_step(&x, &targets, &mut self.hooks, at)?;
            record.train_losses.push(loss);
            let total = t0.elapsed().as_secs_f64();
            record.data_wait_s += waited;
            record.step_s += total - waited;
            self.timing.data_wait_s += waited;
            self.timing.step_s += total - waited;
            self.timing.iterations += 1;
            self.emit_iteration(epoch, (it + 1, n), loss);
            if self.req.stop.is_requested() {
                return Ok((record, true));
            }
        }
        Ok((record, false))
    }

    fn emit(&self, event: TrainProgress) {
        if let Some(p) = &self.req.progress {
            p.emit(event);
        }
    }

    /// Reports a finished training iteration with the run's mean s/iteration and the fold's
    /// ETA.
    fn emit_iteration(&self, epoch: usize, (done, iterations): (usize, usize), loss: f64) {
        let Some(p) = &self.req.progress else {
            return;
        };
        let t = &self.timing;
        let s_per_it = (t.data_wait_s + t.step_s) / t.iterations.max(1) as f64;
        let num_epochs = self.req.config.num_epochs;
        let mean_epoch_s = Some(crate::logging::nanmean(&self.logging.epoch_durations()));
        p.emit(TrainProgress::Iteration(IterationProgress {
            epoch,
            num_epochs,
            done,
            iterations,
            loss,
            seconds_per_iteration: s_per_it,
            fold_eta_s: live::fold_eta_s(
                s_per_it,
                (done, iterations),
                num_epochs.saturating_sub(epoch + 1),
                mean_epoch_s,
            ),
        }));
    }

    fn val_part(&mut self, epoch: usize) -> Result<(Vec<f64>, DiceCounts), TrainError> {
        let n = self.req.config.num_val_iterations_per_epoch;
        let mut losses = Vec::with_capacity(n);
        let mut counts = DiceCounts::zeros(self.setup.foreground_count());
        self.emit(TrainProgress::Validation {
            epoch,
            iterations: n,
        });
        for it in 0..n {
            let batch = self
                .data
                .val_loader
                .next()
                .ok_or(TrainError::LoaderStopped("validation"))??;
            let (x, targets) = to_tensors(batch, &self.req.device)?;
            let (l, c) =
                self.learner
                    .val_step(&x, &targets, &self.setup.labels, StepAt::val(epoch, it))?;
            losses.push(l);
            counts.add(&c);
        }
        Ok((losses, counts))
    }

    #[cfg(feature = "cuda")]
    fn log_gpu_memory(&mut self) -> Result<(), TrainError> {
        if let Some(m) = crate::gpu_memory::take_peak(&self.req.device) {
            self.gpu_peak = self.gpu_peak.max(m.used());
            self.log.say(&m.log_line(self.gpu_peak))?;
        }
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    fn log_gpu_memory(&mut self) -> Result<(), TrainError> {
        Ok(())
    }

    fn after_epoch_hooks(&mut self, epoch: usize) -> Result<Vec<String>, TrainError> {
        let (data, labels, device) = (&self.data, &self.setup.labels, &self.req.device);
        let fixed_batch = || -> Result<(Tensor, Vec<Tensor>), TrainError> {
            let batch = data::build_batch(
                &data.dataset,
                &data.split.train,
                &data.fixed_batch_opts,
                None,
                labels,
                u64::MAX - epoch as u64,
            )?;
            to_tensors(batch, device)
        };
        let mut end = EpochEnd {
            epoch,
            logging: &self.logging,
            learner: &mut self.learner,
            network: &mut self.network_meta,
            fixed_batch: &fixed_batch,
        };
        self.hooks.after_epoch(&mut end)
    }

    fn state(&self, epoch: usize) -> TrainingState<'_> {
        TrainingState {
            epoch,
            logging: &self.logging,
            best_ema: self.policy.best_ema(),
            network: &self.network_meta,
            mid_epoch: None,
        }
    }

    fn checkpoints_after_epoch(&mut self, done: usize, ema: f64) -> Result<(), TrainError> {
        let actions = self.policy.after_epoch(done, ema);
        if let (Some(best), true) = (
            self.policy.best_ema(),
            actions.contains(&super::checkpointing::CheckpointAction::Save(
                CheckpointKind::Best,
            )),
        ) {
            self.log.say(&epoch_log::new_best_line(best))?;
        }
        self.saver.apply(&actions, self.state(done), &self.learner)
    }

    /// nnU-Net's `on_train_end` and `perform_actual_validation`: `checkpoint_final`, then the
    /// fold's validation cases predicted with it into `fold_X/validation/` and evaluated.
    fn finish(mut self) -> Result<TrainSummary, TrainError> {
        let cfg = &self.req.config;
        let epochs_completed = cfg.num_epochs.max(self.start_epoch);
        let actions = self.policy.at_end();
        self.saver
            .apply(&actions, self.state(epochs_completed), &self.learner)?;
        if self.logging.epochs() > 0 {
            plot_progress(&self.logging, &self.fold_folder.join("progress.png"))?;
        }
        self.log.say("Training done.")?;
        if self.req.disable_checkpointing {
            // nnU-Net validates the network in memory; nnseg's validation predicts from
            // checkpoint_final, so it is written for the validation and removed afterwards
            let path = self.saver.path(CheckpointKind::Final);
            self.saver.write(
                CheckpointKind::Final,
                self.state(epochs_completed),
                &self.learner,
            )?;
            let validated = final_validation(
                self.req,
                &self.data.split.val,
                self.data.num_workers,
                &mut self.log,
            );
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            validated?;
            self.log.say(
                "--disable_checkpointing: the final validation used the trained weights; no \
                 checkpoint was kept",
            )?;
        } else {
            final_validation(
                self.req,
                &self.data.split.val,
                self.data.num_workers,
                &mut self.log,
            )?;
        }
        let final_checkpoint = self.saver.path(CheckpointKind::Final);
        Ok(self.summary(epochs_completed, final_checkpoint, None))
    }

    fn summary(
        self,
        epochs_completed: usize,
        final_checkpoint: PathBuf,
        stopped: Option<Stopped>,
    ) -> TrainSummary {
        let t = &self.timing;
        let per_iter = |s: f64| {
            if t.iterations > 0 {
                s / t.iterations as f64
            } else {
                0.0
            }
        };
        TrainSummary {
            final_checkpoint,
            log_file: self.log.path().to_path_buf(),
            fold_folder: self.fold_folder,
            start_epoch: self.start_epoch,
            epochs_completed,
            best_ema: self.policy.best_ema(),
            logging: self.logging,
            mean_train_iteration_s: per_iter(t.data_wait_s + t.step_s),
            mean_data_wait_s: per_iter(t.data_wait_s),
            mean_step_s: per_iter(t.step_s),
            train_iterations: t.iterations,
            stopped,
        }
    }
}

/// Where a run continues: what [`apply_resume`] restored.
struct ResumePoint {
    logging: TrainingLog,
    best_ema: Option<f64>,
    epoch: usize,
    mid_epoch: Option<MidEpoch>,
}

/// Loads a resumed checkpoint into the learner: weights, momentum buffers, the log and the best
/// EMA, and where in an epoch a graceful stop left off.
fn apply_resume(
    req: &TrainRequest,
    resume: Option<Resume>,
    learner: &mut Learner,
    network_meta: &NetworkMeta,
    log: &mut RunLog,
) -> Result<ResumePoint, TrainError> {
    let Some(Resume {
        kind,
        checkpoint: ck,
        path,
    }) = resume
    else {
        if req.continue_training {
            log.say(
                "WARNING: Cannot continue training because there seems to be no checkpoint \
                 available to continue from. Starting a new training...",
            )?;
        }
        return Ok(ResumePoint {
            logging: TrainingLog::default(),
            best_ema: None,
            epoch: 0,
            mid_epoch: None,
        });
    };
    if ck.meta.network != *network_meta {
        return Err(TrainError::NetworkMismatch { path });
    }
    learner.load_weights(&ck.network_weights, &path)?;
    learner.optimizer.load_state(ck.optimizer_state)?;
    let start_epoch = ck.meta.current_epoch;
    let mut logging = ck.meta.logging;
    logging.truncate(start_epoch);
    let mid = ck.meta.mid_epoch;
    let num_epochs = req.config.num_epochs;
    if kind == CheckpointKind::Final && num_epochs > start_epoch {
        log.say(&format!(
            "Extending the finished training from {start_epoch} to {num_epochs} epochs \
             (poly learning rate recomputed for {num_epochs} epochs)"
        ))?;
    }
    log.say(&format!(
        "Resuming from {} ({:?}) at epoch {start_epoch}, training iteration {}",
        path.display(),
        kind,
        mid.as_ref().map_or(0, |m| m.iterations_done)
    ))?;
    Ok(ResumePoint {
        logging,
        best_ema: ck.meta.best_ema,
        epoch: start_epoch,
        mid_epoch: mid,
    })
}
