//! nnU-Net's cascade inputs: the previous stage's (3d_lowres) segmentation, one-hot encoded
//! over the foreground labels, appended to the image channels of `3d_cascade_fullres`.
//!
//! During training the one-hot channels follow the spatial augmentation (linear weights per
//! label + argmax, i.e. the same rule as the segmentation), skip the intensity transforms, and
//! then get nnU-Net's two cascade-specific corruptions so the network learns not to trust the
//! lowres prediction blindly:
//! - `ApplyRandomBinaryOperatorTransform` (p 0.4 per sample, every label): dilation, erosion,
//!   opening or closing with a ball of random radius in [1, 8) voxels (computed exactly through
//!   a Euclidean distance transform, so the cost does not grow with the radius);
//! - `RemoveRandomConnectedComponentFromOneHotEncodingTransform` (p 0.2 per sample, every
//!   label): one random 26-connected component covering at most 15% of the patch is deleted.

use ndarray::{Array4, ArrayView4, Axis, Zip};
use rand::seq::SliceRandom;
use rand::Rng;
use std::path::{Path, PathBuf};

/// Where the previous stage's segmentations for a cascade live and how to encode them.
#[derive(Debug, Clone, PartialEq)]
pub struct PrevStage {
    /// `{results}/{dataset}/{trainer}__{plans}__{previous_stage}/predicted_next_stage/{configuration}`.
    pub folder: PathBuf,
    /// Foreground labels (one channel each, in this order).
    pub foreground_labels: Vec<i64>,
}

/// The file of one case in a folder of next-stage inputs (`datasets::ModelDir::next_stage`;
/// int16 `(1, z, y, x)` `.npy`, in the next stage's preprocessed geometry).
pub fn prev_stage_file(folder: &Path, case: &str) -> PathBuf {
    folder.join(format!("{case}.npy"))
}

/// The cases of `cases` without a file in the folder of next-stage inputs `folder` (sorted,
/// each once).
pub fn missing_prev_stage_cases(folder: &Path, cases: &[String]) -> Vec<String> {
    let missing: std::collections::BTreeSet<&String> = cases
        .iter()
        .filter(|c| !prev_stage_file(folder, c).is_file())
        .collect();
    missing.into_iter().cloned().collect()
}

/// One-hot `(n_fg, z, y, x)` float encoding of the label map `seg` (`(1, z, y, x)`); labels
/// not in `fg` (background, -1) are all-zero.
pub fn one_hot(seg: ArrayView4<i16>, fg: &[i64]) -> Array4<f32> {
    let sh = seg.shape();
    let mut out = Array4::<f32>::zeros((fg.len(), sh[1], sh[2], sh[3]));
    for (c, &l) in fg.iter().enumerate() {
        Zip::from(out.index_axis_mut(Axis(0), c))
            .and(seg.index_axis(Axis(0), 0))
            .for_each(|o, &s| {
                if i64::from(s) == l {
                    *o = 1.0;
                }
            });
    }
    out
}

/// `data` `(c, ...)` with the one-hot encoding of `seg` appended as extra channels.
pub fn append_one_hot(data: ArrayView4<f32>, seg: ArrayView4<i16>, fg: &[i64]) -> Array4<f32> {
    let oh = one_hot(seg, fg);
    ndarray::concatenate(Axis(0), &[data, oh.view()]).unwrap_or_else(|_| {
        // shapes are checked by the callers; keep the image channels if they ever differ
        data.to_owned()
    })
}

/// Turns linearly interpolated one-hot channels back into one-hot: per voxel the label with
/// the largest weight wins (background weight = 1 − Σ channels), as the segmentation's
/// per-label linear weights + argmax.
pub fn rebinarize(prev: &mut Array4<f32>) {
    let n = prev.shape()[0];
    if n == 0 {
        return;
    }
    let sp: usize = prev.shape()[1..].iter().product();
    let mut flat = prev
        .view_mut()
        .into_shape_with_order((n, sp))
        .expect("contiguous one-hot channels");
    for v in 0..sp {
        let mut best = None;
        let mut best_w = 1.0 - (0..n).map(|c| flat[[c, v]]).sum::<f32>();
        for c in 0..n {
            if flat[[c, v]] > best_w {
                best_w = flat[[c, v]];
                best = Some(c);
            }
        }
        for c in 0..n {
            flat[[c, v]] = if Some(c) == best { 1.0 } else { 0.0 };
        }
    }
}

