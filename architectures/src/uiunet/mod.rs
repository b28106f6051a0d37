//! UIU-Net ("U-Net in U-Net", Wu et al., IEEE TIP 2023) for nnU-Net plans, 2D and 3D.
//!
//! Every encoder and decoder stage is a residual U-block (U²-Net's RSU-L: a small U-Net of
//! height L inside the stage; the last `n_dilated_stages` encoder stages and the matching
//! decoder stage use RSU-LF, which replaces pooling with dilations 1, 2, 4, ...). Before each
//! decoder RSU, the interactive cross-attention module IC-A (`AsymBiChaFuseReduce`) fuses the
//! upsampled deeper feature with the encoder skip (what makes UIU-Net rather than U²-Net; the
//! full-resolution decoder uses a plain concatenation, as in the paper). A 3×3 side head on the
//! bottleneck and on every decoder stage gives per-class logits; all side outputs, upsampled to
//! full size, are fused by a 1×1 conv into the main output.
//!
//! Built from a normal PlainConvUNet (or ResidualEncoderUNet) `arch_kwargs`: `n_stages`,
//! `features_per_stage`, `conv_op` (2D/3D), `kernel_sizes`, `strides`, `conv_bias`, `norm_op`,
//! `norm_op_kwargs`, `dropout_op`, `nonlin` and their kwargs are honoured;
//! `n_conv_per_stage(_decoder)` / `n_blocks_per_stage` are accepted and ignored (RSUs define the
//! conv count). Outer downsampling is a ceil-mode max pool with the plan's per-axis
//! `strides[s]`; decoders upsample (linear, `align_corners=False`) to the skip's size.
//! `strides[0]` must be all ones.
//!
//! Own keys (all optional; errors name `<kwargs path>.<key>`):
//! - `feature_scale` (float > 0, default 1.0): features = max(1, round(f · scale)).
//! - `rsu_heights` (int or list of ints ≥ 2, default `[7, 6, 5, 4, 4, 4]`): RSU height per
//!   encoder stage; a shorter list is extended with its last entry, a longer one truncated.
//!   Decoder RSUs use the height of their skip stage.
//! - `rsu_mid_ratio` (float in (0, 4], default 0.5): RSU middle channels = max(1, floor(out ·
//!   ratio)) (the seed's `out // 2`).
//! - `rsu_pool` (`"plan"` default | `"isotropic"` | `"seed"`): pooling inside the RSUs.
//!   `plan`: level k of the RSU at stage s pools with the plan's `strides[s+1+k]` (the last
//!   stride repeated past the end) and convolves with `kernel_sizes[s+k]`, so anisotropic plans
//!   stay anisotropic inside the blocks; `isotropic`: stride 2 on every axis; `seed`: the seed's
//!   `strides[s][0]` on every axis (1 at stage 0: no pooling in the full-resolution RSUs, twice
//!   the activation memory). In every mode an axis of size 1 is not pooled (ceil mode).
//!   `isotropic` and `seed` use `kernel_sizes[s]` at every level.
//! - `n_dilated_stages` (int, default 2): how many of the deepest encoder stages are RSU-LF.
//! - `ica` (bool, default true): IC-A fusion before the decoders (false: plain concatenation
//!   `[upsampled, skip]`, i.e. U²-Net / the seed). `ica_full_res` (bool, default false): also
//!   before the full-resolution decoder. `ica_reduction` (int ≥ 1, default 4).
//! - `ds_order` (`"nnunet"` default | `"seed"`): with deep supervision, `nnunet` returns
//!   `[fused, side@/strides[1], side@/(strides[1]·strides[2]), ...]` (one tensor per decoder
//!   resolution, n_stages − 1 in all); `seed` returns `[fused, side@full, side@/2, ...]` (two
//!   full-resolution tensors, n_stages in all).
//!
//! state_dict names follow the reference rebuild of the seed (fixture `uiunet3d_f8_minimal`):
//! `encoder_stages.{s}.{inc, enc.{k}, bottom, dec.{k}}.{conv,norm}.*`, `decoder_stages.{j}.*`
//! (j = 0 deepest), `side_heads.{0 = bottleneck, 1 + j}`, `fusion`, and
//! `ica.{j}.{feature_high, topdown.fc1, topdown.fc2, bottomup, bottomup.sa, post}`.

