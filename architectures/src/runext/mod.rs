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

use crate::memory::MemoryEstimate;
use crate::network::{ArchError, ArchPreset, Architecture, CandleContext, NetworkIo, SegNetwork};
use crate::unet::options::{invalid, ConvDim, Nonlin, NormKind, NormOptions, UNetConfig};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Canonical `network_class_name`.
pub const RUNEXT: &str = "nnseg.architectures.RUNext";

/// The keys this module reads besides the standard nnU-Net ones.
const OWN_KEYS: &[&str] = &[
    "base_channels",
    "depth",
    "feature_scale",
    "num_cls",
    "cls_hidden",
    "k_kernels",
    "dropout",
    "block_norm",
    "block_nonlin",
    "deep_supervision_heads",
];

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
        let standard: Map<String, Value> = kwargs
            .iter()
            .filter(|(k, _)| !OWN_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let residual = standard.contains_key("n_blocks_per_stage");
        let plan = UNetConfig::from_kwargs(
            &standard,
            path,
            residual,
            io.in_channels,
            io.num_classes,
            io.deep_supervision,
        )?;
        let dim = plan.dim().n();
        let n = plan.n_stages();
        if plan.strides[0].iter().any(|&s| s != 1) {
            return Err(invalid(
                &format!("{path}.strides[0]"),
                "DynamicRUNext keeps full resolution at stage 0; strides[0] must be all ones",
            ));
        }
        let depth = match opt_usize(kwargs, "depth", &key("depth"))? {
            Some(0) => return Err(invalid(&key("depth"), "must be at least 1")),
            Some(d) => d,
            None => {
                if n < 2 {
                    return Err(invalid(
                        &key("n_stages"),
                        "DynamicRUNext needs at least 2 stages (or an explicit `depth`)",
                    ));
                }
                n - 1
            }
        };
        let base = opt_usize(kwargs, "base_channels", &key("base_channels"))?;
        if base == Some(0) {
            return Err(invalid(&key("base_channels"), "must be at least 1"));
        }
        let scale = opt_f64(kwargs, "feature_scale", &key("feature_scale"))?.unwrap_or(1.0);
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(invalid(
                &key("feature_scale"),
                format!("must be a positive number, got {scale}"),
            ));
        }
        let mut features: Vec<usize> = Vec::with_capacity(depth);
        for i in 0..depth {
            let f = match base {
                Some(b) => b << i.min(40),
                None => match plan.features_per_stage.get(i) {
                    Some(&f) => f,
                    None => 2 * features[i - 1],
                },
            };
            features.push(f);
        }
        let features: Vec<usize> = features
            .iter()
            .map(|&f| ((f as f64 * scale).round() as usize).max(1))
            .collect();
        let bottleneck = 2 * features[depth - 1];
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
        let n_cls = match opt_usize(kwargs, "num_cls", &key("num_cls"))? {
            Some(0) => return Err(invalid(&key("num_cls"), "must be at least 1")),
            Some(c) => c,
            None => io.num_classes.saturating_sub(1).max(1),
        };
        let cls_hidden = match opt_usize(kwargs, "cls_hidden", &key("cls_hidden"))? {
            Some(0) => return Err(invalid(&key("cls_hidden"), "must be at least 1")),
            Some(c) => c,
            None => 256,
        };
        let k_kernels = match opt_usize(kwargs, "k_kernels", &key("k_kernels"))? {
            Some(0) => return Err(invalid(&key("k_kernels"), "must be at least 1")),
            Some(k) => k,
            None => 4,
        };
        let dropout = opt_f64(kwargs, "dropout", &key("dropout"))?.unwrap_or(0.3);
        if !(0.0..1.0).contains(&dropout) {
            return Err(invalid(
                &key("dropout"),
                format!("must be in [0, 1), got {dropout}"),
            ));
        }
        let norm = match opt_str(kwargs, "block_norm", &key("block_norm"))? {
            None | Some("plan") => plan.block.norm.clone(),
            Some("batch") => Some(NormOptions {
                kind: NormKind::Batch,
                eps: 1e-5,
                affine: true,
                momentum: 0.1,
            }),
            Some("instance") => Some(NormOptions {
                kind: NormKind::Instance,
                eps: 1e-5,
                affine: true,
                momentum: 0.1,
            }),
            Some("none") => None,
            Some(other) => {
                return Err(invalid(
                    &key("block_norm"),
                    format!("unknown `{other}`; allowed: plan, batch, instance, none"),
                ))
            }
        };
        let nonlin = match opt_str(kwargs, "block_nonlin", &key("block_nonlin"))? {
            None | Some("plan") => plan.block.nonlin,
            Some("relu") => Some(Nonlin::Relu),
            Some("leaky_relu") => Some(Nonlin::LeakyRelu {
                negative_slope: 1e-2,
            }),
            Some(other) => {
                return Err(invalid(
                    &key("block_nonlin"),
                    format!("unknown `{other}`; allowed: plan, relu, leaky_relu"),
                ))
            }
        };
        let ds_heads = match kwargs.get("deep_supervision_heads") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(invalid(
                    &key("deep_supervision_heads"),
                    format!("expected true or false, got {v}"),
                ))
            }
        };
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
            blocks: BlockOptions { norm, nonlin },
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

fn opt_usize(m: &Map<String, Value>, k: &str, path: &str) -> Result<Option<usize>, ArchError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|u| Some(u as usize))
            .ok_or_else(|| invalid(path, format!("expected a non-negative integer, got {v}"))),
    }
}

fn opt_f64(m: &Map<String, Value>, k: &str, path: &str) -> Result<Option<f64>, ArchError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid(path, format!("expected a number, got {v}"))),
    }
}

fn opt_str<'a>(
    m: &'a Map<String, Value>,
    k: &str,
    path: &str,
) -> Result<Option<&'a str>, ArchError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(invalid(path, format!("expected a string, got {v}"))),
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