/// Squared Euclidean distance transform (Felzenszwalb & Huttenlocher) of one line in place:
/// `f[i]` is 0 at seeds and `INF` elsewhere on input, the squared distance to the nearest
/// seed on output.
fn edt_line(f: &mut [f32], v: &mut [usize], z: &mut [f32], d: &mut [f32]) {
    let n = f.len();
    // lower envelope of the parabolas rooted at the finite entries
    let mut k: Option<usize> = None;
    for q in 0..n {
        if f[q] >= INF {
            continue;
        }
        let Some(mut kk) = k else {
            k = Some(0);
            v[0] = q;
            z[0] = f32::NEG_INFINITY;
            z[1] = f32::INFINITY;
            continue;
        };
        loop {
            let p = v[kk];
            let s =
                ((f[q] + (q * q) as f32) - (f[p] + (p * p) as f32)) / (2.0 * (q as f32 - p as f32));
            // z[0] is -inf, so this never steps below the first parabola
            if s <= z[kk] {
                kk -= 1;
                continue;
            }
            kk += 1;
            v[kk] = q;
            z[kk] = s;
            z[kk + 1] = f32::INFINITY;
            break;
        }
        k = Some(kk);
    }
    if k.is_none() {
        return; // no seed on this line: everything stays INF
    }
    let mut kk = 0usize;
    for (q, dq) in d.iter_mut().enumerate().take(n) {
        while z[kk + 1] < q as f32 {
            kk += 1;
        }
        let p = v[kk];
        let dist = q as f32 - p as f32;
        *dq = dist * dist + f[p];
    }
    f.copy_from_slice(&d[..n]);
}

const INF: f32 = 1e20;

/// Squared distance of every voxel of a `(z, y, x)` volume to the nearest `true` voxel
/// (`INF` everywhere if there is none).
fn squared_edt(mask: &[bool], shape: [usize; 3]) -> Vec<f32> {
    let mut f: Vec<f32> = mask.iter().map(|&m| if m { 0.0 } else { INF }).collect();
    let maxn = shape.iter().copied().max().unwrap_or(0);
    let (mut v, mut z, mut d, mut line) = (
        vec![0usize; maxn + 1],
        vec![0f32; maxn + 2],
        vec![0f32; maxn + 1],
        vec![0f32; maxn],
    );
    let [nz, ny, nx] = shape;
    let idx = |a: usize, b: usize, c: usize| (a * ny + b) * nx + c;
    for (axis, &n) in shape.iter().enumerate() {
        let (o1, o2) = match axis {
            0 => (ny, nx),
            1 => (nz, nx),
            _ => (nz, ny),
        };
        for i in 0..o1 {
            for j in 0..o2 {
                let at = |t: usize| match axis {
                    0 => idx(t, i, j),
                    1 => idx(i, t, j),
                    _ => idx(i, j, t),
                };
                for t in 0..n {
                    line[t] = f[at(t)];
                }
                edt_line(&mut line[..n], &mut v, &mut z, &mut d);
                for t in 0..n {
                    f[at(t)] = line[t].min(INF);
                }
            }
        }
    }
    f
}

/// Binary dilation of `mask` with a ball of radius `r` (voxels within distance `r`).
pub fn dilate(mask: &[bool], shape: [usize; 3], r: f32) -> Vec<bool> {
    let r2 = r * r;
    squared_edt(mask, shape).iter().map(|&d| d <= r2).collect()
}

/// Binary erosion of `mask` with a ball of radius `r` (the outside of the image counts as
/// foreground-free only through the mask itself, as `scipy.ndimage.binary_erosion` with its
/// default `border_value=0` treats it as background).
pub fn erode(mask: &[bool], shape: [usize; 3], r: f32) -> Vec<bool> {
    let inv: Vec<bool> = mask.iter().map(|&m| !m).collect();
    let r2 = r * r;
    let d = squared_edt_with_border(&inv, shape);
    d.iter().map(|&d| d > r2).collect()
}

/// [`squared_edt`] where everything outside the volume counts as a seed (background border).
fn squared_edt_with_border(mask: &[bool], shape: [usize; 3]) -> Vec<f32> {
    let p: [usize; 3] = std::array::from_fn(|a| shape[a] + 2);
    let mut padded = vec![true; p[0] * p[1] * p[2]];
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                padded[((z + 1) * p[1] + y + 1) * p[2] + x + 1] =
                    mask[(z * shape[1] + y) * shape[2] + x];
            }
        }
    }
    // a 1-voxel-thick axis (2D patch) must not see its own border as a neighbour
    if shape[0] == 1 {
        for y in 0..p[1] {
            for x in 0..p[2] {
                padded[y * p[2] + x] = false;
                padded[(2 * p[1] + y) * p[2] + x] = false;
            }
        }
    }
    let d = squared_edt(&padded, p);
    let mut out = Vec::with_capacity(mask.len());
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                out.push(d[((z + 1) * p[1] + y + 1) * p[2] + x + 1]);
            }
        }
    }
    out
}

