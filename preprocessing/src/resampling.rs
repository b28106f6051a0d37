//! Resampling (nnU-Net `preprocessing/resampling/default_resampling.py`).
//!
//! [`resample_data_to_shape`] / [`resample_seg_to_shape`] reproduce nnU-Net v2's
//! `resample_data_or_seg_to_shape`:
//!
//! * data: `skimage.transform.resize(order, mode='edge', anti_aliasing=False)`, i.e.
//!   `scipy.ndimage.zoom(grid_mode=True, mode='nearest')` (12 voxels of edge padding,
//!   B-spline prefilter for orders > 1, spline evaluation at `(k + 0.5) * in/out - 0.5`)
//!   followed by skimage's clip to the input's value range;
//! * segmentations: batchgenerators' `resize_segmentation` (see [`SegCombine`]);
//! * anisotropic data ("separate z"): every slice is resized in-plane with `order` (and
//!   clipped to that slice's range), then the low-resolution axis is interpolated with
//!   `map_coordinates(order=order_z, mode='nearest')`; for segmentations with
//!   `order_z > 0` each label's indicator is interpolated and thresholded at 0.5.
//!
//! The implementation is separable: scipy's n-D spline interpolation is a tensor product
//! of 1-D operators, so each axis is processed on its own with per-axis taps/weights
//! computed once, in parallel over blocks of lines, in `f64` per line and `f32` storage.
//! The deviation from scipy is at the level of `f32` rounding.

mod engine;
mod seg;
mod spline;

use ndarray::{Array4, ArrayView3, ArrayView4, Axis};
use plans::ResamplingKwargs;
use rayon::prelude::*;

pub use seg::SegCombine;

use engine::resample_axis;
use spline::{AxisPlan, MAX_ORDER};

/// nnU-Net's `ANISO_THRESHOLD`.
pub const ANISO_THRESHOLD: f64 = 3.0;

/// `compute_new_shape`: `round(old_spacing / new_spacing * old_shape)` per axis, with
/// numpy's round-half-to-even so shapes match nnU-Net exactly.
pub fn compute_new_shape(
    old_shape: &[usize],
    old_spacing: &[f64],
    new_spacing: &[f64],
) -> Vec<usize> {
    old_shape
        .iter()
        .zip(old_spacing.iter().zip(new_spacing))
        .map(|(&s, (&o, &n))| ((o / n) * s as f64).round_ties_even().max(0.0) as usize)
        .collect()
}

/// `get_do_separate_z`: `max(spacing) / min(spacing) > 3`.
fn get_do_separate_z(spacing: &[f64]) -> bool {
    let max = spacing.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = spacing.iter().copied().fold(f64::INFINITY, f64::min);
    max / min > ANISO_THRESHOLD
}

/// `get_lowres_axis`: the axes where `max(spacing) / spacing == 1`.
fn get_lowres_axes(spacing: &[f64]) -> Vec<usize> {
    let max = spacing.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    spacing
        .iter()
        .enumerate()
        .filter(|(_, &s)| max / s == 1.0)
        .map(|(i, _)| i)
        .collect()
}

/// `determine_do_sep_z_and_axis`: whether to resample the low-resolution axis separately
/// and which axis that is. With `force_separate_z = None` separate z is used when the
/// current spacing, or failing that the new spacing, is anisotropic (`max/min > 3`); the
/// axis is the one whose spacing equals the maximum. If two or three axes share the
/// maximum, separate z is turned off.
pub fn determine_do_sep_z_and_axis(
    force_separate_z: Option<bool>,
    current_spacing: &[f64],
    new_spacing: &[f64],
) -> (bool, Option<usize>) {
    let (mut do_separate_z, axes) = match force_separate_z {
        Some(true) => (true, Some(get_lowres_axes(current_spacing))),
        Some(false) => (false, None),
        None => {
            if get_do_separate_z(current_spacing) {
                (true, Some(get_lowres_axes(current_spacing)))
            } else if get_do_separate_z(new_spacing) {
                (true, Some(get_lowres_axes(new_spacing)))
            } else {
                (false, None)
            }
        }
    };
    let axis = match axes {
        Some(a) if a.len() == 1 => Some(a[0]),
        Some(_) => {
            // 0 (NaN spacing), 2 or 3 axes share the maximum spacing
            do_separate_z = false;
            None
        }
        None => None,
    };
    (do_separate_z, axis)
}

