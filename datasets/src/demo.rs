//! Deterministic synthetic raw datasets in nnU-Net format, for demos and end-to-end tests:
//!
//! - `Dataset990_Demo3D`: 10 anisotropic CT-like volumes (`.nii.gz`, channel "CT"), z spacing
//!   2.5–4.0 mm, in-plane 0.7–0.8 mm. Values are exactly 0 outside a circular scanner field of
//!   view, air (-1000) between it and the body, soft tissue (~40 HU, smooth texture + noise)
//!   inside. Label 1 = an organ with an irregular boundary, label 2 = one or two lesions inside it.
//! - `Dataset991_Demo2D`: 12 grayscale microscopy-like PNGs (channel "microscopy"), 96–128 px,
//!   bright textured cells (label 1), some with a nucleus (label 2).
//!
//! Everything is drawn from ChaCha8 streams seeded with `seed` (one stream per case), so the
//! output is identical for a given seed whatever the thread count.

use std::f64::consts::PI;
use std::fs;
use std::path::{Path, PathBuf};

use ndarray::{Array3, Zip};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::json;

use crate::error::DatasetError;
use crate::io::{write_image, write_seg, ImageProperties, IDENTITY_DIRECTION};
use crate::layout::{case_file_name, channel_file_name, RawDir};

pub const DEMO_3D_NAME: &str = "Dataset990_Demo3D";
pub const DEMO_2D_NAME: &str = "Dataset991_Demo2D";
pub const DEMO_3D_CASES: usize = 10;
pub const DEMO_2D_CASES: usize = 12;

/// Writes both demo datasets below `raw_root` (created if needed), overwriting earlier runs.
/// Returns the two dataset folders (3D first).
pub fn make_demo_datasets(raw_root: &Path, seed: u64) -> Result<Vec<PathBuf>, DatasetError> {
    let d3 = make_demo_3d(raw_root, seed)?;
    let d2 = make_demo_2d(raw_root, seed)?;
    Ok(vec![d3, d2])
}

fn case_rng(seed: u64, dataset: u64, case: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(dataset * 1_000_000 + case as u64);
    rng
}

