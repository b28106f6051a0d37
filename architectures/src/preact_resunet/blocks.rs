//! Blocks of the pre-activation residual U-Net: a plain/grouped conv, the ResNet-v2
//! pre-activation residual block, the ConvNeXt-style depthwise bottleneck block and the
//! encoder's down-sampling step.

use super::config::Downsample;
use crate::init::he_normal_std;
use crate::network::LayerRow;
use crate::ops::{self, ConvOpts, GeluKind, PoolOpts};
use crate::unet::blocks::{apply_dropout, apply_nonlin, Norm};
use crate::unet::options::{DropoutOptions, Nonlin, NormOptions};
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// nnU-Net's `InitWeights_He(1e-2)` slope.
const HE_NEG_SLOPE: f64 = 1e-2;

fn numel(t: &Tensor) -> u64 {
    t.elem_count() as u64
}

pub(crate) fn fmt_axes(v: &[usize]) -> String {
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

/// `nn.ConvNd`: `weight (C_out, C_in/groups, *k)`, optional `bias (C_out)`.
#[derive(Debug, Clone)]
pub struct PConv {
    weight: Tensor,
    bias: Option<Tensor>,
    kernel: Vec<usize>,
    stride: Vec<usize>,
    padding: Vec<usize>,
    groups: usize,
    opts: ConvOpts,
}

impl PConv {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: &[usize],
        stride: &[usize],
        padding: &[usize],
        groups: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        if groups == 0 || !cin.is_multiple_of(groups) || !cout.is_multiple_of(groups) {
            candle_core::bail!("conv {cin}→{cout}: channels not divisible by groups {groups}");
        }
        let mut shape = vec![cout, cin / groups];
        shape.extend(kernel);
        let std = he_normal_std(&shape, HE_NEG_SLOPE);
        let weight = vb.get_with_hints(
            shape.clone(),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        let opts = ConvOpts::new()
            .stride(stride.to_vec())
            .padding(padding.to_vec())
            .groups(groups);
        Ok(PConv {
            weight,
            bias,
            kernel: kernel.to_vec(),
            stride: stride.to_vec(),
            padding: padding.to_vec(),
            groups,
            opts,
        })
    }

    /// Stride 1, "same" padding `(k-1)/2`.
    pub fn same(
        cin: usize,
        cout: usize,
        kernel: &[usize],
        groups: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let ones = vec![1; kernel.len()];
        let pad: Vec<usize> = kernel.iter().map(|k| (k - 1) / 2).collect();
        Self::new(cin, cout, kernel, &ones, &pad, groups, bias, vb)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv(x, &self.weight, self.bias.as_ref(), &self.opts)
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1] * self.groups
    }
    pub fn kernel(&self) -> &[usize] {
        &self.kernel
    }
    pub fn out_spatial(&self, input: &[usize]) -> Vec<usize> {
        input
            .iter()
            .enumerate()
            .map(|(a, &n)| {
                (n + 2 * self.padding[a]).saturating_sub(self.kernel[a]) / self.stride[a].max(1) + 1
            })
            .collect()
    }
    pub fn params(&self) -> u64 {
        numel(&self.weight) + self.bias.as_ref().map_or(0, numel)
    }
    pub fn describe(&self) -> String {
        let dw = if self.groups > 1 && self.groups == self.in_channels() {
            "depthwise "
        } else {
            ""
        };
        format!(
            "{dw}{} {}→{} k{} s{}",
            conv_name(self.kernel.len()),
            self.in_channels(),
            self.out_channels(),
            fmt_axes(&self.kernel),
            fmt_axes(&self.stride)
        )
    }
}

/// ResNet-v2 pre-activation block:
/// `conv2(act(norm2(conv1(act(norm1 x))))) + (x | skip(x))`, convs without bias, a 1×1
/// projection `skip` (no bias) only when the channel count changes. state_dict: `norm1`,
/// `conv1`, `norm2`, `conv2`, `skip`.
#[derive(Debug)]
pub struct PreActRes {
    pub norm1: Norm,
    pub conv1: PConv,
    pub norm2: Norm,
    pub conv2: PConv,
    pub skip: Option<PConv>,
    nonlin: Nonlin,
    dropout: Option<DropoutOptions>,
}

