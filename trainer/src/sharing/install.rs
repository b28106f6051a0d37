//! `install_pretrained_model_from_zip`: a model zip → `nnUNet_results`.

use std::fs::{self, File};
use std::io;
use std::path::{Component, Path, PathBuf};

use super::{io_err, zip_err, SharingError};

/// What an install wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Installed {
    /// The model folders (`DatasetXXX_Name/{trainer}__{plans}__{configuration}`) installed.
    pub model_folders: Vec<PathBuf>,
    pub files: usize,
}

/// Extracts `zip_path` into `results_root` (nnU-Net's `install_model_from_zip_file`). Every
/// entry is checked before anything is written; the files go to a hidden folder inside
/// `results_root` first and are moved into place when the whole archive was extracted
/// (existing files of the same name are replaced, as nnU-Net's `extractall` does).
pub fn install_model_from_zip(
    zip_path: &Path,
    results_root: &Path,
) -> Result<Installed, SharingError> {
    let file = File::open(zip_path).map_err(io_err(zip_path))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(zip_err(zip_path))?;
    let names = checked_entries(&mut archive, zip_path)?;
    fs::create_dir_all(results_root).map_err(io_err(results_root))?;
    let staging = results_root.join(format!(".nnseg_install.{}.partial", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    }
    let result = extract(&mut archive, &names, &staging, zip_path)
        .and_then(|()| move_into_place(&names, &staging, results_root));
    let _ = fs::remove_dir_all(&staging);
    result?;
    Ok(Installed {
        model_folders: model_folders(&names, results_root),
        files: names.iter().filter(|n| n.is_some()).count(),
    })
}

/// The relative path of every file entry (`None` for directory entries); an error for any
/// entry that could leave `nnUNet_results`.
fn checked_entries<R: io::Read + io::Seek>(
    archive: &mut zip::ZipArchive<R>,
    zip_path: &Path,
) -> Result<Vec<Option<PathBuf>>, SharingError> {
    let mut names = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        let entry = archive.by_index(i).map_err(zip_err(zip_path))?;
        let raw = entry.name().map(|n| n.to_string()).unwrap_or_default();
        let unsafe_entry = |why| SharingError::UnsafeEntry {
            zip: zip_path.to_path_buf(),
            entry: raw.clone(),
            why,
        };
        let Some(rel) = entry.enclosed_name() else {
            return Err(unsafe_entry("absolute path or `..`"));
        };
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(unsafe_entry("`..` or a root in the path"));
        }
        if entry.unix_mode().is_some_and(|m| m & 0o170000 == 0o120000) {
            return Err(unsafe_entry("a symbolic link"));
        }
        let top = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default();
        if datasets::parse_dataset_id(&top).is_err() || !top.starts_with("Dataset") {
            return Err(unsafe_entry("not inside a DatasetXXX_Name folder"));
        }
        names.push((!entry.is_dir()).then_some(rel));
    }
    Ok(names)
}

fn extract<R: io::Read + io::Seek>(
    archive: &mut zip::ZipArchive<R>,
    names: &[Option<PathBuf>],
    staging: &Path,
    zip_path: &Path,
) -> Result<(), SharingError> {
    for (i, rel) in names.iter().enumerate() {
        let Some(rel) = rel else { continue };
        let dst = staging.join(rel);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let mut entry = archive.by_index(i).map_err(zip_err(zip_path))?;
        let mut out = File::create(&dst).map_err(io_err(&dst))?;
        io::copy(&mut entry, &mut out).map_err(|e| SharingError::Zip {
            path: zip_path.to_path_buf(),
            message: format!("entry {}: {e}", rel.display()),
        })?;
        out.sync_all().map_err(io_err(&dst))?;
    }
    Ok(())
}

fn move_into_place(
    names: &[Option<PathBuf>],
    staging: &Path,
    results_root: &Path,
) -> Result<(), SharingError> {
    for rel in names.iter().flatten() {
        let dst = results_root.join(rel);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        fs::rename(staging.join(rel), &dst).map_err(io_err(&dst))?;
    }
    Ok(())
}

/// The distinct `DatasetXXX_Name/{model}` folders of the installed files that hold a
/// `plans.json`.
fn model_folders(names: &[Option<PathBuf>], results_root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = names
        .iter()
        .flatten()
        .filter(|rel| rel.components().count() == 3 && rel.ends_with("plans.json"))
        .filter_map(|rel| rel.parent().map(|p| results_root.join(p)))
        .collect();
    out.sort();
    out.dedup();
    out
}
