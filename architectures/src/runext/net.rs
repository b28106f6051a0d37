//! The DynamicRUNext network (2D or 3D at run time).

use super::blocks::{DynamicConv, Linear, PixelShuffleUp, ResidualBlock};
use super::RUNextConfig;
use super::{ClassHead, SegAndClassLogits};
use crate::network::{LayerRow, SegNetwork};
use crate::ops::{self, PadMode, PoolOpts};
use crate::unet::blocks::{apply_dropout, check_input, Conv, ConvSpec};
use crate::unet::options::DropoutOptions;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

fn pool_opts(stride: &[usize]) -> Option<PoolOpts> {
    stride
        .iter()
        .any(|&s| s != 1)
        .then(|| PoolOpts::new(stride.to_vec()).stride(stride.to_vec()))
}

fn pool(x: &Tensor, p: &Option<PoolOpts>) -> Result<Tensor> {
    match p {
        Some(p) => ops::max_pool(x, p),
        None => Ok(x.clone()),
    }
}

/// Seed `DynamicResDown`: max-pool (kernel = stride) → `DynamicConv` → `ResidualBlock`.
#[derive(Debug)]
pub struct DynamicResDown {
    pool: Option<PoolOpts>,
    pub dynamic_conv: DynamicConv,
    pub residual: ResidualBlock,
    stride: Vec<usize>,
}

/// Seed `DynamicResUp`: `PixelShuffleUp(i, i/2)` → pad to the skip → `cat[skip, up]` →
/// `ResidualBlock(i/2 + s, o)`.
#[derive(Debug)]
pub struct DynamicResUp {
    pub up: PixelShuffleUp,
    pub residual: ResidualBlock,
}

/// DynamicRUNext: residual stem, `depth - 1` dynamic residual down steps, a wide dynamic
/// bottleneck (`2 × features[-1]`) with an image-level classification head, `depth`
/// pixel-shuffle up steps and 1×1 segmentation heads.
#[derive(Debug)]
pub struct DynamicRUNext {
    pub config: RUNextConfig,
    pub stem: ResidualBlock,
    pub downs: Vec<DynamicResDown>,
    bottleneck_pool: Option<PoolOpts>,
    pub bottleneck_conv: DynamicConv,
    pub bottleneck_res: ResidualBlock,
    pub cls_fc1: Linear,
    pub cls_fc2: Linear,
    pub ups: Vec<DynamicResUp>,
    pub outc: Conv,
    /// 1×1 heads of decoder levels 1..depth-1 (`ds_heads.{level-1}`).
    pub ds_heads: Vec<Conv>,
    deep_supervision: bool,
}

impl DynamicRUNext {
    pub fn new(cfg: &RUNextConfig, vb: VarBuilder) -> Result<Self> {
        let depth = cfg.features.len();
        if depth == 0 || cfg.kernels.len() != depth + 1 || cfg.strides.len() != depth + 1 {
            candle_core::bail!(
                "DynamicRUNext: {depth} levels need {} kernel sizes and strides",
                depth + 1
            );
        }
        let f = &cfg.features;
        let o = &cfg.blocks;
        let ones = vec![1; cfg.dim];
        let stem = ResidualBlock::new(cfg.in_channels, f[0], &cfg.kernels[0], o, vb.pp("stem"))?;
        let mut downs = Vec::with_capacity(depth - 1);
        for l in 1..depth {
            let v = vb.pp("downs").pp(l - 1);
            downs.push(DynamicResDown {
                pool: pool_opts(&cfg.strides[l]),
                dynamic_conv: DynamicConv::new(
                    f[l - 1],
                    f[l],
                    &cfg.kernels[l],
                    cfg.k_kernels,
                    o,
                    v.pp("dynamic_conv"),
                )?,
                residual: ResidualBlock::new(f[l], f[l], &cfg.kernels[l], o, v.pp("residual"))?,
                stride: cfg.strides[l].clone(),
            });
        }
        let bv = vb.pp("bottleneck");
        let kb = &cfg.kernels[depth];
        let bottleneck_conv =
            DynamicConv::new(f[depth - 1], cfg.bottleneck, kb, cfg.k_kernels, o, bv.pp(1))?;
        let bottleneck_res = ResidualBlock::new(cfg.bottleneck, cfg.bottleneck, kb, o, bv.pp(2))?;
        let cls_fc1 = Linear::new(cfg.bottleneck, cfg.cls_hidden, vb.pp("cls_head").pp(0))?;
        let cls_fc2 = Linear::new(cfg.cls_hidden, cfg.n_cls, vb.pp("cls_head").pp(3))?;
        let mut ups = Vec::with_capacity(depth);
        let mut d_in = cfg.bottleneck;
        for u in 0..depth {
            let t = depth - 1 - u;
            let v = vb.pp("ups").pp(u);
            let half = d_in / 2;
            let up = PixelShuffleUp::new(
                d_in,
                half,
                &cfg.kernels[t + 1],
                &cfg.strides[t + 1],
                o,
                v.pp("up"),
            )?;
            let residual =
                ResidualBlock::new(half + f[t], f[t], &cfg.kernels[t], o, v.pp("residual"))?;
            ups.push(DynamicResUp { up, residual });
            d_in = f[t];
        }
        let outc = Conv::new(
            &ConvSpec::new(f[0], cfg.num_classes, &ones, &ones),
            true,
            vb.pp("outc"),
        )?;
        let mut ds_heads = vec![];
        // low-resolution heads only where deep supervision is on (the seed has none)
        if cfg.ds_heads && cfg.deep_supervision {
            for (l, &fl) in f.iter().enumerate().skip(1) {
                ds_heads.push(Conv::new(
                    &ConvSpec::new(fl, cfg.num_classes, &ones, &ones),
                    true,
                    vb.pp("ds_heads").pp(l - 1),
                )?);
            }
        }
        Ok(DynamicRUNext {
            config: cfg.clone(),
            stem,
            downs,
            bottleneck_pool: pool_opts(&cfg.strides[depth]),
            bottleneck_conv,
            bottleneck_res,
            cls_fc1,
            cls_fc2,
            ups,
            outc,
            ds_heads,
            deep_supervision: cfg.deep_supervision,
        })
    }

