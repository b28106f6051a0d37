//! Dataset fingerprint (nnU-Net `DatasetFingerprintExtractor`,
//! `experiment_planning/dataset_fingerprint/fingerprint_extractor.py`).
//!
//! Per case: read images and label, crop to the nonzero region, and sample
//! `int(1e8 // n_cases)` foreground (`seg > 0`) intensities per channel **with replacement**.
//! All samples of a channel are then pooled for mean, median, std (population), min, max and
//! the 0.5 / 99.5 percentiles (numpy's default "linear" method).
//!
//! Random numbers: nnU-Net uses `np.random.RandomState(1234)` (MT19937) afresh for every
//! case. We use `ChaCha8Rng` seeded with 1234 afresh for every case instead — equally
//! deterministic, but not the same stream, so individual samples (and thus the statistics, at
//! the sampling-noise level) differ slightly from nnU-Net's. Reproducing numpy's stream would
//! need an MT19937 + numpy's bounded-integer algorithm.
//!
//! Memory: the pooled samples are written straight into one preallocated buffer per channel
//! (`n_cases * samples_per_case` f32, exactly nnU-Net's concatenation but without the
//! intermediate per-case copies); each worker holds one case at a time. Foreground voxels are
//! gathered from the cropping bounding box directly, without copying the cropped volume.

use std::path::PathBuf;

use ndarray::{s, Array4, ArrayView4, Axis, Zip};
use plans::{Fingerprint, IntensityProperties};
use rand::distributions::{Distribution, Uniform};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::cropping::{bbox_of_mask, nonzero_mask};
use crate::error::{worker_pool, PreprocessError};
use datasets::RawDataset;

/// nnU-Net's `num_foreground_voxels_for_intensitystats` (`10e7`).
pub const NUM_FOREGROUND_VOXELS_FOR_INTENSITYSTATS: u64 = 100_000_000;
/// Seed of the per-case foreground sampling (nnU-Net: `RandomState(1234)`).
pub const FOREGROUND_SAMPLING_SEED: u64 = 1234;

/// What one case contributes to the fingerprint.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseFingerprint {
    /// Shape after cropping, reader axis order (z, y, x).
    pub shape_after_crop: [usize; 3],
    /// Spacing, reader axis order (z, y, x).
    pub spacing: [f64; 3],
    /// `prod(shape_after_crop) / prod(shape_before_crop)`.
    pub relative_size_after_cropping: f64,
    /// Number of foreground voxels (`seg > 0` inside the crop).
    pub num_foreground: usize,
}

/// `extract_fingerprint` with nnU-Net's sample budget (1e8 foreground samples in total).
pub fn extract_fingerprint(
    ds: &RawDataset,
    num_workers: usize,
) -> Result<Fingerprint, PreprocessError> {
    extract_fingerprint_with_budget(ds, num_workers, NUM_FOREGROUND_VOXELS_FOR_INTENSITYSTATS)
}

/// [`extract_fingerprint`] calling `progress` after each case.
pub fn extract_fingerprint_with_progress(
    ds: &RawDataset,
    num_workers: usize,
    progress: &crate::ProgressHook,
) -> Result<Fingerprint, PreprocessError> {
    fingerprint_impl(
        ds,
        num_workers,
        NUM_FOREGROUND_VOXELS_FOR_INTENSITYSTATS,
        Some(progress),
    )
}

/// [`extract_fingerprint`] with a configurable total sample budget (`samples per case =
/// budget / n_cases`, integer division like `int(1e8 // n)`); used by tests.
pub fn extract_fingerprint_with_budget(
    ds: &RawDataset,
    num_workers: usize,
    total_samples: u64,
) -> Result<Fingerprint, PreprocessError> {
    fingerprint_impl(ds, num_workers, total_samples, None)
}

