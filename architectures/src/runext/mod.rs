//! DynamicRUNext (seed 000): a residual U-Net with dynamic convolutions (K kernels mixed by an
//! input-conditioned softmax attention), pixel/voxel-shuffle upsampling, a wide bottleneck
//! (`2 × features[-1]`) and an image-level multi-label classification head on the bottleneck.
//! 2D or 3D at run time (`conv_op`).
//!
//! Structure (reference `architectures.md` §1.1; state_dict names of the seed's PyTorch code):
//! `stem` ResidualBlock(in → f0) → `downs.{i}` [MaxPool(stride) → DynamicConv → ResidualBlock]
//! × (depth − 1) → `bottleneck` [MaxPool → DynamicConv(f[-1] → 2f[-1]) (`bottleneck.1`) →
//! ResidualBlock (`bottleneck.2`) → channel dropout] → `cls_head` [GAP → Linear(→ hidden,
//! `cls_head.0`) → ReLU → Dropout → Linear(→ n_cls, `cls_head.3`)] and `ups.{u}` [PixelShuffleUp
//! (`up`: conv k → shuffle by the level's per-axis stride → norm → act) → pad → cat[skip, up] →
//! ResidualBlock (`residual`)] × depth → `outc` (1×1 conv, bias) at full resolution, plus
//! `ds_heads.{l-1}` (1×1 conv, bias) at decoder levels `l = 1..depth-1` for deep supervision.
//!
//! Built from a normal nnU-Net plans configuration (`PlainConvUNet` or `ResidualEncoderUNet`
//! `arch_kwargs`; every standard key is accepted and validated):
//! - levels: `depth = n_stages − 1` encoder levels plus the bottleneck, so the network
//!   downsamples with the plan's `strides[1..n_stages]` (per axis; max-pool kernel = stride) and
//!   upsamples by the same factors; `kernel_sizes[l]` are the kernels of level `l`
//!   (`strides[0]` must be all ones);
//! - widths: `features_per_stage[0..depth]`, bottleneck `2 × features[depth-1]`;
//! - norm and nonlinearity: the plan's `norm_op`/`nonlin` (nnU-Net: InstanceNorm + LeakyReLU);
//! - `conv_bias`, `n_conv_per_stage(_decoder)`/`n_blocks_per_stage` and `dropout_op` are
//!   accepted but not used (every conv of the design is bias-free and followed by a norm; every
//!   residual block has two convs; dropout is the design's own `dropout`).
//!
//! Own optional keys (errors name `architecture.arch_kwargs.<key>`):
//! - `base_channels` (int): widths `base·2^i` instead of the plan's features (the seed's rule);
//! - `depth` (int ≥ 1): number of encoder levels; levels beyond the plan use stride 2 and
//!   kernel 3 on every axis;
//! - `feature_scale` (number > 0, default 1): multiplies every width (rounded, ≥ 1);
//! - `num_cls` (int ≥ 1): classification outputs (default `num_classes − 1`, at least 1);
//! - `cls_hidden` (int ≥ 1, default 256): hidden width of the classification head;
//! - `k_kernels` (int ≥ 1, default 4): kernels per dynamic convolution;
//! - `dropout` (0 ≤ p < 1, default 0.3): bottleneck channel dropout and head dropout;
//! - `block_norm`: `"plan"` (default), `"batch"` (the seed's BatchNorm, eps 1e-5, momentum
//!   0.1), `"instance"` (affine InstanceNorm) or `"none"`;
//! - `block_nonlin`: `"plan"` (default), `"relu"` (the seed) or `"leaky_relu"` (slope 1e-2);
//! - `deep_supervision_heads` (bool, default true): build the low-resolution heads when deep
//!   supervision is on (the seed has none; without them deep supervision yields only the
//!   full-resolution output). Without deep supervision no such head is built.
//!
//! The seed's exact form (fixture `dynamic_runext_b8_d4`): a 2D plan with strides 2, kernels 3,
//! `base_channels`, `block_norm: "batch"`, `block_nonlin: "relu"`, `deep_supervision_heads:
//! false`, `num_cls`, one segmentation class; its second output is `sigmoid(class_logits)`.
//!
//! The dynamic convolution aggregates the kernels per sample (`(B, K) × (K, o·i·Πk)` matmul)
//! and runs one grouped convolution with `groups = B`, never K separate convolutions.

