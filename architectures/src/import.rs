//! Import of trained nnU-Net v2 models.
//!
//! An nnU-Net model folder (`nnUNet_results/DatasetXXX/{Trainer}__{Plans}__{Config}`) holds
//! `plans.json`, `dataset.json` and `fold_X/checkpoint_*.pth`. The checkpoint is a pickled dict
//! whose `network_weights` is the network's state_dict, in which every conv is stored twice
//! (`...convs.0.conv.weight` and `...convs.0.all_modules.0.weight`) and the encoder twice again
//! (`encoder.*` and `decoder.encoder.*`). [`import_nnunet_model`] reads it, drops the aliases,
//! checks every weight the network expects against the checkpoint (names and shapes), and
//! returns the weights with everything needed to rebuild the network;
//! [`ImportedModel::save`] writes them as `model.safetensors` + `model.json`.

use crate::registry::{
    count_trainable, ArchError, CandleContext, NetworkIo, ParamInfo, Registry, SegNetwork,
    KWARGS_PATH,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// File name of the weights written by [`ImportedModel::save`].
pub const MODEL_WEIGHTS: &str = "model.safetensors";
/// File name of the metadata written by [`ImportedModel::save`].
pub const MODEL_METADATA: &str = "model.json";
/// `format` field of [`MODEL_METADATA`].
pub const MODEL_FORMAT: &str = "nnseg-model-v1";

/// How a state_dict key of an nnU-Net checkpoint is treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// A distinct tensor, under its canonical name.
    Canonical(String),
    /// A second name of a tensor that also has a canonical key (`decoder.encoder.*`,
    /// `*.all_modules.N.*`).
    Alias,
    /// A buffer the Rust networks do not use (`num_batches_tracked`).
    Ignored,
}

/// Classifies a state_dict key (after stripping a `module.` / `_orig_mod.` wrapper prefix).
pub fn classify_key(key: &str) -> KeyKind {
    let mut k = key;
    loop {
        if let Some(r) = k.strip_prefix("module.") {
            k = r;
        } else if let Some(r) = k.strip_prefix("_orig_mod.") {
            k = r;
        } else {
            break;
        }
    }
    if k.ends_with("num_batches_tracked") {
        KeyKind::Ignored
    } else if k.starts_with("decoder.encoder.") || k.contains(".all_modules.") {
        KeyKind::Alias
    } else {
        KeyKind::Canonical(k.to_string())
    }
}

/// Reads the tensors of `key_in_pickle` (e.g. `network_weights`) from a PyTorch zip checkpoint.
pub fn read_pth_state_dict(
    path: &Path,
    key_in_pickle: Option<&str>,
) -> Result<Vec<(String, Tensor)>, ArchError> {
    let ck = |message: String| ArchError::Checkpoint {
        file: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(ArchError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "checkpoint not found"),
        });
    }
    let pth = candle_core::pickle::PthTensors::new(path, key_in_pickle)
        .map_err(|e| ck(format!("cannot read the PyTorch checkpoint: {e}")))?;
    let mut names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        match pth.get(&n) {
            Ok(Some(t)) => out.push((n, t)),
            Ok(None) => {}
            Err(e) => return Err(ck(format!("cannot read tensor `{n}`: {e}"))),
        }
    }
    if out.is_empty() {
        return Err(ck(format!(
            "no tensors found{}",
            key_in_pickle
                .map(|k| format!(" under `{k}`"))
                .unwrap_or_default()
        )));
    }
    Ok(out)
}

/// Drops aliases and ignored buffers; fails if two different canonical keys collide.
pub fn deduplicate_state_dict(
    file: &Path,
    tensors: Vec<(String, Tensor)>,
) -> Result<(HashMap<String, Tensor>, usize), ArchError> {
    let mut out = HashMap::new();
    let mut dropped = 0;
    for (k, t) in tensors {
        match classify_key(&k) {
            KeyKind::Canonical(c) => {
                if out.insert(c.clone(), t).is_some() {
                    return Err(ArchError::Checkpoint {
                        file: file.to_path_buf(),
                        message: format!("weight `{c}` appears twice"),
                    });
                }
            }
            KeyKind::Alias | KeyKind::Ignored => dropped += 1,
        }
    }
    Ok((out, dropped))
}

