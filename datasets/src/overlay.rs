//! `nnseg plot_overlay_pngs`: one RGB PNG per training case with the outline of each label
//! drawn over one slice of the first channel, for a quick visual check of a dataset (nnU-Net's
//! `nnUNetv2_plot_overlay_pngs`, with outlines instead of filled overlays so the anatomy under
//! the label stays visible).

use crate::io::{read_images, read_seg, write_bytes_atomic};
use crate::{DatasetError, RawCase, RawDataset};
use ndarray::{Array3, ArrayView2, Axis};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Which slice (along the first array axis, `z`) to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SliceChoice {
    /// The middle slice (what `plot_overlay_pngs` shows by default).
    #[default]
    Middle,
    /// The slice with the most labelled (non-background) voxels; the middle one if the case
    /// has no foreground.
    MostForeground,
}

/// Options of [`plot_overlay_pngs`].
#[derive(Debug, Clone, Default)]
pub struct OverlayOptions {
    pub slice: SliceChoice,
    /// Worker threads (0: all cores).
    pub num_workers: usize,
}

/// Distinct colours for labels 1, 2, ... (cycled).
const PALETTE: [[u8; 3]; 10] = [
    [255, 64, 64],
    [64, 220, 64],
    [64, 128, 255],
    [255, 220, 0],
    [255, 0, 255],
    [0, 230, 230],
    [255, 140, 0],
    [160, 90, 255],
    [150, 255, 150],
    [255, 160, 200],
];

/// Colour of label `l > 0`.
pub fn label_color(l: i16) -> [u8; 3] {
    PALETTE[((l.max(1) - 1) as usize) % PALETTE.len()]
}

/// Maps intensities to 0..=255 between the 0.5th and 99.5th percentile of the slice.
fn window(img: ArrayView2<f32>) -> Vec<u8> {
    let mut v: Vec<f32> = img.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return vec![0; img.len()];
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    let (lo, hi) = (q(0.005), q(0.995));
    let scale = if hi > lo { 255.0 / (hi - lo) } else { 0.0 };
    img.iter()
        .map(|&x| {
            if x.is_finite() {
                ((x - lo) * scale).clamp(0.0, 255.0).round() as u8
            } else {
                0
            }
        })
        .collect()
}

/// An `(rows, cols, 3)` RGB image: grey intensities with each label's outline (labelled
/// pixels with a 4-neighbour of another label or at the border) in its colour.
pub fn overlay_rgb(img: ArrayView2<f32>, seg: ArrayView2<i16>) -> Array3<u8> {
    let (h, w) = img.dim();
    let grey = window(img);
    let mut out = Array3::<u8>::zeros((h, w, 3));
    for y in 0..h {
        for x in 0..w {
            let g = grey[y * w + x];
            let l = seg[[y, x]];
            let edge = l > 0 && {
                let diff = |yy: isize, xx: isize| {
                    if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                        true
                    } else {
                        seg[[yy as usize, xx as usize]] != l
                    }
                };
                let (yi, xi) = (y as isize, x as isize);
                diff(yi - 1, xi) || diff(yi + 1, xi) || diff(yi, xi - 1) || diff(yi, xi + 1)
            };
            let px = if edge { label_color(l) } else { [g, g, g] };
            for (c, v) in px.iter().enumerate() {
                out[[y, x, c]] = *v;
            }
        }
    }
    out
}

fn encode_rgb(path: &Path, rgb: &Array3<u8>) -> Result<Vec<u8>, DatasetError> {
    let (h, w, _) = rgb.dim();
    let err = |e: png::EncodingError| DatasetError::write(path, format!("PNG encoding: {e}"));
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(err)?;
        let data: Vec<u8> = rgb.iter().copied().collect();
        wr.write_image_data(&data).map_err(err)?;
        wr.finish().map_err(err)?;
    }
    Ok(bytes)
}