mod blocks;
mod net;
#[cfg(test)]
mod tests;

pub use blocks::{
    pixel_shuffle_axes, BlockOptions, DynamicConv, Linear, PixelShuffleUp, ResidualBlock,
};
pub use net::{DynamicRUNext, DynamicResDown, DynamicResUp};

/// One forward pass of a network with an image-level classification head.
#[derive(Debug, Clone)]
pub struct SegAndClassLogits {
    /// Segmentation logits, as [`SegNetwork::forward`] returns them.
    pub seg: Vec<Tensor>,
    /// `(N, n_cls)` logits of the multi-label head (before the sigmoid), to be trained with
    /// BCE against "which foreground classes are in the patch".
    pub class_logits: Tensor,
}

/// A RUNext ability: an image-level multi-label classification head next to the
/// segmentation (reached through [`as_class_head`]).
pub trait ClassHead {
    /// Number of class logits (`num_cls`, by default the foreground classes).
    fn num_class_outputs(&self) -> usize;
    /// Segmentation and class logits of one forward pass.
    fn forward_with_class(&self, x: &Tensor, train: bool)
        -> candle_core::Result<SegAndClassLogits>;
}

/// The classification head of `network`, if it has one (a RUNext).
pub fn as_class_head(network: &dyn SegNetwork) -> Option<&dyn ClassHead> {
    let any: &dyn std::any::Any = network;
    any.downcast_ref::<DynamicRUNext>()
        .map(|n| n as &dyn ClassHead)
}

use crate::kwargs::{self, invalid, Choice, Choices};
use crate::memory::MemoryEstimate;
use crate::network::{ArchError, ArchPreset, Architecture, CandleContext, NetworkIo, SegNetwork};
use crate::unet::options::{ConvDim, Nonlin, NormKind, NormOptions, UNetConfig, UNetKwargs};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Canonical `network_class_name`.
pub const RUNEXT: &str = "nnseg.architectures.RUNext";

/// RUNext's own `arch_kwargs` keys (see the module documentation), typed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct RUNextKwargs {
    pub base_channels: Option<usize>,
    pub depth: Option<usize>,
    pub feature_scale: Option<f64>,
    pub num_cls: Option<usize>,
    pub cls_hidden: Option<usize>,
    pub k_kernels: Option<usize>,
    pub dropout: Option<f64>,
    pub block_norm: Option<Choice<BlockNorm>>,
    pub block_nonlin: Option<Choice<BlockNonlin>>,
    pub deep_supervision_heads: Option<bool>,
}

/// `block_norm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockNorm {
    Plan,
    Batch,
    Instance,
    None,
}

impl Choices for BlockNorm {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("plan", BlockNorm::Plan),
        ("batch", BlockNorm::Batch),
        ("instance", BlockNorm::Instance),
        ("none", BlockNorm::None),
    ];
}

/// `block_nonlin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockNonlin {
    Plan,
    Relu,
    LeakyRelu,
}

impl Choices for BlockNonlin {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("plan", BlockNonlin::Plan),
        ("relu", BlockNonlin::Relu),
        ("leaky_relu", BlockNonlin::LeakyRelu),
    ];
}

