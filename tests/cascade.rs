//! End-to-end: nnU-Net's cascade (3d_lowres → 3d_cascade_fullres) on the 3D demo dataset, with
//! hand-added configurations and a tiny network so it runs in seconds.

mod common;
use common::{json, Env};
use serde_json::{json, Value};

/// A 3-stage 3D PlainConvUNet with 4/8/16 features.
fn tiny_architecture(base: &Value) -> Value {
    let mut a = base.clone();
    let kw = a["arch_kwargs"].as_object_mut().unwrap();
    kw.insert("n_stages".into(), json!(3));
    kw.insert("features_per_stage".into(), json!([4, 8, 16]));
    kw.insert(
        "kernel_sizes".into(),
        json!([[1, 3, 3], [3, 3, 3], [3, 3, 3]]),
    );
    kw.insert("strides".into(), json!([[1, 1, 1], [1, 2, 2], [2, 2, 2]]));
    kw.insert("n_conv_per_stage".into(), json!([1, 1, 1]));
    kw.insert("n_conv_per_stage_decoder".into(), json!([1, 1]));
    a
}

#[test]
fn cascade_trains_and_predicts() {
    let env = Env::new();
    env.ok(&["make_demo_dataset"]);
    env.ok(&["plan_and_preprocess", "990", "-np", "2"]);
    let plans_path = env.pre.join("Dataset990_Demo3D/nnUNetPlans.json");
    let mut plans = json(&plans_path);
    let full = plans["configurations"]["3d_fullres"].clone();
    let arch = tiny_architecture(&full["architecture"]);
    let sp: Vec<f64> = serde_json::from_value(full["spacing"].clone()).unwrap();
    let cfgs = plans["configurations"].as_object_mut().unwrap();
    cfgs.insert(
        "3d_lowres".into(),
        json!({
            "inherits_from": "3d_fullres",
            "data_identifier": "nnUNetPlans_3d_lowres",
            "spacing": [sp[0], sp[1] * 2.0, sp[2] * 2.0],
            "patch_size": [16, 32, 32],
            "batch_size": 2,
            "architecture": arch,
            "next_stage": "3d_cascade_fullres"
        }),
    );
    cfgs.insert(
        "3d_cascade_fullres".into(),
        json!({
            "inherits_from": "3d_fullres",
            "patch_size": [16, 32, 32],
            "batch_size": 2,
            "architecture": arch,
            "previous_stage": "3d_lowres"
        }),
    );
    std::fs::write(&plans_path, serde_json::to_string_pretty(&plans).unwrap()).unwrap();
    env.ok(&["preprocess", "990", "-c", "3d_lowres", "-np", "2"]);

    let tiny = [
        "-tr",
        "nnUNetTrainer_1epoch",
        "--num_iterations_per_epoch",
        "2",
        "--num_val_iterations_per_epoch",
        "1",
    ];
    // the cascade cannot start before the lowres stage has written its inputs
    let mut args = vec!["train", "990", "3d_cascade_fullres", "all"];
    args.extend(tiny);
    let e = env.fails(&args);
    assert!(e.contains("predicted_next_stage"), "{e}");

    // lowres, fold all: its final validation covers every case and writes the next stage's
    // inputs in the fullres preprocessed geometry
    let mut args = vec!["train", "990", "3d_lowres", "all"];
    args.extend(tiny);
    env.ok(&args);
    let low = env
        .res
        .join("Dataset990_Demo3D/nnUNetTrainer_1epoch__nnUNetPlans__3d_lowres");
    let next = low.join("predicted_next_stage/3d_cascade_fullres");
    let n_next = std::fs::read_dir(&next).unwrap().count();
    assert_eq!(n_next, 10, "{}", next.display());

    // issue 19: a previous stage whose final validation did not finish (a case missing in
    // predicted_next_stage) is refused before training, naming the case and the fix
    let one = next.join("demo3d_004.npy");
    let saved = std::fs::read(&one).unwrap();
    std::fs::remove_file(&one).unwrap();
    let mut args = vec!["train", "990", "3d_cascade_fullres", "all"];
    args.extend(tiny);
    let e = env.fails(&args);
    assert!(
        e.contains("1 case(s) are missing (demo3d_004)") && e.contains("--val"),
        "{e}"
    );
    std::fs::write(&one, saved).unwrap();

    // cascade, fold all: 1 image channel + 1 one-hot channel per foreground label
    let mut args = vec!["train", "990", "3d_cascade_fullres", "all"];
    args.extend(tiny);
    env.ok(&args);
    let casc = env
        .res
        .join("Dataset990_Demo3D/nnUNetTrainer_1epoch__nnUNetPlans__3d_cascade_fullres");
    let debug = json(&casc.join("fold_all/debug.json"));
    let ds = json(&env.raw.join("Dataset990_Demo3D/dataset.json"));
    let n_fg = ds["labels"].as_object().unwrap().len() - 1;
    assert_eq!(debug["num_input_channels"], json!(1 + n_fg), "{debug}");
    assert!(casc.join("fold_all/validation/summary.json").exists());

    // predict: lowres first, then the cascade with the lowres predictions
    let input = env.res.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let img = env
        .raw
        .join("Dataset990_Demo3D/imagesTr/demo3d_000_0000.nii.gz");
    std::fs::copy(&img, input.join("demo3d_000_0000.nii.gz")).unwrap();
    let (i, lo, co) = (
        input.to_str().unwrap().to_string(),
        env.res.join("out_low").to_str().unwrap().to_string(),
        env.res.join("out_casc").to_str().unwrap().to_string(),
    );
    let pred = |c: &str, o: &str, extra: &[&str]| {
        let mut a = vec![
            "predict",
            "-i",
            i.as_str(),
            "-o",
            o,
            "-d",
            "990",
            "-c",
            c,
            "-f",
            "all",
            "-tr",
            "nnUNetTrainer_1epoch",
            "--disable_tta",
        ];
        a.extend(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        env.nnseg(&refs)
    };
    let out = run(pred("3d_cascade_fullres", &co, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("-prev_stage_predictions"),
        "{err}"
    );
    assert!(run(pred("3d_lowres", &lo, &[])).status.success());
    // issue 19: the previous stage's predictions must come from a finished run
    let marker = datasets::PredictionDir::new(&lo).incomplete_marker();
    std::fs::write(&marker, b"interrupted").unwrap();
    let out = run(pred(
        "3d_cascade_fullres",
        &co,
        &["-prev_stage_predictions", &lo],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nnseg_prediction_incomplete.txt"),
        "{err}"
    );
    std::fs::remove_file(&marker).unwrap();
    let out = run(pred(
        "3d_cascade_fullres",
        &co,
        &["-prev_stage_predictions", &lo],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the cascade's segmentation overlays the input: same shape and geometry
    let (im, ip) = datasets::io::read_images(std::slice::from_ref(&img)).unwrap();
    let (sg, sp) = datasets::io::read_seg(&env.res.join("out_casc/demo3d_000.nii.gz")).unwrap();
    assert_eq!(im.shape()[1..], sg.shape()[1..]);
    assert_eq!(ip.spacing, sp.spacing);
    assert_eq!(ip.origin, sp.origin);
    assert_eq!(ip.direction, sp.direction);
}
