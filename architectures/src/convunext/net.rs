//! The ConvUNext modules (PyTorch state_dict names of the reference: `stem.{0,1}`,
//! `enc.{l}.{b}`, `down.{l}`, `bn_adjust`, `bottleneck.{b}`, `dec_adjust.{i}`, `dec.{i}.{b}`,
//! `heads.{i}.{0,1,3}`, `final`).

use super::config::{BlockForm, BlockVersion, ConvUNextConfig};
use crate::init::he_normal_std;
use crate::network::LayerRow;
use crate::ops::{self, ConvOpts, GeluKind, InterpMode, InterpSize, PoolOpts};
use crate::unet::blocks::HE_NEG_SLOPE;
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// LayerNorm / GRN epsilon of the reference.
pub const EPS: f64 = 1e-6;

fn numel(t: &Tensor) -> u64 {
    t.elem_count() as u64
}

fn numel_opt(t: &Option<Tensor>) -> u64 {
    t.as_ref().map_or(0, numel)
}

fn axes(v: &[usize]) -> String {
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", s.join(","))
}

fn shape(c: usize, sp: &[usize]) -> Vec<usize> {
    let mut s = vec![c];
    s.extend(sp);
    s
}

/// A convolution with "same" padding (odd kernels) and optional groups.
#[derive(Debug, Clone)]
pub struct CConv {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    kernel: Vec<usize>,
    groups: usize,
    opts: ConvOpts,
}

