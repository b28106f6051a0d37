//! KiU-Net (Valanarasu et al.) for nnU-Net plans, 2D or 3D: a U-Net branch built exactly like
//! nnU-Net's stages, an overcomplete Ki-Net branch that *up*samples in its encoder, and
//! cross-refinement blocks (CRFBs) exchanging features between the two at every stage.
//!
//! Canonical name `nnseg.architectures.KiUNet` (aliases `KiUNet`, `kiunet`, and the seed's
//! `nnunetv2.architecture.custom.kiunet.DynamicKiUNet` / `DynamicKiUNet`). The weight names
//! are the seed's PyTorch state_dict names (`unet_encoder.{s}.{i}.{j}`, `kinet_encoder.{s}.{j}`,
//! `crfb_encoder.{s}.unet_to_kinet`, `unet_transpconvs.{j}`, `kinet_downsample.{j}`,
//! `unet_seg_head`, `unet_deep_supervision_heads.{j}`, ...), conv stacks flattened as one
//! `nn.Sequential` (conv, [dropout], norm, nonlin, conv, ...).
//!
//! # Network (default form)
//! - **U-Net branch**: nnU-Net's encoder stages (`kernel_sizes`, per-axis `strides`,
//!   `n_conv_per_stage`, norm / dropout / nonlin from the plan); `pool_type` `"conv"` (strided
//!   first conv, default), `"max"` or `"avg"` (pool by the stride, then stride-1 convs).
//!   Decoder: transposed conv (kernel = stride) → concat skip → conv stack, as nnU-Net.
//! - **Ki-Net branch**: stride-1 conv stacks; after stage `s < n-1` the maps are upsampled
//!   (linear, `align_corners=False`) by the U-Net stride of stage `s+1` on the *upsampling
//!   axes*, capped at `kinet_max_scale` (2) × the input. By default the upsampling axes are
//!   those the plan's first downsampling stride reduces (the fine-spacing axes): for an
//!   anisotropic plan whose strides start `[1,2,2]` the Ki-Net is upsampled in-plane only.
//!   Decoder: strided conv that exactly undoes the encoder's upsampling → concat skip → conv
//!   stack; the branch ends at its level-0 size and its logits are resized to the input.
//! - **CRFB** at every encoder stage *and* after every decoder stage:
//!   `u' = norm(u + conv1×1(resize(k → u)))`, `k' = norm(k + conv1×1(resize(u → k)))`
//!   (the seed's block: 1×1 convs with bias, the plan's norm, no activation).
//! - **Skips** are taken after the CRFB (as in the original KiU-Net).
//! - **Output**: `(unet_seg_head(u) + resize(kinet_seg_head(k))) / 2`. Deep supervision: U-Net
//!   heads on decoder stages 1..n-2, nnU-Net order (full resolution first), `n_stages - 1`
//!   outputs. The heads are built only with deep supervision (the seed has none without it),
//!   so the network without it has exactly the seed's parameters.
//! - Ki-Net widths default to a quarter of the U-Net widths (at least 2).
//!
//! # KiU-Net keys in `arch_kwargs` (all optional; standard PlainConvUNet keys are required)
//! - `form`: `"default"` | `"seed"` — `"seed"` changes the defaults of the four keys below
//!   to the seed's `DynamicKiUNet` (reversed widths, skips before CRFB, decoder CRFBs built but
//!   unused, seed sizing). Explicit keys still win.
//! - `kinet_widths`: `"quarter"` (default) | `"half"` | `"same"` | `"reversed"` (seed:
//!   U-Net widths reversed) | `"narrow"` (every stage `features_per_stage[0] / 4`, the
//!   cheapest overcomplete branch: ≈5× PlainConvUNet's activations on a 3D plan instead of
//!   ≈16× for `"quarter"`) | a number in (0, 4] (fraction of the U-Net widths) | a list of
//!   `n_stages` integers.
//! - `kinet_min_width`: integer ≥ 1 (default 2), the floor of fractional widths.
//! - `feature_scale`: number in (0, 64] multiplying `features_per_stage` (presets).
//! - `pool_type`: `"conv"` | `"max"` | `"avg"`.
//! - `skip_before_crfb`: bool (default false; the seed stores skips before the CRFB).
//! - `decoder_crfb`: `true` (default) | `false` | `"unused"` (the seed: built, never called).
//! - `kinet_sizing`: `"mirror"` (default, above) | `"seed"` (×2 per stage on every axis while
//!   all axes are below the cap; decoder `Conv(k, stride=strides[s], padding=1)` with resized
//!   skips, ending at input / 2^(n-2)).
//! - `kinet_upsample_axes`: `"auto"` (default) | `"all"` | a list of booleans per axis
//!   (mirror sizing only).
//! - `kinet_max_scale`: integer 1..=16 (default 2), the cap as a multiple of the input size.
//!
//! The seed exactly (fixture `kiunet2d_f4`): `{"form": "seed"}`, i.e. `kinet_widths:
//! "reversed", skip_before_crfb: true, decoder_crfb: "unused", kinet_sizing: "seed"`.

