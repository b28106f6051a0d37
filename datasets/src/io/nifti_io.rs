//! NIfTI-1 reading and writing on top of the `nifti` crate.

use std::path::Path;

use ndarray::{Array3, ArrayD, ArrayView3};
use nifti::writer::WriterOptions;
use nifti::{IntoNdArray, NiftiHeader, NiftiObject, NiftiType, ReaderOptions};

use super::geometry::{
    affine_to_lps, affine_to_quatern, allclose, lps_to_affine, quatern_to_affine, Affine,
};
use super::{add_channel_axis, write_via_temp, Format, ImageProperties, Loaded, NiftiGeometry};
use crate::error::DatasetError;

fn read_object(path: &Path) -> Result<(NiftiHeader, nifti::InMemNiftiVolume), DatasetError> {
    let obj = ReaderOptions::new().read_file(path).map_err(|e| {
        let why = match &e {
            nifti::NiftiError::Io(io) => io.to_string(),
            other => other.to_string(),
        };
        DatasetError::read(path, format!("invalid or truncated NIfTI file: {why}"))
    })?;
    let header = obj.header().clone();
    Ok((header, obj.into_volume()))
}

/// Shape of the volume as (nx, ny, nz); errors for >3D data with more than one volume.
fn spatial_dims(header: &NiftiHeader, path: &Path) -> Result<[usize; 3], DatasetError> {
    let dim = header
        .dim()
        .map_err(|e| DatasetError::read(path, format!("invalid dim field: {e}")))?;
    if dim.is_empty() {
        return Err(DatasetError::read(path, "the image has no dimensions"));
    }
    let extra: usize = dim.iter().skip(3).map(|&d| d as usize).product();
    if extra != 1 {
        return Err(DatasetError::read(
            path,
            format!(
                "{}D image with dim {:?}: only 2D/3D images are supported; store each channel in its own \
                 file (_0000, _0001, ...)",
                dim.len(),
                dim
            ),
        ));
    }
    let get = |i: usize| dim.get(i).map(|&d| d as usize).unwrap_or(1);
    Ok([get(0), get(1), get(2)])
}

/// Converts the crate's `[x, y, z, ...]` Fortran-ordered array to `(z, y, x)` in C order without
/// copying when possible.
fn to_zyx<T: Clone>(
    arr: ArrayD<T>,
    dims: [usize; 3],
    path: &Path,
) -> Result<Array3<T>, DatasetError> {
    let [nx, ny, nz] = dims;
    let rev = arr.reversed_axes();
    let rev = if rev.is_standard_layout() {
        rev
    } else {
        rev.as_standard_layout().into_owned()
    };
    rev.into_shape_with_order((nz, ny, nx))
        .map_err(|e| DatasetError::read(path, format!("unexpected data layout: {e}")))
}

pub(crate) fn geometry_from_header(h: &NiftiHeader) -> NiftiGeometry {
    NiftiGeometry {
        qform_code: h.qform_code,
        sform_code: h.sform_code,
        quatern: [h.quatern_b, h.quatern_c, h.quatern_d],
        qoffset: [h.quatern_x, h.quatern_y, h.quatern_z],
        qfac: if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 },
        pixdim: [h.pixdim[1], h.pixdim[2], h.pixdim[3]],
        srow: [h.srow_x, h.srow_y, h.srow_z],
        xyzt_units: h.xyzt_units,
    }
}

fn spacing_xyz(g: &NiftiGeometry) -> [f64; 3] {
    g.pixdim.map(|p| {
        let a = (p as f64).abs();
        if a > 0.0 && a.is_finite() {
            a
        } else {
            1.0
        }
    })
}

fn f64s<const N: usize>(a: [f32; N]) -> [f64; N] {
    a.map(f64::from)
}

/// The affine SimpleITK/nibabel would use: sform if `sform_code > 0`, else qform if
/// `qform_code > 0`, else the "method 1" scaling matrix.
fn best_affine(g: &NiftiGeometry) -> Affine {
    let sp = spacing_xyz(g);
    if g.sform_code > 0 {
        g.srow.map(f64s)
    } else if g.qform_code > 0 {
        quatern_to_affine(f64s(g.quatern), f64s(g.qoffset), sp, g.qfac as f64)
    } else {
        [
            [sp[0], 0.0, 0.0, 0.0],
            [0.0, sp[1], 0.0, 0.0],
            [0.0, 0.0, sp[2], 0.0],
        ]
    }
}

