//! Max / average pooling (per-axis kernel, stride, padding, ceil_mode, count_include_pad) and
//! global average pooling. Pooling over a box is separable, so it runs as one 1-D pass per axis:
//! pad, gather all windows with one `index_select` (or a plain reshape when kernel == stride),
//! and reduce with `max` / `sum`. Both reductions have correct gradients in Candle (unlike its
//! `max_pool2d`, whose gradient is divided by the window size).

use super::{per_axis, spatial_dims};
use candle_core::{bail, DType, Result, Tensor};

/// Options of [`max_pool`] / [`avg_pool`]. `stride` empty = `kernel` (PyTorch's default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolOpts {
    pub kernel: Vec<usize>,
    pub stride: Vec<usize>,
    pub padding: Vec<usize>,
    pub ceil_mode: bool,
    /// avg pool only: whether padded elements count in the divisor (PyTorch default true)
    pub count_include_pad: bool,
}

impl PoolOpts {
    pub fn new(kernel: impl Into<Vec<usize>>) -> Self {
        Self {
            kernel: kernel.into(),
            stride: vec![],
            padding: vec![],
            ceil_mode: false,
            count_include_pad: true,
        }
    }
    pub fn stride(mut self, s: impl Into<Vec<usize>>) -> Self {
        self.stride = s.into();
        self
    }
    pub fn padding(mut self, p: impl Into<Vec<usize>>) -> Self {
        self.padding = p.into();
        self
    }
    pub fn ceil_mode(mut self, c: bool) -> Self {
        self.ceil_mode = c;
        self
    }
    pub fn count_include_pad(mut self, c: bool) -> Self {
        self.count_include_pad = c;
        self
    }
}

struct Axis {
    inp: usize,
    k: usize,
    s: usize,
    p: usize,
    out: usize,
}

fn axes(x: &Tensor, o: &PoolOpts, op: &str) -> Result<Vec<Axis>> {
    let nd = spatial_dims(x, op)?;
    if o.kernel.is_empty() {
        bail!("{op}: kernel size missing");
    }
    let k = per_axis(&o.kernel, nd, 1, &format!("{op} kernel"))?;
    let s = if o.stride.is_empty() {
        k.clone()
    } else {
        per_axis(&o.stride, nd, 1, &format!("{op} stride"))?
    };
    let p = per_axis(&o.padding, nd, 0, &format!("{op} padding"))?;
    (0..nd)
        .map(|a| {
            let inp = x.dims()[2 + a];
            if k[a] == 0 || s[a] == 0 || 2 * p[a] > k[a] || inp + 2 * p[a] < k[a] {
                bail!(
                    "{op}: invalid kernel {k:?} / stride {s:?} / padding {p:?} for input {:?} (padding must be at most half the kernel)",
                    x.dims()
                );
            }
            let num = inp + 2 * p[a] - k[a];
            let mut out = if o.ceil_mode {
                num.div_ceil(s[a]) + 1
            } else {
                num / s[a] + 1
            };
            if o.ceil_mode && (out - 1) * s[a] >= inp + p[a] {
                out -= 1;
            }
            Ok(Axis {
                inp,
                k: k[a],
                s: s[a],
                p: p[a],
                out,
            })
        })
        .collect()
}

/// Gathers the windows of one axis: `(…, L, …) -> (…, out, k, …)` (dim `d` split in two), padding
/// with `fill`.
fn windows(x: &Tensor, d: usize, ax: &Axis, fill: f64) -> Result<Tensor> {
    let need = (ax.out - 1) * ax.s + ax.k; // padded length the windows reach
    let right = need.saturating_sub(ax.p + ax.inp);
    let mut t = x.clone();
    if ax.p > 0 || right > 0 {
        let mut parts = Vec::new();
        let mut shape = t.dims().to_vec();
        if ax.p > 0 {
            shape[d] = ax.p;
            parts.push(Tensor::full(fill, shape.clone(), t.device())?.to_dtype(t.dtype())?);
        }
        parts.push(t.clone());
        if right > 0 {
            shape[d] = right;
            parts.push(Tensor::full(fill, shape, t.device())?.to_dtype(t.dtype())?);
        }
        t = Tensor::cat(&parts, d)?;
    }
    let mut split = t.dims().to_vec();
    split[d] = ax.out;
    split.insert(d + 1, ax.k);
    if ax.k == ax.s {
        // windows tile the axis: a view
        return t.narrow(d, 0, ax.out * ax.k)?.reshape(split);
    }
    let idx: Vec<u32> = (0..ax.out)
        .flat_map(|j| (0..ax.k).map(move |t| (j * ax.s + t) as u32))
        .collect();
    let idx = Tensor::from_vec(idx, ax.out * ax.k, t.device())?;
    t.index_select(&idx, d)?.reshape(split)
}

/// N-d max pooling (padding with -inf, PyTorch semantics incl. `ceil_mode`). The gradient goes in
/// full to the maximum of each window.
pub fn max_pool(x: &Tensor, o: &PoolOpts) -> Result<Tensor> {
    let axs = axes(x, o, "max_pool")?;
    let mut t = x.clone();
    for (a, ax) in axs.iter().enumerate() {
        if ax.k == 1 && ax.s == 1 && ax.p == 0 {
            continue;
        }
        t = windows(&t, 2 + a, ax, f64::NEG_INFINITY)?.max(3 + a)?;
    }
    Ok(t)
}

/// N-d average pooling (zero padding; `count_include_pad` and `ceil_mode` as in PyTorch).
pub fn avg_pool(x: &Tensor, o: &PoolOpts) -> Result<Tensor> {
    let axs = axes(x, o, "avg_pool")?;
    let mut t = x.clone();
    let rank = x.rank();
    for (a, ax) in axs.iter().enumerate() {
        if ax.k == 1 && ax.s == 1 && ax.p == 0 {
            continue;
        }
        let summed = windows(&t, 2 + a, ax, 0.0)?.sum(3 + a)?;
        let inv: Vec<f64> = (0..ax.out)
            .map(|j| {
                let start = (j * ax.s) as isize - ax.p as isize;
                let end = (start + ax.k as isize).min((ax.inp + ax.p) as isize);
                let pool = end - start;
                let cnt = if o.count_include_pad {
                    pool
                } else {
                    end.min(ax.inp as isize) - start.max(0)
                };
                1.0 / cnt.max(1) as f64
            })
            .collect();
        let mut shape = vec![1usize; rank];
        shape[2 + a] = ax.out;
        let inv = Tensor::from_vec(inv, shape, x.device())?.to_dtype(x.dtype())?;
        t = summed.broadcast_mul(&inv)?;
    }
    Ok(t)
}

/// Adaptive average pooling to output size 1 on every spatial axis (global mean, keeps dims).
pub fn adaptive_avg_pool_1(x: &Tensor) -> Result<Tensor> {
    let nd = spatial_dims(x, "adaptive_avg_pool")?;
    let dims: Vec<usize> = (2..2 + nd).collect();
    if x.dtype() == DType::F16 || x.dtype() == DType::BF16 {
        return x
            .to_dtype(DType::F32)?
            .mean_keepdim(dims)?
            .to_dtype(x.dtype());
    }
    x.mean_keepdim(dims)
}
