//! Cropping, normalization, resampling, fingerprint extraction and the
//! per-case preprocessor (nnU-Net v2 `DefaultPreprocessor`).
pub mod cropping;
pub mod fingerprint;
pub mod normalization;
pub mod preprocessor;
pub mod resampling;
pub mod storage;
