//! nnU-Net's `DefaultPreprocessor` (`preprocessing/preprocessors/default_preprocessor.py`).
//!
//! [`preprocess_case`] follows `run_case_npy` step by step:
//! 1. (float32 input) apply `transpose_forward` to data, seg and spacing;
//! 2. `crop_to_nonzero` (seg gets -1 outside the nonzero mask; a seg is generated when there
//!    is none, for the normalization mask);
//! 3. target shape with `compute_new_shape` (2d configurations keep the original spacing of
//!    axis 0);
//! 4. normalize (before resampling);
//! 5. resample data and seg with the plans' kwargs;
//! 6. sample class locations (seed 1234) for foreground oversampling;
//! 7. seg as int16.
//!
//! [`preprocess_dataset`] runs it for every training case of a raw dataset in a pool of
//! `num_workers` threads and writes `{data_identifier}/{case}.npy|_seg.npy|.json`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use datasets::io::ImageProperties;
use datasets::layout::case_file_name;
use datasets::{PreprocessedDir, RawDataset};
use ndarray::{Array4, ArrayView4, Axis};
use plans::{Configuration, DatasetJson, IntensityProperties, LabelValue, Plans};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::completion::CompletionRecord;
use crate::cropping::crop_to_nonzero_checked;
use crate::error::{worker_pool, PreprocessError};
use crate::fingerprint::check_nan;
use crate::normalization::{normalize, ChannelIntensityStats};
use crate::resampling::{compute_new_shape, resample_data_to_shape, resample_seg_to_shape};
use crate::storage::{self, class_locations_key, CaseProperties, ClassLocations};

/// The only resampling function nnU-Net's default plans name (and the one implemented).
pub const RESAMPLING_FN: &str = "resample_data_or_seg_to_shape";
/// Seed of `_sample_foreground_locations`.
pub const CLASS_LOCATIONS_SEED: u64 = 1234;
/// `_sample_foreground_locations`: at most this many locations per class ...
pub const CLASS_LOCATIONS_MIN_SAMPLES: usize = 10_000;
/// ... but at least this fraction of the class's voxels.
pub const CLASS_LOCATIONS_MIN_COVERAGE: f64 = 0.01;

impl From<&IntensityProperties> for ChannelIntensityStats {
    fn from(p: &IntensityProperties) -> Self {
        ChannelIntensityStats {
            mean: p.mean,
            std: p.std,
            percentile_00_5: p.percentile_00_5,
            percentile_99_5: p.percentile_99_5,
        }
    }
}

/// Options of [`preprocess_dataset`].
#[derive(Debug, Clone)]
pub struct PreprocessOptions {
    /// Worker threads (cases processed in parallel; one case in memory per worker).
    pub num_workers: usize,
    /// Log every case (shapes, spacing) at info level.
    pub verbose: bool,
    /// Called after each case is written.
    pub progress: Option<crate::ProgressHook>,
    /// Reuse the cases of the existing complete, current data folder whose raw files did not
    /// change and whose files are intact (see `completion::reuse_unchanged_cases`); only the
    /// missing and changed cases are preprocessed (`preprocess --incremental`).
    pub incremental: bool,
}

impl Default for PreprocessOptions {
    fn default() -> Self {
        PreprocessOptions {
            num_workers: 4,
            verbose: false,
            progress: None,
            incremental: false,
        }
    }
}

/// One preprocessed case in memory.
#[derive(Debug, Clone)]
pub struct PreprocessedCase {
    /// Normalized, resampled data `(c, z, y, x)` in transposed axis order.
    pub data: Array4<f32>,
    /// Resampled segmentation `(1, z, y, x)` (`-1` outside the nonzero mask); `None` when no
    /// segmentation was given.
    pub seg: Option<Array4<i16>>,
    /// The properties nnU-Net stores in `{case}.pkl`.
    pub properties: CaseProperties,
}

/// Timing and shapes of one case in [`PreprocessReport`].
#[derive(Debug, Clone, PartialEq)]
pub struct CaseReport {
    /// Case identifier.
    pub identifier: String,
    /// Wall time for reading, preprocessing and writing the case.
    pub seconds: f64,
    /// Shape after transposing, before cropping.
    pub shape_before_cropping: [usize; 3],
    /// Shape after cropping.
    pub shape_after_cropping: [usize; 3],
    /// Final (resampled) shape.
    pub shape_after_resampling: [usize; 3],
}

/// Result of [`preprocess_dataset`].
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessReport {
    /// Configuration name.
    pub configuration: String,
    /// The folder the cases were written to (`out_root/{data_identifier}`).
    pub output_folder: PathBuf,
    /// Per preprocessed case, in dataset order.
    pub cases: Vec<CaseReport>,
    /// The cases taken over unchanged from the previous folder (`incremental`).
    pub reused: Vec<String>,
    /// Total wall time.
    pub seconds: f64,
}

fn validate_transpose(t: &[usize]) -> Result<[usize; 3], PreprocessError> {
    let mut seen = [false; 3];
    if t.len() != 3 {
        return Err(PreprocessError::Invalid(format!(
            "plans transpose_forward {t:?} must be a permutation of [0, 1, 2]"
        )));
    }
    for &a in t {
        if a > 2 || seen[a] {
            return Err(PreprocessError::Invalid(format!(
                "plans transpose_forward {t:?} must be a permutation of [0, 1, 2]"
            )));
        }
        seen[a] = true;
    }
    Ok([t[0], t[1], t[2]])
}

/// The classes / regions nnU-Net collects locations for: foreground regions (with regions) or
/// labels, plus `[-1] + all_labels` (annotated voxels) with an ignore label.
pub fn classes_for_locations(ds_json: &DatasetJson) -> Vec<Vec<i64>> {
    let mut classes: Vec<Vec<i64>> = if ds_json.has_regions() {
        ds_json
            .labels
            .iter()
            .filter(|(k, v)| k != "ignore" && !v.is_background())
            .map(|(_, v)| match v {
                LabelValue::Single(x) => vec![*x],
                LabelValue::Region(r) => r.clone(),
            })
            .collect()
    } else {
        ds_json
            .foreground_labels()
            .into_iter()
            .map(|l| vec![l])
            .collect()
    };
    if ds_json.ignore_label().is_some() {
        let mut annotated = vec![-1];
        annotated.extend(ds_json.all_labels());
        classes.push(annotated);
    }
    classes
}

