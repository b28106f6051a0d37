//! The growth operations of [`GrowableUNet`].

use super::net::{width_map, ConvLayer, GrowableUNet, Probe};
use super::{GrowOutcome, GrowRequest, Growable, GrowthMethod, LossFn, ParamChange};
use crate::init::he_normal_std;
use crate::network::{ArchError, CandleContext, SegNetwork};
use crate::ops::{self, PadMode};
use crate::unet::options::invalid;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var, D};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

/// How a consumer sees the grown conv's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    Direct,
    Pooled,
    Upsampled,
}

/// A conv reading the grown conv's output: its input channels `offset..offset+width` are the
/// producer's channels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Consumer {
    pub li: usize,
    pub offset: usize,
    pub path: Path,
}

/// New filters for [`GrowableUNet::install`].
struct NewFilters {
    w_in: Tensor,
    bias: Option<Tensor>,
    norm: Option<(Tensor, Tensor)>,
    /// per consumer `(C_next, m, *k2)`
    outgoing: Vec<Tensor>,
    /// per consumer: its weight with modified existing columns (split), else unchanged
    replaced: Vec<Option<Tensor>>,
}

/// Saved state of the layers and variables a growth step touches.
struct Snapshot {
    layers: Vec<(usize, ConvLayer)>,
    vars: Vec<(String, Option<Var>)>,
    widths: Vec<[usize; 2]>,
}

fn randn(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    std: f64,
    like: &Tensor,
) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen::<f64>();
            (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())
}

/// `base` with `new` inserted along `axis` at `at`.
fn insert(base: &Tensor, axis: usize, at: usize, new: &Tensor) -> candle_core::Result<Tensor> {
    let len = base.dim(axis)?;
    let mut parts = vec![];
    if at > 0 {
        parts.push(base.narrow(axis, 0, at)?);
    }
    parts.push(new.clone());
    if at < len {
        parts.push(base.narrow(axis, at, len - at)?);
    }
    Tensor::cat(&parts, axis)
}

/// `base` with slice `at` along `axis` replaced by `new`.
fn replace_slice(
    base: &Tensor,
    axis: usize,
    at: usize,
    new: &Tensor,
) -> candle_core::Result<Tensor> {
    let len = base.dim(axis)?;
    let mut parts = vec![];
    if at > 0 {
        parts.push(base.narrow(axis, 0, at)?);
    }
    parts.push(new.clone());
    if at + 1 < len {
        parts.push(base.narrow(axis, at + 1, len - at - 1)?);
    }
    Tensor::cat(&parts, axis)
}

