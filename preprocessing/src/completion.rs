//! The completion record of a configuration's preprocessed data folder
//! (`{data_identifier}/nnseg_complete.json`, named by `datasets::layout`).
//!
//! [`crate::preprocess_dataset`] writes it last, atomically, after every case of the raw
//! dataset is saved: the plans it was made from (a hash of the resolved configuration, the
//! transpose and the intensity statistics), every case with the size and modification time of
//! its raw files and the sizes of its preprocessed files. [`verify_complete`] checks a folder
//! against it before the folder is used: no record (an interrupted or pre-record run), a
//! missing or resized preprocessed file, a case in the folder but not in the record, a raw
//! file that changed since, or changed plans are all errors naming the cases and the command
//! that fixes them. Raw files that no longer exist are not an error (the raw data may be
//! archived after preprocessing).
//!
//! `gt_segmentations/` (shared by all configurations) has its own record, [`GtRecord`]
//! (`gt_segmentations/.nnseg_complete.json`): marked unfinished before the copy starts and
//! rewritten with every case's file size and time once it is done, so that the evaluation of
//! validation predictions and `find_best_configuration` ([`verify_gt_segmentations`]) never
//! use an interrupted copy, a missing case or a file changed since.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use datasets::layout::PreprocessedDir;
use datasets::RawDataset;
use plans::{Configuration, Plans};
use serde::{Deserialize, Serialize};

use crate::error::PreprocessError;
use crate::storage;

/// Version of the record format.
const FORMAT: u32 = 1;

/// Size and modification time of a file (cheap to compare; no content hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub path: PathBuf,
    pub size: u64,
    /// Nanoseconds since the Unix epoch (0 when the file system has no times).
    pub modified_ns: u128,
}

impl FileStamp {
    /// Stamps `path` (an error naming it when it cannot be read).
    pub fn of(path: &Path) -> Result<Self, PreprocessError> {
        let m = fs::metadata(path).map_err(PreprocessError::io(path))?;
        let modified_ns = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(FileStamp {
            path: path.to_path_buf(),
            size: m.len(),
            modified_ns,
        })
    }
}

/// One case of the record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseRecord {
    /// The raw image and label files it was made from.
    pub raw: Vec<FileStamp>,
    /// Preprocessed file name (in the data folder) → size in bytes.
    pub files: BTreeMap<String, u64>,
}

/// `nnseg_complete.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompletionRecord {
    pub format: u32,
    pub dataset_name: String,
    pub plans_name: String,
    pub configuration: String,
    pub data_identifier: String,
    /// See [`plans_hash`].
    pub plans_hash: String,
    /// Every case of the raw dataset, sorted by identifier.
    pub cases: BTreeMap<String, CaseRecord>,
}

/// FNV-1a (64 bit) of `bytes`, as 16 hex digits.
fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The configuration keys that change the preprocessed data. Configurations sharing a data
/// folder (e.g. `3d_cascade_fullres` inheriting `3d_fullres`) differ only in other keys
/// (patch size, batch size, architecture, stages).
const PREPROCESSING_KEYS: [&str; 9] = [
    "data_identifier",
    "preprocessor_name",
    "spacing",
    "normalization_schemes",
    "use_mask_for_norm",
    "resampling_fn_data",
    "resampling_fn_seg",
    "resampling_fn_data_kwargs",
    "resampling_fn_seg_kwargs",
];

/// Hash of what preprocessing reads from the plans: the configuration's
/// [`PREPROCESSING_KEYS`], the transpose and the intensity statistics (normalization).
pub fn plans_hash(plans: &Plans, cfg: &Configuration) -> String {
    let cfg_json = cfg.to_json();
    let keys: serde_json::Map<String, serde_json::Value> = PREPROCESSING_KEYS
        .iter()
        .map(|k| (k.to_string(), cfg_json.get(*k).cloned().unwrap_or_default()))
        .collect();
    let v = serde_json::json!({
        "configuration": keys,
        "transpose_forward": plans.transpose_forward,
        "intensity": plans.foreground_intensity_properties_per_channel,
    });
    fnv1a(v.to_string().as_bytes())
}