/// Standard normal sample (Box–Muller).
fn gauss(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.gen::<f64>().max(1e-300);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

fn prepare_folders(folder: &Path) -> Result<(PathBuf, PathBuf), DatasetError> {
    let dir = RawDir::new(folder);
    let (images, labels) = (dir.images_tr(), dir.labels_tr());
    for d in [&images, &labels] {
        fs::create_dir_all(d).map_err(|e| DatasetError::io(d, e))?;
    }
    Ok((images, labels))
}

/// Removes files with `ending` in `dir` that are not in `keep` (left over from an older layout).
fn remove_stale(dir: &Path, ending: &str, keep: &[String]) -> Result<(), DatasetError> {
    for entry in fs::read_dir(dir).map_err(|e| DatasetError::io(dir, e))? {
        let entry = entry.map_err(|e| DatasetError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(ending) && !keep.contains(&name) {
            fs::remove_file(entry.path()).map_err(|e| DatasetError::io(entry.path(), e))?;
        }
    }
    Ok(())
}

fn write_dataset_json(folder: &Path, v: &serde_json::Value) -> Result<(), DatasetError> {
    plans::io::write_json_atomic(&RawDir::new(folder).dataset_json(), v)?;
    Ok(())
}

/// A random smooth field: sum of a few cosines with wavelengths 15–45 (in the coordinates used).
struct Texture {
    waves: Vec<([f64; 3], f64, f64)>,
}

impl Texture {
    fn new(rng: &mut ChaCha8Rng, n: usize, amplitude: f64) -> Self {
        let waves = (0..n)
            .map(|_| {
                let wavelength = rng.gen_range(15.0..45.0);
                let k = 2.0 * PI / wavelength;
                let dir = [gauss(rng), gauss(rng), gauss(rng)];
                let norm = (dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2])
                    .sqrt()
                    .max(1e-9);
                (
                    [k * dir[0] / norm, k * dir[1] / norm, k * dir[2] / norm],
                    rng.gen_range(0.0..2.0 * PI),
                    amplitude * rng.gen_range(0.5..1.0),
                )
            })
            .collect();
        Texture { waves }
    }

    fn at(&self, p: [f64; 3]) -> f64 {
        self.waves
            .iter()
            .map(|(k, phase, a)| a * (k[0] * p[0] + k[1] * p[1] + k[2] * p[2] + phase).cos())
            .sum()
    }
}

struct Case3d {
    image: Array3<f32>,
    seg: Array3<i16>,
    props: ImageProperties,
}

fn make_case_3d(seed: u64, idx: usize) -> Case3d {
    let mut rng = case_rng(seed, 990, idx);
    let sz = [2.5, 3.0, 3.5, 4.0][rng.gen_range(0..4)];
    let sxy = rng.gen_range(0.7..0.8);
    let nz = rng.gen_range(18..=26usize);
    let ny = rng.gen_range(56..=72usize);
    let nx = rng.gen_range(56..=72usize);
    let spacing = [sz, sxy, sxy];
    // physical coordinates (mm) relative to the volume centre, order (z, y, x)
    let centre = [
        (nz as f64 - 1.0) / 2.0,
        (ny as f64 - 1.0) / 2.0,
        (nx as f64 - 1.0) / 2.0,
    ];
    let half_y = ny as f64 * sxy / 2.0;
    let half_x = nx as f64 * sxy / 2.0;
    // scanner field of view: values are exactly 0 outside it (what crop-to-nonzero removes)
    let fov_r = 0.9 * half_y.min(half_x);
    // body: elliptic cylinder through all slices, inside the field of view
    let body = [
        0.0,
        rng.gen_range(0.72..0.80) * fov_r,
        rng.gen_range(0.82..0.92) * fov_r,
    ];
    // organ: ellipsoid inside the body
    let half_z = nz as f64 * sz / 2.0;
    let organ_axes = [
        rng.gen_range(0.45..0.6) * half_z,
        rng.gen_range(0.45..0.6) * body[1],
        rng.gen_range(0.45..0.6) * body[2],
    ];
    let organ_c = [
        rng.gen_range(-0.15..0.15) * half_z,
        rng.gen_range(-0.15..0.15) * body[1],
        rng.gen_range(-0.15..0.15) * body[2],
    ];
    let (f1, f2) = (rng.gen_range(2..5) as f64, rng.gen_range(1..4) as f64);
    let (p1, p2) = (rng.gen_range(0.0..2.0 * PI), rng.gen_range(0.0..2.0 * PI));
    let wobble = rng.gen_range(0.08..0.15);
    let organ_hu = rng.gen_range(90.0..120.0);
    let n_lesions = rng.gen_range(1..=2);
    // lesions: ellipsoids (radius r in-plane, at least ~1.2 slices in z) inside the organ
    let lesions: Vec<([f64; 3], [f64; 3], f64)> = (0..n_lesions)
        .map(|_| {
            let u = [
                rng.gen_range(-0.4..0.4),
                rng.gen_range(-0.4..0.4),
                rng.gen_range(-0.4..0.4),
            ];
            let c = [
                organ_c[0] + u[0] * organ_axes[0],
                organ_c[1] + u[1] * organ_axes[1],
                organ_c[2] + u[2] * organ_axes[2],
            ];
            let r = rng.gen_range(0.28..0.4) * organ_axes[1].min(organ_axes[2]);
            let r = r.max(3.0 * sxy);
            let hu = if rng.gen_bool(0.5) {
                rng.gen_range(170.0..220.0)
            } else {
                rng.gen_range(-20.0..15.0)
            };
            (c, [r.max(1.2 * sz), r, r], hu)
        })
        .collect();
    let texture = Texture::new(&mut rng, 4, 8.0);
    let noise_sd = rng.gen_range(8.0..14.0);

    let mut image = Array3::<f32>::zeros((nz, ny, nx));
    let mut seg = Array3::<i16>::zeros((nz, ny, nx));
    // noise drawn in a fixed (C) order from the case stream
    let noise: Vec<f64> = (0..nz * ny * nx).map(|_| gauss(&mut rng)).collect();
    Zip::indexed(&mut image)
        .and(&mut seg)
        .for_each(|(z, y, x), img, lab| {
            let p = [
                (z as f64 - centre[0]) * sz,
                (y as f64 - centre[1]) * sxy,
                (x as f64 - centre[2]) * sxy,
            ];
            let n = noise[(z * ny + y) * nx + x];
            if p[1] * p[1] + p[2] * p[2] > fov_r * fov_r {
                *img = 0.0; // outside the scanner's field of view
                return;
            }
            let in_body = (p[1] / body[1]).powi(2) + (p[2] / body[2]).powi(2) <= 1.0;
            if !in_body {
                *img = (-1000.0 + 5.0 * n) as f32;
                return;
            }
            let mut v = 40.0 + texture.at(p) + noise_sd * n;
            let q = [
                (p[0] - organ_c[0]) / organ_axes[0],
                (p[1] - organ_c[1]) / organ_axes[1],
                (p[2] - organ_c[2]) / organ_axes[2],
            ];
            let d = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt();
            let theta = q[1].atan2(q[2]);
            let psi = q[0].atan2((q[1] * q[1] + q[2] * q[2]).sqrt());
            let boundary = 1.0 + wobble * (f1 * theta + p1).sin() * (f2 * psi + p2).cos();
            if d <= boundary {
                *lab = 1;
                v += organ_hu - 40.0;
                for (c, r, hu) in &lesions {
                    let dd = ((p[0] - c[0]) / r[0]).powi(2)
                        + ((p[1] - c[1]) / r[1]).powi(2)
                        + ((p[2] - c[2]) / r[2]).powi(2);
                    if dd <= 1.0 {
                        *lab = 2;
                        v += hu - organ_hu;
                        break;
                    }
                }
            }
            *img = v.round() as f32;
        });
    let props = ImageProperties {
        spacing,
        origin: [-half_x, -half_y, -half_z],
        direction: IDENTITY_DIRECTION,
        reader: "SimpleITKIO".to_string(),
        nifti: None,
    };
    Case3d { image, seg, props }
}

fn make_demo_3d(raw_root: &Path, seed: u64) -> Result<PathBuf, DatasetError> {
    let folder = raw_root.join(DEMO_3D_NAME);
    let (images, labels) = prepare_folders(&folder)?;
    let ending = ".nii.gz";
    let ids: Vec<String> = (0..DEMO_3D_CASES)
        .map(|i| format!("demo3d_{i:03}"))
        .collect();
    ids.par_iter().enumerate().try_for_each(|(i, id)| {
        let c = make_case_3d(seed, i);
        write_image(
            &images.join(channel_file_name(id, 0, ending)),
            c.image.view(),
            &c.props,
        )?;
        write_seg(
            &labels.join(case_file_name(id, ending)),
            c.seg.view(),
            &c.props,
        )
    })?;
    let keep_img: Vec<String> = ids
        .iter()
        .map(|id| channel_file_name(id, 0, ending))
        .collect();
    let keep_lab: Vec<String> = ids.iter().map(|id| case_file_name(id, ending)).collect();
    remove_stale(&images, ending, &keep_img)?;
    remove_stale(&labels, ending, &keep_lab)?;
    write_dataset_json(
        &folder,
        &json!({
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "organ": 1, "lesion": 2},
            "numTraining": DEMO_3D_CASES,
            "file_ending": ending,
            "name": "Demo3D",
            "description": "Synthetic anisotropic CT-like volumes with an organ (1) and lesions inside it (2), generated by nnseg",
            "reference": "nnseg synthetic demo data",
            "licence": "CC0",
            "release": "1.0",
            "seed": seed
        }),
    )?;
    Ok(folder)
}

