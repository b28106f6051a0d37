//! `nnseg cross_validate`: a whole cross-validation (configuration × trainer × fold, then
//! `find_best_configuration`) as jobs, run on this machine ([`local`]) or on a Slurm cluster
//! ([`slurm`]).
//!
//! [`jobs::plan_jobs`] expands the request into dependency levels (every stage of a cascade
//! after the stage it depends on, `find_best_configuration` last) and leaves out the folds
//! whose `checkpoint_final` exists. Every training runs as `nnseg train ... --c`, so a rerun
//! (or a requeued Slurm job) continues what was interrupted; a training stopped by a signal
//! exits with [`crate::train::STOPPED_EXIT_CODE`] after writing `checkpoint_latest`.

pub mod jobs;
pub mod local;
pub mod recommended;
pub mod slurm;

pub use jobs::{configurations_from_plans, plan_jobs, CrossValidation, Job, JobKind, JobPlan};

use std::path::PathBuf;

/// Errors of the launchers; each names the file or command involved.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` printed `{output}`, not a job id")]
    JobId { command: String, output: String },
    #[error("{}: {message}", path.display())]
    Record { path: PathBuf, message: String },
    #[error("configuration `{configuration}`: its stages form a cycle through `previous_stage`")]
    StageCycle { configuration: String },
    #[error(transparent)]
    Name(#[from] datasets::DatasetError),
    #[error(transparent)]
    Plans(#[from] plans::PlansError),
    #[error(transparent)]
    Evaluation(#[from] crate::evaluation::EvalError),
    #[error("prediction: {0}")]
    Predict(Box<crate::predict::PredictError>),
}

fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}
