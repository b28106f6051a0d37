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

    /// `nnseg ARGS` with this layout's environment, not started.
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

pub fn json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
