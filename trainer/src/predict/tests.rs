use super::*;
use crate::checkpoint::{CheckpointMeta, NetworkMeta, CHECKPOINT_FORMAT};
use crate::config::TrainerConfig;
use crate::logging::TrainingLog;
use datasets::io::ImageProperties;
use ndarray::{Array3, Array4, ArrayD, Axis};
use serde_json::{json, Value};
use sliding::{mirror_combinations, padding_for, predict_tile_with_tta};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

// ---------------------------------------------------------------- steps / gaussian

#[test]
fn steps_match_nnunet_formula() {
    let st = |i: usize, p: usize, s: f64| {
        compute_steps_for_sliding_window(&[i], &[p], s).unwrap()[0].clone()
    };
    assert_eq!(st(10, 5, 0.5), vec![0, 2, 5]); // actual step 2.5, np.round(2.5) = 2
    assert_eq!(st(5, 5, 0.5), vec![0]);
    assert_eq!(st(64, 32, 0.5), vec![0, 16, 32]);
    assert_eq!(st(100, 40, 0.5), vec![0, 20, 40, 60]);
    assert_eq!(st(9, 4, 0.5), vec![0, 2, 3, 5]); // 5/3 steps
    assert_eq!(st(9, 4, 1.0), vec![0, 2, 5]); // 2.5 rounds to even
    assert_eq!(st(11, 4, 1.0), vec![0, 4, 7]); // n = ceil(7/4)+1 = 3, step 3.5 → 4 (even)
    let multi = compute_steps_for_sliding_window(&[10, 5, 64], &[5, 5, 32], 0.5).unwrap();
    assert_eq!(multi, vec![vec![0, 2, 5], vec![0], vec![0, 16, 32]]);
    assert!(compute_steps_for_sliding_window(&[4], &[5], 0.5).is_err());
    assert!(compute_steps_for_sliding_window(&[10], &[5], 0.0).is_err());
    assert!(compute_steps_for_sliding_window(&[10], &[5], 1.5).is_err());
}

#[test]
fn gaussian_matches_scipy_impulse_response() {
    // patch 8: sigma 1, radius 4, centre 4 → value(d) = 10 * exp(-d²/2)
    let g = compute_gaussian(&[8], 1.0 / 8.0, 10.0);
    for i in 0..8 {
        let d = i as f64 - 4.0;
        let want = 10.0 * (-0.5 * d * d).exp();
        assert!(
            (g[[i]] as f64 - want).abs() < 1e-5,
            "{i}: {} vs {want}",
            g[[i]]
        );
    }
    // 3-D: max 10 at the centre, symmetric around it on odd axes, no zeros
    let g = compute_gaussian(&[5, 7, 8], 1.0 / 8.0, 10.0);
    let max = g.iter().cloned().fold(f32::MIN, f32::max);
    assert!((max - 10.0).abs() < 1e-5);
    assert!((g[[2, 3, 4]] - 10.0).abs() < 1e-5);
    assert!(g.iter().all(|&v| v > 0.0));
    for z in 0..5 {
        for y in 0..7 {
            for x in 0..8 {
                assert!((g[[z, y, x]] - g[[4 - z, 6 - y, x]]).abs() < 1e-6);
            }
        }
    }
    // product structure
    assert!((g[[0, 3, 4]] * g[[2, 0, 4]] / 10.0 - g[[0, 0, 4]]).abs() < 1e-5);
    // truncation: sigma 0.5 → radius 2; farther voxels are 0 and become the min non-zero
    let g = compute_gaussian(&[20], 1.0 / 40.0, 10.0);
    let minnz = 10.0 * (-8.0f64).exp();
    assert!((g[[10 + 2]] as f64 - minnz).abs() < 1e-6);
    assert!((g[[0]] as f64 - minnz).abs() < 1e-6);
    assert!((g[[19]] as f64 - minnz).abs() < 1e-6);
}

#[test]
fn mirror_combinations_and_padding() {
    assert_eq!(
        mirror_combinations(&[0, 1, 2]),
        vec![
            vec![0],
            vec![1],
            vec![2],
            vec![0, 1],
            vec![0, 2],
            vec![1, 2],
            vec![0, 1, 2]
        ]
    );
    assert_eq!(mirror_combinations(&[1]), vec![vec![1]]);
    assert!(mirror_combinations(&[]).is_empty());
    assert_eq!(padding_for([3, 10, 2], [5, 8, 5]), [[1, 1], [0, 0], [1, 2]]);
}

// ---------------------------------------------------------------- sliding window with fake nets

/// A pointwise network: channel k = (k+1) * first input channel. Translation- and
/// flip-equivariant, so the sliding window must reproduce it exactly.
fn pointwise(k: usize, calls: Arc<AtomicUsize>, patch: Vec<usize>) -> impl TileNetwork {
    move |t: ArrayViewD<'_, f32>| -> Result<ArrayD<f32>, PredictError> {
        calls.fetch_add(1, Ordering::Relaxed);
        assert_eq!(&t.shape()[1..], patch.as_slice(), "tile shape");
        let x0 = t.index_axis(Axis(0), 0);
        let views: Vec<_> = (0..k).map(|c| x0.mapv(|v| v * (c + 1) as f32)).collect();
        let vs: Vec<_> = views.iter().map(|v| v.view()).collect();
        Ok(ndarray::stack(Axis(0), &vs).unwrap())
    }
}

fn ramp_data(shape: (usize, usize, usize, usize)) -> Array4<f32> {
    Array4::from_shape_fn(shape, |(c, z, y, x)| {
        (c * 1000 + z * 100 + y * 10 + x) as f32 * 0.01 - 3.0
    })
}

fn opts(patch: &[usize], k: usize, mirror: Option<Vec<usize>>) -> SlidingWindowOptions {
    SlidingWindowOptions {
        patch_size: patch.to_vec(),
        step_size: 0.5,
        mirror_axes: mirror,
        num_classes: k,
        batch_inputs: Some(1),
        accumulation: Accumulation::F32,
        on_device: true,
    }
}

fn assert_close(a: &Array4<f32>, b: &Array4<f32>, tol: f32) {
    assert_eq!(a.shape(), b.shape());
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{i}: {x} vs {y}");
    }
}

fn expected_pointwise(data: &Array4<f32>, k: usize) -> Array4<f32> {
    let (_, z, y, x) = data.dim();
    Array4::from_shape_fn((k, z, y, x), |(c, zz, yy, xx)| {
        data[[0, zz, yy, xx]] * (c + 1) as f32
    })
}

#[test]
fn sliding_window_reproduces_a_pointwise_network() {
    let data = ramp_data((2, 9, 11, 13));
    let calls = Arc::new(AtomicUsize::new(0));
    let net = pointwise(3, calls.clone(), vec![4, 5, 6]);
    let out = sliding_window_logits(&net, data.view(), &opts(&[4, 5, 6], 3, None)).unwrap();
    assert_close(&out, &expected_pointwise(&data, 3), 1e-5);
    // steps: 9/4 → [0,2,3,5] (4), 11/5 → n=ceil(6/2.5)+1=4, 13/6 → n=ceil(7/3)+1=4
    assert_eq!(calls.load(Ordering::Relaxed), 4 * 4 * 4);
}

