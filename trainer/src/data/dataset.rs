//! The preprocessed dataset folder (`nnUNet_preprocessed/DatasetXXX/{data_identifier}`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use preprocessing::storage::{
    list_cases, load_case_properties, CaseProperties, MappedCase, MappedSeg,
};

use super::cascade::{prev_stage_file, PrevStage};

use super::DataError;

/// Refuses a configuration's data folder that is not a complete, current preprocessing of
/// `configuration` of `plans` (see `preprocessing::completion::require_complete`): missing or
/// changed cases, changed plans or raw files, or no folder at all are an error naming the
/// cases and the command that rebuilds it.
pub fn require_complete(
    data_folder: &Path,
    plans: &plans::Plans,
    configuration: &str,
) -> Result<(), DataError> {
    preprocessing::completion::require_complete(data_folder, plans, configuration)?;
    Ok(())
}

/// Refuses an incomplete or changed `pre/gt_segmentations/` (an interrupted copy, a missing or
/// changed file, one of `cases` without ground truth; see
/// `preprocessing::verify_gt_segmentations`), the reference of the final validation. nnseg's
/// `preprocess` copies the ground truth after the data folders, so a missing folder next to a
/// data folder with a completion record is a preprocess that did not finish; next to a folder
/// without one (nnU-Net's, or made by hand) there is nothing to check and nothing is evaluated.
pub fn require_ground_truth(
    pre: &Path,
    plans: &plans::Plans,
    configuration: &str,
    cases: &[String],
) -> Result<(), DataError> {
    let pre = datasets::PreprocessedDir::new(pre);
    let cfg = plans
        .configuration(configuration)
        .map_err(|e| DataError::Preprocessed(e.into()))?;
    let recorded =
        preprocessing::CompletionRecord::read(&pre.data_folder(&cfg.data_identifier))?.is_some();
    if !pre.gt_segmentations().is_dir() && !recorded {
        return Ok(());
    }
    let fix = preprocessing::completion::fix_command(
        &plans.dataset_name,
        &plans.plans_name,
        configuration,
    );
    preprocessing::verify_gt_segmentations(&pre, cases, &fix)?;
    Ok(())
}

/// One case: memory-mapped arrays plus its properties, opened on first use.
#[derive(Debug)]
pub struct CaseEntry {
    /// Memory-mapped data / segmentation.
    pub mapped: MappedCase,
    /// `{case}.json`.
    pub properties: CaseProperties,
    /// The previous cascade stage's segmentation (same shape as the data) and the labels to
    /// one-hot encode, for `3d_cascade_fullres`.
    pub prev: Option<(MappedSeg, Vec<i64>)>,
}

/// A preprocessed configuration folder; cases are opened lazily (memory-mapped) and cached.
#[derive(Debug)]
pub struct PreprocessedDataset {
    folder: PathBuf,
    ids: Vec<String>,
    cases: BTreeMap<String, OnceLock<Arc<CaseEntry>>>,
    prev_stage: Option<PrevStage>,
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
            prev_stage: None,
        })
    }

    /// A cascade stage's dataset: every case also reads the previous stage's segmentation
    /// from `prev.folder` (an error naming the file when it is missing).
    pub fn open_with_prev_stage(folder: &Path, prev: PrevStage) -> Result<Self, DataError> {
        let mut ds = Self::open(folder)?;
        ds.prev_stage = Some(prev);
        Ok(ds)
    }

    /// Refuses a cascade stage whose previous stage's segmentations lack some of `cases`
    /// (the previous stage's final validation of some folds did not run or was interrupted),
    /// before training starts rather than when the case is first drawn.
    pub fn require_prev_stage(&self, cases: &[String]) -> Result<(), DataError> {
        let Some(p) = &self.prev_stage else {
            return Ok(());
        };
        let missing = super::cascade::missing_prev_stage_cases(&p.folder, cases);
        if missing.is_empty() {
            return Ok(());
        }
        Err(DataError::PrevStageIncomplete {
            folder: p.folder.clone(),
            missing,
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
        let prev = match &self.prev_stage {
            None => None,
            Some(p) => {
                let path = prev_stage_file(&p.folder, case);
                if !path.is_file() {
                    return Err(DataError::BadCase {
                        case: case.to_string(),
                        message: format!(
                            "the previous stage's segmentation {} does not exist; train every \
                             fold of the previous stage (its final validation writes \
                             predicted_next_stage/) before the cascade",
                            path.display()
                        ),
                    });
                }
                let seg = MappedSeg::open(&path).map_err(storage)?;
                let (a, b) = (
                    seg.view().map_err(storage)?.shape().to_vec(),
                    mapped.shape().map_err(storage)?,
                );
                if a[0] != 1 || a[1..] != b[..] {
                    return Err(DataError::BadCase {
                        case: case.to_string(),
                        message: format!(
                            "{} has shape {a:?}, the preprocessed data has spatial shape {b:?}",
                            path.display()
                        ),
                    });
                }
                Some((seg, p.foreground_labels.clone()))
            }
        };
        let entry = Arc::new(CaseEntry {
            mapped,
            properties,
            prev,
        });
        // A concurrent opener may have won; either value is equivalent.
        Ok(slot.get_or_init(|| entry).clone())
    }
}
