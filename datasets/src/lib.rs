//! Raw nnU-Net datasets: dataset ids and roots, nnU-Net's folder and file names ([`layout`]),
//! image IO (NIfTI, PNG, TIFF) with SimpleITK's axis conventions, the integrity check and
//! synthetic demo datasets.

pub mod convert;
pub mod demo;
pub mod error;
pub mod io;
pub mod layout;
pub mod overlay;
pub mod paths;
pub mod raw;
pub mod verify;

pub use error::DatasetError;
pub use layout::{ModelDir, ModelId, PredictionDir, PreprocessedDir, RawDir, ResultsDir};
pub use paths::{
    dataset_name_from_arg, dataset_name_from_id, find_dataset_folder, parse_dataset_id, NnUnetPaths,
};
pub use raw::{RawCase, RawDataset};
pub use verify::{verify_dataset_integrity, VerifyReport};
