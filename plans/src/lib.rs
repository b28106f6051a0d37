//! plans: typed, validated access to the JSON files nnU-Net users read and edit —
//! `dataset.json`, `dataset_fingerprint.json` and the plans (`nnUNetPlans.json`) — with errors
//! that name the file, the JSON path, the bad value and what is allowed, and atomic writes in
//! nnU-Net's exact JSON layout.

mod dataset_json;
mod error;
mod fingerprint;
pub mod io;
mod json;
mod normalization;
mod plans;

pub use dataset_json::{DatasetEntry, DatasetJson, LabelValue, MAX_LABEL_VALUE};
pub use error::PlansError;
pub use fingerprint::{Fingerprint, IntensityProperties};
/// The did-you-mean rule of every JSON key error (also used for `arch_kwargs`).
pub use json::suggest as suggest_key;
pub use normalization::{NormalizationScheme, NORMALIZATION_SCHEMES};
pub use plans::{
    ArchitectureSpec, Configuration, Plans, ResamplingKwargs, CONFIGURATION_KEYS, PLANS_KEYS,
    RESAMPLING_FNS,
};
