//! End-to-end training on a tiny synthetic 2D dataset.

use super::hooks::class_presence_loss;
use super::*;
use crate::data::LabelInfo;
use candle_core::Tensor;
use datasets::io::ImageProperties;
use ndarray::Array4;
use preprocessing::storage::{save_case, CaseProperties};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

const DATASET: &str = "Dataset999_Tiny";

/// nnU-Net plans with a 3-stage 2D PlainConvUNet (features 4, 8, 16), patch 32×32, batch 2.
const PLANS: &str = r#"{
 "dataset_name": "Dataset999_Tiny",
 "plans_name": "nnUNetPlans",
 "original_median_spacing_after_transp": [
  999.0,
  1.0,
  1.0
 ],
 "original_median_shape_after_transp": [
  1,
  40,
  40
 ],
 "image_reader_writer": "NaturalImage2DIO",
 "transpose_forward": [
  0,
  1,
  2
 ],
 "transpose_backward": [
  0,
  1,
  2
 ],
 "configurations": {
  "2d": {
   "data_identifier": "nnUNetPlans_2d",
   "preprocessor_name": "DefaultPreprocessor",
   "batch_size": 2,
   "patch_size": [
    32,
    32
   ],
   "median_image_size_in_voxels": [
    40.0,
    40.0
   ],
   "spacing": [
    1.0,
    1.0
   ],
   "normalization_schemes": [
    "ZScoreNormalization"
   ],
   "use_mask_for_norm": [
    false
   ],
   "resampling_fn_data": "resample_data_or_seg_to_shape",
   "resampling_fn_seg": "resample_data_or_seg_to_shape",
   "resampling_fn_data_kwargs": {
    "is_seg": false,
    "order": 3,
    "order_z": 0,
    "force_separate_z": null
   },
   "resampling_fn_seg_kwargs": {
    "is_seg": true,
    "order": 1,
    "order_z": 0,
    "force_separate_z": null
   },
   "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
   "resampling_fn_probabilities_kwargs": {
    "is_seg": false,
    "order": 1,
    "order_z": 0,
    "force_separate_z": null
   },
   "architecture": {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
     "n_stages": 3,
     "features_per_stage": [
      4,
      8,
      16
     ],
     "conv_op": "torch.nn.modules.conv.Conv2d",
     "kernel_sizes": [
      [
       3,
       3
      ],
      [
       3,
       3
      ],
      [
       3,
       3
      ]
     ],
     "strides": [
      [
       1,
       1
      ],
      [
       2,
       2
      ],
      [
       2,
       2
      ]
     ],
     "n_conv_per_stage": [
      2,
      2,
      2
     ],
     "n_conv_per_stage_decoder": [
      2,
      2
     ],
     "conv_bias": true,
     "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
     "norm_op_kwargs": {
      "eps": 1e-05,
      "affine": true
     },
     "dropout_op": null,
     "dropout_op_kwargs": null,
     "nonlin": "torch.nn.LeakyReLU",
     "nonlin_kwargs": {
      "inplace": true
     }
    },
    "_kw_requires_import": [
     "conv_op",
     "norm_op",
     "dropout_op",
     "nonlin"
    ]
   },
   "batch_dice": true
  }
 },
 "experiment_planner_used": "ExperimentPlanner",
 "label_manager": "LabelManager",
 "foreground_intensity_properties_per_channel": {
  "0": {
   "max": 3.0,
   "mean": 1.0,
   "median": 1.0,
   "min": -1.0,
   "percentile_00_5": -0.5,
   "percentile_99_5": 2.5,
   "std": 0.5
  }
 }
}"#;

fn plans_json() -> Value {
    serde_json::from_str(PLANS).unwrap()
}

