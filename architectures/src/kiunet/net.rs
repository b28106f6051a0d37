//! The KiU-Net network: building blocks with the seed's state_dict names and the forward pass.

use super::config::{DecoderCrfb, KiNetSizing, KiUNetConfig, PoolType};
use crate::init::he_normal_std;
use crate::network::{LayerRow, SegNetwork};
use crate::ops::{self, ConvOpts, InterpMode, InterpSize, PoolOpts};
use crate::unet::blocks::{apply_dropout, apply_nonlin, check_input, conv_out_size, Norm};
use crate::unet::blocks::{TransposedConv, HE_NEG_SLOPE};
use crate::unet::options::{ConvBlockOptions, DropoutOptions, Nonlin};
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Bilinear / trilinear resize (`align_corners=False`); a no-op when the size already matches.
pub(crate) fn resize(x: &Tensor, size: &[usize]) -> Result<Tensor> {
    if &x.dims()[2..] == size {
        return Ok(x.clone());
    }
    ops::interpolate(
        x,
        &InterpSize::Size(size.to_vec()),
        InterpMode::Linear {
            align_corners: false,
        },
    )
}

pub(crate) fn vox(size: &[usize]) -> u64 {
    size.iter().map(|&v| v as u64).product()
}

/// `nn.ConvNd` with explicit padding: `weight (C_out, C_in, *k)`, optional `bias`.
#[derive(Debug, Clone)]
pub struct KConv {
    weight: Tensor,
    bias: Option<Tensor>,
    pub kernel: Vec<usize>,
    pub stride: Vec<usize>,
    pub padding: Vec<usize>,
    opts: ConvOpts,
}

impl KConv {
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: &[usize],
        stride: &[usize],
        padding: &[usize],
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut shape = vec![cout, cin];
        shape.extend(kernel);
        let weight = vb.get_with_hints(
            shape.clone(),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: he_normal_std(&shape, HE_NEG_SLOPE),
            },
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(KConv {
            weight,
            bias,
            kernel: kernel.to_vec(),
            stride: stride.to_vec(),
            padding: padding.to_vec(),
            opts: ConvOpts::new()
                .stride(stride.to_vec())
                .padding(padding.to_vec()),
        })
    }

    /// "same" padding `(k-1)/2`.
    pub fn same(
        cin: usize,
        cout: usize,
        kernel: &[usize],
        stride: &[usize],
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let pad: Vec<usize> = kernel.iter().map(|k| k.saturating_sub(1) / 2).collect();
        Self::new(cin, cout, kernel, stride, &pad, bias, vb)
    }

    /// 1×1 conv with bias.
    pub fn pointwise(cin: usize, cout: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        let ones = vec![1; dim];
        Self::new(cin, cout, &ones, &ones, &vec![0; dim], true, vb)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv(x, &self.weight, self.bias.as_ref(), &self.opts)
    }

    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// One `conv → [dropout] → norm → nonlin` unit of a flattened `nn.Sequential` (the seed's
/// conv stacks are named `{i}` per module: conv 0, norm 1, nonlin 2, conv 3, ...).
#[derive(Debug)]
struct FlatLayer {
    conv: KConv,
    dropout: Option<DropoutOptions>,
    norm: Option<Norm>,
    nonlin: Option<Nonlin>,
    nonlin_first: bool,
}

/// `n` conv layers `cin → cout`, the first with `stride`, named as one flat `nn.Sequential`.
#[derive(Debug)]
pub struct FlatStack {
    layers: Vec<FlatLayer>,
}

