//! The network, its configuration and its activation estimate.

use crate::init::he_normal_std;
use crate::kwargs::{self, invalid};
use crate::memory::MemoryEstimate;
use crate::network::{ArchError, CandleContext, LayerRow, NetworkIo, SegNetwork};
use crate::ops::{self, ConvOpts, InterpMode, InterpSize, NormAffine, PoolOpts};
use crate::unet::blocks::{apply_dropout, apply_nonlin, check_input};
use crate::unet::options::{NormKind, UNetConfig, UNetKwargs};
use candle_core::{Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Key of the grown widths in `arch_kwargs`.
pub const GROWN_WIDTHS_KEY: &str = "grown_widths";

/// The growable U-Net's own `arch_kwargs` key, typed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct GrowableKwargs {
    /// `{"down_0": [c1, c2], "bottleneck": [c1, c2], ...}`: the current widths of each block's
    /// two convs ([`GROWN_WIDTHS_KEY`]).
    pub grown_widths: Option<BTreeMap<String, [usize; 2]>>,
}

/// Parsed options: the plan's U-Net options plus the current widths of every block.
#[derive(Debug, Clone, PartialEq)]
pub struct GrowableConfig {
    pub unet: UNetConfig,
    /// `[conv1, conv2]` filter counts per block: down_0..down_{n-2}, bottleneck, up_0..up_{n-2}
    pub widths: Vec<[usize; 2]>,
}

impl GrowableConfig {
    pub fn n_stages(&self) -> usize {
        self.unet.n_stages()
    }
    pub fn n_blocks(&self) -> usize {
        2 * self.n_stages() - 1
    }

    /// `down_b`, `bottleneck`, `up_j`.
    pub fn block_name(&self, b: usize) -> String {
        let n = self.n_stages();
        if b + 1 < n {
            format!("down_{b}")
        } else if b + 1 == n {
            "bottleneck".into()
        } else {
            format!("up_{}", b - n)
        }
    }

    pub fn block_index(&self, name: &str) -> Option<usize> {
        (0..self.n_blocks()).find(|&b| self.block_name(b) == name)
    }

    /// Stage (resolution) of block `b`.
    pub fn block_stage(&self, b: usize) -> usize {
        let n = self.n_stages();
        if b < n {
            b
        } else {
            n - 2 - (b - n)
        }
    }

    /// Widths of a freshly built network.
    pub fn base_widths(unet: &UNetConfig) -> Vec<[usize; 2]> {
        let f = &unet.features_per_stage;
        let n = f.len();
        let mut w = Vec::with_capacity(2 * n - 1);
        for &c in f.iter() {
            w.push([c, c]);
        }
        for j in 0..n - 1 {
            let t = n - 2 - j;
            let c = if t >= 1 { f[t - 1] } else { f[0] };
            w.push([c, c]);
        }
        w
    }

    /// Input channels of block `b` and, for decoder blocks, the width of the upsampled part.
    pub fn block_input(&self, b: usize) -> (usize, usize) {
        let n = self.n_stages();
        if b == 0 {
            (self.unet.input_channels, 0)
        } else if b < n {
            (self.widths[b - 1][1], 0)
        } else {
            let c_up = self.widths[b - 1][1];
            let skip = self.widths[self.block_stage(b)][1];
            (c_up + skip, c_up)
        }
    }

    /// Hidden width of the head (fixed by the base widths so growth never changes it).
    pub fn head_hidden(&self) -> usize {
        (self.unet.features_per_stage[0] / 2).max(1)
    }