/// 6 cases of 1×40×40: a bright square (label 1) on noise.
fn make_dataset(root: &Path) -> PathBuf {
    let pre = root.join("nnUNet_preprocessed").join(DATASET);
    let data_dir = pre.join("nnUNetPlans_2d");
    std::fs::create_dir_all(&data_dir).unwrap();
    plans::io::write_json_atomic(&pre.join("nnUNetPlans.json"), &plans_json()).unwrap();
    plans::io::write_json_atomic(
        &pre.join("dataset.json"),
        &json!({
            "channel_names": {"0": "noise"},
            "labels": {"background": 0, "square": 1},
            "numTraining": 6,
            "file_ending": ".png"
        }),
    )
    .unwrap();
    let mut state = 12345u64;
    let mut rnd = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) as f32 - 0.5
    };
    for case in 0..6 {
        let (y0, x0) = (4 + 3 * case, 6 + 2 * case);
        let mut data = Array4::<f32>::zeros((1, 1, 40, 40));
        let mut seg = Array4::<i16>::zeros((1, 1, 40, 40));
        let mut locs = vec![];
        for y in 0..40 {
            for x in 0..40 {
                let inside = (y0..y0 + 14).contains(&y) && (x0..x0 + 14).contains(&x);
                data[[0, 0, y, x]] = rnd() + if inside { 1.5 } else { -0.5 };
                if inside {
                    seg[[0, 0, y, x]] = 1;
                    locs.push([0i64, 0, y as i64, x as i64]);
                }
            }
        }
        let props = CaseProperties {
            spacing: [999.0, 1.0, 1.0],
            shape_before_cropping: [1, 40, 40],
            bbox_used_for_cropping: [[0, 1], [0, 40], [0, 40]],
            shape_after_cropping_and_before_resampling: [1, 40, 40],
            class_locations: BTreeMap::from([("1".to_string(), locs)]),
            image_properties: ImageProperties::natural_2d(),
        };
        save_case(
            &data_dir,
            &format!("case_{case:03}"),
            data.view(),
            Some(seg.view()),
            &props,
        )
        .unwrap();
    }
    pre
}

/// 2 epochs of 4 training and 2 validation iterations: start, 4 iterations, validation, end.
fn check_progress_events(events: &[super::TrainProgress]) {
    use super::TrainProgress as P;
    assert_eq!(events.len(), 2 * 7, "{events:?}");
    for (epoch, e) in events.chunks(7).enumerate() {
        assert_eq!(
            e[0],
            P::EpochStart {
                epoch,
                num_epochs: 2,
                iterations: 4
            }
        );
        for (i, it) in e[1..5].iter().enumerate() {
            let P::Iteration(it) = it else {
                panic!("{it:?}")
            };
            assert_eq!((it.epoch, it.done, it.iterations), (epoch, i + 1, 4));
            assert!(it.loss.is_finite() && it.seconds_per_iteration > 0.0);
            assert!(it.fold_eta_s >= 0.0);
        }
        assert_eq!(
            e[5],
            P::Validation {
                epoch,
                iterations: 2
            }
        );
        assert_eq!(e[6], P::EpochEnd { epoch });
    }
    // the last iteration of the last epoch has nothing left
    let P::Iteration(last) = events[11] else {
        panic!()
    };
    assert_eq!(last.fold_eta_s, 0.0);
}

fn request(root: &Path, pre: &Path, epochs: usize) -> TrainRequest {
    let config = TrainerConfig {
        num_epochs: epochs,
        num_iterations_per_epoch: 4,
        num_val_iterations_per_epoch: 2,
        save_every: 1,
        num_workers: Some(1),
        seed: 7,
        ..Default::default()
    };
    let mut r = TrainRequest::new(
        pre,
        root.join("nnUNet_results"),
        DATASET,
        "2d",
        Fold::Index(0),
        "nnUNetTrainer_tiny",
        config,
        Device::Cpu,
    );
    r.echo_log = false;
    r
}

