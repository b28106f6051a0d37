//! End-to-end: the `nnseg` binary on the synthetic demo datasets, in a temp folder.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::{json, Env};

/// Shape from a .npy header (numpy format 1.0/2.0/3.0).
fn npy_shape(p: &Path) -> (String, Vec<usize>) {
    let bytes = std::fs::read(p).unwrap();
    assert_eq!(
        &bytes[..6],
        b"\x93NUMPY",
        "{} is not a .npy file",
        p.display()
    );
    let (len, start) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        )
    };
    let header = std::str::from_utf8(&bytes[start..start + len]).unwrap();
    let descr = header.split("'descr':").nth(1).unwrap();
    let descr = descr.split('\'').nth(1).unwrap().to_string();
    let shape = header.split("'shape':").nth(1).unwrap();
    let shape = &shape[shape.find('(').unwrap() + 1..shape.find(')').unwrap()];
    let dims = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (descr, dims)
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

#[test]
fn demo_datasets_plan_and_preprocess() {
    let env = Env::new();
    env.ok(&["make_demo_dataset"]);
    env.ok(&[
        "plan_and_preprocess",
        "-d",
        "990",
        "991",
        "--verify_dataset_integrity",
        "-np",
        "2",
    ]);

    for (name, n_cases, expect_3d) in [
        ("Dataset990_Demo3D", 10, true),
        ("Dataset991_Demo2D", 12, false),
    ] {
        let folder = env.pre.join(name);
        let fp = json(&folder.join("dataset_fingerprint.json"));
        assert_eq!(fp["spacings"].as_array().unwrap().len(), n_cases);
        assert_eq!(fp["shapes_after_crop"].as_array().unwrap().len(), n_cases);
        let props = &fp["foreground_intensity_properties_per_channel"]["0"];
        for k in [
            "max",
            "mean",
            "median",
            "min",
            "percentile_00_5",
            "percentile_99_5",
            "std",
        ] {
            assert!(props[k].is_number(), "{name}: fingerprint lacks {k}");
        }
        assert!(folder.join("dataset.json").exists());

        let plans = json(&folder.join("nnUNetPlans.json"));
        assert_eq!(plans["dataset_name"], name);
        let cfgs = plans["configurations"].as_object().unwrap();
        assert!(cfgs.contains_key("2d"));
        assert_eq!(
            cfgs.contains_key("3d_fullres"),
            expect_3d,
            "{name}: {:?}",
            cfgs.keys()
        );

        // Every planned configuration with its own data folder was preprocessed, and each
        // case's arrays agree with the plans.
        for (cfg_name, cfg) in cfgs {
            if cfg.get("inherits_from").is_some() {
                continue;
            }
            let data_id = cfg["data_identifier"].as_str().unwrap();
            let dir = folder.join(data_id);
            let data = files_with_suffix(&dir, ".npy");
            let segs: Vec<_> = data
                .iter()
                .filter(|p| p.to_string_lossy().ends_with("_seg.npy"))
                .collect();
            assert_eq!(
                segs.len(),
                n_cases,
                "{name} {cfg_name}: {} seg files",
                segs.len()
            );
            // one {case}.json per case plus the completion record
            assert_eq!(files_with_suffix(&dir, ".json").len(), n_cases + 1);
            assert!(dir.join("nnseg_complete.json").is_file());
            for seg in segs {
                let img = PathBuf::from(seg.to_string_lossy().replace("_seg.npy", ".npy"));
                let (dt, shape) = npy_shape(&img);
                let (sdt, sshape) = npy_shape(seg);
                assert_eq!(dt, "<f4");
                assert_eq!(sdt, "<i2");
                assert_eq!(shape.len(), 4);
                assert_eq!(shape[0], 1, "one channel");
                assert_eq!(sshape[0], 1);
                assert_eq!(&shape[1..], &sshape[1..], "{}", img.display());
            }
            // Nothing half-written left behind.
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                let s = p.to_string_lossy();
                assert!(
                    s.ends_with(".npy") || s.ends_with(".json"),
                    "unexpected file {s}"
                );
            }
        }
        let gt = folder.join("gt_segmentations");
        // every case, plus the hidden completion record
        let visible = std::fs::read_dir(&gt)
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
        assert_eq!(visible, n_cases);
        assert!(gt.join(".nnseg_complete.json").is_file());
    }

    // The 3D demo is anisotropic: stage 0 of 3d_fullres must use 1x3x3 kernels.
    let plans = json(&env.pre.join("Dataset990_Demo3D/nnUNetPlans.json"));
    let k0 =
        &plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["kernel_sizes"][0];
    assert_eq!(k0, &serde_json::json!([1, 3, 3]));

    // Every planned configuration builds its network (shape-only), with nnU-Net's estimate.
    for (id, cfg) in [("990", "3d_fullres"), ("990", "2d"), ("991", "2d")] {
        let out = env.nnseg(&["show_network", id, cfg]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "show_network {id} {cfg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("trainable parameters") && text.contains("decoder.seg_layers.0"),
            "{text}"
        );
    }

    // A hand-added configuration survives re-planning and can be preprocessed.
    let plans_path = env.pre.join("Dataset990_Demo3D/nnUNetPlans.json");
    let mut p = json(&plans_path);
    p["configurations"]["3d_fullres_bs4"] =
        serde_json::json!({"inherits_from": "3d_fullres", "batch_size": 4});
    std::fs::write(&plans_path, serde_json::to_string_pretty(&p).unwrap()).unwrap();
    env.ok(&["plan_experiment", "990"]);
    let p = json(&plans_path);
    assert_eq!(p["configurations"]["3d_fullres_bs4"]["batch_size"], 4);
    env.ok(&["preprocess", "990", "-c", "3d_fullres_bs4", "-np", "1"]);

    // A bad edit names the JSON path and what is allowed.
    let mut p = json(&plans_path);
    p["configurations"]["3d_fullres_bs4"] =
        serde_json::json!({"inherits_from": "3d_fullres", "bach_size": 4});
    std::fs::write(&plans_path, serde_json::to_string_pretty(&p).unwrap()).unwrap();
    let err = env.fails(&["preprocess", "990", "-c", "3d_fullres_bs4"]);
    assert!(
        err.contains("bach_size") && err.contains("batch_size"),
        "{err}"
    );

    // Fingerprints and plans are deterministic.
    let fp1 = std::fs::read_to_string(env.pre.join("Dataset991_Demo2D/dataset_fingerprint.json"))
        .unwrap();
    let plans1 =
        std::fs::read_to_string(env.pre.join("Dataset991_Demo2D/nnUNetPlans.json")).unwrap();
    env.ok(&["plan_and_preprocess", "991", "--clean", "--no_pp"]);
    let fp2 = std::fs::read_to_string(env.pre.join("Dataset991_Demo2D/dataset_fingerprint.json"))
        .unwrap();
    let plans2 =
        std::fs::read_to_string(env.pre.join("Dataset991_Demo2D/nnUNetPlans.json")).unwrap();
    assert_eq!(fp1, fp2);
    assert_eq!(plans1, plans2);
}

