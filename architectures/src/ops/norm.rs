//! Normalisation layers for channels-first N-d tensors, composed from Candle ops whose
//! gradients are correct (Candle's fused LayerNorm / rms_norm drop gradients silently).
//! All use the biased variance for normalisation; gradients flow through the statistics.
//! Half-precision (bf16/f16) inputs are normalised in f32 — statistics, normalisation and the
//! affine transform — and the result is cast back (as PyTorch's autocast runs norms in f32).

use super::{channel_view, spatial_dims};
use candle_core::{bail, DType, Result, Tensor};

/// Optional per-channel affine parameters `(C,)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NormAffine<'a> {
    pub weight: Option<&'a Tensor>,
    pub bias: Option<&'a Tensor>,
}

impl<'a> NormAffine<'a> {
    pub fn new(weight: Option<&'a Tensor>, bias: Option<&'a Tensor>) -> Self {
        Self { weight, bias }
    }
    /// No affine transform.
    pub fn none() -> Self {
        Self::default()
    }

    fn apply(&self, y: Tensor) -> Result<Tensor> {
        let c = y.dim(1)?;
        let rank = y.rank();
        let mut y = y;
        if let Some(w) = self.weight {
            if w.elem_count() != c {
                bail!(
                    "norm: weight has {} elements for {c} channels",
                    w.elem_count()
                );
            }
            y = y.broadcast_mul(&channel_view(&w.to_dtype(y.dtype())?, rank)?)?;
        }
        if let Some(b) = self.bias {
            if b.elem_count() != c {
                bail!(
                    "norm: bias has {} elements for {c} channels",
                    b.elem_count()
                );
            }
            y = y.broadcast_add(&channel_view(&b.to_dtype(y.dtype())?, rank)?)?;
        }
        Ok(y)
    }
}

/// `f(x)` computed in f32 when `x` is half precision (f16/bf16), cast back to `x`'s dtype.
pub(crate) fn in_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()),
        _ => f(x),
    }
}

/// Normalises `t` over dim `d` (keepdim statistics).
fn normalize_over(t: &Tensor, d: usize, eps: f64) -> Result<Tensor> {
    let mean = t.mean_keepdim(d)?;
    let xc = t.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(d)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)
}

/// Instance norm: statistics per `(n, c)` over the spatial axes (nnU-Net's norm; no running
/// statistics, identical in train and eval).
/// On CPU (f32/f64) this is one fused, parallel kernel with a hand-written backward pass.
pub fn instance_norm(x: &Tensor, affine: NormAffine, eps: f64) -> Result<Tensor> {
    spatial_dims(x, "instance_norm")?;
    if matches!(x.dtype(), DType::F16 | DType::BF16) {
        return in_f32(x, |x| instance_norm(x, affine, eps));
    }
    if let Some(y) = instance_norm_act_cpu(x, affine, eps, 1.0)? {
        return Ok(y);
    }
    instance_norm_composite(x, affine, eps)
}

/// [`instance_norm`] followed by [`leaky_relu`](super::leaky_relu) with `slope` (0 gives a
/// ReLU): nnU-Net's `norm -> nonlin` pair.
/// On CPU (f32/f64) this is one fused kernel that stores only `x` for the backward pass (the
/// normalised pre-activation is recomputed), saving a feature map per layer and two passes
/// over it; elsewhere the two ops are composed.
pub fn instance_norm_leaky_relu(
    x: &Tensor,
    affine: NormAffine,
    eps: f64,
    slope: f64,
) -> Result<Tensor> {
    spatial_dims(x, "instance_norm_leaky_relu")?;
    if matches!(x.dtype(), DType::F16 | DType::BF16) {
        return in_f32(x, |x| instance_norm_leaky_relu(x, affine, eps, slope));
    }
    if let Some(y) = instance_norm_act_cpu(x, affine, eps, slope)? {
        return Ok(y);
    }
    let y = instance_norm_composite(x, affine, eps)?;
    if slope == 0.0 {
        y.relu()
    } else {
        super::leaky_relu(&y, slope)
    }
}

/// The fused CPU kernel of instance norm + leaky ReLU (slope 1: no activation), or `None` when
/// `x` is not an f32/f64 CPU tensor.
fn instance_norm_act_cpu(
    x: &Tensor,
    affine: NormAffine,
    eps: f64,
    slope: f64,
) -> Result<Option<Tensor>> {
    if !(x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)) {
        return Ok(None);
    }
    let c = x.dim(1)?;
    let w = match affine.weight {
        Some(w) => w.to_dtype(x.dtype())?.flatten_all()?.contiguous()?,
        None => Tensor::ones(c, x.dtype(), x.device())?,
    };
    let b = match affine.bias {
        Some(b) => b.to_dtype(x.dtype())?.flatten_all()?.contiguous()?,
        None => Tensor::zeros(c, x.dtype(), x.device())?,
    };
    if w.elem_count() != c || b.elem_count() != c {
        bail!("instance_norm: affine parameters must have {c} elements");
    }
    let y = x
        .contiguous()?
        .apply_op3(&w, &b, super::fused::NormActOp::new(eps, slope))?;
    Ok(Some(y))
}

