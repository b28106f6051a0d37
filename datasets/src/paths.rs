//! Dataset ids (`Dataset%03d_Name` folders) and the three nnU-Net roots.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::DatasetError;
use crate::layout::{PreprocessedDir, ResultsDir};

/// The three nnU-Net roots, filled by the binary from flags (`--raw`, `--preprocessed`,
/// `--results`) or the environment variables `nnUNet_raw`, `nnUNet_preprocessed`,
/// `nnUNet_results` (only the binary reads the environment; [`RAW_VAR`] etc. name them in
/// errors).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NnUnetPaths {
    pub raw: Option<PathBuf>,
    pub preprocessed: Option<PathBuf>,
    pub results: Option<PathBuf>,
}

pub const RAW_VAR: &str = "nnUNet_raw";
pub const PREPROCESSED_VAR: &str = "nnUNet_preprocessed";
pub const RESULTS_VAR: &str = "nnUNet_results";
pub const RAW_FLAG: &str = "--raw";
pub const PREPROCESSED_FLAG: &str = "--preprocessed";
pub const RESULTS_FLAG: &str = "--results";

impl NnUnetPaths {
    pub fn raw_root(&self) -> Result<&Path, DatasetError> {
        self.raw.as_deref().ok_or(DatasetError::RootNotSet {
            var: RAW_VAR,
            flag: RAW_FLAG,
        })
    }

    pub fn preprocessed_root(&self) -> Result<&Path, DatasetError> {
        self.preprocessed
            .as_deref()
            .ok_or(DatasetError::RootNotSet {
                var: PREPROCESSED_VAR,
                flag: PREPROCESSED_FLAG,
            })
    }

    pub fn results_root(&self) -> Result<&Path, DatasetError> {
        self.results.as_deref().ok_or(DatasetError::RootNotSet {
            var: RESULTS_VAR,
            flag: RESULTS_FLAG,
        })
    }

    /// The existing raw dataset folder `nnUNet_raw/DatasetXXX_Name` for `id`.
    pub fn raw_dataset_folder(&self, id: u32) -> Result<PathBuf, DatasetError> {
        let root = self.raw_root()?;
        find_dataset_folder(root, id)?.ok_or_else(|| DatasetError::UnknownDatasetId {
            id,
            searched: vec![describe_root(RAW_VAR, RAW_FLAG, Some(root))],
        })
    }

    /// `nnUNet_preprocessed/<name>` (it need not exist yet).
    pub fn preprocessed_dir(&self, name: &str) -> Result<PreprocessedDir, DatasetError> {
        Ok(PreprocessedDir::new(self.preprocessed_root()?.join(name)))
    }

    /// `nnUNet_results/<name>` (it need not exist yet).
    pub fn results_dir(&self, name: &str) -> Result<ResultsDir, DatasetError> {
        Ok(ResultsDir::new(self.results_root()?.join(name)))
    }
}

fn describe_root(var: &str, flag: &str, root: Option<&Path>) -> String {
    match root {
        Some(r) if r.is_dir() => format!("{var} ({flag}): {}", r.display()),
        Some(r) => format!("{var} ({flag}): {} (does not exist)", r.display()),
        None => format!("{var} ({flag}): not set"),
    }
}

/// Parses `"4"`, `"004"`, `"Dataset004"` or `"Dataset004_Hippocampus"` into the id 4.
pub fn parse_dataset_id(s: &str) -> Result<u32, DatasetError> {
    let t = s.trim();
    let digits = match t.strip_prefix("Dataset") {
        Some(rest) => rest.split('_').next().unwrap_or(""),
        None => t,
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DatasetError::InvalidDatasetId {
            input: s.to_string(),
        });
    }
    digits
        .parse::<u32>()
        .map_err(|_| DatasetError::InvalidDatasetId {
            input: s.to_string(),
        })
}

