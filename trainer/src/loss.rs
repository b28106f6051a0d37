//! nnU-Net v2 training losses, differentiable through Candle autograd.
//!
//! Re-implements (nnunetv2 2.8.1, `nnunetv2/training/loss/`):
//! * `MemoryEfficientSoftDiceLoss` ([`SoftDiceLoss`]): returns `-mean(dice)`;
//! * `RobustCrossEntropyLoss` ([`cross_entropy`]): mean over non-ignored voxels;
//! * `DC_and_CE_loss` ([`DcAndCeLoss`]) for label-based training;
//! * `DC_and_BCE_loss` ([`DcAndBceLoss`]) for region-based training;
//! * `DeepSupervisionWrapper` ([`DeepSupervisionLoss`], [`deep_supervision_weights`]).
//!
//! All losses take logits `(B, C, *spatial)` of any spatial rank (2D or 3D) in f32 or f64.
//! Softmax / log-softmax are composed from `exp` / `sum` over dim 1 (Candle's fused
//! `softmax_last_dim` has no backward pass).

use candle_core::{bail, DType, Result, Tensor, D};

/// A segmentation loss: `logits (B, C, *spatial)`, `target` as documented by the implementor.
/// Returns a 0-d tensor that can be back-propagated.
pub trait SegLoss: Send + Sync {
    fn loss(&self, logits: &Tensor, target: &Tensor) -> Result<Tensor>;
}

/// Options shared by [`DcAndCeLoss`] and [`DcAndBceLoss`] (nnU-Net's defaults via `Default`).
#[derive(Clone, Debug, PartialEq)]
pub struct LossOptions {
    /// Sum the dice statistics over the batch axis too (plans `batch_dice`).
    pub batch_dice: bool,
    /// Dice smoothing term (nnU-Net: 1e-5).
    pub smooth: f64,
    /// Label value to ignore (label-based training). For [`DcAndBceLoss`] `Some(_)` means the
    /// target carries one extra last channel marking ignored voxels (1 = ignore).
    pub ignore_label: Option<i64>,
    pub weight_ce: f64,
    pub weight_dice: f64,
}

impl Default for LossOptions {
    fn default() -> Self {
        Self {
            batch_dice: false,
            smooth: 1e-5,
            ignore_label: None,
            weight_ce: 1.0,
            weight_dice: 1.0,
        }
    }
}

/// Non-linearity applied to the logits before the soft dice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nonlinearity {
    /// Softmax over the channel axis (label-based training).
    Softmax,
    /// Element-wise sigmoid (region-based training).
    Sigmoid,
}

/// Softmax over dim 1, composed from differentiable primitives.
pub fn softmax_dim1(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(1)?;
    e.broadcast_div(&s)
}

/// Log-softmax over dim 1, composed from differentiable primitives.
pub fn log_softmax_dim1(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(1)?.detach();
    let z = x.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(1)?.log()?;
    z.broadcast_sub(&lse)
}

/// `(B, C, *spatial)` -> `(B, C, N)`.
fn flatten_spatial(x: &Tensor, what: &str) -> Result<Tensor> {
    if x.rank() < 3 {
        bail!(
            "{what}: expected shape (B, C, *spatial) with at least one spatial axis, got {:?}",
            x.dims()
        );
    }
    x.flatten_from(2)
}

/// Label target `(B, 1, N)` (float label values) -> one-hot `(B, C, N)` in `dtype`.
/// Values outside `0..C` give an all-zero row.
fn one_hot(labels: &Tensor, num_classes: usize, dtype: DType) -> Result<Tensor> {
    let classes = Tensor::arange(0u32, num_classes as u32, labels.device())?
        .to_dtype(labels.dtype())?
        .reshape((1, num_classes, 1))?;
    labels.broadcast_eq(&classes)?.to_dtype(dtype)
}

/// Brings a label target of shape `(B, 1, *sp)` or `(B, *sp)` to `(B, 1, N)` in `dtype`.
fn label_target(logits: &Tensor, target: &Tensor, what: &str) -> Result<Tensor> {
    let ld = logits.dims();
    let td = target.dims();
    let t = if td.len() == ld.len() {
        target.clone()
    } else if td.len() + 1 == ld.len() {
        target.unsqueeze(1)?
    } else {
        bail!("{what}: target shape {td:?} does not fit logits shape {ld:?}")
    };
    let tdims = t.dims();
    if tdims[0] != ld[0] || tdims[1] != 1 || tdims[2..] != ld[2..] {
        bail!(
            "{what}: expected label target (B, 1, *spatial) = ({}, 1, {:?}), got {td:?}",
            ld[0],
            &ld[2..]
        );
    }
    t.to_dtype(logits.dtype())?.flatten_from(2)
}

