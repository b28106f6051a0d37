//! Cropping, normalization, resampling, fingerprint extraction and the
//! per-case preprocessor (nnU-Net v2 `DefaultPreprocessor`), plus the on-disk format of
//! preprocessed cases.
pub mod cropping;
pub mod error;
pub mod fingerprint;
pub mod normalization;
pub mod preprocessor;
pub mod resampling;
pub mod storage;

pub use error::PreprocessError;
pub use fingerprint::extract_fingerprint;
pub use preprocessor::{
    copy_gt_segmentations, preprocess_case, preprocess_dataset, PreprocessOptions, PreprocessReport,
};
