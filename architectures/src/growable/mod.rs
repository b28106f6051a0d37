//! `GrowableUNet` (seed 003): the fastMRI U-Net adapted to nnU-Net plans, whose convolutions
//! gain filters while training without changing the network's function at the moment of growth.
//!
//! # Network (reference §1.6, adapted to plans)
//! - `n = n_stages` stages at the plan's resolutions (`strides[s]` per axis). Stage `s < n-1`
//!   holds `down_s` = ConvBlock [conv k=`kernel_sizes[s]` (bias = `conv_bias`) → dropout →
//!   norm → nonlin] ×2 with `features_per_stage[s]` filters; it feeds the skip and a max pool
//!   with kernel = stride = `strides[s+1]`. Stage `n-1` is the `bottleneck` ConvBlock
//!   (`features[n-2] → features[n-1]`).
//! - Decoder block `up_j` (j = 0..n-2) works at stage `t = n-2-j`: linear interpolation
//!   (bilinear/trilinear, **align_corners = True** as in the seed) to the skip's size, then
//!   `cat[up, skip]` (up first) → ConvBlock(C_up + C_skip → `features[t-1]`), the last one
//!   (t = 0) → `features[0]` (fastMRI's `2C → C/2`, last `2c → c`). Transposed convolutions are
//!   not offered (they would have to grow too).
//! - Head `conv2.{0,1,2}`: 1×1 convs C→max(C/2,1)→classes→classes with bias, no activation.
//!   With deep supervision, heads `ds_heads.{j}` (1×1, C→classes) on `up_j`'s output for
//!   j < n-2 (not built without it: the seed has none); outputs in nnU-Net order (full
//!   resolution first), at most n-1.
//! - The seed's form "chans 32, 4 pools" is `features_per_stage = [32,64,128,256,256]`,
//!   `strides = [1,2,2,2,2]`. Norm/nonlin/dropout/conv_bias come from the plan (InstanceNorm
//!   affine or not, or no norm; BatchNorm is rejected because growth would also have to extend
//!   running statistics). Every block has two convs (`n_conv_per_stage*` are accepted and
//!   ignored).
//! - Weight names follow the seed's `DynamicUnetModel`: `down_sample_layers.{i}.conv1.weight`,
//!   `...norm1.weight` (affine norms only), `conv.conv2.bias` (bottleneck),
//!   `up_sample_layers.{j}.conv1.weight`, `conv2.{0,1,2}.weight`, plus `ds_heads.{j}.weight`.
//!
//! # Own `arch_kwargs`
//! - `grown_widths`: `{"down_0": [c1, c2], "bottleneck": [c1, c2], "up_1": [c1, c2], ...}` —
//!   current filter counts of each block's two convs (missing blocks: the base widths above).
//!   [`Growable::grown_kwargs`] writes it, so a checkpoint's kwargs rebuild grown shapes.
//!
//! # Growth ([`Growable::grow`])
//! Layer names are `down_i.conv1`, `down_i.conv2`, `bottleneck.conv1`, ..., `up_j.conv2`; a
//! bare block name (`bottleneck`) means both of its convs. A grown conv gets `m` new output
//! filters (appended); every consumer gets `m` new input slices at `offset + old_width` (the
//! in-block conv2; for `down_i.conv2` the next down block after the pool *and* the decoder's
//! skip concat at offset `C_up`; for bottleneck/`up_j.conv2` the next up block after the
//! upsampling at offset 0 and the DS head; for the last up conv the head `conv2.0`).
//! - `Split`: one backward of the loss; the filter(s) with the largest weight-gradient norm are
//!   duplicated (incoming weights, bias, norm affine), the outgoing weights `w` of original and
//!   copy become `w⊙(½+δ)` and `w⊙(½−δ)` with δ ~ `noise`·N(0,1). Both channels compute the same
//!   map (InstanceNorm is per channel, so identical inputs normalise identically; pool and
//!   interpolation are per channel), so the function is unchanged *exactly*, and δ breaks the
//!   symmetry of the following gradients. `incoming_noise` > 0 adds noise to the copy's
//!   incoming weights as the seed does; that changes the function by O(noise).
//! - `SampleSelect`: N random He-normal candidates with zero outgoing weights; each is scored
//!   by the gradient norm of its **outgoing** weights (the seed scored the incoming ones, which
//!   are identically zero); the best is kept.
//! - `GradMax` (Evci et al. 2022): incoming weights 0, outgoing = top right singular vectors of
//!   `A = ∂²L/∂W_in∂W_out`, computed like growneuron's bridging conv: for each consumer, the
//!   weight gradient of a zero conv from the im2col'd grown-conv input to the consumer's output
//!   gradient. f(0) = 0 holds: conv(0) + bias 0 = 0, InstanceNorm of a constant-zero channel is
//!   (0−0)/√eps = 0 (γ=1, β=0), (Leaky)ReLU(0) = 0. f'(0) ≠ 0: the norm's Jacobian at a constant
//!   channel is the centring projection /√eps (so the input patches are centred per sample and
//!   channel before the bridging gradient), and Candle's ReLU/LeakyReLU have slope 1 at 0
//!   (PyTorch's ReLU has 0 there, which would make GradMax a no-op). Consumers reached through
//!   the max pool get zero outgoing weights (max pool is not linear at an all-zero channel);
//!   consumers through the linear upsampling are handled exactly. The vectors are scaled to the
//!   mean norm of the existing outgoing weight columns.

