//! Separable application of an [`AxisPlan`] along one axis of a C-ordered 3-D volume.
//!
//! The volume is viewed as `(outer, n, inner)` around the resampled axis. Work is split
//! into independent tasks, each owning a block of `lanes` lines that are copied
//! (edge padded) into an interleaved `f64` buffer, prefiltered with the recursions running
//! across all lanes at once (SIMD friendly, no per-voxel allocation), and evaluated at the
//! output coordinates with the precomputed taps and weights.

use rayon::prelude::*;

use super::spline::{prefilter_lanes, AxisPlan};

/// Storage element of the volumes the engine works on.
pub(crate) trait Sample: Copy + Send + Sync + Default + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Sample for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Sample for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// Raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);
// SAFETY: the pointer is only used to write elements that no other task touches (every
// task owns a disjoint set of lines), and the buffer outlives the parallel loop.
unsafe impl<T: Send> Send for OutPtr<T> {}
unsafe impl<T: Send> Sync for OutPtr<T> {}

/// Lines processed together when the resampled axis is the contiguous one.
const LINE_LANES: usize = 8;
/// Columns processed together when the resampled axis is strided.
const COL_LANES: usize = 64;

/// Resample `src` (C order, `shape`) along `axis` with `plan` (`plan.n_in == shape[axis]`).
/// Returns the new volume, whose shape is `shape` with `shape[axis] = plan.n_out`.
pub(crate) fn resample_axis<T: Sample>(
    src: &[T],
    shape: [usize; 3],
    axis: usize,
    plan: &AxisPlan,
) -> Vec<T> {
    let n = shape[axis];
    debug_assert_eq!(n, plan.n_in);
    debug_assert_eq!(src.len(), shape.iter().product::<usize>());
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let m = plan.n_out;
    let mut out = vec![T::default(); outer * m * inner];
    if out.is_empty() || n == 0 {
        return out;
    }
    let ptr = OutPtr(out.as_mut_ptr());
    let padded = plan.padded_len();

    if inner == 1 {
        // Lines are contiguous: gather LINE_LANES of them into an interleaved buffer.
        let ntasks = outer.div_ceil(LINE_LANES);
        (0..ntasks).into_par_iter().for_each_init(
            || (vec![0.0f64; padded * LINE_LANES], vec![0.0f64; LINE_LANES]),
            |(buf, acc), t| {
                let l0 = t * LINE_LANES;
                let lanes = LINE_LANES.min(outer - l0);
                let lines = &src[l0 * n..(l0 + lanes) * n];
                fill_padded(buf, lanes, plan.npad, n, |i, l| lines[l * n + i].to_f64());
                if plan.needs_prefilter() {
                    prefilter_lanes(buf, padded, lanes, plan.order);
                }
                let p = ptr;
                evaluate(plan, buf, lanes, acc, |j, vals| {
                    for (l, &v) in vals.iter().enumerate() {
                        // SAFETY: line l0 + l belongs to this task only; j < m.
                        unsafe { *p.0.add((l0 + l) * m + j) = T::from_f64(v) };
                    }
                });
            },
        );
    } else {
        let chunks = inner.div_ceil(COL_LANES);
        let ntasks = outer * chunks;
        (0..ntasks).into_par_iter().for_each_init(
            || (vec![0.0f64; padded * COL_LANES], vec![0.0f64; COL_LANES]),
            |(buf, acc), t| {
                let o = t / chunks;
                let c0 = (t % chunks) * COL_LANES;
                let lanes = COL_LANES.min(inner - c0);
                let block = &src[o * n * inner..(o + 1) * n * inner];
                fill_padded(buf, lanes, plan.npad, n, |i, l| {
                    block[i * inner + c0 + l].to_f64()
                });
                if plan.needs_prefilter() {
                    prefilter_lanes(buf, padded, lanes, plan.order);
                }
                let p = ptr;
                evaluate(plan, buf, lanes, acc, |j, vals| {
                    let base = (o * m + j) * inner + c0;
                    for (l, &v) in vals.iter().enumerate() {
                        // SAFETY: columns c0..c0+lanes of slab o belong to this task only.
                        unsafe { *p.0.add(base + l) = T::from_f64(v) };
                    }
                });
            },
        );
    }
    out
}

/// Fill the interleaved buffer with `lanes` lines of `n` samples, edge padded by `npad`.
#[inline]
fn fill_padded(
    buf: &mut [f64],
    lanes: usize,
    npad: usize,
    n: usize,
    get: impl Fn(usize, usize) -> f64,
) {
    for i in 0..n {
        let row = &mut buf[(npad + i) * lanes..(npad + i + 1) * lanes];
        for (l, v) in row.iter_mut().enumerate() {
            *v = get(i, l);
        }
    }
    if npad > 0 {
        let first = npad * lanes;
        let last = (npad + n - 1) * lanes;
        for r in 0..npad {
            buf.copy_within(first..first + lanes, r * lanes);
            buf.copy_within(last..last + lanes, (npad + n + r) * lanes);
        }
    }
}

/// Evaluate all output samples of the plan on the (prefiltered) interleaved buffer and
/// hand each output row (one value per lane) to `emit`.
#[inline]
fn evaluate(
    plan: &AxisPlan,
    buf: &[f64],
    lanes: usize,
    acc: &mut [f64],
    mut emit: impl FnMut(usize, &[f64]),
) {
    let taps = plan.taps();
    let acc = &mut acc[..lanes];
    for j in 0..plan.n_out {
        let idx = &plan.idx[j * taps..(j + 1) * taps];
        let w = &plan.w[j * taps..(j + 1) * taps];
        acc.fill(0.0);
        for (&i, &wt) in idx.iter().zip(w) {
            let row = &buf[i * lanes..(i + 1) * lanes];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v * wt;
            }
        }
        emit(j, acc);
    }
}