struct Cell {
    centre: [f64; 2],
    axes: [f64; 2],
    angle: f64,
    intensity: f64,
    nucleus: Option<([f64; 2], [f64; 2], f64)>,
}

/// Normalised elliptical distance of (y, x) from an ellipse (1 on the boundary).
fn ellipse_d(y: f64, x: f64, c: [f64; 2], axes: [f64; 2], angle: f64) -> f64 {
    let (s, co) = angle.sin_cos();
    let dy = y - c[0];
    let dx = x - c[1];
    let u = co * dx + s * dy;
    let v = -s * dx + co * dy;
    ((u / axes[1]).powi(2) + (v / axes[0]).powi(2)).sqrt()
}

fn make_case_2d(seed: u64, idx: usize) -> (Array3<f32>, Array3<i16>) {
    let mut rng = case_rng(seed, 991, idx);
    let h = rng.gen_range(96..=128usize);
    let w = rng.gen_range(96..=128usize);
    let n_cells = rng.gen_range(4..=8);
    let cells: Vec<Cell> = (0..n_cells)
        .map(|_| {
            let axes = [rng.gen_range(8.0..16.0), rng.gen_range(8.0..16.0)];
            let centre = [
                rng.gen_range(axes[0]..h as f64 - axes[0]),
                rng.gen_range(axes[1]..w as f64 - axes[1]),
            ];
            let angle = rng.gen_range(0.0..PI);
            let nucleus = rng.gen_bool(0.6).then(|| {
                let na = [
                    axes[0] * rng.gen_range(0.3..0.45),
                    axes[1] * rng.gen_range(0.3..0.45),
                ];
                let off = [
                    rng.gen_range(-0.25..0.25) * axes[0],
                    rng.gen_range(-0.25..0.25) * axes[1],
                ];
                (
                    [centre[0] + off[0], centre[1] + off[1]],
                    na,
                    rng.gen_range(210.0..245.0),
                )
            });
            Cell {
                centre,
                axes,
                angle,
                intensity: rng.gen_range(110.0..170.0),
                nucleus,
            }
        })
        .collect();
    let texture = Texture::new(&mut rng, 3, 12.0);
    let grad = [rng.gen_range(-0.15..0.15), rng.gen_range(-0.15..0.15)];
    let noise: Vec<f64> = (0..h * w).map(|_| gauss(&mut rng)).collect();
    let mut image = Array3::<f32>::zeros((1, h, w));
    let mut seg = Array3::<i16>::zeros((1, h, w));
    Zip::indexed(&mut image)
        .and(&mut seg)
        .for_each(|(_, y, x), img, lab| {
            let (yf, xf) = (y as f64, x as f64);
            let mut v = 25.0 + grad[0] * yf + grad[1] * xf + 6.0 * noise[y * w + x];
            for cell in &cells {
                if ellipse_d(yf, xf, cell.centre, cell.axes, cell.angle) <= 1.0 {
                    *lab = 1;
                    v = cell.intensity + texture.at([0.0, yf, xf]) + 8.0 * noise[y * w + x];
                    if let Some((nc, na, ni)) = cell.nucleus {
                        if ellipse_d(yf, xf, nc, na, cell.angle) <= 1.0 {
                            *lab = 2;
                            v = ni + 6.0 * noise[y * w + x];
                        }
                    }
                }
            }
            *img = v.round().clamp(0.0, 255.0) as f32;
        });
    (image, seg)
}

