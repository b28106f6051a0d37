//! Pre-activation residual U-Net ("Joe Net 1", seed 004), 2D or 3D from any nnU-Net plan.
//!
//! # Design (reference §1.5; the seed is design text only, so there is no upstream code)
//! - **Blocks** `PreActRes(i→o) = conv2(act(norm2(conv1(act(norm1 x))))) + (x | skip(x))`:
//!   ResNet-v2 pre-activation, both convs with the plan's kernel of that resolution and no bias;
//!   the shortcut is the identity when `i == o` and a bias-free 1×1 projection otherwise.
//! - **Encoder**: no stem. Stage `s` = [down-sampling by `strides[s]` if it is not all ones] →
//!   `n_blocks_per_stage[s]` PreActRes blocks (the first `C_{s-1}→C_s`). Down-sampling is a
//!   max-pool with kernel = stride (`downsample: "maxpool"`, the default) or a learned
//!   `Conv(C→C, kernel = stride, stride, bias)` (`"conv"`); per-axis strides are honoured.
//! - **Bottleneck**: the last stage's blocks are followed by a ConvNeXt-style block
//!   `x + Conv1×1(GELU(norm(DW(GELU(norm x)))))` (depthwise and 1×1 with bias). The depthwise
//!   kernel is `bottleneck_kernel` (7) on every axis where the plan's bottleneck kernel is > 1
//!   and 1 elsewhere (a plan kernel `[1,3,3]` gives `[1,7,7]`).
//! - **Decoder** (from the bottleneck up, nnU-Net order): `ConvTranspose(kernel = stride =
//!   strides[s], C_s→C_{s-1}, bias)` → `cat[up, skip]` → `n_blocks_per_stage_decoder` PreActRes
//!   blocks (the first `2C→C` with projection) → 1×1 segmentation head (bias, no final
//!   norm/activation). Deep supervision: one head per decoder stage, outputs full resolution
//!   first, `n_stages - 1` of them; without deep supervision only the full-resolution head is
//!   built (as the seed).
//!
//! With the seed's 2D configuration (1 input channel, `[32, 64, 128, 256]`, 2 classes,
//! max-pool, 3×3 kernels) the network has 2,092,068 parameters without deep supervision, the
//! reference's "≈2.1M" (deep supervision adds the two low-resolution heads, +388).
//!
//! # `arch_kwargs`
//! The standard nnU-Net keys of a `PlainConvUNet` / `ResidualEncoderUNet` plan are accepted:
//! `n_stages`, `features_per_stage`, `conv_op` (2D/3D), `kernel_sizes`, `strides` (used);
//! `norm_op(_kwargs)` (norm family and eps/momentum when `norm` is not given), `nonlin(_kwargs)`
//! (activation when `activation` is not given), `dropout_op(_kwargs)` (dropout between the two
//! convs of a block), `n_blocks_per_stage` (blocks per encoder stage, default 1);
//! `n_conv_per_stage(_decoder)`, `conv_bias`, `nonlin_first`, `deep_supervision`, `block`,
//! `bottleneck_channels`, `stem_channels` are accepted and ignored (blocks always have two
//! bias-free convs in pre-activation order). Own keys:
//! - `norm`: `"instance"` | `"batch"` — default: the plan's `norm_op` family (InstanceNorm in
//!   every nnU-Net plan), else instance. Always affine.
//! - `activation`: `"leaky_relu"` (0.01) | `"gelu"` — default: the plan's `nonlin`, else LeakyReLU.
//! - `downsample`: `"maxpool"` (default) | `"conv"`.
//! - `n_blocks_per_stage_decoder`: int or `n_stages - 1` ints (default 1).
//! - `convnext_bottleneck`: bool (default true); `bottleneck_kernel`: odd int (default 7).
//!
//! Unknown keys are errors naming their JSON path (`architecture.arch_kwargs.<key>`).
//!
//! # Why instance norm by default (the seed says BatchNorm)
//! The seed plans batch size 16–32 of 2D 256² crops, where batch statistics are stable.
//! nnU-Net trains 3D configurations with batch size 2 (2D often 12+ but with foreground
//! oversampling): BatchNorm statistics over two correlated patches are noisy, and eval mode then
//! switches to running statistics that differ from the training-time per-batch statistics
//! (sliding-window patches with very different content), a classic source of train/inference
//! mismatch. nnU-Net itself uses InstanceNorm for this reason, so the default follows the plan;
//! `norm: "batch"` (preset `preact_resunet_bn`) reproduces the seed exactly. Both have the
//! same parameter count (affine γ, β; BN's running statistics are buffers).
//!
//! # Memory estimate
//! The estimator counts, per sample, the elements of the distinct tensors PyTorch autograd
//! keeps for this network (per block: norm1 and activation outputs at the input width, conv1 /
//! norm2 / activation outputs and the block output at the output width; pool/down outputs;
//! concatenations; ConvNeXt: 6 tensors; head outputs) and halves the sum: nnU-Net's
//! `compute_conv_feature_map_size` counts one tensor per conv+norm+in-place-nonlin layer where
//! PyTorch keeps two, so halving puts this network in the same currency. Against
//! `PlainConvUNet` (3D 128³, `[32..256]`) this gives ×1.44 (reference §3 measured ×1.45).
//! The layer table ([`SegNetwork::layers`]) follows the dna blocks' table convention instead
//! (every conv, norm, nonlinearity, add, pool, transposed-conv and concat output counts), so
//! `show_network` totals compare across architectures (×1.50 of the plain table there).

