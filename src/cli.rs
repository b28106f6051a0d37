//! Command-line definition. nnU-Net's single-dash long flags (`-np`, `-pl`,
//! `-gpu_memory_target`, ...) are accepted: [`normalize_args`] rewrites them to the
//! double-dash form clap understands before parsing.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "nnseg",
    version,
    about = "nnU-Net's self-configuring segmentation pipeline, in Rust",
    long_about = "nnU-Net's self-configuring segmentation pipeline, in Rust.\n\n\
        Folders come from the nnU-Net environment variables nnUNet_raw, nnUNet_preprocessed and \
        nnUNet_results, or from --raw/--preprocessed/--results. nnU-Net's single-dash flags \
        (-np, -pl, -gpu_memory_target, ...) work as in nnU-Net."
)]
pub struct Cli {
    #[command(flatten)]
    pub paths: PathArgs,
    /// More log output (same as RUST_LOG=debug).
    #[arg(long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone, Default)]
pub struct PathArgs {
    /// Raw datasets root (default: $nnUNet_raw).
    #[arg(long, global = true, value_name = "DIR")]
    pub raw: Option<PathBuf>,
    /// Preprocessed data root (default: $nnUNet_preprocessed).
    #[arg(long, global = true, value_name = "DIR")]
    pub preprocessed: Option<PathBuf>,
    /// Results root (default: $nnUNet_results).
    #[arg(long, global = true, value_name = "DIR")]
    pub results: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fingerprint, plan and preprocess one or more datasets (nnUNetv2_plan_and_preprocess).
    #[command(name = "plan_and_preprocess")]
    PlanAndPreprocess(PlanAndPreprocessArgs),
    /// Extract the dataset fingerprint (nnUNetv2_extract_fingerprint).
    #[command(name = "extract_fingerprint")]
    ExtractFingerprint(FingerprintArgs),
    /// Derive plans from an existing fingerprint (nnUNetv2_plan_experiment).
    #[command(name = "plan_experiment")]
    PlanExperiment(PlanArgs),
    /// Preprocess with existing plans (nnUNetv2_preprocess).
    #[command(name = "preprocess")]
    Preprocess(PreprocessArgs),
    /// Train one fold of a configuration (nnUNetv2_train).
    #[command(name = "train")]
    Train(TrainArgs),
    /// Predict raw images with trained folds (nnUNetv2_predict).
    #[command(name = "predict")]
    Predict(PredictArgs),
    /// Predict raw images with the model folder given by path, as nnU-Net or nnseg trained it
    /// (nnUNetv2_predict_from_modelfolder).
    #[command(name = "predict_from_modelfolder")]
    PredictFromModelFolder(PredictFromModelFolderArgs),
    /// Average saved probabilities of several prediction folders (nnUNetv2_ensemble).
    #[command(name = "ensemble")]
    Ensemble(EnsembleArgs),
    /// Dice/IoU per case and class, written to summary.json (nnUNetv2_evaluate_folder).
    #[command(name = "evaluate_folder")]
    EvaluateFolder(EvaluateArgs),
    /// Dice/IoU per case for labels given on the command line (nnUNetv2_evaluate_simple).
    #[command(name = "evaluate_simple")]
    EvaluateSimple(EvaluateSimpleArgs),
    /// Merge the folds' validation predictions and evaluate them (nnUNetv2_accumulate_crossval_results).
    #[command(name = "accumulate_crossval_results")]
    AccumulateCrossvalResults(AccumulateArgs),
    /// Decide on connected-component postprocessing for a prediction folder (nnUNetv2_determine_postprocessing).
    #[command(name = "determine_postprocessing")]
    DeterminePostprocessing(DeterminePpArgs),
    /// Apply a postprocessing.json to a folder of segmentations (nnUNetv2_apply_postprocessing).
    #[command(name = "apply_postprocessing")]
    ApplyPostprocessing(ApplyPpArgs),
    /// Train a whole cross-validation (configuration × trainer × fold, every 3d_lowres fold
    /// before 3d_cascade_fullres), then optionally find_best_configuration: on this machine
    /// (CPU, or one job per GPU with --gpus) or as Slurm job arrays (--launcher slurm).
    /// Finished folds are skipped, interrupted ones continued. Exit code 1: a job failed
    /// (they are listed); 75: stopped by a signal, rerun to continue.
    #[command(name = "cross_validate")]
    CrossValidate(CrossValidateArgs),
    /// Predict a folder of images with what find_best_configuration recommended
    /// (inference_information.json): the winning model or ensemble, then its postprocessing.
    #[command(name = "predict_best_configuration")]
    PredictBestConfiguration(PredictBestArgs),
    /// Pick the best configuration / ensemble from cross-validation (nnUNetv2_find_best_configuration).
    #[command(name = "find_best_configuration")]
    FindBestConfiguration(FindBestArgs),
    /// Print a configuration's network: layer table, output shapes, parameters, memory estimate.
    #[command(name = "show_network")]
    ShowNetwork(ShowNetworkArgs),
    /// Convert a trained nnU-Net v2 model (checkpoint_final.pth + plans.json) to nnseg's safetensors format.
    #[command(name = "import_nnunet_model")]
    ImportNnunetModel(ImportArgs),
    /// Write the synthetic demo datasets (Dataset990_Demo3D, Dataset991_Demo2D) into the raw folder.
    #[command(name = "make_demo_dataset")]
    MakeDemoDataset(DemoArgs),
    /// Time training steps of a PlainConvUNet at nnU-Net's typical plans on random data.
    #[command(name = "bench_train")]
    BenchTrain(BenchTrainArgs),
    /// One PNG per training case: label outlines over a slice of the image (nnUNetv2_plot_overlay_pngs).
    #[command(name = "plot_overlay_pngs")]
    PlotOverlayPngs(OverlayArgs),
    /// Pack a trained model (chosen configurations and folds) into one zip
    /// (nnUNetv2_export_model_to_zip).
    #[command(name = "export_model_to_zip")]
    ExportModelToZip(ExportZipArgs),
    /// Install a model zip into nnUNet_results (nnUNetv2_install_pretrained_model_from_zip).
    #[command(name = "install_pretrained_model_from_zip")]
    InstallPretrainedModelFromZip(InstallZipArgs),
    /// Download a model zip over HTTP(S) and install it
    /// (nnUNetv2_download_pretrained_model_by_url).
    #[command(name = "download_pretrained_model_by_url")]
    DownloadPretrainedModelByUrl(DownloadArgs),
    /// Convert a Medical Segmentation Decathlon task (TaskXX_Name) into a raw dataset, 4D
    /// images split per channel (nnUNetv2_convert_MSD_dataset).
    #[command(name = "convert_MSD_dataset")]
    ConvertMsdDataset(ConvertMsdArgs),
    /// Convert an nnU-Net v1 raw task into a v2 dataset (nnUNetv2_convert_old_nnUNet_dataset).
    #[command(name = "convert_old_nnUNet_dataset")]
    ConvertOldNnunetDataset(ConvertOldArgs),
    /// Copy a dataset's plans to another dataset, e.g. for transfer learning
    /// (nnUNetv2_move_plans_between_datasets).
    #[command(name = "move_plans_between_datasets")]
    MovePlansBetweenDatasets(MovePlansArgs),
    /// Self-check of this build on a device: build and device info, every op against a
    /// reference (f32 and bf16), one forward + backward pass of every network preset.
    /// Exit code 0: all passed, 1: a check failed, 2: device or library unavailable.
    #[command(name = "doctor")]
    Doctor(DoctorArgs),
}

#[derive(Args, Debug)]
pub struct ExportZipArgs {
    /// Dataset (id or name).
    #[arg(short = 'd')]
    pub dataset: String,
    /// Output zip file.
    #[arg(short = 'o')]
    pub output: PathBuf,
    #[arg(short = 'c', num_args = 1.., default_values_t = ["3d_lowres".to_string(), "3d_fullres".to_string(), "2d".to_string(), "3d_cascade_fullres".to_string()])]
    pub configurations: Vec<String>,
    #[arg(long = "tr", default_value = "nnUNetTrainer")]
    pub trainer: String,
    #[arg(short = 'p', default_value = "nnUNetPlans")]
    pub plans: String,
    #[arg(short = 'f', num_args = 1.., default_values_t = ["0".to_string(), "1".to_string(), "2".to_string(), "3".to_string(), "4".to_string()])]
    pub folds: Vec<String>,
    /// Checkpoints to export; each in whichever format the fold has (nnseg .safetensors,
    /// nnU-Net .pth).
    #[arg(long = "chk", num_args = 1.., default_values_t = ["checkpoint_final.pth".to_string()])]
    pub checkpoints: Vec<String>,
    /// Skip configurations that were not trained instead of failing.
    #[arg(long = "not_strict")]
    pub not_strict: bool,
    /// Also export the validation predictions (without probabilities).
    #[arg(long = "exp_cv_preds")]
    pub exp_cv_preds: bool,
}

#[derive(Args, Debug)]
pub struct InstallZipArgs {
    /// The model zip.
    pub zip: PathBuf,
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// http:// or https:// address of a model zip.
    pub url: String,
    /// Expected SHA-256 of the zip (hex); on a mismatch nothing is installed.
    #[arg(long = "sha256")]
    pub sha256: Option<String>,
}

#[derive(Args, Debug)]
pub struct ConvertMsdArgs {
    /// The MSD task folder, e.g. /data/Task05_Prostate (with imagesTr, labelsTr, dataset.json).
    #[arg(short = 'i')]
    pub input: PathBuf,
    /// Dataset id of the result (default: the task's number).
    #[arg(long = "overwrite_id")]
    pub overwrite_id: Option<u32>,
    /// Images converted in parallel.
    #[arg(long = "np", default_value_t = 4)]
    pub num_processes: usize,
}

#[derive(Args, Debug)]
pub struct ConvertOldArgs {
    /// The v1 task folder itself (with imagesTr, labelsTr, dataset.json).
    pub input_folder: PathBuf,
    /// The new dataset's name, DatasetXXX_Name.
    pub output_dataset_name: String,
}

#[derive(Args, Debug)]
pub struct MovePlansArgs {
    /// Source dataset (id or name).
    #[arg(short = 's')]
    pub source: String,
    /// Target dataset (id or name); it needs a raw dataset.
    #[arg(short = 't')]
    pub target: String,
    /// Source plans identifier, e.g. nnUNetPlans.
    #[arg(long = "sp")]
    pub source_plans: String,
    /// Target plans identifier (default: the source's). Choose a new one when the target
    /// already has its own plans of that name.
    #[arg(long = "tp")]
    pub target_plans: Option<String>,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long = "device", default_value = "cpu")]
    pub device: String,
    /// Print one JSON object instead of the table.
    #[arg(long = "json")]
    pub json: bool,
    /// Only the op checks (skip the networks' forward + backward passes).
    #[arg(long = "no_networks")]
    pub no_networks: bool,
}

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// 3d_fullres (patch 128³, batch 2, features 32..320) or 2d (512², batch 12, 32..512).
    #[arg(long = "config", default_value = "3d_fullres")]
    pub config: String,
    /// Patch size override, e.g. 24,56,56.
    #[arg(long = "patch", value_delimiter = ',')]
    pub patch: Option<Vec<usize>>,
    #[arg(long = "batch_size")]
    pub batch_size: Option<usize>,
    /// Features per stage override, e.g. 32,64,128,256,320.
    #[arg(long = "features", value_delimiter = ',')]
    pub features: Option<Vec<usize>>,
    /// Strides per stage, `;`-separated stages of `,`-separated axes, e.g. "1,1,1;1,2,2;2,2,2".
    #[arg(long = "strides")]
    pub strides: Option<String>,
    /// Kernel sizes per stage, same format as --strides.
    #[arg(long = "kernels")]
    pub kernels: Option<String>,
    #[arg(long = "in_channels", default_value_t = 1)]
    pub in_channels: usize,
    #[arg(long = "num_classes", default_value_t = 3)]
    pub num_classes: usize,
    #[arg(long = "iters", default_value_t = 20)]
    pub iters: usize,
    #[arg(long = "warmup", default_value_t = 5)]
    pub warmup: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long = "device", default_value = "cpu")]
    pub device: String,
    /// Print one JSON line instead of text.
    #[arg(long = "json")]
    pub json: bool,
    /// Time the network of this trainer preset (kiunet_minimal, convunext_tiny, ...) instead
    /// of PlainConvUNet.
    #[arg(long = "tr")]
    pub trainer: Option<String>,
    /// bf16 mixed precision (f32 master weights, loss in f32): auto (on for CUDA, off on
    /// the CPU), on or off.
    #[arg(long = "amp", default_value = "auto", value_name = "auto|on|off")]
    pub amp: trainer::Amp,
}

