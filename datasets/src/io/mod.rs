//! Image readers and writers chosen by file ending, with the axis conventions of nnU-Net's
//! SimpleITK reader: arrays are `(c, z, y, x)` in C order, spacing is `(z, y, x)`, origin and
//! direction are reported like SimpleITK (LPS world coordinates, origin in `(x, y, z)`, direction
//! row-major with one column per image axis `x, y, z`).
//!
//! Supported: NIfTI-1 (`.nii`, `.nii.gz`), 2D PNG (`.png`) and 2D TIFF (`.tif`, `.tiff`); 2D
//! images are pseudo-3D `(c, 1, y, x)` with spacing `(999, 1, 1)` like nnU-Net's
//! `NaturalImage2DIO`.

mod geometry;
mod natural;
mod nifti_io;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::{Array3, Array4, ArrayView3, Axis};
use serde::{Deserialize, Serialize};

use crate::error::DatasetError;

pub(crate) use geometry::allclose;

/// What is needed to write a NIfTI file back with exactly the geometry of the file it was read
/// from: the header fields as stored (f32, so that they survive a JSON round trip exactly).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NiftiGeometry {
    pub qform_code: i16,
    pub sform_code: i16,
    /// quatern_b, quatern_c, quatern_d
    pub quatern: [f32; 3],
    /// qoffset_x, qoffset_y, qoffset_z
    pub qoffset: [f32; 3],
    /// pixdim[0]: -1 or 1 (0 is read as 1)
    pub qfac: f32,
    /// pixdim[1..4] as stored (x, y, z order)
    pub pixdim: [f32; 3],
    /// srow_x, srow_y, srow_z
    pub srow: [[f32; 4]; 3],
    pub xyzt_units: u8,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ImageProperties {
    /// Voxel spacing in array axis order (z, y, x).
    pub spacing: [f64; 3],
    /// World position of voxel (0,0,0), LPS, (x, y, z) — as SimpleITK's `GetOrigin()`.
    pub origin: [f64; 3],
    /// LPS direction cosines, row-major, columns = image axes x, y, z — as SimpleITK's
    /// `GetDirection()`.
    pub direction: [f64; 9],
    /// Name of the nnU-Net reader/writer class this format corresponds to
    /// (`SimpleITKIO`, `NibabelIO`, `NaturalImage2DIO`).
    pub reader: String,
    /// Header geometry of NIfTI sources, used to write outputs that overlay the input exactly.
    #[serde(default)]
    pub nifti: Option<NiftiGeometry>,
}

impl ImageProperties {
    /// Properties for a 2D natural image: spacing (999, 1, 1), identity direction, zero origin.
    pub fn natural_2d() -> Self {
        ImageProperties {
            spacing: [999.0, 1.0, 1.0],
            origin: [0.0; 3],
            direction: IDENTITY_DIRECTION,
            reader: "NaturalImage2DIO".to_string(),
            nifti: None,
        }
    }

    /// Properties for a 3D image with the given spacing (z, y, x), zero origin and identity
    /// direction.
    pub fn with_spacing(spacing: [f64; 3]) -> Self {
        ImageProperties {
            spacing,
            origin: [0.0; 3],
            direction: IDENTITY_DIRECTION,
            reader: "SimpleITKIO".to_string(),
            nifti: None,
        }
    }
}

pub const IDENTITY_DIRECTION: [f64; 9] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];

/// File formats known to the readers and writers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Nifti,
    NiftiGz,
    Png,
    Tiff,
}

impl Format {
    /// Format of a file ending such as `.nii.gz` (case-insensitive, leading dot optional).
    pub fn from_ending(ending: &str) -> Option<Format> {
        let e = ending.to_ascii_lowercase();
        let e = e.strip_prefix('.').unwrap_or(&e);
        match e {
            "nii.gz" => Some(Format::NiftiGz),
            "nii" => Some(Format::Nifti),
            "png" => Some(Format::Png),
            "tif" | "tiff" => Some(Format::Tiff),
            _ => None,
        }
    }

    /// Format of a path, from the end of its file name.
    pub fn from_path(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        if name.ends_with(".nii.gz") {
            Some(Format::NiftiGz)
        } else if name.ends_with(".nii") {
            Some(Format::Nifti)
        } else if name.ends_with(".png") {
            Some(Format::Png)
        } else if name.ends_with(".tif") || name.ends_with(".tiff") {
            Some(Format::Tiff)
        } else {
            None
        }
    }