/// Core of `MemoryEfficientSoftDiceLoss` on flattened tensors.
/// `p` = probabilities `(B, C, N)`, `y` = one-hot `(B, C, N)`, `mask` `(B, 1, N)`.
fn soft_dice_core(
    p: &Tensor,
    y: &Tensor,
    mask: Option<&Tensor>,
    batch_dice: bool,
    do_bg: bool,
    smooth: f64,
) -> Result<Tensor> {
    let c = p.dim(1)?;
    let (p, y) = if do_bg {
        (p.clone(), y.clone())
    } else {
        if c < 2 {
            bail!("soft dice with do_bg=false needs at least 2 channels, got {c}");
        }
        (p.narrow(1, 1, c - 1)?, y.narrow(1, 1, c - 1)?)
    };
    let (pm, ym) = match mask {
        Some(m) => (p.broadcast_mul(m)?, y.broadcast_mul(m)?),
        None => (p, y.clone()),
    };
    let mut intersect = (&pm * &y)?.sum(D::Minus1)?;
    let mut sum_pred = pm.sum(D::Minus1)?;
    let mut sum_gt = ym.sum(D::Minus1)?.detach();
    if batch_dice {
        intersect = intersect.sum(0)?;
        sum_pred = sum_pred.sum(0)?;
        sum_gt = sum_gt.sum(0)?;
    }
    let num = intersect.affine(2.0, smooth)?;
    let den = (sum_gt + sum_pred)?.affine(1.0, smooth)?.maximum(1e-8)?;
    num.div(&den)?.mean_all()?.neg()
}

/// Element-wise `binary_cross_entropy_with_logits`, numerically stable form
/// `max(x, 0) - x*t + log(1 + exp(-|x|))`.
fn bce_elementwise(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let softplus = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    (x.relu()? - (x * t)?)? + softplus
}

/// nnU-Net's `MemoryEfficientSoftDiceLoss` (ddp = false). Returns `-mean(dice)`.
#[derive(Clone, Debug, PartialEq)]
pub struct SoftDiceLoss {
    pub nonlin: Nonlinearity,
    pub batch_dice: bool,
    pub do_bg: bool,
    pub smooth: f64,
}

impl SoftDiceLoss {
    /// nnU-Net's label-based dice: softmax, do_bg = false, smooth 1e-5.
    pub fn nnunet_labels(batch_dice: bool) -> Self {
        Self {
            nonlin: Nonlinearity::Softmax,
            batch_dice,
            do_bg: false,
            smooth: 1e-5,
        }
    }

    /// nnU-Net's region-based dice: sigmoid, do_bg = true, smooth 1e-5.
    pub fn nnunet_regions(batch_dice: bool) -> Self {
        Self {
            nonlin: Nonlinearity::Sigmoid,
            batch_dice,
            do_bg: true,
            smooth: 1e-5,
        }
    }

    /// `target`: either a one-hot / region tensor with the logits' shape, or labels
    /// `(B, 1, *spatial)` (as in nnU-Net, equal shapes mean one-hot). `loss_mask`:
    /// optional `(B, 1, *spatial)`, 1 = counted, 0 = ignored.
    pub fn forward(
        &self,
        logits: &Tensor,
        target: &Tensor,
        loss_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = flatten_spatial(logits, "soft dice logits")?;
        let c = x.dim(1)?;
        let p = match self.nonlin {
            Nonlinearity::Softmax => softmax_dim1(&x)?,
            Nonlinearity::Sigmoid => candle_nn::ops::sigmoid(&x)?,
        };
        let y = if target.dims() == logits.dims() {
            target.to_dtype(x.dtype())?.flatten_from(2)?
        } else {
            let t = label_target(logits, target, "soft dice")?;
            one_hot(&t, c, x.dtype())?
        };
        let mask = match loss_mask {
            Some(m) => Some(mask_to_flat(logits, m, "soft dice loss_mask")?),
            None => None,
        };
        soft_dice_core(
            &p,
            &y,
            mask.as_ref(),
            self.batch_dice,
            self.do_bg,
            self.smooth,
        )
    }
}

