//! Layer table and activation estimate of a KiU-Net, from its configuration alone.
//!
//! Currency: nnU-Net's `compute_conv_feature_map_size`, where a conv → norm → nonlin unit
//! counts its output elements once. Such a unit keeps two tensors for backward (the conv
//! output and the norm output), so one nnU-Net unit stands for two saved tensors, and every
//! extra KiU-Net tensor is weighted by what autograd keeps of it:
//! - convs, transposed convs, the Ki-Net downsampling convs and the heads: 1 (as nnU-Net);
//! - pooled maps, upsampled Ki-Net maps, resized skips and resized maps that feed a conv: ½
//!   (kept once, as the next conv's input);
//! - each CRFB residual sum + norm: 1 (norm input and output kept);
//! - 1×1 CRFB conv outputs and resized maps that only feed a sum, concatenations, and the
//!   resized Ki-Net logits: 0 (nothing kept).
//!
//! With this weighting the seed form in 3D (128³, [32..256]) comes out at ≈40× PlainConvUNet
//! (reference §3 measured 49.6× for the seed's own code, which resizes the U-Net maps *before*
//! its 1×1 convs; counting that order here gives ≈49×).

use super::config::{DecoderCrfb, KiUNetConfig, PoolType};
use super::net::{conv_first, vox, Sizes};
use crate::memory::MemoryEstimate;
use crate::network::LayerRow;
use crate::unet::blocks::conv_out_size;

fn axes(v: &[usize]) -> String {
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", s.join(","))
}

fn shape(c: usize, sp: &[usize]) -> Vec<usize> {
    let mut v = vec![c];
    v.extend(sp);
    v
}

struct Walker<'a> {
    cfg: &'a KiUNetConfig,
    rows: Vec<(LayerRow, u64)>,
}

