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

    /// A batch `(N, C, *patch)` → `(N, K, *patch)`; by default tile by tile. A network that
    /// runs a batch in one forward pass overrides it.
    fn predict_batch(&self, tiles: ArrayViewD<'_, f32>) -> Result<ArrayD<f32>, PredictError> {
        let outs = tiles
            .outer_iter()
            .map(|t| self.predict_tile(t))
            .collect::<Result<Vec<_>, _>>()?;
        let views: Vec<_> = outs.iter().map(|o| o.view()).collect();
        ndarray::stack(Axis(0), &views)
            .map_err(|e| PredictError::Config(format!("tile outputs of different shapes: {e}")))
    }

    /// The network as one that takes tensors on its device, where the sliding window may keep
    /// its sums on that device ([`super::on_device`]); `None` (the default): host sums.
    fn on_device(&self) -> Option<&dyn super::on_device::DeviceTiles> {
        None
    }
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

/// How the Gaussian-weighted sums are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accumulation {
    /// f32 sums: more exact than nnU-Net, twice the memory of the sums.
    F32,
    /// nnU-Net's numerics (default): the Gaussian, the logit sums, the weight sums and the
    /// quotient are rounded to f16 as in `nnUNetPredictor` (`predicted_logits` and
    /// `n_predictions` are `torch.half`), and the logit sums are *stored* in f16, so they take
    /// half the memory of f32 sums. Tiny Gaussian weights at tile corners lose most of their
    /// precision in f16, so border voxels covered only by tile corners differ from the f32
    /// result — exactly as they do in nnU-Net.
    #[default]
    NnunetF16,
}

impl Accumulation {
    /// The rounding of a value kept in this precision (f16 rounding kept as f32, or none).
    pub fn rounding(self) -> fn(f32) -> f32 {
        match self {
            Accumulation::F32 => |v| v,
            Accumulation::NnunetF16 => round_f16,
        }
    }

    /// Bytes per stored logit sum.
    pub fn sum_bytes(self) -> usize {
        match self {
            Accumulation::F32 => 4,
            Accumulation::NnunetF16 => 2,
        }
    }
}

impl std::str::FromStr for Accumulation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Accumulation::F32),
            "f16" | "fp16" | "half" | "nnunet" => Ok(Accumulation::NnunetF16),
            other => Err(format!("accumulation `{other}`: use f32 or f16")),
        }
    }
}

fn round_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// Network inputs (tiles and mirrored copies) per forward pass chosen by [`auto_batch_inputs`]:
/// about this many input voxels per pass.
pub const AUTO_BATCH_VOXELS: usize = 1 << 18;
/// Upper bound of the automatic batch.
pub const AUTO_BATCH_MAX: usize = 64;

/// The automatic `--batch_tiles`: as many inputs per forward pass as keep
/// `inputs × patch voxels` at about [`AUTO_BATCH_VOXELS`] (the activations of a forward pass
/// grow linearly with it), at least 1 and at most [`AUTO_BATCH_MAX`].
pub fn auto_batch_inputs(patch: &[usize]) -> usize {
    let voxels: usize = patch.iter().product::<usize>().max(1);
    (AUTO_BATCH_VOXELS / voxels).clamp(1, AUTO_BATCH_MAX)
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
    /// Network inputs per forward pass (`--batch_tiles`; a tile and its mirrored copies always
    /// go together, so the batch holds `max(1, n / views)` tiles); `None`: automatic
    /// ([`auto_batch_inputs`]). The result does not depend on it.
    pub batch_inputs: Option<usize>,
    /// nnU-Net's f16 numerics (default), or f32 sums.
    pub accumulation: Accumulation,
    /// Keep the sums on the network's device when it offers that ([`TileNetwork::on_device`];
    /// GPU networks); `false` is nnU-Net's `--not_on_device`.
    pub on_device: bool,
}

