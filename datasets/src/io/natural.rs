//! 2D natural images (PNG, TIFF) as pseudo-3D `(c, 1, y, x)` arrays with spacing (999, 1, 1),
//! like nnU-Net's `NaturalImage2DIO`. Gray → 1 channel, gray+alpha → 2, RGB → 3, RGBA → 4.
//! Palette PNGs are expanded to RGB when read as images and give their palette indices when read
//! as segmentations.

use std::fs::File;
use std::io::{BufReader, Cursor};
use std::path::Path;

use ndarray::{Array4, ArrayView3};

use super::nifti_io::float_seg_to_i16;
use super::{write_bytes_atomic, ImageProperties, Loaded};
use crate::error::DatasetError;

/// Decoded pixels: interleaved samples in row-major order.
struct Pixels {
    width: usize,
    height: usize,
    channels: usize,
    samples: Vec<f64>,
}

impl Pixels {
    /// `(c, 1, y, x)` array.
    fn into_array<T: Copy>(self, conv: impl Fn(f64) -> T) -> Result<Array4<T>, String> {
        let (h, w, c) = (self.height, self.width, self.channels);
        let v: Vec<T> = self.samples.into_iter().map(conv).collect();
        let a = Array4::from_shape_vec((1, h, w, c), v)
            .map_err(|e| format!("pixel buffer size mismatch: {e}"))?;
        Ok(a.permuted_axes([3, 0, 1, 2])
            .as_standard_layout()
            .into_owned())
    }
}

fn open(path: &Path) -> Result<BufReader<File>, DatasetError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| DatasetError::io(path, e))
}

/// Unpacks one row of `bits`-bit samples (1, 2, 4, 8 or 16 bits, big-endian) into `out`.
fn unpack_row(row: &[u8], bits: u8, count: usize, out: &mut Vec<f64>) {
    match bits {
        16 => out.extend(
            row.chunks_exact(2)
                .take(count)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) as f64),
        ),
        8 => out.extend(row.iter().take(count).map(|&b| b as f64)),
        _ => {
            let per_byte = 8 / bits as usize;
            let mask = (1u16 << bits) as u8 - 1;
            for i in 0..count {
                let byte = row[i / per_byte];
                let shift = 8 - bits as usize * (i % per_byte + 1);
                out.push(((byte >> shift) & mask) as f64);
            }
        }
    }
}

fn decode_png(path: &Path, expand_palette: bool) -> Result<Pixels, DatasetError> {
    let err = |e: png::DecodingError| DatasetError::read(path, format!("invalid PNG file: {e}"));
    let mut dec = png::Decoder::new(open(path)?);
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec.read_info().map_err(err)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| DatasetError::read(path, "image too large"))?;
    let mut buf = vec![0u8; size];
    let out = reader.next_frame(&mut buf).map_err(err)?;
    let (w, h) = (out.width as usize, out.height as usize);
    let bits = out.bit_depth as u8;
    let channels = match out.color_type {
        png::ColorType::Grayscale | png::ColorType::Indexed => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
    };
    let mut samples = Vec::with_capacity(w * h * channels);
    for y in 0..h {
        let row = &buf[y * out.line_size..(y + 1) * out.line_size];
        unpack_row(row, bits, w * channels, &mut samples);
    }
    if out.color_type == png::ColorType::Indexed && expand_palette {
        let palette = reader
            .info()
            .palette
            .as_ref()
            .ok_or_else(|| DatasetError::read(path, "indexed PNG without palette"))?;
        let mut rgb = Vec::with_capacity(samples.len() * 3);
        for &i in &samples {
            let i = i as usize;
            let px = palette.get(3 * i..3 * i + 3).ok_or_else(|| {
                DatasetError::read(path, format!("palette index {i} out of range"))
            })?;
            rgb.extend(px.iter().map(|&b| b as f64));
        }
        return Ok(Pixels {
            width: w,
            height: h,
            channels: 3,
            samples: rgb,
        });
    }
    Ok(Pixels {
        width: w,
        height: h,
        channels,
        samples,
    })
}