impl Walker<'_> {
    fn norm_params(&self, c: usize) -> u64 {
        match &self.cfg.base.block.norm {
            Some(n) if n.affine => 2 * c as u64,
            _ => 0,
        }
    }

    /// Adds a row; `half_units` is its weight in halves of an nnU-Net unit (2 = a conv unit).
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        name: String,
        kind: String,
        out: Vec<usize>,
        params: u64,
        stored: usize,
        half_units: u64,
    ) {
        let elems = vox(&out) * half_units;
        self.rows.push((
            LayerRow {
                name,
                kind,
                output_shape: out,
                params,
                stored_activations: stored,
            },
            elems,
        ));
    }

    /// A flat conv stack; returns its output size.
    #[allow(clippy::too_many_arguments)]
    fn stack(
        &mut self,
        prefix: &str,
        n: usize,
        cin: usize,
        cout: usize,
        kernel: &[usize],
        stride: &[usize],
        input: &[usize],
    ) -> Vec<usize> {
        let b = &self.cfg.base.block;
        let per = 1
            + usize::from(b.dropout.is_some())
            + usize::from(b.norm.is_some())
            + usize::from(b.nonlin.is_some());
        let pad: Vec<usize> = kernel.iter().map(|k| k.saturating_sub(1) / 2).collect();
        let ones = vec![1; kernel.len()];
        let mut size = input.to_vec();
        let mut ci = cin;
        let mut kind_tail = String::new();
        if let Some(n) = &b.norm {
            kind_tail.push_str(match n.kind {
                crate::unet::options::NormKind::Instance => " + InstanceNorm",
                crate::unet::options::NormKind::Batch => " + BatchNorm",
            });
        }
        if let Some(a) = &b.nonlin {
            kind_tail.push_str(" + ");
            kind_tail.push_str(a.name());
        }
        for i in 0..n {
            let st = if i == 0 { stride } else { &ones[..] };
            size = conv_out_size(&size, kernel, st, &pad);
            let params = (cout * ci * kernel.iter().product::<usize>()) as u64
                + if b.conv_bias { cout as u64 } else { 0 }
                + self.norm_params(cout);
            let kind = format!(
                "Conv{}d {}→{} k{} s{}{}",
                kernel.len(),
                ci,
                cout,
                axes(kernel),
                axes(st),
                kind_tail
            );
            self.push(
                format!("{prefix}.{}", i * per),
                kind,
                shape(cout, &size),
                params,
                per,
                2,
            );
            ci = cout;
        }
        size
    }

    /// A resized map; `kept`: it feeds a conv (kept once for backward, ½ unit).
    fn resize_row(&mut self, name: String, c: usize, dst: &[usize], kept: bool) {
        self.push(
            name,
            format!("Resize (linear) → {}", axes(dst)),
            shape(c, dst),
            0,
            1,
            u64::from(kept),
        );
    }

    fn pointwise_params(cin: usize, cout: usize) -> u64 {
        (cin * cout + cout) as u64
    }

    /// One CRFB path `cin` channels at `src` into the other branch (`cout` at `dst`).
    #[allow(clippy::too_many_arguments)]
    fn crfb_path(
        &mut self,
        prefix: &str,
        conv: &str,
        norm: &str,
        cin: usize,
        cout: usize,
        src: &[usize],
        dst: &[usize],
    ) {
        let cname = format!("{prefix}.{conv}");
        let ckind = format!("Conv{}d 1×1 {cin}→{cout}", src.len());
        let p = Self::pointwise_params(cin, cout);
        if src == dst {
            self.push(cname, ckind, shape(cout, dst), p, 1, 0);
        } else if conv_first(cin, cout, src, dst) {
            self.push(cname, ckind, shape(cout, src), p, 1, 0);
            self.resize_row(format!("{prefix}.{conv} (resize)"), cout, dst, false);
        } else {
            self.resize_row(format!("{prefix}.{conv} (resize input)"), cin, dst, true);
            self.push(cname, ckind, shape(cout, dst), p, 1, 0);
        }
        let has_norm = self.cfg.base.block.norm.is_some();
        self.push(
            format!("{prefix}.{norm}"),
            if has_norm {
                "residual sum + norm".into()
            } else {
                "residual sum".into()
            },
            shape(cout, dst),
            self.norm_params(cout),
            1 + usize::from(has_norm),
            1 + u64::from(has_norm),
        );
    }

    fn crfb(&mut self, prefix: &str, f: usize, w: usize, su: &[usize], sk: &[usize], used: bool) {
        if !used {
            let p = Self::pointwise_params(f, w)
                + Self::pointwise_params(w, f)
                + self.norm_params(f)
                + self.norm_params(w);
            self.rows.push((
                LayerRow {
                    name: prefix.to_string(),
                    kind: "CRFB (built, never called: seed)".into(),
                    output_shape: vec![],
                    params: p,
                    stored_activations: 0,
                },
                0,
            ));
            return;
        }
        self.crfb_path(prefix, "kinet_to_unet", "unet_norm", w, f, sk, su);
        self.crfb_path(prefix, "unet_to_kinet", "kinet_norm", f, w, su, sk);
    }
}

/// The layer rows of a KiU-Net for one sample of spatial size `patch`, each with its element
/// count in halves of nnU-Net's currency (see the module doc).
pub fn walk(cfg: &KiUNetConfig, patch: &[usize]) -> Vec<(LayerRow, u64)> {
    walk_with(cfg, patch, cfg.base.deep_supervision)
}

/// [`walk`] of a network whose deep-supervision heads (built when
/// `cfg.base.deep_supervision`) give outputs only when `ds_outputs`.
pub fn walk_with(cfg: &KiUNetConfig, patch: &[usize], ds_outputs: bool) -> Vec<(LayerRow, u64)> {
    let n = cfg.n_stages();
    let sizes = cfg.sizes(patch);
    let mut wk = Walker { cfg, rows: vec![] };
    wk.unet_encoder(&sizes, patch);
    wk.kinet_encoder(&sizes, patch);
    let (f, w) = (&cfg.base.features_per_stage, &cfg.kinet_widths);
    for s in 0..n {
        let name = format!("crfb_encoder.{s}");
        wk.crfb(&name, f[s], w[s], &sizes.u[s], &sizes.k[s], true);
    }
    let mut ku = sizes.u[n - 1].clone();
    let mut kk = sizes.k[n - 1].clone();
    for j in 0..n - 1 {
        (ku, kk) = wk.decoder_stage(&sizes, j, &ku, &kk, ds_outputs);
    }
    wk.seg_heads(&ku, &kk);
    wk.rows
}

