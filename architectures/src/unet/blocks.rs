//! Building blocks of dynamic-network-architectures' U-Nets, one struct per PyTorch module, with
//! the same state_dict names (`conv.weight`, `norm.weight`, `convs.0...`, `conv1`, `skip.1`).
//!
//! Every block is built with `new(cfg, vb)`; weights are requested from `vb` with nnU-Net's
//! initialisation as the init hint (He normal with a = 1e-2 for conv / transposed-conv weights,
//! zero biases, norm weight 1 and bias 0).

use super::options::{ConvBlockOptions, ConvDim, DropoutOptions, Nonlin, NormKind, NormOptions};
use crate::init::he_normal_std;
use crate::network::LayerRow;
use crate::ops::{self, ConvOpts, ConvTransposeOpts, NormAffine, PoolOpts};
use candle_core::{Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use std::sync::Mutex;

/// nnU-Net's `InitWeights_He(1e-2)` slope.
pub const HE_NEG_SLOPE: f64 = 1e-2;

fn he_init(shape: &[usize]) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: he_normal_std(shape, HE_NEG_SLOPE),
    }
}

fn numel(t: &Tensor) -> u64 {
    t.elem_count() as u64
}

fn fmt_axes(v: &[usize]) -> String {
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", s.join(","))
}

fn conv_name(dim: usize) -> &'static str {
    if dim == 2 {
        "Conv2d"
    } else {
        "Conv3d"
    }
}

/// Output size of a conv along each axis: `(n + 2p - k) / s + 1`.
pub fn conv_out_size(
    input: &[usize],
    kernel: &[usize],
    stride: &[usize],
    padding: &[usize],
) -> Vec<usize> {
    input
        .iter()
        .enumerate()
        .map(|(a, &n)| ((n + 2 * padding[a]).saturating_sub(kernel[a])) / stride[a].max(1) + 1)
        .collect()
}

/// A bare convolution (`nn.ConvNd`): `weight (C_out, C_in, *k)`, optional `bias (C_out)`,
/// "same" padding `(k-1)/2`.
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    kernel: Vec<usize>,
    stride: Vec<usize>,
    padding: Vec<usize>,
    opts: ConvOpts,
}

/// Geometry of one convolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: Vec<usize>,
    pub stride: Vec<usize>,
}

impl ConvSpec {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: &[usize],
        stride: &[usize],
    ) -> Self {
        ConvSpec {
            in_channels,
            out_channels,
            kernel: kernel.to_vec(),
            stride: stride.to_vec(),
        }
    }
}

