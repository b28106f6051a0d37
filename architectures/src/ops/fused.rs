//! Fused CPU kernels (f32/f64, contiguous) for the element-wise-heavy layers of a U-Net stage:
//! affine instance norm and leaky ReLU. Candle's element-wise ops are single-threaded and its
//! autograd adds a zeros + add pass per node, so the composed versions make ~10 passes over a
//! 3D feature map; these make 2 (forward) and 2 (backward), parallel over `(n, c)` rows.
//! Backward passes are first order only (the gradient tensors are not differentiable again).

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result,
    Shape, Tensor, WithDType,
};
use rayon::prelude::*;

trait Float: WithDType + Copy + Send + Sync {
    fn f(self) -> f64;
    fn t(v: f64) -> Self;
}
impl Float for f32 {
    fn f(self) -> f64 {
        self as f64
    }
    fn t(v: f64) -> Self {
        v as f32
    }
}
impl Float for f64 {
    fn f(self) -> f64 {
        self
    }
    fn t(v: f64) -> Self {
        v
    }
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let d = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => bail!("fused op: operand is not contiguous"),
    }
}

macro_rules! by_dtype {
    ($s:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                CpuStorage::F32($body?)
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                CpuStorage::F64($body?)
            }
            other => bail!("fused op: unsupported dtype {:?}", other.dtype()),
        }
    };
}

/// Mean and 1/sqrt(var + eps) of one row (f64 accumulation).
fn row_stats<T: Float>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let (mut s, mut s2) = (0f64, 0f64);
    for &v in x {
        let v = v.f();
        s += v;
        s2 += v * v;
    }
    let mean = s / n;
    let var = (s2 / n - mean * mean).max(0.0);
    (mean, 1.0 / (var + eps).sqrt())
}

/// `y = (x - mean) * rstd * w[c] + b[c]` per `(n, c)` row. Inputs `(x, w, b)`.
pub(crate) struct InstanceNormOp {
    pub eps: f64,
}

impl InstanceNormOp {
    fn run<T: Float>(&self, x: &[T], w: &[T], b: &[T], l: &Layout) -> Result<Vec<T>> {
        let dims = l.dims();
        let c = dims[1];
        let sp: usize = dims[2..].iter().product();
        let mut y = vec![T::t(0.0); x.len()];
        if sp == 0 {
            return Ok(y);
        }
        y.par_chunks_mut(sp)
            .zip(x.par_chunks(sp))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                let (mean, rstd) = row_stats(xr, self.eps);
                let scale = rstd * w[row % c].f();
                let shift = b[row % c].f() - mean * scale;
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = T::t(v.f() * scale + shift);
                }
            });
        Ok(y)
    }
}