pub mod config;
pub mod estimate;
pub mod net;

#[cfg(test)]
mod tests;

pub use config::{
    kiunet_keys, DecoderCrfb, Form, KiNetSizing, KiNetWidths, KiUNetConfig, KiUNetKwargs, PoolType,
    UpsampleAxes,
};
pub use estimate::KiUNetEstimate;
pub use net::KiUNet;

use crate::memory::MemoryEstimate;
use crate::network::{ArchError, ArchPreset, Architecture, CandleContext, NetworkIo, SegNetwork};
use candle_nn::VarBuilder;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Canonical `network_class_name`.
pub const KIUNET: &str = "nnseg.architectures.KiUNet";

/// Registry entry of [`KiUNet`].
#[derive(Debug, Clone, Copy, Default)]
pub struct KiUNetArchitecture;

impl KiUNetArchitecture {
    pub fn config(
        &self,
        kwargs: &Map<String, Value>,
        path: &str,
        io: &NetworkIo,
    ) -> Result<KiUNetConfig, ArchError> {
        KiUNetConfig::from_kwargs(
            kwargs,
            path,
            io.in_channels,
            io.num_classes,
            io.deep_supervision,
        )
    }
}

fn preset(name: &str, description: &str, kwargs: Value) -> ArchPreset {
    ArchPreset {
        name: name.into(),
        description: description.into(),
        kwargs: kwargs.as_object().cloned().unwrap_or_default(),
    }
}

impl Architecture for KiUNetArchitecture {
    fn name(&self) -> &str {
        KIUNET
    }

    fn aliases(&self) -> Vec<String> {
        vec![
            "KiUNet".into(),
            "kiunet".into(),
            "DynamicKiUNet".into(),
            "nnunetv2.architecture.custom.kiunet.DynamicKiUNet".into(),
        ]
    }

    fn build(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
        vb: VarBuilder,
    ) -> Result<Box<dyn SegNetwork>, ArchError> {
        let cfg = self.config(kwargs, kwargs_path, io)?;
        Ok(Box::new(
            KiUNet::new(&cfg, vb).ctx(|| format!("building {KIUNET}"))?,
        ))
    }

    fn estimator(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
    ) -> Result<Box<dyn MemoryEstimate>, ArchError> {
        Ok(Box::new(KiUNetEstimate {
            config: self.config(kwargs, kwargs_path, io)?,
        }))
    }

    fn presets(&self) -> Vec<ArchPreset> {
        vec![
            preset(
                "kiunet",
                "KiU-Net, default form: plan features, Ki-Net widths = U-Net widths / 4, \
                 in-plane 2x-capped Ki-Net upsampling on anisotropic plans, CRFBs in encoder \
                 and decoder, skips after the CRFB",
                json!({}),
            ),
            preset(
                "kiunet_minimal",
                "KiU-Net with 50% of the plan's features (seed's kiunet_minimal)",
                json!({"feature_scale": 0.5}),
            ),
            preset(
                "kiunet_large",
                "KiU-Net with the plan's full features and Ki-Net widths = U-Net widths / 2",
                json!({"kinet_widths": "half"}),
            ),
            preset(
                "kiunet_seed",
                "the seed's DynamicKiUNet exactly (reversed Ki-Net widths, skips before the \
                 CRFB, decoder CRFBs unused); very memory-hungry in 3D",
                json!({"form": "seed"}),
            ),
        ]
    }
}

/// The architectures this module registers.
pub fn architectures() -> Vec<Arc<dyn Architecture>> {
    vec![Arc::new(KiUNetArchitecture)]
}
