//! nnU-Net's default networks from dynamic-network-architectures 0.4.4: `PlainConvUNet` and
//! `ResidualEncoderUNet` (2D or 3D, chosen at run time from `conv_op`), with the same
//! state_dict names, forward pass, deep-supervision order and parameter counts.

pub mod blocks;
pub mod options;

use self::blocks::{check_input, BasicBlockD, Conv, ConvSpec, StackedConvBlocks, TransposedConv};
use self::options::{EncoderKind, UNetConfig};
use crate::memory::{MemoryEstimate, UNetEstimate, UNetVariant};
use crate::network::{ArchError, Architecture, CandleContext, LayerRow, NetworkIo, SegNetwork};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde_json::{Map, Value};
use std::sync::Arc;

/// Checks the per-stage list lengths of a config built by hand (parsed configs always pass).
fn check_lengths(cfg: &UNetConfig, per_stage: usize, what: &str) -> Result<()> {
    let n = cfg.n_stages();
    if per_stage != n
        || cfg.kernel_sizes.len() != n
        || cfg.strides.len() != n
        || cfg.n_conv_per_stage_decoder.len() + 1 != n
    {
        candle_core::bail!(
            "U-Net config: {what}, kernel_sizes and strides need {n} entries and \
             n_conv_per_stage_decoder {}",
            n.saturating_sub(1)
        );
    }
    Ok(())
}

/// dna `PlainConvEncoder` (strided-conv downsampling): `stages.{s}.0` = StackedConvBlocks.
#[derive(Debug)]
pub struct PlainConvEncoder {
    pub stages: Vec<StackedConvBlocks>,
}

impl PlainConvEncoder {
    pub fn new(cfg: &UNetConfig, n_conv_per_stage: &[usize], vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("stages");
        let mut cin = cfg.input_channels;
        let mut stages = Vec::with_capacity(cfg.n_stages());
        check_lengths(cfg, n_conv_per_stage.len(), "n_conv_per_stage")?;
        for (s, &n_conv) in n_conv_per_stage.iter().enumerate() {
            let spec = ConvSpec::new(
                cin,
                cfg.features_per_stage[s],
                &cfg.kernel_sizes[s],
                &cfg.strides[s],
            );
            stages.push(StackedConvBlocks::new(
                n_conv,
                &spec,
                &cfg.block,
                vb.pp(s).pp(0),
            )?);
            cin = cfg.features_per_stage[s];
        }
        Ok(PlainConvEncoder { stages })
    }

    /// All stage outputs (the skips; the last one is the bottleneck).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut skips = Vec::with_capacity(self.stages.len());
        let mut y = x.clone();
        for st in &self.stages {
            y = st.forward(&y, train)?;
            skips.push(y.clone());
        }
        Ok(skips)
    }

    fn layer_rows(&self, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<Vec<usize>> {
        let mut shape = input.to_vec();
        let mut out = vec![];
        for (s, st) in self.stages.iter().enumerate() {
            shape = st.layer_rows(&format!("encoder.stages.{s}.0"), &shape, rows);
            out.push(shape.clone());
        }
        out
    }
}

/// dna `ResidualEncoder` with its default stem: `stem.convs.0` then `stages.{s}.blocks.{b}`
/// (`BasicBlockD`).
#[derive(Debug)]
pub struct ResidualEncoder {
    pub stem: StackedConvBlocks,
    pub stages: Vec<Vec<BasicBlockD>>,
}

impl ResidualEncoder {
    pub fn new(
        cfg: &UNetConfig,
        n_blocks_per_stage: &[usize],
        stem_channels: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let dim = cfg.dim().n();
        let stem_ch = stem_channels.unwrap_or(cfg.features_per_stage[0]);
        let stem = StackedConvBlocks::new(
            1,
            &ConvSpec::new(
                cfg.input_channels,
                stem_ch,
                &cfg.kernel_sizes[0],
                &vec![1; dim],
            ),
            &cfg.block,
            vb.pp("stem"),
        )?;
        let vb = vb.pp("stages");
        let mut cin = stem_ch;
        let mut stages = Vec::with_capacity(cfg.n_stages());
        check_lengths(cfg, n_blocks_per_stage.len(), "n_blocks_per_stage")?;
        for (s, &n_blocks) in n_blocks_per_stage.iter().enumerate() {
            let cout = cfg.features_per_stage[s];
            let vbs = vb.pp(s).pp("blocks");
            let mut blocks = Vec::with_capacity(n_blocks);
            for b in 0..n_blocks {
                let spec = if b == 0 {
                    ConvSpec::new(cin, cout, &cfg.kernel_sizes[s], &cfg.strides[s])
                } else {
                    ConvSpec::new(cout, cout, &cfg.kernel_sizes[s], &vec![1; dim])
                };
                blocks.push(BasicBlockD::new(&spec, &cfg.block, true, vbs.pp(b))?);
            }
            stages.push(blocks);
            cin = cout;
        }
        Ok(ResidualEncoder { stem, stages })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut y = self.stem.forward(x, train)?;
        let mut skips = Vec::with_capacity(self.stages.len());
        for st in &self.stages {
            for b in st {
                y = b.forward(&y, train)?;
            }
            skips.push(y.clone());
        }
        Ok(skips)
    }

