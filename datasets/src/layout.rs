//! nnU-Net's folder and file names: the only code that builds or parses them.
//!
//! ```text
//! nnUNet_raw/DatasetXXX_Name/                        RawDir
//!     dataset.json  imagesTr/{case}_{CCCC}{ending}  labelsTr/{case}{ending}  [splits_final.json]
//! nnUNet_preprocessed/DatasetXXX_Name/               PreprocessedDir
//!     {plans}.json  dataset.json  dataset_fingerprint.json  splits_final.json
//!     gt_segmentations/  {data_identifier}/
//! nnUNet_results/DatasetXXX_Name/                    ResultsDir
//!     {trainer}__{plans}__{configuration}/           ModelDir (named by ModelId)
//!         plans.json  dataset.json  dataset_fingerprint.json
//!         fold_{f}/  fold_{f}/validation/
//!         predicted_next_stage/{configuration}/
//!         crossval_results_folds_{f1}_{f2}.../
//!     ensembles/ensemble___{model}___{model}___{folds}/
//!     inference_instructions.txt  inference_information.json
//! predictions (PredictionDir): {case}{ending}  [{case}.npz {case}.json]  dataset.json  plans.json
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::DatasetError;

/// `dataset.json` (raw, preprocessed and model folders, prediction outputs).
pub const DATASET_JSON: &str = "dataset.json";
/// `dataset_fingerprint.json` (preprocessed and model folders).
pub const FINGERPRINT_JSON: &str = "dataset_fingerprint.json";
/// `splits_final.json` (preprocessed folder; optionally the raw folder).
pub const SPLITS_JSON: &str = "splits_final.json";
/// `plans.json`: the plans as copied into a model folder or a prediction output.
pub const PLANS_JSON: &str = "plans.json";
/// The ground-truth copy of the training labels in the preprocessed folder.
pub const GT_SEGMENTATIONS: &str = "gt_segmentations";
/// The training images of a raw dataset.
pub const IMAGES_TR: &str = "imagesTr";
/// The training labels of a raw dataset.
pub const LABELS_TR: &str = "labelsTr";

/// The completion record of a configuration's preprocessed data folder, written last (see
/// `preprocessing::completion`): `{data_identifier}/nnseg_complete.json`.
pub const COMPLETION_RECORD: &str = "nnseg_complete.json";

/// The completion record of `gt_segmentations/` (see `preprocessing::completion`): hidden, so
/// that listings of the ground truth by file ending (nnseg's and nnU-Net's) never see it.
pub const GT_COMPLETION_RECORD: &str = ".nnseg_complete.json";

/// Separator of the three parts of a model folder name.
const MODEL_SEP: &str = "__";
/// Separator of the parts of an ensemble name.
const ENSEMBLE_SEP: &str = "___";

/// Why `name` cannot be used as one path component of nnseg's outputs (`None`: it can).
///
/// A name that becomes a file or folder name (case identifier, dataset, configuration,
/// trainer, plans and data identifier) must be non-empty, must not be `.`/`..` or start with
/// `.` (hidden files are skipped when a folder is listed), and must not contain a path
/// separator (`/`, `\\`), a drive colon (`:`) or a control character, so that it can never
/// name a path outside the folder it is joined to.
pub fn unsafe_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name == "." || name == ".." {
        Some("must not be `.` or `..`")
    } else if name.contains(['/', '\\']) {
        Some("must not contain a path separator (`/` or `\\`)")
    } else if name.contains(':') {
        Some("must not contain `:`")
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else if name.starts_with('.') {
        Some("must not start with `.` (hidden files are not listed)")
    } else {
        None
    }
}

/// Checks a name that becomes a path component (see [`unsafe_name_problem`]); the error
/// names `what` (e.g. `dataset.json "dataset" key`, `configuration`).
pub fn check_name(what: &str, name: &str) -> Result<(), DatasetError> {
    match unsafe_name_problem(name) {
        None => Ok(()),
        Some(problem) => Err(DatasetError::UnsafeName {
            what: what.to_string(),
            value: name.to_string(),
            problem,
        }),
    }
}

/// The file of one image channel of a case: `{case}_{CCCC}{ending}`.
pub fn channel_file_name(case: &str, channel: usize, file_ending: &str) -> String {
    format!("{case}_{channel:04}{file_ending}")
}