pub mod blocks;
pub mod config;

#[cfg(test)]
mod tests;

use self::blocks::{ConvNeXtBlock, Down, PConv, PreActRes};
pub use self::config::{Downsample, PreActConfig};
use crate::memory::MemoryEstimate;
use crate::network::{
    ArchError, ArchPreset, Architecture, CandleContext, LayerRow, NetworkIo, SegNetwork,
};
use crate::unet::blocks::{check_input, TransposedConv};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Canonical `network_class_name`.
pub const PREACT_RESUNET: &str = "nnseg.architectures.PreActResUNet";

/// The pre-activation residual U-Net. state_dict names:
/// `encoder.stages.{s}.down.*` (conv down-sampling only), `encoder.stages.{s}.blocks.{b}.*`,
/// `encoder.stages.{n-1}.convnext.*`, `decoder.transpconvs.{i}.*`,
/// `decoder.stages.{i}.blocks.{b}.*`, `decoder.seg_layers.{i}.*` (`i = 0` at the bottleneck;
/// without deep supervision only the full-resolution `seg_layers.{n-2}` is built, as the seed's
/// single head).
#[derive(Debug)]
pub struct PreActResUNet {
    pub config: PreActConfig,
    down: Vec<Option<Down>>,
    enc_blocks: Vec<Vec<PreActRes>>,
    convnext: Option<ConvNeXtBlock>,
    transpconvs: Vec<TransposedConv>,
    dec_blocks: Vec<Vec<PreActRes>>,
    /// One head per decoder stage; the low-resolution ones only with deep supervision.
    seg_layers: Vec<Option<PConv>>,
    /// The low-resolution heads' outputs are returned.
    ds_outputs: bool,
}

fn is_ones(v: &[usize]) -> bool {
    v.iter().all(|&s| s == 1)
}

