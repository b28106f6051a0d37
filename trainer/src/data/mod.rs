//! Host-side training data: cross-validation splits, the preprocessed dataset, nnU-Net's patch
//! sampling (foreground oversampling), the augmentation pipeline and a deterministic
//! multi-threaded background loader producing [`HostBatch`]es (no candle here: the train loop
//! converts batches to tensors).

pub mod augment;
pub mod cascade;
pub mod dataset;
pub mod loader;
pub mod sampling;
pub mod splits;

use std::path::PathBuf;

pub use augment::{ds_scales_from_strides, AugmentationConfig};
pub use dataset::{require_complete, require_ground_truth, PreprocessedDataset};
pub use loader::{build_batch, BackgroundLoader, HostBatch, LoaderOptions};
pub use splits::{load_or_create_splits, select_fold, Fold, Split};

/// Errors of the data pipeline; they name the case or file involved.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or writing `splits_final.json` failed.
    #[error("{path}: {message}")]
    Splits {
        /// The splits file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A case referenced somewhere is not in the preprocessed folder.
    #[error("case {case:?} ({context}) is not in the preprocessed dataset")]
    MissingCase {
        /// The case identifier.
        case: String,
        /// Where it was referenced.
        context: String,
    },
    /// Reading a preprocessed case failed.
    #[error("case {case:?}: {source}")]
    Storage {
        /// The case identifier.
        case: String,
        /// The cause.
        #[source]
        source: preprocessing::storage::StorageError,
    },
    /// Listing the preprocessed folder failed.
    #[error("preprocessed folder {folder}: {source}")]
    Folder {
        /// The folder.
        folder: PathBuf,
        /// The cause.
        #[source]
        source: preprocessing::storage::StorageError,
    },
    /// A training case without a segmentation.
    #[error("case {case:?} has no segmentation (_seg.npy) in the preprocessed folder")]
    NoSegmentation {
        /// The case identifier.
        case: String,
    },
    /// The case is incompatible with the configuration (channels, dimensionality).
    #[error("case {case:?}: {message}")]
    BadCase {
        /// The case identifier.
        case: String,
        /// What is wrong.
        message: String,
    },
    /// The preprocessed data folder is incomplete or stale (names the cases and the fix).
    #[error(transparent)]
    Preprocessed(#[from] preprocessing::PreprocessError),
    /// A cascade stage's previous-stage segmentations lack cases.
    #[error(
        "{}: the previous stage's segmentations of {} case(s) are missing ({}); train every \
         fold of the previous stage, or redo the final validation of its folds that did not \
         finish (`nnseg train DATASET PREVIOUS_STAGE FOLD --val`): it writes this folder",
        folder.display(),
        missing.len(),
        first_cases(missing)
    )]
    PrevStageIncomplete {
        /// `predicted_next_stage/{configuration}` of the previous stage's model.
        folder: PathBuf,
        missing: Vec<String>,
    },
    /// Invalid loader options.
    #[error("invalid data loader options: {0}")]
    Options(String),
    /// A background worker died.
    #[error("data loader worker {worker} stopped unexpectedly (panic or channel closed)")]
    WorkerDied {
        /// Worker index.
        worker: usize,
    },
}

/// Up to ten case identifiers, comma-separated, with the number left out.
fn first_cases(cases: &[String]) -> String {
    let shown = cases
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    match cases.len() {
        n if n > 10 => format!("{shown} and {} more", n - 10),
        _ => shown,
    }
}

/// What the loader needs to know about the labels (from `dataset.json`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelInfo {
    /// All labels, sorted, background included, ignore label excluded.
    pub all_labels: Vec<i64>,
    /// Foreground regions when the dataset is region-based (`None` for plain labels).
    pub regions: Option<Vec<Vec<i64>>>,
    /// The ignore label, if any.
    pub ignore_label: Option<i64>,
}

impl LabelInfo {
    /// From `dataset.json`.
    pub fn from_dataset_json(ds: &plans::DatasetJson) -> Self {
        LabelInfo {
            all_labels: ds.all_labels(),
            regions: ds.has_regions().then(|| ds.foreground_regions()),
            ignore_label: ds.ignore_label(),
        }
    }

    /// Plain labels `0..n` without regions or ignore label.
    pub fn plain(num_classes: usize) -> Self {
        LabelInfo {
            all_labels: (0..num_classes as i64).collect(),
            regions: None,
            ignore_label: None,
        }
    }

    /// nnU-Net's `annotated_classes_key` (`tuple([-1] + all_labels)`) as a class-locations key.
    pub fn annotated_classes_key(&self) -> String {
        let mut k = vec![-1];
        k.extend(&self.all_labels);
        preprocessing::storage::class_locations_key(&k)
    }

    /// Number of target channels: 1 for labels, regions (+1 with an ignore label) otherwise.
    pub fn target_channels(&self) -> usize {
        match &self.regions {
            Some(r) => r.len() + usize::from(self.ignore_label.is_some()),
            None => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds_json(labels: serde_json::Value) -> plans::DatasetJson {
        let mut v = serde_json::json!({
            "channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"
        });
        if v["labels"]
            .as_object()
            .unwrap()
            .values()
            .any(|x| x.is_array())
        {
            v["regions_class_order"] = serde_json::json!([1, 2]);
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn label_info_from_dataset_json() {
        let li = LabelInfo::from_dataset_json(&ds_json(
            serde_json::json!({"background": 0, "a": 1, "b": 2, "ignore": 3}),
        ));
        assert_eq!(li.all_labels, vec![0, 1, 2]);
        assert_eq!(li.ignore_label, Some(3));
        assert_eq!(li.regions, None);
        assert_eq!(li.annotated_classes_key(), "(-1, 0, 1, 2)");
        assert_eq!(li.target_channels(), 1);
        let li = LabelInfo::from_dataset_json(&ds_json(serde_json::json!({
            "background": 0, "whole": [1, 2], "core": 2, "ignore": 3
        })));
        assert_eq!(li.regions, Some(vec![vec![1, 2], vec![2]]));
        assert_eq!(li.target_channels(), 3);
    }

    #[test]
    fn dataset_opens_cases_lazily_once() {
        let dir = tempfile::tempdir().unwrap();
        sampling::tests::write_cases(dir.path(), 2, [3, 4, 5]);
        // an incomplete case (no .json) is not listed
        std::fs::write(dir.path().join("partial.npy"), b"x").unwrap();
        let ds = PreprocessedDataset::open(dir.path()).unwrap();
        assert_eq!(ds.case_ids(), ["case_000", "case_001"]);
        let a = ds.case("case_001").unwrap();
        let b = ds.case("case_001").unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        assert_eq!(a.mapped.shape().unwrap(), [3, 4, 5]);
        assert!(!a.properties.class_locations.is_empty());
        let err = PreprocessedDataset::open(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