/// Splits a channel file name `{case}_{CCCC}{ending}` into the case and the channel index
/// (`None` for any other name: no `_CCCC` with four digits, or an empty case).
pub fn parse_channel_file_name(file_name: &str, file_ending: &str) -> Option<(String, usize)> {
    let stem = file_name.strip_suffix(file_ending)?;
    let (case, digits) = stem.rsplit_once('_')?;
    if case.is_empty() || digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((case.to_string(), digits.parse().ok()?))
}

/// The file of a case's segmentation (labels, predictions): `{case}{ending}`.
pub fn case_file_name(case: &str, file_ending: &str) -> String {
    format!("{case}{file_ending}")
}

/// `{plans_name}.json` in a preprocessed folder.
pub fn plans_file_name(plans_name: &str) -> String {
    format!("{plans_name}.json")
}

/// A raw dataset folder `nnUNet_raw/DatasetXXX_Name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDir(PathBuf);

impl RawDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RawDir(path.into())
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn dataset_json(&self) -> PathBuf {
        self.0.join(DATASET_JSON)
    }
    pub fn images_tr(&self) -> PathBuf {
        self.0.join(IMAGES_TR)
    }
    pub fn labels_tr(&self) -> PathBuf {
        self.0.join(LABELS_TR)
    }
    /// `imagesTr/{case}_{CCCC}{ending}`.
    pub fn image_file(&self, case: &str, channel: usize, file_ending: &str) -> PathBuf {
        self.images_tr()
            .join(channel_file_name(case, channel, file_ending))
    }
    /// `labelsTr/{case}{ending}`.
    pub fn label_file(&self, case: &str, file_ending: &str) -> PathBuf {
        self.labels_tr().join(case_file_name(case, file_ending))
    }
    /// A user-provided `splits_final.json` that preprocessing copies (as nnU-Net does).
    pub fn splits(&self) -> PathBuf {
        self.0.join(SPLITS_JSON)
    }
}

/// A preprocessed dataset folder `nnUNet_preprocessed/DatasetXXX_Name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreprocessedDir(PathBuf);

impl PreprocessedDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        PreprocessedDir(path.into())
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// `{plans_name}.json` (e.g. `nnUNetPlans.json`).
    pub fn plans_file(&self, plans_name: &str) -> PathBuf {
        self.0.join(plans_file_name(plans_name))
    }
    pub fn dataset_json(&self) -> PathBuf {
        self.0.join(DATASET_JSON)
    }
    pub fn fingerprint(&self) -> PathBuf {
        self.0.join(FINGERPRINT_JSON)
    }
    pub fn splits(&self) -> PathBuf {
        self.0.join(SPLITS_JSON)
    }
    pub fn gt_segmentations(&self) -> PathBuf {
        self.0.join(GT_SEGMENTATIONS)
    }
    /// The preprocessed cases of a configuration: `{data_identifier}/` (e.g.
    /// `nnUNetPlans_3d_fullres`). Check the identifier with [`check_name`] first.
    pub fn data_folder(&self, data_identifier: &str) -> PathBuf {
        self.0.join(data_identifier)
    }
    /// A data folder being rebuilt: `.{data_identifier}.partial/` (renamed to
    /// `{data_identifier}/` once complete).
    pub fn partial_data_folder(&self, data_identifier: &str) -> PathBuf {
        self.0.join(format!(".{data_identifier}.partial"))
    }
    /// Where the previous data folder is parked while a rebuilt one is swapped in:
    /// `.{data_identifier}.old/`.
    pub fn old_data_folder(&self, data_identifier: &str) -> PathBuf {
        self.0.join(format!(".{data_identifier}.old"))
    }
    /// `{data_folder}/nnseg_complete.json` (see [`COMPLETION_RECORD`]).
    pub fn completion_record(data_folder: &Path) -> PathBuf {
        data_folder.join(COMPLETION_RECORD)
    }
    /// `gt_segmentations/.nnseg_complete.json` (see [`GT_COMPLETION_RECORD`]).
    pub fn gt_completion_record(&self) -> PathBuf {
        Self::gt_completion_record_in(&self.gt_segmentations())
    }
    /// The completion record of the ground-truth folder `gt` (`gt_segmentations/` or its
    /// partial copy).
    pub fn gt_completion_record_in(gt: &Path) -> PathBuf {
        gt.join(GT_COMPLETION_RECORD)
    }
    /// A first copy of the ground truth being made: `.gt_segmentations.partial/` (renamed to
    /// `gt_segmentations/` once complete).
    pub fn partial_gt_segmentations(&self) -> PathBuf {
        self.0.join(format!(".{GT_SEGMENTATIONS}.partial"))
    }
}

