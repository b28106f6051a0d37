//! N-d convolution and transposed convolution.
//!
//! CPU f32/f64 tensors go through custom ops ([`super::kernels`]) whose backward passes call the
//! same custom ops (input gradient = transposed-conv kernel, weight gradient = filter kernel), so
//! training is fast and double backward works too. With the `cudnn` feature, CUDA f32/f16/bf16
//! tensors run the same custom ops on cuDNN (`cuda_fwd`, see `super::cudnn`; bias via
//! `broadcast_add`). Other devices / dtypes (and CUDA when cuDNN is not built in or failed to
//! initialise) use [`conv_composite`] / [`conv_transpose_composite`], which are built from Candle
//! ops with correct gradients (Candle's `conv2d` is only called with zero padding and exactly
//! tiled inputs, which sidesteps its transposed-conv `output_padding` bug in backward).

#[cfg(feature = "cudnn")]
use super::cudnn::{self, ConvGeom};
use super::kernels::{self, Elem, Geom};
use super::{channel_view, per_axis, spatial_dims};
#[cfg(feature = "cudnn")]
use candle_core::CudaStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// Options of [`conv`]. Every per-axis list may be empty (default), hold one value (broadcast to
/// all spatial axes) or one value per spatial axis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvOpts {
    pub stride: Vec<usize>,
    pub padding: Vec<usize>,
    pub dilation: Vec<usize>,
    pub groups: usize,
}

impl Default for ConvOpts {
    fn default() -> Self {
        Self {
            stride: vec![],
            padding: vec![],
            dilation: vec![],
            groups: 1,
        }
    }
}

impl ConvOpts {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn stride(mut self, s: impl Into<Vec<usize>>) -> Self {
        self.stride = s.into();
        self
    }
    pub fn padding(mut self, p: impl Into<Vec<usize>>) -> Self {
        self.padding = p.into();
        self
    }
    pub fn dilation(mut self, d: impl Into<Vec<usize>>) -> Self {
        self.dilation = d.into();
        self
    }
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
}

/// Options of [`conv_transpose`] (same conventions as [`ConvOpts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvTransposeOpts {
    pub stride: Vec<usize>,
    pub padding: Vec<usize>,
    pub output_padding: Vec<usize>,
    pub dilation: Vec<usize>,
    pub groups: usize,
}

impl Default for ConvTransposeOpts {
    fn default() -> Self {
        Self {
            stride: vec![],
            padding: vec![],
            output_padding: vec![],
            dilation: vec![],
            groups: 1,
        }
    }
}

impl ConvTransposeOpts {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn stride(mut self, s: impl Into<Vec<usize>>) -> Self {
        self.stride = s.into();
        self
    }
    pub fn padding(mut self, p: impl Into<Vec<usize>>) -> Self {
        self.padding = p.into();
        self
    }
    pub fn output_padding(mut self, p: impl Into<Vec<usize>>) -> Self {
        self.output_padding = p.into();
        self
    }
    pub fn dilation(mut self, d: impl Into<Vec<usize>>) -> Self {
        self.dilation = d.into();
        self
    }
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
}

/// Resolved per-axis convolution parameters (`nd` entries each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Spec {
    nd: usize,
    s: Vec<usize>,
    p: Vec<usize>,
    d: Vec<usize>,
    groups: usize,
}

impl Spec {
    fn new(
        nd: usize,
        s: &[usize],
        p: &[usize],
        d: &[usize],
        groups: usize,
        op: &str,
    ) -> Result<Self> {
        let s = per_axis(s, nd, 1, &format!("{op} stride"))?;
        let p = per_axis(p, nd, 0, &format!("{op} padding"))?;
        let d = per_axis(d, nd, 1, &format!("{op} dilation"))?;
        if s.contains(&0) || d.contains(&0) || groups == 0 {
            bail!("{op}: stride, dilation and groups must be >= 1 (stride {s:?}, dilation {d:?}, groups {groups})");
        }
        Ok(Self {
            nd,
            s,
            p,
            d,
            groups,
        })
    }

    fn out_size(&self, inp: &[usize], k: &[usize], op: &str) -> Result<Vec<usize>> {
        (0..self.nd)
            .map(|a| {
                let span = self.d[a] * (k[a].max(1) - 1) + 1;
                let padded = inp[a] + 2 * self.p[a];
                if k[a] == 0 || padded < span {
                    bail!(
                        "{op}: kernel extent {span} (kernel {k:?}, dilation {:?}) exceeds the padded input {padded} on spatial axis {a} (input {inp:?}, padding {:?})",
                        self.d,
                        self.p
                    );
                }
                Ok((padded - span) / self.s[a] + 1)
            })
            .collect()
    }

