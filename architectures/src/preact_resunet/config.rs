//! `arch_kwargs` → [`PreActConfig`]: the standard nnU-Net plan keys plus this family's own
//! options (see the module documentation of [`super`]).

use crate::kwargs::{self, invalid, key_path, Choice, Choices, PerStage};
use crate::network::{ArchError, NetworkIo};
use crate::unet::options::{ConvDim, DropoutOptions, Nonlin, NormKind, NormOptions, UNetKwargs};
use serde::Deserialize;
use serde_json::{Map, Value};

/// This family's own `arch_kwargs` keys (see the module documentation of [`super`]).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PreActKwargs {
    /// `"instance"` | `"batch"` (default: the plan's `norm_op` family).
    pub norm: Option<Choice<NormKind>>,
    /// `"leaky_relu"` | `"gelu"` (default: the plan's `nonlin`).
    pub activation: Option<Choice<Activation>>,
    pub downsample: Option<Choice<Downsample>>,
    /// Blocks per decoder stage (default 1).
    pub n_blocks_per_stage_decoder: Option<PerStage>,
    /// Append the ConvNeXt block to the bottleneck (default true).
    pub convnext_bottleneck: Option<bool>,
    /// Odd depthwise kernel of the ConvNeXt block (default 7).
    pub bottleneck_kernel: Option<usize>,
}

/// `activation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    LeakyRelu,
    Gelu,
}

impl Choices for Activation {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("leaky_relu", Activation::LeakyRelu),
        ("gelu", Activation::Gelu),
    ];
}

impl Choices for Downsample {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("maxpool", Downsample::MaxPool), ("conv", Downsample::Conv)];
}

/// How the encoder goes down one resolution level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downsample {
    /// `MaxPool(kernel = stride, stride)` (the seed's choice; no parameters).
    MaxPool,
    /// `Conv(C→C, kernel = stride, stride, bias)` (learned).
    Conv,
}

impl Downsample {
    pub fn name(self) -> &'static str {
        match self {
            Downsample::MaxPool => "maxpool",
            Downsample::Conv => "conv",
        }
    }
}

/// Everything needed to build a [`super::PreActResUNet`].
#[derive(Debug, Clone, PartialEq)]
pub struct PreActConfig {
    pub dim: ConvDim,
    pub input_channels: usize,
    pub num_classes: usize,
    pub deep_supervision: bool,
    pub features_per_stage: Vec<usize>,
    /// Kernel of the 3×3 convs of stage `s` (and of the decoder stage at that resolution).
    pub kernel_sizes: Vec<Vec<usize>>,
    /// Down-sampling factor entering stage `s` (nnU-Net: `strides[0]` is all ones).
    pub strides: Vec<Vec<usize>>,
    pub n_blocks_per_stage: Vec<usize>,
    /// `n_stages - 1` entries, from the bottleneck upwards (dna order).
    pub n_blocks_per_stage_decoder: Vec<usize>,
    pub downsample: Downsample,
    /// Affine normalisation used before every activation.
    pub norm: NormOptions,
    /// Activation of the pre-activation residual blocks (the ConvNeXt block always uses GELU).
    pub nonlin: Nonlin,
    /// Optional dropout between the two convs of a block (WideResNet position).
    pub dropout: Option<DropoutOptions>,
    /// Append the ConvNeXt-style depthwise block to the bottleneck stage.
    pub convnext_bottleneck: bool,
    /// Depthwise kernel of the ConvNeXt block on axes where the plan's bottleneck kernel is > 1.
    pub bottleneck_kernel: usize,
}

impl PreActConfig {
    pub fn n_stages(&self) -> usize {
        self.features_per_stage.len()
    }

    /// Depthwise kernel of the ConvNeXt block: `bottleneck_kernel` on every axis where the
    /// plan's bottleneck kernel is larger than 1, 1 where the plan keeps the axis 2D.
    pub fn dw_kernel(&self) -> Vec<usize> {
        let last = &self.kernel_sizes[self.n_stages() - 1];
        last.iter()
            .map(|&k| if k == 1 { 1 } else { self.bottleneck_kernel })
            .collect()
    }

    /// Product of the strides per axis (inputs must be divisible by it).
    pub fn stride_product(&self) -> Vec<usize> {
        let mut p = vec![1usize; self.dim.n()];
        for st in &self.strides {
            for (a, s) in st.iter().enumerate() {
                p[a] *= s;
            }
        }
        p
    }