impl PreActResUNet {
    #[allow(clippy::needless_range_loop)] // parallel per-stage lists
    pub fn new(cfg: &PreActConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.n_stages();
        let dn = cfg.dim.n();
        if n < 2
            || cfg.kernel_sizes.len() != n
            || cfg.strides.len() != n
            || cfg.n_blocks_per_stage.len() != n
            || cfg.n_blocks_per_stage_decoder.len() + 1 != n
            || cfg
                .kernel_sizes
                .iter()
                .chain(&cfg.strides)
                .any(|v| v.len() != dn)
        {
            candle_core::bail!(
                "PreActResUNet: inconsistent config ({n} stages; kernel_sizes, strides and \
                 n_blocks_per_stage need {n} entries of {dn} axes, n_blocks_per_stage_decoder {})",
                n.saturating_sub(1)
            );
        }
        let f = &cfg.features_per_stage;
        let venc = vb.pp("encoder").pp("stages");
        let (mut down, mut enc_blocks) = (vec![], vec![]);
        let mut cin = cfg.input_channels;
        for s in 0..n {
            let vs = venc.pp(s);
            down.push(if is_ones(&cfg.strides[s]) {
                None
            } else {
                Some(Down::new(
                    cfg.downsample,
                    cin,
                    &cfg.strides[s],
                    vs.pp("down"),
                )?)
            });
            let mut blocks = vec![];
            for b in 0..cfg.n_blocks_per_stage[s] {
                let i = if b == 0 { cin } else { f[s] };
                blocks.push(PreActRes::new(
                    i,
                    f[s],
                    &cfg.kernel_sizes[s],
                    &cfg.norm,
                    cfg.nonlin,
                    cfg.dropout,
                    vs.pp("blocks").pp(b),
                )?);
            }
            enc_blocks.push(blocks);
            cin = f[s];
        }
        let convnext = if cfg.convnext_bottleneck {
            Some(ConvNeXtBlock::new(
                f[n - 1],
                &cfg.dw_kernel(),
                &cfg.norm,
                venc.pp(n - 1).pp("convnext"),
            )?)
        } else {
            None
        };
        let vdec = vb.pp("decoder");
        let ones = vec![1; dn];
        let (mut transpconvs, mut dec_blocks, mut seg_layers) = (vec![], vec![], vec![]);
        for i in 0..n - 1 {
            let level = n - 2 - i;
            let c = f[level];
            transpconvs.push(TransposedConv::new(
                f[level + 1],
                c,
                &cfg.strides[level + 1],
                true,
                vdec.pp("transpconvs").pp(i),
            )?);
            let mut blocks = vec![];
            for b in 0..cfg.n_blocks_per_stage_decoder[i] {
                let ci = if b == 0 { 2 * c } else { c };
                blocks.push(PreActRes::new(
                    ci,
                    c,
                    &cfg.kernel_sizes[level],
                    &cfg.norm,
                    cfg.nonlin,
                    cfg.dropout,
                    vdec.pp("stages").pp(i).pp("blocks").pp(b),
                )?);
            }
            dec_blocks.push(blocks);
            let head = cfg.deep_supervision || i == n - 2;
            seg_layers.push(if head {
                Some(PConv::same(
                    c,
                    cfg.num_classes,
                    &ones,
                    1,
                    true,
                    vdec.pp("seg_layers").pp(i),
                )?)
            } else {
                None
            });
        }
        Ok(PreActResUNet {
            config: cfg.clone(),
            down,
            enc_blocks,
            convnext,
            transpconvs,
            dec_blocks,
            seg_layers,
            ds_outputs: cfg.deep_supervision,
        })
    }

    /// Trainable parameters (every head included).
    pub fn params(&self) -> u64 {
        let blocks =
            |v: &[Vec<PreActRes>]| -> u64 { v.iter().flatten().map(PreActRes::params).sum() };
        self.down.iter().flatten().map(Down::params).sum::<u64>()
            + blocks(&self.enc_blocks)
            + self.convnext.as_ref().map_or(0, ConvNeXtBlock::params)
            + self
                .transpconvs
                .iter()
                .map(TransposedConv::params)
                .sum::<u64>()
            + blocks(&self.dec_blocks)
            + self
                .seg_layers
                .iter()
                .flatten()
                .map(PConv::params)
                .sum::<u64>()
    }
}

