//! Options of [`super::KiUNet`]: a PlainConvUNet `arch_kwargs` object plus the KiU-Net keys
//! documented in the module doc of [`super`] ([`KiUNetKwargs`], typed with serde).

use crate::kwargs::{self, invalid, key_path, Choice, Choices};
use crate::network::{ArchError, NetworkIo};
use crate::unet::options::{UNetConfig, UNetKwargs};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

/// The KiU-Net keys of `arch_kwargs` (besides a PlainConvUNet plan's).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct KiUNetKwargs {
    /// `"default"` or `"seed"` (the seed's defaults for the keys below).
    pub form: Option<Choice<Form>>,
    pub pool_type: Option<Choice<PoolType>>,
    /// Multiplies the U-Net widths, in (0, 64].
    pub feature_scale: Option<f64>,
    pub kinet_widths: Option<KiNetWidths>,
    /// Smallest width of a fractional Ki-Net width (≥ 1, default 2).
    pub kinet_min_width: Option<usize>,
    pub skip_before_crfb: Option<bool>,
    pub decoder_crfb: Option<DecoderCrfb>,
    pub kinet_sizing: Option<Choice<KiNetSizing>>,
    pub kinet_upsample_axes: Option<UpsampleAxes>,
    /// Largest Ki-Net upsampling factor per axis, 1..=16 (default 2).
    pub kinet_max_scale: Option<usize>,
}

/// The KiU-Net keys (see [`KiUNetKwargs`]).
pub fn kiunet_keys() -> &'static [&'static str] {
    kwargs::keys::<KiUNetKwargs>()
}

/// `form`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Default,
    Seed,
}

impl Choices for Form {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("default", Form::Default), ("seed", Form::Seed)];
}

/// `kinet_widths`: a name, a fraction of the U-Net widths or one width per stage.
#[derive(Debug, Clone, PartialEq)]
pub enum KiNetWidths {
    Named(String),
    Fraction(f64),
    List(Vec<usize>),
}