/// Draws one case: reads its images and label, picks the slice, writes `out/{case}.png`.
pub fn plot_case(case: &RawCase, out: &Path, slice: SliceChoice) -> Result<PathBuf, DatasetError> {
    let label = case.label.as_ref().ok_or_else(|| DatasetError::Layout {
        folder: out.to_path_buf(),
        message: format!("case `{}` has no label file to overlay", case.identifier),
    })?;
    let (img, _) = read_images(&case.images)?;
    let (seg, _) = read_seg(label)?;
    if img.shape()[1..] != seg.shape()[1..] {
        return Err(DatasetError::GeometryMismatch {
            message: format!(
                "case `{}`: image shape {:?} and label shape {:?} differ ({})",
                case.identifier,
                &img.shape()[1..],
                &seg.shape()[1..],
                label.display()
            ),
        });
    }
    let nz = img.shape()[1];
    let z = match slice {
        SliceChoice::Middle => nz / 2,
        SliceChoice::MostForeground => {
            let counts: Vec<usize> = (0..nz)
                .map(|z| {
                    seg.index_axis(Axis(0), 0)
                        .index_axis(Axis(0), z)
                        .iter()
                        .filter(|&&v| v > 0)
                        .count()
                })
                .collect();
            match counts
                .iter()
                .enumerate()
                .max_by_key(|(i, &c)| (c, usize::MAX - i))
            {
                Some((i, &c)) if c > 0 => i,
                _ => nz / 2,
            }
        }
    };
    let im = img.index_axis(Axis(0), 0);
    let sg = seg.index_axis(Axis(0), 0);
    let rgb = overlay_rgb(im.index_axis(Axis(0), z), sg.index_axis(Axis(0), z));
    let path = out.join(format!("{}.png", case.identifier));
    let bytes = encode_rgb(&path, &rgb)?;
    write_bytes_atomic(&path, &bytes)?;
    Ok(path)
}

/// One overlay PNG per labelled case of `ds` in `out` (created), in parallel. Returns the
/// written files in case order.
pub fn plot_overlay_pngs(
    ds: &RawDataset,
    out: &Path,
    opts: &OverlayOptions,
) -> Result<Vec<PathBuf>, DatasetError> {
    std::fs::create_dir_all(out).map_err(|source| DatasetError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let cases: Vec<&RawCase> = ds.cases.iter().filter(|c| c.label.is_some()).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.num_workers)
        .build()
        .map_err(|e| DatasetError::Other(format!("thread pool: {e}")))?;
    pool.install(|| {
        cases
            .par_iter()
            .map(|c| plot_case(c, out, opts.slice))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn outline_marks_only_the_border_of_each_label() {
        let img = Array2::<f32>::from_shape_fn((6, 7), |(y, x)| (y * 7 + x) as f32);
        let mut seg = Array2::<i16>::zeros((6, 7));
        // a 4x4 square of label 1 with a 2x2 core, and a single pixel of label 2
        for y in 1..5 {
            for x in 1..5 {
                seg[[y, x]] = 1;
            }
        }
        seg[[0, 6]] = 2;
        let rgb = overlay_rgb(img.view(), seg.view());
        let is = |y: usize, x: usize, c: [u8; 3]| (0..3).all(|k| rgb[[y, x, k]] == c[k]);
        // border of the square is coloured, its core and the background are grey
        assert!(is(1, 1, label_color(1)) && is(4, 3, label_color(1)));
        for (y, x) in [(2, 2), (2, 3), (3, 2), (3, 3), (0, 0), (5, 5)] {
            let g = rgb[[y, x, 0]];
            assert!(
                rgb[[y, x, 1]] == g && rgb[[y, x, 2]] == g,
                "({y},{x}) not grey"
            );
        }
        assert!(is(0, 6, label_color(2)));
        // the intensity window spans 0..255
        assert_eq!(rgb[[0, 0, 0]], 0);
        assert_eq!(rgb[[5, 6, 0]], 255);
    }

    #[test]
    fn demo_dataset_overlays_and_slice_choice() {
        let tmp = tempfile::tempdir().unwrap();
        let folders = crate::demo::make_demo_datasets(tmp.path(), 1).unwrap();
        for f in &folders {
            let ds = RawDataset::open(f).unwrap();
            let out = tmp.path().join("overlays").join(&ds.name);
            let files = plot_overlay_pngs(
                &ds,
                &out,
                &OverlayOptions {
                    slice: SliceChoice::MostForeground,
                    num_workers: 2,
                },
            )
            .unwrap();
            assert_eq!(files.len(), ds.cases.len());
            // readable RGB PNG with the image's in-plane size, containing outline colours
            let dec = png::Decoder::new(std::io::BufReader::new(
                std::fs::File::open(&files[0]).unwrap(),
            ));
            let mut r = dec.read_info().unwrap();
            let mut buf = vec![0; r.output_buffer_size().unwrap()];
            let info = r.next_frame(&mut buf).unwrap();
            assert_eq!(info.color_type, png::ColorType::Rgb);
            let (img, _) = read_images(&ds.cases[0].images).unwrap();
            assert_eq!(
                (info.height as usize, info.width as usize),
                (img.shape()[2], img.shape()[3])
            );
            let coloured = buf
                .chunks(3)
                .filter(|p| !(p[0] == p[1] && p[1] == p[2]))
                .count();
            assert!(coloured > 0, "{}: no outline drawn", files[0].display());
        }
        // a case without label is an error naming it
        let mut ds = RawDataset::open(&folders[0]).unwrap();
        ds.cases[0].label = None;
        let e = plot_case(&ds.cases[0], tmp.path(), SliceChoice::Middle)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&ds.cases[0].identifier), "{e}");
    }
}
