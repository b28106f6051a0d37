//! Model sharing, as nnU-Net's `export_model_to_zip`, `install_pretrained_model_from_zip` and
//! `download_pretrained_model_by_url`.
//!
//! A model zip holds paths relative to `nnUNet_results`:
//! `DatasetXXX_Name/{trainer}__{plans}__{configuration}/` with `plans.json`, `dataset.json`,
//! `dataset_fingerprint.json` and, per exported fold, the chosen checkpoints, `debug.json`,
//! `progress.png` and `validation/summary.json`; the cross-validation results
//! (`crossval_results_folds_*`: summary, postprocessing), the ensembles made only of exported
//! models, and `inference_information.json` / `inference_instructions.txt` when present. That
//! is nnU-Net's layout, so a zip installs on either side; what runs there depends on the
//! checkpoint format (see the README: nnseg reads nnU-Net's `.pth` checkpoints, nnU-Net cannot
//! read nnseg's `.safetensors`).
//!
//! Installing extracts into a hidden folder inside `nnUNet_results` first and moves the files
//! into place only when the whole archive was read, so a broken download or archive leaves
//! nothing that looks like a model. Entries that would land outside `nnUNet_results` (absolute
//! paths, `..`, links, anything not under a `DatasetXXX_*` folder) are refused.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use datasets::layout::{parse_ensemble_name, ModelDir, ModelId, ResultsDir};
use sha2::{Digest, Sha256};

mod download;
mod install;

pub use download::{download_and_install, DownloadRequest};
pub use install::{install_model_from_zip, Installed};

