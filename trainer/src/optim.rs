//! nnU-Net v2's optimizer pieces: SGD with Nesterov momentum (as `torch.optim.SGD`), the poly
//! learning-rate schedule and global-L2-norm gradient clipping (`clip_grad_norm_`).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(
        "optimizer state for parameter `{name}` has shape {got:?}, the parameter has {expected:?}"
    )]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("optimizer state file {path}: {source}")]
    File {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("optimizer state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Hyper-parameters of `torch.optim.SGD` (dampening is always 0, as in nnU-Net).
#[derive(Clone, Debug, PartialEq)]
pub struct SgdOptions {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdOptions {
    /// nnU-Net v2: `SGD(lr=1e-2, momentum=0.99, weight_decay=3e-5, nesterov=True)`.
    fn default() -> Self {
        Self {
            lr: 1e-2,
            momentum: 0.99,
            weight_decay: 3e-5,
            nesterov: true,
        }
    }
}

/// SGD with (Nesterov) momentum and coupled L2 weight decay, step for step like
/// `torch.optim.SGD(..., dampening=0)`:
/// `d = g + wd*p; buf = d (first step) else momentum*buf + d; d = d + momentum*buf (nesterov)
/// else buf; p -= lr*d`.
///
/// Momentum buffers are keyed by parameter name. Parameters without a gradient in a step are
/// left untouched (as torch skips `p.grad is None`). Pass trainable parameters only (no
/// BatchNorm running statistics).
pub struct SgdNesterov {
    vars: Vec<(String, Var)>,
    opts: SgdOptions,
    buffers: HashMap<String, Tensor>,
}

impl SgdNesterov {
    pub fn new(vars: Vec<(String, Var)>, opts: SgdOptions) -> Self {
        Self {
            vars,
            opts,
            buffers: HashMap::new(),
        }
    }

    pub fn options(&self) -> &SgdOptions {
        &self.opts
    }

    pub fn lr(&self) -> f64 {
        self.opts.lr
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.opts.lr = lr;
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Adds parameters (e.g. of a grown network). They start with fresh momentum buffers
    /// unless a loaded state holds a buffer under the same name.
    pub fn add_vars(&mut self, vars: Vec<(String, Var)>) {
        self.vars.extend(vars);
    }

    /// A parameter of a grown network: `new_var` replaces the variable named `name` (it is
    /// added if the optimizer does not know the name). Its shape is the old one with `count`
    /// slices inserted along `axis` at `offset`; the momentum buffer keeps its values for the
    /// old slices and gets zeros for the new ones (no buffer yet: nothing to extend).
    pub fn grow_var(
        &mut self,
        name: &str,
        new_var: Var,
        axis: usize,
        offset: usize,
        count: usize,
    ) -> Result<(), OptimError> {
        if let Some(buf) = self.buffers.get(name) {
            let mut expected = buf.dims().to_vec();
            let ok = axis < expected.len() && offset <= expected[axis];
            if ok {
                expected[axis] += count;
            }
            if !ok || expected != new_var.dims() {
                return Err(OptimError::ShapeMismatch {
                    name: name.to_string(),
                    expected: new_var.dims().to_vec(),
                    got: buf.dims().to_vec(),
                });
            }
            let mut zshape = buf.dims().to_vec();
            zshape[axis] = count;
            let zeros = Tensor::zeros(zshape, buf.dtype(), buf.device())?;
            let len = buf.dim(axis)?;
            let mut parts = Vec::with_capacity(3);
            if offset > 0 {
                parts.push(buf.narrow(axis, 0, offset)?);
            }
            parts.push(zeros);
            if offset < len {
                parts.push(buf.narrow(axis, offset, len - offset)?);
            }
            let grown = Tensor::cat(&parts, axis)?;
            self.buffers.insert(name.to_string(), grown);
        }
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = new_var,
            None => self.vars.push((name.to_string(), new_var)),
        }
        Ok(())
    }

    /// One optimizer step with the gradients in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_scaled(grads, None)
    }

    /// One optimizer step with every gradient first scaled by `scale` (`g.affine(scale, 0)`, as
    /// [`clip_grad_norm`] does; see [`clip_coef`]): bit-identical to clipping and then stepping,
    /// without the pass that writes scaled copies of all gradients.
    pub fn step_scaled(
        &mut self,
        grads: &GradStore,
        scale: Option<f64>,
    ) -> candle_core::Result<()> {
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let old = self.buffers.get(name);
            let buf = match fused_step(var.as_tensor(), g, old, &self.opts, scale)? {
                Some(buf) => buf,
                None => {
                    let g = match scale {
                        Some(c) => &g.affine(c, 0.0)?,
                        None => g,
                    };
                    let (p, buf) = tensor_step(var.as_tensor(), g, old, &self.opts)?;
                    var.set(&p)?;
                    buf
                }
            };
            if self.opts.momentum != 0.0 {
                self.buffers.insert(name.clone(), buf);
            }
        }
        Ok(())
    }

    /// Clips the gradients of this optimizer's parameters (see [`clip_grad_norm`]).
    pub fn clip_grad_norm(&self, grads: &mut GradStore, max_norm: f64) -> candle_core::Result<f64> {
        let vars: Vec<Var> = self.vars.iter().map(|(_, v)| v.clone()).collect();
        clip_grad_norm(&vars, grads, max_norm)
    }

    /// Momentum buffers by parameter name (for checkpoints; save with
    /// `candle_core::safetensors::save`).
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.buffers.clone()
    }

    /// Restores momentum buffers. Buffers whose name matches a parameter must have its shape;
    /// buffers for unknown names are kept (they apply if such a parameter is added later).
    /// Parameters without a buffer start fresh.
    pub fn load_state(&mut self, state: HashMap<String, Tensor>) -> Result<(), OptimError> {
        let mut new = HashMap::with_capacity(state.len());
        for (name, buf) in state {
            let target = self.vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v);
            let buf = match target {
                Some(v) => {
                    if v.dims() != buf.dims() {
                        return Err(OptimError::ShapeMismatch {
                            name,
                            expected: v.dims().to_vec(),
                            got: buf.dims().to_vec(),
                        });
                    }
                    buf.to_device(v.device())?.to_dtype(v.dtype())?
                }
                None => buf,
            };
            new.insert(name, buf);
        }
        self.buffers = new;
        Ok(())
    }

    /// Writes the momentum buffers to a safetensors file atomically (temp file + rename).
    pub fn save_state_file(&self, path: &Path) -> Result<(), OptimError> {
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "optimizer".to_string());
        let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
        candle_core::safetensors::save(&self.buffers, &tmp).map_err(|source| OptimError::File {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, path).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            OptimError::Io {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// Loads momentum buffers written by [`SgdNesterov::save_state_file`].
    pub fn load_state_file(&mut self, path: &Path) -> Result<(), OptimError> {
        let device = self
            .vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let state =
            candle_core::safetensors::load(path, &device).map_err(|source| OptimError::File {
                path: path.to_path_buf(),
                source,
            })?;
        self.load_state(state)
    }
}

/// nnU-Net's `PolyLRScheduler`: `initial_lr * (1 - epoch/max_epochs)^exponent` (nnU-Net uses
/// exponent 0.9, stepped once per epoch with the epoch index).
pub fn poly_lr(initial_lr: f64, epoch: usize, max_epochs: usize, exponent: f64) -> f64 {
    if max_epochs == 0 {
        return initial_lr;
    }
    let frac = (1.0 - epoch as f64 / max_epochs as f64).max(0.0);
    initial_lr * frac.powf(exponent)
}

/// One SGD step of parameter `p` with tensor ops (any device and dtype): the new parameter and
/// the new momentum buffer (`buf` is the old one; ignored without momentum).
fn tensor_step(
    p: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    opts: &SgdOptions,
) -> candle_core::Result<(Tensor, Tensor)> {
    let SgdOptions {
        lr,
        momentum,
        weight_decay,
        nesterov,
    } = *opts;
    let p = p.detach();
    let g = g.detach().to_dtype(p.dtype())?;
    let mut d = if weight_decay != 0.0 {
        (p.affine(weight_decay, 0.0)? + g)?
    } else {
        g
    };
    let mut new_buf = d.clone();
    if momentum != 0.0 {
        new_buf = match buf {
            Some(b) if b.dims() == d.dims() => (b.affine(momentum, 0.0)? + &d)?,
            _ => d.clone(),
        };
        d = if nesterov {
            (d + new_buf.affine(momentum, 0.0)?)?
        } else {
            new_buf.clone()
        };
    }
    Ok(((p - d.affine(lr, 0.0)?)?, new_buf))
}

/// One SGD step of a contiguous CPU f32/f64 parameter in a single pass over `p`, `g` and the
/// momentum buffer (in place on `p`; the new buffer is returned). It evaluates exactly the
/// expressions of [`SgdNesterov::step`]'s tensor path, in the same order and precision, so the
/// results are bit-identical; that path takes about eight full passes with a fresh tensor each.
/// `None` (nothing done) for other devices, dtypes or layouts, and without momentum.
fn fused_step(
    p: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    opts: &SgdOptions,
    scale: Option<f64>,
) -> candle_core::Result<Option<Tensor>> {
    let buf = buf.filter(|b| b.dims() == p.dims());
    let plain =
        |t: &Tensor| t.device().is_cpu() && t.dtype() == p.dtype() && t.layout().is_contiguous();
    if opts.momentum == 0.0
        || !matches!(p.dtype(), DType::F32 | DType::F64)
        || !plain(p)
        || !plain(g)
        || g.dims() != p.dims()
        || !buf.is_none_or(plain)
    {
        return Ok(None);
    }
    let op = SgdStepOp {
        opts: opts.clone(),
        scale,
        has_buf: buf.is_some(),
        new_buf: std::sync::Mutex::new(None),
    };
    p.inplace_op3(g, buf.unwrap_or(g), &op)?;
    let new_buf = op
        .new_buf
        .into_inner()
        .map_err(|_| candle_core::Error::Msg("sgd step: poisoned buffer".into()))?
        .ok_or_else(|| candle_core::Error::Msg("sgd step: no buffer written".into()))?;
    Ok(Some(new_buf.reshape(p.dims())?))
}

/// The in-place op behind [`fused_step`]: `dst` is the parameter, the sources are the gradient
/// and the old momentum buffer (the gradient again when there is none yet).
struct SgdStepOp {
    opts: SgdOptions,
    /// gradient scale (clipping), applied as `affine(scale, 0)` before the step
    scale: Option<f64>,
    has_buf: bool,
    new_buf: std::sync::Mutex<Option<Tensor>>,
}

trait SgdFloat: candle_core::WithDType + Copy + Send + Sync {
    /// Candle's `affine(mul, 0)`: `v * mul + 0` in the tensor's precision.
    fn aff(v: Self, mul: f64) -> Self;
    fn step_one(p: &mut Self, g: Self, b: Option<Self>, o: &SgdOptions) -> Self;
}

macro_rules! sgd_float {
    ($t:ty) => {
        impl SgdFloat for $t {
            #[inline]
            fn aff(v: $t, mul: f64) -> $t {
                v * (mul as $t) + (0.0 as $t)
            }

            #[inline]
            fn step_one(p: &mut $t, g: $t, b: Option<$t>, o: &SgdOptions) -> $t {
                let aff = Self::aff;
                let mut d = if o.weight_decay != 0.0 {
                    aff(*p, o.weight_decay) + g
                } else {
                    g
                };
                let buf = match b {
                    Some(b) => aff(b, o.momentum) + d,
                    None => d,
                };
                d = if o.nesterov {
                    d + aff(buf, o.momentum)
                } else {
                    buf
                };
                *p -= aff(d, o.lr);
                buf
            }
        }
    };
}
sgd_float!(f32);
sgd_float!(f64);

impl SgdStepOp {
    fn run<T: SgdFloat>(&self, p: &mut [T], g: &[T], b: &[T]) -> Vec<T> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        // The new buffer is written once, without zero-filling it first (a full extra pass
        // over every parameter's buffer per step).
        let n = p.len();
        let mut out: Vec<T> = Vec::with_capacity(n);
        p.par_chunks_mut(CHUNK)
            .zip(out.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, (pc, oc))| {
                // zipped slices (no per-element index checks or buffer test), so the loop
                // vectorises: with indexing it was 4.5% of a 2D training step in `perf`
                let (o, len) = (c * CHUNK, pc.len());
                let it = pc.iter_mut().zip(oc.iter_mut()).zip(&g[o..o + len]);
                let sc = |gv: T| self.scale.map_or(gv, |c| T::aff(gv, c));
                if self.has_buf {
                    for (((pv, ov), &gv), &bv) in it.zip(&b[o..o + len]) {
                        ov.write(T::step_one(pv, sc(gv), Some(bv), &self.opts));
                    }
                } else {
                    for ((pv, ov), &gv) in it {
                        ov.write(T::step_one(pv, sc(gv), None, &self.opts));
                    }
                }
            });
        // SAFETY: the chunks above cover all `p.len()` elements and wrote each one.
        unsafe { out.set_len(n) };
        out
    }
}