    /// The nnU-Net reader/writer class nnU-Net would pick for this format.
    pub fn reader_writer_name(self) -> &'static str {
        match self {
            Format::NiftiGz => "SimpleITKIO",
            Format::Nifti => "NibabelIO",
            Format::Png | Format::Tiff => "NaturalImage2DIO",
        }
    }

    /// True for the 2D formats (pseudo-3D arrays with one slice).
    pub fn is_2d(self) -> bool {
        matches!(self, Format::Png | Format::Tiff)
    }

    fn of(path: &Path) -> Result<Format, DatasetError> {
        Format::from_path(path).ok_or_else(|| DatasetError::UnsupportedFormat {
            path: path.to_path_buf(),
        })
    }
}

/// The supported file ending a file name ends with (`.nii.gz`, `.nii`, `.png`, `.tif`,
/// `.tiff`, in the name's own case), `None` for other names.
pub fn file_ending_of(name: &str) -> Option<&str> {
    let lower = name.to_ascii_lowercase();
    [".nii.gz", ".nii", ".png", ".tiff", ".tif"]
        .into_iter()
        .find(|e| lower.ends_with(e) && lower.len() > e.len())
        .map(|e| &name[name.len() - e.len()..])
}

/// The nnU-Net reader/writer name for a dataset's `file_ending` (`SimpleITKIO` for `.nii.gz`,
/// `NibabelIO` for `.nii`, `NaturalImage2DIO` for `.png`/`.tif`), `None` if unsupported.
pub fn reader_writer_name(file_ending: &str) -> Option<&'static str> {
    Format::from_ending(file_ending).map(Format::reader_writer_name)
}

/// One file read into memory: `(c, z, y, x)` data and its geometry.
pub(crate) struct Loaded<T> {
    pub data: Array4<T>,
    pub props: ImageProperties,
}

fn read_one_image(path: &Path) -> Result<Loaded<f32>, DatasetError> {
    match Format::of(path)? {
        Format::Nifti | Format::NiftiGz => nifti_io::read_image(path),
        Format::Png => natural::read_png_image(path),
        Format::Tiff => natural::read_tiff_image(path),
    }
}

/// Detailed result of [`read_images`] used by the integrity check: channels contributed by each
/// file and the geometry warnings (origin/direction differences between the channel files).
pub(crate) struct ImagesDetailed {
    pub data: Array4<f32>,
    pub props: ImageProperties,
    pub channels_per_file: Vec<usize>,
    pub warnings: Vec<String>,
}

pub(crate) fn read_images_detailed(paths: &[PathBuf]) -> Result<ImagesDetailed, DatasetError> {
    let Some(first_path) = paths.first() else {
        return Err(DatasetError::Other(
            "read_images needs at least one file".to_string(),
        ));
    };
    let mut loaded = Vec::with_capacity(paths.len());
    for p in paths {
        loaded.push(read_one_image(p)?);
    }
    let first = &loaded[0];
    let shape0 = first.data.shape()[1..].to_vec();
    let mut warnings = Vec::new();
    for (p, l) in paths.iter().zip(&loaded).skip(1) {
        let shape = &l.data.shape()[1..];
        if shape != shape0.as_slice() {
            return Err(DatasetError::GeometryMismatch {
                message: format!(
                    "{} has shape {:?} (z, y, x) but {} has shape {:?}",
                    p.display(),
                    shape,
                    first_path.display(),
                    shape0
                ),
            });
        }
        if !allclose(&l.props.spacing, &first.props.spacing, 1e-5, 1e-8) {
            return Err(DatasetError::GeometryMismatch {
                message: format!(
                    "{} has spacing {:?} (z, y, x) but {} has spacing {:?}",
                    p.display(),
                    l.props.spacing,
                    first_path.display(),
                    first.props.spacing
                ),
            });
        }
        if !allclose(&l.props.origin, &first.props.origin, 1e-5, 1e-8) {
            warnings.push(format!(
                "{} has origin {:?} but {} has origin {:?}",
                p.display(),
                l.props.origin,
                first_path.display(),
                first.props.origin
            ));
        }
        if !allclose(&l.props.direction, &first.props.direction, 1e-5, 1e-8) {
            warnings.push(format!(
                "{} has direction {:?} but {} has direction {:?}",
                p.display(),
                l.props.direction,
                first_path.display(),
                first.props.direction
            ));
        }
    }
    let channels_per_file: Vec<usize> = loaded.iter().map(|l| l.data.shape()[0]).collect();
    let props = loaded[0].props.clone();
    let data = if loaded.len() == 1 {
        loaded
            .pop()
            .map(|l| l.data)
            .unwrap_or_else(|| Array4::zeros((0, 0, 0, 0)))
    } else {
        let views: Vec<_> = loaded.iter().map(|l| l.data.view()).collect();
        ndarray::concatenate(Axis(0), &views).map_err(|e| DatasetError::GeometryMismatch {
            message: format!("cannot stack channels: {e}"),
        })?
    };
    Ok(ImagesDetailed {
        data,
        props,
        channels_per_file,
        warnings,
    })
}