fn to_vec_f64(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

fn sum_sq(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
}

/// Puts `t` into `varmap` under `name` as a new variable.
fn set_var(varmap: &VarMap, name: &str, t: &Tensor) -> candle_core::Result<Var> {
    let var = Var::from_tensor(&t.detach())?;
    let mut data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
    data.insert(name.to_string(), var.clone());
    Ok(var)
}

/// im2col of `x (N, C, *sp)` for a stride-1 "same" conv: `(N, C·prod(k), *sp)`, channel
/// index `c·K + a` with `a` row-major over the kernel axes (the weight layout).
fn im2col(x: &Tensor, kernel: &[usize]) -> candle_core::Result<Tensor> {
    let pad: Vec<(usize, usize)> = kernel.iter().map(|k| ((k - 1) / 2, (k - 1) / 2)).collect();
    let xp = ops::pad(x, &pad, PadMode::Zeros)?;
    let sp = x.dims()[2..].to_vec();
    let ktot: usize = kernel.iter().product();
    let mut shifts = Vec::with_capacity(ktot);
    for a in 0..ktot {
        let mut rem = a;
        let mut idx = vec![0usize; kernel.len()];
        for d in (0..kernel.len()).rev() {
            idx[d] = rem % kernel[d];
            rem /= kernel[d];
        }
        let mut t = xp.clone();
        for d in 0..kernel.len() {
            t = t.narrow(2 + d, idx[d], sp[d])?;
        }
        shifts.push(t);
    }
    let st = Tensor::stack(&shifts, 2)?; // (N, C, K, *sp)
    let mut shape = vec![x.dim(0)?, x.dim(1)? * ktot];
    shape.extend(&sp);
    st.reshape(shape)
}

/// Top-`m` right singular vectors (columns of the returned `(C, m)` tensor) and singular
/// values of `a (R, C)`, by subspace iteration.
fn top_right_singular(
    a: &Tensor,
    m: usize,
    rng: &mut ChaCha8Rng,
) -> candle_core::Result<(Tensor, Vec<f64>)> {
    let a = a.to_dtype(DType::F64)?;
    let c = a.dim(1)?;
    let m = m.min(c).max(1);
    let mut v = randn(rng, &[c, m], 1.0, &a)?;
    let at = a.t()?.contiguous()?;
    let orth = |v: &Tensor| -> candle_core::Result<Tensor> {
        // Gram-Schmidt on the columns
        let mut cols: Vec<Vec<f64>> = (0..m)
            .map(|j| v.narrow(1, j, 1).and_then(|t| to_vec_f64(&t)))
            .collect::<candle_core::Result<_>>()?;
        for j in 0..m {
            for i in 0..j {
                let d: f64 = cols[j].iter().zip(&cols[i]).map(|(x, y)| x * y).sum();
                let ci = cols[i].clone();
                for (x, y) in cols[j].iter_mut().zip(ci) {
                    *x -= d * y;
                }
            }
            let nrm = cols[j].iter().map(|x| x * x).sum::<f64>().sqrt();
            if nrm > 0.0 {
                cols[j].iter_mut().for_each(|x| *x /= nrm);
            }
        }
        let mut flat = vec![0f64; c * m];
        for (j, col) in cols.iter().enumerate() {
            for (i, x) in col.iter().enumerate() {
                flat[i * m + j] = *x;
            }
        }
        Tensor::from_vec(flat, (c, m), v.device())
    };
    v = orth(&v)?;
    for _ in 0..60 {
        let u = a.matmul(&v)?;
        v = orth(&at.matmul(&u)?)?;
    }
    let av = a.matmul(&v)?;
    let mut sig = vec![];
    for j in 0..m {
        sig.push(sum_sq(&av.narrow(1, j, 1)?)?.sqrt());
    }
    Ok((v, sig))
}

impl GrowableUNet {
    fn layer_index(&self, name: &str) -> Result<usize, ArchError> {
        let err = || {
            invalid(
                "growth layer",
                format!(
                    "unknown growable layer `{name}`; known: {}",
                    self.growable_layers().join(", ")
                ),
            )
        };
        let (block, conv) = name.rsplit_once('.').ok_or_else(err)?;
        let b = self.cfg.block_index(block).ok_or_else(err)?;
        match conv {
            "conv1" => Ok(2 * b),
            "conv2" => Ok(2 * b + 1),
            _ => Err(err()),
        }
    }

    /// Every conv that reads the output of layer `li` (a block conv).
    pub(crate) fn consumers(&self, li: usize) -> Vec<Consumer> {
        let n = self.cfg.n_stages();
        let (b, k) = (li / 2, li % 2);
        if k == 0 {
            return vec![Consumer {
                li: li + 1,
                offset: 0,
                path: Path::Direct,
            }];
        }
        if b + 1 < n {
            // down_b.conv2: the next encoder block (after the pool) and the decoder skip
            let j = n - 2 - b;
            let up_block = n + j;
            let c_up = self.cfg.widths[up_block - 1][1];
            vec![
                Consumer {
                    li: 2 * (b + 1),
                    offset: 0,
                    path: Path::Pooled,
                },
                Consumer {
                    li: 2 * up_block,
                    offset: c_up,
                    path: Path::Direct,
                },
            ]
        } else if b + 1 == self.cfg.n_blocks() {
            vec![Consumer {
                li: self.head_index(),
                offset: 0,
                path: Path::Direct,
            }]
        } else {
            // bottleneck / up_j conv2: the next decoder block (after upsampling), DS head
            let mut v = vec![Consumer {
                li: 2 * (b + 1),
                offset: 0,
                path: Path::Upsampled,
            }];
            if let Some(li) = b.checked_sub(n).and_then(|j| self.ds_head_index(j)) {
                v.push(Consumer {
                    li,
                    offset: 0,
                    path: Path::Direct,
                });
            }
            v
        }
    }

    fn param_names(l: &ConvLayer) -> Vec<String> {
        let mut v = vec![format!("{}.weight", l.conv_name)];
        if l.bias.is_some() {
            v.push(format!("{}.bias", l.conv_name));
        }
        if let Some(nn) = &l.norm_name {
            v.push(format!("{nn}.weight"));
            v.push(format!("{nn}.bias"));
        }
        v
    }

    fn snapshot(&self, li: usize, varmap: &VarMap) -> Result<Snapshot, ArchError> {
        let mut idx = vec![li];
        idx.extend(self.consumers(li).iter().map(|c| c.li));
        let data = varmap
            .data()
            .lock()
            .map_err(|_| invalid("varmap", "VarMap lock poisoned"))?;
        let mut vars = vec![];
        for &i in &idx {
            for n in Self::param_names(&self.layers[i]) {
                let v = data.get(&n).cloned();
                vars.push((n, v));
            }
        }
        Ok(Snapshot {
            layers: idx.iter().map(|&i| (i, self.layers[i].clone())).collect(),
            vars,
            widths: self.cfg.widths.clone(),
        })
    }

    fn restore(&mut self, s: Snapshot, varmap: &VarMap) -> Result<(), ArchError> {
        for (i, l) in s.layers {
            self.layers[i] = l;
        }
        self.cfg.widths = s.widths;
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| invalid("varmap", "VarMap lock poisoned"))?;
        for (n, v) in s.vars {
            match v {
                Some(v) => {
                    data.insert(n, v);
                }
                None => {
                    data.remove(&n);
                }
            }
        }
        Ok(())
    }

    /// Appends `m` filters to layer `li` and the matching input slices to its consumers.
    fn install(
        &mut self,
        varmap: &VarMap,
        li: usize,
        nf: NewFilters,
    ) -> candle_core::Result<Vec<ParamChange>> {
        let cons = self.consumers(li);
        let old = self.layers[li].out_ch();
        let m = nf.w_in.dim(0)?;
        let mut changes = vec![];
        let mut change = |name: String,
                          old_t: &Tensor,
                          new_t: Tensor,
                          axis: usize,
                          offset: usize|
         -> candle_core::Result<Tensor> {
            let var = set_var(varmap, &name, &new_t)?;
            changes.push(ParamChange {
                name,
                old_shape: old_t.dims().to_vec(),
                new_shape: new_t.dims().to_vec(),
                axis,
                offset,
                count: m,
                var: var.clone(),
            });
            Ok(var.as_tensor().clone())
        };
        let l = self.layers[li].clone();
        let w = Tensor::cat(&[&l.weight, &nf.w_in.to_dtype(l.weight.dtype())?], 0)?;
        self.layers[li].weight = change(format!("{}.weight", l.conv_name), &l.weight, w, 0, old)?;
        if let (Some(b), Some(nb)) = (&l.bias, &nf.bias) {
            let t = Tensor::cat(&[b, nb], 0)?;
            self.layers[li].bias = Some(change(format!("{}.bias", l.conv_name), b, t, 0, old)?);
        }
        if let (Some(nn), Some(nw), Some(nbias), Some((aw, ab))) =
            (&l.norm_name, &l.norm_w, &l.norm_b, &nf.norm)
        {
            let t = Tensor::cat(&[nw, aw], 0)?;
            self.layers[li].norm_w = Some(change(format!("{nn}.weight"), nw, t, 0, old)?);
            let t = Tensor::cat(&[nbias, ab], 0)?;
            self.layers[li].norm_b = Some(change(format!("{nn}.bias"), nbias, t, 0, old)?);
        }
        for (ci, c) in cons.iter().enumerate() {
            let cl = self.layers[c.li].clone();
            let base = nf.replaced[ci].clone().unwrap_or_else(|| cl.weight.clone());
            let at = c.offset + old;
            let t = insert(&base, 1, at, &nf.outgoing[ci].to_dtype(base.dtype())?)?;
            self.layers[c.li].weight =
                change(format!("{}.weight", cl.conv_name), &cl.weight, t, 1, at)?;
        }
        let (b, k) = (li / 2, li % 2);
        self.cfg.widths[b][k] += m;
        Ok(changes)
    }

    fn eval_loss(&self, loss: &mut LossFn<'_>) -> candle_core::Result<GradStore> {
        let l = loss(self as &dyn SegNetwork)?;
        l.backward()
    }

    fn zero_outgoing(&self, li: usize, m: usize) -> candle_core::Result<Vec<Tensor>> {
        self.consumers(li)
            .iter()
            .map(|c| {
                let w = &self.layers[c.li].weight;
                let mut shape = w.dims().to_vec();
                shape[1] = m;
                Tensor::zeros(shape, w.dtype(), w.device())
            })
            .collect()
    }

    fn new_norm(&self, li: usize, m: usize) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let l = &self.layers[li];
        match &l.norm_w {
            Some(w) => Ok(Some((
                Tensor::ones(m, w.dtype(), w.device())?,
                Tensor::zeros(m, w.dtype(), w.device())?,
            ))),
            None => Ok(None),
        }
    }

    fn new_bias(&self, li: usize, m: usize) -> candle_core::Result<Option<Tensor>> {
        self.layers[li]
            .bias
            .as_ref()
            .map(|b| Tensor::zeros(m, b.dtype(), b.device()))
            .transpose()
    }

    fn grow_split(
        &mut self,
        varmap: &VarMap,
        li: usize,
        m: usize,
        (noise, incoming_noise): (f64, f64),
        rng: &mut ChaCha8Rng,
        loss: &mut LossFn<'_>,
    ) -> candle_core::Result<(Vec<ParamChange>, Vec<usize>)> {
        let grads = self.eval_loss(loss)?;
        let w = self.layers[li].weight.clone();
        let g = grads.get(&w).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "split: no gradient reached {} (is it used by the loss?)",
                self.layers[li].conv_name
            ))
        })?;
        let norms = to_vec_f64(&g.flatten_from(1)?.sqr()?.sum(D::Minus1)?)?;
        let mut order: Vec<usize> = (0..norms.len()).collect();
        order.sort_by(|a, b| norms[*b].total_cmp(&norms[*a]));
        let chosen: Vec<usize> = order.into_iter().take(m).collect();
        let mut changes = vec![];
        for &i in &chosen {
            let l = self.layers[li].clone();
            let mut w_in = l.weight.narrow(0, i, 1)?;
            if incoming_noise > 0.0 {
                w_in = (w_in.clone() + randn(rng, w_in.dims(), incoming_noise, &w_in)?)?;
            }
            let bias = l.bias.as_ref().map(|b| b.narrow(0, i, 1)).transpose()?;
            let norm = match (&l.norm_w, &l.norm_b) {
                (Some(a), Some(b)) => Some((a.narrow(0, i, 1)?, b.narrow(0, i, 1)?)),
                _ => None,
            };
            let mut outgoing = vec![];
            let mut replaced = vec![];
            for c in self.consumers(li) {
                let wc = &self.layers[c.li].weight;
                let at = c.offset + i;
                let col = wc.narrow(1, at, 1)?;
                let delta = randn(rng, col.dims(), noise, &col)?;
                let keep = (&col * (delta.affine(1.0, 0.5))?)?;
                let copy = (&col * (delta.affine(-1.0, 0.5))?)?;
                replaced.push(Some(replace_slice(wc, 1, at, &keep)?));
                outgoing.push(copy);
            }
            let nf = NewFilters {
                w_in,
                bias,
                norm,
                outgoing,
                replaced,
            };
            changes.extend(self.install(varmap, li, nf)?);
        }
        Ok((merge_changes(changes), chosen))
    }

    #[allow(clippy::type_complexity)]
    fn grow_sample_select(
        &mut self,
        varmap: &VarMap,
        li: usize,
        m: usize,
        n_candidates: usize,
        rng: &mut ChaCha8Rng,
        loss: &mut LossFn<'_>,
    ) -> Result<(Vec<ParamChange>, Vec<Vec<f64>>, Vec<usize>), ArchError> {
        let name = self.layers[li].conv_name.clone();
        let ctx = || format!("sample_select on {name}");
        let mut changes = vec![];
        let mut all_scores = vec![];
        let mut chosen = vec![];
        for _ in 0..m {
            let w = self.layers[li].weight.clone();
            let mut shape = w.dims().to_vec();
            shape[0] = 1;
            let std = he_normal_std(&shape, 1e-2);
            let cands: Vec<Tensor> = (0..n_candidates)
                .map(|_| randn(rng, &shape, std, &w))
                .collect::<candle_core::Result<_>>()
                .ctx(ctx)?;
            let old = self.layers[li].out_ch();
            let mut scores = vec![];
            for cand in &cands {
                let snap = self.snapshot(li, varmap)?;
                let nf = NewFilters {
                    w_in: cand.clone(),
                    bias: self.new_bias(li, 1).ctx(ctx)?,
                    norm: self.new_norm(li, 1).ctx(ctx)?,
                    outgoing: self.zero_outgoing(li, 1).ctx(ctx)?,
                    replaced: vec![None; self.consumers(li).len()],
                };
                let score = (|| -> candle_core::Result<f64> {
                    self.install(varmap, li, nf)?;
                    let grads = self.eval_loss(loss)?;
                    let mut s = 0.0;
                    for c in self.consumers(li) {
                        let wc = &self.layers[c.li].weight;
                        if let Some(g) = grads.get(wc) {
                            s += sum_sq(&g.narrow(1, c.offset + old, 1)?)?;
                        }
                    }
                    Ok(s.sqrt())
                })();
                self.restore(snap, varmap)?;
                scores.push(score.ctx(ctx)?);
            }
            let best = scores
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap_or(0);
            let nf = NewFilters {
                w_in: cands[best].clone(),
                bias: self.new_bias(li, 1).ctx(ctx)?,
                norm: self.new_norm(li, 1).ctx(ctx)?,
                outgoing: self.zero_outgoing(li, 1).ctx(ctx)?,
                replaced: vec![None; self.consumers(li).len()],
            };
            changes.extend(self.install(varmap, li, nf).ctx(ctx)?);
            all_scores.push(scores);
            chosen.push(best);
        }
        Ok((merge_changes(changes), all_scores, chosen))
    }

    fn grow_gradmax(
        &mut self,
        varmap: &VarMap,
        li: usize,
        m: usize,
        scale: f64,
        rng: &mut ChaCha8Rng,
        loss: &mut LossFn<'_>,
    ) -> Result<(Vec<ParamChange>, Vec<f64>), ArchError> {
        let name = self.layers[li].conv_name.clone();
        let ctx = || format!("gradmax on {name}");
        let cons = self.consumers(li);
        let linear: Vec<Consumer> = cons
            .iter()
            .copied()
            .filter(|c| c.path != Path::Pooled)
            .collect();
        {
            let mut p = self
                .probe
                .lock()
                .map_err(|_| invalid("probe", "lock poisoned"))?;
            *p = Some(Probe {
                record_input: Some(li),
                zero_add: linear.iter().map(|c| c.li).collect(),
                ..Probe::default()
            });
        }
        let grads = self.eval_loss(loss);
        let probe = self
            .probe
            .lock()
            .map_err(|_| invalid("probe", "lock poisoned"))?
            .take();
        let grads = grads.ctx(ctx)?;
        let probe = probe.ok_or_else(|| invalid("probe", "probe vanished"))?;
        let x = probe
            .recorded
            .ok_or_else(|| invalid(&name, "gradmax: the loss did not run the grown layer"))?;
        let (v, sig) = (|| -> candle_core::Result<(Vec<Tensor>, Vec<f64>)> {
            let l = &self.layers[li];
            let mut z = im2col(&x, &l.kernel)?;
            if self.cfg.unet.block.norm.is_some() {
                // InstanceNorm's Jacobian at a constant channel centres over space
                let (nb, c) = (z.dim(0)?, z.dim(1)?);
                let flat = z.reshape((nb, c, ()))?;
                let mean = flat.mean_keepdim(2)?;
                z = flat.broadcast_sub(&mean)?.reshape(z.dims())?;
            }
            let mut blocks = vec![];
            let mut dims = vec![];
            for c in &linear {
                let var = probe.zero_vars.get(&c.li).ok_or_else(|| {
                    candle_core::Error::Msg("gradmax: consumer was not run".into())
                })?;
                let g = match grads.get(var.as_tensor()) {
                    Some(g) => g.clone(),
                    None => var.as_tensor().zeros_like()?,
                };
                let zc = if c.path == Path::Upsampled {
                    GrowableUNet::upsample(&z, &g.dims()[2..])?
                } else {
                    z.clone()
                };
                let cl = &self.layers[c.li];
                let a = ops::conv_weight_grad(&zc, &g, &cl.kernel, &cl.opts())?;
                // (C_next, R, *k2) -> (R, C_next * K2)
                let (cn, r) = (a.dim(0)?, a.dim(1)?);
                let k2: usize = cl.kernel.iter().product();
                let a = a
                    .reshape((cn, r, k2))?
                    .transpose(0, 1)?
                    .reshape((r, cn * k2))?;
                dims.push((cn, k2));
                blocks.push(a);
            }
            let a = Tensor::cat(&blocks, 1)?;
            let (vecs, sig) = top_right_singular(&a, m, rng)?;
            // target norm: mean norm of the existing outgoing columns (all consumers)
            let old = self.layers[li].out_ch();
            let mut col_sq = vec![0f64; old];
            for c in &cons {
                let wc = &self.layers[c.li].weight;
                let cols = wc
                    .narrow(1, c.offset, old)?
                    .transpose(0, 1)?
                    .flatten_from(1)?;
                for (i, s) in to_vec_f64(&cols.sqr()?.sum(1)?)?.iter().enumerate() {
                    col_sq[i] += s;
                }
            }
            let target = scale * col_sq.iter().map(|s| s.sqrt()).sum::<f64>() / old.max(1) as f64;
            let vecs = (vecs * target)?; // unit columns -> target norm
            let mut out = vec![];
            let mut start = 0;
            let mut li_iter = linear.iter().zip(dims);
            for c in &cons {
                let w = &self.layers[c.li].weight;
                let mut shape = w.dims().to_vec();
                shape[1] = m;
                if c.path == Path::Pooled {
                    out.push(Tensor::zeros(shape, w.dtype(), w.device())?);
                    continue;
                }
                let Some((_, (cn, k2))) = li_iter.next() else {
                    candle_core::bail!("gradmax: consumer bookkeeping");
                };
                let part = vecs.narrow(0, start, cn * k2)?; // (cn*k2, m)
                start += cn * k2;
                let mm = part.dim(1)?;
                let mut t = part.reshape((cn, k2, mm))?.transpose(1, 2)?.contiguous()?;
                if mm < m {
                    let pad = Tensor::zeros((cn, m - mm, k2), t.dtype(), t.device())?;
                    t = Tensor::cat(&[&t, &pad], 1)?;
                }
                out.push(t.reshape(shape)?.to_dtype(w.dtype())?);
            }
            Ok((out, sig))
        })()
        .ctx(ctx)?;
        let w = &self.layers[li].weight;
        let mut shape = w.dims().to_vec();
        shape[0] = m;
        let nf = NewFilters {
            w_in: Tensor::zeros(shape, w.dtype(), w.device()).ctx(ctx)?,
            bias: self.new_bias(li, m).ctx(ctx)?,
            norm: self.new_norm(li, m).ctx(ctx)?,
            outgoing: v,
            replaced: vec![None; cons.len()],
        };
        let changes = self.install(varmap, li, nf).ctx(ctx)?;
        Ok((changes, sig))
    }
}

