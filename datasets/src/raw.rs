//! A raw nnU-Net dataset folder: dataset.json plus the case files of imagesTr/labelsTr (or the
//! explicit `dataset` map of dataset.json).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use plans::DatasetJson;

use crate::error::DatasetError;
use crate::io::Format;
use crate::layout::{parse_channel_file_name, unsafe_name_problem, RawDir};

/// One training case: its channel files (in channel order) and its label file, if present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawCase {
    pub identifier: String,
    pub images: Vec<PathBuf>,
    pub label: Option<PathBuf>,
}

/// An opened raw dataset. Cases are sorted by identifier.
#[derive(Clone, Debug)]
pub struct RawDataset {
    pub folder: PathBuf,
    /// Folder name, e.g. `Dataset990_Demo3D`.
    pub name: String,
    pub json: DatasetJson,
    pub cases: Vec<RawCase>,
}

/// 2D natural-image formats may store RGB(A) channels in one `_0000` file (nnU-Net's
/// `NaturalImage2DIO` reads them as 3 or 4 channels).
fn single_file_rgb_allowed(format: Format, num_channels: usize, files: usize) -> bool {
    format.is_2d() && files == 1 && (num_channels == 3 || num_channels == 4)
}

impl RawDataset {
    /// Opens `folder`: reads `dataset.json`, then finds the cases. With the `dataset` key the
    /// listed files are used (paths relative to the folder, `$VARS` expanded); otherwise imagesTr
    /// is scanned for `{case}_{CCCC}{file_ending}` and labels are looked up as
    /// `labelsTr/{case}{file_ending}`. Every case must have all channel files; all problems are
    /// reported together.
    pub fn open(folder: &Path) -> Result<Self, DatasetError> {
        if !folder.is_dir() {
            return Err(DatasetError::Layout {
                folder: folder.to_path_buf(),
                message: "the dataset folder does not exist".to_string(),
            });
        }
        let json_path = RawDir::new(folder).dataset_json();
        if !json_path.is_file() {
            return Err(DatasetError::Layout {
                folder: folder.to_path_buf(),
                message: "dataset.json is missing".to_string(),
            });
        }
        let json = DatasetJson::load(&json_path)?;
        let format = Format::from_ending(&json.file_ending).ok_or_else(|| DatasetError::Layout {
            folder: folder.to_path_buf(),
            message: format!(
                "dataset.json: file_ending {:?} is not supported (supported: .nii.gz, .nii, .png, .tif, .tiff)",
                json.file_ending
            ),
        })?;
        let name = folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (cases, problems) = match &json.dataset {
            Some(map) => explicit_cases(folder, &json, format, map),
            None => scan_cases(folder, &json, format)?,
        };
        if !problems.is_empty() {
            let n = problems.len();
            return Err(DatasetError::Layout {
                folder: folder.to_path_buf(),
                message: format!(
                    "{n} problem(s) with the case files:{}",
                    problems
                        .iter()
                        .map(|p| format!("\n  - {p}"))
                        .collect::<String>()
                ),
            });
        }
        if cases.is_empty() {
            return Err(DatasetError::Layout {
                folder: folder.to_path_buf(),
                message: format!(
                    "no training cases found: imagesTr should hold files named {{case}}_0000{}",
                    json.file_ending
                ),
            });
        }
        Ok(RawDataset {
            folder: folder.to_path_buf(),
            name,
            json,
            cases,
        })
    }

    /// Opens the raw dataset with id `id` below `paths.raw` (`nnUNet_raw/DatasetXXX_Name`).
    pub fn open_id(paths: &crate::NnUnetPaths, id: u32) -> Result<Self, DatasetError> {
        Self::open(&paths.raw_dataset_folder(id)?)
    }

    /// Image format of the dataset's `file_ending`.
    pub fn format(&self) -> Format {
        Format::from_ending(&self.json.file_ending).unwrap_or(Format::NiftiGz)
    }

    pub fn case(&self, identifier: &str) -> Option<&RawCase> {
        self.cases
            .binary_search_by(|c| c.identifier.as_str().cmp(identifier))
            .ok()
            .map(|i| &self.cases[i])
    }

    /// Identifiers of all cases, sorted.
    pub fn identifiers(&self) -> Vec<String> {
        self.cases.iter().map(|c| c.identifier.clone()).collect()
    }

    /// Cases without a label file.
    pub fn cases_without_label(&self) -> Vec<&RawCase> {
        self.cases.iter().filter(|c| c.label.is_none()).collect()
    }

