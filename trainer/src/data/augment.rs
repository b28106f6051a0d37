//! nnU-Net's training augmentation (batchgeneratorsv2 `get_training_transforms`), in order:
//! spatial (rotation / scaling, centre crop to the final patch), Gaussian noise, Gaussian blur,
//! multiplicative brightness, contrast, low-resolution simulation, inverted gamma, gamma,
//! mirroring, image masking; then the target transforms shared with validation: `-1 → 0`,
//! region conversion and deep-supervision downsampling.
//!
//! Samples are always `(c, z, y, x)`; 2-D configurations use `z = 1`.

use ndarray::{Array3, Array4, ArrayViewMut3, Axis, Zip};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::sampling::Sample;
use super::LabelInfo;

/// nnU-Net's `ANISO_THRESHOLD` for dummy-2D augmentation.
pub const ANISO_THRESHOLD: f64 = 3.0;

/// Probabilities and ranges of the augmentation pipeline (defaults: nnU-Net's
/// `nnUNetTrainer`). Angles in radians.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AugmentationConfig {
    /// Final patch size of the configuration (2 or 3 entries).
    pub patch_size: Vec<usize>,
    /// 3-D patch with `max(patch)/patch[0] > 3`: rotate/scale in-plane only, low-res ignores
    /// axis 0.
    pub do_dummy_2d: bool,
    /// Probability of a rotation.
    pub p_rotation: f64,
    /// Rotation angle range (radians), per rotated axis.
    pub rotation: (f64, f64),
    /// Probability of scaling.
    pub p_scaling: f64,
    /// Scale factor range (same factor on all axes).
    pub scaling: (f64, f64),
    /// Probability of Gaussian noise.
    pub p_noise: f64,
    /// Range of the noise (sampled value used as std, as batchgeneratorsv2).
    pub noise_variance: (f64, f64),
    /// Probability of Gaussian blur.
    pub p_blur: f64,
    /// Blur sigma range (independent per axis).
    pub blur_sigma: (f64, f64),
    /// Per-channel probability of blurring.
    pub blur_p_per_channel: f64,
    /// Probability of multiplicative brightness.
    pub p_brightness: f64,
    /// Brightness multiplier range (`BGContrast`).
    pub brightness: (f64, f64),
    /// Probability of contrast augmentation.
    pub p_contrast: f64,
    /// Contrast factor range (`BGContrast`, preserve range).
    pub contrast: (f64, f64),
    /// Probability of low-resolution simulation.
    pub p_lowres: f64,
    /// Zoom range of the low-resolution simulation.
    pub lowres_scale: (f64, f64),
    /// Per-channel probability of low-resolution simulation.
    pub lowres_p_per_channel: f64,
    /// Probability of the inverted gamma transform.
    pub p_gamma_inverted: f64,
    /// Probability of the gamma transform.
    pub p_gamma: f64,
    /// Gamma range (`BGContrast`).
    pub gamma: (f64, f64),
    /// Mirror axes, as spatial axes of the configuration (3-D: 0=z, 1=y, 2=x; 2-D: 0=y, 1=x).
    pub mirror_axes: Vec<usize>,
    /// Per-axis mirror probability.
    pub p_mirror: f64,
    /// Channels whose voxels outside the nonzero mask (seg < 0) are set to 0
    /// (`use_mask_for_norm`).
    pub mask_channels: Vec<usize>,
}

fn deg(d: f64) -> f64 {
    d / 360.0 * 2.0 * std::f64::consts::PI
}

impl AugmentationConfig {
    /// nnU-Net's defaults for a final patch size (`configure_rotation_dummyDA_mirroring_and_inital_patch_size`).
    pub fn nnunet_default(patch_size: &[usize]) -> Self {
        let dim = patch_size.len();
        let maxp = patch_size.iter().copied().max().unwrap_or(1) as f64;
        let minp = patch_size.iter().copied().min().unwrap_or(1).max(1) as f64;
        let (do_dummy_2d, rot, mirror_axes) = if dim == 2 {
            let r = if maxp / minp > 1.5 { 15.0 } else { 180.0 };
            (false, r, vec![0, 1])
        } else {
            let dummy =
                maxp / (patch_size.first().copied().unwrap_or(1).max(1) as f64) > ANISO_THRESHOLD;
            (dummy, if dummy { 180.0 } else { 30.0 }, vec![0, 1, 2])
        };
        AugmentationConfig {
            patch_size: patch_size.to_vec(),
            do_dummy_2d,
            p_rotation: 0.2,
            rotation: (-deg(rot), deg(rot)),
            p_scaling: 0.2,
            scaling: (0.7, 1.4),
            p_noise: 0.1,
            noise_variance: (0.0, 0.1),
            p_blur: 0.2,
            blur_sigma: (0.5, 1.0),
            blur_p_per_channel: 0.5,
            p_brightness: 0.15,
            brightness: (0.75, 1.25),
            p_contrast: 0.15,
            contrast: (0.75, 1.25),
            p_lowres: 0.25,
            lowres_scale: (0.5, 1.0),
            lowres_p_per_channel: 0.5,
            p_gamma_inverted: 0.1,
            p_gamma: 0.3,
            gamma: (0.7, 1.5),
            mirror_axes,
            p_mirror: 0.5,
            mask_channels: Vec::new(),
        }
    }

    /// All probabilities zero (identity apart from the centre crop).
    pub fn none(patch_size: &[usize]) -> Self {
        AugmentationConfig {
            p_rotation: 0.0,
            p_scaling: 0.0,
            p_noise: 0.0,
            p_blur: 0.0,
            p_brightness: 0.0,
            p_contrast: 0.0,
            p_lowres: 0.0,
            p_gamma_inverted: 0.0,
            p_gamma: 0.0,
            p_mirror: 0.0,
            ..Self::nnunet_default(patch_size)
        }
    }