/// Spacing (z, y, x), LPS origin and direction of a NIfTI geometry.
pub(crate) fn props_from_geometry(g: &NiftiGeometry, reader: &str) -> ImageProperties {
    let sp = spacing_xyz(g);
    let (origin, direction) = affine_to_lps(&best_affine(g));
    ImageProperties {
        spacing: [sp[2], sp[1], sp[0]],
        origin,
        direction,
        reader: reader.to_string(),
        nifti: Some(g.clone()),
    }
}

fn reader_name(path: &Path) -> &'static str {
    Format::from_path(path)
        .map(Format::reader_writer_name)
        .unwrap_or("SimpleITKIO")
}

/// The volume without the header's intensity scaling, and the scaling `(slope, inter)` to apply
/// (in f64, like ITK) if there is one. A slope of 0 or a non-finite slope means "no scaling"
/// (NIfTI-1 standard, nibabel).
fn unscaled(
    header: &NiftiHeader,
    volume: nifti::InMemNiftiVolume,
    path: &Path,
) -> Result<(nifti::InMemNiftiVolume, Option<(f64, f64)>), DatasetError> {
    let slope = header.scl_slope as f64;
    let inter = if header.scl_inter.is_finite() {
        header.scl_inter as f64
    } else {
        0.0
    };
    let scaling = (slope != 0.0 && slope.is_finite() && !(slope == 1.0 && inter == 0.0))
        .then_some((slope, inter));
    let mut h0 = header.clone();
    h0.scl_slope = 0.0;
    h0.scl_inter = 0.0;
    let volume = nifti::InMemNiftiVolume::from_raw_data(&h0, volume.into_raw_data())
        .map_err(|e| DatasetError::read(path, format!("invalid voxel data: {e}")))?;
    Ok((volume, scaling))
}

pub(crate) fn read_image(path: &Path) -> Result<Loaded<f32>, DatasetError> {
    let (header, volume) = read_object(path)?;
    let dims = spatial_dims(&header, path)?;
    let (volume, scaling) = unscaled(&header, volume, path)?;
    let mut arr = volume
        .into_ndarray::<f32>()
        .map_err(|e| DatasetError::read(path, format!("cannot convert voxel data: {e}")))?;
    if let Some((slope, inter)) = scaling {
        arr.mapv_inplace(|v| (v as f64 * slope + inter) as f32);
    }
    let data = to_zyx(arr, dims, path)?;
    let props = props_from_geometry(&geometry_from_header(&header), reader_name(path));
    Ok(Loaded {
        data: add_channel_axis(data),
        props,
    })
}

pub(crate) fn read_seg(path: &Path) -> Result<Loaded<i16>, DatasetError> {
    let (header, volume) = read_object(path)?;
    let dims = spatial_dims(&header, path)?;
    let datatype = header
        .data_type()
        .map_err(|e| DatasetError::read(path, format!("invalid datatype: {e}")))?;
    let (volume, scaling) = unscaled(&header, volume, path)?;
    let small_int = matches!(
        datatype,
        NiftiType::Uint8 | NiftiType::Int8 | NiftiType::Int16
    );
    let data = if small_int && scaling.is_none() {
        let arr = volume
            .into_ndarray::<i16>()
            .map_err(|e| DatasetError::read(path, format!("cannot convert voxel data: {e}")))?;
        to_zyx(arr, dims, path)?
    } else if datatype == NiftiType::Float32 && scaling.is_none() {
        // f32 holds every int16 exactly and keeps non-integers non-integer: no f64 copy needed
        let arr = volume
            .into_ndarray::<f32>()
            .map_err(|e| DatasetError::read(path, format!("cannot convert voxel data: {e}")))?;
        float_seg_to_i16(&to_zyx(arr, dims, path)?, path)?
    } else {
        let mut arr = volume
            .into_ndarray::<f64>()
            .map_err(|e| DatasetError::read(path, format!("cannot convert voxel data: {e}")))?;
        if let Some((slope, inter)) = scaling {
            arr.mapv_inplace(|v| v * slope + inter);
        }
        let arr = to_zyx(arr, dims, path)?;
        float_seg_to_i16(&arr, path)?
    };
    let props = props_from_geometry(&geometry_from_header(&header), reader_name(path));
    Ok(Loaded {
        data: add_channel_axis(data),
        props,
    })
}

