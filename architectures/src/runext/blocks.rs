//! DynamicRUNext building blocks with the seed's PyTorch state_dict names:
//! `ResidualBlock` (`conv.block.{0,1,3,4}`, `skip`, `bn`), `DynamicConv` (`convs.{k}`, `fc`,
//! `bn`), `PixelShuffleUp` (`conv`, `bn`) and a small `Linear`.

use crate::init::he_normal_std;
use crate::network::LayerRow;
use crate::ops::{self, ConvOpts};
use crate::unet::blocks::{apply_nonlin, Conv, ConvSpec, Norm, HE_NEG_SLOPE};
use crate::unet::options::{Nonlin, NormOptions};
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Norm + nonlinearity shared by every block of a network.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockOptions {
    pub norm: Option<NormOptions>,
    pub nonlin: Option<Nonlin>,
}

impl BlockOptions {
    fn norm(&self, channels: usize, vb: VarBuilder) -> Result<Option<Norm>> {
        self.norm
            .as_ref()
            .map(|n| Norm::new(n, channels, false, vb))
            .transpose()
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        match &self.nonlin {
            Some(a) => apply_nonlin(a, x),
            None => Ok(x.clone()),
        }
    }

    /// "BatchNorm + ReLU" style suffix for layer tables.
    pub(crate) fn suffix(&self) -> String {
        let mut s = String::new();
        if let Some(n) = &self.norm {
            s.push_str(match n.kind {
                crate::unet::options::NormKind::Batch => " + BatchNorm",
                crate::unet::options::NormKind::Instance => " + InstanceNorm",
            });
        }
        if let Some(a) = &self.nonlin {
            s.push_str(" + ");
            s.push_str(a.name());
        }
        s
    }

    /// Tensors one conv → norm → act chain keeps for backward.
    fn stored(&self) -> usize {
        1 + usize::from(self.norm.is_some()) + usize::from(self.nonlin.is_some())
    }
}

fn norm_fwd(n: &Option<Norm>, x: Tensor, train: bool) -> Result<Tensor> {
    match n {
        Some(n) => n.forward(&x, train),
        None => Ok(x),
    }
}

fn norm_params(n: &Option<Norm>) -> u64 {
    n.as_ref().map_or(0, Norm::params)
}

fn fmt_axes(v: &[usize]) -> String {
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", s.join(","))
}

/// `nn.Linear` (`weight (out, in)`, `bias (out)`), Xavier-normal initialised as in the seed.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let stdev = (2.0 / (cin + cout) as f64).sqrt();
        let weight = vb.get_with_hints((cout, cin), "weight", Init::Randn { mean: 0.0, stdev })?;
        let bias = vb.get_with_hints(cout, "bias", Init::Const(0.0))?;
        Ok(Linear { weight, bias })
    }

    /// `x (B, in)` → `(B, out)`, in `x`'s dtype (mixed precision: f32 weights cast).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (
            self.weight.to_dtype(x.dtype())?,
            self.bias.to_dtype(x.dtype())?,
        );
        x.matmul(&w.t()?)?.broadcast_add(&b)
    }

    pub fn params(&self) -> u64 {
        (self.weight.elem_count() + self.bias.elem_count()) as u64
    }
}

/// Seed `ResidualBlock(i, o)`: `act(DoubleConv(x) + norm(Conv1×1(x)))`, the DoubleConv being
/// `[conv k → norm → act] × 2` (`conv.block.0/1` and `conv.block.3/4`), all convs bias-free.
#[derive(Debug)]
pub struct ResidualBlock {
    conv1: Conv,
    norm1: Option<Norm>,
    conv2: Conv,
    norm2: Option<Norm>,
    skip: Conv,
    bn: Option<Norm>,
    opts: BlockOptions,
}

