//! Patch sampling as nnU-Net's `nnUNetDataLoader` (`get_bbox`, `_oversample_last_XX_percent`,
//! the 2D slice selection) on memory-mapped cases.

use ndarray::{s, Array4};
use preprocessing::storage::{crop_and_pad, ClassLocations};
use rand::Rng;

use super::dataset::CaseEntry;
use super::{DataError, LabelInfo};

/// One patch: data `(c, z, y, x)` and segmentation `(1, z, y, x)`; 2D patches have `z = 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Image data.
    pub data: Array4<f32>,
    /// Segmentation (-1 = outside the image / outside the nonzero mask).
    pub seg: Array4<i16>,
    /// Cascade only: the previous stage's segmentation, one-hot over the foreground labels
    /// `(n_fg, z, y, x)`; appended to `data` after augmentation.
    pub prev: Option<Array4<f32>>,
    /// Case identifier.
    pub key: String,
}

/// Python's `round` (ties to even).
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// nnU-Net's `_oversample_last_XX_percent`: sample `j` of a batch is forced to contain
/// foreground iff `j >= round(batch_size * (1 - percent))`.
pub fn force_foreground(j: usize, batch_size: usize, percent: f64) -> bool {
    (j as f64) >= py_round(batch_size as f64 * (1.0 - percent))
}

/// The sampling bounds of `get_bbox`: `(lbs, ubs)` for the lower corner, after enlarging
/// `need_to_pad` so that the patch always fits.
pub fn bbox_bounds(
    shape: &[usize],
    patch: &[usize],
    need_to_pad: &[usize],
) -> (Vec<i64>, Vec<i64>) {
    let mut lbs = Vec::with_capacity(shape.len());
    let mut ubs = Vec::with_capacity(shape.len());
    for d in 0..shape.len() {
        let mut need = need_to_pad[d] as i64;
        let (n, p) = (shape[d] as i64, patch[d] as i64);
        if need + n < p {
            need = p - n;
        }
        lbs.push((-need).div_euclid(2));
        ubs.push(n + need / 2 + need % 2 - p);
    }
    (lbs, ubs)
}

/// Picks the class/region key to centre on (nnU-Net's selection in `get_bbox` / the 2D
/// loader): forced samples pick uniformly among non-empty keys (the annotated-voxels key of an
/// ignore label only if nothing else is present); unforced samples with an ignore label centre
/// on an annotated voxel; `None` means a uniformly random crop.
pub fn select_class<'a, R: Rng>(
    locations: &'a ClassLocations,
    force_fg: bool,
    labels: &LabelInfo,
    rng: &mut R,
) -> Option<&'a str> {
    let annotated = labels.annotated_classes_key();
    if !force_fg {
        if labels.ignore_label.is_some() {
            return locations
                .get_key_value(&annotated)
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, _)| k.as_str());
        }
        return None;
    }
    let mut eligible: Vec<&str> = locations
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, _)| k.as_str())
        .collect();
    if eligible.len() > 1 {
        eligible.retain(|k| *k != annotated);
    }
    if eligible.is_empty() {
        return None;
    }
    Some(eligible[rng.gen_range(0..eligible.len())])
}

/// Lower corner of the crop: centred on `center` (clipped below at `lbs`, as nnU-Net) or
/// uniformly random in `[lbs, ubs]`.
fn lower_corner<R: Rng>(
    lbs: &[i64],
    ubs: &[i64],
    patch: &[usize],
    center: Option<&[i64]>,
    rng: &mut R,
) -> Vec<i64> {
    (0..lbs.len())
        .map(|d| match center {
            Some(c) => lbs[d].max(c[d] - (patch[d] / 2) as i64),
            None => {
                if ubs[d] >= lbs[d] {
                    rng.gen_range(lbs[d]..=ubs[d])
                } else {
                    lbs[d]
                }
            }
        })
        .collect()
}

/// The previous stage's segmentation of the same patch, one-hot encoded (cascade only).
fn prev_patch(
    case: &CaseEntry,
    crop: impl FnOnce(ndarray::ArrayView4<i16>) -> Array4<i16>,
) -> Result<Option<Array4<f32>>, DataError> {
    match &case.prev {
        None => Ok(None),
        Some((seg, fg)) => {
            let v = seg.view().map_err(|source| DataError::Storage {
                case: case.mapped.identifier.clone(),
                source,
            })?;
            Ok(Some(super::cascade::one_hot(crop(v).view(), fg)))
        }
    }
}