/// Converts a float label map to int16, failing on the first non-integer or out-of-range value.
pub(crate) fn float_seg_to_i16<T: Copy + Into<f64>>(
    arr: &Array3<T>,
    path: &Path,
) -> Result<Array3<i16>, DatasetError> {
    let bad =
        |v: f64| !v.is_finite() || v.fract() != 0.0 || v < i16::MIN as f64 || v > i16::MAX as f64;
    if let Some(((z, y, x), v)) = arr
        .indexed_iter()
        .map(|(i, v)| (i, (*v).into()))
        .find(|(_, v)| bad(*v))
    {
        let message = if !v.is_finite() || v.fract() != 0.0 {
            format!("voxel (z={z}, y={y}, x={x}) has the non-integer value {v}; labels must be integers")
        } else {
            format!(
                "voxel (z={z}, y={y}, x={x}) has the value {v}, outside the int16 range {}..={}",
                i16::MIN,
                i16::MAX
            )
        };
        return Err(DatasetError::InvalidSegmentation {
            path: path.to_path_buf(),
            message,
        });
    }
    Ok(arr.mapv(|v| v.into() as i16))
}

/// Header for writing `props`: copies the source header's geometry when `props.nifti` still
/// describes the same geometry, else builds sform/qform (code 1, scanner) from spacing, origin
/// and direction.
fn header_for(props: &ImageProperties) -> NiftiHeader {
    let mut h = NiftiHeader::default();
    let g = match &props.nifti {
        Some(g) => {
            let p = props_from_geometry(g, "");
            let same = allclose(&p.spacing, &props.spacing, 1e-5, 1e-6)
                && allclose(&p.origin, &props.origin, 1e-5, 1e-4)
                && allclose(&p.direction, &props.direction, 1e-5, 1e-5);
            if same {
                Some(g.clone())
            } else {
                None
            }
        }
        None => None,
    };
    let g = g.unwrap_or_else(|| {
        let sp = [props.spacing[2], props.spacing[1], props.spacing[0]];
        let m = lps_to_affine(sp, props.origin, props.direction);
        let q = affine_to_quatern(&m);
        NiftiGeometry {
            qform_code: 1,
            sform_code: 1,
            quatern: q.bcd.map(|v| v as f32),
            qoffset: q.offset.map(|v| v as f32),
            qfac: q.qfac as f32,
            pixdim: sp.map(|v| v as f32),
            srow: m.map(|row| row.map(|v| v as f32)),
            xyzt_units: 2, // millimetres
        }
    });
    h.qform_code = g.qform_code;
    h.sform_code = g.sform_code;
    [h.quatern_b, h.quatern_c, h.quatern_d] = g.quatern;
    [h.quatern_x, h.quatern_y, h.quatern_z] = g.qoffset;
    h.pixdim[0] = g.qfac;
    h.pixdim[1..4].copy_from_slice(&g.pixdim);
    [h.srow_x, h.srow_y, h.srow_z] = g.srow;
    h.xyzt_units = g.xyzt_units;
    h
}

fn temp_ending(path: &Path) -> &'static str {
    match Format::from_path(path) {
        Some(Format::Nifti) => ".nii",
        _ => ".nii.gz",
    }
}

fn write_array<T>(
    path: &Path,
    data: ArrayView3<T>,
    props: &ImageProperties,
) -> Result<(), DatasetError>
where
    T: nifti::DataElement + bytemuck::Pod,
{
    let header = header_for(props);
    write_via_temp(path, temp_ending(path), |tmp| {
        // the writer transposes to Fortran order itself: pass the (x, y, z) view
        WriterOptions::new(tmp)
            .reference_header(&header)
            .write_nifti(&data.t())
            .map_err(|e| DatasetError::write(path, e))
    })
}

