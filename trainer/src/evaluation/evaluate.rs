//! `nnUNetv2_evaluate_folder`: per-case metrics, means, and `summary.json` in nnU-Net's schema.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

use super::json::{num, read_json_with_nan, write_json_nan_atomic, Json};
use super::metrics::{compute_metrics, ClassMetrics};
use super::{list_files, pool, EvalError, Result};

/// Options of [`evaluate_folder`].
#[derive(Clone, Debug)]
pub struct EvaluateOptions {
    /// e.g. `.nii.gz`; only files with this ending are evaluated.
    pub file_ending: String,
    /// Labels as `[[1], [2], ..]`, or regions as their label lists (dataset.json order),
    /// background excluded (`DatasetJson::foreground_regions`).
    pub labels_or_regions: Vec<Vec<i64>>,
    /// Voxels with this reference value are excluded from all counts.
    pub ignore_label: Option<i64>,
    pub num_workers: usize,
    /// Where to write the summary; default `prediction_folder/summary.json`.
    pub output_file: Option<PathBuf>,
    /// nnU-Net's `--chill`: do not fail when reference cases have no prediction.
    pub chill: bool,
}

impl EvaluateOptions {
    /// Options from a dataset.json: its file ending, labels or regions and ignore label.
    pub fn from_dataset_json(ds: &plans::DatasetJson, num_workers: usize) -> Self {
        EvaluateOptions {
            file_ending: ds.file_ending.clone(),
            labels_or_regions: ds.foreground_regions(),
            ignore_label: ds.ignore_label(),
            num_workers,
            output_file: None,
            chill: false,
        }
    }
}

/// The key nnU-Net uses for a label (`"1"`) or a region (`"(1, 2, 3)"`, Python's `str(tuple)`).
/// A one-element region is keyed like a label (nnU-Net writes `"(1,)"` only when dataset.json
/// spells it as a one-element list; that distinction is not kept by `foreground_regions`).
pub fn label_or_region_key(class: &[i64]) -> String {
    if class.len() == 1 {
        class[0].to_string()
    } else {
        let inner: Vec<String> = class.iter().map(i64::to_string).collect();
        format!("({})", inner.join(", "))
    }
}

/// Averages of the metrics (nanmean over cases, or mean over classes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeanMetrics {
    pub dice: f64,
    pub iou: f64,
    pub fn_: f64,
    pub fp: f64,
    pub tn: f64,
    pub tp: f64,
    pub n_pred: f64,
    pub n_ref: f64,
}

impl MeanMetrics {
    fn as_array(&self) -> [f64; 8] {
        [
            self.dice,
            self.iou,
            self.fn_,
            self.fp,
            self.tn,
            self.tp,
            self.n_pred,
            self.n_ref,
        ]
    }

    fn from_array(a: [f64; 8]) -> Self {
        MeanMetrics {
            dice: a[0],
            iou: a[1],
            fn_: a[2],
            fp: a[3],
            tn: a[4],
            tp: a[5],
            n_pred: a[6],
            n_ref: a[7],
        }
    }

    fn to_json(self) -> Json {
        let f = Json::Float;
        Json::obj([
            ("Dice", f(self.dice)),
            ("FN", f(self.fn_)),
            ("FP", f(self.fp)),
            ("IoU", f(self.iou)),
            ("TN", f(self.tn)),
            ("TP", f(self.tp)),
            ("n_pred", f(self.n_pred)),
            ("n_ref", f(self.n_ref)),
        ])
    }

    fn from_json(v: &Value, path: &Path, at: &str) -> Result<Self> {
        let g = |k: &str| num(v.get(k), path, &format!("{at}.{k}"));
        Ok(MeanMetrics {
            dice: g("Dice")?,
            iou: g("IoU")?,
            fn_: g("FN")?,
            fp: g("FP")?,
            tn: g("TN")?,
            tp: g("TP")?,
            n_pred: g("n_pred")?,
            n_ref: g("n_ref")?,
        })
    }
}

fn case_values(m: &ClassMetrics) -> [f64; 8] {
    [
        m.dice(),
        m.iou(),
        m.fn_ as f64,
        m.fp as f64,
        m.tn as f64,
        m.tp as f64,
        m.n_pred() as f64,
        m.n_ref() as f64,
    ]
}

