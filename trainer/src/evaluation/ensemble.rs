//! `nnUNetv2_ensemble`: averages the saved probabilities of several prediction folders.
//!
//! Probability files are those the predictor writes with `--save_probabilities`
//! (`trainer::predict`): `{case}.npz` holding `probabilities` (float32 `(K, z, y, x)`, reader
//! axis order) and `{case}.json`, the case properties, whose [`IMAGE_PROPERTIES_KEY`] entry is a
//! [`datasets::io::ImageProperties`] (the geometry the segmentation is written with).

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4, Axis, Zip};
use ndarray_npy::{NpzReader, NpzWriter};
use rayon::prelude::*;
use serde_json::Value;

use datasets::PredictionDir;

use super::{io_err, list_files, pool, EvalError, Result};

/// Key of the reader geometry in a `{case}.json` properties file.
pub const IMAGE_PROPERTIES_KEY: &str = "image_properties";
/// Array name inside `{case}.npz` (nnU-Net's).
pub const PROBABILITIES_KEY: &str = "probabilities";

/// Options of [`ensemble_folders`].
#[derive(Clone, Debug)]
pub struct EnsembleOptions {
    /// Ending of the segmentation files written (dataset.json `file_ending`).
    pub file_ending: String,
    /// Label of each softmax channel (dataset.json labels, sorted, ignore excluded).
    pub labels: Vec<i64>,
    /// With regions: the label written where region `i`'s probability is > 0.5 (later win).
    pub regions_class_order: Option<Vec<i64>>,
    /// Also write the averaged `{case}.npz` + `{case}.json` (nnU-Net's `--save_npz`).
    pub save_probabilities: bool,
    pub num_workers: usize,
}

impl EnsembleOptions {
    pub fn from_dataset_json(ds: &plans::DatasetJson, num_workers: usize) -> Self {
        EnsembleOptions {
            file_ending: ds.file_ending.clone(),
            labels: ds.all_labels(),
            regions_class_order: if ds.has_regions() {
                ds.regions_class_order.clone()
            } else {
                None
            },
            save_probabilities: false,
            num_workers,
        }
    }
}

fn props_path(npz: &Path) -> PathBuf {
    npz.with_extension("json")
}

/// Writes `{case}.npz` (`probabilities`) and `{case}.json` (`properties`) atomically; `npz_path`
/// is the `.npz` path, the JSON goes next to it.
pub fn save_probabilities(
    npz_path: &Path,
    probabilities: &Array4<f32>,
    properties: &Value,
) -> Result<()> {
    let npz_err = |message: String| EvalError::Npy {
        path: npz_path.to_path_buf(),
        message,
    };
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut w = NpzWriter::new(&mut buf);
        w.add_array(PROBABILITIES_KEY, probabilities)
            .map_err(|e| npz_err(e.to_string()))?;
        w.finish().map_err(|e| npz_err(e.to_string()))?;
    }
    plans::io::write_atomic(npz_path, buf.get_ref())?;
    plans::io::write_json_atomic(&props_path(npz_path), properties)?;
    Ok(())
}

fn read_npz<R: Read + Seek>(r: R, path: &Path) -> Result<Array4<f32>> {
    let npz_err = |message: String| EvalError::Npy {
        path: path.to_path_buf(),
        message,
    };
    let mut z = NpzReader::new(r).map_err(|e| npz_err(e.to_string()))?;
    let names = z.names().map_err(|e| npz_err(e.to_string()))?;
    let name = names
        .iter()
        .find(|n| n.as_str() == PROBABILITIES_KEY || n.as_str() == "probabilities.npy")
        .cloned()
        .ok_or_else(|| npz_err(format!("no array {PROBABILITIES_KEY:?} (has {names:?})")))?;
    z.by_name::<ndarray::OwnedRepr<f32>, ndarray::Ix4>(&name)
        .map_err(|e| npz_err(format!("{name}: expected float32 (K, z, y, x): {e}")))
}

/// Reads `{case}.npz` and its `{case}.json` properties.
pub fn load_probabilities(npz_path: &Path) -> Result<(Array4<f32>, Value)> {
    let f = std::fs::File::open(npz_path).map_err(io_err("open", npz_path))?;
    let probs = read_npz(std::io::BufReader::new(f), npz_path)?;
    let props = plans::io::read_json_file(&props_path(npz_path))?;
    Ok((probs, props))
}

