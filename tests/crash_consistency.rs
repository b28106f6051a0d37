//! Crash consistency (issue 19, "nothing half-done is ever trusted"): `preprocess`, `train`,
//! `predict` and `ensemble` of the 2D demo are killed with SIGKILL at seeded pseudo-random
//! moments within the duration of their uninterrupted run, then run again (`train` with
//! `--c`). Right after each kill no partial state may be accepted (what the next step would
//! use must either be refused or equal the uninterrupted run's), and after each rerun the
//! outputs must equal the uninterrupted run's bit for bit (checkpoints: their tensors, as
//! their headers hold times; training logs and plots hold times too and are not compared).
//!
//! `NNSEG_CRASH_KILLS` (kills per stage, default 3) and `NNSEG_CRASH_SEED` (default 19) select
//! the long variant, see `scripts/crash_consistency.sh`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{tiny_2d_plans, Env};

const DATASET: &str = "Dataset991_Demo2D";
const TRAINER: &str = "nnUNetTrainer_5epochs";
const MODEL: &str = "nnUNetTrainer_5epochs__nnUNetPlans__2d";

/// Relative path → content (directories as `dir/` → empty, so leftover folders count).
type Snapshot = BTreeMap<String, Vec<u8>>;

/// splitmix64: the kill moments depend only on the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_number(key: &str, default: u64) -> u64 {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// The tensors of a safetensors file (name, dtype, shape, bytes), without the header's
/// metadata.
fn tensor_bytes(path: &Path) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let data = &b[8 + n..];
    let mut names: Vec<&String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .collect();
    names.sort();
    let mut out = Vec::new();
    for k in names {
        let t = &header[k.as_str()];
        let range = &t["data_offsets"];
        let (a, z) = (
            range[0].as_u64().unwrap() as usize,
            range[1].as_u64().unwrap() as usize,
        );
        out.extend(format!("{k} {} {}\n", t["dtype"], t["shape"]).as_bytes());
        out.extend(&data[a..z]);
    }
    out
}

/// Every file and folder under `root` (hidden ones too), except those `skip` names.
fn snapshot(root: &Path, skip: &dyn Fn(&str) -> bool) -> Snapshot {
    let mut out = Snapshot::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if skip(&rel) {
                continue;
            }
            if p.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                stack.push(p);
            } else if rel.ends_with(".safetensors") {
                out.insert(rel, tensor_bytes(&p));
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Panics listing the entries that differ (missing, extra, other content).
fn assert_same(want: &Snapshot, got: &Snapshot, what: &str) {
    let mut diffs = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => diffs.push(format!("missing {k}")),
            Some(g) if g != v => diffs.push(format!("differs {k}")),
            Some(_) => {}
        }
    }
    diffs.extend(
        got.keys()
            .filter(|k| !want.contains_key(*k))
            .map(|k| format!("extra {k}")),
    );
    assert!(diffs.is_empty(), "{what}: {diffs:#?}");
}

/// Only the entries of `s` under `prefix`.
fn under(s: &Snapshot, prefix: &str) -> Snapshot {
    s.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// One command under test.
struct Stage<'a> {
    name: &'static str,
    run: Vec<String>,
    /// The command run after a kill (train: with `--c`).
    rerun: Vec<String>,
    /// Brings the outputs into the state before run `i` (0: the uninterrupted run).
    prepare: Box<dyn Fn(usize) + 'a>,
    /// The outputs compared after each rerun.
    state: Box<dyn Fn() -> Snapshot + 'a>,
    /// Checks right after a kill that nothing partial is accepted (gets the reference).
    after_kill: Box<dyn Fn(&Snapshot) + 'a>,
}

