//! The sliding window on the network's device (nnU-Net's `perform_everything_on_device`): each
//! image is uploaded once, tiles and their mirrored copies are cut out and stacked on the
//! device, and the Gaussian-weighted sums and the weight map stay there until the final
//! division; only the finished logits come back to the host. `--not_on_device` keeps the sums
//! in host memory instead ([`super::sliding::sliding_window_logits_many`]), as nnU-Net does for
//! volumes too large for the GPU.
//!
//! A tile's weighted prediction is added to the sums by zero-padding it to the image and adding
//! the whole image (Candle has no in-place add into a strided region). That is one pass over
//! the sums per tile: on a GPU a few hundred microseconds for a large volume, on the CPU far
//! slower than the host path, which is why CPU networks never take this one.

use super::sliding::{
    checked_mirror_combinations, gaussian_for, pad_and_tile, tile_extent, tiles_per_batch,
    Accumulation, SlidingWindowOptions, Tile,
};
use super::PredictError;
use candle_core::{DType, Device, Tensor};
use ndarray::{Array4, ArrayView4};

/// A network that takes and returns tensors on its device (a capability of
/// [`super::sliding::TileNetwork`]s that run on a GPU).
pub trait DeviceTiles: Send + Sync {
    fn device(&self) -> &Device;
    /// `(N, C, *patch)` f32 on [`DeviceTiles::device`] → `(N, K, *patch)` f32 logits there.
    fn forward_tiles(&self, x: &Tensor) -> Result<Tensor, PredictError>;
}

fn candle(context: &str) -> impl Fn(candle_core::Error) -> PredictError + '_ {
    move |source| PredictError::Candle {
        context: format!("sliding window on the device: {context}"),
        source,
    }
}

/// One image on the device: its padded data, sums and weight map.
struct DeviceCanvas {
    data: Tensor,
    sums: Tensor,
    weight: Tensor,
    pad: [[usize; 2]; 3],
    shape: [usize; 3],
}

