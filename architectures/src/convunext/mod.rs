//! ConvUNext (seed 002): a U-Net of ConvNeXt V1/V2 blocks, in 2D or 3D, built from an nnU-Net
//! plan.
//!
//! Registered as `nnseg.architectures.ConvUNext` (aliases `ConvUNext`, `convunext`); trainer
//! presets `convunext_tiny|small|base|large|xlarge` (the seed's variant table).
//!
//! # Network (reference: `architectures.md` §1.2; weight names = the fixture's state_dict)
//! - `stem.0` Conv k×k (in→F0, stride 1, "same") → `stem.1` channels-first LayerNorm (ε 1e-6).
//! - Encoder level `l < depth`: `enc.{l}.{b}` blocks at `F_l`, the skip is saved, then MaxPool
//!   with kernel = stride = the plan's `strides[l+1]` (anisotropic factors such as `[1,2,2]`
//!   are honoured) → 1×1 conv `down.{l}` (`bn_adjust` below the last level).
//! - `bottleneck.{b}` blocks at `F_depth`.
//! - Decoder stage `i` (level `l = depth-1-i`): bilinear/trilinear upsampling to the skip's size
//!   (`align_corners=False`) → `cat[skip, up]` → 1×1 `dec_adjust.{i}` → `dec.{i}.{b}` blocks.
//! - `final`: 1×1 conv to the classes (logits). Deep-supervision heads `heads.{i}` on decoder
//!   levels `depth-1 ..= 1`: Conv1×1(F→F/2) → GRN → GELU → Conv1×1(→classes). Outputs with deep
//!   supervision: `[full, 1/strides[1], …]` (`depth` outputs, nnU-Net order); the heads are
//!   built only with deep supervision (as the seed), so a network without it has exactly the
//!   seed's parameters; a checkpoint trained with heads still loads for inference (its head
//!   weights are not read).
//! - Block: depthwise k×k conv → LayerNorm → 1×1 (C→E·C) → GELU (exact erf) → GRN (V2 only) →
//!   1×1 (E·C→C), then per `block_form`:
//!   - `"paper"` (default, facebookresearch ConvNeXt-V2): `x + DropPath(block(x))`, GRN γ = β = 0
//!     at init, no block γ in V2 (`8C²+65C` params at k=7, E=4, 2D); V1 has LayerScale γ = 1e-6
//!     (`8C²+58C`);
//!   - `"residual"` (the seed after its upstream fix; the fixture
//!     `convunext_f8_d3_b2_v2_ds_residual`): `x + DropPath(γ·block(x))`, γ per channel init 1,
//!     projected to [0, 1], GRN γ = 1 at init (`8C²+66C`);
//!   - `"seed"` (seed commit 856b28d0 as written): `γ·block(x)`, **no residual**, plain dropout
//!     after GRN instead of drop path, γ init 1 projected to [0, 1].
//!
//!   GRN always uses the seed's formula `N = sqrt(Σ x² + ε)/(mean_c + ε)`, `y = x + γ(xN) + β`
//!   (ε inside the root: no infinite gradient at an all-zero channel; otherwise identical to the
//!   paper's). The γ projection is done in the forward pass with a straight-through gradient.
//! - Drop rates: block `(l, b)` gets `rate·(l·bpl+b)/(depth·bpl)`, the decoder mirrors the
//!   encoder, the bottleneck gets the full rate.
//! - Initialisation (through the registry's seeded backend): He normal (a=1e-2) conv weights,
//!   zero biases, LN weight 1, γ/GRN values as above.
//!
//! # `arch_kwargs`
//! The standard keys of a PlainConvUNet (or ResidualEncoderUNet) plan are required and checked
//! as for those networks: `conv_op` decides 2D/3D, `strides` give the pooling/upsampling
//! factors (`strides[0]` must be all 1), `kernel_sizes` the kernel anisotropy,
//! `features_per_stage` the channels when no width is given. `norm_op`, `nonlin`, `dropout_op`
//! and `conv_bias` are accepted but not used (ConvUNext has its own LN/GELU/bias switches).
//! ConvUNext keys (all optional):
//! - `variant`: `"tiny" | "small" | "base" | "large" | "xlarge"` (depth, F0, blocks per level,
//!   drop-path rate from the seed table; explicit keys below override it);
//! - `depth` (number of poolings; default: the variant's, clipped to `n_stages - 1`, else
//!   `n_stages - 1`; an explicit value must be ≤ `n_stages - 1`); `initial_filters` (channels `F0·2^l`; default variant's, else the plan's
//!   `features_per_stage[..=depth]`); `blocks_per_level` (default 2); `drop_path_rate` (0);
//! - `convnext_version`: `"v2"` (default) | `"v1"`; `block_form`: `"paper"` (default) |
//!   `"residual"` | `"seed"`; `use_bias` (true; false = bias-free: no conv biases except the
//!   output heads, no LayerNorm β, no GRN β);
//! - `dw_kernel`, `stem_kernel`: odd int or per-axis list (default 7). Each axis where the
//!   plan's kernel is 1 at that level gets 1 (e.g. 1×7×7 where the plan has 1×3×3);
//! - `expansion` (4) and `expansion_level0` (expansion at full resolution; default 4 in 2D and
//!   **1 in 3D**, see below).
//!
//! # 3D memory
//! ConvNeXt blocks spend little compute but keep many full-resolution tensors for backward: the
//! E·C-channel pw1, GELU and GRN outputs of each block dominate (reference §3: a 3D "tiny" at
//! 128³ keeps ~8× the activations of nnU-Net's plain U-Net). Gradient checkpointing is not
//! available with Candle's autograd, so the bound is structural: in 3D the inverted bottleneck
//! at level 0 is not expanded by default (`expansion_level0 = 1`; levels ≥ 1 keep 4×), which cuts
//! a level-0 block from 16·C to 7·C stored elements per voxel. Set `expansion_level0: 4` for
//! the spec form. GRN is computed as `x·(1+γN)+β` with the norms from a batched dot product, so
//! it keeps two E·C tensors instead of five.
//!
//! On CPU (f32) the depthwise convolution and the channels-first LayerNorm run as direct
//! kernels of this module (`fast`: no k³ im2col copies, no LN intermediates kept for backward),
//! with explicit backward passes tested against the generic ops; other devices use `crate::ops`.
//!
//! The [`MemoryEstimate`] counts the stored tensors of every layer (the `stored_activations`
//! of [`SegNetwork::layers`]: conv, LN, pw1, GELU, GRN, pw2 and block outputs, pooled maps,
//! upsampled maps, concatenations, head intermediates) and divides by 2: nnU-Net's currency
//! counts one element per conv output, and a plain nnU-Net conv keeps two tensors (conv and
//! norm output; the LeakyReLU is in place), so one unit = two stored elements. It therefore
//! follows `expansion_level0`, `dw_kernel` does not matter, and deep supervision adds its heads.

