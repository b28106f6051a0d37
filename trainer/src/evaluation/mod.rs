//! Evaluation, ensembling, postprocessing and model selection, as nnU-Net v2's
//! `evaluation/evaluate_predictions.py`, `ensembling/ensemble.py`,
//! `postprocessing/remove_connected_components.py` and `evaluation/find_best_configuration.py`.
//!
//! Everything works on label maps read with [`datasets::io::read_seg`] (`(1, z, y, x)` int16)
//! and written with [`datasets::io::write_seg`]; no candle is needed.
//!
//! **NaN in JSON.** nnU-Net writes `summary.json` with Python's `json`, which emits the bare
//! literal `NaN` for the Dice/IoU of a class that is empty in both reference and prediction.
//! serde_json can neither write nor read that, so [`json`] has a writer that emits `NaN`
//! (`Infinity`, `-Infinity`) exactly like Python, and a reader that accepts these literals
//! (they become `null` in the parsed [`serde_json::Value`] and NaN in typed results). Files
//! written here are therefore readable by nnU-Net's `load_json`, and nnU-Net's are readable here.

pub mod best_config;
pub mod ensemble;
pub mod evaluate;
pub mod json;
pub mod metrics;
pub mod postprocess;

use std::path::PathBuf;

pub use best_config::{
    accumulate_crossval_results, find_best_configuration, find_trained_models,
    merge_fold_validations, BestConfigOptions, BestConfigResult, CrossvalOptions, ModelSpec,
};
pub use ensemble::{
    ensemble_folders, load_probabilities, probabilities_to_segmentation, save_probabilities,
    EnsembleOptions, IMAGE_PROPERTIES_KEY,
};
pub use evaluate::{
    detect_file_ending, evaluate_folder, evaluate_simple, label_or_region_key, load_summary,
    EvaluateOptions, MeanMetrics, SimpleEvaluateOptions, Summary,
};
pub use metrics::{compute_metrics, ClassMetrics};
pub use postprocess::{
    apply_postprocessing, determine_postprocessing, largest_component_mask,
    remove_all_but_largest_component, PostprocessOptions, Postprocessing,
};

/// Errors of evaluation, ensembling and postprocessing; all name the file or folder involved.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Output(#[from] crate::predict::outputs::OutputError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Dataset(#[from] datasets::DatasetError),
    #[error(transparent)]
    Plans(#[from] plans::PlansError),
    /// An incomplete or changed `gt_segmentations/` (names the cases and the fix).
    #[error(transparent)]
    Preprocessed(#[from] preprocessing::PreprocessError),
    #[error("{folder}: no files ending with {file_ending:?}")]
    NoCases {
        folder: PathBuf,
        file_ending: String,
    },
    #[error(
        "{folder}: predictions missing for {} reference case(s): {}",
        cases.len(),
        cases.join(", ")
    )]
    MissingPredictions { folder: PathBuf, cases: Vec<String> },
    #[error("{path}: no reference file for prediction (expected {expected})")]
    MissingReference { path: PathBuf, expected: PathBuf },
    #[error("shape mismatch: reference {reference} has shape {ref_shape:?}, prediction {prediction} has {pred_shape:?}")]
    ShapeMismatch {
        reference: PathBuf,
        prediction: PathBuf,
        ref_shape: Vec<usize>,
        pred_shape: Vec<usize>,
    },
    #[error("{path}: invalid .npy probabilities: {message}")]
    Npy { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, EvalError>;

pub(crate) fn io_err(
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> EvalError {
    let path = path.to_path_buf();
    move |source| EvalError::Io {
        action,
        path,
        source,
    }
}

/// A rayon pool with `num_workers` threads (at least 1).
pub(crate) fn pool(num_workers: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(num_workers.max(1))
        .build()
        .map_err(|e| EvalError::Config(format!("cannot start {num_workers} worker threads: {e}")))
}

/// Sorted file names in `folder` ending with `file_ending` (hidden temp files skipped).
pub(crate) fn list_files(folder: &std::path::Path, file_ending: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(io_err("list", folder))? {
        let entry = entry.map_err(io_err("list", folder))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(file_ending) {
            continue;
        }
        if entry.path().is_file() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}
