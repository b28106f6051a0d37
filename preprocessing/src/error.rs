//! Error type of the preprocessing crate.

use std::path::PathBuf;

use datasets::DatasetError;
use plans::PlansError;

use crate::normalization::NormalizationError;
use crate::storage::StorageError;

/// Errors of fingerprint extraction and preprocessing. Per-case failures are wrapped in
/// [`PreprocessError::Case`], so the message always starts with the case identifier.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// Something went wrong while processing one case.
    #[error("case {case}: {source}")]
    Case {
        /// Case identifier.
        case: String,
        /// The cause.
        #[source]
        source: Box<PreprocessError>,
    },
    /// Reading an image or label failed.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Invalid plans / dataset.json / fingerprint.
    #[error(transparent)]
    Plans(#[from] PlansError),
    /// Writing or reading preprocessed files failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Intensity normalization failed.
    #[error(transparent)]
    Normalization(#[from] NormalizationError),
    /// Image and label have different spatial shapes.
    #[error(
        "image {} has spatial shape {image:?} but label {} has {label:?} \
         (run with --verify_dataset_integrity for a full check)",
        image_file.display(),
        label_file.display()
    )]
    ShapeMismatch {
        /// First image file of the case.
        image_file: PathBuf,
        /// The label file.
        label_file: PathBuf,
        /// Image shape (z, y, x).
        image: Vec<usize>,
        /// Label shape (z, y, x).
        label: Vec<usize>,
    },
    /// The image contains NaN values.
    #[error("{} contains NaN values", file.display())]
    NaN {
        /// The image file (channel) containing NaNs.
        file: PathBuf,
    },
    /// A training case has no label file.
    #[error("no label file (labelsTr) for this case; training data needs one")]
    MissingLabel,
    /// Plans / configuration values this preprocessor cannot use.
    #[error("configuration {configuration:?}: {message}")]
    Configuration {
        /// Configuration name.
        configuration: String,
        /// What is wrong.
        message: String,
    },
    /// The data does not fit the plans (e.g. channel count).
    #[error("{0}")]
    Invalid(String),
    /// The dataset has no foreground at all, so intensity statistics are undefined.
    #[error(
        "fingerprint: channel {channel} has no foreground voxels (label > 0) in any case; \
         intensity statistics cannot be computed"
    )]
    NoForeground {
        /// Channel index.
        channel: usize,
    },
    /// File-system error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A preprocessed data folder is incomplete or stale (see `completion`).
    #[error(
        "{} cannot be used: {} problem(s):{}\nrun `{fix}` to rebuild it",
        folder.display(),
        problems.len(),
        first_problems(problems)
    )]
    Incomplete {
        /// The data folder.
        folder: PathBuf,
        /// Missing or changed cases, changed plans.
        problems: Vec<String>,
        /// The command that rebuilds the folder.
        fix: String,
    },
    /// The worker pool could not be created.
    #[error("cannot start a pool of {threads} worker threads: {message}")]
    ThreadPool {
        /// Requested threads.
        threads: usize,
        /// Cause.
        message: String,
    },
}

/// The first 20 problems as an indented list (and how many more there are).
fn first_problems(problems: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s: String = problems
        .iter()
        .take(SHOWN)
        .map(|p| format!("\n  - {p}"))
        .collect();
    if problems.len() > SHOWN {
        s.push_str(&format!("\n  ... and {} more", problems.len() - SHOWN));
    }
    s
}

impl PreprocessError {
    /// Wraps `self` with the case identifier (no double wrapping).
    pub fn in_case(self, case: &str) -> Self {
        match self {
            e @ PreprocessError::Case { .. } => e,
            e => PreprocessError::Case {
                case: case.to_string(),
                source: Box::new(e),
            },
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| PreprocessError::Io { path, source }
    }
}

/// Builds a rayon pool with `num_workers` threads (at least 1).
pub(crate) fn worker_pool(num_workers: usize) -> Result<rayon::ThreadPool, PreprocessError> {
    let threads = num_workers.max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| PreprocessError::ThreadPool {
            threads,
            message: e.to_string(),
        })
}