fn clamp_order(order: u8) -> usize {
    (order as usize).min(MAX_ORDER)
}

/// Resample image data `(c, z, y, x)` to `new_shape` like nnU-Net's
/// `resample_data_or_seg_to_shape(is_seg=False)` (`kw.is_seg` is not consulted; use
/// [`resample_seg_to_shape`] for label maps). Orders above 5 (unsupported by scipy) are
/// treated as 5. Returns a copy when the shape does not change.
pub fn resample_data_to_shape(
    data: ArrayView4<f32>,
    new_shape: [usize; 3],
    current_spacing: &[f64; 3],
    new_spacing: &[f64; 3],
    kw: &ResamplingKwargs,
) -> Array4<f32> {
    let (do_sep, axis) =
        determine_do_sep_z_and_axis(kw.force_separate_z, current_spacing, new_spacing);
    let sep_axis = if do_sep { axis } else { None };
    resample_data_impl(
        data,
        new_shape,
        sep_axis,
        clamp_order(kw.order),
        clamp_order(kw.order_z),
    )
}

/// Resample a segmentation `(c, z, y, x)` like nnU-Net's
/// `resample_data_or_seg_to_shape(is_seg=True)`, with the current batchgenerators rule
/// ([`SegCombine::Argmax`]). Returns a copy when the shape does not change.
pub fn resample_seg_to_shape(
    seg: ArrayView4<i16>,
    new_shape: [usize; 3],
    current_spacing: &[f64; 3],
    new_spacing: &[f64; 3],
    kw: &ResamplingKwargs,
) -> Array4<i16> {
    resample_seg_to_shape_with(
        seg,
        new_shape,
        current_spacing,
        new_spacing,
        kw,
        SegCombine::Argmax,
    )
}

/// [`resample_seg_to_shape`] with an explicit `resize_segmentation` combination rule.
pub fn resample_seg_to_shape_with(
    seg: ArrayView4<i16>,
    new_shape: [usize; 3],
    current_spacing: &[f64; 3],
    new_spacing: &[f64; 3],
    kw: &ResamplingKwargs,
    rule: SegCombine,
) -> Array4<i16> {
    let (do_sep, axis) =
        determine_do_sep_z_and_axis(kw.force_separate_z, current_spacing, new_spacing);
    let sep_axis = if do_sep { axis } else { None };
    resample_seg_impl(
        seg,
        new_shape,
        sep_axis,
        clamp_order(kw.order),
        clamp_order(kw.order_z),
        rule,
    )
}

/// One channel as a contiguous C-ordered buffer (borrowed when already contiguous).
fn channel_slice<'a, T: Copy>(v: &'a ArrayView3<'a, T>) -> std::borrow::Cow<'a, [T]> {
    match v.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(v.iter().copied().collect()),
    }
}

/// Axes that change size, most shrinking first (less work for the later axes); ties go
/// to the contiguous axis first.
fn axis_order(shape: [usize; 3], new_shape: [usize; 3], skip: Option<usize>) -> Vec<usize> {
    let mut axes: Vec<usize> = (0..3)
        .filter(|&a| shape[a] != new_shape[a] && Some(a) != skip)
        .collect();
    axes.sort_by(|&a, &b| {
        let ra = new_shape[a] as f64 / shape[a].max(1) as f64;
        let rb = new_shape[b] as f64 / shape[b].max(1) as f64;
        ra.total_cmp(&rb).then(b.cmp(&a))
    });
    axes
}

