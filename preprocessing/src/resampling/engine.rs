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

impl<T> OutPtr<T> {
    /// # Safety
    /// `off` must stay inside the allocation.
    #[inline(always)]
    unsafe fn offset(self, off: usize) -> Self {
        // SAFETY: forwarded contract.
        OutPtr(unsafe { self.0.add(off) })
    }
}

/// Lines processed together when the resampled axis is the contiguous one.
const LINE_LANES: usize = 16;
/// Columns processed together when the resampled axis is strided.
const COL_LANES: usize = 64;

/// Per-thread scratch buffers.
pub(crate) struct Scratch {
    buf: Vec<f64>,
    acc: Vec<f64>,
}

impl Scratch {
    pub(crate) fn new() -> Self {
        Scratch {
            buf: Vec::new(),
            acc: Vec::new(),
        }
    }

    fn prepare(&mut self, padded: usize, lanes: usize) {
        if self.buf.len() < padded * lanes {
            self.buf.resize(padded * lanes, 0.0);
        }
        if self.acc.len() < lanes {
            self.acc.resize(lanes, 0.0);
        }
    }
}

/// One task on contiguous lines: `lines` holds `lanes` lines of `plan.n_in` samples,
/// `out` the matching `lanes` output lines of `plan.n_out` samples.
#[inline(always)]
fn lines_task_generic<T: Sample>(
    lines: &[T],
    lanes: usize,
    plan: &AxisPlan,
    s: &mut Scratch,
    out: &mut [T],
) {
    let n = plan.n_in;
    let m = plan.n_out;
    let padded = plan.padded_len();
    s.prepare(padded, lanes);
    let Scratch { buf, acc } = s;
    fill_padded(buf, lanes, plan.npad, n, |i, l| lines[l * n + i].to_f64());
    if plan.needs_prefilter() {
        prefilter_lanes(buf, padded, lanes, plan.order);
    }
    evaluate(plan, buf, lanes, acc, |j, vals| {
        for (l, &v) in vals.iter().enumerate() {
            out[l * m + j] = T::from_f64(v);
        }
    });
}