pub(crate) fn write_seg(
    path: &Path,
    seg: ArrayView3<i16>,
    props: &ImageProperties,
) -> Result<(), DatasetError> {
    let fits_u8 = seg.iter().all(|&v| (0..=255).contains(&v));
    if fits_u8 {
        let u = seg.mapv(|v| v as u8);
        write_array(path, u.view(), props)
    } else {
        write_array(path, seg, props)
    }
}

pub(crate) fn write_image(
    path: &Path,
    img: ArrayView3<f32>,
    props: &ImageProperties,
) -> Result<(), DatasetError> {
    write_array(path, img, props)
}

/// Splits a 4D NIfTI file (one volume per channel, MSD style) into 3D files, channel `t` written
/// to `out(t)`, keeping the header's geometry (qform/sform) and, for unscaled data, the voxel
/// type; scaled data (`scl_slope`) is written as scaled float32, as SimpleITK does. A 3D file is
/// copied to `out(0)` unchanged. Returns the number of channels written.
pub(crate) fn split_channels(
    path: &Path,
    out: &dyn Fn(usize) -> std::path::PathBuf,
) -> Result<usize, DatasetError> {
    let (header, volume) = read_object(path)?;
    let dim = header
        .dim()
        .map_err(|e| DatasetError::read(path, format!("invalid dim field: {e}")))?;
    match dim.len() {
        0..=3 => {
            let target = out(0);
            std::fs::copy(path, &target).map_err(|e| DatasetError::io(&target, e))?;
            return Ok(1);
        }
        4 => {}
        n => {
            return Err(DatasetError::read(
                path,
                format!("{n}D image with dim {dim:?}: expected a 3D or 4D (channels last) image"),
            ))
        }
    }
    let (volume, scaling) = unscaled(&header, volume, path)?;
    let channels = dim[3] as usize;
    macro_rules! split_as {
        ($t:ty) => {{
            let arr = volume
                .into_ndarray::<$t>()
                .map_err(|e| DatasetError::read(path, format!("cannot convert voxel data: {e}")))?;
            write_channels(&arr, &header, &out)
        }};
    }
    if let Some((slope, inter)) = scaling {
        let mut arr = volume
            .into_ndarray::<f32>()
            .map_err(|e| DatasetError::read(path, format!("cannot convert voxel data: {e}")))?;
        arr.mapv_inplace(|v| (v as f64 * slope + inter) as f32);
        write_channels(&arr, &header, &out)?;
        return Ok(channels);
    }
    match header.data_type() {
        Ok(NiftiType::Uint8) => split_as!(u8),
        Ok(NiftiType::Int8) => split_as!(i8),
        Ok(NiftiType::Int16) => split_as!(i16),
        Ok(NiftiType::Uint16) => split_as!(u16),
        Ok(NiftiType::Int32) => split_as!(i32),
        Ok(NiftiType::Uint32) => split_as!(u32),
        Ok(NiftiType::Int64) => split_as!(i64),
        Ok(NiftiType::Uint64) => split_as!(u64),
        Ok(NiftiType::Float64) => split_as!(f64),
        _ => split_as!(f32),
    }?;
    Ok(channels)
}

/// Writes each volume `t` of an `[x, y, z, t]` array to `out(t)` with `header`'s geometry.
fn write_channels<T>(
    arr: &ArrayD<T>,
    header: &NiftiHeader,
    out: &dyn Fn(usize) -> std::path::PathBuf,
) -> Result<(), DatasetError>
where
    T: nifti::DataElement + bytemuck::Pod,
{
    for (t, volume) in arr.axis_iter(ndarray::Axis(3)).enumerate() {
        let path = out(t);
        write_via_temp(&path, temp_ending(&path), |tmp| {
            WriterOptions::new(tmp)
                .reference_header(header)
                .write_nifti(&volume)
                .map_err(|e| DatasetError::write(&path, e))
        })?;
    }
    Ok(())
}
