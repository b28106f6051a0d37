//! Typed options for dynamic-network-architectures' U-Nets, parsed from a plans.json
//! `arch_kwargs` object (the Python class strings of `_kw_requires_import` included).
//!
//! Every error names the JSON path of the bad value, e.g.
//! `architecture.arch_kwargs.kernel_sizes[2]`.

use crate::network::ArchError;
use crate::ops::GeluKind;
use serde_json::{Map, Value};
use std::collections::BTreeSet;

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
    /// `ResidualEncoderUNet`. `path` is the JSON path of the kwargs object used in errors.
    pub fn from_kwargs(
        kwargs: &Map<String, Value>,
        path: &str,
        residual: bool,
        input_channels: usize,
        num_classes: usize,
        deep_supervision: bool,
    ) -> Result<Self, ArchError> {
        let mut kw = Kwargs::new(kwargs, path);
        if input_channels == 0 {
            return Err(invalid(
                path,
                "the network needs at least one input channel",
            ));
        }
        if num_classes == 0 {
            return Err(invalid(path, "the network needs at least one output class"));
        }
        let dim = kw.conv_dim("conv_op")?;
        let n = kw.required_usize("n_stages")?;
        if n == 0 {
            return Err(invalid(&kw.key_path("n_stages"), "must be at least 1"));
        }
        let features_per_stage = kw.per_stage("features_per_stage", n, true)?;
        let kernel_sizes = kw.per_stage_axes("kernel_sizes", n, dim.n())?;
        let strides = kw.per_stage_axes("strides", n, dim.n())?;
        let encoder = if residual {
            let n_blocks_per_stage = kw.per_stage("n_blocks_per_stage", n, true)?;
            let stem_channels = kw.optional_usize("stem_channels")?;
            if let Some(0) = stem_channels {
                return Err(invalid(&kw.key_path("stem_channels"), "must be at least 1"));
            }
            kw.python_class_or_null("block", &["BasicBlockD"])?;
            kw.must_be_null("bottleneck_channels")?;
            EncoderKind::Residual {
                n_blocks_per_stage,
                stem_channels,
            }
        } else {
            EncoderKind::Plain {
                n_conv_per_stage: kw.per_stage("n_conv_per_stage", n, true)?,
            }
        };
        let n_conv_per_stage_decoder = kw.per_stage("n_conv_per_stage_decoder", n - 1, false)?;
        let conv_bias = kw.optional_bool("conv_bias", false)?;
        let nonlin_first = if residual {
            false
        } else {
            kw.optional_bool("nonlin_first", false)?
        };
        let norm = kw.norm(dim)?;
        let dropout = kw.dropout()?;
        let nonlin = kw.nonlin()?;
        // nnU-Net passes deep_supervision itself; a value in the kwargs is overridden.
        kw.mark_used("deep_supervision");
        kw.finish()?;
        Ok(UNetConfig {
            input_channels,
            num_classes,
            deep_supervision,
            features_per_stage,
            kernel_sizes,
            strides,
            n_conv_per_stage_decoder,
            encoder,
            block: ConvBlockOptions {
                dim,
                conv_bias,
                norm,
                dropout,
                nonlin,
                nonlin_first,
            },
        })
    }
}

pub(crate) fn invalid(path: &str, message: impl Into<String>) -> ArchError {
    ArchError::InvalidOption {
        path: path.to_string(),
        message: message.into(),
    }
}

fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..57])
    } else {
        s
    }
}

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

/// A cursor over an `arch_kwargs` object that records which keys were read.
pub(crate) struct Kwargs<'a> {
    map: &'a Map<String, Value>,
    path: String,
    used: BTreeSet<String>,
}

impl<'a> Kwargs<'a> {
    pub(crate) fn new(map: &'a Map<String, Value>, path: &str) -> Self {
        Kwargs {
            map,
            path: path.to_string(),
            used: BTreeSet::new(),
        }
    }

    pub(crate) fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    pub(crate) fn mark_used(&mut self, key: &str) {
        self.used.insert(key.to_string());
    }