fn resample_data_impl(
    data: ArrayView4<f32>,
    new_shape: [usize; 3],
    sep_axis: Option<usize>,
    order: usize,
    order_z: usize,
) -> Array4<f32> {
    let (c, z, y, x) = data.dim();
    let shape = [z, y, x];
    if shape == new_shape {
        return data.to_owned();
    }
    let mut out = Array4::<f32>::zeros((c, new_shape[0], new_shape[1], new_shape[2]));
    if out.is_empty() {
        return out;
    }
    if shape.contains(&0) {
        // nothing to interpolate from (scipy cannot zoom an empty array either)
        return out;
    }
    for (ch, mut dst) in out.axis_iter_mut(Axis(0)).enumerate() {
        let view = data.index_axis(Axis(0), ch);
        let vol = channel_slice(&view);
        let res = match sep_axis {
            Some(a) => resample_volume_sep(&vol, shape, new_shape, a, order, order_z),
            None => resample_volume_3d(&vol, shape, new_shape, order),
        };
        // `out` is freshly allocated in standard layout
        if let Some(d) = dst.as_slice_mut() {
            d.copy_from_slice(&res);
        }
    }
    out
}

/// NaN-ignoring min/max (`None` if every value is NaN).
fn min_max(v: &[f32]) -> Option<(f32, f32)> {
    v.par_chunks(1 << 16).map(min_max_seq).reduce(
        || None,
        |a, b| match (a, b) {
            (Some((l1, h1)), Some((l2, h2))) => Some((l1.min(l2), h1.max(h2))),
            (a, None) => a,
            (None, b) => b,
        },
    )
}

#[inline]
fn clip(v: &mut f32, lo: f32, hi: f32) {
    if *v < lo {
        *v = lo;
    } else if *v > hi {
        *v = hi;
    }
}

/// Apply zoom plans of `order` along `axes` (already in processing order), fusing the
/// y and x passes slice by slice when there are enough slices to keep all threads busy.
/// When the fused pass is the only one, `post(input_slice, output_slice)` is applied to
/// every z slice inside it and the returned flag is `true`.
fn run_axes<T: engine::Sample>(
    vol: &[T],
    shape: [usize; 3],
    new_shape: [usize; 3],
    axes: &[usize],
    order: usize,
    post: &(dyn Fn(&[T], &mut [T]) + Sync),
) -> (Option<Vec<T>>, bool) {
    let fuse =
        axes.contains(&1) && axes.contains(&2) && shape[0] >= 2 * rayon::current_num_threads();
    let mut cur_shape = shape;
    let mut cur: Option<Vec<T>> = None;
    let step = |cur: &mut Option<Vec<T>>, cur_shape: &mut [usize; 3], a: usize| {
        let plan = AxisPlan::zoom(cur_shape[a], new_shape[a], order);
        let next = resample_axis(cur.as_deref().unwrap_or(vol), *cur_shape, a, &plan);
        cur_shape[a] = new_shape[a];
        *cur = Some(next);
    };
    if !fuse {
        for &a in axes {
            step(&mut cur, &mut cur_shape, a);
        }
        return (cur, false);
    }
    let pos = |a: usize| axes.iter().position(|&b| b == a);
    let z_first = pos(0)
        .is_some_and(|p0| pos(1).is_some_and(|p1| p0 < p1) && pos(2).is_some_and(|p2| p0 < p2));
    if z_first {
        step(&mut cur, &mut cur_shape, 0);
    }
    let plan_y = AxisPlan::zoom(cur_shape[1], new_shape[1], order);
    let plan_x = AxisPlan::zoom(cur_shape[2], new_shape[2], order);
    let first_x = pos(2) < pos(1);
    let z_after = pos(0).is_some() && !z_first;
    let noop = |_: &[T], _: &mut [T]| {};
    let hook: &(dyn Fn(&[T], &mut [T]) + Sync) = if z_after || z_first { &noop } else { post };
    let next = engine::resample_yx(
        cur.as_deref().unwrap_or(vol),
        cur_shape,
        &plan_y,
        &plan_x,
        first_x,
        hook,
    );
    cur_shape[1] = new_shape[1];
    cur_shape[2] = new_shape[2];
    cur = Some(next);
    if z_after {
        step(&mut cur, &mut cur_shape, 0);
    }
    (cur, !(z_after || z_first))
}