    fn depth(&self) -> usize {
        self.config.features.len()
    }

    /// Segmentation logits (full resolution first) and, if `with_class`, the class logits.
    fn run(
        &self,
        x: &Tensor,
        train: bool,
        with_class: bool,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let dim = self.config.conv_dim();
        check_input(x, dim, self.config.in_channels, "DynamicRUNext")?;
        let mut skips = Vec::with_capacity(self.depth());
        let mut y = self.stem.forward(x, train)?;
        skips.push(y.clone());
        for d in &self.downs {
            y = pool(&y, &d.pool)?;
            y = d.dynamic_conv.forward(&y, train)?;
            y = d.residual.forward(&y, train)?;
            skips.push(y.clone());
        }
        y = pool(&y, &self.bottleneck_pool)?;
        y = self.bottleneck_conv.forward(&y, train)?;
        y = self.bottleneck_res.forward(&y, train)?;
        let channel_drop = DropoutOptions {
            p: self.config.dropout,
            channelwise: true,
        };
        y = apply_dropout(&channel_drop, &y, train)?;
        let class_logits = if with_class {
            let gap = y.flatten_from(2)?.mean(2)?;
            let h = self.cls_fc1.forward(&gap)?.relu()?;
            let h = ops::dropout(&h, self.config.dropout, train)?;
            Some(self.cls_fc2.forward(&h)?)
        } else {
            None
        };
        let depth = self.depth();
        let mut seg = vec![];
        for (u, up) in self.ups.iter().enumerate() {
            let t = depth - 1 - u;
            let skip = &skips[t];
            let mut z = up.up.forward(&y, train)?;
            let (zs, ss) = (z.dims()[2..].to_vec(), skip.dims()[2..].to_vec());
            if zs != ss {
                let mut amounts = Vec::with_capacity(zs.len());
                for (a, b) in zs.iter().zip(&ss) {
                    if a > b {
                        candle_core::bail!(
                            "DynamicRUNext: upsampled size {zs:?} exceeds the skip's {ss:?}"
                        );
                    }
                    let diff = b - a;
                    amounts.push((diff / 2, diff - diff / 2));
                }
                z = ops::pad(&z, &amounts, PadMode::Zeros)?;
            }
            y = up.residual.forward(&Tensor::cat(&[skip, &z], 1)?, train)?;
            if t == 0 {
                seg.push(self.outc.forward(&y)?);
            } else if self.deep_supervision && !self.ds_heads.is_empty() {
                seg.push(self.ds_heads[t - 1].forward(&y)?);
            }
        }
        seg.reverse();
        Ok((seg, class_logits))
    }