/// The results folder of one dataset, `nnUNet_results/DatasetXXX_Name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultsDir(PathBuf);

impl ResultsDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ResultsDir(path.into())
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// The folder of a trained model.
    pub fn model(&self, id: &ModelId) -> ModelDir {
        ModelDir::new(&self.0, id)
    }
    /// `ensembles/{name}` (see [`ensemble_name`]).
    pub fn ensemble(&self, name: &str) -> PathBuf {
        self.0.join("ensembles").join(name)
    }
    pub fn inference_instructions(&self) -> PathBuf {
        self.0.join("inference_instructions.txt")
    }
    pub fn inference_information(&self) -> PathBuf {
        self.0.join("inference_information.json")
    }
    /// nnseg's `cross_validate` folder: `logs/{job}.log` per job, the Slurm scripts in
    /// `slurm/`.
    pub fn cross_validate(&self) -> PathBuf {
        self.0.join("cross_validate")
    }
    /// The log of one `cross_validate` job, `cross_validate/logs/{job}.log`.
    pub fn cross_validate_log(&self, job: &str) -> PathBuf {
        self.cross_validate()
            .join("logs")
            .join(format!("{job}.log"))
    }
}

/// nnU-Net's name of the ensemble of two models over `folds`:
/// `ensemble___{a}___{b}___{f1_f2...}`.
pub fn ensemble_name(a: &str, b: &str, folds: &[String]) -> String {
    let s = ENSEMBLE_SEP;
    format!("ensemble{s}{a}{s}{b}{s}{}", folds.join("_"))
}

/// The models and folds of an ensemble folder name made by [`ensemble_name`]
/// (`ensemble___{model}___{model}___{folds}`); `None` for any other name.
pub fn parse_ensemble_name(name: &str) -> Option<(Vec<ModelId>, String)> {
    let s = ENSEMBLE_SEP;
    let rest = name.strip_prefix("ensemble")?.strip_prefix(s)?;
    let mut parts: Vec<&str> = rest.split(s).collect();
    let folds = parts.pop()?.to_string();
    if parts.len() < 2 {
        return None;
    }
    let ids = parts
        .into_iter()
        .map(ModelId::parse)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some((ids, folds))
}

/// The identity of a trained model, `{trainer}__{plans}__{configuration}` as a folder name.
///
/// Trainer and plans names must be non-empty and free of `__`; the configuration must be
/// non-empty and may contain `__` (a fitted configuration such as `3d_fullres__kiunet_minimal`),
/// so that formatting and parsing round-trip.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelId {
    trainer: String,
    plans: String,
    configuration: String,
}

impl ModelId {
    /// Checks the three names (see the type's documentation); the error names the field.
    pub fn new(
        trainer: impl Into<String>,
        plans: impl Into<String>,
        configuration: impl Into<String>,
    ) -> Result<Self, DatasetError> {
        let id = ModelId {
            trainer: trainer.into(),
            plans: plans.into(),
            configuration: configuration.into(),
        };
        for (field, value, allow_sep) in [
            ("trainer", &id.trainer, false),
            ("plans", &id.plans, false),
            ("configuration", &id.configuration, true),
        ] {
            let problem = if let Some(p) = unsafe_name_problem(value) {
                Some(p)
            } else if !allow_sep && value.contains(MODEL_SEP) {
                Some("must not contain `__` (it separates the parts of a model folder name)")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(DatasetError::ModelIdPart {
                    field,
                    value: value.clone(),
                    problem,
                });
            }
        }
        Ok(id)
    }

    /// Parses a folder name `{trainer}__{plans}__{configuration}`.
    pub fn parse(name: &str) -> Result<Self, DatasetError> {
        let bad = || DatasetError::ModelFolderName {
            path: PathBuf::from(name),
        };
        let mut parts = name.splitn(3, MODEL_SEP);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(t), Some(p), Some(c)) => Self::new(t, p, c).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }

    /// The id of the model folder `folder` (its last component); the error names the path.
    pub fn from_folder(folder: &Path) -> Result<Self, DatasetError> {
        let name = folder.file_name().and_then(|n| n.to_str()).unwrap_or("");
        Self::parse(name).map_err(|_| DatasetError::ModelFolderName {
            path: folder.to_path_buf(),
        })
    }

    pub fn trainer(&self) -> &str {
        &self.trainer
    }
    pub fn plans(&self) -> &str {
        &self.plans
    }
    pub fn configuration(&self) -> &str {
        &self.configuration
    }

    /// The same trainer and plans with another configuration (a cascade's other stage).
    pub fn with_configuration(&self, configuration: &str) -> Result<Self, DatasetError> {
        Self::new(self.trainer.clone(), self.plans.clone(), configuration)
    }
}