fn fingerprint_impl(
    ds: &RawDataset,
    num_workers: usize,
    total_samples: u64,
    progress: Option<&crate::ProgressHook>,
) -> Result<Fingerprint, PreprocessError> {
    let n_cases = ds.cases.len();
    if n_cases == 0 {
        return Err(PreprocessError::Invalid(format!(
            "dataset {} has no training cases",
            ds.folder.display()
        )));
    }
    let problems = datasets::verify::declared_label_problems(&ds.json);
    if !problems.is_empty() {
        return Err(PreprocessError::Invalid(format!(
            "{}: {}",
            datasets::RawDir::new(&ds.folder).dataset_json().display(),
            problems.join("; ")
        )));
    }
    let expected = datasets::verify::expected_label_values(&ds.json);
    let num_channels = ds.json.num_channels();
    let per_case = (total_samples / n_cases as u64) as usize;
    let mut buffers: Vec<Vec<f32>> = (0..num_channels)
        .map(|_| vec![0.0f32; per_case * n_cases])
        .collect();

    // Per case: one mutable chunk per channel.
    let mut per_case_chunks: Vec<Vec<&mut [f32]>> = (0..n_cases)
        .map(|_| Vec::with_capacity(num_channels))
        .collect();
    for buf in buffers.iter_mut() {
        if per_case == 0 {
            for chunks in per_case_chunks.iter_mut() {
                chunks.push(&mut []);
            }
        } else {
            for (chunks, chunk) in per_case_chunks.iter_mut().zip(buf.chunks_mut(per_case)) {
                chunks.push(chunk);
            }
        }
    }

    let pool = worker_pool(num_workers)?;
    let results: Vec<Result<CaseFingerprint, PreprocessError>> = pool.install(|| {
        ds.cases
            .par_iter()
            .zip(per_case_chunks.into_par_iter())
            .map(|(case, mut chunks)| {
                let r = analyze_case(
                    &case.images,
                    case.label.as_ref(),
                    num_channels,
                    &expected,
                    &mut chunks,
                )
                .map_err(|e| e.in_case(&case.identifier));
                if let Some(p) = progress {
                    p.case_done(&case.identifier);
                }
                r
            })
            .collect()
    });
    let mut cases = Vec::with_capacity(n_cases);
    for r in results {
        cases.push(r?);
    }

    // Compact: cases without foreground contributed nothing (as in nnU-Net).
    for buf in buffers.iter_mut() {
        let mut write = 0usize;
        for (i, c) in cases.iter().enumerate() {
            if c.num_foreground > 0 && per_case > 0 {
                let start = i * per_case;
                if start != write {
                    buf.copy_within(start..start + per_case, write);
                }
                write += per_case;
            }
        }
        buf.truncate(write);
        buf.shrink_to_fit();
    }

    let mut props = std::collections::BTreeMap::new();
    for (c, buf) in buffers.iter_mut().enumerate() {
        if buf.is_empty() {
            return Err(PreprocessError::NoForeground { channel: c });
        }
        props.insert(c.to_string(), intensity_statistics(buf));
    }
    let mut rel: Vec<f64> = cases
        .iter()
        .map(|c| c.relative_size_after_cropping)
        .collect();
    Ok(Fingerprint {
        foreground_intensity_properties_per_channel: props,
        median_relative_size_after_cropping: median_f64(&mut rel),
        shapes_after_crop: cases.iter().map(|c| c.shape_after_crop.to_vec()).collect(),
        spacings: cases.iter().map(|c| c.spacing.to_vec()).collect(),
    })
}

/// nnU-Net's `analyze_case` for one case: reads the files, crops and writes
/// `chunks[c].len()` samples per channel into `chunks` (nothing if no foreground).
///
/// Always checked (the arrays are read anyway): the channel count, NaN, the shapes of image
/// and label, label values outside `expected_labels` (dataset.json's labels plus the ignore
/// label) and zero or non-finite voxel sizes in a NIfTI header (the reader would silently
/// use 1.0, which changes the plans).
pub fn analyze_case(
    images: &[PathBuf],
    label: Option<&PathBuf>,
    num_channels: usize,
    expected_labels: &[i64],
    chunks: &mut [&mut [f32]],
) -> Result<CaseFingerprint, PreprocessError> {
    let label = label.ok_or(PreprocessError::MissingLabel)?;
    let (data, props) = datasets::io::read_images(images)?;
    check_voxel_sizes(&props, data.shape(), images)?;
    let (seg, _) = datasets::io::read_seg(label)?;
    let unexpected: Vec<i64> = datasets::verify::label_values(seg.iter())
        .into_iter()
        .filter(|v| expected_labels.binary_search(v).is_err())
        .collect();
    if !unexpected.is_empty() {
        return Err(PreprocessError::Invalid(format!(
            "{} contains label value(s) {unexpected:?} not declared in dataset.json labels \
             (declared: {expected_labels:?})",
            label.display()
        )));
    }
    if data.dim().0 != num_channels {
        return Err(PreprocessError::Invalid(format!(
            "{} has {} channel(s) but dataset.json channel_names lists {}",
            images
                .first()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            data.dim().0,
            num_channels
        )));
    }
    if seg.shape()[1..] != data.shape()[1..] {
        return Err(PreprocessError::ShapeMismatch {
            image_file: images.first().cloned().unwrap_or_default(),
            label_file: label.clone(),
            image: data.shape()[1..].to_vec(),
            label: seg.shape()[1..].to_vec(),
        });
    }
    check_nan(&data, images)?;
    let mut fp = case_fingerprint_from_arrays(data.view(), seg.view(), chunks);
    fp.spacing = props.spacing;
    Ok(fp)
}