impl Walker<'_> {
    /// The U-Net branch's encoder: per stage an optional pooling, then the conv stack.
    fn unet_encoder(&mut self, sizes: &Sizes, patch: &[usize]) {
        let (cfg, b) = (self.cfg, &self.cfg.base);
        let dim = cfg.dim();
        let mut cin = b.input_channels;
        let mut cur = patch.to_vec();
        for s in 0..cfg.n_stages() {
            let mut idx = 0;
            if let Some(ps) = &sizes.u_pool[s] {
                let pool = if cfg.pool_type == PoolType::Avg {
                    "Avg"
                } else {
                    "Max"
                };
                let kind = format!("{pool}Pool{dim}d k=s{}", axes(&b.strides[s]));
                self.push(format!("unet_encoder.{s}.0"), kind, shape(cin, ps), 0, 1, 1);
                cur = ps.clone();
                idx = 1;
            }
            let f = b.features_per_stage[s];
            let (k, stride) = (&b.kernel_sizes[s], &cfg.unet_conv_stride(s));
            let name = format!("unet_encoder.{s}.{idx}");
            cur = self.stack(&name, cfg.n_conv_per_stage[s], cin, f, k, stride, &cur);
            cin = f;
        }
    }

    /// The Ki-Net branch's encoder: per stage the conv stack, then the upsampling to its size.
    fn kinet_encoder(&mut self, sizes: &Sizes, patch: &[usize]) {
        let (cfg, b) = (self.cfg, &self.cfg.base);
        let ones = vec![1; cfg.dim()];
        let mut cin = b.input_channels;
        let mut cur = patch.to_vec();
        for s in 0..cfg.n_stages() {
            let w = cfg.kinet_widths[s];
            let name = format!("kinet_encoder.{s}");
            let k = &b.kernel_sizes[s];
            cur = self.stack(&name, cfg.n_conv_per_stage[s], cin, w, k, &ones, &cur);
            if sizes.k[s] != cur {
                let name = format!("kinet_encoder.{s} (upsample)");
                self.resize_row(name, w, &sizes.k[s], true);
                cur = sizes.k[s].clone();
            }
            cin = w;
        }
    }

    /// Decoder stage `j` of both branches (transposed conv + stack, Ki-Net downsampling +
    /// stack, the decoder CRFB, the deep-supervision head); returns both branches' new sizes.
    fn decoder_stage(
        &mut self,
        sizes: &Sizes,
        j: usize,
        ku: &[usize],
        kk: &[usize],
        ds_outputs: bool,
    ) -> (Vec<usize>, Vec<usize>) {
        let (cfg, b) = (self.cfg, &self.cfg.base);
        let (n, dim) = (cfg.n_stages(), cfg.dim());
        let (f, w) = (&b.features_per_stage, &cfg.kinet_widths);
        let ones = vec![1; dim];
        let s = n - 2 - j;
        let up: Vec<usize> = ku
            .iter()
            .zip(&b.strides[s + 1])
            .map(|(a, b)| a * b)
            .collect();
        let tp = (f[s + 1] * f[s] * b.strides[s + 1].iter().product::<usize>()) as u64
            + if b.block.conv_bias { f[s] as u64 } else { 0 };
        let kind = format!(
            "ConvTranspose{dim}d {}→{} k=s{}",
            f[s + 1],
            f[s],
            axes(&b.strides[s + 1])
        );
        self.push(
            format!("unet_transpconvs.{j}"),
            kind,
            shape(f[s], &up),
            tp,
            1,
            2,
        );
        let n_conv = b.n_conv_per_stage_decoder[j];
        let k = &b.kernel_sizes[s];
        let name = format!("unet_decoder.{j}");
        let ku = self.stack(&name, n_conv, 2 * f[s], f[s], k, &ones, &up);
        let down = self.kinet_downsample(j, s, kk);
        if sizes.k[s] != down {
            let name = format!("kinet_decoder.{j} (resize skip)");
            self.resize_row(name, w[s], &down, true);
        }
        let name = format!("kinet_decoder.{j}");
        let kk = self.stack(&name, n_conv, 2 * w[s], w[s], k, &ones, &down);
        let crfb = format!("crfb_decoder.{s}");
        match cfg.decoder_crfb {
            DecoderCrfb::On => self.crfb(&crfb, f[s], w[s], &ku, &kk, true),
            DecoderCrfb::Unused => self.crfb(&crfb, f[s], w[n - 1 - s], &ku, &kk, false),
            DecoderCrfb::Off => {}
        }
        if j + 2 < n && b.deep_supervision {
            self.ds_head(j, f[s], &ku, ds_outputs);
        }
        (ku, kk)
    }

    /// The Ki-Net branch's strided conv of decoder stage `j` (skip stage `s`); returns its
    /// output size.
    fn kinet_downsample(&mut self, j: usize, s: usize, kk: &[usize]) -> Vec<usize> {
        let (cfg, b) = (self.cfg, &self.cfg.base);
        let w = &cfg.kinet_widths;
        let (stride, pad) = cfg.kinet_down_geometry(s);
        let down = conv_out_size(kk, &b.kernel_sizes[s + 1], &stride, &pad);
        let dp = (w[s] * w[s + 1] * b.kernel_sizes[s + 1].iter().product::<usize>()) as u64
            + if b.block.conv_bias { w[s] as u64 } else { 0 };
        let kind = format!(
            "Conv{}d {}→{} k{} s{} p{}",
            cfg.dim(),
            w[s + 1],
            w[s],
            axes(&b.kernel_sizes[s + 1]),
            axes(&stride),
            axes(&pad)
        );
        let out = shape(w[s], &down);
        self.push(format!("kinet_downsample.{j}"), kind, out, dp, 1, 2);
        down
    }

    /// Deep-supervision head `j` on `channels` features of size `size`: a row with its output
    /// when `ds_outputs`, else a parameters-only row (built, unused).
    fn ds_head(&mut self, j: usize, channels: usize, size: &[usize], ds_outputs: bool) {
        let nc = self.cfg.base.num_classes;
        let head = format!("unet_deep_supervision_heads.{j}");
        let p = Walker::pointwise_params(channels, nc);
        if ds_outputs {
            let dim = self.cfg.dim();
            let kind = format!("Conv{dim}d 1×1 {channels}→{nc} (deep-supervision head)");
            self.push(head, kind, shape(nc, size), p, 1, 2);
        } else {
            self.rows.push((
                LayerRow {
                    name: head,
                    kind: "deep-supervision head (built, unused)".into(),
                    output_shape: vec![],
                    params: p,
                    stored_activations: 0,
                },
                0,
            ));
        }
    }

    /// Both branches' segmentation heads, and the resize of the Ki-Net logits when the
    /// branches end at different sizes.
    fn seg_heads(&mut self, ku: &[usize], kk: &[usize]) {
        let cfg = self.cfg;
        let dim = cfg.dim();
        let nc = cfg.base.num_classes;
        let (f0, w0) = (cfg.base.features_per_stage[0], cfg.kinet_widths[0]);
        let kind = format!("Conv{dim}d 1×1 {f0}→{nc} (segmentation head)");
        let p = Walker::pointwise_params(f0, nc);
        self.push("unet_seg_head".into(), kind, shape(nc, ku), p, 1, 2);
        let kind = format!("Conv{dim}d 1×1 {w0}→{nc} (segmentation head)");
        let p = Walker::pointwise_params(w0, nc);
        self.push("kinet_seg_head".into(), kind, shape(nc, kk), p, 1, 2);
        if kk != ku {
            self.resize_row("kinet_seg_head (resize logits)".into(), nc, ku, false);
        }
    }
}

/// [`MemoryEstimate`] of a KiU-Net (see the module doc for the currency).
#[derive(Debug, Clone)]
pub struct KiUNetEstimate {
    pub config: KiUNetConfig,
}

impl MemoryEstimate for KiUNetEstimate {
    fn conv_feature_map_size(&self, patch: &[usize]) -> u64 {
        walk(&self.config, patch)
            .iter()
            .map(|(_, e)| e)
            .sum::<u64>()
            / 2
    }
}
