//! Segmentation resizing: batchgenerators' `resize_segmentation` (one indicator per label,
//! resized with skimage and combined per voxel) and the label-wise threshold nnU-Net uses
//! along the low-resolution axis when `order_z > 0`.

use rayon::prelude::*;

use super::engine::resample_axis;
use super::spline::AxisPlan;

/// How `resize_segmentation` (orders >= 1) combines the resized per-label indicators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SegCombine {
    /// batchgenerators >= 0.25.4 (what `pip install nnunetv2` resolves to today):
    /// per-voxel argmax over the label indicators; exact ties go to the nearest-neighbour
    /// label when it is one of the tied labels, else to the smallest tied label.
    #[default]
    Argmax,
    /// batchgenerators <= 0.25.3: start from 0 and, for labels in ascending order, assign
    /// the label wherever its indicator is `>= 0.5` (larger labels win; voxels where no
    /// label reaches 0.5 stay 0).
    Threshold,
}

/// Sorted distinct values of a label volume.
pub(crate) fn unique_labels(vol: &[i16]) -> Vec<i16> {
    let mut seen = vec![false; 1 << 16];
    for &v in vol {
        seen[(v as i32 + 32768) as usize] = true;
    }
    seen.iter()
        .enumerate()
        .filter(|(_, &s)| s)
        .map(|(i, _)| (i as i32 - 32768) as i16)
        .collect()
}

/// Gather with one tap per axis (nearest neighbour / identity plans).
pub(crate) fn gather_nearest(src: &[i16], shape: [usize; 3], plans: [&AxisPlan; 3]) -> Vec<i16> {
    debug_assert!(plans.iter().all(|p| p.taps() == 1));
    let [mz, my, mx] = [plans[0].n_out, plans[1].n_out, plans[2].n_out];
    let mut out = vec![0i16; mz * my * mx];
    if out.is_empty() {
        return out;
    }
    let (sy, sz) = (shape[2], shape[1] * shape[2]);
    out.par_chunks_mut(mx).enumerate().for_each(|(row, o)| {
        let (k, j) = (row / my, row % my);
        let base = plans[0].idx[k] * sz + plans[1].idx[j] * sy;
        for (v, &ix) in o.iter_mut().zip(&plans[2].idx) {
            *v = src[base + ix];
        }
    });
    out
}

/// Combine the taps of one output voxel: `taps` holds `(label, weight product)` in
/// scipy's tap order (z-major); `nn` is the nearest-neighbour label; `fallback` the
/// smallest label of the input (argmax's initial winner).
#[inline]
fn combine_taps(taps: &mut [(i16, f64)], nn: i16, rule: SegCombine, fallback: i16) -> i16 {
    let l0 = taps[0].0;
    if taps.iter().all(|t| t.0 == l0) {
        return l0;
    }
    // stable insertion sort by label keeps scipy's summation order within a label
    for i in 1..taps.len() {
        let mut j = i;
        while j > 0 && taps[j - 1].0 > taps[j].0 {
            taps.swap(j - 1, j);
            j -= 1;
        }
    }
    let mut best = 0.0f64;
    let mut win = fallback;
    let mut nn_top = false;
    let mut thresholded = 0i16;
    let mut i = 0;
    while i < taps.len() {
        let label = taps[i].0;
        let mut s = 0.0f64;
        while i < taps.len() && taps[i].0 == label {
            s += taps[i].1;
            i += 1;
        }
        // skimage clip=True: the indicator's range is [0, 1]
        let s = s.clamp(0.0, 1.0);
        match rule {
            SegCombine::Argmax => {
                let is_nn = label == nn;
                if s == best && s > 0.0 && is_nn {
                    nn_top = true;
                }
                if s > best {
                    nn_top = is_nn;
                    win = label;
                }
                best = best.max(s);
            }
            SegCombine::Threshold => {
                if s >= 0.5 {
                    thresholded = label;
                }
            }
        }
    }
    match rule {
        SegCombine::Argmax if nn_top => nn,
        SegCombine::Argmax => win,
        SegCombine::Threshold => thresholded,
    }
}