fn class_metrics_json(m: &ClassMetrics) -> Json {
    let i = |x: u64| Json::Int(x as i64);
    Json::obj([
        ("Dice", Json::Float(m.dice())),
        ("FN", i(m.fn_)),
        ("FP", i(m.fp)),
        ("IoU", Json::Float(m.iou())),
        ("TN", i(m.tn)),
        ("TP", i(m.tp)),
        ("n_pred", i(m.n_pred())),
        ("n_ref", i(m.n_ref())),
    ])
}

/// Metrics of one case.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseMetrics {
    pub prediction_file: String,
    pub reference_file: String,
    /// `(class key, counts)` in `labels_or_regions` order.
    pub metrics: Vec<(String, ClassMetrics)>,
}

/// The content of `summary.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub foreground_mean: MeanMetrics,
    /// `(class key, nanmean over cases)` in `labels_or_regions` order.
    pub mean: Vec<(String, MeanMetrics)>,
    pub metric_per_case: Vec<CaseMetrics>,
}

impl Summary {
    /// Builds means as nnU-Net: `mean[k]` is the nanmean over cases, `foreground_mean` the plain
    /// mean over the classes' means excluding key `"0"` (NaN propagates, as `np.mean`).
    pub fn from_cases(keys: &[String], cases: Vec<CaseMetrics>) -> Summary {
        let mean: Vec<(String, MeanMetrics)> = keys
            .iter()
            .enumerate()
            .map(|(ci, k)| {
                let mut sums = [0.0f64; 8];
                let mut counts = [0usize; 8];
                for c in &cases {
                    if let Some((_, m)) = c.metrics.get(ci) {
                        for (j, v) in case_values(m).into_iter().enumerate() {
                            if !v.is_nan() {
                                sums[j] += v;
                                counts[j] += 1;
                            }
                        }
                    }
                }
                let mut out = [f64::NAN; 8];
                for j in 0..8 {
                    if counts[j] > 0 {
                        out[j] = sums[j] / counts[j] as f64;
                    }
                }
                (k.clone(), MeanMetrics::from_array(out))
            })
            .collect();
        let fg: Vec<&MeanMetrics> = mean
            .iter()
            .filter(|(k, _)| k != "0")
            .map(|(_, m)| m)
            .collect();
        let mut fm = [f64::NAN; 8];
        if !fg.is_empty() {
            for (j, v) in fm.iter_mut().enumerate() {
                *v = fg.iter().map(|m| m.as_array()[j]).sum::<f64>() / fg.len() as f64;
            }
        }
        Summary {
            foreground_mean: MeanMetrics::from_array(fm),
            mean,
            metric_per_case: cases,
        }
    }

    /// `foreground_mean.Dice`, the score find_best_configuration ranks by.
    pub fn foreground_dice(&self) -> f64 {
        self.foreground_mean.dice
    }

    /// `mean[key]`, if the class exists.
    pub fn class_mean(&self, key: &str) -> Option<&MeanMetrics> {
        self.mean.iter().find(|(k, _)| k == key).map(|(_, m)| m)
    }

    /// The `foreground_mean` and `mean` parts as JSON (sorted keys on output).
    pub fn means_json(&self) -> Vec<(String, Json)> {
        vec![
            (
                "foreground_mean".to_string(),
                self.foreground_mean.to_json(),
            ),
            (
                "mean".to_string(),
                Json::Obj(
                    self.mean
                        .iter()
                        .map(|(k, m)| (k.clone(), m.to_json()))
                        .collect(),
                ),
            ),
        ]
    }

    /// The whole summary as JSON in nnU-Net's schema.
    pub fn to_json(&self) -> Json {
        let mut pairs = self.means_json();
        pairs.push((
            "metric_per_case".to_string(),
            Json::Arr(
                self.metric_per_case
                    .iter()
                    .map(|c| {
                        Json::obj([
                            (
                                "metrics",
                                Json::Obj(
                                    c.metrics
                                        .iter()
                                        .map(|(k, m)| (k.clone(), class_metrics_json(m)))
                                        .collect(),
                                ),
                            ),
                            ("prediction_file", Json::Str(c.prediction_file.clone())),
                            ("reference_file", Json::Str(c.reference_file.clone())),
                        ])
                    })
                    .collect(),
            ),
        ));
        Json::Obj(pairs)
    }

