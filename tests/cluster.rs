//! End-to-end (issue 22): a graceful stop of `nnseg train` by SIGTERM and its bit-exact `--c`,
//! and `nnseg cross_validate` with the local launcher on the 2D demo dataset.

mod common;
use common::Env;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn prepared() -> Env {
    let env = Env::new();
    env.ok(&["make_demo_dataset"]);
    env.ok(&["plan_and_preprocess", "991", "-np", "2"]);
    env
}

fn bits(t: &candle_core::Tensor) -> Vec<u32> {
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

fn assert_same_checkpoint(a: &Path, b: &Path) {
    let dev = candle_core::Device::Cpu;
    let a = trainer::Checkpoint::load(a, &dev).unwrap();
    let b = trainer::Checkpoint::load(b, &dev).unwrap();
    for (what, x, y) in [
        ("weights", &a.network_weights, &b.network_weights),
        ("momentum", &a.optimizer_state, &b.optimizer_state),
    ] {
        let mut names: Vec<&String> = x.keys().collect();
        names.sort();
        assert_eq!(names.len(), y.len(), "{what}: tensor count");
        for n in names {
            assert!(bits(&x[n]) == bits(&y[n]), "{what} `{n}` differs");
        }
    }
    assert_eq!(a.meta.current_epoch, b.meta.current_epoch);
    assert_eq!(a.meta.logging.train_losses, b.meta.logging.train_losses);
    assert_eq!(a.meta.logging.val_losses, b.meta.logging.val_losses);
}

/// Waits until a training log in `fold` has the line `Epoch {epoch}`.
fn wait_for_epoch(fold: &Path, epoch: usize) {
    let t = Instant::now();
    let want = format!(": Epoch {epoch}\n");
    while t.elapsed() < Duration::from_secs(300) {
        let found = std::fs::read_dir(fold)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.starts_with("training_log_")
                    && std::fs::read_to_string(e.path()).is_ok_and(|s| s.contains(&want))
            });
        if found {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} never reached epoch {epoch}", fold.display());
}

#[test]
fn sigterm_stops_training_with_checkpoint_latest_and_c_finishes_bit_exactly() {
    let env = prepared();
    let args = [
        "train",
        "991",
        "2d",
        "0",
        "--num_epochs",
        "2",
        "--num_iterations_per_epoch",
        "8",
        "--num_val_iterations_per_epoch",
        "2",
    ];
    env.ok(&args);
    let model = env
        .res
        .join("Dataset991_Demo2D/nnUNetTrainer__nnUNetPlans__2d");
    let straight = env.res.join("straight");
    std::fs::rename(&model, &straight).unwrap();

    let child = env
        .command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fold = model.join("fold_0");
    wait_for_epoch(&fold, 1);
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(trainer::STOPPED_EXIT_CODE),
        "exit status {:?}\n{stderr}",
        out.status
    );
    assert!(stderr.contains("continue with --c"), "{stderr}");
    assert!(fold.join("checkpoint_latest.safetensors").is_file());
    assert!(!fold.join("checkpoint_final.safetensors").exists());

    let mut resumed = args.to_vec();
    resumed.push("--c");
    env.ok(&resumed);
    assert_same_checkpoint(
        &straight.join("fold_0/checkpoint_final.safetensors"),
        &fold.join("checkpoint_final.safetensors"),
    );
    assert!(!fold.join("checkpoint_latest.safetensors").exists());
}

