//! The preprocessed dataset folder (`nnUNet_preprocessed/DatasetXXX/{data_identifier}`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use preprocessing::storage::{list_cases, load_case_properties, CaseProperties, MappedCase};

use super::DataError;

/// One case: memory-mapped arrays plus its properties, opened on first use.
#[derive(Debug)]
pub struct CaseEntry {
    /// Memory-mapped data / segmentation.
    pub mapped: MappedCase,
    /// `{case}.json`.
    pub properties: CaseProperties,
}

/// A preprocessed configuration folder; cases are opened lazily (memory-mapped) and cached.
#[derive(Debug)]
pub struct PreprocessedDataset {
    folder: PathBuf,
    ids: Vec<String>,
    cases: BTreeMap<String, OnceLock<Arc<CaseEntry>>>,
}

impl PreprocessedDataset {
    /// Lists the complete cases of `folder` (nothing is mapped yet).
    pub fn open(folder: &Path) -> Result<Self, DataError> {
        let ids = list_cases(folder).map_err(|source| DataError::Folder {
            folder: folder.to_path_buf(),
            source,
        })?;
        let cases = ids.iter().map(|k| (k.clone(), OnceLock::new())).collect();
        Ok(PreprocessedDataset {
            folder: folder.to_path_buf(),
            ids,
            cases,
        })
    }

    /// The folder.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// Sorted case identifiers.
    pub fn case_ids(&self) -> &[String] {
        &self.ids
    }

    /// Whether the case exists.
    pub fn contains(&self, case: &str) -> bool {
        self.cases.contains_key(case)
    }

    /// Opens (once) and returns a case.
    pub fn case(&self, case: &str) -> Result<Arc<CaseEntry>, DataError> {
        let slot = self.cases.get(case).ok_or_else(|| DataError::MissingCase {
            case: case.to_string(),
            context: self.folder.display().to_string(),
        })?;
        if let Some(c) = slot.get() {
            return Ok(c.clone());
        }
        let storage = |source| DataError::Storage {
            case: case.to_string(),
            source,
        };
        let mapped = MappedCase::open(&self.folder, case).map_err(storage)?;
        let properties = load_case_properties(&self.folder, case).map_err(storage)?;
        let entry = Arc::new(CaseEntry { mapped, properties });
        // A concurrent opener may have won; either value is equivalent.
        Ok(slot.get_or_init(|| entry).clone())
    }
}