fn image_properties(props: &Value, path: &Path) -> Result<datasets::io::ImageProperties> {
    let v = props.get(IMAGE_PROPERTIES_KEY).ok_or_else(|| EvalError::Invalid {
        path: path.to_path_buf(),
        message: format!("missing key {IMAGE_PROPERTIES_KEY:?} (the geometry to write the segmentation with)"),
    })?;
    serde_json::from_value(v.clone()).map_err(|e| EvalError::Invalid {
        path: path.to_path_buf(),
        message: format!("{IMAGE_PROPERTIES_KEY}: {e}"),
    })
}

/// Probabilities `(K, z, y, x)` → labels: argmax (first maximum wins, as numpy) mapped to
/// `labels[k]`, or with `regions_class_order` every voxel with probability > 0.5 of region `i`
/// set to `regions_class_order[i]`, later regions overwriting earlier ones.
pub fn probabilities_to_segmentation(
    probs: &Array4<f32>,
    labels: &[i64],
    regions_class_order: Option<&[i64]>,
) -> Array3<i16> {
    let (_, z, y, x) = probs.dim();
    let mut seg = Array3::<i16>::zeros((z, y, x));
    match regions_class_order {
        Some(order) => {
            for (i, &c) in order.iter().enumerate().take(probs.dim().0) {
                Zip::from(&mut seg)
                    .and(probs.index_axis(Axis(0), i))
                    .for_each(|s, &p| {
                        if p > 0.5 {
                            *s = c as i16;
                        }
                    });
            }
        }
        None => {
            let label = |k: usize| labels.get(k).copied().unwrap_or(k as i64) as i16;
            seg.fill(label(0));
            let mut best = probs.index_axis(Axis(0), 0).to_owned();
            for k in 1..probs.dim().0 {
                let l = label(k);
                Zip::from(&mut seg)
                    .and(&mut best)
                    .and(probs.index_axis(Axis(0), k))
                    .for_each(|s, b, &p| {
                        if p > *b {
                            *b = p;
                            *s = l;
                        }
                    });
            }
        }
    }
    seg
}

/// Case ids (`{case}.npz` stems) of a folder.
fn cases_of(folder: &Path) -> Result<Vec<String>> {
    Ok(list_files(folder, ".npz")?
        .into_iter()
        .map(|f| f.trim_end_matches(".npz").to_string())
        .collect())
}