/// Errors if the NIfTI header of the images has a zero or non-finite voxel size (pixdim)
/// along an axis with more than one voxel; along a single-voxel axis (a 2D slice) the
/// reader's 1.0 is kept and a warning names the value used.
fn check_voxel_sizes(
    props: &datasets::io::ImageProperties,
    shape: &[usize],
    images: &[PathBuf],
) -> Result<(), PreprocessError> {
    let Some(g) = &props.nifti else {
        return Ok(());
    };
    let file = images.first().cloned().unwrap_or_default();
    // pixdim is (x, y, z); shape is (c, z, y, x)
    for (axis, (&p, &n)) in g
        .pixdim
        .iter()
        .zip([shape[3], shape[2], shape[1]].iter())
        .enumerate()
    {
        if p != 0.0 && p.is_finite() {
            continue;
        }
        let name = ["x", "y", "z"][axis];
        if n > 1 {
            return Err(PreprocessError::Invalid(format!(
                "{}: the NIfTI header's voxel size (pixdim[{}]) along {name} is {p}; \
                 fix the header (nnseg would otherwise use 1.0 and plan with it)",
                file.display(),
                axis + 1
            )));
        }
        tracing::warn!(
            "{}: voxel size (pixdim[{}]) along the single-voxel axis {name} is {p}; using 1.0",
            file.display(),
            axis + 1
        );
    }
    Ok(())
}

/// Errors if any channel contains NaN, naming that channel's file.
pub(crate) fn check_nan(data: &Array4<f32>, images: &[PathBuf]) -> Result<(), PreprocessError> {
    for (c, ch) in data.axis_iter(Axis(0)).enumerate() {
        let has_nan = ch
            .axis_iter(Axis(0))
            .into_par_iter()
            .any(|plane| plane.iter().any(|v| v.is_nan()));
        if has_nan {
            // RGB(A) images keep all channels in one file.
            let file = images
                .get(c)
                .or_else(|| images.first())
                .cloned()
                .unwrap_or_default();
            return Err(PreprocessError::NaN { file });
        }
    }
    Ok(())
}

/// The array part of `analyze_case` (spacing left at 0): crop box, foreground sampling.
pub fn case_fingerprint_from_arrays(
    data: ArrayView4<f32>,
    seg: ArrayView4<i16>,
    chunks: &mut [&mut [f32]],
) -> CaseFingerprint {
    let mask = nonzero_mask(data);
    let bbox = bbox_of_mask(mask.view());
    drop(mask);
    let [[z0, z1], [y0, y1], [x0, x1]] = bbox;
    let shape_after = [z1 - z0, y1 - y0, x1 - x0];
    let before: f64 = data.shape()[1..].iter().map(|&v| v as f64).product();
    let after: f64 = shape_after.iter().map(|&v| v as f64).product();
    // Foreground after cropping: seg > 0 inside the box (cropping only turns 0 into -1).
    let seg_c = seg.slice(s![0, z0..z1, y0..y1, x0..x1]);
    let num_foreground = seg_c.iter().filter(|&&v| v > 0).count();

    let mut rng = ChaCha8Rng::seed_from_u64(FOREGROUND_SAMPLING_SEED);
    if num_foreground > 0 {
        let uniform = Uniform::new(0usize, num_foreground);
        let mut fg: Vec<f32> = Vec::with_capacity(num_foreground);
        for (c, out) in chunks.iter_mut().enumerate() {
            if out.is_empty() {
                continue;
            }
            fg.clear();
            let ch = data.slice(s![c, z0..z1, y0..y1, x0..x1]);
            Zip::from(&ch).and(&seg_c).for_each(|&v, &l| {
                if l > 0 {
                    fg.push(v);
                }
            });
            for o in out.iter_mut() {
                *o = fg[uniform.sample(&mut rng)];
            }
        }
    }
    CaseFingerprint {
        shape_after_crop: shape_after,
        spacing: [0.0; 3],
        relative_size_after_cropping: if before > 0.0 { after / before } else { 1.0 },
        num_foreground,
    }
}