#[test]
fn cross_validate_runs_folds_then_find_best_skips_finished_and_lists_failures() {
    let env = prepared();
    let cv = |extra: &[&str]| {
        let mut a = vec![
            "cross_validate",
            "991",
            "-c",
            "2d",
            "-f",
            "0",
            "1",
            "--num_epochs",
            "1",
            "--num_iterations_per_epoch",
            "3",
            "--num_val_iterations_per_epoch",
            "1",
        ];
        a.extend(extra);
        env.nnseg(&a)
    };
    // two training images as the images to predict
    let input = env.res.join("to_predict");
    std::fs::create_dir_all(&input).unwrap();
    let mut images: Vec<_> = std::fs::read_dir(env.raw.join("Dataset991_Demo2D/imagesTr"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    images.sort();
    for p in &images[..2] {
        std::fs::copy(p, input.join(p.file_name().unwrap())).unwrap();
    }
    let predicted = env.res.join("predicted");
    let out = cv(&[
        "--then",
        "find_best_configuration",
        "--predict",
        input.to_str().unwrap(),
        predicted.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("4 job(s) in 3 level(s); 0 training(s) already finished"),
        "{stdout}"
    );
    assert!(
        stderr.contains("[cross_validate] level 3/3: 1 done"),
        "{stderr}"
    );
    let res = env.res.join("Dataset991_Demo2D");
    let model = res.join("nnUNetTrainer__nnUNetPlans__2d");
    for f in ["0", "1"] {
        assert!(model
            .join(format!("fold_{f}/checkpoint_final.safetensors"))
            .is_file());
        let log = std::fs::read_to_string(res.join(format!(
            "cross_validate/logs/nnUNetTrainer__nnUNetPlans__2d_fold_{f}.log"
        )))
        .unwrap();
        assert!(
            log.contains(&format!("=== nnseg train 991 2d {f} -tr nnUNetTrainer")),
            "{log}"
        );
    }
    let info = common::json(&res.join("inference_information.json"));
    assert_eq!(
        info["best_model_or_ensemble"]["selected_model_or_models"][0]["configuration"],
        "2d"
    );

    // the recommended model (2d) and postprocessing predicted both images
    let written: Vec<_> = std::fs::read_dir(&predicted)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !n.ends_with(".json"))
        .collect();
    assert_eq!(written.len(), 2, "{written:?}");
    assert!(env.res.join("predicted_before_postprocessing").is_dir());

    // a rerun trains nothing again
    let out = cv(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success());
    assert!(
        stdout.contains("0 job(s) in 0 level(s); 2 training(s) already finished"),
        "{stdout}"
    );

    // a failing job: exit code 1 and the job named with its log
    let out = cv(&["-tr", "NoSuchTrainer"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("2 job(s) failed")
            && stderr.contains("NoSuchTrainer__nnUNetPlans__2d_fold_0 (log: "),
        "{stderr}"
    );

    // the Slurm launcher's dry run writes the scripts and submits nothing
    let out = cv(&[
        "--launcher",
        "slurm",
        "--dry-run",
        "-tr",
        "nnUNetTrainer_5epochs",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("sbatch --parsable"), "{stdout}");
    let script = std::fs::read_to_string(res.join("cross_validate/slurm/level_0.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --array=0-1\n"), "{script}");
    assert!(!res.join("cross_validate/slurm/submitted.json").exists());
}

#[test]
fn cross_validate_stopped_by_sigterm_continues_on_rerun() {
    let env = prepared();
    let args = [
        "cross_validate",
        "991",
        "-c",
        "2d",
        "-f",
        "0",
        "--num_epochs",
        "2",
        "--num_iterations_per_epoch",
        "8",
        "--num_val_iterations_per_epoch",
        "1",
    ];
    let child = env
        .command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fold = env
        .res
        .join("Dataset991_Demo2D/nnUNetTrainer__nnUNetPlans__2d/fold_0");
    wait_for_epoch(&fold, 1);
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(trainer::STOPPED_EXIT_CODE),
        "{stderr}"
    );
    assert!(stderr.contains("rerun the same command"), "{stderr}");
    assert!(fold.join("checkpoint_latest.safetensors").is_file());

    env.ok(&args);
    assert!(fold.join("checkpoint_final.safetensors").is_file());
    let resumed = std::fs::read_dir(&fold).unwrap().flatten().any(|e| {
        std::fs::read_to_string(e.path())
            .is_ok_and(|s| s.contains("Resuming from") && s.contains("checkpoint_latest"))
    });
    assert!(resumed, "the rerun did not continue from checkpoint_latest");
}