    /// Kernel geometry normalised to three axes.
    fn geom(
        &self,
        n: usize,
        cin: usize,
        cout: usize,
        inp: &[usize],
        out: &[usize],
        k: &[usize],
    ) -> Geom {
        let pad3 = |v: &[usize], fill: usize| -> [usize; 3] {
            let mut r = [fill; 3];
            r[3 - v.len()..].copy_from_slice(v);
            r
        };
        Geom {
            n,
            cin,
            cout,
            groups: self.groups,
            inp: pad3(inp, 1),
            out: pad3(out, 1),
            k: pad3(k, 1),
            s: pad3(&self.s, 1),
            p: pad3(&self.p, 0),
            d: pad3(&self.d, 1),
        }
    }

    /// Geometry for the cuDNN path (true number of spatial axes).
    #[cfg(feature = "cudnn")]
    fn cudnn_geom(
        &self,
        n: usize,
        cin: usize,
        cout: usize,
        inp: &[usize],
        out: &[usize],
        k: &[usize],
    ) -> ConvGeom {
        ConvGeom {
            n,
            cin,
            cout,
            groups: self.groups,
            inp: inp.to_vec(),
            out: out.to_vec(),
            k: k.to_vec(),
            s: self.s.clone(),
            p: self.p.clone(),
            d: self.d.clone(),
        }
    }
}

fn check_conv_shapes(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, groups: usize) -> Result<()> {
    let (xd, wd) = (x.dims(), w.dims());
    if wd.len() != xd.len() {
        bail!(
            "conv: weight rank {} != input rank {} (input {xd:?}, weight {wd:?})",
            wd.len(),
            xd.len()
        );
    }
    if groups == 0 || xd[1] % groups != 0 || wd[0] % groups != 0 || wd[1] * groups != xd[1] {
        bail!("conv: channels do not match groups={groups}: input {xd:?}, weight {wd:?} (weight must be (C_out, C_in/groups, *k))");
    }
    if let Some(b) = bias {
        if b.dims() != [wd[0]] {
            bail!("conv: bias shape {:?} != ({},)", b.dims(), wd[0]);
        }
    }
    Ok(())
}

/// Which implementation a convolution on `x` runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// custom ops with the CPU kernels (CPU f32/f64)
    Cpu,
    /// the same custom ops on cuDNN (CUDA f32/f16/bf16, feature `cudnn`, cuDNN initialised)
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    Cudnn,
    /// Candle-op composites (everything else)
    Composite,
}

fn path(x: &Tensor) -> Path {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return Path::Cpu;
    }
    #[cfg(feature = "cudnn")]
    if cudnn::usable(x) {
        return Path::Cudnn;
    }
    Path::Composite
}

/// CPU half precision (f16/bf16): no fast kernels here and no bf16 gemm in Candle's CPU
/// `conv2d`, so `f` (a convolution) runs in f32 on half-rounded operands and its result is
/// rounded back — half operands, f32 accumulation, half result, as cuDNN computes it.
fn cpu_half_via_f32(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    f: impl FnOnce(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let half = x.dtype();
    if !(x.device().is_cpu() && matches!(half, DType::F16 | DType::BF16)) {
        return Ok(None);
    }
    let f32 = |t: &Tensor| t.to_dtype(half)?.to_dtype(DType::F32);
    let b = bias.map(f32).transpose()?;
    f(&f32(x)?, &f32(w)?, b.as_ref())?.to_dtype(half).map(Some)
}

/// `y + bias` over the channel axis (the cuDNN path adds bias with Candle ops).
fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(&channel_view(&b.to_dtype(y.dtype())?, y.rank())?),
        None => Ok(y),
    }
}

/// N-d convolution (cross-correlation, PyTorch semantics): `x (N, C_in, *sp)`,
/// `w (C_out, C_in/groups, *k)`, optional `bias (C_out)`. Zero padding, symmetric per axis.
pub fn conv(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, opts: &ConvOpts) -> Result<Tensor> {
    let nd = spatial_dims(x, "conv")?;
    check_conv_shapes(x, w, bias, opts.groups)?;
    let spec = Spec::new(
        nd,
        &opts.stride,
        &opts.padding,
        &opts.dilation,
        opts.groups,
        "conv",
    )?;
    spec.out_size(&x.dims()[2..], &w.dims()[2..], "conv")?;
    if let Some(y) = cpu_half_via_f32(x, w, bias, |x, w, b| conv(x, w, b, opts))? {
        return Ok(y);
    }
    let path = path(x);
    if path == Path::Composite {
        return conv_composite(x, w, bias, opts);
    }
    let x = x.contiguous()?;
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    let op = ConvFwdOp { spec };
    match bias {
        Some(b) if path == Path::Cpu => x.apply_op3(&w, &b.to_dtype(x.dtype())?.contiguous()?, op),
        _ => add_bias(x.apply_op2(&w, op)?, bias),
    }
}