/// The preprocessed files of `case` in `folder` with their sizes.
fn case_files(folder: &Path, case: &str) -> Result<BTreeMap<String, u64>, PreprocessError> {
    let mut files = BTreeMap::new();
    for p in [
        storage::data_path(folder, case),
        storage::seg_path(folder, case),
        storage::properties_path(folder, case),
    ] {
        let size = fs::metadata(&p).map_err(PreprocessError::io(&p))?.len();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        files.insert(name.unwrap_or_default(), size);
    }
    Ok(files)
}

impl CompletionRecord {
    /// The record of `folder` after every case of `ds` was saved into it (an error when a
    /// case's files are missing).
    pub fn build(
        ds: &RawDataset,
        plans: &Plans,
        configuration: &str,
        cfg: &Configuration,
        folder: &Path,
    ) -> Result<Self, PreprocessError> {
        let mut cases = BTreeMap::new();
        for case in &ds.cases {
            let raw = case
                .images
                .iter()
                .chain(case.label.as_ref())
                .map(|p| FileStamp::of(p))
                .collect::<Result<Vec<_>, _>>()?;
            let files =
                case_files(folder, &case.identifier).map_err(|e| e.in_case(&case.identifier))?;
            cases.insert(case.identifier.clone(), CaseRecord { raw, files });
        }
        Ok(CompletionRecord {
            format: FORMAT,
            dataset_name: plans.dataset_name.clone(),
            plans_name: plans.plans_name.clone(),
            configuration: configuration.to_string(),
            data_identifier: cfg.data_identifier.clone(),
            plans_hash: plans_hash(plans, cfg),
            cases,
        })
    }

    /// Writes `folder/nnseg_complete.json` atomically.
    pub fn write(&self, folder: &Path) -> Result<(), PreprocessError> {
        write_record(&PreprocessedDir::completion_record(folder), self)
    }

    /// Reads `folder/nnseg_complete.json` (`None` when there is none).
    pub fn read(folder: &Path) -> Result<Option<Self>, PreprocessError> {
        read_record(&PreprocessedDir::completion_record(folder))
    }

    /// The case identifiers, sorted.
    pub fn case_ids(&self) -> Vec<String> {
        self.cases.keys().cloned().collect()
    }
}

/// What differs between `folder` and its record `rec`, one line per problem.
fn folder_problems(folder: &Path, rec: &CompletionRecord) -> Result<Vec<String>, PreprocessError> {
    let mut problems = Vec::new();
    for (case, c) in &rec.cases {
        for (name, &size) in &c.files {
            let p = folder.join(name);
            match fs::metadata(&p) {
                Err(_) => problems.push(format!("case {case}: {} is missing", p.display())),
                Ok(m) if m.len() != size => problems.push(format!(
                    "case {case}: {} has {} bytes, {size} when it was written",
                    p.display(),
                    m.len()
                )),
                Ok(_) => {}
            }
        }
        for s in &c.raw {
            if let Ok(now) = FileStamp::of(&s.path) {
                if now.size != s.size || now.modified_ns != s.modified_ns {
                    problems.push(format!(
                        "case {case}: raw file {} changed since it was preprocessed",
                        s.path.display()
                    ));
                }
            }
        }
    }
    let listed = storage::list_cases(folder)
        .map_err(|e| PreprocessError::Invalid(format!("{}: {e}", folder.display())))?;
    for case in listed {
        if !rec.cases.contains_key(&case) {
            problems.push(format!(
                "case {case} is in the folder but not in the record"
            ));
        }
    }
    Ok(problems)
}

/// Checks that `data_folder` holds a complete, current preprocessing of `configuration` of
/// `plans` (see the module documentation) and returns its record; the error lists the
/// missing or changed cases and the command that rebuilds the folder.
pub fn verify_complete(
    data_folder: &Path,
    plans: &Plans,
    configuration: &str,
) -> Result<CompletionRecord, PreprocessError> {
    let cfg = plans.configuration(configuration)?;
    let incomplete = |problems: Vec<String>| PreprocessError::Incomplete {
        folder: data_folder.to_path_buf(),
        problems,
        fix: fix_command(&plans.dataset_name, &plans.plans_name, configuration),
    };
    let Some(rec) = CompletionRecord::read(data_folder)? else {
        let why = if data_folder.is_dir() {
            "has no completion record: preprocessing was interrupted, failed, or ran with an \
             nnseg older than the record"
        } else {
            "does not exist: the configuration was not preprocessed"
        };
        return Err(incomplete(vec![format!("the folder {why}")]));
    };
    let mut problems = Vec::new();
    if rec.plans_hash != plans_hash(plans, &cfg) || rec.data_identifier != cfg.data_identifier {
        problems.push(format!(
            "the preprocessing settings of {} configuration {configuration} (spacing, \
             normalization, resampling, transpose or intensity statistics) differ from those \
             the folder was preprocessed with (configuration {})",
            plans.plans_name, rec.configuration
        ));
    }
    problems.extend(folder_problems(data_folder, &rec)?);
    if problems.is_empty() {
        Ok(rec)
    } else {
        Err(incomplete(problems))
    }
}

