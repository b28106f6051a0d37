//! Prediction with model folders trained by nnU-Net v2, as they are (fold_0/checkpoint_final.pth)
//! and after `import_nnunet_model` (`-chk model`), against nnU-Net's own predictions of the same
//! images (tests/fixtures/nnunet_checkpoint/reference, made by scripts/nnunet_reference.py).

mod common;

use common::Env;
use ndarray::{Array4, ArrayD};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nnunet_checkpoint")
}

/// (kind, model folder) of the two fixture models.
fn models() -> [(&'static str, PathBuf); 2] {
    let f = fixtures();
    [
        (
            "3d",
            f.join("Dataset991_Fixture3D/nnUNetTrainer__nnUNetPlans__3d_fullres"),
        ),
        (
            "2d",
            f.join("Dataset992_Fixture2D/nnUNetTrainer__nnUNetPlans__2d"),
        ),
    ]
}

fn reference(kind: &str) -> PathBuf {
    fixtures().join("reference").join(kind)
}

fn seg(path: &Path) -> Array4<i16> {
    datasets::io::read_seg(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .0
}

fn probabilities(path: &Path) -> ArrayD<f32> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut npz = ndarray_npy::NpzReader::new(f).unwrap();
    npz.by_name("probabilities.npy")
        .or_else(|_| npz.by_name("probabilities"))
        .unwrap()
}

fn dice(a: &Array4<i16>, b: &Array4<i16>, label: i16) -> f64 {
    let (mut both, mut na, mut nb) = (0usize, 0usize, 0usize);
    for (&x, &y) in a.iter().zip(b.iter()) {
        na += (x == label) as usize;
        nb += (y == label) as usize;
        both += (x == label && y == label) as usize;
    }
    if na + nb == 0 {
        1.0
    } else {
        2.0 * both as f64 / (na + nb) as f64
    }
}

/// Per case of the reference: (case, min Dice over nnU-Net's labels, max |Δ probability|).
fn compare_with_nnunet(kind: &str, ours: &Path) -> Vec<(String, f64, f32)> {
    let want_dir = reference(kind).join("nnunet");
    let mut cases: Vec<String> = std::fs::read_dir(&want_dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_suffix(".nii.gz").map(str::to_string)
        })
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "{}: no reference", want_dir.display());
    cases
        .into_iter()
        .map(|case| {
            let want = seg(&want_dir.join(format!("{case}.nii.gz")));
            let got = seg(&ours.join(format!("{case}.nii.gz")));
            assert_eq!(want.shape(), got.shape(), "{case}");
            let mut labels: Vec<i16> = want.iter().copied().filter(|&l| l != 0).collect();
            labels.sort();
            labels.dedup();
            let d = labels
                .iter()
                .map(|&l| dice(&want, &got, l))
                .fold(1.0, f64::min);
            let pw = probabilities(&want_dir.join(format!("{case}.npz")));
            let pg = probabilities(&ours.join(format!("{case}.npz")));
            assert_eq!(pw.shape(), pg.shape(), "{case} probabilities");
            let dp = pw
                .iter()
                .zip(pg.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            (case, d, dp)
        })
        .collect()
}

/// The arguments of `predict_from_modelfolder` with fold 0's `checkpoint_final.pth` of `model`
/// on `input` into `out`.
fn fixture_args<'a>(model: &'a Path, input: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "predict_from_modelfolder",
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-m",
        model.to_str().unwrap(),
        "-f",
        "0",
        "-chk",
        "checkpoint_final.pth",
    ]
}

/// `predict_from_modelfolder` of fold 0 of `model` on `input` into `out`, with `extra` flags.
fn predict_fixture(env: &Env, model: &Path, input: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = fixture_args(model, input, out);
    args.extend_from_slice(extra);
    env.ok(&args)
}

#[test]
fn predictions_of_nnunet_checkpoints_agree_with_nnunet() {
    // the default settings (f16 sums, nnU-Net's numerics) reproduce nnU-Net's predictor
    let env = Env::new();
    for (kind, model) in models() {
        let out = env.res.join(format!("pred_{kind}"));
        let input = reference(kind).join("input");
        let log = predict_fixture(
            &env,
            &model,
            &input,
            &out,
            &["--save_probabilities", "--batch_tiles", "5", "--verbose"],
        );
        assert!(log.contains("memory estimate"), "{log}");
        for (case, d, dp) in compare_with_nnunet(kind, &out) {
            eprintln!("{case}: min Dice {d:.6}, max |Δp| {dp:.2e}");
            assert!(d >= 0.999, "{case}: Dice {d} against nnU-Net");
            assert!(dp <= 1e-3, "{case}: probabilities differ by {dp}");
        }
        // without probabilities the export resamples one class at a time and takes the argmax
        // of the logits: the same segmentations
        let streamed = env.res.join(format!("pred_{kind}_seg_only"));
        predict_fixture(&env, &model, &input, &streamed, &[]);
        for e in std::fs::read_dir(&out).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(".nii.gz") {
                assert_eq!(seg(&out.join(&name)), seg(&streamed.join(&name)), "{name}");
            }
        }
    }
}

#[test]
fn a_case_beyond_the_memory_budget_is_refused_with_its_estimate() {
    let env = Env::new();
    let (kind, model) = models()[0].clone();
    let input = reference(kind).join("input");
    let out = env.res.join("pred");
    let mut args = fixture_args(&model, &input, &out);
    args.push("--max_memory_gb");
    let err = env.fails(&[args.as_slice(), &["0.00001"]].concat());
    assert!(err.contains("not enough memory"), "{err}");
    assert!(err.contains("case 3d_big") && err.contains("sums"), "{err}");
    assert!(err.contains("--max_memory_gb"), "{err}");
    let err = env.fails(&[args.as_slice(), &["0"]].concat());
    assert!(err.contains("--max_memory_gb 0"), "{err}");
    // a budget that fits f16 sums with one input per pass but not the run's batch of 64
    // inputs falls back to them
    args.extend(["0.15", "--batch_tiles", "64", "--accumulate", "f32"]);
    let log = env.ok(&args);
    assert!(log.contains("predicting it with f16 sums"), "{log}");
}

