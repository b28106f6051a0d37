//! The weight mapping of trained nnU-Net v2 models (no files: the caller reads the checkpoint
//! and the plans, see `trainer::import`).
//!
//! An nnU-Net checkpoint's `network_weights` is the network's state_dict, in which every conv
//! is stored twice (`...convs.0.conv.weight` and `...convs.0.all_modules.0.weight`) and the
//! encoder twice again (`encoder.*` and `decoder.encoder.*`). [`expected_weights`] lists what
//! the network built from the plans' architecture needs; [`map_state_dict`] drops the aliases
//! and checks every expected weight against the state dict (names and shapes).

use crate::registry::{
    count_trainable, ArchError, CandleContext, NetworkIo, ParamInfo, Registry, KWARGS_PATH,
};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

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

/// The network's parameter list for `architecture` and `io`, checked before a (possibly
/// large) checkpoint is read. An invalid `arch_kwargs` entry is reported at
/// `{kwargs_location}.{path}` (e.g. `plans.json: configurations.3d_fullres`).
pub fn expected_weights(
    registry: &Registry,
    architecture: &plans::ArchitectureSpec,
    io: &NetworkIo,
    kwargs_location: &str,
) -> Result<Vec<ParamInfo>, ArchError> {
    registry.parameters(architecture, io).map_err(|e| match e {
        ArchError::InvalidOption { path, message } if path.starts_with(KWARGS_PATH) => {
            ArchError::InvalidOption {
                path: format!("{kwargs_location}.{path}"),
                message,
            }
        }
        other => other,
    })
}

/// The network's weights taken from a checkpoint's state dict.
#[derive(Debug)]
pub struct ImportedWeights {
    /// Canonical state_dict name → f32 tensor (on the state dict's device).
    pub weights: HashMap<String, Tensor>,
    /// Trainable parameters (each tensor once).
    pub parameter_count: u64,
    /// Number of alias / ignored keys that were dropped.
    pub dropped_keys: usize,
}

/// Maps an nnU-Net state dict (`source` names it in errors) onto the `expected` weights
/// (from [`expected_weights`]): drops aliases, checks names and shapes, converts to f32.
pub fn map_state_dict(
    source: &Path,
    expected: &[ParamInfo],
    state_dict: Vec<(String, Tensor)>,
) -> Result<ImportedWeights, ArchError> {
    let (canonical, dropped_keys) = deduplicate_state_dict(source, state_dict)?;
    let weights = match_weights(source, expected, canonical)?;
    Ok(ImportedWeights {
        weights,
        parameter_count: count_trainable(expected),
        dropped_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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

    fn tiny_unet() -> plans::ArchitectureSpec {
        plans::ArchitectureSpec {
            network_class_name: "dynamic_network_architectures.architectures.unet.PlainConvUNet"
                .into(),
            arch_kwargs: crate::test_util::plan_kwargs(
                2,
                &[2, 4],
                serde_json::json!([[1, 1], [2, 2]]),
                serde_json::json!([[3, 3], [3, 3]]),
            ),
            kw_requires_import: vec![],
        }
    }

    #[test]
    fn state_dict_in_memory_maps_onto_the_network() {
        let dev = Device::Cpu;
        let reg = Registry::default();
        let io = NetworkIo {
            in_channels: 1,
            num_classes: 2,
            deep_supervision: true,
        };
        let expected =
            expected_weights(&reg, &tiny_unet(), &io, "plans.json: configurations.2d").unwrap();
        // every weight under its canonical name plus an alias and an ignored buffer, as nnU-Net
        // saves them
        let mut sd: Vec<(String, Tensor)> = expected
            .iter()
            .map(|p| {
                let t = Tensor::zeros(p.shape.as_slice(), DType::F64, &dev).unwrap();
                (format!("module.{}", p.name), t)
            })
            .collect();
        let first = expected[0].name.clone();
        sd.push((
            format!("decoder.encoder.{first}"),
            Tensor::zeros(expected[0].shape.as_slice(), DType::F32, &dev).unwrap(),
        ));
        sd.push((
            "encoder.stages.0.0.convs.0.norm.num_batches_tracked".into(),
            Tensor::zeros(1, DType::I64, &dev).unwrap(),
        ));
        let m = map_state_dict(Path::new("ck.pth"), &expected, sd).unwrap();
        assert_eq!(m.weights.len(), expected.len());
        assert_eq!(m.dropped_keys, 2);
        assert_eq!(m.parameter_count, count_trainable(&expected));
        assert!(m.weights.values().all(|t| t.dtype() == DType::F32));

        // an invalid arch_kwargs entry is reported at the given location
        let mut bad = tiny_unet();
        bad.arch_kwargs
            .insert("n_stages".into(), serde_json::json!("two"));
        let e = expected_weights(&reg, &bad, &io, "p.json: configurations.2d")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p.json: configurations.2d.architecture.arch_kwargs"),
            "{e}"
        );
    }
}