#[derive(Args, Debug)]
pub struct OverlayArgs {
    /// Dataset id (1, 001 or Dataset001_Name) in nnUNet_raw.
    pub dataset: String,
    /// Output folder for the PNGs.
    pub output: PathBuf,
    /// Which slice along the first axis: middle, or the one with the most foreground.
    #[arg(long = "slice", default_value = "middle", value_parser = ["middle", "most_foreground"])]
    pub slice: String,
    /// Worker threads (default: all cores).
    #[arg(long = "np")]
    pub num_processes: Option<usize>,
}

#[derive(Args, Debug, Clone)]
pub struct DatasetIds {
    /// Dataset id(s): 1, 001 or Dataset001_Name.
    #[arg(value_name = "DATASET_ID")]
    pub positional: Vec<String>,
    /// Dataset id(s), nnU-Net style (-d 1 2).
    #[arg(short = 'd', num_args = 1.., value_name = "DATASET_ID")]
    pub d: Vec<String>,
}

impl DatasetIds {
    pub fn all(&self) -> Vec<String> {
        self.positional.iter().chain(&self.d).cloned().collect()
    }
}

#[derive(Args, Debug, Clone)]
pub struct FingerprintOpts {
    /// Worker processes for fingerprint extraction.
    #[arg(long = "npfp", default_value_t = default_workers())]
    pub npfp: usize,
    /// Check the raw dataset the way nnU-Net's --verify_dataset_integrity does.
    #[arg(long = "verify_dataset_integrity")]
    pub verify_dataset_integrity: bool,
    /// Recompute the fingerprint even if dataset_fingerprint.json exists.
    #[arg(long)]
    pub clean: bool,
}

