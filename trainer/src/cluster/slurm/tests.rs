use super::*;
use crate::cluster::jobs::JobKind;

fn train(name: &str, fold: &str) -> Job {
    Job {
        name: name.into(),
        kind: JobKind::Train {
            model: datasets::ModelId::new("nnUNetTrainer", "nnUNetPlans", "2d").unwrap(),
            fold: fold.into(),
        },
        args: ["train", "991", "2d", fold, "-tr", "nnUNetTrainer", "--c"]
            .map(String::from)
            .to_vec(),
    }
}

fn opts() -> SlurmOptions {
    SlurmOptions {
        program: PathBuf::from("/opt/nnseg/bin/nnseg"),
        env: vec![("nnUNet_results".into(), "/data/my results".into())],
        grace_s: 300,
        ..SlurmOptions::default()
    }
}

#[test]
fn a_cpu_script_has_the_array_requeue_and_signal_and_no_gres() {
    let r = ResultsDir::new("/data/res/Dataset991_Demo2D");
    let jobs = [train("a_fold_0", "0"), train("a_fold_1", "1")];
    let text = sbatch_script((0, 2), &jobs, &r, &opts());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "#!/bin/bash");
    for want in [
        "#SBATCH --job-name=nnseg_Dataset991_Demo2D_L0",
        "#SBATCH --array=0-1",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --output=/data/res/Dataset991_Demo2D/cross_validate/logs/slurm_%x_%A_%a.out",
        "export nnUNet_results='/data/my results'",
        "NNSEG=/opt/nnseg/bin/nnseg",
        "  a_fold_1",
        "  'train 991 2d 1 -tr nnUNetTrainer --c'",
        "if [ \"$STATUS\" -eq 75 ]; then",
    ] {
        assert!(lines.contains(&want), "missing `{want}` in\n{text}");
    }
    for absent in [
        "--gres",
        "--partition",
        "--account",
        "--time",
        "--mem",
        "--cpus",
    ] {
        assert!(!text.contains(absent), "`{absent}` in\n{text}");
    }
    assert!(text.contains("trap 'kill -TERM $PID 2>/dev/null' USR1 TERM"));
}

#[test]
fn resources_and_gpus_become_sbatch_flags_and_the_device() {
    let r = ResultsDir::new("/res/D");
    let o = SlurmOptions {
        partition: Some("gpu".into()),
        account: Some("lab".into()),
        time: Some("2-00:00:00".into()),
        mem: Some("64G".into()),
        cpus_per_task: Some(8),
        max_parallel: Some(4),
        gpu: true,
        ..opts()
    };
    let text = sbatch_script((1, 3), &[train("a_fold_0", "0")], &r, &o);
    for want in [
        "#SBATCH --array=0-0%4",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --mem=64G",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --gres=gpu:1",
        "  'train 991 2d 0 -tr nnUNetTrainer --c --device cuda'",
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "missing `{want}` in\n{text}"
        );
    }
    assert!(text.contains("dependency level 2 of 3"));
}

#[test]
fn arguments_with_spaces_survive_the_script() {
    // the ARGS line is run through bash's eval: check with a real bash
    let r = ResultsDir::new("/res/D");
    let mut j = train("a_fold_0", "0");
    j.args = vec!["x y".into(), "it's".into(), "$HOME".into()];
    let text = sbatch_script((0, 1), &[j], &r, &opts());
    let line = text
        .lines()
        .skip_while(|l| *l != "ARGS=(")
        .nth(1)
        .unwrap()
        .to_string();
    let script = format!("ARGS=(\n{line}\n)\neval \"set -- ${{ARGS[0]}}\"\nprintf '%s\\n' \"$@\"");
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x y\nit's\n$HOME\n");
}

#[test]
fn sbatch_commands_chain_with_afterok() {
    assert_eq!(
        sbatch_command(Path::new("/s/level_1.sbatch"), Some("123")),
        [
            "sbatch",
            "--parsable",
            "--dependency=afterok:123",
            "/s/level_1.sbatch"
        ]
    );
    assert_eq!(
        sbatch_command(Path::new("/s/level_0.sbatch"), None),
        ["sbatch", "--parsable", "/s/level_0.sbatch"]
    );
    assert_eq!(parse_sbatch_output("c", "4711\n").unwrap(), "4711");
    assert_eq!(parse_sbatch_output("c", "4711;cluster1\n").unwrap(), "4711");
    assert!(parse_sbatch_output("c", "sbatch: error: x").is_err());
}

#[test]
fn dry_run_writes_scripts_and_submits_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let r = ResultsDir::new(tmp.path());
    let plan = JobPlan {
        levels: vec![vec![train("a_fold_0", "0")], vec![train("b_fold_0", "0")]],
        finished: vec![],
    };
    let mut scripts = write_scripts(&plan, &r, &opts()).unwrap();
    assert_eq!(scripts.len(), 2);
    assert!(scripts[1]
        .script
        .ends_with("cross_validate/slurm/level_1.sbatch"));
    assert!(scripts[1].script.is_file());
    assert!(
        r.cross_validate().join("logs").is_dir(),
        "sbatch --output needs it"
    );
    let cmds = submit(&mut scripts, &r, true).unwrap();
    assert_eq!(cmds[1][2], "--dependency=afterok:<level 0>");
    assert!(!record_file(&r).exists());
}

#[test]
fn squeue_and_sacct_lines_are_parsed_and_merged() {
    let live = parse_states("12_0|RUNNING\n12_[1-2,4%2]|PENDING\n");
    assert_eq!(
        live,
        [
            ("12".to_string(), 0, "RUNNING".to_string()),
            ("12".to_string(), 1, "PENDING".to_string()),
            ("12".to_string(), 2, "PENDING".to_string()),
            ("12".to_string(), 4, "PENDING".to_string()),
        ]
    );
    let past = parse_states("11_0|COMPLETED\n11_1|CANCELLED by 0\n12_0|FAILED\n");
    let tmp = tempfile::tempdir().unwrap();
    let r = ResultsDir::new(tmp.path());
    let model = datasets::ModelId::new("nnUNetTrainer", "nnUNetPlans", "2d").unwrap();
    let fold0 = r.model(&model).fold("0");
    std::fs::create_dir_all(&fold0).unwrap();
    std::fs::write(fold0.join("checkpoint_final.safetensors"), b"").unwrap();
    let scripts = [
        LevelScript {
            level: 0,
            script: "l0".into(),
            jobs: vec![
                format!("{model}_fold_0"),
                format!("{model}_fold_1"),
                "x_fold_9".into(),
            ],
            job_id: Some("11".into()),
        },
        LevelScript {
            level: 1,
            script: "l1".into(),
            jobs: vec!["find_best_configuration".into()],
            job_id: Some("12".into()),
        },
    ];
    let s = merge_states(&scripts, &live, &past, &r);
    assert_eq!(s.len(), 4);
    assert_eq!(s[0].slurm_id, "11_0");
    assert_eq!(s[0].slurm_state.as_deref(), Some("COMPLETED"));
    assert_eq!(s[0].results_state, "finished (checkpoint_final)");
    assert_eq!(s[1].slurm_state.as_deref(), Some("CANCELLED"));
    assert_eq!(s[1].results_state, "not started");
    assert_eq!(s[2].slurm_state, None);
    assert_eq!(s[2].results_state, "unknown job");
    assert_eq!(s[3].slurm_state.as_deref(), Some("RUNNING"), "squeue wins");
    assert_eq!(s[3].results_state, "not run yet");
}
