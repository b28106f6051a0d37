//! Typed options for dynamic-network-architectures' U-Nets, parsed from a plans.json
//! `arch_kwargs` object (the Python class strings of `_kw_requires_import` included).
//!
//! Every error names the JSON path of the bad value, e.g.
//! `architecture.arch_kwargs.kernel_sizes[2]`.

use crate::network::ArchError;
use crate::ops::GeluKind;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Default JSON path prefix of `arch_kwargs` inside a configuration.
pub const ARCH_KWARGS_PATH: &str = crate::network::KWARGS_PATH;

/// Number of spatial dimensions, from `conv_op` (`torch.nn.modules.conv.Conv3d` → 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvDim {
    D2,
    D3,
}

impl ConvDim {
    /// Number of spatial axes.
    pub fn n(self) -> usize {
        match self {
            ConvDim::D2 => 2,
            ConvDim::D3 => 3,
        }
    }
}

/// Which normalisation layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Instance,
    Batch,
}

impl crate::kwargs::Choices for NormKind {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("batch", NormKind::Batch), ("instance", NormKind::Instance)];
}

/// `norm_op` + `norm_op_kwargs`.
#[derive(Debug, Clone, PartialEq)]
pub struct NormOptions {
    pub kind: NormKind,
    pub eps: f64,
    /// Learnable per-channel weight and bias (PyTorch default: false for InstanceNorm, true for
    /// BatchNorm).
    pub affine: bool,
    /// BatchNorm running-statistics momentum.
    pub momentum: f64,
}

/// `nonlin` + `nonlin_kwargs` (`inplace` is accepted and ignored).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Nonlin {
    LeakyRelu { negative_slope: f64 },
    Relu,
    Gelu(GeluKind),
    Silu,
    Elu { alpha: f64 },
    Tanh,
    Sigmoid,
    Identity,
}

impl Nonlin {
    /// Short display name (as PyTorch names the class).
    pub fn name(&self) -> &'static str {
        match self {
            Nonlin::LeakyRelu { .. } => "LeakyReLU",
            Nonlin::Relu => "ReLU",
            Nonlin::Gelu(_) => "GELU",
            Nonlin::Silu => "SiLU",
            Nonlin::Elu { .. } => "ELU",
            Nonlin::Tanh => "Tanh",
            Nonlin::Sigmoid => "Sigmoid",
            Nonlin::Identity => "Identity",
        }
    }
}

/// `dropout_op` + `dropout_op_kwargs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutOptions {
    pub p: f64,
    /// `Dropout1d/2d/3d` zero whole channels; `Dropout` zeroes single elements.
    pub channelwise: bool,
}

/// Options shared by every `ConvDropoutNormReLU` of a network.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvBlockOptions {
    pub dim: ConvDim,
    pub conv_bias: bool,
    pub norm: Option<NormOptions>,
    pub dropout: Option<DropoutOptions>,
    pub nonlin: Option<Nonlin>,
    /// conv → nonlin → norm instead of conv → norm → nonlin (PlainConvUNet only).
    pub nonlin_first: bool,
}

/// Which encoder a U-Net uses.
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderKind {
    /// `PlainConvEncoder`: `n_conv_per_stage` conv blocks per stage.
    Plain { n_conv_per_stage: Vec<usize> },
    /// `ResidualEncoder` with `BasicBlockD` blocks and a one-conv stem.
    Residual {
        n_blocks_per_stage: Vec<usize>,
        stem_channels: Option<usize>,
    },
}

/// Everything needed to build `PlainConvUNet` / `ResidualEncoderUNet`.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub input_channels: usize,
    pub num_classes: usize,
    pub deep_supervision: bool,
    pub features_per_stage: Vec<usize>,
    pub kernel_sizes: Vec<Vec<usize>>,
    pub strides: Vec<Vec<usize>>,
    pub n_conv_per_stage_decoder: Vec<usize>,
    pub encoder: EncoderKind,
    pub block: ConvBlockOptions,
}

impl UNetConfig {
    pub fn n_stages(&self) -> usize {
        self.features_per_stage.len()
    }
    pub fn dim(&self) -> ConvDim {
        self.block.dim
    }

