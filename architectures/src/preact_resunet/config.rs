//! `arch_kwargs` → [`PreActConfig`]: the standard nnU-Net plan keys plus this family's own
//! options (see the module documentation of [`super`]).

use crate::network::{ArchError, NetworkIo};
use crate::unet::options::{
    invalid, ConvDim, DropoutOptions, Kwargs, Nonlin, NormKind, NormOptions,
};
use serde_json::{Map, Value};

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

    /// Parses `arch_kwargs`; `path` is their JSON path (used in errors).
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
        let mut kw = Kwargs::new(kwargs, path);
        let dim = kw.conv_dim("conv_op")?;
        let n = kw.required_usize("n_stages")?;
        if n < 2 {
            return Err(invalid(
                &kw.key_path("n_stages"),
                "a U-Net needs at least 2 stages",
            ));
        }
        let features_per_stage = kw.per_stage("features_per_stage", n, true)?;
        let kernel_sizes = kw.per_stage_axes("kernel_sizes", n, dim.n())?;
        for (s, k) in kernel_sizes.iter().enumerate() {
            if let Some(a) = k.iter().position(|&k| k % 2 == 0) {
                return Err(invalid(
                    &format!("{}[{s}][{a}]", kw.key_path("kernel_sizes")),
                    format!("kernel sizes must be odd (\"same\" padding), got {}", k[a]),
                ));
            }
        }
        let strides = kw.per_stage_axes("strides", n, dim.n())?;
        let n_blocks_per_stage = if present(kwargs, "n_blocks_per_stage") {
            kw.per_stage("n_blocks_per_stage", n, true)?
        } else {
            kw.mark_used("n_blocks_per_stage");
            vec![1; n]
        };
        let n_blocks_per_stage_decoder = if present(kwargs, "n_blocks_per_stage_decoder") {
            kw.per_stage("n_blocks_per_stage_decoder", n - 1, true)?
        } else {
            kw.mark_used("n_blocks_per_stage_decoder");
            vec![1; n - 1]
        };
        // Standard nnU-Net keys this design accepts but does not use: every stage is made of
        // two-conv pre-activation blocks, the convs have no bias and the order is fixed.
        for k in [
            "n_conv_per_stage",
            "n_conv_per_stage_decoder",
            "deep_supervision",
            "block",
            "bottleneck_channels",
            "stem_channels",
        ] {
            kw.mark_used(k);
        }
        kw.optional_bool("conv_bias", false)?;
        kw.optional_bool("nonlin_first", false)?;
        let plan_norm = kw.norm(dim)?;
        let dropout = kw.dropout()?;
        let plan_nonlin = kw.nonlin()?;

        let norm_kind = match choice(&mut kw, kwargs, "norm", &["batch", "instance"])? {
            Some("batch") => NormKind::Batch,
            Some(_) => NormKind::Instance,
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

        let nonlin = match choice(&mut kw, kwargs, "activation", &["leaky_relu", "gelu"])? {
            Some("gelu") => Nonlin::Gelu(crate::ops::GeluKind::Erf),
            Some(_) => Nonlin::LeakyRelu {
                negative_slope: 0.01,
            },
            None => plan_nonlin.unwrap_or(Nonlin::LeakyRelu {
                negative_slope: 0.01,
            }),
        };
        let downsample = match choice(&mut kw, kwargs, "downsample", &["maxpool", "conv"])? {
            Some("conv") => Downsample::Conv,
            _ => Downsample::MaxPool,
        };
        let convnext_bottleneck = kw.optional_bool("convnext_bottleneck", true)?;
        let bottleneck_kernel = kw.optional_usize("bottleneck_kernel")?.unwrap_or(7);
        if bottleneck_kernel % 2 == 0 {
            return Err(invalid(
                &kw.key_path("bottleneck_kernel"),
                format!("must be an odd kernel size (\"same\" padding), got {bottleneck_kernel}"),
            ));
        }
        kw.finish()?;
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
            downsample,
            norm,
            nonlin,
            dropout,
            convnext_bottleneck,
            bottleneck_kernel,
        })
    }
}

fn present(m: &Map<String, Value>, key: &str) -> bool {
    m.get(key).is_some_and(|v| !v.is_null())
}

/// One of `allowed` (case-insensitive) or absent/null.
fn choice(
    kw: &mut Kwargs,
    m: &Map<String, Value>,
    key: &str,
    allowed: &[&'static str],
) -> Result<Option<&'static str>, ArchError> {
    kw.mark_used(key);
    let p = kw.key_path(key);
    let quoted: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => allowed
            .iter()
            .find(|a| a.eq_ignore_ascii_case(s.trim()))
            .copied()
            .map(Some)
            .ok_or_else(|| {
                invalid(
                    &p,
                    format!("expected one of {}, got \"{s}\"", quoted.join(", ")),
                )
            }),
        Some(v) => Err(invalid(
            &p,
            format!("expected one of {}, got {v}", quoted.join(", ")),
        )),
    }
}