impl SegLoss for SoftDiceLoss {
    fn loss(&self, logits: &Tensor, target: &Tensor) -> Result<Tensor> {
        self.forward(logits, target, None)
    }
}

fn mask_to_flat(logits: &Tensor, mask: &Tensor, what: &str) -> Result<Tensor> {
    let ld = logits.dims();
    let md = mask.dims();
    if md.len() != ld.len() || md[0] != ld[0] || md[1] != 1 || md[2..] != ld[2..] {
        bail!("{what}: expected (B, 1, *spatial) for logits {ld:?}, got {md:?}");
    }
    mask.to_dtype(logits.dtype())?.flatten_from(2)
}

/// nnU-Net's `RobustCrossEntropyLoss` (torch `CrossEntropyLoss`, mean reduction).
///
/// `target`: labels `(B, 1, *spatial)` or `(B, *spatial)` as float or integer values.
/// With `ignore_label`, the mean runs over non-ignored voxels only and ignored voxels get zero
/// gradient; if every voxel is ignored the loss is 0 (nnU-Net skips the CE term then).
pub fn cross_entropy(
    logits: &Tensor,
    target: &Tensor,
    ignore_label: Option<i64>,
) -> Result<Tensor> {
    let x = flatten_spatial(logits, "cross entropy logits")?;
    let t = label_target(logits, target, "cross entropy")?;
    let mask = match ignore_label {
        Some(ign) => Some(t.ne(ign as f64)?.to_dtype(x.dtype())?),
        None => None,
    };
    let y = one_hot(&t, x.dim(1)?, x.dtype())?;
    ce_core(&log_softmax_dim1(&x)?, &y, mask.as_ref())
}

/// `logp (B, C, N)` log-probabilities, `y (B, C, N)` one-hot, `mask (B, 1, N)`.
fn ce_core(logp: &Tensor, y: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let nll = (logp * y)?.sum_keepdim(1)?.neg()?; // (B, 1, N)
    match mask {
        None => nll.mean_all(),
        Some(m) => {
            let count = m.sum_all()?.maximum(1.0)?;
            (nll * m)?.sum_all()?.div(&count)
        }
    }
}

/// `binary_cross_entropy_with_logits`, mean over all elements (target 0/1, logits' shape).
pub fn bce_with_logits(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    if logits.dims() != target.dims() {
        bail!(
            "bce_with_logits: target shape {:?} differs from logits shape {:?}",
            target.dims(),
            logits.dims()
        );
    }
    bce_elementwise(logits, &target.to_dtype(logits.dtype())?)?.mean_all()
}

/// nnU-Net's `DC_and_CE_loss` with `MemoryEfficientSoftDiceLoss` (softmax, do_bg = false).
///
/// `target`: `(B, 1, *spatial)` holding label values (float). With `ignore_label`, voxels with
/// that value are excluded from both terms.
#[derive(Clone, Debug, PartialEq)]
pub struct DcAndCeLoss {
    pub options: LossOptions,
}

impl DcAndCeLoss {
    pub fn new(options: LossOptions) -> Self {
        Self { options }
    }
}

impl SegLoss for DcAndCeLoss {
    fn loss(&self, logits: &Tensor, target: &Tensor) -> Result<Tensor> {
        let o = &self.options;
        let x = flatten_spatial(logits, "DC_and_CE logits")?;
        let c = x.dim(1)?;
        let t = label_target(logits, target, "DC_and_CE")?;
        // Ignored voxels: nnU-Net uses where(mask, target, 0) for the dice target. The dice
        // sums multiply the prediction and the ground truth by the mask, and the CE terms are
        // masked too, so the one-hot of the raw target gives identical sums.
        let mask = match o.ignore_label {
            Some(ign) => Some(t.ne(ign as f64)?.to_dtype(x.dtype())?),
            None => None,
        };
        let y = one_hot(&t, c, x.dtype())?;
        let logp = log_softmax_dim1(&x)?;
        let mut total: Option<Tensor> = None;
        if o.weight_dice != 0.0 {
            let p = logp.exp()?;
            let dc = soft_dice_core(&p, &y, mask.as_ref(), o.batch_dice, false, o.smooth)?;
            total = Some(dc.affine(o.weight_dice, 0.0)?);
        }
        if o.weight_ce != 0.0 {
            let ce = ce_core(&logp, &y, mask.as_ref())?.affine(o.weight_ce, 0.0)?;
            total = Some(match total {
                Some(d) => (d + ce)?,
                None => ce,
            });
        }
        match total {
            Some(t) => Ok(t),
            None => Tensor::zeros((), x.dtype(), x.device()),
        }
    }
}

