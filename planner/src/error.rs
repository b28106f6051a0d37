//! Planner errors.

use std::path::PathBuf;

/// Everything that can go wrong while planning or saving plans.
#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    /// The fingerprint cannot be planned from (empty, ragged, non-positive spacing...).
    #[error("dataset_fingerprint.json: {0}")]
    Fingerprint(String),
    /// dataset.json lacks something the planner needs.
    #[error("dataset.json: {0}")]
    DatasetJson(String),
    /// A planner option is invalid (`-gpu_memory_target`, `-overwrite_target_spacing`, ...).
    #[error("invalid planner option {option}: {message}")]
    InvalidOption {
        option: &'static str,
        message: String,
    },
    /// The patch could not be shrunk below the memory target.
    #[error(
        "{configuration}: cannot fit a patch into the GPU memory target (patch {patch:?}, estimate \
         {estimate}, reference {reference}); increase -gpu_memory_target"
    )]
    PatchDoesNotFit {
        configuration: String,
        patch: Vec<usize>,
        estimate: u64,
        reference: f64,
    },
    /// The 3d_lowres search did not terminate.
    #[error("3d_lowres: spacing search did not converge after {0} iterations")]
    LowresDidNotConverge(usize),
    /// Fitting a trainer preset's network to a configuration failed.
    #[error("fitting `-tr {preset}` to configuration `{configuration}`: {source}")]
    Fit {
        preset: String,
        configuration: String,
        #[source]
        source: Box<PlannerError>,
    },
    /// The preset's network cannot be resolved.
    #[error(transparent)]
    Arch(#[from] architectures::registry::ArchError),
    /// A dataset id, folder or dataset.json problem.
    #[error(transparent)]
    Dataset(#[from] datasets::DatasetError),
    /// Reading or writing a plans file.
    #[error(transparent)]
    Plans(#[from] plans::PlansError),
    /// The existing plans file could not be merged.
    #[error("{}: {message}", path.display())]
    ExistingPlans { path: PathBuf, message: String },
}