    /// Parameters of the segmentation heads not used without deep supervision.
    fn unused_head_params(&self) -> u64 {
        if self.deep_supervision {
            0
        } else {
            self.ds_heads.iter().map(Conv::params).sum()
        }
    }
}

impl ClassHead for DynamicRUNext {
    fn num_class_outputs(&self) -> usize {
        self.config.n_cls
    }

    fn forward_with_class(&self, x: &Tensor, train: bool) -> Result<SegAndClassLogits> {
        match self.run(x, train, true)? {
            (seg, Some(class_logits)) => Ok(SegAndClassLogits { seg, class_logits }),
            (_, None) => candle_core::bail!("DynamicRUNext: the class head produced no logits"),
        }
    }
}

impl SegNetwork for DynamicRUNext {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        Ok(self.run(x, train, false)?.0)
    }

    fn set_deep_supervision(&mut self, on: bool) {
        // the config keeps what was built; outputs need built heads
        self.deep_supervision = on && self.config.deep_supervision;
    }

    fn deep_supervision(&self) -> bool {
        self.deep_supervision
    }

    fn spatial_dims(&self) -> usize {
        self.config.dim
    }

    fn layers(&self, patch: &[usize]) -> Vec<LayerRow> {
        let mut rows = vec![];
        let pool_row = |rows: &mut Vec<LayerRow>, name: String, x: &[usize], s: &[usize]| {
            let mut out = vec![x[0]];
            out.extend(x[1..].iter().zip(s).map(|(a, b)| a / b));
            if s.iter().any(|&v| v != 1) {
                rows.push(LayerRow {
                    name,
                    kind: format!("MaxPool{}d k=s{:?}", s.len(), s),
                    output_shape: out.clone(),
                    params: 0,
                    stored_activations: 1,
                });
            }
            out
        };
        let mut x = vec![self.config.in_channels];
        x.extend(patch);
        let mut skips = vec![];
        x = self.stem.layer_rows("stem", &x, &mut rows);
        skips.push(x.clone());
        for (i, d) in self.downs.iter().enumerate() {
            x = pool_row(&mut rows, format!("downs.{i} (pool)"), &x, &d.stride);
            x = d
                .dynamic_conv
                .layer_rows(&format!("downs.{i}.dynamic_conv"), &x, &mut rows);
            x = d
                .residual
                .layer_rows(&format!("downs.{i}.residual"), &x, &mut rows);
            skips.push(x.clone());
        }
        let depth = self.depth();
        x = pool_row(
            &mut rows,
            "bottleneck.0".into(),
            &x,
            &self.config.strides[depth],
        );
        x = self
            .bottleneck_conv
            .layer_rows("bottleneck.1", &x, &mut rows);
        x = self
            .bottleneck_res
            .layer_rows("bottleneck.2", &x, &mut rows);
        rows.push(LayerRow {
            name: "cls_head".into(),
            kind: format!(
                "GAP → Linear {}→{} → ReLU → Dropout({}) → Linear {}→{} (class logits)",
                x[0],
                self.config.cls_hidden,
                self.config.dropout,
                self.config.cls_hidden,
                self.config.n_cls
            ),
            output_shape: vec![self.config.n_cls],
            params: self.cls_fc1.params() + self.cls_fc2.params(),
            stored_activations: 0,
        });
        for (u, up) in self.ups.iter().enumerate() {
            let t = depth - 1 - u;
            let mut z = up.up.layer_rows(&format!("ups.{u}.up"), &x, &mut rows);
            z[1..].copy_from_slice(&skips[t][1..]);
            z[0] += skips[t][0];
            x = up
                .residual
                .layer_rows(&format!("ups.{u}.residual"), &z, &mut rows);
            let head = if t == 0 {
                Some(("outc".to_string(), &self.outc))
            } else if self.deep_supervision && !self.ds_heads.is_empty() {
                Some((format!("ds_heads.{}", t - 1), &self.ds_heads[t - 1]))
            } else {
                None
            };
            if let Some((name, h)) = head {
                let mut o = vec![h.out_channels()];
                o.extend(&x[1..]);
                rows.push(LayerRow {
                    name,
                    kind: format!("{} (segmentation head)", h.describe()),
                    output_shape: o,
                    params: h.params(),
                    stored_activations: 1,
                });
            }
        }
        let unused = self.unused_head_params();
        if unused > 0 {
            rows.push(LayerRow {
                name: "ds_heads".into(),
                kind: "deep-supervision heads (built, unused)".into(),
                output_shape: vec![],
                params: unused,
                stored_activations: 0,
            });
        }
        rows
    }
}