/// [`instance_norm`] composed from Candle ops (any device).
pub(crate) fn instance_norm_composite(x: &Tensor, affine: NormAffine, eps: f64) -> Result<Tensor> {
    spatial_dims(x, "instance_norm")?;
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let y = normalize_over(&x.reshape((n, c, ()))?, 2, eps)?.reshape(x.dims())?;
    affine.apply(y)
}

/// Group norm: `groups` groups of contiguous channels, statistics per `(n, group)`.
pub fn group_norm(x: &Tensor, groups: usize, affine: NormAffine, eps: f64) -> Result<Tensor> {
    spatial_dims(x, "group_norm")?;
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    if groups == 0 || c % groups != 0 {
        bail!("group_norm: {c} channels not divisible into {groups} groups");
    }
    in_f32(x, |x| {
        let y = normalize_over(&x.reshape((n, groups, ()))?, 2, eps)?.reshape(x.dims())?;
        affine.apply(y)
    })
}

/// ConvNeXt `LayerNorm(data_format="channels_first")`: normalises over the channel axis at every
/// `(n, position)`.
pub fn layer_norm_cf(x: &Tensor, affine: NormAffine, eps: f64) -> Result<Tensor> {
    spatial_dims(x, "layer_norm_cf")?;
    in_f32(x, |x| affine.apply(normalize_over(x, 1, eps)?))
}

/// Running statistics and hyper-parameters of a batch norm layer.
#[derive(Clone, Debug)]
pub struct BatchNormState {
    pub running_mean: Tensor,
    pub running_var: Tensor,
    /// PyTorch convention: `running = (1 - momentum) * running + momentum * batch_stat`
    pub momentum: f64,
    pub eps: f64,
}

impl BatchNormState {
    /// Fresh state (mean 0, var 1, momentum 0.1, eps 1e-5) for `c` channels.
    pub fn new(c: usize, dtype: candle_core::DType, dev: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            running_mean: Tensor::zeros(c, dtype, dev)?,
            running_var: Tensor::ones(c, dtype, dev)?,
            momentum: 0.1,
            eps: 1e-5,
        })
    }
}

/// Batch norm. `training`: normalise with the batch statistics over `(N, *spatial)` and update
/// the running statistics (unbiased variance, detached); otherwise use the running statistics.
pub fn batch_norm(
    x: &Tensor,
    affine: NormAffine,
    state: &mut BatchNormState,
    training: bool,
) -> Result<Tensor> {
    spatial_dims(x, "batch_norm")?;
    let c = x.dim(1)?;
    if state.running_mean.elem_count() != c || state.running_var.elem_count() != c {
        bail!("batch_norm: running statistics do not have {c} channels");
    }
    in_f32(x, |x| batch_norm_f(x, affine, state, training))
}

fn batch_norm_f(
    x: &Tensor,
    affine: NormAffine,
    state: &mut BatchNormState,
    training: bool,
) -> Result<Tensor> {
    let rank = x.rank();
    let c = x.dim(1)?;
    let y = if training {
        let dims: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
        let count = x.elem_count() / c.max(1);
        let mean = x.mean_keepdim(dims.clone())?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(dims)?;
        let y = xc.broadcast_div(&(&var + state.eps)?.sqrt()?)?;
        let m = state.momentum;
        let unbias = count as f64 / (count.saturating_sub(1)).max(1) as f64;
        let bm = mean
            .detach()
            .flatten_all()?
            .to_dtype(state.running_mean.dtype())?;
        let bv = (var.detach().flatten_all()? * unbias)?.to_dtype(state.running_var.dtype())?;
        state.running_mean = ((&state.running_mean * (1.0 - m))? + (bm * m)?)?.detach();
        state.running_var = ((&state.running_var * (1.0 - m))? + (bv * m)?)?.detach();
        y
    } else {
        let rm = channel_view(&state.running_mean.to_dtype(x.dtype())?, rank)?;
        let rv = channel_view(&state.running_var.to_dtype(x.dtype())?, rank)?;
        x.broadcast_sub(&rm)?
            .broadcast_div(&(rv + state.eps)?.sqrt()?)?
    };
    affine.apply(y)
}

/// Global response normalisation (ConvNeXt-V2, channels-first):
/// `Gx = ||x||_2 over space`, `Nx = Gx / (mean_c Gx + eps)`, `y = gamma*(x*Nx) + beta + x`.
pub fn grn(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let nd = spatial_dims(x, "grn")?;
    let rank = x.rank();
    let sp: Vec<usize> = (2..2 + nd).collect();
    in_f32(x, |x| {
        let gx = x.sqr()?.sum_keepdim(sp)?.sqrt()?;
        let nx = gx.broadcast_div(&(gx.mean_keepdim(1)? + eps)?)?;
        let xn = x.broadcast_mul(&nx)?;
        let (gamma, beta) = (gamma.to_dtype(x.dtype())?, beta.to_dtype(x.dtype())?);
        xn.broadcast_mul(&channel_view(&gamma, rank)?)?
            .broadcast_add(&channel_view(&beta, rank)?)?
            + x
    })
}
