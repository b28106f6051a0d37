//! Direct CPU kernels (f32, contiguous) for the two ConvNeXt layers that the generic ops make
//! slow and memory-hungry: the depthwise k×k(×k) convolution (im2col per group writes k³ copies
//! of the input) and the channels-first LayerNorm (the composed version keeps four full-size
//! intermediates and reduces over a strided axis). Both carry explicit first-order backward
//! passes; on other devices / dtypes the generic `crate::ops` versions are used.

use crate::ops::{self, ConvOpts, NormAffine};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn fast_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let d = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => bail!("convunext fast op: operand is not contiguous"),
    }
}

/// `(N, C, D, H, W)` view of a 2D or 3D channels-first shape.
fn dims5(d: &[usize]) -> Result<[usize; 5]> {
    match d.len() {
        4 => Ok([d[0], d[1], 1, d[2], d[3]]),
        5 => Ok([d[0], d[1], d[2], d[3], d[4]]),
        _ => bail!("convunext fast op: expected a 2D or 3D tensor, got {d:?}"),
    }
}

// ---------------------------------------------------------------- depthwise convolution

/// Depthwise convolution, stride 1, "same" zero padding (odd kernels): `x (N, C, *sp)`,
/// `w (C, 1, *k)`, optional `bias (C)`.
pub fn depthwise_conv(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let k = &w.dims()[2..];
    if !fast_ok(x) || k.iter().any(|v| v % 2 == 0) || w.dims()[1] != 1 {
        let pad: Vec<usize> = k.iter().map(|v| v / 2).collect();
        let c = x.dim(1)?;
        return ops::conv(x, w, bias, &ConvOpts::new().padding(pad).groups(c));
    }
    let c = x.dim(1)?;
    if w.dims()[0] != c {
        bail!("depthwise_conv: weight {:?} for {c} channels", w.dims());
    }
    let b = match bias {
        Some(b) => b.to_dtype(DType::F32)?.contiguous()?,
        None => Tensor::zeros(c, DType::F32, x.device())?,
    };
    x.contiguous()?
        .apply_op3(&w.to_dtype(DType::F32)?.contiguous()?, &b, DwConvOp)
}

/// Kernel size as `(kd, kh, kw)`.
fn k3(wd: &[usize]) -> [usize; 3] {
    if wd.len() == 4 {
        [1, wd[2], wd[3]]
    } else {
        [wd[2], wd[3], wd[4]]
    }
}

/// Forward of one `(n, c)` plane: `y += conv(x, w)` with "same" padding.
fn dw_plane(y: &mut [f32], x: &[f32], w: &[f32], sp: [usize; 3], k: [usize; 3]) {
    let [d, h, wd] = sp;
    let [kd, kh, kw] = k;
    let (pd, ph, pw) = (kd / 2, kh / 2, kw / 2);
    for od in 0..d {
        for a in 0..kd {
            let id = od + a;
            if id < pd || id - pd >= d {
                continue;
            }
            let id = id - pd;
            for oh in 0..h {
                let yrow = &mut y[(od * h + oh) * wd..(od * h + oh + 1) * wd];
                for bb in 0..kh {
                    let ih = oh + bb;
                    if ih < ph || ih - ph >= h {
                        continue;
                    }
                    let ih = ih - ph;
                    let xrow = &x[(id * h + ih) * wd..(id * h + ih + 1) * wd];
                    for cc in 0..kw {
                        let wv = w[(a * kh + bb) * kw + cc];
                        // y[ow] += wv * x[ow + cc - pw] for the valid ow
                        let (lo, hi) =
                            (pw.saturating_sub(cc), (wd + pw).saturating_sub(cc).min(wd));
                        if lo >= hi {
                            continue;
                        }
                        let xs = &xrow[lo + cc - pw..hi + cc - pw];
                        for (o, &xv) in yrow[lo..hi].iter_mut().zip(xs) {
                            *o += wv * xv;
                        }
                    }
                }
            }
        }
    }
}

fn dw_forward(x: &[f32], w: &[f32], b: &[f32], xd: [usize; 5], k: [usize; 3]) -> Vec<f32> {
    let [_, c, d, h, wd] = xd;
    let plane = d * h * wd;
    let kn = k[0] * k[1] * k[2];
    let mut y = vec![0f32; x.len()];
    if plane == 0 {
        return y;
    }
    y.par_chunks_mut(plane)
        .zip(x.par_chunks(plane))
        .enumerate()
        .for_each(|(row, (yp, xp))| {
            let ch = row % c;
            yp.iter_mut().for_each(|v| *v = b[ch]);
            dw_plane(yp, xp, &w[ch * kn..(ch + 1) * kn], [d, h, wd], k);
        });
    y
}