/// numpy's `percentile(..., method="linear")` of a sample at several `q` (in percent), using
/// selection instead of a full sort. Reorders `values`, which must be NaN-free; an empty
/// sample gives NaN.
pub fn percentiles_linear(values: &mut [f32], qs: &[f64]) -> Vec<f64> {
    let n = values.len();
    if n == 0 {
        return vec![f64::NAN; qs.len()];
    }
    let mut out = Vec::with_capacity(qs.len());
    for &q in qs {
        // numpy: virtual index = (q / 100) * (n - 1), then _lerp with the "t >= 0.5" branch.
        let vi = (q / 100.0) * (n as f64 - 1.0);
        let lo = (vi.floor().max(0.0) as usize).min(n - 1);
        let hi = (lo + 1).min(n - 1);
        let t = vi - lo as f64;
        let (_, a, right) = values.select_nth_unstable_by(lo, |x, y| x.total_cmp(y));
        let a = *a as f64;
        let b = if hi == lo {
            a
        } else {
            right.iter().copied().fold(f32::INFINITY, f32::min) as f64
        };
        let d = b - a;
        out.push(if t >= 0.5 {
            b - d * (1.0 - t)
        } else {
            a + d * t
        });
    }
    out
}

/// `np.median` of f64 values (mean of the two middle values for even counts).
pub fn median_f64(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The fingerprint's per-channel statistics over the pooled samples (reorders `values`).
pub fn intensity_statistics(values: &mut [f32]) -> IntensityProperties {
    const CHUNK: usize = 1 << 16;
    let n = values.len() as f64;
    // Deterministic parallel reductions: fixed chunks, combined in order.
    let sums: Vec<(f64, f32, f32)> = values
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter().fold(
                (0.0f64, f32::INFINITY, f32::NEG_INFINITY),
                |(s, lo, hi), &v| (s + v as f64, lo.min(v), hi.max(v)),
            )
        })
        .collect();
    let (sum, min, max) = sums.iter().fold(
        (0.0f64, f32::INFINITY, f32::NEG_INFINITY),
        |(s, lo, hi), &(a, b, c)| (s + a, lo.min(b), hi.max(c)),
    );
    let mean = sum / n;
    let sq: f64 = values
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>())
        .collect::<Vec<f64>>()
        .iter()
        .sum();
    let std = (sq / n).sqrt();
    let p = percentiles_linear(values, &[50.0, 0.5, 99.5]);
    IntensityProperties {
        max: max as f64,
        mean,
        median: p[0],
        min: min as f64,
        percentile_00_5: p[1],
        percentile_99_5: p[2],
        std,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    fn np_percentile_sorted(sorted: &[f32], q: f64) -> f64 {
        let n = sorted.len();
        let vi = q / 100.0 * (n as f64 - 1.0);
        let lo = vi.floor() as usize;
        let hi = (lo + 1).min(n - 1);
        let t = vi - lo as f64;
        let (a, b) = (sorted[lo] as f64, sorted[hi] as f64);
        if t >= 0.5 {
            b - (b - a) * (1.0 - t)
        } else {
            a + (b - a) * t
        }
    }

    #[test]
    fn percentiles_match_sorted_reference() {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for n in [1usize, 2, 3, 10, 201, 1000] {
            let v: Vec<f32> = (0..n)
                .map(|_| rng.gen_range(-100.0..100.0f32).round())
                .collect();
            let mut sorted = v.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            for q in [0.0, 0.5, 25.0, 50.0, 99.5, 100.0] {
                let mut w = v.clone();
                let got = percentiles_linear(&mut w, &[q])[0];
                assert_eq!(got, np_percentile_sorted(&sorted, q), "n={n} q={q}");
            }
        }
        // np.percentile([1, 2, 3, 4], 50) == 2.5; ([0, 10], 0.5) == 0.05
        assert_eq!(
            percentiles_linear(&mut [4.0, 1.0, 3.0, 2.0], &[50.0]),
            vec![2.5]
        );
        assert!((percentiles_linear(&mut [10.0, 0.0], &[0.5])[0] - 0.05).abs() < 1e-12);
        assert!(percentiles_linear(&mut [], &[50.0])[0].is_nan());
    }

    #[test]
    fn statistics_like_numpy() {
        let mut v = vec![1.0f32, 2.0, 3.0, 4.0];
        let p = intensity_statistics(&mut v);
        assert_eq!(p.mean, 2.5);
        assert_eq!(p.median, 2.5);
        assert!((p.std - 1.25f64.sqrt()).abs() < 1e-12); // ddof = 0
        assert_eq!((p.min, p.max), (1.0, 4.0));
        // np.percentile([1,2,3,4], 0.5) = 1.015, 99.5 -> 3.985
        assert!((p.percentile_00_5 - 1.015).abs() < 1e-9);
        assert!((p.percentile_99_5 - 3.985).abs() < 1e-9);
        assert_eq!(median_f64(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_f64(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn case_sampling_only_foreground_inside_crop() {
        // data nonzero in a 2x2x2 block; label 1 on 3 voxels inside, label 2 outside the
        // nonzero box (removed by cropping).
        let mut data = Array4::<f32>::zeros((2, 4, 4, 4));
        for z in 1..3 {
            for y in 1..3 {
                for x in 1..3 {
                    data[[0, z, y, x]] = (z * 100 + y * 10 + x) as f32;
                    data[[1, z, y, x]] = -1.0;
                }
            }
        }
        let mut seg = Array4::<i16>::zeros((1, 4, 4, 4));
        seg[[0, 1, 1, 1]] = 1;
        seg[[0, 2, 2, 2]] = 1;
        seg[[0, 2, 1, 2]] = 3;
        seg[[0, 3, 3, 3]] = 2;
        let mut a = vec![0.0f32; 50];
        let mut b = vec![0.0f32; 50];
        let fp = {
            let mut chunks: Vec<&mut [f32]> = vec![&mut a, &mut b];
            case_fingerprint_from_arrays(data.view(), seg.view(), &mut chunks)
        };
        assert_eq!(fp.shape_after_crop, [2, 2, 2]);
        assert_eq!(fp.num_foreground, 3);
        assert!((fp.relative_size_after_cropping - 8.0 / 64.0).abs() < 1e-12);
        let allowed = [111.0f32, 222.0, 212.0];
        assert!(a.iter().all(|v| allowed.contains(v)), "{a:?}");
        // with replacement and 50 draws from 3: all values show up
        for v in allowed {
            assert!(a.contains(&v));
        }
        assert!(b.iter().all(|&v| v == -1.0));
        // deterministic
        let mut a2 = vec![0.0f32; 50];
        let mut b2 = vec![0.0f32; 50];
        let mut chunks: Vec<&mut [f32]> = vec![&mut a2, &mut b2];
        case_fingerprint_from_arrays(data.view(), seg.view(), &mut chunks);
        assert_eq!(a, a2);
    }

    #[test]
    fn no_foreground_samples_nothing() {
        let data = Array4::<f32>::ones((1, 2, 2, 2));
        let seg = Array4::<i16>::zeros((1, 2, 2, 2));
        let mut a = vec![7.0f32; 5];
        let mut chunks: Vec<&mut [f32]> = vec![&mut a];
        let fp = case_fingerprint_from_arrays(data.view(), seg.view(), &mut chunks);
        assert_eq!(fp.num_foreground, 0);
        assert_eq!(a, vec![7.0; 5]);
    }
}