/// skimage `resize` of a whole 3-D volume (one channel), including the clip to the input
/// range.
fn resample_volume_3d(
    vol: &[f32],
    shape: [usize; 3],
    new_shape: [usize; 3],
    order: usize,
) -> Vec<f32> {
    let range = min_max(vol);
    let axes = axis_order(shape, new_shape, None);
    let clip_slice = |_: &[f32], o: &mut [f32]| {
        if let Some((lo, hi)) = range {
            o.iter_mut().for_each(|v| clip(v, lo, hi));
        }
    };
    let (res, clipped) = run_axes(vol, shape, new_shape, &axes, order, &clip_slice);
    let mut res = res.unwrap_or_else(|| vol.to_vec());
    if let (Some((lo, hi)), false) = (range, clipped) {
        res.par_iter_mut().for_each(|v| clip(v, lo, hi));
    }
    res
}

/// Separate-z resampling of one channel: in-plane skimage `resize` per slice along
/// `axis` (clipped per slice), then `map_coordinates(order_z)` along `axis`.
fn resample_volume_sep(
    vol: &[f32],
    shape: [usize; 3],
    new_shape: [usize; 3],
    axis: usize,
    order: usize,
    order_z: usize,
) -> Vec<f32> {
    let in_plane = axis_order(shape, new_shape, Some(axis));
    let mut cur_shape = shape;
    let mut cur: Option<Vec<f32>> = None;
    if !in_plane.is_empty() {
        // skimage clips every slice to that slice's input range
        let clip_slice = |i: &[f32], o: &mut [f32]| {
            if let Some((lo, hi)) = min_max_seq(i) {
                o.iter_mut().for_each(|v| clip(v, lo, hi));
            }
        };
        let noop = |_: &[f32], _: &mut [f32]| {};
        let hook: &(dyn Fn(&[f32], &mut [f32]) + Sync) =
            if axis == 0 { &clip_slice } else { &noop };
        let (res, clipped) = run_axes(vol, shape, new_shape, &in_plane, order, hook);
        let mut res = res.unwrap_or_default();
        for &a in &in_plane {
            cur_shape[a] = new_shape[a];
        }
        if !clipped {
            let ranges = slice_ranges(vol, shape, axis);
            clip_slices(&mut res, cur_shape, axis, &ranges);
        }
        cur = Some(res);
    }
    if shape[axis] != new_shape[axis] {
        let plan = AxisPlan::zoom(shape[axis], new_shape[axis], order_z);
        let src = cur.as_deref().unwrap_or(vol);
        let next = resample_axis(src, cur_shape, axis, &plan);
        cur = Some(next);
    }
    cur.unwrap_or_else(|| vol.to_vec())
}

/// `(outer, n, inner)` decomposition around `axis`.
fn split_dims(shape: [usize; 3], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

/// Per-slice (along `axis`) NaN-ignoring min/max.
fn slice_ranges(vol: &[f32], shape: [usize; 3], axis: usize) -> Vec<Option<(f32, f32)>> {
    let (outer, n, inner) = split_dims(shape, axis);
    (0..n)
        .into_par_iter()
        .map(|s| {
            let mut acc: Option<(f32, f32)> = None;
            for o in 0..outer {
                let start = (o * n + s) * inner;
                if let Some(r) = min_max_seq(&vol[start..start + inner]) {
                    acc = Some(match acc {
                        None => r,
                        Some((lo, hi)) => (lo.min(r.0), hi.max(r.1)),
                    });
                }
            }
            acc
        })
        .collect()
}

fn min_max_seq(v: &[f32]) -> Option<(f32, f32)> {
    // comparisons with NaN are false, so NaNs are skipped
    let mut lo = [f32::INFINITY; 8];
    let mut hi = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            lo[k] = if c[k] < lo[k] { c[k] } else { lo[k] };
            hi[k] = if c[k] > hi[k] { c[k] } else { hi[k] };
        }
    }
    for &x in rest {
        lo[0] = if x < lo[0] { x } else { lo[0] };
        hi[0] = if x > hi[0] { x } else { hi[0] };
    }
    let lo = lo.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = hi.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (lo <= hi).then_some((lo, hi))
}

