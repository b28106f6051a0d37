//! `nnUNetv2_find_best_configuration` as a library function
//! (`evaluation/find_best_configuration.py`).
//!
//! For each trained model the fold validation predictions are merged into
//! `crossval_results_folds_{folds}/` and evaluated; with ensembling allowed every pair of models
//! is ensembled (needs the validation probabilities, `{case}.npz` + `{case}.json`, written by
//! validation with `--npz`; pairs without them are skipped with a message) into
//! `ensembles/ensemble___A___B___{folds}/` and evaluated. The best `foreground_mean.Dice` wins
//! (ties: the first, so single models beat ensembles). Postprocessing is determined on the
//! winner; `inference_information.json` and `inference_instructions.txt` are written to the
//! dataset's results folder.

use std::path::{Path, PathBuf};

use datasets::layout::{ensemble_name, PredictionDir};
use datasets::{ModelDir, ModelId, PreprocessedDir, ResultsDir};

use super::ensemble::{ensemble_folders, EnsembleOptions};
use super::evaluate::{evaluate_folder, EvaluateOptions, Summary};
use super::json::{write_json_nan_atomic, Json};
use super::postprocess::{determine_postprocessing, PostprocessOptions};
use super::{io_err, list_files, EvalError, Result};

/// One trained model (`{trainer}__{plans}__{configuration}` folder).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub id: ModelId,
    /// The configuration's `previous_stage` (e.g. `3d_lowres` for `3d_cascade_fullres`); its
    /// prediction must run first and be passed with `-prev_stage_predictions`.
    pub previous_stage: Option<String>,
    /// `nnUNet_results/DatasetXXX_Name/{trainer}__{plans}__{configuration}`.
    pub folder: ModelDir,
}

impl ModelSpec {
    /// `{trainer}__{plans}__{configuration}`.
    pub fn identifier(&self) -> String {
        self.id.to_string()
    }
}

/// The trained models among `trainers × plans × configurations` (nnU-Net's loop order): the
/// plans come from `pre/{plans}.json`; a configuration not in the plans or without a model
/// folder in `results` is skipped with a log message.
pub fn find_trained_models(
    pre: &PreprocessedDir,
    results: &ResultsDir,
    trainers: &[String],
    plans_names: &[String],
    configurations: &[String],
) -> Result<Vec<ModelSpec>> {
    let mut models = Vec::new();
    for tr in trainers {
        for p in plans_names {
            let plans = plans::Plans::load(&pre.plans_file(p))?;
            let names = plans.configuration_names();
            for c in configurations {
                let id = ModelId::new(tr.as_str(), p.as_str(), c.as_str())?;
                let folder = results.model(&id);
                if !names.contains(c) || !folder.path().is_dir() {
                    tracing::info!("{id}: not trained, skipped");
                    continue;
                }
                models.push(ModelSpec {
                    previous_stage: plans.configuration(c)?.previous_stage,
                    id,
                    folder,
                });
            }
        }
    }
    Ok(models)
}

/// Options of [`find_best_configuration`].
#[derive(Clone, Debug)]
pub struct BestConfigOptions {
    /// `DatasetXXX_Name`, used in the instructions.
    pub dataset_name: String,
    /// `nnUNet_results/DatasetXXX_Name`: receives `ensembles/`, `inference_information.json`,
    /// `inference_instructions.txt`.
    pub results: ResultsDir,
    /// `nnUNet_preprocessed/DatasetXXX`: the ground truth is its `gt_segmentations/`
    /// (nnU-Net's choice), checked against its completion record before it is used.
    pub preprocessed: PreprocessedDir,
    pub models: Vec<ModelSpec>,
    /// Fold names, e.g. `["0", "1", "2", "3", "4"]`.
    pub folds: Vec<String>,
    pub allow_ensembling: bool,
    pub num_workers: usize,
    /// dataset.json: file ending, labels/regions, ignore label, regions_class_order.
    pub dataset_json: plans::DatasetJson,
}