#[derive(Args, Debug, Clone)]
pub struct PlannerOpts {
    /// Planner: ExperimentPlanner, nnUNetPlannerResEncM, nnUNetPlannerResEncL, nnUNetPlannerResEncXL.
    #[arg(long = "pl", default_value = "ExperimentPlanner")]
    pub pl: String,
    /// GPU memory target in GB (default: the planner's own, 8 for ExperimentPlanner).
    #[arg(long = "gpu_memory_target", value_name = "GB")]
    pub gpu_memory_target: Option<f64>,
    /// Replace the 3d_fullres target spacing (three numbers, reader axis order after transpose).
    #[arg(
        long = "overwrite_target_spacing",
        num_args = 3,
        value_name = "SPACING"
    )]
    pub overwrite_target_spacing: Option<Vec<f64>>,
    /// Name of the plans file / identifier (default: the planner's, e.g. nnUNetPlans).
    #[arg(long = "overwrite_plans_name", value_name = "NAME")]
    pub overwrite_plans_name: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct PreprocessOpts {
    /// Configurations to preprocess.
    #[arg(short = 'c', num_args = 1.., default_values_t = ["2d".to_string(), "3d_fullres".to_string(), "3d_lowres".to_string()])]
    pub configurations: Vec<String>,
    /// Workers per configuration: one number for all, or one per configuration.
    #[arg(long = "np", num_args = 1..)]
    pub np: Vec<usize>,
    /// Only preprocess the cases that are missing from the existing complete data folder or
    /// whose raw files changed since; reuse the rest (nnseg only; nnU-Net always redoes all).
    #[arg(long = "incremental")]
    pub incremental: bool,
}

#[derive(Args, Debug)]
pub struct PlanAndPreprocessArgs {
    #[command(flatten)]
    pub ids: DatasetIds,
    #[command(flatten)]
    pub fingerprint: FingerprintOpts,
    #[command(flatten)]
    pub planner: PlannerOpts,
    #[command(flatten)]
    pub preprocess: PreprocessOpts,
    /// Plan only, do not preprocess.
    #[arg(long = "no_pp")]
    pub no_pp: bool,
}

