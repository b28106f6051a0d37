//! End-to-end: an architecture preset that does not fit the memory budget gets a fitted
//! configuration `CONFIG__PRESET` written into the plans, trains, and predicts.

mod common;
use common::{json, Env};

#[test]
fn preset_is_fitted_to_the_memory_budget_then_trains_and_predicts() {
    let env = Env::new();
    env.ok(&["make_demo_dataset"]);
    env.ok(&["plan_and_preprocess", "991", "-np", "2"]);
    // at the default 8 GB the pre-activation U-Net fits the 2d plan as it is
    let out = env.nnseg(&["show_network", "991", "2d", "-tr", "preact_resunet"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fits `2d`"), "{text}");
    assert!(text.contains("PreActResUNet"), "{text}");
    // a 50 MB budget does not: train writes and uses 2d__preact_resunet
    let out = env.nnseg(&[
        "train",
        "991",
        "2d",
        "0",
        "-tr",
        "preact_resunet",
        "-gpu_memory_target",
        "0.05",
        "--num_epochs",
        "1",
        "--num_iterations_per_epoch",
        "2",
        "--num_val_iterations_per_epoch",
        "1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("does not fit") && text.contains("2d__preact_resunet"),
        "{text}"
    );
    let plans = json(&env.pre.join("Dataset991_Demo2D/nnUNetPlans.json"));
    let fitted = &plans["configurations"]["2d__preact_resunet"];
    assert_eq!(fitted["inherits_from"], "2d");
    let p: Vec<usize> = serde_json::from_value(fitted["patch_size"].clone()).unwrap();
    let orig: Vec<usize> =
        serde_json::from_value(plans["configurations"]["2d"]["patch_size"].clone()).unwrap();
    assert!(p.iter().product::<usize>() < orig.iter().product::<usize>());
    let model = env
        .res
        .join("Dataset991_Demo2D/preact_resunet__nnUNetPlans__2d__preact_resunet");
    assert!(model.join("fold_0/checkpoint_final.safetensors").exists());
    assert!(model.join("fold_0/validation/summary.json").exists());
    // the fitted configuration predicts like any other
    let input = env.raw.join("Dataset991_Demo2D/imagesTr");
    let o = env.res.join("pred");
    env.ok(&[
        "predict",
        "-i",
        input.to_str().unwrap(),
        "-o",
        o.to_str().unwrap(),
        "-d",
        "991",
        "-c",
        "2d__preact_resunet",
        "-f",
        "0",
        "-tr",
        "preact_resunet",
        "--disable_tta",
    ]);
    assert!(o.join("demo2d_000.png").exists());
}