    pub fn from_kwargs(
        kwargs: &Map<String, Value>,
        path: &str,
        io: &NetworkIo,
    ) -> std::result::Result<Self, ArchError> {
        let known: Vec<&str> = UNetKwargs::PLAIN_KEYS
            .iter()
            .chain(kwargs::keys::<GrowableKwargs>())
            .copied()
            .collect();
        kwargs::reject_unknown(kwargs, path, &known)?;
        let own: GrowableKwargs = kwargs::typed(kwargs, path)?;
        let unet = UNetConfig::from_typed(&UNetKwargs::parse(kwargs, path)?, path, false, io)?;
        let n = unet.n_stages();
        if n < 2 {
            return Err(invalid(
                &format!("{path}.n_stages"),
                "GrowableUNet needs at least 2 stages",
            ));
        }
        if let Some(norm) = &unet.block.norm {
            if norm.kind == NormKind::Batch {
                return Err(invalid(
                    &format!("{path}.norm_op"),
                    "GrowableUNet supports InstanceNorm or no norm (growth would have to \
                     extend BatchNorm running statistics)",
                ));
            }
        }
        let mut cfg = GrowableConfig {
            widths: Self::base_widths(&unet),
            unet,
        };
        let gpath = format!("{path}.{GROWN_WIDTHS_KEY}");
        for (k, w) in own.grown_widths.iter().flatten() {
            let kp = format!("{gpath}.{k}");
            let Some(b) = cfg.block_index(k) else {
                let names: Vec<String> = (0..cfg.n_blocks()).map(|b| cfg.block_name(b)).collect();
                return Err(invalid(
                    &kp,
                    format!("unknown block; blocks: {}", names.join(", ")),
                ));
            };
            if let Some(i) = w.iter().position(|&x| x == 0) {
                return Err(invalid(
                    &format!("{kp}[{i}]"),
                    "expected a positive integer, got 0",
                ));
            }
            cfg.widths[b] = *w;
        }
        Ok(cfg)
    }

    /// `grown_widths` as JSON (every block).
    pub fn widths_json(&self) -> Value {
        let mut m = Map::new();
        for (b, w) in self.widths.iter().enumerate() {
            m.insert(self.block_name(b), Value::from(vec![w[0], w[1]]));
        }
        Value::Object(m)
    }

    fn stage_sizes(&self, patch: &[usize]) -> Vec<Vec<usize>> {
        let mut cur = patch.to_vec();
        let mut out = vec![];
        for s in 0..self.n_stages() {
            if s > 0 {
                cur = cur
                    .iter()
                    .zip(&self.unet.strides[s])
                    .map(|(v, st)| v / st.max(&1))
                    .collect();
            }
            out.push(cur.clone());
        }
        out
    }
}

impl MemoryEstimate for GrowableConfig {
    /// Output elements of every conv, max pool, upsampling and head (nnU-Net's currency: one
    /// count per conv output; pool and interpolation outputs are extra stored tensors here).
    fn conv_feature_map_size(&self, patch: &[usize]) -> u64 {
        let sizes = self.stage_sizes(patch);
        let vox = |s: usize| sizes[s].iter().map(|&v| v as u64).product::<u64>();
        let n = self.n_stages();
        let mut out = 0u64;
        for b in 0..self.n_blocks() {
            let s = self.block_stage(b);
            out += (self.widths[b][0] + self.widths[b][1]) as u64 * vox(s);
            if b + 1 < n {
                out += self.widths[b][1] as u64 * vox(s + 1); // max pool
            }
            if b >= n {
                out += self.widths[b - 1][1] as u64 * vox(s); // upsampled
                let j = b - n;
                if self.unet.deep_supervision && j + 2 < n {
                    out += self.unet.num_classes as u64 * vox(s);
                }
            }
        }
        let k = self.unet.num_classes as u64;
        out + (self.head_hidden() as u64 + 2 * k) * vox(0)
    }
}

/// One convolution with its (optional) norm; `post` = dropout → norm → nonlin follow.
#[derive(Debug, Clone)]
pub(crate) struct ConvLayer {
    /// state_dict prefix (`down_sample_layers.0.conv1`)
    pub conv_name: String,
    /// norm prefix (`down_sample_layers.0.norm1`) if the norm has parameters
    pub norm_name: Option<String>,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub norm_w: Option<Tensor>,
    pub norm_b: Option<Tensor>,
    pub kernel: Vec<usize>,
    pub post: bool,
}