#[test]
fn image_smaller_than_patch_is_padded_and_cropped_back() {
    let data = ramp_data((1, 3, 4, 2));
    let calls = Arc::new(AtomicUsize::new(0));
    let net = pointwise(2, calls.clone(), vec![5, 5, 5]);
    let out = sliding_window_logits(&net, data.view(), &opts(&[5, 5, 5], 2, None)).unwrap();
    assert_eq!(out.shape(), &[2, 3, 4, 2]);
    assert_close(&out, &expected_pointwise(&data, 2), 1e-5);
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    // mixed: one axis larger than the patch
    let data = ramp_data((1, 12, 3, 6));
    let net = pointwise(2, Arc::new(AtomicUsize::new(0)), vec![5, 5, 5]);
    let out = sliding_window_logits(&net, data.view(), &opts(&[5, 5, 5], 2, None)).unwrap();
    assert_close(&out, &expected_pointwise(&data, 2), 1e-5);
}

#[test]
fn mirroring_tta_with_equivariant_net_changes_nothing_and_runs_all_flips() {
    let data = ramp_data((1, 6, 7, 8));
    let plain_calls = Arc::new(AtomicUsize::new(0));
    let plain = sliding_window_logits(
        &pointwise(2, plain_calls.clone(), vec![4, 4, 4]),
        data.view(),
        &opts(&[4, 4, 4], 2, None),
    )
    .unwrap();
    let tta_calls = Arc::new(AtomicUsize::new(0));
    let tta = sliding_window_logits(
        &pointwise(2, tta_calls.clone(), vec![4, 4, 4]),
        data.view(),
        &opts(&[4, 4, 4], 2, Some(vec![0, 1, 2])),
    )
    .unwrap();
    assert_close(&tta, &plain, 1e-5);
    assert_eq!(
        tta_calls.load(Ordering::Relaxed),
        8 * plain_calls.load(Ordering::Relaxed)
    );
}

#[test]
fn mirroring_tta_flips_outputs_back() {
    // a net that ignores its input and returns the position along patch axis 0: with TTA on
    // axis 0 the flipped-back outputs average to (p-1)/2 everywhere
    let net = |t: ArrayViewD<'_, f32>| -> Result<ArrayD<f32>, PredictError> {
        let mut shape = t.shape().to_vec();
        shape[0] = 1;
        Ok(ArrayD::from_shape_fn(shape, |i| i[1] as f32))
    };
    let tile = ArrayD::<f32>::zeros(vec![1, 4, 3, 3]);
    let no = predict_tile_with_tta(&net, tile.view(), None, 1).unwrap();
    assert_eq!(no[[0, 3, 0, 0]], 3.0);
    let yes = predict_tile_with_tta(&net, tile.view(), Some(&[0]), 1).unwrap();
    assert!(yes.iter().all(|&v| (v - 1.5).abs() < 1e-6));
    // axis 1 only: flipping axis 1 leaves an axis-0 ramp unchanged
    let y1 = predict_tile_with_tta(&net, tile.view(), Some(&[1]), 1).unwrap();
    assert_eq!(y1, no);
    assert!(predict_tile_with_tta(&net, tile.view(), Some(&[3]), 1).is_err());
    // wrong output channels are reported
    let e = predict_tile_with_tta(&net, tile.view(), None, 2).unwrap_err();
    assert!(e.to_string().contains("expected"), "{e}");
}

#[test]
fn two_d_configuration_on_3d_data_goes_slice_by_slice() {
    let data = ramp_data((1, 3, 10, 12));
    let calls = Arc::new(AtomicUsize::new(0));
    let net = pointwise(2, calls.clone(), vec![8, 8]);
    let out =
        sliding_window_logits(&net, data.view(), &opts(&[8, 8], 2, Some(vec![0, 1]))).unwrap();
    assert_close(&out, &expected_pointwise(&data, 2), 1e-5);
    // 3 slices × steps [0,2] × [0,4] × 4 mirror passes
    assert_eq!(calls.load(Ordering::Relaxed), 3 * 2 * 2 * 4);
    // 2-d patch larger than the slice: padded in y/x only
    let data = ramp_data((1, 2, 5, 6));
    let net = pointwise(1, Arc::new(AtomicUsize::new(0)), vec![8, 8]);
    let out = sliding_window_logits(&net, data.view(), &opts(&[8, 8], 1, None)).unwrap();
    assert_close(&out, &expected_pointwise(&data, 1), 1e-5);
}

// ---------------------------------------------------------------- plans / export

fn arch(dims: usize) -> Value {
    let k = vec![3; dims];
    let s2 = vec![2; dims];
    json!({
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 2,
            "features_per_stage": [4, 8],
            "conv_op": format!("torch.nn.modules.conv.Conv{dims}d"),
            "kernel_sizes": [k.clone(), k],
            "strides": [vec![1; dims], s2],
            "n_conv_per_stage": [1, 1],
            "n_conv_per_stage_decoder": [1],
            "conv_bias": true,
            "norm_op": format!("torch.nn.modules.instancenorm.InstanceNorm{dims}d"),
            "norm_op_kwargs": {"eps": 1e-05, "affine": true},
            "dropout_op": null,
            "dropout_op_kwargs": null,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": true}
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]
    })
}

fn configuration(patch: &[usize], spacing: &[f64], norm: &str) -> Value {
    let kw = |is_seg: bool, order: u8| json!({"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": null});
    json!({
        "data_identifier": format!("nnUNetPlans_{}d", patch.len()),
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch,
        "median_image_size_in_voxels": patch.iter().map(|&p| p as f64).collect::<Vec<_>>(),
        "spacing": spacing,
        "normalization_schemes": [norm],
        "use_mask_for_norm": [false],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": kw(false, 3),
        "resampling_fn_seg_kwargs": kw(true, 1),
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": kw(false, 1),
        "architecture": arch(patch.len()),
        "batch_dice": true
    })
}

fn plans_value(transpose_forward: [usize; 3], configs: Vec<(&str, Value)>) -> Value {
    let mut tb = [0usize; 3];
    for (i, &t) in transpose_forward.iter().enumerate() {
        tb[t] = i;
    }
    let mut c = serde_json::Map::new();
    for (n, v) in configs {
        c.insert(n.to_string(), v);
    }
    json!({
        "dataset_name": "Dataset998_Pred",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 1.0, 1.0],
        "original_median_shape_after_transp": [6, 10, 12],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose_forward,
        "transpose_backward": tb,
        "configurations": c,
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 3.0, "mean": 1.0, "median": 1.0, "min": -1.0,
                  "percentile_00_5": -0.5, "percentile_99_5": 2.5, "std": 0.5}
        }
    })
}