impl candle_core::InplaceOp3 for SgdStepOp {
    fn name(&self) -> &'static str {
        "sgd-nesterov-step"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as S;
        fn span(l: &candle_core::Layout) -> candle_core::Result<std::ops::Range<usize>> {
            l.contiguous_offsets().map(|(a, b)| a..b).ok_or_else(|| {
                candle_core::Error::Msg("sgd step: operand is not contiguous".into())
            })
        }
        let (rp, rg, rb) = (span(dst_l)?, span(gl)?, span(bl)?);
        let new = match (dst, gs, bs) {
            (S::F32(p), S::F32(g), S::F32(b)) => {
                let v = self.run(&mut p[rp], &g[rg], &b[rb]);
                let n = v.len();
                Tensor::from_vec(v, n, &candle_core::Device::Cpu)?
            }
            (S::F64(p), S::F64(g), S::F64(b)) => {
                let v = self.run(&mut p[rp], &g[rg], &b[rb]);
                let n = v.len();
                Tensor::from_vec(v, n, &candle_core::Device::Cpu)?
            }
            _ => candle_core::bail!("sgd step: unsupported dtype"),
        };
        *self
            .new_buf
            .lock()
            .map_err(|_| candle_core::Error::Msg("sgd step: poisoned buffer".into()))? = Some(new);
        Ok(())
    }
}