struct StageReport {
    name: &'static str,
    uninterrupted: Duration,
    /// Kill delays; `true` when the process had already exited.
    kills: Vec<(Duration, bool)>,
    total: Duration,
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs `stage` once uninterrupted, then `kills` times killed and rerun (see the module docs).
fn crash_stage(env: &Env, rng: &mut Rng, kills: usize, stage: Stage) -> StageReport {
    let t_stage = Instant::now();
    (stage.prepare)(0);
    let t = Instant::now();
    env.ok(&strs(&stage.run));
    let uninterrupted = t.elapsed();
    let reference = (stage.state)();
    assert!(!reference.is_empty(), "{}: no outputs", stage.name);
    let mut report = StageReport {
        name: stage.name,
        uninterrupted,
        kills: Vec::new(),
        total: Duration::ZERO,
    };
    for i in 1..=kills {
        (stage.prepare)(i);
        let delay = Duration::from_micros(rng.below(uninterrupted.as_micros() as u64));
        let mut child = env
            .command(&strs(&stage.run))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let exited = child.try_wait().unwrap().is_some();
        if !exited {
            child.kill().unwrap(); // SIGKILL
        }
        child.wait().unwrap();
        let what = format!("{} killed after {delay:?} (kill {i})", stage.name);
        eprintln!("{what}{}", if exited { ", had exited" } else { "" });
        (stage.after_kill)(&reference);
        env.ok(&strs(&stage.rerun));
        assert_same(&reference, &(stage.state)(), &format!("{what}, then rerun"));
        report.kills.push((delay, exited));
    }
    report.total = t_stage.elapsed();
    report
}

fn remove(p: &Path) {
    if p.is_dir() {
        std::fs::remove_dir_all(p).unwrap();
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn train_args(fold: &str) -> Vec<String> {
    args(&[
        "train",
        "991",
        "2d",
        fold,
        "--tr",
        TRAINER,
        "--num_iterations_per_epoch",
        "2",
        "--num_val_iterations_per_epoch",
        "1",
    ])
}

fn predict_args(input: &Path, out: &Path, fold: &str) -> Vec<String> {
    args(&[
        "predict",
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-d",
        "991",
        "-c",
        "2d",
        "-f",
        fold,
        "--tr",
        TRAINER,
        "--save_probabilities",
    ])
}

/// preprocess: killed during a first run (no data yet) and during a rerun over complete data.
/// After a kill the data folder and gt_segmentations are either complete and equal to the
/// uninterrupted run's, or refused (by the check `train` runs, and by `train` itself).
fn preprocess_stage(env: &Env) -> Stage<'_> {
    let root = env.pre.join(DATASET);
    let pre = datasets::PreprocessedDir::new(&root);
    let run = args(&["preprocess", "-d", "991", "-c", "2d", "-np", "1"]);
    let (r0, r1) = (root.clone(), root.clone());
    Stage {
        name: "preprocess",
        rerun: run.clone(),
        run,
        prepare: Box::new(move |i| {
            if i % 2 == 1 {
                remove(&r0.join("nnUNetPlans_2d"));
                remove(&r0.join("gt_segmentations"));
            }
        }),
        state: Box::new(move || snapshot(&r1, &|_| false)),
        after_kill: Box::new(move |reference| {
            let plans = plans::Plans::load(&pre.plans_file("nnUNetPlans")).unwrap();
            let data = pre.data_folder("nnUNetPlans_2d");
            let accepted = preprocessing::verify_complete(&data, &plans, "2d").is_ok()
                && preprocessing::verify_gt_segmentations(&pre, &[], "").is_ok();
            if accepted {
                let now = snapshot(pre.path(), &|_| false);
                for part in ["nnUNetPlans_2d/", "gt_segmentations/"] {
                    assert_same(
                        &under(reference, part),
                        &under(&now, part),
                        "preprocess: accepted after a kill",
                    );
                }
            } else {
                let e = env.fails(&strs(&train_args("0")));
                assert!(e.contains("nnseg preprocess -d"), "{e}");
                let fin = env.res.join(DATASET).join(MODEL).join("fold_0");
                assert!(!fin.join("checkpoint_final.safetensors").exists(), "{e}");
            }
        }),
    }
}

/// train (fold 0): killed anywhere, `--c` must give the same checkpoints and validation.
/// After a kill every checkpoint left is complete (checksum) and a final one equals the
/// uninterrupted run's; a validation folder is marked unfinished or equals it.
fn train_stage(env: &Env) -> Stage<'_> {
    let model = env.res.join(DATASET).join(MODEL);
    let fold = model.join("fold_0");
    let skip = |rel: &str| {
        rel.starts_with("training_log_") || rel == "progress.png" || rel == "debug.json"
    };
    let (f0, f1) = (fold.clone(), fold.clone());
    let mut rerun = train_args("0");
    rerun.push("--c".into());
    Stage {
        name: "train",
        run: train_args("0"),
        rerun,
        prepare: Box::new(move |_| remove(&f0)),
        state: Box::new(move || snapshot(&f1, &skip)),
        after_kill: Box::new(move |reference| {
            let now = snapshot(&fold, &skip);
            for (name, _) in now.iter().filter(|(k, _)| k.ends_with(".safetensors")) {
                let p = fold.join(name);
                trainer::Checkpoint::load(&p, &candle_core::Device::Cpu)
                    .unwrap_or_else(|e| panic!("train: partial checkpoint after a kill: {e}"));
            }
            let fin = "checkpoint_final.safetensors";
            if let Some(c) = now.get(fin) {
                assert!(c == &reference[fin], "train: a different final checkpoint");
            }
            let marker = "validation/nnseg_prediction_incomplete.txt";
            if now.contains_key("validation/") && !now.contains_key(marker) {
                assert_same(
                    &under(reference, "validation/"),
                    &under(&now, "validation/"),
                    "train: an unmarked validation folder after a kill",
                );
            }
        }),
    }
}

/// predict (fold 0, with probabilities): a killed run's folder is marked unfinished (and
/// refused by ensemble) or equals the uninterrupted run's.
fn predict_stage<'a>(env: &'a Env, input: &Path, out: &Path, other: &'a Path) -> Stage<'a> {
    let run = predict_args(input, out, "0");
    let (o0, o1, o2) = (out.to_path_buf(), out.to_path_buf(), out.to_path_buf());
    Stage {
        name: "predict",
        rerun: run.clone(),
        run,
        prepare: Box::new(move |_| remove(&o0)),
        state: Box::new(move || snapshot(&o1, &|_| false)),
        after_kill: Box::new(move |reference| {
            if !o2.exists() {
                return;
            }
            let marker = datasets::PredictionDir::new(&o2).incomplete_marker();
            if marker.exists() {
                let refused = o2.with_file_name("refused");
                let e = env.fails(&[
                    "ensemble",
                    "-i",
                    o2.to_str().unwrap(),
                    other.to_str().unwrap(),
                    "-o",
                    refused.to_str().unwrap(),
                ]);
                assert!(e.contains("nnseg_prediction_incomplete.txt"), "{e}");
            } else {
                let now = snapshot(&o2, &|_| false);
                assert_same(reference, &now, "predict: an unmarked folder after a kill");
            }
        }),
    }
}

/// ensemble (with probabilities): a killed run's folder is marked unfinished or equals the
/// uninterrupted run's; the rerun leaves no temp files (they would be extra entries).
fn ensemble_stage(a: &Path, b: &Path, out: &Path) -> Stage<'static> {
    let run = args(&[
        "ensemble",
        "-i",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--save_npz",
    ]);
    let (o0, o1, o2) = (out.to_path_buf(), out.to_path_buf(), out.to_path_buf());
    Stage {
        name: "ensemble",
        rerun: run.clone(),
        run,
        prepare: Box::new(move |_| remove(&o0)),
        state: Box::new(move || snapshot(&o1, &|_| false)),
        after_kill: Box::new(move |reference| {
            let marker = datasets::PredictionDir::new(&o2).incomplete_marker();
            if o2.exists() && !marker.exists() {
                let now = snapshot(&o2, &|_| false);
                assert_same(reference, &now, "ensemble: an unmarked folder after a kill");
            }
        }),
    }
}