fn plans_from(v: &Value) -> Plans {
    Plans::from_value(v, "plans.json").unwrap()
}

fn dataset_json(labels: Value, regions_class_order: Option<Vec<i64>>) -> DatasetJson {
    let mut v = json!({
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 2,
        "file_ending": ".nii.gz"
    });
    if let Some(r) = regions_class_order {
        v["regions_class_order"] = json!(r);
    }
    DatasetJson::from_value(&v, "dataset.json").unwrap()
}

fn three_labels() -> DatasetJson {
    dataset_json(json!({"background": 0, "a": 1, "b": 2}), None)
}

/// A fake network returning a constant one-hot of class `label` (K classes).
fn one_hot_net(label: usize, k: usize) -> Box<dyn TileNetwork> {
    Box::new(
        move |t: ArrayViewD<'_, f32>| -> Result<ArrayD<f32>, PredictError> {
            let mut shape = t.shape().to_vec();
            shape[0] = k;
            Ok(ArrayD::from_shape_fn(shape, |i| {
                if i[0] == label {
                    5.0
                } else {
                    -5.0
                }
            }))
        },
    )
}

#[test]
fn constant_one_hot_network_gives_that_label_with_input_geometry() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let output = tmp.path().join("out");
    std::fs::create_dir_all(&input).unwrap();
    // anisotropic image, resampled to the configuration's spacing and back
    let mut props = ImageProperties::with_spacing([2.0, 0.8, 1.1]);
    props.origin = [3.0, -4.0, 5.5];
    let img = Array3::from_shape_fn((6, 10, 12), |(z, y, x)| (z + y + x) as f32 + 1.0);
    datasets::io::write_image(&input.join("case_0001_0000.nii.gz"), img.view(), &props).unwrap();
    let plans = plans_from(&plans_value(
        [0, 1, 2],
        vec![(
            "3d_fullres",
            configuration(&[4, 8, 8], &[2.0, 1.0, 1.0], "ZScoreNormalization"),
        )],
    ));
    let predictor = Predictor::from_networks(
        plans,
        "3d_fullres",
        three_labels(),
        vec![one_hot_net(2, 3), one_hot_net(2, 3)],
        vec![0, 1, 2],
    )
    .unwrap();
    let cases = find_input_cases(&input, ".nii.gz", 1).unwrap();
    assert_eq!(cases.len(), 1);
    assert_eq!(cases[0].identifier, "case_0001");
    let pre = preprocessing::preprocessor::preprocess_case_files(
        &cases[0].images,
        None,
        &predictor.plans,
        &predictor.configuration,
        &predictor.dataset_json,
    )
    .unwrap();
    assert_ne!(pre.data.shape()[1..], [6, 10, 12]); // really resampled
    std::fs::create_dir_all(&output).unwrap();
    let out = output.join("case_0001.nii.gz");
    predictor
        .predict_and_export(pre.data.view(), &pre.properties, &out, true)
        .unwrap();
    let (seg, sp) = datasets::io::read_seg(&out).unwrap();
    assert_eq!(seg.shape(), &[1, 6, 10, 12]);
    assert!(seg.iter().all(|&v| v == 2));
    for a in 0..3 {
        assert!((sp.spacing[a] - props.spacing[a]).abs() < 1e-5);
        assert!((sp.origin[a] - props.origin[a]).abs() < 1e-4);
    }
    // probabilities: softmax of ±5 one-hot
    let npz = output.join("case_0001.npz");
    let mut r = ndarray_npy::NpzReader::new(std::fs::File::open(&npz).unwrap()).unwrap();
    let p: Array4<f32> = r.by_name("probabilities").unwrap();
    assert_eq!(p.shape(), &[3, 6, 10, 12]);
    let p2 = (10f32).exp() / ((10f32).exp() + 2.0);
    assert!(p
        .index_axis(Axis(0), 2)
        .iter()
        .all(|&v| (v - p2).abs() < 1e-4));
    assert!(output.join("case_0001.json").is_file());
    // no temp files left
    let names: Vec<String> = std::fs::read_dir(&output)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

fn props_for(before: [usize; 3], bbox: [[usize; 2]; 3], spacing: [f64; 3]) -> CaseProperties {
    CaseProperties {
        spacing,
        shape_before_cropping: before,
        bbox_used_for_cropping: bbox,
        shape_after_cropping_and_before_resampling: [
            bbox[0][1] - bbox[0][0],
            bbox[1][1] - bbox[1][0],
            bbox[2][1] - bbox[2][0],
        ],
        class_locations: Default::default(),
        image_properties: ImageProperties::with_spacing(spacing),
    }
}

#[test]
fn export_resamples_uncrops_and_transposes_back() {
    // transpose_forward [2, 0, 1]: reader (z,y,x) = (4, 6, 8) → transposed (8, 4, 6)
    let plans = plans_from(&plans_value(
        [2, 0, 1],
        vec![(
            "3d_fullres",
            configuration(&[4, 4, 4], &[1.0, 1.0, 1.0], "ZScoreNormalization"),
        )],
    ));
    let cfg = plans.configuration("3d_fullres").unwrap();
    // reader spacing (z,y,x) = (1, 1, 0.5) → transposed (0.5, 1, 1); cropped region (4, 2, 3)
    // at 0.5 mm along axis 0 → preprocessed at 1 mm: (2, 2, 3)
    let props = props_for([8, 4, 6], [[2, 6], [1, 3], [3, 6]], [1.0, 1.0, 0.5]);
    // class 1 in the first preprocessed z slice, class 2 in the second
    let logits = Array4::from_shape_fn(
        (3, 2, 2, 3),
        |(c, z, _, _)| {
            if c == z + 1 {
                4.0
            } else {
                -4.0
            }
        },
    );
    let labels = LabelHandling::from_dataset_json(&three_labels()).unwrap();
    let ex = convert_logits_to_segmentation(logits, &props, &plans, &cfg, &labels, true).unwrap();
    let seg = ex.segmentation;
    assert_eq!(seg.shape(), &[4, 6, 8]); // reader order
                                         // back in transposed coordinates: seg_t[a, b, c] = seg[b, c, a]
    let t = seg.view().permuted_axes([2, 0, 1]);
    assert_eq!(t.shape(), &[8, 4, 6]);
    let mut counts = [0usize; 3];
    for ((a, b, c), &v) in t.indexed_iter() {
        let inside = (2..6).contains(&a) && (1..3).contains(&b) && (3..6).contains(&c);
        if !inside {
            assert_eq!(v, 0, "outside bbox at {a},{b},{c}");
        } else {
            assert!(v == 1 || v == 2);
            counts[v as usize] += 1;
            if a == 2 {
                assert_eq!(v, 1);
            }
            if a == 5 {
                assert_eq!(v, 2);
            }
        }
    }
    assert_eq!(counts[1] + counts[2], 4 * 2 * 3);
    assert!(counts[1] > 0 && counts[2] > 0);
    let p = ex.probabilities.unwrap();
    assert_eq!(p.shape(), &[3, 4, 6, 8]);
    // background probability 1 outside the crop; probabilities sum to 1
    assert_eq!(p[[0, 0, 0, 0]], 1.0);
    for s in p.sum_axis(Axis(0)).iter() {
        assert!((s - 1.0).abs() < 1e-5);
    }
}