#[test]
fn bad_input_gives_clear_errors() {
    let env = Env::new();
    let err = env.fails(&["plan_and_preprocess", "123"]);
    assert!(err.contains("123"), "{err}");

    env.ok(&["make_demo_dataset"]);
    let ds = env.raw.join("Dataset990_Demo3D");

    // Two folders with the same id.
    let dup = env.raw.join("Dataset990_Other");
    std::fs::create_dir_all(&dup).unwrap();
    let err = env.fails(&["extract_fingerprint", "990"]);
    assert!(
        err.contains("Dataset990_Other") && err.contains("Dataset990_Demo3D"),
        "{err}"
    );
    std::fs::remove_dir_all(&dup).unwrap();

    // A truncated .nii.gz: the error names the file, and no fingerprint is written.
    let victim = ds.join("imagesTr/demo3d_003_0000.nii.gz");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let err = env.fails(&["extract_fingerprint", "990"]);
    assert!(err.contains("demo3d_003_0000.nii.gz"), "{err}");
    assert!(!env
        .pre
        .join("Dataset990_Demo3D/dataset_fingerprint.json")
        .exists());
    std::fs::write(&victim, &bytes).unwrap();

    // A missing channel file names the case and the file.
    let img = ds.join("imagesTr/demo3d_001_0000.nii.gz");
    let moved = ds.join("demo3d_001_0000.nii.gz.bak");
    std::fs::rename(&img, &moved).unwrap();
    let err = env.fails(&["extract_fingerprint", "990", "--verify_dataset_integrity"]);
    assert!(err.contains("demo3d_001"), "{err}");
    std::fs::rename(&moved, &img).unwrap();

    // A label value not declared in dataset.json.
    let dj_path = ds.join("dataset.json");
    let dj_text = std::fs::read_to_string(&dj_path).unwrap();
    let mut dj: Value = serde_json::from_str(&dj_text).unwrap();
    let labels = dj["labels"].as_object_mut().unwrap();
    let last = labels.keys().next_back().unwrap().clone();
    labels.remove(&last);
    std::fs::write(&dj_path, serde_json::to_string_pretty(&dj).unwrap()).unwrap();
    let err = env.fails(&["extract_fingerprint", "990", "--verify_dataset_integrity"]);
    assert!(err.contains("demo3d_"), "{err}");
    std::fs::write(&dj_path, dj_text).unwrap();

    // After all that, the dataset still plans and preprocesses.
    env.ok(&["plan_and_preprocess", "990", "-c", "3d_fullres", "-np", "2"]);
}