/// Output spatial size of a transposed convolution, validating the options.
fn conv_transpose_out(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    opts: &ConvTransposeOpts,
) -> Result<(Spec, Vec<usize>)> {
    let nd = spatial_dims(x, "conv_transpose")?;
    let (xd, wd) = (x.dims(), w.dims());
    let g = opts.groups;
    if wd.len() != xd.len() || g == 0 || wd[0] != xd[1] || xd[1] % g != 0 {
        bail!("conv_transpose: weight must be (C_in, C_out/groups, *k): input {xd:?}, weight {wd:?}, groups {g}");
    }
    if let Some(b) = bias {
        if b.dims() != [wd[1] * g] {
            bail!(
                "conv_transpose: bias shape {:?} != ({},)",
                b.dims(),
                wd[1] * g
            );
        }
    }
    let spec = Spec::new(
        nd,
        &opts.stride,
        &opts.padding,
        &opts.dilation,
        g,
        "conv_transpose",
    )?;
    let op = per_axis(&opts.output_padding, nd, 0, "conv_transpose output_padding")?;
    let mut out = Vec::with_capacity(nd);
    for a in 0..nd {
        if op[a] >= spec.s[a] {
            bail!(
                "conv_transpose: output_padding {:?} must be smaller than the stride {:?}",
                op,
                spec.s
            );
        }
        let full = (xd[2 + a] - 1) * spec.s[a] + spec.d[a] * (wd[2 + a] - 1) + op[a] + 1;
        if xd[2 + a] == 0 || wd[2 + a] == 0 || full <= 2 * spec.p[a] {
            bail!("conv_transpose: empty output on spatial axis {a} (input {xd:?}, weight {wd:?}, padding {:?})", spec.p);
        }
        out.push(full - 2 * spec.p[a]);
    }
    Ok((spec, out))
}

/// N-d transposed convolution (PyTorch `conv_transposeNd`): `x (N, C_in, *sp)`,
/// `w (C_in, C_out/groups, *k)`, optional `bias (C_out)`. It is the adjoint of [`conv`] with
/// the same stride/padding/dilation/groups; `output_padding` adds rows at the end of each axis.
/// kernel == stride (the U-Net decoder) runs without any im2col copy.
pub fn conv_transpose(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    opts: &ConvTransposeOpts,
) -> Result<Tensor> {
    let (spec, out) = conv_transpose_out(x, w, bias, opts)?;
    if let Some(y) = cpu_half_via_f32(x, w, bias, |x, w, b| conv_transpose(x, w, b, opts))? {
        return Ok(y);
    }
    let path = path(x);
    if path == Path::Composite {
        return conv_transpose_composite(x, w, bias, opts);
    }
    let x = x.contiguous()?;
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    let op = ConvDataOp {
        spec,
        in_spatial: out,
    };
    match bias {
        Some(b) if path == Path::Cpu => x.apply_op3(&w, &b.to_dtype(x.dtype())?.contiguous()?, op),
        _ => add_bias(x.apply_op2(&w, op)?, bias),
    }
}

/// Weight gradient of [`conv`] on its own: `x (N, C_in, *sp)` and the output gradient
/// `dy (N, C_out, *out)` give `dL/dw (C_out, C_in/groups, *kernel)`. On CPU (and on CUDA with
/// cuDNN) this is the op the backward pass uses; elsewhere it runs Candle's autograd through
/// [`conv_composite`].
pub fn conv_weight_grad(
    x: &Tensor,
    dy: &Tensor,
    kernel: &[usize],
    opts: &ConvOpts,
) -> Result<Tensor> {
    let nd = spatial_dims(x, "conv_weight_grad")?;
    let spec = Spec::new(
        nd,
        &opts.stride,
        &opts.padding,
        &opts.dilation,
        opts.groups,
        "conv_weight_grad",
    )?;
    let k = per_axis(kernel, nd, 1, "conv_weight_grad kernel")?;
    let out = spec.out_size(&x.dims()[2..], &k, "conv_weight_grad")?;
    let (n, cin, cout) = (x.dim(0)?, x.dim(1)?, dy.dim(1)?);
    if dy.rank() != x.rank() || dy.dim(0)? != n || dy.dims()[2..] != out[..] {
        bail!(
            "conv_weight_grad: dy {:?} does not match input {:?} (expected spatial {out:?})",
            dy.dims(),
            x.dims()
        );
    }
    if cin % opts.groups != 0 || cout % opts.groups != 0 {
        bail!(
            "conv_weight_grad: channels {cin} -> {cout} not divisible by groups {}",
            opts.groups
        );
    }
    if path(x) != Path::Composite {
        let x = x.contiguous()?;
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        return x.apply_op2(&dy, ConvFilterOp { spec, k });
    }
    let mut wshape = vec![cout, cin / opts.groups];
    wshape.extend(&k);
    let w = candle_core::Var::zeros(wshape, x.dtype(), x.device())?;
    let y = conv_composite(&x.detach(), w.as_tensor(), None, opts)?;
    let grads = (y * dy.detach())?.sum_all()?.backward()?;
    match grads.get(w.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => bail!("conv_weight_grad: no gradient reached the weight"),
    }
}