/// What [`find_best_configuration`] found.
#[derive(Clone, Debug)]
pub struct BestConfigResult {
    /// `(identifier, source folder, foreground_mean Dice)` for every evaluated model/ensemble.
    pub all_results: Vec<(String, PathBuf, f64)>,
    /// Identifier of the winner.
    pub best: String,
    /// The winning model(s): one, or two for an ensemble.
    pub selected: Vec<ModelSpec>,
    pub score_pre_pp: f64,
    pub score_post_pp: f64,
    pub postprocessing_file: PathBuf,
    /// Human-readable notes (skipped ensembles and why).
    pub messages: Vec<String>,
    pub instructions: String,
}

fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let bytes = std::fs::read(src).map_err(io_err("read", src))?;
    plans::io::write_atomic(dst, &bytes)?;
    Ok(())
}

/// nnU-Net's `accumulate_cv_results` (the copying part) into the model's
/// `crossval_results_folds_{folds}/`: see [`merge_fold_validations`].
pub fn accumulate_cv_results(
    model: &ModelSpec,
    folds: &[String],
    file_ending: &str,
) -> Result<PathBuf> {
    let merged = model.folder.crossval_results(folds);
    merge_fold_validations(&model.folder, &merged, folds, file_ending)?;
    Ok(merged)
}

/// Copies every fold's `validation/{case}{ending}` (and the `{case}.npz` / `{case}.json`
/// probabilities when present) into `merged` plus the model's `dataset.json` / `plans.json`.
/// An existing `merged` folder is replaced. A case validated in two folds is an error.
pub fn merge_fold_validations(
    model: &ModelDir,
    merged: &Path,
    folds: &[String],
    file_ending: &str,
) -> Result<()> {
    // start fresh (nnU-Net overwrites): stale cases from other folds must not be evaluated
    if merged.is_dir() {
        std::fs::remove_dir_all(merged).map_err(io_err("remove", merged))?;
    }
    std::fs::create_dir_all(merged).map_err(io_err("create", merged))?;
    let out = PredictionDir::new(merged);
    let mut seen: std::collections::BTreeMap<String, String> = Default::default();
    for f in folds {
        let val = model.validation(f);
        if !val.is_dir() {
            return Err(EvalError::Invalid {
                path: val,
                message: format!(
                    "fold {f} of {} has no validation folder; train (or run --val) this fold first",
                    model.path().display()
                ),
            });
        }
        let val_dir = PredictionDir::new(&val);
        for name in list_files(&val, file_ending)? {
            if let Some(prev) = seen.insert(name.clone(), f.clone()) {
                return Err(EvalError::Invalid {
                    path: val.join(&name),
                    message: format!("case validated in both fold {prev} and fold {f}"),
                });
            }
            copy_file(&val.join(&name), &merged.join(&name))?;
            let case = name.strip_suffix(file_ending).unwrap_or(&name);
            for (src, dst) in [
                (val_dir.probabilities(case), out.probabilities(case)),
                (val_dir.properties(case), out.properties(case)),
            ] {
                if src.is_file() {
                    copy_file(&src, &dst)?;
                }
            }
        }
    }
    for (src, dst) in [
        (model.dataset_json(), out.dataset_json()),
        (model.plans_json(), out.plans_json()),
    ] {
        if src.is_file() {
            copy_file(&src, &dst)?;
        }
    }
    Ok(())
}

/// Options of [`accumulate_crossval_results`].
#[derive(Clone, Debug)]
pub struct CrossvalOptions {
    /// The trained model, `nnUNet_results/DatasetXXX/{trainer}__{plans}__{configuration}`.
    pub model: ModelDir,
    /// Fold names, e.g. `["0", "1", "2", "3", "4"]`.
    pub folds: Vec<String>,
    /// Where the merged predictions go; default the model's `crossval_results_folds_{folds}`.
    pub output: Option<PathBuf>,
    /// Ground truth: `nnUNet_preprocessed/DatasetXXX/gt_segmentations`.
    pub reference_folder: PathBuf,
    pub num_workers: usize,
}

