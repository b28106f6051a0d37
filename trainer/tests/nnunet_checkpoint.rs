//! Import of real nnU-Net v2 checkpoints (the workspace's tests/fixtures/nnunet_checkpoint): keys, parameter
//! counts, and forward parity with PyTorch to 1e-4 for every deep-supervision output.

use architectures::registry::{ArchError, NetworkIo, Registry};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;
use std::path::PathBuf;
use trainer::import::{
    import_nnunet_model, import_nnunet_model_with, ImportError, ImportedModel, MODEL_METADATA,
    MODEL_WEIGHTS,
};

/// The workspace's `tests/fixtures/nnunet_checkpoint` (a missing folder fails the test).
fn fixture_root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nnunet_checkpoint");
    assert!(dir.is_dir(), "fixture folder {} is missing", dir.display());
    dir
}

struct Fixture {
    model_dir: PathBuf,
    io_json: Value,
    io: std::collections::HashMap<String, Tensor>,
}

fn load(dataset: &str, trainer_dir: &str) -> Fixture {
    let root = fixture_root().join(dataset);
    let io_json: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("io.json")).unwrap()).unwrap();
    let io = candle_core::safetensors::load(root.join("io.safetensors"), &Device::Cpu).unwrap();
    Fixture {
        model_dir: root.join(trainer_dir),
        io_json,
        io,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check_outputs(fx: &Fixture, outs: &[Tensor], what: &str) {
    let n_out = fx.io.keys().filter(|k| k.starts_with("output.")).count();
    assert_eq!(outs.len(), n_out, "{what}");
    for (i, y) in outs.iter().enumerate() {
        let want = &fx.io[&format!("output.{i}")];
        assert_eq!(y.dims(), want.dims(), "{what} output.{i}");
        let d = max_abs_diff(y, want);
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-4 + 1e-4 * scale, "{what} output.{i}: max |Δ| = {d}");
    }
}

fn check_model(fx: &Fixture, m: &ImportedModel) {
    assert_eq!(
        m.parameter_count,
        fx.io_json["param_count"].as_u64().unwrap()
    );
    assert_eq!(
        m.io.in_channels as u64,
        fx.io_json["input_channels"].as_u64().unwrap()
    );
    assert_eq!(
        m.io.num_classes as u64,
        fx.io_json["num_classes"].as_u64().unwrap()
    );
    assert_eq!(
        m.dropped_keys as u64,
        fx.io_json["n_alias_keys"].as_u64().unwrap()
    );
    // exactly the canonical keys, with their shapes
    let canon = fx.io_json["canonical_keys"].as_object().unwrap();
    assert_eq!(m.weights.len(), canon.len());
    for (k, shape) in canon {
        let want: Vec<usize> = shape
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let t = m.weights.get(k).unwrap_or_else(|| panic!("missing {k}"));
        assert_eq!(t.dims(), want.as_slice(), "{k}");
    }
    // the same names and shapes as the Rust network asks for
    let params = Registry::default()
        .parameters(&m.configuration.architecture, &m.io)
        .unwrap();
    assert_eq!(params.len(), canon.len());
    for p in &params {
        assert!(
            canon.contains_key(&p.name),
            "network weight {} not in the checkpoint",
            p.name
        );
    }
}

fn parity(dataset: &str, trainer_dir: &str) {
    let fx = load(dataset, trainer_dir);
    let m = import_nnunet_model(&fx.model_dir, "0", "checkpoint_final.pth").unwrap();
    check_model(&fx, &m);
    // the checkpoint's `inference_allowed_mirroring_axes` tuple, read from its pickle
    let want_axes: Vec<usize> = fx.io_json["checkpoint_facts"]["inference_allowed_mirroring_axes"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap() as usize).collect())
        .unwrap_or_else(|| (0..m.configuration.patch_size.len()).collect());
    assert_eq!(m.mirror_axes.as_deref(), Some(want_axes.as_slice()));
    assert_eq!(
        m.metadata()["inference_allowed_mirroring_axes"],
        serde_json::json!(want_axes)
    );
    let reg = Registry::default();
    let dev = Device::Cpu;
    let x = &fx.io["input"];

    let net = m.build_network(&reg, true, &dev).unwrap();
    check_outputs(
        &fx,
        &net.forward(x, false).unwrap(),
        "deep supervision, eval",
    );
    // no dropout and instance norm: train mode gives the same logits
    check_outputs(
        &fx,
        &net.forward(x, true).unwrap(),
        "deep supervision, train",
    );

    let single = m.build_network(&reg, false, &dev).unwrap();
    let y = single.forward(x, false).unwrap();
    assert_eq!(y.len(), 1);
    assert!(max_abs_diff(&y[0], &fx.io["output.0"]) <= 2e-4);

    // save as safetensors + metadata, reload from the files, same outputs
    let out = std::env::temp_dir().join(format!("nnseg-import-{}-{dataset}", std::process::id()));
    let (wpath, mpath) = m.save(&out).unwrap();
    assert_eq!(wpath, out.join(MODEL_WEIGHTS));
    assert_eq!(mpath, out.join(MODEL_METADATA));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    assert_eq!(meta["format"], "nnseg-model-v1");
    assert_eq!(meta["parameter_count"], fx.io_json["param_count"]);
    assert_eq!(meta["network_class_name"], fx.io_json["network_class_name"]);
    let spec = plans::ArchitectureSpec {
        network_class_name: meta["network_class_name"].as_str().unwrap().into(),
        arch_kwargs: meta["arch_kwargs"].as_object().unwrap().clone(),
        kw_requires_import: vec![],
    };
    let io = NetworkIo {
        in_channels: meta["input_channels"].as_u64().unwrap() as usize,
        num_classes: meta["num_segmentation_heads"].as_u64().unwrap() as usize,
        deep_supervision: true,
    };
    let weights = candle_core::safetensors::load(&wpath, &dev).unwrap();
    assert_eq!(weights.len(), m.weights.len());
    let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
    let reloaded = reg.build(&spec, &io, vb).unwrap();
    check_outputs(&fx, &reloaded.forward(x, false).unwrap(), "reloaded");
    // no temp files left behind
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn fixture_3d_matches_pytorch() {
    parity(
        "Dataset991_Fixture3D",
        "nnUNetTrainer__nnUNetPlans__3d_fullres",
    );
}