fn copy_images(env: &Env) -> PathBuf {
    let input = env.res.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let images = env.raw.join(DATASET).join("imagesTr");
    for e in std::fs::read_dir(images).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, input.join(p.file_name().unwrap())).unwrap();
    }
    input
}

#[test]
fn sigkill_at_random_moments_never_leaves_trusted_partial_state() {
    let kills = env_number("NNSEG_CRASH_KILLS", 3) as usize;
    let mut rng = Rng(env_number("NNSEG_CRASH_SEED", 19));
    let t0 = Instant::now();
    let env = Env::new();
    env.ok(&["make_demo_dataset"]);
    env.ok(&["plan_and_preprocess", "-d", "991", "-c", "2d", "-np", "1"]);
    tiny_2d_plans(&env);
    let mut reports = vec![crash_stage(&env, &mut rng, kills, preprocess_stage(&env))];
    reports.push(crash_stage(&env, &mut rng, kills, train_stage(&env)));
    // the second ensemble member: fold 1, uninterrupted
    env.ok(&strs(&train_args("1")));
    let input = copy_images(&env);
    let (out0, out1) = (env.res.join("pred_fold0"), env.res.join("pred_fold1"));
    env.ok(&strs(&predict_args(&input, &out1, "1")));
    let stage = predict_stage(&env, &input, &out0, &out1);
    reports.push(crash_stage(&env, &mut rng, kills, stage));
    let stage = ensemble_stage(&out0, &out1, &env.res.join("ensemble"));
    reports.push(crash_stage(&env, &mut rng, kills, stage));
    for r in &reports {
        let delays: Vec<String> = r
            .kills
            .iter()
            .map(|(d, exited)| format!("{}ms{}", d.as_millis(), if *exited { "*" } else { "" }))
            .collect();
        eprintln!(
            "{:<10} uninterrupted {:>6.2} s, stage {:>6.2} s, kills at [{}]",
            r.name,
            r.uninterrupted.as_secs_f64(),
            r.total.as_secs_f64(),
            delays.join(", ")
        );
    }
    eprintln!(
        "crash consistency: {kills} kill(s) per stage in {:.1} s (* = had already exited)",
        t0.elapsed().as_secs_f64()
    );
}