/// [`verify_complete`] for a folder about to be read (training, validation, the next cascade
/// stage's shapes), after checking the configuration's `data_identifier` is a safe name. A
/// folder without any completion record (written by an nnseg before the record existed, by
/// nnU-Net or by hand) cannot be checked: it is used with a warning.
pub fn require_complete(
    data_folder: &Path,
    plans: &Plans,
    configuration: &str,
) -> Result<(), PreprocessError> {
    let cfg = plans.configuration(configuration)?;
    datasets::layout::check_name(
        &format!("configuration {configuration:?}: data_identifier"),
        &cfg.data_identifier,
    )?;
    if data_folder.is_dir() && CompletionRecord::read(data_folder)?.is_none() {
        tracing::warn!(
            "{} has no completion record (preprocessed by an older nnseg or by hand), so \
             missing cases cannot be detected; re-run `nnseg preprocess` to add one",
            data_folder.display()
        );
        return Ok(());
    }
    verify_complete(data_folder, plans, configuration)?;
    Ok(())
}

/// `preprocess --incremental`: the cases of `ds` that the complete, current `folder` holds
/// unchanged (recorded with the same raw files, same size and time, and with every file
/// present at its recorded size) are linked (or copied) into `partial` and returned; the
/// rest must be preprocessed. Nothing is reused from a folder without a record or preprocessed
/// with other settings. (Files are only ever replaced by rename, never rewritten in place, so
/// the old folder and the new one can share them.)
pub fn reuse_unchanged_cases(
    ds: &RawDataset,
    plans: &Plans,
    configuration: &str,
    folder: &Path,
    partial: &Path,
) -> Result<Vec<String>, PreprocessError> {
    let cfg = plans.configuration(configuration)?;
    let Some(rec) = CompletionRecord::read(folder)? else {
        return Ok(Vec::new());
    };
    if rec.plans_hash != plans_hash(plans, &cfg) || rec.data_identifier != cfg.data_identifier {
        return Ok(Vec::new());
    }
    let mut reused = Vec::new();
    for case in &ds.cases {
        let Some(c) = rec.cases.get(&case.identifier) else {
            continue;
        };
        let raw: Vec<_> = case.images.iter().chain(case.label.as_ref()).collect();
        let unchanged = raw.len() == c.raw.len()
            && raw
                .iter()
                .zip(&c.raw)
                .all(|(p, s)| FileStamp::of(p).is_ok_and(|now| now == *s));
        let intact = c.files.iter().all(|(name, &size)| {
            fs::metadata(folder.join(name)).is_ok_and(|m| m.is_file() && m.len() == size)
        });
        if !(unchanged && intact) {
            continue;
        }
        for name in c.files.keys() {
            let (from, to) = (folder.join(name), partial.join(name));
            if fs::hard_link(&from, &to).is_err() {
                fs::copy(&from, &to).map_err(PreprocessError::io(&to))?;
            }
        }
        reused.push(case.identifier.clone());
    }
    Ok(reused)
}

/// The command that rebuilds a configuration's preprocessed data (and `gt_segmentations/`).
pub fn fix_command(dataset_name: &str, plans_name: &str, configuration: &str) -> String {
    format!("nnseg preprocess -d {dataset_name} --plans_name {plans_name} -c {configuration}")
}

/// One file of `gt_segmentations/` as the copy left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GtFile {
    /// `{case}{file_ending}`.
    pub file: String,
    pub size: u64,
    /// Nanoseconds since the Unix epoch (the raw label's time, which the copy keeps).
    pub modified_ns: u128,
}

/// `gt_segmentations/.nnseg_complete.json` (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GtRecord {
    pub format: u32,
    /// False from the start of a copy until it finished.
    pub complete: bool,
    /// Case identifier → its file.
    pub cases: BTreeMap<String, GtFile>,
}