impl SegNetwork for PreActResUNet {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let cfg = &self.config;
        check_input(x, cfg.dim, cfg.input_channels, "PreActResUNet")?;
        let prod = cfg.stride_product();
        let spatial = &x.dims()[2..];
        if spatial.iter().zip(&prod).any(|(n, p)| n % p != 0) {
            candle_core::bail!(
                "PreActResUNet: input spatial size {spatial:?} is not divisible by the product \
                 of the strides {prod:?}"
            );
        }
        let n = cfg.n_stages();
        let mut y = x.clone();
        let mut skips = Vec::with_capacity(n);
        for s in 0..n {
            if let Some(d) = &self.down[s] {
                y = d.forward(&y)?;
            }
            for b in &self.enc_blocks[s] {
                y = b.forward(&y, train)?;
            }
            if s == n - 1 {
                if let Some(c) = &self.convnext {
                    y = c.forward(&y, train)?;
                }
            }
            skips.push(y.clone());
        }
        let mut outs = Vec::with_capacity(n - 1);
        let mut lres = y;
        for i in 0..n - 1 {
            let up = self.transpconvs[i].forward(&lres)?;
            let mut h = Tensor::cat(&[&up, &skips[n - 2 - i]], 1)?;
            for b in &self.dec_blocks[i] {
                h = b.forward(&h, train)?;
            }
            match &self.seg_layers[i] {
                Some(head) if self.ds_outputs || i == n - 2 => outs.push(head.forward(&h)?),
                _ => {}
            }
            lres = h;
        }
        outs.reverse();
        Ok(outs)
    }

    fn set_deep_supervision(&mut self, on: bool) {
        // outputs of heads that were built (the config keeps what was built)
        self.ds_outputs = on && self.config.deep_supervision;
    }

    fn deep_supervision(&self) -> bool {
        self.ds_outputs
    }

    fn spatial_dims(&self) -> usize {
        self.config.dim.n()
    }

    fn layers(&self, patch: &[usize]) -> Vec<LayerRow> {
        let cfg = &self.config;
        let n = cfg.n_stages();
        let mut rows = vec![];
        let mut shape = vec![cfg.input_channels];
        shape.extend(patch);
        let mut skips = vec![];
        for s in 0..n {
            let p = format!("encoder.stages.{s}");
            if let Some(d) = &self.down[s] {
                shape = d.layer_rows(&format!("{p}.down"), &shape, &mut rows);
            }
            for (b, blk) in self.enc_blocks[s].iter().enumerate() {
                shape = blk.layer_rows(&format!("{p}.blocks.{b}"), &shape, &mut rows);
            }
            if s == n - 1 {
                if let Some(c) = &self.convnext {
                    c.layer_rows(&format!("{p}.convnext"), &shape, &mut rows);
                }
            }
            skips.push(shape.clone());
        }
        let mut lres = shape;
        for i in 0..n - 1 {
            let skip = &skips[n - 2 - i];
            self.transpconvs[i].layer_rows(&format!("decoder.transpconvs.{i}"), &lres, &mut rows);
            let mut cat = skip.clone();
            cat[0] *= 2;
            rows.push(LayerRow {
                name: format!("decoder.stages.{i}.concat"),
                kind: "cat[up, skip]".into(),
                output_shape: cat.clone(),
                params: 0,
                stored_activations: 1,
            });
            let mut h = cat;
            for (b, blk) in self.dec_blocks[i].iter().enumerate() {
                h = blk.layer_rows(&format!("decoder.stages.{i}.blocks.{b}"), &h, &mut rows);
            }
            match &self.seg_layers[i] {
                Some(head) if self.ds_outputs || i == n - 2 => {
                    let mut o = vec![cfg.num_classes];
                    o.extend(&h[1..]);
                    rows.push(LayerRow {
                        name: format!("decoder.seg_layers.{i}"),
                        kind: format!("{} (segmentation head)", head.describe()),
                        output_shape: o,
                        params: head.params(),
                        stored_activations: 1,
                    });
                }
                _ => {}
            }
            lres = h;
        }
        if !self.ds_outputs {
            let unused: u64 = self.seg_layers[..n - 2]
                .iter()
                .flatten()
                .map(PConv::params)
                .sum();
            if unused > 0 {
                rows.push(LayerRow {
                    name: "decoder.seg_layers (low-res)".into(),
                    kind: "deep-supervision heads (built, unused)".into(),
                    output_shape: vec![],
                    params: unused,
                    stored_activations: 0,
                });
            }
        }
        rows
    }
}

/// The estimator of a [`PreActConfig`] (see the module docs for the currency).
#[derive(Debug, Clone, PartialEq)]
pub struct PreActEstimate {
    pub config: PreActConfig,
}