#[test]
fn regions_use_sigmoid_threshold_and_class_order() {
    let plans = plans_from(&plans_value(
        [0, 1, 2],
        vec![(
            "3d_fullres",
            configuration(&[4, 4, 4], &[1.0, 1.0, 1.0], "ZScoreNormalization"),
        )],
    ));
    let cfg = plans.configuration("3d_fullres").unwrap();
    let ds = dataset_json(
        json!({"background": 0, "whole": [1, 2], "core": 2}),
        Some(vec![1, 2]),
    );
    let labels = LabelHandling::from_dataset_json(&ds).unwrap();
    assert_eq!(labels.num_outputs(), 2);
    let props = props_for([2, 2, 4], [[0, 2], [0, 2], [0, 4]], [1.0, 1.0, 1.0]);
    // region 0 on for x >= 1, region 1 on for x >= 2
    let logits = Array4::from_shape_fn((2, 2, 2, 4), |(c, _, _, x)| if x > c { 3.0 } else { -3.0 });
    let ex = convert_logits_to_segmentation(logits, &props, &plans, &cfg, &labels, false).unwrap();
    for ((_, _, x), &v) in ex.segmentation.indexed_iter() {
        assert_eq!(v, [0, 1, 2, 2][x]);
    }
    let mut no_order = ds.clone();
    no_order.regions_class_order = None;
    assert!(LabelHandling::from_dataset_json(&no_order).is_err());
}

