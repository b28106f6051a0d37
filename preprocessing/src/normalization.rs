//! Intensity normalization schemes (nnU-Net `preprocessing/normalization/`).

/// The normalization applied to one input channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalization {
    /// Clip to the dataset's foreground 0.5/99.5 percentiles, then z-score with the
    /// dataset's foreground mean/std (from the fingerprint).
    Ct,
    /// Per-image z-score, optionally only inside the nonzero mask.
    ZScore,
    /// Cast to float, nothing else.
    NoNorm,
    /// `(x - min) / (max - min)` per image.
    RescaleTo01,
    /// `x / 255`, for 8-bit RGB images.
    RgbTo01,
}

impl Normalization {
    /// All schemes with their nnU-Net class names.
    pub const ALL: [Normalization; 5] = [
        Normalization::Ct,
        Normalization::ZScore,
        Normalization::NoNorm,
        Normalization::RescaleTo01,
        Normalization::RgbTo01,
    ];

    /// nnU-Net's mapping from a `channel_names` value (case-insensitive) to a scheme;
    /// anything unknown is z-score, as in nnU-Net.
    pub fn from_channel_name(name: &str) -> Self {
        match name.to_ascii_lowercase().as_str() {
            "ct" => Normalization::Ct,
            "nonorm" => Normalization::NoNorm,
            "rescale_to_0_1" => Normalization::RescaleTo01,
            "rgb_to_0_1" => Normalization::RgbTo01,
            _ => Normalization::ZScore,
        }
    }

    /// Parse the class name stored in plans (`normalization_schemes`).
    pub fn from_scheme_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.scheme_name() == name)
    }

    /// The class name written into plans.
    pub fn scheme_name(self) -> &'static str {
        match self {
            Normalization::Ct => "CTNormalization",
            Normalization::ZScore => "ZScoreNormalization",
            Normalization::NoNorm => "NoNormalization",
            Normalization::RescaleTo01 => "RescaleTo01Normalization",
            Normalization::RgbTo01 => "RGBTo01Normalization",
        }
    }

    /// nnU-Net's `leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true`.
    pub fn leaves_outside_mask_zero(self) -> bool {
        matches!(self, Normalization::ZScore)
    }
}
