//! Preprocessed case storage (nnU-Net's legacy `nnUNetDatasetNumpy` layout, JSON instead of
//! pickle).
//!
//! Per case, in `nnUNet_preprocessed/DatasetXXX/{data_identifier}/`:
//! * `{case}.npy`: float32 `(c, z, y, x)`, C order, numpy format 1.0 (readable with `np.load`);
//! * `{case}_seg.npy`: int16 `(1, z, y, x)`;
//! * `{case}.json`: the properties nnU-Net keeps in `{case}.pkl` (same keys) plus the reader's
//!   [`ImageProperties`] needed to write predictions back.
//!
//! Every file is written atomically (temp file in the same folder, then rename) and
//! [`save_case`] removes what it wrote if a later file fails, so a case is either complete or
//! absent. The `.json` is written last. Reading memory-maps the `.npy` files
//! ([`MappedCase`]), so a training patch touches only the pages it needs.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use datasets::io::ImageProperties;
use memmap2::Mmap;
use ndarray::{s, Array4, ArrayView4};
use ndarray_npy::npy::header::{Header, Layout};
use ndarray_npy::{ViewElement, ViewNpyExt, WritableElement, WriteNpyExt};
use serde::{Deserialize, Serialize};

/// Suffix of the data file.
pub const DATA_SUFFIX: &str = ".npy";
/// Suffix of the segmentation file.
pub const SEG_SUFFIX: &str = "_seg.npy";
/// Suffix of the properties file.
pub const PROPERTIES_SUFFIX: &str = ".json";

/// Sampled voxel coordinates per class/region key (see [`class_locations_key`]); each entry is
/// `[0, z, y, x]` in preprocessed (transposed, cropped, resampled) coordinates.
pub type ClassLocations = BTreeMap<String, Vec<[i64; 4]>>;

/// The per-case properties (nnU-Net's `{case}.pkl`, as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseProperties {
    /// Original spacing in reader order (z, y, x), **not** transposed (as nnU-Net).
    pub spacing: [f64; 3],
    /// Shape after `transpose_forward`, before cropping.
    pub shape_before_cropping: [usize; 3],
    /// Half-open crop box `[[z0, z1], [y0, y1], [x0, x1]]` in transposed coordinates.
    pub bbox_used_for_cropping: [[usize; 2]; 3],
    /// Shape after cropping (transposed), before resampling.
    pub shape_after_cropping_and_before_resampling: [usize; 3],
    /// Foreground locations for oversampling; empty for cases without a segmentation.
    #[serde(default)]
    pub class_locations: ClassLocations,
    /// Reader geometry for writing predictions (nnU-Net's `sitk_stuff` / `nibabel_stuff`).
    pub image_properties: ImageProperties,
}