#[derive(Args, Debug)]
pub struct FingerprintArgs {
    #[command(flatten)]
    pub ids: DatasetIds,
    #[command(flatten)]
    pub fingerprint: FingerprintOpts,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub ids: DatasetIds,
    #[command(flatten)]
    pub planner: PlannerOpts,
}

#[derive(Args, Debug)]
pub struct PreprocessArgs {
    #[command(flatten)]
    pub ids: DatasetIds,
    /// Plans identifier (file name without .json).
    #[arg(long = "plans_name", default_value = "nnUNetPlans")]
    pub plans_name: String,
    #[command(flatten)]
    pub preprocess: PreprocessOpts,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Dataset id (1, 001 or Dataset001_Name).
    pub dataset: String,
    /// Configuration in the plans (2d, 3d_fullres, 3d_lowres, or a hand-added one).
    pub configuration: String,
    /// Fold: 0-4 or all.
    pub fold: String,
    /// Trainer preset (nnUNetTrainer, nnUNetTrainer_5epochs, nnUNetTrainerNoDeepSupervision, ...).
    #[arg(long = "tr", default_value = "nnUNetTrainer")]
    pub trainer: String,
    /// Plans identifier.
    #[arg(short = 'p', default_value = "nnUNetPlans")]
    pub plans: String,
    /// Continue from the last checkpoint (final, latest or best).
    #[arg(long = "c")]
    pub continue_training: bool,
    /// Only run the final validation.
    #[arg(long = "val")]
    pub validation_only: bool,
    /// Save softmax outputs of the final validation.
    #[arg(long = "npz")]
    pub npz: bool,
    /// Initialise the network from this checkpoint before training (nnseg .safetensors or
    /// nnU-Net .pth): weights matching by name and shape are loaded, segmentation heads of
    /// another class count skipped. Not with --c.
    #[arg(long = "pretrained_weights", value_name = "CHECKPOINT")]
    pub pretrained_weights: Option<std::path::PathBuf>,
    /// Write no checkpoint during training (the final validation is then skipped).
    #[arg(long = "disable_checkpointing")]
    pub disable_checkpointing: bool,
    /// Validate with checkpoint_best instead of checkpoint_final (after training and with --val).
    #[arg(long = "val_best")]
    pub val_best: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long = "device", default_value = "cpu")]
    pub device: String,
    /// Seed for network initialisation and data loading.
    #[arg(long = "seed")]
    pub seed: Option<u64>,
    /// bf16 mixed precision (f32 master weights, loss in f32): auto (on for CUDA, off on
    /// the CPU), on or off.
    /// [default: auto]
    #[arg(long = "amp", value_name = "auto|on|off")]
    pub amp: Option<trainer::Amp>,
    /// nnseg extension: override the preset's number of epochs.
    #[arg(long = "num_epochs")]
    pub num_epochs: Option<usize>,
    /// nnseg extension: override the training iterations per epoch.
    #[arg(long = "num_iterations_per_epoch")]
    pub num_iterations_per_epoch: Option<usize>,
    /// nnseg extension: override the validation iterations per epoch.
    #[arg(long = "num_val_iterations_per_epoch")]
    pub num_val_iterations_per_epoch: Option<usize>,
    /// GPU memory budget (GB) a network preset (`-tr kiunet_minimal`, ...) is fitted to; when
    /// the preset's network does not fit the configuration's patch and batch, a fitted
    /// configuration `CONFIG__PRESET` is written into the plans and trained instead.
    #[arg(long = "gpu_memory_target", value_name = "GB")]
    pub gpu_memory_target: Option<f64>,
    /// Growable networks (`-tr growable_unet`): grow the --grow-layers after every N epochs.
    #[arg(long = "grow-every", value_name = "N")]
    pub grow_every: Option<usize>,
    /// Grow when the validation loss has not improved for P epochs.
    #[arg(long = "grow-on-plateau", value_name = "P")]
    pub grow_on_plateau: Option<usize>,
    /// Layers to grow: bottleneck, down_3, up_0.conv2, ... (default: bottleneck).
    #[arg(long = "grow-layers", num_args = 1..)]
    pub grow_layers: Vec<String>,
    /// Per-epoch growth schedule: EPOCH:LAYER entries, e.g. 10:bottleneck 20:down_3.
    #[arg(long = "grow-schedule", num_args = 1..)]
    pub grow_schedule: Vec<trainer::growth::ScheduleEntry>,
    /// split, sample_select (default) or gradmax.
    #[arg(long = "grow-method")]
    pub grow_method: Option<trainer::growth::GrowthMethodName>,
    /// Candidates scored per new filter (sample_select).
    #[arg(long = "n-candidates")]
    pub n_candidates: Option<usize>,
    /// Filters added per grown conv and growth.
    #[arg(long = "grow-n-new")]
    pub grow_n_new: Option<usize>,
    /// Asymmetry of the halved outgoing weights (split).
    #[arg(long = "split-noise")]
    pub split_noise: Option<f64>,
}