/// The model folder name `{trainer}__{plans}__{configuration}` (unchecked: [`ModelId::new`]
/// checks the parts).
pub fn model_folder_name(trainer: &str, plans: &str, configuration: &str) -> String {
    let s = MODEL_SEP;
    format!("{trainer}{s}{plans}{s}{configuration}")
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&model_folder_name(
            &self.trainer,
            &self.plans,
            &self.configuration,
        ))
    }
}

impl FromStr for ModelId {
    type Err = DatasetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A trained model's folder, normally
/// `nnUNet_results/DatasetXXX_Name/{trainer}__{plans}__{configuration}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelDir(PathBuf);

impl ModelDir {
    /// `results_dataset_folder/{id}`.
    pub fn new(results_dataset_folder: &Path, id: &ModelId) -> Self {
        ModelDir(results_dataset_folder.join(id.to_string()))
    }

    /// A model folder given by path (e.g. on the command line). Its name is only parsed when
    /// [`ModelDir::id`] is asked for, so an imported folder may be named otherwise.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        ModelDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The id in the folder's name; a name that is not `{trainer}__{plans}__{configuration}`
    /// is an error naming the path.
    pub fn id(&self) -> Result<ModelId, DatasetError> {
        ModelId::from_folder(&self.0)
    }

    /// The dataset's results folder holding this model.
    pub fn results_dir(&self) -> ResultsDir {
        ResultsDir::new(self.0.parent().unwrap_or_else(|| Path::new("")))
    }

    /// `plans.json` (copied from the preprocessed folder at training start).
    pub fn plans_json(&self) -> PathBuf {
        self.0.join(PLANS_JSON)
    }
    pub fn dataset_json(&self) -> PathBuf {
        self.0.join(DATASET_JSON)
    }
    pub fn fingerprint(&self) -> PathBuf {
        self.0.join(FINGERPRINT_JSON)
    }

    /// `fold_{fold}`; `fold` is `0`, `all`, ... (a leading `fold_` is accepted too).
    pub fn fold(&self, fold: impl fmt::Display) -> PathBuf {
        let f = fold.to_string();
        let f = f.strip_prefix("fold_").unwrap_or(&f);
        self.0.join(format!("fold_{f}"))
    }
    /// `fold_{fold}/validation`.
    pub fn validation(&self, fold: impl fmt::Display) -> PathBuf {
        validation_folder(&self.fold(fold))
    }

    /// The inputs this model (a cascade's first stage) writes for the next stage during its
    /// final validation: `predicted_next_stage/{next_configuration}`.
    pub fn next_stage(&self, next_configuration: &str) -> PathBuf {
        self.0.join("predicted_next_stage").join(next_configuration)
    }

    /// The folder of the same trainer and plans with another configuration, next to this one.
    pub fn sibling(&self, configuration: &str) -> Result<ModelDir, DatasetError> {
        let id = self.id()?.with_configuration(configuration)?;
        Ok(self.results_dir().model(&id))
    }

    /// For a cascade stage whose previous stage is `previous_stage`: the folder that stage
    /// wrote for `configuration` (this model's),
    /// `{trainer}__{plans}__{previous_stage}/predicted_next_stage/{configuration}`.
    pub fn prev_stage_outputs(
        &self,
        previous_stage: &str,
        configuration: &str,
    ) -> Result<PathBuf, DatasetError> {
        Ok(self.sibling(previous_stage)?.next_stage(configuration))
    }