impl CConv {
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: &[usize],
        groups: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut wshape = vec![cout, cin / groups];
        wshape.extend(kernel);
        let init = Init::Randn {
            mean: 0.0,
            stdev: he_normal_std(&wshape, HE_NEG_SLOPE),
        };
        let weight = vb.get_with_hints(wshape, "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        let padding: Vec<usize> = kernel.iter().map(|k| k / 2).collect();
        Ok(CConv {
            weight,
            bias,
            kernel: kernel.to_vec(),
            groups,
            opts: ConvOpts::new().padding(padding).groups(groups),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.groups > 1 && self.groups == self.cout() && self.weight.dims()[1] == 1 {
            return super::fast::depthwise_conv(x, &self.weight, self.bias.as_ref());
        }
        ops::conv(x, &self.weight, self.bias.as_ref(), &self.opts)
    }

    pub fn params(&self) -> u64 {
        numel(&self.weight) + numel_opt(&self.bias)
    }

    pub fn cout(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn describe(&self) -> String {
        let cin = self.weight.dims()[1] * self.groups;
        let dw = if self.groups > 1 { " depthwise" } else { "" };
        format!(
            "Conv{}d{dw} {cin}→{} k{}",
            self.kernel.len(),
            self.cout(),
            axes(&self.kernel)
        )
    }
}

/// Channels-first LayerNorm (`weight`, optional `bias`).
#[derive(Debug, Clone)]
pub struct LayerNormCf {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl LayerNormCf {
    pub fn new(c: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNormCf {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: if bias {
                Some(vb.get_with_hints(c, "bias", Init::Const(0.0))?)
            } else {
                None
            },
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::fast::layer_norm_cf(x, &self.weight, self.bias.as_ref(), EPS)
    }
    pub fn params(&self) -> u64 {
        numel(&self.weight) + numel_opt(&self.bias)
    }
}

/// Global response normalisation in the seed's formula
/// `N = sqrt(Σ_space x² + ε) / (mean_c(·) + ε)`, `y = x + γ·(x·N) + β`, computed as
/// `x·(1 + γN) + β` with the squared norms from a batched dot product, so that only two
/// full-size tensors are kept for backward (one without β).
#[derive(Debug, Clone)]
pub struct Grn {
    pub gamma: Tensor,
    pub beta: Option<Tensor>,
}

impl Grn {
    pub fn new(c: usize, gamma0: f64, beta: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Grn {
            gamma: vb.get_with_hints(c, "gamma", Init::Const(gamma0))?,
            beta: if beta {
                Some(vb.get_with_hints(c, "beta", Init::Const(0.0))?)
            } else {
                None
            },
        })
    }

    /// Half-precision inputs are normalised in f32 (as the norms in `crate::ops`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::in_f32(x, |x| {
            let dims = x.dims().to_vec();
            let (n, c) = (dims[0], dims[1]);
            let v: usize = dims[2..].iter().product();
            let xr = x.contiguous()?.reshape((n * c, 1, v))?;
            let ss = xr.matmul(&xr.t()?)?.reshape((n, c))?;
            let g = (ss + EPS)?.sqrt()?;
            let nx = g.broadcast_div(&(g.mean_keepdim(1)? + EPS)?)?;
            let gamma = self.gamma.to_dtype(x.dtype())?;
            let factor = (nx.broadcast_mul(&gamma.unsqueeze(0)?)? + 1.0)?;
            let mut fshape = vec![n, c];
            fshape.extend(std::iter::repeat_n(1, dims.len() - 2));
            let y = x.broadcast_mul(&factor.reshape(fshape)?)?;
            match &self.beta {
                Some(b) => y.broadcast_add(&ops_channel_view(&b.to_dtype(x.dtype())?, dims.len())?),
                None => Ok(y),
            }
        })
    }

    pub fn params(&self) -> u64 {
        numel(&self.gamma) + numel_opt(&self.beta)
    }
}

fn ops_channel_view(v: &Tensor, rank: usize) -> Result<Tensor> {
    let mut s = vec![1usize; rank];
    s[1] = v.elem_count();
    v.reshape(s)
}

/// γ in the forward pass: projected to [0, 1] in value (the seed's `ValueRangeConstraint`
/// applied after every optimiser step), with an identity gradient (straight-through), so a γ
/// sitting at its bound still learns.
fn projected(g: &Tensor) -> Result<Tensor> {
    let clipped = g.clamp(0f32, 1f32)?;
    g + (clipped - g)?.detach()
}

/// One ConvNeXt block (V1 or V2, in one of the three forms).
#[derive(Debug, Clone)]
pub struct CnxBlock {
    pub dw: CConv,
    pub norm: LayerNormCf,
    pub pw1: CConv,
    pub grn: Option<Grn>,
    pub pw2: CConv,
    pub gamma: Option<Tensor>,
    form: BlockForm,
    clip_gamma: bool,
    drop: f64,
    channels: usize,
    expansion: usize,
}

impl CnxBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c: usize,
        expansion: usize,
        kernel: &[usize],
        version: BlockVersion,
        form: BlockForm,
        bias: bool,
        drop: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let e = c * expansion;
        let ones = vec![1; kernel.len()];
        let gamma = if form.has_gamma(version) {
            Some(vb.get_with_hints(c, "gamma", Init::Const(form.gamma_init()))?)
        } else {
            None
        };
        Ok(CnxBlock {
            dw: CConv::new(c, c, kernel, c, bias, vb.pp("dw"))?,
            norm: LayerNormCf::new(c, bias, vb.pp("norm"))?,
            pw1: CConv::new(c, e, &ones, 1, bias, vb.pp("pw1"))?,
            grn: if version == BlockVersion::V2 {
                Some(Grn::new(e, form.grn_gamma_init(), bias, vb.pp("grn"))?)
            } else {
                None
            },
            pw2: CConv::new(e, c, &ones, 1, bias, vb.pp("pw2"))?,
            gamma,
            form,
            clip_gamma: form.clips_gamma(),
            drop,
            channels: c,
            expansion,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.dw.forward(x)?;
        let h = self.norm.forward(&h)?;
        let h = self.pw1.forward(&h)?;
        let mut h = ops::gelu(&h, GeluKind::Erf)?;
        if let Some(g) = &self.grn {
            h = g.forward(&h)?;
        }
        if self.form == BlockForm::Seed {
            h = ops::dropout(&h, self.drop, train)?;
        }
        let mut h = self.pw2.forward(&h)?;
        if let Some(g) = &self.gamma {
            let g = if self.clip_gamma {
                projected(g)?
            } else {
                g.clone()
            };
            h = h.broadcast_mul(&ops_channel_view(&g.to_dtype(h.dtype())?, h.rank())?)?;
        }
        match self.form {
            BlockForm::Seed => Ok(h),
            _ => x + ops::drop_path(&h, self.drop, train)?,
        }
    }

    pub fn params(&self) -> u64 {
        self.dw.params()
            + self.norm.params()
            + self.pw1.params()
            + self.grn.as_ref().map_or(0, Grn::params)
            + self.pw2.params()
            + numel_opt(&self.gamma)
    }

    /// Stored activations in units of the block's output `(C, *sp)`: dw, LN, pw2 and the block
    /// output (C each), pw1 and GELU (E·C each) and the GRN output (E·C).
    pub fn stored_units(&self) -> usize {
        4 + self.expansion * (2 + usize::from(self.grn.is_some()))
    }

    pub fn row(&self, name: String, sp: &[usize]) -> LayerRow {
        let v = if self.grn.is_some() { "V2" } else { "V1" };
        LayerRow {
            name,
            kind: format!(
                "ConvNeXt {v} block ({}, LN, pw ×{}, GELU{}, pw{}{})",
                self.dw.describe(),
                self.expansion,
                if self.grn.is_some() { ", GRN" } else { "" },
                if self.gamma.is_some() { ", γ" } else { "" },
                match self.form {
                    BlockForm::Seed => ", no residual",
                    _ => ", +x",
                }
            ),
            output_shape: shape(self.channels, sp),
            params: self.params(),
            stored_activations: self.stored_units(),
        }
    }
}

/// A deep-supervision head: `Conv1×1(C→C/2) → GRN → GELU → Conv1×1(→classes)` (`.0`, `.1`,
/// `.3`).
#[derive(Debug, Clone)]
pub struct DsHead {
    pub conv1: CConv,
    pub grn: Grn,
    pub conv2: CConv,
}

impl DsHead {
    fn new(
        c: usize,
        classes: usize,
        ones: &[usize],
        form: BlockForm,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mid = (c / 2).max(1);
        Ok(DsHead {
            conv1: CConv::new(c, mid, ones, 1, bias, vb.pp(0))?,
            grn: Grn::new(mid, form.grn_gamma_init(), bias, vb.pp(1))?,
            conv2: CConv::new(mid, classes, ones, 1, true, vb.pp(3))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(x)?;
        let h = self.grn.forward(&h)?;
        let h = ops::gelu(&h, GeluKind::Erf)?;
        self.conv2.forward(&h)
    }
    fn params(&self) -> u64 {
        self.conv1.params() + self.grn.params() + self.conv2.params()
    }
}

/// The whole network.
#[derive(Debug, Clone)]
pub struct ConvUNext {
    pub config: ConvUNextConfig,
    pub stem_conv: CConv,
    pub stem_norm: LayerNormCf,
    /// `depth` encoder levels of `blocks_per_level` blocks.
    pub enc: Vec<Vec<CnxBlock>>,
    /// `depth - 1` 1×1 convs after pooling (`down.{l}`), then `bn_adjust`.
    pub down: Vec<CConv>,
    pub bn_adjust: CConv,
    pub bottleneck: Vec<CnxBlock>,
    /// decoder stage `i` works at level `depth - 1 - i`.
    pub dec_adjust: Vec<CConv>,
    pub dec: Vec<Vec<CnxBlock>>,
    /// `heads[i]` on decoder stage `i` (`i < depth - 1`, i.e. levels `depth-1 ..= 1`); built
    /// only with deep supervision.
    pub heads: Vec<DsHead>,
    pub final_conv: CConv,
    /// The heads' outputs are returned (deep supervision on and heads built).
    ds_outputs: bool,
}

impl ConvUNext {
    pub fn new(cfg: &ConvUNextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.depth;
        let f = &cfg.features;
        let ones = vec![1; cfg.dim];
        let bias = cfg.use_bias;
        if f.len() != d + 1
            || cfg.pool.len() != d
            || cfg.dw_kernels.len() != d + 1
            || cfg.expansions.len() != d + 1
        {
            candle_core::bail!("ConvUNext config: per-level lists do not match depth {d}");
        }
        let block = |c: usize, l: usize, b: usize, vb: VarBuilder| {
            CnxBlock::new(
                c,
                cfg.expansions[l],
                &cfg.dw_kernels[l],
                cfg.version,
                cfg.form,
                bias,
                cfg.drop_rate(l, b),
                vb,
            )
        };
        let stem_conv = CConv::new(
            cfg.input_channels,
            f[0],
            &cfg.stem_kernel,
            1,
            bias,
            vb.pp("stem").pp(0),
        )?;
        let stem_norm = LayerNormCf::new(f[0], bias, vb.pp("stem").pp(1))?;
        let mut enc = vec![];
        let mut down = vec![];
        for l in 0..d {
            let blocks = (0..cfg.blocks_per_level)
                .map(|b| block(f[l], l, b, vb.pp("enc").pp(l).pp(b)))
                .collect::<Result<Vec<_>>>()?;
            enc.push(blocks);
            if l + 1 < d {
                down.push(CConv::new(
                    f[l],
                    f[l + 1],
                    &ones,
                    1,
                    bias,
                    vb.pp("down").pp(l),
                )?);
            }
        }
        let bn_adjust = CConv::new(f[d - 1], f[d], &ones, 1, bias, vb.pp("bn_adjust"))?;
        let bottleneck = (0..cfg.blocks_per_level)
            .map(|b| block(f[d], d, b, vb.pp("bottleneck").pp(b)))
            .collect::<Result<Vec<_>>>()?;
        let mut dec_adjust = vec![];
        let mut dec = vec![];
        let mut heads = vec![];
        for i in 0..d {
            let l = d - 1 - i;
            dec_adjust.push(CConv::new(
                f[l] + f[l + 1],
                f[l],
                &ones,
                1,
                bias,
                vb.pp("dec_adjust").pp(i),
            )?);
            let blocks = (0..cfg.blocks_per_level)
                .map(|b| block(f[l], l, b, vb.pp("dec").pp(i).pp(b)))
                .collect::<Result<Vec<_>>>()?;
            dec.push(blocks);
            if l >= 1 && cfg.deep_supervision {
                heads.push(DsHead::new(
                    f[l],
                    cfg.num_classes,
                    &ones,
                    cfg.form,
                    bias,
                    vb.pp("heads").pp(i),
                )?);
            }
        }
        let final_conv = CConv::new(f[0], cfg.num_classes, &ones, 1, true, vb.pp("final"))?;
        Ok(ConvUNext {
            config: cfg.clone(),
            stem_conv,
            stem_norm,
            enc,
            down,
            bn_adjust,
            bottleneck,
            dec_adjust,
            dec,
            heads,
            final_conv,
            ds_outputs: cfg.deep_supervision,
        })
    }

    /// Whether the deep-supervision outputs are returned.
    pub fn deep_supervision_outputs(&self) -> bool {
        self.ds_outputs
    }

    /// Turns the deep-supervision outputs on or off; on needs the heads (a network built with
    /// deep supervision).
    pub fn set_deep_supervision_outputs(&mut self, on: bool) {
        self.ds_outputs = on && !self.heads.is_empty();
    }

    fn pool(&self, x: &Tensor, l: usize) -> Result<Tensor> {
        let k = self.config.pool[l].clone();
        if k.iter().all(|&s| s == 1) {
            return Ok(x.clone());
        }
        ops::max_pool(x, &PoolOpts::new(k.clone()).stride(k))
    }

    /// Logits, full resolution first (`depth` outputs with deep supervision, else one).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let d = self.config.depth;
        let mut h = self.stem_norm.forward(&self.stem_conv.forward(x)?)?;
        let mut skips = Vec::with_capacity(d);
        for l in 0..d {
            for b in &self.enc[l] {
                h = b.forward(&h, train)?;
            }
            skips.push(h.clone());
            let p = self.pool(&h, l)?;
            h = if l + 1 < d {
                self.down[l].forward(&p)?
            } else {
                self.bn_adjust.forward(&p)?
            };
        }
        for b in &self.bottleneck {
            h = b.forward(&h, train)?;
        }
        let ds = self.ds_outputs;
        let mut aux = vec![];
        for i in 0..d {
            let l = d - 1 - i;
            let skip = &skips[l];
            let up = ops::interpolate(
                &h,
                &InterpSize::Size(skip.dims()[2..].to_vec()),
                InterpMode::Linear {
                    align_corners: false,
                },
            )?;
            h = self.dec_adjust[i].forward(&Tensor::cat(&[skip, &up], 1)?)?;
            for b in &self.dec[i] {
                h = b.forward(&h, train)?;
            }
            if ds && l >= 1 {
                aux.push(self.heads[i].forward(&h)?);
            }
        }
        let mut outs = vec![self.final_conv.forward(&h)?];
        aux.reverse(); // nnU-Net order: 1/strides[1] first
        outs.extend(aux);
        Ok(outs)
    }

    /// Total trainable parameters (every head included).
    pub fn params(&self) -> u64 {
        let blocks = |v: &[CnxBlock]| v.iter().map(CnxBlock::params).sum::<u64>();
        self.stem_conv.params()
            + self.stem_norm.params()
            + self.enc.iter().map(|v| blocks(v)).sum::<u64>()
            + self.down.iter().map(CConv::params).sum::<u64>()
            + self.bn_adjust.params()
            + blocks(&self.bottleneck)
            + self.dec_adjust.iter().map(CConv::params).sum::<u64>()
            + self.dec.iter().map(|v| blocks(v)).sum::<u64>()
            + self.heads.iter().map(DsHead::params).sum::<u64>()
            + self.final_conv.params()
    }

    /// The layer table for one sample of spatial size `patch`; `stored_activations` counts
    /// tensors of the row's output shape kept for backward.
    pub fn layers(&self, patch: &[usize]) -> Vec<LayerRow> {
        let cfg = &self.config;
        let d = cfg.depth;
        let f = &cfg.features;
        let sizes = cfg.level_sizes(patch);
        let mut rows = vec![
            row(
                "stem.0",
                self.stem_conv.describe(),
                f[0],
                &sizes[0],
                self.stem_conv.params(),
                1,
            ),
            row(
                "stem.1",
                "LayerNorm (channels first)",
                f[0],
                &sizes[0],
                self.stem_norm.params(),
                1,
            ),
        ];
        for l in 0..d {
            for (b, blk) in self.enc[l].iter().enumerate() {
                rows.push(blk.row(format!("enc.{l}.{b}"), &sizes[l]));
            }
            rows.push(row(
                format!("(pool {l})"),
                format!("MaxPool{}d k=s{}", cfg.dim, axes(&cfg.pool[l])),
                f[l],
                &sizes[l + 1],
                0,
                1,
            ));
            let (name, conv) = if l + 1 < d {
                (format!("down.{l}"), &self.down[l])
            } else {
                ("bn_adjust".to_string(), &self.bn_adjust)
            };
            rows.push(row(
                name,
                conv.describe(),
                f[l + 1],
                &sizes[l + 1],
                conv.params(),
                1,
            ));
        }
        for (b, blk) in self.bottleneck.iter().enumerate() {
            rows.push(blk.row(format!("bottleneck.{b}"), &sizes[d]));
        }
        for i in 0..d {
            let l = d - 1 - i;
            let interp = if cfg.dim == 2 {
                "bilinear"
            } else {
                "trilinear"
            };
            rows.push(row(
                format!("(up {i})"),
                format!("{interp} ×{} (align_corners=False)", axes(&cfg.pool[l])),
                f[l + 1],
                &sizes[l],
                0,
                1,
            ));
            rows.push(row(
                format!("(cat {i})"),
                "concat [skip, up]",
                f[l] + f[l + 1],
                &sizes[l],
                0,
                1,
            ));
            let adj = &self.dec_adjust[i];
            rows.push(row(
                format!("dec_adjust.{i}"),
                adj.describe(),
                f[l],
                &sizes[l],
                adj.params(),
                1,
            ));
            for (b, blk) in self.dec[i].iter().enumerate() {
                rows.push(blk.row(format!("dec.{i}.{b}"), &sizes[l]));
            }
            let Some(h) = self.heads.get(i).filter(|_| l >= 1) else {
                continue;
            };
            if self.ds_outputs {
                let mid = h.conv1.cout();
                rows.push(row(
                    format!("heads.{i}.0"),
                    h.conv1.describe(),
                    mid,
                    &sizes[l],
                    h.conv1.params(),
                    1,
                ));
                rows.push(row(
                    format!("heads.{i}.1"),
                    "GRN + GELU",
                    mid,
                    &sizes[l],
                    h.grn.params(),
                    2,
                ));
                rows.push(row(
                    format!("heads.{i}.3"),
                    format!("{} (deep-supervision head)", h.conv2.describe()),
                    cfg.num_classes,
                    &sizes[l],
                    h.conv2.params(),
                    1,
                ));
            } else {
                rows.push(LayerRow {
                    name: format!("heads.{i}"),
                    kind: "deep-supervision head (built, unused)".into(),
                    output_shape: vec![],
                    params: h.params(),
                    stored_activations: 0,
                });
            }
        }
        rows.push(row(
            "final",
            format!("{} (segmentation head)", self.final_conv.describe()),
            cfg.num_classes,
            &sizes[0],
            self.final_conv.params(),
            1,
        ));
        rows
    }
}

fn row(
    name: impl Into<String>,
    kind: impl Into<String>,
    c: usize,
    sp: &[usize],
    params: u64,
    stored: usize,
) -> LayerRow {
    LayerRow {
        name: name.into(),
        kind: kind.into(),
        output_shape: shape(c, sp),
        params,
        stored_activations: stored,
    }
}