/// nnU-Net's `_sample_foreground_locations` (current version): for each class or region,
/// `n = max(min(10000, count), ceil(0.01 * count))` voxels of the union of its labels, drawn
/// without replacement with one RNG seeded `seed` for all classes. Offsets index the voxels
/// ordered by label (in the region's label order), then C order — as nnU-Net's stable
/// argsort. Keys via [`class_locations_key`]; coordinates `[0, z, y, x]`.
///
/// Uses two passes over `seg` and memory proportional to the number of samples (no list of
/// all foreground coordinates). The RNG is ChaCha8, not numpy's MT19937, so the chosen voxels
/// differ from nnU-Net's (same distribution).
pub fn sample_class_locations(
    seg: ArrayView4<i16>,
    classes: &[Vec<i64>],
    seed: u64,
) -> ClassLocations {
    const OFF: i64 = 32768;
    let plane = seg.index_axis(Axis(0), 0);
    let mut counts = vec![0u64; 65536];
    for &v in plane.iter() {
        counts[(v as i64 + OFF) as usize] += 1;
    }
    let in_range = |l: i64| (i16::MIN as i64..=i16::MAX as i64).contains(&l);

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // (label, rank within label, class index, slot in the class's output)
    let mut requests: Vec<(i16, u64, usize, usize)> = Vec::new();
    let mut sizes: Vec<usize> = Vec::with_capacity(classes.len());
    for (ci, labs) in classes.iter().enumerate() {
        let mut uniq: Vec<i64> = Vec::with_capacity(labs.len());
        for &l in labs {
            if !uniq.contains(&l) {
                uniq.push(l);
            }
        }
        let per: Vec<(i16, u64)> = uniq
            .iter()
            .filter(|&&l| in_range(l))
            .map(|&l| (l as i16, counts[(l + OFF) as usize]))
            .filter(|&(_, c)| c > 0)
            .collect();
        let total: u64 = per.iter().map(|&(_, c)| c).sum();
        if total == 0 {
            sizes.push(0);
            continue;
        }
        let target = (CLASS_LOCATIONS_MIN_SAMPLES as u64)
            .min(total)
            .max((total as f64 * CLASS_LOCATIONS_MIN_COVERAGE).ceil() as u64)
            as usize;
        let picked = rand::seq::index::sample(&mut rng, total as usize, target);
        for (slot, off) in picked.into_iter().enumerate() {
            let mut off = off as u64;
            for &(l, c) in &per {
                if off < c {
                    requests.push((l, off, ci, slot));
                    break;
                }
                off -= c;
            }
        }
        sizes.push(target);
    }

    let mut out: Vec<Vec<[i64; 4]>> = sizes.iter().map(|&n| vec![[0i64; 4]; n]).collect();
    if !requests.is_empty() {
        requests.sort_unstable_by_key(|&(l, r, _, _)| (l, r));
        // First request index per label.
        let mut next: Vec<usize> = vec![usize::MAX; 65536];
        for (i, &(l, _, _, _)) in requests.iter().enumerate().rev() {
            next[(l as i64 + OFF) as usize] = i;
        }
        let mut seen = vec![0u64; 65536];
        for ((z, y, x), &v) in plane.indexed_iter() {
            let li = (v as i64 + OFF) as usize;
            let mut i = next[li];
            if i == usize::MAX {
                continue;
            }
            let rank = seen[li];
            seen[li] += 1;
            while i < requests.len() && requests[i].0 == v && requests[i].1 == rank {
                let (_, _, ci, slot) = requests[i];
                out[ci][slot] = [0, z as i64, y as i64, x as i64];
                i += 1;
            }
            next[li] = if i < requests.len() && requests[i].0 == v {
                i
            } else {
                usize::MAX
            };
        }
    }
    classes
        .iter()
        .zip(out)
        .map(|(labs, locs)| (class_locations_key(labs), locs))
        .collect()
}

/// nnU-Net's `run_case_npy` for one case (see the module docs). `data` is `(c, z, y, x)`
/// float32 in reader order, `seg` `(1, z, y, x)`; `image_properties` are the reader's.
/// Normalization uses the plans' `foreground_intensity_properties_per_channel`, like nnU-Net.
pub fn preprocess_case(
    data: Array4<f32>,
    seg: Option<Array4<i16>>,
    image_properties: &ImageProperties,
    plans: &Plans,
    configuration: &Configuration,
    ds_json: &DatasetJson,
) -> Result<PreprocessedCase, PreprocessError> {
    let cfg_err = |message: String| PreprocessError::Configuration {
        configuration: configuration.data_identifier.clone(),
        message,
    };
    let tf = validate_transpose(&plans.transpose_forward)?;
    let schemes = &configuration.normalization_schemes;
    for (what, name) in [
        ("resampling_fn_data", &configuration.resampling_fn_data),
        ("resampling_fn_seg", &configuration.resampling_fn_seg),
    ] {
        if name != RESAMPLING_FN {
            return Err(cfg_err(format!(
                "{what} {name:?} is not supported (supported: {RESAMPLING_FN:?})"
            )));
        }
    }
    let channels = data.dim().0;
    if schemes.len() != channels || configuration.use_mask_for_norm.len() != channels {
        return Err(cfg_err(format!(
            "the image has {channels} channel(s) but normalization_schemes has {} and use_mask_for_norm {} entries",
            schemes.len(),
            configuration.use_mask_for_norm.len()
        )));
    }
    let stats: Vec<Option<ChannelIntensityStats>> = (0..channels)
        .map(|c| {
            plans
                .foreground_intensity_properties_per_channel
                .get(&c.to_string())
                .map(ChannelIntensityStats::from)
        })
        .collect();

    // 1. transpose (views; the crop below copies only the cropped region into C order).
    let axes = [0, tf[0] + 1, tf[1] + 1, tf[2] + 1];
    let sp = image_properties.spacing;
    let original_spacing = [sp[tf[0]], sp[tf[1]], sp[tf[2]]];
    let has_seg = seg.is_some();
    let cropped = {
        let dv = data.view().permuted_axes(axes);
        let sv = seg.as_ref().map(|s| s.view().permuted_axes(axes));
        crop_to_nonzero_checked(dv, sv).map_err(|e| PreprocessError::Invalid(e.to_string()))?
    };
    let shape_before_cropping = {
        let s = data.shape();
        [s[axes[1]], s[axes[2]], s[axes[3]]]
    };
    drop(data);
    drop(seg);
    let mut cdata = cropped.data;
    let cseg = cropped
        .seg
        .ok_or_else(|| PreprocessError::Invalid("cropping returned no segmentation".into()))?;
    let shape_after_crop = [cdata.shape()[1], cdata.shape()[2], cdata.shape()[3]];

    // 3. target spacing / shape.
    let target_spacing: [f64; 3] = match configuration.spacing.as_slice() {
        [a, b] => [original_spacing[0], *a, *b],
        [a, b, c] => [*a, *b, *c],
        other => {
            return Err(cfg_err(format!(
                "spacing {other:?} must have 2 or 3 entries"
            )))
        }
    };
    if target_spacing.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
        return Err(cfg_err(format!(
            "spacing {target_spacing:?} must be positive"
        )));
    }
    let ns = compute_new_shape(&shape_after_crop, &original_spacing, &target_spacing);
    let new_shape = [ns[0], ns[1], ns[2]];

    // 4. normalize before resampling.
    normalize(
        cdata.view_mut(),
        Some(cseg.index_axis(Axis(0), 0)),
        schemes,
        &configuration.use_mask_for_norm,
        &stats,
    )?;

    // 5. resample.
    let data_out = if new_shape == shape_after_crop {
        cdata
    } else {
        let r = resample_data_to_shape(
            cdata.view(),
            new_shape,
            &original_spacing,
            &target_spacing,
            &configuration.resampling_fn_data_kwargs,
        );
        drop(cdata);
        r
    };
    let seg_out = if !has_seg {
        None
    } else if new_shape == shape_after_crop {
        Some(cseg)
    } else {
        Some(resample_seg_to_shape(
            cseg.view(),
            new_shape,
            &original_spacing,
            &target_spacing,
            &configuration.resampling_fn_seg_kwargs,
        ))
    };

    // 6. class locations.
    let class_locations = match &seg_out {
        Some(s) => sample_class_locations(
            s.view(),
            &classes_for_locations(ds_json),
            CLASS_LOCATIONS_SEED,
        ),
        None => BTreeMap::new(),
    };
    Ok(PreprocessedCase {
        data: data_out,
        seg: seg_out,
        properties: CaseProperties {
            spacing: image_properties.spacing,
            shape_before_cropping,
            bbox_used_for_cropping: cropped.bbox,
            shape_after_cropping_and_before_resampling: shape_after_crop,
            class_locations,
            image_properties: image_properties.clone(),
        },
    })
}