    /// nnU-Net's merged fold validations, `crossval_results_folds_{f1_f2...}`.
    pub fn crossval_results(&self, folds: &[String]) -> PathBuf {
        self.0
            .join(format!("crossval_results_folds_{}", folds.join("_")))
    }
}

/// nnseg's training checkpoints end in this (`checkpoint_final.safetensors`).
pub const NNSEG_CHECKPOINT_ENDING: &str = ".safetensors";
/// nnU-Net v2's checkpoints end in this (`checkpoint_final.pth`, `checkpoint_best.pth`).
pub const NNUNET_CHECKPOINT_ENDING: &str = ".pth";
/// The weights `nnseg import_nnunet_model` writes into a fold folder (`-chk model`).
pub const IMPORTED_MODEL_WEIGHTS: &str = "model.safetensors";
/// The metadata written next to [`IMPORTED_MODEL_WEIGHTS`].
pub const IMPORTED_MODEL_METADATA: &str = "model.json";

/// A weights file in a fold folder, by the program that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointFile {
    /// nnseg's `{name}.safetensors` (weights + metadata in one file).
    Nnseg(PathBuf),
    /// nnU-Net v2's `{name}.pth`, read as it is.
    Nnunet(PathBuf),
    /// `nnseg import_nnunet_model`'s `model.safetensors` + `model.json`.
    Imported { weights: PathBuf, metadata: PathBuf },
}

impl CheckpointFile {
    /// The file holding the weights.
    pub fn path(&self) -> &Path {
        match self {
            CheckpointFile::Nnseg(p) | CheckpointFile::Nnunet(p) => p,
            CheckpointFile::Imported { weights, .. } => weights,
        }
    }
}

/// The files `-chk {checkpoint_name}` may mean in `fold_folder`, most specific first.
///
/// `checkpoint_final` (no ending) is nnseg's `checkpoint_final.safetensors`, else nnU-Net's
/// `checkpoint_final.pth`; `checkpoint_final.pth` (nnU-Net's spelling) prefers the `.pth`
/// and falls back to nnseg's file; `checkpoint_final.safetensors` prefers nnseg's file;
/// `model` (or `model.safetensors`) is an imported model. A name that is not one file name
/// (a path separator, `..`) is an error.
pub fn checkpoint_candidates(
    fold_folder: &Path,
    checkpoint_name: &str,
) -> Result<Vec<CheckpointFile>, DatasetError> {
    check_name("checkpoint name", checkpoint_name)?;
    let (stem, pth_first) = match (
        checkpoint_name.strip_suffix(NNSEG_CHECKPOINT_ENDING),
        checkpoint_name.strip_suffix(NNUNET_CHECKPOINT_ENDING),
    ) {
        (Some(stem), _) => (stem, false),
        (None, Some(stem)) => (stem, true),
        (None, None) => (checkpoint_name, false),
    };
    let imported_stem = IMPORTED_MODEL_WEIGHTS
        .strip_suffix(NNSEG_CHECKPOINT_ENDING)
        .unwrap_or(IMPORTED_MODEL_WEIGHTS);
    if stem == imported_stem && !pth_first {
        return Ok(vec![CheckpointFile::Imported {
            weights: fold_folder.join(IMPORTED_MODEL_WEIGHTS),
            metadata: fold_folder.join(IMPORTED_MODEL_METADATA),
        }]);
    }
    let nnseg = CheckpointFile::Nnseg(fold_folder.join(format!("{stem}{NNSEG_CHECKPOINT_ENDING}")));
    let nnunet =
        CheckpointFile::Nnunet(fold_folder.join(format!("{stem}{NNUNET_CHECKPOINT_ENDING}")));
    Ok(if pth_first {
        vec![nnunet, nnseg]
    } else {
        vec![nnseg, nnunet]
    })
}

/// A folder of predictions (`nnseg predict -o`, a fold's `validation/`, an ensemble): one
/// `{case}{ending}` per case (with `{case}.npz` + `{case}.json` probabilities when saved), plus
/// the `dataset.json` and `plans.json` they were made with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PredictionDir(PathBuf);

