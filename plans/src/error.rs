//! Error type shared by every loader in this crate.
//!
//! Every variant names the file (or a description of the in-memory source), the JSON path of the
//! offending value (`configurations.3d_fullres.patch_size[1]`), the bad value and what is allowed.

use std::path::PathBuf;

/// Errors raised while reading, validating or writing nnU-Net JSON files.
#[derive(Debug, thiserror::Error)]
pub enum PlansError {
    /// A file-system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON.
    #[error("{}:{line}:{column}: invalid JSON: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A value could not be serialized to JSON.
    #[error("{file}: cannot serialize to JSON: {message}")]
    Serialize { file: String, message: String },
    /// A required key is absent.
    #[error("{file}: missing key `{key}` in {parent}{note}")]
    MissingKey {
        file: String,
        /// JSON path of the object that should hold the key (`configurations.3d_fullres`).
        parent: String,
        key: String,
        /// Extra context, e.g. the inherits_from chain or a near-miss key found instead.
        note: String,
    },
    /// A value has the wrong JSON type or range.
    #[error("{file}: {path}: expected {expected}, got {got}")]
    Type {
        file: String,
        path: String,
        expected: String,
        got: String,
    },
    /// An unknown key that looks like a misspelling of a known one.
    #[error("{file}: unknown key `{key}` in {parent}: did you mean `{suggestion}`?")]
    MisspelledKey {
        file: String,
        parent: String,
        key: String,
        suggestion: String,
    },
    /// An unknown key where only a fixed set of keys is allowed.
    #[error("{file}: unknown key `{key}` in {parent}; allowed keys: {allowed}")]
    UnknownKey {
        file: String,
        parent: String,
        key: String,
        allowed: String,
    },
    /// A value of the right type that violates a semantic rule.
    #[error("{file}: {path}: invalid value {value}: {allowed}")]
    Invalid {
        file: String,
        path: String,
        value: String,
        allowed: String,
    },
    /// `Plans::configuration` was asked for a name that does not exist.
    #[error("{file}: unknown configuration `{name}`; available configurations: {available}")]
    UnknownConfiguration {
        file: String,
        name: String,
        available: String,
    },
    /// `inherits_from` names a configuration that does not exist.
    #[error(
        "{file}: configurations.{child}.inherits_from: parent configuration `{parent}` does not exist; available configurations: {available}"
    )]
    UnknownParent {
        file: String,
        child: String,
        parent: String,
        available: String,
    },
    /// `inherits_from` forms a cycle.
    #[error("{file}: configurations: inherits_from cycle: {cycle}")]
    InheritanceCycle { file: String, cycle: String },
}

impl PlansError {
    /// Replace the file description of this error (e.g. with the real path when a `Plans` that
    /// was loaded elsewhere reports a configuration error). I/O and parse errors keep their path.
    pub fn with_file(mut self, new_file: impl Into<String>) -> Self {
        let new_file = new_file.into();
        match &mut self {
            PlansError::Io { .. } | PlansError::Parse { .. } => {}
            PlansError::Serialize { file, .. }
            | PlansError::MissingKey { file, .. }
            | PlansError::Type { file, .. }
            | PlansError::MisspelledKey { file, .. }
            | PlansError::UnknownKey { file, .. }
            | PlansError::Invalid { file, .. }
            | PlansError::UnknownConfiguration { file, .. }
            | PlansError::UnknownParent { file, .. }
            | PlansError::InheritanceCycle { file, .. } => *file = new_file,
        }
        self
    }

    /// The file description this error refers to.
    pub fn file(&self) -> String {
        match self {
            PlansError::Io { path, .. } | PlansError::Parse { path, .. } => {
                path.display().to_string()
            }
            PlansError::Serialize { file, .. }
            | PlansError::MissingKey { file, .. }
            | PlansError::Type { file, .. }
            | PlansError::MisspelledKey { file, .. }
            | PlansError::UnknownKey { file, .. }
            | PlansError::Invalid { file, .. }
            | PlansError::UnknownConfiguration { file, .. }
            | PlansError::UnknownParent { file, .. }
            | PlansError::InheritanceCycle { file, .. } => file.clone(),
        }
    }
}