#[test]
fn f32_sums_agree_with_nnunet_where_one_tile_covers_the_image() {
    // nnU-Net keeps its sums in f16: where tiles overlap, the tiny Gaussian weights at tile
    // corners lose precision there and f32 sums differ at those voxels; a case of one
    // tile has no overlap, so f32 and nnU-Net agree
    let env = Env::new();
    let (kind, model) = models()[0].clone();
    let out = env.res.join("pred");
    predict_fixture(
        &env,
        &model,
        &reference(kind).join("input"),
        &out,
        &["--save_probabilities", "--accumulate", "f32"],
    );
    let all = compare_with_nnunet(kind, &out);
    let small = all.iter().find(|c| c.0 == "3d_small").expect("3d_small");
    assert!(small.1 >= 0.999 && small.2 <= 1e-3, "{small:?}");
}

/// Copies a model folder (plans.json, dataset.json, fold_*/) into `dst`.
fn copy_model(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_model(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

#[test]
fn imported_model_and_predict_by_dataset_id_give_the_same_segmentation() {
    let env = Env::new();
    let (kind, model) = models()[1].clone();
    // an nnU-Net results folder: predict -d finds the .pth without renaming anything
    let dst = env
        .res
        .join("Dataset992_Fixture2D/nnUNetTrainer__nnUNetPlans__2d");
    copy_model(&model, &dst);
    let input = reference(kind).join("input");
    let pth_out = env.res.join("out_pth");
    // `predict -d 992 -c 2d -f 0` of the reference inputs into `out`, with `extra` flags
    let predict = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "predict",
            "-i",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "-d",
            "992",
            "-c",
            "2d",
            "-f",
            "0",
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    env.ok(&strs(&predict(&pth_out, &[])));
    // without an import, -chk model names the files it looked for
    let e = env.fails(&strs(&predict(
        Path::new("/nonexistent/x"),
        &["-chk", "model"],
    )));
    assert!(e.contains("fold_0/model.safetensors"), "{e}");
    env.ok(&["import_nnunet_model", dst.to_str().unwrap(), "-f", "0"]);
    let imported_out = env.res.join("out_imported");
    env.ok(&strs(&predict(&imported_out, &["-chk", "model"])));
    for case in ["2d_big", "2d_small"] {
        let a = seg(&pth_out.join(format!("{case}.nii.gz")));
        let b = seg(&imported_out.join(format!("{case}.nii.gz")));
        assert_eq!(a, b, "{case}");
    }
    // a checkpoint the fold does not have: both spellings are named
    let e = env.fails(&[
        "predict",
        "-i",
        input.to_str().unwrap(),
        "-o",
        "/nonexistent/x",
        "-d",
        "992",
        "-c",
        "2d",
        "-f",
        "0",
        "-chk",
        "checkpoint_best",
    ]);
    assert!(
        e.contains("fold_0/checkpoint_best.safetensors")
            && e.contains("fold_0/checkpoint_best.pth"),
        "{e}"
    );
    // a fold that was never trained
    let e = env.fails(&[
        "predict",
        "-i",
        input.to_str().unwrap(),
        "-o",
        "/nonexistent/x",
        "-d",
        "992",
        "-c",
        "2d",
        "-f",
        "1",
    ]);
    assert!(e.contains("fold_1/checkpoint_final"), "{e}");
}

#[test]
fn many_small_images_predicted_together_equal_one_by_one() {
    let env = Env::new();
    let (kind, model) = models()[1].clone();
    // 2d_small (one tile) under several names, and 2d_big (several tiles) in between
    let input = env.raw.join("many");
    std::fs::create_dir_all(&input).unwrap();
    let src = reference(kind).join("input");
    for (case, from) in [
        ("a", "2d_small"),
        ("b", "2d_big"),
        ("c", "2d_small"),
        ("d", "2d_small"),
        ("e", "2d_small"),
    ] {
        for ch in 0..2 {
            std::fs::copy(
                src.join(format!("{from}_{ch:04}.nii.gz")),
                input.join(format!("{case}_{ch:04}.nii.gz")),
            )
            .unwrap();
        }
    }
    let run = |out: &Path, batch: &str| {
        env.ok(&[
            "predict_from_modelfolder",
            "-i",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "-m",
            model.to_str().unwrap(),
            "-f",
            "0",
            "--save_probabilities",
            "--batch_tiles",
            batch,
            // f32 sums: the network's own last-bit differences between batch sizes stay
            // below 1e-5 (f16 sums round them to f16 steps)
            "--accumulate",
            "f32",
        ]);
    };
    let (one, together) = (env.res.join("one"), env.res.join("together"));
    run(&one, "1");
    run(&together, "64");
    for case in ["a", "b", "c", "d", "e"] {
        assert_eq!(
            seg(&one.join(format!("{case}.nii.gz"))),
            seg(&together.join(format!("{case}.nii.gz"))),
            "{case}"
        );
        let p1 = probabilities(&one.join(format!("{case}.npz")));
        let p2 = probabilities(&together.join(format!("{case}.npz")));
        let d = p1
            .iter()
            .zip(p2.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d <= 1e-5, "{case}: {d}");
    }
    // identical inputs give identical outputs wherever they sit in a shared pass
    assert_eq!(
        probabilities(&together.join("a.npz")),
        probabilities(&together.join("e.npz"))
    );
}
