//! Import of trained nnU-Net v2 models: the file side.
//!
//! An nnU-Net model folder (`nnUNet_results/DatasetXXX/{Trainer}__{Plans}__{Config}`) holds
//! `plans.json`, `dataset.json` and `fold_X/checkpoint_*.pth`. [`import_nnunet_model`] reads
//! them (the configuration from the folder name), lets `architectures::import` map the
//! checkpoint's state dict onto the network the plans describe, and returns the weights with
//! everything needed to rebuild the network; [`ImportedModel::save`] writes them as
//! `model.safetensors` + `model.json`.

use architectures::import::{expected_weights, map_state_dict, num_input_channels};
use architectures::registry::{ArchError, NetworkIo, Registry, SegNetwork};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use datasets::ModelDir;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// File name of the weights written by [`ImportedModel::save`].
pub const MODEL_WEIGHTS: &str = datasets::layout::IMPORTED_MODEL_WEIGHTS;
/// File name of the metadata written by [`ImportedModel::save`].
pub const MODEL_METADATA: &str = datasets::layout::IMPORTED_MODEL_METADATA;
/// `format` field of [`MODEL_METADATA`].
pub const MODEL_FORMAT: &str = "nnseg-model-v1";

/// Import errors; each names the file or folder involved.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The model folder's name (not `{trainer}__{plans}__{configuration}`).
    #[error(transparent)]
    Layout(#[from] datasets::DatasetError),
    #[error(transparent)]
    Plans(#[from] plans::PlansError),
    /// The network does not match the checkpoint (missing, extra or mis-shaped weights).
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint cannot be read, or the weights cannot be written.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
}

/// Reads the tensors of `key_in_pickle` (e.g. `network_weights`) from a PyTorch zip checkpoint,
/// sorted by name.
pub fn read_pth_state_dict(
    path: &Path,
    key_in_pickle: Option<&str>,
) -> Result<Vec<(String, Tensor)>, ImportError> {
    let err = |message: String| ImportError::File {
        path: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(ImportError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "checkpoint not found"),
        });
    }
    let pth = candle_core::pickle::PthTensors::new(path, key_in_pickle)
        .map_err(|e| err(format!("cannot read the PyTorch checkpoint: {e}")))?;
    let mut names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        match pth.get(&n) {
            Ok(Some(t)) => out.push((n, t)),
            Ok(None) => {}
            Err(e) => return Err(err(format!("cannot read tensor `{n}`: {e}"))),
        }
    }
    if out.is_empty() {
        return Err(err(format!(
            "no tensors found{}",
            key_in_pickle
                .map(|k| format!(" under `{k}`"))
                .unwrap_or_default()
        )));
    }
    Ok(out)
}