    /// The topology [`crate::memory`] estimates from.
    pub fn topology(&self) -> crate::memory::UNetTopology {
        let per_stage = match &self.encoder {
            EncoderKind::Plain { n_conv_per_stage } => n_conv_per_stage.clone(),
            EncoderKind::Residual {
                n_blocks_per_stage, ..
            } => n_blocks_per_stage.clone(),
        };
        crate::memory::UNetTopology {
            input_channels: self.input_channels,
            n_stages: self.n_stages(),
            features_per_stage: self.features_per_stage.clone(),
            kernel_sizes: self.kernel_sizes.clone(),
            strides: self.strides.clone(),
            n_conv_per_stage: per_stage,
            n_conv_per_stage_decoder: self.n_conv_per_stage_decoder.clone(),
            num_classes: self.num_classes,
            deep_supervision: self.deep_supervision,
        }
    }

    /// Parses `arch_kwargs` of a `PlainConvUNet` (`residual == false`) or a
    /// `ResidualEncoderUNet`: unknown keys are rejected, then [`UNetConfig::from_typed`].
    /// `path` is the JSON path of the kwargs object used in errors.
    pub fn from_kwargs(
        kwargs: &Map<String, Value>,
        path: &str,
        residual: bool,
        input_channels: usize,
        num_classes: usize,
        deep_supervision: bool,
    ) -> Result<Self, ArchError> {
        kwargs::reject_unknown(kwargs, path, UNetKwargs::keys(residual))?;
        let kw = UNetKwargs::parse(kwargs, path)?;
        let io = crate::network::NetworkIo {
            in_channels: input_channels,
            num_classes,
            deep_supervision,
        };
        Self::from_typed(&kw, path, residual, &io)
    }

    /// Validates typed U-Net kwargs (`path` is their JSON path, used in errors).
    pub fn from_typed(
        kw: &UNetKwargs,
        path: &str,
        residual: bool,
        io: &crate::network::NetworkIo,
    ) -> Result<Self, ArchError> {
        if io.in_channels == 0 {
            return Err(invalid(
                path,
                "the network needs at least one input channel",
            ));
        }
        if io.num_classes == 0 {
            return Err(invalid(path, "the network needs at least one output class"));
        }
        let dim = kw.conv_dim(path)?;
        let n = kw.n_stages(path)?;
        if n == 0 {
            return Err(invalid(&key_path(path, "n_stages"), "must be at least 1"));
        }
        let stage = |v: &Option<PerStage>, key: &str, count: usize, min: usize| {
            UNetKwargs::per_stage(v, path, key, count, min)
        };
        let axes = |v: &Option<PerStageAxes>, key: &str| {
            UNetKwargs::per_stage_axes(v, path, key, n, dim.n())
        };
        let features_per_stage = stage(&kw.features_per_stage, "features_per_stage", n, 1)?;
        let kernel_sizes = axes(&kw.kernel_sizes, "kernel_sizes")?;
        let strides = axes(&kw.strides, "strides")?;
        let encoder = if residual {
            kw.residual_encoder(path, n)?
        } else {
            EncoderKind::Plain {
                n_conv_per_stage: stage(&kw.n_conv_per_stage, "n_conv_per_stage", n, 1)?,
            }
        };
        let n_conv_per_stage_decoder = stage(
            &kw.n_conv_per_stage_decoder,
            "n_conv_per_stage_decoder",
            n - 1,
            0,
        )?;
        let block = ConvBlockOptions {
            dim,
            conv_bias: kw.conv_bias.unwrap_or(false),
            norm: kw.norm(dim, path)?,
            dropout: kw.dropout(path)?,
            nonlin: kw.nonlin(path)?,
            nonlin_first: !residual && kw.nonlin_first.unwrap_or(false),
        };
        Ok(UNetConfig {
            input_channels: io.in_channels,
            num_classes: io.num_classes,
            deep_supervision: io.deep_supervision,
            features_per_stage,
            kernel_sizes,
            strides,
            n_conv_per_stage_decoder,
            encoder,
            block,
        })
    }
}

pub(crate) use crate::kwargs::invalid;
use crate::kwargs::{self, describe, key_path, PerStage, PerStageAxes};