/// Several single-filter installs on the same parameters → one change per parameter (the
/// final variable, the first insertion offset, the total count; slices are contiguous
/// because every install appends right after the previous one).
fn merge_changes(changes: Vec<ParamChange>) -> Vec<ParamChange> {
    let mut out: Vec<ParamChange> = vec![];
    for c in changes {
        match out.iter_mut().find(|o| o.name == c.name) {
            Some(o) => {
                o.count += c.count;
                o.new_shape = c.new_shape;
                o.var = c.var;
            }
            None => out.push(c),
        }
    }
    out
}

impl Growable for GrowableUNet {
    fn growable_layers(&self) -> Vec<String> {
        (0..self.cfg.n_blocks())
            .flat_map(|b| {
                let n = self.cfg.block_name(b);
                [format!("{n}.conv1"), format!("{n}.conv2")]
            })
            .collect()
    }

    fn resolve_layer(&self, name: &str) -> Result<Vec<String>, ArchError> {
        if self.cfg.block_index(name).is_some() {
            return Ok(vec![format!("{name}.conv1"), format!("{name}.conv2")]);
        }
        self.layer_index(name)?;
        Ok(vec![name.to_string()])
    }

    fn widths(&self) -> Vec<(String, usize)> {
        let m = width_map(&self.cfg);
        self.growable_layers()
            .into_iter()
            .map(|n| {
                let w = m.get(&n).copied().unwrap_or(0);
                (n, w)
            })
            .collect()
    }