#[test]
fn train_a_few_iterations_and_resume() {
    let env = Env::new();
    env.ok(&["make_demo_dataset"]);
    env.ok(&["plan_and_preprocess", "991", "-np", "2"]);
    let tiny = [
        "--num_iterations_per_epoch",
        "3",
        "--num_val_iterations_per_epoch",
        "1",
        "--seed",
        "7",
    ];
    let mut args = vec!["train", "991", "2d", "0", "-tr", "nnUNetTrainer_1epoch"];
    args.extend(tiny);
    env.ok(&args);
    let fold = env
        .res
        .join("Dataset991_Demo2D/nnUNetTrainer_1epoch__nnUNetPlans__2d/fold_0");
    assert!(fold.join("checkpoint_final.safetensors").exists());
    assert!(fold.join("progress.png").exists());
    for f in ["plans.json", "dataset.json", "dataset_fingerprint.json"] {
        assert!(fold.parent().unwrap().join(f).exists(), "{f} not copied");
    }
    assert!(env.pre.join("Dataset991_Demo2D/splits_final.json").exists());

    // --c on a finished run with more epochs continues from epoch 1.
    let mut args = vec![
        "train",
        "991",
        "2d",
        "0",
        "-tr",
        "nnUNetTrainer_1epoch",
        "--c",
    ];
    args.extend(tiny);
    args.extend(["--num_epochs", "2"]);
    let log = env.ok(&args);
    assert!(log.contains("2 epochs done"), "{log}");

    // The fold's final validation ran and was evaluated.
    let summary = json(&fold.join("validation/summary.json"));
    assert!(summary["foreground_mean"]["Dice"].is_number(), "{summary}");

    // Predict raw images with the trained fold: one segmentation per case, same size as input.
    let input = env.res.join("pred_in");
    std::fs::create_dir_all(&input).unwrap();
    for c in ["demo2d_000", "demo2d_001"] {
        std::fs::copy(
            env.raw
                .join(format!("Dataset991_Demo2D/imagesTr/{c}_0000.png")),
            input.join(format!("{c}_0000.png")),
        )
        .unwrap();
    }
    let out = env.res.join("pred_out");
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
    env.ok(&[
        "predict",
        "-i",
        i,
        "-o",
        o,
        "-d",
        "991",
        "-c",
        "2d",
        "-f",
        "0",
        "-tr",
        "nnUNetTrainer_1epoch",
        "--save_probabilities",
    ]);
    for c in ["demo2d_000", "demo2d_001"] {
        let a = std::fs::read(input.join(format!("{c}_0000.png"))).unwrap();
        let b = std::fs::read(out.join(format!("{c}.png"))).unwrap();
        // PNG IHDR: width and height at bytes 16..24.
        assert_eq!(
            a[16..24],
            b[16..24],
            "{c}: prediction size differs from the image"
        );
        assert!(out.join(format!("{c}.npz")).exists());
    }
    let dj = env.raw.join("Dataset991_Demo2D/dataset.json");
    let labels = env.raw.join("Dataset991_Demo2D/labelsTr");
    env.ok(&[
        "evaluate_folder",
        labels.to_str().unwrap(),
        o,
        "-djfile",
        dj.to_str().unwrap(),
        "--chill",
    ]);
    assert!(out.join("summary.json").exists());
    env.ok(&[
        "find_best_configuration",
        "991",
        "-c",
        "2d",
        "-tr",
        "nnUNetTrainer_1epoch",
        "-f",
        "0",
    ]);
    let info = env.res.join("Dataset991_Demo2D/inference_instructions.txt");
    assert!(std::fs::read_to_string(&info)
        .unwrap()
        .contains("nnseg predict"));

    // The evaluation commands on the trained fold: merge + evaluate, postprocessing decision,
    // evaluate_simple (PNG ending detected; the fold validated a subset of cases: --chill).
    env.ok(&[
        "accumulate_crossval_results",
        "991",
        "-c",
        "2d",
        "-tr",
        "nnUNetTrainer_1epoch",
        "-f",
        "0",
    ]);
    let merged = fold.parent().unwrap().join("crossval_results_folds_0");
    let cv = json(&merged.join("summary.json"));
    assert!(cv["foreground_mean"]["Dice"].is_number(), "{cv}");
    let gt = env.pre.join("Dataset991_Demo2D/gt_segmentations");
    let (m, g) = (merged.to_str().unwrap(), gt.to_str().unwrap());
    env.ok(&["determine_postprocessing", "-i", m, "-ref", g]);
    assert!(merged.join("postprocessing.json").is_file());
    let simple = env.res.join("simple.json");
    let s = simple.to_str().unwrap();
    env.ok(&["evaluate_simple", g, m, "-l", "1", "2", "-o", s, "--chill"]);
    assert_eq!(
        json(&simple)["foreground_mean"]["Dice"],
        cv["foreground_mean"]["Dice"]
    );

    // Bad requests are reported clearly.
    let err = env.fails(&["train", "991", "2d", "seven"]);
    assert!(err.contains("seven"), "{err}");
    let err = env.fails(&["train", "991", "2d", "0", "-tr", "nnUNetTrainer_3epochs"]);
    assert!(
        err.contains("nnUNetTrainer_5epochs"),
        "lists known presets: {err}"
    );
    let err = env.fails(&["train", "991", "3d_fullres", "0"]);
    assert!(err.contains("3d_fullres") && err.contains("2d"), "{err}");
}