/// Averages the probabilities of the same cases in every input folder (float32), converts them
/// to segmentations and writes `{case}{file_ending}` into `output_folder` with the geometry of
/// the first folder's properties. Every folder must hold the same `.npz` set. Copies
/// `dataset.json` and `plans.json` of the first folder when present. Returns the case count.
pub fn ensemble_folders(
    input_folders: &[PathBuf],
    output_folder: &Path,
    opts: &EnsembleOptions,
) -> Result<usize> {
    let first = input_folders
        .first()
        .ok_or_else(|| EvalError::Config("ensembling needs at least one input folder".into()))?;
    for f in input_folders {
        crate::predict::outputs::ensure_complete(f)?;
    }
    let cases = cases_of(first)?;
    if cases.is_empty() {
        return Err(EvalError::NoCases {
            folder: first.clone(),
            file_ending: ".npz (saved probabilities; predict with --save_probabilities)".into(),
        });
    }
    for f in &input_folders[1..] {
        let other = cases_of(f)?;
        if other != cases {
            let missing: Vec<String> = cases
                .iter()
                .filter(|c| !other.contains(c))
                .cloned()
                .collect();
            let extra: Vec<String> = other
                .iter()
                .filter(|c| !cases.contains(c))
                .cloned()
                .collect();
            return Err(EvalError::Invalid {
                path: f.clone(),
                message: format!(
                    "the folders to ensemble must hold the same .npz files as {}: missing [{}], extra [{}]",
                    first.display(),
                    missing.join(", "),
                    extra.join(", ")
                ),
            });
        }
    }
    std::fs::create_dir_all(output_folder).map_err(io_err("create", output_folder))?;
    let marker =
        crate::predict::outputs::begin(&PredictionDir::new(output_folder), "nnseg ensemble")?;
    pool(opts.num_workers)?.install(|| {
        cases.par_iter().try_for_each(|case| -> Result<()> {
            let mut sum: Option<(Array4<f32>, Value)> = None;
            for f in input_folders {
                let path = f.join(format!("{case}.npz"));
                let (p, props) = load_probabilities(&path)?;
                match sum.as_mut() {
                    None => sum = Some((p, props)),
                    Some((s, _)) => {
                        if s.shape() != p.shape() {
                            return Err(EvalError::Invalid {
                                path,
                                message: format!(
                                    "probabilities of shape {:?} do not match {:?} of {}",
                                    p.shape(),
                                    s.shape(),
                                    first.join(format!("{case}.npz")).display()
                                ),
                            });
                        }
                        *s += &p;
                    }
                }
            }
            let Some((mut s, props)) = sum else {
                return Ok(());
            };
            let n = input_folders.len() as f32;
            s.mapv_inplace(|v| v / n);
            let geometry =
                image_properties(&props, &props_path(&first.join(format!("{case}.npz"))))?;
            let seg = probabilities_to_segmentation(
                &s,
                &opts.labels,
                opts.regions_class_order.as_deref(),
            );
            // one unit per case: probabilities first, the segmentation last
            if opts.save_probabilities {
                save_probabilities(&output_folder.join(format!("{case}.npz")), &s, &props)?;
            }
            datasets::io::write_seg(
                &output_folder.join(format!("{case}{}", opts.file_ending)),
                seg.view(),
                &geometry,
            )?;
            Ok(())
        })
    })?;
    let (src, dst) = (PredictionDir::new(first), PredictionDir::new(output_folder));
    for (from, to) in [
        (src.dataset_json(), dst.dataset_json()),
        (src.plans_json(), dst.plans_json()),
    ] {
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(io_err("read", &from))?;
            plans::io::write_atomic(&to, &bytes)?;
        }
    }
    marker.finish()?;
    Ok(cases.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datasets::io::ImageProperties;

    fn props(spacing: f64) -> Value {
        serde_json::json!({ "spacing": [1.0, 1.0, 1.0],
            IMAGE_PROPERTIES_KEY: serde_json::to_value(ImageProperties::with_spacing([spacing, 1.0, 1.0])).unwrap() })
    }

    #[test]
    fn argmax_and_regions() {
        let p = Array4::from_shape_vec(
            (3, 1, 1, 3),
            vec![0.5, 0.2, 0.3, 0.5, 0.7, 0.3, 0.0, 0.1, 0.4],
        )
        .unwrap();
        // ties: first maximum (channel 0) wins
        let s = probabilities_to_segmentation(&p, &[0, 1, 2], None);
        assert_eq!(s.as_slice().unwrap(), &[0, 1, 2]);
        let r = Array4::from_shape_vec((2, 1, 1, 3), vec![0.9, 0.6, 0.1, 0.2, 0.7, 0.9]).unwrap();
        let s = probabilities_to_segmentation(&r, &[], Some(&[1, 2]));
        assert_eq!(s.as_slice().unwrap(), &[1, 2, 2]);
    }

    #[test]
    fn ensemble_two_folders() {
        let t = tempfile::tempdir().unwrap();
        let (a, b, out) = (t.path().join("a"), t.path().join("b"), t.path().join("out"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        // voxel 0: a says 1 (0.6), b says 0 (0.9) -> mean favours 0; voxel 1: both lean 1
        let pa = Array4::from_shape_vec((2, 1, 1, 2), vec![0.4, 0.3, 0.6, 0.7]).unwrap();
        let pb = Array4::from_shape_vec((2, 1, 1, 2), vec![0.9, 0.45, 0.1, 0.55]).unwrap();
        save_probabilities(&a.join("c.1.npz"), &pa, &props(2.0)).unwrap();
        save_probabilities(&b.join("c.1.npz"), &pb, &props(3.0)).unwrap();
        std::fs::write(a.join("dataset.json"), "{}").unwrap();
        let opts = EnsembleOptions {
            file_ending: ".nii.gz".into(),
            labels: vec![0, 1],
            regions_class_order: None,
            save_probabilities: true,
            num_workers: 2,
        };
        assert_eq!(
            ensemble_folders(&[a.clone(), b.clone()], &out, &opts).unwrap(),
            1
        );
        let (seg, geo) = datasets::io::read_seg(&out.join("c.1.nii.gz")).unwrap();
        assert_eq!(seg.as_slice().unwrap(), &[0, 1]);
        assert_eq!(geo.spacing[0], 2.0); // first folder's geometry
        let (avg, _) = load_probabilities(&out.join("c.1.npz")).unwrap();
        assert!((avg[[0, 0, 0, 0]] - 0.65).abs() < 1e-6);
        assert!(out.join("dataset.json").is_file());

        // differing case sets are an error naming the case
        save_probabilities(&a.join("d.npz"), &pa, &props(2.0)).unwrap();
        let e = ensemble_folders(&[a, b], &out, &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing [d]"), "{e}");
    }
}