#[test]
fn tiny_training_writes_the_results_layout_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    let mut req = request(tmp.path(), &pre, 2);
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    req.progress = Some(super::ProgressHook::new(move |e| {
        sink.lock().unwrap().push(*e)
    }));
    let s = train(&req).unwrap();
    check_progress_events(&events.lock().unwrap());
    eprintln!(
        "tiny 2D training: {:.1} ms per iteration ({} iterations)",
        s.mean_train_iteration_s * 1e3,
        s.train_iterations
    );
    let model = tmp
        .path()
        .join("nnUNet_results")
        .join(DATASET)
        .join("nnUNetTrainer_tiny__nnUNetPlans__2d");
    assert_eq!(s.fold_folder, model.join("fold_0"));
    for f in ["plans.json", "dataset.json"] {
        assert!(model.join(f).is_file(), "{f}");
    }
    for f in [
        "checkpoint_final.safetensors",
        "checkpoint_best.safetensors",
        "progress.png",
        "debug.json",
    ] {
        assert!(s.fold_folder.join(f).is_file(), "{f}");
    }
    // latest is deleted at the end; no temp files are left
    let names: Vec<String> = std::fs::read_dir(&s.fold_folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("latest") || n.starts_with('.')),
        "{names:?}"
    );
    assert_eq!(s.train_iterations, 8);
    assert_eq!(s.epochs_completed, 2);
    assert_eq!(s.logging.epochs(), 2);
    assert!(s.logging.train_losses.iter().all(|l| l.is_finite()));
    assert!(s.logging.val_losses.iter().all(|l| l.is_finite()));
    assert_eq!(s.logging.dice_per_class_or_region[0].len(), 1);
    assert!(s.logging.lrs[1] < s.logging.lrs[0]);
    let log = std::fs::read_to_string(&s.log_file).unwrap();
    for needle in [
        "Epoch 0",
        "Epoch 1",
        "Current learning rate: 0.01",
        "train_loss ",
        "val_loss ",
        "Pseudo dice [",
        "Epoch time: ",
        "Yayy! New best EMA pseudo Dice: ",
    ] {
        assert!(log.contains(needle), "missing `{needle}` in\n{log}");
    }
    let final_meta = Checkpoint::load_meta(&s.final_checkpoint).unwrap();
    assert_eq!(final_meta.current_epoch, 2);
    assert_eq!(final_meta.trainer_name, "nnUNetTrainer_tiny");
    assert_eq!(final_meta.inference_allowed_mirroring_axes, vec![0, 1]);
    assert_eq!(final_meta.logging, s.logging.clone());
    let ck = Checkpoint::load(&s.final_checkpoint, &Device::Cpu).unwrap();
    assert!(!ck.optimizer_state.is_empty());
    assert!(ck.network_weights.len() >= ck.optimizer_state.len());

    // --c with a longer schedule continues at epoch 2 and keeps training
    let resumed = TrainRequest {
        continue_training: true,
        ..request(tmp.path(), &pre, 6)
    };
    let r = train(&resumed).unwrap();
    assert_eq!(r.start_epoch, 2);
    assert_eq!(r.train_iterations, 16);
    assert_eq!(r.logging.epochs(), 6);
    assert_eq!(r.logging.train_losses[..2], s.logging.train_losses[..]);
    let first = r.logging.train_losses[0];
    let last = *r.logging.train_losses.last().unwrap();
    eprintln!("train loss per epoch: {:?}", r.logging.train_losses);
    assert!(
        last < first,
        "loss did not fall: {:?}",
        r.logging.train_losses
    );
    assert_eq!(
        Checkpoint::load_meta(&r.final_checkpoint)
            .unwrap()
            .current_epoch,
        6
    );
    let logs: Vec<_> = std::fs::read_dir(&r.fold_folder)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with("training_log_").then_some(n)
        })
        .collect();
    assert!(!logs.is_empty());
    let text = std::fs::read_to_string(&r.log_file).unwrap();
    // both runs may share one log file if they start within the same second
    let after = &text[text.rfind("Resuming from").expect("resume logged")..];
    assert!(
        after.contains("Epoch 2\n") && after.contains("Epoch 5\n"),
        "{after}"
    );
    assert!(!after.contains("Epoch 1\n"), "{after}");
}

#[test]
fn same_seed_same_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    let mut a = request(tmp.path(), &pre, 1);
    a.trainer_name = "A".into();
    let mut b = request(tmp.path(), &pre, 1);
    b.trainer_name = "B".into();
    let la = train(&a).unwrap().logging;
    let lb = train(&b).unwrap().logging;
    assert_eq!(la.train_losses, lb.train_losses);
    assert_eq!(la.val_losses, lb.val_losses);
}

#[test]
fn setup_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    let mut r = request(tmp.path(), &pre, 1);
    r.configuration = "3d_fullres".into();
    let e = train(&r).unwrap_err().to_string();
    assert!(e.contains("3d_fullres"), "{e}");
    let mut r = request(tmp.path(), &pre, 1);
    r.config.network_override = Some("NoSuchNet".into());
    let e = train(&r).unwrap_err().to_string();
    assert!(
        e.contains("NoSuchNet") && e.contains("PlainConvUNet"),
        "{e}"
    );
    let mut r = request(tmp.path(), &pre, 1);
    r.validation_only = true;
    let e = train(&r).unwrap_err().to_string();
    assert!(e.contains("--val") && e.contains("checkpoint_final"), "{e}");
    // nothing was written for failed setups
    assert!(!tmp.path().join("nnUNet_results").exists());
}

