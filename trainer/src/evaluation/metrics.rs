//! Per-case confusion counts and Dice/IoU (nnU-Net `compute_metrics`).

/// Voxel counts of one class (label or region) in one case, ignore-label voxels excluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClassMetrics {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub tn: u64,
}

impl ClassMetrics {
    /// `2TP / (2TP + FP + FN)`; NaN when reference and prediction are both empty (nnU-Net).
    pub fn dice(&self) -> f64 {
        let d = 2 * self.tp + self.fp + self.fn_;
        if self.tp + self.fp + self.fn_ == 0 {
            f64::NAN
        } else {
            2.0 * self.tp as f64 / d as f64
        }
    }

    /// `TP / (TP + FP + FN)`; NaN when reference and prediction are both empty.
    pub fn iou(&self) -> f64 {
        let d = self.tp + self.fp + self.fn_;
        if d == 0 {
            f64::NAN
        } else {
            self.tp as f64 / d as f64
        }
    }

    /// Predicted voxels: TP + FP.
    pub fn n_pred(&self) -> u64 {
        self.tp + self.fp
    }

    /// Reference voxels: TP + FN.
    pub fn n_ref(&self) -> u64 {
        self.tp + self.fn_
    }
}

/// Membership of `v` in a label (one value) or region (any of its values), like nnU-Net's
/// `region_or_label_to_mask`.
#[inline]
pub(crate) fn in_class(v: i16, class: &[i64]) -> bool {
    class.contains(&(v as i64))
}

/// TP/FP/FN/TN per class for one case. `reference` and `prediction` are the voxels in the same
/// order (same shape is checked by the caller). Voxels where the reference equals
/// `ignore_label` count for nothing.
pub fn compute_metrics(
    reference: &[i16],
    prediction: &[i16],
    labels_or_regions: &[Vec<i64>],
    ignore_label: Option<i64>,
) -> Vec<ClassMetrics> {
    debug_assert_eq!(reference.len(), prediction.len());
    // A membership table over all int16 values per class avoids scanning the class list per
    // voxel.
    let table = |class: &[i64]| -> Vec<bool> {
        (0..=u16::MAX).map(|u| in_class(u as i16, class)).collect()
    };
    let ignore = ignore_label.and_then(|l| i16::try_from(l).ok());
    labels_or_regions
        .iter()
        .map(|class| {
            let mut m = ClassMetrics::default();
            let t = table(class);
            let member = |v: i16| t[v as u16 as usize];
            for (&r, &p) in reference.iter().zip(prediction) {
                if ignore == Some(r) {
                    continue;
                }
                match (member(r), member(p)) {
                    (true, true) => m.tp += 1,
                    (false, true) => m.fp += 1,
                    (true, false) => m.fn_ += 1,
                    (false, false) => m.tn += 1,
                }
            }
            m
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_scores() {
        let r = [0, 1, 1, 1, 2, 0, 0, 2];
        let p = [1, 1, 1, 0, 2, 2, 0, 0];
        let m = compute_metrics(&r, &p, &[vec![1], vec![2]], None);
        assert_eq!(
            m[0],
            ClassMetrics {
                tp: 2,
                fp: 1,
                fn_: 1,
                tn: 4
            }
        );
        assert!((m[0].dice() - 4.0 / 6.0).abs() < 1e-12);
        assert!((m[0].iou() - 0.5).abs() < 1e-12);
        assert_eq!(
            m[1],
            ClassMetrics {
                tp: 1,
                fp: 1,
                fn_: 1,
                tn: 5
            }
        );
        assert_eq!((m[0].n_pred(), m[0].n_ref()), (3, 3));
    }

    #[test]
    fn empty_class_is_nan_and_ignore_label_excluded() {
        let r = [0, 0, 3, 3, 1];
        let p = [0, 0, 2, 1, 1];
        // class 2 is absent from reference and (outside ignore voxels) prediction
        let m = compute_metrics(&r, &p, &[vec![1], vec![2]], Some(3));
        assert_eq!(
            m[0],
            ClassMetrics {
                tp: 1,
                fp: 0,
                fn_: 0,
                tn: 2
            }
        );
        assert_eq!(
            m[1],
            ClassMetrics {
                tp: 0,
                fp: 0,
                fn_: 0,
                tn: 3
            }
        );
        assert!(m[1].dice().is_nan() && m[1].iou().is_nan());
        // without the ignore label the voxels count
        let m = compute_metrics(&r, &p, &[vec![2]], None);
        assert_eq!(m[0].fp, 1);
        assert_eq!(m[0].dice(), 0.0);
    }

    #[test]
    fn regions_are_unions() {
        let r = [0, 1, 2, 3, 3];
        let p = [1, 2, 2, 0, 3];
        let m = compute_metrics(&r, &p, &[vec![1, 2, 3], vec![3]], None);
        assert_eq!(
            m[0],
            ClassMetrics {
                tp: 3,
                fp: 1,
                fn_: 1,
                tn: 0
            }
        );
        assert_eq!(
            m[1],
            ClassMetrics {
                tp: 1,
                fp: 0,
                fn_: 1,
                tn: 3
            }
        );
    }
}