impl ConvLayer {
    pub fn out_ch(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn in_ch(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn padding(&self) -> Vec<usize> {
        self.kernel.iter().map(|k| (k - 1) / 2).collect()
    }
    pub fn opts(&self) -> ConvOpts {
        ConvOpts::new().padding(self.padding())
    }
    pub fn params(&self) -> u64 {
        [
            &Some(self.weight.clone()),
            &self.bias,
            &self.norm_w,
            &self.norm_b,
        ]
        .iter()
        .filter_map(|t| t.as_ref())
        .map(|t| t.elem_count() as u64)
        .sum()
    }
}

/// What a growth step wants recorded during the next forward pass.
#[derive(Debug, Default)]
pub(crate) struct Probe {
    /// record the input of this layer
    pub record_input: Option<usize>,
    pub recorded: Option<Tensor>,
    /// add a zero variable to these layers' conv outputs (its gradient = ∂L/∂output)
    pub zero_add: Vec<usize>,
    pub zero_vars: HashMap<usize, Var>,
}

/// The growable U-Net (see the module docs).
#[derive(Debug)]
pub struct GrowableUNet {
    pub(crate) cfg: GrowableConfig,
    /// conv1/conv2 of every block (index 2b, 2b+1), then head conv2.{0,1,2}, then ds_heads
    /// (built only with deep supervision, `cfg.unet.deep_supervision`)
    pub(crate) layers: Vec<ConvLayer>,
    pub(crate) probe: Mutex<Option<Probe>>,
    /// The deep-supervision heads' outputs are returned.
    ds_outputs: bool,
}

fn conv_layer(
    vb: &VarBuilder,
    conv_name: &str,
    norm_name: Option<String>,
    cin: usize,
    cout: usize,
    kernel: &[usize],
    bias: bool,
) -> Result<ConvLayer> {
    let mut shape = vec![cout, cin];
    shape.extend(kernel);
    let std = he_normal_std(&shape, 1e-2);
    let weight = vb.get_with_hints(
        shape.clone(),
        &format!("{conv_name}.weight"),
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(cout, &format!("{conv_name}.bias"), Init::Const(0.0))?)
    } else {
        None
    };
    let (norm_w, norm_b) = match &norm_name {
        Some(nn) => (
            Some(vb.get_with_hints(cout, &format!("{nn}.weight"), Init::Const(1.0))?),
            Some(vb.get_with_hints(cout, &format!("{nn}.bias"), Init::Const(0.0))?),
        ),
        None => (None, None),
    };
    Ok(ConvLayer {
        conv_name: conv_name.to_string(),
        norm_name,
        weight,
        bias,
        norm_w,
        norm_b,
        kernel: kernel.to_vec(),
        post: true,
    })
}

impl GrowableUNet {
    pub fn new(cfg: &GrowableConfig, vb: VarBuilder) -> std::result::Result<Self, ArchError> {
        Self::build(cfg, vb).ctx(|| format!("building {}", super::GROWABLE_UNET))
    }

    fn build(cfg: &GrowableConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.n_stages();
        let affine = cfg.unet.block.norm.as_ref().is_some_and(|n| n.affine);
        let bias = cfg.unet.block.conv_bias;
        let mut layers = Vec::new();
        for b in 0..cfg.n_blocks() {
            let prefix = if b + 1 < n {
                format!("down_sample_layers.{b}")
            } else if b + 1 == n {
                "conv".to_string()
            } else {
                format!("up_sample_layers.{}", b - n)
            };
            let kernel = &cfg.unet.kernel_sizes[cfg.block_stage(b)];
            let (cin, _) = cfg.block_input(b);
            let [w1, w2] = cfg.widths[b];
            for (i, (ci, co)) in [(cin, w1), (w1, w2)].into_iter().enumerate() {
                let norm = affine.then(|| format!("{prefix}.norm{}", i + 1));
                layers.push(conv_layer(
                    &vb,
                    &format!("{prefix}.conv{}", i + 1),
                    norm,
                    ci,
                    co,
                    kernel,
                    bias,
                )?);
            }
        }
        let dim = cfg.unet.dim().n();
        let ones = vec![1usize; dim];
        let k = cfg.unet.num_classes;
        let last = cfg.widths[cfg.n_blocks() - 1][1];
        let hid = cfg.head_hidden();
        for (i, (ci, co)) in [(last, hid), (hid, k), (k, k)].into_iter().enumerate() {
            let mut l = conv_layer(&vb, &format!("conv2.{i}"), None, ci, co, &ones, true)?;
            l.post = false;
            layers.push(l);
        }
        // the seed has no deep-supervision heads: built only where deep supervision is on
        let n_ds = if cfg.unet.deep_supervision {
            n.saturating_sub(2)
        } else {
            0
        };
        for j in 0..n_ds {
            let ci = cfg.widths[n + j][1];
            let mut l = conv_layer(&vb, &format!("ds_heads.{j}"), None, ci, k, &ones, true)?;
            l.post = false;
            layers.push(l);
        }
        Ok(GrowableUNet {
            cfg: cfg.clone(),
            layers,
            probe: Mutex::new(None),
            ds_outputs: cfg.unet.deep_supervision,
        })
    }