mod config;
pub(crate) mod fast;
mod net;
#[cfg(test)]
mod tests;

pub use config::{
    own_keys, BlockForm, BlockVersion, ConvUNextConfig, ConvUNextKwargs, Variant, VARIANTS,
};
pub use net::{CConv, CnxBlock, ConvUNext, DsHead, Grn, LayerNormCf};

use crate::init::ShapeRecorder;
use crate::memory::MemoryEstimate;
use crate::network::{
    ArchError, ArchPreset, Architecture, CandleContext, LayerRow, NetworkIo, SegNetwork,
};
use crate::unet::blocks::check_input;
use crate::unet::options::ConvDim;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde_json::{Map, Value};
use std::sync::Arc;

/// Canonical `network_class_name`.
pub const CONVUNEXT: &str = "nnseg.architectures.ConvUNext";

/// Stored activation elements per unit of nnU-Net's `compute_conv_feature_map_size`.
pub const STORED_PER_UNIT: u64 = 2;

impl SegNetwork for ConvUNext {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let dim = if self.config.dim == 2 {
            ConvDim::D2
        } else {
            ConvDim::D3
        };
        check_input(x, dim, self.config.input_channels, "ConvUNext")?;
        ConvUNext::forward(self, x, train)
    }
    fn set_deep_supervision(&mut self, on: bool) {
        self.set_deep_supervision_outputs(on);
    }
    fn deep_supervision(&self) -> bool {
        self.deep_supervision_outputs()
    }
    fn spatial_dims(&self) -> usize {
        self.config.dim
    }
    fn layers(&self, patch: &[usize]) -> Vec<LayerRow> {
        ConvUNext::layers(self, patch)
    }
}

/// Stored activations of the layer table (elements, one sample).
pub fn stored_elements(rows: &[LayerRow]) -> u64 {
    rows.iter()
        .map(|r| {
            r.output_shape.iter().map(|&v| v as u64).product::<u64>() * r.stored_activations as u64
        })
        .sum()
}

/// The estimator: a shape-only ConvUNext whose layer table is summed.
#[derive(Debug)]
pub struct ConvUNextEstimate {
    net: ConvUNext,
}

impl ConvUNextEstimate {
    pub fn new(cfg: &ConvUNextConfig) -> std::result::Result<Self, ArchError> {
        let rec = ShapeRecorder::new();
        let vb = VarBuilder::from_backend(Box::new(rec), DType::F32, Device::Cpu);
        let net = ConvUNext::new(cfg, vb).ctx(|| "building ConvUNext (shapes only)".into())?;
        Ok(ConvUNextEstimate { net })
    }
}

impl MemoryEstimate for ConvUNextEstimate {
    fn conv_feature_map_size(&self, patch: &[usize]) -> u64 {
        stored_elements(&self.net.layers(patch)) / STORED_PER_UNIT
    }
}

/// Registry entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvUNextArchitecture;

impl Architecture for ConvUNextArchitecture {
    fn name(&self) -> &str {
        CONVUNEXT
    }
    fn aliases(&self) -> Vec<String> {
        vec!["ConvUNext".into(), "convunext".into()]
    }
    fn build(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
        vb: VarBuilder,
    ) -> std::result::Result<Box<dyn SegNetwork>, ArchError> {
        let cfg = ConvUNextConfig::from_kwargs(kwargs, kwargs_path, io)?;
        Ok(Box::new(
            ConvUNext::new(&cfg, vb).ctx(|| format!("building {CONVUNEXT}"))?,
        ))
    }
    fn estimator(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
    ) -> std::result::Result<Box<dyn MemoryEstimate>, ArchError> {
        let cfg = ConvUNextConfig::from_kwargs(kwargs, kwargs_path, io)?;
        Ok(Box::new(ConvUNextEstimate::new(&cfg)?))
    }
    fn presets(&self) -> Vec<ArchPreset> {
        VARIANTS
            .iter()
            .map(|v| {
                let mut kwargs = Map::new();
                kwargs.insert("variant".into(), Value::from(v.name));
                ArchPreset {
                    name: format!("convunext_{}", v.name),
                    description: format!(
                        "ConvUNext {} (ConvNeXt V2, paper-form residual blocks): depth {}, F0 {}, \
                         {} blocks/level, drop path {}",
                        v.name, v.depth, v.initial_filters, v.blocks_per_level, v.drop_path_rate
                    ),
                    kwargs,
                }
            })
            .collect()
    }
}

/// The architectures this module registers.
pub fn architectures() -> Vec<Arc<dyn Architecture>> {
    vec![Arc::new(ConvUNextArchitecture)]
}