/// `nnUNetv2_accumulate_crossval_results`: merges the folds' validation predictions
/// ([`merge_fold_validations`]) and evaluates them against the ground truth with the model's
/// dataset.json (labels or regions, ignore label), writing `summary.json` into the merged
/// folder. As in nnU-Net, only the cases the folds validated are evaluated. Returns the merged
/// folder and the summary.
pub fn accumulate_crossval_results(opts: &CrossvalOptions) -> Result<(PathBuf, Summary)> {
    let dj = opts.model.dataset_json();
    if !dj.is_file() {
        return Err(EvalError::Invalid {
            path: dj,
            message: "the model folder has no dataset.json; is this a trained model?".into(),
        });
    }
    let ds = plans::DatasetJson::load(&dj)?;
    let merged = opts
        .output
        .clone()
        .unwrap_or_else(|| opts.model.crossval_results(&opts.folds));
    merge_fold_validations(&opts.model, &merged, &opts.folds, &ds.file_ending)?;
    let mut eval = EvaluateOptions::from_dataset_json(&ds, opts.num_workers);
    eval.chill = true;
    let summary = evaluate_folder(&opts.reference_folder, &merged, &eval)?;
    Ok((merged, summary))
}

fn has_probabilities(folder: &Path, file_ending: &str) -> Result<bool> {
    let segs = list_files(folder, file_ending)?;
    let dir = PredictionDir::new(folder);
    Ok(!segs.is_empty()
        && segs.iter().all(|s| {
            let case = s.strip_suffix(file_ending).unwrap_or(s);
            dir.probabilities(case).is_file() && dir.properties(case).is_file()
        }))
}

fn predict_cmds(
    m: &ModelSpec,
    dataset: &str,
    folds: &[String],
    output: &str,
    save_probs: bool,
) -> Vec<String> {
    let f = folds.join(" ");
    let mut out = Vec::new();
    let mut prev = String::new();
    if let Some(p) = &m.previous_stage {
        let lowres_out = format!("{output}_{p}");
        out.push(format!(
            "nnseg predict -d {dataset} -i INPUT_FOLDER -o {lowres_out} -f {f} -tr {} -c {p} -p {}",
            m.id.trainer(),
            m.id.plans()
        ));
        prev = format!(" -prev_stage_predictions {lowres_out}");
    }
    out.push(format!(
        "nnseg predict -d {dataset} -i INPUT_FOLDER -o {output} -f {f} -tr {} -c {} -p {}{prev}{}",
        m.id.trainer(),
        m.id.configuration(),
        m.id.plans(),
        if save_probs {
            " --save_probabilities"
        } else {
            ""
        }
    ));
    out
}

/// Refuses a model trained with other labels (or file ending) than the preprocessed
/// `dataset.json` the evaluation uses: its validation would be scored against the wrong
/// classes.
fn check_dataset_json(m: &ModelSpec, ds: &plans::DatasetJson, pre: &PreprocessedDir) -> Result<()> {
    let path = m.folder.dataset_json();
    if !path.is_file() {
        return Ok(());
    }
    let trained = plans::DatasetJson::load(&path)?;
    let differs: Vec<&str> = [
        ("labels", trained.labels != ds.labels),
        (
            "regions_class_order",
            trained.regions_class_order != ds.regions_class_order,
        ),
        ("file_ending", trained.file_ending != ds.file_ending),
    ]
    .into_iter()
    .filter_map(|(k, d)| d.then_some(k))
    .collect();
    if differs.is_empty() {
        return Ok(());
    }
    Err(EvalError::Invalid {
        path,
        message: format!(
            "{} was trained with other {} than {} (changed since training): retrain it, or \
             restore the dataset.json it was trained with",
            m.identifier(),
            differs.join(", "),
            pre.dataset_json().display()
        ),
    })
}

/// Refuses an incomplete or changed `gt_segmentations/` (see
/// `preprocessing::verify_gt_segmentations`) for the cases of `merged`.
fn check_ground_truth(
    pre: &PreprocessedDir,
    dataset_name: &str,
    m: &ModelSpec,
    merged: &Path,
    ds: &plans::DatasetJson,
) -> Result<()> {
    let cases: Vec<String> = list_files(merged, &ds.file_ending)?
        .into_iter()
        .map(|f| {
            f.strip_suffix(ds.file_ending.as_str())
                .unwrap_or(&f)
                .to_string()
        })
        .collect();
    let fix =
        preprocessing::completion::fix_command(dataset_name, m.id.plans(), m.id.configuration());
    preprocessing::verify_gt_segmentations(pre, &cases, &fix)?;
    Ok(())
}