    /// Error listing every case without a label file (preprocessing needs them all).
    pub fn require_labels(&self) -> Result<(), DatasetError> {
        let missing = self.cases_without_label();
        if missing.is_empty() {
            return Ok(());
        }
        Err(DatasetError::Layout {
            folder: self.folder.clone(),
            message: format!(
                "{} case(s) have no label file: {}",
                missing.len(),
                missing
                    .iter()
                    .map(|c| self
                        .expected_label_path(&c.identifier)
                        .display()
                        .to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    /// Where the label of `identifier` is expected in the imagesTr/labelsTr layout.
    pub fn expected_label_path(&self, identifier: &str) -> PathBuf {
        RawDir::new(&self.folder).label_file(identifier, &self.json.file_ending)
    }
}

fn scan_cases(
    folder: &Path,
    json: &DatasetJson,
    format: Format,
) -> Result<(Vec<RawCase>, Vec<String>), DatasetError> {
    let dir = RawDir::new(folder);
    let images_dir = dir.images_tr();
    if !images_dir.is_dir() {
        return Err(DatasetError::Layout {
            folder: folder.to_path_buf(),
            message:
                "imagesTr is missing (and dataset.json has no \"dataset\" key listing the files)"
                    .to_string(),
        });
    }
    let ending = json.file_ending.as_str();
    let mut problems = Vec::new();
    let mut by_case: BTreeMap<String, BTreeMap<usize, PathBuf>> = BTreeMap::new();
    let entries = fs::read_dir(&images_dir).map_err(|e| DatasetError::io(&images_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DatasetError::io(&images_dir, e))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            problems.push(format!(
                "{}: file name is not valid UTF-8",
                entry.path().display()
            ));
            continue;
        };
        if file_name.starts_with('.') || !file_name.ends_with(ending) || !entry.path().is_file() {
            continue;
        }
        match parse_channel_file_name(file_name, ending) {
            Some((case, channel)) => {
                by_case.entry(case).or_default().insert(channel, entry.path());
            }
            None => problems.push(format!(
                "{}: does not follow the naming {{case}}_{{CCCC}}{ending} (CCCC = 4-digit channel index)",
                entry.path().display()
            )),
        }
    }
    let n = json.num_channels();
    let mut cases = Vec::with_capacity(by_case.len());
    for (case, channels) in by_case {
        if let Some(problem) = unsafe_name_problem(&case) {
            problems.push(format!(
                "case identifier {case:?} (from {}) cannot be used: it {problem}",
                images_dir.display()
            ));
            continue;
        }
        let rgb_single =
            single_file_rgb_allowed(format, n, channels.len()) && channels.contains_key(&0);
        if !rgb_single {
            for c in 0..n {
                if !channels.contains_key(&c) {
                    problems.push(format!(
                        "case {case}: channel {c} is missing, expected file {}",
                        dir.image_file(&case, c, ending).display()
                    ));
                }
            }
        }
        for (&c, p) in &channels {
            if c >= n {
                problems.push(format!(
                    "case {case}: {} is channel {c}, but dataset.json declares {n} channel(s) in channel_names",
                    p.display()
                ));
            }
        }
        let label = dir.label_file(&case, ending);
        cases.push(RawCase {
            identifier: case,
            images: channels.into_values().collect(),
            label: label.is_file().then_some(label),
        });
    }
    Ok((cases, problems))
}

/// Python's `os.path.expandvars`: `$NAME` and `${NAME}` are replaced by the environment
/// variable's value; unknown variables are left unchanged.
pub fn expand_vars(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let (name, end) = if bytes.get(i + 1) == Some(&b'{') {
                match s[i + 2..].find('}') {
                    Some(close) => (&s[i + 2..i + 2 + close], i + 3 + close),
                    None => ("", i + 1),
                }
            } else {
                let len = s[i + 1..]
                    .bytes()
                    .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                    .count();
                (&s[i + 1..i + 1 + len], i + 1 + len)
            };
            if !name.is_empty() {
                if let Ok(v) = std::env::var(name) {
                    out.push_str(&v);
                    i = end;
                    continue;
                }
                out.push_str(&s[i..end]);
                i = end;
                continue;
            }
        }
        let ch = s[i..].chars().next().unwrap_or('$');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn resolve(folder: &Path, p: &str) -> PathBuf {
    let p = PathBuf::from(expand_vars(p));
    if p.is_absolute() {
        p
    } else {
        folder.join(p)
    }
}

fn explicit_cases(
    folder: &Path,
    json: &DatasetJson,
    format: Format,
    map: &BTreeMap<String, plans::DatasetEntry>,
) -> (Vec<RawCase>, Vec<String>) {
    let n = json.num_channels();
    let mut problems = Vec::new();
    let mut cases = Vec::with_capacity(map.len());
    for (case, entry) in map {
        if let Some(problem) = unsafe_name_problem(case) {
            problems.push(format!(
                "dataset.json \"dataset\" key {case:?} cannot be a case identifier: it {problem} \
                 (case identifiers become file names of nnseg's outputs)"
            ));
            continue;
        }
        let images: Vec<PathBuf> = entry.images.iter().map(|p| resolve(folder, p)).collect();
        if images.len() != n && !single_file_rgb_allowed(format, n, images.len()) {
            problems.push(format!(
                "case {case}: dataset.json lists {} image file(s) but channel_names declares {n} channel(s)",
                images.len()
            ));
        }
        for p in &images {
            if !p.is_file() {
                problems.push(format!(
                    "case {case}: image file {} does not exist",
                    p.display()
                ));
            }
        }
        let label = entry.label.as_deref().map(|p| resolve(folder, p));
        if let Some(l) = &label {
            if !l.is_file() {
                problems.push(format!(
                    "case {case}: label file {} does not exist",
                    l.display()
                ));
            }
        }
        cases.push(RawCase {
            identifier: case.clone(),
            images,
            label,
        });
    }
    (cases, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn write_json(folder: &Path, v: serde_json::Value) {
        fs::create_dir_all(folder).unwrap();
        fs::write(
            folder.join("dataset.json"),
            serde_json::to_string_pretty(&v).unwrap(),
        )
        .unwrap();
    }

    fn touch(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, b"").unwrap();
    }

    fn two_channel_json(n: usize) -> serde_json::Value {
        serde_json::json!({
            "channel_names": {"0": "T1", "1": "T2"},
            "labels": {"background": 0, "tumor": 1},
            "numTraining": n,
            "file_ending": ".nii.gz"
        })
    }

    #[test]
    fn scans_cases_sorted_with_labels() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("Dataset004_Test");
        write_json(&d, two_channel_json(2));
        for case in ["b_case", "a_case"] {
            for c in 0..2 {
                touch(&d.join(format!("imagesTr/{case}_{c:04}.nii.gz")));
            }
        }
        touch(&d.join("labelsTr/a_case.nii.gz"));
        touch(&d.join("imagesTr/.DS_Store"));
        touch(&d.join("imagesTr/notes.txt"));
        let ds = RawDataset::open(&d).unwrap();
        let paths = crate::NnUnetPaths {
            raw: Some(t.path().to_path_buf()),
            ..Default::default()
        };
        assert_eq!(RawDataset::open_id(&paths, 4).unwrap().cases, ds.cases);
        assert_eq!(ds.name, "Dataset004_Test");
        assert_eq!(ds.identifiers(), vec!["a_case", "b_case"]);
        assert_eq!(
            ds.cases[0].images,
            vec![
                d.join("imagesTr/a_case_0000.nii.gz"),
                d.join("imagesTr/a_case_0001.nii.gz")
            ]
        );
        assert_eq!(ds.cases[0].label, Some(d.join("labelsTr/a_case.nii.gz")));
        assert_eq!(ds.cases[1].label, None);
        assert!(ds.case("b_case").is_some());
        assert!(ds.case("c_case").is_none());
        let e = ds.require_labels().unwrap_err().to_string();
        assert!(e.contains("labelsTr/b_case.nii.gz"), "{e}");
    }

    #[test]
    fn missing_channel_names_case_and_file() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("Dataset004_Test");
        write_json(&d, two_channel_json(2));
        touch(&d.join("imagesTr/p1_0000.nii.gz"));
        touch(&d.join("imagesTr/p1_0001.nii.gz"));
        touch(&d.join("imagesTr/p2_0000.nii.gz"));
        touch(&d.join("imagesTr/p2_0002.nii.gz"));
        touch(&d.join("imagesTr/badname.nii.gz"));
        let e = RawDataset::open(&d).unwrap_err().to_string();
        assert!(e.contains("case p2: channel 1 is missing"), "{e}");
        assert!(e.contains("imagesTr/p2_0001.nii.gz"), "{e}");
        assert!(e.contains("p2_0002.nii.gz is channel 2"), "{e}");
        assert!(e.contains("badname.nii.gz: does not follow"), "{e}");
        assert!(!e.contains("case p1"), "{e}");
    }

    #[test]
    fn rgb_png_in_one_file_is_accepted() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("Dataset120_Roads");
        write_json(
            &d,
            serde_json::json!({"channel_names": {"0": "R", "1": "G", "2": "B"},
                "labels": {"background": 0, "road": 1}, "numTraining": 1, "file_ending": ".png"}),
        );
        touch(&d.join("imagesTr/img_0000.png"));
        let ds = RawDataset::open(&d).unwrap();
        assert_eq!(ds.cases[0].images.len(), 1);
        assert_eq!(ds.format(), Format::Png);
    }

    #[test]
    fn explicit_dataset_key_replaces_scan() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("Dataset005_Explicit");
        std::env::set_var("NNSEG_TEST_DATA_DIR_XYZ", t.path().join("elsewhere"));
        let mut j = two_channel_json(2);
        j["dataset"] = serde_json::json!({
            "z1": {"images": ["imgs/z1_t1.nii.gz", "imgs/z1_t2.nii.gz"], "label": "segs/z1.nii.gz"},
            "a1": {"images": ["$NNSEG_TEST_DATA_DIR_XYZ/a1_t1.nii.gz", "${NNSEG_TEST_DATA_DIR_XYZ}/a1_t2.nii.gz"]}
        });
        write_json(&d, j);
        touch(&d.join("imgs/z1_t1.nii.gz"));
        touch(&d.join("imgs/z1_t2.nii.gz"));
        touch(&d.join("segs/z1.nii.gz"));
        touch(&t.path().join("elsewhere/a1_t1.nii.gz"));
        touch(&t.path().join("elsewhere/a1_t2.nii.gz"));
        // a stray imagesTr folder must be ignored
        touch(&d.join("imagesTr/other_0000.nii.gz"));
        let ds = RawDataset::open(&d).unwrap();
        assert_eq!(ds.identifiers(), vec!["a1", "z1"]);
        assert_eq!(
            ds.cases[0].images[1],
            t.path().join("elsewhere/a1_t2.nii.gz")
        );
        assert_eq!(ds.cases[0].label, None);
        assert_eq!(ds.cases[1].label, Some(d.join("segs/z1.nii.gz")));

        fs::remove_file(d.join("imgs/z1_t2.nii.gz")).unwrap();
        let e = RawDataset::open(&d).unwrap_err().to_string();
        assert!(
            e.contains("case z1: image file") && e.contains("z1_t2.nii.gz does not exist"),
            "{e}"
        );
    }

