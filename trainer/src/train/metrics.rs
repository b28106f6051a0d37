//! nnU-Net's online validation metric ("pseudo Dice"): per foreground class (or region)
//! TP/FP/FN of the full-resolution output's argmax (or sigmoid > 0.5), summed over all
//! validation batches of an epoch, then `2TP / (2TP + FP + FN)`.

use candle_core::{DType, Result, Tensor, D};

/// Accumulated counts, one entry per foreground class / region.
#[derive(Debug, Clone, PartialEq)]
pub struct DiceCounts {
    pub tp: Vec<f64>,
    pub fp: Vec<f64>,
    pub fn_: Vec<f64>,
}

impl DiceCounts {
    /// Zero counts for `n` foreground classes / regions.
    pub fn zeros(n: usize) -> Self {
        DiceCounts {
            tp: vec![0.0; n],
            fp: vec![0.0; n],
            fn_: vec![0.0; n],
        }
    }

    /// Adds another batch's counts.
    pub fn add(&mut self, other: &DiceCounts) {
        for (a, b) in self.tp.iter_mut().zip(&other.tp) {
            *a += b;
        }
        for (a, b) in self.fp.iter_mut().zip(&other.fp) {
            *a += b;
        }
        for (a, b) in self.fn_.iter_mut().zip(&other.fn_) {
            *a += b;
        }
    }

    /// `2TP / (2TP + FP + FN)` per class; NaN where the class is absent from both.
    pub fn dice(&self) -> Vec<f64> {
        self.tp
            .iter()
            .zip(&self.fp)
            .zip(&self.fn_)
            .map(|((tp, fp), fn_)| {
                let d = 2.0 * tp + fp + fn_;
                if d == 0.0 {
                    f64::NAN
                } else {
                    2.0 * tp / d
                }
            })
            .collect()
    }
}

/// Sums a `(B, K, *spatial)` tensor to `(K)` as f64 values.
fn per_channel_sum(t: &Tensor) -> Result<Vec<f64>> {
    let (b, k) = (t.dim(0)?, t.dim(1)?);
    t.reshape((b, k, ()))?
        .sum(D::Minus1)?
        .sum(0)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()
}

fn counts(pred: &Tensor, gt: &Tensor, mask: Option<&Tensor>) -> Result<DiceCounts> {
    let not_pred = pred.affine(-1.0, 1.0)?;
    let not_gt = gt.affine(-1.0, 1.0)?;
    let (mut tp, mut fp, mut fn_) = (pred.mul(gt)?, pred.mul(&not_gt)?, not_pred.mul(gt)?);
    if let Some(m) = mask {
        tp = tp.broadcast_mul(m)?;
        fp = fp.broadcast_mul(m)?;
        fn_ = fn_.broadcast_mul(m)?;
    }
    Ok(DiceCounts {
        tp: per_channel_sum(&tp)?,
        fp: per_channel_sum(&fp)?,
        fn_: per_channel_sum(&fn_)?,
    })
}

/// Label training: `logits (B, C, *sp)`, `target (B, 1, *sp)` holding label values. Voxels
/// with `ignore_label` are excluded. Returns counts for classes `1..C`.
pub fn label_counts(
    logits: &Tensor,
    target: &Tensor,
    ignore_label: Option<i64>,
) -> Result<DiceCounts> {
    let c = logits.dim(1)?;
    let dev = logits.device();
    let pred = logits.argmax_keepdim(1)?.to_dtype(DType::F32)?;
    let target = target.to_dtype(DType::F32)?;
    let mut shape = vec![1usize, c];
    shape.extend(std::iter::repeat_n(1, logits.rank() - 2));
    let classes = Tensor::arange(0u32, c as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape(shape)?;
    let pred_oh = pred.broadcast_eq(&classes)?.to_dtype(DType::F32)?;
    let gt_oh = target.broadcast_eq(&classes)?.to_dtype(DType::F32)?;
    let mask = match ignore_label {
        Some(ig) => Some(target.ne(ig as f64)?.to_dtype(DType::F32)?),
        None => None,
    };
    let all = counts(&pred_oh, &gt_oh, mask.as_ref())?;
    Ok(DiceCounts {
        tp: all.tp[1..].to_vec(),
        fp: all.fp[1..].to_vec(),
        fn_: all.fn_[1..].to_vec(),
    })
}

/// Region training: `logits (B, R, *sp)`, `target (B, R (+1 ignore channel), *sp)` of 0/1.
/// A voxel is predicted in region r when `sigmoid(logit) > 0.5`. With `has_ignore`, the last
/// target channel marks ignored voxels.
pub fn region_counts(logits: &Tensor, target: &Tensor, has_ignore: bool) -> Result<DiceCounts> {
    let r = logits.dim(1)?;
    let pred = logits.gt(0.0)?.to_dtype(DType::F32)?;
    let target = target.to_dtype(DType::F32)?;
    let gt = target.narrow(1, 0, r)?;
    let mask = if has_ignore {
        Some(target.narrow(1, r, 1)?.affine(-1.0, 1.0)?)
    } else {
        None
    };
    counts(&pred, &gt, mask.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn label_counts_by_hand() {
        let dev = Device::Cpu;
        // B=1, C=3, 1x4 pixels: argmax = [0, 1, 2, 1]
        let logits = Tensor::new(
            &[[[[5f32, 0., 0., 0.]], [[0., 5., 0., 5.]], [[0., 0., 5., 0.]]]],
            &dev,
        )
        .unwrap();
        let target = Tensor::new(&[[[[0f32, 1., 1., 2.]]]], &dev).unwrap();
        let c = label_counts(&logits, &target, None).unwrap();
        // class 1: pred {1,3}, gt {1,2} → tp 1, fp 1, fn 1; class 2: pred {2}, gt {3} → 0,1,1
        assert_eq!(c.tp, vec![1.0, 0.0]);
        assert_eq!(c.fp, vec![1.0, 1.0]);
        assert_eq!(c.fn_, vec![1.0, 1.0]);
        let d = c.dice();
        assert!((d[0] - 0.5).abs() < 1e-12 && d[1] == 0.0);
        // ignore label 2 masks the last voxel
        let c = label_counts(&logits, &target, Some(2)).unwrap();
        assert_eq!(c.fp, vec![0.0, 1.0]);
        assert_eq!(c.fn_, vec![1.0, 0.0]);
        let mut acc = DiceCounts::zeros(2);
        acc.add(&c);
        acc.add(&c);
        assert_eq!(acc.tp, vec![2.0, 0.0]);
        assert!(DiceCounts::zeros(1).dice()[0].is_nan());
    }

    #[test]
    fn region_counts_by_hand() {
        let dev = Device::Cpu;
        // B=1, R=1, 1x3: sigmoid > .5 = [1, 0, 1]
        let logits = Tensor::new(&[[[[2f32, -1., 0.5]]]], &dev).unwrap();
        let target = Tensor::new(&[[[[1f32, 1., 0.]], [[0., 0., 1.]]]], &dev).unwrap();
        let c = region_counts(&logits, &target.narrow(1, 0, 1).unwrap(), false).unwrap();
        assert_eq!((c.tp[0], c.fp[0], c.fn_[0]), (1.0, 1.0, 1.0));
        let c = region_counts(&logits, &target, true).unwrap();
        assert_eq!((c.tp[0], c.fp[0], c.fn_[0]), (1.0, 0.0, 1.0));
    }
}