mod layers;
#[cfg(test)]
mod tests;

use self::layers::{effective_pool, pool, pooled_size, resize, DConv, Ica, Rsu, RsuSpec, Walk};
use crate::init::ShapeRecorder;
use crate::kwargs::{self, invalid, Choice, Choices, PerStage};
use crate::memory::MemoryEstimate;
use crate::network::{
    ArchError, ArchPreset, Architecture, CandleContext, LayerRow, NetworkIo, SegNetwork,
};
use crate::unet::blocks::check_input;
use crate::unet::options::{ConvBlockOptions, ConvDim, UNetConfig, UNetKwargs};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Canonical `network_class_name`.
pub const UIUNET: &str = "nnseg.architectures.UIUNet";

/// The keys this module adds to `arch_kwargs` (see the module documentation), typed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct UiuKwargs {
    pub feature_scale: Option<f64>,
    pub rsu_heights: Option<PerStage>,
    pub rsu_mid_ratio: Option<f64>,
    pub rsu_pool: Option<Choice<RsuPool>>,
    pub n_dilated_stages: Option<usize>,
    pub ica: Option<bool>,
    pub ica_full_res: Option<bool>,
    pub ica_reduction: Option<usize>,
    pub ds_order: Option<Choice<DsOrder>>,
}

/// The keys this module adds to `arch_kwargs` ([`UiuKwargs`]).
pub fn own_keys() -> &'static [&'static str] {
    kwargs::keys::<UiuKwargs>()
}

impl Choices for RsuPool {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("plan", RsuPool::Plan),
        ("isotropic", RsuPool::Isotropic),
        ("seed", RsuPool::Seed),
    ];
}

impl Choices for DsOrder {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("nnunet", DsOrder::NnUnet), ("seed", DsOrder::Seed)];
}

/// A number in `(lo, hi]` (`None`: `default`).
fn in_range(
    v: Option<f64>,
    default: f64,
    lo: f64,
    hi: f64,
    path: &str,
) -> std::result::Result<f64, ArchError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x > lo && x <= hi => Ok(x),
        Some(x) => Err(invalid(
            path,
            format!("expected a number in ({lo}, {hi}], got {x}"),
        )),
    }
}

/// `rsu_heights`: one or more heights in 2..=16, extended with the last to `n` stages.
fn rsu_heights(
    v: &Option<PerStage>,
    n: usize,
    path: &str,
) -> std::result::Result<Vec<usize>, ArchError> {
    let ok = |h: usize| (2..=16).contains(&h);
    let given = match v {
        None => DEFAULT_HEIGHTS.to_vec(),
        Some(PerStage::All(h)) if ok(*h) => vec![*h],
        Some(PerStage::Each(a)) if !a.is_empty() => {
            if let Some(i) = a.iter().position(|&h| !ok(h)) {
                return Err(invalid(
                    &format!("{path}[{i}]"),
                    format!("expected an integer in 2..=16, got {}", a[i]),
                ));
            }
            a.clone()
        }
        Some(_) => {
            return Err(invalid(
                path,
                "expected an integer in 2..=16 or a non-empty list of them",
            ))
        }
    };
    let last = given[given.len() - 1];
    Ok((0..n)
        .map(|i| given.get(i).copied().unwrap_or(last))
        .collect())
}

/// Pooling inside the RSUs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsuPool {
    Plan,
    Isotropic,
    Seed,
}

/// Deep-supervision output order (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsOrder {
    NnUnet,
    Seed,
}

/// Everything needed to build a [`UiuNet`].
#[derive(Debug, Clone, PartialEq)]
pub struct UiuConfig {
    pub input_channels: usize,
    pub num_classes: usize,
    pub deep_supervision: bool,
    /// After `feature_scale`.
    pub features: Vec<usize>,
    pub kernel_sizes: Vec<Vec<usize>>,
    pub strides: Vec<Vec<usize>>,
    pub block: ConvBlockOptions,
    /// One per stage (already extended / truncated).
    pub rsu_heights: Vec<usize>,
    pub rsu_mid_ratio: f64,
    pub rsu_pool: RsuPool,
    pub n_dilated: usize,
    pub ica: bool,
    pub ica_full_res: bool,
    pub ica_reduction: usize,
    pub ds_order: DsOrder,
}