mod grow;
mod net;
#[cfg(test)]
mod tests;

pub use net::{GrowableConfig, GrowableUNet, GROWN_WIDTHS_KEY};

use crate::memory::MemoryEstimate;
use crate::network::{ArchError, ArchPreset, Architecture, NetworkIo, SegNetwork};
use candle_core::{Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Canonical `network_class_name`.
pub const GROWABLE_UNET: &str = "nnseg.architectures.GrowableUNet";

/// The architectures this module registers.
pub fn architectures() -> Vec<Arc<dyn Architecture>> {
    vec![Arc::new(GrowableUNetArchitecture)]
}

/// How new filters are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum GrowthMethod {
    /// Duplicate the filter(s) with the largest gradient norm.
    Split {
        /// relative asymmetry of the halved outgoing weights (function-preserving)
        noise: f64,
        /// std of noise added to the copy's incoming weights (changes the function; 0 = exact)
        incoming_noise: f64,
    },
    /// Keep the best of `n_candidates` random filters, scored by outgoing-weight gradients.
    SampleSelect { n_candidates: usize },
    /// Zero incoming weights, outgoing weights from the top singular vectors of the bridging
    /// gradient; `scale` multiplies the mean norm of the existing outgoing columns.
    GradMax { scale: f64 },
}

impl GrowthMethod {
    /// `split`, `sample_select`, `gradmax` with default settings.
    pub fn from_name(name: &str, n_candidates: usize) -> Option<Self> {
        match name {
            "split" => Some(GrowthMethod::Split {
                noise: 0.01,
                incoming_noise: 0.0,
            }),
            "sample_select" | "sample-select" => Some(GrowthMethod::SampleSelect {
                n_candidates: n_candidates.max(1),
            }),
            "gradmax" | "grad_max" => Some(GrowthMethod::GradMax { scale: 1.0 }),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            GrowthMethod::Split { .. } => "split",
            GrowthMethod::SampleSelect { .. } => "sample_select",
            GrowthMethod::GradMax { .. } => "gradmax",
        }
    }
}

/// One growth step of one conv.
#[derive(Debug, Clone)]
pub struct GrowRequest {
    /// `down_0.conv2`, `bottleneck.conv1`, ... (see [`Growable::resolve_layer`])
    pub layer: String,
    pub method: GrowthMethod,
    /// number of filters added
    pub n_new: usize,
    /// seed for candidates / noise
    pub seed: u64,
}

/// A parameter that changed shape: `count` slices were inserted along `axis` at `offset`.
/// `var` is the new variable (already in the `VarMap` under `name`).
#[derive(Debug, Clone)]
pub struct ParamChange {
    pub name: String,
    pub old_shape: Vec<usize>,
    pub new_shape: Vec<usize>,
    pub axis: usize,
    pub offset: usize,
    pub count: usize,
    pub var: Var,
}