/// Input gradient of [`conv`] on its own (= a transposed convolution): `dy (N, C_out, *out)`
/// and `w (C_out, C_in/groups, *k)` give `dL/dx (N, C_in, *input_spatial)`.
pub fn conv_input_grad(
    dy: &Tensor,
    w: &Tensor,
    input_spatial: &[usize],
    opts: &ConvOpts,
) -> Result<Tensor> {
    let nd = spatial_dims(dy, "conv_input_grad")?;
    let spec = Spec::new(
        nd,
        &opts.stride,
        &opts.padding,
        &opts.dilation,
        opts.groups,
        "conv_input_grad",
    )?;
    if input_spatial.len() != nd || w.rank() != dy.rank() || w.dim(0)? != dy.dim(1)? {
        bail!(
            "conv_input_grad: dy {:?}, weight {:?} and input size {input_spatial:?} do not fit",
            dy.dims(),
            w.dims()
        );
    }
    let out = spec.out_size(input_spatial, &w.dims()[2..], "conv_input_grad")?;
    if dy.dims()[2..] != out[..] {
        bail!("conv_input_grad: dy {:?} does not match input size {input_spatial:?} (expected spatial {out:?})", dy.dims());
    }
    if path(dy) != Path::Composite {
        let dy = dy.contiguous()?;
        let w = w.to_dtype(dy.dtype())?.contiguous()?;
        return dy.apply_op2(
            &w,
            ConvDataOp {
                spec,
                in_spatial: input_spatial.to_vec(),
            },
        );
    }
    let op: Vec<usize> = (0..nd)
        .map(|a| {
            let full = (out[a] - 1) * spec.s[a] + spec.d[a] * (w.dims()[2 + a] - 1) + 1;
            input_spatial[a] + 2 * spec.p[a] - full
        })
        .collect();
    let o = ConvTransposeOpts {
        stride: spec.s.clone(),
        padding: spec.p.clone(),
        output_padding: op,
        dilation: spec.d.clone(),
        groups: spec.groups,
    };
    conv_transpose_composite(dy, w, None, &o)
}

// ---------------------------------------------------------------------------------------------
// custom ops

fn cpu_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: operand is not contiguous"),
    }
}

/// Per-channel sum of an `(N, C, *spatial)` tensor (the bias gradient). CPU f32 runs in
/// parallel over channels on contiguous slices (Candle's strided reduction was ~10% of a 3D
/// training step); other devices and dtypes use Candle's `sum`.
/// Sum of `v` in 8 interleaved f32 lanes, which vectorises (a plain `iter().sum()` keeps the
/// strict left-to-right order and stays scalar: ~1% of a 2D training step in `perf`).
fn lane_sum(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

fn sum_but_channels(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.rank() >= 2 {
        let t = t.contiguous()?;
        let (n, c) = (t.dims()[0], t.dims()[1]);
        let s: usize = t.dims()[2..].iter().product();
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*storage {
            let o = layout.start_offset();
            let v = &v[o..o + n * c * s];
            let out: Vec<f32> = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let mut acc = 0f64;
                    for b in 0..n {
                        let sl = &v[(b * c + ch) * s..(b * c + ch + 1) * s];
                        // f32 partial sums of short chunks, accumulated in f64
                        for chunk in sl.chunks(256) {
                            acc += f64::from(lane_sum(chunk));
                        }
                    }
                    acc as f32
                })
                .collect();
            return Tensor::from_vec(out, c, t.device());
        }
    }
    let dims: Vec<usize> = (0..t.rank()).filter(|&d| d != 1).collect();
    t.sum(dims)
}