/// The class name of a Python class path, if it lives under `torch.nn`
/// (`torch.nn.modules.conv.Conv3d`, `torch.nn.Conv3d`) or is given bare (`Conv3d`).
pub fn torch_class_name(s: &str) -> Option<&str> {
    match s.rsplit_once('.') {
        None => Some(s),
        Some((prefix, name)) => {
            if prefix == "torch.nn" || prefix.starts_with("torch.nn.modules") {
                Some(name)
            } else {
                None
            }
        }
    }
}

/// The standard `arch_kwargs` of dynamic-network-architectures' U-Nets as nnU-Net writes them,
/// typed (see [`crate::kwargs`]); [`UNetConfig::from_typed`] validates them. Which keys a
/// network accepts: [`UNetKwargs::PLAIN_KEYS`], [`UNetKwargs::RESIDUAL_KEYS`] (families may
/// accept more).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNetKwargs {
    pub n_stages: Option<usize>,
    pub features_per_stage: Option<PerStage>,
    /// `torch.nn.modules.conv.Conv2d` / `Conv3d`.
    pub conv_op: Option<String>,
    pub kernel_sizes: Option<PerStageAxes>,
    pub strides: Option<PerStageAxes>,
    pub n_conv_per_stage: Option<PerStage>,
    pub n_conv_per_stage_decoder: Option<PerStage>,
    pub conv_bias: Option<bool>,
    pub norm_op: Option<String>,
    pub norm_op_kwargs: Option<Map<String, Value>>,
    pub dropout_op: Option<String>,
    pub dropout_op_kwargs: Option<Map<String, Value>>,
    pub nonlin: Option<String>,
    pub nonlin_kwargs: Option<Map<String, Value>>,
    /// conv → nonlin → norm (PlainConvUNet).
    pub nonlin_first: Option<bool>,
    /// nnU-Net passes deep supervision itself; a value here is accepted and overridden.
    pub deep_supervision: Option<Value>,
    /// ResidualEncoderUNet: blocks per encoder stage.
    pub n_blocks_per_stage: Option<PerStage>,
    /// ResidualEncoderUNet: stem width (default: `features_per_stage[0]`).
    pub stem_channels: Option<usize>,
    /// ResidualEncoderUNet: `BasicBlockD` (or null).
    pub block: Option<String>,
    /// ResidualEncoderUNet: only null is supported.
    pub bottleneck_channels: Option<Value>,
}

/// Keys of both U-Nets.
const COMMON_KEYS: [&str; 14] = [
    "n_stages",
    "features_per_stage",
    "conv_op",
    "kernel_sizes",
    "strides",
    "n_conv_per_stage_decoder",
    "conv_bias",
    "norm_op",
    "norm_op_kwargs",
    "dropout_op",
    "dropout_op_kwargs",
    "nonlin",
    "nonlin_kwargs",
    "deep_supervision",
];

const fn concat<const A: usize, const B: usize, const N: usize>(
    a: [&'static str; A],
    b: [&'static str; B],
) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    while i < N {
        out[i] = b[i - A];
        i += 1;
    }
    out
}

const PLAIN: [&str; 16] = concat(COMMON_KEYS, ["n_conv_per_stage", "nonlin_first"]);
const RESIDUAL: [&str; 18] = concat(
    COMMON_KEYS,
    [
        "n_blocks_per_stage",
        "stem_channels",
        "block",
        "bottleneck_channels",
    ],
);

/// `norm_op_kwargs`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NormOpKwargs {
    eps: Option<f64>,
    affine: Option<bool>,
    momentum: Option<f64>,
    track_running_stats: Option<bool>,
    device: Option<Value>,
    dtype: Option<Value>,
}

/// `dropout_op_kwargs`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct DropoutOpKwargs {
    p: Option<f64>,
    inplace: Option<Value>,
}

/// `nonlin_kwargs` (which keys a class accepts: [`nonlin_keys`]).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NonlinKwargs {
    negative_slope: Option<f64>,
    alpha: Option<f64>,
    approximate: Option<String>,
    inplace: Option<Value>,
}

fn nonlin_keys(name: &str) -> &'static [&'static str] {
    match name {
        "LeakyReLU" => &["negative_slope", "inplace"],
        "ELU" => &["alpha", "inplace"],
        "GELU" => &["approximate"],
        "ReLU" | "SiLU" => &["inplace"],
        _ => &[],
    }
}