    /// `summary.json` text exactly as nnU-Net's `save_summary_json` (indent 4, sorted keys,
    /// `NaN` literals).
    pub fn to_json_string(&self) -> String {
        self.to_json().to_python_string(true)
    }

    /// Writes the summary atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_json_nan_atomic(path, &self.to_json(), true)
    }
}

/// Reads a `summary.json` written by nnU-Net or by [`Summary::save`] (`NaN` literals
/// accepted). Class order is the file's order.
pub fn load_summary(path: &Path) -> Result<Summary> {
    let v = read_json_with_nan(path)?;
    let bad = |m: &str| EvalError::Invalid {
        path: path.to_path_buf(),
        message: m.to_string(),
    };
    let foreground_mean = MeanMetrics::from_json(
        v.get("foreground_mean")
            .ok_or_else(|| bad("missing key foreground_mean"))?,
        path,
        "foreground_mean",
    )?;
    let mut mean = Vec::new();
    for (k, m) in v
        .get("mean")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("missing object mean"))?
    {
        mean.push((
            k.clone(),
            MeanMetrics::from_json(m, path, &format!("mean.{k}"))?,
        ));
    }
    let mut metric_per_case = Vec::new();
    for (i, c) in v
        .get("metric_per_case")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing list metric_per_case"))?
        .iter()
        .enumerate()
    {
        let s = |k: &str| {
            c.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(&format!("metric_per_case[{i}].{k}: expected a string")))
        };
        let mut metrics = Vec::new();
        for (k, m) in c
            .get("metrics")
            .and_then(Value::as_object)
            .ok_or_else(|| bad(&format!("metric_per_case[{i}].metrics: expected an object")))?
        {
            let at = format!("metric_per_case[{i}].metrics.{k}");
            let count = |key: &str| -> Result<u64> {
                let x = num(m.get(key), path, &format!("{at}.{key}"))?;
                if x.is_finite() && x >= 0.0 {
                    Ok(x as u64)
                } else {
                    Err(bad(&format!("{at}.{key}: expected a count")))
                }
            };
            metrics.push((
                k.clone(),
                ClassMetrics {
                    tp: count("TP")?,
                    fp: count("FP")?,
                    fn_: count("FN")?,
                    tn: count("TN")?,
                },
            ));
        }
        metric_per_case.push(CaseMetrics {
            prediction_file: s("prediction_file")?,
            reference_file: s("reference_file")?,
            metrics,
        });
    }
    Ok(Summary {
        foreground_mean,
        mean,
        metric_per_case,
    })
}

/// Metrics of one case from label maps already in memory.
pub(crate) fn case_metrics_from_arrays(
    ref_file: &Path,
    pred_file: &Path,
    reference: &ndarray::Array4<i16>,
    prediction: &ndarray::Array4<i16>,
    keys: &[String],
    opts: &EvaluateOptions,
) -> Result<CaseMetrics> {
    if reference.shape() != prediction.shape() {
        return Err(EvalError::ShapeMismatch {
            reference: ref_file.to_path_buf(),
            prediction: pred_file.to_path_buf(),
            ref_shape: reference.shape().to_vec(),
            pred_shape: prediction.shape().to_vec(),
        });
    }
    let r = reference.as_standard_layout();
    let p = prediction.as_standard_layout();
    // Standard layout guarantees a contiguous slice.
    let (Some(rs), Some(ps)) = (r.as_slice(), p.as_slice()) else {
        return Err(EvalError::Config("non-contiguous label map".into()));
    };
    let m = compute_metrics(rs, ps, &opts.labels_or_regions, opts.ignore_label);
    Ok(CaseMetrics {
        prediction_file: pred_file.display().to_string(),
        reference_file: ref_file.display().to_string(),
        metrics: keys.iter().cloned().zip(m).collect(),
    })
}