/// Regression (issue 19): a second training of a fold that is being trained used to start
/// and overwrite the first one's checkpoints; now it fails at once naming the holder.
#[test]
fn a_fold_being_trained_refuses_a_second_training() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    let r = quick_request(tmp.path(), &pre, 1, "nnUNetTrainer");
    let held = crate::fold_lock::FoldLock::acquire(&r.fold_folder()).unwrap();
    let e = train(&r).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, TrainError::FoldLock(_)), "{msg}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    assert!(!r
        .fold_folder()
        .join("checkpoint_final.safetensors")
        .exists());
    drop(held);
    // temp files a killed run left (its pid no longer runs) are removed by the next run
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = [
        r.fold_folder().join(format!(".debug.json.tmp.{dead}.3")),
        r.fold_folder()
            .join(format!(".checkpoint_best.safetensors.tmp.{dead}.0")),
        r.model_folder().join(format!(".plans.json.tmp.{dead}.1")),
    ];
    for f in &stale {
        std::fs::write(f, b"half").unwrap();
    }
    let s = train(&r).unwrap();
    assert!(s.final_checkpoint.is_file());
    for f in &stale {
        assert!(!f.exists(), "{}", f.display());
    }
    // the lock is gone once training returned
    assert!(!datasets::layout::fold_lock_file(&r.fold_folder()).exists());
}

/// A fast request for the resume / configuration tests: 2 iterations of batch 2 per epoch,
/// no intermediate checkpoints.
fn quick_request(root: &Path, pre: &Path, epochs: usize, name: &str) -> TrainRequest {
    let mut r = request(root, pre, epochs);
    r.trainer_name = name.into();
    r.config.num_iterations_per_epoch = 2;
    r.config.num_val_iterations_per_epoch = 1;
    r.config.save_every = 1000;
    r
}

fn exact_bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn assert_same_tensors(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    let mut ka: Vec<&String> = a.keys().collect();
    let mut kb: Vec<&String> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "{what}: tensor names differ");
    for k in ka {
        assert_eq!(a[k].dims(), b[k].dims(), "{what}: `{k}` shape");
        assert!(
            exact_bits(&a[k]) == exact_bits(&b[k]),
            "{what}: `{k}` differs between the straight and the resumed run"
        );
    }
}

#[test]
fn resume_is_bit_exact_on_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    // 2 epochs straight
    let straight = train(&quick_request(tmp.path(), &pre, 2, "Straight")).unwrap();
    // 1 epoch, then --c with the 2-epoch schedule
    let first = train(&quick_request(tmp.path(), &pre, 1, "Resumed")).unwrap();
    assert_eq!(first.epochs_completed, 1);
    let after_one = Checkpoint::load(&first.final_checkpoint, &Device::Cpu).unwrap();
    let mut again = quick_request(tmp.path(), &pre, 2, "Resumed");
    again.continue_training = true;
    let resumed = train(&again).unwrap();
    assert_eq!(resumed.start_epoch, 1);
    assert_eq!(resumed.train_iterations, 2);

    let a = Checkpoint::load(&straight.final_checkpoint, &Device::Cpu).unwrap();
    let b = Checkpoint::load(&resumed.final_checkpoint, &Device::Cpu).unwrap();
    assert_eq!(a.meta.current_epoch, 2);
    assert_eq!(b.meta.current_epoch, 2);
    assert_same_tensors(&a.network_weights, &b.network_weights, "weights");
    assert_same_tensors(&a.optimizer_state, &b.optimizer_state, "momentum buffers");
    // the same batches were seen: identical per-epoch losses and learning rates
    assert_eq!(a.meta.logging.train_losses, b.meta.logging.train_losses);
    assert_eq!(a.meta.logging.val_losses, b.meta.logging.val_losses);
    assert_eq!(a.meta.logging.lrs, b.meta.logging.lrs);
    // epoch 2 really changed the weights (so the comparison above can fail)
    let name = a.network_weights.keys().next().unwrap();
    let changed = a
        .network_weights
        .keys()
        .any(|k| exact_bits(&a.network_weights[k]) != exact_bits(&after_one.network_weights[k]));
    assert!(
        changed,
        "epoch 2 left every weight (e.g. `{name}`) unchanged"
    );
}