#[test]
fn input_folder_errors_name_the_case_or_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let touch = |n: &str| std::fs::write(d.join(n), b"x").unwrap();
    touch("a_0000.nii.gz");
    touch("a_0001.nii.gz");
    touch("b_0000.nii.gz");
    touch("notes.txt");
    let cases = find_input_cases(d, ".nii.gz", 2);
    let e = cases.unwrap_err().to_string();
    assert!(e.contains("case b") && e.contains("[0]"), "{e}");
    let cases = find_input_cases(d, ".nii.gz", 1).unwrap_err().to_string();
    assert!(cases.contains("case a"), "{cases}");
    touch("b_0001.nii.gz");
    let ok = find_input_cases(d, ".nii.gz", 2).unwrap();
    assert_eq!(ok.len(), 2);
    assert_eq!(ok[0].images[1], d.join("a_0001.nii.gz"));
    touch("weird.nii.gz");
    let e = find_input_cases(d, ".nii.gz", 2).unwrap_err().to_string();
    assert!(e.contains("weird.nii.gz"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    assert!(find_input_cases(empty.path(), ".nii.gz", 1).is_err());
    assert_eq!(
        checkpoint_file_name("checkpoint_final"),
        "checkpoint_final.safetensors"
    );
    assert_eq!(
        checkpoint_file_name("checkpoint_best.pth"),
        "checkpoint_best.safetensors"
    );
    assert_eq!(
        configuration_from_model_folder(Path::new("/r/D/nnUNetTrainer__nnUNetPlans__2d")).unwrap(),
        "2d"
    );
    assert!(configuration_from_model_folder(Path::new("/r/D/fold_0")).is_err());
}

// ---------------------------------------------------------------- real network + checkpoint

fn save_random_checkpoint(fold_folder: &Path, plans: &Plans, seed: u64) {
    let cfg = plans.configuration("2d").unwrap();
    let io = NetworkIo {
        in_channels: 1,
        num_classes: 3,
        deep_supervision: true,
    };
    let registry = Registry::default();
    let (varmap, _net) = registry
        .build_initialized(&cfg.architecture, &io, seed, &Device::Cpu)
        .unwrap();
    let weights: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let ck = Checkpoint {
        meta: CheckpointMeta {
            format: CHECKPOINT_FORMAT.into(),
            trainer_name: "nnUNetTrainer".into(),
            current_epoch: 0,
            logging: TrainingLog::default(),
            best_ema: None,
            init_args: json!({}),
            inference_allowed_mirroring_axes: vec![0, 1],
            trainer_config: TrainerConfig::default(),
            mid_epoch: None,
            network: NetworkMeta {
                network_class_name: cfg.architecture.network_class_name.clone(),
                arch_kwargs: cfg.architecture.arch_kwargs.clone(),
                input_channels: 1,
                num_segmentation_heads: 3,
                enable_deep_supervision: true,
            },
        },
        network_weights: weights,
        optimizer_state: HashMap::new(),
    };
    std::fs::create_dir_all(fold_folder).unwrap();
    ck.save(&fold_folder.join("checkpoint_final.safetensors"))
        .unwrap();
}

#[test]
fn random_network_through_the_real_checkpoint_path() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp
        .path()
        .join("Dataset998_Pred")
        .join("nnUNetTrainer__nnUNetPlans__2d");
    let pv = plans_value(
        [0, 1, 2],
        vec![(
            "2d",
            configuration(&[8, 8], &[1.0, 1.0], "ZScoreNormalization"),
        )],
    );
    std::fs::create_dir_all(&model).unwrap();
    plans::io::write_json_atomic(&model.join("plans.json"), &pv).unwrap();
    three_labels().save(&model.join("dataset.json")).unwrap();
    let plans = plans_from(&pv);
    save_random_checkpoint(&model.join("fold_0"), &plans, 1);
    save_random_checkpoint(&model.join("fold_1"), &plans, 2);

    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let props = ImageProperties::with_spacing([2.0, 1.0, 1.0]);
    for (i, shape) in [(0, (3, 10, 12)), (1, (2, 6, 7))] {
        let img = Array3::from_shape_fn(shape, |(z, y, x)| ((z * 7 + y * 3 + x) % 5) as f32);
        datasets::io::write_image(&input.join(format!("c{i}_0000.nii.gz")), img.view(), &props)
            .unwrap();
    }
    let out = tmp.path().join("out");
    let mut req = PredictRequest::new(
        &input,
        &out,
        &model,
        vec![Fold::Index(0), Fold::Index(1)],
        Device::Cpu,
    );
    req.save_probabilities = true;
    req.num_workers = 1;
    let t0 = std::time::Instant::now();
    let rep = predict_from_raw_folder(&req).unwrap();
    eprintln!(
        "2 folds, 2 cases, TTA: {:.2} s ({:?} s per case)",
        t0.elapsed().as_secs_f64(),
        rep.seconds_per_case
    );
    assert_eq!(
        rep.outputs,
        vec![out.join("c0.nii.gz"), out.join("c1.nii.gz")]
    );
    for (f, shape) in rep.outputs.iter().zip([[1, 3, 10, 12], [1, 2, 6, 7]]) {
        let (seg, _) = datasets::io::read_seg(f).unwrap();
        assert_eq!(seg.shape(), &shape);
        assert!(seg.iter().all(|&v| (0..3).contains(&v)));
    }
    for f in [
        "dataset.json",
        "plans.json",
        "predict_from_raw_data_args.json",
        "c0.npz",
        "c0.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }

    // fold ensembling = mean of the folds' logits
    let p0 = Predictor::from_model_folder(
        &model,
        &[Fold::Index(0)],
        "checkpoint_final",
        &Device::Cpu,
        Amp::Off,
        &Registry::default(),
    )
    .unwrap();
    let p1 = Predictor::from_model_folder(
        &model,
        &[Fold::Index(1)],
        "checkpoint_final.pth",
        &Device::Cpu,
        Amp::Off,
        &Registry::default(),
    )
    .unwrap();
    let both = Predictor::from_model_folder(
        &model,
        &[Fold::Index(0), Fold::Index(1)],
        "checkpoint_final",
        &Device::Cpu,
        Amp::Off,
        &Registry::default(),
    )
    .unwrap();
    assert_eq!(both.num_networks(), 2);
    assert_eq!(both.mirror_axes, vec![0, 1]);
    let data = ramp_data((1, 2, 9, 10));
    let l0 = p0.predict_logits(data.view()).unwrap();
    let l1 = p1.predict_logits(data.view()).unwrap();
    let lb = both.predict_logits(data.view()).unwrap();
    // in the folds' precision (f16 by default, as nnU-Net's `torch.half` logits)
    let r = both.accumulation.rounding();
    let mean = (&l0 + &l1).mapv(|v| r(r(v) / 2.0));
    assert_close(&lb, &mean, 1e-6);
    // bf16 inference (`--amp on`): logits within bf16 rounding of the f32 ones
    let p0_bf16 = Predictor::from_model_folder(
        &model,
        &[Fold::Index(0)],
        "checkpoint_final",
        &Device::Cpu,
        Amp::On,
        &Registry::default(),
    )
    .unwrap();
    let l0_bf16 = p0_bf16.predict_logits(data.view()).unwrap();
    let rel = (&l0_bf16 - &l0).mapv(|v| v * v).sum().sqrt() / l0.mapv(|v| v * v).sum().sqrt();
    assert!(
        rel > 0.0 && rel < 2e-2,
        "bf16 vs f32 logits: relative error {rel}"
    );
    assert!(
        (&l0 - &l1).iter().any(|v| v.abs() > 1e-4),
        "the folds differ"
    );

    // missing fold / bad channel count name the file or case
    let e = Predictor::from_model_folder(
        &model,
        &[Fold::Index(3)],
        "checkpoint_final",
        &Device::Cpu,
        Amp::Off,
        &Registry::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("fold_3"), "{e}");
    std::fs::write(input.join("c2_0000.nii.gz"), b"not an image").unwrap();
    let e = predict_from_raw_folder(&req).unwrap_err().to_string();
    assert!(e.contains("case c2"), "{e}");
}

/// Regression (issue 19): a run that failed in the middle of a case left that case's
/// segmentation without its probabilities, and nothing told the folder from a finished one.
#[test]
fn a_failed_prediction_leaves_no_half_case_and_a_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("D").join("nnUNetTrainer__nnUNetPlans__2d");
    let pv = plans_value(
        [0, 1, 2],
        vec![(
            "2d",
            configuration(&[8, 8], &[1.0, 1.0], "ZScoreNormalization"),
        )],
    );
    std::fs::create_dir_all(&model).unwrap();
    plans::io::write_json_atomic(&model.join("plans.json"), &pv).unwrap();
    three_labels().save(&model.join("dataset.json")).unwrap();
    save_random_checkpoint(&model.join("fold_0"), &plans_from(&pv), 1);
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let props = ImageProperties::with_spacing([1.0, 1.0, 1.0]);
    for i in 0..2 {
        let img = Array3::from_shape_fn((1, 6, 7), |(_, y, x)| ((y * 3 + x) % 5) as f32);
        datasets::io::write_image(&input.join(format!("c{i}_0000.nii.gz")), img.view(), &props)
            .unwrap();
    }
    let out = tmp.path().join("out");
    let mut req = PredictRequest::new(&input, &out, &model, vec![Fold::Index(0)], Device::Cpu);
    req.save_probabilities = true;
    req.num_workers = 1;
    // the probabilities of c1 cannot be written (a folder is in the way)
    std::fs::create_dir_all(out.join("c1.npz").join("x")).unwrap();
    let e = predict_from_raw_folder(&req).unwrap_err().to_string();
    assert!(e.contains("case c1"), "{e}");
    assert!(out.join("c0.nii.gz").is_file() && out.join("c0.npz").is_file());
    assert!(
        !out.join("c1.nii.gz").exists(),
        "a segmentation without its probabilities"
    );
    let dir = PredictionDir::new(&out);
    assert!(dir.incomplete_marker().is_file());
    let opts = crate::evaluation::ensemble::EnsembleOptions::from_dataset_json(&three_labels(), 1);
    let e = crate::evaluation::ensemble::ensemble_folders(
        std::slice::from_ref(&out),
        &tmp.path().join("ens"),
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("did not finish"), "{e}");

    // a rerun cleans the stale temp files of the failed run and finishes the folder
    std::fs::remove_dir_all(out.join("c1.npz")).unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = out.join(format!(".nnseg-tmp-{dead}-3.nii.gz"));
    std::fs::write(&stale, b"half").unwrap();
    predict_from_raw_folder(&req).unwrap();
    assert!(!stale.exists());
    assert!(!dir.incomplete_marker().exists());
    for f in ["c1.nii.gz", "c1.npz", "c1.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

// ---------------------------------------------------------------- final validation in train()

#[test]
fn training_ends_with_final_validation_and_summary() {
    use crate::train::{train, TrainRequest};
    use preprocessing::storage::save_case;
    let tmp = tempfile::tempdir().unwrap();
    let pre = tmp.path().join("pre").join("Dataset998_Pred");
    let data_dir = pre.join("nnUNetPlans_2d");
    let gt = pre.join("gt_segmentations");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::create_dir_all(&gt).unwrap();
    let pv = plans_value(
        [0, 1, 2],
        vec![(
            "2d",
            configuration(&[8, 8], &[1.0, 1.0], "ZScoreNormalization"),
        )],
    );
    plans::io::write_json_atomic(&pre.join("nnUNetPlans.json"), &pv).unwrap();
    three_labels().save(&pre.join("dataset.json")).unwrap();
    for case in 0..3 {
        let name = format!("case_{case}");
        let data = Array4::from_shape_fn((1, 2, 10, 12), |(_, z, y, x)| {
            ((z + y * 3 + x * 5 + case) % 7) as f32 - 3.0
        });
        let seg = Array4::from_shape_fn((1, 2, 10, 12), |(_, _, y, x)| {
            (y > 4) as i16 + (x > 6) as i16
        });
        let mut props = props_for([2, 10, 12], [[0, 2], [0, 10], [0, 12]], [2.0, 1.0, 1.0]);
        props.class_locations.insert("1".into(), vec![[0, 0, 5, 0]]);
        props.class_locations.insert("2".into(), vec![[0, 0, 5, 7]]);
        save_case(&data_dir, &name, data.view(), Some(seg.view()), &props).unwrap();
        datasets::io::write_seg(
            &gt.join(format!("{name}.nii.gz")),
            seg.index_axis(Axis(0), 0),
            &props.image_properties,
        )
        .unwrap();
    }
    let config = TrainerConfig {
        num_epochs: 1,
        num_iterations_per_epoch: 1,
        num_val_iterations_per_epoch: 1,
        num_workers: Some(1),
        batch_size: Some(2),
        ..Default::default()
    };
    let mut req = TrainRequest::new(
        &pre,
        tmp.path().join("results"),
        "Dataset998_Pred",
        "2d",
        Fold::All,
        "nnUNetTrainer",
        config,
        Device::Cpu,
    );
    req.echo_log = false;
    req.export_npz = true;
    let s = train(&req).unwrap();
    let val = s.fold_folder.join("validation");
    for f in [
        "case_0.nii.gz",
        "case_1.nii.gz",
        "case_2.nii.gz",
        "case_0.npz",
        "case_0.json",
        "summary.json",
    ] {
        assert!(val.join(f).is_file(), "{f}");
    }
    let v = crate::evaluation::json::read_json_with_nan(&val.join("summary.json")).unwrap();
    assert_eq!(v["metric_per_case"].as_array().unwrap().len(), 3);
    assert!(v["mean"].get("1").is_some() && v["mean"].get("2").is_some());
    let (seg, _) = datasets::io::read_seg(&val.join("case_1.nii.gz")).unwrap();
    assert_eq!(seg.shape(), &[1, 2, 10, 12]);
    let (p, props) =
        crate::evaluation::ensemble::load_probabilities(&val.join("case_0.npz")).unwrap();
    assert_eq!(p.shape(), &[3, 2, 10, 12]);
    assert!(props.get("image_properties").is_some());
    let log = std::fs::read_to_string(&s.log_file).unwrap();
    assert!(log.contains("Mean Validation Dice:"), "{log}");
    assert!(!PredictionDir::new(&val).incomplete_marker().exists());

    // Regression (issue 19): the folder was marked finished before its evaluation, so a run
    // killed (or failing) there left a validation folder without summary.json that looked
    // complete. An evaluation that fails (here: a ground truth of another shape) now leaves
    // the folder marked unfinished.
    datasets::io::write_seg(
        &gt.join("case_1.nii.gz"),
        Array3::<i16>::zeros((2, 3, 3)).view(),
        &props_for([2, 3, 3], [[0, 2], [0, 3], [0, 3]], [2.0, 1.0, 1.0]).image_properties,
    )
    .unwrap();
    req.validation_only = true;
    let e = train(&req).unwrap_err().to_string();
    assert!(e.contains("shape"), "{e}");
    assert!(PredictionDir::new(&val).incomplete_marker().is_file());
}

/// Timing of a realistic-ish 3-D sliding window on the CPU (run with `--ignored --nocapture`).
#[test]
#[ignore = "benchmark: slow, run with --release -- --ignored --nocapture"]
fn bench_sliding_window_3d_random_net() {
    let cfg_v = configuration(&[32, 32, 32], &[1.0, 1.0, 1.0], "ZScoreNormalization");
    let pv = plans_value([0, 1, 2], vec![("3d_fullres", cfg_v)]);
    let plans = plans_from(&pv);
    let cfg = plans.configuration("3d_fullres").unwrap();
    let io = NetworkIo {
        in_channels: 1,
        num_classes: 3,
        deep_supervision: false,
    };
    let (varmap, _) = Registry::default()
        .build_initialized(&cfg.architecture, &io, 1, &Device::Cpu)
        .unwrap();
    let weights: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let network = Registry::default()
        .build(&cfg.architecture, &io, vb)
        .unwrap();
    let net = CandleTileNetwork {
        network,
        device: Device::Cpu,
        input_channels: 1,
        compute_dtype: DType::F32,
    };
    let data = ramp_data((1, 64, 64, 64));
    for mirror in [None, Some(vec![0, 1, 2])] {
        let t0 = std::time::Instant::now();
        let out = sliding_window_logits(&net, data.view(), &opts(&[32, 32, 32], 3, mirror.clone()))
            .unwrap();
        eprintln!(
            "64^3 image, 32^3 patch, 27 tiles, mirror {:?}: {:.2} s, out {:?}",
            mirror,
            t0.elapsed().as_secs_f64(),
            out.shape()
        );
    }
}

// ---------------------------------------------------------------- batching

/// A network that is neither translation- nor flip-equivariant (a ramp along every patch axis
/// plus a non-linear function of the input), counting its forward passes and inputs.
struct Asymmetric {
    k: usize,
    passes: AtomicUsize,
    inputs: AtomicUsize,
}

impl TileNetwork for Asymmetric {
    fn predict_tile(&self, t: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>, PredictError> {
        let mut shape = t.shape().to_vec();
        shape[0] = self.k;
        let x0 = t.index_axis(Axis(0), 0);
        Ok(ArrayD::from_shape_fn(shape, |i| {
            use ndarray::Dimension;
            let i = i.slice();
            let pos: usize = (1..i.len()).map(|a| i[a] * (a + 1)).sum();
            let v = x0[&i[1..]];
            (i[0] as f32 + 1.0) * (v * 0.7).sin() + pos as f32 * 0.013 * (i[0] as f32 - 0.5)
        }))
    }

    fn predict_batch(&self, tiles: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>, PredictError> {
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.inputs.fetch_add(tiles.shape()[0], Ordering::Relaxed);
        let outs = tiles
            .outer_iter()
            .map(|t| self.predict_tile(t))
            .collect::<Result<Vec<_>, _>>()?;
        let views: Vec<_> = outs.iter().map(|o| o.view()).collect();
        Ok(ndarray::stack(Axis(0), &views).unwrap())
    }
}

fn asymmetric(k: usize) -> Asymmetric {
    Asymmetric {
        k,
        passes: AtomicUsize::new(0),
        inputs: AtomicUsize::new(0),
    }
}

#[test]
fn batched_sliding_window_equals_tile_by_tile_bit_for_bit() {
    for (patch, shape, mirror) in [
        (vec![4, 5, 6], (2, 9, 11, 13), Some(vec![0, 1, 2])),
        (vec![4, 5, 6], (1, 3, 12, 4), Some(vec![1])),
        (vec![8, 8], (1, 3, 10, 12), Some(vec![0, 1])),
        (vec![8, 8], (1, 2, 5, 20), None),
    ] {
        let data = ramp_data(shape);
        let mut o = opts(&patch, 3, mirror.clone());
        let one = asymmetric(3);
        o.batch_inputs = Some(1);
        let reference = sliding_window_logits(&one, data.view(), &o).unwrap();
        let tiles = sliding::tile_count([shape.1, shape.2, shape.3], &o).unwrap();
        let views = mirror_combinations(mirror.as_deref().unwrap_or(&[])).len() + 1;
        // one input per pass at the smallest batch
        assert_eq!(one.passes.load(Ordering::Relaxed), tiles * views);
        assert_eq!(one.inputs.load(Ordering::Relaxed), tiles * views);
        for batch in [Some(2), Some(8), Some(24), Some(1000), None] {
            o.batch_inputs = batch;
            let net = asymmetric(3);
            let out = sliding_window_logits(&net, data.view(), &o).unwrap();
            assert_eq!(out, reference, "patch {patch:?} batch {batch:?}");
            // every tile with all its views once, at most `cap` inputs per pass
            assert_eq!(net.inputs.load(Ordering::Relaxed), tiles * views);
            let per = sliding::tiles_per_batch(&o);
            let cap = batch.unwrap_or_else(|| auto_batch_inputs(&patch));
            let passes: usize = (0..tiles)
                .step_by(per)
                .map(|t0| ((tiles - t0).min(per) * views).div_ceil(cap))
                .sum();
            assert_eq!(net.passes.load(Ordering::Relaxed), passes);
        }
    }
}

#[test]
fn tile_by_tile_matches_the_tta_of_single_tiles() {
    // one tile covering the image: the sliding window is predict_tile_with_tta of that tile
    let data = ramp_data((1, 4, 5, 6));
    let net = asymmetric(2);
    let mut o = opts(&[4, 5, 6], 2, Some(vec![0, 2]));
    o.batch_inputs = Some(3);
    let out = sliding_window_logits(&net, data.view(), &o).unwrap();
    let tile = data.view().into_dyn();
    let want = predict_tile_with_tta(&net, tile, Some(&[0, 2]), 2).unwrap();
    assert_close(&out, &want.into_dimensionality().unwrap(), 1e-6);
}

#[test]
fn many_small_images_share_forward_passes_and_equal_one_by_one() {
    let shapes = [
        (1, 3, 4, 2),
        (1, 4, 5, 6),
        (1, 2, 2, 2),
        (1, 4, 3, 6),
        (1, 9, 5, 6),
    ];
    let data: Vec<Array4<f32>> = shapes.iter().map(|&s| ramp_data(s)).collect();
    let mut o = opts(&[4, 5, 6], 2, Some(vec![0, 1]));
    o.batch_inputs = Some(16); // 4 views → 4 tiles per pass
    let single: Vec<Array4<f32>> = data
        .iter()
        .map(|d| sliding_window_logits(&asymmetric(2), d.view(), &o).unwrap())
        .collect();
    let net = asymmetric(2);
    let views: Vec<_> = data.iter().map(|d| d.view()).collect();
    let many = sliding_window_logits_many(&net, &views, &o).unwrap();
    assert_eq!(many, single);
    // 4 one-tile images + one of 4 tiles (z 9 → steps [0, 2, 3, 5]) = 8 tiles → 2 passes
    assert_eq!(net.passes.load(Ordering::Relaxed), 2);
    // images of different channel counts cannot share
    let other = ramp_data((2, 3, 3, 3));
    let e = sliding_window_logits_many(&net, &[data[0].view(), other.view()], &o).unwrap_err();
    assert!(e.to_string().contains("channels"), "{e}");
}

#[test]
fn f16_accumulation_rounds_like_nnunet() {
    let data = ramp_data((1, 9, 11, 13));
    let mut o = opts(&[4, 5, 6], 2, Some(vec![0]));
    let f32_out = sliding_window_logits(&asymmetric(2), data.view(), &o).unwrap();
    o.accumulation = Accumulation::NnunetF16;
    o.batch_inputs = Some(6);
    let f16_out = sliding_window_logits(&asymmetric(2), data.view(), &o).unwrap();
    // every value is an f16 and close to the f32 sums
    for (a, b) in f16_out.iter().zip(f32_out.iter()) {
        assert_eq!(half::f16::from_f32(*a).to_f32(), *a);
        assert!((a - b).abs() <= 0.05 * (1.0 + b.abs()), "{a} vs {b}");
    }
    assert_ne!(f16_out, f32_out);
    assert_eq!(
        "f16".parse::<Accumulation>().unwrap(),
        Accumulation::NnunetF16
    );
    assert_eq!("F32".parse::<Accumulation>().unwrap(), Accumulation::F32);
    assert!("f8".parse::<Accumulation>().is_err());
}

#[test]
fn auto_batch_follows_the_patch_size() {
    assert_eq!(auto_batch_inputs(&[256, 256]), 4);
    assert_eq!(auto_batch_inputs(&[128, 128, 128]), 1);
    assert_eq!(auto_batch_inputs(&[8, 32, 32]), 32);
    assert_eq!(auto_batch_inputs(&[32, 24]), 64);
    let mut o = opts(&[128, 128], 2, Some(vec![0, 1]));
    o.batch_inputs = None;
    assert_eq!(sliding::tiles_per_batch(&o), 4);
    o.batch_inputs = Some(3); // fewer inputs than views: still one tile per pass
    assert_eq!(sliding::tiles_per_batch(&o), 1);
}

/// A randomly initialised network of the test plans' architecture (`patch` 2 or 3 entries),
/// 1 input channel, 2 classes, on the CPU.
fn random_candle_net(patch: &[usize]) -> CandleTileNetwork {
    let spacing = vec![1.0; patch.len()];
    let name = if patch.len() == 2 { "2d" } else { "3d_fullres" };
    let cfg_v = configuration(patch, &spacing, "ZScoreNormalization");
    let pv = plans_value([0, 1, 2], vec![(name, cfg_v)]);
    let plans = plans_from(&pv);
    let cfg = plans.configuration(name).unwrap();
    let io = NetworkIo {
        in_channels: 1,
        num_classes: 2,
        deep_supervision: false,
    };
    let (varmap, _) = Registry::default()
        .build_initialized(&cfg.architecture, &io, 3, &Device::Cpu)
        .unwrap();
    let weights: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    CandleTileNetwork {
        network: Registry::default()
            .build(&cfg.architecture, &io, vb)
            .unwrap(),
        device: Device::Cpu,
        input_channels: 1,
        compute_dtype: DType::F32,
    }
}

#[test]
fn candle_network_batched_equals_one_tile_per_pass() {
    let net = random_candle_net(&[8, 16, 16]);
    let data = ramp_data((1, 10, 20, 18));
    let mut o = opts(&[8, 16, 16], 2, Some(vec![1, 2]));
    let one = sliding_window_logits(&net, data.view(), &o).unwrap();
    o.batch_inputs = Some(12);
    let batched = sliding_window_logits(&net, data.view(), &o).unwrap();
    assert_close(&batched, &one, 1e-5);
}

#[test]
fn sums_on_the_device_equal_host_sums() {
    // the device path runs with any candle device; on the CPU it is tested against the host
    // path (CUDA networks take it in `predict`, CPU networks never do)
    for (patch, mirror) in [
        (vec![8, 16, 16], Some(vec![0, 1, 2])),
        (vec![16, 16], Some(vec![0, 1])),
    ] {
        let net = random_candle_net(&patch);
        assert!(net.on_device().is_none(), "CPU networks keep host sums");
        let big = ramp_data((1, 10, 20, 18));
        let small = ramp_data((1, 5, 9, 12)).mapv(|v| -v); // padded to the patch
        let data = [big.view(), small.view()];
        for (acc, tol) in [(Accumulation::F32, 1e-5), (Accumulation::NnunetF16, 2e-3)] {
            let mut o = opts(&patch, 2, mirror.clone());
            o.accumulation = acc;
            o.batch_inputs = Some(6);
            let host = sliding::sliding_window_logits_many(&net, &data, &o).unwrap();
            let dev = on_device::sliding_window_logits_on_device(&net, &data, &o).unwrap();
            for (h, d) in host.iter().zip(&dev) {
                assert_close(d, h, tol);
            }
        }
    }
}

#[test]
fn pipeline_stops_at_an_unreadable_case_after_exporting_the_ones_before() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("D").join("nnUNetTrainer__nnUNetPlans__2d");
    let pv = plans_value(
        [0, 1, 2],
        vec![(
            "2d",
            configuration(&[8, 8], &[1.0, 1.0], "ZScoreNormalization"),
        )],
    );
    std::fs::create_dir_all(&model).unwrap();
    plans::io::write_json_atomic(&model.join("plans.json"), &pv).unwrap();
    three_labels().save(&model.join("dataset.json")).unwrap();
    save_random_checkpoint(&model.join("fold_0"), &plans_from(&pv), 1);
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let props = ImageProperties::with_spacing([1.0, 1.0, 1.0]);
    for i in [0, 1, 3] {
        let img = Array3::from_shape_fn((1, 6, 7), |(_, y, x)| ((y * 3 + x + i) % 5) as f32);
        datasets::io::write_image(&input.join(format!("c{i}_0000.nii.gz")), img.view(), &props)
            .unwrap();
    }
    std::fs::write(input.join("c2_0000.nii.gz"), b"not a nifti").unwrap();
    let out = tmp.path().join("out");
    let mut req = PredictRequest::new(&input, &out, &model, vec![Fold::Index(0)], Device::Cpu);
    req.num_workers = 1;
    req.num_export_workers = 1;
    req.batch_inputs = Some(1); // one case per forward pass
    let e = predict_from_raw_folder(&req).unwrap_err().to_string();
    assert!(e.contains("case c2"), "{e}");
    assert!(out.join("c0.nii.gz").is_file() && out.join("c1.nii.gz").is_file());
    assert!(PredictionDir::new(&out).incomplete_marker().is_file());
    // without the broken case: all written, the same with larger queues and shared passes
    std::fs::remove_file(input.join("c2_0000.nii.gz")).unwrap();
    let report = predict_from_raw_folder(&req).unwrap();
    assert_eq!(report.outputs.len(), 3);
    let first: Vec<_> = ["c0", "c1", "c3"]
        .iter()
        .map(|c| {
            datasets::io::read_seg(&out.join(format!("{c}.nii.gz")))
                .unwrap()
                .0
        })
        .collect();
    let out2 = tmp.path().join("out2");
    let mut req2 = PredictRequest::new(&input, &out2, &model, vec![Fold::Index(0)], Device::Cpu);
    req2.num_workers = 3;
    req2.num_export_workers = 3;
    predict_from_raw_folder(&req2).unwrap();
    for (c, want) in ["c0", "c1", "c3"].iter().zip(&first) {
        let got = datasets::io::read_seg(&out2.join(format!("{c}.nii.gz")))
            .unwrap()
            .0;
        assert_eq!(&got, want, "{c}");
    }
}

#[test]
fn parts_take_every_nth_case_and_bad_parts_are_refused() {
    use super::Part;
    let cases: Vec<usize> = (0..7).collect();
    assert_eq!(Part::new(0, 3).unwrap().select(cases.clone()), [0, 3, 6]);
    assert_eq!(Part::new(2, 3).unwrap().select(cases.clone()), [2, 5]);
    assert_eq!(Part::WHOLE.select(cases.clone()), cases);
    let mut union: Vec<usize> = (0..3)
        .flat_map(|k| Part::new(k, 3).unwrap().select(cases.clone()))
        .collect();
    union.sort();
    assert_eq!(union, cases);
    for (id, count) in [(3, 3), (0, 0), (5, 2)] {
        let e = Part::new(id, count).unwrap_err();
        assert!(e.to_string().contains("part_id"), "{e}");
    }
}

#[test]
fn f16_fold_mean_is_summed_and_divided_in_f16_like_nnunet() {
    let plans = plans_from(&plans_value(
        [0, 1, 2],
        vec![(
            "3d_fullres",
            configuration(&[4, 8, 8], &[2.0, 1.0, 1.0], "ZScoreNormalization"),
        )],
    ));
    let scale = |f: f32| -> Box<dyn TileNetwork> {
        Box::new(move |t: ArrayViewD<'_, f32>| {
            let x = t.index_axis(Axis(0), 0).to_owned();
            let outs: Vec<_> = (0..3)
                .map(|c| x.mapv(|v| v * f + c as f32 * 0.37))
                .collect();
            let views: Vec<_> = outs.iter().map(|o| o.view()).collect();
            Ok(ndarray::stack(Axis(0), &views).unwrap())
        })
    };
    let (a, b) = (1.000_37_f32, -0.613_f32);
    let mut predictor = Predictor::from_networks(
        plans,
        "3d_fullres",
        three_labels(),
        vec![scale(a), scale(b)],
        vec![0, 1, 2],
    )
    .unwrap();
    let data = ramp_data((1, 6, 11, 9));
    for acc in [Accumulation::NnunetF16, Accumulation::F32] {
        predictor.accumulation = acc;
        let o = predictor.sliding_window_options();
        let la = sliding_window_logits(&*scale(a), data.view(), &o).unwrap();
        let lb = sliding_window_logits(&*scale(b), data.view(), &o).unwrap();
        let r = acc.rounding();
        let want = Array4::from_shape_fn(la.raw_dim(), |i| r(r(la[i] + lb[i]) / 2.0));
        assert_eq!(
            predictor.predict_logits(data.view()).unwrap(),
            want,
            "{acc:?}"
        );
    }
}