/// The four operators nnU-Net draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Dilation,
    Erosion,
    Opening,
    Closing,
}

/// Applies `op` with radius `r`.
pub fn binary_op(mask: &[bool], shape: [usize; 3], op: BinaryOp, r: f32) -> Vec<bool> {
    match op {
        BinaryOp::Dilation => dilate(mask, shape, r),
        BinaryOp::Erosion => erode(mask, shape, r),
        BinaryOp::Opening => dilate(&erode(mask, shape, r), shape, r),
        BinaryOp::Closing => erode(&dilate(mask, shape, r), shape, r),
    }
}

fn channel_mask(prev: &Array4<f32>, c: usize) -> Vec<bool> {
    prev.index_axis(Axis(0), c)
        .iter()
        .map(|&v| v > 0.5)
        .collect()
}

fn spatial(prev: &Array4<f32>) -> [usize; 3] {
    [prev.shape()[1], prev.shape()[2], prev.shape()[3]]
}

/// `ApplyRandomBinaryOperatorTransform(p_per_sample=0.4, strel_size=(1, 8), p_per_label=1)`:
/// labels in random order; each gets a random operator and radius; voxels it gains are
/// removed from the other labels (the encoding stays one-hot).
pub fn random_binary_operator<R: Rng>(prev: &mut Array4<f32>, p_per_sample: f64, rng: &mut R) {
    if prev.shape()[0] == 0 || rng.gen::<f64>() >= p_per_sample {
        return;
    }
    let shape = spatial(prev);
    let mut order: Vec<usize> = (0..prev.shape()[0]).collect();
    order.shuffle(rng);
    for c in order {
        let op = [
            BinaryOp::Dilation,
            BinaryOp::Erosion,
            BinaryOp::Opening,
            BinaryOp::Closing,
        ][rng.gen_range(0..4)];
        let r: f32 = rng.gen_range(1.0..8.0);
        let before = channel_mask(prev, c);
        let after = binary_op(&before, shape, op, r);
        for (i, v) in prev.index_axis_mut(Axis(0), c).iter_mut().enumerate() {
            *v = if after[i] { 1.0 } else { 0.0 };
        }
        let n = prev.shape()[0];
        for o in (0..n).filter(|&o| o != c) {
            for (i, v) in prev.index_axis_mut(Axis(0), o).iter_mut().enumerate() {
                if after[i] && !before[i] {
                    *v = 0.0;
                }
            }
        }
    }
}

