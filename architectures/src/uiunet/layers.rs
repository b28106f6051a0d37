//! UIU-Net building blocks: the dilated conv block (`REBNCONV`), the residual U-block (RSU-L /
//! RSU-LF) and the interactive cross-attention fusion (IC-A, `AsymBiChaFuseReduce`), N-d.
//!
//! Every block can add its rows to a [`Walk`], which is both the layer table
//! ([`crate::network::SegNetwork::layers`]) and the activation estimate.

use crate::init::he_normal_std;
use crate::network::LayerRow;
use crate::ops::{self, ConvOpts, InterpMode, InterpSize, PoolOpts};
use crate::unet::blocks::{apply_dropout, apply_nonlin, Norm, HE_NEG_SLOPE};
use crate::unet::options::{ConvBlockOptions, DropoutOptions, Nonlin};
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

pub(crate) fn prod(v: &[usize]) -> u64 {
    v.iter().map(|&x| x as u64).product()
}

fn fmt_axes(v: &[usize]) -> String {
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", s.join(","))
}

/// Layer table + activation count of one forward pass for one sample.
///
/// `conv` counts output elements of every conv-producing layer (nnU-Net's currency: one unit per
/// conv, standing for its conv/norm/nonlin outputs); `extra` counts the other tensors this
/// network materialises and keeps (concatenations, pooled and upsampled maps, attention
/// products). An extra tensor is worth half a conv unit in the estimate.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    pub rows: Vec<LayerRow>,
    pub conv: u64,
    pub extra: u64,
}

impl Walk {
    pub fn layer(
        &mut self,
        name: String,
        kind: String,
        shape: Vec<usize>,
        params: u64,
        stored: usize,
    ) {
        self.conv += prod(&shape);
        self.rows.push(LayerRow {
            name,
            kind,
            output_shape: shape,
            params,
            stored_activations: stored,
        });
    }

    pub fn extra(&mut self, name: String, kind: &str, shape: Vec<usize>) {
        self.extra += prod(&shape);
        self.rows.push(LayerRow {
            name,
            kind: kind.to_string(),
            output_shape: shape,
            params: 0,
            stored_activations: 1,
        });
    }

    /// nnU-Net-currency estimate: conv units + extra tensors / 2.
    pub fn estimate(&self) -> u64 {
        self.conv + self.extra / 2
    }
}

/// Effective per-axis pool stride at `size`: axes of size 1 are never pooled.
pub(crate) fn effective_pool(stride: &[usize], size: &[usize]) -> Vec<usize> {
    stride
        .iter()
        .zip(size)
        .map(|(&s, &n)| if n < 2 { 1 } else { s.max(1) })
        .collect()
}

/// Output size of a ceil-mode max pool with kernel = stride.
pub(crate) fn pooled_size(size: &[usize], stride: &[usize]) -> Vec<usize> {
    size.iter()
        .zip(stride)
        .map(|(&n, &s)| n.div_ceil(s.max(1)))
        .collect()
}

/// Ceil-mode max pool with kernel = stride (skipped when every stride is 1).
pub(crate) fn pool(x: &Tensor, stride: &[usize]) -> Result<Tensor> {
    let size = &x.dims()[2..];
    let eff = effective_pool(stride, size);
    if eff.iter().all(|&s| s == 1) {
        return Ok(x.clone());
    }
    ops::max_pool(x, &PoolOpts::new(eff.clone()).stride(eff).ceil_mode(true))
}

/// (Bi/tri)linear resize to `size` with `align_corners=False` (no-op at the same size).
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

fn with_channels(c: usize, sp: &[usize]) -> Vec<usize> {
    let mut v = vec![c];
    v.extend(sp);
    v
}

/// `nn.ConvNd` with per-axis kernel, dilation `d` (on axes with kernel > 1) and padding
/// `(k // 2) * d` (size-preserving for odd kernels).
#[derive(Debug, Clone)]
pub(crate) struct DConv {
    weight: Tensor,
    bias: Option<Tensor>,
    kernel: Vec<usize>,
    dilation: Vec<usize>,
    opts: ConvOpts,
}