impl PredictionDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        PredictionDir(path.into())
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn dataset_json(&self) -> PathBuf {
        self.0.join(DATASET_JSON)
    }
    pub fn plans_json(&self) -> PathBuf {
        self.0.join(PLANS_JSON)
    }
    /// `predict_from_raw_data_args.json`: the arguments of `nnseg predict`.
    pub fn predict_args(&self) -> PathBuf {
        self.0.join("predict_from_raw_data_args.json")
    }
    /// `{case}{ending}`.
    pub fn segmentation(&self, case: &str, file_ending: &str) -> PathBuf {
        self.0.join(case_file_name(case, file_ending))
    }
    /// `{case}.npz`: the softmax probabilities (`--save_probabilities`, `--npz`).
    pub fn probabilities(&self, case: &str) -> PathBuf {
        self.0.join(format!("{case}.npz"))
    }
    /// `{case}.json`: the case properties saved next to the probabilities.
    pub fn properties(&self, case: &str) -> PathBuf {
        self.0.join(format!("{case}.json"))
    }
    /// Present while a predict or ensemble run writes into the folder (and after one that
    /// failed or was interrupted): the folder is not a finished result.
    pub fn incomplete_marker(&self) -> PathBuf {
        self.0.join(INCOMPLETE_MARKER)
    }
    /// The incomplete-marker of part `part_id` of `num_parts` runs sharing this folder
    /// (`predict -num_parts N -part_id K`): `nnseg_prediction_incomplete.part{K}of{N}.txt`,
    /// so one part finishing does not make the others' unfinished cases look done.
    pub fn incomplete_marker_of_part(&self, part_id: usize, num_parts: usize) -> PathBuf {
        if num_parts <= 1 {
            return self.incomplete_marker();
        }
        let stem = INCOMPLETE_MARKER.trim_end_matches(".txt");
        self.0
            .join(format!("{stem}.part{part_id}of{num_parts}.txt"))
    }
    /// Every incomplete-marker present (of a whole run or of parts).
    pub fn incomplete_markers(&self) -> Vec<PathBuf> {
        let stem = INCOMPLETE_MARKER.trim_end_matches(".txt");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(stem) && n.ends_with(".txt"))
            })
            .collect();
        found.sort();
        found
    }
}

/// File name of [`PredictionDir::incomplete_marker`].
pub const INCOMPLETE_MARKER: &str = "nnseg_prediction_incomplete.txt";

/// The writer's pid in the name of a temp file of nnseg's atomic writers (all hidden):
/// `.nnseg-tmp-{pid}-{n}{ending}` (datasets::io), `.{name}.tmp-{pid}-{n}`
/// (preprocessing::storage) and `.{name}.tmp.{pid}.{n}` (plans::io, trainer's checkpoints);
/// `None` for other names.
pub fn temp_file_pid(file_name: &str) -> Option<u32> {
    if !file_name.starts_with('.') {
        return None;
    }
    // the last `tmp` that is followed by `-{pid}-` or `.{pid}.` (the ending may itself be
    // `.tmp`, as in `.nnseg-tmp-{pid}-{n}.tmp`)
    file_name.rmatch_indices("tmp").find_map(|(at, _)| {
        let rest = file_name[at + 3..].strip_prefix(['-', '.'])?;
        let digits: &str = &rest[..rest.find(|c: char| !c.is_ascii_digit())?];
        let after = &rest[digits.len()..];
        if !(after.starts_with('-') || after.starts_with('.')) {
            return None;
        }
        digits.parse().ok()
    })
}

/// `fold_folder/validation`.
/// The advisory lock file `train` holds in a fold folder while it writes there (nnseg's own).
pub fn fold_lock_file(fold_folder: &Path) -> PathBuf {
    fold_folder.join(".nnseg_train.lock")
}