impl<'de> Deserialize<'de> for KiNetWidths {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KiNetWidths;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a number or a list of widths")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KiNetWidths, E> {
                Ok(KiNetWidths::Named(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KiNetWidths, E> {
                Ok(KiNetWidths::Fraction(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KiNetWidths, E> {
                Ok(KiNetWidths::Fraction(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KiNetWidths, E> {
                Ok(KiNetWidths::Fraction(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KiNetWidths, A::Error> {
                let mut out = vec![];
                while let Some(x) = seq.next_element::<usize>()? {
                    out.push(x);
                }
                Ok(KiNetWidths::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// `kinet_upsample_axes`: `"auto"`, `"all"` or one boolean per spatial axis.
#[derive(Debug, Clone, PartialEq)]
pub enum UpsampleAxes {
    Named(String),
    Each(Vec<bool>),
}

impl<'de> Deserialize<'de> for UpsampleAxes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UpsampleAxes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\", \"all\" or a list of booleans (one per spatial axis)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<UpsampleAxes, E> {
                match v {
                    "auto" | "all" => Ok(UpsampleAxes::Named(v.to_string())),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UpsampleAxes, A::Error> {
                let mut out = vec![];
                while let Some(x) = seq.next_element::<bool>()? {
                    out.push(x);
                }
                Ok(UpsampleAxes::Each(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolType {
    /// Strided first conv (nnU-Net).
    Conv,
    /// `MaxPool(stride)` before the stage's convs (original KiU-Net).
    Max,
    /// `AvgPool(stride)` before the stage's convs.
    Avg,
}

/// Whether the decoder has cross-refinement blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderCrfb {
    /// CRFB after every decoder stage (as in the original KiU-Net).
    On,
    /// No decoder CRFBs.
    Off,
    /// The seed's bug: the blocks are built (their parameters exist and are counted, with the
    /// seed's channel pairing) but never called.
    Unused,
}

/// How the Ki-Net branch's spatial sizes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KiNetSizing {
    /// Ki-Net stage `s` is upsampled by the U-Net stride of stage `s+1` on the enabled axes,
    /// capped at `kinet_max_scale` × the input; the decoder mirrors it exactly (strided convs
    /// back down to each encoder size), so the branch ends at `kinet_max_scale` × the input.
    Mirror,
    /// The seed: ×2 on every axis while every axis is below the cap; the decoder downsamples
    /// with `Conv(kernel_sizes[s], stride=strides[s], padding=1)` and resizes the skips; the
    /// Ki-Net logits end at input / 2^(n-2) and are interpolated back up.
    Seed,
}

/// Everything needed to build a [`super::KiUNet`].
#[derive(Debug, Clone, PartialEq)]
pub struct KiUNetConfig {
    /// The U-Net branch (features already multiplied by `feature_scale`).
    pub base: UNetConfig,
    pub n_conv_per_stage: Vec<usize>,
    pub pool_type: PoolType,
    /// Ki-Net width per encoder stage.
    pub kinet_widths: Vec<usize>,
    pub skip_before_crfb: bool,
    pub decoder_crfb: DecoderCrfb,
    pub kinet_sizing: KiNetSizing,
    /// Axes the Ki-Net branch may upsample (mirror sizing only).
    pub kinet_upsample_axes: Vec<bool>,
    /// Cap of the Ki-Net size, as a multiple of the input size per axis.
    pub kinet_max_scale: usize,
}

impl KiUNetConfig {
    pub fn n_stages(&self) -> usize {
        self.base.n_stages()
    }
    pub fn dim(&self) -> usize {
        self.base.dim().n()
    }
    pub fn features(&self) -> &[usize] {
        &self.base.features_per_stage
    }

    /// Parses `arch_kwargs` (`path` is its JSON path, used in every error).
    pub fn from_kwargs(
        kwargs: &Map<String, Value>,
        path: &str,
        input_channels: usize,
        num_classes: usize,
        deep_supervision: bool,
    ) -> Result<Self, ArchError> {
        let known: Vec<&str> = UNetKwargs::PLAIN_KEYS
            .iter()
            .chain(kiunet_keys())
            .copied()
            .collect();
        kwargs::reject_unknown(kwargs, path, &known)?;
        let own: KiUNetKwargs = kwargs::typed(kwargs, path)?;
        let io = NetworkIo {
            in_channels: input_channels,
            num_classes,
            deep_supervision,
        };
        let mut base = UNetConfig::from_typed(&UNetKwargs::parse(kwargs, path)?, path, false, &io)?;
        let n = base.n_stages();
        if n < 2 {
            return Err(invalid(
                &key_path(path, "n_stages"),
                "KiU-Net needs at least 2 stages",
            ));
        }
        let n_conv_per_stage = match &base.encoder {
            crate::unet::options::EncoderKind::Plain { n_conv_per_stage } => {
                n_conv_per_stage.clone()
            }
            crate::unet::options::EncoderKind::Residual { .. } => {
                return Err(invalid(path, "KiU-Net needs a plain encoder configuration"))
            }
        };
        let seed_form = own.form.map(|c| c.0) == Some(Form::Seed);
        if let Some(f) = own.feature_scale {
            if !(f.is_finite() && f > 0.0 && f <= 64.0) {
                return Err(invalid(
                    &key_path(path, "feature_scale"),
                    format!("must be in (0, 64], got {f}"),
                ));
            }
            for x in base.features_per_stage.iter_mut() {
                *x = ((*x as f64 * f).round() as usize).max(1);
            }
        }
        let kinet_widths = own.widths(&base.features_per_stage, seed_form, path)?;
        let decoder_crfb = own.decoder_crfb.unwrap_or(if seed_form {
            DecoderCrfb::Unused
        } else {
            DecoderCrfb::On
        });
        let kinet_sizing = match own.kinet_sizing {
            Some(c) => c.0,
            None if seed_form => KiNetSizing::Seed,
            None => KiNetSizing::Mirror,
        };
        let kinet_max_scale = own.kinet_max_scale.unwrap_or(2);
        if !(1..=16).contains(&kinet_max_scale) {
            return Err(invalid(
                &key_path(path, "kinet_max_scale"),
                format!("expected an integer in 1..=16, got {kinet_max_scale}"),
            ));
        }
        let kinet_upsample_axes = own.upsample_axes(&base.strides, path)?;
        Ok(KiUNetConfig {
            base,
            n_conv_per_stage,
            pool_type: own.pool_type.map_or(PoolType::Conv, |c| c.0),
            kinet_widths,
            skip_before_crfb: own.skip_before_crfb.unwrap_or(seed_form),
            decoder_crfb,
            kinet_sizing,
            kinet_upsample_axes,
            kinet_max_scale,
        })
    }

    /// Mirror sizing: the integer upsampling factor of Ki-Net stage `s` per axis (`1` for the
    /// last stage). Independent of the patch size.
    pub fn mirror_factors(&self) -> Vec<Vec<usize>> {
        let n = self.n_stages();
        let dim = self.dim();
        let mut p = vec![1usize; dim];
        let mut out = Vec::with_capacity(n);
        for s in 0..n {
            let mut f = vec![1usize; dim];
            if s + 1 < n {
                for a in 0..dim {
                    if self.kinet_upsample_axes[a] {
                        let room = self.kinet_max_scale / p[a];
                        f[a] = self.base.strides[s + 1][a].min(room).max(1);
                        p[a] *= f[a];
                    }
                }
            }
            out.push(f);
        }
        out
    }

    /// Stride of the U-Net encoder's first conv at stage `s` (1 with explicit pooling).
    pub fn unet_conv_stride(&self, s: usize) -> Vec<usize> {
        match self.pool_type {
            PoolType::Conv => self.base.strides[s].clone(),
            _ => vec![1; self.dim()],
        }
    }

    /// Whether stage `s` of the U-Net encoder starts with a pooling layer.
    pub fn has_pool(&self, s: usize) -> bool {
        self.pool_type != PoolType::Conv && s > 0 && self.base.strides[s].iter().any(|&x| x != 1)
    }
}

impl KiUNetKwargs {
    /// The Ki-Net widths for the (scaled) U-Net widths `feats`.
    fn widths(
        &self,
        feats: &[usize],
        seed_form: bool,
        path: &str,
    ) -> Result<Vec<usize>, ArchError> {
        let n = feats.len();
        let min_width = self.kinet_min_width.unwrap_or(2);
        if min_width == 0 {
            return Err(invalid(
                &key_path(path, "kinet_min_width"),
                "expected an integer >= 1, got 0",
            ));
        }
        let fraction = |x: f64| -> Vec<usize> {
            feats
                .iter()
                .map(|&f| {
                    ((f as f64 * x).round() as usize)
                        .max(min_width.min(f))
                        .max(1)
                })
                .collect()
        };
        let wp = key_path(path, "kinet_widths");
        Ok(match &self.kinet_widths {
            None if seed_form => feats.iter().rev().copied().collect(),
            None => fraction(0.25),
            Some(KiNetWidths::Named(s)) => match s.as_str() {
                "reversed" => feats.iter().rev().copied().collect(),
                "same" => feats.to_vec(),
                "quarter" => fraction(0.25),
                "half" => fraction(0.5),
                "narrow" => {
                    let w = ((feats[0] as f64 / 4.0).round() as usize)
                        .max(min_width)
                        .max(1);
                    vec![w; n]
                }
                _ => {
                    return Err(invalid(
                        &wp,
                        format!(
                            "expected \"quarter\", \"half\", \"narrow\", \"same\", \"reversed\", a \
                             fraction of the U-Net widths or a list of {n} widths, got \"{s}\""
                        ),
                    ))
                }
            },
            Some(KiNetWidths::Fraction(x)) => {
                if !(x.is_finite() && *x > 0.0 && *x <= 4.0) {
                    return Err(invalid(
                        &wp,
                        format!("a fraction of the U-Net widths must be in (0, 4], got {x}"),
                    ));
                }
                fraction(*x)
            }
            Some(KiNetWidths::List(a)) => {
                if a.len() != n {
                    return Err(invalid(
                        &wp,
                        format!("has {} entries, expected {n} (one per stage)", a.len()),
                    ));
                }
                if let Some(i) = a.iter().position(|&w| w == 0) {
                    return Err(invalid(
                        &format!("{wp}[{i}]"),
                        "expected an integer >= 1, got 0",
                    ));
                }
                a.clone()
            }
        })
    }

    /// The axes the Ki-Net upsamples, for a plan with `strides`.
    fn upsample_axes(&self, strides: &[Vec<usize>], path: &str) -> Result<Vec<bool>, ArchError> {
        let dim = strides.first().map_or(0, Vec::len);
        match &self.kinet_upsample_axes {
            None => Ok(auto_axes(strides, dim)),
            Some(UpsampleAxes::Named(s)) if s == "all" => Ok(vec![true; dim]),
            Some(UpsampleAxes::Named(_)) => Ok(auto_axes(strides, dim)),
            Some(UpsampleAxes::Each(a)) if a.len() != dim => Err(invalid(
                &key_path(path, "kinet_upsample_axes"),
                format!(
                    "has {} entries, expected {dim} (one per spatial axis)",
                    a.len()
                ),
            )),
            Some(UpsampleAxes::Each(a)) => Ok(a.clone()),
        }
    }
}

/// Axes the first downsampling stride of the plan reduces (the axes with fine spacing); all
/// axes if the plan never downsamples.
fn auto_axes(strides: &[Vec<usize>], dim: usize) -> Vec<bool> {
    strides
        .iter()
        .skip(1)
        .find(|st| st.iter().any(|&x| x > 1))
        .map(|st| st.iter().map(|&x| x > 1).collect())
        .unwrap_or_else(|| vec![true; dim])
}

impl Choices for PoolType {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("conv", PoolType::Conv),
        ("max", PoolType::Max),
        ("avg", PoolType::Avg),
    ];
}

impl Choices for KiNetSizing {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("mirror", KiNetSizing::Mirror), ("seed", KiNetSizing::Seed)];
}

impl<'de> Deserialize<'de> for DecoderCrfb {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DecoderCrfb;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or \"unused\"")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<DecoderCrfb, E> {
                Ok(if v { DecoderCrfb::On } else { DecoderCrfb::Off })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DecoderCrfb, E> {
                match v {
                    "unused" => Ok(DecoderCrfb::Unused),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}