impl RUNextKwargs {
    /// The encoder widths (`depth` of them): `base_channels · 2^i` or the plan's (doubled past
    /// its stages), times `feature_scale`.
    fn features(&self, plan: &UNetConfig, path: &str) -> Result<Vec<usize>, ArchError> {
        let key = |k: &str| format!("{path}.{k}");
        let n = plan.n_stages();
        let depth = match self.depth {
            Some(0) => return Err(invalid(&key("depth"), "must be at least 1")),
            Some(d) => d,
            None if n < 2 => {
                return Err(invalid(
                    &key("n_stages"),
                    "DynamicRUNext needs at least 2 stages (or an explicit `depth`)",
                ))
            }
            None => n - 1,
        };
        if self.base_channels == Some(0) {
            return Err(invalid(&key("base_channels"), "must be at least 1"));
        }
        let scale = self.feature_scale.unwrap_or(1.0);
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(invalid(
                &key("feature_scale"),
                format!("must be a positive number, got {scale}"),
            ));
        }
        let mut features: Vec<usize> = Vec::with_capacity(depth);
        for i in 0..depth {
            let f = match self.base_channels {
                Some(b) => b << i.min(40),
                None => match plan.features_per_stage.get(i) {
                    Some(&f) => f,
                    None => 2 * features[i - 1],
                },
            };
            features.push(f);
        }
        Ok(features
            .iter()
            .map(|&f| ((f as f64 * scale).round() as usize).max(1))
            .collect())
    }

    /// The residual blocks' norm and nonlinearity (`"plan"`: the plan's).
    fn blocks(&self, plan: &UNetConfig) -> BlockOptions {
        let norm = |kind| {
            Some(NormOptions {
                kind,
                eps: 1e-5,
                affine: true,
                momentum: 0.1,
            })
        };
        BlockOptions {
            norm: match self.block_norm.map_or(BlockNorm::Plan, |c| c.0) {
                BlockNorm::Plan => plan.block.norm.clone(),
                BlockNorm::Batch => norm(NormKind::Batch),
                BlockNorm::Instance => norm(NormKind::Instance),
                BlockNorm::None => None,
            },
            nonlin: match self.block_nonlin.map_or(BlockNonlin::Plan, |c| c.0) {
                BlockNonlin::Plan => plan.block.nonlin,
                BlockNonlin::Relu => Some(Nonlin::Relu),
                BlockNonlin::LeakyRelu => Some(Nonlin::LeakyRelu {
                    negative_slope: 1e-2,
                }),
            },
        }
    }
}

/// Kernel sizes and pooling strides of the `depth + 1` levels (the plan's, then 3 and 2).
#[allow(clippy::type_complexity)]
fn levels(
    plan: &UNetConfig,
    depth: usize,
    path: &str,
) -> Result<(Vec<Vec<usize>>, Vec<Vec<usize>>), ArchError> {
    let dim = plan.dim().n();
    let kernels: Vec<Vec<usize>> = (0..=depth)
        .map(|l| {
            plan.kernel_sizes
                .get(l)
                .cloned()
                .unwrap_or_else(|| vec![3; dim])
        })
        .collect();
    let strides: Vec<Vec<usize>> = (0..=depth)
        .map(|l| plan.strides.get(l).cloned().unwrap_or_else(|| vec![2; dim]))
        .collect();
    if let Some((l, k)) = kernels
        .iter()
        .enumerate()
        .find(|(_, k)| k.iter().any(|&v| v % 2 == 0))
    {
        return Err(invalid(
            &format!("{path}.kernel_sizes[{l}]"),
            format!("DynamicRUNext needs odd kernel sizes (\"same\" padding), got {k:?}"),
        ));
    }
    Ok((kernels, strides))
}

/// A count option that must be at least 1 (`None`: `default`).
fn at_least_one(v: Option<usize>, default: usize, path: &str) -> Result<usize, ArchError> {
    match v {
        Some(0) => Err(invalid(path, "must be at least 1")),
        Some(x) => Ok(x),
        None => Ok(default),
    }
}