/// The folder `root/DatasetXXX_*` for `id` (`XXX` = id with at least 3 digits). `Ok(None)` if
/// there is none (or `root` does not exist); an error naming all matches if there is more than
/// one.
pub fn find_dataset_folder(root: &Path, id: u32) -> Result<Option<PathBuf>, DatasetError> {
    if !root.is_dir() {
        return Ok(None);
    }
    let prefix = format!("Dataset{id:03}_");
    let entries = fs::read_dir(root).map_err(|e| DatasetError::io(root, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DatasetError::io(root, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(&prefix) && name.len() > prefix.len() && entry.path().is_dir() {
            found.push(entry.path());
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(DatasetError::DuplicateDatasetId { id, folders: found }),
    }
}

/// The dataset name (`DatasetXXX_Name`) for `id`, searched in the raw, preprocessed and results
/// roots (those that are set). Errors if no root has it (naming the folders searched and how to
/// set them) or if the roots disagree on the name.
pub fn dataset_name_from_id(paths: &NnUnetPaths, id: u32) -> Result<String, DatasetError> {
    let roots = [
        (RAW_VAR, RAW_FLAG, paths.raw.as_deref()),
        (
            PREPROCESSED_VAR,
            PREPROCESSED_FLAG,
            paths.preprocessed.as_deref(),
        ),
        (RESULTS_VAR, RESULTS_FLAG, paths.results.as_deref()),
    ];
    let mut found: Vec<PathBuf> = Vec::new();
    for (_, _, root) in &roots {
        if let Some(root) = root {
            if let Some(f) = find_dataset_folder(root, id)? {
                found.push(f);
            }
        }
    }
    let mut names: Vec<String> = found
        .iter()
        .filter_map(|f| f.file_name().and_then(|n| n.to_str()).map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    match names.len() {
        0 => Err(DatasetError::UnknownDatasetId {
            id,
            searched: roots
                .iter()
                .map(|(var, flag, root)| describe_root(var, flag, *root))
                .collect(),
        }),
        1 => Ok(names.remove(0)),
        _ => Err(DatasetError::DuplicateDatasetId { id, folders: found }),
    }
}

/// Converts a user argument (id or dataset name) to the dataset name, like nnU-Net's
/// `maybe_convert_to_dataset_name`: a full `DatasetXXX_Name` is returned as is.
pub fn dataset_name_from_arg(paths: &NnUnetPaths, arg: &str) -> Result<String, DatasetError> {
    let t = arg.trim();
    if t.starts_with("Dataset") && t.contains('_') {
        parse_dataset_id(t)?;
        crate::layout::check_name("dataset name", t)?;
        return Ok(t.to_string());
    }
    dataset_name_from_id(paths, parse_dataset_id(t)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_names() {
        assert_eq!(parse_dataset_id("1").unwrap(), 1);
        assert_eq!(parse_dataset_id("004").unwrap(), 4);
        assert_eq!(parse_dataset_id(" 990 ").unwrap(), 990);
        assert_eq!(parse_dataset_id("Dataset004_Hippocampus").unwrap(), 4);
        assert_eq!(parse_dataset_id("Dataset1234_Big").unwrap(), 1234);
        assert_eq!(parse_dataset_id("Dataset027").unwrap(), 27);
        for bad in [
            "",
            "abc",
            "Dataset_x",
            "Task004_Hippo",
            "-3",
            "4.5",
            "99999999999",
        ] {
            let e = parse_dataset_id(bad).unwrap_err();
            assert!(
                matches!(e, DatasetError::InvalidDatasetId { .. }),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains("Dataset004_Hippocampus"), "{e}");
        }
        let paths = NnUnetPaths::default();
        let e = dataset_name_from_arg(&paths, "Dataset004_X/../../Dataset005_Y").unwrap_err();
        assert!(matches!(e, DatasetError::UnsafeName { .. }), "{e}");
        assert_eq!(
            dataset_name_from_arg(&paths, "Dataset004_Hippo").unwrap(),
            "Dataset004_Hippo"
        );
    }

    #[test]
    fn finds_folders_and_rejects_duplicates() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir(root.join("Dataset004_Hippo")).unwrap();
        fs::create_dir(root.join("Dataset0040_Other")).unwrap();
        fs::write(root.join("Dataset005_file_not_dir"), b"x").unwrap();
        assert_eq!(
            find_dataset_folder(root, 4).unwrap().unwrap(),
            root.join("Dataset004_Hippo")
        );
        // "Dataset0040_Other" is id 40 written with 4 digits: neither id 4 nor id 40 (Dataset040_)
        assert!(find_dataset_folder(root, 40).unwrap().is_none());
        fs::create_dir(root.join("Dataset1234_Big")).unwrap();
        assert_eq!(
            find_dataset_folder(root, 1234).unwrap().unwrap(),
            root.join("Dataset1234_Big")
        );
        assert!(find_dataset_folder(root, 5).unwrap().is_none());
        assert!(find_dataset_folder(&root.join("missing"), 4)
            .unwrap()
            .is_none());

        fs::create_dir(root.join("Dataset004_Duplicate")).unwrap();
        let e = find_dataset_folder(root, 4).unwrap_err().to_string();
        assert!(
            e.contains("Dataset004_Hippo") && e.contains("Dataset004_Duplicate"),
            "{e}"
        );
        assert!(e.contains("ambiguous"), "{e}");
    }

    #[test]
    fn name_from_id_searches_all_roots() {
        let t = tempfile::tempdir().unwrap();
        let raw = t.path().join("raw");
        let pre = t.path().join("pre");
        fs::create_dir_all(raw.join("Dataset001_A")).unwrap();
        fs::create_dir_all(pre.join("Dataset002_B")).unwrap();
        let paths = NnUnetPaths {
            raw: Some(raw.clone()),
            preprocessed: Some(pre.clone()),
            results: None,
        };
        assert_eq!(dataset_name_from_id(&paths, 1).unwrap(), "Dataset001_A");
        assert_eq!(dataset_name_from_id(&paths, 2).unwrap(), "Dataset002_B");
        assert_eq!(
            dataset_name_from_arg(&paths, "Dataset777_X").unwrap(),
            "Dataset777_X"
        );
        assert_eq!(dataset_name_from_arg(&paths, "2").unwrap(), "Dataset002_B");

        let e = dataset_name_from_id(&paths, 3).unwrap_err().to_string();
        assert!(e.contains("no dataset with id 3"), "{e}");
        assert!(e.contains("Dataset003_"), "{e}");
        assert!(e.contains(&raw.display().to_string()), "{e}");
        assert!(e.contains(&pre.display().to_string()), "{e}");
        assert!(e.contains("nnUNet_results (--results): not set"), "{e}");
        assert!(e.contains("nnUNet_raw (--raw)"), "{e}");

        // same id, different names in two roots
        fs::create_dir_all(pre.join("Dataset001_Renamed")).unwrap();
        let e = dataset_name_from_id(&paths, 1).unwrap_err().to_string();
        assert!(
            e.contains("Dataset001_A") && e.contains("Dataset001_Renamed"),
            "{e}"
        );
    }

    #[test]
    fn root_helpers_explain_how_to_set_roots() {
        let paths = NnUnetPaths::default();
        let e = paths.raw_dataset_folder(4).unwrap_err().to_string();
        assert_eq!(
            e,
            "nnUNet_raw is not set; set the environment variable or pass --raw"
        );
        let e = paths
            .preprocessed_dir("Dataset004_X")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nnUNet_preprocessed") && e.contains("--preprocessed"),
            "{e}"
        );
        let e = paths.results_dir("Dataset004_X").unwrap_err().to_string();
        assert!(
            e.contains("nnUNet_results") && e.contains("--results"),
            "{e}"
        );

        let t = tempfile::tempdir().unwrap();
        let paths = NnUnetPaths {
            raw: Some(t.path().to_path_buf()),
            preprocessed: Some(t.path().join("p")),
            results: Some(t.path().join("r")),
        };
        let e = paths.raw_dataset_folder(9).unwrap_err().to_string();
        assert!(
            e.contains("Dataset009_") && e.contains(&t.path().display().to_string()),
            "{e}"
        );
        assert_eq!(
            paths.preprocessed_dir("Dataset009_X").unwrap().path(),
            t.path().join("p/Dataset009_X")
        );
        assert_eq!(
            paths.results_dir("Dataset009_X").unwrap().path(),
            t.path().join("r/Dataset009_X")
        );
    }
}