impl SlidingWindowOptions {
    /// nnU-Net's defaults: step 0.5, no mirroring, automatic batch, f16 sums.
    pub fn new(patch_size: &[usize], num_classes: usize) -> Self {
        SlidingWindowOptions {
            patch_size: patch_size.to_vec(),
            step_size: 0.5,
            mirror_axes: None,
            num_classes,
            batch_inputs: None,
            accumulation: Accumulation::default(),
            on_device: true,
        }
    }
}

/// The mirrored views of a tile (patch axes flipped), after checking the patch and the axes.
pub(crate) fn checked_mirror_combinations(
    opts: &SlidingWindowOptions,
) -> Result<Vec<Vec<usize>>, PredictError> {
    let patch = &opts.patch_size;
    check_patch(patch)?;
    let spatial = patch.len();
    let axes = opts.mirror_axes.as_deref().unwrap_or(&[]);
    if let Some(&bad) = axes.iter().find(|&&a| a >= spatial) {
        return Err(PredictError::Config(format!(
            "mirroring axis {bad} does not exist for a {spatial}-d patch"
        )));
    }
    Ok(mirror_combinations(axes))
}

/// The number of tiles of an image of spatial shape `[z, y, x]` (after padding to the patch).
pub fn tile_count(shape: [usize; 3], opts: &SlidingWindowOptions) -> Result<usize, PredictError> {
    let patch = &opts.patch_size;
    check_patch(patch)?;
    let ext = tile_extent(patch);
    let padded: Vec<usize> = (0..3).map(|a| shape[a].max(ext[a])).collect();
    Ok(if patch.len() == 2 {
        let steps = compute_steps_for_sliding_window(&padded[1..], patch, opts.step_size)?;
        padded[0] * steps.iter().map(Vec::len).product::<usize>()
    } else {
        let steps = compute_steps_for_sliding_window(&padded, patch, opts.step_size)?;
        steps.iter().map(Vec::len).product()
    })
}

/// Network inputs per forward pass: `batch_inputs`, or the automatic one.
pub(crate) fn batch_inputs(opts: &SlidingWindowOptions) -> usize {
    opts.batch_inputs
        .unwrap_or_else(|| auto_batch_inputs(&opts.patch_size))
        .max(1)
}

/// Tiles gathered at once: `batch_inputs` divided among a tile's views (at least one tile;
/// with fewer inputs than views, a tile's views take several passes).
pub fn tiles_per_batch(opts: &SlidingWindowOptions) -> usize {
    let views = mirror_combinations(opts.mirror_axes.as_deref().unwrap_or(&[])).len() + 1;
    (batch_inputs(opts) / views).max(1)
}

/// One image of a sliding-window pass: its (padded) data and its sums.
struct Canvas<'a> {
    data: ndarray::CowArray<'a, f32, ndarray::Ix4>,
    pad: [[usize; 2]; 3],
    shape: [usize; 3],
    acc: Sums,
    weight: Array3<f32>,
}

impl Canvas<'_> {
    fn acc_classes(&self) -> usize {
        self.acc.classes()
    }
}

/// The Gaussian-weighted logit sums `(K, *padded)` of one image, in the storage
/// [`Accumulation`] asks for.
enum Sums {
    F32(Array4<f32>),
    /// nnU-Net's `torch.half` sums: each addition is done in f32 and rounded to f16.
    F16(Array4<half::f16>),
}

impl Sums {
    fn classes(&self) -> usize {
        match self {
            Sums::F32(a) => a.dim().0,
            Sums::F16(a) => a.dim().0,
        }
    }

    fn zeros(mode: Accumulation, shape: (usize, usize, usize, usize)) -> Self {
        match mode {
            Accumulation::F32 => Sums::F32(Array4::zeros(shape)),
            Accumulation::NnunetF16 => Sums::F16(Array4::from_elem(shape, half::f16::ZERO)),
        }
    }
}

