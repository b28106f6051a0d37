//! Interpolation (nearest, N-linear with/without align_corners) and pixel/voxel shuffle.
//!
//! Interpolation is separable: per axis, the source indices and weights are computed on the host
//! and applied with `index_select` (+ a weighted blend for linear), whose gradient (`index_add`)
//! Candle implements correctly on every device.

use super::spatial_dims;
use candle_core::{bail, Result, Tensor};

/// Interpolation mode. `Linear` is bilinear in 2D and trilinear in 3D.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterpMode {
    /// PyTorch `nearest` (not `nearest-exact`): `src = min(floor(dst * scale), in - 1)`.
    Nearest,
    Linear {
        align_corners: bool,
    },
}

/// Target of [`interpolate`]: an explicit output size or a per-axis scale factor (one entry is
/// broadcast to all axes). With a scale, the output size is `floor(in * scale)` and, as in
/// PyTorch with `recompute_scale_factor=None`, coordinates map with `1 / scale`.
#[derive(Clone, Debug, PartialEq)]
pub enum InterpSize {
    Size(Vec<usize>),
    Scale(Vec<f64>),
}

/// Source index pairs and the weight on the second index, for one axis.
fn axis_plan(
    inp: usize,
    out: usize,
    ratio: f64,
    mode: InterpMode,
) -> (Vec<u32>, Vec<u32>, Vec<f64>) {
    let last = inp.saturating_sub(1);
    let mut i0 = Vec::with_capacity(out);
    let mut i1 = Vec::with_capacity(out);
    let mut lam = Vec::with_capacity(out);
    for j in 0..out {
        match mode {
            InterpMode::Nearest => {
                let s = ((j as f64 * ratio).floor() as usize).min(last);
                i0.push(s as u32);
                i1.push(s as u32);
                lam.push(0.0);
            }
            InterpMode::Linear { align_corners } => {
                let src = if align_corners {
                    j as f64 * ratio
                } else {
                    ((j as f64 + 0.5) * ratio - 0.5).max(0.0)
                };
                let a = (src.floor() as usize).min(last);
                let b = (a + 1).min(last);
                i0.push(a as u32);
                i1.push(b as u32);
                lam.push(if b == a { 0.0 } else { src - a as f64 });
            }
        }
    }
    (i0, i1, lam)
}

/// N-d interpolation of `(N, C, *sp)` to a new spatial size.
pub fn interpolate(x: &Tensor, size: &InterpSize, mode: InterpMode) -> Result<Tensor> {
    let nd = spatial_dims(x, "interpolate")?;
    let inp: Vec<usize> = x.dims()[2..].to_vec();
    let (out, scale): (Vec<usize>, Option<Vec<f64>>) = match size {
        InterpSize::Size(s) => {
            let s = super::per_axis(s, nd, 1, "interpolate size")?;
            (s, None)
        }
        InterpSize::Scale(f) => {
            let f: Vec<f64> = match f.len() {
                1 => vec![f[0]; nd],
                n if n == nd => f.clone(),
                n => bail!("interpolate: {n} scale factors for {nd} spatial dims"),
            };
            if f.iter().any(|&v| !(v.is_finite() && v > 0.0)) {
                bail!("interpolate: scale factors must be positive, got {f:?}");
            }
            let o = (0..nd)
                .map(|a| (inp[a] as f64 * f[a]).floor() as usize)
                .collect();
            (o, Some(f))
        }
    };
    if out.contains(&0) || inp.contains(&0) {
        bail!(
            "interpolate: empty input {:?} or output size {out:?}",
            x.dims()
        );
    }
    let mut t = x.clone();
    let rank = x.rank();
    for a in 0..nd {
        let (i, o) = (inp[a], out[a]);
        let ratio = match mode {
            InterpMode::Linear {
                align_corners: true,
            } => {
                if o > 1 {
                    (i - 1) as f64 / (o - 1) as f64
                } else {
                    0.0
                }
            }
            _ => match &scale {
                Some(f) => 1.0 / f[a],
                None => i as f64 / o as f64,
            },
        };
        let (i0, i1, lam) = axis_plan(i, o, ratio, mode);
        let identity = o == i
            && lam.iter().all(|&l| l == 0.0)
            && i0.iter().enumerate().all(|(j, &v)| v as usize == j);
        if identity {
            continue;
        }
        let d = 2 + a;
        let idx0 = Tensor::from_vec(i0, o, x.device())?;
        let x0 = t.index_select(&idx0, d)?;
        if lam.iter().all(|&l| l == 0.0) {
            t = x0;
            continue;
        }
        let idx1 = Tensor::from_vec(i1, o, x.device())?;
        let x1 = t.index_select(&idx1, d)?;
        let mut shape = vec![1usize; rank];
        shape[d] = o;
        let lam = Tensor::from_vec(lam, shape, x.device())?.to_dtype(x.dtype())?;
        t = (&x0 + (x1 - &x0)?.broadcast_mul(&lam)?)?;
    }
    Ok(t)
}

/// Pixel shuffle (2D) and its N-d analogue: `(N, C·r^nd, *sp) -> (N, C, *sp·r)`; input channel
/// `c·r^nd + a·r^(nd-1) + … ` at position `i` goes to output `(c, r·i_0 + a, …)`.
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let nd = spatial_dims(x, "pixel_shuffle")?;
    let dims = x.dims().to_vec();
    let rn = r.pow(nd as u32);
    if r == 0 || !dims[1].is_multiple_of(rn) {
        bail!(
            "pixel_shuffle: channels {} not divisible by r^{nd} = {rn}",
            dims[1]
        );
    }
    let c = dims[1] / rn;
    let mut shape = vec![dims[0], c];
    shape.extend(std::iter::repeat_n(r, nd));
    shape.extend(&dims[2..]);
    let mut perm = vec![0, 1];
    for a in 0..nd {
        perm.push(2 + nd + a);
        perm.push(2 + a);
    }
    let mut out = vec![dims[0], c];
    out.extend(dims[2..].iter().map(|&s| s * r));
    x.reshape(shape)?.permute(perm)?.reshape(out)
}

/// Inverse of [`pixel_shuffle`]: `(N, C, *sp·r) -> (N, C·r^nd, *sp)`.
pub fn pixel_unshuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let nd = spatial_dims(x, "pixel_unshuffle")?;
    let dims = x.dims().to_vec();
    if r == 0 || dims[2..].iter().any(|&s| !s.is_multiple_of(r)) {
        bail!(
            "pixel_unshuffle: spatial size {:?} not divisible by {r}",
            &dims[2..]
        );
    }
    let mut shape = vec![dims[0], dims[1]];
    for &s in &dims[2..] {
        shape.push(s / r);
        shape.push(r);
    }
    let mut perm = vec![0, 1];
    perm.extend((0..nd).map(|a| 3 + 2 * a));
    perm.extend((0..nd).map(|a| 2 + 2 * a));
    let mut out = vec![dims[0], dims[1] * r.pow(nd as u32)];
    out.extend(dims[2..].iter().map(|&s| s / r));
    x.reshape(shape)?.permute(perm)?.reshape(out)
}
