//! Options of [`super::KiUNet`]: a PlainConvUNet `arch_kwargs` object plus the KiU-Net keys
//! documented in the module doc of [`super`].

use crate::network::ArchError;
use crate::unet::options::{invalid, EncoderKind, Kwargs, UNetConfig};
use serde_json::{Map, Value};

/// The KiU-Net keys this module reads on top of nnU-Net's PlainConvUNet keys.
pub const KIUNET_KEYS: &[&str] = &[
    "form",
    "pool_type",
    "feature_scale",
    "kinet_widths",
    "kinet_min_width",
    "skip_before_crfb",
    "decoder_crfb",
    "kinet_sizing",
    "kinet_upsample_axes",
    "kinet_max_scale",
];

/// How the U-Net encoder downsamples (seed `pool_type`).
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

fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..57])
    } else {
        s
    }
}

fn key_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn get<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

fn string_choice<'a>(
    m: &'a Map<String, Value>,
    path: &str,
    key: &str,
    allowed: &[&str],
) -> Result<Option<&'a str>, ArchError> {
    match get(m, key) {
        None => Ok(None),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(Some(s.as_str())),
        Some(v) => Err(invalid(
            &key_path(path, key),
            format!(
                "expected one of {}, got {}",
                allowed
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                describe(v)
            ),
        )),
    }
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
        let (own, standard): (Map<String, Value>, Map<String, Value>) = kwargs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| KIUNET_KEYS.contains(&k.as_str()));
        let mut base = UNetConfig::from_kwargs(
            &standard,
            path,
            false,
            input_channels,
            num_classes,
            deep_supervision,
        )
        .map_err(|e| match e {
            ArchError::InvalidOption { path, message }
                if message.starts_with("unknown argument") =>
            {
                ArchError::InvalidOption {
                    path,
                    message: format!("{message}; KiU-Net options: {}", KIUNET_KEYS.join(", ")),
                }
            }
            other => other,
        })?;
        let n = base.n_stages();
        let dim = base.dim().n();
        if n < 2 {
            return Err(invalid(
                &key_path(path, "n_stages"),
                "KiU-Net needs at least 2 stages",
            ));
        }
        let n_conv_per_stage = match &base.encoder {
            EncoderKind::Plain { n_conv_per_stage } => n_conv_per_stage.clone(),
            EncoderKind::Residual { .. } => {
                return Err(invalid(path, "KiU-Net needs a plain encoder configuration"))
            }
        };

        let seed_form = string_choice(&own, path, "form", &["default", "seed"])? == Some("seed");

        // feature_scale
        if let Some(v) = get(&own, "feature_scale") {
            let p = key_path(path, "feature_scale");
            let f = v
                .as_f64()
                .ok_or_else(|| invalid(&p, format!("expected a number, got {}", describe(v))))?;
            if !(f.is_finite() && f > 0.0 && f <= 64.0) {
                return Err(invalid(&p, format!("must be in (0, 64], got {f}")));
            }
            for x in base.features_per_stage.iter_mut() {
                *x = ((*x as f64 * f).round() as usize).max(1);
            }
        }
        let feats = base.features_per_stage.clone();

        let pool_type = match string_choice(&own, path, "pool_type", &["conv", "max", "avg"])? {
            None | Some("conv") => PoolType::Conv,
            Some("max") => PoolType::Max,
            _ => PoolType::Avg,
        };

        // kinet_min_width (applies to fractional widths)
        let min_width = match get(&own, "kinet_min_width") {
            None => 2,
            Some(v) => match v.as_u64() {
                Some(m) if m >= 1 => m as usize,
                _ => {
                    return Err(invalid(
                        &key_path(path, "kinet_min_width"),
                        format!("expected an integer >= 1, got {}", describe(v)),
                    ))
                }
            },
        };
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
        let kinet_widths = match get(&own, "kinet_widths") {
            None if seed_form => feats.iter().rev().copied().collect(),
            None => fraction(0.25),
            Some(Value::String(s)) => match s.as_str() {
                "reversed" => feats.iter().rev().copied().collect(),
                "same" => feats.clone(),
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
            Some(Value::Number(x)) => {
                let x = x.as_f64().unwrap_or(f64::NAN);
                if !(x.is_finite() && x > 0.0 && x <= 4.0) {
                    return Err(invalid(
                        &wp,
                        format!("a fraction of the U-Net widths must be in (0, 4], got {x}"),
                    ));
                }
                fraction(x)
            }
            Some(Value::Array(a)) => {
                if a.len() != n {
                    return Err(invalid(
                        &wp,
                        format!("has {} entries, expected {n} (one per stage)", a.len()),
                    ));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, e)| match e.as_u64() {
                        Some(w) if w >= 1 => Ok(w as usize),
                        _ => Err(invalid(
                            &format!("{wp}[{i}]"),
                            format!("expected an integer >= 1, got {}", describe(e)),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            Some(v) => {
                return Err(invalid(
                    &wp,
                    format!("expected a string, a number or a list, got {}", describe(v)),
                ))
            }
        };

        let mut kw = Kwargs::new(&own, path);
        kw.mark_used("form");
        for k in [
            "pool_type",
            "feature_scale",
            "kinet_widths",
            "kinet_min_width",
            "decoder_crfb",
            "kinet_sizing",
            "kinet_upsample_axes",
            "kinet_max_scale",
        ] {
            kw.mark_used(k);
        }
        let skip_before_crfb = kw.optional_bool("skip_before_crfb", seed_form)?;
        kw.finish()?;

        let dp = key_path(path, "decoder_crfb");
        let decoder_crfb = match get(&own, "decoder_crfb") {
            None if seed_form => DecoderCrfb::Unused,
            None => DecoderCrfb::On,
            Some(Value::Bool(true)) => DecoderCrfb::On,
            Some(Value::Bool(false)) => DecoderCrfb::Off,
            Some(Value::String(s)) if s == "unused" => DecoderCrfb::Unused,
            Some(v) => {
                return Err(invalid(
                    &dp,
                    format!("expected true, false or \"unused\", got {}", describe(v)),
                ))
            }
        };

        let kinet_sizing = match string_choice(&own, path, "kinet_sizing", &["mirror", "seed"])? {
            None if seed_form => KiNetSizing::Seed,
            None | Some("mirror") => KiNetSizing::Mirror,
            _ => KiNetSizing::Seed,
        };

        let kinet_max_scale = match get(&own, "kinet_max_scale") {
            None => 2,
            Some(v) => match v.as_u64() {
                Some(m) if (1..=16).contains(&m) => m as usize,
                _ => {
                    return Err(invalid(
                        &key_path(path, "kinet_max_scale"),
                        format!("expected an integer in 1..=16, got {}", describe(v)),
                    ))
                }
            },
        };

        let ap = key_path(path, "kinet_upsample_axes");
        let strides = &base.strides;
        let kinet_upsample_axes = match get(&own, "kinet_upsample_axes") {
            None => auto_axes(strides, dim),
            Some(Value::String(s)) if s == "auto" => auto_axes(strides, dim),
            Some(Value::String(s)) if s == "all" => vec![true; dim],
            Some(Value::Array(a)) => {
                if a.len() != dim {
                    return Err(invalid(
                        &ap,
                        format!(
                            "has {} entries, expected {dim} (one per spatial axis)",
                            a.len()
                        ),
                    ));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, e)| {
                        e.as_bool().ok_or_else(|| {
                            invalid(
                                &format!("{ap}[{i}]"),
                                format!("expected true or false, got {}", describe(e)),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            Some(v) => {
                return Err(invalid(
                    &ap,
                    format!(
                        "expected \"auto\", \"all\" or a list of {dim} booleans, got {}",
                        describe(v)
                    ),
                ))
            }
        };

        Ok(KiUNetConfig {
            base,
            n_conv_per_stage,
            pool_type,
            kinet_widths,
            skip_before_crfb,
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