/// nnU-Net's `DC_and_BCE_loss` for region-based training (sigmoid dice, do_bg = true).
///
/// `target`: `(B, R, *spatial)` 0/1 regions; with `ignore_label` set, `(B, R + 1, *spatial)`
/// where the last channel marks ignored voxels (1 = ignore). The masked BCE is
/// `sum(bce * mask) / max(sum(mask), 1e-8)` with `sum(mask)` over `(B, 1, *spatial)`, exactly
/// as in nnU-Net (so it is R times a per-element mean).
#[derive(Clone, Debug, PartialEq)]
pub struct DcAndBceLoss {
    pub options: LossOptions,
}

impl DcAndBceLoss {
    pub fn new(options: LossOptions) -> Self {
        Self { options }
    }
}

impl SegLoss for DcAndBceLoss {
    fn loss(&self, logits: &Tensor, target: &Tensor) -> Result<Tensor> {
        let o = &self.options;
        let x = flatten_spatial(logits, "DC_and_BCE logits")?;
        let r = x.dim(1)?;
        let use_ignore = o.ignore_label.is_some();
        let ld = logits.dims();
        let td = target.dims();
        let expect_c = if use_ignore { r + 1 } else { r };
        if td.len() != ld.len() || td[0] != ld[0] || td[1] != expect_c || td[2..] != ld[2..] {
            bail!(
                "DC_and_BCE: expected target ({}, {expect_c}, {:?}){}, got {td:?}",
                ld[0],
                &ld[2..],
                if use_ignore {
                    " (regions + ignore channel)"
                } else {
                    ""
                }
            );
        }
        let t = target.to_dtype(x.dtype())?.flatten_from(2)?;
        let (regions, mask) = if use_ignore {
            let m = t.narrow(1, r, 1)?.affine(-1.0, 1.0)?;
            (t.narrow(1, 0, r)?, Some(m))
        } else {
            (t, None)
        };
        let mut total: Option<Tensor> = None;
        if o.weight_dice != 0.0 {
            let p = candle_nn::ops::sigmoid(&x)?;
            let dc = soft_dice_core(&p, &regions, mask.as_ref(), o.batch_dice, true, o.smooth)?;
            total = Some(dc.affine(o.weight_dice, 0.0)?);
        }
        if o.weight_ce != 0.0 {
            let bce = bce_elementwise(&x, &regions)?;
            let ce = match &mask {
                Some(m) => {
                    let den = m.sum_all()?.maximum(1e-8)?;
                    bce.broadcast_mul(m)?.sum_all()?.div(&den)?
                }
                None => bce.mean_all()?,
            };
            let ce = ce.affine(o.weight_ce, 0.0)?;
            total = Some(match total {
                Some(d) => (d + ce)?,
                None => ce,
            });
        }
        match total {
            Some(t) => Ok(t),
            None => Tensor::zeros((), x.dtype(), x.device()),
        }
    }
}

/// nnU-Net's deep-supervision loss weights for `n_outputs` network outputs (highest resolution
/// first): `1/2^i`, the last (lowest resolution) set to 0, normalised to sum 1.
/// For a single output (deep supervision off) the weight is `[1.0]`.
pub fn deep_supervision_weights(n_outputs: usize) -> Vec<f64> {
    match n_outputs {
        0 => Vec::new(),
        1 => vec![1.0],
        n => {
            let mut w: Vec<f64> = (0..n).map(|i| 1.0 / 2f64.powi(i as i32)).collect();
            w[n - 1] = 0.0;
            let s: f64 = w.iter().sum();
            w.iter().map(|v| v / s).collect()
        }
    }
}