impl CustomOp3 for InstanceNormOp {
    fn name(&self) -> &'static str {
        "nnseg-instance-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let st = by_dtype!(s1, |T| self.run::<T>(
            slice(s1, l1)?,
            slice(s2, l2)?,
            slice(s3, l3)?,
            l1
        ));
        Ok((st, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (n, c) = (x.dim(0)?, x.dim(1)?);
        let sp = (x.elem_count() / (n * c).max(1)) as f64;
        // (N, C, 4): mean, rstd, sum(g), sum(g * xhat)
        let st = x.apply_op2_no_bwd(&g, &InstanceNormStatsOp { eps: self.eps })?;
        let mean = st.narrow(2, 0, 1)?;
        let rstd = st.narrow(2, 1, 1)?;
        let sg = st.narrow(2, 2, 1)?;
        let sgx = st.narrow(2, 3, 1)?;
        let scale = rstd.broadcast_mul(&w.reshape((1, c, 1))?)?;
        let coef = Tensor::cat(&[&mean, &rstd, &scale, &(&sg / sp)?, &(&sgx / sp)?], 2)?;
        let dx = x.apply_op3_no_bwd(&g, &coef.contiguous()?, &InstanceNormDxOp)?;
        let dw = sgx.sum(0)?.flatten_all()?;
        let db = sg.sum(0)?.flatten_all()?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Per-row statistics for the backward pass: `(x, g) -> (N, C, 4)`.
struct InstanceNormStatsOp {
    eps: f64,
}

impl InstanceNormStatsOp {
    fn run<T: Float>(&self, x: &[T], g: &[T], l: &Layout) -> Result<Vec<T>> {
        let dims = l.dims();
        let sp: usize = dims[2..].iter().product();
        let rows = dims[0] * dims[1];
        let mut out = vec![T::t(0.0); rows * 4];
        if sp == 0 {
            return Ok(out);
        }
        out.par_chunks_mut(4)
            .zip(x.par_chunks(sp).zip(g.par_chunks(sp)))
            .for_each(|(o, (xr, gr))| {
                let (mean, rstd) = row_stats(xr, self.eps);
                let (mut sg, mut sgx) = (0f64, 0f64);
                for (&gv, &xv) in gr.iter().zip(xr) {
                    let gv = gv.f();
                    sg += gv;
                    sgx += gv * xv.f();
                }
                o[0] = T::t(mean);
                o[1] = T::t(rstd);
                o[2] = T::t(sg);
                o[3] = T::t((sgx - mean * sg) * rstd);
            });
        Ok(out)
    }
}

impl CustomOp2 for InstanceNormStatsOp {
    fn name(&self) -> &'static str {
        "nnseg-instance-norm-stats"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let st = by_dtype!(s1, |T| self.run::<T>(slice(s1, l1)?, slice(s2, l2)?, l1));
        let d = l1.dims();
        Ok((st, Shape::from((d[0], d[1], 4))))
    }
}

/// `dx = scale * (g - a - (x - mean) * rstd * b)` with per-row coefficients
/// `(mean, rstd, scale, a, b)`: inputs `(x, g, coef (N, C, 5))`.
struct InstanceNormDxOp;

impl InstanceNormDxOp {
    fn run<T: Float>(x: &[T], g: &[T], coef: &[T], l: &Layout) -> Result<Vec<T>> {
        let sp: usize = l.dims()[2..].iter().product();
        let mut dx = vec![T::t(0.0); x.len()];
        if sp == 0 {
            return Ok(dx);
        }
        dx.par_chunks_mut(sp)
            .zip(x.par_chunks(sp).zip(g.par_chunks(sp)))
            .enumerate()
            .for_each(|(row, (d, (xr, gr)))| {
                let k = &coef[row * 5..row * 5 + 5];
                let (mean, rstd, scale, a, b) = (k[0].f(), k[1].f(), k[2].f(), k[3].f(), k[4].f());
                let rb = rstd * b;
                for ((o, &xv), &gv) in d.iter_mut().zip(xr).zip(gr) {
                    *o = T::t(scale * (gv.f() - a - (xv.f() - mean) * rb));
                }
            });
        Ok(dx)
    }
}

impl CustomOp3 for InstanceNormDxOp {
    fn name(&self) -> &'static str {
        "nnseg-instance-norm-dx"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let st = by_dtype!(s1, |T| Self::run::<T>(
            slice(s1, l1)?,
            slice(s2, l2)?,
            slice(s3, l3)?,
            l1
        ));
        Ok((st, l1.shape().clone()))
    }
}

/// Leaky ReLU `x >= 0 ? x : slope * x`.
pub(crate) struct LeakyReluOp {
    pub slope: f64,
}

const CHUNK: usize = 1 << 16;

impl CustomOp1 for LeakyReluOp {
    fn name(&self) -> &'static str {
        "nnseg-leaky-relu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(x: &[T], slope: f64) -> Result<Vec<T>> {
            let s = T::t(slope);
            let zero = T::t(0.0);
            let mut y = vec![zero; x.len()];
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(o, i)| {
                    for (o, &v) in o.iter_mut().zip(i) {
                        *o = if v >= zero { v } else { v * s };
                    }
                });
            Ok(y)
        }
        let st = by_dtype!(s, |T| run::<T>(slice(s, l)?, self.slope));
        Ok((st, l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(
            &g,
            &LeakyReluBwdOp { slope: self.slope },
        )?))
    }
}

/// `(x, g) -> g * (x >= 0 ? 1 : slope)`.
struct LeakyReluBwdOp {
    slope: f64,
}

impl CustomOp2 for LeakyReluBwdOp {
    fn name(&self) -> &'static str {
        "nnseg-leaky-relu-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(x: &[T], g: &[T], slope: f64) -> Result<Vec<T>> {
            let s = T::t(slope);
            let zero = T::t(0.0);
            let mut d = vec![zero; x.len()];
            d.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|(o, (xi, gi))| {
                    for ((o, &v), &gv) in o.iter_mut().zip(xi).zip(gi) {
                        *o = if v >= zero { gv } else { gv * s };
                    }
                });
            Ok(d)
        }
        let st = by_dtype!(s1, |T| run::<T>(slice(s1, l1)?, slice(s2, l2)?, self.slope));
        Ok((st, l1.shape().clone()))
    }
}