/// Everything needed to build a [`DynamicRUNext`].
#[derive(Debug, Clone, PartialEq)]
pub struct RUNextConfig {
    /// Spatial dims (2 or 3).
    pub dim: usize,
    pub in_channels: usize,
    /// Segmentation output channels.
    pub num_classes: usize,
    /// Classification outputs.
    pub n_cls: usize,
    /// Encoder widths, one per level (`depth` entries).
    pub features: Vec<usize>,
    /// Bottleneck width (`2 × features[-1]`).
    pub bottleneck: usize,
    /// Kernel size per level, `depth + 1` entries (the last is the bottleneck's).
    pub kernels: Vec<Vec<usize>>,
    /// Pooling stride per level, `depth + 1` entries (`strides[0]` all ones).
    pub strides: Vec<Vec<usize>>,
    pub k_kernels: usize,
    pub dropout: f64,
    pub cls_hidden: usize,
    pub blocks: BlockOptions,
    pub deep_supervision: bool,
    pub ds_heads: bool,
}

impl RUNextConfig {
    pub fn conv_dim(&self) -> ConvDim {
        if self.dim == 2 {
            ConvDim::D2
        } else {
            ConvDim::D3
        }
    }

    /// Parses `arch_kwargs` (`path` is its JSON path, used in errors).
    pub fn from_kwargs(
        kwargs: &Map<String, Value>,
        path: &str,
        io: &NetworkIo,
    ) -> Result<Self, ArchError> {
        let key = |k: &str| format!("{path}.{k}");
        let residual = kwargs.contains_key("n_blocks_per_stage");
        let known: Vec<&str> = UNetKwargs::keys(residual)
            .iter()
            .chain(kwargs::keys::<RUNextKwargs>())
            .copied()
            .collect();
        kwargs::reject_unknown(kwargs, path, &known)?;
        let own: RUNextKwargs = kwargs::typed(kwargs, path)?;
        let plan = UNetConfig::from_typed(&UNetKwargs::parse(kwargs, path)?, path, residual, io)?;
        let dim = plan.dim().n();
        if plan.strides[0].iter().any(|&s| s != 1) {
            return Err(invalid(
                &format!("{path}.strides[0]"),
                "DynamicRUNext keeps full resolution at stage 0; strides[0] must be all ones",
            ));
        }
        let features = own.features(&plan, path)?;
        let depth = features.len();
        let bottleneck = 2 * features[depth - 1];
        let (kernels, strides) = levels(&plan, depth, path)?;
        // the up-sampling convs halve the channel count they receive
        for (u, &d_in) in std::iter::once(&bottleneck)
            .chain(features[1..].iter().rev())
            .enumerate()
        {
            if d_in < 2 {
                return Err(invalid(
                    &key("features_per_stage"),
                    format!("decoder step {u} receives {d_in} channel(s); at least 2 are needed"),
                ));
            }
        }
        let n_cls = at_least_one(
            own.num_cls,
            io.num_classes.saturating_sub(1).max(1),
            &key("num_cls"),
        )?;
        let cls_hidden = at_least_one(own.cls_hidden, 256, &key("cls_hidden"))?;
        let k_kernels = at_least_one(own.k_kernels, 4, &key("k_kernels"))?;
        let dropout = own.dropout.unwrap_or(0.3);
        if !(0.0..1.0).contains(&dropout) {
            return Err(invalid(
                &key("dropout"),
                format!("must be in [0, 1), got {dropout}"),
            ));
        }
        let ds_heads = own.deep_supervision_heads.unwrap_or(true);
        Ok(RUNextConfig {
            dim,
            in_channels: io.in_channels,
            num_classes: io.num_classes,
            n_cls,
            features,
            bottleneck,
            kernels,
            strides,
            k_kernels,
            dropout,
            cls_hidden,
            blocks: own.blocks(&plan),
            deep_supervision: io.deep_supervision,
            ds_heads,
        })
    }

    /// Spatial size of each level (`depth + 1` entries), floor division as max-pooling does.
    pub fn level_sizes(&self, patch: &[usize]) -> Vec<Vec<usize>> {
        let mut cur = patch.to_vec();
        let mut out = Vec::with_capacity(self.strides.len());
        for s in &self.strides {
            cur = cur
                .iter()
                .enumerate()
                .map(|(a, &v)| v / s.get(a).copied().unwrap_or(1).max(1))
                .collect();
            out.push(cur.clone());
        }
        out
    }
}