/// Default RSU heights (the `uiunet` preset).
pub const DEFAULT_HEIGHTS: [usize; 6] = [7, 6, 5, 4, 4, 4];

impl UiuConfig {
    pub fn n_stages(&self) -> usize {
        self.features.len()
    }

    pub fn dim(&self) -> ConvDim {
        self.block.dim
    }

    /// Parses `arch_kwargs` (nnU-Net keys + [`UiuKwargs`]); `path` is the kwargs' JSON path.
    pub fn from_kwargs(
        kwargs: &Map<String, Value>,
        path: &str,
        io: &NetworkIo,
    ) -> std::result::Result<Self, ArchError> {
        let residual =
            !kwargs.contains_key("n_conv_per_stage") && kwargs.contains_key("n_blocks_per_stage");
        let known: Vec<&str> = UNetKwargs::keys(residual)
            .iter()
            .chain(own_keys())
            .copied()
            .collect();
        kwargs::reject_unknown(kwargs, path, &known)?;
        let own: UiuKwargs = kwargs::typed(kwargs, path)?;
        let mut plan = UNetKwargs::parse(kwargs, path)?;
        // not used by UIU-Net; let ResEnc-style plans without it through
        plan.n_conv_per_stage_decoder
            .get_or_insert(PerStage::All(1));
        let base = UNetConfig::from_typed(&plan, path, residual, io)?;
        let n = base.n_stages();
        let kp = |k: &str| format!("{path}.{k}");
        if n < 2 {
            return Err(invalid(&kp("n_stages"), "UIU-Net needs at least 2 stages"));
        }
        if base.strides[0].iter().any(|&s| s != 1) {
            return Err(invalid(
                &format!("{path}.strides[0]"),
                format!(
                    "UIU-Net needs no downsampling before its first RSU (all ones), got {:?}",
                    base.strides[0]
                ),
            ));
        }
        let scale = in_range(own.feature_scale, 1.0, 0.0, 1e3, &kp("feature_scale"))?;
        let features: Vec<usize> = base
            .features_per_stage
            .iter()
            .map(|&f| ((f as f64 * scale).round() as usize).max(1))
            .collect();
        let rsu_heights = rsu_heights(&own.rsu_heights, n, &kp("rsu_heights"))?;
        let rsu_mid_ratio = in_range(own.rsu_mid_ratio, 0.5, 0.0, 4.0, &kp("rsu_mid_ratio"))?;
        let n_dilated = own.n_dilated_stages.unwrap_or(2);
        if n_dilated > n {
            return Err(invalid(
                &kp("n_dilated_stages"),
                format!("at most n_stages = {n}, got {n_dilated}"),
            ));
        }
        let ica_reduction = own.ica_reduction.unwrap_or(4);
        if ica_reduction == 0 {
            return Err(invalid(
                &kp("ica_reduction"),
                "expected an integer >= 1, got 0",
            ));
        }
        let rsu_pool = own.rsu_pool.map_or(RsuPool::Plan, |c| c.0);
        let ds_order = own.ds_order.map_or(DsOrder::NnUnet, |c| c.0);
        let (ica, ica_full_res) = (own.ica.unwrap_or(true), own.ica_full_res.unwrap_or(false));
        Ok(UiuConfig {
            input_channels: io.in_channels,
            num_classes: io.num_classes,
            deep_supervision: io.deep_supervision,
            features,
            kernel_sizes: base.kernel_sizes,
            strides: base.strides,
            block: base.block,
            rsu_heights,
            rsu_mid_ratio,
            rsu_pool,
            n_dilated,
            ica,
            ica_full_res,
            ica_reduction,
            ds_order,
        })
    }

    fn mid(&self, out: usize) -> usize {
        ((out as f64 * self.rsu_mid_ratio).floor() as usize).max(1)
    }

    fn is_dilated(&self, stage: usize) -> bool {
        stage + self.n_dilated >= self.n_stages()
    }