/// [`super::sliding::sliding_window_logits_many`] with the sums on `net`'s device. Same
/// tiles, views, Gaussian and (for [`Accumulation::NnunetF16`]) f16 sums; the results agree
/// with the host path to f32 rounding (f16 rounding in f16 mode).
pub fn sliding_window_logits_on_device(
    net: &dyn DeviceTiles,
    data: &[ArrayView4<'_, f32>],
    opts: &SlidingWindowOptions,
) -> Result<Vec<Array4<f32>>, PredictError> {
    let combos = checked_mirror_combinations(opts)?;
    let dev = net.device();
    let mut tiles = vec![];
    let mut canvases = vec![];
    for (i, d) in data.iter().enumerate() {
        let p = pad_and_tile(d.view(), i, opts, &mut tiles)?;
        canvases.push(upload(p, opts, dev)?);
    }
    let g = gaussian_for(&opts.patch_size, opts.accumulation);
    let g = Tensor::from_slice(
        g.as_slice().expect("standard layout"),
        &tile_extent(&opts.patch_size)[..],
        dev,
    )
    .map_err(candle("uploading the Gaussian"))?;
    for batch in tiles.chunks(tiles_per_batch(opts)) {
        let out = forward_batch(net, &canvases, batch, &combos, opts)?;
        for (i, t) in batch.iter().enumerate() {
            let pred = tta_mean(&out, i, &combos, opts.patch_size.len())?;
            add_tile(&mut canvases[t.canvas], t, &pred, &g, opts.accumulation)?;
        }
    }
    canvases
        .into_iter()
        .map(|c| finish(c, opts.accumulation))
        .collect()
}

fn upload(
    p: super::sliding::Padded<'_>,
    opts: &SlidingWindowOptions,
    dev: &Device,
) -> Result<DeviceCanvas, PredictError> {
    let (c, z, y, x) = p.data.dim();
    let std = p.data.as_standard_layout();
    let data = Tensor::from_slice(std.as_slice().expect("standard layout"), (c, z, y, x), dev)
        .map_err(candle("uploading the image"))?;
    let dtype = sum_dtype(opts.accumulation);
    let sums = Tensor::zeros((opts.num_classes, z, y, x), dtype, dev)
        .map_err(candle("allocating the sums"))?;
    let weight =
        Tensor::zeros((1, z, y, x), DType::F32, dev).map_err(candle("allocating the weights"))?;
    Ok(DeviceCanvas {
        data,
        sums,
        weight,
        pad: p.pad,
        shape: p.shape,
    })
}

fn sum_dtype(mode: Accumulation) -> DType {
    match mode {
        Accumulation::F32 => DType::F32,
        Accumulation::NnunetF16 => DType::F16,
    }
}

/// The network on the batch's tiles, each followed by its mirrored copies (cut and flipped on
/// the device), in forward passes of at most the batch's inputs.
fn forward_batch(
    net: &dyn DeviceTiles,
    canvases: &[DeviceCanvas],
    batch: &[Tile],
    combos: &[Vec<usize>],
    opts: &SlidingWindowOptions,
) -> Result<Tensor, PredictError> {
    let ext = tile_extent(&opts.patch_size);
    let is_2d = opts.patch_size.len() == 2;
    let err = candle("cutting tiles");
    let mut inputs = vec![];
    for t in batch {
        let [z, y, x] = t.start;
        let mut v = canvases[t.canvas]
            .data
            .narrow(1, z, ext[0])
            .and_then(|v| v.narrow(2, y, ext[1]))
            .and_then(|v| v.narrow(3, x, ext[2]))
            .map_err(&err)?;
        if is_2d {
            v = v.squeeze(1).map_err(&err)?;
        }
        let tile = v.contiguous().map_err(&err)?;
        for combo in combos {
            let dims: Vec<usize> = combo.iter().map(|a| a + 1).collect();
            let flipped = tile.flip(&dims).map_err(&err)?;
            inputs.push(flipped);
        }
        let at = inputs.len() - combos.len();
        inputs.insert(at, tile);
    }
    let x = Tensor::stack(&inputs, 0).map_err(&err)?;
    let max = super::sliding::batch_inputs(opts);
    let n = x.dim(0).map_err(&err)?;
    let mut outs = vec![];
    for start in (0..n).step_by(max) {
        let part = x.narrow(0, start, max.min(n - start)).map_err(&err)?;
        outs.push(net.forward_tiles(&part)?);
    }
    let out = Tensor::cat(&outs, 0).map_err(candle("joining forward passes"))?;
    let mut want = x.dims().to_vec();
    want[1] = opts.num_classes;
    if out.dims() != want.as_slice() {
        return Err(PredictError::Config(format!(
            "the network returned shape {:?} for a batch of tiles of shape {:?}; expected {want:?}",
            out.dims(),
            x.dims()
        )));
    }
    Ok(out)
}

/// The TTA mean of tile `i` of a batch's outputs (views flipped back, summed in nnU-Net's
/// order), as `(K, *3-d extent)`.
fn tta_mean(
    out: &Tensor,
    i: usize,
    combos: &[Vec<usize>],
    spatial: usize,
) -> Result<Tensor, PredictError> {
    let err = candle("averaging mirrored predictions");
    let views = combos.len() + 1;
    let mut pred = out.get(i * views).map_err(&err)?;
    for (m, combo) in combos.iter().enumerate() {
        let dims: Vec<usize> = combo.iter().map(|a| a + 1).collect();
        let back = out
            .get(i * views + 1 + m)
            .and_then(|v| v.flip(&dims))
            .map_err(&err)?;
        pred = (pred + back).map_err(&err)?;
    }
    if views > 1 {
        pred = (pred / views as f64).map_err(&err)?;
    }
    if spatial == 2 {
        pred = pred.unsqueeze(1).map_err(&err)?;
    }
    Ok(pred)
}

/// `sums += pad(pred * g)` and `weight += pad(g)` over the whole image (rounded to the sums'
/// dtype after each addition, as nnU-Net's `torch.half` sums are).
fn add_tile(
    c: &mut DeviceCanvas,
    t: &Tile,
    pred: &Tensor,
    g: &Tensor,
    mode: Accumulation,
) -> Result<(), PredictError> {
    let err = candle("accumulating a tile");
    let full = c.weight.dims()[1..].to_vec();
    let pad_to_image = |v: Tensor| -> candle_core::Result<Tensor> {
        let ext = v.dims()[1..].to_vec();
        let mut v = v;
        for a in 0..3 {
            v = v.pad_with_zeros(a + 1, t.start[a], full[a] - t.start[a] - ext[a])?;
        }
        Ok(v)
    };
    let weighted = pred.broadcast_mul(g).and_then(pad_to_image).map_err(&err)?;
    let ones = g.unsqueeze(0).and_then(pad_to_image).map_err(&err)?;
    let dtype = sum_dtype(mode);
    c.sums = (c.sums.to_dtype(DType::F32).map_err(&err)? + weighted)
        .and_then(|s| s.to_dtype(dtype))
        .map_err(&err)?;
    c.weight = (&c.weight + ones)
        .and_then(|w| round_like(w, mode))
        .map_err(&err)?;
    Ok(())
}

/// f16-rounded (kept as f32) for [`Accumulation::NnunetF16`].
fn round_like(t: Tensor, mode: Accumulation) -> candle_core::Result<Tensor> {
    match mode {
        Accumulation::F32 => Ok(t),
        Accumulation::NnunetF16 => t.to_dtype(DType::F16)?.to_dtype(DType::F32),
    }
}

/// `sums / weight` (f16-rounded in f16 mode), padding cropped, brought to the host.
fn finish(c: DeviceCanvas, mode: Accumulation) -> Result<Array4<f32>, PredictError> {
    let err = candle("finishing the logits");
    let [z, y, x] = c.shape;
    let logits = c
        .sums
        .to_dtype(DType::F32)
        .and_then(|s| s.broadcast_div(&c.weight))
        .and_then(|l| round_like(l, mode))
        .and_then(|l| l.narrow(1, c.pad[0][0], z))
        .and_then(|l| l.narrow(2, c.pad[1][0], y))
        .and_then(|l| l.narrow(3, c.pad[2][0], x))
        .and_then(|l| l.contiguous())
        .map_err(&err)?;
    let k = logits.dim(0).map_err(&err)?;
    let v = logits
        .flatten_all()
        .and_then(|l| l.to_vec1::<f32>())
        .map_err(candle("copying the logits to the host"))?;
    if v.iter().any(|v| !v.is_finite()) {
        return Err(PredictError::Config(
            "the predicted logits contain inf/NaN (nnU-Net raises here as well)".into(),
        ));
    }
    Array4::from_shape_vec((k, z, y, x), v)
        .map_err(|e| PredictError::Config(format!("logits: {e}")))
}