impl TrainArgs {
    /// `base` (the preset's growth options) with the growth flags applied.
    pub fn growth_options(
        &self,
        mut base: trainer::growth::GrowthOptions,
    ) -> trainer::growth::GrowthOptions {
        if let Some(n) = self.grow_every {
            base.every = Some(n);
        }
        if let Some(p) = self.grow_on_plateau {
            base.on_plateau = Some(p);
        }
        if !self.grow_layers.is_empty() {
            base.layers = self.grow_layers.clone();
        }
        base.add_schedule(&self.grow_schedule);
        if let Some(m) = self.grow_method {
            base.method = m;
        }
        if let Some(n) = self.n_candidates {
            base.n_candidates = n;
        }
        if let Some(n) = self.grow_n_new {
            base.n_new_per_growth = n;
        }
        if let Some(x) = self.split_noise {
            base.split_noise = x;
        }
        base
    }
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Input folder with case_XXXX_0000{ending} images.
    #[arg(short = 'i')]
    pub input: PathBuf,
    /// Output folder for the segmentations.
    #[arg(short = 'o')]
    pub output: PathBuf,
    /// Dataset id.
    #[arg(short = 'd')]
    pub dataset: String,
    /// Configuration.
    #[arg(short = 'c')]
    pub configuration: String,
    /// Trainer name.
    #[arg(long = "tr", default_value = "nnUNetTrainer")]
    pub trainer: String,
    /// Plans identifier.
    #[arg(short = 'p', default_value = "nnUNetPlans")]
    pub plans: String,
    #[command(flatten)]
    pub options: PredictOptions,
}

#[derive(Args, Debug)]
pub struct PredictFromModelFolderArgs {
    /// Input folder with case_XXXX_0000{ending} images.
    #[arg(short = 'i')]
    pub input: PathBuf,
    /// Output folder for the segmentations.
    #[arg(short = 'o')]
    pub output: PathBuf,
    /// Model folder `{trainer}__{plans}__{configuration}` with plans.json, dataset.json and
    /// fold_X/ (trained by nnseg or by nnU-Net v2).
    #[arg(short = 'm')]
    pub model_folder: PathBuf,
    #[command(flatten)]
    pub options: PredictOptions,
}

/// The flags `predict` and `predict_from_modelfolder` share.
#[derive(Args, Debug)]
pub struct PredictOptions {
    /// Folds to ensemble (0-4 or all).
    #[arg(short = 'f', num_args = 1.., default_values_t = ["0".to_string(), "1".to_string(), "2".to_string(), "3".to_string(), "4".to_string()])]
    pub folds: Vec<String>,
    /// Checkpoint: checkpoint_final / checkpoint_best (nnseg's .safetensors or nnU-Net's
    /// .pth, whichever the fold has; `.pth` prefers nnU-Net's file), or `model` for the
    /// result of import_nnunet_model.
    #[arg(long = "chk", default_value = "checkpoint_final")]
    pub checkpoint: String,
    /// Also write per-case probabilities (.npz) and properties (.json).
    #[arg(long = "save_probabilities")]
    pub save_probabilities: bool,
    /// Sliding-window step as a fraction of the patch.
    #[arg(long = "step_size", default_value_t = 0.5)]
    pub step_size: f64,
    /// No mirroring test-time augmentation.
    #[arg(long = "disable_tta")]
    pub disable_tta: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long = "device", default_value = "cpu")]
    pub device: String,
    /// bf16 inference (logits accumulated in f32): auto (on for CUDA, off on the CPU), on or
    /// off.
    #[arg(long = "amp", default_value = "auto", value_name = "auto|on|off")]
    pub amp: trainer::Amp,
    /// Preprocessing / export threads; also how many preprocessed cases may wait for the
    /// network (preprocessing runs ahead on its own thread).
    #[arg(long = "npp", default_value_t = 3)]
    pub npp: usize,
    /// How many predicted cases may wait for their export (export runs behind on its own
    /// thread).
    #[arg(long = "nps", default_value_t = 3)]
    pub nps: usize,
    /// Cascade input: the previous stage's predictions of the same cases.
    #[arg(long = "prev_stage_predictions")]
    pub prev_stage_predictions: Option<PathBuf>,
    /// At most N network inputs (tiles and their mirrored copies) per forward pass; default:
    /// automatic (about 2^18 input voxels per pass, at most 64). Results do not depend on it.
    #[arg(long = "batch_tiles", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_tiles: Option<u64>,
    /// Sliding-window sums stored in f16 with nnU-Net's rounding (default: reproduces nnU-Net's
    /// predictions, half the memory of the sums) or in f32 (more exact at tile corners).
    #[arg(long = "accumulate", default_value = "f16", value_name = "f16|f32")]
    pub accumulate: trainer::predict::Accumulation,
    /// Memory a case may plan for, in GB (default: what the machine has available when the
    /// case starts). A case whose estimate (printed with --verbose) does not fit falls back to
    /// f16 sums, then to one input per forward pass, and is refused with the estimate when
    /// even that does not fit (instead of an out-of-memory kill).
    #[arg(long = "max_memory_gb", value_name = "GB")]
    pub max_memory_gb: Option<f64>,
    /// Split the cases into this many parts (for several machines or GPUs sharing one output
    /// folder); this run predicts part -part_id.
    #[arg(long = "num_parts", default_value_t = 1)]
    pub num_parts: usize,
    /// Which part (0..num_parts-1): every num_parts-th case from this one, in case order.
    #[arg(long = "part_id", default_value_t = 0)]
    pub part_id: usize,
    /// Skip cases whose outputs are written already (continue an interrupted prediction).
    #[arg(long = "continue_prediction")]
    pub continue_prediction: bool,
    /// Keep the sliding-window sums in host memory on CUDA (as nnU-Net's flag) instead of on
    /// the GPU: for volumes whose sums do not fit into GPU memory. No effect on the CPU.
    #[arg(long = "not_on_device")]
    pub not_on_device: bool,
}

