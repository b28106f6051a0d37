//! `nnseg train`'s fine-tuning and checkpoint flags (issue 21, item 3) on the 2D demo with a
//! tiny network: `-pretrained_weights`, `--disable_checkpointing`, `--val_best`, and
//! extending a finished run with `--c` and a larger `--num_epochs`.

mod common;

use std::path::{Path, PathBuf};

use common::{tiny_2d_plans, Env};

const DATASET: &str = "Dataset991_Demo2D";
const MODEL: &str = "nnUNetTrainer_5epochs__nnUNetPlans__2d";

fn train(fold: &str, epochs: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "991",
        "2d",
        fold,
        "--tr",
        "nnUNetTrainer_5epochs",
        "--num_iterations_per_epoch",
        "2",
        "--num_val_iterations_per_epoch",
        "1",
        "--num_epochs",
        epochs,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

fn fold_folder(env: &Env, fold: &str) -> PathBuf {
    env.res
        .join(DATASET)
        .join(MODEL)
        .join(format!("fold_{fold}"))
}

/// All training logs of a fold, oldest first.
fn logs(fold: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fold)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("training_log_")
        })
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

fn safetensors_in(fold: &Path) -> Vec<String> {
    std::fs::read_dir(fold)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".safetensors"))
        .collect()
}

#[test]
fn pretrained_weights_disable_checkpointing_val_best_and_extending() {
    let env = Env::new();
    env.ok(&["make_demo_dataset"]);
    env.ok(&["plan_and_preprocess", "-d", "991", "-c", "2d", "-np", "1"]);
    tiny_2d_plans(&env);
    env.ok(&strs(&train("0", "2", &[])));
    let fold0 = fold_folder(&env, "0");
    let source = fold0.join("checkpoint_final.safetensors");
    let ck = trainer::Checkpoint::load(&source, &candle_core::Device::Cpu).unwrap();
    let n_weights = ck.network_weights.len();
    let src = source.to_str().unwrap();

    // -pretrained_weights: refused with --c, loads every weight of the same network
    let e = env.fails(&strs(&train(
        "1",
        "1",
        &["-pretrained_weights", src, "--c"],
    )));
    assert!(e.contains("cannot be combined"), "{e}");
    env.ok(&strs(&train("1", "1", &["-pretrained_weights", src])));
    let log1 = logs(&fold_folder(&env, "1"));
    let want = format!("Loaded {n_weights} pretrained weight(s) from {src}; 0 checkpoint");
    assert!(log1.contains(&want), "`{want}` not in\n{log1}");
    assert!(!log1.contains("Skipped"), "{log1}");
    let missing = env.fails(&strs(&train(
        "2",
        "1",
        &["-pretrained_weights", "/nonexistent.pth"],
    )));
    assert!(missing.contains("/nonexistent.pth"), "{missing}");

    // --disable_checkpointing: no checkpoint kept, the final validation still runs
    let e = env.fails(&strs(&train(
        "2",
        "1",
        &["--disable_checkpointing", "--val_best"],
    )));
    assert!(e.contains("--val_best cannot be combined"), "{e}");
    env.ok(&strs(&train("2", "1", &["--disable_checkpointing"])));
    let fold2 = fold_folder(&env, "2");
    assert_eq!(safetensors_in(&fold2), Vec::<String>::new());
    assert!(fold2.join("validation/summary.json").is_file());
    assert!(logs(&fold2)
        .contains("the final validation used the trained weights; no checkpoint was kept"));

    // --val --val_best: validation from checkpoint_best
    assert!(fold0.join("checkpoint_best.safetensors").is_file());
    std::fs::remove_dir_all(fold0.join("validation")).unwrap();
    env.ok(&strs(&train("0", "2", &["--val", "--val_best"])));
    let log0 = logs(&fold0);
    assert!(
        log0.contains("--val_best: validating with checkpoint_best.safetensors"),
        "{log0}"
    );
    assert!(
        log0.contains("checkpoint_best.safetensors (epoch"),
        "{log0}"
    );
    assert!(fold0.join("validation").join("summary.json").is_file());

    // --c with a larger --num_epochs extends the finished run
    env.ok(&strs(&train("0", "3", &["--c"])));
    let log0 = logs(&fold0);
    assert!(
        log0.contains("Extending the finished training from 2 to 3 epochs"),
        "{log0}"
    );
    let meta = trainer::Checkpoint::load_meta(&source).unwrap();
    assert_eq!(meta.current_epoch, 3);
    assert_eq!(meta.logging.train_losses.len(), 3);
    // the third epoch's learning rate is poly(2, 3), not the end of the 2-epoch schedule
    let lr = meta.logging.lrs[2];
    let want = 0.01 * (1.0f64 - 2.0 / 3.0).powf(0.9);
    assert!((lr - want).abs() < 1e-9, "lr {lr} != {want}");
}