/// Runs `f` on the f32 or f64 slices of the operands.
macro_rules! dispatch_float {
    ($s1:expr, $name:expr, |$t:ident| $body:expr) => {
        match $s1 {
            CpuStorage::F32(_) => {
                type $t = f32;
                let v: Vec<f32> = $body?;
                CpuStorage::F32(v)
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                let v: Vec<f64> = $body?;
                CpuStorage::F64(v)
            }
            other => bail!(
                "{}: unsupported dtype {:?}",
                $name,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}

/// Forward convolution `(x, w[, b]) -> y`.
#[derive(Clone, Debug)]
struct ConvFwdOp {
    spec: Spec,
}

impl ConvFwdOp {
    fn geom(&self, xl: &Layout, wl: &Layout) -> Result<(Geom, Vec<usize>)> {
        let (xd, wd) = (xl.dims(), wl.dims());
        let out = self.spec.out_size(&xd[2..], &wd[2..], "conv")?;
        let g = self
            .spec
            .geom(xd[0], xd[1], wd[0], &xd[2..], &out, &wd[2..]);
        let mut shape = vec![xd[0], wd[0]];
        shape.extend(&out);
        Ok((g, shape))
    }

    fn run<T: Elem + WithDType>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<Vec<T>> {
        let (g, _) = self.geom(l1, l2)?;
        let x = cpu_slice::<T>(s1, l1, "conv")?;
        let w = cpu_slice::<T>(s2, l2, "conv")?;
        let bias = match b {
            Some((s, l)) => Some(cpu_slice::<T>(s, l, "conv")?),
            None => None,
        };
        Ok(kernels::conv_fwd(x, w, bias, &g))
    }

    /// `(dx, dw)`; `dx` is `None` when `x` needs no gradient (the network input).
    fn grads(&self, x: &Tensor, w: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        let needs_dx = x.track_op();
        let (x, w) = (&bwd_operand(x, gy), &bwd_operand(w, gy));
        let gy = gy.contiguous()?;
        let dx = if needs_dx {
            Some(gy.apply_op2(
                w,
                ConvDataOp {
                    spec: self.spec.clone(),
                    in_spatial: x.dims()[2..].to_vec(),
                },
            )?)
        } else {
            None
        };
        let dw = x.apply_op2(
            &gy,
            ConvFilterOp {
                spec: self.spec.clone(),
                k: w.dims()[2..].to_vec(),
            },
        )?;
        Ok((dx, dw))
    }
}

impl CustomOp2 for ConvFwdOp {
    fn name(&self) -> &'static str {
        "nnseg-conv"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, shape) = self.geom(l1, l2)?;
        let st = dispatch_float!(s1, "conv", |T| self.run::<T>(s1, l1, s2, l2, None));
        Ok((st, Shape::from(shape)))
    }
    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, shape) = self.geom(l1, l2)?;
        let (xd, wd) = (l1.dims(), l2.dims());
        let g = self
            .spec
            .cudnn_geom(xd[0], xd[1], wd[0], &xd[2..], &shape[2..], &wd[2..]);
        let st = cudnn::conv_fwd(s1, l1, s2, l2, &g)?;
        Ok((st, Shape::from(shape)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.grads(x, w, gy)?;
        Ok((dx, Some(dw)))
    }
}

impl CustomOp3 for ConvFwdOp {
    fn name(&self) -> &'static str {
        "nnseg-conv-bias"
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
        let (_, shape) = self.geom(l1, l2)?;
        let st = dispatch_float!(s1, "conv", |T| self.run::<T>(
            s1,
            l1,
            s2,
            l2,
            Some((s3, l3))
        ));
        Ok((st, Shape::from(shape)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.grads(x, w, gy)?;
        Ok((dx, Some(dw), Some(sum_but_channels(gy)?)))
    }
}

/// Input gradient of a convolution = transposed convolution: `(dy, w[, b]) -> dx` where `w` is the
/// conv weight `(C_out, C_in/groups, *k)` and `in_spatial` the conv input's spatial size.
#[derive(Clone, Debug)]
struct ConvDataOp {
    spec: Spec,
    in_spatial: Vec<usize>,
}

impl ConvDataOp {
    fn geom(&self, dl: &Layout, wl: &Layout) -> Result<(Geom, Vec<usize>)> {
        let (dd, wd) = (dl.dims(), wl.dims());
        let out = self
            .spec
            .out_size(&self.in_spatial, &wd[2..], "conv_transpose")?;
        if out != dd[2..] {
            bail!(
                "conv_transpose: input spatial size {:?} does not match the conv geometry (expected {out:?})",
                &dd[2..]
            );
        }
        let cin = wd[1] * self.spec.groups;
        let g = self
            .spec
            .geom(dd[0], cin, wd[0], &self.in_spatial, &out, &wd[2..]);
        let mut shape = vec![dd[0], cin];
        shape.extend(&self.in_spatial);
        Ok((g, shape))
    }

    fn run<T: Elem + WithDType>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<Vec<T>> {
        let (g, _) = self.geom(l1, l2)?;
        let dy = cpu_slice::<T>(s1, l1, "conv_transpose")?;
        let w = cpu_slice::<T>(s2, l2, "conv_transpose")?;
        let bias = match b {
            Some((s, l)) => Some(cpu_slice::<T>(s, l, "conv_transpose")?),
            None => None,
        };
        Ok(kernels::conv_bwd_data(dy, w, bias, &g))
    }

    fn grads(&self, dy: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let (dy, w) = (&bwd_operand(dy, g), &bwd_operand(w, g));
        let g = g.contiguous()?;
        let d_dy = g.apply_op2(
            w,
            ConvFwdOp {
                spec: self.spec.clone(),
            },
        )?;
        let dw = g.apply_op2(
            dy,
            ConvFilterOp {
                spec: self.spec.clone(),
                k: w.dims()[2..].to_vec(),
            },
        )?;
        Ok((d_dy, dw))
    }
}

impl CustomOp2 for ConvDataOp {
    fn name(&self) -> &'static str {
        "nnseg-conv-transpose"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, shape) = self.geom(l1, l2)?;
        let st = dispatch_float!(s1, "conv_transpose", |T| self
            .run::<T>(s1, l1, s2, l2, None));
        Ok((st, Shape::from(shape)))
    }
    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, shape) = self.geom(l1, l2)?;
        let (dd, wd) = (l1.dims(), l2.dims());
        let g = self
            .spec
            .cudnn_geom(dd[0], shape[1], wd[0], &shape[2..], &dd[2..], &wd[2..]);
        let st = cudnn::conv_bwd_data(s1, l1, s2, l2, &g)?;
        Ok((st, Shape::from(shape)))
    }
    fn bwd(
        &self,
        dy: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (a, b) = self.grads(dy, w, g)?;
        Ok((Some(a), Some(b)))
    }
}