/// Key of a class or region in [`ClassLocations`], as Python's `str()` of nnU-Net's dict
/// key: a single label `1` → `"1"`, a region `[1, 2, 3]` → `"(1, 2, 3)"`.
pub fn class_locations_key(labels: &[i64]) -> String {
    match labels {
        [single] => single.to_string(),
        many => format!(
            "({})",
            many.iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Errors of this module; all name the file.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// File-system error.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Invalid or unexpected `.npy` content.
    #[error("{path}: not a valid {expected} .npy file: {message}")]
    Npy {
        /// The file.
        path: PathBuf,
        /// What was expected (dtype and rank).
        expected: &'static str,
        /// Why it was rejected.
        message: String,
    },
    /// Invalid properties JSON.
    #[error("{path}: invalid case properties JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Data and segmentation of a case disagree in spatial shape.
    #[error("{path}: segmentation shape {seg:?} does not match data shape {data:?}")]
    ShapeMismatch {
        /// The segmentation file.
        path: PathBuf,
        /// Data shape.
        data: Vec<usize>,
        /// Segmentation shape.
        seg: Vec<usize>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `{folder}/{case}.npy`.
pub fn data_path(folder: &Path, case: &str) -> PathBuf {
    folder.join(format!("{case}{DATA_SUFFIX}"))
}
/// `{folder}/{case}_seg.npy`.
pub fn seg_path(folder: &Path, case: &str) -> PathBuf {
    folder.join(format!("{case}{SEG_SUFFIX}"))
}
/// `{folder}/{case}.json`.
pub fn properties_path(folder: &Path, case: &str) -> PathBuf {
    folder.join(format!("{case}{PROPERTIES_SUFFIX}"))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `path` atomically: `write` fills a temp file in the same folder, which is then
/// renamed over `path`. The temp file is removed on any error.
pub fn write_atomic_with<F>(path: &Path, write: F) -> Result<(), StorageError>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<(), StorageError>,
{
    let parent = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        w.flush().map_err(io_err(&tmp))?;
        drop(w);
        fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes an array as `.npy` (format 1.0, always C order, header padded to 64 bytes)
/// atomically. Non-standard-layout arrays (e.g. transposed views) are written element by
/// element in C order, without a copy.
pub fn write_npy_atomic<A, D>(
    path: &Path,
    array: &ndarray::ArrayRef<A, D>,
) -> Result<(), StorageError>
where
    A: WritableElement,
    D: ndarray::Dimension,
{
    let npy_err = |message: String| StorageError::Npy {
        path: path.to_path_buf(),
        expected: "writable",
        message,
    };
    write_atomic_with(path, |w| {
        if array.is_standard_layout() {
            return array.write_npy(w).map_err(|e| npy_err(e.to_string()));
        }
        Header {
            type_descriptor: A::type_descriptor(),
            layout: Layout::Standard,
            shape: array.shape().to_vec(),
        }
        .write(&mut *w)
        .map_err(|e| npy_err(e.to_string()))?;
        for v in array.iter() {
            v.write(&mut *w).map_err(|e| npy_err(e.to_string()))?;
        }
        Ok(())
    })
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    write_atomic_with(path, |w| w.write_all(bytes).map_err(io_err(path)))
}

/// Saves one preprocessed case (all or nothing): `{case}.npy`, `{case}_seg.npy` (if `seg`),
/// then `{case}.json`.
pub fn save_case(
    folder: &Path,
    case: &str,
    data: ArrayView4<f32>,
    seg: Option<ArrayView4<i16>>,
    properties: &CaseProperties,
) -> Result<(), StorageError> {
    let dp = data_path(folder, case);
    let sp = seg_path(folder, case);
    let pp = properties_path(folder, case);
    if let Some(s) = &seg {
        if s.shape()[1..] != data.shape()[1..] || s.shape()[0] != 1 {
            return Err(StorageError::ShapeMismatch {
                path: sp,
                data: data.shape().to_vec(),
                seg: s.shape().to_vec(),
            });
        }
    }
    // Serialize first: nothing touches the disk if this fails. Compact JSON: class locations
    // are up to 10000 coordinates per class.
    let json = serde_json::to_vec(properties).map_err(|source| StorageError::Json {
        path: pp.clone(),
        source,
    })?;
    let mut written: Vec<&Path> = Vec::new();
    let result = (|| {
        write_npy_atomic(&dp, &data)?;
        written.push(&dp);
        match &seg {
            Some(s) => {
                write_npy_atomic(&sp, s)?;
                written.push(&sp);
            }
            None => {
                // A stale seg from an earlier run must not be paired with this data.
                match fs::remove_file(&sp) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&sp)(e)),
                }
            }
        }
        write_bytes_atomic(&pp, &json)
    })();
    if result.is_err() {
        for p in written {
            let _ = fs::remove_file(p);
        }
    }
    result
}

/// Loads `{case}.json`.
pub fn load_case_properties(folder: &Path, case: &str) -> Result<CaseProperties, StorageError> {
    let path = properties_path(folder, case);
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    serde_json::from_slice(&bytes).map_err(|source| StorageError::Json { path, source })
}

/// Identifiers of the complete cases in a preprocessed folder (those with `{case}.json` and
/// `{case}.npy`), sorted.
pub fn list_cases(folder: &Path) -> Result<Vec<String>, StorageError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(folder).map_err(io_err(folder))? {
        let entry = entry.map_err(io_err(folder))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if let Some(case) = name.strip_suffix(PROPERTIES_SUFFIX) {
            if data_path(folder, case).is_file() {
                out.push(case.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn map_file(path: &Path) -> Result<Mmap, StorageError> {
    let file = File::open(path).map_err(io_err(path))?;
    // SAFETY: the map is read-only. Preprocessed files are replaced by rename (never modified
    // in place), so the mapped inode's contents do not change while it is mapped.
    unsafe { Mmap::map(&file) }.map_err(io_err(path))
}

fn view4<'a, T: ViewElement>(
    path: &Path,
    map: &'a Mmap,
    expected: &'static str,
) -> Result<ArrayView4<'a, T>, StorageError> {
    ArrayView4::<T>::view_npy(map).map_err(|e| StorageError::Npy {
        path: path.to_path_buf(),
        expected,
        message: e.to_string(),
    })
}

/// A memory-mapped int16 `(1, z, y, x)` label map `.npy` (e.g. a previous cascade stage's
/// segmentation in `predicted_next_stage/`).
#[derive(Debug)]
pub struct MappedSeg {
    path: PathBuf,
    map: Mmap,
}

impl MappedSeg {
    /// Maps `path` and validates its header.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let this = MappedSeg {
            path: path.to_path_buf(),
            map: map_file(path)?,
        };
        this.view()?;
        Ok(this)
    }

    /// The label map as a view into the mapped file.
    pub fn view(&self) -> Result<ArrayView4<'_, i16>, StorageError> {
        view4(&self.path, &self.map, "int16 4-D (1, z, y, x)")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A preprocessed case with its `.npy` files memory-mapped.
#[derive(Debug)]
pub struct MappedCase {
    /// Case identifier.
    pub identifier: String,
    data_path: PathBuf,
    seg_path: PathBuf,
    data: Mmap,
    seg: Option<Mmap>,
}

impl MappedCase {
    /// Maps `{case}.npy` and, if present, `{case}_seg.npy`, validating their headers (dtype,
    /// rank, C order, alignment, length) and that their spatial shapes agree.
    pub fn open(folder: &Path, case: &str) -> Result<Self, StorageError> {
        let dp = data_path(folder, case);
        let sp = seg_path(folder, case);
        let data = map_file(&dp)?;
        let seg = if sp.is_file() {
            Some(map_file(&sp)?)
        } else {
            None
        };
        let this = MappedCase {
            identifier: case.to_string(),
            data_path: dp,
            seg_path: sp,
            data,
            seg,
        };
        let d = this.data()?;
        if let Some(s) = this.seg()? {
            if s.shape()[0] != 1 || s.shape()[1..] != d.shape()[1..] {
                return Err(StorageError::ShapeMismatch {
                    path: this.seg_path.clone(),
                    data: d.shape().to_vec(),
                    seg: s.shape().to_vec(),
                });
            }
        }
        Ok(this)
    }

    /// The data `(c, z, y, x)` as a view into the mapped file (no copy).
    pub fn data(&self) -> Result<ArrayView4<'_, f32>, StorageError> {
        view4(&self.data_path, &self.data, "float32 4-D (c, z, y, x)")
    }

    /// The segmentation `(1, z, y, x)`, if the case has one.
    pub fn seg(&self) -> Result<Option<ArrayView4<'_, i16>>, StorageError> {
        self.seg
            .as_ref()
            .map(|m| view4(&self.seg_path, m, "int16 4-D (1, z, y, x)"))
            .transpose()
    }

    /// Spatial shape `(z, y, x)`.
    pub fn shape(&self) -> Result<[usize; 3], StorageError> {
        let d = self.data()?;
        Ok([d.shape()[1], d.shape()[2], d.shape()[3]])
    }
}

/// Crops `src` (`(c, z, y, x)`) to the box starting at `lower` (may be negative or reach
/// past the end) with spatial `size`, filling everything outside `src` with `pad` — nnU-Net's
/// `crop_and_pad_nd` (data padded with 0, seg with -1). Only the overlap is copied.
pub fn crop_and_pad<T: Copy>(
    src: ArrayView4<T>,
    lower: [i64; 3],
    size: [usize; 3],
    pad: T,
) -> Array4<T> {
    let c = src.shape()[0];
    let mut out = Array4::from_elem((c, size[0], size[1], size[2]), pad);
    let mut src_lo = [0usize; 3];
    let mut src_hi = [0usize; 3];
    let mut dst_lo = [0usize; 3];
    for a in 0..3 {
        let n = src.shape()[a + 1] as i64;
        let lo = lower[a].max(0).min(n);
        let hi = (lower[a] + size[a] as i64).max(0).min(n);
        if hi <= lo {
            return out;
        }
        src_lo[a] = lo as usize;
        src_hi[a] = hi as usize;
        dst_lo[a] = (lo - lower[a]) as usize;
    }
    let region = src.slice(s![
        ..,
        src_lo[0]..src_hi[0],
        src_lo[1]..src_hi[1],
        src_lo[2]..src_hi[2]
    ]);
    out.slice_mut(s![
        ..,
        dst_lo[0]..dst_lo[0] + (src_hi[0] - src_lo[0]),
        dst_lo[1]..dst_lo[1] + (src_hi[1] - src_lo[1]),
        dst_lo[2]..dst_lo[2] + (src_hi[2] - src_lo[2])
    ])
    .assign(&region);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    fn props() -> CaseProperties {
        let mut cl = ClassLocations::new();
        cl.insert(class_locations_key(&[1]), vec![[0, 1, 2, 3], [0, 0, 0, 1]]);
        cl.insert(class_locations_key(&[1, 2]), vec![]);
        CaseProperties {
            spacing: [3.0, 0.8, 0.7],
            shape_before_cropping: [4, 5, 6],
            bbox_used_for_cropping: [[0, 4], [1, 5], [0, 6]],
            shape_after_cropping_and_before_resampling: [4, 4, 6],
            class_locations: cl,
            image_properties: serde_json::from_value(serde_json::json!({
                "spacing": [3.0, 0.8, 0.7], "origin": [0.0, 0.0, 0.0],
                "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                "reader": "SimpleITKIO"
            }))
            .expect("test image properties"),
        }
    }

    #[test]
    fn keys_like_python() {
        assert_eq!(class_locations_key(&[3]), "3");
        assert_eq!(class_locations_key(&[-1, 0, 1, 2]), "(-1, 0, 1, 2)");
    }

    #[test]
    fn save_then_mmap_patch() {
        let dir = tempfile::tempdir().unwrap();
        let data = Array4::from_shape_fn((2, 4, 5, 6), |(c, z, y, x)| {
            (c * 1000 + z * 100 + y * 10 + x) as f32
        });
        let seg = Array4::from_shape_fn((1, 4, 5, 6), |(_, z, y, x)| ((z + y + x) % 3) as i16 - 1);
        let p = props();
        save_case(dir.path(), "case_1", data.view(), Some(seg.view()), &p).unwrap();
        assert_eq!(list_cases(dir.path()).unwrap(), vec!["case_1".to_string()]);
        // no temp files left
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");

        let m = MappedCase::open(dir.path(), "case_1").unwrap();
        assert_eq!(m.shape().unwrap(), [4, 5, 6]);
        let d = m.data().unwrap();
        assert_eq!(d, data.view());
        let s = m.seg().unwrap().unwrap();
        assert_eq!(s, seg.view());
        // random patch via crop_and_pad, partly outside
        let patch = crop_and_pad(d, [-1, 2, 3], [3, 2, 4], 0.0);
        assert_eq!(patch.dim(), (2, 3, 2, 4));
        assert_eq!(patch[[0, 0, 0, 0]], 0.0); // z = -1 -> pad
        assert_eq!(patch[[1, 1, 0, 0]], data[[1, 0, 2, 3]]);
        assert_eq!(patch[[1, 2, 1, 2]], data[[1, 1, 3, 5]]);
        assert_eq!(patch[[0, 2, 1, 3]], 0.0); // x = 6 -> pad
        let sp = crop_and_pad(s, [10, 0, 0], [1, 1, 1], -1);
        assert_eq!(sp[[0, 0, 0, 0]], -1);

        assert_eq!(load_case_properties(dir.path(), "case_1").unwrap(), p);
    }

    #[test]
    fn npy_header_is_numpy_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let a = Array4::<f32>::from_elem((2, 3, 4, 5), 1.5);
        write_npy_atomic(&path, &a).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
        assert!(header.contains("'descr': '<f4'"), "{header}");
        assert!(header.contains("'fortran_order': False"), "{header}");
        assert!(header.contains("'shape': (2, 3, 4, 5)"), "{header}");
        assert!(header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + hlen + 120 * 4);
        assert_eq!(&bytes[10 + hlen..10 + hlen + 4], &1.5f32.to_le_bytes());

        // transposed (non-standard) input is still written in C order
        let b = Array4::from_shape_fn((1, 2, 3, 1), |(_, z, y, _)| (z * 3 + y) as i16);
        let bt = b.view().permuted_axes([0, 2, 1, 3]);
        let p2 = dir.path().join("b.npy");
        write_npy_atomic(&p2, &bt).unwrap();
        let bytes = fs::read(&p2).unwrap();
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
        assert!(
            header.contains("'descr': '<i2'") && header.contains("'shape': (1, 3, 2, 1)"),
            "{header}"
        );
        assert!(header.contains("'fortran_order': False"), "{header}");
        let vals: Vec<i16> = bytes[10 + hlen..]
            .chunks(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(vals, vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn rejects_wrong_dtype_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        // data saved as int16 instead of float32
        let a = Array4::<i16>::zeros((1, 2, 2, 2));
        write_npy_atomic(&data_path(dir.path(), "x"), &a).unwrap();
        let err = MappedCase::open(dir.path(), "x").unwrap_err();
        assert!(err.to_string().contains("x.npy"), "{err}");
        fs::write(data_path(dir.path(), "y"), b"not numpy").unwrap();
        assert!(MappedCase::open(dir.path(), "y").is_err());
        // seg with mismatching shape
        write_npy_atomic(
            &data_path(dir.path(), "z"),
            &Array4::<f32>::zeros((1, 2, 2, 2)),
        )
        .unwrap();
        write_npy_atomic(
            &seg_path(dir.path(), "z"),
            &Array4::<i16>::zeros((1, 2, 2, 3)),
        )
        .unwrap();
        assert!(matches!(
            MappedCase::open(dir.path(), "z"),
            Err(StorageError::ShapeMismatch { .. })
        ));
        // missing properties
        assert!(load_case_properties(dir.path(), "nope").is_err());
    }

    #[test]
    fn failed_save_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let data = Array4::<f32>::zeros((1, 2, 2, 2));
        let seg = Array4::<i16>::zeros((1, 2, 2, 2));
        // A directory where the properties file should go makes the last rename fail.
        fs::create_dir(properties_path(dir.path(), "c")).unwrap();
        assert!(save_case(dir.path(), "c", data.view(), Some(seg.view()), &props()).is_err());
        assert!(!data_path(dir.path(), "c").exists());
        assert!(!seg_path(dir.path(), "c").exists());
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