/// What one [`Growable::grow`] call did.
#[derive(Debug, Clone)]
pub struct GrowOutcome {
    pub layer: String,
    pub method: String,
    pub old_width: usize,
    pub new_width: usize,
    /// parameters whose shapes changed (grown conv, its norm, every consumer)
    pub changes: Vec<ParamChange>,
    /// sample_select: candidate scores per added filter (outer) and candidate (inner)
    pub scores: Vec<Vec<f64>>,
    /// sample_select: chosen candidate per added filter; split: the duplicated filter indices
    pub chosen: Vec<usize>,
    /// gradmax: top singular values
    pub singular_values: Vec<f64>,
}

/// The loss callback used for gradient-based scores: the training loss of the network on a
/// fixed batch.
pub type LossFn<'a> = dyn FnMut(&dyn SegNetwork) -> candle_core::Result<Tensor> + 'a;

/// A network whose layers can gain filters while training without changing its function.
pub trait Growable {
    /// Names of the convs that can grow (`down_0.conv1`, ..., `bottleneck.conv2`, `up_0.conv1`, ...).
    fn growable_layers(&self) -> Vec<String>;
    /// A layer name or a bare block name (`bottleneck` = both of its convs) → conv names.
    fn resolve_layer(&self, name: &str) -> Result<Vec<String>, ArchError>;
    /// Current filter count of every growable conv.
    fn widths(&self) -> Vec<(String, usize)>;
    /// Widens one conv. Variables are replaced in `varmap` under the same names (new `Var`s);
    /// the outcome says which parameters changed shape and where the new slices are, so an
    /// optimizer can extend its state.
    fn grow(
        &mut self,
        req: &GrowRequest,
        varmap: &VarMap,
        loss: &mut LossFn<'_>,
    ) -> Result<GrowOutcome, ArchError>;
    /// `arch_kwargs` entries that rebuild the network with its current (grown) widths (merge
    /// them over the configuration's kwargs).
    fn grown_kwargs(&self) -> Map<String, Value>;
}

/// The growth ability of `network`, if it has one (a [`GrowableUNet`]).
pub fn as_growable(network: &mut dyn SegNetwork) -> Option<&mut dyn Growable> {
    let any: &mut dyn std::any::Any = network;
    any.downcast_mut::<GrowableUNet>()
        .map(|n| n as &mut dyn Growable)
}

/// Whether `network` can grow (see [`as_growable`]).
pub fn is_growable(network: &dyn SegNetwork) -> bool {
    let any: &dyn std::any::Any = network;
    any.is::<GrowableUNet>()
}

/// Registry entry of [`GrowableUNet`].
#[derive(Debug, Clone, Copy)]
pub struct GrowableUNetArchitecture;

impl Architecture for GrowableUNetArchitecture {
    fn name(&self) -> &str {
        GROWABLE_UNET
    }
    fn aliases(&self) -> Vec<String> {
        vec!["GrowableUNet".into(), "growable_unet".into()]
    }
    fn build(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
        vb: VarBuilder,
    ) -> Result<Box<dyn SegNetwork>, ArchError> {
        let cfg = GrowableConfig::from_kwargs(kwargs, kwargs_path, io)?;
        Ok(Box::new(GrowableUNet::new(&cfg, vb)?))
    }
    fn estimator(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
    ) -> Result<Box<dyn MemoryEstimate>, ArchError> {
        Ok(Box::new(GrowableConfig::from_kwargs(
            kwargs,
            kwargs_path,
            io,
        )?))
    }
    fn presets(&self) -> Vec<ArchPreset> {
        vec![ArchPreset {
            name: "growable_unet".into(),
            description: "fastMRI-style U-Net on the plan's stages (InstanceNorm, linear \
                          upsampling) whose convs can gain filters during training \
                          (--grow-every / --grow-layers / --grow-method)"
                .into(),
            kwargs: json!({ GROWN_WIDTHS_KEY: {} })
                .as_object()
                .cloned()
                .unwrap_or_default(),
        }]
    }
}
