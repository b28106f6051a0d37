//! `-pretrained_weights`: initialising a network from another training's checkpoint
//! (nnU-Net's `load_pretrained_weights`), for fine-tuning.
//!
//! Every network weight whose name and shape match a checkpoint weight is loaded. The
//! segmentation heads (final output and deep-supervision convolutions) are skipped when their
//! shapes differ, as they do when the class count changed; any other shape difference is an
//! error naming the weight, both shapes and the file. Network weights the checkpoint lacks keep
//! their initialisation and are reported; a checkpoint sharing no weight with the network is
//! refused.

use super::{Ctx, TrainError};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

/// What [`load_pretrained`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PretrainedReport {
    /// Network weights set from the checkpoint.
    pub loaded: usize,
    /// Segmentation-head weights whose shape differs (kept at their initialisation).
    pub skipped_heads: Vec<String>,
    /// Network weights the checkpoint does not have (kept at their initialisation).
    pub not_in_checkpoint: Vec<String>,
    /// Checkpoint weights the network does not have (ignored).
    pub unused: usize,
}

impl PretrainedReport {
    /// The training-log lines of this report.
    pub fn log_lines(&self, path: &Path) -> Vec<String> {
        let mut lines = vec![format!(
            "Loaded {} pretrained weight(s) from {}; {} checkpoint weight(s) unused",
            self.loaded,
            path.display(),
            self.unused
        )];
        if !self.skipped_heads.is_empty() {
            lines.push(format!(
                "Skipped {} segmentation-head weight(s) of another shape (class count changed): {}",
                self.skipped_heads.len(),
                self.skipped_heads.join(", ")
            ));
        }
        if !self.not_in_checkpoint.is_empty() {
            lines.push(format!(
                "Not in the checkpoint, kept at initialisation: {}",
                self.not_in_checkpoint.join(", ")
            ));
        }
        lines
    }
}

/// Whether `name` belongs to a segmentation head (nnU-Net's `decoder.seg_layers.*`, or the
/// heads of the other architectures).
pub fn is_segmentation_head(name: &str) -> bool {
    [
        "seg_layers.",
        "deep_supervision_heads.",
        "ds_heads.",
        "heads.",
    ]
    .iter()
    .any(|h| name.starts_with(h) || name.contains(&format!(".{h}")))
}

/// The network weights of `path`: an nnU-Net `.pth` checkpoint (its `network_weights`, aliases
/// dropped, `module.` / `_orig_mod.` prefixes removed) or an nnseg `.safetensors` checkpoint.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>, TrainError> {
    let err = |message: String| TrainError::Pretrained {
        path: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(err("no such file".into()));
    }
    if path.extension().is_some_and(|e| e == "pth") {
        let state = crate::import::read_pth_state_dict(path, Some("network_weights"))
            .map_err(|e| err(e.to_string()))?;
        let (weights, _) = architectures::import::deduplicate_state_dict(path, state)
            .map_err(|e| err(e.to_string()))?;
        Ok(weights)
    } else {
        let ck = crate::checkpoint::Checkpoint::load(path, &Device::Cpu)
            .map_err(|e| err(e.to_string()))?;
        Ok(ck.network_weights)
    }
}