    fn get(&mut self, key: &str) -> Option<&'a Value> {
        self.used.insert(key.to_string());
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn as_usize(v: &Value, path: &str) -> Result<usize, ArchError> {
        v.as_u64().map(|u| u as usize).ok_or_else(|| {
            invalid(
                path,
                format!("expected a non-negative integer, got {}", describe(v)),
            )
        })
    }

    pub(crate) fn required_usize(&mut self, key: &str) -> Result<usize, ArchError> {
        let p = self.key_path(key);
        match self.get(key) {
            Some(v) => Self::as_usize(v, &p),
            None => Err(invalid(&p, "missing (required)")),
        }
    }

    pub(crate) fn optional_usize(&mut self, key: &str) -> Result<Option<usize>, ArchError> {
        let p = self.key_path(key);
        self.get(key).map(|v| Self::as_usize(v, &p)).transpose()
    }

    pub(crate) fn optional_bool(&mut self, key: &str, default: bool) -> Result<bool, ArchError> {
        let p = self.key_path(key);
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(invalid(
                &p,
                format!("expected true or false, got {}", describe(v)),
            )),
        }
    }

    /// An int (broadcast to `n`) or a list of `n` ints, each >= 1 (or >= 0 if `!positive`).
    pub(crate) fn per_stage(
        &mut self,
        key: &str,
        n: usize,
        positive: bool,
    ) -> Result<Vec<usize>, ArchError> {
        let p = self.key_path(key);
        let min = usize::from(positive);
        let v = self
            .get(key)
            .ok_or_else(|| invalid(&p, "missing (required)"))?;
        let out = match v {
            Value::Number(_) => vec![Self::as_usize(v, &p)?; n],
            Value::Array(a) => {
                if a.len() != n {
                    return Err(invalid(
                        &p,
                        format!("has {} entries, expected {n} (one per stage)", a.len()),
                    ));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, e)| Self::as_usize(e, &format!("{p}[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?
            }
            other => {
                return Err(invalid(
                    &p,
                    format!(
                        "expected an integer or a list of integers, got {}",
                        describe(other)
                    ),
                ))
            }
        };
        if let Some(i) = out.iter().position(|&x| x < min) {
            let ip = if matches!(v, Value::Array(_)) {
                format!("{p}[{i}]")
            } else {
                p
            };
            return Err(invalid(&ip, format!("must be at least {min}")));
        }
        Ok(out)
    }

    /// An int, a list of `n` ints (each broadcast to `dim` axes) or a list of `n` lists of `dim`
    /// ints; every value >= 1.
    pub(crate) fn per_stage_axes(
        &mut self,
        key: &str,
        n: usize,
        dim: usize,
    ) -> Result<Vec<Vec<usize>>, ArchError> {
        let p = self.key_path(key);
        let v = self
            .get(key)
            .ok_or_else(|| invalid(&p, "missing (required)"))?;
        let positive = |x: usize, path: &str| {
            if x == 0 {
                Err(invalid(path, "must be at least 1"))
            } else {
                Ok(x)
            }
        };
        match v {
            Value::Number(_) => {
                let x = positive(Self::as_usize(v, &p)?, &p)?;
                Ok(vec![vec![x; dim]; n])
            }
            Value::Array(a) => {
                if a.len() != n {
                    return Err(invalid(
                        &p,
                        format!("has {} entries, expected {n} (one per stage)", a.len()),
                    ));
                }
                let mut out = Vec::with_capacity(n);
                for (i, e) in a.iter().enumerate() {
                    let ep = format!("{p}[{i}]");
                    match e {
                        Value::Number(_) => {
                            out.push(vec![positive(Self::as_usize(e, &ep)?, &ep)?; dim])
                        }
                        Value::Array(axes) => {
                            if axes.len() != dim {
                                return Err(invalid(
                                    &ep,
                                    format!(
                                        "has {} entries, expected {dim} (one per spatial axis)",
                                        axes.len()
                                    ),
                                ));
                            }
                            let mut st = Vec::with_capacity(dim);
                            for (j, x) in axes.iter().enumerate() {
                                let xp = format!("{ep}[{j}]");
                                st.push(positive(Self::as_usize(x, &xp)?, &xp)?);
                            }
                            out.push(st);
                        }
                        other => {
                            return Err(invalid(
                                &ep,
                                format!(
                                    "expected an integer or a list of {dim} integers, got {}",
                                    describe(other)
                                ),
                            ))
                        }
                    }
                }
                Ok(out)
            }
            other => Err(invalid(
                &p,
                format!("expected a list, got {}", describe(other)),
            )),
        }
    }

    fn string(&mut self, key: &str) -> Result<Option<&'a str>, ArchError> {
        let p = self.key_path(key);
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(invalid(
                &p,
                format!(
                    "expected a Python class name string or null, got {}",
                    describe(v)
                ),
            )),
        }
    }

    /// A class-name string (any `torch.nn` path or bare name) that must be one of `allowed`.
    fn python_class_or_null(
        &mut self,
        key: &str,
        allowed: &[&str],
    ) -> Result<Option<&'a str>, ArchError> {
        let p = self.key_path(key);
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        let name = s.rsplit('.').next().unwrap_or(s);
        if allowed.contains(&name) {
            Ok(Some(name))
        } else {
            Err(invalid(
                &p,
                format!("unsupported `{s}`; supported: {}", allowed.join(", ")),
            ))
        }
    }

    fn must_be_null(&mut self, key: &str) -> Result<(), ArchError> {
        let p = self.key_path(key);
        match self.get(key) {
            None => Ok(()),
            Some(v) => Err(invalid(
                &p,
                format!("only null is supported, got {}", describe(v)),
            )),
        }
    }

    fn torch_class(&mut self, key: &str, allowed: &[&str]) -> Result<Option<&'a str>, ArchError> {
        let p = self.key_path(key);
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        match torch_class_name(s) {
            Some(name) if allowed.contains(&name) => Ok(Some(name)),
            _ => Err(invalid(
                &p,
                format!("unsupported `{s}`; supported: {}", allowed.join(", ")),
            )),
        }
    }

    pub(crate) fn conv_dim(&mut self, key: &str) -> Result<ConvDim, ArchError> {
        let p = self.key_path(key);
        match self.torch_class(key, &["Conv2d", "Conv3d"])? {
            Some("Conv2d") => Ok(ConvDim::D2),
            Some(_) => Ok(ConvDim::D3),
            None => Err(invalid(
                &p,
                "missing (required), e.g. \"torch.nn.modules.conv.Conv3d\"",
            )),
        }
    }

    /// A kwargs dict (`null` → empty) with only `allowed` keys.
    fn sub_kwargs(&mut self, key: &str, allowed: &[&str]) -> Result<Map<String, Value>, ArchError> {
        let p = self.key_path(key);
        let m = match self.get(key) {
            None => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(v) => {
                return Err(invalid(
                    &p,
                    format!("expected an object or null, got {}", describe(v)),
                ))
            }
        };
        if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(invalid(
                &format!("{p}.{k}"),
                format!("unknown argument; allowed: {}", allowed.join(", ")),
            ));
        }
        Ok(m)
    }

    fn f64_in(
        m: &Map<String, Value>,
        key: &str,
        default: f64,
        path: &str,
    ) -> Result<f64, ArchError> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                invalid(
                    &format!("{path}.{key}"),
                    format!("expected a number, got {}", describe(v)),
                )
            }),
        }
    }

    fn bool_in(
        m: &Map<String, Value>,
        key: &str,
        default: bool,
        path: &str,
    ) -> Result<bool, ArchError> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(invalid(
                &format!("{path}.{key}"),
                format!("expected true or false, got {}", describe(v)),
            )),
        }
    }

    pub(crate) fn norm(&mut self, dim: ConvDim) -> Result<Option<NormOptions>, ArchError> {
        let names = [
            "InstanceNorm2d",
            "InstanceNorm3d",
            "BatchNorm2d",
            "BatchNorm3d",
        ];
        let op_path = self.key_path("norm_op");
        let kw_path = self.key_path("norm_op_kwargs");
        let Some(name) = self.torch_class("norm_op", &names)? else {
            self.mark_used("norm_op_kwargs");
            return Ok(None);
        };
        let want = format!("{}d", dim.n());
        if !name.ends_with(&want) {
            return Err(invalid(
                &op_path,
                format!("{name} does not match the {}D conv_op", dim.n()),
            ));
        }
        let m = self.sub_kwargs(
            "norm_op_kwargs",
            &[
                "eps",
                "affine",
                "momentum",
                "track_running_stats",
                "device",
                "dtype",
            ],
        )?;
        let batch = name.starts_with("Batch");
        let eps = Self::f64_in(&m, "eps", 1e-5, &kw_path)?;
        if eps <= 0.0 {
            return Err(invalid(&format!("{kw_path}.eps"), "must be positive"));
        }
        let affine = Self::bool_in(&m, "affine", batch, &kw_path)?;
        let momentum = Self::f64_in(&m, "momentum", 0.1, &kw_path)?;
        let track = Self::bool_in(&m, "track_running_stats", batch, &kw_path)?;
        if !batch && track {
            return Err(invalid(
                &format!("{kw_path}.track_running_stats"),
                "InstanceNorm with running statistics is not supported",
            ));
        }
        if batch && !track {
            return Err(invalid(
                &format!("{kw_path}.track_running_stats"),
                "BatchNorm without running statistics is not supported",
            ));
        }
        Ok(Some(NormOptions {
            kind: if batch {
                NormKind::Batch
            } else {
                NormKind::Instance
            },
            eps,
            affine,
            momentum,
        }))
    }

    pub(crate) fn dropout(&mut self) -> Result<Option<DropoutOptions>, ArchError> {
        let kw_path = self.key_path("dropout_op_kwargs");
        let Some(name) = self.torch_class(
            "dropout_op",
            &["Dropout", "Dropout1d", "Dropout2d", "Dropout3d"],
        )?
        else {
            self.mark_used("dropout_op_kwargs");
            return Ok(None);
        };
        let m = self.sub_kwargs("dropout_op_kwargs", &["p", "inplace"])?;
        let p = Self::f64_in(&m, "p", 0.5, &kw_path)?;
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

    pub(crate) fn nonlin(&mut self) -> Result<Option<Nonlin>, ArchError> {
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
        let kw_path = self.key_path("nonlin_kwargs");
        let Some(name) = self.torch_class("nonlin", &names)? else {
            self.mark_used("nonlin_kwargs");
            return Ok(None);
        };
        let allowed: &[&str] = match name {
            "LeakyReLU" => &["negative_slope", "inplace"],
            "ELU" => &["alpha", "inplace"],
            "GELU" => &["approximate"],
            "ReLU" | "SiLU" => &["inplace"],
            _ => &[],
        };
        let m = self.sub_kwargs("nonlin_kwargs", allowed)?;
        Ok(Some(match name {
            "LeakyReLU" => Nonlin::LeakyRelu {
                negative_slope: Self::f64_in(&m, "negative_slope", 0.01, &kw_path)?,
            },
            "ReLU" => Nonlin::Relu,
            "GELU" => match m.get("approximate") {
                None | Some(Value::Null) => Nonlin::Gelu(GeluKind::Erf),
                Some(Value::String(s)) if s == "none" => Nonlin::Gelu(GeluKind::Erf),
                Some(Value::String(s)) if s == "tanh" => Nonlin::Gelu(GeluKind::Tanh),
                Some(v) => {
                    return Err(invalid(
                        &format!("{kw_path}.approximate"),
                        format!("expected \"none\" or \"tanh\", got {}", describe(v)),
                    ))
                }
            },
            "SiLU" => Nonlin::Silu,
            "ELU" => Nonlin::Elu {
                alpha: Self::f64_in(&m, "alpha", 1.0, &kw_path)?,
            },
            "Tanh" => Nonlin::Tanh,
            "Sigmoid" => Nonlin::Sigmoid,
            _ => Nonlin::Identity,
        }))
    }

    /// Errors on the first key that was never read.
    pub(crate) fn finish(self) -> Result<(), ArchError> {
        if let Some(k) = self.map.keys().find(|k| !self.used.contains(k.as_str())) {
            let mut known: Vec<&str> = self.used.iter().map(String::as_str).collect();
            known.sort_unstable();
            return Err(invalid(
                &self.key_path(k),
                format!("unknown argument; accepted: {}", known.join(", ")),
            ));
        }
        Ok(())
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
        assert!(
            e.to_string().contains("x.n_blocks_per_stage: missing"),
            "{e}"
        );
    }
}