impl PreActEstimate {
    /// Elements of the distinct tensors kept for backward, one sample (before halving).
    #[allow(clippy::needless_range_loop)] // parallel per-stage lists
    pub fn stored_elements(&self, patch: &[usize]) -> u64 {
        let cfg = &self.config;
        let n = cfg.n_stages();
        let f: Vec<u64> = cfg.features_per_stage.iter().map(|&c| c as u64).collect();
        let drop = u64::from(cfg.dropout.is_some());
        let mut v = patch.to_vec();
        let mut c = cfg.input_channels as u64;
        let mut total = 0u64;
        let mut sizes = Vec::with_capacity(n);
        let vox = |v: &[usize]| v.iter().map(|&x| x as u64).product::<u64>();
        for s in 0..n {
            if !is_ones(&cfg.strides[s]) {
                v = v.iter().zip(&cfg.strides[s]).map(|(a, b)| a / b).collect();
                total += c * vox(&v); // pool / down output
            }
            for b in 0..cfg.n_blocks_per_stage[s] {
                let ci = if b == 0 { c } else { f[s] };
                total += (2 * ci + (4 + drop) * f[s]) * vox(&v);
            }
            c = f[s];
            if s == n - 1 && cfg.convnext_bottleneck {
                total += 6 * c * vox(&v);
            }
            sizes.push(v.clone());
        }
        for i in 0..n - 1 {
            let level = n - 2 - i;
            let (cl, vl) = (f[level], vox(&sizes[level]));
            total += 2 * cl * vl; // concatenation
            for b in 0..cfg.n_blocks_per_stage_decoder[i] {
                let ci = if b == 0 { 2 * cl } else { cl };
                total += (2 * ci + (4 + drop) * cl) * vl;
            }
            if cfg.deep_supervision || i == n - 2 {
                total += cfg.num_classes as u64 * vl;
            }
        }
        total
    }
}

impl MemoryEstimate for PreActEstimate {
    fn conv_feature_map_size(&self, patch: &[usize]) -> u64 {
        self.stored_elements(patch).div_ceil(2)
    }
}

/// Registry entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct PreActResUNetArchitecture;

impl Architecture for PreActResUNetArchitecture {
    fn name(&self) -> &str {
        PREACT_RESUNET
    }

    fn aliases(&self) -> Vec<String> {
        vec!["PreActResUNet".into(), "preact_resunet".into()]
    }

    fn build(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
        vb: VarBuilder,
    ) -> std::result::Result<Box<dyn SegNetwork>, ArchError> {
        let cfg = PreActConfig::from_kwargs(kwargs, kwargs_path, io)?;
        Ok(Box::new(
            PreActResUNet::new(&cfg, vb).ctx(|| format!("building {PREACT_RESUNET}"))?,
        ))
    }

    fn estimator(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
    ) -> std::result::Result<Box<dyn MemoryEstimate>, ArchError> {
        Ok(Box::new(PreActEstimate {
            config: PreActConfig::from_kwargs(kwargs, kwargs_path, io)?,
        }))
    }

    fn presets(&self) -> Vec<ArchPreset> {
        let preset = |name: &str, description: &str, kw: Value| ArchPreset {
            name: name.into(),
            description: description.into(),
            kwargs: kw.as_object().cloned().unwrap_or_default(),
        };
        vec![
            preset(
                "preact_resunet",
                "Pre-activation residual U-Net (seed 004): PreAct blocks, max-pool down, \
                 ConvNeXt 7×7 depthwise bottleneck, transposed-conv up; plan's norm (instance)",
                json!({"downsample": "maxpool", "convnext_bottleneck": true, "bottleneck_kernel": 7}),
            ),
            preset(
                "preact_resunet_bn",
                "preact_resunet exactly as the seed: BatchNorm (noisy with nnU-Net's batch size 2)",
                json!({"downsample": "maxpool", "convnext_bottleneck": true,
                       "bottleneck_kernel": 7, "norm": "batch"}),
            ),
            preset(
                "preact_resunet_convdown",
                "preact_resunet with learned strided-conv down-sampling instead of max-pool",
                json!({"downsample": "conv", "convnext_bottleneck": true, "bottleneck_kernel": 7}),
            ),
        ]
    }
}

/// The architectures this module registers.
pub fn architectures() -> Vec<Arc<dyn Architecture>> {
    vec![Arc::new(PreActResUNetArchitecture)]
}