    pub fn config(&self) -> &GrowableConfig {
        &self.cfg
    }

    pub(crate) fn head_index(&self) -> usize {
        2 * self.cfg.n_blocks()
    }
    /// Layer index of deep-supervision head `j`, if the heads were built.
    pub(crate) fn ds_head_index(&self, j: usize) -> Option<usize> {
        let li = self.head_index() + 3 + j;
        (li < self.layers.len()).then_some(li)
    }

    /// conv (+ probes) → [dropout → norm → nonlin].
    pub(crate) fn layer_forward(&self, li: usize, x: &Tensor, train: bool) -> Result<Tensor> {
        let l = &self.layers[li];
        let mut y = ops::conv(x, &l.weight, l.bias.as_ref(), &l.opts())?;
        {
            let mut guard = self
                .probe
                .lock()
                .map_err(|_| candle_core::Error::Msg("probe lock poisoned".into()))?;
            if let Some(p) = guard.as_mut() {
                if p.record_input == Some(li) {
                    p.recorded = Some(x.detach());
                }
                if p.zero_add.contains(&li) {
                    let v = Var::zeros(y.dims(), y.dtype(), y.device())?;
                    y = (y + v.as_tensor())?;
                    p.zero_vars.insert(li, v);
                }
            }
        }
        if !l.post {
            return Ok(y);
        }
        let opts = &self.cfg.unet.block;
        if let Some(d) = &opts.dropout {
            y = apply_dropout(d, &y, train)?;
        }
        let norm = |y: &Tensor| -> Result<Tensor> {
            match &opts.norm {
                Some(n) => ops::instance_norm(
                    y,
                    NormAffine::new(l.norm_w.as_ref(), l.norm_b.as_ref()),
                    n.eps,
                ),
                None => Ok(y.clone()),
            }
        };
        match &opts.nonlin {
            Some(a) if opts.nonlin_first => norm(&apply_nonlin(a, &y)?),
            Some(a) => apply_nonlin(a, &norm(&y)?),
            None => norm(&y),
        }
    }

    fn block_forward(&self, b: usize, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.layer_forward(2 * b, x, train)?;
        self.layer_forward(2 * b + 1, &y, train)
    }

    fn head_forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.head_index();
        let y = self.layer_forward(h, x, false)?;
        let y = self.layer_forward(h + 1, &y, false)?;
        self.layer_forward(h + 2, &y, false)
    }

    pub(crate) fn pool_opts(&self, stage: usize) -> PoolOpts {
        let s = self.cfg.unet.strides[stage].clone();
        PoolOpts::new(s.clone()).stride(s)
    }

    pub(crate) fn upsample(x: &Tensor, size: &[usize]) -> Result<Tensor> {
        ops::interpolate(
            x,
            &InterpSize::Size(size.to_vec()),
            InterpMode::Linear {
                align_corners: true,
            },
        )
    }

    /// Trainable parameter count (all heads included).
    pub fn param_count(&self) -> u64 {
        self.layers.iter().map(ConvLayer::params).sum()
    }
}