/// A typed sub-kwargs object (`null` = empty) with only `allowed` keys.
fn sub_kwargs<T: serde::de::DeserializeOwned + Default>(
    m: &Option<Map<String, Value>>,
    path: &str,
    allowed: &[&str],
) -> Result<T, ArchError> {
    match m {
        None => Ok(T::default()),
        Some(m) => {
            kwargs::reject_unknown(m, path, allowed)?;
            kwargs::typed(m, path)
        }
    }
}

impl UNetKwargs {
    /// The keys of a PlainConvUNet.
    pub const PLAIN_KEYS: &'static [&'static str] = &PLAIN;
    /// The keys of a ResidualEncoderUNet.
    pub const RESIDUAL_KEYS: &'static [&'static str] = &RESIDUAL;

    /// The keys of the plain or residual U-Net.
    pub fn keys(residual: bool) -> &'static [&'static str] {
        if residual {
            Self::RESIDUAL_KEYS
        } else {
            Self::PLAIN_KEYS
        }
    }

    /// Parses the standard keys of `kwargs` (at JSON path `path`), without checking for
    /// unknown keys.
    pub fn parse(kwargs: &Map<String, Value>, path: &str) -> Result<Self, ArchError> {
        kwargs::typed(kwargs, path)
    }

    /// A class-name string (any `torch.nn` path or bare name) that must be one of `allowed`.
    fn torch_class<'a>(
        value: &'a Option<String>,
        path: &str,
        allowed: &[&str],
    ) -> Result<Option<&'a str>, ArchError> {
        let Some(s) = value else {
            return Ok(None);
        };
        match torch_class_name(s) {
            Some(name) if allowed.contains(&name) => Ok(Some(name)),
            _ => Err(invalid(
                path,
                format!("unsupported `{s}`; supported: {}", allowed.join(", ")),
            )),
        }
    }

    /// `conv_op` (required).
    pub fn conv_dim(&self, path: &str) -> Result<ConvDim, ArchError> {
        let p = key_path(path, "conv_op");
        match Self::torch_class(&self.conv_op, &p, &["Conv2d", "Conv3d"])? {
            Some("Conv2d") => Ok(ConvDim::D2),
            Some(_) => Ok(ConvDim::D3),
            None => Err(invalid(
                &p,
                "missing (required), e.g. \"torch.nn.modules.conv.Conv3d\"",
            )),
        }
    }

    /// `n_stages` (required).
    pub fn n_stages(&self, path: &str) -> Result<usize, ArchError> {
        self.n_stages
            .ok_or_else(|| invalid(&key_path(path, "n_stages"), "missing (required)"))
    }

    /// A required per-stage key (`n` values, each at least `min`).
    pub fn per_stage(
        value: &Option<PerStage>,
        path: &str,
        key: &str,
        n: usize,
        min: usize,
    ) -> Result<Vec<usize>, ArchError> {
        let p = key_path(path, key);
        match value {
            Some(v) => v.resolve(n, min, &p),
            None => Err(invalid(&p, "missing (required)")),
        }
    }

    /// A required per-stage, per-axis key (`n` × `dim` values ≥ 1).
    pub fn per_stage_axes(
        value: &Option<PerStageAxes>,
        path: &str,
        key: &str,
        n: usize,
        dim: usize,
    ) -> Result<Vec<Vec<usize>>, ArchError> {
        let p = key_path(path, key);
        match value {
            Some(v) => v.resolve(n, dim, &p),
            None => Err(invalid(&p, "missing (required)")),
        }
    }

    /// `strides` for `n_stages` stages of a `dim`-D network (the plan's pooling).
    pub fn strides(&self, path: &str, dim: usize) -> Result<Vec<Vec<usize>>, ArchError> {
        Self::per_stage_axes(&self.strides, path, "strides", self.n_stages(path)?, dim)
    }

    /// The plan's pooling `strides` of a configuration's `arch_kwargs` (errors name
    /// [`crate::network::KWARGS_PATH`]).
    pub fn plan_strides(
        arch_kwargs: &Map<String, Value>,
        dim: usize,
    ) -> Result<Vec<Vec<usize>>, ArchError> {
        let path = crate::network::KWARGS_PATH;
        Self::parse(arch_kwargs, path)?.strides(path, dim)
    }

    /// `norm_op` + `norm_op_kwargs`.
    pub fn norm(&self, dim: ConvDim, path: &str) -> Result<Option<NormOptions>, ArchError> {
        let names = [
            "InstanceNorm2d",
            "InstanceNorm3d",
            "BatchNorm2d",
            "BatchNorm3d",
        ];
        let op_path = key_path(path, "norm_op");
        let kw_path = key_path(path, "norm_op_kwargs");
        let Some(name) = Self::torch_class(&self.norm_op, &op_path, &names)? else {
            return Ok(None);
        };
        if !name.ends_with(&format!("{}d", dim.n())) {
            return Err(invalid(
                &op_path,
                format!("{name} does not match the {}D conv_op", dim.n()),
            ));
        }
        let allowed = [
            "eps",
            "affine",
            "momentum",
            "track_running_stats",
            "device",
            "dtype",
        ];
        let m: NormOpKwargs = sub_kwargs(&self.norm_op_kwargs, &kw_path, &allowed)?;
        let batch = name.starts_with("Batch");
        let eps = m.eps.unwrap_or(1e-5);
        if eps <= 0.0 {
            return Err(invalid(&format!("{kw_path}.eps"), "must be positive"));
        }
        let track = m.track_running_stats.unwrap_or(batch);
        if batch != track {
            let message = if batch {
                "BatchNorm without running statistics is not supported"
            } else {
                "InstanceNorm with running statistics is not supported"
            };
            return Err(invalid(&format!("{kw_path}.track_running_stats"), message));
        }
        let _ = (&m.device, &m.dtype);
        Ok(Some(NormOptions {
            kind: if batch {
                NormKind::Batch
            } else {
                NormKind::Instance
            },
            eps,
            affine: m.affine.unwrap_or(batch),
            momentum: m.momentum.unwrap_or(0.1),
        }))
    }

    /// `dropout_op` + `dropout_op_kwargs`.
    pub fn dropout(&self, path: &str) -> Result<Option<DropoutOptions>, ArchError> {
        let kw_path = key_path(path, "dropout_op_kwargs");
        let names = ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d"];
        let Some(name) =
            Self::torch_class(&self.dropout_op, &key_path(path, "dropout_op"), &names)?
        else {
            return Ok(None);
        };
        let m: DropoutOpKwargs = sub_kwargs(&self.dropout_op_kwargs, &kw_path, &["p", "inplace"])?;
        let _ = &m.inplace;
        let p = m.p.unwrap_or(0.5);
        if !(0.0..1.0).contains(&p) {
            return Err(invalid(
                &format!("{kw_path}.p"),
                format!("must be in [0, 1), got {p}"),
            ));
        }
        Ok(Some(DropoutOptions {
            p,
            channelwise: name != "Dropout",
        }))
    }

    /// `nonlin` + `nonlin_kwargs` (`inplace` is accepted and ignored).
    pub fn nonlin(&self, path: &str) -> Result<Option<Nonlin>, ArchError> {
        let names = [
            "LeakyReLU",
            "ReLU",
            "GELU",
            "SiLU",
            "ELU",
            "Tanh",
            "Sigmoid",
            "Identity",
        ];
        let kw_path = key_path(path, "nonlin_kwargs");
        let Some(name) = Self::torch_class(&self.nonlin, &key_path(path, "nonlin"), &names)? else {
            return Ok(None);
        };
        let m: NonlinKwargs = sub_kwargs(&self.nonlin_kwargs, &kw_path, nonlin_keys(name))?;
        let _ = &m.inplace;
        Ok(Some(match name {
            "LeakyReLU" => Nonlin::LeakyRelu {
                negative_slope: m.negative_slope.unwrap_or(0.01),
            },
            "ReLU" => Nonlin::Relu,
            "GELU" => match m.approximate.as_deref() {
                None | Some("none") => Nonlin::Gelu(GeluKind::Erf),
                Some("tanh") => Nonlin::Gelu(GeluKind::Tanh),
                Some(s) => {
                    return Err(invalid(
                        &format!("{kw_path}.approximate"),
                        format!("expected \"none\" or \"tanh\", got \"{s}\""),
                    ))
                }
            },
            "SiLU" => Nonlin::Silu,
            "ELU" => Nonlin::Elu {
                alpha: m.alpha.unwrap_or(1.0),
            },
            "Tanh" => Nonlin::Tanh,
            "Sigmoid" => Nonlin::Sigmoid,
            _ => Nonlin::Identity,
        }))
    }

    /// The residual encoder's keys: `n_blocks_per_stage`, `stem_channels`, `block`
    /// (`BasicBlockD` or null), `bottleneck_channels` (null).
    fn residual_encoder(&self, path: &str, n: usize) -> Result<EncoderKind, ArchError> {
        let n_blocks_per_stage =
            Self::per_stage(&self.n_blocks_per_stage, path, "n_blocks_per_stage", n, 1)?;
        if self.stem_channels == Some(0) {
            return Err(invalid(
                &key_path(path, "stem_channels"),
                "must be at least 1",
            ));
        }
        if let Some(s) = &self.block {
            if s.rsplit('.').next() != Some("BasicBlockD") {
                return Err(invalid(
                    &key_path(path, "block"),
                    format!("unsupported `{s}`; supported: BasicBlockD"),
                ));
            }
        }
        if let Some(v) = &self.bottleneck_channels {
            return Err(invalid(
                &key_path(path, "bottleneck_channels"),
                format!("only null is supported, got {}", describe(v)),
            ));
        }
        Ok(EncoderKind::Residual {
            n_blocks_per_stage,
            stem_channels: self.stem_channels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plain_kwargs() -> Map<String, Value> {
        json!({
            "n_stages": 4,
            "features_per_stage": [4, 8, 16, 32],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": [2, 2, 2, 2],
            "n_conv_per_stage_decoder": [2, 2, 2],
            "conv_bias": true,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": true},
            "dropout_op": null,
            "dropout_op_kwargs": null,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": true}
        })
        .as_object()
        .unwrap()
        .clone()
    }

    fn parse(m: &Map<String, Value>) -> Result<UNetConfig, ArchError> {
        UNetConfig::from_kwargs(m, ARCH_KWARGS_PATH, false, 1, 3, true)
    }

    fn err_text(m: &Map<String, Value>) -> String {
        parse(m).unwrap_err().to_string()
    }

    #[test]
    fn parses_nnunet_plain_kwargs() {
        let c = parse(&plain_kwargs()).unwrap();
        assert_eq!(c.dim(), ConvDim::D3);
        assert_eq!(c.n_stages(), 4);
        assert_eq!(c.kernel_sizes[0], vec![1, 3, 3]);
        assert_eq!(c.strides[1], vec![1, 2, 2]);
        assert!(c.block.conv_bias);
        let norm = c.block.norm.clone().unwrap();
        assert_eq!(norm.kind, NormKind::Instance);
        assert!(norm.affine);
        assert_eq!(norm.eps, 1e-5);
        assert_eq!(
            c.block.nonlin,
            Some(Nonlin::LeakyRelu {
                negative_slope: 0.01
            })
        );
        assert_eq!(c.block.dropout, None);
        assert_eq!(
            c.encoder,
            EncoderKind::Plain {
                n_conv_per_stage: vec![2; 4]
            }
        );
    }

    #[test]
    fn scalars_broadcast_and_other_ops() {
        let mut m = plain_kwargs();
        m.insert("kernel_sizes".into(), json!(3));
        m.insert("strides".into(), json!([1, 2, [2, 2, 1], 2]));
        m.insert("n_conv_per_stage".into(), json!(1));
        m.insert("conv_op".into(), json!("torch.nn.Conv3d"));
        m.insert("norm_op".into(), json!("torch.nn.BatchNorm3d"));
        m.insert(
            "norm_op_kwargs".into(),
            json!({"eps": 1e-3, "momentum": 0.2}),
        );
        m.insert(
            "dropout_op".into(),
            json!("torch.nn.modules.dropout.Dropout3d"),
        );
        m.insert(
            "dropout_op_kwargs".into(),
            json!({"p": 0.2, "inplace": true}),
        );
        m.insert("nonlin".into(), json!("torch.nn.GELU"));
        m.insert("nonlin_kwargs".into(), json!({"approximate": "tanh"}));
        let c = parse(&m).unwrap();
        assert_eq!(c.kernel_sizes, vec![vec![3, 3, 3]; 4]);
        assert_eq!(c.strides[1], vec![2, 2, 2]);
        assert_eq!(c.strides[2], vec![2, 2, 1]);
        let n = c.block.norm.unwrap();
        assert_eq!(
            (n.kind, n.affine, n.eps, n.momentum),
            (NormKind::Batch, true, 1e-3, 0.2)
        );
        assert_eq!(
            c.block.dropout,
            Some(DropoutOptions {
                p: 0.2,
                channelwise: true
            })
        );
        assert_eq!(c.block.nonlin, Some(Nonlin::Gelu(GeluKind::Tanh)));
    }

    #[test]
    fn errors_carry_json_paths() {
        let mut m = plain_kwargs();
        m.insert(
            "kernel_sizes".into(),
            json!([[1, 3, 3], [3, 3, 3], [3, 3], [3, 3, 3]]),
        );
        let e = err_text(&m);
        assert!(
            e.contains("architecture.arch_kwargs.kernel_sizes[2]"),
            "{e}"
        );

        let mut m = plain_kwargs();
        m.insert(
            "strides".into(),
            json!([[1, 1, 1], [1, 2, 2], [2, 0, 2], [2, 2, 2]]),
        );
        assert!(err_text(&m).contains("strides[2][1]"));

        let mut m = plain_kwargs();
        m.insert("n_conv_per_stage_decoder".into(), json!([2, 2]));
        assert!(err_text(&m).contains("n_conv_per_stage_decoder: has 2 entries, expected 3"));

        let mut m = plain_kwargs();
        m.insert(
            "norm_op".into(),
            json!("torch.nn.modules.instancenorm.InstanceNorm2d"),
        );
        assert!(err_text(&m).contains("norm_op: InstanceNorm2d does not match the 3D conv_op"));

        let mut m = plain_kwargs();
        m.insert("nonlin".into(), json!("torch.nn.Hardswish"));
        let e = err_text(&m);
        assert!(
            e.contains("architecture.arch_kwargs.nonlin") && e.contains("LeakyReLU"),
            "{e}"
        );

        let mut m = plain_kwargs();
        m.insert("norm_op_kwargs".into(), json!({"eps": 1e-5, "afine": true}));
        assert!(err_text(&m).contains("norm_op_kwargs.afine"));

        let mut m = plain_kwargs();
        m.insert("n_stage".into(), json!(4));
        assert!(err_text(&m).contains("arch_kwargs.n_stage: unknown argument"));

        let mut m = plain_kwargs();
        m.remove("conv_op");
        assert!(err_text(&m).contains("conv_op: missing"));

        let mut m = plain_kwargs();
        m.insert("conv_op".into(), json!("mypkg.MyConv3d"));
        assert!(err_text(&m).contains("unsupported `mypkg.MyConv3d`"));
    }

    #[test]
    fn residual_kwargs() {
        let mut m = plain_kwargs();
        m.remove("n_conv_per_stage");
        m.insert("n_blocks_per_stage".into(), json!([1, 3, 4, 6]));
        m.insert("n_conv_per_stage_decoder".into(), json!(1));
        let c = UNetConfig::from_kwargs(&m, "x", true, 2, 3, false).unwrap();
        assert_eq!(
            c.encoder,
            EncoderKind::Residual {
                n_blocks_per_stage: vec![1, 3, 4, 6],
                stem_channels: None
            }
        );
        assert_eq!(c.n_conv_per_stage_decoder, vec![1, 1, 1]);
        // PlainConvUNet kwargs are not ResidualEncoderUNet kwargs
        let e = UNetConfig::from_kwargs(&plain_kwargs(), "x", true, 2, 3, false).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("x.n_conv_per_stage: unknown argument") && e.contains("n_blocks_per_stage"),
            "{e}"
        );
        let mut m = plain_kwargs();
        m.remove("n_conv_per_stage");
        m.remove("nonlin_first");
        let e = UNetConfig::from_kwargs(&m, "x", true, 2, 3, false).unwrap_err();
        assert!(
            e.to_string().contains("x.n_blocks_per_stage: missing"),
            "{e}"
        );
    }
}
