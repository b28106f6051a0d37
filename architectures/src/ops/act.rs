//! Activations, channel softmax, dropout / drop path and padding.

use super::spatial_dims;
use candle_core::{bail, DType, Result, Tensor};

/// Leaky ReLU: `x` where `x >= 0`, `slope * x` elsewhere.
/// On CPU (f32/f64) a fused parallel kernel; elsewhere `where_cond`.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x
            .contiguous()?
            .apply_op1(super::fused::LeakyReluOp { slope });
    }
    leaky_relu_composite(x, slope)
}

/// [`leaky_relu`] composed from Candle ops (any device).
pub(crate) fn leaky_relu_composite(x: &Tensor, slope: f64) -> Result<Tensor> {
    let pos = x.ge(0.0)?;
    pos.where_cond(x, &(x * slope)?)
}

/// GELU flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluKind {
    /// exact: `0.5 x (1 + erf(x / sqrt 2))`
    Erf,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`
    Tanh,
}

/// GELU.
pub fn gelu(x: &Tensor, kind: GeluKind) -> Result<Tensor> {
    match kind {
        GeluKind::Erf => x.gelu_erf(),
        GeluKind::Tanh => x.gelu(),
    }
}

/// Softmax over the channel axis (dim 1), numerically stabilised, with a correct gradient
/// (Candle's fused `softmax_last_dim` has none).
pub fn softmax_channels(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(1)?)
}

/// Log-softmax over the channel axis (dim 1).
pub fn log_softmax_channels(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(1)?.detach();
    let xs = x.broadcast_sub(&m)?;
    xs.broadcast_sub(&xs.exp()?.sum_keepdim(1)?.log()?)
}

fn check_p(p: f64, op: &str) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        bail!("{op}: probability must be in [0, 1), got {p}");
    }
    Ok(())
}

/// Element-wise dropout with inverted scaling (`/ (1 - p)`); identity when not training or p = 0.
pub fn dropout(x: &Tensor, p: f64, training: bool) -> Result<Tensor> {
    check_p(p, "dropout")?;
    if !training || p == 0.0 {
        return Ok(x.clone());
    }
    let keep = x.rand_like(0.0, 1.0)?.ge(p)?.to_dtype(x.dtype())?;
    (x * keep)? / (1.0 - p)
}

/// Stochastic depth: drops whole samples (dim 0) with probability `p`, scaling the kept ones by
/// `1 / (1 - p)`; identity when not training or p = 0.
pub fn drop_path(x: &Tensor, p: f64, training: bool) -> Result<Tensor> {
    check_p(p, "drop_path")?;
    if !training || p == 0.0 {
        return Ok(x.clone());
    }
    let mut shape = vec![1usize; x.rank()];
    shape[0] = x.dim(0)?;
    let r = Tensor::rand(0f32, 1f32, shape, x.device())?;
    let keep = r.ge(p)?.to_dtype(x.dtype())?;
    x.broadcast_mul(&keep)? / (1.0 - p)
}

/// Padding mode of [`pad`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PadMode {
    /// zeros
    Zeros,
    /// a constant value
    Constant(f64),
    /// repeat the border element
    Replicate,
}

/// Pads the spatial axes: `amounts[a] = (before, after)` for spatial axis `a` (one entry is
/// broadcast to all axes).
pub fn pad(x: &Tensor, amounts: &[(usize, usize)], mode: PadMode) -> Result<Tensor> {
    let nd = spatial_dims(x, "pad")?;
    let am: Vec<(usize, usize)> = match amounts.len() {
        1 => vec![amounts[0]; nd],
        n if n == nd => amounts.to_vec(),
        n => bail!("pad: {n} (before, after) pairs for {nd} spatial dims"),
    };
    let mut t = x.clone();
    for (a, &(l, r)) in am.iter().enumerate() {
        if l == 0 && r == 0 {
            continue;
        }
        let d = 2 + a;
        t = match mode {
            PadMode::Zeros => t.pad_with_zeros(d, l, r)?,
            PadMode::Replicate => {
                if t.dim(d)? == 0 {
                    bail!("pad: cannot replicate-pad an empty axis");
                }
                t.pad_with_same(d, l, r)?
            }
            PadMode::Constant(v) => {
                let mut parts = Vec::new();
                let mut shape = t.dims().to_vec();
                if l > 0 {
                    shape[d] = l;
                    parts.push(Tensor::full(v, shape.clone(), t.device())?.to_dtype(t.dtype())?);
                }
                parts.push(t.clone());
                if r > 0 {
                    shape[d] = r;
                    parts.push(Tensor::full(v, shape, t.device())?.to_dtype(t.dtype())?);
                }
                Tensor::cat(&parts, d)?
            }
        };
    }
    Ok(t)
}
