//! Fused CPU kernels (f32/f64, contiguous) for the element-wise-heavy layers of a U-Net stage:
//! affine instance norm followed by a leaky ReLU, and a standalone leaky ReLU. Candle's
//! element-wise ops are single-threaded and its autograd adds a zeros + add pass per node, so the
//! composed versions make ~10 passes over a 3D feature map; these run parallel over `(n, c)`
//! rows and touch each row twice while it is in cache (statistics, then apply).
//! Backward passes are first order only (the gradient tensors are not differentiable again).
//!
//! The inner loops are written to vectorise: per-lane accumulators for the reductions (folded
//! into f64 per block), selects instead of branches, scalars copied into locals so that output
//! stores cannot alias them, and output buffers written once without a zero-fill pass.

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout,
    Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

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

/// The contiguous `T` slice of a CPU tensor (read lock held by the caller's `storage_and_layout`).
fn tensor_slice<'a, T: WithDType>(s: &'a Storage, l: &Layout) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(s) => slice(s, l),
        _ => bail!("fused op: operand is not on the CPU"),
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

/// Elements per rayon task at least: deep 3D stages have rows of a few hundred elements, which
/// are grouped; level-0 rows (tens of thousands) are one task each.
const MIN_TASK: usize = 1 << 14;
/// Chunk length of the element-wise (row-less) kernels.
const CHUNK: usize = 1 << 16;
/// Independent accumulators of the reductions (vectorisable; 16 f32 = one AVX-512 register).
const LANES: usize = 16;
/// Elements summed in `T` lanes before folding into f64 (each lane adds BLOCK / LANES values).
const BLOCK: usize = 1024;

/// Builds a `len`-element vector from disjoint chunks of `chunk` elements, written in parallel
/// by `fill(chunk_index, chunk)` without zero-filling the buffer first; returns it with the
/// per-chunk values `fill` returned. Short chunks are grouped into tasks of >= [`MIN_TASK`].
///
/// # Safety
/// `fill` must write every element of the chunk it is given.
unsafe fn par_build<T, S, F>(len: usize, chunk: usize, fill: F) -> (Vec<T>, Vec<S>)
where
    T: Send,
    S: Send,
    F: Fn(usize, &mut [MaybeUninit<T>]) -> S + Sync + Send,
{
    let mut v = Vec::with_capacity(len);
    let side = if len == 0 {
        Vec::new()
    } else {
        let chunk = chunk.max(1);
        v.spare_capacity_mut()[..len]
            .par_chunks_mut(chunk)
            .with_min_len((MIN_TASK / chunk).max(1))
            .enumerate()
            .map(|(i, c)| fill(i, c))
            .collect()
    };
    // SAFETY: the chunks cover `..len` and the caller guarantees that `fill` wrote all of them.
    unsafe { v.set_len(len) };
    (v, side)
}

/// `K` sums of `f(a[i], b[i])` over two equally long slices: [`LANES`] independent `T`
/// accumulators per sum (so the loop vectorises), folded into f64 every [`BLOCK`] elements.
#[inline(always)]
fn lane_sums<T: Float, const K: usize>(a: &[T], b: &[T], f: impl Fn(T, T) -> [T; K]) -> [f64; K] {
    let mut out = [0f64; K];
    for (ba, bb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let mut acc = [[T::zero(); LANES]; K];
        let ((ca, ra), (cb, rb)) = (ba.as_chunks::<LANES>(), bb.as_chunks::<LANES>());
        for (ca, cb) in ca.iter().zip(cb) {
            for l in 0..LANES {
                let v = f(ca[l], cb[l]);
                for k in 0..K {
                    acc[k][l] += v[k];
                }
            }
        }
        for (l, (&va, &vb)) in ra.iter().zip(rb).enumerate() {
            let v = f(va, vb);
            for k in 0..K {
                acc[k][l] += v[k];
            }
        }
        for k in 0..K {
            out[k] += acc[k].iter().map(|v| v.f()).sum::<f64>();
        }
    }
    out
}

