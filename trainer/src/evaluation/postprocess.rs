//! nnU-Net's connected-component postprocessing
//! (`postprocessing/remove_connected_components.py`).
//!
//! Connectivity: nnU-Net labels components with `skimage.measure.label(connectivity=None)`, i.e.
//! full connectivity — **26-neighbourhood in 3D** (8 in 2D, where arrays are `(1, y, x)`).
//! Ties: every component of maximal size is kept (acvl_utils' filter keeps `j == max(sizes)`).

use std::path::{Path, PathBuf};

use ndarray::Array4;
use rayon::prelude::*;
use serde_json::Value;

use super::evaluate::{
    case_metrics_from_arrays, label_or_region_key, pair_files, EvaluateOptions, Summary,
};
use super::json::{read_json_with_nan, write_json_nan_atomic, Json};
use super::metrics::in_class;
use super::{io_err, list_files, pool, EvalError, Result};

/// Name nnU-Net gives the only postprocessing function it selects.
pub const REMOVE_LCC_FN: &str = "remove_all_but_largest_component_from_segmentation";

fn find(parent: &mut [u32], mut i: u32) -> u32 {
    while parent[i as usize] != i {
        let p = parent[i as usize];
        parent[i as usize] = parent[p as usize];
        i = p;
    }
    i
}

