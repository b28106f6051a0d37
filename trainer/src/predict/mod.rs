//! Inference: nnU-Net's `nnUNetPredictor` (`inference/predict_from_raw_data.py`).
//!
//! - [`sliding`]: tile steps, Gaussian importance map, padding, mirroring TTA, accumulation;
//! - [`export`]: logits → segmentation / probabilities in the original image space;
//! - [`Predictor`]: the networks of one trained model (one per fold) with its plans and
//!   dataset.json; [`predict_from_raw_folder`] runs `nnseg predict` on a folder of raw images;
//!   [`run_final_validation`] predicts a fold's validation cases from the preprocessed data.

pub mod export;
pub mod memory;
pub mod model_files;
pub mod on_device;
pub mod outputs;
pub mod sliding;

use crate::amp::Amp;
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::data::Fold;
use architectures::network::{ArchError, NetworkIo, SegNetwork};
use architectures::registry::Registry;
use candle_core::{DType, Device, Tensor};
use datasets::layout::validation_folder;
use datasets::{ModelDir, PredictionDir, PreprocessedDir};
use ndarray::{Array4, ArrayD, ArrayView4, ArrayViewD, IxDyn};
use plans::{Configuration, DatasetJson, Plans};
use preprocessing::storage::CaseProperties;
use std::path::{Path, PathBuf};

pub use export::{convert_logits_to_segmentation, ExportedPrediction, LabelHandling};
pub use sliding::{
    auto_batch_inputs, compute_gaussian, compute_steps_for_sliding_window, sliding_window_logits,
    sliding_window_logits_many, Accumulation, SlidingWindowOptions, TileNetwork,
};