/// `RemoveRandomConnectedComponentFromOneHotEncodingTransform(p_per_sample=0.2,
/// fill_with_other_class_p=0, dont_do_if_covers_more_than_x_percent=0.15, p_per_label=1)`.
pub fn remove_random_component<R: Rng>(prev: &mut Array4<f32>, p_per_sample: f64, rng: &mut R) {
    if prev.shape()[0] == 0 || rng.gen::<f64>() >= p_per_sample {
        return;
    }
    let shape = spatial(prev);
    let n_vox = shape.iter().product::<usize>();
    for c in 0..prev.shape()[0] {
        let mask = channel_mask(prev, c);
        if !mask.iter().any(|&m| m) {
            continue;
        }
        let labels = crate::evaluation::postprocess::label_components(&mask, shape);
        let mut sizes: std::collections::BTreeMap<u32, usize> = Default::default();
        for &l in &labels {
            if l != u32::MAX {
                *sizes.entry(l).or_insert(0) += 1;
            }
        }
        let small: Vec<u32> = sizes
            .iter()
            .filter(|(_, &s)| (s as f64) < 0.15 * n_vox as f64)
            .map(|(&l, _)| l)
            .collect();
        if small.is_empty() {
            continue;
        }
        let pick = small[rng.gen_range(0..small.len())];
        for (i, v) in prev.index_axis_mut(Axis(0), c).iter_mut().enumerate() {
            if labels[i] == pick {
                *v = 0.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn brute_sq_dist(mask: &[bool], shape: [usize; 3], i: usize) -> f32 {
        let [_, ny, nx] = shape;
        let (z, y, x) = (i / (ny * nx), (i / nx) % ny, i % nx);
        let mut best = INF;
        for (j, &m) in mask.iter().enumerate() {
            if m {
                let (zz, yy, xx) = (j / (ny * nx), (j / nx) % ny, j % nx);
                let d = (z as f32 - zz as f32).powi(2)
                    + (y as f32 - yy as f32).powi(2)
                    + (x as f32 - xx as f32).powi(2);
                best = best.min(d);
            }
        }
        best
    }

    #[test]
    fn edt_matches_brute_force() {
        let shape = [5, 7, 6];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for density in [0.02, 0.1, 0.5] {
            let mask: Vec<bool> = (0..210).map(|_| rng.gen::<f64>() < density).collect();
            let d = squared_edt(&mask, shape);
            for (i, &di) in d.iter().enumerate() {
                let b = brute_sq_dist(&mask, shape, i);
                if b < INF {
                    assert_eq!(di, b, "voxel {i}, density {density}");
                } else {
                    assert!(di >= INF);
                }
            }
        }
    }

    #[test]
    fn morphology_on_a_cube() {
        let shape = [9, 9, 9];
        let idx = |z: usize, y: usize, x: usize| (z * 9 + y) * 9 + x;
        let mut cube = vec![false; 729];
        for z in 3..6 {
            for y in 3..6 {
                for x in 3..6 {
                    cube[idx(z, y, x)] = true;
                }
            }
        }
        let n = |m: &[bool]| m.iter().filter(|&&v| v).count();
        // radius 1 ball: the 6-neighbourhood; dilation adds one face layer on each side
        let dil = dilate(&cube, shape, 1.0);
        assert_eq!(n(&dil), 27 + 6 * 9);
        // erosion with radius 1 keeps only the centre
        let ero = erode(&cube, shape, 1.0);
        assert_eq!(n(&ero), 1);
        assert!(ero[idx(4, 4, 4)]);
        // opening of a cube with a small ball changes nothing that closing would add
        let clo = binary_op(&cube, shape, BinaryOp::Closing, 1.0);
        assert_eq!(clo, cube);
        // erosion treats the border as background: a full volume shrinks from the edges
        let full = vec![true; 729];
        assert_eq!(n(&erode(&full, shape, 1.0)), 7 * 7 * 7);
        // 2D patch (z = 1): no erosion through the missing z neighbours
        let flat = vec![true; 81];
        assert_eq!(n(&erode(&flat, [1, 9, 9], 1.0)), 49);
    }

    #[test]
    fn one_hot_round_trip_and_rebinarize() {
        let seg = Array4::from_shape_vec((1, 1, 2, 3), vec![0i16, 1, 2, -1, 2, 1]).unwrap();
        let oh = one_hot(seg.view(), &[1, 2]);
        assert_eq!(oh.shape(), &[2, 1, 2, 3]);
        assert_eq!(
            oh.iter().copied().collect::<Vec<_>>(),
            vec![0., 1., 0., 0., 0., 1., 0., 0., 1., 0., 1., 0.]
        );
        // interpolated weights: background wins at 0.5/0.3/0.2 → argmax
        let mut w =
            Array4::from_shape_vec((2, 1, 1, 3), vec![0.3f32, 0.6, 0.1, 0.2, 0.3, 0.8]).unwrap();
        rebinarize(&mut w);
        assert_eq!(
            w.iter().copied().collect::<Vec<_>>(),
            vec![0., 1., 0., 0., 0., 1.]
        );
        let data = Array4::<f32>::ones((1, 1, 2, 3));
        let x = append_one_hot(data.view(), seg.view(), &[1, 2]);
        assert_eq!(x.shape(), &[3, 1, 2, 3]);
    }

    #[test]
    fn corruptions_keep_one_hot_and_remove_small_components() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut prev = Array4::<f32>::zeros((2, 8, 16, 16));
        // label 1: a big block, label 2: two small blobs
        prev.slice_mut(ndarray::s![0, 2..6, 2..10, 2..10]).fill(1.0);
        prev.slice_mut(ndarray::s![1, 1..3, 12..14, 12..14])
            .fill(1.0);
        prev.slice_mut(ndarray::s![1, 5..7, 12..14, 1..3]).fill(1.0);
        let orig = prev.clone();
        for _ in 0..20 {
            let mut p = orig.clone();
            random_binary_operator(&mut p, 1.0, &mut rng);
            // still one-hot
            for z in 0..8 {
                for y in 0..16 {
                    for x in 0..16 {
                        assert!(p[[0, z, y, x]] + p[[1, z, y, x]] <= 1.0);
                    }
                }
            }
        }
        let mut p = orig.clone();
        remove_random_component(&mut p, 1.0, &mut rng);
        let count = |p: &Array4<f32>, c: usize| p.index_axis(Axis(0), c).sum() as usize;
        // label 2 lost exactly one 8-voxel blob; label 1's block (256 of 2048 voxels = 12.5%)
        // is small enough to be removed too
        assert_eq!(count(&p, 1), 8);
        assert_eq!(count(&p, 0), 0);
        // p_per_sample 0: untouched
        let mut q = orig.clone();
        remove_random_component(&mut q, 0.0, &mut rng);
        random_binary_operator(&mut q, 0.0, &mut rng);
        assert_eq!(q, orig);
    }
}