/// `inference_instructions.txt`: the predict (and ensemble, postprocessing) commands of the
/// winner.
fn instructions(
    opts: &BestConfigOptions,
    selected: &[ModelSpec],
    pp_file: &Path,
    plans_file: &Path,
) -> String {
    let mut lines = vec!["***Run inference like this:***".to_string(), String::new()];
    let ensemble = selected.len() > 1;
    if ensemble {
        lines.push("An ensemble won! What a surprise! Run the following commands to run predictions with the ensemble members:".into());
        lines.push(String::new());
        for (i, m) in selected.iter().enumerate() {
            lines.extend(predict_cmds(
                m,
                &opts.dataset_name,
                &opts.folds,
                &format!("OUTPUT_FOLDER_MODEL_{}", i + 1),
                true,
            ));
        }
        lines.push(String::new());
        lines.push("The run ensembling with:".into());
        lines.push(String::new());
        lines.push(format!(
            "nnseg ensemble -i {} -o OUTPUT_FOLDER -np {}",
            (1..=selected.len())
                .map(|i| format!("OUTPUT_FOLDER_MODEL_{i}"))
                .collect::<Vec<_>>()
                .join(" "),
            opts.num_workers
        ));
    } else {
        lines.extend(predict_cmds(
            &selected[0],
            &opts.dataset_name,
            &opts.folds,
            "OUTPUT_FOLDER",
            false,
        ));
    }
    lines.push(String::new());
    lines.push("***Once inference is completed, run postprocessing like this:***".into());
    lines.push(String::new());
    lines.push(format!(
        "nnseg apply_postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP -pp_pkl_file {} -np {} -plans_json {}",
        pp_file.display(),
        opts.num_workers,
        plans_file.display()
    ));
    lines.join("\n") + "\n"
}

/// `inference_information.json` (nnU-Net's keys).
fn information(
    opts: &BestConfigOptions,
    all: &[(String, PathBuf, f64, Vec<ModelSpec>)],
    pp_file: &Path,
    (score, post): (f64, f64),
    plans_file: &Path,
    selected: &[ModelSpec],
) -> Json {
    Json::obj([
        ("dataset_name_or_id", Json::Str(opts.dataset_name.clone())),
        (
            "configurations",
            Json::Arr(
                opts.models
                    .iter()
                    .map(|m| Json::Str(m.id.configuration().to_string()))
                    .collect(),
            ),
        ),
        (
            "folds",
            Json::Arr(
                opts.folds
                    .iter()
                    .map(|f| f.parse::<i64>().map_or(Json::Str(f.clone()), Json::Int))
                    .collect(),
            ),
        ),
        (
            "all_results",
            Json::Obj(
                all.iter()
                    .map(|(id, src, s, _)| {
                        (
                            id.clone(),
                            Json::obj([
                                ("source", Json::Str(src.display().to_string())),
                                ("result", Json::Float(*s)),
                            ]),
                        )
                    })
                    .collect(),
            ),
        ),
        (
            "best_model_or_ensemble",
            Json::obj([
                (
                    "postprocessing_file",
                    Json::Str(pp_file.display().to_string()),
                ),
                ("result_on_crossval_pre_pp", Json::Float(score)),
                ("result_on_crossval_post_pp", Json::Float(post)),
                (
                    "some_plans_file",
                    Json::Str(plans_file.display().to_string()),
                ),
                (
                    "selected_model_or_models",
                    Json::Arr(
                        selected
                            .iter()
                            .map(|m| {
                                Json::obj([
                                    ("configuration", Json::Str(m.id.configuration().to_string())),
                                    ("trainer", Json::Str(m.id.trainer().to_string())),
                                    ("plans_identifier", Json::Str(m.id.plans().to_string())),
                                ])
                            })
                            .collect(),
                    ),
                ),
            ]),
        ),
    ])
}

