//! nnU-Net's sliding-window inference (`inference/sliding_window_prediction.py` and
//! `nnUNetPredictor.predict_sliding_window_return_logits`): tile steps, the Gaussian importance
//! map, padding of small images, mirroring test-time augmentation and Gaussian-weighted
//! accumulation.

use super::PredictError;
use ndarray::{s, Array3, Array4, ArrayD, ArrayView4, ArrayViewD, Axis, IxDyn, Zip};

/// A network applied to one tile: input `(C, *patch)` (2 or 3 spatial axes), output logits
/// `(K, *patch)`. Closures `Fn(ArrayViewD<f32>) -> Result<ArrayD<f32>, PredictError>` implement
/// it, so the sliding window can be tested without weights.
pub trait TileNetwork: Send + Sync {
    fn predict_tile(&self, tile: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>, PredictError>;
}

impl<F> TileNetwork for F
where
    F: Fn(ArrayViewD<'_, f32>) -> Result<ArrayD<f32>, PredictError> + Send + Sync,
{
    fn predict_tile(&self, tile: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>, PredictError> {
        self(tile)
    }
}

/// nnU-Net's `compute_steps_for_sliding_window`: `n = ceil((size - patch) / (patch * step)) + 1`
/// tiles per axis, spread evenly (`np.round`, ties to even) between `0` and `size - patch`.
pub fn compute_steps_for_sliding_window(
    image_size: &[usize],
    patch: &[usize],
    step_size: f64,
) -> Result<Vec<Vec<usize>>, PredictError> {
    if !(step_size > 0.0 && step_size <= 1.0) {
        return Err(PredictError::Config(format!(
            "step_size must be in (0, 1], got {step_size}"
        )));
    }
    if image_size.len() != patch.len() {
        return Err(PredictError::Config(format!(
            "image size {image_size:?} and patch size {patch:?} have different dimensionality"
        )));
    }
    let mut steps = Vec::with_capacity(patch.len());
    for (&size, &p) in image_size.iter().zip(patch) {
        if p == 0 || size < p {
            return Err(PredictError::Config(format!(
                "image size {image_size:?} must be at least the patch size {patch:?} (pad first)"
            )));
        }
        let target = p as f64 * step_size;
        let n = ((size - p) as f64 / target).ceil() as usize + 1;
        let max_step = (size - p) as f64;
        let actual = if n > 1 {
            max_step / (n - 1) as f64
        } else {
            99_999_999_999.0
        };
        steps.push(
            (0..n)
                .map(|i| (actual * i as f64).round_ties_even() as usize)
                .collect(),
        );
    }
    Ok(steps)
}

/// nnU-Net's `compute_gaussian(tile_size, sigma_scale, value_scaling_factor)`: a unit impulse at
/// `patch // 2` filtered with scipy's `gaussian_filter` (sigma `patch * sigma_scale`, kernel
/// truncated at 4 sigma, constant-0 border), scaled so its maximum is `value_scaling_factor`;
/// zeros are replaced by the smallest non-zero value. Returned flattened in C order.
/// (nnU-Net then casts to fp16; we keep f32.)
pub fn compute_gaussian(
    patch: &[usize],
    sigma_scale: f64,
    value_scaling_factor: f64,
) -> ArrayD<f32> {
    // separable: the filtered impulse is the outer product of the 1-D kernels around the centre
    let per_axis: Vec<Vec<f64>> = patch
        .iter()
        .map(|&p| {
            let sigma = p as f64 * sigma_scale;
            let centre = (p / 2) as i64;
            if sigma <= 0.0 {
                return (0..p as i64)
                    .map(|i| if i == centre { 1.0 } else { 0.0 })
                    .collect();
            }
            let radius = (4.0 * sigma + 0.5) as i64; // scipy: int(truncate * sd + 0.5)
            let w = |x: i64| (-0.5 / (sigma * sigma) * (x * x) as f64).exp();
            let norm: f64 = (-radius..=radius).map(w).sum();
            (0..p as i64)
                .map(|i| {
                    let d = i - centre;
                    if d.abs() <= radius {
                        w(d) / norm
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    let mut g = ArrayD::<f64>::zeros(IxDyn(patch));
    for (idx, v) in g.indexed_iter_mut() {
        *v = (0..patch.len()).map(|a| per_axis[a][idx[a]]).product();
    }
    let max = g.iter().cloned().fold(0.0f64, f64::max);
    let scale = if max > 0.0 {
        value_scaling_factor / max
    } else {
        1.0
    };
    let mut g = g.mapv(|v| (v * scale) as f32);
    let min_nonzero = g
        .iter()
        .cloned()
        .filter(|&v| v != 0.0)
        .fold(f32::INFINITY, f32::min);
    if min_nonzero.is_finite() {
        g.mapv_inplace(|v| if v == 0.0 { min_nonzero } else { v });
    }
    g
}

/// Settings of one sliding-window pass.
#[derive(Debug, Clone)]
pub struct SlidingWindowOptions {
    /// The configuration's patch size (2 entries for a 2d configuration: applied per slice of
    /// axis 0).
    pub patch_size: Vec<usize>,
    /// Tile overlap: step = `step_size * patch` (nnU-Net default 0.5).
    pub step_size: f64,
    /// Mirroring axes of the patch (spatial, 0-based) for test-time augmentation; `None` or
    /// empty disables it.
    pub mirror_axes: Option<Vec<usize>>,
    /// Number of network outputs (classes or regions).
    pub num_classes: usize,
}

/// Padding of each spatial axis `[before, after]` so that the image is at least `min_shape`
/// (nnU-Net's `pad_nd_image`: the difference is split, the odd voxel goes after).
pub fn padding_for(shape: [usize; 3], min_shape: [usize; 3]) -> [[usize; 2]; 3] {
    let mut p = [[0usize; 2]; 3];
    for a in 0..3 {
        let diff = min_shape[a].saturating_sub(shape[a]);
        p[a] = [diff / 2, diff / 2 + diff % 2];
    }
    p
}

fn pad_constant0(data: ArrayView4<f32>, pad: [[usize; 2]; 3]) -> Array4<f32> {
    let (c, z, y, x) = data.dim();
    let mut out = Array4::<f32>::zeros((
        c,
        z + pad[0][0] + pad[0][1],
        y + pad[1][0] + pad[1][1],
        x + pad[2][0] + pad[2][1],
    ));
    out.slice_mut(s![
        ..,
        pad[0][0]..pad[0][0] + z,
        pad[1][0]..pad[1][0] + y,
        pad[2][0]..pad[2][0] + x
    ])
    .assign(&data);
    out
}

/// Every non-empty combination of `axes`, in `itertools.combinations` order by size.
pub fn mirror_combinations(axes: &[usize]) -> Vec<Vec<usize>> {
    let n = axes.len();
    let mut out = vec![];
    for k in 1..=n {
        // lexicographic k-combinations of indices
        let mut idx: Vec<usize> = (0..k).collect();
        loop {
            out.push(idx.iter().map(|&i| axes[i]).collect());
            let mut i = k;
            let mut advanced = false;
            while i > 0 {
                i -= 1;
                if idx[i] != i + n - k {
                    idx[i] += 1;
                    for j in i + 1..k {
                        idx[j] = idx[j - 1] + 1;
                    }
                    advanced = true;
                    break;
                }
            }
            if !advanced {
                break;
            }
        }
    }
    out
}

/// Flips the spatial `axes` (0-based, after the leading channel axis); standard layout result.
fn flip(a: ArrayViewD<'_, f32>, axes: &[usize]) -> ArrayD<f32> {
    let mut v = a;
    for &ax in axes {
        v.invert_axis(Axis(ax + 1));
    }
    v.as_standard_layout().into_owned()
}

/// nnU-Net's `_internal_maybe_mirror_and_predict`: the network on the tile plus every flipped
/// version (flipped back), averaged.
pub fn predict_tile_with_tta(
    net: &dyn TileNetwork,
    tile: ArrayViewD<'_, f32>,
    mirror_axes: Option<&[usize]>,
    num_classes: usize,
) -> Result<ArrayD<f32>, PredictError> {
    let check = |out: &ArrayD<f32>| -> Result<(), PredictError> {
        let mut expected = tile.shape().to_vec();
        expected[0] = num_classes;
        if out.shape() != expected.as_slice() {
            return Err(PredictError::Config(format!(
                "the network returned shape {:?} for a tile of shape {:?}; expected {expected:?}",
                out.shape(),
                tile.shape()
            )));
        }
        Ok(())
    };
    let mut pred = net.predict_tile(tile.view())?;
    check(&pred)?;
    let axes = mirror_axes.unwrap_or(&[]);
    let spatial = tile.ndim() - 1;
    if let Some(&bad) = axes.iter().find(|&&a| a >= spatial) {
        return Err(PredictError::Config(format!(
            "mirroring axis {bad} does not exist for a {spatial}-d patch"
        )));
    }
    let combos = mirror_combinations(axes);
    for combo in &combos {
        let flipped = flip(tile.view(), combo);
        let out = net.predict_tile(flipped.view())?;
        check(&out)?;
        let back = flip(out.view(), combo);
        pred += &back;
    }
    if !combos.is_empty() {
        let n = (combos.len() + 1) as f32;
        pred.mapv_inplace(|v| v / n);
    }
    Ok(pred)
}

/// nnU-Net's `predict_sliding_window_return_logits` for one network: `data` `(C, z, y, x)`
/// (preprocessed) → logits `(K, z, y, x)`. The image is zero-padded to at least the patch,
/// tiled, each tile predicted (with TTA) and accumulated with the Gaussian weight; the sum is
/// divided by the summed weights and the padding removed. Memory: one `(K, *padded)`
/// accumulator and one `(*padded)` weight map.
pub fn sliding_window_logits(
    net: &dyn TileNetwork,
    data: ArrayView4<'_, f32>,
    opts: &SlidingWindowOptions,
) -> Result<Array4<f32>, PredictError> {
    let (_, z, y, x) = data.dim();
    let patch = &opts.patch_size;
    let is_2d = match patch.len() {
        2 => true,
        3 => false,
        _ => {
            return Err(PredictError::Config(format!(
                "patch size {patch:?} must have 2 or 3 entries"
            )))
        }
    };
    let min_shape = if is_2d {
        [1, patch[0], patch[1]]
    } else {
        [patch[0], patch[1], patch[2]]
    };
    let pad = padding_for([z, y, x], min_shape);
    let padded_owned;
    let padded = if pad.iter().all(|p| p[0] == 0 && p[1] == 0) {
        data
    } else {
        padded_owned = pad_constant0(data, pad);
        padded_owned.view()
    };
    let (_, pz, py, px) = padded.dim();
    let k = opts.num_classes;
    let gaussian = compute_gaussian(patch, 1.0 / 8.0, 10.0);
    let mut acc = Array4::<f32>::zeros((k, pz, py, px));
    let mut weight = Array3::<f32>::zeros((pz, py, px));
    let mirror = opts.mirror_axes.as_deref().filter(|a| !a.is_empty());

    if is_2d {
        let steps = compute_steps_for_sliding_window(&[py, px], patch, opts.step_size)?;
        let g2 = gaussian
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| PredictError::Config(format!("gaussian: {e}")))?;
        for d in 0..pz {
            for &sy in &steps[0] {
                for &sx in &steps[1] {
                    let tile = padded.slice(s![.., d, sy..sy + patch[0], sx..sx + patch[1]]);
                    let pred = predict_tile_with_tta(net, tile.into_dyn(), mirror, k)?;
                    let pred = pred
                        .into_dimensionality::<ndarray::Ix3>()
                        .map_err(|e| PredictError::Config(format!("tile output: {e}")))?;
                    for c in 0..k {
                        let mut a = acc.slice_mut(s![c, d, sy..sy + patch[0], sx..sx + patch[1]]);
                        Zip::from(&mut a)
                            .and(pred.index_axis(Axis(0), c))
                            .and(&g2)
                            .for_each(|a, &p, &g| *a += p * g);
                    }
                    let mut w = weight.slice_mut(s![d, sy..sy + patch[0], sx..sx + patch[1]]);
                    w += &g2;
                }
            }
        }
    } else {
        let steps = compute_steps_for_sliding_window(&[pz, py, px], patch, opts.step_size)?;
        let g3 = gaussian
            .view()
            .into_dimensionality::<ndarray::Ix3>()
            .map_err(|e| PredictError::Config(format!("gaussian: {e}")))?;
        for &sz in &steps[0] {
            for &sy in &steps[1] {
                for &sx in &steps[2] {
                    let sl = s![.., sz..sz + patch[0], sy..sy + patch[1], sx..sx + patch[2]];
                    let tile = padded.slice(sl);
                    let pred = predict_tile_with_tta(net, tile.into_dyn(), mirror, k)?;
                    let pred = pred
                        .into_dimensionality::<ndarray::Ix4>()
                        .map_err(|e| PredictError::Config(format!("tile output: {e}")))?;
                    let mut a = acc.slice_mut(sl);
                    Zip::from(a.outer_iter_mut())
                        .and(pred.outer_iter())
                        .for_each(|mut a, p| {
                            Zip::from(&mut a)
                                .and(&p)
                                .and(&g3)
                                .for_each(|a, &p, &g| *a += p * g);
                        });
                    let mut w = weight.slice_mut(s![
                        sz..sz + patch[0],
                        sy..sy + patch[1],
                        sx..sx + patch[2]
                    ]);
                    w += &g3;
                }
            }
        }
    }
    // crop the padding away, then normalise
    let mut out = acc
        .slice(s![
            ..,
            pad[0][0]..pad[0][0] + z,
            pad[1][0]..pad[1][0] + y,
            pad[2][0]..pad[2][0] + x
        ])
        .to_owned();
    let w = weight.slice(s![
        pad[0][0]..pad[0][0] + z,
        pad[1][0]..pad[1][0] + y,
        pad[2][0]..pad[2][0] + x
    ]);
    for mut ch in out.outer_iter_mut() {
        Zip::from(&mut ch).and(&w).for_each(|a, &w| *a /= w);
    }
    if out.iter().any(|v| !v.is_finite()) {
        return Err(PredictError::Config(
            "the predicted logits contain inf/NaN (nnU-Net raises here as well)".into(),
        ));
    }
    Ok(out)
}
