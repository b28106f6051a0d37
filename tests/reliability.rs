//! End-to-end (issue 19, "nothing half-done is ever trusted"): a fold being trained refuses a
//! second training (and a `--val` of it), a corrupted checkpoint is refused by predict and `--c`, and a finished
//! prediction folder carries no incomplete-marker.

mod common;
use common::{json, Env};
use serde_json::json;

#[test]
fn fold_lock_and_checkpoint_checksum_through_the_binary() {
    let env = Env::new();
    env.ok(&["make_demo_dataset"]);
    env.ok(&["plan_and_preprocess", "990", "-np", "2"]);
    // a tiny 3-stage network so training takes seconds
    let plans_path = env.pre.join("Dataset990_Demo3D/nnUNetPlans.json");
    let mut plans = json(&plans_path);
    let full = &mut plans["configurations"]["3d_fullres"];
    let kw = full["architecture"]["arch_kwargs"].as_object_mut().unwrap();
    kw.insert("n_stages".into(), json!(3));
    kw.insert("features_per_stage".into(), json!([4, 8, 16]));
    kw.insert(
        "kernel_sizes".into(),
        json!([[1, 3, 3], [3, 3, 3], [3, 3, 3]]),
    );
    kw.insert("strides".into(), json!([[1, 1, 1], [1, 2, 2], [2, 2, 2]]));
    kw.insert("n_conv_per_stage".into(), json!([1, 1, 1]));
    kw.insert("n_conv_per_stage_decoder".into(), json!([1, 1]));
    full["patch_size"] = json!([16, 32, 32]);
    full["batch_size"] = json!(2);
    std::fs::write(&plans_path, serde_json::to_string_pretty(&plans).unwrap()).unwrap();
    let train = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "990",
            "3d_fullres",
            "0",
            "-tr",
            "nnUNetTrainer_1epoch",
            "--num_iterations_per_epoch",
            "2",
            "--num_val_iterations_per_epoch",
            "1",
        ];
        a.extend(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run_ok = |a: Vec<String>| env.ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let run_fails = |a: Vec<String>| env.fails(&a.iter().map(String::as_str).collect::<Vec<_>>());
    run_ok(train(&[]));
    let fold = env
        .res
        .join("Dataset990_Demo3D/nnUNetTrainer_1epoch__nnUNetPlans__3d_fullres/fold_0");
    let ck = fold.join("checkpoint_final.safetensors");
    assert!(ck.is_file());

    // one writer per fold: a second training of a fold being trained fails at once
    let held = trainer::fold_lock::FoldLock::acquire(&fold).unwrap();
    let e = run_fails(train(&["--c"]));
    assert!(e.contains("already being trained"), "{e}");
    assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    // --val rewrites the fold's validation: it needs the lock too
    let validation = fold.join("validation");
    let before = std::fs::read_dir(&validation).unwrap().count();
    let e = run_fails(train(&["--val"]));
    assert!(e.contains("already being trained"), "{e}");
    assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    assert_eq!(std::fs::read_dir(&validation).unwrap().count(), before);
    drop(held);
    run_ok(train(&["--val"]));

    // predict: a finished folder has no incomplete-marker
    let input = env.res.join("in");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::copy(
        env.raw
            .join("Dataset990_Demo3D/imagesTr/demo3d_000_0000.nii.gz"),
        input.join("demo3d_000_0000.nii.gz"),
    )
    .unwrap();
    let predict = |out: &str| {
        [
            "predict",
            "-i",
            input.to_str().unwrap(),
            "-o",
            out,
            "-d",
            "990",
            "-c",
            "3d_fullres",
            "-f",
            "0",
            "-tr",
            "nnUNetTrainer_1epoch",
            "--disable_tta",
        ]
        .map(String::from)
        .to_vec()
    };
    let out = env.res.join("out");
    run_ok(predict(out.to_str().unwrap()));
    assert!(out.join("demo3d_000.nii.gz").is_file());
    assert!(!out.join("nnseg_prediction_incomplete.txt").exists());

    // 2000 flipped bytes in the weights: predict and --c refuse the checkpoint, naming it
    let mut bytes = std::fs::read(&ck).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 2100..n - 100] {
        *b ^= 0x5a;
    }
    std::fs::write(&ck, &bytes).unwrap();
    let e = run_fails(predict(env.res.join("out2").to_str().unwrap()));
    assert!(
        e.contains("checkpoint_final.safetensors") && e.contains("checksum mismatch"),
        "{e}"
    );
    let e = run_fails(train(&["--c"]));
    assert!(e.contains("checksum mismatch"), "{e}");
}