    fn layer_rows(&self, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<Vec<usize>> {
        let mut shape = self.stem.layer_rows("encoder.stem", input, rows);
        let mut out = vec![];
        for (s, st) in self.stages.iter().enumerate() {
            for (b, blk) in st.iter().enumerate() {
                shape = blk.layer_rows(&format!("encoder.stages.{s}.blocks.{b}"), &shape, rows);
            }
            out.push(shape.clone());
        }
        out
    }
}

/// dna `UNetDecoder`: `transpconvs.{s}`, `stages.{s}` (StackedConvBlocks on the concatenation
/// [upsampled, skip]) and `seg_layers.{s}` (1×1 conv with bias), `s = 0` at the bottleneck.
#[derive(Debug)]
pub struct UNetDecoder {
    pub transpconvs: Vec<TransposedConv>,
    pub stages: Vec<StackedConvBlocks>,
    pub seg_layers: Vec<Conv>,
    pub deep_supervision: bool,
}

impl UNetDecoder {
    pub fn new(cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.n_stages();
        let dim = cfg.dim().n();
        let f = &cfg.features_per_stage;
        let ones = vec![1; dim];
        let (mut transpconvs, mut stages, mut seg_layers) = (vec![], vec![], vec![]);
        for s in 1..n {
            let below = f[n - s];
            let skip = f[n - s - 1];
            let stride = &cfg.strides[n - s];
            let i = s - 1;
            transpconvs.push(TransposedConv::new(
                below,
                skip,
                stride,
                cfg.block.conv_bias,
                vb.pp("transpconvs").pp(i),
            )?);
            stages.push(StackedConvBlocks::new(
                cfg.n_conv_per_stage_decoder[i],
                &ConvSpec::new(2 * skip, skip, &cfg.kernel_sizes[n - s - 1], &ones),
                &cfg.block,
                vb.pp("stages").pp(i),
            )?);
            seg_layers.push(Conv::new(
                &ConvSpec::new(skip, cfg.num_classes, &ones, &ones),
                true,
                vb.pp("seg_layers").pp(i),
            )?);
        }
        Ok(UNetDecoder {
            transpconvs,
            stages,
            seg_layers,
            deep_supervision: cfg.deep_supervision,
        })
    }

    /// Logits, full resolution first.
    pub fn forward(&self, skips: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        let n = skips.len();
        let Some(mut lres) = skips.last().cloned() else {
            candle_core::bail!("UNetDecoder: no encoder outputs");
        };
        if self.stages.is_empty() || n != self.stages.len() + 1 {
            candle_core::bail!(
                "UNetDecoder: expected {} encoder outputs, got {n}",
                self.stages.len() + 1
            );
        }
        let mut outs = Vec::with_capacity(self.stages.len());
        let last = self.stages.len() - 1;
        for s in 0..self.stages.len() {
            let up = self.transpconvs[s].forward(&lres)?;
            let x = Tensor::cat(&[&up, &skips[n - s - 2]], 1)?;
            let x = self.stages[s].forward(&x, train)?;
            if self.deep_supervision || s == last {
                outs.push(self.seg_layers[s].forward(&x)?);
            }
            lres = x;
        }
        outs.reverse();
        Ok(outs)
    }

