//! Error type of the `datasets` crate. Every variant carries the context a user needs to fix the
//! problem: the file, the case, the dataset id or the folders that were searched.

use std::path::PathBuf;

use thiserror::Error;

/// Formats a list of problems as an indented bullet list (one per line).
fn bullets(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("\n  - {s}"))
        .collect::<Vec<_>>()
        .join("")
}

fn paths_list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Error)]
pub enum DatasetError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Plans(#[from] plans::PlansError),

    #[error("invalid dataset id {input:?}: expected a number such as 4 or 004, or a dataset name such as Dataset004_Hippocampus")]
    InvalidDatasetId { input: String },

    #[error(
        "dataset id {id} is ambiguous: more than one folder matches Dataset{id:03}_*: {}",
        paths_list(folders)
    )]
    DuplicateDatasetId { id: u32, folders: Vec<PathBuf> },

    #[error(
        "no dataset with id {id} (a folder named Dataset{id:03}_<name>) was found. Searched:{}",
        bullets(searched)
    )]
    UnknownDatasetId { id: u32, searched: Vec<String> },

    #[error("{var} is not set; set the environment variable or pass {flag}")]
    RootNotSet {
        var: &'static str,
        flag: &'static str,
    },

    #[error("{}: {message}", folder.display())]
    Layout { folder: PathBuf, message: String },

    #[error(
        "{}: a model folder must be named {{trainer}}__{{plans}}__{{configuration}} \
         (three non-empty parts)",
        path.display()
    )]
    ModelFolderName { path: PathBuf },

    #[error("model {field} name {value:?} {problem}")]
    ModelIdPart {
        field: &'static str,
        value: String,
        problem: &'static str,
    },

    #[error("{what} {value:?} cannot be used as a file or folder name: it {problem}")]
    UnsafeName {
        what: String,
        value: String,
        problem: &'static str,
    },

    #[error("{}: cannot read image: {message}", path.display())]
    Read { path: PathBuf, message: String },

    #[error("{}: cannot write image: {message}", path.display())]
    Write { path: PathBuf, message: String },

    #[error("{}: unsupported file ending (supported: .nii, .nii.gz, .png, .tif, .tiff)", path.display())]
    UnsupportedFormat { path: PathBuf },

    #[error("{}: invalid segmentation: {message}", path.display())]
    InvalidSegmentation { path: PathBuf, message: String },

    #[error("images of one case do not match: {message}")]
    GeometryMismatch { message: String },

    #[error("dataset {} failed the integrity check with {} error(s):{}{}",
        folder.display(), errors.len(), bullets(errors),
        if warnings.is_empty() { String::new() } else { format!("\nwarnings:{}", bullets(warnings)) })]
    Integrity {
        folder: PathBuf,
        errors: Vec<String>,
        warnings: Vec<String>,
    },

    #[error("{0}")]
    Other(String),
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DatasetError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn read(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        DatasetError::Read {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        DatasetError::Write {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