    fn grow(
        &mut self,
        req: &GrowRequest,
        varmap: &VarMap,
        loss: &mut LossFn<'_>,
    ) -> Result<GrowOutcome, ArchError> {
        let li = self.layer_index(&req.layer)?;
        if req.n_new == 0 {
            return Err(invalid("n_new_per_growth", "must be at least 1"));
        }
        let old_width = self.layers[li].out_ch();
        let mut rng = ChaCha8Rng::seed_from_u64(req.seed ^ (li as u64).wrapping_mul(0x9e37));
        let mut out = GrowOutcome {
            layer: req.layer.clone(),
            method: req.method.name().into(),
            old_width,
            new_width: old_width,
            changes: vec![],
            scores: vec![],
            chosen: vec![],
            singular_values: vec![],
        };
        match req.method {
            GrowthMethod::Split {
                noise,
                incoming_noise,
            } => {
                let m = req.n_new.min(old_width);
                let (c, chosen) = self
                    .grow_split(varmap, li, m, (noise, incoming_noise), &mut rng, loss)
                    .ctx(|| format!("split on {}", req.layer))?;
                out.changes = c;
                out.chosen = chosen;
            }
            GrowthMethod::SampleSelect { n_candidates } => {
                let (c, s, ch) = self.grow_sample_select(
                    varmap,
                    li,
                    req.n_new,
                    n_candidates.max(1),
                    &mut rng,
                    loss,
                )?;
                out.changes = c;
                out.scores = s;
                out.chosen = ch;
            }
            GrowthMethod::GradMax { scale } => {
                let (c, s) = self.grow_gradmax(varmap, li, req.n_new, scale, &mut rng, loss)?;
                out.changes = c;
                out.singular_values = s;
            }
        }
        out.new_width = self.layers[li].out_ch();
        Ok(out)
    }

    fn grown_kwargs(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(
            super::net::GROWN_WIDTHS_KEY.to_string(),
            self.cfg.widths_json(),
        );
        m
    }
}