#[test]
fn custom_inherited_configuration_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    let mut p = plans_json();
    p["configurations"]["2d_bs4"] = json!({"inherits_from": "2d", "batch_size": 4});
    plans::io::write_json_atomic(&pre.join("nnUNetPlans.json"), &p).unwrap();
    let mut r = quick_request(tmp.path(), &pre, 1, "nnUNetTrainer_tiny");
    r.configuration = "2d_bs4".into();
    let s = train(&r).unwrap();
    let model = tmp
        .path()
        .join("nnUNet_results")
        .join(DATASET)
        .join("nnUNetTrainer_tiny__nnUNetPlans__2d_bs4");
    assert_eq!(s.fold_folder, model.join("fold_0"));
    assert!(s.final_checkpoint.is_file());
    assert_eq!(s.train_iterations, 2);
    assert!(s.logging.train_losses[0].is_finite());
    let debug: Value =
        serde_json::from_slice(&std::fs::read(s.fold_folder.join("debug.json")).unwrap()).unwrap();
    assert_eq!(debug["configuration"], "2d_bs4");
    assert_eq!(debug["batch_size"], 4);
    assert_eq!(debug["patch_size"], json!([32, 32]));
    // the timing split is reported
    assert!(s.mean_data_wait_s >= 0.0 && s.mean_step_s > 0.0);
    assert!(
        (s.mean_data_wait_s + s.mean_step_s - s.mean_train_iteration_s).abs() < 1e-9,
        "{s:?}"
    );
    let log = std::fs::read_to_string(&s.log_file).unwrap();
    assert!(log.contains("Per training iteration: data wait "), "{log}");
}

#[test]
fn validation_only_redoes_the_final_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    let mut req = quick_request(tmp.path(), &pre, 1, "val_only");
    // --val before any training: a clear error naming the missing checkpoint
    req.validation_only = true;
    let e = train(&req).unwrap_err().to_string();
    assert!(
        e.contains("checkpoint_final") && e.contains("does not exist"),
        "{e}"
    );
    req.validation_only = false;
    let s = train(&req).unwrap();
    let val = s.fold_folder.join("validation");
    let read_all = || {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&val)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    };
    let before = read_all();
    assert!(!before.is_empty());
    std::fs::remove_dir_all(&val).unwrap();
    req.validation_only = true;
    // one writer per fold: --val of a fold being trained fails at once, naming the holder
    let held = crate::fold_lock::FoldLock::acquire(&s.fold_folder).unwrap();
    let e = train(&req).unwrap_err();
    assert!(matches!(e, TrainError::FoldLock(_)), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{e}"
    );
    assert!(!val.exists());
    drop(held);
    let v = train(&req).unwrap();
    assert_eq!(v.train_iterations, 0);
    assert_eq!(v.epochs_completed, 1);
    // same weights, same cases: the same predictions
    assert_eq!(read_all(), before);
}