/// Sets the variables of `varmap` from `weights` (see the module documentation); `path`
/// names the checkpoint in errors and the report.
pub fn load_pretrained(
    varmap: &VarMap,
    weights: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<PretrainedReport, TrainError> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut report = PretrainedReport {
        unused: weights.keys().filter(|k| !data.contains_key(*k)).count(),
        ..PretrainedReport::default()
    };
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let Some(t) = weights.get(name) else {
            report.not_in_checkpoint.push(name.clone());
            continue;
        };
        if t.dims() != var.dims() {
            if is_segmentation_head(name) {
                report.skipped_heads.push(name.clone());
                continue;
            }
            return Err(TrainError::WeightShape {
                path: path.to_path_buf(),
                name: name.clone(),
                found: t.dims().to_vec(),
                expected: var.dims().to_vec(),
            });
        }
        let t = t
            .to_device(var.device())
            .and_then(|t| t.to_dtype(var.dtype()))
            .ctx(|| format!("loading pretrained weight `{name}`"))?;
        var.set(&t)
            .ctx(|| format!("loading pretrained weight `{name}`"))?;
        report.loaded += 1;
    }
    if report.loaded == 0 {
        return Err(TrainError::Pretrained {
            path: path.to_path_buf(),
            message: "no weight of the checkpoint matches the network by name and shape".into(),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::Init;

    fn varmap(shapes: &[(&str, &[usize])]) -> VarMap {
        let vm = VarMap::new();
        for (n, s) in shapes {
            vm.get(*s, n, Init::Const(0.0), DType::F32, &Device::Cpu)
                .unwrap();
        }
        vm
    }

    fn ones(shape: &[usize]) -> Tensor {
        Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap()
    }

    fn value(vm: &VarMap, name: &str) -> f32 {
        let data = vm.data().lock().unwrap();
        data[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn heads_of_another_class_count_are_skipped_the_rest_loaded() {
        let vm = varmap(&[
            ("encoder.stages.0.0.convs.0.conv.weight", &[4, 1, 3, 3]),
            ("decoder.seg_layers.0.weight", &[3, 8, 1, 1]),
            ("decoder.seg_layers.1.weight", &[3, 4, 1, 1]),
            ("encoder.extra.weight", &[2]),
        ]);
        let weights: HashMap<String, Tensor> = [
            (
                "encoder.stages.0.0.convs.0.conv.weight",
                ones(&[4, 1, 3, 3]),
            ),
            ("decoder.seg_layers.0.weight", ones(&[2, 8, 1, 1])),
            ("decoder.seg_layers.1.weight", ones(&[3, 4, 1, 1])),
            ("only.in.checkpoint", ones(&[1])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let report = load_pretrained(&vm, &weights, Path::new("src.pth")).unwrap();
        assert_eq!(report.loaded, 2);
        assert_eq!(report.skipped_heads, vec!["decoder.seg_layers.0.weight"]);
        assert_eq!(report.not_in_checkpoint, vec!["encoder.extra.weight"]);
        assert_eq!(report.unused, 1);
        assert_eq!(value(&vm, "encoder.stages.0.0.convs.0.conv.weight"), 1.0);
        assert_eq!(value(&vm, "decoder.seg_layers.1.weight"), 1.0);
        assert_eq!(value(&vm, "decoder.seg_layers.0.weight"), 0.0);
        assert_eq!(value(&vm, "encoder.extra.weight"), 0.0);
        let lines = report.log_lines(Path::new("src.pth")).join("\n");
        assert!(
            lines.contains("Loaded 2 pretrained weight(s) from src.pth"),
            "{lines}"
        );
        assert!(lines.contains("decoder.seg_layers.0.weight"), "{lines}");
    }

    #[test]
    fn another_shape_outside_the_heads_names_weight_shapes_and_file() {
        let vm = varmap(&[("encoder.stages.0.0.convs.0.conv.weight", &[4, 1, 3, 3])]);
        let weights: HashMap<String, Tensor> = [(
            "encoder.stages.0.0.convs.0.conv.weight".to_string(),
            ones(&[4, 2, 3, 3]),
        )]
        .into_iter()
        .collect();
        let e = load_pretrained(&vm, &weights, Path::new("/x/src.safetensors"))
            .unwrap_err()
            .to_string();
        for part in [
            "/x/src.safetensors",
            "encoder.stages.0.0.convs.0.conv.weight",
            "[4, 2, 3, 3]",
            "[4, 1, 3, 3]",
        ] {
            assert!(e.contains(part), "{part} not in {e}");
        }
    }

    /// An nnU-Net `.pth` gives the weights (canonical names, same values) the nnU-Net import
    /// maps onto the network the plans build.
    #[test]
    fn nnunet_pth_weights_are_the_imported_network_weights() {
        let model = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/nnunet_checkpoint/Dataset992_Fixture2D")
            .join("nnUNetTrainer__nnUNetPlans__2d");
        let pth = model.join("fold_0/checkpoint_final.pth");
        let read = read_weights(&pth).unwrap();
        let imported =
            crate::import::import_nnunet_model(&model, "0", "checkpoint_final.pth").unwrap();
        assert_eq!(read.len(), imported.weights.len());
        for (name, want) in &imported.weights {
            let got = read[name].to_dtype(DType::F32).unwrap();
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
    }

    #[test]
    fn a_checkpoint_sharing_nothing_is_refused() {
        let vm = varmap(&[("a.weight", &[2])]);
        let weights: HashMap<String, Tensor> =
            [("b.weight".to_string(), ones(&[2]))].into_iter().collect();
        let e = load_pretrained(&vm, &weights, Path::new("c.pth")).unwrap_err();
        assert!(e.to_string().contains("no weight"), "{e}");
        assert!(is_segmentation_head("decoder.seg_layers.4.bias"));
        assert!(!is_segmentation_head(
            "encoder.stages.0.0.convs.0.conv.weight"
        ));
    }
}