#[test]
fn fixture_2d_matches_pytorch() {
    parity("Dataset992_Fixture2D", "nnUNetTrainer__nnUNetPlans__2d");
}

#[test]
fn import_errors_name_the_problem() {
    let fx = load(
        "Dataset991_Fixture3D",
        "nnUNetTrainer__nnUNetPlans__3d_fullres",
    );
    // missing fold
    let e = import_nnunet_model(&fx.model_dir, "3", "checkpoint_final.pth").unwrap_err();
    assert!(matches!(e, ImportError::Io { .. }), "{e}");
    assert!(e.to_string().contains("fold_3"), "{e}");

    // a folder not named {trainer}__{plans}__{configuration}: an error naming it, unless the
    // configuration is given
    let renamed = std::env::temp_dir()
        .join(format!("nnseg-import-renamed-{}", std::process::id()))
        .join("imported");
    std::fs::create_dir_all(renamed.join("fold_0")).unwrap();
    for f in ["plans.json", "dataset.json", "fold_0/checkpoint_final.pth"] {
        std::fs::copy(fx.model_dir.join(f), renamed.join(f)).unwrap();
    }
    let e = import_nnunet_model(&renamed, "0", "checkpoint_final.pth").unwrap_err();
    assert!(matches!(e, ImportError::Layout(_)), "{e}");
    assert!(
        e.to_string().contains(&renamed.display().to_string()),
        "{e}"
    );
    let m = import_nnunet_model_with(
        &Registry::default(),
        &renamed,
        "fold_0",
        "checkpoint_final.pth",
        Some("3d_fullres"),
    )
    .unwrap();
    assert_eq!(
        (m.fold.as_str(), m.configuration_name.as_str()),
        ("0", "3d_fullres")
    );
    std::fs::remove_dir_all(renamed.parent().unwrap()).ok();

    // plans that describe a different network than the checkpoint: a copy of the folder with
    // features [4, 8, 16, 64]
    let tmp = std::env::temp_dir()
        .join(format!("nnseg-import-bad-{}", std::process::id()))
        .join("nnUNetTrainer__nnUNetPlans__3d_fullres");
    std::fs::create_dir_all(tmp.join("fold_0")).unwrap();
    std::fs::copy(fx.model_dir.join("dataset.json"), tmp.join("dataset.json")).unwrap();
    std::fs::copy(
        fx.model_dir.join("fold_0/checkpoint_final.pth"),
        tmp.join("fold_0/checkpoint_final.pth"),
    )
    .unwrap();
    let mut plans: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.model_dir.join("plans.json")).unwrap())
            .unwrap();
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] =
        serde_json::json!([4, 8, 16, 64]);
    std::fs::write(
        tmp.join("plans.json"),
        serde_json::to_string(&plans).unwrap(),
    )
    .unwrap();
    let e = import_nnunet_model(&tmp, "0", "checkpoint_final.pth")
        .unwrap_err()
        .to_string();
    assert!(e.contains("encoder.stages.3.0.convs.0.conv.weight"), "{e}");
    assert!(
        e.contains("[64, 16, 3, 3, 3]") && e.contains("[32, 16, 3, 3, 3]"),
        "{e}"
    );

    // one stage fewer: the checkpoint has weights the network does not
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"] = serde_json::json!({
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": true,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": true},
        "dropout_op": null, "dropout_op_kwargs": null, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
    });
    std::fs::write(
        tmp.join("plans.json"),
        serde_json::to_string(&plans).unwrap(),
    )
    .unwrap();
    let e = import_nnunet_model(&tmp, "0", "checkpoint_final.pth").unwrap_err();
    // decoder.stages.0 now expects 2*8 input channels instead of 2*16: first mismatch
    assert!(
        matches!(
            e,
            ImportError::Arch(ArchError::ShapeMismatch { .. })
                | ImportError::Arch(ArchError::UnexpectedWeights { .. })
        ),
        "{e}"
    );
    std::fs::remove_dir_all(tmp.parent().unwrap()).ok();
}
