//! trainer: nnU-Net v2's training (`nnUNetTrainer`) on candle.
//!
//! - [`config::TrainerConfig`] and [`presets`]: hyper-parameters and the `-tr` names;
//! - [`train::train`]: the epoch loop writing nnU-Net's results layout;
//! - [`checkpoint`], [`logging`], [`progress`]: checkpoints, training log, `progress.png`;
//! - [`import`]: reading trained nnU-Net v2 models (`.pth` checkpoints) into nnseg's format.

pub mod amp;
pub mod bench;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod data;
pub mod doctor;
pub mod evaluation;
pub mod fold_lock;
#[cfg(feature = "cuda")]
pub mod gpu_memory;
pub mod growth;
pub mod import;
pub mod logging;
pub mod loss;
pub mod optim;
pub mod predict;
pub mod presets;
pub mod progress;
pub mod sharing;
pub mod train;

pub use amp::Amp;
pub use checkpoint::{Checkpoint, CheckpointKind};
pub use config::TrainerConfig;
pub use data::Fold;
pub use presets::Presets;
pub use train::{
    train, StopFlag, TrainError, TrainProgress, TrainRequest, TrainSummary, STOPPED_EXIT_CODE,
};