struct DwConvOp;

impl CustomOp3 for DwConvOp {
    fn name(&self) -> &'static str {
        "convunext-depthwise-conv"
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
        let xd = dims5(l1.dims())?;
        let k = k3(l2.dims());
        let y = dw_forward(f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?, xd, k);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
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
        let rank = w.rank();
        let flip: Vec<usize> = (2..rank).collect();
        // dx = correlation of dy with the spatially flipped kernel (stride 1, odd kernel)
        let mut wf = w.clone();
        for &a in &flip {
            let n = wf.dim(a)?;
            let idx = Tensor::from_vec((0..n as u32).rev().collect::<Vec<_>>(), n, w.device())?;
            wf = wf.index_select(&idx, a)?;
        }
        let zeros = Tensor::zeros(x.dim(1)?, DType::F32, x.device())?;
        let dx = g.apply_op3_no_bwd(&wf.contiguous()?, &zeros, &DwConvOp)?;
        let dw = x.apply_op2_no_bwd(
            &g,
            &DwWeightGradOp {
                wshape: w.dims().to_vec(),
            },
        )?;
        let mut sum_dims: Vec<usize> = vec![0];
        sum_dims.extend(2..g.rank());
        let db = g.sum(sum_dims)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `dw[c, k] = Σ_n Σ_pos dy[n, c, pos] · x[n, c, pos + k - p]`: inputs `(x, dy)`.
struct DwWeightGradOp {
    wshape: Vec<usize>,
}

impl CustomOp2 for DwWeightGradOp {
    fn name(&self) -> &'static str {
        "convunext-depthwise-conv-wgrad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1)?;
        let g = f32s(s2, l2)?;
        let [n, c, d, h, wd] = dims5(l1.dims())?;
        let [kd, kh, kw] = k3(&self.wshape);
        let (pd, ph, pw) = (kd / 2, kh / 2, kw / 2);
        let kn = kd * kh * kw;
        let plane = d * h * wd;
        let mut out = vec![0f32; c * kn];
        out.par_chunks_mut(kn.max(1))
            .enumerate()
            .for_each(|(ch, o)| {
                let mut acc = vec![0f64; kn];
                for ni in 0..n {
                    let base = (ni * c + ch) * plane;
                    let xp = &x[base..base + plane];
                    let gp = &g[base..base + plane];
                    for od in 0..d {
                        for a in 0..kd {
                            let id = od + a;
                            if id < pd || id - pd >= d {
                                continue;
                            }
                            let id = id - pd;
                            for oh in 0..h {
                                let grow = &gp[(od * h + oh) * wd..(od * h + oh + 1) * wd];
                                for bb in 0..kh {
                                    let ih = oh + bb;
                                    if ih < ph || ih - ph >= h {
                                        continue;
                                    }
                                    let ih = ih - ph;
                                    let xrow = &xp[(id * h + ih) * wd..(id * h + ih + 1) * wd];
                                    for cc in 0..kw {
                                        let lo = pw.saturating_sub(cc);
                                        let hi = (wd + pw).saturating_sub(cc).min(wd);
                                        if lo >= hi {
                                            continue;
                                        }
                                        let xs = &xrow[lo + cc - pw..hi + cc - pw];
                                        let s: f32 =
                                            grow[lo..hi].iter().zip(xs).map(|(a, b)| a * b).sum();
                                        acc[(a * kh + bb) * kw + cc] += s as f64;
                                    }
                                }
                            }
                        }
                    }
                }
                for (o, a) in o.iter_mut().zip(acc) {
                    *o = a as f32;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(self.wshape.clone())))
    }
}

// ---------------------------------------------------------------- channels-first LayerNorm

/// ConvNeXt's channels-first LayerNorm (statistics over C at every position), fused on CPU f32.
pub fn layer_norm_cf(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if !fast_ok(x) {
        return ops::layer_norm_cf(x, NormAffine::new(Some(w), b), eps);
    }
    let c = x.dim(1)?;
    let b = match b {
        Some(b) => b.to_dtype(DType::F32)?.contiguous()?,
        None => Tensor::zeros(c, DType::F32, x.device())?,
    };
    x.contiguous()?
        .apply_op3(&w.to_dtype(DType::F32)?.contiguous()?, &b, LnOp { eps })
}

/// Positions per parallel work item.
const CHUNK: usize = 2048;

/// Mean and 1/sqrt(var + eps) over C at every `(n, position)`: two `(N·V)` vectors.
fn ln_stats(x: &[f32], n: usize, c: usize, v: usize, eps: f64) -> (Vec<f32>, Vec<f32>) {
    let mut mean = vec![0f32; n * v];
    let mut rstd = vec![0f32; n * v];
    if v == 0 {
        return (mean, rstd);
    }
    mean.par_chunks_mut(v)
        .zip(rstd.par_chunks_mut(v))
        .enumerate()
        .for_each(|(ni, (m, r))| {
            m.par_chunks_mut(CHUNK)
                .zip(r.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(ci, (m, r))| {
                    let v0 = ci * CHUNK;
                    let len = m.len();
                    let mut s = vec![0f32; len];
                    for ch in 0..c {
                        let xr = &x[(ni * c + ch) * v + v0..(ni * c + ch) * v + v0 + len];
                        for (a, &xv) in s.iter_mut().zip(xr) {
                            *a += xv;
                        }
                    }
                    let inv = 1.0 / c.max(1) as f32;
                    for (mv, sv) in m.iter_mut().zip(&s) {
                        *mv = sv * inv;
                    }
                    let mut q = vec![0f32; len];
                    for ch in 0..c {
                        let xr = &x[(ni * c + ch) * v + v0..(ni * c + ch) * v + v0 + len];
                        for ((a, &xv), &mv) in q.iter_mut().zip(xr).zip(m.iter()) {
                            let dv = xv - mv;
                            *a += dv * dv;
                        }
                    }
                    for (rv, qv) in r.iter_mut().zip(&q) {
                        *rv = 1.0 / ((qv * inv) as f64 + eps).sqrt() as f32;
                    }
                });
        });
    (mean, rstd)
}

struct LnOp {
    eps: f64,
}

impl CustomOp3 for LnOp {
    fn name(&self) -> &'static str {
        "convunext-layer-norm-cf"
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
        let x = f32s(s1, l1)?;
        let w = f32s(s2, l2)?;
        let b = f32s(s3, l3)?;
        let d = l1.dims();
        let (n, c) = (d[0], d[1]);
        let v: usize = d[2..].iter().product();
        let (mean, rstd) = ln_stats(x, n, c, v, self.eps);
        let mut y = vec![0f32; x.len()];
        if v > 0 {
            y.par_chunks_mut(v)
                .zip(x.par_chunks(v))
                .enumerate()
                .for_each(|(row, (yr, xr))| {
                    let (ni, ch) = (row / c, row % c);
                    let m = &mean[ni * v..(ni + 1) * v];
                    let r = &rstd[ni * v..(ni + 1) * v];
                    let (wv, bv) = (w[ch], b[ch]);
                    for (((o, &xv), &mv), &rv) in yr.iter_mut().zip(xr).zip(m).zip(r) {
                        *o = (xv - mv) * rv * wv + bv;
                    }
                });
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
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
        let dx = x.apply_op3_no_bwd(&g, w, &LnDxOp { eps: self.eps })?;
        // (N, C, 2): Σ_v g·x̂, Σ_v g
        let st = x.apply_op2_no_bwd(&g, &LnAffineGradOp { eps: self.eps })?;
        let st = st.sum(0)?;
        let dw = st.narrow(1, 0, 1)?.flatten_all()?;
        let db = st.narrow(1, 1, 1)?.flatten_all()?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `dx = rstd·(gw − mean_c(gw) − x̂·mean_c(gw·x̂))`, `gw = g·w`: inputs `(x, g, w)`.
struct LnDxOp {
    eps: f64,
}

impl CustomOp3 for LnDxOp {
    fn name(&self) -> &'static str {
        "convunext-layer-norm-cf-dx"
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
        let x = f32s(s1, l1)?;
        let g = f32s(s2, l2)?;
        let w = f32s(s3, l3)?;
        let d = l1.dims();
        let (n, c) = (d[0], d[1]);
        let v: usize = d[2..].iter().product();
        let (mean, rstd) = ln_stats(x, n, c, v, self.eps);
        // per-position coefficients a = mean_c(gw), bq = mean_c(gw·x̂)
        let mut a = vec![0f32; n * v];
        let mut bq = vec![0f32; n * v];
        if v > 0 {
            a.par_chunks_mut(v)
                .zip(bq.par_chunks_mut(v))
                .enumerate()
                .for_each(|(ni, (ar, br))| {
                    let m = &mean[ni * v..(ni + 1) * v];
                    let r = &rstd[ni * v..(ni + 1) * v];
                    for (ch, &wv) in w.iter().enumerate().take(c) {
                        let off = (ni * c + ch) * v;
                        let (xr, gr) = (&x[off..off + v], &g[off..off + v]);
                        for i in 0..v {
                            let gw = gr[i] * wv;
                            ar[i] += gw;
                            br[i] += gw * (xr[i] - m[i]) * r[i];
                        }
                    }
                    let inv = 1.0 / c.max(1) as f32;
                    ar.iter_mut().for_each(|t| *t *= inv);
                    br.iter_mut().for_each(|t| *t *= inv);
                });
        }
        let mut dx = vec![0f32; x.len()];
        if v > 0 {
            dx.par_chunks_mut(v).enumerate().for_each(|(row, dr)| {
                let (ni, ch) = (row / c, row % c);
                let off = row * v;
                let wv = w[ch];
                for i in 0..v {
                    let p = ni * v + i;
                    let xh = (x[off + i] - mean[p]) * rstd[p];
                    dr[i] = rstd[p] * (g[off + i] * wv - a[p] - xh * bq[p]);
                }
            });
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Per `(n, c)`: `(Σ_v g·x̂, Σ_v g)` → `(N, C, 2)`: inputs `(x, g)`.
struct LnAffineGradOp {
    eps: f64,
}

impl CustomOp2 for LnAffineGradOp {
    fn name(&self) -> &'static str {
        "convunext-layer-norm-cf-wgrad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1)?;
        let g = f32s(s2, l2)?;
        let d = l1.dims();
        let (n, c) = (d[0], d[1]);
        let v: usize = d[2..].iter().product();
        let (mean, rstd) = ln_stats(x, n, c, v, self.eps);
        let mut out = vec![0f32; n * c * 2];
        out.par_chunks_mut(2).enumerate().for_each(|(row, o)| {
            let ni = row / c;
            let off = row * v;
            let (mut sgx, mut sg) = (0f64, 0f64);
            for i in 0..v {
                let p = ni * v + i;
                let gv = g[off + i] as f64;
                sg += gv;
                sgx += gv * ((x[off + i] - mean[p]) * rstd[p]) as f64;
            }
            o[0] = sgx as f32;
            o[1] = sg as f32;
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, 2))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn depthwise_conv_matches_grouped_conv_with_gradients() {
        let dev = Device::Cpu;
        for (xs, ks) in [
            (vec![2usize, 3, 5, 6], vec![3usize, 1, 5, 3]),
            (vec![2, 3, 4, 5, 6], vec![3, 1, 3, 5, 7]),
            (vec![1, 2, 3, 4, 4], vec![2, 1, 1, 7, 7]),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., xs.clone(), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 1., ks.clone(), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 1., xs[1], &dev).unwrap()).unwrap();
            let r = Tensor::randn(0f32, 1., xs.clone(), &dev).unwrap();
            let fast = depthwise_conv(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap();
            let pad: Vec<usize> = ks[2..].iter().map(|k| k / 2).collect();
            let slow = ops::conv_composite(
                x.as_tensor(),
                w.as_tensor(),
                Some(b.as_tensor()),
                &ConvOpts::new().padding(pad).groups(xs[1]),
            )
            .unwrap();
            assert!(max_diff(&fast, &slow) < 1e-4, "{xs:?} {ks:?}");
            let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                let (a, c) = (
                    gf.get(v.as_tensor()).unwrap(),
                    gs.get(v.as_tensor()).unwrap(),
                );
                assert!(max_diff(a, c) < 1e-3, "{xs:?} {ks:?}: {}", max_diff(a, c));
            }
        }
    }

    #[test]
    fn layer_norm_matches_composite_with_gradients() {
        let dev = Device::Cpu;
        for xs in [vec![2usize, 5, 3, 7], vec![2, 4, 3, 2, 2500]] {
            let c = xs[1];
            let x = Var::from_tensor(
                &(Tensor::randn(0f32, 2., xs.clone(), &dev).unwrap() + 1.0).unwrap(),
            )
            .unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, c, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev).unwrap()).unwrap();
            let r = Tensor::randn(0f32, 1., xs.clone(), &dev).unwrap();
            let fast =
                layer_norm_cf(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), 1e-6).unwrap();
            let slow = ops::layer_norm_cf(
                x.as_tensor(),
                NormAffine::new(Some(w.as_tensor()), Some(b.as_tensor())),
                1e-6,
            )
            .unwrap();
            assert!(max_diff(&fast, &slow) < 1e-4);
            let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                let (a, c) = (
                    gf.get(v.as_tensor()).unwrap(),
                    gs.get(v.as_tensor()).unwrap(),
                );
                // relative to the gradient's size: the weight/bias gradients are sums of up to
                // 30000 unseeded random terms (~170 in size), where f32 summation order alone
                // moves the result by a few 1e-3
                let scale = max_diff(c, &c.zeros_like().unwrap()).max(1.0);
                let rel = max_diff(a, c) / scale;
                assert!(rel < 1e-4, "{xs:?}: {} (scale {scale})", max_diff(a, c));
            }
        }
    }
}