impl ResidualBlock {
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: &[usize],
        opts: &BlockOptions,
        vb: VarBuilder,
    ) -> Result<Self> {
        let ones = vec![1; kernel.len()];
        let b = vb.pp("conv").pp("block");
        Ok(ResidualBlock {
            conv1: Conv::new(&ConvSpec::new(cin, cout, kernel, &ones), false, b.pp(0))?,
            norm1: opts.norm(cout, b.pp(1))?,
            conv2: Conv::new(&ConvSpec::new(cout, cout, kernel, &ones), false, b.pp(3))?,
            norm2: opts.norm(cout, b.pp(4))?,
            skip: Conv::new(
                &ConvSpec::new(cin, cout, &ones, &ones),
                false,
                vb.pp("skip"),
            )?,
            bn: opts.norm(cout, vb.pp("bn"))?,
            opts: opts.clone(),
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self
            .opts
            .act(&norm_fwd(&self.norm1, self.conv1.forward(x)?, train)?)?;
        let y = self
            .opts
            .act(&norm_fwd(&self.norm2, self.conv2.forward(&y)?, train)?)?;
        let s = norm_fwd(&self.bn, self.skip.forward(x)?, train)?;
        self.opts.act(&(y + s)?)
    }

    pub fn out_channels(&self) -> usize {
        self.conv1.out_channels()
    }

    pub fn params(&self) -> u64 {
        self.conv1.params()
            + self.conv2.params()
            + self.skip.params()
            + norm_params(&self.norm1)
            + norm_params(&self.norm2)
            + norm_params(&self.bn)
    }

    /// One row for the whole block; returns `(C, *spatial)` (size unchanged).
    pub fn layer_rows(&self, name: &str, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<usize> {
        let mut out = vec![self.out_channels()];
        out.extend(&input[1..]);
        rows.push(LayerRow {
            name: name.to_string(),
            kind: format!(
                "ResidualBlock {}→{} [{}{}]×2 + 1×1 projection",
                input[0],
                out[0],
                self.conv1.describe(),
                self.opts.suffix()
            ),
            output_shape: out.clone(),
            params: self.params(),
            // two conv chains, the projection conv + norm, the sum and the final act
            stored_activations: 2 * self.opts.stored()
                + 1
                + usize::from(self.bn.is_some())
                + 1
                + usize::from(self.opts.nonlin.is_some()),
        });
        out
    }
}

/// Dynamic convolution (Chen et al., the seed's form): `π = softmax(fc(GAP(x)))` over `K`
/// kernels, `y = act(norm(Σ_k π_k conv_k(x)))`, kernels bias-free, "same" padding.
///
/// Computed by aggregation: the per-sample kernel `Σ_k π_k W_k` is one `(B, K) × (K, o·i·k)`
/// matmul, then a single grouped convolution (`groups = B`) on `x` viewed as `(1, B·i, *sp)`.
#[derive(Debug)]
pub struct DynamicConv {
    /// `K` kernels `(o, i, *k)` (`convs.{k}.weight`).
    kernels: Vec<Tensor>,
    fc: Linear,
    bn: Option<Norm>,
    kernel: Vec<usize>,
    cin: usize,
    cout: usize,
    opts: BlockOptions,
}

impl DynamicConv {
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: &[usize],
        k_kernels: usize,
        opts: &BlockOptions,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut shape = vec![cout, cin];
        shape.extend(kernel);
        let init = Init::Randn {
            mean: 0.0,
            stdev: he_normal_std(&shape, HE_NEG_SLOPE),
        };
        let kernels = (0..k_kernels)
            .map(|k| {
                vb.pp("convs")
                    .pp(k)
                    .get_with_hints(shape.clone(), "weight", init)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DynamicConv {
            kernels,
            fc: Linear::new(cin, k_kernels, vb.pp("fc"))?,
            bn: opts.norm(cout, vb.pp("bn"))?,
            kernel: kernel.to_vec(),
            cin,
            cout,
            opts: opts.clone(),
        })
    }

    fn conv_opts(&self, groups: usize) -> ConvOpts {
        let pad: Vec<usize> = self.kernel.iter().map(|k| (k - 1) / 2).collect();
        ConvOpts::new().padding(pad).groups(groups)
    }

    /// Softmax attention over the kernels, `(B, K)`.
    pub fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let gap = x.flatten_from(2)?.mean(2)?;
        candle_nn::ops::softmax(&self.fc.forward(&gap)?, 1)
    }

    /// The aggregated dynamic convolution (before norm and activation).
    pub fn dynamic_conv(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let b = dims[0];
        let att = self.attention(x)?;
        let k = self.kernels.len();
        let per = self.kernels[0].elem_count();
        let w = Tensor::stack(&self.kernels, 0)?.reshape((k, per))?;
        let agg = att.matmul(&w.to_dtype(att.dtype())?)?;
        let mut wshape = vec![b * self.cout, self.cin];
        wshape.extend(&self.kernel);
        let agg = agg.reshape(wshape)?;
        let mut xs = vec![1, b * self.cin];
        xs.extend(&dims[2..]);
        let y = ops::conv(&x.reshape(xs)?, &agg, None, &self.conv_opts(b))?;
        let mut ys = vec![b, self.cout];
        ys.extend(&y.dims()[2..]);
        y.reshape(ys)
    }

    /// The seed's way: K separate convolutions, weighted and summed (for tests).
    pub fn dynamic_conv_separate(&self, x: &Tensor) -> Result<Tensor> {
        let att = self.attention(x)?;
        let rank = x.rank();
        let mut acc: Option<Tensor> = None;
        for (k, w) in self.kernels.iter().enumerate() {
            let y = ops::conv(x, w, None, &self.conv_opts(1))?;
            let mut s = vec![1usize; rank];
            s[0] = att.dim(0)?;
            let a = att.narrow(1, k, 1)?.reshape(s)?;
            let y = y.broadcast_mul(&a)?;
            acc = Some(match acc {
                None => y,
                Some(t) => (t + y)?,
            });
        }
        match acc {
            Some(t) => Ok(t),
            None => candle_core::bail!("DynamicConv: no kernels"),
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.opts
            .act(&norm_fwd(&self.bn, self.dynamic_conv(x)?, train)?)
    }

    pub fn params(&self) -> u64 {
        self.kernels
            .iter()
            .map(|w| w.elem_count() as u64)
            .sum::<u64>()
            + self.fc.params()
            + norm_params(&self.bn)
    }

    pub fn layer_rows(&self, name: &str, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<usize> {
        let mut out = vec![self.cout];
        out.extend(&input[1..]);
        rows.push(LayerRow {
            name: name.to_string(),
            kind: format!(
                "DynamicConv{}d {}→{} k{} K={} (aggregated){}",
                self.kernel.len(),
                self.cin,
                self.cout,
                fmt_axes(&self.kernel),
                self.kernels.len(),
                self.opts.suffix()
            ),
            output_shape: out.clone(),
            params: self.params(),
            stored_activations: self.opts.stored(),
        });
        out
    }
}

/// Per-axis pixel (voxel) shuffle: `(N, C·Πr, *sp) → (N, C, *sp·r)`. Input channel
/// `c·Πr + a_0·r_1·r_2 + a_1·r_2 + a_2` goes to output `(c, r_0·i_0 + a_0, …)`, PyTorch's
/// `PixelShuffle` order when all factors are equal.
pub fn pixel_shuffle_axes(x: &Tensor, r: &[usize]) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let nd = dims.len().saturating_sub(2);
    if nd == 0 || r.len() != nd || r.contains(&0) {
        candle_core::bail!("pixel_shuffle_axes: factors {r:?} do not fit input shape {dims:?}");
    }
    let rp: usize = r.iter().product();
    if rp == 1 {
        return Ok(x.clone());
    }
    if !dims[1].is_multiple_of(rp) {
        candle_core::bail!(
            "pixel_shuffle_axes: channels {} not divisible by {rp} (factors {r:?})",
            dims[1]
        );
    }
    let c = dims[1] / rp;
    let mut shape = vec![dims[0], c];
    shape.extend(r);
    shape.extend(&dims[2..]);
    let mut perm = vec![0, 1];
    for a in 0..nd {
        perm.push(2 + nd + a);
        perm.push(2 + a);
    }
    let mut out = vec![dims[0], c];
    out.extend(dims[2..].iter().zip(r).map(|(s, f)| s * f));
    x.reshape(shape)?.permute(perm)?.contiguous()?.reshape(out)
}

/// Seed `PixelShuffleUp(i, o)` with per-axis factors: `conv k (i → o·Πr)` → shuffle → norm →
/// act.
#[derive(Debug)]
pub struct PixelShuffleUp {
    conv: Conv,
    bn: Option<Norm>,
    factors: Vec<usize>,
    opts: BlockOptions,
}

impl PixelShuffleUp {
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: &[usize],
        factors: &[usize],
        opts: &BlockOptions,
        vb: VarBuilder,
    ) -> Result<Self> {
        let rp: usize = factors.iter().product();
        let ones = vec![1; kernel.len()];
        Ok(PixelShuffleUp {
            conv: Conv::new(
                &ConvSpec::new(cin, cout * rp, kernel, &ones),
                false,
                vb.pp("conv"),
            )?,
            bn: opts.norm(cout, vb.pp("bn"))?,
            factors: factors.to_vec(),
            opts: opts.clone(),
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = pixel_shuffle_axes(&self.conv.forward(x)?, &self.factors)?;
        self.opts.act(&norm_fwd(&self.bn, y, train)?)
    }

    pub fn out_channels(&self) -> usize {
        self.conv.out_channels() / self.factors.iter().product::<usize>()
    }

    pub fn params(&self) -> u64 {
        self.conv.params() + norm_params(&self.bn)
    }

    pub fn layer_rows(&self, name: &str, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<usize> {
        let mut out = vec![self.out_channels()];
        out.extend(input[1..].iter().zip(&self.factors).map(|(s, f)| s * f));
        rows.push(LayerRow {
            name: name.to_string(),
            kind: format!(
                "PixelShuffleUp {} + shuffle r{}{}",
                self.conv.describe(),
                fmt_axes(&self.factors),
                self.opts.suffix()
            ),
            output_shape: out.clone(),
            params: self.params(),
            // the shuffled conv output replaces the conv output
            stored_activations: self.opts.stored(),
        });
        out
    }
}