/// An element of the logit sums.
trait SumElem: Copy + Send + Sync {
    fn add(&mut self, v: f32);
    fn get(self) -> f32;
}

impl SumElem for f32 {
    fn add(&mut self, v: f32) {
        *self += v;
    }
    fn get(self) -> f32 {
        self
    }
}

impl SumElem for half::f16 {
    fn add(&mut self, v: f32) {
        *self = half::f16::from_f32(self.to_f32() + v);
    }
    fn get(self) -> f32 {
        self.to_f32()
    }
}

/// A tile: the image it belongs to and its first voxel `[z, y, x]` in the padded image (for
/// a 2-d patch, `z` is the slice).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Tile {
    pub canvas: usize,
    pub start: [usize; 3],
}

/// The 3-d extent of a tile: a 2-d patch covers one slice.
pub(crate) fn tile_extent(patch: &[usize]) -> [usize; 3] {
    if patch.len() == 2 {
        [1, patch[0], patch[1]]
    } else {
        [patch[0], patch[1], patch[2]]
    }
}

pub(crate) fn check_patch(patch: &[usize]) -> Result<(), PredictError> {
    if patch.len() == 2 || patch.len() == 3 {
        Ok(())
    } else {
        Err(PredictError::Config(format!(
            "patch size {patch:?} must have 2 or 3 entries"
        )))
    }
}

/// An image padded to at least the patch, with its padding and unpadded shape.
pub(crate) struct Padded<'a> {
    pub data: ndarray::CowArray<'a, f32, ndarray::Ix4>,
    pub pad: [[usize; 2]; 3],
    pub shape: [usize; 3],
}

/// Pads `data` to at least the patch and lists its tiles in nnU-Net's order.
pub(crate) fn pad_and_tile<'a>(
    data: ArrayView4<'a, f32>,
    index: usize,
    opts: &SlidingWindowOptions,
    tiles: &mut Vec<Tile>,
) -> Result<Padded<'a>, PredictError> {
    let (_, z, y, x) = data.dim();
    let patch = &opts.patch_size;
    let min_shape = tile_extent(patch);
    let pad = padding_for([z, y, x], min_shape);
    let padded = if pad.iter().all(|p| p[0] == 0 && p[1] == 0) {
        ndarray::CowArray::from(data)
    } else {
        ndarray::CowArray::from(pad_constant0(data, pad))
    };
    let (_, pz, py, px) = padded.dim();
    let starts = if patch.len() == 2 {
        let steps = compute_steps_for_sliding_window(&[py, px], patch, opts.step_size)?;
        let mut v = vec![];
        for d in 0..pz {
            for &sy in &steps[0] {
                v.extend(steps[1].iter().map(|&sx| [d, sy, sx]));
            }
        }
        v
    } else {
        let steps = compute_steps_for_sliding_window(&[pz, py, px], patch, opts.step_size)?;
        let mut v = vec![];
        for &sz in &steps[0] {
            for &sy in &steps[1] {
                v.extend(steps[2].iter().map(|&sx| [sz, sy, sx]));
            }
        }
        v
    };
    tiles.extend(starts.into_iter().map(|start| Tile {
        canvas: index,
        start,
    }));
    Ok(Padded {
        data: padded,
        pad,
        shape: [z, y, x],
    })
}

/// [`pad_and_tile`] plus zeroed sums.
fn make_canvas<'a>(
    data: ArrayView4<'a, f32>,
    index: usize,
    opts: &SlidingWindowOptions,
    tiles: &mut Vec<Tile>,
) -> Result<Canvas<'a>, PredictError> {
    let Padded { data, pad, shape } = pad_and_tile(data, index, opts, tiles)?;
    let (_, pz, py, px) = data.dim();
    Ok(Canvas {
        data,
        pad,
        shape,
        acc: Sums::zeros(opts.accumulation, (opts.num_classes, pz, py, px)),
        weight: Array3::zeros((pz, py, px)),
    })
}