/// Reads the channel files of one case and stacks them to `(c, z, y, x)`. Shape or spacing
/// differences between the files are errors naming both files; origin/direction differences
/// are logged as warnings (like nnU-Net's `SimpleITKIO`).
pub fn read_images(paths: &[PathBuf]) -> Result<(Array4<f32>, ImageProperties), DatasetError> {
    let d = read_images_detailed(paths)?;
    for w in &d.warnings {
        tracing::warn!("{w}");
    }
    Ok((d.data, d.props))
}

/// Reads a segmentation as `(1, z, y, x)` int16. Non-integer values or values outside the int16
/// range are errors naming the file.
pub fn read_seg(path: &Path) -> Result<(Array4<i16>, ImageProperties), DatasetError> {
    let l = match Format::of(path)? {
        Format::Nifti | Format::NiftiGz => nifti_io::read_seg(path)?,
        Format::Png => natural::read_png_seg(path)?,
        Format::Tiff => natural::read_tiff_seg(path)?,
    };
    if l.data.shape()[0] != 1 {
        return Err(DatasetError::InvalidSegmentation {
            path: path.to_path_buf(),
            message: format!(
                "a segmentation must have one channel, this file has {} (RGB/RGBA images cannot be segmentations)",
                l.data.shape()[0]
            ),
        });
    }
    Ok((l.data, l.props))
}

/// Writes a `(z, y, x)` segmentation atomically, keeping the geometry of `props`. The format is
/// chosen by the file ending. NIfTI: uint8 when all labels fit, else int16; PNG: 8-bit gray when
/// labels fit, else 16-bit; TIFF: uint8/int16.
pub fn write_seg(
    path: &Path,
    seg: ArrayView3<i16>,
    props: &ImageProperties,
) -> Result<(), DatasetError> {
    match Format::of(path)? {
        Format::Nifti | Format::NiftiGz => nifti_io::write_seg(path, seg, props),
        Format::Png => natural::write_png_seg(path, seg),
        Format::Tiff => natural::write_tiff_seg(path, seg),
    }
}

/// Writes a `(z, y, x)` float image atomically, keeping the geometry of `props`. NIfTI and TIFF
/// store float32; PNG stores 8- or 16-bit gray and requires integer values in 0..=65535.
pub fn write_image(
    path: &Path,
    img: ArrayView3<f32>,
    props: &ImageProperties,
) -> Result<(), DatasetError> {
    match Format::of(path)? {
        Format::Nifti | Format::NiftiGz => nifti_io::write_image(path, img, props),
        Format::Png => natural::write_png_image(path, img),
        Format::Tiff => natural::write_tiff_image(path, img),
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temp path next to `path`, hidden (leading dot) and ending with `ending` so that writers
/// choosing compression by extension behave as for the final path.
fn temp_path_for(path: &Path, ending: &str) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!(".nnseg-tmp-{}-{}{}", std::process::id(), n, ending);
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => PathBuf::from(name),
    }
}

/// Runs `write` on a temp path beside `path`, then renames the temp file onto `path`. The temp
/// file is removed on failure.
pub(crate) fn write_via_temp(
    path: &Path,
    ending: &str,
    write: impl FnOnce(&Path) -> Result<(), DatasetError>,
) -> Result<(), DatasetError> {
    let tmp = temp_path_for(path, ending);
    if let Err(e) = write(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        DatasetError::io(path, e)
    })
}

/// Splits a 4D NIfTI file (channels last, as in the Medical Segmentation Decathlon) into one 3D
/// file per channel, `out(c)` for channel `c`, keeping the header geometry; a 3D file is copied
/// to `out(0)`. Returns the number of channels.
pub fn split_nifti_channels(
    path: &Path,
    out: &dyn Fn(usize) -> PathBuf,
) -> Result<usize, DatasetError> {
    nifti_io::split_channels(path, out)
}

/// Writes bytes atomically (temp file in the same folder, then rename).
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<(), DatasetError> {
    write_via_temp(path, ".tmp", |tmp| {
        let mut f = fs::File::create(tmp).map_err(|e| DatasetError::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| DatasetError::io(tmp, e))?;
        Ok(())
    })
}

/// Converts a `(z, y, x)` array to `(1, z, y, x)`.
pub(crate) fn add_channel_axis<T>(a: Array3<T>) -> Array4<T> {
    a.insert_axis(Axis(0))
}

#[cfg(test)]
mod tests;