/// Sum of squares of a gradient: one parallel pass with f64 accumulation over fixed chunks (so
/// the result does not depend on the thread count) for contiguous CPU f32/f64 tensors, tensor
/// ops otherwise.
fn sum_of_squares(t: &Tensor) -> candle_core::Result<f64> {
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;
    fn par_sum<T: Copy + Sync>(v: &[T], f: impl Fn(T) -> f64 + Sync) -> f64 {
        // 8 interleaved lanes per chunk, so the loop vectorises (a plain `sum` keeps the strict
        // order and stays scalar)
        let lanes = |c: &[T]| {
            let mut acc = [0f64; 8];
            let mut it = c.chunks_exact(8);
            for w in &mut it {
                for (a, &x) in acc.iter_mut().zip(w) {
                    *a += f(x) * f(x);
                }
            }
            acc.iter().sum::<f64>() + it.remainder().iter().map(|&x| f(x) * f(x)).sum::<f64>()
        };
        let parts: Vec<f64> = v.par_chunks(1 << 14).map(lanes).collect();
        parts.iter().sum()
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            match cpu {
                CpuStorage::F32(v) => return Ok(par_sum(&v[a..b], f64::from)),
                CpuStorage::F64(v) => return Ok(par_sum(&v[a..b], |x| x)),
                _ => {}
            }
        }
    }
    t.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` (L2): computes the global norm of all
/// gradients of `vars` present in `grads`, scales them by `min(max_norm/(total + 1e-6), 1)`
/// in place, and returns the total norm (before clipping).
pub fn clip_grad_norm(
    vars: &[Var],
    grads: &mut GradStore,
    max_norm: f64,
) -> candle_core::Result<f64> {
    let (total, coef) = clip_coef(vars, grads, max_norm)?;
    if let Some(coef) = coef {
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), g.affine(coef, 0.0)?);
            }
        }
    }
    Ok(total)
}

/// The global L2 norm of the gradients of `vars` in `grads` and the factor
/// [`clip_grad_norm`] scales them by: `max_norm / (total + 1e-6)` when that is below 1.
pub fn clip_coef(
    vars: &[Var],
    grads: &GradStore,
    max_norm: f64,
) -> candle_core::Result<(f64, Option<f64>)> {
    let mut sum = 0.0;
    let mut any = false;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum += sum_of_squares(g)?;
            any = true;
        }
    }
    if !any {
        return Ok((0.0, None));
    }
    let total = sum.sqrt();
    let coef = max_norm / (total + 1e-6);
    Ok((total, (coef < 1.0).then_some(coef)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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

    fn assert_close(got: &Tensor, want: &Tensor, rel: f64, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let w = flat(want);
        let maxref = w.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (a, b) in flat(got).iter().zip(&w) {
            let tol = rel * b.abs() + 0.1 * rel * maxref;
            assert!((a - b).abs() <= tol, "{what}: got {a}, want {b}");
        }
    }

    /// A fake GradStore holding `g` for `var` (GradStore has no public constructor).
    fn grad_store_for(vars: &[(&Var, &Tensor)]) -> GradStore {
        // sum_i <var_i, g_i> has gradient g_i w.r.t. var_i
        let mut total: Option<Tensor> = None;
        for (v, g) in vars {
            let t = (v.as_tensor() * g.detach()).unwrap().sum_all().unwrap();
            total = Some(match total {
                Some(a) => (a + t).unwrap(),
                None => t,
            });
        }
        total.unwrap().backward().unwrap()
    }

    #[test]
    fn sgd_nesterov_matches_torch_fixture() {
        let fx = fixture("sgd_nesterov");
        for (dt, rel) in [(DType::F64, 1e-5), (DType::F32, 1e-4)] {
            let var = Var::from_tensor(&fx["param_0"].to_dtype(dt).unwrap()).unwrap();
            let mut opt = SgdNesterov::new(vec![("w".into(), var.clone())], SgdOptions::default());
            for t in 1..=3 {
                let g = fx[&format!("grad_{t}")].to_dtype(dt).unwrap();
                let grads = grad_store_for(&[(&var, &g)]);
                opt.step(&grads).unwrap();
                assert_close(
                    var.as_tensor(),
                    &fx[&format!("param_{t}")],
                    rel,
                    &format!("param_{t} {dt:?}"),
                );
                assert_close(
                    &opt.state()["w"],
                    &fx[&format!("momentum_buffer_{t}")],
                    rel,
                    &format!("momentum_buffer_{t} {dt:?}"),
                );
            }
        }
    }

    /// The single-pass CPU step gives bit-identical parameters and buffers to the tensor-op
    /// step, with and without a previous buffer, Nesterov and weight decay, in f32 and f64.
    #[test]
    fn fused_sgd_step_is_bit_identical() {
        let n = 40_000; // more than one parallel chunk
        for dt in [DType::F32, DType::F64] {
            let mk = |seed: u64| {
                Tensor::rand(-1f32, 1f32, n, &Device::Cpu)
                    .unwrap()
                    .affine(1.0 + seed as f64, 0.0)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap()
            };
            let (p, g, b) = (mk(0), mk(1), mk(2));
            for (nesterov, wd, with_buf) in [
                (true, 3e-5, true),
                (true, 3e-5, false),
                (false, 0.0, true),
                (true, 0.0, false),
            ] {
                let opts = SgdOptions {
                    lr: 0.0037,
                    momentum: 0.99,
                    weight_decay: wd,
                    nesterov,
                };
                let buf = with_buf.then_some(&b);
                let (want_p, want_b) = tensor_step(&p, &g, buf, &opts).unwrap();
                let got_p = p.copy().unwrap();
                let got_b = fused_step(&got_p, &g, buf, &opts, None)
                    .unwrap()
                    .expect("fused path");
                let what = format!("{dt:?} nesterov {nesterov} wd {wd} buf {with_buf}");
                assert_eq!(flat(&got_p), flat(&want_p), "{what}: parameter");
                assert_eq!(flat(&got_b), flat(&want_b), "{what}: buffer");
                // a clipping scale folded into the step == clipping the gradient first
                let c = 0.37;
                let (want_p, want_b) =
                    tensor_step(&p, &g.affine(c, 0.0).unwrap(), buf, &opts).unwrap();
                let got_p = p.copy().unwrap();
                let got_b = fused_step(&got_p, &g, buf, &opts, Some(c))
                    .unwrap()
                    .expect("fused path");
                assert_eq!(flat(&got_p), flat(&want_p), "{what}: scaled parameter");
                assert_eq!(flat(&got_b), flat(&want_b), "{what}: scaled buffer");
            }
        }
    }

    #[test]
    fn sgd_state_roundtrip_and_growth() {
        let fx = fixture("sgd_nesterov");
        let p0 = &fx["param_0"];
        // run 1 step, save state to file, continue in a new optimizer: same as 3 uninterrupted steps
        let var = Var::from_tensor(p0).unwrap();
        let mut opt = SgdNesterov::new(vec![("w".into(), var.clone())], SgdOptions::default());
        let g1 = fx["grad_1"].clone();
        opt.step(&grad_store_for(&[(&var, &g1)])).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save_state_file(&path).unwrap();

        let var2 = Var::from_tensor(var.as_tensor()).unwrap();
        let extra = Var::from_tensor(&Tensor::ones(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let mut opt2 = SgdNesterov::new(vec![("w".into(), var2.clone())], SgdOptions::default());
        opt2.load_state_file(&path).unwrap();
        opt2.add_vars(vec![("new".into(), extra.clone())]);
        for t in 2..=3 {
            let g = fx[&format!("grad_{t}")].clone();
            let ge = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
            opt2.step(&grad_store_for(&[(&var2, &g), (&extra, &ge)]))
                .unwrap();
        }
        assert_close(var2.as_tensor(), &fx["param_3"], 1e-4, "resumed param_3");
        assert_close(
            &opt2.state()["w"],
            &fx["momentum_buffer_3"],
            1e-4,
            "resumed buf_3",
        );
        // the new parameter started with a fresh buffer: buf = g + wd*p (step 1), then
        // 0.99*buf + d (step 2)
        assert!(opt2.state().contains_key("new"));
        let e = flat(extra.as_tensor());
        assert!(e.iter().all(|v| *v < 1.0), "{e:?}");

        // a buffer with the wrong shape is rejected with the parameter name
        let mut bad = HashMap::new();
        bad.insert(
            "w".to_string(),
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = opt2.load_state(bad).unwrap_err();
        assert!(err.to_string().contains("`w`"), "{err}");
    }

    #[test]
    fn sgd_skips_params_without_grad() {
        let a = Var::from_tensor(&Tensor::ones(2, DType::F64, &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::ones(2, DType::F64, &Device::Cpu).unwrap()).unwrap();
        let mut opt = SgdNesterov::new(
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            SgdOptions::default(),
        );
        let g = Tensor::new(&[1f64, -1.], &Device::Cpu).unwrap();
        opt.step(&grad_store_for(&[(&a, &g)])).unwrap();
        assert_eq!(flat(b.as_tensor()), vec![1.0, 1.0]);
        // a: d = g + 3e-5; buf = d; d + 0.99 d = 1.99 d; p -= 0.01 * 1.99 d
        let want0 = 1.0 - 0.01 * 1.99 * (1.0 + 3e-5);
        assert!((flat(a.as_tensor())[0] - want0).abs() < 1e-12);
        assert!(!opt.state().contains_key("b"));
    }

    #[test]
    fn poly_lr_matches_fixture() {
        // exact float64 values from index.json (`lr_values`)
        let epochs = [0usize, 1, 2, 3, 10, 100, 250, 500, 750, 900, 998, 999];
        let want = [
            0.01,
            0.009990999549834914,
            0.009981998198678612,
            0.009972995945537971,
            0.009909954834128341,
            0.009095325760829623,
            0.007718895067235705,
            0.005358867312681466,
            0.0028717458874925874,
            0.001258925411794167,
            3.723291133272141e-05,
            1.995262314968881e-05,
        ];
        let fx = fixture("poly_lr");
        let fx_epochs = fx["epoch"].to_vec1::<i64>().unwrap();
        let fx_lr = flat(&fx["lr"]);
        for (i, (&e, &w)) in epochs.iter().zip(&want).enumerate() {
            assert_eq!(fx_epochs[i], e as i64);
            let got = poly_lr(0.01, e, 1000, 0.9);
            assert!((got - w).abs() <= 1e-12 * w, "epoch {e}: {got} vs {w}");
            assert!(
                (got - fx_lr[i]).abs() <= 1e-6 * w,
                "epoch {e}: {got} vs f32 {}",
                fx_lr[i]
            );
        }
    }

    #[test]
    fn clip_grad_norm_matches_fixture() {
        let fx = fixture("clip_grad_norm");
        for (dt, rel) in [(DType::F64, 1e-5), (DType::F32, 1e-4)] {
            let ga = fx["grad_a"].to_dtype(dt).unwrap();
            let gb = fx["grad_b"].to_dtype(dt).unwrap();
            let va = Var::zeros(ga.dims(), dt, &Device::Cpu).unwrap();
            let vb = Var::zeros(gb.dims(), dt, &Device::Cpu).unwrap();
            let mut grads = grad_store_for(&[(&va, &ga), (&vb, &gb)]);
            let total = clip_grad_norm(&[va.clone(), vb.clone()], &mut grads, 12.0).unwrap();
            let want_total = fx["total_norm"]
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(total > 12.0);
            assert!(
                (total - want_total).abs() <= rel * want_total,
                "{total} vs {want_total}"
            );
            assert_close(
                grads.get(va.as_tensor()).unwrap(),
                &fx["grad_a_out"],
                rel,
                "grad_a_out",
            );
            assert_close(
                grads.get(vb.as_tensor()).unwrap(),
                &fx["grad_b_out"],
                rel,
                "grad_b_out",
            );
            // below the threshold nothing changes
            let mut grads = grad_store_for(&[(&va, &ga)]);
            let t = clip_grad_norm(std::slice::from_ref(&va), &mut grads, 1e9).unwrap();
            assert!(t > 0.0);
            assert_eq!(flat(grads.get(va.as_tensor()).unwrap()), flat(&ga));
        }
    }
}