/// Component id (root index) per voxel of `mask` (26-connectivity), `u32::MAX` outside.
/// Union-find over a flat buffer, scanning each voxel's 13 already-visited neighbours.
pub(crate) fn label_components(mask: &[bool], shape: [usize; 3]) -> Vec<u32> {
    let [nz, ny, nx] = shape;
    let n = nz * ny * nx;
    assert!(n < u32::MAX as usize, "volume too large for u32 labels");
    let mut parent: Vec<u32> = (0..n as u32).collect();
    let idx = |z: usize, y: usize, x: usize| (z * ny + y) * nx + x;
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let i = idx(z, y, x);
                if !mask[i] {
                    continue;
                }
                for dz in -1i64..=0 {
                    for dy in -1i64..=1 {
                        for dx in -1i64..=1 {
                            // only neighbours before (z, y, x) in scan order
                            if dz == 0 && (dy > 0 || (dy == 0 && dx >= 0)) {
                                continue;
                            }
                            let (zz, yy, xx) = (z as i64 + dz, y as i64 + dy, x as i64 + dx);
                            if zz < 0 || yy < 0 || xx < 0 || yy >= ny as i64 || xx >= nx as i64 {
                                continue;
                            }
                            let j = idx(zz as usize, yy as usize, xx as usize);
                            if mask[j] {
                                let (a, b) =
                                    (find(&mut parent, i as u32), find(&mut parent, j as u32));
                                if a != b {
                                    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                                    parent[hi as usize] = lo;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // Flatten in place: links always point to smaller indices and a root is the smallest index
    // of its component, so one forward pass resolves every voxel to its root.
    for i in 0..n {
        parent[i] = if mask[i] {
            parent[parent[i] as usize]
        } else {
            u32::MAX
        };
    }
    parent
}

/// Mask of the largest 26-connected component(s) of `mask` (all components of maximal size are
/// kept, like nnU-Net). `mask` is `(z, y, x)` in C order.
pub fn largest_component_mask(mask: &[bool], shape: [usize; 3]) -> Vec<bool> {
    let labels = label_components(mask, shape);
    let mut sizes: std::collections::HashMap<u32, u32> = Default::default();
    for &l in &labels {
        if l != u32::MAX {
            *sizes.entry(l).or_insert(0) += 1;
        }
    }
    let max = sizes.values().copied().max().unwrap_or(0);
    labels
        .iter()
        .map(|&l| l != u32::MAX && sizes.get(&l) == Some(&max))
        .collect()
}

/// nnU-Net's `remove_all_but_largest_component_from_segmentation`: the union of the given
/// labels/regions keeps only its largest component; removed voxels become `background`.
/// `seg` is `(1, z, y, x)` (or any 4D array whose first axis has length 1). Returns the number
/// of voxels changed.
pub fn remove_all_but_largest_component(
    seg: &mut Array4<i16>,
    labels_or_regions: &[Vec<i64>],
    background: i16,
) -> usize {
    let sh = seg.shape();
    let shape = [sh[0] * sh[1], sh[2], sh[3]];
    if !seg.is_standard_layout() {
        *seg = seg.as_standard_layout().into_owned();
    }
    let Some(data) = seg.as_slice_mut() else {
        return 0;
    };
    let mask: Vec<bool> = data
        .iter()
        .map(|&v| labels_or_regions.iter().any(|c| in_class(v, c)))
        .collect();
    let keep = largest_component_mask(&mask, shape);
    let mut changed = 0;
    for ((v, &m), &k) in data.iter_mut().zip(&mask).zip(&keep) {
        if m && !k && *v != background {
            *v = background;
            changed += 1;
        }
    }
    changed
}

/// The chosen postprocessing: a sequence of "keep the largest component of the union of these
/// labels/regions" steps, applied in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Postprocessing {
    pub steps: Vec<Vec<Vec<i64>>>,
}

impl Postprocessing {
    /// Applies all steps to one segmentation.
    pub fn apply(&self, seg: &mut Array4<i16>) {
        for s in &self.steps {
            remove_all_but_largest_component(seg, s, 0);
        }
    }

    /// nnU-Net's kwargs form: a label as an int, a region or list of labels as a list.
    fn kwargs_json(step: &[Vec<i64>]) -> Json {
        let v = if step.len() == 1 && step[0].len() == 1 {
            Json::Int(step[0][0])
        } else if step.iter().all(|c| c.len() == 1) {
            Json::Arr(step.iter().map(|c| Json::Int(c[0])).collect())
        } else if step.len() == 1 {
            Json::Arr(step[0].iter().map(|&l| Json::Int(l)).collect())
        } else {
            Json::Arr(
                step.iter()
                    .map(|c| Json::Arr(c.iter().map(|&l| Json::Int(l)).collect()))
                    .collect(),
            )
        };
        Json::obj([("labels_or_regions", v)])
    }

    /// Reads `postprocessing.json` (written by [`determine_postprocessing`]; the
    /// `postprocessing_fns` / `postprocessing_kwargs` lists of nnU-Net's human-readable file).
    pub fn load(path: &Path) -> Result<Postprocessing> {
        let v = read_json_with_nan(path)?;
        let bad = |m: String| EvalError::Invalid {
            path: path.to_path_buf(),
            message: m,
        };
        let fns = v
            .get("postprocessing_fns")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing list postprocessing_fns".into()))?;
        let kwargs = v
            .get("postprocessing_kwargs")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing list postprocessing_kwargs".into()))?;
        if fns.len() != kwargs.len() {
            return Err(bad(format!(
                "postprocessing_fns has {} entries but postprocessing_kwargs {}",
                fns.len(),
                kwargs.len()
            )));
        }
        let mut steps = Vec::new();
        for (i, (f, k)) in fns.iter().zip(kwargs).enumerate() {
            if f.as_str() != Some(REMOVE_LCC_FN) {
                return Err(bad(format!(
                    "postprocessing_fns[{i}]: unsupported function {f}; only {REMOVE_LCC_FN:?} is known"
                )));
            }
            let lr = k.get("labels_or_regions").ok_or_else(|| {
                bad(format!(
                    "postprocessing_kwargs[{i}]: missing labels_or_regions"
                ))
            })?;
            let err = || {
                bad(format!("postprocessing_kwargs[{i}].labels_or_regions: expected an int, a list of ints or a list of lists of ints, got {lr}"))
            };
            let int = |x: &Value| x.as_i64().ok_or_else(err);
            let step: Vec<Vec<i64>> = match lr {
                Value::Number(_) => vec![vec![int(lr)?]],
                Value::Array(items) => items
                    .iter()
                    .map(|x| match x {
                        Value::Array(r) => r.iter().map(int).collect::<Result<Vec<i64>>>(),
                        _ => Ok(vec![int(x)?]),
                    })
                    .collect::<Result<_>>()?,
                _ => return Err(err()),
            };
            steps.push(step);
        }
        Ok(Postprocessing { steps })
    }
}

/// Options of [`determine_postprocessing`].
#[derive(Clone, Debug)]
pub struct PostprocessOptions {
    /// File ending, classes, ignore label and workers used for evaluation.
    pub evaluate: EvaluateOptions,
    /// Keep the `postprocessed/` folder (nnU-Net's `--remove_postprocessed` inverts this).
    pub keep_postprocessed: bool,
}

struct LoadedCase {
    ref_file: PathBuf,
    pred_file: PathBuf,
    name: String,
    reference: Array4<i16>,
    prediction: Array4<i16>,
    props: datasets::io::ImageProperties,
}

fn summarize(cases: &[LoadedCase], keys: &[String], opts: &EvaluateOptions) -> Result<Summary> {
    let per_case = cases
        .par_iter()
        .map(|c| {
            case_metrics_from_arrays(
                &c.ref_file,
                &c.pred_file,
                &c.reference,
                &c.prediction,
                keys,
                opts,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Summary::from_cases(keys, per_case))
}

fn apply_step(cases: &[LoadedCase], step: &[Vec<i64>]) -> Vec<Array4<i16>> {
    cases
        .par_iter()
        .map(|c| {
            let mut s = c.prediction.clone();
            remove_all_but_largest_component(&mut s, step, 0);
            s
        })
        .collect()
}

/// nnU-Net's `determine_postprocessing`: evaluates `prediction_folder` against
/// `reference_folder`, then
/// 1. tries keeping only the largest component of the whole foreground; accepted if
///    `foreground_mean.Dice` improves and no class's mean Dice gets worse;
/// 2. with more than one label/region, tries each label/region in order (on top of the steps
///    accepted so far); accepted if that class's mean Dice strictly improves.
///
/// Writes `prediction_folder/summary.json` (baseline), `prediction_folder/postprocessing.json`
/// (`input_folder` / `postprocessed` metrics, `postprocessing_fns`, `postprocessing_kwargs`) and,
/// when `keep_postprocessed`, `prediction_folder/postprocessed/` with the final predictions and
/// their `summary.json`. (nnU-Net also writes `postprocessing.pkl`; the JSON is ours to apply.)
pub fn determine_postprocessing(
    prediction_folder: &Path,
    reference_folder: &Path,
    opts: &PostprocessOptions,
) -> Result<Postprocessing> {
    let eo = &opts.evaluate;
    let pairs = pair_files(
        reference_folder,
        prediction_folder,
        &eo.file_ending,
        eo.chill,
    )?;
    let keys: Vec<String> = eo
        .labels_or_regions
        .iter()
        .map(|c| label_or_region_key(c))
        .collect();
    let pool = pool(eo.num_workers)?;
    pool.install(|| -> Result<Postprocessing> {
        let mut cases = pairs
            .par_iter()
            .map(|(r, p)| {
                let (reference, _) = datasets::io::read_seg(r)?;
                let (prediction, props) = datasets::io::read_seg(p)?;
                Ok(LoadedCase {
                    ref_file: r.clone(),
                    pred_file: p.clone(),
                    name: p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    reference,
                    prediction,
                    props,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let baseline = summarize(&cases, &keys, eo)?;
        baseline.save(&prediction_folder.join("summary.json"))?;
        let input_metrics = baseline.means_json();
        let mut current = baseline;
        let mut steps: Vec<Vec<Vec<i64>>> = Vec::new();

        // 1. the whole foreground (nnU-Net passes the foreground labels)
        let mut fg: Vec<i64> = eo
            .labels_or_regions
            .iter()
            .flatten()
            .copied()
            .filter(|&l| l != 0)
            .collect();
        fg.sort_unstable();
        fg.dedup();
        let fg_step: Vec<Vec<i64>> = fg.iter().map(|&l| vec![l]).collect();
        if !fg_step.is_empty() {
            let candidate = apply_step(&cases, &fg_step);
            let old: Vec<Array4<i16>> = cases
                .iter_mut()
                .zip(candidate)
                .map(|(c, s)| std::mem::replace(&mut c.prediction, s))
                .collect();
            let pp = summarize(&cases, &keys, eo)?;
            let better = pp.foreground_dice() > current.foreground_dice()
                && !pp
                    .mean
                    .iter()
                    .any(|(k, m)| current.class_mean(k).is_some_and(|b| m.dice < b.dice));
            tracing::info!(
                "postprocessing: largest foreground component: Dice {} -> {} ({})",
                current.foreground_dice(),
                pp.foreground_dice(),
                if better { "kept" } else { "rejected" }
            );
            if better {
                steps.push(fg_step);
                current = pp;
            } else {
                for (c, o) in cases.iter_mut().zip(old) {
                    c.prediction = o;
                }
            }
        }

        // 2. each label/region on its own
        if eo.labels_or_regions.len() > 1 {
            for (class, key) in eo.labels_or_regions.iter().zip(&keys) {
                let step = vec![class.clone()];
                let candidate = apply_step(&cases, &step);
                let old: Vec<Array4<i16>> = cases
                    .iter_mut()
                    .zip(candidate)
                    .map(|(c, s)| std::mem::replace(&mut c.prediction, s))
                    .collect();
                let pp = summarize(&cases, &keys, eo)?;
                let (before, after) = (
                    current.class_mean(key).map_or(f64::NAN, |m| m.dice),
                    pp.class_mean(key).map_or(f64::NAN, |m| m.dice),
                );
                let better = after > before;
                tracing::info!(
                    "postprocessing: largest component of {key}: Dice {before} -> {after} ({})",
                    if better { "kept" } else { "rejected" }
                );
                if better {
                    steps.push(step);
                    current = pp;
                } else {
                    for (c, o) in cases.iter_mut().zip(old) {
                        c.prediction = o;
                    }
                }
            }
        }

        let result = Postprocessing { steps };
        let mut doc = vec![("input_folder".to_string(), Json::Obj(input_metrics))];
        if !result.steps.is_empty() {
            doc.push(("postprocessed".to_string(), Json::Obj(current.means_json())));
        }
        doc.push((
            "postprocessing_fns".to_string(),
            Json::Arr(
                result
                    .steps
                    .iter()
                    .map(|_| Json::Str(REMOVE_LCC_FN.into()))
                    .collect(),
            ),
        ));
        doc.push((
            "postprocessing_kwargs".to_string(),
            Json::Arr(
                result
                    .steps
                    .iter()
                    .map(|s| Postprocessing::kwargs_json(s))
                    .collect(),
            ),
        ));
        write_json_nan_atomic(
            &prediction_folder.join("postprocessing.json"),
            &Json::Obj(doc),
            false,
        )?;

        if opts.keep_postprocessed {
            let out = prediction_folder.join("postprocessed");
            std::fs::create_dir_all(&out).map_err(io_err("create", &out))?;
            cases.par_iter().try_for_each(|c| -> Result<()> {
                let p = c.prediction.index_axis(ndarray::Axis(0), 0);
                datasets::io::write_seg(&out.join(&c.name), p, &c.props)?;
                Ok(())
            })?;
            // the summary of the postprocessed files names them
            let mut s = current.clone();
            for (m, c) in s.metric_per_case.iter_mut().zip(&cases) {
                m.prediction_file = out.join(&c.name).display().to_string();
            }
            s.save(&out.join("summary.json"))?;
        }
        Ok(result)
    })
}

/// nnU-Net's `apply_postprocessing_to_folder`: applies the steps of `postprocessing.json` to
/// every `*{file_ending}` file in `input_folder`, writing to `output_folder` (created).
/// Returns the number of files written.
pub fn apply_postprocessing(
    input_folder: &Path,
    output_folder: &Path,
    postprocessing_json: &Path,
    file_ending: &str,
    num_workers: usize,
) -> Result<usize> {
    let pp = Postprocessing::load(postprocessing_json)?;
    let files = list_files(input_folder, file_ending)?;
    if files.is_empty() {
        return Err(EvalError::NoCases {
            folder: input_folder.to_path_buf(),
            file_ending: file_ending.to_string(),
        });
    }
    std::fs::create_dir_all(output_folder).map_err(io_err("create", output_folder))?;
    pool(num_workers)?.install(|| {
        files.par_iter().try_for_each(|f| -> Result<()> {
            let (mut seg, props) = datasets::io::read_seg(&input_folder.join(f))?;
            pp.apply(&mut seg);
            datasets::io::write_seg(
                &output_folder.join(f),
                seg.index_axis(ndarray::Axis(0), 0),
                &props,
            )?;
            Ok(())
        })
    })?;
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datasets::io::{write_seg, ImageProperties};
    use ndarray::Array3;

    #[test]
    fn two_blobs_keep_largest() {
        let shape = [1, 4, 6];
        let mut m = vec![false; 24];
        for i in [0, 1, 6, 7] {
            m[i] = true; // 2x2 blob
        }
        for i in [4, 5, 11] {
            m[i] = true; // 3-voxel... smaller blob
        }
        let keep = largest_component_mask(&m, shape);
        assert_eq!(keep.iter().filter(|&&k| k).count(), 4);
        assert!(keep[0] && keep[7] && !keep[4] && !keep[11]);
        assert_eq!(
            largest_component_mask(&[false; 4], [1, 2, 2]),
            vec![false; 4]
        );
    }

    #[test]
    fn diagonal_neighbours_are_connected_26() {
        // voxels touching only at a corner across slices form one component
        let shape = [2, 2, 2];
        let mut m = vec![false; 8];
        m[0] = true; // (0,0,0)
        m[7] = true; // (1,1,1)
        let keep = largest_component_mask(&m, shape);
        assert!(keep[0] && keep[7]);
        // in-plane diagonal too; a far voxel is a separate, smaller component
        let mut m = vec![false; 9];
        m[0] = true; // (0,0)
        m[4] = true; // (1,1)
        m[8] = true; // (2,2)
        let keep = largest_component_mask(&m, [1, 3, 3]);
        assert_eq!(keep, m);
        let mut m = vec![false; 5];
        m[0] = true;
        m[1] = true;
        m[3] = true;
        let keep = largest_component_mask(&m, [1, 1, 5]);
        assert_eq!(keep, vec![true, true, false, false, false]);
    }

    /// Timing on a 160^3 volume with many blobs: `cargo test -p trainer --release -- --ignored cc_timing --nocapture`.
    #[test]
    #[ignore = "benchmark: slow, run with --release -- --ignored --nocapture"]
    fn cc_timing() {
        let n = 160;
        let mask: Vec<bool> = (0..n * n * n)
            .map(|i| {
                let (z, y, x) = (i / (n * n), (i / n) % n, i % n);
                (z / 7 + y / 5 + x / 3) % 3 == 0 || (x * 31 + y * 17 + z * 7) % 23 == 0
            })
            .collect();
        let t = std::time::Instant::now();
        let keep = largest_component_mask(&mask, [n, n, n]);
        eprintln!(
            "largest component of {} voxels ({} kept): {:?}",
            mask.len(),
            keep.iter().filter(|&&k| k).count(),
            t.elapsed()
        );
    }

    #[test]
    fn ties_keep_all_largest() {
        let m = vec![true, false, true];
        assert_eq!(largest_component_mask(&m, [1, 1, 3]), m);
    }

    #[test]
    fn remove_from_segmentation_respects_labels() {
        let mut s = Array4::from_shape_vec((1, 1, 1, 7), vec![1, 1, 0, 2, 0, 1, 2]).unwrap();
        // union of 1 and 2: components {0,1}, {3}, {5,6} -> tie of size 2 keeps both
        remove_all_but_largest_component(&mut s, &[vec![1], vec![2]], 0);
        assert_eq!(s.as_slice().unwrap(), &[1, 1, 0, 0, 0, 1, 2]);
        let mut s = Array4::from_shape_vec((1, 1, 1, 6), vec![2, 2, 0, 1, 2, 0]).unwrap();
        let n = remove_all_but_largest_component(&mut s, &[vec![2]], 0);
        assert_eq!((n, s.as_slice().unwrap()), (1, &[2, 2, 0, 1, 0, 0][..]));
    }

    fn write(path: &Path, v: Vec<i16>, shape: (usize, usize, usize)) {
        let a = Array3::from_shape_vec(shape, v).unwrap();
        write_seg(
            path,
            a.view(),
            &ImageProperties::with_spacing([1.0, 1.0, 1.0]),
        )
        .unwrap();
    }

    #[test]
    fn determine_and_apply() {
        let t = tempfile::tempdir().unwrap();
        let (gt, pr) = (t.path().join("gt"), t.path().join("pr"));
        std::fs::create_dir_all(&gt).unwrap();
        std::fs::create_dir_all(&pr).unwrap();
        // label 1: one blob in the reference, prediction adds a stray voxel far away -> LCC helps.
        // label 2: reference has two separate blobs; LCC on the prediction would hurt.
        let r = vec![1, 1, 1, 0, 0, 0, 2, 2, 0, 2];
        let p = vec![1, 1, 1, 0, 1, 0, 2, 2, 0, 2];
        write(&gt.join("a.nii.gz"), r.clone(), (1, 1, 10));
        write(&pr.join("a.nii.gz"), p.clone(), (1, 1, 10));
        let opts = PostprocessOptions {
            evaluate: EvaluateOptions {
                file_ending: ".nii.gz".into(),
                labels_or_regions: vec![vec![1], vec![2]],
                ignore_label: None,
                num_workers: 2,
                output_file: None,
                chill: false,
            },
            keep_postprocessed: true,
        };
        let pp = determine_postprocessing(&pr, &gt, &opts).unwrap();
        // foreground LCC would drop label 2's blobs (worse) -> rejected; label 1 -> kept; label 2 -> rejected
        assert_eq!(pp.steps, vec![vec![vec![1]]]);
        let (out, _) = datasets::io::read_seg(&pr.join("postprocessed/a.nii.gz")).unwrap();
        assert_eq!(out.as_slice().unwrap(), &r[..]);
        let before = super::super::load_summary(&pr.join("summary.json")).unwrap();
        let after = super::super::load_summary(&pr.join("postprocessed/summary.json")).unwrap();
        assert!(after.foreground_dice() > before.foreground_dice());
        assert_eq!(after.class_mean("1").unwrap().dice, 1.0);

        let text = std::fs::read_to_string(pr.join("postprocessing.json")).unwrap();
        assert!(
            text.contains(
                "\"postprocessing_kwargs\": [\n        {\n            \"labels_or_regions\": 1\n"
            ),
            "{text}"
        );
        let loaded = Postprocessing::load(&pr.join("postprocessing.json")).unwrap();
        assert_eq!(loaded, pp);

        let out_dir = t.path().join("applied");
        let n = apply_postprocessing(&pr, &out_dir, &pr.join("postprocessing.json"), ".nii.gz", 2)
            .unwrap();
        assert_eq!(n, 1);
        let (out, _) = datasets::io::read_seg(&out_dir.join("a.nii.gz")).unwrap();
        assert_eq!(out.as_slice().unwrap(), &r[..]);
    }

    #[test]
    fn load_accepts_nnunet_kwargs_forms_and_rejects_unknown() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("pp.json");
        std::fs::write(
            &p,
            format!(
                r#"{{"input_folder": {{"foreground_mean": {{"Dice": NaN}}}},
            "postprocessing_fns": ["{REMOVE_LCC_FN}", "{REMOVE_LCC_FN}", "{REMOVE_LCC_FN}"],
            "postprocessing_kwargs": [{{"labels_or_regions": [1, 2]}}, {{"labels_or_regions": 3}},
                                      {{"labels_or_regions": [[1, 2], [3]]}}]}}"#
            ),
        )
        .unwrap();
        let pp = Postprocessing::load(&p).unwrap();
        assert_eq!(
            pp.steps,
            vec![
                vec![vec![1], vec![2]],
                vec![vec![3]],
                vec![vec![1, 2], vec![3]]
            ]
        );
        std::fs::write(
            &p,
            r#"{"postprocessing_fns": ["fill_holes"], "postprocessing_kwargs": [{}]}"#,
        )
        .unwrap();
        let e = Postprocessing::load(&p).unwrap_err().to_string();
        assert!(e.contains("fill_holes") && e.contains("pp.json"), "{e}");
    }

    #[test]
    fn no_improvement_keeps_nothing() {
        let t = tempfile::tempdir().unwrap();
        let (gt, pr) = (t.path().join("gt"), t.path().join("pr"));
        std::fs::create_dir_all(&gt).unwrap();
        std::fs::create_dir_all(&pr).unwrap();
        let r = vec![1, 0, 1, 0, 1];
        write(&gt.join("a.nii.gz"), r.clone(), (1, 1, 5));
        write(&pr.join("a.nii.gz"), r, (1, 1, 5));
        let opts = PostprocessOptions {
            evaluate: EvaluateOptions {
                file_ending: ".nii.gz".into(),
                labels_or_regions: vec![vec![1]],
                ignore_label: None,
                num_workers: 1,
                output_file: None,
                chill: false,
            },
            keep_postprocessed: false,
        };
        let pp = determine_postprocessing(&pr, &gt, &opts).unwrap();
        assert!(pp.steps.is_empty());
        assert!(!pr.join("postprocessed").exists());
        let v = super::super::json::read_json_with_nan(&pr.join("postprocessing.json")).unwrap();
        assert_eq!(v["postprocessing_fns"], serde_json::json!([]));
        assert!(v.get("postprocessed").is_none());
    }
}