#[derive(Args, Debug)]
pub struct EnsembleArgs {
    /// Prediction folders made with --save_probabilities.
    #[arg(short = 'i', num_args = 2..)]
    pub inputs: Vec<PathBuf>,
    #[arg(short = 'o')]
    pub output: PathBuf,
    #[arg(long = "np", default_value_t = default_workers())]
    pub np: usize,
    /// Also write the averaged probabilities.
    #[arg(long = "save_npz")]
    pub save_npz: bool,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// Reference segmentations.
    pub reference: PathBuf,
    /// Predicted segmentations.
    pub prediction: PathBuf,
    /// dataset.json (labels, regions, ignore label, file ending).
    #[arg(long = "djfile")]
    pub dataset_json: PathBuf,
    /// plans.json (accepted for nnU-Net compatibility; not needed).
    #[arg(long = "pfile")]
    pub plans_json: Option<PathBuf>,
    /// Output file (default PREDICTION/summary.json).
    #[arg(short = 'o')]
    pub output: Option<PathBuf>,
    #[arg(long = "np", default_value_t = default_workers())]
    pub np: usize,
    /// Do not fail when predictions are missing.
    #[arg(long = "chill")]
    pub chill: bool,
}

#[derive(Args, Debug)]
pub struct EvaluateSimpleArgs {
    /// Reference segmentations.
    pub reference: PathBuf,
    /// Predicted segmentations.
    pub prediction: PathBuf,
    /// Labels to evaluate.
    #[arg(short = 'l', num_args = 1.., required = true, allow_negative_numbers = true)]
    pub labels: Vec<i64>,
    /// Ignore label: reference voxels with this value count nowhere.
    #[arg(long = "il")]
    pub ignore_label: Option<i64>,
    /// Output file (default PREDICTION/summary.json).
    #[arg(short = 'o')]
    pub output: Option<PathBuf>,
    #[arg(long = "np", default_value_t = default_workers())]
    pub np: usize,
    /// Do not fail when predictions are missing.
    #[arg(long = "chill")]
    pub chill: bool,
    /// nnseg extension: the files' ending (default: .nii.gz as nnU-Net, else the one ending
    /// found in REFERENCE).
    #[arg(long = "file_ending")]
    pub file_ending: Option<String>,
}

#[derive(Args, Debug)]
pub struct AccumulateArgs {
    /// Dataset id (1, 001 or Dataset001_Name).
    pub dataset: String,
    /// Configuration.
    #[arg(short = 'c', default_value = "3d_fullres")]
    pub configuration: String,
    /// Output folder (default: MODEL/crossval_results_folds_{folds}).
    #[arg(short = 'o')]
    pub output: Option<PathBuf>,
    /// Folds.
    #[arg(short = 'f', num_args = 1.., default_values_t = ["0".to_string(), "1".to_string(), "2".to_string(), "3".to_string(), "4".to_string()])]
    pub folds: Vec<String>,
    /// Plans identifier.
    #[arg(short = 'p', default_value = "nnUNetPlans")]
    pub plans: String,
    /// Trainer name.
    #[arg(long = "tr", default_value = "nnUNetTrainer")]
    pub trainer: String,
    #[arg(long = "np", default_value_t = default_workers())]
    pub np: usize,
}

#[derive(Args, Debug)]
pub struct DeterminePpArgs {
    /// Folder with the predicted segmentations.
    #[arg(short = 'i')]
    pub input: PathBuf,
    /// Folder with the reference segmentations.
    #[arg(long = "ref")]
    pub reference: PathBuf,
    /// plans.json (accepted for nnU-Net compatibility; not needed).
    #[arg(long = "plans_json")]
    pub plans_json: Option<PathBuf>,
    /// dataset.json (default: INPUT/dataset.json).
    #[arg(long = "dataset_json")]
    pub dataset_json: Option<PathBuf>,
    #[arg(long = "np", default_value_t = default_workers())]
    pub np: usize,
    /// Do not keep the postprocessed files (INPUT/postprocessed/).
    #[arg(long = "remove_postprocessed")]
    pub remove_postprocessed: bool,
}

#[derive(Args, Debug)]
pub struct ApplyPpArgs {
    #[arg(short = 'i')]
    pub input: PathBuf,
    #[arg(short = 'o')]
    pub output: PathBuf,
    /// postprocessing.json written by find_best_configuration (nnU-Net's flag name kept).
    #[arg(long = "pp_pkl_file")]
    pub pp_file: PathBuf,
    #[arg(long = "np", default_value_t = default_workers())]
    pub np: usize,
    /// plans.json (for nnU-Net compatibility; copied next to the output if given).
    #[arg(long = "plans_json")]
    pub plans_json: Option<PathBuf>,
    /// dataset.json (default: the one in the input folder).
    #[arg(long = "dataset_json")]
    pub dataset_json: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    Local,
    Slurm,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    #[value(name = "find_best_configuration")]
    FindBestConfiguration,
}