/// The tile's `(C, *patch)` view of the padded data (2-d: the slice axis dropped).
fn tile_view<'a>(
    data: &'a ArrayView4<'a, f32>,
    t: &Tile,
    ext: [usize; 3],
    is_2d: bool,
) -> ArrayViewD<'a, f32> {
    let [z, y, x] = t.start;
    let v = data.slice(s![.., z..z + ext[0], y..y + ext[1], x..x + ext[2]]);
    if is_2d {
        v.index_axis_move(Axis(1), 0).into_dyn()
    } else {
        v.into_dyn()
    }
}

/// The network inputs of `batch`: per tile the tile itself, then each mirrored copy.
fn gather_inputs(
    canvases: &[Canvas<'_>],
    batch: &[Tile],
    combos: &[Vec<usize>],
    patch: &[usize],
) -> ArrayD<f32> {
    let ext = tile_extent(patch);
    let is_2d = patch.len() == 2;
    let c = canvases[batch[0].canvas].data.dim().0;
    let views = combos.len() + 1;
    let mut shape = vec![batch.len() * views, c];
    shape.extend_from_slice(patch);
    let mut input = ArrayD::<f32>::zeros(IxDyn(&shape));
    let mut slots: Vec<_> = input.outer_iter_mut().collect();
    let mut jobs: Vec<(&Tile, Option<&Vec<usize>>, _)> = Vec::with_capacity(slots.len());
    for (i, slot) in slots.drain(..).enumerate() {
        let tile = &batch[i / views];
        let combo = (i % views).checked_sub(1).map(|m| &combos[m]);
        jobs.push((tile, combo, slot));
    }
    use rayon::prelude::*;
    jobs.into_par_iter().for_each(|(tile, combo, mut slot)| {
        let data = canvases[tile.canvas].data.view();
        let mut v = tile_view(&data, tile, ext, is_2d);
        for &ax in combo.map(|c| c.as_slice()).unwrap_or(&[]) {
            v.invert_axis(Axis(ax + 1));
        }
        slot.assign(&v);
    });
    input
}

/// The TTA average of each tile of a batch: `input` holds each tile followed by its mirrored
/// copies; they go through the network in passes of at most `max_inputs`, and each pass's
/// outputs are flipped back and added to their tile's sum right away (in nnU-Net's order: the
/// tile, then each mirrored copy), so only one pass's outputs exist at a time. The sums are
/// divided by the number of views.
fn tta_average(
    net: &dyn TileNetwork,
    input: ArrayViewD<'_, f32>,
    max_inputs: usize,
    combos: &[Vec<usize>],
    num_classes: usize,
) -> Result<Vec<ArrayD<f32>>, PredictError> {
    let views = combos.len() + 1;
    let tiles = input.shape()[0] / views;
    let mut preds: Vec<Option<ArrayD<f32>>> = vec![None; tiles];
    for (p, chunk) in input
        .axis_chunks_iter(Axis(0), max_inputs.max(1))
        .enumerate()
    {
        let out = net.predict_batch(chunk.view())?;
        let mut expected = chunk.shape().to_vec();
        expected[1] = num_classes;
        if out.shape() != expected.as_slice() {
            return Err(PredictError::Config(format!(
                "the network returned shape {:?} for a batch of tiles of shape {:?}; expected \
                 {expected:?}",
                out.shape(),
                chunk.shape()
            )));
        }
        for (j, mut o) in out.outer_iter().enumerate() {
            let i = p * max_inputs.max(1) + j;
            if let Some(m) = (i % views).checked_sub(1) {
                for &ax in &combos[m] {
                    o.invert_axis(Axis(ax + 1));
                }
            }
            match &mut preds[i / views] {
                Some(sum) => *sum += &o,
                slot => *slot = Some(o.to_owned()),
            }
        }
    }
    Ok(preds
        .into_iter()
        .map(|p| {
            let mut p = p.expect("every tile has its views");
            if views > 1 {
                let n = views as f32;
                p.mapv_inplace(|v| v / n);
            }
            p
        })
        .collect())
}

/// Adds the Gaussian-weighted predictions of one batch to their canvases: classes (and the
/// weight map) in parallel, tiles in order within each, so the sums are the same as tile by
/// tile.
fn accumulate(
    canvases: &mut [Canvas<'_>],
    batch: &[Tile],
    preds: &[ArrayD<f32>],
    gaussian: &ArrayD<f32>,
    patch: &[usize],
    mode: Accumulation,
) {
    let ext = tile_extent(patch);
    let g = gaussian
        .view()
        .into_shape_with_order(IxDyn(&ext))
        .expect("gaussian has the patch's size")
        .into_dimensionality::<ndarray::Ix3>()
        .expect("3-d extent");
    for (ci, canvas) in canvases.iter_mut().enumerate() {
        let mine: Vec<(Tile, &ArrayD<f32>)> = (0..batch.len())
            .filter(|&i| batch[i].canvas == ci)
            .map(|i| (batch[i], &preds[i]))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let Canvas { acc, weight, .. } = canvas;
        rayon::join(
            || match acc {
                Sums::F32(a) => add_tiles(a, &mine, g.view(), ext),
                Sums::F16(a) => add_tiles(a, &mine, g.view(), ext),
            },
            || {
                for (t, _) in &mine {
                    Zip::from(weight.slice_mut(tile_region(t, ext)))
                        .and(&g)
                        .for_each(|w, &g| {
                            *w = match mode {
                                Accumulation::F32 => *w + g,
                                Accumulation::NnunetF16 => round_f16(*w + g),
                            }
                        });
                }
            },
        );
    }
}

/// The voxels of the padded image a tile covers.
fn tile_region(
    t: &Tile,
    ext: [usize; 3],
) -> ndarray::SliceInfo<[ndarray::SliceInfoElem; 3], ndarray::Ix3, ndarray::Ix3> {
    let [z, y, x] = t.start;
    s![z..z + ext[0], y..y + ext[1], x..x + ext[2]]
}

/// `acc[c][tile] += pred[c] * g` for each tile in order, classes in parallel.
fn add_tiles<T: SumElem>(
    acc: &mut Array4<T>,
    tiles: &[(Tile, &ArrayD<f32>)],
    g: ndarray::ArrayView3<'_, f32>,
    ext: [usize; 3],
) {
    use rayon::prelude::*;
    acc.outer_iter_mut()
        .into_par_iter()
        .enumerate()
        .for_each(|(c, mut a)| {
            for (t, pred) in tiles {
                let p = pred.index_axis(Axis(0), c);
                let p = p.into_shape_with_order(ext).expect("tile extent");
                Zip::from(a.slice_mut(tile_region(t, ext)))
                    .and(&p)
                    .and(&g)
                    .for_each(|a, &p, &g| a.add(p * g));
            }
        });
}

/// The logits of a canvas: padding cropped away, sums divided by the weights (in place when
/// the f32 sums need no cropping, so no second `(K, *shape)` array exists).
fn finish(canvas: Canvas<'_>, mode: Accumulation) -> Result<Array4<f32>, PredictError> {
    let (pad, [z, y, x]) = (canvas.pad, canvas.shape);
    let (rz, ry, rx) = (
        pad[0][0]..pad[0][0] + z,
        pad[1][0]..pad[1][0] + y,
        pad[2][0]..pad[2][0] + x,
    );
    let w = canvas.weight.slice(s![rz.clone(), ry.clone(), rx.clone()]);
    let out = match canvas.acc {
        Sums::F32(acc) => {
            let unpadded = pad.iter().all(|p| p[0] == 0 && p[1] == 0);
            let mut out = if unpadded {
                acc
            } else {
                acc.slice(s![.., rz, ry, rx]).to_owned()
            };
            divide_by_weights(&mut out, &w, mode);
            out
        }
        Sums::F16(acc) => {
            let cropped = acc.slice(s![.., rz, ry, rx]);
            let mut out = Array4::<f32>::zeros(cropped.raw_dim());
            Zip::from(&mut out)
                .and(&cropped)
                .for_each(|o, &a| *o = a.get());
            divide_by_weights(&mut out, &w, mode);
            out
        }
    };
    if out.iter().any(|v| !v.is_finite()) {
        return Err(PredictError::Config(
            "the predicted logits contain inf/NaN (nnU-Net raises here as well)".into(),
        ));
    }
    Ok(out)
}

/// `into = round(into + round(sums / weights))` for a canvas (padding cropped), classes in
/// parallel (see [`sliding_window_add_logits`]).
fn finish_add(
    canvas: Canvas<'_>,
    mode: Accumulation,
    into: &mut Array4<f32>,
) -> Result<(), PredictError> {
    use rayon::prelude::*;
    let (pad, [z, y, x]) = (canvas.pad, canvas.shape);
    if into.dim() != (into.dim().0, z, y, x) || into.dim().0 != canvas.acc_classes() {
        return Err(PredictError::Config(format!(
            "logits of shape {:?} cannot take a prediction of {} classes and shape {:?}",
            into.shape(),
            canvas.acc_classes(),
            [z, y, x]
        )));
    }
    let crop = |a: usize, n: usize| pad[a][0]..pad[a][0] + n;
    let w = canvas.weight.slice(s![crop(0, z), crop(1, y), crop(2, x)]);
    let r = mode.rounding();
    fn add<T: SumElem>(
        acc: &Array4<T>,
        into: &mut Array4<f32>,
        w: ndarray::ArrayView3<'_, f32>,
        sl: [std::ops::Range<usize>; 3],
        r: fn(f32) -> f32,
    ) {
        into.outer_iter_mut()
            .into_par_iter()
            .zip(acc.outer_iter().into_par_iter())
            .for_each(|(mut o, a)| {
                let a = a.slice(s![sl[0].clone(), sl[1].clone(), sl[2].clone()]);
                Zip::from(&mut o)
                    .and(&a)
                    .and(&w)
                    .for_each(|o, &a, &w| *o = r(*o + r(a.get() / w)));
            });
    }
    let sl = [crop(0, z), crop(1, y), crop(2, x)];
    match &canvas.acc {
        Sums::F32(a) => add(a, into, w, sl, r),
        Sums::F16(a) => add(a, into, w, sl, r),
    }
    if into.iter().any(|v| !v.is_finite()) {
        return Err(PredictError::Config(
            "the predicted logits contain inf/NaN (nnU-Net raises here as well)".into(),
        ));
    }
    Ok(())
}

/// `sums / weights` per class, rounded to f16 for [`Accumulation::NnunetF16`].
fn divide_by_weights(out: &mut Array4<f32>, w: &ndarray::ArrayView3<'_, f32>, mode: Accumulation) {
    use rayon::prelude::*;
    out.outer_iter_mut().into_par_iter().for_each(|mut ch| {
        Zip::from(&mut ch).and(w).for_each(|a, &w| {
            *a /= w;
            if mode == Accumulation::NnunetF16 {
                *a = round_f16(*a);
            }
        })
    });
}

/// The Gaussian importance map as the sums use it (f16-rounded for [`Accumulation::NnunetF16`],
/// zeros replaced by the smallest non-zero value after rounding, as nnU-Net does in f16).
pub(crate) fn gaussian_for(patch: &[usize], mode: Accumulation) -> ArrayD<f32> {
    let mut g = compute_gaussian(patch, 1.0 / 8.0, 10.0);
    if mode == Accumulation::NnunetF16 {
        g.mapv_inplace(round_f16);
        let min_nonzero = g
            .iter()
            .cloned()
            .filter(|&v| v != 0.0)
            .fold(f32::INFINITY, f32::min);
        if min_nonzero.is_finite() {
            g.mapv_inplace(|v| if v == 0.0 { min_nonzero } else { v });
        }
    }
    g
}

/// nnU-Net's `predict_sliding_window_return_logits` for one network on several images at once:
/// each `(C, z, y, x)` (preprocessed) → logits `(K, z, y, x)`. Each image is zero-padded to at
/// least the patch and tiled; the tiles of all images, with their mirrored copies, go through
/// the network in batches of `opts.batch_inputs` ([`TileNetwork::predict_batch`]), so images
/// smaller than a patch share forward passes; each tile's TTA average is accumulated with the
/// Gaussian weight (classes in parallel); the sums are divided by the summed weights and the
/// padding removed. The result is the same for every batch size. Memory: per image one
/// `(K, *padded)` sum and one `(*padded)` weight map, plus one batch of inputs and outputs.
pub fn sliding_window_logits_many(
    net: &dyn TileNetwork,
    data: &[ArrayView4<'_, f32>],
    opts: &SlidingWindowOptions,
) -> Result<Vec<Array4<f32>>, PredictError> {
    let mut out = vec![];
    sliding_window_add_logits(net, data, opts, &mut out)?;
    Ok(out)
}

/// [`sliding_window_logits_many`] added to `into` (one array per image; empty: the logits are
/// pushed): `into = round(into + round(sums / weights))` in the sums' precision
/// ([`Accumulation::rounding`]), as nnU-Net adds the folds' logits. Each image's sums go
/// straight into `into`, so no second `(K, *shape)` array per image exists (fold ensembles).
pub fn sliding_window_add_logits(
    net: &dyn TileNetwork,
    data: &[ArrayView4<'_, f32>],
    opts: &SlidingWindowOptions,
    into: &mut Vec<Array4<f32>>,
) -> Result<(), PredictError> {
    let patch = &opts.patch_size;
    let combos = checked_mirror_combinations(opts)?;
    let mut tiles = vec![];
    let mut canvases = data
        .iter()
        .enumerate()
        .map(|(i, d)| make_canvas(d.view(), i, opts, &mut tiles))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(c) = canvases.first().map(|c| c.data.dim().0) {
        if let Some(other) = canvases.iter().find(|x| x.data.dim().0 != c) {
            return Err(PredictError::Config(format!(
                "images with {c} and {} channels cannot share a sliding window",
                other.data.dim().0
            )));
        }
    }
    let gaussian = gaussian_for(patch, opts.accumulation);
    let per_batch = tiles_per_batch(opts);
    for batch in tiles.chunks(per_batch) {
        let input = gather_inputs(&canvases, batch, &combos, patch);
        let preds = tta_average(
            net,
            input.view(),
            batch_inputs(opts),
            &combos,
            opts.num_classes,
        )?;
        accumulate(
            &mut canvases,
            batch,
            &preds,
            &gaussian,
            patch,
            opts.accumulation,
        );
    }
    if into.is_empty() {
        for c in canvases {
            into.push(finish(c, opts.accumulation)?);
        }
        return Ok(());
    }
    if into.len() != canvases.len() {
        return Err(PredictError::Config(format!(
            "{} logit arrays to add {} images to",
            into.len(),
            canvases.len()
        )));
    }
    for (c, sum) in canvases.into_iter().zip(into.iter_mut()) {
        finish_add(c, opts.accumulation, sum)?;
    }
    Ok(())
}

/// [`sliding_window_logits_many`] for one image.
pub fn sliding_window_logits(
    net: &dyn TileNetwork,
    data: ArrayView4<'_, f32>,
    opts: &SlidingWindowOptions,
) -> Result<Array4<f32>, PredictError> {
    let mut out = sliding_window_logits_many(net, &[data], opts)?;
    out.pop()
        .ok_or_else(|| PredictError::Config("no logits".into()))
}