    /// Whether the decoder whose skip is stage `s` uses IC-A.
    pub fn uses_ica(&self, s: usize) -> bool {
        self.ica && (s > 0 || self.ica_full_res)
    }

    /// Geometry of the RSU at stage `s` with `cin` input channels.
    fn rsu_spec(&self, s: usize, cin: usize) -> RsuSpec {
        let n = self.n_stages();
        let h = self.rsu_heights[s];
        let dilated = self.is_dilated(s);
        let cout = self.features[s];
        let nd = self.dim().n();
        let plan = self.rsu_pool == RsuPool::Plan && !dilated;
        let kernels = (0..h - 1)
            .map(|k| {
                if plan {
                    self.kernel_sizes[(s + k).min(n - 1)].clone()
                } else {
                    self.kernel_sizes[s].clone()
                }
            })
            .collect();
        let pools = (0..h - 2)
            .map(|k| match self.rsu_pool {
                RsuPool::Plan => self.strides[(s + 1 + k).min(n - 1)].clone(),
                RsuPool::Isotropic => vec![2; nd],
                RsuPool::Seed => vec![self.strides[s][0]; nd],
            })
            .collect();
        RsuSpec {
            height: h,
            cin,
            mid: self.mid(cout),
            cout,
            dilated,
            kernels,
            pools,
        }
    }
}

/// One decoder stage: optional IC-A, then an RSU on the fused features.
#[derive(Debug)]
struct DecoderStage {
    ica: Option<Ica>,
    rsu: Rsu,
}

/// UIU-Net (see the module docs).
#[derive(Debug)]
pub struct UiuNet {
    pub config: UiuConfig,
    encoder: Vec<Rsu>,
    decoder: Vec<DecoderStage>,
    side_heads: Vec<DConv>,
    fusion: DConv,
}

impl UiuNet {
    pub fn new(cfg: &UiuConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.n_stages();
        if n < 2
            || cfg.kernel_sizes.len() != n
            || cfg.strides.len() != n
            || cfg.rsu_heights.len() != n
            || cfg.rsu_heights.iter().any(|&h| h < 2)
        {
            candle_core::bail!(
                "UIU-Net config: needs >= 2 stages with one kernel size, stride and RSU height \
                 (>= 2) per stage"
            );
        }
        let f = &cfg.features;
        let mut encoder = Vec::with_capacity(n);
        let mut cin = cfg.input_channels;
        for (s, &fs) in f.iter().enumerate() {
            let spec = cfg.rsu_spec(s, cin);
            encoder.push(Rsu::new(&spec, &cfg.block, vb.pp("encoder_stages").pp(s))?);
            cin = fs;
        }
        let mut decoder = Vec::with_capacity(n - 1);
        for j in 0..n - 1 {
            let s = n - 2 - j;
            let (ica, cin) = if cfg.uses_ica(s) {
                let m = Ica::new(
                    f[s + 1],
                    f[s],
                    cfg.ica_reduction,
                    &cfg.kernel_sizes[s],
                    &cfg.block,
                    vb.pp("ica").pp(j),
                )?;
                (Some(m), 2 * f[s])
            } else {
                (None, f[s + 1] + f[s])
            };
            let mut spec = cfg.rsu_spec(s, cin);
            // the deepest decoder mirrors the dilated encoder stage it sits on
            spec.dilated = cfg.is_dilated(s);
            let rsu = Rsu::new(&spec, &cfg.block, vb.pp("decoder_stages").pp(j))?;
            decoder.push(DecoderStage { ica, rsu });
        }
        let mut side_heads = Vec::with_capacity(n);
        let heads = vb.pp("side_heads");
        side_heads.push(DConv::new(
            f[n - 1],
            cfg.num_classes,
            &cfg.kernel_sizes[n - 1],
            1,
            true,
            heads.pp(0),
        )?);
        for j in 0..n - 1 {
            let s = n - 2 - j;
            side_heads.push(DConv::new(
                f[s],
                cfg.num_classes,
                &cfg.kernel_sizes[s],
                1,
                true,
                heads.pp(j + 1),
            )?);
        }
        let ones = vec![1; cfg.dim().n()];
        let fusion = DConv::new(
            n * cfg.num_classes,
            cfg.num_classes,
            &ones,
            1,
            true,
            vb.pp("fusion"),
        )?;
        Ok(UiuNet {
            config: cfg.clone(),
            encoder,
            decoder,
            side_heads,
            fusion,
        })
    }