/// The `inference_allowed_mirroring_axes` an nnU-Net checkpoint stores next to its weights
/// (`(0, 1, 2)` for the default trainer in 3D, `None` for `nnUNetTrainerNoMirroring`).
/// `Ok(None)` when the key is absent or `None`: nnU-Net's predictor then does not mirror.
pub fn read_pth_mirror_axes(path: &Path) -> Result<Option<Vec<usize>>, ImportError> {
    use candle_core::pickle::{Object, Stack};
    let err = |message: String| ImportError::File {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| err(format!("not a PyTorch zip checkpoint: {e}")))?;
    let pkl = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| err("no data.pkl inside the checkpoint".into()))?;
    let mut stack = Stack::empty();
    let read = match zip.by_name(&pkl) {
        Ok(entry) => stack.read_loop(&mut std::io::BufReader::new(entry)),
        Err(e) => return Err(err(format!("reading {pkl}: {e}"))),
    };
    read.and_then(|_| stack.finalize())
        .map_err(|e| err(format!("reading {pkl}: {e}")))
        .and_then(|obj| match obj {
            Object::Dict(items) => Ok(items),
            _ => Err(err(format!("{pkl} does not hold a dict"))),
        })
        .and_then(|items| {
            let value = items.into_iter().find_map(|(k, v)| {
                (k == Object::Unicode("inference_allowed_mirroring_axes".into())).then_some(v)
            });
            match value {
                None | Some(Object::None) => Ok(None),
                Some(Object::Tuple(v) | Object::List(v)) => v
                    .into_iter()
                    .map(|a| match a {
                        Object::Int(i) if i >= 0 => Ok(i as usize),
                        Object::Long(i) if i >= 0 => Ok(i as usize),
                        other => Err(err(format!(
                            "inference_allowed_mirroring_axes: {other:?} is not an axis"
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some),
                Some(other) => Err(err(format!(
                    "inference_allowed_mirroring_axes: expected a tuple, found {other:?}"
                ))),
            }
        })
}

/// A trained nnU-Net model, ready to be rebuilt or saved.
#[derive(Debug)]
pub struct ImportedModel {
    pub model_folder: PathBuf,
    pub checkpoint: PathBuf,
    pub fold: String,
    pub configuration_name: String,
    pub plans: plans::Plans,
    pub configuration: plans::Configuration,
    pub dataset_json: plans::DatasetJson,
    pub io: NetworkIo,
    /// Canonical state_dict name → f32 tensor (CPU).
    pub weights: HashMap<String, Tensor>,
    /// Trainable parameters (each tensor once).
    pub parameter_count: u64,
    /// Number of alias / ignored keys that were dropped.
    pub dropped_keys: usize,
    /// The checkpoint's `inference_allowed_mirroring_axes` (`None`: no mirroring).
    pub mirror_axes: Option<Vec<usize>>,
}

impl ImportedModel {
    /// Rebuilds the network on `device` from the imported weights.
    pub fn build_network(
        &self,
        registry: &Registry,
        deep_supervision: bool,
        device: &Device,
    ) -> Result<Box<dyn SegNetwork>, ArchError> {
        let io = NetworkIo {
            deep_supervision,
            ..self.io
        };
        let vb = VarBuilder::from_tensors(self.weights.clone(), DType::F32, device);
        registry.build(&self.configuration.architecture, &io, vb)
    }

    /// The metadata written next to the weights.
    pub fn metadata(&self) -> Value {
        let arch = &self.configuration.architecture;
        json!({
            "format": MODEL_FORMAT,
            "weights": MODEL_WEIGHTS,
            "network_class_name": arch.network_class_name,
            "arch_kwargs": Value::Object(arch.arch_kwargs.clone()),
            "_kw_requires_import": arch.kw_requires_import,
            "input_channels": self.io.in_channels,
            "num_segmentation_heads": self.io.num_classes,
            "parameter_count": self.parameter_count,
            "dataset_name": self.plans.dataset_name,
            "plans_name": self.plans.plans_name,
            "configuration": self.configuration_name,
            "patch_size": self.configuration.patch_size,
            "fold": self.fold,
            "inference_allowed_mirroring_axes": self.mirror_axes,
            "source": {
                "kind": "nnU-Net v2 checkpoint",
                "model_folder": self.model_folder.display().to_string(),
                "checkpoint": self.checkpoint.display().to_string(),
                "dropped_alias_keys": self.dropped_keys,
            },
        })
    }

    /// Writes `out_dir/model.safetensors` and `out_dir/model.json` (both atomically).
    pub fn save(&self, out_dir: &Path) -> Result<(PathBuf, PathBuf), ImportError> {
        std::fs::create_dir_all(out_dir).map_err(|source| ImportError::Io {
            path: out_dir.to_path_buf(),
            source,
        })?;
        let weights = out_dir.join(MODEL_WEIGHTS);
        save_safetensors_atomic(&self.weights, &weights)?;
        let meta = out_dir.join(MODEL_METADATA);
        plans::io::write_json_atomic(&meta, &self.metadata())?;
        Ok((weights, meta))
    }
}

/// Writes tensors as safetensors via a temporary file in the same folder + rename.
pub fn save_safetensors_atomic(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<(), ImportError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let fname = path
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("weights");
    let tmp = dir.join(format!(".{fname}.tmp{}", std::process::id()));
    // (the safetensors writer orders the tensors: the file is deterministic)
    if let Err(e) = candle_core::safetensors::save(tensors, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImportError::File {
            path: tmp,
            message: format!("writing the weights: {e}"),
        });
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        ImportError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Imports `model_folder/fold_{fold}/{checkpoint_name}` with the default registry.
///
/// `fold` is `"0"`..`"4"` or `"all"` (`"fold_0"` is accepted too); `checkpoint_name` e.g.
/// `checkpoint_final.pth`.
pub fn import_nnunet_model(
    model_folder: &Path,
    fold: &str,
    checkpoint_name: &str,
) -> Result<ImportedModel, ImportError> {
    import_nnunet_model_with(
        &Registry::default(),
        model_folder,
        fold,
        checkpoint_name,
        None,
    )
}

/// [`import_nnunet_model`] with an explicit registry and, optionally, the configuration name
/// (otherwise taken from the folder name `{Trainer}__{Plans}__{Config}`).
pub fn import_nnunet_model_with(
    registry: &Registry,
    model_folder: &Path,
    fold: &str,
    checkpoint_name: &str,
    configuration: Option<&str>,
) -> Result<ImportedModel, ImportError> {
    let model = ModelDir::at(model_folder);
    let configuration_name = match configuration {
        Some(c) => c.to_string(),
        None => model.id()?.configuration().to_string(),
    };
    let plans_path = model.plans_json();
    let (plans, cfg) = plans::Plans::load_configuration(&plans_path, &configuration_name)?;
    let dataset_json = plans::DatasetJson::load(&model.dataset_json())?;
    let io = NetworkIo {
        in_channels: num_input_channels(&cfg, &dataset_json),
        num_classes: dataset_json.num_segmentation_heads(),
        deep_supervision: true,
    };
    let checkpoint = model.fold(fold).join(checkpoint_name);
    // Validate the architecture before touching the (possibly large) checkpoint.
    let location = format!(
        "{}: configurations.{configuration_name}",
        plans_path.display()
    );
    let expected = expected_weights(registry, &cfg.architecture, &io, &location)?;
    let state_dict = read_pth_state_dict(&checkpoint, Some("network_weights"))?;
    let mapped = map_state_dict(&checkpoint, &expected, state_dict)?;
    let mirror_axes = read_pth_mirror_axes(&checkpoint)?;
    Ok(ImportedModel {
        model_folder: model_folder.to_path_buf(),
        checkpoint,
        fold: fold.trim_start_matches("fold_").to_string(),
        configuration_name,
        plans,
        configuration: cfg,
        dataset_json,
        io,
        parameter_count: mapped.parameter_count,
        weights: mapped.weights,
        dropped_keys: mapped.dropped_keys,
        mirror_axes,
    })
}