impl Conv {
    pub fn new(spec: &ConvSpec, bias: bool, vb: VarBuilder) -> Result<Self> {
        let mut shape = vec![spec.out_channels, spec.in_channels];
        shape.extend(&spec.kernel);
        let weight = vb.get_with_hints(shape.clone(), "weight", he_init(&shape))?;
        let bias = if bias {
            Some(vb.get_with_hints(spec.out_channels, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        let padding: Vec<usize> = spec.kernel.iter().map(|k| (k - 1) / 2).collect();
        let opts = ConvOpts::new()
            .stride(spec.stride.clone())
            .padding(padding.clone());
        Ok(Conv {
            weight,
            bias,
            kernel: spec.kernel.clone(),
            stride: spec.stride.clone(),
            padding,
            opts,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv(x, &self.weight, self.bias.as_ref(), &self.opts)
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_spatial(&self, input: &[usize]) -> Vec<usize> {
        conv_out_size(input, &self.kernel, &self.stride, &self.padding)
    }
    pub fn params(&self) -> u64 {
        numel(&self.weight) + self.bias.as_ref().map_or(0, numel)
    }
    pub fn describe(&self) -> String {
        format!(
            "{} {}→{} k{} s{}",
            conv_name(self.kernel.len()),
            self.in_channels(),
            self.out_channels(),
            fmt_axes(&self.kernel),
            fmt_axes(&self.stride)
        )
    }
}

/// Instance or batch normalisation (`weight`, `bias`, and for batch norm `running_mean`,
/// `running_var`).
#[derive(Debug)]
pub enum Norm {
    Instance {
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        eps: f64,
    },
    Batch {
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        running_mean: Var,
        running_var: Var,
        momentum: f64,
        eps: f64,
        /// serialises running-statistics updates
        lock: Mutex<()>,
    },
}

impl Norm {
    /// `zero_init`: weight initialised to 0 instead of 1 (`init_last_bn_before_add_to_0`).
    pub fn new(
        opts: &NormOptions,
        channels: usize,
        zero_init: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (weight, bias) = if opts.affine {
            let w0 = if zero_init { 0.0 } else { 1.0 };
            (
                Some(vb.get_with_hints(channels, "weight", Init::Const(w0))?),
                Some(vb.get_with_hints(channels, "bias", Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        Ok(match opts.kind {
            NormKind::Instance => Norm::Instance {
                weight,
                bias,
                eps: opts.eps,
            },
            NormKind::Batch => {
                let rm = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
                let rv = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
                Norm::Batch {
                    weight,
                    bias,
                    running_mean: Var::from_tensor(&rm)?,
                    running_var: Var::from_tensor(&rv)?,
                    momentum: opts.momentum,
                    eps: opts.eps,
                    lock: Mutex::new(()),
                }
            }
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Norm::Instance { weight, bias, eps } => {
                ops::instance_norm(x, NormAffine::new(weight.as_ref(), bias.as_ref()), *eps)
            }
            Norm::Batch {
                weight,
                bias,
                running_mean,
                running_var,
                momentum,
                eps,
                lock,
            } => {
                let _guard = lock
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("batch norm lock poisoned".into()))?;
                let mut state = ops::BatchNormState {
                    running_mean: running_mean.as_tensor().clone(),
                    running_var: running_var.as_tensor().clone(),
                    momentum: *momentum,
                    eps: *eps,
                };
                let y = ops::batch_norm(
                    x,
                    NormAffine::new(weight.as_ref(), bias.as_ref()),
                    &mut state,
                    train,
                )?;
                if train {
                    running_mean.set(&state.running_mean)?;
                    running_var.set(&state.running_var)?;
                }
                Ok(y)
            }
        }
    }

    pub fn params(&self) -> u64 {
        let (w, b) = match self {
            Norm::Instance { weight, bias, .. } | Norm::Batch { weight, bias, .. } => {
                (weight, bias)
            }
        };
        w.as_ref().map_or(0, numel) + b.as_ref().map_or(0, numel)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Norm::Instance { .. } => "InstanceNorm",
            Norm::Batch { .. } => "BatchNorm",
        }
    }
}

/// Applies a nonlinearity.
pub fn apply_nonlin(n: &Nonlin, x: &Tensor) -> Result<Tensor> {
    match *n {
        Nonlin::LeakyRelu { negative_slope } => ops::leaky_relu(x, negative_slope),
        Nonlin::Relu => x.relu(),
        Nonlin::Gelu(kind) => ops::gelu(x, kind),
        Nonlin::Silu => x.silu(),
        Nonlin::Elu { alpha } => x.elu(alpha),
        Nonlin::Tanh => x.tanh(),
        Nonlin::Sigmoid => candle_nn::ops::sigmoid(x),
        Nonlin::Identity => Ok(x.clone()),
    }
}

/// Applies dropout (training only). Channel-wise dropout zeroes whole `(n, c)` feature maps.
pub fn apply_dropout(d: &DropoutOptions, x: &Tensor, train: bool) -> Result<Tensor> {
    if !train || d.p == 0.0 {
        return Ok(x.clone());
    }
    if !d.channelwise {
        return ops::dropout(x, d.p, true);
    }
    let mut shape = vec![1usize; x.rank()];
    shape[0] = x.dim(0)?;
    shape[1] = x.dim(1)?;
    let keep = Tensor::rand(0f32, 1f32, shape, x.device())?
        .ge(d.p)?
        .to_dtype(x.dtype())?;
    x.broadcast_mul(&(keep / (1.0 - d.p))?)
}

/// Per-layer switches of a [`ConvDropoutNormNonlin`] on top of the network options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSwitches {
    pub bias: bool,
    pub dropout: bool,
    pub nonlin: bool,
    /// init the norm weight to 0 (last norm of a residual block)
    pub zero_init_norm: bool,
}

impl LayerSwitches {
    /// Everything the network options ask for.
    pub fn full(opts: &ConvBlockOptions) -> Self {
        LayerSwitches {
            bias: opts.conv_bias,
            dropout: true,
            nonlin: true,
            zero_init_norm: false,
        }
    }
}

/// dna `ConvDropoutNormReLU`: conv → [dropout] → [norm] → [nonlin] (norm and nonlin swapped
/// with `nonlin_first`). state_dict: `conv.*`, `norm.*`.
#[derive(Debug)]
pub struct ConvDropoutNormNonlin {
    pub conv: Conv,
    dropout: Option<DropoutOptions>,
    norm: Option<Norm>,
    nonlin: Option<Nonlin>,
    nonlin_first: bool,
}

impl ConvDropoutNormNonlin {
    pub fn new(
        spec: &ConvSpec,
        opts: &ConvBlockOptions,
        sw: LayerSwitches,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv = Conv::new(spec, sw.bias, vb.pp("conv"))?;
        let norm = match &opts.norm {
            Some(n) => Some(Norm::new(
                n,
                spec.out_channels,
                sw.zero_init_norm,
                vb.pp("norm"),
            )?),
            None => None,
        };
        Ok(ConvDropoutNormNonlin {
            conv,
            dropout: if sw.dropout { opts.dropout } else { None },
            norm,
            nonlin: if sw.nonlin { opts.nonlin } else { None },
            nonlin_first: opts.nonlin_first,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.conv.forward(x)?;
        if let Some(d) = &self.dropout {
            y = apply_dropout(d, &y, train)?;
        }
        if let (Some(Norm::Instance { weight, bias, eps }), Some(slope)) =
            (&self.norm, self.fused_slope())
        {
            let affine = NormAffine::new(weight.as_ref(), bias.as_ref());
            return ops::instance_norm_leaky_relu(&y, affine, *eps, slope);
        }
        match (&self.norm, &self.nonlin) {
            (Some(n), Some(a)) if self.nonlin_first => n.forward(&apply_nonlin(a, &y)?, train),
            (norm, nonlin) => {
                if let Some(n) = norm {
                    y = n.forward(&y, train)?;
                }
                match nonlin {
                    Some(a) => apply_nonlin(a, &y),
                    None => Ok(y),
                }
            }
        }
    }

    pub fn params(&self) -> u64 {
        self.conv.params() + self.norm.as_ref().map_or(0, Norm::params)
    }

    /// The slope of the leaky ReLU (0 for ReLU) when the layer ends in instance norm → (leaky)
    /// ReLU, which runs as one fused op ([`ops::instance_norm_leaky_relu`]).
    fn fused_slope(&self) -> Option<f64> {
        match (&self.norm, &self.nonlin) {
            _ if self.nonlin_first => None,
            (Some(Norm::Instance { .. }), Some(Nonlin::LeakyRelu { negative_slope })) => {
                Some(*negative_slope)
            }
            (Some(Norm::Instance { .. }), Some(Nonlin::Relu)) => Some(0.0),
            _ => None,
        }
    }

    /// Tensors kept for backward (conv, dropout, norm and nonlin outputs; a fused instance norm
    /// + leaky ReLU keeps only its output, it recomputes the normalised values from its input).
    fn stored(&self) -> usize {
        let norm_act = if self.fused_slope().is_some() {
            1
        } else {
            usize::from(self.norm.is_some()) + usize::from(self.nonlin.is_some())
        };
        1 + usize::from(self.dropout.is_some()) + norm_act
    }

    pub fn describe(&self) -> String {
        let mut s = self.conv.describe();
        if let Some(d) = &self.dropout {
            s.push_str(&format!(" + Dropout({})", d.p));
        }
        let norm = self.norm.as_ref().map(|n| n.name());
        let act = self.nonlin.as_ref().map(|a| a.name());
        let order: Vec<&str> = if self.nonlin_first {
            act.into_iter().chain(norm).collect()
        } else {
            norm.into_iter().chain(act).collect()
        };
        for o in order {
            s.push_str(" + ");
            s.push_str(o);
        }
        s
    }

    /// Adds this layer's row; returns its output shape `(C, *spatial)`.
    pub fn layer_rows(&self, name: &str, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<usize> {
        let mut out = vec![self.conv.out_channels()];
        out.extend(self.conv.out_spatial(&input[1..]));
        rows.push(LayerRow {
            name: name.to_string(),
            kind: self.describe(),
            output_shape: out.clone(),
            params: self.params(),
            stored_activations: self.stored(),
        });
        out
    }
}

/// dna `StackedConvBlocks`: `convs.{i}`, the first conv carries the stride.
#[derive(Debug)]
pub struct StackedConvBlocks {
    pub convs: Vec<ConvDropoutNormNonlin>,
}

impl StackedConvBlocks {
    /// `n` conv blocks `in → out`, kernel `kernel`, the first with `stride`.
    pub fn new(n: usize, spec: &ConvSpec, opts: &ConvBlockOptions, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("convs");
        let mut convs = Vec::with_capacity(n);
        for i in 0..n {
            let s = if i == 0 {
                spec.clone()
            } else {
                ConvSpec::new(
                    spec.out_channels,
                    spec.out_channels,
                    &spec.kernel,
                    &vec![1; spec.kernel.len()],
                )
            };
            convs.push(ConvDropoutNormNonlin::new(
                &s,
                opts,
                LayerSwitches::full(opts),
                vb.pp(i),
            )?);
        }
        Ok(StackedConvBlocks { convs })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        for c in &self.convs {
            y = c.forward(&y, train)?;
        }
        Ok(y)
    }

    pub fn layer_rows(&self, name: &str, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<usize> {
        let mut shape = input.to_vec();
        for (i, c) in self.convs.iter().enumerate() {
            shape = c.layer_rows(&format!("{name}.convs.{i}"), &shape, rows);
        }
        shape
    }
}

/// The ResNet-D shortcut of [`BasicBlockD`]: `AvgPool(stride)` if strided (`skip.0`), then a
/// 1×1 conv without bias + norm if the channels change (`skip.0` or `skip.1`).
#[derive(Debug)]
pub struct ResidualSkip {
    pool: Option<PoolOpts>,
    projection: Option<ConvDropoutNormNonlin>,
}

/// dna `BasicBlockD`: `conv1` (stride, dropout, norm, nonlin) → `conv2` (norm only), plus the
/// shortcut, then the nonlinearity.
#[derive(Debug)]
pub struct BasicBlockD {
    pub conv1: ConvDropoutNormNonlin,
    pub conv2: ConvDropoutNormNonlin,
    skip: Option<ResidualSkip>,
    nonlin: Option<Nonlin>,
    stride: Vec<usize>,
}

impl BasicBlockD {
    /// `zero_init_last_norm`: dna's `init_last_bn_before_add_to_0` (conv2's norm weight = 0).
    pub fn new(
        spec: &ConvSpec,
        opts: &ConvBlockOptions,
        zero_init_last_norm: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (cin, cout) = (spec.in_channels, spec.out_channels);
        let conv1 =
            ConvDropoutNormNonlin::new(spec, opts, LayerSwitches::full(opts), vb.pp("conv1"))?;
        let ones = vec![1usize; spec.kernel.len()];
        let spec2 = ConvSpec::new(cout, cout, &spec.kernel, &ones);
        let sw2 = LayerSwitches {
            bias: opts.conv_bias,
            dropout: false,
            nonlin: false,
            zero_init_norm: zero_init_last_norm,
        };
        let conv2 = ConvDropoutNormNonlin::new(&spec2, opts, sw2, vb.pp("conv2"))?;
        let has_stride = spec.stride.iter().any(|&s| s != 1);
        let skip = if has_stride || cin != cout {
            let pool =
                has_stride.then(|| PoolOpts::new(spec.stride.clone()).stride(spec.stride.clone()));
            let projection = if cin != cout {
                let idx = usize::from(has_stride);
                let sw = LayerSwitches {
                    bias: false,
                    dropout: false,
                    nonlin: false,
                    zero_init_norm: false,
                };
                Some(ConvDropoutNormNonlin::new(
                    &ConvSpec::new(cin, cout, &ones, &ones),
                    opts,
                    sw,
                    vb.pp("skip").pp(idx),
                )?)
            } else {
                None
            };
            Some(ResidualSkip { pool, projection })
        } else {
            None
        };
        Ok(BasicBlockD {
            conv1,
            conv2,
            skip,
            nonlin: opts.nonlin,
            stride: spec.stride.clone(),
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let residual = match &self.skip {
            None => x.clone(),
            Some(s) => {
                let mut r = match &s.pool {
                    Some(p) => ops::avg_pool(x, p)?,
                    None => x.clone(),
                };
                if let Some(proj) = &s.projection {
                    r = proj.forward(&r, train)?;
                }
                r
            }
        };
        let out = self.conv2.forward(&self.conv1.forward(x, train)?, train)?;
        let out = (out + residual)?;
        match &self.nonlin {
            Some(a) => apply_nonlin(a, &out),
            None => Ok(out),
        }
    }

    pub fn params(&self) -> u64 {
        self.conv1.params()
            + self.conv2.params()
            + self
                .skip
                .as_ref()
                .and_then(|s| s.projection.as_ref())
                .map_or(0, ConvDropoutNormNonlin::params)
    }

    pub fn layer_rows(&self, name: &str, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<usize> {
        let mut out = vec![self.conv1.conv.out_channels()];
        out.extend(self.conv1.conv.out_spatial(&input[1..]));
        let mut kind = format!(
            "BasicBlockD {}→{} k{} s{}",
            input[0],
            out[0],
            fmt_axes(&self.conv1.conv.kernel),
            fmt_axes(&self.stride)
        );
        let mut stored =
            self.conv1.stored() + self.conv2.stored() + 1 + usize::from(self.nonlin.is_some());
        if let Some(s) = &self.skip {
            if s.pool.is_some() {
                kind.push_str(" + AvgPool skip");
                stored += 1;
            }
            if let Some(p) = &s.projection {
                kind.push_str(" + 1x1 projection");
                stored += p.stored();
            }
        }
        rows.push(LayerRow {
            name: name.to_string(),
            kind,
            output_shape: out.clone(),
            params: self.params(),
            stored_activations: stored,
        });
        out
    }
}

/// `nn.ConvTransposeNd` with kernel = stride: `weight (C_in, C_out, *stride)`, optional bias.
#[derive(Debug, Clone)]
pub struct TransposedConv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: Vec<usize>,
    opts: ConvTransposeOpts,
}

impl TransposedConv {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        stride: &[usize],
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut shape = vec![in_channels, out_channels];
        shape.extend(stride);
        let weight = vb.get_with_hints(shape.clone(), "weight", he_init(&shape))?;
        let bias = if bias {
            Some(vb.get_with_hints(out_channels, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(TransposedConv {
            weight,
            bias,
            stride: stride.to_vec(),
            opts: ConvTransposeOpts::new().stride(stride.to_vec()),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv_transpose(x, &self.weight, self.bias.as_ref(), &self.opts)
    }

    pub fn params(&self) -> u64 {
        numel(&self.weight) + self.bias.as_ref().map_or(0, numel)
    }

    pub fn layer_rows(&self, name: &str, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<usize> {
        let c_out = self.weight.dims()[1];
        let mut out = vec![c_out];
        out.extend(input[1..].iter().zip(&self.stride).map(|(n, s)| n * s));
        let dim = self.stride.len();
        rows.push(LayerRow {
            name: name.to_string(),
            kind: format!(
                "ConvTranspose{}d {}→{} k=s{}",
                dim,
                input[0],
                c_out,
                fmt_axes(&self.stride)
            ),
            output_shape: out.clone(),
            params: self.params(),
            stored_activations: 1,
        });
        out
    }
}

/// Checks that `x` is `(N, C, *spatial)` for `dim` with `channels` channels.
pub fn check_input(x: &Tensor, dim: ConvDim, channels: usize, net: &str) -> Result<()> {
    if x.rank() != dim.n() + 2 || x.dim(1)? != channels {
        candle_core::bail!(
            "{net}: expected input (N, {channels}, {}), got shape {:?}",
            if dim == ConvDim::D3 {
                "D, H, W"
            } else {
                "H, W"
            },
            x.dims()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::GeluKind;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn layer(
        norm: NormKind,
        nonlin: Nonlin,
        nonlin_first: bool,
    ) -> (ConvDropoutNormNonlin, VarMap) {
        let opts = ConvBlockOptions {
            dim: ConvDim::D3,
            conv_bias: true,
            norm: Some(NormOptions {
                kind: norm,
                eps: 1e-5,
                affine: true,
                momentum: 0.1,
            }),
            dropout: None,
            nonlin: Some(nonlin),
            nonlin_first,
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let spec = ConvSpec::new(2, 3, &[1, 3, 3], &[1, 1, 1]);
        let l = ConvDropoutNormNonlin::new(&spec, &opts, LayerSwitches::full(&opts), vb).unwrap();
        (l, vm)
    }

    #[test]
    fn instance_norm_leaky_relu_is_fused_and_unchanged() {
        let x = Tensor::randn(0f64, 1.0, (2, 2, 3, 5, 4), &Device::Cpu).unwrap();
        let leaky = Nonlin::LeakyRelu {
            negative_slope: 0.01,
        };
        let cases = [
            (NormKind::Instance, leaky, false, Some(0.01)),
            (NormKind::Instance, Nonlin::Relu, false, Some(0.0)),
            (NormKind::Instance, leaky, true, None),
            (NormKind::Batch, leaky, false, None),
            (NormKind::Instance, Nonlin::Gelu(GeluKind::Erf), false, None),
        ];
        for (norm, nonlin, first, slope) in cases {
            let (l, vm) = layer(norm, nonlin, first);
            assert_eq!(l.fused_slope(), slope, "{norm:?} {nonlin:?} first {first}");
            // conv output + (fused pair | norm output + nonlin output)
            let stored = if slope.is_some() { 2 } else { 3 };
            assert_eq!(l.stored(), stored);
            // the layer against its parts applied one by one, values and gradients
            let run = |fused: bool| {
                let c = l.conv.forward(&x).unwrap();
                let y = if fused {
                    l.forward(&x, true).unwrap()
                } else if first {
                    let a = apply_nonlin(&nonlin, &c).unwrap();
                    l.norm.as_ref().unwrap().forward(&a, true).unwrap()
                } else {
                    let n = l.norm.as_ref().unwrap().forward(&c, true).unwrap();
                    apply_nonlin(&nonlin, &n).unwrap()
                };
                let g = (&y * &y).unwrap().sum_all().unwrap().backward().unwrap();
                let mut grads: Vec<Tensor> = vm
                    .all_vars()
                    .iter()
                    .filter_map(|v| g.get(v.as_tensor()).cloned())
                    .collect();
                grads.push(y);
                grads
            };
            for (a, b) in run(true).iter().zip(run(false)) {
                let d = (a - &b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    d < 1e-10,
                    "{norm:?} {nonlin:?} first {first}: differs by {d}"
                );
            }
        }
    }
}