impl FlatStack {
    pub fn new(
        n: usize,
        cin: usize,
        cout: usize,
        kernel: &[usize],
        stride: &[usize],
        opts: &ConvBlockOptions,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut idx = 0usize;
        let mut layers = Vec::with_capacity(n);
        let ones = vec![1; kernel.len()];
        for i in 0..n {
            let (ci, st) = if i == 0 {
                (cin, stride)
            } else {
                (cout, &ones[..])
            };
            let conv = KConv::same(ci, cout, kernel, st, opts.conv_bias, vb.pp(idx))?;
            idx += 1;
            if opts.dropout.is_some() {
                idx += 1;
            }
            let mut norm = None;
            let mut place_norm = |idx: &mut usize| -> Result<()> {
                if let Some(n) = &opts.norm {
                    norm = Some(Norm::new(n, cout, false, vb.pp(*idx))?);
                    *idx += 1;
                }
                Ok(())
            };
            if opts.nonlin_first {
                if opts.nonlin.is_some() {
                    idx += 1;
                }
                place_norm(&mut idx)?;
            } else {
                place_norm(&mut idx)?;
                if opts.nonlin.is_some() {
                    idx += 1;
                }
            }
            layers.push(FlatLayer {
                conv,
                dropout: opts.dropout,
                norm,
                nonlin: opts.nonlin,
                nonlin_first: opts.nonlin_first,
            });
        }
        Ok(FlatStack { layers })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        for l in &self.layers {
            y = l.conv.forward(&y)?;
            if let Some(d) = &l.dropout {
                y = apply_dropout(d, &y, train)?;
            }
            if l.nonlin_first {
                if let Some(a) = &l.nonlin {
                    y = apply_nonlin(a, &y)?;
                }
                if let Some(n) = &l.norm {
                    y = n.forward(&y, train)?;
                }
            } else {
                if let Some(n) = &l.norm {
                    y = n.forward(&y, train)?;
                }
                if let Some(a) = &l.nonlin {
                    y = apply_nonlin(a, &y)?;
                }
            }
        }
        Ok(y)
    }
}

/// Cross-refinement block (seed `CRFB`): `u' = norm(u + conv1×1(resize(k → u)))`,
/// `k' = norm(k + conv1×1(resize(u → k)))`. A 1×1 conv commutes with linear interpolation
/// (the weights of each output sample sum to 1), so each path runs its conv at whichever
/// resolution keeps the smaller intermediate tensor; the result is the seed's up to rounding.
#[derive(Debug)]
pub struct Crfb {
    unet_to_kinet: KConv,
    kinet_to_unet: KConv,
    unet_norm: Option<Norm>,
    kinet_norm: Option<Norm>,
}

/// Whether a conv `cin → cout` from `src` to `dst` resolution should run before the resize.
pub(crate) fn conv_first(cin: usize, cout: usize, src: &[usize], dst: &[usize]) -> bool {
    (cout as u64) * vox(src) <= (cin as u64) * vox(dst)
}

impl Crfb {
    pub fn new(
        unet_ch: usize,
        kinet_ch: usize,
        opts: &ConvBlockOptions,
        vb: VarBuilder,
    ) -> Result<Self> {
        let dim = opts.dim.n();
        let unet_to_kinet = KConv::pointwise(unet_ch, kinet_ch, dim, vb.pp("unet_to_kinet"))?;
        let kinet_to_unet = KConv::pointwise(kinet_ch, unet_ch, dim, vb.pp("kinet_to_unet"))?;
        let (unet_norm, kinet_norm) = match &opts.norm {
            Some(n) => (
                Some(Norm::new(n, unet_ch, false, vb.pp("unet_norm"))?),
                Some(Norm::new(n, kinet_ch, false, vb.pp("kinet_norm"))?),
            ),
            None => (None, None),
        };
        Ok(Crfb {
            unet_to_kinet,
            kinet_to_unet,
            unet_norm,
            kinet_norm,
        })
    }

    fn adapt(conv: &KConv, x: &Tensor, dst: &[usize]) -> Result<Tensor> {
        let src = &x.dims()[2..];
        if src == dst {
            conv.forward(x)
        } else if conv_first(conv.in_channels(), conv.out_channels(), src, dst) {
            resize(&conv.forward(x)?, dst)
        } else {
            conv.forward(&resize(x, dst)?)
        }
    }

    pub fn forward(&self, u: &Tensor, k: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let su = u.dims()[2..].to_vec();
        let sk = k.dims()[2..].to_vec();
        let ka = Self::adapt(&self.kinet_to_unet, k, &su)?;
        let ua = Self::adapt(&self.unet_to_kinet, u, &sk)?;
        let mut u2 = (u + ka)?;
        let mut k2 = (k + ua)?;
        if let Some(n) = &self.unet_norm {
            u2 = n.forward(&u2, train)?;
        }
        if let Some(n) = &self.kinet_norm {
            k2 = n.forward(&k2, train)?;
        }
        Ok((u2, k2))
    }
}