    /// Parses `arch_kwargs`; `path` is their JSON path (used in errors). Every standard
    /// U-Net key is accepted (the unused ones are ignored, see the module documentation).
    pub fn from_kwargs(
        kwargs: &Map<String, Value>,
        path: &str,
        io: &NetworkIo,
    ) -> Result<Self, ArchError> {
        if io.in_channels == 0 {
            return Err(invalid(
                path,
                "the network needs at least one input channel",
            ));
        }
        if io.num_classes == 0 {
            return Err(invalid(path, "the network needs at least one output class"));
        }
        let known: Vec<&str> = kwargs::keys::<UNetKwargs>()
            .iter()
            .chain(kwargs::keys::<PreActKwargs>())
            .copied()
            .collect();
        kwargs::reject_unknown(kwargs, path, &known)?;
        let plan = UNetKwargs::parse(kwargs, path)?;
        let own: PreActKwargs = kwargs::typed(kwargs, path)?;
        let dim = plan.conv_dim(path)?;
        let n = plan.n_stages(path)?;
        if n < 2 {
            return Err(invalid(
                &key_path(path, "n_stages"),
                "a U-Net needs at least 2 stages",
            ));
        }
        let features_per_stage =
            UNetKwargs::per_stage(&plan.features_per_stage, path, "features_per_stage", n, 1)?;
        let kernel_sizes =
            UNetKwargs::per_stage_axes(&plan.kernel_sizes, path, "kernel_sizes", n, dim.n())?;
        for (s, k) in kernel_sizes.iter().enumerate() {
            if let Some(a) = k.iter().position(|&k| k % 2 == 0) {
                return Err(invalid(
                    &format!("{}[{s}][{a}]", key_path(path, "kernel_sizes")),
                    format!("kernel sizes must be odd (\"same\" padding), got {}", k[a]),
                ));
            }
        }
        let strides = UNetKwargs::per_stage_axes(&plan.strides, path, "strides", n, dim.n())?;
        let blocks = |v: &Option<PerStage>, key: &str, count: usize| match v {
            Some(v) => v.resolve(count, 1, &key_path(path, key)),
            None => Ok(vec![1; count]),
        };
        let n_blocks_per_stage = blocks(&plan.n_blocks_per_stage, "n_blocks_per_stage", n)?;
        let n_blocks_per_stage_decoder = blocks(
            &own.n_blocks_per_stage_decoder,
            "n_blocks_per_stage_decoder",
            n - 1,
        )?;
        let plan_norm = plan.norm(dim, path)?;
        let dropout = plan.dropout(path)?;
        let plan_nonlin = plan.nonlin(path)?;
        let norm_kind = match own.norm {
            Some(c) => c.0,
            None => plan_norm
                .as_ref()
                .map_or(NormKind::Instance, |n: &NormOptions| n.kind),
        };
        let mut norm = plan_norm.unwrap_or(NormOptions {
            kind: norm_kind,
            eps: 1e-5,
            affine: true,
            momentum: 0.1,
        });
        norm.kind = norm_kind;
        norm.affine = true;
        let nonlin = match own.activation.map(|c| c.0) {
            Some(Activation::Gelu) => Nonlin::Gelu(crate::ops::GeluKind::Erf),
            Some(Activation::LeakyRelu) => Nonlin::LeakyRelu {
                negative_slope: 0.01,
            },
            None => plan_nonlin.unwrap_or(Nonlin::LeakyRelu {
                negative_slope: 0.01,
            }),
        };
        let bottleneck_kernel = own.bottleneck_kernel.unwrap_or(7);
        if bottleneck_kernel.is_multiple_of(2) {
            return Err(invalid(
                &key_path(path, "bottleneck_kernel"),
                format!("must be an odd kernel size (\"same\" padding), got {bottleneck_kernel}"),
            ));
        }
        Ok(PreActConfig {
            dim,
            input_channels: io.in_channels,
            num_classes: io.num_classes,
            deep_supervision: io.deep_supervision,
            features_per_stage,
            kernel_sizes,
            strides,
            n_blocks_per_stage,
            n_blocks_per_stage_decoder,
            downsample: own.downsample.map_or(Downsample::MaxPool, |c| c.0),
            norm,
            nonlin,
            dropout,
            convnext_bottleneck: own.convnext_bottleneck.unwrap_or(true),
            bottleneck_kernel,
        })
    }
}