fn clip_slices(vol: &mut [f32], shape: [usize; 3], axis: usize, ranges: &[Option<(f32, f32)>]) {
    let (_, n, inner) = split_dims(shape, axis);
    vol.par_chunks_mut(inner)
        .enumerate()
        .for_each(|(row, chunk)| {
            if let Some((lo, hi)) = ranges[row % n] {
                chunk.iter_mut().for_each(|v| clip(v, lo, hi));
            }
        });
}

fn resample_seg_impl(
    seg: ArrayView4<i16>,
    new_shape: [usize; 3],
    sep_axis: Option<usize>,
    order: usize,
    order_z: usize,
    rule: SegCombine,
) -> Array4<i16> {
    let (c, z, y, x) = seg.dim();
    let shape = [z, y, x];
    if shape == new_shape {
        return seg.to_owned();
    }
    let mut out = Array4::<i16>::zeros((c, new_shape[0], new_shape[1], new_shape[2]));
    if out.is_empty() || shape.contains(&0) {
        return out;
    }
    for (ch, mut dst) in out.axis_iter_mut(Axis(0)).enumerate() {
        let view = seg.index_axis(Axis(0), ch);
        let vol = channel_slice(&view);
        let res = match sep_axis {
            Some(a) => {
                let mut plane_shape = new_shape;
                plane_shape[a] = shape[a];
                let in_plane = if plane_shape != shape {
                    Some(resize_segmentation(
                        &vol,
                        shape,
                        plane_shape,
                        Some(a),
                        order,
                        rule,
                    ))
                } else {
                    None
                };
                if shape[a] != new_shape[a] {
                    let src = in_plane.as_deref().unwrap_or(&vol);
                    let plan = AxisPlan::zoom(shape[a], new_shape[a], order_z);
                    if order_z == 0 {
                        let mut plans = [
                            AxisPlan::identity(plane_shape[0]),
                            AxisPlan::identity(plane_shape[1]),
                            AxisPlan::identity(plane_shape[2]),
                        ];
                        plans[a] = plan;
                        seg::gather_nearest(src, plane_shape, [&plans[0], &plans[1], &plans[2]])
                    } else {
                        seg::zstep_seg_threshold(src, plane_shape, a, &plan)
                    }
                } else {
                    in_plane.unwrap_or_else(|| vol.to_vec())
                }
            }
            None => resize_segmentation(&vol, shape, new_shape, None, order, rule),
        };
        if let Some(d) = dst.as_slice_mut() {
            d.copy_from_slice(&res);
        }
    }
    out
}

/// batchgenerators `resize_segmentation` of one channel; with `fixed_axis = Some(a)` the
/// volume is a stack of independent 2-D slices along `a` (which keeps its size).
fn resize_segmentation(
    vol: &[i16],
    shape: [usize; 3],
    new_shape: [usize; 3],
    fixed_axis: Option<usize>,
    order: usize,
    rule: SegCombine,
) -> Vec<i16> {
    let plan_for = |a: usize, ord: usize| {
        if Some(a) == fixed_axis {
            AxisPlan::identity(shape[a])
        } else {
            AxisPlan::zoom(shape[a], new_shape[a], ord)
        }
    };
    let nn_plans = [plan_for(0, 0), plan_for(1, 0), plan_for(2, 0)];
    let nn_refs = [&nn_plans[0], &nn_plans[1], &nn_plans[2]];
    match order {
        0 => seg::gather_nearest(vol, shape, nn_refs),
        1 => {
            let plans = [plan_for(0, 1), plan_for(1, 1), plan_for(2, 1)];
            seg::resize_seg_linear(vol, shape, [&plans[0], &plans[1], &plans[2]], nn_refs, rule)
        }
        _ => {
            let nn = seg::gather_nearest(vol, shape, nn_refs);
            let plans: Vec<Option<AxisPlan>> = (0..3)
                .map(|a| {
                    (Some(a) != fixed_axis && shape[a] != new_shape[a])
                        .then(|| AxisPlan::zoom(shape[a], new_shape[a], order))
                })
                .collect();
            seg::resize_seg_per_label(
                vol,
                shape,
                [plans[0].as_ref(), plans[1].as_ref(), plans[2].as_ref()],
                &nn,
                rule,
            )
        }
    }
}

#[cfg(test)]
mod tests;