/// Spatial sizes of every tensor of a forward pass for input size `p`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sizes {
    /// U-Net encoder output of stage `s` (after the optional pool and the convs).
    pub u: Vec<Vec<usize>>,
    /// U-Net pool output of stage `s` (if the stage pools).
    pub u_pool: Vec<Option<Vec<usize>>>,
    /// Ki-Net encoder conv output of stage `s` (before the upsampling).
    pub k_conv: Vec<Vec<usize>>,
    /// Ki-Net encoder output of stage `s` (after the upsampling).
    pub k: Vec<Vec<usize>>,
    /// Ki-Net decoder downsample output / stack output at level `s` (`n-1`: the bottleneck).
    pub kd: Vec<Vec<usize>>,
}

fn stack_size(input: &[usize], n: usize, kernel: &[usize], stride: &[usize]) -> Vec<usize> {
    let pad: Vec<usize> = kernel.iter().map(|k| k.saturating_sub(1) / 2).collect();
    let ones = vec![1; kernel.len()];
    let mut s = input.to_vec();
    for i in 0..n {
        s = conv_out_size(&s, kernel, if i == 0 { stride } else { &ones }, &pad);
    }
    s
}

impl KiUNetConfig {
    /// Stride and padding of the Ki-Net decoder's downsampling conv from level `s+1` to `s`.
    pub fn kinet_down_geometry(&self, s: usize) -> (Vec<usize>, Vec<usize>) {
        let k = &self.base.kernel_sizes[s + 1];
        match self.kinet_sizing {
            KiNetSizing::Mirror => (
                self.mirror_factors()[s + 1].clone(),
                k.iter().map(|v| v.saturating_sub(1) / 2).collect(),
            ),
            KiNetSizing::Seed => (self.base.strides[s + 1].clone(), vec![1; k.len()]),
        }
    }

    /// Every spatial size of a forward pass for an input of spatial size `p`.
    #[allow(clippy::needless_range_loop)] // stage-indexed parallel lists
    pub fn sizes(&self, p: &[usize]) -> Sizes {
        let n = self.n_stages();
        let dim = self.dim();
        let b = &self.base;
        let mut u = Vec::with_capacity(n);
        let mut u_pool = Vec::with_capacity(n);
        let mut cur = p.to_vec();
        for s in 0..n {
            if self.has_pool(s) {
                cur = cur
                    .iter()
                    .zip(&b.strides[s])
                    .map(|(&v, &st)| v / st.max(1))
                    .collect();
                u_pool.push(Some(cur.clone()));
            } else {
                u_pool.push(None);
            }
            cur = stack_size(
                &cur,
                self.n_conv_per_stage[s],
                &b.kernel_sizes[s],
                &self.unet_conv_stride(s),
            );
            u.push(cur.clone());
        }
        let factors = self.mirror_factors();
        let cap: Vec<usize> = p.iter().map(|&v| v * self.kinet_max_scale).collect();
        let ones = vec![1; dim];
        let mut k_conv = Vec::with_capacity(n);
        let mut k = Vec::with_capacity(n);
        let mut cur = p.to_vec();
        for s in 0..n {
            cur = stack_size(&cur, self.n_conv_per_stage[s], &b.kernel_sizes[s], &ones);
            k_conv.push(cur.clone());
            if s + 1 < n {
                match self.kinet_sizing {
                    KiNetSizing::Mirror => {
                        cur = cur.iter().zip(&factors[s]).map(|(&v, &f)| v * f).collect();
                    }
                    KiNetSizing::Seed => {
                        if cur.iter().zip(&cap).all(|(c, m)| c < m) {
                            cur = cur
                                .iter()
                                .zip(&cap)
                                .map(|(&c, &m)| (2 * c).min(m))
                                .collect();
                        }
                    }
                }
            }
            k.push(cur.clone());
        }
        let mut kd = vec![vec![]; n];
        kd[n - 1] = k[n - 1].clone();
        for s in (0..n - 1).rev() {
            let (stride, pad) = self.kinet_down_geometry(s);
            let down = conv_out_size(&kd[s + 1], &b.kernel_sizes[s + 1], &stride, &pad);
            let j = n - 2 - s;
            kd[s] = stack_size(
                &down,
                b.n_conv_per_stage_decoder[j],
                &b.kernel_sizes[s],
                &ones,
            );
        }
        Sizes {
            u,
            u_pool,
            k_conv,
            k,
            kd,
        }
    }
}

/// U-Net encoder stage: optional pool (`{s}.0`) then the conv stack.
#[derive(Debug)]
struct UEncStage {
    pool: Option<PoolOpts>,
    convs: FlatStack,
}

