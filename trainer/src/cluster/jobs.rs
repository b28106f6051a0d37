//! The plan of a cross-validation: which `nnseg` commands run, in which dependency level.

use super::ClusterError;
use crate::checkpoint::CheckpointKind;
use datasets::{ModelId, ResultsDir};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// nnU-Net's configurations, in the order `cross_validate` trains those the plans have when
/// none are named.
pub const DEFAULT_CONFIGURATIONS: [&str; 4] =
    ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"];

/// The configurations to train (`requested`, or [`DEFAULT_CONFIGURATIONS`] the plans have)
/// and each one's previous stage; a requested configuration the plans lack is an error.
pub fn configurations_from_plans(
    plans: &plans::Plans,
    requested: &[String],
) -> Result<(Vec<String>, BTreeMap<String, String>), ClusterError> {
    let names = plans.configuration_names();
    let configurations: Vec<String> = if requested.is_empty() {
        DEFAULT_CONFIGURATIONS
            .iter()
            .filter(|c| names.iter().any(|n| n == *c))
            .map(|c| c.to_string())
            .collect()
    } else {
        requested.to_vec()
    };
    let mut previous = BTreeMap::new();
    for c in &configurations {
        if let Some(p) = plans.configuration(c)?.previous_stage {
            previous.insert(c.clone(), p);
        }
    }
    Ok((configurations, previous))
}

/// What `nnseg cross_validate` was asked for.
#[derive(Debug, Clone)]
pub struct CrossValidation {
    /// The dataset as given on the command line (`991`, `Dataset991_Demo2D`), put into the
    /// jobs' command lines.
    pub dataset: String,
    /// `nnUNet_results/DatasetXXX_Name`.
    pub results: ResultsDir,
    /// Configurations in the order to train them.
    pub configurations: Vec<String>,
    /// Configuration → the configuration it is the next stage of (`3d_cascade_fullres` →
    /// `3d_lowres`), from the plans.
    pub previous_stage: BTreeMap<String, String>,
    pub trainers: Vec<String>,
    /// Plans identifier.
    pub plans: String,
    pub folds: Vec<String>,
    /// Flags given to every `nnseg train` (`--npz`, `--num_epochs 1`, ...).
    pub train_args: Vec<String>,
    /// Run `find_best_configuration` after the trainings, with these extra flags.
    pub find_best: Option<Vec<String>>,
    /// Then predict the images of the first folder into the second with the recommended
    /// model or ensemble and postprocessing (needs `find_best_configuration`: it runs even
    /// when `find_best` is `None`).
    pub predict: Option<(PathBuf, PathBuf)>,
}

/// One job's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    Train {
        model: ModelId,
        fold: String,
    },
    FindBest,
    /// `predict_best_configuration`.
    Predict,
}

/// One `nnseg` invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Unique and usable as a file name: `{trainer}__{plans}__{configuration}_fold_{f}`,
    /// `find_best_configuration` or `predict_best_configuration`.
    pub name: String,
    pub kind: JobKind,
    /// The arguments of `nnseg` (a launcher may add `--device`).
    pub args: Vec<String>,
}

/// Jobs in dependency levels: every job of a level needs all jobs of the levels before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobPlan {
    pub levels: Vec<Vec<Job>>,
    /// Trainings left out because their `checkpoint_final` exists.
    pub finished: Vec<Job>,
}

impl JobPlan {
    pub fn job_count(&self) -> usize {
        self.levels.iter().map(Vec::len).sum()
    }
}

/// The dependency depth of each configuration: 0 unless its previous stage is trained in
/// this cross-validation too, then one more than that stage's.
fn stage_depths(cv: &CrossValidation) -> Result<BTreeMap<String, usize>, ClusterError> {
    let mut depths = BTreeMap::new();
    for c in &cv.configurations {
        let mut depth = 0;
        let mut at = c;
        while let Some(prev) = cv.previous_stage.get(at) {
            if !cv.configurations.contains(prev) {
                break;
            }
            depth += 1;
            if depth > cv.configurations.len() {
                return Err(ClusterError::StageCycle {
                    configuration: c.clone(),
                });
            }
            at = prev;
        }
        depths.insert(c.clone(), depth);
    }
    Ok(depths)
}

fn train_job(cv: &CrossValidation, model: ModelId, fold: &str) -> Job {
    let mut args: Vec<String> = [
        "train",
        &cv.dataset,
        model.configuration(),
        fold,
        "-tr",
        model.trainer(),
        "-p",
        model.plans(),
        "--c",
    ]
    .map(String::from)
    .to_vec();
    args.extend(cv.train_args.iter().cloned());
    Job {
        name: format!("{model}_fold_{fold}"),
        kind: JobKind::Train {
            model,
            fold: fold.to_string(),
        },
        args,
    }
}