impl SegNetwork for GrowableUNet {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        check_input(
            x,
            self.cfg.unet.dim(),
            self.cfg.unet.input_channels,
            "GrowableUNet",
        )?;
        let n = self.cfg.n_stages();
        let mut skips = Vec::with_capacity(n - 1);
        let mut y = x.clone();
        for b in 0..n - 1 {
            let s = self.block_forward(b, &y, train)?;
            y = ops::max_pool(&s, &self.pool_opts(b + 1))?;
            skips.push(s);
        }
        y = self.block_forward(n - 1, &y, train)?;
        let mut ds = vec![];
        for j in 0..n - 1 {
            let skip = &skips[n - 2 - j];
            let up = Self::upsample(&y, &skip.dims()[2..])?;
            let cat = Tensor::cat(&[&up, skip], 1)?;
            y = self.block_forward(n + j, &cat, train)?;
            match self.ds_head_index(j) {
                Some(li) if self.ds_outputs => ds.push(self.layer_forward(li, &y, false)?),
                _ => {}
            }
        }
        let mut outs = vec![self.head_forward(&y)?];
        outs.extend(ds.into_iter().rev());
        Ok(outs)
    }

    fn set_deep_supervision(&mut self, on: bool) {
        // outputs of heads that were built (the config keeps what was built)
        self.ds_outputs = on && self.cfg.unet.deep_supervision;
    }
    fn deep_supervision(&self) -> bool {
        self.ds_outputs
    }
    fn spatial_dims(&self) -> usize {
        self.cfg.unet.dim().n()
    }

    fn layers(&self, patch: &[usize]) -> Vec<LayerRow> {
        let cfg = &self.cfg;
        let n = cfg.n_stages();
        let sizes = cfg.stage_sizes(patch);
        let post = 1
            + usize::from(cfg.unet.block.dropout.is_some())
            + usize::from(cfg.unet.block.norm.is_some())
            + usize::from(cfg.unet.block.nonlin.is_some());
        let shape = |c: usize, s: usize| {
            let mut v = vec![c];
            v.extend(&sizes[s]);
            v
        };
        let mut rows = vec![];
        let conv_row = |rows: &mut Vec<LayerRow>, li: usize, s: usize, extra: &str| {
            let l = &self.layers[li];
            let dim = l.kernel.len();
            let mut kind = format!(
                "Conv{dim}d {}→{} k{:?}{extra}",
                l.in_ch(),
                l.out_ch(),
                l.kernel
            );
            if l.post {
                if cfg.unet.block.norm.is_some() {
                    kind.push_str(" + InstanceNorm");
                }
                if let Some(a) = &cfg.unet.block.nonlin {
                    kind.push_str(" + ");
                    kind.push_str(a.name());
                }
            }
            rows.push(LayerRow {
                name: l.conv_name.clone(),
                kind,
                output_shape: shape(l.out_ch(), s),
                params: l.params(),
                stored_activations: if l.post { post } else { 1 },
            });
        };
        for b in 0..cfg.n_blocks() {
            let s = cfg.block_stage(b);
            if b >= n {
                let c_up = cfg.widths[b - 1][1];
                rows.push(LayerRow {
                    name: format!("{}.upsample", cfg.block_name(b)),
                    kind: "linear interpolation (align_corners) + concat skip".into(),
                    output_shape: shape(c_up, s),
                    params: 0,
                    stored_activations: 1,
                });
            }
            conv_row(&mut rows, 2 * b, s, "");
            conv_row(&mut rows, 2 * b + 1, s, "");
            if b + 1 < n {
                rows.push(LayerRow {
                    name: format!("{}.pool", cfg.block_name(b)),
                    kind: format!("MaxPool s{:?}", cfg.unet.strides[s + 1]),
                    output_shape: shape(cfg.widths[b][1], s + 1),
                    params: 0,
                    stored_activations: 1,
                });
            }
            if let Some(li) = b.checked_sub(n).and_then(|j| self.ds_head_index(j)) {
                conv_row(&mut rows, li, s, " (deep-supervision head)");
            }
        }
        for i in 0..3 {
            conv_row(&mut rows, self.head_index() + i, 0, " (head)");
        }
        rows
    }
}

/// Widths of the growable convs by name (`down_0.conv1` → 32).
pub(crate) fn width_map(cfg: &GrowableConfig) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for b in 0..cfg.n_blocks() {
        for i in 0..2 {
            m.insert(
                format!("{}.conv{}", cfg.block_name(b), i + 1),
                cfg.widths[b][i],
            );
        }
    }
    m
}