#[derive(Args, Debug)]
pub struct CrossValidateArgs {
    /// Dataset id (1, 001 or Dataset001_Name).
    pub dataset: String,
    /// Configurations (default: those of 2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres the
    /// plans have).
    #[arg(short = 'c', num_args = 1..)]
    pub configurations: Vec<String>,
    /// Trainer names.
    #[arg(long = "tr", num_args = 1.., default_values_t = ["nnUNetTrainer".to_string()])]
    pub trainers: Vec<String>,
    /// Plans identifier.
    #[arg(short = 'p', default_value = "nnUNetPlans")]
    pub plans: String,
    /// Folds.
    #[arg(short = 'f', num_args = 1.., default_values_t = ["0".to_string(), "1".to_string(), "2".to_string(), "3".to_string(), "4".to_string()])]
    pub folds: Vec<String>,
    /// Where the jobs run.
    #[arg(long = "launcher", value_enum, default_value = "local")]
    pub launcher: Launcher,
    /// What runs after the trainings.
    #[arg(long = "then", value_enum)]
    pub then: Option<Then>,
    /// Local launcher: CUDA devices, one training per device at a time (e.g. 0,1,2,3);
    /// without, the trainings run on the CPU one after the other.
    #[arg(long = "gpus", value_delimiter = ',')]
    pub gpus: Vec<usize>,
    /// Passed to every training: save softmax outputs of the final validation (needed for
    /// ensembles in find_best_configuration).
    #[arg(long = "npz")]
    pub npz: bool,
    /// Passed to find_best_configuration.
    #[arg(long = "disable_ensembling")]
    pub disable_ensembling: bool,
    /// Then predict the images in IN into OUT with what find_best_configuration recommends
    /// (implies --then find_best_configuration), as `nnseg predict_best_configuration`.
    #[arg(long = "predict", num_args = 2, value_names = ["IN", "OUT"])]
    pub predict: Option<Vec<PathBuf>>,
    /// Passed to every training.
    #[arg(long = "num_epochs")]
    pub num_epochs: Option<usize>,
    /// Passed to every training.
    #[arg(long = "num_iterations_per_epoch")]
    pub num_iterations_per_epoch: Option<usize>,
    /// Passed to every training.
    #[arg(long = "num_val_iterations_per_epoch")]
    pub num_val_iterations_per_epoch: Option<usize>,
    /// Slurm: write the scripts and print the sbatch commands without submitting.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// Slurm: print each job's state (squeue/sacct and the results folder) of the last
    /// submission.
    #[arg(long = "status")]
    pub status: bool,
    /// Slurm: one GPU per job (--gres=gpu:1; trainings on --device cuda).
    #[arg(long = "slurm-gpu")]
    pub slurm_gpu: bool,
    /// Slurm: --partition.
    #[arg(long = "partition")]
    pub partition: Option<String>,
    /// Slurm: --account.
    #[arg(long = "account")]
    pub account: Option<String>,
    /// Slurm: --time per job (e.g. 2-00:00:00).
    #[arg(long = "time")]
    pub time: Option<String>,
    /// Slurm: --mem per job (e.g. 32G).
    #[arg(long = "mem")]
    pub mem: Option<String>,
    /// Slurm: --cpus-per-task.
    #[arg(long = "cpus-per-task")]
    pub cpus_per_task: Option<usize>,
    /// Slurm: at most this many jobs of an array at once (--array=0-N%MAX).
    #[arg(long = "max-parallel")]
    pub max_parallel: Option<usize>,
    /// Slurm: seconds between the USR1 warning and the time limit (--signal=B:USR1@GRACE).
    #[arg(long = "grace", default_value_t = 300)]
    pub grace: u64,
}

#[derive(Args, Debug)]
pub struct PredictBestArgs {
    /// Dataset id.
    pub dataset: String,
    /// Input folder with case_XXXX_0000{ending} images.
    #[arg(short = 'i')]
    pub input: PathBuf,
    /// Output folder for the postprocessed segmentations (OUT_model_K and
    /// OUT_before_postprocessing are written next to it).
    #[arg(short = 'o')]
    pub output: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long = "device", default_value = "cpu")]
    pub device: String,
    /// Preprocessing / export workers.
    #[arg(long = "npp", default_value_t = 3)]
    pub npp: usize,
}

#[derive(Args, Debug)]
pub struct FindBestArgs {
    /// Dataset id.
    pub dataset: String,
    /// Configurations to consider.
    #[arg(short = 'c', num_args = 1.., default_values_t = ["2d".to_string(), "3d_fullres".to_string(), "3d_lowres".to_string(), "3d_cascade_fullres".to_string()])]
    pub configurations: Vec<String>,
    /// Trainer names.
    #[arg(long = "tr", num_args = 1.., default_values_t = ["nnUNetTrainer".to_string()])]
    pub trainers: Vec<String>,
    /// Plans identifiers.
    #[arg(short = 'p', num_args = 1.., default_values_t = ["nnUNetPlans".to_string()])]
    pub plans: Vec<String>,
    /// Folds.
    #[arg(short = 'f', num_args = 1.., default_values_t = ["0".to_string(), "1".to_string(), "2".to_string(), "3".to_string(), "4".to_string()])]
    pub folds: Vec<String>,
    /// Do not try pairwise ensembles.
    #[arg(long = "disable_ensembling")]
    pub disable_ensembling: bool,
    #[arg(long = "np", default_value_t = default_workers())]
    pub np: usize,
}