/// Reads a case's files and runs [`preprocess_case`] (`label` `None` for inference).
pub fn preprocess_case_files(
    images: &[PathBuf],
    label: Option<&Path>,
    plans: &Plans,
    configuration: &Configuration,
    ds_json: &DatasetJson,
) -> Result<PreprocessedCase, PreprocessError> {
    let (data, props) = datasets::io::read_images(images)?;
    check_nan(&data, images)?;
    let seg = match label {
        Some(l) => {
            let (seg, _) = datasets::io::read_seg(l)?;
            if seg.shape()[1..] != data.shape()[1..] {
                return Err(PreprocessError::ShapeMismatch {
                    image_file: images.first().cloned().unwrap_or_default(),
                    label_file: l.to_path_buf(),
                    image: data.shape()[1..].to_vec(),
                    label: seg.shape()[1..].to_vec(),
                });
            }
            Some(seg)
        }
        None => None,
    };
    preprocess_case(data, seg, &props, plans, configuration, ds_json)
}

/// Preprocesses every training case of `ds` for `configuration` into
/// `out/{data_identifier}/`. The cases are written into a fresh
/// `.{data_identifier}.partial/` folder; once all are saved the completion record
/// ([`crate::completion`]) is written last, atomically, and the folder is swapped in for the
/// old one (which is kept until then, so an interrupted or failed re-run never loses good
/// data). Cases run in parallel on `num_workers` threads; each case's files are written
/// atomically and all-or-nothing. After the first failing case no new cases are started; the
/// first error (in dataset order) is returned, naming the case.
pub fn preprocess_dataset(
    ds: &RawDataset,
    plans: &Plans,
    configuration: &str,
    out: &PreprocessedDir,
    opts: &PreprocessOptions,
) -> Result<PreprocessReport, PreprocessError> {
    let t0 = Instant::now();
    let cfg = plans.configuration(configuration)?;
    // Fail early on plans problems, before touching anything.
    validate_transpose(&plans.transpose_forward)?;
    datasets::layout::check_name(
        &format!("configuration {configuration:?}: data_identifier"),
        &cfg.data_identifier,
    )?;
    let partial = out.partial_data_folder(&cfg.data_identifier);
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(PreprocessError::io(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(PreprocessError::io(&partial))?;
    let folder = out.data_folder(&cfg.data_identifier);
    let built = (|| {
        let reused = if opts.incremental {
            crate::completion::reuse_unchanged_cases(ds, plans, configuration, &folder, &partial)?
        } else {
            Vec::new()
        };
        let cases = preprocess_cases(ds, plans, &cfg, &partial, opts, &reused)?;
        CompletionRecord::build(ds, plans, configuration, &cfg, &partial)?.write(&partial)?;
        Ok((cases, reused))
    })();
    let (cases, reused) = match built {
        Ok(built) => built,
        Err(e) => {
            let _ = fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    swap_in(
        &partial,
        &folder,
        &out.old_data_folder(&cfg.data_identifier),
    )?;
    Ok(PreprocessReport {
        configuration: configuration.to_string(),
        output_folder: folder,
        cases,
        reused,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Replaces `folder` by `partial`: the old folder is renamed to `old` first and removed
/// after the swap (a crash in between leaves the complete old data in `old`).
fn swap_in(partial: &Path, folder: &Path, old: &Path) -> Result<(), PreprocessError> {
    if old.exists() {
        fs::remove_dir_all(old).map_err(PreprocessError::io(old))?;
    }
    if folder.exists() {
        fs::rename(folder, old).map_err(PreprocessError::io(folder))?;
    }
    fs::rename(partial, folder).map_err(PreprocessError::io(partial))?;
    if old.exists() {
        fs::remove_dir_all(old).map_err(PreprocessError::io(old))?;
    }
    Ok(())
}

/// Preprocesses and saves every case of `ds` but those in `skip` into `folder` (see
/// [`preprocess_dataset`]).
fn preprocess_cases(
    ds: &RawDataset,
    plans: &Plans,
    cfg: &Configuration,
    folder: &Path,
    opts: &PreprocessOptions,
    skip: &[String],
) -> Result<Vec<CaseReport>, PreprocessError> {
    let failed = AtomicBool::new(false);
    let pool = worker_pool(opts.num_workers)?;
    let results: Vec<Option<Result<CaseReport, PreprocessError>>> = pool.install(|| {
        ds.cases
            .par_iter()
            .with_max_len(1)
            .filter(|case| !skip.contains(&case.identifier))
            .map(|case| {
                if failed.load(Ordering::Relaxed) {
                    return None;
                }
                let t = Instant::now();
                let r = (|| {
                    let label = case.label.as_deref().ok_or(PreprocessError::MissingLabel)?;
                    let pc =
                        preprocess_case_files(&case.images, Some(label), plans, cfg, &ds.json)?;
                    storage::save_case(
                        folder,
                        &case.identifier,
                        pc.data.view(),
                        pc.seg.as_ref().map(|s| s.view()),
                        &pc.properties,
                    )?;
                    let s = pc.data.shape();
                    let rep = CaseReport {
                        identifier: case.identifier.clone(),
                        seconds: t.elapsed().as_secs_f64(),
                        shape_before_cropping: pc.properties.shape_before_cropping,
                        shape_after_cropping: pc
                            .properties
                            .shape_after_cropping_and_before_resampling,
                        shape_after_resampling: [s[1], s[2], s[3]],
                    };
                    if opts.verbose {
                        tracing::info!(
                            "{}: {:?} -> crop {:?} -> {:?} (spacing {:?} -> {:?}) in {:.2}s",
                            rep.identifier,
                            rep.shape_before_cropping,
                            rep.shape_after_cropping,
                            rep.shape_after_resampling,
                            pc.properties.spacing,
                            cfg.spacing,
                            rep.seconds
                        );
                    }
                    if let Some(p) = &opts.progress {
                        p.case_done(&rep.identifier);
                    }
                    Ok(rep)
                })()
                .map_err(|e: PreprocessError| e.in_case(&case.identifier));
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                Some(r)
            })
            .collect()
    });
    let mut cases = Vec::with_capacity(results.len());
    let mut first_err = None;
    for r in results.into_iter().flatten() {
        match r {
            Ok(c) => cases.push(c),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(cases)
}

/// Copies every case's label to `out/gt_segmentations/{case}{file_ending}` (nnU-Net does
/// this after preprocessing, for validation without the raw data). Copies keep the source's
/// modification time and are written atomically; like nnU-Net's `copy_file(update=True)` an
/// up-to-date copy (same size and time as its source) is not copied again, but unlike it a
/// copy changed since (newer than its source) is. The
/// folder's completion record ([`crate::completion::GtRecord`]) is written last; an existing
/// folder is marked unfinished before the first file is touched, a new one is built as
/// `.gt_segmentations.partial/` and renamed when complete, so an interrupted copy is never
/// taken for a complete one. Returns the number of files copied.
pub fn copy_gt_segmentations(
    ds: &RawDataset,
    out: &PreprocessedDir,
) -> Result<usize, PreprocessError> {
    use crate::completion::GtRecord;
    let dir = out.gt_segmentations();
    if dir.is_dir() {
        GtRecord::begin(&dir)?;
        let copied = copy_labels(ds, &dir)?;
        GtRecord::finish(&dir, ds)?;
        return Ok(copied);
    }
    let partial = out.partial_gt_segmentations();
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(PreprocessError::io(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(PreprocessError::io(&partial))?;
    let copied = copy_labels(ds, &partial)?;
    GtRecord::finish(&partial, ds)?;
    fs::rename(&partial, &dir).map_err(PreprocessError::io(&partial))?;
    Ok(copied)
}

/// The copy of [`copy_gt_segmentations`] into `dir`.
fn copy_labels(ds: &RawDataset, dir: &Path) -> Result<usize, PreprocessError> {
    let mut copied = 0;
    for case in &ds.cases {
        let Some(src) = &case.label else { continue };
        let dst = dir.join(case_file_name(&case.identifier, &ds.json.file_ending));
        let src_meta = fs::metadata(src).map_err(PreprocessError::io(src))?;
        let src_mtime = src_meta.modified().map_err(PreprocessError::io(src))?;
        // a copy keeps the source's size and time: anything else (an older copy, or a file
        // changed since, which nnU-Net's update rule would keep) is copied again
        if let Ok(m) = fs::metadata(&dst) {
            if m.len() == src_meta.len() && m.modified().ok() == Some(src_mtime) {
                continue;
            }
        }
        let bytes = fs::read(src).map_err(PreprocessError::io(src))?;
        storage::write_atomic_with(&dst, |w| {
            use std::io::Write;
            let io_err = |source| storage::StorageError::Io {
                path: dst.clone(),
                source,
            };
            w.write_all(&bytes).map_err(io_err)?;
            // Flush before setting the time: later writes would update it again.
            w.flush().map_err(io_err)?;
            w.get_ref().set_modified(src_mtime).map_err(io_err)
        })
        .map_err(|e| PreprocessError::from(e).in_case(&case.identifier))?;
        copied += 1;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MappedCase;
    use ndarray::{s, Array3};
    use serde_json::{json, Value};

    const PLANS: &str = include_str!("testdata/plans_Dataset501.json");

    /// The example plans with edits to both configurations.
    fn plans_with(edit: impl Fn(&mut Value)) -> Plans {
        let mut v: Value = serde_json::from_str(PLANS).unwrap();
        edit(&mut v);
        Plans::from_value(&v, "test_plans.json").unwrap()
    }

    fn ds_json(labels: Value) -> DatasetJson {
        let mut v = json!({"channel_names": {"0": "T1"}, "labels": labels, "numTraining": 2, "file_ending": ".nii.gz"});
        let regions = v["labels"]
            .as_object()
            .unwrap()
            .values()
            .filter(|l| l.is_array())
            .count();
        if regions > 0 {
            v["regions_class_order"] =
                json!((1..=v["labels"].as_object().unwrap().len() - 1).collect::<Vec<_>>());
        }
        DatasetJson::from_value(&v, "dataset.json").unwrap()
    }

    fn set_cfg(v: &mut Value, cfg: &str, key: &str, val: Value) {
        v["configurations"][cfg][key] = val;
    }

    #[test]
    fn class_locations_counts_keys_and_labels() {
        let mut seg = Array4::<i16>::zeros((1, 10, 50, 60));
        // label 1: 300 voxels, label 2: 20000 voxels, label 3 absent, -1 border
        seg.slice_mut(s![0, 0, 0..5, 0..60]).fill(1);
        seg.slice_mut(s![0, 1..8, .., ..]).fill(2);
        seg.slice_mut(s![0, 8, 0..10, 0..60]).fill(-1);
        let n2 = 7 * 50 * 60;
        seg[[0, 9, 0, 0]] = 2;
        let n2 = n2 + 1;
        let classes = vec![vec![1], vec![2], vec![3], vec![1, 2], vec![-1, 0, 1, 2, 3]];
        let cl = sample_class_locations(seg.view(), &classes, 1234);
        assert_eq!(cl["1"].len(), 300);
        assert_eq!(
            cl["2"].len(),
            10_000.max((n2 as f64 * 0.01).ceil() as usize)
        );
        assert!(cl["3"].is_empty());
        assert_eq!(cl["(1, 2)"].len(), 10_000);
        let total = 10 * 50 * 60;
        assert_eq!(cl["(-1, 0, 1, 2, 3)"].len(), 10_000.min(total));
        for (key, allowed) in [("1", vec![1i16]), ("2", vec![2]), ("(1, 2)", vec![1, 2])] {
            let locs = &cl[key];
            let mut uniq = locs.clone();
            uniq.sort();
            uniq.dedup();
            assert_eq!(uniq.len(), locs.len(), "without replacement");
            for l in locs {
                assert_eq!(l[0], 0);
                let v = seg[[0, l[1] as usize, l[2] as usize, l[3] as usize]];
                assert!(allowed.contains(&v), "{key}: {l:?} has {v}");
            }
        }
        // the (1, 2) region draws from both labels
        let has1 = cl["(1, 2)"]
            .iter()
            .any(|l| seg[[0, l[1] as usize, l[2] as usize, l[3] as usize]] == 1);
        assert!(has1);
        // deterministic
        assert_eq!(sample_class_locations(seg.view(), &classes, 1234), cl);
        assert_ne!(
            sample_class_locations(seg.view(), &classes, 99)["2"],
            cl["2"]
        );
    }

    #[test]
    fn class_locations_one_percent_coverage() {
        let seg = Array4::<i16>::ones((1, 10, 100, 1200)); // 1.2e6 voxels -> 12000 samples
        let cl = sample_class_locations(seg.view(), &[vec![1]], 1234);
        assert_eq!(cl["1"].len(), 12_000);
    }

    #[test]
    fn classes_for_regions_and_ignore() {
        let d = ds_json(json!({"background": 0, "a": 1, "b": 2, "ignore": 3}));
        assert_eq!(
            classes_for_locations(&d),
            vec![vec![1], vec![2], vec![-1, 0, 1, 2]]
        );
        let r = ds_json(json!({"background": 0, "whole": [1, 2], "core": 2}));
        assert_eq!(classes_for_locations(&r), vec![vec![1, 2], vec![2]]);
    }

    /// A (1, 8, 10, 12) image with a nonzero block, label inside, spacing (2, 1, 1).
    fn synthetic_case() -> (Array4<f32>, Array4<i16>) {
        let mut data = Array4::<f32>::zeros((1, 8, 10, 12));
        let mut seg = Array4::<i16>::zeros((1, 8, 10, 12));
        for z in 1..7 {
            for y in 2..9 {
                for x in 3..11 {
                    data[[0, z, y, x]] = (z * 7 + y * 3 + x) as f32;
                }
            }
        }
        seg.slice_mut(s![0, 3..5, 4..7, 5..9]).fill(1);
        seg.slice_mut(s![0, 2, 2, 3..5]).fill(2);
        (data, seg)
    }

    #[test]
    fn preprocess_case_without_resampling_matches_manual_pipeline() {
        // target spacing == original spacing: only transpose, crop and z-score.
        let plans = plans_with(|v| {
            set_cfg(v, "3d_fullres", "spacing", json!([2.0, 1.0, 1.0]));
            set_cfg(
                v,
                "3d_fullres",
                "normalization_schemes",
                json!(["ZScoreNormalization"]),
            );
            set_cfg(v, "3d_fullres", "use_mask_for_norm", json!([true]));
        });
        let cfg = plans.configuration("3d_fullres").unwrap();
        let (data, seg) = synthetic_case();
        let props = ImageProperties::with_spacing([2.0, 1.0, 1.0]);
        let dj = ds_json(json!({"background": 0, "a": 1, "b": 2}));
        let out =
            preprocess_case(data.clone(), Some(seg.clone()), &props, &plans, &cfg, &dj).unwrap();
        let p = &out.properties;
        assert_eq!(p.bbox_used_for_cropping, [[1, 7], [2, 9], [3, 11]]);
        assert_eq!(p.shape_before_cropping, [8, 10, 12]);
        assert_eq!(p.shape_after_cropping_and_before_resampling, [6, 7, 8]);
        assert_eq!(out.data.dim(), (1, 6, 7, 8));
        // z-score over the mask (everything inside the crop is nonzero -> all voxels)
        let crop: Array3<f32> = data.slice(s![0, 1..7, 2..9, 3..11]).to_owned();
        let n = crop.len() as f64;
        let mean = crop.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (crop.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let expect = (crop[[2, 3, 4]] - mean as f32) / std as f32;
        assert!((out.data[[0, 2, 3, 4]] - expect).abs() < 1e-6);
        let sg = out.seg.as_ref().unwrap();
        assert_eq!(sg[[0, 2, 2, 2]], 1);
        assert_eq!(sg[[0, 1, 0, 0]], 2);
        assert_eq!(p.class_locations["1"].len(), 2 * 3 * 4);
        assert_eq!(p.class_locations["2"].len(), 2);
        for l in &p.class_locations["1"] {
            assert_eq!(sg[[0, l[1] as usize, l[2] as usize, l[3] as usize]], 1);
        }
        assert_eq!(p.spacing, [2.0, 1.0, 1.0]);
    }

    #[test]
    fn preprocess_case_transposes_crops_and_resamples() {
        // transpose_forward [2, 0, 1]: x becomes axis 0.
        let plans = plans_with(|v| {
            v["transpose_forward"] = json!([2, 0, 1]);
            v["transpose_backward"] = json!([1, 2, 0]);
            set_cfg(v, "3d_fullres", "spacing", json!([1.0, 1.0, 1.0]));
            set_cfg(v, "2d", "spacing", json!([1.0, 0.5]));
        });
        let cfg = plans.configuration("3d_fullres").unwrap();
        let (data, seg) = synthetic_case();
        let props = ImageProperties::with_spacing([2.0, 1.0, 1.0]);
        let dj = ds_json(json!({"background": 0, "a": 1, "b": 2}));
        let out =
            preprocess_case(data.clone(), Some(seg.clone()), &props, &plans, &cfg, &dj).unwrap();
        let p = &out.properties;
        // transposed original: (x, z, y) = (12, 8, 10), spacing (1, 2, 1)
        assert_eq!(p.shape_before_cropping, [12, 8, 10]);
        assert_eq!(p.bbox_used_for_cropping, [[3, 11], [1, 7], [2, 9]]);
        assert_eq!(p.shape_after_cropping_and_before_resampling, [8, 6, 7]);
        assert_eq!(p.spacing, [2.0, 1.0, 1.0], "original, untransposed");
        assert_eq!(out.data.dim(), (1, 8, 12, 7));
        assert_eq!(out.seg.as_ref().unwrap().dim(), (1, 8, 12, 7));
        // CT normalization with the plans' statistics: values were clipped to [-26.8, 242.1]
        let st = &plans.foreground_intensity_properties_per_channel["0"];
        let hi = ((st.percentile_99_5 - st.mean) / st.std) as f32;
        let lo = ((st.percentile_00_5 - st.mean) / st.std) as f32;
        assert!(out.data.iter().all(|&v| v >= lo - 0.05 && v <= hi + 0.05));
        // label-1 locations still point to label 1 after resampling
        let sg = out.seg.as_ref().unwrap();
        assert!(!p.class_locations["1"].is_empty());
        for l in &p.class_locations["1"] {
            assert_eq!(sg[[0, l[1] as usize, l[2] as usize, l[3] as usize]], 1);
        }

        // 2d: axis 0 keeps its spacing (1.0 after transposing), others go to (1.0, 0.5)
        let cfg2 = plans.configuration("2d").unwrap();
        let out2 = preprocess_case(data, None, &props, &plans, &cfg2, &dj).unwrap();
        assert_eq!(out2.data.dim(), (1, 8, 12, 14));
        assert!(out2.seg.is_none());
        assert!(out2.properties.class_locations.is_empty());
    }

    #[test]
    fn preprocess_case_rejects_bad_inputs() {
        let plans = plans_with(|_| {});
        let cfg = plans.configuration("3d_fullres").unwrap();
        let dj = ds_json(json!({"background": 0, "a": 1}));
        let props = ImageProperties::with_spacing([3.0, 0.8, 0.8]);
        let two_channels = Array4::<f32>::ones((2, 2, 2, 2));
        let e = preprocess_case(two_channels, None, &props, &plans, &cfg, &dj).unwrap_err();
        assert!(e.to_string().contains("2 channel(s)"), "{e}");
        let bad_seg = Array4::<i16>::zeros((1, 2, 2, 3));
        assert!(preprocess_case(
            Array4::ones((1, 2, 2, 2)),
            Some(bad_seg),
            &props,
            &plans,
            &cfg,
            &dj
        )
        .is_err());
        let plans = plans_with(|v| {
            set_cfg(
                v,
                "3d_fullres",
                "resampling_fn_data",
                json!("resample_torch_fornnunet"),
            )
        });
        let cfg = plans.configuration("3d_fullres");
        if let Ok(cfg) = cfg {
            let e = preprocess_case(Array4::ones((1, 2, 2, 2)), None, &props, &plans, &cfg, &dj)
                .unwrap_err();
            assert!(e.to_string().contains("resampling_fn_data"), "{e}");
        }
    }

    /// Writes a raw dataset with `n` cases into `root/Dataset900_T`.
    fn write_raw(root: &Path, n: usize, fg_values: &[f32]) -> PathBuf {
        let folder = root.join("Dataset900_T");
        fs::create_dir_all(folder.join("imagesTr")).unwrap();
        fs::create_dir_all(folder.join("labelsTr")).unwrap();
        fs::write(
            folder.join("dataset.json"),
            serde_json::to_string(&json!({"channel_names": {"0": "CT"},
                "labels": {"background": 0, "a": 1}, "numTraining": n, "file_ending": ".nii.gz"}))
            .unwrap(),
        )
        .unwrap();
        for i in 0..n {
            let mut img = Array3::<f32>::zeros((6, 8, 10));
            img.slice_mut(s![1..5, 1..7, 2..9]).fill(1.0);
            // a notch open to the border: inside the crop box but outside the mask (-> -1)
            img.slice_mut(s![1..5, 1..2, 2..4]).fill(0.0);
            let mut seg = Array3::<i16>::zeros((6, 8, 10));
            seg.slice_mut(s![2..4, 2..5, 3..6]).fill(1);
            img.slice_mut(s![2..4, 2..5, 3..6])
                .fill(fg_values[i % fg_values.len()]);
            let props = ImageProperties::with_spacing([2.0 + i as f64, 1.0, 1.0]);
            let case = format!("case_{i:03}");
            datasets::io::write_image(
                &folder.join(format!("imagesTr/{case}_0000.nii.gz")),
                img.view(),
                &props,
            )
            .unwrap();
            datasets::io::write_seg(
                &folder.join(format!("labelsTr/{case}.nii.gz")),
                seg.view(),
                &props,
            )
            .unwrap();
        }
        folder
    }

    #[test]
    fn fingerprint_of_raw_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let folder = write_raw(dir.path(), 2, &[5.0, 7.0]);
        let ds = RawDataset::open(&folder).unwrap();
        let fp = crate::fingerprint::extract_fingerprint_with_budget(&ds, 2, 1000).unwrap();
        assert_eq!(fp.shapes_after_crop, vec![vec![4, 6, 7], vec![4, 6, 7]]);
        assert_eq!(fp.spacings, vec![vec![2.0, 1.0, 1.0], vec![3.0, 1.0, 1.0]]);
        assert!((fp.median_relative_size_after_cropping - 168.0 / 480.0).abs() < 1e-12);
        let st = &fp.foreground_intensity_properties_per_channel["0"];
        // 500 samples of 5 and 500 of 7
        assert_eq!(
            (st.min, st.max, st.mean, st.median, st.std),
            (5.0, 7.0, 6.0, 6.0, 1.0)
        );
        assert_eq!((st.percentile_00_5, st.percentile_99_5), (5.0, 7.0));
    }

    #[test]
    fn fingerprint_errors_name_the_case() {
        let dir = tempfile::tempdir().unwrap();
        let folder = write_raw(dir.path(), 2, &[5.0]);
        let props = ImageProperties::with_spacing([2.0, 1.0, 1.0]);
        datasets::io::write_seg(
            &folder.join("labelsTr/case_001.nii.gz"),
            Array3::<i16>::zeros((6, 8, 11)).view(),
            &props,
        )
        .unwrap();
        let ds = RawDataset::open(&folder).unwrap();
        let e = crate::fingerprint::extract_fingerprint_with_budget(&ds, 1, 100).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("case_001") && msg.contains("labelsTr"),
            "{msg}"
        );
        // NaN
        let mut img = Array3::<f32>::zeros((6, 8, 10));
        img[[1, 1, 1]] = f32::NAN;
        datasets::io::write_image(
            &folder.join("imagesTr/case_001_0000.nii.gz"),
            img.view(),
            &props,
        )
        .unwrap();
        datasets::io::write_seg(
            &folder.join("labelsTr/case_001.nii.gz"),
            Array3::<i16>::zeros((6, 8, 10)).view(),
            &props,
        )
        .unwrap();
        let ds = RawDataset::open(&folder).unwrap();
        let msg = crate::fingerprint::extract_fingerprint_with_budget(&ds, 1, 100)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("case_001") && msg.contains("NaN"), "{msg}");
    }

    /// Issue 19: labels {0, 1, 3} (declared, or present but undeclared) and a zero pixdim
    /// passed the fingerprint and preprocessing silently.
    #[test]
    fn fingerprint_checks_labels_and_voxel_sizes_always() {
        let fp = |folder: &Path| {
            let ds = RawDataset::open(folder).unwrap();
            crate::fingerprint::extract_fingerprint_with_budget(&ds, 1, 100)
        };
        let dir = tempfile::tempdir().unwrap();
        let folder = write_raw(dir.path(), 2, &[5.0]);
        fp(&folder).unwrap();
        // declared non-consecutive labels
        let json_path = folder.join("dataset.json");
        let good = fs::read_to_string(&json_path).unwrap();
        let mut j: Value = serde_json::from_str(&good).unwrap();
        j["labels"] = json!({"background": 0, "a": 1, "b": 3});
        fs::write(&json_path, j.to_string()).unwrap();
        let e = fp(&folder).unwrap_err().to_string();
        assert!(
            e.contains("dataset.json") && e.contains("consecutive"),
            "{e}"
        );
        fs::write(&json_path, &good).unwrap();
        // a label file with a value not declared in dataset.json
        let props = ImageProperties::with_spacing([2.0, 1.0, 1.0]);
        let mut seg = Array3::<i16>::zeros((6, 8, 10));
        seg.slice_mut(s![2..4, 2..5, 3..6]).fill(1);
        seg[[3, 3, 3]] = 3;
        let lbl = folder.join("labelsTr/case_001.nii.gz");
        datasets::io::write_seg(&lbl, seg.view(), &props).unwrap();
        let e = fp(&folder).unwrap_err().to_string();
        assert!(
            e.contains("case_001") && e.contains("[3]") && e.contains("not declared"),
            "{e}"
        );
        seg[[3, 3, 3]] = 1;
        datasets::io::write_seg(&lbl, seg.view(), &props).unwrap();
        fp(&folder).unwrap();
        // a zero voxel size along an axis with several voxels
        let mut img = Array3::<f32>::zeros((6, 8, 10));
        img.slice_mut(s![1..5, 1..7, 2..9]).fill(1.0);
        let zero = ImageProperties::with_spacing([0.0, 1.0, 1.0]);
        datasets::io::write_image(
            &folder.join("imagesTr/case_001_0000.nii.gz"),
            img.view(),
            &zero,
        )
        .unwrap();
        datasets::io::write_seg(&lbl, seg.view(), &zero).unwrap();
        let e = fp(&folder).unwrap_err().to_string();
        assert!(e.contains("case_001") && e.contains("pixdim[3]"), "{e}");
    }

    #[test]
    fn preprocess_dataset_writes_all_cases_and_wipes_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let folder = write_raw(dir.path(), 3, &[100.0, 50.0]);
        let ds = RawDataset::open(&folder).unwrap();
        let plans = plans_with(|v| set_cfg(v, "3d_fullres", "spacing", json!([2.0, 0.5, 0.5])));
        let out_root = dir.path().join("pre");
        let data_dir = out_root.join("nnUNetPlans_3d_fullres");
        fs::create_dir_all(&data_dir).unwrap();
        fs::write(data_dir.join("stale.npy"), b"old").unwrap();
        let opts = PreprocessOptions {
            num_workers: 2,
            verbose: false,
            progress: None,
            incremental: false,
        };
        let rep = preprocess_dataset(
            &ds,
            &plans,
            "3d_fullres",
            &PreprocessedDir::new(&out_root),
            &opts,
        )
        .unwrap();
        assert_eq!(rep.output_folder, data_dir);
        assert!(!data_dir.join("stale.npy").exists());
        let ids: Vec<_> = rep.cases.iter().map(|c| c.identifier.as_str()).collect();
        assert_eq!(ids, vec!["case_000", "case_001", "case_002"]);
        assert_eq!(
            storage::list_cases(&data_dir).unwrap(),
            vec!["case_000", "case_001", "case_002"]
        );
        // case_001: spacing (3, 1, 1) -> (2, .5, .5); crop (4, 6, 7) -> (6, 12, 14)
        assert_eq!(rep.cases[1].shape_after_resampling, [6, 12, 14]);
        let m = MappedCase::open(&data_dir, "case_001").unwrap();
        assert_eq!(m.shape().unwrap(), [6, 12, 14]);
        let seg = m.seg().unwrap().unwrap();
        let p = storage::load_case_properties(&data_dir, "case_001").unwrap();
        assert_eq!(p.spacing, [3.0, 1.0, 1.0]);
        assert_eq!(p.bbox_used_for_cropping, [[1, 5], [1, 7], [2, 9]]);
        assert!(!p.class_locations["1"].is_empty());
        for l in &p.class_locations["1"] {
            assert_eq!(seg[[0, l[1] as usize, l[2] as usize, l[3] as usize]], 1);
        }
        assert!(seg.iter().any(|&v| v == -1));

        // gt_segmentations: copied once, then up to date
        assert_eq!(
            copy_gt_segmentations(&ds, &PreprocessedDir::new(&out_root)).unwrap(),
            3
        );
        assert!(out_root.join("gt_segmentations/case_002.nii.gz").is_file());
        assert_eq!(
            copy_gt_segmentations(&ds, &PreprocessedDir::new(&out_root)).unwrap(),
            0
        );
    }

    #[test]
    fn preprocess_dataset_failing_case_leaves_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let folder = write_raw(dir.path(), 2, &[100.0]);
        let props = ImageProperties::with_spacing([2.0, 1.0, 1.0]);
        datasets::io::write_seg(
            &folder.join("labelsTr/case_001.nii.gz"),
            Array3::<i16>::zeros((6, 9, 10)).view(),
            &props,
        )
        .unwrap();
        let ds = RawDataset::open(&folder).unwrap();
        let plans = plans_with(|_| {});
        let out_root = dir.path().join("pre");
        let opts = PreprocessOptions {
            num_workers: 1,
            verbose: false,
            progress: None,
            incremental: false,
        };
        let msg = preprocess_dataset(
            &ds,
            &plans,
            "3d_fullres",
            &PreprocessedDir::new(&out_root),
            &opts,
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.starts_with("case case_001:") && msg.contains("case_001.nii.gz"),
            "{msg}"
        );
        let data_dir = out_root.join("nnUNetPlans_3d_fullres");
        assert!(!storage::data_path(&data_dir, "case_001").exists());
        assert!(!storage::properties_path(&data_dir, "case_001").exists());
        let e = preprocess_dataset(
            &ds,
            &plans,
            "4d_superres",
            &PreprocessedDir::new(&out_root),
            &opts,
        )
        .unwrap_err();
        assert!(e.to_string().contains("4d_superres"), "{e}");
    }

    fn opts1() -> PreprocessOptions {
        PreprocessOptions {
            num_workers: 1,
            verbose: false,
            progress: None,
            incremental: false,
        }
    }

    /// Issue 19: a partial preprocess (killed after 11 of 12 cases) was trusted, and a
    /// re-run deleted the old data folder first.
    #[test]
    fn completion_record_refuses_partial_and_stale_folders() {
        let dir = tempfile::tempdir().unwrap();
        let folder = write_raw(dir.path(), 3, &[100.0]);
        let ds = RawDataset::open(&folder).unwrap();
        let plans = plans_with(|_| {});
        let pre = PreprocessedDir::new(dir.path().join("pre"));
        preprocess_dataset(&ds, &plans, "3d_fullres", &pre, &opts1()).unwrap();
        let data_dir = pre.data_folder("nnUNetPlans_3d_fullres");
        let rec = crate::verify_complete(&data_dir, &plans, "3d_fullres").unwrap();
        assert_eq!(rec.case_ids(), vec!["case_000", "case_001", "case_002"]);
        assert!(!pre.partial_data_folder("nnUNetPlans_3d_fullres").exists());

        // a missing _seg.npy (or .npy / .json) names the case and the fix
        let seg = storage::seg_path(&data_dir, "case_001");
        let saved = fs::read(&seg).unwrap();
        fs::remove_file(&seg).unwrap();
        let e = crate::verify_complete(&data_dir, &plans, "3d_fullres")
            .unwrap_err()
            .to_string();
        assert!(e.contains("case case_001") && e.contains("_seg.npy"), "{e}");
        assert!(
            e.contains("nnseg preprocess -d") && e.contains("-c 3d_fullres"),
            "{e}"
        );
        fs::write(&seg, saved).unwrap();
        crate::verify_complete(&data_dir, &plans, "3d_fullres").unwrap();

        // changed plans: stale
        let edited = plans_with(|v| set_cfg(v, "3d_fullres", "spacing", json!([2.0, 0.5, 0.5])));
        let e = crate::verify_complete(&data_dir, &edited, "3d_fullres")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("preprocessing settings") && e.contains("differ"),
            "{e}"
        );
        // a configuration that only changes training keys shares the folder
        let bs = plans_with(|v| set_cfg(v, "3d_fullres", "batch_size", json!(7)));
        crate::verify_complete(&data_dir, &bs, "3d_fullres").unwrap();

        // a changed raw file: stale, naming the case
        let lbl = folder.join("labelsTr/case_002.nii.gz");
        let bytes = fs::read(&lbl).unwrap();
        fs::write(&lbl, [bytes.as_slice(), b"x"].concat()).unwrap();
        let e = crate::verify_complete(&data_dir, &plans, "3d_fullres")
            .unwrap_err()
            .to_string();
        assert!(e.contains("case case_002") && e.contains("changed"), "{e}");
        fs::write(&lbl, bytes).unwrap();

        // no record (interrupted run, or the old writer): refused
        fs::remove_file(PreprocessedDir::completion_record(&data_dir)).unwrap();
        let e = crate::verify_complete(&data_dir, &plans, "3d_fullres")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no completion record"), "{e}");
    }

    /// Issue 19: the evaluation of validation predictions and find_best_configuration used
    /// `gt_segmentations/` as it was: an interrupted copy, a missing case or a file changed
    /// since were evaluated against silently.
    #[test]
    fn gt_segmentations_record_refuses_interrupted_missing_and_changed_files() {
        use crate::completion::{verify_gt_segmentations, GtRecord};
        let dir = tempfile::tempdir().unwrap();
        let folder = write_raw(dir.path(), 3, &[100.0]);
        let ds = RawDataset::open(&folder).unwrap();
        let pre = PreprocessedDir::new(dir.path().join("pre"));
        let cases = ["case_000".to_string(), "case_002".to_string()];
        // nothing copied yet
        let e = verify_gt_segmentations(&pre, &cases, "FIX")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist") && e.contains("FIX"), "{e}");
        copy_gt_segmentations(&ds, &pre).unwrap();
        verify_gt_segmentations(&pre, &cases, "FIX").unwrap();
        // the record is hidden: listings by file ending never see it
        assert!(pre.gt_completion_record().is_file());
        assert_eq!(fs::read_dir(pre.gt_segmentations()).unwrap().count(), 4);

        // a case the copy did not know
        let e = verify_gt_segmentations(&pre, &["case_009".into()], "FIX")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("case case_009") && e.contains("no ground truth"),
            "{e}"
        );
        // a missing and a changed file, each naming its case
        let gt1 = pre.gt_segmentations().join("case_001.nii.gz");
        let gt2 = pre.gt_segmentations().join("case_002.nii.gz");
        let saved = fs::read(&gt2).unwrap();
        fs::remove_file(&gt1).unwrap();
        fs::write(&gt2, [saved.as_slice(), b"x"].concat()).unwrap();
        let e = verify_gt_segmentations(&pre, &cases, "FIX")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("case case_001") && e.contains("is missing") && e.contains("FIX"),
            "{e}"
        );
        assert!(e.contains("case case_002") && e.contains("changed"), "{e}");
        // a rerun of the copy repairs both (the changed file is newer than its source)
        assert_eq!(copy_gt_segmentations(&ds, &pre).unwrap(), 2);
        verify_gt_segmentations(&pre, &cases, "FIX").unwrap();

        // an interrupted copy (marked begun, never finished) is refused
        GtRecord::begin(&pre.gt_segmentations()).unwrap();
        let e = verify_gt_segmentations(&pre, &cases, "FIX")
            .unwrap_err()
            .to_string();
        assert!(e.contains("interrupted"), "{e}");
        // a first copy that did not finish leaves no gt_segmentations/ at all
        assert!(!pre.partial_gt_segmentations().exists());
        // no record at all (nnU-Net's or an older nnseg's folder): used as it is
        fs::remove_file(pre.gt_completion_record()).unwrap();
        verify_gt_segmentations(&pre, &cases, "FIX").unwrap();
    }

    /// `--incremental` (issue 19): only the missing and changed cases are preprocessed again;
    /// the result equals a full run's.
    #[test]
    fn incremental_preprocess_redoes_only_missing_and_changed_cases() {
        let dir = tempfile::tempdir().unwrap();
        let folder = write_raw(dir.path(), 4, &[100.0]);
        let plans = plans_with(|_| {});
        let pre = PreprocessedDir::new(dir.path().join("pre"));
        let incremental = PreprocessOptions {
            incremental: true,
            ..opts1()
        };
        let ds = RawDataset::open(&folder).unwrap();
        // nothing to reuse yet
        let r = preprocess_dataset(&ds, &plans, "3d_fullres", &pre, &incremental).unwrap();
        assert_eq!((r.cases.len(), r.reused.len()), (4, 0));
        let data = pre.data_folder("nnUNetPlans_3d_fullres");
        // case_001 lost its data, case_002's raw label changed
        fs::remove_file(storage::data_path(&data, "case_001")).unwrap();
        let lbl = folder.join("labelsTr/case_002.nii.gz");
        let (seg, props) = datasets::io::read_seg(&lbl).unwrap();
        let mut seg = seg.index_axis(Axis(0), 0).to_owned();
        seg[[2, 2, 3]] = 0;
        datasets::io::write_seg(&lbl, seg.view(), &props).unwrap();
        let ds = RawDataset::open(&folder).unwrap();
        let r = preprocess_dataset(&ds, &plans, "3d_fullres", &pre, &incremental).unwrap();
        let done: Vec<_> = r.cases.iter().map(|c| c.identifier.as_str()).collect();
        assert_eq!(done, ["case_001", "case_002"]);
        assert_eq!(r.reused, ["case_000", "case_003"]);
        crate::verify_complete(&data, &plans, "3d_fullres").unwrap();
        // the same files as a full run
        let full = PreprocessedDir::new(dir.path().join("full"));
        preprocess_dataset(&ds, &plans, "3d_fullres", &full, &opts1()).unwrap();
        let files = |d: &Path| {
            let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(d)
                .unwrap()
                .map(|e| {
                    let p = e.unwrap().path();
                    let n = p.file_name().unwrap().to_string_lossy().into_owned();
                    (n, fs::read(&p).unwrap())
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            files(&data),
            files(&full.data_folder("nnUNetPlans_3d_fullres"))
        );
        // other preprocessing settings: nothing is reused
        let edited = plans_with(|v| set_cfg(v, "3d_fullres", "spacing", json!([2.0, 0.5, 0.5])));
        let r = preprocess_dataset(&ds, &edited, "3d_fullres", &pre, &incremental).unwrap();
        assert_eq!((r.cases.len(), r.reused.len()), (4, 0));
    }

    /// Issue 19: "Preprocess also deletes the old data folder first, so an interrupted
    /// re-run loses cases that were fine."
    #[test]
    fn failed_rerun_keeps_the_previous_complete_folder() {
        let dir = tempfile::tempdir().unwrap();
        let folder = write_raw(dir.path(), 2, &[100.0]);
        let plans = plans_with(|_| {});
        let pre = PreprocessedDir::new(dir.path().join("pre"));
        let ds = RawDataset::open(&folder).unwrap();
        preprocess_dataset(&ds, &plans, "3d_fullres", &pre, &opts1()).unwrap();
        datasets::io::write_seg(
            &folder.join("labelsTr/case_001.nii.gz"),
            Array3::<i16>::zeros((6, 9, 10)).view(),
            &ImageProperties::with_spacing([2.0, 1.0, 1.0]),
        )
        .unwrap();
        let ds = RawDataset::open(&folder).unwrap();
        preprocess_dataset(&ds, &plans, "3d_fullres", &pre, &opts1()).unwrap_err();
        let data_dir = pre.data_folder("nnUNetPlans_3d_fullres");
        assert_eq!(
            storage::list_cases(&data_dir).unwrap(),
            vec!["case_000", "case_001"]
        );
        assert!(!pre.partial_data_folder("nnUNetPlans_3d_fullres").exists());
        // the kept folder still verifies its files (the raw label changed: stale, named)
        let e = crate::verify_complete(&data_dir, &plans, "3d_fullres")
            .unwrap_err()
            .to_string();
        assert!(e.contains("case case_001") && e.contains("raw file"), "{e}");
    }
}

/// Timings on a CT-sized volume: `cargo test --release -p preprocessing -- --ignored --nocapture`.
#[cfg(test)]
mod perf {
    use super::*;
    use crate::cropping::crop_to_nonzero;
    use crate::normalization::{normalize_channel, NormalizationScheme};

    #[test]
    #[ignore = "benchmark: slow, run with --release -- --ignored --nocapture"]
    fn perf_large_case() {
        let (nz, ny, nx) = (160usize, 384usize, 384usize);
        let c = (ny as f64 / 2.0, nx as f64 / 2.0);
        // a body-like cylinder with a hollow inside, label blob
        let data = Array4::from_shape_fn((1, nz, ny, nx), |(_, z, y, x)| {
            let r = ((y as f64 - c.0).powi(2) + (x as f64 - c.1).powi(2)).sqrt();
            if r < 150.0 && !(40.0..60.0).contains(&r) {
                (z + y + x) as f32 * 0.1 + 1.0
            } else {
                0.0
            }
        });
        let seg = Array4::from_shape_fn((1, nz, ny, nx), |(_, z, y, x)| {
            let r =
                ((y as f64 - c.0).powi(2) + (x as f64 - c.1).powi(2) + (z as f64 - 80.0).powi(2))
                    .sqrt();
            if r < 30.0 {
                1i16
            } else if r < 40.0 {
                2
            } else {
                0
            }
        });
        let t = Instant::now();
        let cr = crop_to_nonzero(&data, Some(&seg));
        println!(
            "crop_to_nonzero {:?}: {:.3}s",
            cr.data.dim(),
            t.elapsed().as_secs_f64()
        );
        let mut d = cr.data.clone();
        let s = cr.seg.unwrap();
        let t = Instant::now();
        normalize_channel(
            d.index_axis_mut(Axis(0), 0),
            Some(s.index_axis(Axis(0), 0)),
            NormalizationScheme::ZScore,
            true,
            None,
            0,
        )
        .unwrap();
        println!("zscore (masked): {:.3}s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let cl = sample_class_locations(s.view(), &[vec![1], vec![2], vec![-1, 0, 1, 2]], 1234);
        println!(
            "class locations ({} + {} + {}): {:.3}s",
            cl["1"].len(),
            cl["2"].len(),
            cl["(-1, 0, 1, 2)"].len(),
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let mut chunks_a = vec![0f32; 10_000_000];
        let mut chunks: Vec<&mut [f32]> = vec![&mut chunks_a];
        crate::fingerprint::case_fingerprint_from_arrays(data.view(), seg.view(), &mut chunks);
        println!(
            "fingerprint case (1e7 samples): {:.3}s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let mut v = chunks_a.clone();
        let st = crate::fingerprint::intensity_statistics(&mut v);
        println!(
            "intensity statistics over 1e7: {:.3}s {st:?}",
            t.elapsed().as_secs_f64()
        );

        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let props = CaseProperties {
            spacing: [1.0; 3],
            shape_before_cropping: [nz, ny, nx],
            bbox_used_for_cropping: cr.bbox,
            shape_after_cropping_and_before_resampling: [nz, ny, nx],
            class_locations: cl,
            image_properties: ImageProperties::with_spacing([1.0; 3]),
        };
        storage::save_case(dir.path(), "big", d.view(), Some(s.view()), &props).unwrap();
        println!("save_case: {:.3}s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let m = storage::MappedCase::open(dir.path(), "big").unwrap();
        let p = storage::crop_and_pad(m.data().unwrap(), [10, 100, 100], [128, 128, 128], 0.0);
        println!(
            "mmap + 128^3 patch: {:.4}s ({})",
            t.elapsed().as_secs_f64(),
            p.len()
        );
    }

    #[test]
    #[ignore = "benchmark: slow, run with --release -- --ignored --nocapture"]
    fn perf_demo_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let folders = datasets::demo::make_demo_datasets(dir.path(), 0).unwrap();
        for folder in folders {
            let ds = RawDataset::open(&folder).unwrap();
            let t = Instant::now();
            let fp = crate::fingerprint::extract_fingerprint(&ds, 2).unwrap();
            println!(
                "{}: fingerprint of {} cases (1e8 samples/channel) in {:.2}s: {:?}",
                ds.name,
                ds.cases.len(),
                t.elapsed().as_secs_f64(),
                fp.foreground_intensity_properties_per_channel
            );
        }
    }
}