#[test]
fn class_presence_targets_follow_the_labels_in_the_patch() {
    let labels = LabelInfo {
        all_labels: vec![0, 1, 2],
        regions: None,
        ignore_label: None,
    };
    // sample 0 contains label 2 only, sample 1 contains label 1 only
    let t = Tensor::from_vec(
        vec![0f32, 2., 0., 0., 1., 0., 1., 0.],
        (2, 1, 2, 2),
        &Device::Cpu,
    )
    .unwrap();
    let right = Tensor::from_vec(vec![-20f32, 20., 20., -20.], (2, 2), &Device::Cpu).unwrap();
    let wrong = right.neg().unwrap();
    let l_right = class_presence_loss(&right, &t, &labels, 2)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let l_wrong = class_presence_loss(&wrong, &t, &labels, 2)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(l_right < 1e-6, "{l_right}");
    assert!((l_wrong - 20.0).abs() < 1e-3, "{l_wrong}");
    let e = class_presence_loss(&right, &t, &labels, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 foreground"), "{e}");
}

/// Every architecture preset of the issues trains on the tiny 2D data: the loss of the last
/// epoch is below the first's.
#[test]
fn architecture_presets_train_with_falling_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    let presets = crate::presets::Presets::default();
    for name in [
        "kiunet",
        "kiunet_minimal",
        "kiunet_large",
        "uiunet",
        "uiunet_minimal",
        "runext",
        "convunext_tiny",
        "preact_resunet",
        "growable_unet",
    ] {
        let mut r = request(tmp.path(), &pre, 4);
        r.trainer_name = name.into();
        let base = r.config.clone();
        let p = presets.get(name).unwrap();
        assert!(p.network_override.is_some(), "{name}");
        r.config = TrainerConfig {
            network_override: p.network_override,
            network_kwargs: p.network_kwargs,
            ..base
        };
        r.config.num_iterations_per_epoch = 5;
        r.config.num_val_iterations_per_epoch = 1;
        r.config.save_every = 1000;
        let t0 = std::time::Instant::now();
        let s = train(&r).unwrap_or_else(|e| panic!("{name}: {e}"));
        let l = &s.logging.train_losses;
        eprintln!(
            "{name}: train losses {l:?} ({:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        assert!(l.iter().all(|v| v.is_finite()), "{name}: {l:?}");
        assert!(l[l.len() - 1] < l[0], "{name}: loss did not fall: {l:?}");
    }
}

/// `growable_unet` with `--grow-every 1`: the network grows after each epoch, the log says
/// so, checkpoints record the grown widths, and `--c` rebuilds the grown network.
#[test]
fn growable_unet_grows_during_training_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    let mut r = quick_request(tmp.path(), &pre, 2, "growable_unet");
    let p = crate::presets::Presets::default()
        .get("growable_unet")
        .unwrap();
    r.config.network_override = p.network_override;
    r.config.network_kwargs = p.network_kwargs;
    r.config.growth.every = Some(1);
    r.config.growth.layers = vec!["bottleneck".into(), "up_1".into()];
    r.config.growth.method = crate::growth::GrowthMethodName::Split;
    let s = train(&r).unwrap();
    let log = std::fs::read_to_string(&s.log_file).unwrap();
    assert_eq!(log.matches("Network growth (split)").count(), 2, "{log}");
    let ck = Checkpoint::load(&s.final_checkpoint, &Device::Cpu).unwrap();
    let widths = ck.meta.network.arch_kwargs.get("grown_widths").cloned();
    assert!(widths.is_some(), "{:?}", ck.meta.network.arch_kwargs);
    // resume for one more epoch: the network is rebuilt grown, then grows once more
    let mut r2 = r.clone();
    r2.continue_training = true;
    r2.config.num_epochs = 3;
    let s2 = train(&r2).unwrap();
    assert_eq!(s2.start_epoch, 2);
    let ck2 = Checkpoint::load(&s2.final_checkpoint, &Device::Cpu).unwrap();
    assert_ne!(
        ck2.meta.network.arch_kwargs.get("grown_widths").cloned(),
        widths
    );
    // growth options on a network that cannot grow are an error
    let mut bad = quick_request(tmp.path(), &pre, 1, "plain_grow");
    bad.config.growth.every = Some(1);
    let e = train(&bad).unwrap_err().to_string();
    assert!(e.contains("cannot grow"), "{e}");
}

/// `"amp": "on"` trains in bf16 on the CPU: the log and debug.json name the precision, the
/// losses are finite and the checkpoint's weights are f32.
#[test]
fn bf16_mixed_precision_trains_with_f32_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    let mut r = quick_request(tmp.path(), &pre, 1, "nnUNetTrainer_amp");
    r.config.amp = crate::amp::Amp::On;
    let s = train(&r).unwrap();
    assert!(s.logging.train_losses[0].is_finite());
    let log = std::fs::read_to_string(&s.log_file).unwrap();
    assert!(log.contains("precision: bf16 mixed precision"), "{log}");
    let debug: Value =
        serde_json::from_slice(&std::fs::read(s.fold_folder.join("debug.json")).unwrap()).unwrap();
    assert_eq!(debug["compute_dtype"], "bf16");
    let ck = Checkpoint::load(&s.final_checkpoint, &Device::Cpu).unwrap();
    assert!(ck
        .network_weights
        .values()
        .all(|t| t.dtype() == candle_core::DType::F32));
}