/// Checks `weights` against the network's parameter list: every expected weight present with
/// the right shape and nothing left over. Converts the weights to f32.
pub fn match_weights(
    file: &Path,
    expected: &[ParamInfo],
    mut weights: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, ArchError> {
    let mut out = HashMap::with_capacity(expected.len());
    for p in expected {
        let Some(t) = weights.remove(&p.name) else {
            return Err(ArchError::MissingWeight {
                file: file.to_path_buf(),
                key: p.name.clone(),
                expected: p.shape.clone(),
            });
        };
        if t.dims() != p.shape.as_slice() {
            return Err(ArchError::ShapeMismatch {
                file: file.to_path_buf(),
                key: p.name.clone(),
                expected: p.shape.clone(),
                found: t.dims().to_vec(),
            });
        }
        let t = t
            .to_dtype(DType::F32)
            .ctx(|| format!("converting `{}` to f32", p.name))?;
        out.insert(p.name.clone(), t);
    }
    if !weights.is_empty() {
        let mut keys: Vec<String> = weights.into_keys().collect();
        keys.sort();
        return Err(ArchError::UnexpectedWeights {
            file: file.to_path_buf(),
            keys,
        });
    }
    Ok(out)
}

/// The configuration name of a model folder `{Trainer}__{Plans}__{Config}`.
pub fn configuration_from_folder_name(folder: &Path) -> Option<String> {
    let name = folder.file_name()?.to_str()?;
    let parts: Vec<&str> = name.splitn(3, "__").collect();
    (parts.len() == 3 && parts.iter().all(|p| !p.is_empty())).then(|| parts[2].to_string())
}

/// Number of input channels nnU-Net gives the network: the image channels, plus one per
/// foreground label for a cascade stage (`previous_stage` set).
pub fn num_input_channels(cfg: &plans::Configuration, ds: &plans::DatasetJson) -> usize {
    let extra = if cfg.previous_stage.is_some() {
        ds.foreground_labels().len()
    } else {
        0
    };
    ds.num_channels() + extra
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
            "source": {
                "kind": "nnU-Net v2 checkpoint",
                "model_folder": self.model_folder.display().to_string(),
                "checkpoint": self.checkpoint.display().to_string(),
                "dropped_alias_keys": self.dropped_keys,
            },
        })
    }

    /// Writes `out_dir/model.safetensors` and `out_dir/model.json` (both atomically).
    pub fn save(&self, out_dir: &Path) -> Result<(PathBuf, PathBuf), ArchError> {
        std::fs::create_dir_all(out_dir).map_err(|source| ArchError::Io {
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
) -> Result<(), ArchError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let fname = path
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("weights");
    let tmp = dir.join(format!(".{fname}.tmp{}", std::process::id()));
    // deterministic key order in the file
    let sorted: BTreeMap<&String, &Tensor> = tensors.iter().collect();
    let ordered: Vec<(&String, &Tensor)> = sorted.into_iter().collect();
    let res = candle_core::safetensors::save(
        &ordered
            .iter()
            .map(|(k, t)| ((*k).clone(), (*t).clone()))
            .collect(),
        &tmp,
    )
    .ctx(|| format!("writing {}", tmp.display()));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        ArchError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Imports `model_folder/fold_{fold}/{checkpoint_name}` with the default registry.
///
/// `fold` is `"0"`..`"4"` or `"all"`; `checkpoint_name` e.g. `checkpoint_final.pth`.
pub fn import_nnunet_model(
    model_folder: &Path,
    fold: &str,
    checkpoint_name: &str,
) -> Result<ImportedModel, ArchError> {
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
) -> Result<ImportedModel, ArchError> {
    let plans_path = model_folder.join("plans.json");
    let ds_path = model_folder.join("dataset.json");
    let configuration_name = match configuration {
        Some(c) => c.to_string(),
        None => configuration_from_folder_name(model_folder).ok_or_else(|| ArchError::Checkpoint {
            file: model_folder.to_path_buf(),
            message: "cannot tell the configuration: the folder is not named {Trainer}__{Plans}__{Configuration}"
                .into(),
        })?,
    };
    let (plans, cfg) = plans::Plans::load_configuration(&plans_path, &configuration_name)?;
    let dataset_json = plans::DatasetJson::load(&ds_path)?;
    let io = NetworkIo {
        in_channels: num_input_channels(&cfg, &dataset_json),
        num_classes: dataset_json.num_segmentation_heads(),
        deep_supervision: true,
    };
    let fold_dir = if fold.starts_with("fold_") {
        fold.to_string()
    } else {
        format!("fold_{fold}")
    };
    let checkpoint = model_folder.join(fold_dir).join(checkpoint_name);
    // Validate the architecture before touching the (possibly large) checkpoint.
    let expected = registry
        .parameters(&cfg.architecture, &io)
        .map_err(|e| match e {
            ArchError::InvalidOption { path, message } if path.starts_with(KWARGS_PATH) => {
                ArchError::InvalidOption {
                    path: format!(
                        "{}: configurations.{configuration_name}.{path}",
                        plans_path.display()
                    ),
                    message,
                }
            }
            other => other,
        })?;
    let raw = read_pth_state_dict(&checkpoint, Some("network_weights"))?;
    let (canonical, dropped_keys) = deduplicate_state_dict(&checkpoint, raw)?;
    let weights = match_weights(&checkpoint, &expected, canonical)?;
    Ok(ImportedModel {
        model_folder: model_folder.to_path_buf(),
        checkpoint,
        fold: fold.trim_start_matches("fold_").to_string(),
        configuration_name,
        plans,
        configuration: cfg,
        dataset_json,
        io,
        parameter_count: count_trainable(&expected),
        weights,
        dropped_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_rules() {
        assert_eq!(
            classify_key("encoder.stages.0.0.convs.0.conv.weight"),
            KeyKind::Canonical("encoder.stages.0.0.convs.0.conv.weight".into())
        );
        assert_eq!(
            classify_key("encoder.stages.0.0.convs.0.all_modules.0.weight"),
            KeyKind::Alias
        );
        assert_eq!(
            classify_key("decoder.encoder.stages.0.0.convs.1.all_modules.1.bias"),
            KeyKind::Alias
        );
        assert_eq!(
            classify_key("decoder.encoder.stem.convs.0.conv.weight"),
            KeyKind::Alias
        );
        assert_eq!(
            classify_key("module._orig_mod.decoder.seg_layers.0.bias"),
            KeyKind::Canonical("decoder.seg_layers.0.bias".into())
        );
        assert_eq!(
            classify_key("encoder.stages.0.0.convs.0.norm.num_batches_tracked"),
            KeyKind::Ignored
        );
    }

    #[test]
    fn folder_name_gives_configuration() {
        let p = Path::new("/r/Dataset1_X/nnUNetTrainer__nnUNetPlans__3d_fullres");
        assert_eq!(
            configuration_from_folder_name(p).as_deref(),
            Some("3d_fullres")
        );
        assert_eq!(configuration_from_folder_name(Path::new("/r/fold_0")), None);
    }

    #[test]
    fn matching_reports_missing_mismatched_and_extra() {
        let dev = Device::Cpu;
        let expected = vec![
            ParamInfo {
                name: "a.weight".into(),
                shape: vec![2, 3],
                init: candle_nn::Init::Const(0.0),
            },
            ParamInfo {
                name: "a.bias".into(),
                shape: vec![2],
                init: candle_nn::Init::Const(0.0),
            },
        ];
        let f = Path::new("ck.pth");
        let mk = |pairs: &[(&str, &[usize])]| -> HashMap<String, Tensor> {
            pairs
                .iter()
                .map(|(k, s)| (k.to_string(), Tensor::zeros(*s, DType::F32, &dev).unwrap()))
                .collect()
        };
        let ok =
            match_weights(f, &expected, mk(&[("a.weight", &[2, 3]), ("a.bias", &[2])])).unwrap();
        assert_eq!(ok.len(), 2);
        let e = match_weights(f, &expected, mk(&[("a.weight", &[2, 3])]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing weight `a.bias`"), "{e}");
        let e = match_weights(f, &expected, mk(&[("a.weight", &[3, 2]), ("a.bias", &[2])]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`a.weight` has shape [3, 2]") && e.contains("[2, 3]"),
            "{e}"
        );
        let e = match_weights(
            f,
            &expected,
            mk(&[("a.weight", &[2, 3]), ("a.bias", &[2]), ("b", &[1])]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("does not have: b"), "{e}");
    }
}