    /// Issue 19: a `dataset` map key such as `../../Dataset991_Demo2D/dataset` made
    /// preprocessing write outside the dataset's folders.
    #[test]
    fn dataset_map_keys_that_escape_folders_are_errors_naming_the_key() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("Dataset007_Escape");
        touch(&d.join("imgs/a_t1.nii.gz"));
        touch(&d.join("imgs/a_t2.nii.gz"));
        for bad in [
            "../../Dataset991_Demo2D/dataset",
            "/abs/case",
            "..",
            ".hidden",
            "a\nb",
        ] {
            let mut j = two_channel_json(1);
            j["dataset"] = serde_json::json!({
                bad: {"images": ["imgs/a_t1.nii.gz", "imgs/a_t2.nii.gz"]}
            });
            write_json(&d, j);
            let e = RawDataset::open(&d).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("\"dataset\" key"),
                "{bad}: {e}"
            );
        }
        // The files themselves may live anywhere (nnU-Net allows it).
        let mut j = two_channel_json(1);
        j["dataset"] = serde_json::json!({
            "ok.case-1": {"images": ["../Dataset007_Escape/imgs/a_t1.nii.gz", "imgs/a_t2.nii.gz"]}
        });
        write_json(&d, j);
        assert_eq!(
            RawDataset::open(&d).unwrap().identifiers(),
            vec!["ok.case-1"]
        );
    }

    #[test]
    fn expand_vars_like_python() {
        std::env::set_var("NNSEG_EXPAND_TEST", "/data");
        assert_eq!(expand_vars("$NNSEG_EXPAND_TEST/x"), "/data/x");
        assert_eq!(expand_vars("${NNSEG_EXPAND_TEST}y"), "/datay");
        assert_eq!(
            expand_vars("$NNSEG_UNSET_VAR_QQ/x"),
            "$NNSEG_UNSET_VAR_QQ/x"
        );
        assert_eq!(expand_vars("a$"), "a$");
        assert_eq!(expand_vars("ü$"), "ü$");
    }

    #[test]
    fn clear_errors_for_missing_folder_json_and_ending() {
        let t = tempfile::tempdir().unwrap();
        let e = RawDataset::open(&t.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let d = t.path().join("Dataset006_X");
        fs::create_dir_all(&d).unwrap();
        let e = RawDataset::open(&d).unwrap_err().to_string();
        assert!(e.contains("dataset.json is missing"), "{e}");
        let mut j = two_channel_json(1);
        j["file_ending"] = serde_json::json!(".mha");
        write_json(&d, j);
        let e = RawDataset::open(&d).unwrap_err().to_string();
        assert!(e.contains(".mha") && e.contains("not supported"), "{e}");
        write_json(&d, two_channel_json(1));
        let e = RawDataset::open(&d).unwrap_err().to_string();
        assert!(e.contains("imagesTr is missing"), "{e}");
    }
}
