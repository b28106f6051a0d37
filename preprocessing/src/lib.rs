//! Cropping, normalization, resampling, fingerprint extraction and the
//! per-case preprocessor (nnU-Net v2 `DefaultPreprocessor`), plus the on-disk format of
//! preprocessed cases.
pub mod completion;
pub mod cropping;
pub mod error;
pub mod fingerprint;
pub mod normalization;
pub mod preprocessor;
pub mod resampling;
pub mod storage;

pub use completion::{verify_complete, verify_gt_segmentations, CompletionRecord, GtRecord};
pub use error::PreprocessError;
pub use fingerprint::extract_fingerprint;
pub use preprocessor::{
    copy_gt_segmentations, preprocess_case, preprocess_dataset, PreprocessOptions, PreprocessReport,
};

/// Called once per finished case with the case identifier (the binary drives a progress bar
/// with it; libraries never draw on the terminal themselves).
#[derive(Clone)]
pub struct ProgressHook(pub std::sync::Arc<dyn Fn(&str) + Send + Sync>);

impl ProgressHook {
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        ProgressHook(std::sync::Arc::new(f))
    }

    pub fn case_done(&self, identifier: &str) {
        (self.0)(identifier)
    }
}

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}