/// Runs the model selection (see module docs).
pub fn find_best_configuration(opts: &BestConfigOptions) -> Result<BestConfigResult> {
    if opts.models.is_empty() {
        return Err(EvalError::Config(
            "find_best_configuration: no trained models given".into(),
        ));
    }
    let ds = &opts.dataset_json;
    for m in &opts.models {
        check_dataset_json(m, ds, &opts.preprocessed)?;
    }
    let reference_folder = opts.preprocessed.gt_segmentations();
    let mut eval = EvaluateOptions::from_dataset_json(ds, opts.num_workers);
    // nnU-Net's compute_metrics_on_folder defaults to chill=True here: with a subset of folds
    // only the cases those folds validated are evaluated.
    eval.chill = true;
    let mut all: Vec<(String, PathBuf, f64, Vec<ModelSpec>)> = Vec::new();
    let mut messages = Vec::new();
    for m in &opts.models {
        let merged = accumulate_cv_results(m, &opts.folds, &ds.file_ending)?;
        check_ground_truth(&opts.preprocessed, &opts.dataset_name, m, &merged, ds)?;
        eval.output_file = None;
        let s = evaluate_folder(&reference_folder, &merged, &eval)?;
        all.push((m.identifier(), merged, s.foreground_dice(), vec![m.clone()]));
    }
    if opts.allow_ensembling {
        let singles = all.clone();
        for i in 0..singles.len() {
            for j in i + 1..singles.len() {
                let (a, b) = (&singles[i], &singles[j]);
                let id = ensemble_name(&a.0, &b.0, &opts.folds);
                let mut missing = Vec::new();
                for x in [a, b] {
                    if !has_probabilities(&x.1, &ds.file_ending)? {
                        missing.push(x.0.clone());
                    }
                }
                if !missing.is_empty() {
                    let msg = format!(
                        "skipping {id}: no validation probabilities for {} (train/validate with --npz to enable ensembling)",
                        missing.join(", ")
                    );
                    tracing::warn!("{msg}");
                    messages.push(msg);
                    continue;
                }
                let out = opts.results.ensemble(&id);
                if out.is_dir() {
                    std::fs::remove_dir_all(&out).map_err(io_err("remove", &out))?;
                }
                let mut eo = EnsembleOptions::from_dataset_json(ds, opts.num_workers);
                eo.save_probabilities = false;
                ensemble_folders(&[a.1.clone(), b.1.clone()], &out, &eo)?;
                let s = evaluate_folder(&reference_folder, &out, &eval)?;
                all.push((
                    id,
                    out,
                    s.foreground_dice(),
                    vec![a.3[0].clone(), b.3[0].clone()],
                ));
            }
        }
    }
    // best: first maximum (NaN never wins)
    let mut best = 0;
    for (i, r) in all.iter().enumerate() {
        if r.2 > all[best].2 || (all[best].2.is_nan() && !r.2.is_nan()) {
            best = i;
        }
    }
    let (best_id, source, score, selected) = all[best].clone();
    let pp = PostprocessOptions {
        evaluate: eval.clone(),
        keep_postprocessed: true,
    };
    determine_postprocessing(&source, &reference_folder, &pp)?;
    let pp_file = source.join("postprocessing.json");
    let post = super::evaluate::load_summary(&source.join("postprocessed").join("summary.json"))?
        .foreground_dice();
    let plans_file = selected[0].folder.plans_json();

    let instructions = instructions(opts, &selected, &pp_file, &plans_file);
    std::fs::create_dir_all(opts.results.path()).map_err(io_err("create", opts.results.path()))?;
    plans::io::write_atomic(
        &opts.results.inference_instructions(),
        instructions.as_bytes(),
    )?;

    let info = information(opts, &all, &pp_file, (score, post), &plans_file, &selected);
    write_json_nan_atomic(&opts.results.inference_information(), &info, false)?;
    Ok(BestConfigResult {
        all_results: all
            .iter()
            .map(|(a, b, c, _)| (a.clone(), b.clone(), *c))
            .collect(),
        best: best_id,
        selected,
        score_pre_pp: score,
        score_post_pp: post,
        postprocessing_file: pp_file,
        messages,
        instructions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluation::ensemble::{save_probabilities, IMAGE_PROPERTIES_KEY};
    use datasets::io::{write_seg, ImageProperties};
    use ndarray::{Array3, Array4};

    fn seg(path: &Path, v: &[i16]) {
        let a = Array3::from_shape_vec((1, 1, v.len()), v.to_vec()).unwrap();
        write_seg(path, a.view(), &ImageProperties::with_spacing([1.0; 3])).unwrap();
    }

    fn probs(path: &Path, v: &[i16], confidence: f32) {
        let n = v.len();
        let mut p = Array4::<f32>::zeros((2, 1, 1, n));
        for (i, &l) in v.iter().enumerate() {
            p[[l as usize, 0, 0, i]] = confidence;
            p[[1 - l as usize, 0, 0, i]] = 1.0 - confidence;
        }
        let props =
            serde_json::json!({ IMAGE_PROPERTIES_KEY: ImageProperties::with_spacing([1.0; 3]) });
        save_probabilities(path, &p, &props).unwrap();
    }

    struct Setup {
        _t: tempfile::TempDir,
        opts: BestConfigOptions,
    }

    /// Two folds of two cases; model A predicts with one wrong stray voxel per case, model B
    /// (a cascade) predicts perfectly.
    fn setup(with_npz: bool) -> Setup {
        let t = tempfile::tempdir().unwrap();
        let pre = PreprocessedDir::new(t.path().join("pre"));
        let gt = pre.gt_segmentations();
        std::fs::create_dir_all(&gt).unwrap();
        let results = ResultsDir::new(t.path().join("Dataset001_X"));
        let cases: [(&str, &str, [i16; 6]); 4] = [
            ("c0", "0", [1, 1, 0, 0, 0, 0]),
            ("c1", "0", [0, 1, 1, 0, 0, 0]),
            ("c2", "1", [0, 0, 1, 1, 0, 0]),
            ("c3", "1", [0, 0, 0, 1, 1, 0]),
        ];
        let mk = |cfg: &str, prev: Option<&str>| {
            let id = ModelId::new("nnUNetTrainer", "nnUNetPlans", cfg).unwrap();
            ModelSpec {
                previous_stage: prev.map(str::to_string),
                folder: results.model(&id),
                id,
            }
        };
        let a = mk("3d_fullres", None);
        let b = mk("3d_cascade_fullres", Some("3d_lowres"));
        for (case, fold, r) in cases {
            seg(&gt.join(format!("{case}.nii.gz")), &r);
            let mut wrong = r;
            wrong[5] = 1;
            for (m, pred, conf) in [(&a, wrong, 0.6f32), (&b, r, 0.9)] {
                let val = m.folder.validation(fold);
                std::fs::create_dir_all(&val).unwrap();
                seg(&val.join(format!("{case}.nii.gz")), &pred);
                if with_npz {
                    probs(&val.join(format!("{case}.npz")), &pred, conf);
                }
            }
        }
        let ds: plans::DatasetJson = serde_json::from_value(serde_json::json!({
            "channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
            "numTraining": 4, "file_ending": ".nii.gz"}))
        .unwrap();
        let opts = BestConfigOptions {
            dataset_name: "Dataset001_X".into(),
            results,
            preprocessed: pre,
            models: vec![a, b],
            folds: vec!["0".into(), "1".into()],
            allow_ensembling: true,
            num_workers: 2,
            dataset_json: ds,
        };
        Setup { _t: t, opts }
    }

    #[test]
    fn picks_best_and_writes_instructions() {
        let s = setup(true);
        let r = find_best_configuration(&s.opts).unwrap();
        assert_eq!(r.all_results.len(), 3, "{:?}", r.all_results);
        // the ensemble is as good as B (B is more confident) but single models win ties
        assert_eq!(r.all_results[2].2, 1.0);
        assert_eq!(r.best, "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres");
        assert_eq!(r.score_pre_pp, 1.0);
        assert!(r.all_results[0].2 < 1.0);
        let merged = s.opts.models[1]
            .folder
            .path()
            .join("crossval_results_folds_0_1");
        assert!(merged.join("c3.nii.gz").is_file() && merged.join("summary.json").is_file());
        assert!(merged.join("postprocessed/summary.json").is_file());
        let ens = s
            .opts
            .results
            .path()
            .join("ensembles/ensemble___nnUNetTrainer__nnUNetPlans__3d_fullres___nnUNetTrainer__nnUNetPlans__3d_cascade_fullres___0_1");
        assert!(ens.join("c0.nii.gz").is_file());
        let txt = std::fs::read_to_string(s.opts.results.path().join("inference_instructions.txt"))
            .unwrap();
        let low = txt.find("-c 3d_lowres").expect("lowres step");
        let casc = txt.find("-c 3d_cascade_fullres").expect("cascade step");
        assert!(low < casc, "{txt}");
        assert!(
            txt.contains("-prev_stage_predictions OUTPUT_FOLDER_3d_lowres"),
            "{txt}"
        );
        assert!(txt.contains("nnseg apply_postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP"));
        let info = crate::evaluation::json::read_json_with_nan(
            &s.opts.results.path().join("inference_information.json"),
        )
        .unwrap();
        assert_eq!(
            info["best_model_or_ensemble"]["selected_model_or_models"][0]["configuration"],
            "3d_cascade_fullres"
        );
        assert_eq!(info["folds"], serde_json::json!([0, 1]));
    }

    #[test]
    fn ensemble_skipped_without_probabilities_and_pp_helps_a() {
        let mut s = setup(false);
        s.opts.models.truncate(1);
        let id = s.opts.models[0].id.with_configuration("2d").unwrap();
        s.opts.models.push(ModelSpec {
            folder: s.opts.results.model(&id),
            id,
            ..s.opts.models[0].clone()
        });
        // the "2d" model predicts exactly like A: copy A's validation folders
        let src = s.opts.models[0].folder.clone();
        let dst = s.opts.models[1].folder.clone();
        for f in ["0", "1"] {
            let (sv, dv) = (src.validation(f), dst.validation(f));
            std::fs::create_dir_all(&dv).unwrap();
            for e in std::fs::read_dir(&sv).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), dv.join(e.file_name())).unwrap();
            }
        }
        let r = find_best_configuration(&s.opts).unwrap();
        assert_eq!(r.all_results.len(), 2);
        assert_eq!(r.messages.len(), 1);
        assert!(r.messages[0].contains("--npz"), "{}", r.messages[0]);
        assert_eq!(r.best, "nnUNetTrainer__nnUNetPlans__3d_fullres");
        // every case has Dice 0.8; the stray voxel is a separate component in c0..c2 (fixed by
        // postprocessing) but touches the object in c3
        assert!((r.score_pre_pp - 0.8).abs() < 1e-12);
        assert!(
            (r.score_post_pp - 0.95).abs() < 1e-12,
            "{}",
            r.score_post_pp
        );
        let txt = &r.instructions;
        assert!(!txt.contains("3d_lowres") && txt.contains("-c 3d_fullres"));
    }

    #[test]
    fn missing_fold_is_an_error() {
        let mut s = setup(false);
        s.opts.folds.push("2".into());
        let e = find_best_configuration(&s.opts).unwrap_err().to_string();
        assert!(e.contains("fold_2") && e.contains("validation"), "{e}");
    }

    /// Regression (issue 19): an interrupted copy of gt_segmentations (or a case missing or
    /// changed in it) was evaluated against silently.
    #[test]
    fn an_incomplete_ground_truth_is_refused_naming_the_fix() {
        let s = setup(false);
        preprocessing::GtRecord::begin(&s.opts.preprocessed.gt_segmentations()).unwrap();
        let e = find_best_configuration(&s.opts).unwrap_err().to_string();
        assert!(
            e.contains("gt_segmentations")
                && e.contains("interrupted")
                && e.contains(
                    "nnseg preprocess -d Dataset001_X --plans_name nnUNetPlans -c 3d_fullres"
                ),
            "{e}"
        );
        assert!(!s.opts.results.inference_information().exists());
    }

    /// Regression (issue 19): a model trained with other labels than the preprocessed
    /// dataset.json was scored against the wrong classes.
    #[test]
    fn a_model_trained_with_other_labels_is_refused() {
        let s = setup(false);
        let mut other = s.opts.dataset_json.clone();
        other
            .labels
            .push(("b".into(), plans::LabelValue::Single(2)));
        std::fs::create_dir_all(s.opts.models[1].folder.path()).unwrap();
        other.save(&s.opts.models[1].folder.dataset_json()).unwrap();
        let e = find_best_configuration(&s.opts).unwrap_err().to_string();
        assert!(
            e.contains("3d_cascade_fullres") && e.contains("other labels"),
            "{e}"
        );
    }
}