#[derive(Args, Debug)]
pub struct ShowNetworkArgs {
    /// Dataset id (1, 001 or Dataset001_Name).
    pub dataset: String,
    /// Configuration name in the plans (2d, 3d_fullres, or a hand-added one).
    pub configuration: String,
    /// Plans identifier (file name without .json).
    #[arg(short = 'p', long = "plans", default_value = "nnUNetPlans")]
    pub plans: String,
    /// Patch size to describe instead of the plan's.
    #[arg(long = "patch", num_args = 2..=3)]
    pub patch: Option<Vec<usize>>,
    /// Trainer preset whose network to show (`kiunet_minimal`, `convunext_tiny`, ...), with
    /// its fit to the GPU memory budget.
    #[arg(long = "tr")]
    pub trainer: Option<String>,
    /// GPU memory budget (GB) for the fit shown with `-tr`.
    #[arg(long = "gpu_memory_target", value_name = "GB")]
    pub gpu_memory_target: Option<f64>,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// nnU-Net model folder `{Trainer}__{Plans}__{Configuration}` (holds plans.json, dataset.json,
    /// fold_X/), or a zip made by nnU-Net's export_model_to_zip (installed into nnUNet_results,
    /// then every fold with the checkpoint is imported; -f and -o do not apply).
    pub folder: PathBuf,
    /// Fold to import (0-4 or all).
    #[arg(short = 'f', default_value = "0")]
    pub fold: String,
    /// Checkpoint file name inside fold_X.
    #[arg(long = "chk", default_value = "checkpoint_final.pth")]
    pub checkpoint: String,
    /// Output folder (default: FOLDER/fold_X).
    #[arg(short = 'o')]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Seed for the synthetic data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Rewrites nnU-Net's single-dash long flags (`-np 4`, `-gpu_memory_target 8`) into
/// `--np 4`; short flags (`-d`, `-c`) and negative numbers are left alone.
pub fn normalize_args<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    let mut out = Vec::new();
    let mut after_double_dash = false;
    for (i, a) in args.into_iter().enumerate() {
        if i == 0 || after_double_dash {
            out.push(a);
            continue;
        }
        if a == "--" {
            after_double_dash = true;
            out.push(a);
            continue;
        }
        let bytes = a.as_bytes();
        let single_dash_long = bytes.len() > 2
            && bytes[0] == b'-'
            && bytes[1] != b'-'
            && bytes[1].is_ascii_alphabetic()
            && !a.contains('=');
        if single_dash_long {
            out.push(format!("-{a}"));
        } else {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let v = normalize_args(args.iter().map(|s| s.to_string()));
        Cli::try_parse_from(v).unwrap()
    }

    #[test]
    fn nnunet_style_flags_are_accepted() {
        let cli = parse(&[
            "nnseg",
            "plan_and_preprocess",
            "-d",
            "990",
            "-np",
            "2",
            "4",
            "-pl",
            "nnUNetPlannerResEncM",
            "-gpu_memory_target",
            "10",
            "-c",
            "3d_fullres",
            "--verify_dataset_integrity",
        ]);
        match cli.command {
            Command::PlanAndPreprocess(a) => {
                assert_eq!(a.ids.all(), vec!["990"]);
                assert_eq!(a.preprocess.np, vec![2, 4]);
                assert_eq!(a.planner.pl, "nnUNetPlannerResEncM");
                assert_eq!(a.planner.gpu_memory_target, Some(10.0));
                assert_eq!(a.preprocess.configurations, vec!["3d_fullres"]);
                assert!(a.fingerprint.verify_dataset_integrity);
            }
            other => panic!("wrong command {other:?}"),
        }
    }

    #[test]
    fn cross_validate_flags() {
        let cli = parse(&[
            "nnseg",
            "cross_validate",
            "991",
            "-c",
            "2d",
            "3d_fullres",
            "-f",
            "0",
            "1",
            "--gpus",
            "0,1",
            "--then",
            "find_best_configuration",
            "--predict",
            "in",
            "out",
            "--launcher",
            "slurm",
            "--max-parallel",
            "4",
        ]);
        let Command::CrossValidate(a) = cli.command else {
            panic!("not cross_validate")
        };
        assert_eq!(a.configurations, ["2d", "3d_fullres"]);
        assert_eq!(a.folds, ["0", "1"]);
        assert_eq!(a.gpus, [0, 1]);
        assert_eq!(a.then, Some(Then::FindBestConfiguration));
        assert_eq!(
            a.predict,
            Some(vec![PathBuf::from("in"), PathBuf::from("out")])
        );
        assert_eq!(a.launcher, Launcher::Slurm);
        assert_eq!(a.max_parallel, Some(4));
        assert_eq!(a.trainers, ["nnUNetTrainer"]);
        assert_eq!(a.grace, 300);
    }

    #[test]
    fn positional_id_and_negative_numbers() {
        let v = normalize_args(["nnseg", "-x", "-1", "--raw", "-np"].map(String::from));
        assert_eq!(v, vec!["nnseg", "-x", "-1", "--raw", "--np"]);
        let cli = parse(&["nnseg", "plan_experiment", "Dataset990_Demo3D"]);
        match cli.command {
            Command::PlanExperiment(a) => assert_eq!(a.ids.all(), vec!["Dataset990_Demo3D"]),
            other => panic!("wrong command {other:?}"),
        }
    }

    #[test]
    fn growth_flags_become_typed_growth_options() {
        let cli = parse(&[
            "nnseg",
            "train",
            "990",
            "2d",
            "0",
            "-tr",
            "growable_unet",
            "--grow-every",
            "3",
            "--grow-layers",
            "bottleneck",
            "down_1",
            "--grow-schedule",
            "10:up_0.conv2",
            "--grow-method",
            "gradmax",
        ]);
        let Command::Train(a) = cli.command else {
            panic!("not train")
        };
        let o = a.growth_options(trainer::growth::GrowthOptions::default());
        assert_eq!(o.every, Some(3));
        assert_eq!(o.layers, vec!["bottleneck", "down_1"]);
        assert_eq!(o.schedule[&10], vec!["up_0.conv2"]);
        assert_eq!(o.method, trainer::growth::GrowthMethodName::Gradmax);
        assert_eq!(o.n_candidates, 10, "unset flags keep the preset's values");
        let bad = [
            "nnseg",
            "train",
            "990",
            "2d",
            "0",
            "--grow-method",
            "firefly",
        ];
        let e = Cli::try_parse_from(normalize_args(bad.iter().map(|s| s.to_string())));
        assert!(e.unwrap_err().to_string().contains("firefly"));
        let bad = [
            "nnseg",
            "train",
            "990",
            "2d",
            "0",
            "--grow-schedule",
            "x:bottleneck",
        ];
        let e = Cli::try_parse_from(normalize_args(bad.iter().map(|s| s.to_string())));
        assert!(e.unwrap_err().to_string().contains("x:bottleneck"));
    }
}