/// Reference/prediction file pairs as nnU-Net pairs them: every prediction file with the same
/// name in the reference folder; reference files without a prediction are an error (unless
/// `chill`).
pub(crate) fn pair_files(
    reference_folder: &Path,
    prediction_folder: &Path,
    file_ending: &str,
    chill: bool,
) -> Result<Vec<(PathBuf, PathBuf)>> {
    let preds = list_files(prediction_folder, file_ending)?;
    let refs = list_files(reference_folder, file_ending)?;
    if !chill {
        let missing: Vec<String> = refs
            .iter()
            .filter(|r| !preds.contains(r))
            .map(|r| r.strip_suffix(file_ending).unwrap_or(r).to_string())
            .collect();
        if !missing.is_empty() {
            return Err(EvalError::MissingPredictions {
                folder: prediction_folder.to_path_buf(),
                cases: missing,
            });
        }
    }
    if preds.is_empty() {
        return Err(EvalError::NoCases {
            folder: prediction_folder.to_path_buf(),
            file_ending: file_ending.to_string(),
        });
    }
    preds
        .iter()
        .map(|p| {
            let r = reference_folder.join(p);
            if !r.is_file() {
                return Err(EvalError::MissingReference {
                    path: prediction_folder.join(p),
                    expected: r,
                });
            }
            Ok((r, prediction_folder.join(p)))
        })
        .collect()
}

/// Evaluates every prediction in `prediction_folder` against the file of the same name in
/// `reference_folder` and writes `summary.json` (nnU-Net's `compute_metrics_on_folder`).
pub fn evaluate_folder(
    reference_folder: &Path,
    prediction_folder: &Path,
    opts: &EvaluateOptions,
) -> Result<Summary> {
    // a folder whose predict/ensemble run did not finish is not a result
    crate::predict::outputs::ensure_complete(prediction_folder)?;
    evaluate_folder_being_written(reference_folder, prediction_folder, opts)
}