/// KiU-Net (see the module documentation of [`super`]).
#[derive(Debug)]
pub struct KiUNet {
    pub config: KiUNetConfig,
    unet_encoder: Vec<UEncStage>,
    kinet_encoder: Vec<FlatStack>,
    crfb_encoder: Vec<Crfb>,
    unet_transpconvs: Vec<TransposedConv>,
    unet_decoder: Vec<FlatStack>,
    kinet_downsample: Vec<KConv>,
    kinet_decoder: Vec<FlatStack>,
    crfb_decoder: Vec<Crfb>,
    unet_seg_head: KConv,
    kinet_seg_head: KConv,
    ds_heads: Vec<KConv>,
    deep_supervision: bool,
}

impl KiUNet {
    #[allow(clippy::needless_range_loop)] // stage-indexed parallel lists
    pub fn new(cfg: &KiUNetConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.n_stages();
        let dim = cfg.dim();
        let b = &cfg.base;
        let f = &b.features_per_stage;
        let w = &cfg.kinet_widths;
        if n < 2 || w.len() != n || b.strides.len() != n || b.kernel_sizes.len() != n {
            candle_core::bail!("KiU-Net: inconsistent configuration ({n} stages)");
        }
        let opts = &b.block;
        let ones = vec![1; dim];
        let mut unet_encoder = Vec::with_capacity(n);
        let mut cin = b.input_channels;
        for s in 0..n {
            let vbs = vb.pp("unet_encoder").pp(s);
            let pool = cfg
                .has_pool(s)
                .then(|| PoolOpts::new(b.strides[s].clone()).stride(b.strides[s].clone()));
            let idx = usize::from(pool.is_some());
            let convs = FlatStack::new(
                cfg.n_conv_per_stage[s],
                cin,
                f[s],
                &b.kernel_sizes[s],
                &cfg.unet_conv_stride(s),
                opts,
                vbs.pp(idx),
            )?;
            unet_encoder.push(UEncStage { pool, convs });
            cin = f[s];
        }
        let mut kinet_encoder = Vec::with_capacity(n);
        let mut cin = b.input_channels;
        for s in 0..n {
            kinet_encoder.push(FlatStack::new(
                cfg.n_conv_per_stage[s],
                cin,
                w[s],
                &b.kernel_sizes[s],
                &ones,
                opts,
                vb.pp("kinet_encoder").pp(s),
            )?);
            cin = w[s];
        }
        let crfb_encoder = (0..n)
            .map(|s| Crfb::new(f[s], w[s], opts, vb.pp("crfb_encoder").pp(s)))
            .collect::<Result<Vec<_>>>()?;
        let (mut unet_transpconvs, mut unet_decoder) = (vec![], vec![]);
        let (mut kinet_downsample, mut kinet_decoder) = (vec![], vec![]);
        for j in 0..n - 1 {
            let s = n - 2 - j;
            unet_transpconvs.push(TransposedConv::new(
                f[s + 1],
                f[s],
                &b.strides[s + 1],
                opts.conv_bias,
                vb.pp("unet_transpconvs").pp(j),
            )?);
            unet_decoder.push(FlatStack::new(
                b.n_conv_per_stage_decoder[j],
                2 * f[s],
                f[s],
                &b.kernel_sizes[s],
                &ones,
                opts,
                vb.pp("unet_decoder").pp(j),
            )?);
            let (stride, pad) = cfg.kinet_down_geometry(s);
            kinet_downsample.push(KConv::new(
                w[s + 1],
                w[s],
                &b.kernel_sizes[s + 1],
                &stride,
                &pad,
                opts.conv_bias,
                vb.pp("kinet_downsample").pp(j),
            )?);
            kinet_decoder.push(FlatStack::new(
                b.n_conv_per_stage_decoder[j],
                2 * w[s],
                w[s],
                &b.kernel_sizes[s],
                &ones,
                opts,
                vb.pp("kinet_decoder").pp(j),
            )?);
        }
        let crfb_decoder = match cfg.decoder_crfb {
            DecoderCrfb::Off => vec![],
            DecoderCrfb::On => (0..n - 1)
                .map(|s| Crfb::new(f[s], w[s], opts, vb.pp("crfb_decoder").pp(s)))
                .collect::<Result<Vec<_>>>()?,
            // the seed pairs U-Net level s with Ki-Net width n-1-s (never called)
            DecoderCrfb::Unused => (0..n - 1)
                .map(|s| Crfb::new(f[s], w[n - 1 - s], opts, vb.pp("crfb_decoder").pp(s)))
                .collect::<Result<Vec<_>>>()?,
        };
        let nc = b.num_classes;
        let unet_seg_head = KConv::pointwise(f[0], nc, dim, vb.pp("unet_seg_head"))?;
        let kinet_seg_head = KConv::pointwise(w[0], nc, dim, vb.pp("kinet_seg_head"))?;
        // the heads exist only with deep supervision (the seed builds none without it)
        let n_heads = if b.deep_supervision { n - 2 } else { 0 };
        let ds_heads = (0..n_heads)
            .map(|j| {
                KConv::pointwise(
                    f[n - 2 - j],
                    nc,
                    dim,
                    vb.pp("unet_deep_supervision_heads").pp(j),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KiUNet {
            config: cfg.clone(),
            unet_encoder,
            kinet_encoder,
            crfb_encoder,
            unet_transpconvs,
            unet_decoder,
            kinet_downsample,
            kinet_decoder,
            crfb_decoder,
            unet_seg_head,
            kinet_seg_head,
            ds_heads,
            deep_supervision: b.deep_supervision,
        })
    }

    fn forward_impl(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let cfg = &self.config;
        check_input(x, cfg.base.dim(), cfg.base.input_channels, "KiUNet")?;
        let n = cfg.n_stages();
        let sizes = cfg.sizes(&x.dims()[2..]);
        let mut u = x.clone();
        let mut k = x.clone();
        let mut u_skips = Vec::with_capacity(n);
        let mut k_skips = Vec::with_capacity(n);
        for s in 0..n {
            let st = &self.unet_encoder[s];
            if let Some(p) = &st.pool {
                u = match cfg.pool_type {
                    PoolType::Avg => ops::avg_pool(&u, p)?,
                    _ => ops::max_pool(&u, p)?,
                };
            }
            u = st.convs.forward(&u, train)?;
            k = self.kinet_encoder[s].forward(&k, train)?;
            k = resize(&k, &sizes.k[s])?;
            if cfg.skip_before_crfb {
                u_skips.push(u.clone());
                k_skips.push(k.clone());
            }
            (u, k) = self.crfb_encoder[s].forward(&u, &k, train)?;
            if !cfg.skip_before_crfb {
                u_skips.push(u.clone());
                k_skips.push(k.clone());
            }
        }
        let mut ds_outs = Vec::with_capacity(self.ds_heads.len());
        for j in 0..n - 1 {
            let s = n - 2 - j;
            let up = self.unet_transpconvs[j].forward(&u)?;
            u = self.unet_decoder[j].forward(&Tensor::cat(&[&up, &u_skips[s]], 1)?, train)?;
            let down = self.kinet_downsample[j].forward(&k)?;
            let skip = resize(&k_skips[s], &down.dims()[2..])?;
            k = self.kinet_decoder[j].forward(&Tensor::cat(&[&down, &skip], 1)?, train)?;
            if cfg.decoder_crfb == DecoderCrfb::On {
                (u, k) = self.crfb_decoder[s].forward(&u, &k, train)?;
            }
            if self.deep_supervision && j < self.ds_heads.len() {
                ds_outs.push(self.ds_heads[j].forward(&u)?);
            }
        }
        let uo = self.unet_seg_head.forward(&u)?;
        let ko = resize(&self.kinet_seg_head.forward(&k)?, &uo.dims()[2..])?;
        let out = ((uo + ko)? * 0.5)?;
        let mut outs = vec![out];
        outs.extend(ds_outs.into_iter().rev());
        Ok(outs)
    }
}

impl SegNetwork for KiUNet {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        self.forward_impl(x, train)
    }
    fn set_deep_supervision(&mut self, on: bool) {
        // outputs of heads that were built; without them only the full resolution
        self.deep_supervision = on && self.config.base.deep_supervision;
    }
    fn deep_supervision(&self) -> bool {
        self.deep_supervision
    }
    fn spatial_dims(&self) -> usize {
        self.config.dim()
    }
    fn layers(&self, patch: &[usize]) -> Vec<LayerRow> {
        super::estimate::walk_with(&self.config, patch, self.deep_supervision)
            .into_iter()
            .map(|(r, _)| r)
            .collect()
    }
}