impl DConv {
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: &[usize],
        dilation: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut shape = vec![cout, cin];
        shape.extend(kernel);
        let init = Init::Randn {
            mean: 0.0,
            stdev: he_normal_std(&shape, HE_NEG_SLOPE),
        };
        let weight = vb.get_with_hints(shape, "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        let dil: Vec<usize> = kernel
            .iter()
            .map(|&k| if k > 1 { dilation } else { 1 })
            .collect();
        let padding: Vec<usize> = kernel.iter().zip(&dil).map(|(k, d)| (k / 2) * d).collect();
        let opts = ConvOpts::new()
            .stride(vec![1; kernel.len()])
            .padding(padding)
            .dilation(dil.clone());
        Ok(DConv {
            weight,
            bias,
            kernel: kernel.to_vec(),
            dilation: dil,
            opts,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv(x, &self.weight, self.bias.as_ref(), &self.opts)
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn params(&self) -> u64 {
        self.weight.elem_count() as u64 + self.bias.as_ref().map_or(0, |b| b.elem_count() as u64)
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "Conv{}d {}→{} k{}",
            self.kernel.len(),
            self.weight.dims()[1],
            self.out_channels(),
            fmt_axes(&self.kernel)
        );
        if self.dilation.iter().any(|&d| d > 1) {
            s.push_str(&format!(" d{}", fmt_axes(&self.dilation)));
        }
        s
    }

    /// Adds a row for a bare conv (a head) at spatial size `sp`.
    pub fn walk(&self, name: String, what: &str, sp: &[usize], w: &mut Walk) {
        w.layer(
            name,
            format!("{} {what}", self.describe()),
            with_channels(self.out_channels(), sp),
            self.params(),
            1,
        );
    }
}

/// `REBNCONV`: conv (dilated) → [dropout] → [norm] → [nonlin]; state_dict `conv.*`, `norm.*`.
#[derive(Debug)]
pub(crate) struct Rebn {
    conv: DConv,
    dropout: Option<DropoutOptions>,
    norm: Option<Norm>,
    nonlin: Option<Nonlin>,
}

impl Rebn {
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: &[usize],
        dilation: usize,
        opts: &ConvBlockOptions,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv = DConv::new(cin, cout, kernel, dilation, opts.conv_bias, vb.pp("conv"))?;
        let norm = match &opts.norm {
            Some(n) => Some(Norm::new(n, cout, false, vb.pp("norm"))?),
            None => None,
        };
        Ok(Rebn {
            conv,
            dropout: opts.dropout,
            norm,
            nonlin: opts.nonlin,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.conv.forward(x)?;
        if let Some(d) = &self.dropout {
            y = apply_dropout(d, &y, train)?;
        }
        if let Some(n) = &self.norm {
            y = n.forward(&y, train)?;
        }
        match &self.nonlin {
            Some(a) => apply_nonlin(a, &y),
            None => Ok(y),
        }
    }

    pub fn params(&self) -> u64 {
        self.conv.params() + self.norm.as_ref().map_or(0, Norm::params)
    }

    pub fn out_channels(&self) -> usize {
        self.conv.out_channels()
    }

    pub fn walk(&self, name: String, sp: &[usize], w: &mut Walk) {
        let mut kind = self.conv.describe();
        if let Some(n) = &self.norm {
            kind.push_str(" + ");
            kind.push_str(n.name());
        }
        if let Some(a) = &self.nonlin {
            kind.push_str(" + ");
            kind.push_str(a.name());
        }
        let stored = 1
            + usize::from(self.dropout.is_some())
            + usize::from(self.norm.is_some())
            + usize::from(self.nonlin.is_some());
        w.layer(
            name,
            kind,
            with_channels(self.out_channels(), sp),
            self.params(),
            stored,
        );
    }
}

/// Geometry of one residual U-block.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RsuSpec {
    /// L: number of encoder convs incl. the bottom (RSU-7 → 7), at least 2.
    pub height: usize,
    pub cin: usize,
    pub mid: usize,
    pub cout: usize,
    /// RSU-LF: dilations 1, 2, 4, ... instead of pooling.
    pub dilated: bool,
    /// Kernel of each level `0..height-1` (the bottom uses the last one).
    pub kernels: Vec<Vec<usize>>,
    /// Pool stride after encoder level `k`, `k = 0..height-2` (unused when dilated).
    pub pools: Vec<Vec<usize>>,
}

impl RsuSpec {
    fn dilation(&self, level: usize) -> usize {
        if self.dilated {
            1 << level
        } else {
            1
        }
    }

    fn bottom_dilation(&self) -> usize {
        if self.dilated {
            1 << (self.height - 1)
        } else {
            2
        }
    }
}

/// Residual U-block (U²-Net's RSU-L, or RSU-LF when dilated). state_dict: `inc`, `enc.{k}`
/// (`enc.0`: out→mid), `bottom`, `dec.{k}` (`dec.0`: 2·mid→out).
#[derive(Debug)]
pub(crate) struct Rsu {
    pub spec: RsuSpec,
    inc: Rebn,
    enc: Vec<Rebn>,
    bottom: Rebn,
    dec: Vec<Rebn>,
}

impl Rsu {
    pub fn new(spec: &RsuSpec, opts: &ConvBlockOptions, vb: VarBuilder) -> Result<Self> {
        let h = spec.height;
        if h < 2 || spec.kernels.len() != h - 1 || spec.pools.len() != h - 2 {
            candle_core::bail!(
                "RSU: height {h} needs {} kernels and {} pools, got {} and {}",
                h.saturating_sub(1),
                h.saturating_sub(2),
                spec.kernels.len(),
                spec.pools.len()
            );
        }
        let (mid, out) = (spec.mid, spec.cout);
        let inc = Rebn::new(spec.cin, out, &spec.kernels[0], 1, opts, vb.pp("inc"))?;
        let mut enc = Vec::with_capacity(h - 1);
        let mut dec = Vec::with_capacity(h - 1);
        for k in 0..h - 1 {
            let (ein, dout) = if k == 0 { (out, out) } else { (mid, mid) };
            let d = spec.dilation(k);
            enc.push(Rebn::new(
                ein,
                mid,
                &spec.kernels[k],
                d,
                opts,
                vb.pp("enc").pp(k),
            )?);
            dec.push(Rebn::new(
                2 * mid,
                dout,
                &spec.kernels[k],
                d,
                opts,
                vb.pp("dec").pp(k),
            )?);
        }
        let bottom = Rebn::new(
            mid,
            mid,
            &spec.kernels[h - 2],
            spec.bottom_dilation(),
            opts,
            vb.pp("bottom"),
        )?;
        Ok(Rsu {
            spec: spec.clone(),
            inc,
            enc,
            bottom,
            dec,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x_in = self.inc.forward(x, train)?;
        let mut e: Vec<Tensor> = Vec::with_capacity(self.enc.len());
        for (k, conv) in self.enc.iter().enumerate() {
            let inp = match e.last() {
                None => x_in.clone(),
                Some(prev) if self.spec.dilated => prev.clone(),
                Some(prev) => pool(prev, &self.spec.pools[k - 1])?,
            };
            e.push(conv.forward(&inp, train)?);
        }
        let Some(deepest) = e.last() else {
            candle_core::bail!("RSU without encoder levels");
        };
        let mut d = self.bottom.forward(deepest, train)?;
        for k in (0..self.dec.len()).rev() {
            let up = resize(&d, &e[k].dims()[2..])?;
            d = self.dec[k].forward(&Tensor::cat(&[&up, &e[k]], 1)?, train)?;
        }
        d + x_in
    }

    /// Rows for input spatial size `sp`; the output has the same size.
    pub fn walk(&self, name: &str, sp: &[usize], w: &mut Walk) {
        let (mid, out) = (self.spec.mid, self.spec.cout);
        self.inc.walk(format!("{name}.inc"), sp, w);
        let mut sizes: Vec<Vec<usize>> = vec![sp.to_vec()];
        self.enc[0].walk(format!("{name}.enc.0"), sp, w);
        for k in 1..self.enc.len() {
            let prev = sizes[k - 1].clone();
            let cur = if self.spec.dilated {
                prev
            } else {
                let eff = effective_pool(&self.spec.pools[k - 1], &prev);
                let next = pooled_size(&prev, &eff);
                if eff.iter().any(|&s| s > 1) {
                    w.extra(
                        format!("{name}.pool.{k}"),
                        &format!("MaxPool s{} (ceil)", fmt_axes(&eff)),
                        with_channels(mid, &next),
                    );
                }
                next
            };
            self.enc[k].walk(format!("{name}.enc.{k}"), &cur, w);
            sizes.push(cur);
        }
        let deepest = sizes[sizes.len() - 1].clone();
        self.bottom.walk(format!("{name}.bottom"), &deepest, w);
        let mut dsize = deepest;
        for k in (0..self.dec.len()).rev() {
            if dsize != sizes[k] {
                w.extra(
                    format!("{name}.up.{k}"),
                    "linear upsample",
                    with_channels(mid, &sizes[k]),
                );
            }
            w.extra(
                format!("{name}.cat.{k}"),
                "concat [up, skip]",
                with_channels(2 * mid, &sizes[k]),
            );
            self.dec[k].walk(format!("{name}.dec.{k}"), &sizes[k], w);
            dsize = sizes[k].clone();
        }
        w.extra(
            format!("{name}.residual"),
            "residual add",
            with_channels(out, sp),
        );
    }
}

/// IC-A (UIU-Net's `AsymBiChaFuseReduce`, r = `reduction`) in N-d, fusing the upsampled deeper
/// feature `xh` (`high` channels) with the encoder skip `xl` (`c` channels):
/// `xh' = feature_high(xh)` (1×1 conv + norm + nonlin, → c);
/// `td = σ(fc2(nonlin(fc1(GAP xh'))))` (c → c/r → c; no norm on the 1-voxel GAP map);
/// `bu = σ(sa([mean_c, max_c](bottomup(xl·td))))` (1×1 conv c → c/r + norm + nonlin, then a
/// 2 → 1 conv without bias); `out1 = post(2·xl·td)`, `out2 = post(2·xh'·bu)` with one shared
/// `post` (conv + norm + nonlin); returns `cat[out1, out2]` (2c channels).
#[derive(Debug)]
pub(crate) struct Ica {
    feature_high: Rebn,
    fc1: DConv,
    fc2: DConv,
    act: Option<Nonlin>,
    bottomup: Rebn,
    sa: DConv,
    post: Rebn,
    c: usize,
}

impl Ica {
    pub fn new(
        high: usize,
        c: usize,
        reduction: usize,
        kernel: &[usize],
        opts: &ConvBlockOptions,
        vb: VarBuilder,
    ) -> Result<Self> {
        let ones = vec![1; kernel.len()];
        let cr = (c / reduction.max(1)).max(1);
        let no_drop = ConvBlockOptions {
            dropout: None,
            ..opts.clone()
        };
        let feature_high = Rebn::new(high, c, &ones, 1, &no_drop, vb.pp("feature_high"))?;
        let td = vb.pp("topdown");
        let fc1 = DConv::new(c, cr, &ones, 1, true, td.pp("fc1"))?;
        let fc2 = DConv::new(cr, c, &ones, 1, true, td.pp("fc2"))?;
        let bu = vb.pp("bottomup");
        let bottomup = Rebn::new(c, cr, &ones, 1, &no_drop, bu.clone())?;
        let sa = DConv::new(2, 1, kernel, 1, false, bu.pp("sa"))?;
        let post = Rebn::new(c, c, kernel, 1, &no_drop, vb.pp("post"))?;
        Ok(Ica {
            feature_high,
            fc1,
            fc2,
            act: opts.nonlin,
            bottomup,
            sa,
            post,
            c,
        })
    }

    pub fn forward(&self, xh: &Tensor, xl: &Tensor, train: bool) -> Result<Tensor> {
        let xh = self.feature_high.forward(xh, train)?;
        let g = ops::adaptive_avg_pool_1(&xh)?;
        let mut t = self.fc1.forward(&g)?;
        if let Some(a) = &self.act {
            t = apply_nonlin(a, &t)?;
        }
        let td = candle_nn::ops::sigmoid(&self.fc2.forward(&t)?)?;
        let xl_td = xl.broadcast_mul(&td)?;
        let b = self.bottomup.forward(&xl_td, train)?;
        let stats = Tensor::cat(&[b.mean_keepdim(1)?, b.max_keepdim(1)?], 1)?;
        let bu = candle_nn::ops::sigmoid(&self.sa.forward(&stats)?)?;
        let out1 = self.post.forward(&(xl_td * 2.0)?, train)?;
        let out2 = self.post.forward(&(xh.broadcast_mul(&bu)? * 2.0)?, train)?;
        Tensor::cat(&[out1, out2], 1)
    }

    pub fn walk(&self, name: &str, sp: &[usize], w: &mut Walk) {
        let c = self.c;
        self.feature_high
            .walk(format!("{name}.feature_high"), sp, w);
        let ones = vec![1; sp.len()];
        self.fc1
            .walk(format!("{name}.topdown.fc1"), "(on GAP)", &ones, w);
        self.fc2
            .walk(format!("{name}.topdown.fc2"), "+ Sigmoid", &ones, w);
        w.extra(
            format!("{name}.xl_td"),
            "skip × top-down weights",
            with_channels(c, sp),
        );
        self.bottomup.walk(format!("{name}.bottomup"), sp, w);
        w.extra(
            format!("{name}.bottomup.stats"),
            "[mean_c, max_c]",
            with_channels(2, sp),
        );
        self.sa.walk(
            format!("{name}.bottomup.sa"),
            "+ Sigmoid (spatial attention)",
            sp,
            w,
        );
        w.extra(
            format!("{name}.bottomup.sigmoid"),
            "sigmoid",
            with_channels(1, sp),
        );
        w.extra(format!("{name}.xs1"), "2·xl·td", with_channels(c, sp));
        self.post.walk(format!("{name}.post (out1)"), sp, w);
        w.extra(format!("{name}.xs2"), "2·xh'·bu", with_channels(c, sp));
        self.post.walk(format!("{name}.post (out2, shared)"), sp, w);
        if let Some(r) = w.rows.last_mut() {
            r.params = 0; // shared weights, counted once
        }
    }
}