/// Errors of export, install and download; each names the file, entry or URL.
#[derive(Debug, thiserror::Error)]
pub enum SharingError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {message}", path.display())]
    Zip { path: PathBuf, message: String },
    #[error("{}: missing for export ({what}); use --not_strict to skip configurations that were not trained", path.display())]
    MissingForExport { path: PathBuf, what: String },
    #[error("{zip}: entry `{entry}` would be written outside nnUNet_results ({why}); refusing to install this archive", zip = zip.display())]
    UnsafeEntry {
        zip: PathBuf,
        entry: String,
        why: &'static str,
    },
    #[error("{url}: {message}")]
    Download { url: String, message: String },
    #[error("{url}: SHA-256 is {found}, expected {expected}; the download was deleted")]
    Checksum {
        url: String,
        expected: String,
        found: String,
    },
    #[error(transparent)]
    Layout(#[from] datasets::DatasetError),
    #[error(transparent)]
    Import(#[from] Box<crate::import::ImportError>),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SharingError + '_ {
    move |source| SharingError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn zip_err(path: &Path) -> impl FnOnce(zip::result::ZipError) -> SharingError + '_ {
    move |e| SharingError::Zip {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// What `export_model_to_zip` exports (nnU-Net's flags: `-c`, `-tr`, `-p`, `-f`, `-chk`,
/// `--not_strict`, `--exp_cv_preds`).
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// `nnUNet_results/DatasetXXX_Name`.
    pub results: ResultsDir,
    pub configurations: Vec<String>,
    pub trainer: String,
    pub plans: String,
    /// `0`..`4` or `all`.
    pub folds: Vec<String>,
    /// Checkpoint names (`checkpoint_final`, `checkpoint_final.pth`, ...): each is exported in
    /// whichever format the fold has it (`.safetensors` from nnseg, `.pth` from nnU-Net).
    pub checkpoints: Vec<String>,
    /// Fail when a configuration was not trained (default); else skip it.
    pub strict: bool,
    /// Also export the validation predictions (without probabilities).
    pub export_crossval_predictions: bool,
    pub output: PathBuf,
}

/// What was exported.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    pub configurations: Vec<String>,
    pub files: usize,
    pub bytes: u64,
}

/// nnU-Net's `export_pretrained_model`. The zip is written to a temp name and renamed.
pub fn export_model_to_zip(req: &ExportRequest) -> Result<ExportSummary, SharingError> {
    let root = req.results.path().parent().unwrap_or(Path::new("."));
    let mut files = vec![];
    let mut exported = vec![];
    for configuration in &req.configurations {
        let id = ModelId::new(&req.trainer, &req.plans, configuration)?;
        let model = ModelDir::new(req.results.path(), &id);
        if !model.path().is_dir() {
            if req.strict {
                return Err(SharingError::MissingForExport {
                    path: model.path().to_path_buf(),
                    what: format!("configuration {configuration} was not trained"),
                });
            }
            continue;
        }
        files.extend(model_files(&model, req)?);
        exported.push(configuration.clone());
    }
    files.extend(ensemble_files(req, &exported)?);
    for extra in [
        req.results.inference_information(),
        req.results.inference_instructions(),
    ] {
        if extra.is_file() {
            files.push(extra);
        }
    }
    let bytes = write_zip(&req.output, root, &files)?;
    Ok(ExportSummary {
        configurations: exported,
        files: files.len(),
        bytes,
    })
}

/// The files of one model folder: the JSON files and, per fold, checkpoints and results.
fn model_files(model: &ModelDir, req: &ExportRequest) -> Result<Vec<PathBuf>, SharingError> {
    let mut files = vec![];
    for required in [model.plans_json(), model.dataset_json()] {
        if !required.is_file() {
            return Err(SharingError::MissingForExport {
                path: required,
                what: "the model folder's JSON files".into(),
            });
        }
        files.push(required);
    }
    let fingerprint = model.fingerprint();
    if fingerprint.is_file() {
        files.push(fingerprint);
    }
    for fold in &req.folds {
        let fold_dir = model.fold(fold);
        if !fold_dir.is_dir() {
            return Err(SharingError::MissingForExport {
                path: fold_dir,
                what: format!("fold {fold} was requested"),
            });
        }
        for chk in &req.checkpoints {
            files.extend(checkpoint_files(&fold_dir, chk)?);
        }
        for name in ["debug.json", "progress.png", "network_architecture.pdf"] {
            let f = fold_dir.join(name);
            if f.is_file() {
                files.push(f);
            }
        }
        files.extend(validation_files(
            &model.validation(fold),
            req.export_crossval_predictions,
        )?);
    }
    let crossval = model.crossval_results(&req.folds);
    files.extend(result_files(&crossval, req.export_crossval_predictions)?);
    Ok(files)
}

/// The checkpoint `name` of a fold in every format it exists in (nnseg's `.safetensors`,
/// nnU-Net's `.pth`); an error naming both when it exists in neither.
fn checkpoint_files(fold_dir: &Path, name: &str) -> Result<Vec<PathBuf>, SharingError> {
    let stem = name
        .strip_suffix(".pth")
        .or_else(|| name.strip_suffix(".safetensors"))
        .unwrap_or(name);
    let found: Vec<PathBuf> = [".safetensors", ".pth"]
        .iter()
        .map(|ext| fold_dir.join(format!("{stem}{ext}")))
        .filter(|p| p.is_file())
        .collect();
    if found.is_empty() {
        return Err(SharingError::MissingForExport {
            path: fold_dir.join(format!("{stem}.safetensors")),
            what: format!("checkpoint {stem} (.safetensors or .pth) was requested with -chk"),
        });
    }
    Ok(found)
}

/// A fold's `validation/`: its `summary.json`, or with `all` every file but probabilities.
fn validation_files(folder: &Path, all: bool) -> Result<Vec<PathBuf>, SharingError> {
    if !all {
        let summary = folder.join("summary.json");
        return Ok(if summary.is_file() {
            vec![summary]
        } else {
            vec![]
        });
    }
    Ok(files_in(folder)?
        .into_iter()
        .filter(|f| !matches!(extension(f), "npz" | "pkl"))
        .collect())
}

/// A results folder (cross-validation or ensemble): summary and postprocessing, or with `all`
/// every file.
fn result_files(folder: &Path, all: bool) -> Result<Vec<PathBuf>, SharingError> {
    if all {
        return files_in(folder);
    }
    Ok(
        ["summary.json", "postprocessing.pkl", "postprocessing.json"]
            .iter()
            .map(|n| folder.join(n))
            .filter(|p| p.is_file())
            .collect(),
    )
}

/// The ensembles whose members are all among the exported models.
fn ensemble_files(req: &ExportRequest, exported: &[String]) -> Result<Vec<PathBuf>, SharingError> {
    let ensembles = req.results.path().join("ensembles");
    let mut files = vec![];
    if !ensembles.is_dir() {
        return Ok(files);
    }
    for entry in fs::read_dir(&ensembles).map_err(io_err(&ensembles))? {
        let entry = entry.map_err(io_err(&ensembles))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((ids, _)) = parse_ensemble_name(&name) else {
            continue;
        };
        let ours = ids.iter().all(|id| {
            id.trainer() == req.trainer
                && id.plans() == req.plans
                && exported.iter().any(|c| c == id.configuration())
        });
        if ours {
            files.extend(result_files(
                &entry.path(),
                req.export_crossval_predictions,
            )?);
        }
    }
    Ok(files)
}

fn files_in(folder: &Path) -> Result<Vec<PathBuf>, SharingError> {
    if !folder.is_dir() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for entry in fs::read_dir(folder).map_err(io_err(folder))? {
        let entry = entry.map_err(io_err(folder))?;
        if entry.path().is_file() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn extension(p: &Path) -> &str {
    p.extension().and_then(|e| e.to_str()).unwrap_or("")
}

/// Writes `files` (paths under `root`) into a deflated zip at `output`, via a temp name.
/// Returns the zip's size.
fn write_zip(output: &Path, root: &Path, files: &[PathBuf]) -> Result<u64, SharingError> {
    let tmp = output.with_file_name(format!(
        ".{}.partial",
        output
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model.zip")
    ));
    let result = (|| {
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut zip = zip::ZipWriter::new(io::BufWriter::new(file));
        for f in files {
            let name = zip_entry_name(f, root);
            let size = fs::metadata(f).map_err(io_err(f))?.len();
            let options = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .large_file(size >= u32::MAX as u64);
            zip.start_file(name, options).map_err(zip_err(&tmp))?;
            let mut src = File::open(f).map_err(io_err(f))?;
            io::copy(&mut src, &mut zip).map_err(io_err(&tmp))?;
        }
        let mut w = zip.finish().map_err(zip_err(&tmp))?;
        w.flush().map_err(io_err(&tmp))?;
        w.get_ref().sync_all().map_err(io_err(&tmp))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, output).map_err(io_err(output))?;
    Ok(fs::metadata(output).map_err(io_err(output))?.len())
}

/// The entry name of `f`: its path relative to `root` with `/` separators.
fn zip_entry_name(f: &Path, root: &Path) -> String {
    let rel = f.strip_prefix(root).unwrap_or(f);
    rel.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// One fold of an nnU-Net model imported from a zip.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedFold {
    pub model_folder: PathBuf,
    pub fold: String,
    /// The nnseg weights and metadata written beside the `.pth` checkpoint.
    pub weights: PathBuf,
    pub metadata: PathBuf,
}

/// `import_nnunet_model` of a zip made by nnU-Net's `export_model_to_zip`: installs it into
/// `results_root` ([`install_model_from_zip`]) and imports every fold of every model in it
/// that has `checkpoint_name` (e.g. `checkpoint_final.pth`), writing nnseg's weights beside.
pub fn import_nnunet_zip(
    zip: &Path,
    results_root: &Path,
    checkpoint_name: &str,
) -> Result<Vec<ImportedFold>, SharingError> {
    let installed = install_model_from_zip(zip, results_root)?;
    let mut out = vec![];
    for model_folder in installed.model_folders {
        for entry in fs::read_dir(&model_folder).map_err(io_err(&model_folder))? {
            let entry = entry.map_err(io_err(&model_folder))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(fold) = name.strip_prefix("fold_") else {
                continue;
            };
            if !entry.path().join(checkpoint_name).is_file() {
                continue;
            }
            let model = crate::import::import_nnunet_model(&model_folder, fold, checkpoint_name)
                .map_err(Box::new)?;
            let (weights, metadata) = model.save(&entry.path()).map_err(Box::new)?;
            out.push(ImportedFold {
                model_folder: model_folder.clone(),
                fold: fold.to_string(),
                weights,
                metadata,
            });
        }
    }
    out.sort_by(|a, b| (&a.model_folder, &a.fold).cmp(&(&b.model_folder, &b.fold)));
    Ok(out)
}

/// Hex SHA-256 of a file.
fn sha256_file(path: &Path) -> Result<String, SharingError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests;