    /// The enlarged patch the loader crops (nnU-Net's `get_patch_size(patch, rot, rot, rot,
    /// (0.85, 1.25))`, with axis 0 kept for dummy-2D).
    pub fn initial_patch_size(&self) -> Vec<usize> {
        let rot = self.rotation.0.abs().max(self.rotation.1.abs());
        let mut out = get_patch_size(&self.patch_size, rot, (0.85, 1.25));
        if self.do_dummy_2d {
            out[0] = self.patch_size[0];
        }
        out
    }

    /// Final patch as `[z, y, x]` (`z = 1` for 2-D).
    pub fn patch_3d(&self) -> [usize; 3] {
        to3(&self.patch_size)
    }

    /// Rotation/scaling restricted to the (y, x) plane.
    fn in_plane(&self) -> bool {
        self.do_dummy_2d || self.patch_size.len() == 2
    }
}

pub(crate) fn to3(p: &[usize]) -> [usize; 3] {
    match p {
        [y, x] => [1, *y, *x],
        [z, y, x] => [*z, *y, *x],
        _ => [1, 1, 1],
    }
}

type Mat3 = [[f64; 3]; 3];

fn matmul(a: &Mat3, b: &Mat3) -> Mat3 {
    let mut o = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            o[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    o
}

fn rot_x(a: f64) -> Mat3 {
    let (s, c) = a.sin_cos();
    [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]
}
fn rot_y(a: f64) -> Mat3 {
    let (s, c) = a.sin_cos();
    [[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]
}
fn rot_z(a: f64) -> Mat3 {
    let (s, c) = a.sin_cos();
    [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
}

/// batchgenerators' `get_patch_size`: bounding box of the patch rotated by up to `rot`
/// (capped at 90°) about each axis, divided by the smallest scale.
pub fn get_patch_size(final_patch: &[usize], rot: f64, scale_range: (f64, f64)) -> Vec<usize> {
    let rot = rot.min(deg(90.0));
    let coords: Vec<f64> = final_patch.iter().map(|&v| v as f64).collect();
    let mut fin = coords.clone();
    let row_times = |m: &Mat3| -> Vec<f64> {
        (0..3)
            .map(|j| (0..3).map(|k| coords[k] * m[k][j]).sum::<f64>())
            .collect()
    };
    if coords.len() == 3 {
        for m in [rot_x(rot), rot_y(rot), rot_z(rot)] {
            for (f, v) in fin.iter_mut().zip(row_times(&m)) {
                *f = f.max(v.abs());
            }
        }
    } else if coords.len() == 2 {
        let (s, c) = rot.sin_cos();
        let v = [
            coords[0] * c + coords[1] * s,
            -coords[0] * s + coords[1] * c,
        ];
        for (f, v) in fin.iter_mut().zip(v) {
            *f = f.max(v.abs());
        }
    }
    let smin = scale_range.0.min(scale_range.1);
    fin.iter().map(|&f| (f / smin) as usize).collect()
}

/// Deep-supervision scales `1 / cumprod(strides)[:-1]` (nnU-Net's
/// `_get_deep_supervision_scales`), from the pooling strides of the plans.
pub fn ds_scales_from_strides(strides: &[Vec<usize>]) -> Vec<Vec<f64>> {
    let mut out = Vec::new();
    let mut acc: Vec<f64> = strides
        .first()
        .map(|s| vec![1.0; s.len()])
        .unwrap_or_default();
    for s in strides {
        for (a, &v) in acc.iter_mut().zip(s) {
            *a *= v as f64;
        }
        out.push(acc.iter().map(|a| 1.0 / a).collect());
    }
    out.pop();
    out
}

fn uniform<R: Rng>(rng: &mut R, r: (f64, f64)) -> f64 {
    if r.1 > r.0 {
        rng.gen_range(r.0..r.1)
    } else {
        r.0
    }
}

fn hit<R: Rng>(rng: &mut R, p: f64) -> bool {
    p > 0.0 && rng.gen::<f64>() < p
}

/// batchgeneratorsv2 `BGContrast`: half the time below 1, otherwise at least 1.
fn bg_contrast<R: Rng>(rng: &mut R, r: (f64, f64)) -> f64 {
    if rng.gen::<f64>() < 0.5 && r.0 < 1.0 {
        uniform(rng, (r.0, 1.0))
    } else {
        uniform(rng, (r.0.max(1.0), r.1))
    }
}

fn std_normal_pair<R: Rng>(rng: &mut R) -> (f32, f32) {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
    ((r * c) as f32, (r * s) as f32)
}

// ---------------------------------------------------------------------------------------
// spatial

/// Rotation/scaling as a matrix mapping output offsets to input offsets (`None` = identity).
pub fn sample_spatial_matrix<R: Rng>(cfg: &AugmentationConfig, rng: &mut R) -> Option<Mat3> {
    let do_rot = hit(rng, cfg.p_rotation);
    let angles = if do_rot {
        if cfg.in_plane() {
            [uniform(rng, cfg.rotation), 0.0, 0.0]
        } else {
            [
                uniform(rng, cfg.rotation),
                uniform(rng, cfg.rotation),
                uniform(rng, cfg.rotation),
            ]
        }
    } else {
        [0.0; 3]
    };
    let do_scale = hit(rng, cfg.p_scaling);
    let s = if do_scale {
        uniform(rng, cfg.scaling)
    } else {
        1.0
    };
    if !do_rot && !do_scale {
        return None;
    }
    let sz = if cfg.in_plane() { 1.0 } else { s };
    let scale = [[sz, 0.0, 0.0], [0.0, s, 0.0], [0.0, 0.0, s]];
    let r = matmul(
        &matmul(&rot_x(angles[0]), &rot_y(angles[1])),
        &rot_z(angles[2]),
    );
    Some(matmul(&r, &scale))
}

/// Centre crop (padding data 0 / seg -1) — the spatial transform without rotation/scaling.
pub fn center_crop(sample: &mut Sample, out: [usize; 3]) {
    let sh = sample.data.shape();
    let lower: [i64; 3] = std::array::from_fn(|a| (sh[a + 1] / 2) as i64 - (out[a] / 2) as i64);
    sample.data = preprocessing::storage::crop_and_pad(sample.data.view(), lower, out, 0.0);
    sample.seg = preprocessing::storage::crop_and_pad(sample.seg.view(), lower, out, -1);
    if let Some(p) = &sample.prev {
        sample.prev = Some(preprocessing::storage::crop_and_pad(
            p.view(),
            lower,
            out,
            0.0,
        ));
    }
}

/// Resamples the sample onto the output grid: input = `m · (o − c_out) + c_in` (voxel
/// indices), data trilinear with 0 outside, seg by per-label linear weights + argmax
/// (batchgeneratorsv2 with `bg_style_seg_sampling=False`), -1 outside. Parallel over z.
pub fn affine_resample(sample: &mut Sample, m: &Mat3, out: [usize; 3]) {
    // cascade one-hot channels ride along with the data (linear weights per label), then
    // become one-hot again by argmax: the segmentation's rule
    let n_img = sample.data.shape()[0];
    let data = match sample.prev.take() {
        Some(p) => ndarray::concatenate(Axis(0), &[sample.data.view(), p.view()])
            .expect("prev-stage channels have the data's spatial shape"),
        None => sample.data.as_standard_layout().into_owned(),
    };
    let seg = sample.seg.as_standard_layout().into_owned();
    let c = data.shape()[0];
    let ish = [data.shape()[1], data.shape()[2], data.shape()[3]];
    let c_in: [f64; 3] = std::array::from_fn(|a| {
        ((ish[a] / 2) as f64 - (out[a] / 2) as f64) + (out[a] as f64 - 1.0) / 2.0
    });
    let c_out: [f64; 3] = std::array::from_fn(|a| (out[a] as f64 - 1.0) / 2.0);
    let mut labels: Vec<i16> = seg.iter().copied().collect();
    labels.sort_unstable();
    labels.dedup();
    let dsl = data.as_slice().unwrap_or(&[]);
    let ssl = seg.as_slice().unwrap_or(&[]);
    let vox = ish[0] * ish[1] * ish[2];
    let plane = out[1] * out[2];
    let slabs: Vec<(Vec<f32>, Vec<i16>)> = (0..out[0])
        .into_par_iter()
        .map(|oz| {
            let mut d = vec![0f32; c * plane];
            let mut sg = vec![-1i16; plane];
            let mut w = vec![0f64; labels.len()];
            for oy in 0..out[1] {
                for ox in 0..out[2] {
                    let o = [
                        oz as f64 - c_out[0],
                        oy as f64 - c_out[1],
                        ox as f64 - c_out[2],
                    ];
                    let p: [f64; 3] = std::array::from_fn(|i| {
                        m[i][0] * o[0] + m[i][1] * o[1] + m[i][2] * o[2] + c_in[i]
                    });
                    let f: [f64; 3] = std::array::from_fn(|i| p[i].floor());
                    let fr: [f64; 3] = std::array::from_fn(|i| p[i] - f[i]);
                    let oi = oy * out[2] + ox;
                    w.iter_mut().for_each(|v| *v = 0.0);
                    let mut any = false;
                    for corner in 0..8 {
                        let mut wt = 1.0;
                        let mut idx = [0usize; 3];
                        let mut inside = true;
                        for a in 0..3 {
                            let bit = (corner >> (2 - a)) & 1;
                            let wa = if bit == 1 { fr[a] } else { 1.0 - fr[a] };
                            wt *= wa;
                            let q = f[a] as i64 + bit as i64;
                            if q < 0 || q >= ish[a] as i64 {
                                inside = false;
                            } else {
                                idx[a] = q as usize;
                            }
                        }
                        if !inside || wt <= 0.0 {
                            continue;
                        }
                        let lin = (idx[0] * ish[1] + idx[1]) * ish[2] + idx[2];
                        for ch in 0..c {
                            d[ch * plane + oi] += (wt * f64::from(dsl[ch * vox + lin])) as f32;
                        }
                        let l = ssl[lin];
                        if let Ok(k) = labels.binary_search(&l) {
                            w[k] += wt;
                            any = true;
                        }
                    }
                    if any {
                        let mut best = 0;
                        for k in 1..w.len() {
                            if w[k] > w[best] {
                                best = k;
                            }
                        }
                        sg[oi] = labels[best];
                    }
                }
            }
            (d, sg)
        })
        .collect();
    let mut nd = Array4::<f32>::zeros((c, out[0], out[1], out[2]));
    let mut ns = Array4::<i16>::zeros((1, out[0], out[1], out[2]));
    for (z, (d, sg)) in slabs.into_iter().enumerate() {
        for ch in 0..c {
            let src = &d[ch * plane..(ch + 1) * plane];
            for (dst, v) in nd.slice_mut(ndarray::s![ch, z, .., ..]).iter_mut().zip(src) {
                *dst = *v;
            }
        }
        for (dst, v) in ns.slice_mut(ndarray::s![0, z, .., ..]).iter_mut().zip(&sg) {
            *dst = *v;
        }
    }
    if nd.shape()[0] > n_img {
        let mut prev = nd.slice(ndarray::s![n_img.., .., .., ..]).to_owned();
        super::cascade::rebinarize(&mut prev);
        sample.prev = Some(prev);
        sample.data = nd.slice(ndarray::s![..n_img, .., .., ..]).to_owned();
    } else {
        sample.data = nd;
    }
    sample.seg = ns;
}

/// `SpatialTransform`: random rotation/scaling about the patch centre, output = final patch.
pub fn spatial_transform<R: Rng>(sample: &mut Sample, cfg: &AugmentationConfig, rng: &mut R) {
    let out = cfg.patch_3d();
    match sample_spatial_matrix(cfg, rng) {
        Some(m) => affine_resample(sample, &m, out),
        None => center_crop(sample, out),
    }
}

// ---------------------------------------------------------------------------------------
// intensity

/// `GaussianNoiseTransform`: one std for all channels, sampled from `noise_variance`.
pub fn gaussian_noise<R: Rng>(sample: &mut Sample, cfg: &AugmentationConfig, rng: &mut R) {
    if !hit(rng, cfg.p_noise) {
        return;
    }
    let sigma = uniform(rng, cfg.noise_variance) as f32;
    if sigma > 0.0 {
        // Box–Muller, both outputs of each pair used
        let mut it = sample.data.iter_mut();
        while let Some(a) = it.next() {
            let (n0, n1) = std_normal_pair(rng);
            *a += sigma * n0;
            if let Some(b) = it.next() {
                *b += sigma * n1;
            }
        }
    }
}

fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let mut k: Vec<f64> = (-radius..=radius)
        .map(|i| (-0.5 * (i as f64 / sigma).powi(2)).exp())
        .collect();
    let s: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    k.into_iter().map(|v| v as f32).collect()
}

fn reflect(i: i64, n: i64) -> usize {
    // scipy 'reflect' (half-sample symmetric), repeated for long kernels
    let period = 2 * n;
    let mut j = i.rem_euclid(period);
    if j >= n {
        j = period - 1 - j;
    }
    j as usize
}

/// Convolves every lane along `axis` with `kernel` (odd length, centred), reflect boundary.
pub fn convolve_axis(mut vol: ArrayViewMut3<f32>, axis: usize, kernel: &[f32]) {
    let n = vol.shape()[axis];
    if n < 2 || kernel.len() < 2 {
        return;
    }
    let r = (kernel.len() / 2) as i64;
    let mut buf = vec![0f32; n];
    for mut lane in vol.lanes_mut(Axis(axis)) {
        for (b, v) in buf.iter_mut().zip(lane.iter()) {
            *b = *v;
        }
        for (i, out) in lane.iter_mut().enumerate() {
            let lo = i as i64 - r;
            let mut acc = 0f32;
            if lo >= 0 && lo + kernel.len() as i64 <= n as i64 {
                let lo = lo as usize;
                for (kv, bv) in kernel.iter().zip(&buf[lo..lo + kernel.len()]) {
                    acc += kv * bv;
                }
            } else {
                for (k, kv) in kernel.iter().enumerate() {
                    acc += kv * buf[reflect(lo + k as i64, n as i64)];
                }
            }
            *out = acc;
        }
    }
}

/// `GaussianBlurTransform`: per channel (p 0.5) a separable Gaussian, sigma per axis.
pub fn gaussian_blur<R: Rng>(sample: &mut Sample, cfg: &AugmentationConfig, rng: &mut R) {
    if !hit(rng, cfg.p_blur) {
        return;
    }
    for mut ch in sample.data.outer_iter_mut() {
        if !hit(rng, cfg.blur_p_per_channel) {
            continue;
        }
        for axis in 0..3 {
            let sigma = uniform(rng, cfg.blur_sigma);
            if ch.shape()[axis] > 1 && sigma > 0.0 {
                convolve_axis(ch.view_mut(), axis, &gaussian_kernel(sigma));
            }
        }
    }
}

/// `MultiplicativeBrightnessTransform`: independent multiplier per channel.
pub fn brightness<R: Rng>(sample: &mut Sample, cfg: &AugmentationConfig, rng: &mut R) {
    if !hit(rng, cfg.p_brightness) {
        return;
    }
    for mut ch in sample.data.outer_iter_mut() {
        let m = bg_contrast(rng, cfg.brightness) as f32;
        ch.mapv_inplace(|v| v * m);
    }
}

/// `ContrastTransform` with `preserve_range`: `(x − mean)·f + mean`, clipped to the old range.
pub fn contrast<R: Rng>(sample: &mut Sample, cfg: &AugmentationConfig, rng: &mut R) {
    if !hit(rng, cfg.p_contrast) {
        return;
    }
    for mut ch in sample.data.outer_iter_mut() {
        let f = bg_contrast(rng, cfg.contrast) as f32;
        let n = ch.len().max(1) as f64;
        let mean = (ch.iter().map(|&v| f64::from(v)).sum::<f64>() / n) as f32;
        let (mn, mx) = ch
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        ch.mapv_inplace(|v| ((v - mean) * f + mean).clamp(mn, mx));
    }
}

/// Resizes one axis: nearest-exact (`linear = false`) or linear, `align_corners=False`.
fn resize_axis(a: &Array3<f32>, axis: usize, new_len: usize, linear: bool) -> Array3<f32> {
    let n = a.shape()[axis];
    if n == new_len {
        return a.clone();
    }
    let mut sh = [a.shape()[0], a.shape()[1], a.shape()[2]];
    sh[axis] = new_len;
    let mut out = Array3::<f32>::zeros(sh);
    let scale = n as f64 / new_len as f64;
    Zip::from(out.lanes_mut(Axis(axis)))
        .and(a.lanes(Axis(axis)))
        .for_each(|mut o, i| {
            for (d, ov) in o.iter_mut().enumerate() {
                if linear {
                    let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
                    let i0 = (src.floor() as usize).min(n - 1);
                    let i1 = (i0 + 1).min(n - 1);
                    let w = (src - i0 as f64) as f32;
                    *ov = i[i0] * (1.0 - w) + i[i1] * w;
                } else {
                    let src = (((d as f64 + 0.5) * scale).floor() as usize).min(n - 1);
                    *ov = i[src];
                }
            }
        });
    out
}

/// `SimulateLowResolutionTransform`: per channel (p 0.5) downsample by one zoom factor
/// (nearest-exact) and upsample back (linear); axis 0 is kept for dummy-2D and singleton axes.
pub fn simulate_low_resolution<R: Rng>(sample: &mut Sample, cfg: &AugmentationConfig, rng: &mut R) {
    if !hit(rng, cfg.p_lowres) {
        return;
    }
    for mut ch in sample.data.outer_iter_mut() {
        if !hit(rng, cfg.lowres_p_per_channel) {
            continue;
        }
        let zoom = uniform(rng, cfg.lowres_scale);
        let sh = [ch.shape()[0], ch.shape()[1], ch.shape()[2]];
        let mut small = ch.to_owned();
        for (axis, &n) in sh.iter().enumerate() {
            if n <= 1 || (axis == 0 && cfg.do_dummy_2d) {
                continue;
            }
            let m = ((n as f64 * zoom).round_ties_even() as usize).max(1);
            small = resize_axis(&small, axis, m, false);
        }
        for (axis, &n) in sh.iter().enumerate() {
            small = resize_axis(&small, axis, n, true);
        }
        ch.assign(&small);
    }
}

fn mean_std(v: &ndarray::ArrayViewMut3<f32>) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n.max(1.0);
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// `GammaTransform` (retain stats): per channel `((x−min)/range)^γ·range + min`, then the old
/// mean/std restored; `invert` applies it to `−x`.
pub fn gamma<R: Rng>(
    sample: &mut Sample,
    p: f64,
    invert: bool,
    cfg: &AugmentationConfig,
    rng: &mut R,
) {
    if !hit(rng, p) {
        return;
    }
    for mut ch in sample.data.outer_iter_mut() {
        let g = bg_contrast(rng, cfg.gamma);
        if invert {
            ch.mapv_inplace(|v| -v);
        }
        let (mean, std) = mean_std(&ch);
        let (mn, mx) = ch
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let rng_ = f64::from(mx - mn).max(1e-7);
        ch.mapv_inplace(|v| {
            ((f64::from(v - mn) / rng_).max(0.0).powf(g) * rng_ + f64::from(mn)) as f32
        });
        let (m2, s2) = mean_std(&ch);
        ch.mapv_inplace(|v| ((f64::from(v) - m2) / (s2 + 1e-8) * std + mean) as f32);
        if invert {
            ch.mapv_inplace(|v| -v);
        }
    }
}

/// `MirrorTransform`: each allowed axis flipped with `p_mirror`.
pub fn mirror<R: Rng>(sample: &mut Sample, cfg: &AugmentationConfig, rng: &mut R) {
    let offset = if cfg.patch_size.len() == 2 { 2 } else { 1 };
    for &a in &cfg.mirror_axes {
        if hit(rng, cfg.p_mirror) {
            flip_axis(sample, a + offset);
        }
    }
}

/// Flips data and seg along array axis `axis` (1 = z, 2 = y, 3 = x).
pub fn flip_axis(sample: &mut Sample, axis: usize) {
    if axis == 0 || axis > 3 {
        return;
    }
    sample.data.invert_axis(Axis(axis));
    sample.seg.invert_axis(Axis(axis));
    sample.data = sample.data.as_standard_layout().into_owned();
    sample.seg = sample.seg.as_standard_layout().into_owned();
    if let Some(p) = sample.prev.as_mut() {
        p.invert_axis(Axis(axis));
        *p = p.as_standard_layout().into_owned();
    }
}

/// `MaskImageTransform`: voxels with seg < 0 set to 0 in `mask_channels`.
pub fn mask_image(sample: &mut Sample, cfg: &AugmentationConfig) {
    for &c in &cfg.mask_channels {
        if c >= sample.data.shape()[0] {
            continue;
        }
        let seg = sample.seg.index_axis(Axis(0), 0);
        Zip::from(sample.data.index_axis_mut(Axis(0), c))
            .and(seg)
            .for_each(|d, &s| {
                if s < 0 {
                    *d = 0.0;
                }
            });
    }
}

/// The whole training pipeline on one sample (enlarged patch in, final patch out).
pub fn augment<R: Rng>(sample: &mut Sample, cfg: &AugmentationConfig, rng: &mut R) {
    spatial_transform(sample, cfg, rng);
    gaussian_noise(sample, cfg, rng);
    gaussian_blur(sample, cfg, rng);
    brightness(sample, cfg, rng);
    contrast(sample, cfg, rng);
    simulate_low_resolution(sample, cfg, rng);
    gamma(sample, cfg.p_gamma_inverted, true, cfg, rng);
    gamma(sample, cfg.p_gamma, false, cfg, rng);
    mirror(sample, cfg, rng);
    mask_image(sample, cfg);
}

// ---------------------------------------------------------------------------------------
// targets

/// Nearest-exact resize of a `(ch, z, y, x)` target to `shape`.
fn nearest_resize(t: &Array4<f32>, shape: [usize; 3]) -> Array4<f32> {
    let sh = [t.shape()[1], t.shape()[2], t.shape()[3]];
    let idx: Vec<Vec<usize>> = (0..3)
        .map(|a| {
            let scale = sh[a] as f64 / shape[a] as f64;
            (0..shape[a])
                .map(|d| (((d as f64 + 0.5) * scale).floor() as usize).min(sh[a] - 1))
                .collect()
        })
        .collect();
    Array4::from_shape_fn(
        (t.shape()[0], shape[0], shape[1], shape[2]),
        |(c, z, y, x)| t[[c, idx[0][z], idx[1][y], idx[2][x]]],
    )
}

/// Target transforms shared by training and validation: `-1 → 0`
/// (`RemoveLabelTansform`), regions → 0/1 channels (ignore label appended as last channel),
/// then one target per deep-supervision scale (`DownsampleSegForDSTransform`, nearest-exact,
/// shape `round(shape · scale)`). `ds_scales` empty → one full-resolution target. Scales have
/// 2 entries for 2-D configurations (applied to y, x).
pub fn make_targets(
    seg: &Array4<i16>,
    labels: &LabelInfo,
    ds_scales: &[Vec<f64>],
) -> Vec<Array4<f32>> {
    let seg0 = seg.mapv(|v| if v == -1 { 0 } else { v });
    let sh = [seg.shape()[1], seg.shape()[2], seg.shape()[3]];
    let full: Array4<f32> = match &labels.regions {
        None => seg0.mapv(f32::from),
        Some(regions) => {
            let mut rs: Vec<Vec<i64>> = regions.clone();
            if let Some(ig) = labels.ignore_label {
                rs.push(vec![ig]);
            }
            Array4::from_shape_fn((rs.len(), sh[0], sh[1], sh[2]), |(r, z, y, x)| {
                let v = i64::from(seg0[[0, z, y, x]]);
                if rs[r].contains(&v) {
                    1.0
                } else {
                    0.0
                }
            })
        }
    };
    if ds_scales.is_empty() {
        return vec![full];
    }
    ds_scales
        .iter()
        .map(|s| {
            let s3: [f64; 3] = match s.as_slice() {
                [y, x] => [1.0, *y, *x],
                [z, y, x] => [*z, *y, *x],
                _ => [1.0; 3],
            };
            if s3.iter().all(|&v| v == 1.0) {
                return full.clone();
            }
            let shape: [usize; 3] =
                std::array::from_fn(|a| ((sh[a] as f64 * s3[a]).round_ties_even() as usize).max(1));
            nearest_resize(&full, shape)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn sample(shape: [usize; 4]) -> Sample {
        let data =
            Array4::from_shape_fn((shape[0], shape[1], shape[2], shape[3]), |(c, z, y, x)| {
                ((c * 7 + z * 5 + y * 3 + x) % 11) as f32 * 0.3 - 1.0
            });
        let seg = Array4::from_shape_fn((1, shape[1], shape[2], shape[3]), |(_, z, y, x)| {
            ((z + 2 * y + x) % 3) as i16
        });
        Sample {
            prev: None,
            data,
            seg,
            key: "k".into(),
        }
    }

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn defaults_like_nnunet() {
        let c = AugmentationConfig::nnunet_default(&[64, 128, 128]);
        assert!(!c.do_dummy_2d);
        assert!((c.rotation.1 - deg(30.0)).abs() < 1e-12);
        let c = AugmentationConfig::nnunet_default(&[16, 160, 160]);
        assert!(c.do_dummy_2d);
        assert_eq!(c.initial_patch_size()[0], 16);
        let c2 = AugmentationConfig::nnunet_default(&[512, 256]);
        assert!((c2.rotation.1 - deg(15.0)).abs() < 1e-12);
        assert_eq!(c2.mirror_axes, vec![0, 1]);
    }

    #[test]
    fn patch_size_like_batchgenerators() {
        // get_patch_size([128,128,128], 30°, 30°, 30°, (0.85, 1.25)) = [205, 205, 205]
        assert_eq!(
            get_patch_size(&[128, 128, 128], deg(30.0), (0.85, 1.25)),
            vec![205, 205, 205]
        );
        // 2D, ±180° capped at 90°: [512, 256] → bbox rotated by 90 = [256, 512] → max / 0.85
        assert_eq!(
            get_patch_size(&[512, 256], deg(180.0), (0.85, 1.25)),
            vec![602, 602]
        );
        assert_eq!(
            get_patch_size(&[40, 56, 40], deg(30.0), (0.85, 1.25)),
            vec![73, 80, 64]
        );
        assert_eq!(
            get_patch_size(&[512, 256], deg(15.0), (0.85, 1.25)),
            vec![659, 301]
        );
    }

    #[test]
    fn ds_scales_cumulative() {
        let s =
            ds_scales_from_strides(&[vec![1, 1, 1], vec![2, 2, 2], vec![1, 2, 2], vec![2, 2, 2]]);
        assert_eq!(
            s,
            vec![
                vec![1.0, 1.0, 1.0],
                vec![0.5, 0.5, 0.5],
                vec![0.5, 0.25, 0.25]
            ]
        );
    }

    #[test]
    fn probability_zero_is_identity_after_crop() {
        let cfg = AugmentationConfig::none(&[4, 4, 4]);
        let s0 = sample([2, 6, 6, 6]);
        let mut s = s0.clone();
        augment(&mut s, &cfg, &mut rng(1));
        assert_eq!(s.data.dim(), (2, 4, 4, 4));
        assert_eq!(
            s.data,
            s0.data.slice(ndarray::s![.., 1..5, 1..5, 1..5]).to_owned()
        );
        assert_eq!(
            s.seg,
            s0.seg.slice(ndarray::s![.., 1..5, 1..5, 1..5]).to_owned()
        );
    }

    #[test]
    fn rotation_zero_scale_one_is_identity() {
        let s0 = sample([2, 5, 6, 7]);
        let mut s = s0.clone();
        let id = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        affine_resample(&mut s, &id, [5, 6, 7]);
        assert_eq!(s.seg, s0.seg);
        for (a, b) in s.data.iter().zip(s0.data.iter()) {
            assert!((a - b).abs() < 1e-5);
        }
        // cropping variant equals center_crop
        let mut a = s0.clone();
        let mut b = s0.clone();
        affine_resample(&mut a, &id, [3, 4, 5]);
        center_crop(&mut b, [3, 4, 5]);
        assert_eq!(a.seg, b.seg);
    }

    #[test]
    fn rotation_by_90_degrees_in_plane() {
        let s0 = sample([1, 1, 5, 5]);
        let mut s = s0.clone();
        affine_resample(&mut s, &rot_x(deg(90.0)), [1, 5, 5]);
        // out (y, x) samples in (y', x') = (−(x−2)+2, (y−2)+2) → a rotated copy
        for y in 0..5 {
            for x in 0..5 {
                let (iy, ix) = (4 - x, y);
                assert_eq!(s.seg[[0, 0, y, x]], s0.seg[[0, 0, iy, ix]]);
                assert!((s.data[[0, 0, y, x]] - s0.data[[0, 0, iy, ix]]).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn spatial_keeps_label_set_and_shape() {
        let mut cfg = AugmentationConfig::nnunet_default(&[6, 6, 6]);
        cfg.p_rotation = 1.0;
        cfg.p_scaling = 1.0;
        for seed in 0..5 {
            let mut s = sample([2, 10, 10, 10]);
            spatial_transform(&mut s, &cfg, &mut rng(seed));
            assert_eq!(s.data.dim(), (2, 6, 6, 6));
            assert!(s.seg.iter().all(|v| (-1..=2).contains(v)));
            assert!(s.seg.iter().any(|&v| v >= 0));
        }
    }

    #[test]
    fn full_pipeline_shapes_3d_dummy2d_and_2d() {
        for (patch, shape) in [
            (vec![6usize, 6, 6], [2usize, 1, 1, 1]),
            (vec![4, 16, 16], [1, 1, 1, 1]),
            (vec![8, 8], [1, 1, 1, 1]),
        ] {
            let mut cfg = AugmentationConfig::nnunet_default(&patch);
            for p in [
                &mut cfg.p_rotation,
                &mut cfg.p_scaling,
                &mut cfg.p_noise,
                &mut cfg.p_blur,
                &mut cfg.p_brightness,
                &mut cfg.p_contrast,
                &mut cfg.p_lowres,
                &mut cfg.p_gamma,
                &mut cfg.p_gamma_inverted,
            ] {
                *p = 1.0;
            }
            let init = to3(&cfg.initial_patch_size());
            let out = cfg.patch_3d();
            for seed in 0..3 {
                let mut s = sample([shape[0], init[0], init[1], init[2]]);
                augment(&mut s, &cfg, &mut rng(seed));
                assert_eq!(
                    s.data.dim(),
                    (shape[0], out[0], out[1], out[2]),
                    "{patch:?}"
                );
                assert_eq!(s.seg.dim(), (1, out[0], out[1], out[2]));
                assert!(s.seg.iter().all(|v| (-1..=2).contains(v)));
                assert!(s.data.iter().all(|v| v.is_finite()));
            }
        }
        assert!(AugmentationConfig::nnunet_default(&[4, 16, 16]).do_dummy_2d);
    }

    #[test]
    fn mirroring_twice_is_identity() {
        let s0 = sample([2, 3, 4, 5]);
        let mut s = s0.clone();
        flip_axis(&mut s, 3);
        assert_ne!(s, s0);
        assert_eq!(s.data[[0, 0, 0, 0]], s0.data[[0, 0, 0, 4]]);
        flip_axis(&mut s, 3);
        assert_eq!(s, s0);
        let cfg = AugmentationConfig {
            p_mirror: 1.0,
            ..AugmentationConfig::none(&[3, 4, 5])
        };
        let mut m = s0.clone();
        mirror(&mut m, &cfg, &mut rng(0));
        mirror(&mut m, &cfg, &mut rng(0));
        assert_eq!(m, s0);
    }

    #[test]
    fn intensity_transforms_change_only_data() {
        let s0 = sample([2, 4, 5, 6]);
        let all_on = AugmentationConfig {
            p_noise: 1.0,
            p_blur: 1.0,
            blur_p_per_channel: 1.0,
            p_brightness: 1.0,
            p_contrast: 1.0,
            p_lowres: 1.0,
            lowres_p_per_channel: 1.0,
            p_gamma: 1.0,
            p_gamma_inverted: 1.0,
            ..AugmentationConfig::none(&[4, 5, 6])
        };
        type T = fn(&mut Sample, &AugmentationConfig, &mut ChaCha8Rng);
        let ts: [T; 7] = [
            gaussian_noise,
            gaussian_blur,
            brightness,
            contrast,
            simulate_low_resolution,
            |s, c, r| gamma(s, 1.0, false, c, r),
            |s, c, r| gamma(s, 1.0, true, c, r),
        ];
        for (i, t) in ts.iter().enumerate() {
            let mut s = s0.clone();
            t(&mut s, &all_on, &mut rng(7));
            assert_eq!(s.seg, s0.seg, "transform {i}");
            assert_eq!(s.data.dim(), s0.data.dim());
            assert!(s.data.iter().all(|v| v.is_finite()));
            assert_ne!(s.data, s0.data, "transform {i} had no effect");
            // probability 0 → identity
            let mut s = s0.clone();
            t(&mut s, &AugmentationConfig::none(&[4, 5, 6]), &mut rng(7));
            if i < 5 {
                assert_eq!(s, s0, "transform {i} with p = 0");
            }
        }
        // deterministic per seed
        let mut a = s0.clone();
        let mut b = s0.clone();
        augment(&mut a, &all_on, &mut rng(3));
        augment(&mut b, &all_on, &mut rng(3));
        assert_eq!(a, b);
    }

    #[test]
    fn gamma_retains_stats_and_contrast_range() {
        let s0 = sample([1, 4, 5, 6]);
        let mut s = s0.clone();
        let cfg = AugmentationConfig::none(&[4, 5, 6]);
        gamma(&mut s, 1.0, false, &cfg, &mut rng(2));
        let m = |a: &Array4<f32>| a.iter().map(|&v| f64::from(v)).sum::<f64>() / a.len() as f64;
        assert!((m(&s.data) - m(&s0.data)).abs() < 1e-4);
        let mut s = s0.clone();
        let cfg = AugmentationConfig {
            p_contrast: 1.0,
            ..cfg
        };
        contrast(&mut s, &cfg, &mut rng(4));
        let (lo, hi) = (-1.0f32, 2.0f32);
        assert!(s.data.iter().all(|&v| v >= lo - 1e-6 && v <= hi + 1e-6));
    }

    #[test]
    fn blur_preserves_constant_and_smooths() {
        let mut v = Array3::<f32>::zeros((1, 1, 9));
        v[[0, 0, 4]] = 1.0;
        convolve_axis(v.view_mut(), 2, &gaussian_kernel(1.0));
        assert!((v.sum() - 1.0).abs() < 1e-5);
        assert!(v[[0, 0, 4]] < 0.5 && v[[0, 0, 3]] > 0.2);
        let mut c = Array3::<f32>::from_elem((3, 4, 5), 2.0);
        convolve_axis(c.view_mut(), 0, &gaussian_kernel(0.7));
        assert!(c.iter().all(|&x| (x - 2.0).abs() < 1e-5));
    }

    #[test]
    fn lowres_dummy2d_keeps_axis0_slices_independent() {
        let mut s = sample([1, 3, 8, 8]);
        s.data.slice_mut(ndarray::s![0, 1, .., ..]).fill(5.0);
        let cfg = AugmentationConfig {
            p_lowres: 1.0,
            lowres_p_per_channel: 1.0,
            lowres_scale: (0.5, 0.5),
            do_dummy_2d: true,
            ..AugmentationConfig::none(&[3, 8, 8])
        };
        simulate_low_resolution(&mut s, &cfg, &mut rng(0));
        assert!(s
            .data
            .slice(ndarray::s![0, 1, .., ..])
            .iter()
            .all(|&v| (v - 5.0).abs() < 1e-5));
    }

    #[test]
    fn targets_labels_regions_and_ds() {
        let mut seg = Array4::<i16>::zeros((1, 2, 4, 4));
        seg[[0, 0, 0, 0]] = -1;
        seg[[0, 1, 2, 2]] = 2;
        seg[[0, 1, 3, 3]] = 3; // ignore
        seg[[0, 0, 1, 1]] = 1;
        let t = make_targets(
            &seg,
            &LabelInfo::plain(3),
            &[vec![1.0, 1.0, 1.0], vec![0.5, 0.5, 0.5]],
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t[0][[0, 0, 0, 0]], 0.0);
        assert_eq!(t[0][[0, 1, 2, 2]], 2.0);
        assert_eq!(t[1].dim(), (1, 1, 2, 2));
        // nearest-exact picks index 1 of each pair: (z=1, y=1|3, x=1|3)
        assert_eq!(t[1][[0, 0, 1, 1]], 3.0);
        let labels = LabelInfo {
            all_labels: vec![0, 1, 2],
            regions: Some(vec![vec![1, 2], vec![2]]),
            ignore_label: Some(3),
        };
        let t = make_targets(&seg, &labels, &[]);
        assert_eq!(t[0].dim(), (3, 2, 4, 4));
        assert_eq!(t[0][[0, 1, 2, 2]], 1.0);
        assert_eq!(t[0][[1, 1, 2, 2]], 1.0);
        assert_eq!(t[0][[1, 0, 1, 1]], 0.0);
        assert_eq!(t[0][[0, 0, 1, 1]], 1.0);
        assert_eq!(t[0][[2, 1, 3, 3]], 1.0);
        assert_eq!(t[0].sum(), 4.0);
        // 2-D scales apply to (y, x)
        let t = make_targets(
            &seg.slice(ndarray::s![.., 0..1, .., ..]).to_owned(),
            &LabelInfo::plain(3),
            &[vec![0.5, 0.5]],
        );
        assert_eq!(t[0].dim(), (1, 1, 2, 2));
    }

    /// Fraction of voxels inside the image (seg ≥ 0) where `data > 0.5` agrees with `seg == 1`.
    fn agreement(data: &Array4<f32>, seg: &Array4<i16>) -> (f64, usize) {
        let (mut same, mut n) = (0usize, 0usize);
        for (d, s) in data.index_axis(Axis(0), 0).iter().zip(seg.iter()) {
            if *s >= 0 {
                n += 1;
                same += usize::from((*d > 0.5) == (*s == 1));
            }
        }
        (same as f64 / n.max(1) as f64, n)
    }

    /// Image intensity = label (an asymmetric "L" with arms of different lengths plus an
    /// off-centre block): after rotation, scaling and mirroring the thresholded image must
    /// still match the augmented label, which catches a flipped axis or a transposed rotation
    /// applied to only one of them.
    #[test]
    fn image_and_label_stay_aligned() {
        for patch in [vec![12usize, 16, 16], vec![24, 24]] {
            let mut cfg = AugmentationConfig {
                p_rotation: 1.0,
                p_scaling: 1.0,
                p_mirror: 1.0,
                ..AugmentationConfig::none(&patch)
            };
            cfg.mask_channels.clear();
            let init = to3(&cfg.initial_patch_size());
            let [nz, ny, nx] = init;
            let seg = Array4::from_shape_fn((1, nz, ny, nx), |(_, z, y, x)| {
                let (fz, fy, fx) = (
                    z as f64 / nz as f64,
                    y as f64 / ny as f64,
                    x as f64 / nx as f64,
                );
                let z_ok = nz == 1 || (0.2..0.75).contains(&fz);
                let long_arm = (0.15..0.85).contains(&fy) && (0.2..0.35).contains(&fx);
                let short_arm = (0.7..0.85).contains(&fy) && (0.2..0.6).contains(&fx);
                let block = (0.2..0.4).contains(&fy) && (0.6..0.8).contains(&fx) && fz < 0.5;
                i16::from(z_ok && (long_arm || short_arm || block))
            });
            let data = seg.mapv(f32::from);
            let s0 = Sample {
                prev: None,
                data,
                seg,
                key: "aligned".into(),
            };
            let mut reference = s0.clone();
            center_crop(&mut reference, cfg.patch_3d());
            let mut changed = 0;
            for seed in 0..8 {
                let mut s = s0.clone();
                augment(&mut s, &cfg, &mut rng(seed));
                assert_eq!(&s.data.shape()[1..], &cfg.patch_3d()[..]);
                let fg = s.seg.iter().filter(|&&v| v == 1).count();
                assert!(fg > 10, "{patch:?} seed {seed}: foreground left the patch");
                let (agree, n) = agreement(&s.data, &s.seg);
                assert!(n > 0);
                assert!(
                    agree >= 0.99,
                    "{patch:?} seed {seed}: image and label agree on only {:.2}%",
                    agree * 100.0
                );
                if s.seg != reference.seg {
                    changed += 1;
                }
                // the check is sensitive: mirroring or transposing only the image breaks it
                let axes: &[usize] = if patch.len() == 2 {
                    &[2, 3]
                } else {
                    &[1, 2, 3]
                };
                for &a in axes {
                    let mut flipped = s.data.clone();
                    flipped.invert_axis(Axis(a));
                    let (bad, _) = agreement(&flipped, &s.seg);
                    assert!(bad < 0.97, "{patch:?} seed {seed} axis {a}: {bad}");
                }
                let mut t = s.data.clone();
                if patch.len() == 3 && s.data.shape()[1] == s.data.shape()[2] {
                    t.swap_axes(1, 2);
                } else if s.data.shape()[2] == s.data.shape()[3] {
                    t.swap_axes(2, 3);
                }
                if t.shape() == s.data.shape() && t != s.data {
                    let (bad, _) = agreement(&t, &s.seg);
                    assert!(bad < 0.97, "{patch:?} seed {seed} transposed: {bad}");
                }
            }
            assert!(changed >= 6, "{patch:?}: transforms had no effect");
        }
    }
}