/// `resize_segmentation` with order 1 (the nnU-Net default), evaluated directly per
/// output voxel from its (at most 8) linear taps, without any per-label volume.
/// `plans` are order-1 zoom plans or identity plans; `nn_plans` the matching order-0 /
/// identity plans.
pub(crate) fn resize_seg_linear(
    src: &[i16],
    shape: [usize; 3],
    plans: [&AxisPlan; 3],
    nn_plans: [&AxisPlan; 3],
    rule: SegCombine,
) -> Vec<i16> {
    let [mz, my, mx] = [plans[0].n_out, plans[1].n_out, plans[2].n_out];
    let mut out = vec![0i16; mz * my * mx];
    if out.is_empty() || src.is_empty() {
        return out;
    }
    let fallback = src.iter().copied().min().unwrap_or(0);
    let (sy, sz) = (shape[2], shape[1] * shape[2]);
    let [tz, ty, tx] = [plans[0].taps(), plans[1].taps(), plans[2].taps()];
    out.par_chunks_mut(mx).enumerate().for_each(|(row, o)| {
        let (k, j) = (row / my, row % my);
        // weights (wz * wy) and offsets for the z/y taps, in scipy's order
        let mut zy = [(0usize, 0.0f64); 4];
        let mut nzy = 0;
        for a in 0..tz {
            let (iz, wz) = (plans[0].idx[k * tz + a], plans[0].w[k * tz + a]);
            for b in 0..ty {
                let (iy, wy) = (plans[1].idx[j * ty + b], plans[1].w[j * ty + b]);
                zy[nzy] = (iz * sz + iy * sy, wz * wy);
                nzy += 1;
            }
        }
        let nn_base = nn_plans[0].idx[k] * sz + nn_plans[1].idx[j] * sy;
        let mut taps = [(0i16, 0.0f64); 8];
        for (i, v) in o.iter_mut().enumerate() {
            let xi = &plans[2].idx[i * tx..(i + 1) * tx];
            let xw = &plans[2].w[i * tx..(i + 1) * tx];
            let mut n = 0;
            for &(off, wzy) in &zy[..nzy] {
                for (&ix, &wx) in xi.iter().zip(xw) {
                    taps[n] = (src[off + ix], wzy * wx);
                    n += 1;
                }
            }
            let nn = src[nn_base + nn_plans[2].idx[i]];
            *v = combine_taps(&mut taps[..n], nn, rule, fallback);
        }
    });
    out
}

/// `resize_segmentation` for any order >= 1 through one resized indicator volume per
/// label (used for orders other than 1). `plans[a]` is `None` for axes whose size does
/// not change; `nn` is the nearest-neighbour resize of `src` to the output shape.
pub(crate) fn resize_seg_per_label(
    src: &[i16],
    shape: [usize; 3],
    plans: [Option<&AxisPlan>; 3],
    nn: &[i16],
    rule: SegCombine,
) -> Vec<i16> {
    let out_len = nn.len();
    let labels = unique_labels(src);
    if labels.len() <= 1 {
        return vec![labels.first().copied().unwrap_or(0); out_len];
    }
    let mut best = vec![0.0f64; out_len];
    let mut win = vec![labels[0]; out_len];
    let mut nn_top = vec![false; out_len];
    let mut thresholded = vec![0i16; out_len];
    for &label in &labels {
        let score = indicator_resized(src, shape, label, &plans);
        match rule {
            SegCombine::Argmax => {
                best.par_iter_mut()
                    .zip(win.par_iter_mut())
                    .zip(nn_top.par_iter_mut())
                    .zip(score.par_iter().zip(nn.par_iter()))
                    .for_each(|(((b, w), t), (&s, &n))| {
                        let s = s.clamp(0.0, 1.0);
                        let is_nn = n == label;
                        if s == *b && s > 0.0 && is_nn {
                            *t = true;
                        }
                        if s > *b {
                            *t = is_nn;
                            *w = label;
                        }
                        *b = b.max(s);
                    });
            }
            SegCombine::Threshold => {
                thresholded
                    .par_iter_mut()
                    .zip(score.par_iter())
                    .for_each(|(r, &s)| {
                        if s.clamp(0.0, 1.0) >= 0.5 {
                            *r = label;
                        }
                    });
            }
        }
    }
    match rule {
        SegCombine::Argmax => win
            .into_par_iter()
            .zip(nn_top.into_par_iter().zip(nn.par_iter()))
            .map(|(w, (t, &n))| if t { n } else { w })
            .collect(),
        SegCombine::Threshold => thresholded,
    }
}

/// nnU-Net's label-wise interpolation along the low-resolution axis (`order_z > 0`):
/// for every label (ascending) the indicator is interpolated with `plan` and the label is
/// written where `round(value) > 0.5`; voxels no label claims are 0.
pub(crate) fn zstep_seg_threshold(
    src: &[i16],
    shape: [usize; 3],
    axis: usize,
    plan: &AxisPlan,
) -> Vec<i16> {
    let labels = unique_labels(src);
    let mut out_shape = shape;
    out_shape[axis] = plan.n_out;
    let mut out = vec![0i16; out_shape.iter().product()];
    let mut plans: [Option<&AxisPlan>; 3] = [None; 3];
    plans[axis] = Some(plan);
    for &label in &labels {
        let score = indicator_resized(src, shape, label, &plans);
        out.par_iter_mut()
            .zip(score.par_iter())
            .for_each(|(r, &s)| {
                // np.round(s) > 0.5  <=>  s > 0.5 (0.5 rounds to 0)
                if s > 0.5 {
                    *r = label;
                }
            });
    }
    out
}

/// The indicator `src == label` as f64, resampled along every axis that has a plan.
fn indicator_resized(
    src: &[i16],
    shape: [usize; 3],
    label: i16,
    plans: &[Option<&AxisPlan>; 3],
) -> Vec<f64> {
    let mut cur: Vec<f64> = src
        .par_iter()
        .map(|&v| if v == label { 1.0 } else { 0.0 })
        .collect();
    let mut cur_shape = shape;
    for (axis, plan) in plans.iter().enumerate() {
        if let Some(plan) = plan {
            cur = resample_axis(&cur, cur_shape, axis, plan);
            cur_shape[axis] = plan.n_out;
        }
    }
    cur
}