fn find_best_job(cv: &CrossValidation, extra: &[String]) -> Job {
    let mut args = vec!["find_best_configuration".to_string(), cv.dataset.clone()];
    args.push("-c".into());
    args.extend(cv.configurations.iter().cloned());
    args.push("-tr".into());
    args.extend(cv.trainers.iter().cloned());
    args.extend(["-p".to_string(), cv.plans.clone(), "-f".to_string()]);
    args.extend(cv.folds.iter().cloned());
    args.extend(extra.iter().cloned());
    Job {
        name: "find_best_configuration".into(),
        kind: JobKind::FindBest,
        args,
    }
}

/// `true` when the training's `checkpoint_final` exists.
pub fn is_finished(results: &ResultsDir, job: &Job) -> bool {
    match &job.kind {
        JobKind::Train { model, fold } => results
            .model(model)
            .fold(fold)
            .join(CheckpointKind::Final.file_name())
            .is_file(),
        JobKind::FindBest | JobKind::Predict => false,
    }
}

/// Expands `cv` into levels (configuration × trainer × fold in that order within a level;
/// a cascade stage one level after its previous stage; `find_best_configuration` alone in
/// the last level), leaving out finished trainings and empty levels.
pub fn plan_jobs(cv: &CrossValidation) -> Result<JobPlan, ClusterError> {
    let depths = stage_depths(cv)?;
    let n_levels = depths.values().max().map_or(0, |d| d + 1);
    let mut plan = JobPlan {
        levels: vec![Vec::new(); n_levels],
        finished: Vec::new(),
    };
    for c in &cv.configurations {
        for t in &cv.trainers {
            let model = ModelId::new(t, &cv.plans, c)?;
            for f in &cv.folds {
                let job = train_job(cv, model.clone(), f);
                if is_finished(&cv.results, &job) {
                    plan.finished.push(job);
                } else {
                    plan.levels[depths[c]].push(job);
                }
            }
        }
    }
    match (&cv.find_best, &cv.predict) {
        (Some(extra), _) => plan.levels.push(vec![find_best_job(cv, extra)]),
        (None, Some(_)) => plan.levels.push(vec![find_best_job(cv, &[])]),
        (None, None) => {}
    }
    if let Some((input, output)) = &cv.predict {
        let args = [
            "predict_best_configuration".to_string(),
            cv.dataset.clone(),
            "-i".into(),
            input.display().to_string(),
            "-o".into(),
            output.display().to_string(),
        ];
        plan.levels.push(vec![Job {
            name: "predict_best_configuration".into(),
            kind: JobKind::Predict,
            args: args.to_vec(),
        }]);
    }
    plan.levels.retain(|l| !l.is_empty());
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cv(results: &std::path::Path, configurations: &[&str]) -> CrossValidation {
        CrossValidation {
            dataset: "991".into(),
            results: ResultsDir::new(results),
            configurations: configurations.iter().map(|s| s.to_string()).collect(),
            previous_stage: BTreeMap::from([(
                "3d_cascade_fullres".to_string(),
                "3d_lowres".to_string(),
            )]),
            trainers: vec!["nnUNetTrainer".into()],
            plans: "nnUNetPlans".into(),
            folds: vec!["0".into(), "1".into()],
            train_args: vec!["--npz".into()],
            find_best: None,
            predict: None,
        }
    }

    fn names(level: &[Job]) -> Vec<&str> {
        level.iter().map(|j| j.name.as_str()).collect()
    }

    #[test]
    fn configuration_times_trainer_times_fold_in_one_level() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cv(tmp.path(), &["2d", "3d_fullres"]);
        c.trainers.push("nnUNetTrainer_5epochs".into());
        let plan = plan_jobs(&c).unwrap();
        assert_eq!(plan.levels.len(), 1);
        assert_eq!(
            names(&plan.levels[0]),
            [
                "nnUNetTrainer__nnUNetPlans__2d_fold_0",
                "nnUNetTrainer__nnUNetPlans__2d_fold_1",
                "nnUNetTrainer_5epochs__nnUNetPlans__2d_fold_0",
                "nnUNetTrainer_5epochs__nnUNetPlans__2d_fold_1",
                "nnUNetTrainer__nnUNetPlans__3d_fullres_fold_0",
                "nnUNetTrainer__nnUNetPlans__3d_fullres_fold_1",
                "nnUNetTrainer_5epochs__nnUNetPlans__3d_fullres_fold_0",
                "nnUNetTrainer_5epochs__nnUNetPlans__3d_fullres_fold_1",
            ]
        );
        assert_eq!(
            plan.levels[0][2].args,
            [
                "train",
                "991",
                "2d",
                "0",
                "-tr",
                "nnUNetTrainer_5epochs",
                "-p",
                "nnUNetPlans",
                "--c",
                "--npz"
            ]
        );
    }

    #[test]
    fn every_lowres_fold_before_the_cascade_and_find_best_last() {
        let tmp = tempfile::tempdir().unwrap();
        // given in the "wrong" order: the cascade first
        let mut c = cv(tmp.path(), &["3d_cascade_fullres", "2d", "3d_lowres"]);
        c.find_best = Some(vec!["--disable_ensembling".into()]);
        let plan = plan_jobs(&c).unwrap();
        assert_eq!(plan.levels.len(), 3);
        assert_eq!(
            names(&plan.levels[0]),
            [
                "nnUNetTrainer__nnUNetPlans__2d_fold_0",
                "nnUNetTrainer__nnUNetPlans__2d_fold_1",
                "nnUNetTrainer__nnUNetPlans__3d_lowres_fold_0",
                "nnUNetTrainer__nnUNetPlans__3d_lowres_fold_1",
            ]
        );
        assert_eq!(
            names(&plan.levels[1]),
            [
                "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres_fold_0",
                "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres_fold_1",
            ]
        );
        let fb = &plan.levels[2];
        assert_eq!(names(fb), ["find_best_configuration"]);
        assert_eq!(
            fb[0].args.join(" "),
            "find_best_configuration 991 -c 3d_cascade_fullres 2d 3d_lowres -tr nnUNetTrainer \
             -p nnUNetPlans -f 0 1 --disable_ensembling"
        );
        assert_eq!(plan.job_count(), 7);
    }

    #[test]
    fn predict_comes_after_find_best_which_it_implies() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cv(tmp.path(), &["2d"]);
        c.predict = Some(("/in".into(), "/out".into()));
        let plan = plan_jobs(&c).unwrap();
        assert_eq!(plan.levels.len(), 3);
        assert_eq!(names(&plan.levels[1]), ["find_best_configuration"]);
        assert_eq!(
            plan.levels[2][0].args.join(" "),
            "predict_best_configuration 991 -i /in -o /out"
        );
        assert_eq!(plan.levels[2][0].kind, JobKind::Predict);
    }

    #[test]
    fn a_cascade_without_its_lowres_stage_has_no_level_to_wait_for() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = plan_jobs(&cv(tmp.path(), &["3d_cascade_fullres"])).unwrap();
        assert_eq!(plan.levels.len(), 1);
        assert_eq!(plan.levels[0].len(), 2);
    }

    #[test]
    fn finished_folds_are_left_out_and_empty_levels_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cv(tmp.path(), &["3d_lowres", "3d_cascade_fullres"]);
        for f in ["0", "1"] {
            let model = ModelId::new("nnUNetTrainer", "nnUNetPlans", "3d_lowres").unwrap();
            let fold = c.results.model(&model).fold(f);
            std::fs::create_dir_all(&fold).unwrap();
            std::fs::write(fold.join("checkpoint_final.safetensors"), b"x").unwrap();
        }
        // a checkpoint_latest alone is not finished
        let model = ModelId::new("nnUNetTrainer", "nnUNetPlans", "3d_cascade_fullres").unwrap();
        let fold = c.results.model(&model).fold("1");
        std::fs::create_dir_all(&fold).unwrap();
        std::fs::write(fold.join("checkpoint_latest.safetensors"), b"x").unwrap();
        let plan = plan_jobs(&c).unwrap();
        assert_eq!(plan.finished.len(), 2);
        assert_eq!(
            plan.levels.len(),
            1,
            "the lowres level is empty and dropped"
        );
        assert_eq!(
            names(&plan.levels[0]),
            [
                "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres_fold_0",
                "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres_fold_1",
            ]
        );
    }

    #[test]
    fn a_stage_cycle_and_an_unsafe_name_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cv(tmp.path(), &["a", "b"]);
        c.previous_stage = BTreeMap::from([
            ("a".to_string(), "b".to_string()),
            ("b".to_string(), "a".to_string()),
        ]);
        assert!(matches!(
            plan_jobs(&c),
            Err(ClusterError::StageCycle { .. })
        ));
        let mut c = cv(tmp.path(), &["2d"]);
        c.trainers = vec!["a__b".into()];
        assert!(matches!(plan_jobs(&c), Err(ClusterError::Name(_))));
    }
}