/// One task on `lanes` strided columns starting at `c0` of a `(n, inner)` block; the
/// output block `(m, inner)` starts at `out`.
///
/// # Safety
/// `out` must be valid for writes of `plan.n_out * inner` elements, and no other thread
/// may access columns `c0..c0 + lanes` of it concurrently.
#[inline(always)]
unsafe fn cols_task_generic<T: Sample>(
    block: &[T],
    inner: usize,
    c0: usize,
    lanes: usize,
    plan: &AxisPlan,
    s: &mut Scratch,
    out: OutPtr<T>,
) {
    let n = plan.n_in;
    let padded = plan.padded_len();
    s.prepare(padded, lanes);
    let Scratch { buf, acc } = s;
    fill_padded(buf, lanes, plan.npad, n, |i, l| {
        block[i * inner + c0 + l].to_f64()
    });
    if plan.needs_prefilter() {
        prefilter_lanes(buf, padded, lanes, plan.order);
    }
    evaluate(plan, buf, lanes, acc, |j, vals| {
        let base = j * inner + c0;
        for (l, &v) in vals.iter().enumerate() {
            // SAFETY: guaranteed by the caller.
            unsafe { *out.0.add(base + l) = T::from_f64(v) };
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lines_task_avx2<T: Sample>(
    lines: &[T],
    lanes: usize,
    plan: &AxisPlan,
    s: &mut Scratch,
    out: &mut [T],
) {
    lines_task_generic(lines, lanes, plan, s, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn cols_task_avx2<T: Sample>(
    block: &[T],
    inner: usize,
    c0: usize,
    lanes: usize,
    plan: &AxisPlan,
    s: &mut Scratch,
    out: OutPtr<T>,
) {
    // SAFETY: forwarded contract.
    unsafe { cols_task_generic(block, inner, c0, lanes, plan, s, out) }
}

#[inline]
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dispatch to the AVX2 build of the kernel when the CPU has it (same arithmetic, no
/// FMA, so results are identical).
#[inline]
fn lines_task<T: Sample>(
    lines: &[T],
    lanes: usize,
    plan: &AxisPlan,
    s: &mut Scratch,
    out: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2.
        return unsafe { lines_task_avx2(lines, lanes, plan, s, out) };
    }
    lines_task_generic(lines, lanes, plan, s, out)
}

/// # Safety
/// See [`cols_task_generic`].
#[inline]
unsafe fn cols_task<T: Sample>(
    block: &[T],
    inner: usize,
    c0: usize,
    lanes: usize,
    plan: &AxisPlan,
    s: &mut Scratch,
    out: OutPtr<T>,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2; the rest is the caller's contract.
        return unsafe { cols_task_avx2(block, inner, c0, lanes, plan, s, out) };
    }
    // SAFETY: the caller's contract.
    unsafe { cols_task_generic(block, inner, c0, lanes, plan, s, out) }
}

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
    if inner == 1 {
        out.par_chunks_mut(LINE_LANES * m)
            .zip(src.par_chunks(LINE_LANES * n))
            .for_each_init(Scratch::new, |s, (o, lines)| {
                lines_task(lines, lines.len() / n, plan, s, o)
            });
    } else {
        let ptr = OutPtr(out.as_mut_ptr());
        let chunks = inner.div_ceil(COL_LANES);
        (0..outer * chunks)
            .into_par_iter()
            .for_each_init(Scratch::new, |s, t| {
                let o = t / chunks;
                let c0 = (t % chunks) * COL_LANES;
                let lanes = COL_LANES.min(inner - c0);
                let block = &src[o * n * inner..(o + 1) * n * inner];
                // SAFETY: slab `o` of `out` has m * inner elements; columns
                // c0..c0 + lanes of it belong to this task only.
                unsafe { cols_task(block, inner, c0, lanes, plan, s, ptr.offset(o * m * inner)) }
            });
    }
    out
}

/// Resample along the two trailing axes (y, x) slice by slice, fused: each slice goes
/// through both passes in per-thread buffers, so no full-size intermediate volume is
/// allocated. `first_x` selects the order of the two passes (mathematically irrelevant);
/// `post(input_slice, output_slice)` runs on every slice while it is still in cache.
pub(crate) fn resample_yx<T: Sample>(
    src: &[T],
    shape: [usize; 3],
    plan_y: &AxisPlan,
    plan_x: &AxisPlan,
    first_x: bool,
    post: impl Fn(&[T], &mut [T]) + Sync,
) -> Vec<T> {
    let [nz, ny, nx] = shape;
    let (my, mx) = (plan_y.n_out, plan_x.n_out);
    let mut out = vec![T::default(); nz * my * mx];
    if out.is_empty() || ny == 0 || nx == 0 {
        return out;
    }
    out.par_chunks_mut(my * mx)
        .zip(src.par_chunks(ny * nx))
        .for_each_init(
            || (Scratch::new(), Vec::<T>::new()),
            |(s, tmp), (o, slice)| {
                if first_x {
                    tmp.resize(ny * mx, T::default());
                    x_pass(slice, ny, plan_x, s, tmp);
                    y_pass(tmp, mx, plan_y, s, o);
                } else {
                    tmp.resize(my * nx, T::default());
                    y_pass(slice, nx, plan_y, s, tmp);
                    x_pass(tmp, my, plan_x, s, o);
                }
                post(slice, o);
            },
        );
    out
}

/// Sequential pass along the contiguous axis of `rows` lines.
fn x_pass<T: Sample>(src: &[T], rows: usize, plan: &AxisPlan, s: &mut Scratch, out: &mut [T]) {
    let (n, m) = (plan.n_in, plan.n_out);
    for (lines, o) in src[..rows * n]
        .chunks(LINE_LANES * n)
        .zip(out.chunks_mut(LINE_LANES * m))
    {
        lines_task(lines, lines.len() / n, plan, s, o);
    }
}

/// Sequential pass along the leading axis of a `(plan.n_in, inner)` slice.
fn y_pass<T: Sample>(src: &[T], inner: usize, plan: &AxisPlan, s: &mut Scratch, out: &mut [T]) {
    assert!(out.len() >= plan.n_out * inner && src.len() >= plan.n_in * inner);
    let ptr = OutPtr(out.as_mut_ptr());
    let mut c0 = 0;
    while c0 < inner {
        let lanes = COL_LANES.min(inner - c0);
        // SAFETY: `out` is exclusively borrowed and large enough (checked above).
        unsafe { cols_task(src, inner, c0, lanes, plan, s, ptr) };
        c0 += lanes;
    }
}

/// Fill the interleaved buffer with `lanes` lines of `n` samples, edge padded by `npad`.
#[inline(always)]
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
#[inline(always)]
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