/// Extracts one (enlarged) patch of size `patch` (2 or 3 entries) from `case`. `need_to_pad`
/// is `patch - final_patch` (0 for validation). Data is padded with 0, seg with -1. For 2-D
/// patches a slice (axis 0) is chosen first — for forced samples one containing the selected
/// class.
pub fn sample_patch<R: Rng>(
    key: &str,
    case: &CaseEntry,
    patch: &[usize],
    need_to_pad: &[usize],
    force_fg: bool,
    labels: &LabelInfo,
    rng: &mut R,
) -> Result<Sample, DataError> {
    let storage = |source| DataError::Storage {
        case: key.to_string(),
        source,
    };
    let data = case.mapped.data().map_err(storage)?;
    let seg = case
        .mapped
        .seg()
        .map_err(storage)?
        .ok_or_else(|| DataError::NoSegmentation {
            case: key.to_string(),
        })?;
    let shape = [data.shape()[1], data.shape()[2], data.shape()[3]];
    let locations = &case.properties.class_locations;
    let selected = select_class(locations, force_fg, labels, rng);
    let pick = |rng: &mut R, pred: &dyn Fn(&[i64; 4]) -> bool| -> Option<[i64; 4]> {
        let locs: Vec<&[i64; 4]> = selected
            .and_then(|k| locations.get(k))
            .map(|v| v.iter().filter(|l| pred(l)).collect())
            .unwrap_or_default();
        if locs.is_empty() {
            None
        } else {
            Some(*locs[rng.gen_range(0..locs.len())])
        }
    };
    match patch.len() {
        3 => {
            let (lbs, ubs) = bbox_bounds(&shape, patch, need_to_pad);
            let voxel = pick(rng, &|_| true);
            let center = voxel.map(|v| [v[1], v[2], v[3]]);
            let lo = lower_corner(&lbs, &ubs, patch, center.as_ref().map(|c| &c[..]), rng);
            let lo = [lo[0], lo[1], lo[2]];
            let size = [patch[0], patch[1], patch[2]];
            let prev = prev_patch(case, |p| crop_and_pad(p, lo, size, 0))?;
            Ok(Sample {
                data: crop_and_pad(data, lo, size, 0.0),
                seg: crop_and_pad(seg, lo, size, -1),
                prev,
                key: key.to_string(),
            })
        }
        2 => {
            let slice = match pick(rng, &|_| true) {
                Some(v) if v[1] >= 0 && (v[1] as usize) < shape[0] => v[1] as usize,
                _ => rng.gen_range(0..shape[0].max(1)),
            };
            let shape2 = [shape[1], shape[2]];
            let (lbs, ubs) = bbox_bounds(&shape2, patch, need_to_pad);
            let voxel = pick(rng, &|l| l[1] == slice as i64);
            let center = voxel.map(|v| [v[2], v[3]]);
            let lo = lower_corner(&lbs, &ubs, patch, center.as_ref().map(|c| &c[..]), rng);
            let lo = [0, lo[0], lo[1]];
            let size = [1, patch[0], patch[1]];
            let d = data.slice(s![.., slice..slice + 1, .., ..]);
            let sg = seg.slice(s![.., slice..slice + 1, .., ..]);
            let prev = prev_patch(case, |p| {
                crop_and_pad(p.slice(s![.., slice..slice + 1, .., ..]), lo, size, 0)
            })?;
            Ok(Sample {
                data: crop_and_pad(d, lo, size, 0.0),
                seg: crop_and_pad(sg, lo, size, -1),
                prev,
                key: key.to_string(),
            })
        }
        n => Err(DataError::Options(format!(
            "patch size must have 2 or 3 entries, got {n}"
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::dataset::PreprocessedDataset;
    use preprocessing::storage::{class_locations_key, save_case, CaseProperties};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    pub(crate) fn props(shape: [usize; 3], locs: ClassLocations) -> CaseProperties {
        CaseProperties {
            spacing: [1.0, 1.0, 1.0],
            shape_before_cropping: shape,
            bbox_used_for_cropping: [[0, shape[0]], [0, shape[1]], [0, shape[2]]],
            shape_after_cropping_and_before_resampling: shape,
            class_locations: locs,
            image_properties: serde_json::from_value(serde_json::json!({
                "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
                "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                "reader": "SimpleITKIO"
            }))
            .unwrap(),
        }
    }

    /// Writes `n` cases of shape (2, z, y, x): channel 0 = linear index, channel 1 = -1;
    /// label 1 in a 2×2×2 cube at (z0, 1, 1) with z0 = case index % (z-2), label 2 at the
    /// last voxel of case 0 only.
    pub(crate) fn write_cases(dir: &std::path::Path, n: usize, shape: [usize; 3]) {
        for i in 0..n {
            let data = Array4::from_shape_fn((2, shape[0], shape[1], shape[2]), |(c, z, y, x)| {
                if c == 0 {
                    ((z * shape[1] + y) * shape[2] + x) as f32
                } else {
                    -1.0
                }
            });
            let z0 = i % (shape[0] - 1).max(1);
            let mut seg = Array4::<i16>::zeros((1, shape[0], shape[1], shape[2]));
            let mut l1 = Vec::new();
            for z in z0..(z0 + 2).min(shape[0]) {
                for y in 1..3 {
                    for x in 1..3 {
                        seg[[0, z, y, x]] = 1;
                        l1.push([0, z as i64, y as i64, x as i64]);
                    }
                }
            }
            let mut locs = ClassLocations::new();
            locs.insert(class_locations_key(&[1]), l1);
            let last = [shape[0] - 1, shape[1] - 1, shape[2] - 1];
            if i == 0 {
                seg[[0, last[0], last[1], last[2]]] = 2;
                locs.insert(
                    class_locations_key(&[2]),
                    vec![[0, last[0] as i64, last[1] as i64, last[2] as i64]],
                );
            } else {
                locs.insert(class_locations_key(&[2]), vec![]);
            }
            save_case(
                dir,
                &format!("case_{i:03}"),
                data.view(),
                Some(seg.view()),
                &props(shape, locs),
            )
            .unwrap();
        }
    }

    #[test]
    fn oversampling_rule_matches_nnunet() {
        let forced = |bs| (0..bs).filter(|&j| force_foreground(j, bs, 0.33)).count();
        assert_eq!(forced(2), 1);
        assert_eq!(forced(12), 4);
        assert_eq!(forced(1), 0);
        assert!(force_foreground(1, 2, 0.33) && !force_foreground(0, 2, 0.33));
        assert_eq!((0..4).filter(|&j| force_foreground(j, 4, 1.0)).count(), 4);
    }

    #[test]
    fn bounds_like_nnunet() {
        // need 3 → lbs -2, ubs = shape + 1 + 1 - patch
        let (l, u) = bbox_bounds(&[10, 4], &[6, 8], &[3, 0]);
        assert_eq!(l, vec![-2, -2]);
        assert_eq!(u, vec![6, -2]);
    }

    #[test]
    fn forced_patches_contain_foreground_and_pad() {
        let dir = tempfile::tempdir().unwrap();
        write_cases(dir.path(), 2, [6, 7, 8]);
        let ds = PreprocessedDataset::open(dir.path()).unwrap();
        assert_eq!(ds.case_ids(), ["case_000", "case_001"]);
        let labels = LabelInfo::plain(3);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let case = ds.case("case_001").unwrap();
        for _ in 0..20 {
            let s = sample_patch(
                "case_001",
                &case,
                &[4, 4, 4],
                &[0, 0, 0],
                true,
                &labels,
                &mut rng,
            )
            .unwrap();
            assert_eq!(s.data.dim(), (2, 4, 4, 4));
            assert!(s.seg.iter().any(|&v| v == 1), "forced sample without fg");
        }
        // patch larger than the image: padded with 0 / -1
        let s = sample_patch(
            "case_001",
            &case,
            &[8, 9, 10],
            &[0, 0, 0],
            false,
            &labels,
            &mut rng,
        )
        .unwrap();
        assert_eq!(s.seg.dim(), (1, 8, 9, 10));
        assert_eq!(
            s.seg.iter().filter(|&&v| v == -1).count(),
            8 * 9 * 10 - 6 * 7 * 8
        );
        assert_eq!(s.data.iter().filter(|&&v| v == -1.0).count(), 6 * 7 * 8);
        // 2D: forced slices contain the class
        for _ in 0..20 {
            let s = sample_patch(
                "case_000",
                &ds.case("case_000").unwrap(),
                &[3, 3],
                &[0, 0],
                true,
                &labels,
                &mut rng,
            )
            .unwrap();
            assert_eq!(s.data.dim(), (2, 1, 3, 3));
            assert!(s.seg.iter().any(|&v| v > 0));
        }
        // missing case / no segmentation are errors naming the case
        assert!(ds.case("nope").unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn ignore_label_centres_on_annotated_voxels() {
        let mut locs = ClassLocations::new();
        locs.insert("(-1, 0, 1)".into(), vec![[0, 1, 1, 1]]);
        locs.insert("1".into(), vec![]);
        let labels = LabelInfo {
            all_labels: vec![0, 1],
            regions: None,
            ignore_label: Some(2),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            select_class(&locs, false, &labels, &mut rng),
            Some("(-1, 0, 1)")
        );
        // forced, only the annotated key present → it is used
        assert_eq!(
            select_class(&locs, true, &labels, &mut rng),
            Some("(-1, 0, 1)")
        );
        locs.insert("1".into(), vec![[0, 0, 0, 0]]);
        for _ in 0..10 {
            assert_eq!(select_class(&locs, true, &labels, &mut rng), Some("1"));
        }
        assert_eq!(
            select_class(&locs, false, &LabelInfo::plain(2), &mut rng),
            None
        );
    }
}