/// Mean and 1/sqrt(var + eps) (biased variance) of one row. The sums are taken of `x - x[0]`,
/// which keeps the `E[d^2] - E[d]^2` variance accurate when the mean is large.
fn row_stats<T: Float>(x: &[T], eps: f64) -> (f64, f64) {
    let Some(&k) = x.first() else {
        return (0.0, 1.0 / eps.sqrt());
    };
    let [s, s2] = lane_sums(x, x, move |v, _| {
        let d = v - k;
        [d, d * d]
    });
    let n = x.len() as f64;
    let m = s / n;
    let var = (s2 / n - m * m).max(0.0);
    (k.f() + m, 1.0 / (var + eps).sqrt())
}

/// Leaky ReLU as a select (vectorises): `p >= 0 ? p : p * slope`.
#[inline(always)]
fn leaky<T: Float>(p: T, slope: T) -> T {
    if p >= T::zero() {
        p
    } else {
        p * slope
    }
}

/// Instance norm followed by a leaky ReLU, per `(n, c)` row:
/// `y = leaky_relu((x - mean) * rstd * w[c] + b[c], slope)` for inputs `(x, w, b)`.
/// `slope` 1 is a plain affine instance norm, 0 a ReLU. The backward pass recomputes the
/// normalised value from `x` (the pre-activation is never stored) with the row statistics of
/// the forward pass.
pub(crate) struct NormActOp {
    eps: f64,
    slope: f64,
    /// per-row `(mean, rstd)` of the forward pass, reused by the backward pass
    stats: OnceLock<Vec<(f64, f64)>>,
}

impl NormActOp {
    /// The op for `eps` (added to the variance) and the leaky ReLU `slope`.
    pub fn new(eps: f64, slope: f64) -> Self {
        Self {
            eps,
            slope,
            stats: OnceLock::new(),
        }
    }

    fn fwd<T: Float>(&self, x: &[T], w: &[T], b: &[T], l: &Layout) -> Result<Vec<T>> {
        let (c, sp) = rows(l)?;
        if w.len() != c || b.len() != c {
            bail!("instance norm: affine parameters must have {c} elements");
        }
        let (eps, slope) = (self.eps, T::t(self.slope));
        // SAFETY: every row writes each of its elements once.
        let (y, stats) = unsafe {
            par_build(x.len(), sp, |row, yr: &mut [MaybeUninit<T>]| {
                let xr = &x[row * sp..(row + 1) * sp];
                let (mean, rstd) = row_stats(xr, eps);
                // locals, so that the output stores cannot alias them (the loop vectorises)
                let (m, sc, bc, s) = (T::t(mean), T::t(rstd * w[row % c].f()), b[row % c], slope);
                for (o, &v) in yr.iter_mut().zip(xr) {
                    o.write(leaky((v - m) * sc + bc, s));
                }
                (mean, rstd)
            })
        };
        let _ = self.stats.set(stats);
        Ok(y)
    }