/// [`evaluate_folder`] of a folder the calling run is still writing (still marked unfinished:
/// the final validation marks it finished only once its `summary.json` is written).
pub(crate) fn evaluate_folder_being_written(
    reference_folder: &Path,
    prediction_folder: &Path,
    opts: &EvaluateOptions,
) -> Result<Summary> {
    let pairs = pair_files(
        reference_folder,
        prediction_folder,
        &opts.file_ending,
        opts.chill,
    )?;
    let keys: Vec<String> = opts
        .labels_or_regions
        .iter()
        .map(|c| label_or_region_key(c))
        .collect();
    let cases: Vec<CaseMetrics> = pool(opts.num_workers)?.install(|| {
        pairs
            .par_iter()
            .map(|(r, p)| {
                let (rs, _) = datasets::io::read_seg(r)?;
                let (ps, _) = datasets::io::read_seg(p)?;
                case_metrics_from_arrays(r, p, &rs, &ps, &keys, opts)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let summary = Summary::from_cases(&keys, cases);
    let out = opts
        .output_file
        .clone()
        .unwrap_or_else(|| prediction_folder.join("summary.json"));
    summary.save(&out)?;
    Ok(summary)
}

/// Options of [`evaluate_simple`] (`nnUNetv2_evaluate_simple`): the labels come from the
/// command line instead of a dataset.json.
#[derive(Clone, Debug)]
pub struct SimpleEvaluateOptions {
    /// Labels to evaluate (`-l 1 2 3`); each is one class.
    pub labels: Vec<i64>,
    /// `-il`: reference voxels with this value are excluded from all counts.
    pub ignore_label: Option<i64>,
    /// The files' ending; `None`: detected from the reference folder ([`detect_file_ending`]).
    pub file_ending: Option<String>,
    pub output_file: Option<PathBuf>,
    pub num_workers: usize,
    pub chill: bool,
}

/// The file ending of the segmentations in `folder`: `.nii.gz` when there are such files
/// (nnU-Net's `evaluate_simple` reads only those), otherwise the one supported ending all
/// files share. No or several endings is an error naming them.
pub fn detect_file_ending(folder: &Path) -> Result<String> {
    let mut endings: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(super::io_err("list", folder))? {
        let entry = entry.map_err(super::io_err("list", folder))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if let Some(e) = datasets::io::file_ending_of(&name) {
            if !endings.iter().any(|x| x == e) {
                endings.push(e.to_string());
            }
        }
    }
    endings.sort();
    if endings.iter().any(|e| e == ".nii.gz") {
        return Ok(".nii.gz".into());
    }
    match endings.len() {
        1 => Ok(endings.remove(0)),
        0 => Err(EvalError::NoCases {
            folder: folder.to_path_buf(),
            file_ending: ".nii.gz, .nii, .png, .tif or .tiff".into(),
        }),
        _ => Err(EvalError::Invalid {
            path: folder.to_path_buf(),
            message: format!(
                "segmentations with several file endings ({}); pass --file_ending",
                endings.join(", ")
            ),
        }),
    }
}

/// `nnUNetv2_evaluate_simple`: [`evaluate_folder`] with the labels and ignore label given
/// directly. Writes `summary.json` (into `prediction_folder` unless `output_file`).
pub fn evaluate_simple(
    reference_folder: &Path,
    prediction_folder: &Path,
    opts: &SimpleEvaluateOptions,
) -> Result<Summary> {
    if opts.labels.is_empty() {
        return Err(EvalError::Config(
            "evaluate_simple: no labels given (-l 1 2 ...)".into(),
        ));
    }
    let file_ending = match &opts.file_ending {
        Some(e) => e.clone(),
        None => detect_file_ending(reference_folder)?,
    };
    let eo = EvaluateOptions {
        file_ending,
        labels_or_regions: opts.labels.iter().map(|&l| vec![l]).collect(),
        ignore_label: opts.ignore_label,
        num_workers: opts.num_workers,
        output_file: opts.output_file.clone(),
        chill: opts.chill,
    };
    evaluate_folder(reference_folder, prediction_folder, &eo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datasets::io::{write_seg, ImageProperties};
    use ndarray::Array3;

    fn write(path: &Path, v: &[i16], shape: (usize, usize, usize)) {
        let a = Array3::from_shape_vec(shape, v.to_vec()).unwrap();
        write_seg(
            path,
            a.view(),
            &ImageProperties::with_spacing([1.0, 1.0, 1.0]),
        )
        .unwrap();
    }

    fn opts(classes: Vec<Vec<i64>>) -> EvaluateOptions {
        EvaluateOptions {
            file_ending: ".nii.gz".into(),
            labels_or_regions: classes,
            ignore_label: None,
            num_workers: 2,
            output_file: None,
            chill: false,
        }
    }

    #[test]
    fn keys_like_python() {
        assert_eq!(label_or_region_key(&[2]), "2");
        assert_eq!(label_or_region_key(&[1, 2, 3]), "(1, 2, 3)");
    }

    #[test]
    fn folder_summary_schema_and_means() {
        let t = tempfile::tempdir().unwrap();
        let (gt, pr) = (t.path().join("gt"), t.path().join("pr"));
        std::fs::create_dir_all(&gt).unwrap();
        std::fs::create_dir_all(&pr).unwrap();
        // case a: class 1 perfect, class 2 absent everywhere (NaN)
        write(&gt.join("a.nii.gz"), &[0, 1, 1, 0], (1, 2, 2));
        write(&pr.join("a.nii.gz"), &[0, 1, 1, 0], (1, 2, 2));
        // case b: class 1 half, class 2 perfect
        write(&gt.join("b.nii.gz"), &[1, 1, 2, 0], (1, 2, 2));
        write(&pr.join("b.nii.gz"), &[1, 0, 2, 0], (1, 2, 2));
        let s = evaluate_folder(&gt, &pr, &opts(vec![vec![1], vec![2]])).unwrap();
        assert_eq!(s.metric_per_case.len(), 2);
        let m1 = s.class_mean("1").unwrap();
        assert!((m1.dice - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        // nanmean: class 2 only counts case b
        assert_eq!(s.class_mean("2").unwrap().dice, 1.0);
        assert!((s.foreground_dice() - (m1.dice + 1.0) / 2.0).abs() < 1e-12);
        assert_eq!(s.class_mean("2").unwrap().tn, 3.5);

        let text = std::fs::read_to_string(pr.join("summary.json")).unwrap();
        assert!(text.contains("\"Dice\": NaN"), "{text}");
        let v = super::super::json::parse_json_with_nan(Path::new("s"), &text).unwrap();
        let top: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(top, ["foreground_mean", "mean", "metric_per_case"]);
        let metric_keys = ["Dice", "FN", "FP", "IoU", "TN", "TP", "n_pred", "n_ref"];
        let fk: Vec<&String> = v["foreground_mean"].as_object().unwrap().keys().collect();
        assert_eq!(fk, metric_keys);
        let c0 = v["metric_per_case"][0].as_object().unwrap();
        let ck: Vec<&String> = c0.keys().collect();
        assert_eq!(ck, ["metrics", "prediction_file", "reference_file"]);
        let mk: Vec<&String> = c0["metrics"]["1"].as_object().unwrap().keys().collect();
        assert_eq!(mk, metric_keys);
        // counts are ints per case, floats in means
        assert!(text.contains("\"TN\": 2,"));
        assert!(text.contains("\"TN\": 3.5,"));
        assert!(v["metric_per_case"][0]["prediction_file"]
            .as_str()
            .unwrap()
            .ends_with("a.nii.gz"));
        // round trip through the reader
        let back = load_summary(&pr.join("summary.json")).unwrap();
        assert_eq!(back.metric_per_case, s.metric_per_case);
        assert!(back.class_mean("2").unwrap().iou == 1.0);
    }

    #[test]
    fn reads_nnunet_example() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/nnunet_examples/example_summary.json");
        let text =
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()));
        let s = load_summary(&p).unwrap();
        assert_eq!(s.foreground_mean.tn, 3677.5);
        // recompute means from the cases: must match the file
        let keys: Vec<String> = s.mean.iter().map(|(k, _)| k.clone()).collect();
        let again = Summary::from_cases(&keys, s.metric_per_case.clone());
        assert_eq!(again.mean, s.mean);
        // byte-identical output
        assert_eq!(again.to_json_string(), text.trim_end());
    }

    #[test]
    fn evaluate_simple_detects_the_ending_and_ignores() {
        let t = tempfile::tempdir().unwrap();
        let (gt, pr) = (t.path().join("gt"), t.path().join("pr"));
        std::fs::create_dir_all(&gt).unwrap();
        std::fs::create_dir_all(&pr).unwrap();
        // reference 3 is the ignore label: the prediction's 1 there counts nowhere
        write(&gt.join("a.nii"), &[0, 1, 1, 3], (1, 2, 2));
        write(&pr.join("a.nii"), &[1, 1, 0, 1], (1, 2, 2));
        std::fs::write(gt.join("notes.txt"), "x").unwrap();
        assert_eq!(detect_file_ending(&gt).unwrap(), ".nii");
        let o = SimpleEvaluateOptions {
            labels: vec![1],
            ignore_label: Some(3),
            file_ending: None,
            output_file: Some(t.path().join("s.json")),
            num_workers: 1,
            chill: false,
        };
        let s = evaluate_simple(&gt, &pr, &o).unwrap();
        let m = &s.metric_per_case[0].metrics[0].1;
        assert_eq!((m.tp, m.fp, m.fn_, m.tn), (1, 1, 1, 0));
        assert!(t.path().join("s.json").is_file());
        write(&gt.join("b.png"), &[0, 1], (1, 1, 2));
        let e = detect_file_ending(&gt).unwrap_err().to_string();
        assert!(e.contains(".nii, .png"), "{e}");
        let e = evaluate_simple(
            &gt,
            &pr,
            &SimpleEvaluateOptions {
                labels: vec![],
                ..o
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("-l"), "{e}");
    }

    #[test]
    fn missing_predictions_are_named() {
        let t = tempfile::tempdir().unwrap();
        let (gt, pr) = (t.path().join("gt"), t.path().join("pr"));
        std::fs::create_dir_all(&gt).unwrap();
        std::fs::create_dir_all(&pr).unwrap();
        for c in ["c1", "c2", "c3"] {
            write(&gt.join(format!("{c}.nii.gz")), &[0, 1], (1, 1, 2));
        }
        write(&pr.join("c2.nii.gz"), &[0, 1], (1, 1, 2));
        let e = evaluate_folder(&gt, &pr, &opts(vec![vec![1]]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c1, c3") && !e.contains("c2"), "{e}");
        let mut o = opts(vec![vec![1]]);
        o.chill = true;
        let s = evaluate_folder(&gt, &pr, &o).unwrap();
        assert_eq!(s.metric_per_case.len(), 1);
        // shape mismatch names both files
        write(&pr.join("c1.nii.gz"), &[0, 1, 1], (1, 1, 3));
        let e = evaluate_folder(&gt, &pr, &o).unwrap_err().to_string();
        assert!(e.contains("c1.nii.gz") && e.contains("shape"), "{e}");
    }
}
