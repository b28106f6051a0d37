//! The intensity normalization schemes of nnU-Net (`preprocessing/normalization`), named as in
//! the plans' `normalization_schemes`. Shared by the plans (parsing, writing), the planner
//! (choosing one per channel) and preprocessing (applying it).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::json as j;
use crate::PlansError;

/// The normalization applied to one input channel. Serialized with nnU-Net's class names
/// (`CTNormalization`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NormalizationScheme {
    /// Clip to the dataset's foreground 0.5/99.5 percentiles, then z-score with the dataset's
    /// foreground mean/std (from the fingerprint).
    #[serde(rename = "CTNormalization")]
    Ct,
    /// Per-image z-score, optionally only inside the nonzero mask.
    #[serde(rename = "ZScoreNormalization")]
    ZScore,
    /// Cast to float, nothing else.
    #[serde(rename = "NoNormalization")]
    NoNorm,
    /// `(x - min) / (max - min)` per image.
    #[serde(rename = "RescaleTo01Normalization")]
    RescaleTo01,
    /// `x / 255`, for 8-bit RGB images.
    #[serde(rename = "RGBTo01Normalization")]
    RgbTo01,
}

/// nnU-Net's class names of all schemes, in [`NormalizationScheme::ALL`] order.
pub const NORMALIZATION_SCHEMES: [&str; 5] = [
    NormalizationScheme::Ct.name(),
    NormalizationScheme::ZScore.name(),
    NormalizationScheme::NoNorm.name(),
    NormalizationScheme::RescaleTo01.name(),
    NormalizationScheme::RgbTo01.name(),
];

impl NormalizationScheme {
    /// All schemes.
    pub const ALL: [NormalizationScheme; 5] = [
        NormalizationScheme::Ct,
        NormalizationScheme::ZScore,
        NormalizationScheme::NoNorm,
        NormalizationScheme::RescaleTo01,
        NormalizationScheme::RgbTo01,
    ];

    /// nnU-Net's class name, as written in the plans.
    pub const fn name(self) -> &'static str {
        match self {
            NormalizationScheme::Ct => "CTNormalization",
            NormalizationScheme::ZScore => "ZScoreNormalization",
            NormalizationScheme::NoNorm => "NoNormalization",
            NormalizationScheme::RescaleTo01 => "RescaleTo01Normalization",
            NormalizationScheme::RgbTo01 => "RGBTo01Normalization",
        }
    }

    /// The scheme with class name `name` (exact spelling).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.name() == name)
    }

    /// nnU-Net's mapping from a dataset.json `channel_names` value (case-insensitive) to a
    /// scheme; anything unknown is z-score, as in nnU-Net.
    pub fn from_channel_name(name: &str) -> Self {
        match name.to_ascii_lowercase().as_str() {
            "ct" => NormalizationScheme::Ct,
            "nonorm" => NormalizationScheme::NoNorm,
            "rescale_to_0_1" => NormalizationScheme::RescaleTo01,
            "rgb_to_0_1" => NormalizationScheme::RgbTo01,
            _ => NormalizationScheme::ZScore,
        }
    }

    /// nnU-Net's `leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true`.
    pub fn leaves_outside_mask_zero(self) -> bool {
        matches!(self, NormalizationScheme::ZScore)
    }

    /// Parses the JSON value at `path` of `file`; an unknown name is an error naming the path,
    /// the value and the allowed names (with a spelling suggestion).
    pub(crate) fn from_value(file: &str, path: &str, v: &Value) -> Result<Self, PlansError> {
        let s = j::as_string(file, path, v)?;
        Self::from_name(&s).ok_or_else(|| {
            let hint = j::suggest(&s, &NORMALIZATION_SCHEMES)
                .map(|h| format!(" (did you mean `{h}`?)"))
                .unwrap_or_default();
            j::invalid(
                file,
                path,
                format!("{s:?}"),
                format!(
                    "known normalization schemes: {}{hint}",
                    j::name_list(&NORMALIZATION_SCHEMES)
                ),
            )
        })
    }
}

impl fmt::Display for NormalizationScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parsing a name outside a JSON file (the error lists the allowed names).
impl FromStr for NormalizationScheme {
    type Err = PlansError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_value("normalization scheme", "", &Value::String(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_round_trip_through_serde() {
        for n in NormalizationScheme::ALL {
            let v = serde_json::to_value(n).unwrap();
            assert_eq!(v, json!(n.name()));
            assert_eq!(serde_json::from_value::<NormalizationScheme>(v).unwrap(), n);
            assert_eq!(NormalizationScheme::from_name(n.name()), Some(n));
            assert_eq!(n.name().parse::<NormalizationScheme>().unwrap(), n);
            assert_eq!(n.to_string(), n.name());
        }
        assert_eq!(
            serde_json::to_value(vec![
                NormalizationScheme::ZScore,
                NormalizationScheme::RgbTo01
            ])
            .unwrap(),
            json!(["ZScoreNormalization", "RGBTo01Normalization"])
        );
    }

    #[test]
    fn unknown_name_names_path_and_allowed_values() {
        let e = NormalizationScheme::from_value(
            "p.json",
            "configurations.2d.normalization_schemes[0]",
            &json!("CTnormalisation"),
        )
        .unwrap_err()
        .to_string();
        for part in [
            "p.json",
            "configurations.2d.normalization_schemes[0]",
            "\"CTnormalisation\"",
            "ZScoreNormalization",
            "RGBTo01Normalization",
            "did you mean `CTNormalization`?",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
        let e = NormalizationScheme::from_value("p.json", "x", &json!(3))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x") && e.contains('3'), "{e}");
        assert!("Foo".parse::<NormalizationScheme>().is_err());
        assert!(serde_json::from_value::<NormalizationScheme>(json!("Foo")).is_err());
    }

    #[test]
    fn channel_names_map_like_nnunet() {
        use NormalizationScheme::*;
        for (name, want) in [
            ("CT", Ct),
            ("ct", Ct),
            ("noNorm", NoNorm),
            ("rescale_to_0_1", RescaleTo01),
            ("RGB_to_0_1", RgbTo01),
            ("T2", ZScore),
        ] {
            assert_eq!(NormalizationScheme::from_channel_name(name), want, "{name}");
        }
        assert!(ZScore.leaves_outside_mask_zero());
        assert!(!Ct.leaves_outside_mask_zero());
    }
}