fn decode_tiff(path: &Path) -> Result<Pixels, DatasetError> {
    use tiff::decoder::{Decoder, DecodingResult};
    use tiff::ColorType;
    let err = |e: tiff::TiffError| DatasetError::read(path, format!("invalid TIFF file: {e}"));
    let mut dec = Decoder::new(open(path)?).map_err(err)?;
    let (w, h) = dec.dimensions().map_err(err)?;
    let channels = match dec.colortype().map_err(err)? {
        ColorType::Gray(_) | ColorType::Palette(_) => 1,
        ColorType::GrayA(_) => 2,
        ColorType::RGB(_) => 3,
        ColorType::RGBA(_) => 4,
        other => {
            return Err(DatasetError::read(
                path,
                format!(
                "unsupported TIFF color type {other:?} (supported: gray, gray+alpha, RGB, RGBA)"
            ),
            ))
        }
    };
    if dec.more_images() {
        return Err(DatasetError::read(
            path,
            "multi-page TIFF: only single-page 2D TIFF images are supported",
        ));
    }
    let samples: Vec<f64> = match dec.read_image().map_err(err)? {
        DecodingResult::U8(v) => v.into_iter().map(f64::from).collect(),
        DecodingResult::U16(v) => v.into_iter().map(f64::from).collect(),
        DecodingResult::U32(v) => v.into_iter().map(f64::from).collect(),
        DecodingResult::U64(v) => v.into_iter().map(|x| x as f64).collect(),
        DecodingResult::F16(v) => v.into_iter().map(f64::from).collect(),
        DecodingResult::F32(v) => v.into_iter().map(f64::from).collect(),
        DecodingResult::F64(v) => v,
        DecodingResult::I8(v) => v.into_iter().map(f64::from).collect(),
        DecodingResult::I16(v) => v.into_iter().map(f64::from).collect(),
        DecodingResult::I32(v) => v.into_iter().map(f64::from).collect(),
        DecodingResult::I64(v) => v.into_iter().map(|x| x as f64).collect(),
    };
    let (w, h) = (w as usize, h as usize);
    if samples.len() != w * h * channels {
        return Err(DatasetError::read(
            path,
            format!(
                "decoded {} samples, expected {}x{}x{} channels",
                samples.len(),
                h,
                w,
                channels
            ),
        ));
    }
    Ok(Pixels {
        width: w,
        height: h,
        channels,
        samples,
    })
}

fn image_from(px: Pixels, path: &Path) -> Result<Loaded<f32>, DatasetError> {
    let data = px
        .into_array(|v| v as f32)
        .map_err(|m| DatasetError::read(path, m))?;
    Ok(Loaded {
        data,
        props: ImageProperties::natural_2d(),
    })
}

fn seg_from(px: Pixels, path: &Path) -> Result<Loaded<i16>, DatasetError> {
    let data = px
        .into_array(|v| v)
        .map_err(|m| DatasetError::read(path, m))?;
    let c = data.shape()[0];
    let (h, w) = (data.shape()[2], data.shape()[3]);
    // float_seg_to_i16 works on 3D arrays: view channels as z
    let flat = data
        .into_shape_with_order((c, h, w))
        .map_err(|e| DatasetError::read(path, e))?;
    let seg = float_seg_to_i16(&flat, path)?;
    let seg = seg
        .into_shape_with_order((c, 1, h, w))
        .map_err(|e| DatasetError::read(path, e))?;
    Ok(Loaded {
        data: seg,
        props: ImageProperties::natural_2d(),
    })
}

pub(crate) fn read_png_image(path: &Path) -> Result<Loaded<f32>, DatasetError> {
    image_from(decode_png(path, true)?, path)
}

pub(crate) fn read_png_seg(path: &Path) -> Result<Loaded<i16>, DatasetError> {
    seg_from(decode_png(path, false)?, path)
}

pub(crate) fn read_tiff_image(path: &Path) -> Result<Loaded<f32>, DatasetError> {
    image_from(decode_tiff(path)?, path)
}

pub(crate) fn read_tiff_seg(path: &Path) -> Result<Loaded<i16>, DatasetError> {
    seg_from(decode_tiff(path)?, path)
}

/// The single slice of a `(1, y, x)` array; 2D formats cannot hold more.
fn single_slice<'a, T>(
    a: ArrayView3<'a, T>,
    path: &Path,
) -> Result<ndarray::ArrayView2<'a, T>, DatasetError> {
    if a.shape()[0] != 1 {
        return Err(DatasetError::write(
            path,
            format!(
                "PNG/TIFF files hold 2D images: expected shape (1, y, x), got {:?}",
                a.shape()
            ),
        ));
    }
    Ok(a.index_axis_move(ndarray::Axis(0), 0))
}