/// nnU-Net's `DeepSupervisionWrapper`: `sum_i w_i * inner(output_i, target_i)`; outputs with
/// weight 0 are skipped (not evaluated).
pub struct DeepSupervisionLoss {
    inner: Box<dyn SegLoss>,
    weights: Vec<f64>,
}

impl DeepSupervisionLoss {
    pub fn new(inner: Box<dyn SegLoss>, weights: Vec<f64>) -> Self {
        Self { inner, weights }
    }

    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    pub fn inner(&self) -> &dyn SegLoss {
        self.inner.as_ref()
    }

    /// `outputs[i]` and `targets[i]` belong to the same resolution (index 0 = full resolution).
    pub fn loss_ds(&self, outputs: &[Tensor], targets: &[Tensor]) -> Result<Tensor> {
        if outputs.len() != targets.len() {
            bail!(
                "deep supervision: {} outputs but {} targets",
                outputs.len(),
                targets.len()
            );
        }
        if outputs.len() > self.weights.len() {
            bail!(
                "deep supervision: {} outputs but only {} weights",
                outputs.len(),
                self.weights.len()
            );
        }
        let mut total: Option<Tensor> = None;
        for ((o, t), &w) in outputs.iter().zip(targets).zip(&self.weights) {
            if w == 0.0 {
                continue;
            }
            let l = self.inner.loss(o, t)?.affine(w, 0.0)?;
            total = Some(match total {
                Some(acc) => (acc + l)?,
                None => l,
            });
        }
        match total {
            Some(t) => Ok(t),
            None => bail!("deep supervision: no output has a non-zero weight"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn fixture(name: &str) -> HashMap<String, Tensor> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/ops")
            .join(format!("{name}.safetensors"));
        candle_core::safetensors::load(&p, &Device::Cpu)
            .unwrap_or_else(|e| panic!("loading {}: {e}", p.display()))
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    /// The fixture README's tolerance: |got - ref| <= rel*|ref| + 0.1*rel*max|ref|.
    fn assert_close(got: &Tensor, want: &Tensor, rel: f64, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let g = flat(got);
        let w = flat(want);
        let maxref = w.iter().fold(0f64, |m, v| m.max(v.abs()));
        let mut worst = 0f64;
        for (a, b) in g.iter().zip(&w) {
            let err = (a - b).abs();
            let tol = rel * b.abs() + 0.1 * rel * maxref;
            assert!(
                err <= tol,
                "{what}: got {a}, want {b} (err {err:e}, tol {tol:e})"
            );
            worst = worst.max(err / maxref.max(1e-30));
        }
        assert!(worst.is_finite());
        eprintln!("{what}: max scaled error {worst:.2e}");
    }

    /// Runs `f(x, target)` on the fixture in `dtype`, checks y and gx = gy * dL/dx.
    fn check_case(
        name: &str,
        dtype: DType,
        rel: f64,
        prep_target: &dyn Fn(&Tensor) -> Tensor,
        f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) {
        let fx = fixture(name);
        let x = Var::from_tensor(&fx["x"].to_dtype(dtype).unwrap()).unwrap();
        let target = prep_target(&fx["target"]);
        let y = f(x.as_tensor(), &target).unwrap();
        assert_eq!(y.rank(), 0, "{name}: loss must be 0-d");
        assert_close(&y, &fx["y"], rel, &format!("{name} y {dtype:?}"));
        let gy = fx["gy"].to_dtype(dtype).unwrap();
        let grads = (y * gy).unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).expect("gradient w.r.t. x");
        assert_close(gx, &fx["gx"], rel, &format!("{name} gx {dtype:?}"));
    }

    fn as_f32(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F32).unwrap()
    }

    // f64 runs: the reference is the f32-rounded exact answer, so 1e-5 relative is ample.
    // f32 runs: the README's recommended 1e-4 tolerance.
    const CASES_DTYPES: [(DType, f64); 2] = [(DType::F64, 1e-5), (DType::F32, 1e-4)];

    #[test]
    fn dice_nnunet_fixtures() {
        for nd in [2, 3] {
            for bd in [false, true] {
                let name = format!("dice_nnunet_{nd}d_batchdice{}", bd as u8);
                for (dt, rel) in CASES_DTYPES {
                    let dice = SoftDiceLoss::nnunet_labels(bd);
                    check_case(&name, dt, rel, &as_f32, &|x, t| dice.forward(x, t, None));
                }
            }
        }
    }

    #[test]
    fn cross_entropy_fixtures() {
        for nd in [2, 3] {
            for ign in [None, Some(3)] {
                let name = format!(
                    "cross_entropy_{nd}d{}",
                    if ign.is_some() { "_ignore" } else { "" }
                );
                for (dt, rel) in CASES_DTYPES {
                    // target is (B, *spatial) here: exercises the unsqueeze path
                    check_case(&name, dt, rel, &as_f32, &|x, t| cross_entropy(x, t, ign));
                }
            }
        }
    }

    #[test]
    fn dc_and_ce_fixtures() {
        for nd in [2, 3] {
            for bd in [false, true] {
                for ign in [None, Some(3)] {
                    let name = format!(
                        "dc_and_ce_nnunet_{nd}d_batchdice{}{}",
                        bd as u8,
                        if ign.is_some() { "_ignore" } else { "" }
                    );
                    let loss = DcAndCeLoss::new(LossOptions {
                        batch_dice: bd,
                        ignore_label: ign,
                        ..LossOptions::default()
                    });
                    for (dt, rel) in CASES_DTYPES {
                        check_case(&name, dt, rel, &as_f32, &|x, t| loss.loss(x, t));
                    }
                }
            }
        }
    }

    #[test]
    fn bce_with_logits_fixtures() {
        for nd in [2, 3] {
            let name = format!("bce_with_logits_{nd}d");
            for (dt, rel) in CASES_DTYPES {
                check_case(&name, dt, rel, &as_f32, &|x, t| bce_with_logits(x, t));
            }
        }
    }

    #[test]
    fn dc_and_bce_fixtures() {
        for (name, bd, ign) in [
            ("dc_and_bce_nnunet_3d_batchdice0", false, None),
            ("dc_and_bce_nnunet_3d_batchdice1_ignore", true, Some(1)),
        ] {
            let loss = DcAndBceLoss::new(LossOptions {
                batch_dice: bd,
                ignore_label: ign,
                ..LossOptions::default()
            });
            for (dt, rel) in CASES_DTYPES {
                check_case(name, dt, rel, &as_f32, &|x, t| loss.loss(x, t));
            }
        }
    }

    #[test]
    fn ds_weights_match_nnunet() {
        let w = deep_supervision_weights(5);
        let want = [8.0 / 15.0, 4.0 / 15.0, 2.0 / 15.0, 1.0 / 15.0, 0.0];
        assert_eq!(w.len(), 5);
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{w:?}");
        }
        assert!((w[0] - 0.5333).abs() < 1e-4 && (w[3] - 0.0667).abs() < 1e-4);
        assert_eq!(deep_supervision_weights(1), vec![1.0]);
        assert_eq!(deep_supervision_weights(2), vec![1.0, 0.0]);
        assert!(deep_supervision_weights(0).is_empty());
    }