impl CustomOp3 for ConvDataOp {
    fn name(&self) -> &'static str {
        "nnseg-conv-transpose-bias"
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
        let (_, shape) = self.geom(l1, l2)?;
        let st = dispatch_float!(s1, "conv_transpose", |T| self.run::<T>(
            s1,
            l1,
            s2,
            l2,
            Some((s3, l3))
        ));
        Ok((st, Shape::from(shape)))
    }
    fn bwd(
        &self,
        dy: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b) = self.grads(dy, w, g)?;
        Ok((Some(a), Some(b), Some(sum_but_channels(g)?)))
    }
}

/// A forward-side operand (`x`, weight, ...) of a gradient computed in a custom op's `bwd`.
///
/// Candle's backward pass hands `bwd` a detached upstream gradient (first-order autograd), but
/// the forward-side operands are still tracked, so a gradient computed from them would carry an
/// op graph. A weight's gradient stays in the `GradStore` until the optimizer step, and through
/// that graph it would keep the layer's whole upstream gradient alive: 3.9 GB of pinned buffers
/// at nnU-Net's 48x192x160 3d_fullres plan, where the live peak was 13.7 GB instead of 10.8 GB.
/// Detaching them keeps the gradient a plain value. When the upstream gradient is itself
/// tracked (Candle's second-order mode), everything stays differentiable.
fn bwd_operand(t: &Tensor, upstream: &Tensor) -> Tensor {
    if upstream.track_op() {
        t.clone()
    } else {
        t.detach()
    }
}

/// Weight gradient of a convolution: `(x, dy) -> dw (C_out, C_in/groups, *k)`.
#[derive(Clone, Debug)]
struct ConvFilterOp {
    spec: Spec,
    k: Vec<usize>,
}

impl ConvFilterOp {
    fn geom(&self, xl: &Layout, dl: &Layout) -> Result<(Geom, Vec<usize>)> {
        let (xd, dd) = (xl.dims(), dl.dims());
        let out = self.spec.out_size(&xd[2..], &self.k, "conv weight grad")?;
        if out != dd[2..] || xd[0] != dd[0] {
            bail!(
                "conv weight grad: gradient shape {dd:?} does not match input {xd:?} (expected spatial {out:?})"
            );
        }
        let g = self.spec.geom(xd[0], xd[1], dd[1], &xd[2..], &out, &self.k);
        let mut shape = vec![dd[1], xd[1] / self.spec.groups];
        shape.extend(&self.k);
        Ok((g, shape))
    }
}

impl CustomOp2 for ConvFilterOp {
    fn name(&self) -> &'static str {
        "nnseg-conv-weight-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, shape) = self.geom(l1, l2)?;
        let st = dispatch_float!(s1, "conv weight grad", |T| {
            let x = cpu_slice::<T>(s1, l1, "conv weight grad")?;
            let dy = cpu_slice::<T>(s2, l2, "conv weight grad")?;
            Ok::<_, candle_core::Error>(kernels::conv_bwd_filter(x, dy, &g))
        });
        Ok((st, Shape::from(shape)))
    }
    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, shape) = self.geom(l1, l2)?;
        let (xd, dd) = (l1.dims(), l2.dims());
        let g = self
            .spec
            .cudnn_geom(xd[0], xd[1], dd[1], &xd[2..], &dd[2..], &self.k);
        let st = cudnn::conv_bwd_filter(s1, l1, s2, l2, &g)?;
        Ok((st, Shape::from(shape)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        dy: &Tensor,
        _res: &Tensor,
        gw: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, dy) = (&bwd_operand(x, gw), &bwd_operand(dy, gw));
        let gw = gw.contiguous()?;
        let dx = dy.apply_op2(
            &gw,
            ConvDataOp {
                spec: self.spec.clone(),
                in_spatial: x.dims()[2..].to_vec(),
            },
        )?;
        let ddy = x.apply_op2(
            &gw,
            ConvFwdOp {
                spec: self.spec.clone(),
            },
        )?;
        Ok((Some(dx), Some(ddy)))
    }
}