impl GtRecord {
    /// Marks the ground-truth folder `gt` as being copied (before the first file is touched).
    pub fn begin(gt: &Path) -> Result<(), PreprocessError> {
        GtRecord {
            format: FORMAT,
            complete: false,
            cases: BTreeMap::new(),
        }
        .write(gt)
    }

    /// Records every labelled case of `ds` once its file is in the ground-truth folder `gt`.
    pub fn finish(gt: &Path, ds: &RawDataset) -> Result<(), PreprocessError> {
        let mut cases = BTreeMap::new();
        for case in ds.cases.iter().filter(|c| c.label.is_some()) {
            let file = datasets::layout::case_file_name(&case.identifier, &ds.json.file_ending);
            let s = FileStamp::of(&gt.join(&file)).map_err(|e| e.in_case(&case.identifier))?;
            cases.insert(
                case.identifier.clone(),
                GtFile {
                    file,
                    size: s.size,
                    modified_ns: s.modified_ns,
                },
            );
        }
        GtRecord {
            format: FORMAT,
            complete: true,
            cases,
        }
        .write(gt)
    }

    fn write(&self, gt: &Path) -> Result<(), PreprocessError> {
        write_record(&PreprocessedDir::gt_completion_record_in(gt), self)
    }

    /// Reads the record of the ground-truth folder `gt` (`None` when there is none).
    pub fn read(gt: &Path) -> Result<Option<Self>, PreprocessError> {
        read_record(&PreprocessedDir::gt_completion_record_in(gt))
    }
}

/// Checks `gt_segmentations/` before it is used as the reference of an evaluation: the copy
/// finished, every recorded file is there unchanged, and every case of `cases` has one. The
/// error lists the problems and `fix` (see [`fix_command`]). A folder without any record
/// (written by nnU-Net, by hand or by an nnseg older than the record) cannot be checked: it is
/// used with a warning.
pub fn verify_gt_segmentations(
    pre: &PreprocessedDir,
    cases: &[String],
    fix: &str,
) -> Result<(), PreprocessError> {
    let gt = pre.gt_segmentations();
    let incomplete = |problems: Vec<String>| PreprocessError::Incomplete {
        folder: gt.clone(),
        problems,
        fix: fix.to_string(),
    };
    let Some(rec) = GtRecord::read(&gt)? else {
        if gt.is_dir() {
            tracing::warn!(
                "{} has no completion record (copied by nnU-Net, by hand or by an older \
                 nnseg), so missing or changed cases cannot be detected",
                gt.display()
            );
            return Ok(());
        }
        return Err(incomplete(vec![
            "the folder does not exist: the dataset was not preprocessed".into(),
        ]));
    };
    if !rec.complete {
        return Err(incomplete(vec![
            "copying the ground truth was interrupted or failed".into(),
        ]));
    }
    let mut problems = Vec::new();
    for (case, f) in &rec.cases {
        let p = gt.join(&f.file);
        match FileStamp::of(&p) {
            Err(_) => problems.push(format!("case {case}: {} is missing", p.display())),
            Ok(now) if now.size != f.size || now.modified_ns != f.modified_ns => {
                problems.push(format!(
                    "case {case}: {} changed since preprocessing copied it",
                    p.display()
                ))
            }
            Ok(_) => {}
        }
    }
    for case in cases.iter().filter(|c| !rec.cases.contains_key(*c)) {
        problems.push(format!(
            "case {case}: no ground truth (the case was not in the dataset when it was \
             preprocessed)"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(incomplete(problems))
    }
}

/// Writes a completion record (pretty JSON) atomically.
fn write_record<T: serde::Serialize>(path: &Path, record: &T) -> Result<(), PreprocessError> {
    let bytes = serde_json::to_vec_pretty(record)
        .map_err(|e| PreprocessError::Invalid(format!("{}: {e}", path.display())))?;
    storage::write_bytes_atomic(path, &bytes)
        .map_err(|e| PreprocessError::Invalid(format!("cannot write {}: {e}", path.display())))
}

/// Reads a completion record (`None` when there is none); an unreadable one is an error
/// asking to preprocess again.
fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, PreprocessError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PreprocessError::io(path)(e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        PreprocessError::Invalid(format!(
            "{}: not a completion record ({e}); preprocess again",
            path.display()
        ))
    })
}
