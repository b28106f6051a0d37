//! Shared helpers of the end-to-end tests: a temp nnU-Net folder layout and the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub struct Env {
    _dir: tempfile::TempDir,
    pub raw: PathBuf,
    pub pre: PathBuf,
    pub res: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        let pre = dir.path().join("preprocessed");
        let res = dir.path().join("results");
        for p in [&raw, &pre, &res] {
            std::fs::create_dir_all(p).unwrap();
        }
        Env {
            _dir: dir,
            raw,
            pre,
            res,
        }
    }

    /// The `nnseg` binary with `args`, in this layout (not started).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nnseg"));
        c.args(args)
            .env("nnUNet_raw", &self.raw)
            .env("nnUNet_preprocessed", &self.pre)
            .env("nnUNet_results", &self.res)
            .env("RUST_LOG", "info");
        c
    }

    pub fn nnseg(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.nnseg(args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "nnseg {args:?} failed:\n{stderr}");
        stderr
    }

    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.nnseg(args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "nnseg {args:?} should fail:\n{stderr}"
        );
        stderr
    }
}

/// The 2D demo dataset planned and preprocessed, and fold 0 of `nnUNetTrainer_1epoch` trained
/// for 2 iterations (+ 1 validation iteration): a real model in seconds.
pub fn train_tiny_2d(env: &Env) {
    env.ok(&["make_demo_dataset"]);
    env.ok(&["plan_and_preprocess", "-d", "991", "-c", "2d", "-np", "1"]);
    env.ok(&[
        "train",
        "991",
        "2d",
        "0",
        "-tr",
        "nnUNetTrainer_1epoch",
        "--num_iterations_per_epoch",
        "2",
        "--num_val_iterations_per_epoch",
        "1",
    ]);
}

/// `predict` of [`train_tiny_2d`]'s fold from `input` into `output`, plus `extra` flags.
pub fn predict_tiny_2d(env: &Env, input: &Path, output: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "predict",
        "-i",
        input.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "-d",
        "991",
        "-c",
        "2d",
        "-f",
        "0",
        "-tr",
        "nnUNetTrainer_1epoch",
    ];
    args.extend_from_slice(extra);
    env.ok(&args)
}

/// The `.png` files of a folder with their bytes, by name.
pub fn pngs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// A network small enough to train an epoch of two iterations of the 2D demo in well under a
/// second (changes no preprocessing key, so the preprocessed data stays valid).
pub fn tiny_2d_plans(env: &Env) {
    let path = env.pre.join("Dataset991_Demo2D/nnUNetPlans.json");
    let mut plans = json(&path);
    let c = &mut plans["configurations"]["2d"];
    let kw = c["architecture"]["arch_kwargs"].as_object_mut().unwrap();
    kw.insert("n_stages".into(), serde_json::json!(3));
    kw.insert("features_per_stage".into(), serde_json::json!([4, 8, 16]));
    kw.insert(
        "kernel_sizes".into(),
        serde_json::json!([[3, 3], [3, 3], [3, 3]]),
    );
    kw.insert(
        "strides".into(),
        serde_json::json!([[1, 1], [2, 2], [2, 2]]),
    );
    kw.insert("n_conv_per_stage".into(), serde_json::json!([1, 1, 1]));
    kw.insert("n_conv_per_stage_decoder".into(), serde_json::json!([1, 1]));
    c["patch_size"] = serde_json::json!([32, 32]);
    c["batch_size"] = serde_json::json!(2);
    std::fs::write(&path, serde_json::to_string_pretty(&plans).unwrap()).unwrap();
}

pub fn json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