    /// `(dx, dw, db)` for the upstream gradient `g`.
    fn bwd_t<T: Float>(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (x_, g_) = (tensor_slice::<T>(&xs, xl)?, tensor_slice::<T>(&gs, gl)?);
        let (w_, b_) = (tensor_slice::<T>(&ws, wl)?, tensor_slice::<T>(&bs, bl)?);
        let (c, sp) = rows(xl)?;
        let n_rows = x_.len().checked_div(sp).unwrap_or(0);
        if g_.len() != x_.len() || w_.len() != c || b_.len() != c {
            bail!("instance norm backward: operand shapes do not match");
        }
        let cached = self.stats.get().filter(|s| s.len() == n_rows);
        let (eps, slope, inv_n) = (self.eps, T::t(self.slope), 1.0 / sp.max(1) as f64);
        // SAFETY: every row writes each of its elements once.
        let (dx, sums) = unsafe {
            par_build(x_.len(), sp, |row, dr: &mut [MaybeUninit<T>]| {
                let (xr, gr) = (&x_[row * sp..(row + 1) * sp], &g_[row * sp..(row + 1) * sp]);
                let (mean, rstd) = cached.map_or_else(|| row_stats(xr, eps), |s| s[row]);
                let wc = w_[row % c].f();
                let (m, r, sc, bc) = (T::t(mean), T::t(rstd), T::t(rstd * wc), b_[row % c]);
                // normalised value and the gradient w.r.t. the pre-activation (exactly the
                // forward pass's pre-activation, so the slope mask matches it)
                let grad_pre = move |v: T, gv: T| {
                    let d = v - m;
                    let gp = if d * sc + bc >= T::zero() {
                        gv
                    } else {
                        gv * slope
                    };
                    (d * r, gp)
                };
                let [sg, sgx] = lane_sums(xr, gr, |v, gv| {
                    let (xh, gp) = grad_pre(v, gv);
                    [gp, gp * xh]
                });
                // dx = w rstd (g' - mean(g') - xhat mean(g' xhat))
                let (a, k) = (T::t(sg * inv_n), T::t(sgx * inv_n));
                for ((o, &v), &gv) in dr.iter_mut().zip(xr).zip(gr) {
                    let (xh, gp) = grad_pre(v, gv);
                    o.write(sc * (gp - a - xh * k));
                }
                (sg, sgx)
            })
        };
        // dw[c] = sum_n sum(g' xhat), db[c] = sum_n sum(g')
        let (mut dw, mut db) = (vec![0f64; c], vec![0f64; c]);
        for (row, (sg, sgx)) in sums.into_iter().enumerate() {
            dw[row % c] += sgx;
            db[row % c] += sg;
        }
        let to_t = |v: Vec<f64>| v.into_iter().map(T::t).collect::<Vec<T>>();
        let dev = x.device();
        Ok((
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(to_t(dw), c, dev)?,
            Tensor::from_vec(to_t(db), c, dev)?,
        ))
    }
}

/// Channels and row length (spatial size) of an `(N, C, *spatial)` layout.
fn rows(l: &Layout) -> Result<(usize, usize)> {
    let dims = l.dims();
    if dims.len() < 3 {
        bail!("instance norm: expected (N, C, *spatial), got {dims:?}");
    }
    Ok((dims[1], dims[2..].iter().product()))
}

impl CustomOp3 for NormActOp {
    fn name(&self) -> &'static str {
        "nnseg-instance-norm-act"
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
        let st = by_dtype!(s1, |T| self.fwd::<T>(
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
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, w, b, &g)?,
            DType::F64 => self.bwd_t::<f64>(x, w, b, &g)?,
            dt => bail!("fused op: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Leaky ReLU `x >= 0 ? x : slope * x`.
pub(crate) struct LeakyReluOp {
    pub slope: f64,
}

impl CustomOp1 for LeakyReluOp {
    fn name(&self) -> &'static str {
        "nnseg-leaky-relu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(x: &[T], slope: f64) -> Result<Vec<T>> {
            // SAFETY: every chunk writes each of its elements once.
            let (y, _) = unsafe {
                par_build(x.len(), CHUNK, |i, o: &mut [MaybeUninit<T>]| {
                    let s = T::t(slope);
                    let xi = &x[i * CHUNK..i * CHUNK + o.len()];
                    for (o, &v) in o.iter_mut().zip(xi) {
                        o.write(leaky(v, s));
                    }
                })
            };
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
            if g.len() != x.len() {
                bail!("leaky relu backward: gradient shape does not match");
            }
            // SAFETY: every chunk writes each of its elements once.
            let (d, _) = unsafe {
                par_build(x.len(), CHUNK, |i, o: &mut [MaybeUninit<T>]| {
                    let s = T::t(slope);
                    let r = i * CHUNK..i * CHUNK + o.len();
                    for ((o, &v), &gv) in o.iter_mut().zip(&x[r.clone()]).zip(&g[r]) {
                        o.write(if v >= T::zero() { gv } else { gv * s });
                    }
                })
            };
            Ok(d)
        }
        let st = by_dtype!(s1, |T| run::<T>(slice(s1, l1)?, slice(s2, l2)?, self.slope));
        Ok((st, l1.shape().clone()))
    }
}