// ---------------------------------------------------------------------------------------------
// device-agnostic composites (used on CUDA / Metal, and for other dtypes)

/// Indices `start, start + step, ...` (`count` of them) as a u32 tensor.
fn strided_index(start: usize, step: usize, count: usize, t: &Tensor) -> Result<Tensor> {
    let idx: Vec<u32> = (0..count).map(|i| (start + i * step) as u32).collect();
    Tensor::from_vec(idx, count, t.device())
}

/// Inserts `s - 1` zeros between elements along `dim` (length `(L - 1) * s + 1` afterwards).
fn zero_stuff(t: &Tensor, dim: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(t.clone());
    }
    let l = t.dim(dim)?;
    let e = t.unsqueeze(dim + 1)?;
    let mut zshape = e.dims().to_vec();
    zshape[dim + 1] = s - 1;
    let z = Tensor::zeros(zshape, t.dtype(), t.device())?;
    let mut shape = t.dims().to_vec();
    shape[dim] = l * s;
    Tensor::cat(&[&e, &z], dim + 1)?
        .reshape(shape)?
        .narrow(dim, 0, (l - 1) * s + 1)
}

/// Pads (positive) or crops (negative) `dim` by `left` / `right` elements, with zeros.
fn pad_or_crop(t: &Tensor, dim: usize, left: isize, right: isize) -> Result<Tensor> {
    let mut t = t.clone();
    if left < 0 || right < 0 {
        let l = t.dim(dim)? as isize;
        let a = (-left).max(0);
        let b = (-right).max(0);
        t = t.narrow(dim, a as usize, (l - a - b).max(0) as usize)?;
    }
    if left > 0 || right > 0 {
        t = t.pad_with_zeros(dim, left.max(0) as usize, right.max(0) as usize)?;
    }
    Ok(t)
}

/// 2D convolution with zero padding already applied and exactly tiled input, per-axis stride.
fn conv2d_tiled(x: &Tensor, w: &Tensor, s: [usize; 2], groups: usize) -> Result<Tensor> {
    if s[0] == s[1] {
        return x.conv2d(w, 0, s[0], 1, groups);
    }
    let y = x.conv2d(w, 0, 1, 1, groups)?;
    let mut y = y;
    for (a, &st) in s.iter().enumerate() {
        if st > 1 {
            let len = y.dim(2 + a)?;
            let idx = strided_index(0, st, (len - 1) / st + 1, &y)?;
            y = y.index_select(&idx, 2 + a)?;
        }
    }
    Ok(y)
}

/// [`conv`] built from Candle ops only (any device, any float dtype). 3D runs as a sum over the
/// kernel depth of 2D convolutions over all output depth slices at once.
pub fn conv_composite(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    opts: &ConvOpts,
) -> Result<Tensor> {
    let nd = spatial_dims(x, "conv")?;
    check_conv_shapes(x, w, bias, opts.groups)?;
    // mixed precision: the (f32) weight is used in the input's dtype
    let w = &w.to_dtype(x.dtype())?;
    let spec = Spec::new(
        nd,
        &opts.stride,
        &opts.padding,
        &opts.dilation,
        opts.groups,
        "conv",
    )?;
    let k: Vec<usize> = w.dims()[2..].to_vec();
    let out = spec.out_size(&x.dims()[2..], &k, "conv")?;
    // dilate the kernel explicitly, then pad and crop the input to an exact tiling
    let mut wd = w.clone();
    let mut xp = x.clone();
    for a in 0..nd {
        wd = zero_stuff(&wd, 2 + a, spec.d[a])?;
        let ke = spec.d[a] * (k[a] - 1) + 1;
        let need = (out[a] - 1) * spec.s[a] + ke;
        let have = x.dims()[2 + a] + spec.p[a];
        let right = need as isize - have as isize;
        xp = pad_or_crop(&xp, 2 + a, spec.p[a] as isize, right)?;
    }
    let y = match nd {
        1 => {
            let y = conv2d_tiled(
                &xp.unsqueeze(2)?,
                &wd.unsqueeze(2)?,
                [1, spec.s[0]],
                spec.groups,
            )?;
            y.squeeze(2)?
        }
        2 => conv2d_tiled(&xp, &wd, [spec.s[0], spec.s[1]], spec.groups)?,
        _ => {
            let (n, c) = (x.dim(0)?, x.dim(1)?);
            let (hp, wp) = (xp.dim(3)?, xp.dim(4)?);
            let cout = w.dim(0)?;
            let kd = wd.dim(2)?;
            let od = out[0];
            let mut acc: Option<Tensor> = None;
            for t in 0..kd {
                let idx = strided_index(t, spec.s[0], od, &xp)?;
                let sl = xp
                    .index_select(&idx, 2)?
                    .permute((0, 2, 1, 3, 4))?
                    .reshape((n * od, c, hp, wp))?;
                let wt = wd.narrow(2, t, 1)?.squeeze(2)?.contiguous()?;
                let yt = conv2d_tiled(&sl, &wt, [spec.s[1], spec.s[2]], spec.groups)?;
                let (oh, ow) = (yt.dim(2)?, yt.dim(3)?);
                let yt = yt
                    .reshape((n, od, cout, oh, ow))?
                    .permute((0, 2, 1, 3, 4))?;
                acc = Some(match acc {
                    None => yt,
                    Some(a) => (a + yt)?,
                });
            }
            match acc {
                Some(a) => a.contiguous()?,
                None => bail!("conv: empty kernel"),
            }
        }
    };
    add_bias(y, bias)
}

