//! End to end: `predict -num_parts N -part_id K` splits the cases between runs sharing one
//! output folder (each with its own incomplete-marker), and `--continue_prediction` redoes only
//! the cases whose outputs are missing.

use std::fs;

mod common;
use common::{pngs, predict_tiny_2d, train_tiny_2d, Env};

#[test]
fn parts_share_a_folder_and_continue_redoes_only_missing_cases() {
    let env = Env::new();
    train_tiny_2d(&env);
    let images = env.raw.join("Dataset991_Demo2D/imagesTr");
    let work = tempfile::tempdir().unwrap();
    let whole = work.path().join("whole");
    predict_tiny_2d(&env, &images, &whole, &["--disable_tta"]);
    let all = pngs(&whole);
    assert!(all.len() >= 5, "{}", all.len());

    // three parts into one folder: each predicts every third case, together all of them
    let parts = work.path().join("parts");
    for k in 0..3 {
        predict_tiny_2d(
            &env,
            &images,
            &parts,
            &[
                "--disable_tta",
                "-num_parts",
                "3",
                "-part_id",
                &k.to_string(),
            ],
        );
        let done = pngs(&parts);
        let expected: Vec<_> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 <= k)
            .map(|(_, c)| c.clone())
            .collect();
        assert_eq!(done, expected, "after part {k}");
    }
    let markers: Vec<_> = fs::read_dir(&parts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nnseg_prediction_incomplete"))
        .collect();
    assert!(markers.is_empty(), "{markers:?}");
    let e = env.fails(&[
        "predict",
        "-i",
        images.to_str().unwrap(),
        "-o",
        parts.to_str().unwrap(),
        "-d",
        "991",
        "-c",
        "2d",
        "-f",
        "0",
        "-tr",
        "nnUNetTrainer_1epoch",
        "-num_parts",
        "2",
        "-part_id",
        "2",
    ]);
    assert!(e.contains("part_id"), "{e}");

    // an interrupted run lost two cases: --continue_prediction predicts only those
    for (name, _) in &all[..2] {
        fs::remove_file(whole.join(name)).unwrap();
    }
    let log = predict_tiny_2d(
        &env,
        &images,
        &whole,
        &["--disable_tta", "--continue_prediction"],
    );
    let n = all.len();
    assert!(
        log.contains(&format!("{} of {n} cases are done already", n - 2)),
        "{log}"
    );
    assert_eq!(pngs(&whole), all);
}