    #[test]
    fn ds_loss_is_weighted_sum_and_skips_zero_weights() {
        let dev = Device::Cpu;
        let opts = LossOptions::default();
        let x0 = Tensor::new(
            &[[[[2.0f64, -1.0], [0.5, 0.0]], [[-1.0, 1.0], [0.0, 3.0]]]],
            &dev,
        )
        .unwrap(); // (1,2,2,2)
        let t0 = Tensor::new(&[[[[0.0f64, 1.0], [0.0, 1.0]]]], &dev).unwrap();
        let x1 = Tensor::new(&[[[[1.0f64]], [[-2.0]]]], &dev).unwrap(); // (1,2,1,1)
        let t1 = Tensor::new(&[[[[1.0f64]]]], &dev).unwrap();
        // a third output with a mismatched target shape: must be skipped (weight 0)
        let x2 = Tensor::zeros((1, 2, 1, 1), DType::F64, &dev).unwrap();
        let t2 = Tensor::zeros((1, 1, 5, 5), DType::F64, &dev).unwrap();
        let inner = DcAndCeLoss::new(opts.clone());
        let l0 = inner.loss(&x0, &t0).unwrap().to_scalar::<f64>().unwrap();
        let l1 = inner.loss(&x1, &t1).unwrap().to_scalar::<f64>().unwrap();
        let ds = DeepSupervisionLoss::new(Box::new(DcAndCeLoss::new(opts)), vec![0.75, 0.25, 0.0]);
        let got = ds
            .loss_ds(&[x0.clone(), x1, x2], &[t0.clone(), t1, t2])
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (got - (0.75 * l0 + 0.25 * l1)).abs() < 1e-12,
            "{got} {l0} {l1}"
        );
        assert!(ds.loss_ds(std::slice::from_ref(&x0), &[]).is_err());
        let ds1 =
            DeepSupervisionLoss::new(Box::new(DcAndCeLoss::new(LossOptions::default())), vec![]);
        assert!(ds1.loss_ds(&[x0], &[t0]).is_err());
    }

    /// Logits that differ only at ignored voxels give the same DC+CE and DC+BCE loss: ignored
    /// voxels contribute nothing.
    #[test]
    fn logits_at_ignored_voxels_do_not_change_the_loss() {
        let dev = Device::Cpu;
        // (1, 2, 1, 4): the last voxel is ignored (label 2)
        let x = Tensor::new(
            &[[[[1.0f64, -2.0, 0.5, 3.0]], [[-1.0, 2.0, 0.0, -4.0]]]],
            &dev,
        )
        .unwrap();
        let x2 = Tensor::new(
            &[[[[1.0f64, -2.0, 0.5, -9.0]], [[-1.0, 2.0, 0.0, 7.0]]]],
            &dev,
        )
        .unwrap();
        let t = Tensor::new(&[[[[0.0f64, 1.0, 1.0, 2.0]]]], &dev).unwrap();
        let dc_ce = DcAndCeLoss::new(LossOptions {
            ignore_label: Some(2),
            ..LossOptions::default()
        });
        let l = |x: &Tensor| dc_ce.loss(x, &t).unwrap().to_scalar::<f64>().unwrap();
        assert!((l(&x) - l(&x2)).abs() < 1e-12, "{} {}", l(&x), l(&x2));
        // without the ignore label the same change matters
        let t0 = Tensor::new(&[[[[0.0f64, 1.0, 1.0, 1.0]]]], &dev).unwrap();
        let plain = DcAndCeLoss::new(LossOptions::default());
        let p = |x: &Tensor| plain.loss(x, &t0).unwrap().to_scalar::<f64>().unwrap();
        assert!((p(&x) - p(&x2)).abs() > 1e-3);
        // regions: 2 region channels + the ignore channel (1 = ignored)
        let tr = Tensor::new(
            &[[
                [[0.0f64, 1.0, 1.0, 0.0]],
                [[0.0, 0.0, 1.0, 1.0]],
                [[0.0, 0.0, 0.0, 1.0]],
            ]],
            &dev,
        )
        .unwrap();
        let dc_bce = DcAndBceLoss::new(LossOptions {
            ignore_label: Some(2),
            ..LossOptions::default()
        });
        let r = |x: &Tensor| dc_bce.loss(x, &tr).unwrap().to_scalar::<f64>().unwrap();
        assert!((r(&x) - r(&x2)).abs() < 1e-12, "{} {}", r(&x), r(&x2));
    }

    #[test]
    fn ce_all_ignored_is_zero_and_perfect_dice_is_minus_one() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[[5.0f64, -5.0]], [[-5.0, 5.0]]]], &dev).unwrap(); // (1,2,1,2)
        let t_ign = Tensor::new(&[[[[2.0f64, 2.0]]]], &dev).unwrap();
        let ce = cross_entropy(&x, &t_ign, Some(2)).unwrap();
        assert_eq!(ce.to_scalar::<f64>().unwrap(), 0.0);
        // confident, correct prediction: dice close to -1, CE close to 0
        let x = (x * 10.0).unwrap();
        let t = Tensor::new(&[[[[0.0f64, 1.0]]]], &dev).unwrap();
        let l = DcAndCeLoss::new(LossOptions::default())
            .loss(&x, &t)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l + 1.0).abs() < 1e-6, "{l}");
        // wrong target shape is an error, not a panic
        let bad = Tensor::zeros((1, 1, 3, 3), DType::F64, &dev).unwrap();
        assert!(DcAndCeLoss::new(LossOptions::default())
            .loss(&x, &bad)
            .is_err());
    }
}