/// [`conv_transpose`] built from Candle ops only (any device). kernel == stride without padding
/// is one matmul plus a reshape/permute; the general case is a stride-1 convolution of the
/// zero-stuffed input with the flipped, channel-swapped kernel.
pub fn conv_transpose_composite(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    opts: &ConvTransposeOpts,
) -> Result<Tensor> {
    let (spec, out) = conv_transpose_out(x, w, bias, opts)?;
    let w = &w.to_dtype(x.dtype())?;
    let nd = spec.nd;
    let k: Vec<usize> = w.dims()[2..].to_vec();
    let op = per_axis(&opts.output_padding, nd, 0, "conv_transpose output_padding")?;
    let (n, cin) = (x.dim(0)?, x.dim(1)?);
    let cout_g = w.dim(1)?;
    let g = spec.groups;
    let y = if g == 1
        && k == spec.s
        && spec.p.iter().all(|&p| p == 0)
        && spec.d.iter().all(|&d| d == 1)
        && op.iter().all(|&o| o == 0)
    {
        // y[n, co, i*k + a] = sum_ci x[n, ci, i] w[ci, co, a]
        let sp: Vec<usize> = x.dims()[2..].to_vec();
        let ktot: usize = k.iter().product();
        let spn: usize = sp.iter().product();
        let mut perm: Vec<usize> = vec![0];
        perm.extend(2..2 + nd);
        perm.push(1);
        let xm = x.permute(perm)?.contiguous()?.reshape((n * spn, cin))?;
        let wm = w.reshape((cin, cout_g * ktot))?;
        let ym = xm.matmul(&wm)?; // (n * spn, cout * ktot)
                                  // dims: n, sp..., cout, k...
        let mut dims = vec![n];
        dims.extend(&sp);
        dims.push(cout_g);
        dims.extend(&k);
        let ym = ym.reshape(dims)?;
        // permute to n, cout, (sp_a, k_a)...
        let mut perm = vec![0, 1 + nd];
        for a in 0..nd {
            perm.push(1 + a);
            perm.push(2 + nd + a);
        }
        let mut shape = vec![n, cout_g];
        shape.extend(&out);
        ym.permute(perm)?.reshape(shape)?
    } else {
        let cin_g = cin / g;
        let mut xs = x.clone();
        for a in 0..nd {
            xs = zero_stuff(&xs, 2 + a, spec.s[a])?;
            let e = (spec.d[a] * (k[a] - 1)) as isize - spec.p[a] as isize;
            xs = pad_or_crop(&xs, 2 + a, e, e + op[a] as isize)?;
        }
        // (C_in, C_out/g, k) -> (C_out, C_in/g, k), flipped
        let mut wshape = vec![g, cin_g, cout_g];
        wshape.extend(&k);
        let mut wt = w.reshape(wshape)?.transpose(1, 2)?;
        let mut wshape = vec![g * cout_g, cin_g];
        wshape.extend(&k);
        wt = wt.contiguous()?.reshape(wshape)?;
        let flip: Vec<usize> = (2..2 + nd).collect();
        wt = wt.flip(&flip)?;
        let o = ConvOpts::new().dilation(spec.d.clone()).groups(g);
        conv_composite(&xs, &wt, None, &o)?
    };
    add_bias(y, bias)
}