impl PreActRes {
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: &[usize],
        norm: &NormOptions,
        nonlin: Nonlin,
        dropout: Option<DropoutOptions>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let ones = vec![1; kernel.len()];
        Ok(PreActRes {
            norm1: Norm::new(norm, cin, false, vb.pp("norm1"))?,
            conv1: PConv::same(cin, cout, kernel, 1, false, vb.pp("conv1"))?,
            norm2: Norm::new(norm, cout, false, vb.pp("norm2"))?,
            conv2: PConv::same(cout, cout, kernel, 1, false, vb.pp("conv2"))?,
            skip: if cin != cout {
                Some(PConv::same(cin, cout, &ones, 1, false, vb.pp("skip"))?)
            } else {
                None
            },
            nonlin,
            dropout,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = apply_nonlin(&self.nonlin, &self.norm1.forward(x, train)?)?;
        let h = self.conv1.forward(&h)?;
        let mut h = apply_nonlin(&self.nonlin, &self.norm2.forward(&h, train)?)?;
        if let Some(d) = &self.dropout {
            h = apply_dropout(d, &h, train)?;
        }
        let h = self.conv2.forward(&h)?;
        match &self.skip {
            Some(s) => h + s.forward(x)?,
            None => h + x,
        }
    }

    pub fn params(&self) -> u64 {
        self.norm1.params()
            + self.conv1.params()
            + self.norm2.params()
            + self.conv2.params()
            + self.skip.as_ref().map_or(0, PConv::params)
    }

    /// Rows `norm1` (input-width pre-activation: norm and activation outputs), `conv1` (conv,
    /// norm2, activation[, dropout] outputs) and `conv2` (conv2, projection and sum outputs).
    /// Like the dna blocks' rows, every conv / norm / nonlinearity / add output counts.
    pub fn layer_rows(&self, name: &str, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<usize> {
        let act = self.nonlin.name();
        rows.push(LayerRow {
            name: format!("{name}.norm1"),
            kind: format!("{} + {act} (pre-activation)", self.norm1.name()),
            output_shape: input.to_vec(),
            params: self.norm1.params(),
            stored_activations: 2,
        });
        let mut out = vec![self.conv1.out_channels()];
        out.extend(self.conv1.out_spatial(&input[1..]));
        let drop = self
            .dropout
            .map(|d| format!(" + Dropout({})", d.p))
            .unwrap_or_default();
        rows.push(LayerRow {
            name: format!("{name}.conv1"),
            kind: format!(
                "{} + {} + {act}{drop}",
                self.conv1.describe(),
                self.norm2.name()
            ),
            output_shape: out.clone(),
            params: self.conv1.params() + self.norm2.params(),
            stored_activations: 3 + usize::from(self.dropout.is_some()),
        });
        let shortcut = match &self.skip {
            Some(_) => "1×1 projection".to_string(),
            None => "identity".to_string(),
        };
        rows.push(LayerRow {
            name: format!("{name}.conv2"),
            kind: format!("{} + {shortcut} shortcut", self.conv2.describe()),
            output_shape: out.clone(),
            params: self.conv2.params() + self.skip.as_ref().map_or(0, PConv::params),
            // conv2, the projection (if any) and the sum
            stored_activations: 2 + usize::from(self.skip.is_some()),
        });
        out
    }
}

/// ConvNeXt-style bottleneck block `x + pwconv(GELU(norm2(dwconv(GELU(norm1 x)))))`; the
/// depthwise and pointwise convs have a bias. state_dict: `norm1`, `dwconv`, `norm2`, `pwconv`.
#[derive(Debug)]
pub struct ConvNeXtBlock {
    pub norm1: Norm,
    pub dwconv: PConv,
    pub norm2: Norm,
    pub pwconv: PConv,
}

impl ConvNeXtBlock {
    pub fn new(c: usize, dw_kernel: &[usize], norm: &NormOptions, vb: VarBuilder) -> Result<Self> {
        let ones = vec![1; dw_kernel.len()];
        Ok(ConvNeXtBlock {
            norm1: Norm::new(norm, c, false, vb.pp("norm1"))?,
            dwconv: PConv::same(c, c, dw_kernel, c, true, vb.pp("dwconv"))?,
            norm2: Norm::new(norm, c, false, vb.pp("norm2"))?,
            pwconv: PConv::same(c, c, &ones, 1, true, vb.pp("pwconv"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = ops::gelu(&self.norm1.forward(x, train)?, GeluKind::Erf)?;
        let h = self.dwconv.forward(&h)?;
        let h = ops::gelu(&self.norm2.forward(&h, train)?, GeluKind::Erf)?;
        self.pwconv.forward(&h)? + x
    }

    pub fn params(&self) -> u64 {
        self.norm1.params() + self.dwconv.params() + self.norm2.params() + self.pwconv.params()
    }

    pub fn layer_rows(&self, name: &str, input: &[usize], rows: &mut Vec<LayerRow>) {
        rows.push(LayerRow {
            name: format!("{name}.norm1"),
            kind: format!("{} + GELU (pre-activation)", self.norm1.name()),
            output_shape: input.to_vec(),
            params: self.norm1.params(),
            stored_activations: 2,
        });
        rows.push(LayerRow {
            name: format!("{name}.dwconv"),
            kind: format!("{} + {} + GELU", self.dwconv.describe(), self.norm2.name()),
            output_shape: input.to_vec(),
            params: self.dwconv.params() + self.norm2.params(),
            stored_activations: 3,
        });
        rows.push(LayerRow {
            name: format!("{name}.pwconv"),
            kind: format!("{} + identity shortcut", self.pwconv.describe()),
            output_shape: input.to_vec(),
            params: self.pwconv.params(),
            stored_activations: 2,
        });
    }
}

/// The step entering an encoder stage whose stride is not all ones.
#[derive(Debug)]
pub enum Down {
    MaxPool {
        opts: PoolOpts,
        stride: Vec<usize>,
    },
    /// `down.weight (C, C, *stride)`, `down.bias`.
    Conv(PConv),
}

impl Down {
    pub fn new(kind: Downsample, c: usize, stride: &[usize], vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            Downsample::MaxPool => Down::MaxPool {
                opts: PoolOpts::new(stride.to_vec()).stride(stride.to_vec()),
                stride: stride.to_vec(),
            },
            Downsample::Conv => {
                let zeros = vec![0; stride.len()];
                Down::Conv(PConv::new(c, c, stride, stride, &zeros, 1, true, vb)?)
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Down::MaxPool { opts, .. } => ops::max_pool(x, opts),
            Down::Conv(c) => c.forward(x),
        }
    }

    pub fn params(&self) -> u64 {
        match self {
            Down::MaxPool { .. } => 0,
            Down::Conv(c) => c.params(),
        }
    }

    pub fn layer_rows(&self, name: &str, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<usize> {
        let (kind, spatial) = match self {
            Down::MaxPool { stride, .. } => (
                format!("MaxPool k=s{}", fmt_axes(stride)),
                input[1..]
                    .iter()
                    .zip(stride)
                    .map(|(n, s)| n / s)
                    .collect::<Vec<_>>(),
            ),
            Down::Conv(c) => (c.describe(), c.out_spatial(&input[1..])),
        };
        let mut out = vec![input[0]];
        out.extend(spatial);
        rows.push(LayerRow {
            name: name.to_string(),
            kind,
            output_shape: out.clone(),
            params: self.params(),
            stored_activations: 1,
        });
        out
    }
}