    fn layer_rows(&self, skips: &[Vec<usize>], rows: &mut Vec<LayerRow>) {
        let n = skips.len();
        let Some(mut lres) = skips.last().cloned() else {
            return;
        };
        for s in 0..self.stages.len() {
            let up =
                self.transpconvs[s].layer_rows(&format!("decoder.transpconvs.{s}"), &lres, rows);
            let mut cat = up.clone();
            cat[0] += skips[n - s - 2][0];
            let x = self.stages[s].layer_rows(&format!("decoder.stages.{s}"), &cat, rows);
            if self.deep_supervision || s + 1 == self.stages.len() {
                let mut o = vec![self.seg_layers[s].out_channels()];
                o.extend(&x[1..]);
                rows.push(LayerRow {
                    name: format!("decoder.seg_layers.{s}"),
                    kind: format!("{} (segmentation head)", self.seg_layers[s].describe()),
                    output_shape: o,
                    params: self.seg_layers[s].params(),
                    stored_activations: 1,
                });
            }
            lres = x;
        }
    }

    /// Parameters of the heads not used without deep supervision (still part of the model).
    fn unused_head_params(&self) -> u64 {
        if self.deep_supervision {
            0
        } else {
            let k = self.seg_layers.len().saturating_sub(1);
            self.seg_layers[..k].iter().map(Conv::params).sum()
        }
    }
}

fn unet_layers(
    enc_rows: impl FnOnce(&[usize], &mut Vec<LayerRow>) -> Vec<Vec<usize>>,
    decoder: &UNetDecoder,
    in_channels: usize,
    patch: &[usize],
) -> Vec<LayerRow> {
    let mut rows = vec![];
    let mut input = vec![in_channels];
    input.extend(patch);
    let skips = enc_rows(&input, &mut rows);
    decoder.layer_rows(&skips, &mut rows);
    let unused = decoder.unused_head_params();
    if unused > 0 {
        rows.push(LayerRow {
            name: "decoder.seg_layers (low-res)".into(),
            kind: "deep-supervision heads (built, unused)".into(),
            output_shape: vec![],
            params: unused,
            stored_activations: 0,
        });
    }
    rows
}

/// `dynamic_network_architectures.architectures.unet.PlainConvUNet`.
pub type PlainConvUNet = UNet<PlainConvEncoder>;

/// `dynamic_network_architectures.architectures.unet.ResidualEncoderUNet`.
pub type ResidualEncoderUNet = UNet<ResidualEncoder>;

/// What a [`UNet`] needs from its encoder: the skips (full resolution first) and the layer
/// table rows; the decoder is shared.
pub trait UNetEncoder: std::fmt::Debug + Send + Sync {
    /// The network's nnU-Net class name, for error messages.
    const NETWORK_NAME: &'static str;
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>>;
    fn layer_rows(&self, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<Vec<usize>>;
}

impl UNetEncoder for PlainConvEncoder {
    const NETWORK_NAME: &'static str = "PlainConvUNet";
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        PlainConvEncoder::forward(self, x, train)
    }
    fn layer_rows(&self, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<Vec<usize>> {
        PlainConvEncoder::layer_rows(self, input, rows)
    }
}

impl UNetEncoder for ResidualEncoder {
    const NETWORK_NAME: &'static str = "ResidualEncoderUNet";
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        ResidualEncoder::forward(self, x, train)
    }
    fn layer_rows(&self, input: &[usize], rows: &mut Vec<LayerRow>) -> Vec<Vec<usize>> {
        ResidualEncoder::layer_rows(self, input, rows)
    }
}

/// An encoder, nnU-Net's `UNetDecoder` and the configuration they were built from.
#[derive(Debug)]
pub struct UNet<E> {
    pub config: UNetConfig,
    pub encoder: E,
    pub decoder: UNetDecoder,
}

impl<E> UNet<E> {
    fn assemble(config: &UNetConfig, encoder: E, vb: VarBuilder) -> Result<Self> {
        let decoder = UNetDecoder::new(config, vb.pp("decoder"))?;
        Ok(UNet {
            config: config.clone(),
            encoder,
            decoder,
        })
    }
}

impl PlainConvUNet {
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let EncoderKind::Plain { n_conv_per_stage } = &config.encoder else {
            candle_core::bail!("PlainConvUNet needs a plain encoder configuration");
        };
        if config.n_stages() < 2 {
            candle_core::bail!("PlainConvUNet needs at least 2 stages");
        }
        let encoder = PlainConvEncoder::new(config, n_conv_per_stage, vb.pp("encoder"))?;
        Self::assemble(config, encoder, vb)
    }
}