fn make_demo_2d(raw_root: &Path, seed: u64) -> Result<PathBuf, DatasetError> {
    let folder = raw_root.join(DEMO_2D_NAME);
    let (images, labels) = prepare_folders(&folder)?;
    let ending = ".png";
    let ids: Vec<String> = (0..DEMO_2D_CASES)
        .map(|i| format!("demo2d_{i:03}"))
        .collect();
    let props = ImageProperties::natural_2d();
    ids.par_iter().enumerate().try_for_each(|(i, id)| {
        let (img, seg) = make_case_2d(seed, i);
        write_image(
            &images.join(channel_file_name(id, 0, ending)),
            img.view(),
            &props,
        )?;
        write_seg(&labels.join(case_file_name(id, ending)), seg.view(), &props)
    })?;
    let keep_img: Vec<String> = ids
        .iter()
        .map(|id| channel_file_name(id, 0, ending))
        .collect();
    let keep_lab: Vec<String> = ids.iter().map(|id| case_file_name(id, ending)).collect();
    remove_stale(&images, ending, &keep_img)?;
    remove_stale(&labels, ending, &keep_lab)?;
    write_dataset_json(
        &folder,
        &json!({
            "channel_names": {"0": "microscopy"},
            "labels": {"background": 0, "cell": 1, "nucleus": 2},
            "numTraining": DEMO_2D_CASES,
            "file_ending": ending,
            "name": "Demo2D",
            "description": "Synthetic microscopy-like images: cells (1) with nuclei (2), generated by nnseg",
            "reference": "nnseg synthetic demo data",
            "licence": "CC0",
            "release": "1.0",
            "seed": seed
        }),
    )?;
    Ok(folder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{read_images, read_seg};
    use crate::raw::RawDataset;
    use crate::verify::verify_dataset_integrity;

    fn file_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = walkdir::WalkDir::new(dir)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .map(|e| {
                (
                    e.path().strip_prefix(dir).unwrap().display().to_string(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn demo_datasets_are_valid_deterministic_and_fast() {
        let t = tempfile::tempdir().unwrap();
        let start = std::time::Instant::now();
        let folders = make_demo_datasets(t.path(), 42).unwrap();
        let elapsed = start.elapsed();
        eprintln!("make_demo_datasets took {elapsed:?}");
        assert_eq!(
            folders,
            vec![t.path().join(DEMO_3D_NAME), t.path().join(DEMO_2D_NAME)]
        );

        // both pass the integrity check, without warnings
        for (f, n) in folders.iter().zip([DEMO_3D_CASES, DEMO_2D_CASES]) {
            let ds = RawDataset::open(f).unwrap();
            assert_eq!(ds.cases.len(), n);
            let report = verify_dataset_integrity(&ds, 2).unwrap();
            assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        }

        // 3D properties: anisotropic spacing, shapes, both labels, zero outside the FOV, air
        let ds = RawDataset::open(&folders[0]).unwrap();
        let mut z_spacings = std::collections::BTreeSet::new();
        for c in &ds.cases {
            let (img, p) = read_images(&c.images).unwrap();
            let (seg, _) = read_seg(c.label.as_ref().unwrap()).unwrap();
            let s = img.shape();
            assert!(
                (18..=26).contains(&s[1]) && (56..=72).contains(&s[2]) && (56..=72).contains(&s[3])
            );
            assert!([2.5, 3.0, 3.5, 4.0].contains(&p.spacing[0]));
            assert!(p.spacing[1] >= 0.7 && p.spacing[1] < 0.8 && p.spacing[1] == p.spacing[2]);
            z_spacings.insert((p.spacing[0] * 10.0) as i64);
            assert_eq!(
                img[[0, 0, 0, 0]],
                0.0,
                "corner outside the field of view must be 0"
            );
            assert!(img.iter().any(|&v| v < -900.0), "air expected");
            let n1 = seg.iter().filter(|&&v| v == 1).count();
            let n2 = seg.iter().filter(|&&v| v == 2).count();
            assert!(n1 > 200 && n2 > 5, "organ {n1} lesion {n2} voxels");
            // organ intensities are tissue-like
            let organ_mean: f64 = img
                .iter()
                .zip(seg.iter())
                .filter(|(_, &l)| l == 1)
                .map(|(&v, _)| v as f64)
                .sum::<f64>()
                / n1 as f64;
            assert!((60.0..150.0).contains(&organ_mean), "{organ_mean}");
        }
        assert!(
            z_spacings.len() >= 2,
            "z spacing should vary: {z_spacings:?}"
        );

        let ds = RawDataset::open(&folders[1]).unwrap();
        for c in &ds.cases {
            let (img, p) = read_images(&c.images).unwrap();
            assert_eq!(p.spacing, [999.0, 1.0, 1.0]);
            let s = img.shape();
            assert!(
                s[0] == 1 && s[1] == 1 && (96..=128).contains(&s[2]) && (96..=128).contains(&s[3])
            );
            let (seg, _) = read_seg(c.label.as_ref().unwrap()).unwrap();
            assert!(seg.iter().any(|&v| v == 1));
        }
        let any_nucleus = ds.cases.iter().any(|c| {
            read_seg(c.label.as_ref().unwrap())
                .unwrap()
                .0
                .iter()
                .any(|&v| v == 2)
        });
        assert!(any_nucleus);

        // deterministic and idempotent: a second run gives identical bytes; another seed differs
        let before = file_bytes(t.path());
        fs::write(folders[0].join("imagesTr/stale_0000.nii.gz"), b"old").unwrap();
        make_demo_datasets(t.path(), 42).unwrap();
        assert_eq!(before, file_bytes(t.path()));
        let t2 = tempfile::tempdir().unwrap();
        make_demo_datasets(t2.path(), 43).unwrap();
        assert_ne!(before, file_bytes(t2.path()));
    }
}