/// Activation estimate in nnU-Net's currency (output elements of every conv and head per
/// sample): per residual block its two convs and the 1×1 projection; per dynamic conv its one
/// aggregated output; per up step the shuffled conv output; plus the max-pooled maps (which a
/// plain U-Net's strided convs do not produce) and the segmentation heads. Concatenations are
/// not counted (nnU-Net does not count the plain U-Net's either).
#[derive(Debug, Clone, PartialEq)]
pub struct RUNextEstimate {
    pub config: RUNextConfig,
}

impl MemoryEstimate for RUNextEstimate {
    fn conv_feature_map_size(&self, patch: &[usize]) -> u64 {
        let c = &self.config;
        let sizes = c.level_sizes(patch);
        let vox = |l: usize| sizes[l].iter().map(|&v| v as u64).product::<u64>();
        let f = |l: usize| c.features[l] as u64;
        let depth = c.features.len();
        let mut total = 3 * f(0) * vox(0); // stem
        for l in 1..depth {
            total += f(l - 1) * vox(l) + f(l) * vox(l) + 3 * f(l) * vox(l);
        }
        let b = c.bottleneck as u64;
        total += f(depth - 1) * vox(depth) + b * vox(depth) + 3 * b * vox(depth);
        total += c.cls_hidden as u64 + c.n_cls as u64;
        let mut d_in = b;
        for t in (0..depth).rev() {
            total += (d_in / 2) * vox(t) + 3 * f(t) * vox(t);
            let head = t == 0 || (c.deep_supervision && c.ds_heads);
            if head {
                total += c.num_classes as u64 * vox(t);
            }
            d_in = f(t);
        }
        total
    }
}

/// Registry entry of [`DynamicRUNext`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RUNextArchitecture;

impl Architecture for RUNextArchitecture {
    fn name(&self) -> &str {
        RUNEXT
    }

    fn aliases(&self) -> Vec<String> {
        vec!["RUNext".into(), "DynamicRUNext".into(), "runext".into()]
    }

    fn build(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
        vb: VarBuilder,
    ) -> Result<Box<dyn SegNetwork>, ArchError> {
        let cfg = RUNextConfig::from_kwargs(kwargs, kwargs_path, io)?;
        let net = DynamicRUNext::new(&cfg, vb).ctx(|| format!("building {RUNEXT}"))?;
        Ok(Box::new(net))
    }

    fn estimator(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
    ) -> Result<Box<dyn MemoryEstimate>, ArchError> {
        Ok(Box::new(RUNextEstimate {
            config: RUNextConfig::from_kwargs(kwargs, kwargs_path, io)?,
        }))
    }

    fn presets(&self) -> Vec<ArchPreset> {
        let obj = |v: Value| v.as_object().cloned().unwrap_or_default();
        vec![
            ArchPreset {
                name: "runext".into(),
                description: "DynamicRUNext on the plan's stages, widths, strides, norm and \
                              nonlinearity: K=4 dynamic convs, voxel-shuffle upsampling, \
                              2×f[-1] bottleneck, classification head, deep supervision"
                    .into(),
                kwargs: obj(json!({"k_kernels": 4, "dropout": 0.3})),
            },
            ArchPreset {
                name: "runext_seed".into(),
                description: "DynamicRUNext with the seed's blocks (BatchNorm + ReLU, no \
                              deep-supervision heads) on the plan's stages and widths"
                    .into(),
                kwargs: obj(json!({
                    "k_kernels": 4, "dropout": 0.3, "block_norm": "batch",
                    "block_nonlin": "relu", "deep_supervision_heads": false
                })),
            },
        ]
    }
}

/// The architectures this module registers.
pub fn architectures() -> Vec<Arc<dyn crate::network::Architecture>> {
    vec![Arc::new(RUNextArchitecture)]
}