/// `nnUNetTrainerNoDeepSupervision` with a research network: the network has no
/// deep-supervision heads (checkpoints hold none), `--c` resumes it, and a checkpoint written
/// when the heads were always built is a clear error on resume.
#[test]
fn no_deep_supervision_builds_no_heads_and_old_checkpoints_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    let mut r = quick_request(tmp.path(), &pre, 1, "preact_noDS");
    let p = crate::presets::Presets::default()
        .get("preact_resunet")
        .unwrap();
    r.config.network_override = p.network_override;
    r.config.network_kwargs = p.network_kwargs;
    r.config.enable_deep_supervision = false;
    let s = train(&r).unwrap();
    let ck = Checkpoint::load(&s.final_checkpoint, &Device::Cpu).unwrap();
    assert!(!ck.meta.network.enable_deep_supervision);
    assert!(ck
        .network_weights
        .contains_key("decoder.seg_layers.1.weight"));
    assert!(!ck
        .network_weights
        .contains_key("decoder.seg_layers.0.weight"));
    // resume: same network
    let mut again = r.clone();
    again.continue_training = true;
    again.config.num_epochs = 2;
    assert_eq!(train(&again).unwrap().start_epoch, 1);
    // a checkpoint with the low-resolution head of an older nnseg
    let mut old = Checkpoint::load(&s.final_checkpoint, &Device::Cpu).unwrap();
    let w = Tensor::zeros((3, 8, 1, 1), DType::F32, &Device::Cpu).unwrap();
    old.network_weights
        .insert("decoder.seg_layers.0.weight".into(), w);
    old.save(&s.final_checkpoint).unwrap();
    let e = train(&again).unwrap_err();
    assert!(matches!(e, TrainError::UnbuiltHeads { .. }), "{e}");
    assert!(e.to_string().contains("decoder.seg_layers.0.weight"), "{e}");
}

/// A stop requested before training: the run ends after its first iteration with a mid-epoch
/// `checkpoint_latest`, and `--c` ends with the weights, momentum and log of a straight run.
#[test]
fn a_requested_stop_saves_mid_epoch_and_resumes_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = make_dataset(tmp.path());
    let straight = train(&quick_request(tmp.path(), &pre, 2, "Straight")).unwrap();
    assert!(straight.stopped.is_none());

    let first = quick_request(tmp.path(), &pre, 2, "Stopped");
    first.stop.request();
    let s = train(&first).unwrap();
    let stopped = s.stopped.clone().expect("the run reports the stop");
    assert_eq!((stopped.epoch, stopped.iterations_done), (0, 1));
    assert_eq!(s.train_iterations, 1);
    assert_eq!(
        stopped.checkpoint,
        s.fold_folder.join("checkpoint_latest.safetensors")
    );
    assert!(!s.fold_folder.join("checkpoint_final.safetensors").exists());
    let ck = Checkpoint::load(&stopped.checkpoint, &Device::Cpu).unwrap();
    assert_eq!(ck.meta.current_epoch, 0);
    let mid = ck.meta.mid_epoch.expect("mid-epoch state recorded");
    assert_eq!(mid.iterations_done, 1);
    assert_eq!(mid.train_losses.len(), 1);

    let mut again = quick_request(tmp.path(), &pre, 2, "Stopped");
    again.continue_training = true;
    let resumed = train(&again).unwrap();
    assert!(resumed.stopped.is_none());
    assert_eq!(resumed.start_epoch, 0);
    assert_eq!(
        resumed.train_iterations, 3,
        "1 + 3 = 2 epochs x 2 iterations"
    );
    let a = Checkpoint::load(&straight.final_checkpoint, &Device::Cpu).unwrap();
    let b = Checkpoint::load(&resumed.final_checkpoint, &Device::Cpu).unwrap();
    assert!(b.meta.mid_epoch.is_none());
    assert_same_tensors(&a.network_weights, &b.network_weights, "weights");
    assert_same_tensors(&a.optimizer_state, &b.optimizer_state, "momentum buffers");
    assert_eq!(a.meta.logging.train_losses, b.meta.logging.train_losses);
    assert_eq!(a.meta.logging.val_losses, b.meta.logging.val_losses);
    assert!(!resumed
        .fold_folder
        .join("checkpoint_latest.safetensors")
        .exists());
}