impl ResidualEncoderUNet {
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let EncoderKind::Residual {
            n_blocks_per_stage,
            stem_channels,
        } = &config.encoder
        else {
            candle_core::bail!("ResidualEncoderUNet needs a residual encoder configuration");
        };
        if config.n_stages() < 2 {
            candle_core::bail!("ResidualEncoderUNet needs at least 2 stages");
        }
        let encoder =
            ResidualEncoder::new(config, n_blocks_per_stage, *stem_channels, vb.pp("encoder"))?;
        Self::assemble(config, encoder, vb)
    }
}

impl<E: UNetEncoder + 'static> SegNetwork for UNet<E> {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        check_input(
            x,
            self.config.dim(),
            self.config.input_channels,
            E::NETWORK_NAME,
        )?;
        let skips = self.encoder.forward(x, train)?;
        self.decoder.forward(&skips, train)
    }
    fn set_deep_supervision(&mut self, on: bool) {
        self.decoder.deep_supervision = on;
        self.config.deep_supervision = on;
    }
    fn deep_supervision(&self) -> bool {
        self.decoder.deep_supervision
    }
    fn spatial_dims(&self) -> usize {
        self.config.dim().n()
    }
    fn layers(&self, patch: &[usize]) -> Vec<LayerRow> {
        unet_layers(
            |i, r| self.encoder.layer_rows(i, r),
            &self.decoder,
            self.config.input_channels,
            patch,
        )
    }
}

/// Canonical name of [`PlainConvUNet`].
pub const PLAIN_CONV_UNET: &str = "dynamic_network_architectures.architectures.unet.PlainConvUNet";
/// Canonical name of [`ResidualEncoderUNet`].
pub const RESIDUAL_ENCODER_UNET: &str =
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet";

/// Registry entry of the two dna U-Nets.
#[derive(Debug, Clone, Copy)]
pub struct UNetArchitecture {
    pub variant: UNetVariant,
}

impl UNetArchitecture {
    fn residual(&self) -> bool {
        self.variant == UNetVariant::ResidualEncoder
    }

    /// Parses and validates the options.
    pub fn config(
        &self,
        kwargs: &Map<String, Value>,
        path: &str,
        io: &NetworkIo,
    ) -> std::result::Result<UNetConfig, ArchError> {
        let cfg = UNetConfig::from_kwargs(
            kwargs,
            path,
            self.residual(),
            io.in_channels,
            io.num_classes,
            io.deep_supervision,
        )?;
        if cfg.n_stages() < 2 {
            return Err(options::invalid(
                &format!("{path}.n_stages"),
                "a U-Net needs at least 2 stages",
            ));
        }
        Ok(cfg)
    }
}

impl Architecture for UNetArchitecture {
    fn name(&self) -> &str {
        match self.variant {
            UNetVariant::PlainConv => PLAIN_CONV_UNET,
            UNetVariant::ResidualEncoder => RESIDUAL_ENCODER_UNET,
        }
    }

    fn aliases(&self) -> Vec<String> {
        match self.variant {
            UNetVariant::PlainConv => vec!["PlainConvUNet".into()],
            UNetVariant::ResidualEncoder => vec!["ResidualEncoderUNet".into(), "ResEncUNet".into()],
        }
    }

    fn build(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
        vb: VarBuilder,
    ) -> std::result::Result<Box<dyn SegNetwork>, ArchError> {
        let cfg = self.config(kwargs, kwargs_path, io)?;
        let ctx = || format!("building {}", self.name());
        Ok(match self.variant {
            UNetVariant::PlainConv => Box::new(PlainConvUNet::new(&cfg, vb).ctx(ctx)?),
            UNetVariant::ResidualEncoder => Box::new(ResidualEncoderUNet::new(&cfg, vb).ctx(ctx)?),
        })
    }

    fn estimator(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
    ) -> std::result::Result<Box<dyn MemoryEstimate>, ArchError> {
        let cfg = self.config(kwargs, kwargs_path, io)?;
        Ok(Box::new(UNetEstimate {
            variant: self.variant,
            topology: cfg.topology(),
        }))
    }
}

/// The architectures [`crate::registry::Registry::default`] registers.
pub fn default_architectures() -> Vec<Arc<dyn Architecture>> {
    vec![
        Arc::new(UNetArchitecture {
            variant: UNetVariant::PlainConv,
        }),
        Arc::new(UNetArchitecture {
            variant: UNetVariant::ResidualEncoder,
        }),
    ]
}