pub fn validation_folder(fold_folder: &Path) -> PathBuf {
    fold_folder.join("validation")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_id_round_trips() {
        let id = ModelId::new("nnUNetTrainer", "nnUNetPlans", "3d_fullres").unwrap();
        assert_eq!(id.to_string(), "nnUNetTrainer__nnUNetPlans__3d_fullres");
        assert_eq!(ModelId::parse(&id.to_string()).unwrap(), id);
        // a fitted configuration keeps its `__`
        let fitted = ModelId::new("kiunet_minimal", "nnUNetPlans", "2d__kiunet_minimal").unwrap();
        let parsed: ModelId = fitted.to_string().parse().unwrap();
        assert_eq!(parsed, fitted);
        assert_eq!(parsed.configuration(), "2d__kiunet_minimal");
        assert_eq!(parsed.trainer(), "kiunet_minimal");
        assert_eq!(parsed.plans(), "nnUNetPlans");
        let low = id.with_configuration("3d_lowres").unwrap();
        assert_eq!(low.to_string(), "nnUNetTrainer__nnUNetPlans__3d_lowres");
    }

    #[test]
    fn bad_model_names_are_errors_naming_the_path() {
        for bad in ["fold_0", "a__b", "__b__c", "a____c", "a__b__", ""] {
            let e = ModelId::parse(bad).unwrap_err();
            assert!(
                matches!(e, DatasetError::ModelFolderName { .. }),
                "{bad}: {e}"
            );
        }
        let e = ModelId::from_folder(Path::new("/r/Dataset001_X/fold_0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/r/Dataset001_X/fold_0"), "{e}");
        assert!(e.contains("{trainer}__{plans}__{configuration}"), "{e}");
        let e = ModelId::new("my__trainer", "p", "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("trainer") && e.contains("my__trainer"), "{e}");
        let e = ModelId::new("t", "", "c").unwrap_err().to_string();
        assert!(e.contains("plans") && e.contains("empty"), "{e}");
    }

    #[test]
    fn names_that_become_paths_are_checked() {
        for ok in [
            "case_001",
            "a.b",
            "BraTS-GLI-0001-000",
            "é",
            "3d_fullres__x",
        ] {
            assert!(check_name("case", ok).is_ok(), "{ok}");
        }
        for bad in [
            "", ".", "..", "../x", "a/b", "a\\b", "/abs", "C:x", ".hidden", "a\tb",
        ] {
            let e = check_name("configuration", bad).unwrap_err().to_string();
            assert!(
                e.contains("configuration") && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
        let e = ModelId::new("../t", "p", "c").unwrap_err().to_string();
        assert!(e.contains("trainer") && e.contains("separator"), "{e}");
        assert!(ModelId::new("t", "p", "../../c").is_err());
        assert!(ModelId::parse("t__p__..").is_err());
    }

    #[test]
    fn model_dir_paths() {
        let id = ModelId::new("T", "P", "3d_cascade_fullres").unwrap();
        let m = ResultsDir::new("/res/D").model(&id);
        assert_eq!(m.path(), Path::new("/res/D/T__P__3d_cascade_fullres"));
        assert_eq!(ModelDir::at(m.path()).id().unwrap(), id);
        assert_eq!(m.fold(0), m.path().join("fold_0"));
        assert_eq!(m.fold("fold_all"), m.path().join("fold_all"));
        assert_eq!(m.validation("all"), m.path().join("fold_all/validation"));
        assert_eq!(m.plans_json(), m.path().join("plans.json"));
        assert_eq!(m.dataset_json(), m.path().join("dataset.json"));
        assert_eq!(m.fingerprint(), m.path().join("dataset_fingerprint.json"));
        assert_eq!(
            m.prev_stage_outputs("3d_lowres", "3d_cascade_fullres")
                .unwrap(),
            Path::new("/res/D/T__P__3d_lowres/predicted_next_stage/3d_cascade_fullres")
        );
        assert_eq!(
            m.crossval_results(&["0".into(), "1".into()]),
            m.path().join("crossval_results_folds_0_1")
        );
        assert_eq!(
            ensemble_name("A__p__c", "B__p__c", &["0".into(), "1".into()]),
            "ensemble___A__p__c___B__p__c___0_1"
        );
        assert_eq!(
            m.results_dir().ensemble("e"),
            Path::new("/res/D/ensembles/e")
        );
        let e = ModelDir::at("/res/D/imported").sibling("2d").unwrap_err();
        assert!(e.to_string().contains("/res/D/imported"), "{e}");
    }

    #[test]
    fn temp_file_names_give_the_writer_pid() {
        assert_eq!(temp_file_pid(".nnseg-tmp-123-4.nii.gz"), Some(123));
        assert_eq!(temp_file_pid(".a.npz.tmp-77-0"), Some(77));
        assert_eq!(temp_file_pid(".a.json.tmp.9.1"), Some(9));
        // found by the crash-consistency test: a temp file whose ending is `.tmp`
        assert_eq!(temp_file_pid(".nnseg-tmp-15085-2.tmp"), Some(15085));
        assert_eq!(
            temp_file_pid(".checkpoint_final.safetensors.tmp.31.0"),
            Some(31)
        );
        for other in ["a.nii.gz", ".hidden", "tmp-1-2", ".x.tmp-a-1", ".x.tmp-12"] {
            assert_eq!(temp_file_pid(other), None, "{other}");
        }
        assert_eq!(
            PredictionDir::new("/o").incomplete_marker(),
            Path::new("/o/nnseg_prediction_incomplete.txt")
        );
    }

    #[test]
    fn channel_file_names_round_trip() {
        assert_eq!(
            channel_file_name("case_001", 7, ".nii.gz"),
            "case_001_0007.nii.gz"
        );
        assert_eq!(
            parse_channel_file_name("case_001_0007.nii.gz", ".nii.gz"),
            Some(("case_001".to_string(), 7))
        );
        assert_eq!(
            parse_channel_file_name("a_0012.png", ".png"),
            Some(("a".to_string(), 12))
        );
        for bad in [
            "case.nii.gz",
            "case_00x1.nii.gz",
            "_0000.nii.gz",
            "case_00001.nii.gz",
            "case_0000.png",
            "é_é123.nii.gz",
        ] {
            assert_eq!(parse_channel_file_name(bad, ".nii.gz"), None, "{bad}");
        }
        assert_eq!(
            parse_channel_file_name("é_0001.nii.gz", ".nii.gz"),
            Some(("é".to_string(), 1))
        );
    }

    #[test]
    fn dataset_dirs() {
        let p = PreprocessedDir::new("/pre/D");
        assert_eq!(
            p.plans_file("nnUNetPlans"),
            Path::new("/pre/D/nnUNetPlans.json")
        );
        assert_eq!(p.dataset_json(), Path::new("/pre/D/dataset.json"));
        assert_eq!(
            p.fingerprint(),
            Path::new("/pre/D/dataset_fingerprint.json")
        );
        assert_eq!(p.splits(), Path::new("/pre/D/splits_final.json"));
        assert_eq!(p.gt_segmentations(), Path::new("/pre/D/gt_segmentations"));
        assert_eq!(
            p.gt_completion_record(),
            Path::new("/pre/D/gt_segmentations/.nnseg_complete.json")
        );
        assert_eq!(
            p.data_folder("nnUNetPlans_2d"),
            Path::new("/pre/D/nnUNetPlans_2d")
        );
        let r = RawDir::new("/raw/D");
        assert_eq!(
            r.image_file("c1", 1, ".nii.gz"),
            Path::new("/raw/D/imagesTr/c1_0001.nii.gz")
        );
        assert_eq!(
            r.label_file("c1", ".png"),
            Path::new("/raw/D/labelsTr/c1.png")
        );
        assert_eq!(r.dataset_json(), Path::new("/raw/D/dataset.json"));
        let o = PredictionDir::new("/out");
        assert_eq!(
            o.segmentation("c.1", ".nii.gz"),
            Path::new("/out/c.1.nii.gz")
        );
        assert_eq!(o.probabilities("c.1"), Path::new("/out/c.1.npz"));
        assert_eq!(o.properties("c.1"), Path::new("/out/c.1.json"));
        assert_eq!(o.plans_json(), Path::new("/out/plans.json"));
    }

    #[test]
    fn ensemble_names_round_trip() {
        let a = "nnUNetTrainer__nnUNetPlans__2d";
        let b = "nnUNetTrainer__nnUNetPlans__3d_fullres";
        let folds = vec!["0".to_string(), "1".to_string()];
        let (ids, f) = parse_ensemble_name(&ensemble_name(a, b, &folds)).unwrap();
        assert_eq!(ids[0].to_string(), a);
        assert_eq!(ids[1].configuration(), "3d_fullres");
        assert_eq!(f, "0_1");
        for bad in [
            "ensemble",
            "ensemble___x",
            "other___a___b___0",
            "ensemble___bad___bad___0",
        ] {
            assert!(parse_ensemble_name(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn checkpoint_candidates_follow_the_chk_spelling() {
        let f = Path::new("/m/fold_0");
        let nnseg = CheckpointFile::Nnseg(f.join("checkpoint_final.safetensors"));
        let pth = CheckpointFile::Nnunet(f.join("checkpoint_final.pth"));
        let c = |n: &str| checkpoint_candidates(f, n).unwrap();
        assert_eq!(c("checkpoint_final"), vec![nnseg.clone(), pth.clone()]);
        assert_eq!(
            c("checkpoint_final.safetensors"),
            vec![nnseg.clone(), pth.clone()]
        );
        assert_eq!(c("checkpoint_final.pth"), vec![pth, nnseg]);
        let imported = CheckpointFile::Imported {
            weights: f.join("model.safetensors"),
            metadata: f.join("model.json"),
        };
        assert_eq!(c("model"), vec![imported.clone()]);
        assert_eq!(c("model.safetensors"), vec![imported.clone()]);
        assert_eq!(imported.path(), f.join("model.safetensors"));
        assert_eq!(
            c("checkpoint_best.pth")[0].path(),
            f.join("checkpoint_best.pth")
        );
        assert!(checkpoint_candidates(f, "../x.pth").is_err());
        assert!(checkpoint_candidates(f, "").is_err());
    }
}