fn encode_png_gray(
    path: &Path,
    w: usize,
    h: usize,
    sixteen: bool,
    data: &[u8],
) -> Result<Vec<u8>, DatasetError> {
    let err = |e: png::EncodingError| DatasetError::write(path, e);
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w as u32, h as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(if sixteen {
            png::BitDepth::Sixteen
        } else {
            png::BitDepth::Eight
        });
        let mut wr = enc.write_header().map_err(err)?;
        wr.write_image_data(data).map_err(err)?;
        wr.finish().map_err(err)?;
    }
    Ok(bytes)
}

/// Writes integer values 0..=65535 as 8-bit (when all ≤ 255) or 16-bit grayscale PNG.
fn write_png_values(path: &Path, a: ndarray::ArrayView2<i64>) -> Result<(), DatasetError> {
    let (h, w) = a.dim();
    let (min, max) = a
        .iter()
        .fold((i64::MAX, i64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if h > 0 && w > 0 && (min < 0 || max > 65535) {
        return Err(DatasetError::write(
            path,
            format!("PNG stores values 0..=65535, the data has range {min}..={max}"),
        ));
    }
    let sixteen = max > 255;
    let data: Vec<u8> = if sixteen {
        a.iter().flat_map(|&v| (v as u16).to_be_bytes()).collect()
    } else {
        a.iter().map(|&v| v as u8).collect()
    };
    let bytes = encode_png_gray(path, w, h, sixteen, &data)?;
    write_bytes_atomic(path, &bytes)
}

pub(crate) fn write_png_seg(path: &Path, seg: ArrayView3<i16>) -> Result<(), DatasetError> {
    let s = single_slice(seg, path)?;
    write_png_values(path, s.mapv(i64::from).view())
}

pub(crate) fn write_png_image(path: &Path, img: ArrayView3<f32>) -> Result<(), DatasetError> {
    let s = single_slice(img, path)?;
    if let Some(v) = s.iter().find(|v| !v.is_finite() || v.fract() != 0.0) {
        return Err(DatasetError::write(
            path,
            format!("PNG stores integer values only, the data contains {v}; use .tif or .nii.gz for float images"),
        ));
    }
    write_png_values(path, s.mapv(|v| v as i64).view())
}

fn encode_tiff<C>(
    path: &Path,
    w: usize,
    h: usize,
    data: &[C::Inner],
) -> Result<Vec<u8>, DatasetError>
where
    C: tiff::encoder::colortype::ColorType,
    [C::Inner]: tiff::encoder::TiffValue,
{
    let err = |e: tiff::TiffError| DatasetError::write(path, e);
    let mut cur = Cursor::new(Vec::new());
    {
        let mut enc = tiff::encoder::TiffEncoder::new(&mut cur).map_err(err)?;
        enc.write_image::<C>(w as u32, h as u32, data)
            .map_err(err)?;
    }
    Ok(cur.into_inner())
}

pub(crate) fn write_tiff_seg(path: &Path, seg: ArrayView3<i16>) -> Result<(), DatasetError> {
    use tiff::encoder::colortype::{Gray8, GrayI16};
    let s = single_slice(seg, path)?;
    let (h, w) = s.dim();
    let bytes = if s.iter().all(|&v| (0..=255).contains(&v)) {
        let data: Vec<u8> = s.iter().map(|&v| v as u8).collect();
        encode_tiff::<Gray8>(path, w, h, &data)?
    } else {
        let data: Vec<i16> = s.iter().copied().collect();
        encode_tiff::<GrayI16>(path, w, h, &data)?
    };
    write_bytes_atomic(path, &bytes)
}

pub(crate) fn write_tiff_image(path: &Path, img: ArrayView3<f32>) -> Result<(), DatasetError> {
    use tiff::encoder::colortype::Gray32Float;
    let s = single_slice(img, path)?;
    let (h, w) = s.dim();
    let data: Vec<f32> = s.iter().copied().collect();
    let bytes = encode_tiff::<Gray32Float>(path, w, h, &data)?;
    write_bytes_atomic(path, &bytes)
}