/// Inference errors; each names the file, case or setting involved.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error(transparent)]
    Plans(#[from] plans::PlansError),
    #[error(transparent)]
    Dataset(#[from] datasets::DatasetError),
    #[error(transparent)]
    Preprocess(#[from] preprocessing::PreprocessError),
    #[error(transparent)]
    Storage(#[from] preprocessing::storage::StorageError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Arch(#[from] ArchError),
    /// Reading an nnU-Net checkpoint (`.pth`).
    #[error(transparent)]
    Import(#[from] crate::import::ImportError),
    #[error(transparent)]
    Evaluation(#[from] crate::evaluation::EvalError),
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    #[error(transparent)]
    Output(#[from] outputs::OutputError),
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// `reading`, `listing`, `creating`, ...
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("case {case}: {source}")]
    Case {
        case: String,
        #[source]
        source: Box<PredictError>,
    },
    /// Problems with the input folder (missing channels, unexpected files, no cases).
    #[error("{0}")]
    Input(String),
    /// Invalid settings, plans or model files.
    #[error("{0}")]
    Config(String),
    /// A case that does not fit into the memory budget (see [`memory`]).
    #[error("not enough memory: {0}")]
    Memory(String),
    /// Incomplete training data (a cascade's previous-stage segmentations).
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> PredictError + 'a {
    move |source| PredictError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn in_case(case: &str) -> impl FnOnce(PredictError) -> PredictError + '_ {
    move |e| PredictError::Case {
        case: case.to_string(),
        source: Box::new(e),
    }
}

/// A trained network on a candle device, as a [`TileNetwork`].
pub struct CandleTileNetwork {
    pub network: Box<dyn SegNetwork>,
    pub device: Device,
    pub input_channels: usize,
    /// Dtype of the forward pass (bf16 with mixed precision); logits come back as f32.
    pub compute_dtype: DType,
}

impl TileNetwork for CandleTileNetwork {
    fn predict_tile(&self, tile: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>, PredictError> {
        let out = self.predict_batch(tile.insert_axis(ndarray::Axis(0)))?;
        Ok(out.index_axis_move(ndarray::Axis(0), 0))
    }

    /// One forward pass on the whole batch.
    fn predict_batch(&self, tiles: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>, PredictError> {
        let ctx = |source| PredictError::Candle {
            context: format!("copying a batch of tiles of shape {:?}", tiles.shape()),
            source,
        };
        let shape = tiles.shape().to_vec();
        let values: Vec<f32> = match tiles.as_slice() {
            Some(v) => v.to_vec(),
            None => tiles.iter().copied().collect(),
        };
        let x = Tensor::from_vec(values, shape, &self.device).map_err(ctx)?;
        let out = on_device::DeviceTiles::forward_tiles(self, &x)?;
        let dims = out.dims().to_vec();
        let v = out
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(ctx)?;
        ArrayD::from_shape_vec(IxDyn(&dims), v)
            .map_err(|e| PredictError::Config(format!("network output: {e}")))
    }

    fn on_device(&self) -> Option<&dyn on_device::DeviceTiles> {
        (!self.device.is_cpu()).then_some(self as &dyn on_device::DeviceTiles)
    }
}

impl on_device::DeviceTiles for CandleTileNetwork {
    fn device(&self) -> &Device {
        &self.device
    }

    /// One forward pass in the compute dtype; the first (full-resolution) output as f32.
    fn forward_tiles(&self, x: &Tensor) -> Result<Tensor, PredictError> {
        let ctx = |source| PredictError::Candle {
            context: format!(
                "network forward on a batch of tiles of shape {:?}",
                x.dims()
            ),
            source,
        };
        if x.rank() < 2 || x.dims()[1] != self.input_channels {
            return Err(PredictError::Config(format!(
                "the image has {} channel(s) but the network expects {}",
                x.dims().get(1).copied().unwrap_or(0),
                self.input_channels
            )));
        }
        let x = x.to_dtype(self.compute_dtype).map_err(ctx)?;
        let outputs = self.network.forward(&x, false).map_err(ctx)?;
        let out = outputs
            .into_iter()
            .next()
            .ok_or_else(|| PredictError::Config("the network returned no output".into()))?;
        out.to_dtype(DType::F32).map_err(ctx)
    }
}

/// One network's sliding-window logits added to `sum` (pushed when empty; see
/// [`sliding::sliding_window_add_logits`]): on its device when it offers that and
/// `opts.on_device`, else (or when the device runs out of memory, as nnU-Net falls back) with
/// host sums.
fn add_logits_of_network(
    net: &dyn TileNetwork,
    data: &[ArrayView4<'_, f32>],
    opts: &SlidingWindowOptions,
    sum: &mut Vec<Array4<f32>>,
) -> Result<(), PredictError> {
    if let (true, Some(dev)) = (opts.on_device, net.on_device()) {
        match on_device::sliding_window_logits_on_device(dev, data, opts) {
            Err(PredictError::Candle { context, source }) => tracing::warn!(
                "the sliding window on the device failed ({context}: {source}); predicting \
                 with the sums in host memory instead (as --not_on_device)"
            ),
            Err(e) => return Err(e),
            Ok(l) if sum.is_empty() => {
                *sum = l;
                return Ok(());
            }
            Ok(l) => {
                let round = opts.accumulation.rounding();
                for (s, l) in sum.iter_mut().zip(&l) {
                    ndarray::Zip::from(s)
                        .and(l)
                        .par_for_each(|s, &l| *s = round(*s + l));
                }
                return Ok(());
            }
        }
    }
    sliding::sliding_window_add_logits(net, data, opts, sum)
}

/// The `checkpoint_name` argument as a file name: `checkpoint_final`, `checkpoint_final.pth`
/// (nnU-Net's spelling) and `checkpoint_final.safetensors` all give
/// `checkpoint_final.safetensors`.
pub fn checkpoint_file_name(checkpoint_name: &str) -> String {
    let stem = checkpoint_name
        .strip_suffix(".safetensors")
        .or_else(|| checkpoint_name.strip_suffix(".pth"))
        .unwrap_or(checkpoint_name);
    format!("{stem}.safetensors")
}

/// The configuration name of a model folder `{trainer}__{plans}__{configuration}`.
pub fn configuration_from_model_folder(model_folder: &Path) -> Result<String, PredictError> {
    Ok(ModelDir::at(model_folder).id()?.configuration().to_string())
}

/// Loads one fold's checkpoint and builds its network for inference (deep supervision off,
/// weights as constants, forward pass in `amp`'s dtype on `device`).
pub fn load_fold_network(
    checkpoint_path: &Path,
    device: &Device,
    amp: Amp,
    registry: &Registry,
    base_spec: &plans::ArchitectureSpec,
) -> Result<(CandleTileNetwork, Vec<usize>), PredictError> {
    let ck = Checkpoint::load(checkpoint_path, device)?;
    let meta = &ck.meta.network;
    let spec = plans::ArchitectureSpec {
        network_class_name: meta.network_class_name.clone(),
        arch_kwargs: meta.arch_kwargs.clone(),
        kw_requires_import: base_spec.kw_requires_import.clone(),
    };
    let io = NetworkIo {
        in_channels: meta.input_channels,
        num_classes: meta.num_segmentation_heads,
        deep_supervision: false,
    };
    let vb = candle_nn::VarBuilder::from_tensors(ck.network_weights, DType::F32, device);
    let mut network = registry.build(&spec, &io, vb).map_err(|e| {
        PredictError::Config(format!(
            "{}: building the network from the checkpoint failed: {e}",
            checkpoint_path.display()
        ))
    })?;
    network.set_deep_supervision(false);
    Ok((
        CandleTileNetwork {
            network,
            device: device.clone(),
            input_channels: meta.input_channels,
            compute_dtype: amp.compute_dtype(device),
        },
        ck.meta.inference_allowed_mirroring_axes.clone(),
    ))
}

/// The networks of one trained model plus everything needed to preprocess and export.
pub struct Predictor {
    pub plans: Plans,
    pub configuration_name: String,
    pub configuration: Configuration,
    pub dataset_json: DatasetJson,
    pub labels: LabelHandling,
    /// Mirroring axes allowed by the checkpoint (patch axes).
    pub mirror_axes: Vec<usize>,
    /// Tile overlap (nnU-Net's `tile_step_size`, default 0.5).
    pub step_size: f64,
    /// Test-time mirroring (`--disable_tta` turns it off).
    pub use_mirroring: bool,
    /// Network inputs per forward pass (`--batch_tiles`; `None`: automatic).
    pub batch_inputs: Option<usize>,
    /// f32 sums or nnU-Net's f16 numerics (`--accumulate`).
    pub accumulation: sliding::Accumulation,
    /// Sums on a GPU network's device (`false`: `--not_on_device`).
    pub on_device: bool,
    /// Cascade stage (`previous_stage` set): the foreground labels whose one-hot encoding of
    /// the previous stage's segmentation is appended to the image channels.
    pub prev_stage_labels: Option<Vec<i64>>,
    networks: Vec<Box<dyn TileNetwork>>,
}

impl Predictor {
    /// Loads `model_folder/{plans.json, dataset.json}` and, for each fold, the weights
    /// `-chk checkpoint_name` means in `model_folder/fold_{f}/` (nnseg's `.safetensors`,
    /// nnU-Net's `.pth` or an imported `model.safetensors`, see
    /// [`model_files::find_fold_checkpoint`]), run on `device` in `amp`'s precision.
    pub fn from_model_folder(
        model_folder: &Path,
        folds: &[Fold],
        checkpoint_name: &str,
        device: &Device,
        amp: Amp,
        registry: &Registry,
    ) -> Result<Self, PredictError> {
        if folds.is_empty() {
            return Err(PredictError::Config("no folds given".into()));
        }
        let model = ModelDir::at(model_folder);
        let cfg_name = model.id()?.configuration().to_string();
        let (plans, cfg) = Plans::load_configuration(&model.plans_json(), &cfg_name)?;
        let ds = DatasetJson::load(&model.dataset_json())?;
        let load = model_files::LoadFoldOptions {
            model: &model,
            configuration_name: &cfg_name,
            configuration: &cfg,
            device,
            amp,
            registry,
        };
        let mut networks: Vec<Box<dyn TileNetwork>> = vec![];
        let mut mirror_axes = None;
        for fold in folds {
            let loaded = model_files::load_fold(&load, &fold.to_string(), checkpoint_name)?;
            let expected = NetworkIo::input_channels(&cfg, &ds);
            if loaded.network.input_channels != expected {
                return Err(PredictError::Config(format!(
                    "{}: the network takes {} input channel(s) but configuration `{cfg_name}` \
                     gives it {expected} (dataset.json channels{})",
                    loaded.source.path().display(),
                    loaded.network.input_channels,
                    if cfg.previous_stage.is_some() {
                        " + one per foreground label of the previous stage"
                    } else {
                        ""
                    }
                )));
            }
            tracing::debug!("fold {fold}: {}", loaded.source.path().display());
            mirror_axes.get_or_insert(loaded.mirror_axes);
            networks.push(Box::new(loaded.network));
        }
        Self::from_networks(
            plans,
            &cfg_name,
            ds,
            networks,
            mirror_axes.unwrap_or_default(),
        )
    }

    /// A predictor from ready networks (tests, or a network still in memory after training).
    pub fn from_networks(
        plans: Plans,
        configuration_name: &str,
        dataset_json: DatasetJson,
        networks: Vec<Box<dyn TileNetwork>>,
        mirror_axes: Vec<usize>,
    ) -> Result<Self, PredictError> {
        let configuration = plans.configuration(configuration_name)?;
        if networks.is_empty() {
            return Err(PredictError::Config("no networks".into()));
        }
        let labels = LabelHandling::from_dataset_json(&dataset_json)?;
        let prev_stage_labels = configuration
            .previous_stage
            .is_some()
            .then(|| dataset_json.foreground_labels());
        Ok(Predictor {
            prev_stage_labels,
            plans,
            configuration_name: configuration_name.to_string(),
            configuration,
            dataset_json,
            labels,
            mirror_axes,
            step_size: 0.5,
            use_mirroring: true,
            batch_inputs: None,
            accumulation: sliding::Accumulation::default(),
            on_device: true,
            networks,
        })
    }

    pub fn num_networks(&self) -> usize {
        self.networks.len()
    }

    /// The sliding-window settings of this predictor.
    pub fn sliding_window_options(&self) -> SlidingWindowOptions {
        SlidingWindowOptions {
            patch_size: self.configuration.patch_size.clone(),
            step_size: self.step_size,
            mirror_axes: if self.use_mirroring {
                Some(self.mirror_axes.clone())
            } else {
                None
            },
            num_classes: self.labels.num_outputs(),
            batch_inputs: self.batch_inputs,
            accumulation: self.accumulation,
            on_device: self.on_device,
        }
    }

    /// Logits `(K, z, y, x)` of preprocessed data `(C, z, y, x)`: the sliding window of every
    /// fold's network, averaged over folds (nnU-Net averages logits, then applies the
    /// nonlinearity at export).
    pub fn predict_logits(&self, data: ArrayView4<'_, f32>) -> Result<Array4<f32>, PredictError> {
        let mut out = self.predict_logits_many(&[data])?;
        out.pop()
            .ok_or_else(|| PredictError::Config("no logits".into()))
    }

    /// [`Predictor::predict_logits`] of several images at once: their tiles share forward
    /// passes (images smaller than a patch: several per pass). Same result as one by one.
    pub fn predict_logits_many(
        &self,
        data: &[ArrayView4<'_, f32>],
    ) -> Result<Vec<Array4<f32>>, PredictError> {
        self.predict_logits_many_with(data, &self.sliding_window_options())
    }

    /// [`Predictor::predict_logits_many`] with other sliding-window settings (e.g. f16 sums
    /// where the memory check asks for them).
    pub fn predict_logits_many_with(
        &self,
        data: &[ArrayView4<'_, f32>],
        opts: &SlidingWindowOptions,
    ) -> Result<Vec<Array4<f32>>, PredictError> {
        // nnU-Net sums the folds' logits in their dtype (`torch.half` with f16 sums) and divides
        // in it too: round each step the same way
        let round = opts.accumulation.rounding();
        let mut sum: Vec<Array4<f32>> = vec![];
        for net in &self.networks {
            add_logits_of_network(net.as_ref(), data, opts, &mut sum)?;
        }
        if sum.is_empty() {
            return Err(PredictError::Config("no networks".into()));
        }
        if self.networks.len() > 1 {
            let n = self.networks.len() as f32;
            sum.iter_mut()
                .for_each(|s| s.par_mapv_inplace(|v| round(v / n)));
        }
        Ok(sum)
    }

    /// Predicts preprocessed data and writes `output_file` (format by its ending, geometry of
    /// `props`); with `save_probabilities` also `{stem}.npz` (`probabilities`, float32
    /// `(K, z, y, x)`) and `{stem}.json` (the case properties) next to it.
    pub fn predict_and_export(
        &self,
        data: ArrayView4<'_, f32>,
        props: &CaseProperties,
        output_file: &Path,
        save_probabilities: bool,
    ) -> Result<(), PredictError> {
        let logits = self.predict_logits(data)?;
        self.export_logits(logits, props, output_file, save_probabilities)
    }

    /// Writes the segmentation of `logits` (preprocessed geometry) to `output_file` in the
    /// original geometry (see [`Predictor::predict_and_export`]).
    pub fn export_logits(
        &self,
        logits: Array4<f32>,
        props: &CaseProperties,
        output_file: &Path,
        save_probabilities: bool,
    ) -> Result<(), PredictError> {
        let exported = convert_logits_to_segmentation(
            logits,
            props,
            &self.plans,
            &self.configuration,
            &self.labels,
            save_probabilities,
        )?;
        // one unit per case: probabilities and properties first, the segmentation last, each
        // renamed from a temp name, so a segmentation on disk always has its companions
        if let Some(p) = exported.probabilities {
            let (dir, case) = output_case(output_file, &self.dataset_json.file_ending);
            write_probabilities(&dir.probabilities(&case), &p)?;
            let json = serde_json::to_value(props)
                .map_err(|e| PredictError::Config(format!("case properties: {e}")))?;
            plans::io::write_json_atomic(&dir.properties(&case), &json)?;
        }
        datasets::io::write_seg(
            output_file,
            exported.segmentation.view(),
            &props.image_properties,
        )?;
        Ok(())
    }
}

/// The folder and the case of `folder/case{ending}`.
fn output_case(output_file: &Path, ending: &str) -> (PredictionDir, String) {
    let name = output_file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let case = name.strip_suffix(ending).unwrap_or(name).to_string();
    let folder = output_file.parent().unwrap_or_else(|| Path::new(""));
    (PredictionDir::new(folder), case)
}

/// Writes `probabilities` into an `.npz` (nnU-Net's `{case}.npz` key), atomically.
pub fn write_probabilities(path: &Path, probabilities: &Array4<f32>) -> Result<(), PredictError> {
    let npz_err = |message: String| preprocessing::storage::StorageError::Npy {
        path: path.to_path_buf(),
        expected: "float32 probabilities .npz",
        message,
    };
    preprocessing::storage::write_atomic_with(path, |file| {
        let mut w = ndarray_npy::NpzWriter::new(file);
        w.add_array("probabilities", probabilities)
            .map_err(|e| npz_err(e.to_string()))?;
        w.finish().map_err(|e| npz_err(e.to_string()))?;
        Ok(())
    })?;
    Ok(())
}

/// One case of an input folder.
#[derive(Debug, Clone, PartialEq)]
pub struct InputCase {
    pub identifier: String,
    /// Channel files in channel order (`{case}_0000{ending}`, `{case}_0001{ending}`, ...).
    pub images: Vec<PathBuf>,
}

/// Finds the cases of a raw input folder: files `{case}_{XXXX}{ending}` with every channel
/// `0000..num_channels` present. Other files with the ending, or missing/extra channels, are
/// errors naming the file or case; files with other endings are ignored (nnU-Net does so).
pub fn find_input_cases(
    folder: &Path,
    file_ending: &str,
    num_channels: usize,
) -> Result<Vec<InputCase>, PredictError> {
    use std::collections::BTreeMap;
    let mut cases: BTreeMap<String, BTreeMap<usize, PathBuf>> = BTreeMap::new();
    let rd = std::fs::read_dir(folder).map_err(io_err("listing", folder))?;
    for entry in rd {
        let entry = entry.map_err(io_err("listing", folder))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(file_ending) || name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        match datasets::layout::parse_channel_file_name(&name, file_ending) {
            Some((case, ch)) => {
                cases.entry(case).or_default().insert(ch, entry.path());
            }
            None => {
                return Err(PredictError::Input(format!(
                    "{}: input files must be named {{case}}_{{XXXX}}{file_ending} (XXXX = 4-digit channel index)",
                    entry.path().display()
                )))
            }
        }
    }
    if cases.is_empty() {
        return Err(PredictError::Input(format!(
            "{}: no files named {{case}}_0000{file_ending}",
            folder.display()
        )));
    }
    let mut out = vec![];
    for (case, chans) in cases {
        let idx: Vec<usize> = chans.keys().copied().collect();
        let expected: Vec<usize> = (0..num_channels).collect();
        if idx != expected {
            return Err(PredictError::Input(format!(
                "case {case} in {}: found channel(s) {idx:?}, the model needs exactly {expected:?} \
                 (files {case}_0000{file_ending} ...)",
                folder.display()
            )));
        }
        out.push(InputCase {
            identifier: case,
            images: chans.into_values().collect(),
        });
    }
    Ok(out)
}

/// Everything `nnseg predict` needs.
#[derive(Clone)]
pub struct PredictRequest {
    pub input_folder: PathBuf,
    pub output_folder: PathBuf,
    /// `nnUNet_results/DatasetX/{trainer}__{plans}__{configuration}`.
    pub model_folder: PathBuf,
    pub folds: Vec<Fold>,
    /// `checkpoint_final` (nnU-Net's `-chk`, `.pth` accepted).
    pub checkpoint_name: String,
    /// Tile overlap (`-step_size`, default 0.5).
    pub step_size: f64,
    pub disable_tta: bool,
    pub save_probabilities: bool,
    /// Threads for preprocessing / resampling (`-npp`); also how many preprocessed cases may
    /// wait for the network.
    pub num_workers: usize,
    /// How many predicted cases may wait for their export (`-nps`, nnU-Net's
    /// `num_processes_segmentation_export`).
    pub num_export_workers: usize,
    pub device: Device,
    /// bf16 mixed precision of the network's forward pass (`--amp`; `auto`: on CUDA).
    pub amp: Amp,
    pub registry: Registry,
    /// Cascade stages: the folder with the previous stage's predictions of the same cases
    /// (`-prev_stage_predictions`, files `{case}{ending}`).
    pub prev_stage_predictions: Option<PathBuf>,
    /// Network inputs per forward pass (`--batch_tiles`; `None`: automatic).
    pub batch_inputs: Option<usize>,
    /// f32 sums or nnU-Net's f16 numerics (`--accumulate`).
    pub accumulation: Accumulation,
    /// This run's share of the cases (`-num_parts N -part_id K`: every N-th case from the K-th,
    /// in case order), so N machines can fill one output folder.
    pub part: Part,
    /// Skip cases whose outputs are complete already (`--continue_prediction`).
    pub continue_prediction: bool,
    /// The memory a case may plan for, in bytes (`--max_memory_gb`); `None`: what the machine
    /// has available when the case starts (see [`memory`]).
    pub max_memory: Option<u64>,
    /// Sliding-window sums on a GPU network's device (`false`: `--not_on_device`).
    pub on_device: bool,
}

/// Part `id` of `count` of the cases (nnU-Net's `-part_id` / `-num_parts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub id: usize,
    pub count: usize,
}

impl Part {
    /// All cases.
    pub const WHOLE: Part = Part { id: 0, count: 1 };

    /// Checks `id < count` and `count >= 1`.
    pub fn new(id: usize, count: usize) -> Result<Part, PredictError> {
        if count == 0 || id >= count {
            return Err(PredictError::Config(format!(
                "-part_id {id} with -num_parts {count}: part_id must be 0..num_parts-1 and \
                 num_parts at least 1"
            )));
        }
        Ok(Part { id, count })
    }

    /// This part's cases: every `count`-th from the `id`-th (nnU-Net's `cases[id::count]`).
    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .skip(self.id)
            .step_by(self.count.max(1))
            .collect()
    }
}

impl PredictRequest {
    /// nnU-Net's defaults: checkpoint_final, step 0.5, TTA on, no probabilities.
    pub fn new(
        input_folder: impl Into<PathBuf>,
        output_folder: impl Into<PathBuf>,
        model_folder: impl Into<PathBuf>,
        folds: Vec<Fold>,
        device: Device,
    ) -> Self {
        PredictRequest {
            input_folder: input_folder.into(),
            output_folder: output_folder.into(),
            model_folder: model_folder.into(),
            folds,
            checkpoint_name: "checkpoint_final".into(),
            step_size: 0.5,
            disable_tta: false,
            save_probabilities: false,
            num_workers: 3,
            num_export_workers: 3,
            device,
            amp: Amp::Auto,
            registry: Registry::default(),
            prev_stage_predictions: None,
            batch_inputs: None,
            accumulation: Accumulation::default(),
            part: Part::WHOLE,
            continue_prediction: false,
            max_memory: None,
            on_device: true,
        }
    }
}

/// `--continue_prediction`: the cases whose outputs are not all written yet. A case's outputs
/// are renamed into place together, probabilities first, so an existing segmentation (with
/// its `.npz` and `.json` when probabilities are saved) is a finished case.
fn unfinished_cases(
    cases: Vec<InputCase>,
    output: &PredictionDir,
    ending: &str,
    with_probabilities: bool,
) -> Vec<InputCase> {
    let before = cases.len();
    let left: Vec<InputCase> = cases
        .into_iter()
        .filter(|c| {
            let id = &c.identifier;
            let done = output.segmentation(id, ending).is_file()
                && (!with_probabilities
                    || (output.probabilities(id).is_file() && output.properties(id).is_file()));
            !done
        })
        .collect();
    if left.len() < before {
        tracing::info!(
            "--continue_prediction: {} of {before} cases are done already in {}",
            before - left.len(),
            output.path().display()
        );
    }
    left
}

/// What [`predict_from_raw_folder`] did.
#[derive(Debug, Clone)]
pub struct PredictReport {
    /// Written segmentation files, in case order.
    pub outputs: Vec<PathBuf>,
    /// Seconds per case (preprocessing + prediction + export).
    pub seconds_per_case: Vec<f64>,
}

fn copy_file(src: &Path, dst: &Path) -> Result<(), PredictError> {
    let bytes = std::fs::read(src).map_err(io_err("reading", src))?;
    plans::io::write_atomic(dst, &bytes)?;
    Ok(())
}

/// `nnseg predict`: preprocesses each case of the input folder, predicts it with every fold's
/// network and writes `{output}/{case}{ending}` (plus `.npz` + `.json` with
/// `save_probabilities`), and `dataset.json`, `plans.json`, `predict_from_raw_data_args.json`.
/// Stops at the first failing case with an error naming it.
pub fn predict_from_raw_folder(req: &PredictRequest) -> Result<PredictReport, PredictError> {
    let mut predictor = Predictor::from_model_folder(
        &req.model_folder,
        &req.folds,
        &req.checkpoint_name,
        &req.device,
        req.amp,
        &req.registry,
    )?;
    predictor.step_size = req.step_size;
    predictor.use_mirroring = !req.disable_tta;
    predictor.batch_inputs = req.batch_inputs;
    predictor.accumulation = req.accumulation;
    predictor.on_device = req.on_device;
    let ending = predictor.dataset_json.file_ending.clone();
    let cases = req.part.select(find_input_cases(
        &req.input_folder,
        &ending,
        predictor.dataset_json.num_channels(),
    )?);
    if let (Some(_), Some(folder)) = (&predictor.prev_stage_labels, &req.prev_stage_predictions) {
        // the previous stage's run must have finished: a partial folder is not its result
        outputs::ensure_complete(folder)?;
    }
    std::fs::create_dir_all(&req.output_folder).map_err(io_err("creating", &req.output_folder))?;
    let (model, output) = (
        ModelDir::at(&req.model_folder),
        PredictionDir::new(&req.output_folder),
    );
    let cases = if req.continue_prediction {
        unfinished_cases(cases, &output, &ending, req.save_probabilities)
    } else {
        cases
    };
    let marker = outputs::begin_part(&output, "nnseg predict", (req.part.id, req.part.count))?;
    copy_file(&model.dataset_json(), &output.dataset_json())?;
    copy_file(&model.plans_json(), &output.plans_json())?;
    let args = serde_json::json!({
        "list_of_lists_or_source_folder": req.input_folder.display().to_string(),
        "output_folder_or_list_of_truncated_output_files": req.output_folder.display().to_string(),
        "model_training_output_dir": req.model_folder.display().to_string(),
        "use_folds": req.folds.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
        "checkpoint_name": req.checkpoint_name,
        "tile_step_size": req.step_size,
        "use_mirroring": !req.disable_tta,
        "save_probabilities": req.save_probabilities,
        "num_processes_preprocessing": req.num_workers,
        "num_processes_segmentation_export": req.num_export_workers,
        "device": format!("{:?}", req.device.location()),
    });
    plans::io::write_json_atomic(&output.predict_args(), &args)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(req.num_workers.max(1))
        .build()
        .map_err(|e| PredictError::Config(format!("thread pool: {e}")))?;
    let report = run_pipeline(&predictor, req, &cases, &output, &pool)?;
    marker.finish()?;
    Ok(report)
}

/// Reading + preprocessing, prediction and export as a pipeline: one thread preprocesses up to
/// `num_workers` cases ahead, one exports up to `num_export_workers` cases behind, each
/// through a bounded queue (so at most that many preprocessed cases / logits wait in memory),
/// while this thread runs the forward passes. Preprocessing and export run their parallel
/// parts on `pool` (`-npp` threads). Cases with fewer tiles than one forward pass holds are
/// predicted together. Stops at the first failing case.
fn run_pipeline(
    predictor: &Predictor,
    req: &PredictRequest,
    cases: &[InputCase],
    output: &PredictionDir,
    pool: &rayon::ThreadPool,
) -> Result<PredictReport, PredictError> {
    let ending = predictor.dataset_json.file_ending.as_str();
    use std::sync::mpsc::sync_channel;
    let capacity = sliding::tiles_per_batch(&predictor.sliding_window_options());
    std::thread::scope(|scope| {
        let (pre_tx, pre_rx) =
            sync_channel::<Result<PreparedCase, PredictError>>(req.num_workers.max(1));
        scope.spawn(move || {
            for case in cases {
                let t0 = std::time::Instant::now();
                let prepared = pool
                    .install(|| prepare_case(predictor, req, case, ending))
                    .map(|(data, properties)| PreparedCase {
                        identifier: case.identifier.clone(),
                        output: output.segmentation(&case.identifier, ending),
                        data,
                        properties,
                        started: t0,
                    })
                    .map_err(in_case(&case.identifier));
                let failed = prepared.is_err();
                if pre_tx.send(prepared).is_err() || failed {
                    break;
                }
            }
        });
        let (exp_tx, exp_rx) =
            sync_channel::<(PreparedCase, Array4<f32>)>(req.num_export_workers.max(1));
        let exporter = scope.spawn(move || -> Result<PredictReport, PredictError> {
            let mut report = PredictReport {
                outputs: vec![],
                seconds_per_case: vec![],
            };
            for (case, logits) in exp_rx {
                pool.install(|| {
                    predictor.export_logits(
                        logits,
                        &case.properties,
                        &case.output,
                        req.save_probabilities,
                    )
                })
                .map_err(in_case(&case.identifier))?;
                report.outputs.push(case.output);
                report
                    .seconds_per_case
                    .push(case.started.elapsed().as_secs_f64());
            }
            Ok(report)
        });
        let predicted = (|| -> Result<(), PredictError> {
            let (mut group, mut group_tiles) = (vec![], 0);
            for prepared in pre_rx {
                let prepared = prepared?;
                let (_, z, y, x) = prepared.data.dim();
                group_tiles += sliding::tile_count([z, y, x], &predictor.sliding_window_options())?;
                group.push(prepared);
                if group_tiles >= capacity {
                    if !predict_group(predictor, req, &mut group, &exp_tx)? {
                        return Ok(()); // the exporter stopped: its error is reported
                    }
                    group_tiles = 0;
                }
            }
            predict_group(predictor, req, &mut group, &exp_tx).map(|_| ())
        })();
        drop(exp_tx);
        let exported = exporter
            .join()
            .unwrap_or_else(|_| Err(PredictError::Config("the export thread panicked".into())));
        // an export error comes first: it is the earlier case
        let report = exported?;
        predicted?;
        Ok(report)
    })
}

/// A preprocessed case waiting for its forward passes.
struct PreparedCase {
    identifier: String,
    output: PathBuf,
    data: Array4<f32>,
    properties: CaseProperties,
    started: std::time::Instant,
}

/// Predicts the cases of `group` in one sliding window (shared forward passes), hands each to
/// the exporter and empties the group; `false` when the exporter has stopped.
fn predict_group(
    predictor: &Predictor,
    req: &PredictRequest,
    group: &mut Vec<PreparedCase>,
    exporter: &std::sync::mpsc::SyncSender<(PreparedCase, Array4<f32>)>,
) -> Result<bool, PredictError> {
    if group.is_empty() {
        return Ok(true);
    }
    let names = || {
        let names: Vec<&str> = group.iter().map(|c| c.identifier.as_str()).collect();
        names.join(", ")
    };
    let opts = fit_to_memory(predictor, req, group).map_err(|e| in_case(&names())(e))?;
    let views: Vec<_> = group.iter().map(|c| c.data.view()).collect();
    let logits = predictor
        .predict_logits_many_with(&views, &opts)
        .map_err(|e| in_case(&names())(e))?;
    for (mut case, logits) in group.drain(..).zip(logits) {
        case.data = Array4::zeros((0, 0, 0, 0)); // the image is no longer needed
        if exporter.send((case, logits)).is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The memory model ([`memory`]) of the largest case of `group` against the budget
/// (`--max_memory_gb`, else the memory available now plus what this process holds): the run's
/// sliding-window settings when they fit, else f16 sums, else f16 sums with one input per
/// forward pass (each fallback logged); an error naming the estimate when nothing fits.
fn fit_to_memory(
    predictor: &Predictor,
    req: &PredictRequest,
    group: &[PreparedCase],
) -> Result<SlidingWindowOptions, PredictError> {
    let asked = predictor.sliding_window_options();
    let Some(case) = group.iter().max_by_key(|c| c.data.len()) else {
        return Ok(asked);
    };
    let (c, z, y, x) = case.data.dim();
    let geometry = memory::CaseGeometry {
        channels: c,
        network: [z, y, x],
        cropped: case.properties.shape_after_cropping_and_before_resampling,
        original: case.properties.shape_before_cropping,
    };
    let run = memory::RunShape {
        save_probabilities: req.save_probabilities,
        queued_images: req.num_workers.max(1),
        queued_logits: req.num_export_workers.max(1),
        activation_bytes_per_voxel: memory::activation_bytes_per_voxel(
            &predictor.configuration.architecture.arch_kwargs,
            asked.patch_size.len(),
        ),
    };
    let f16 = SlidingWindowOptions {
        accumulation: Accumulation::NnunetF16,
        ..asked.clone()
    };
    let one = SlidingWindowOptions {
        batch_inputs: Some(1),
        ..f16.clone()
    };
    let mut candidates = vec![];
    for (o, label) in [
        (asked, "as asked"),
        (f16, "f16 sums"),
        (one, "f16 sums, one input per pass"),
    ] {
        let est = memory::estimate(&geometry, &o, &run);
        candidates.push(((o, label), est));
    }
    let budget = req
        .max_memory
        .or_else(|| memory::available_memory().map(|a| a + memory::resident_memory().unwrap_or(0)));
    tracing::debug!(
        "case {}: memory estimate {} (budget {})",
        case.identifier,
        candidates[0].1.describe(),
        budget.map(memory::mb).unwrap_or_else(|| "unknown".into())
    );
    let Some(budget) = budget else {
        return Ok(candidates.swap_remove(0).0 .0);
    };
    match memory::first_fitting(candidates, budget) {
        Ok((0, (o, _), _)) => Ok(o),
        Ok((_, (o, label), est)) => {
            tracing::warn!(
                "case {}: the run's settings need more memory than the {} budget; predicting \
                 it with {label} ({})",
                case.identifier,
                memory::mb(budget),
                est.describe()
            );
            Ok(o)
        }
        Err(smallest) => Err(PredictError::Memory(format!(
            "needs about {} even with f16 sums and one input per forward pass, but the budget \
             is {}{}; predict it on a machine with more memory, or lower -npp / -nps (each \
             queued case counts) or --save_probabilities",
            smallest.describe(),
            memory::mb(budget),
            if req.max_memory.is_some() {
                " (--max_memory_gb)"
            } else {
                " (memory available)"
            },
        ))),
    }
}

/// Reads and preprocesses one input case (for a cascade stage with the previous stage's
/// segmentation one-hot encoded as extra channels).
fn prepare_case(
    predictor: &Predictor,
    req: &PredictRequest,
    case: &InputCase,
    ending: &str,
) -> Result<(Array4<f32>, CaseProperties), PredictError> {
    let previous_stage = || {
        predictor
            .configuration
            .previous_stage
            .clone()
            .unwrap_or_default()
    };
    let prev_file = match (&predictor.prev_stage_labels, &req.prev_stage_predictions) {
        (None, _) => None,
        (Some(_), Some(folder)) => {
            let f = PredictionDir::new(folder).segmentation(&case.identifier, ending);
            if !f.is_file() {
                return Err(PredictError::Input(format!(
                    "{}: the previous stage's prediction of this case is missing \
                     (predict it with -c {} first)",
                    f.display(),
                    previous_stage()
                )));
            }
            Some(f)
        }
        (Some(_), None) => {
            return Err(PredictError::Input(format!(
                "configuration `{}` is a cascade stage: pass the `{}` predictions \
                 of the same cases with -prev_stage_predictions FOLDER",
                predictor.configuration_name,
                previous_stage()
            )))
        }
    };
    let pre = preprocessing::preprocessor::preprocess_case_files(
        &case.images,
        prev_file.as_deref(),
        &predictor.plans,
        &predictor.configuration,
        &predictor.dataset_json,
    )?;
    let data = match (&predictor.prev_stage_labels, &pre.seg) {
        (Some(fg), Some(seg)) => {
            crate::data::cascade::append_one_hot(pre.data.view(), seg.view(), fg)
        }
        _ => pre.data,
    };
    Ok((data, pre.properties))
}

/// Where the previous stage writes the inputs of the next cascade stage during its final
/// validation (nnU-Net's `predicted_next_stage`).
#[derive(Debug, Clone)]
pub struct NextStageExport {
    /// The next stage's configuration (its spacing and preprocessed shape are the target).
    pub configuration: Configuration,
    /// `nnUNet_preprocessed/DatasetX/{next data_identifier}` (the target shapes).
    pub preprocessed_data_folder: PathBuf,
    /// `model_folder/predicted_next_stage/{next_stage}`.
    pub output_folder: PathBuf,
}

/// Cascade inputs and outputs of [`predict_preprocessed_case`].
#[derive(Debug, Clone, Default)]
pub struct CascadeIo {
    /// For a cascade stage: the folder with the previous stage's segmentations
    /// (`{case}.npy`, preprocessed geometry of this stage).
    pub prev_stage_folder: Option<PathBuf>,
    /// For a stage with a `next_stage`: also write the next stage's inputs.
    pub next_stage: Option<NextStageExport>,
}

/// Predicts one preprocessed case (`{case}.npy` + `{case}.json` in `preprocessed_data_folder`,
/// e.g. `nnUNet_preprocessed/DatasetX/nnUNetPlans_3d_fullres`) and writes
/// `output_folder/{case}{ending}`.
pub fn predict_preprocessed_case(
    predictor: &Predictor,
    preprocessed_data_folder: &Path,
    case: &str,
    output_folder: &Path,
    save_probabilities: bool,
    cascade: &CascadeIo,
) -> Result<PathBuf, PredictError> {
    (|| -> Result<PathBuf, PredictError> {
        let mapped = preprocessing::storage::MappedCase::open(preprocessed_data_folder, case)?;
        let data = mapped.data()?;
        let props = preprocessing::storage::load_case_properties(preprocessed_data_folder, case)?;
        let out = PredictionDir::new(output_folder)
            .segmentation(case, &predictor.dataset_json.file_ending);
        let logits = match (&predictor.prev_stage_labels, &cascade.prev_stage_folder) {
            (Some(fg), Some(folder)) => {
                let path = crate::data::cascade::prev_stage_file(folder, case);
                let prev = preprocessing::storage::MappedSeg::open(&path).map_err(|e| {
                    PredictError::Config(format!(
                        "the previous stage's segmentation is needed for the cascade: {e}"
                    ))
                })?;
                let pv = prev.view()?;
                if pv.shape()[1..] != data.shape()[1..] {
                    return Err(PredictError::Config(format!(
                        "{}: shape {:?} differs from the preprocessed data's {:?}",
                        path.display(),
                        &pv.shape()[1..],
                        &data.shape()[1..]
                    )));
                }
                let x = crate::data::cascade::append_one_hot(data, pv, fg);
                predictor.predict_logits(x.view())?
            }
            (Some(_), None) => {
                return Err(PredictError::Config(format!(
                    "configuration `{}` is a cascade stage: its previous stage's segmentations \
                     are needed",
                    predictor.configuration_name
                )))
            }
            (None, _) => predictor.predict_logits(data)?,
        };
        if let Some(next) = &cascade.next_stage {
            export_next_stage(predictor, &logits, case, next)?;
        }
        predictor.export_logits(logits, &props, &out, save_probabilities)?;
        Ok(out)
    })()
    .map_err(in_case(case))
}

/// nnU-Net's `resample_and_save` for the next stage: the logits resampled to the next stage's
/// preprocessed shape, converted to a segmentation, saved as int16 `(1, z, y, x)` `.npy`.
fn export_next_stage(
    predictor: &Predictor,
    logits: &Array4<f32>,
    case: &str,
    next: &NextStageExport,
) -> Result<(), PredictError> {
    let target =
        preprocessing::storage::MappedCase::open(&next.preprocessed_data_folder, case)?.shape()?;
    let to3 = |v: &[f64]| -> Result<[f64; 3], PredictError> {
        match v {
            [a, b, c] => Ok([*a, *b, *c]),
            other => Err(PredictError::Config(format!(
                "cascade stages are 3D; spacing {other:?} has {} entries",
                other.len()
            ))),
        }
    };
    let cur = to3(&predictor.configuration.spacing)?;
    let new = to3(&next.configuration.spacing)?;
    let mut probs = preprocessing::resampling::resample_data_to_shape(
        logits.view(),
        target,
        &cur,
        &new,
        &predictor.configuration.resampling_fn_probabilities_kwargs,
    );
    predictor.labels.apply_nonlin(&mut probs);
    let seg = predictor.labels.to_segmentation(&probs);
    let seg = seg.insert_axis(ndarray::Axis(0));
    std::fs::create_dir_all(&next.output_folder)
        .map_err(io_err("creating", &next.output_folder))?;
    preprocessing::storage::write_npy_atomic(
        &crate::data::cascade::prev_stage_file(&next.output_folder, case),
        &seg,
    )?;
    Ok(())
}

/// nnU-Net's `perform_actual_validation` without the evaluation: predicts the validation
/// cases of a fold from the preprocessed data into `fold_folder/validation/`. The caller
/// evaluates the folder against `gt_segmentations` afterwards (summary.json), then finishes
/// the returned marker: until then the folder is marked unfinished.
pub fn run_final_validation(
    predictor: &Predictor,
    preprocessed_data_folder: &Path,
    validation_cases: &[String],
    fold_folder: &Path,
    save_probabilities: bool,
    cascade: &CascadeIo,
) -> Result<(Vec<PathBuf>, outputs::RunMarker), PredictError> {
    let out = validation_folder(fold_folder);
    std::fs::create_dir_all(&out).map_err(io_err("creating", &out))?;
    let marker = outputs::begin(&PredictionDir::new(&out), "the final validation")?;
    validation_cases
        .iter()
        .map(|c| {
            predict_preprocessed_case(
                predictor,
                preprocessed_data_folder,
                c,
                &out,
                save_probabilities,
                cascade,
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|written| (written, marker))
}

/// `{results}/{dataset}/{trainer}__{plans}__{previous_stage}/predicted_next_stage/{configuration}`
/// for the model folder `{results}/{dataset}/{trainer}__{plans}__{configuration}`.
pub fn prev_stage_folder(
    model_folder: &Path,
    previous_stage: &str,
    configuration: &str,
) -> Result<PathBuf, PredictError> {
    Ok(ModelDir::at(model_folder).prev_stage_outputs(previous_stage, configuration)?)
}

/// What [`validate_fold`] produced.
#[derive(Debug, Clone)]
pub struct FoldValidation {
    /// `fold_folder/validation/{case}{ending}` for every validation case.
    pub predictions: Vec<PathBuf>,
    /// The evaluation against `gt_segmentations` (`validation/summary.json`); `None` when the
    /// preprocessed folder has no `gt_segmentations/` (then nothing was evaluated).
    pub summary: Option<crate::evaluation::Summary>,
}

/// Refuses to validate from an incomplete or stale data folder, or to evaluate against an
/// incomplete or changed `gt_segmentations/` (when there is one; without it nothing is
/// evaluated); the errors name the cases and the command that fixes them.
fn check_validation_inputs(
    predictor: &Predictor,
    pre: &PreprocessedDir,
    data_folder: &Path,
    validation_cases: &[String],
) -> Result<(), PredictError> {
    let (plans, configuration) = (&predictor.plans, &predictor.configuration_name);
    preprocessing::completion::require_complete(data_folder, plans, configuration)?;
    crate::data::require_ground_truth(pre.path(), plans, configuration, validation_cases)?;
    Ok(())
}

/// nnU-Net's `perform_actual_validation`: loads `fold_folder/{checkpoint_name}` of the model,
/// predicts the validation cases from `preprocessed_dataset_folder/{data_identifier}/` into
/// `fold_folder/validation/` (with `.npz` + `.json` if `save_probabilities`), then evaluates
/// them against `preprocessed_dataset_folder/gt_segmentations/` into
/// `validation/summary.json`.
#[allow(clippy::too_many_arguments)]
pub fn validate_fold(
    model_folder: &Path,
    fold: Fold,
    checkpoint_name: &str,
    preprocessed_dataset_folder: &Path,
    validation_cases: &[String],
    save_probabilities: bool,
    num_workers: usize,
    device: &Device,
    amp: Amp,
    registry: &Registry,
) -> Result<FoldValidation, PredictError> {
    let predictor = Predictor::from_model_folder(
        model_folder,
        &[fold],
        checkpoint_name,
        device,
        amp,
        registry,
    )?;
    let (model, pre) = (
        ModelDir::at(model_folder),
        PreprocessedDir::new(preprocessed_dataset_folder),
    );
    let data_folder = pre.data_folder(&predictor.configuration.data_identifier);
    check_validation_inputs(&predictor, &pre, &data_folder, validation_cases)?;
    let fold_folder = model.fold(fold);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(num_workers.max(1))
        .build()
        .map_err(|e| PredictError::Config(format!("thread pool: {e}")))?;
    // cascade: read the previous stage's segmentations / write the next stage's inputs
    let mut cascade = CascadeIo::default();
    let cfg = &predictor.configuration;
    if let Some(prev) = &cfg.previous_stage {
        let folder = prev_stage_folder(model_folder, prev, &predictor.configuration_name)?;
        let missing = crate::data::cascade::missing_prev_stage_cases(&folder, validation_cases);
        if !missing.is_empty() {
            return Err(crate::data::DataError::PrevStageIncomplete { folder, missing }.into());
        }
        cascade.prev_stage_folder = Some(folder);
    }
    if let Some(next) = &cfg.next_stage {
        match predictor.plans.configuration(next) {
            Ok(next_cfg) => {
                let folder = pre.data_folder(&next_cfg.data_identifier);
                if folder.is_dir() {
                    // the next stage's shapes are read from it: it must be complete and current
                    preprocessing::completion::require_complete(&folder, &predictor.plans, next)?;
                    cascade.next_stage = Some(NextStageExport {
                        configuration: next_cfg,
                        preprocessed_data_folder: folder,
                        output_folder: model.next_stage(next),
                    });
                } else {
                    tracing::warn!(
                        "next stage `{next}`: {} is not preprocessed; its inputs \
                         (predicted_next_stage) are not written",
                        folder.display()
                    );
                }
            }
            Err(e) => tracing::warn!("next stage `{next}`: {e}"),
        }
    }
    let (predictions, marker) = pool.install(|| {
        run_final_validation(
            &predictor,
            &data_folder,
            validation_cases,
            &fold_folder,
            save_probabilities,
            &cascade,
        )
    })?;
    let gt = pre.gt_segmentations();
    let summary = if gt.is_dir() {
        let mut opts = crate::evaluation::EvaluateOptions::from_dataset_json(
            &predictor.dataset_json,
            num_workers,
        );
        // gt_segmentations holds every training case; only this fold's are predicted
        opts.chill = true;
        Some(crate::evaluation::evaluate::evaluate_folder_being_written(
            &gt,
            &validation_folder(&fold_folder),
            &opts,
        )?)
    } else {
        None
    };
    // only now, with summary.json written, is the validation folder a finished result
    marker.finish()?;
    Ok(FoldValidation {
        predictions,
        summary,
    })
}

#[cfg(test)]
mod tests;