    fn walk(&self, patch: &[usize]) -> Walk {
        let cfg = &self.config;
        let n = cfg.n_stages();
        let nc = cfg.num_classes;
        let f = &cfg.features;
        let mut w = Walk::default();
        let mut sizes: Vec<Vec<usize>> = Vec::with_capacity(n);
        let mut cur = patch.to_vec();
        for (s, rsu) in self.encoder.iter().enumerate() {
            if s > 0 {
                let eff = effective_pool(&cfg.strides[s], &cur);
                cur = pooled_size(&cur, &eff);
                if eff.iter().any(|&x| x > 1) {
                    let mut sh = vec![f[s - 1]];
                    sh.extend(&cur);
                    w.extra(format!("encoder_stages.{s}.pool"), "MaxPool (ceil)", sh);
                }
            }
            rsu.walk(&format!("encoder_stages.{s}"), &cur, &mut w);
            sizes.push(cur.clone());
        }
        let with = |c: usize, sp: &[usize]| {
            let mut v = vec![c];
            v.extend(sp);
            v
        };
        self.side_heads[0].walk(
            "side_heads.0".into(),
            "(bottleneck side)",
            &sizes[n - 1],
            &mut w,
        );
        for (j, st) in self.decoder.iter().enumerate() {
            let s = n - 2 - j;
            if sizes[s + 1] != sizes[s] {
                w.extra(
                    format!("decoder_stages.{j}.up"),
                    "linear upsample",
                    with(f[s + 1], &sizes[s]),
                );
            }
            let cin = match &st.ica {
                Some(m) => {
                    m.walk(&format!("ica.{j}"), &sizes[s], &mut w);
                    2 * f[s]
                }
                None => f[s + 1] + f[s],
            };
            w.extra(
                format!("decoder_stages.{j}.cat"),
                "concat",
                with(cin, &sizes[s]),
            );
            st.rsu
                .walk(&format!("decoder_stages.{j}"), &sizes[s], &mut w);
            self.side_heads[j + 1].walk(
                format!("side_heads.{}", j + 1),
                "(side)",
                &sizes[s],
                &mut w,
            );
        }
        for (k, sz) in sizes.iter().enumerate().skip(1) {
            if sz.as_slice() != patch {
                w.extra(
                    format!("side.{k}.up"),
                    "side output upsampled",
                    with(nc, patch),
                );
            }
        }
        w.extra(
            "fusion.cat".into(),
            "concat of side outputs",
            with(n * nc, patch),
        );
        self.fusion
            .walk("fusion".into(), "(fused output)", patch, &mut w);
        w
    }
}

impl SegNetwork for UiuNet {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let cfg = &self.config;
        check_input(x, cfg.dim(), cfg.input_channels, "UIUNet")?;
        let n = cfg.n_stages();
        let full: Vec<usize> = x.dims()[2..].to_vec();
        let mut skips: Vec<Tensor> = Vec::with_capacity(n);
        let mut y = x.clone();
        for (s, rsu) in self.encoder.iter().enumerate() {
            if s > 0 {
                y = pool(&y, &cfg.strides[s])?;
            }
            y = rsu.forward(&y, train)?;
            skips.push(y.clone());
        }
        // sides[k]: logits at the resolution of stage k (k = n-1: bottleneck)
        let mut sides: Vec<Option<Tensor>> = vec![None; n];
        sides[n - 1] = Some(self.side_heads[0].forward(&y)?);
        let mut d = y;
        for (j, st) in self.decoder.iter().enumerate() {
            let s = n - 2 - j;
            let skip = &skips[s];
            let up = resize(&d, &skip.dims()[2..])?;
            let inp = match &st.ica {
                Some(m) => m.forward(&up, skip, train)?,
                None => Tensor::cat(&[&up, skip], 1)?,
            };
            d = st.rsu.forward(&inp, train)?;
            sides[s] = Some(self.side_heads[j + 1].forward(&d)?);
        }
        let sides: Vec<Tensor> = sides.into_iter().flatten().collect();
        if sides.len() != n {
            candle_core::bail!("UIUNet: expected {n} side outputs, got {}", sides.len());
        }
        let upsampled = sides
            .iter()
            .map(|t| resize(t, &full))
            .collect::<Result<Vec<_>>>()?;
        let fused = self.fusion.forward(&Tensor::cat(&upsampled, 1)?)?;
        if !cfg.deep_supervision {
            return Ok(vec![fused]);
        }
        let first_side = match cfg.ds_order {
            DsOrder::NnUnet => 1,
            DsOrder::Seed => 0,
        };
        let mut outs = vec![fused];
        outs.extend(sides[first_side..n - 1].iter().cloned());
        Ok(outs)
    }

    fn set_deep_supervision(&mut self, on: bool) {
        self.config.deep_supervision = on;
    }

    fn deep_supervision(&self) -> bool {
        self.config.deep_supervision
    }

    fn spatial_dims(&self) -> usize {
        self.config.dim().n()
    }

    fn layers(&self, patch: &[usize]) -> Vec<LayerRow> {
        self.walk(patch).rows
    }
}

/// Activation estimate of a UIU-Net (nnU-Net's currency, see [`layers::Walk`]).
pub struct UiuEstimate {
    net: UiuNet,
}

impl MemoryEstimate for UiuEstimate {
    fn conv_feature_map_size(&self, patch: &[usize]) -> u64 {
        self.net.walk(patch).estimate()
    }
}

/// Registry entry of [`UiuNet`].
#[derive(Debug, Clone, Copy, Default)]
pub struct UiuNetArchitecture;

impl UiuNetArchitecture {
    fn shape_only(&self, cfg: &UiuConfig) -> std::result::Result<UiuNet, ArchError> {
        let rec = ShapeRecorder::new();
        let vb = VarBuilder::from_backend(Box::new(rec), DType::F32, Device::Cpu);
        UiuNet::new(cfg, vb).ctx(|| "building UIUNet (shapes only)".to_string())
    }
}

impl Architecture for UiuNetArchitecture {
    fn name(&self) -> &str {
        UIUNET
    }

    fn aliases(&self) -> Vec<String> {
        vec!["UIUNet".into(), "uiunet".into(), "DynamicUIUNet3D".into()]
    }

    fn build(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
        vb: VarBuilder,
    ) -> std::result::Result<Box<dyn SegNetwork>, ArchError> {
        let cfg = UiuConfig::from_kwargs(kwargs, kwargs_path, io)?;
        Ok(Box::new(
            UiuNet::new(&cfg, vb).ctx(|| "building UIUNet".to_string())?,
        ))
    }

    fn estimator(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
    ) -> std::result::Result<Box<dyn MemoryEstimate>, ArchError> {
        let cfg = UiuConfig::from_kwargs(kwargs, kwargs_path, io)?;
        Ok(Box::new(UiuEstimate {
            net: self.shape_only(&cfg)?,
        }))
    }

    fn presets(&self) -> Vec<ArchPreset> {
        let obj = |v: Value| v.as_object().cloned().unwrap_or_default();
        vec![
            ArchPreset {
                name: "uiunet".into(),
                description: "UIU-Net: RSU heights 7,6,5,4,4,4 (extended/truncated to n_stages), \
                              IC-A fusion, full features"
                    .into(),
                kwargs: obj(
                    json!({"rsu_heights": [7, 6, 5, 4, 4, 4], "feature_scale": 1.0,
                                   "ica": true}),
                ),
            },
            ArchPreset {
                name: "uiunet_minimal".into(),
                description: "UIU-Net with RSU heights 5,4,3,3,3,3 and 50% features".into(),
                kwargs: obj(
                    json!({"rsu_heights": [5, 4, 3, 3, 3, 3], "feature_scale": 0.5,
                                   "ica": true}),
                ),
            },
        ]
    }
}

/// The architectures [`crate::registry::Registry::default`] registers.
pub fn architectures() -> Vec<Arc<dyn Architecture>> {
    vec![Arc::new(UiuNetArchitecture)]
}
