//! CPU kernels for N-d (1-3 spatial dims) convolution: forward, input gradient (= transposed
//! convolution) and weight gradient, on blocked im2col + the `gemm` crate, parallel with rayon.
//!
//! Every kernel works on contiguous `N C (D) (H) W` buffers. The spatial geometry is normalised to
//! three axes (missing leading axes get size 1, kernel 1, stride 1, padding 0, dilation 1), so 1D,
//! 2D and 3D share one code path. The output spatial positions are processed in chunks of whole
//! output rows so that the im2col workspace stays bounded (see [`COL_BUDGET_BYTES`]).
//!
//! The input gradient is computed in *gather* form, split into the `prod(stride)` phases of the
//! input grid: within one phase every input position receives contributions from a fixed subset
//! of kernel taps, so the phase is a stride-1 correlation of the output gradient with a sub-kernel.
//! No scatter-add is needed, chunks write disjoint outputs, and strided convolutions do no wasted
//! multiply-adds on the zeros a "zero-stuffed" formulation would create. When kernel == stride
//! (the U-Net decoder's transposed convolution) each phase has exactly one tap at offset 0 and the
//! GEMM reads the source tensor directly, without any im2col copy.
//!
//! Two stride-1 forms shrink or remove the im2col copy: [`RowPlan`] gathers only the taps of the
//! inner axes and turns the taps of the outer axis into row offsets (forward, weight gradient and
//! the stride-1 input gradient as a flipped forward), and [`Implicit`] reads every tap straight
//! from a zero-padded copy of the input where no row plan applies.

use rayon::prelude::*;

/// Upper bound of the im2col workspace of one worker thread, in bytes.
pub(crate) const COL_BUDGET_BYTES: usize = 8 << 20;

/// Element types the kernels support.
pub(crate) trait Elem:
    Copy + Send + Sync + 'static + std::ops::AddAssign + std::ops::Add<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
}
impl Elem for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}
impl Elem for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// Convolution geometry normalised to three spatial axes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Geom {
    pub n: usize,
    pub cin: usize,
    pub cout: usize,
    pub groups: usize,
    /// conv input spatial size
    pub inp: [usize; 3],
    /// conv output spatial size
    pub out: [usize; 3],
    pub k: [usize; 3],
    pub s: [usize; 3],
    pub p: [usize; 3],
    pub d: [usize; 3],
}

impl Geom {
    pub fn in_sp(&self) -> usize {
        self.inp.iter().product()
    }
    pub fn out_sp(&self) -> usize {
        self.out.iter().product()
    }
    pub fn ktot(&self) -> usize {
        self.k.iter().product()
    }
    pub fn cig(&self) -> usize {
        self.cin / self.groups
    }
    pub fn cog(&self) -> usize {
        self.cout / self.groups
    }
}

/// How one spatial axis of a gathered ("im2col") matrix is read from its source:
/// position `j` of tap `t` reads source index `j * pos_stride + offsets[t]`, zero when outside
/// `[0, src_len)`.
#[derive(Clone, Debug)]
struct AxisGather {
    grid: usize,
    pos_stride: usize,
    offsets: Vec<isize>,
    /// kernel index of each tap (into the weight's kernel axis)
    kidx: Vec<usize>,
    src_len: usize,
}

impl AxisGather {
    /// Positions `j` in `[lo, hi)` read inside the source for tap offset `off`.
    fn valid_range(&self, off: isize) -> (usize, usize) {
        let s = self.pos_stride as isize;
        let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
        let room = self.src_len as isize - off;
        let hi = if room <= 0 { 0 } else { (room + s - 1) / s };
        let lo = (lo as usize).min(self.grid);
        let hi = (hi as usize).min(self.grid).max(lo);
        (lo, hi)
    }

    fn is_identity(&self) -> bool {
        self.offsets.len() == 1
            && self.offsets[0] == 0
            && self.pos_stride == 1
            && self.grid == self.src_len
    }
}

fn fwd_axes(g: &Geom) -> [AxisGather; 3] {
    std::array::from_fn(|a| AxisGather {
        grid: g.out[a],
        pos_stride: g.s[a],
        offsets: (0..g.k[a])
            .map(|k| (k * g.d[a]) as isize - g.p[a] as isize)
            .collect(),
        kidx: (0..g.k[a]).collect(),
        src_len: g.inp[a],
    })
}

/// Gather description of input phase `r` (per axis) for the input gradient.
fn phase_axes(g: &Geom, r: [usize; 3]) -> [AxisGather; 3] {
    std::array::from_fn(|a| {
        let s = g.s[a];
        let grid = if r[a] < g.inp[a] {
            (g.inp[a] - r[a]).div_ceil(s)
        } else {
            0
        };
        let mut offsets = Vec::new();
        let mut kidx = Vec::new();
        for k in 0..g.k[a] {
            let num = r[a] as isize + g.p[a] as isize - (k * g.d[a]) as isize;
            if num.rem_euclid(s as isize) == 0 {
                offsets.push(num.div_euclid(s as isize));
                kidx.push(k);
            }
        }
        AxisGather {
            grid,
            pos_stride: 1,
            offsets,
            kidx,
            src_len: g.out[a],
        }
    })
}

/// im2col of channels `[0, ch)` of `src` (one image, spatial dims `src_dims`) for the grid rows
/// `[r0, r1)` (a row is one `(j0, j1)` pair; its length is `ax[2].grid`). Row `c * ntaps + t` of
/// `col` (with `t` the flattened tap index) holds the `(r1 - r0) * ax[2].grid` positions.
fn im2col<T: Elem>(
    src: &[T],
    src_dims: [usize; 3],
    ch: usize,
    ax: &[AxisGather; 3],
    r0: usize,
    r1: usize,
    col: &mut [T],
) {
    let pc = (r1 - r0) * ax[2].grid;
    im2col_ld(src, src_dims, ch, ax, (r0, r1), col, pc);
}

/// [`im2col`] into rows that start `ld` elements apart (`ld >= (r1 - r0) * ax[2].grid`; the
/// batch-wide GEMMs of [`Im2colPlan::merged`] put the images side by side).
fn im2col_ld<T: Elem>(
    src: &[T],
    src_dims: [usize; 3],
    ch: usize,
    ax: &[AxisGather; 3],
    (r0, r1): (usize, usize),
    col: &mut [T],
    ld: usize,
) {
    let wg = ax[2].grid;
    let pc = (r1 - r0) * wg;
    let sp = src_dims[0] * src_dims[1] * src_dims[2];
    let g1 = ax[1].grid;
    let mut row = 0;
    for c in 0..ch {
        let src_c = &src[c * sp..(c + 1) * sp];
        for &od in &ax[0].offsets {
            for &oh in &ax[1].offsets {
                for &ow in &ax[2].offsets {
                    let dst = &mut col[row * ld..row * ld + pc];
                    row += 1;
                    let (lo, hi) = ax[2].valid_range(ow);
                    let sw = ax[2].pos_stride;
                    for r in r0..r1 {
                        let drow = &mut dst[(r - r0) * wg..(r - r0 + 1) * wg];
                        let id = ((r / g1) * ax[0].pos_stride) as isize + od;
                        let ih = ((r % g1) * ax[1].pos_stride) as isize + oh;
                        if id < 0
                            || ih < 0
                            || id as usize >= src_dims[0]
                            || ih as usize >= src_dims[1]
                            || lo == hi
                        {
                            drow.fill(T::ZERO);
                            continue;
                        }
                        let base = (id as usize * src_dims[1] + ih as usize) * src_dims[2];
                        let srow = &src_c[base..base + src_dims[2]];
                        drow[..lo].fill(T::ZERO);
                        drow[hi..].fill(T::ZERO);
                        if sw == 1 {
                            let s0 = (lo as isize + ow) as usize;
                            drow[lo..hi].copy_from_slice(&srow[s0..s0 + (hi - lo)]);
                        } else if sw == 2 {
                            let s0 = ((lo * 2) as isize + ow) as usize;
                            copy_stride2(&mut drow[lo..hi], &srow[s0..]);
                        } else {
                            let s0 = ((lo * sw) as isize + ow) as usize;
                            for (v, &x) in
                                drow[lo..hi].iter_mut().zip(srow[s0..].iter().step_by(sw))
                            {
                                *v = x;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dst[i] = src[2 * i]`: the stride-2 gather of [`im2col`] (the strided convolutions of the
/// U-Net encoders), as pairs so that it vectorises (`step_by(2)` stays a scalar loop).
pub(crate) fn copy_stride2<T: Elem>(dst: &mut [T], src: &[T]) {
    let Some((last, body)) = dst.split_last_mut() else {
        return;
    };
    for (v, p) in body.iter_mut().zip(src.chunks_exact(2)) {
        *v = p[0];
    }
    *last = src[2 * body.len()];
}

/// Rows of the grid per chunk so that a `krows x (rows * row_len)` im2col buffer fits the budget.
fn rows_per_chunk<T>(krows: usize, row_len: usize, total_rows: usize) -> usize {
    let budget = COL_BUDGET_BYTES / std::mem::size_of::<T>();
    let per_row = (krows * row_len).max(1);
    (budget / per_row).clamp(1, total_rows.max(1))
}

#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Whether the work items should be spread over threads (one single-threaded GEMM each) or run
/// one after the other with a multi-threaded GEMM.
fn outer_parallel(items: usize) -> bool {
    items >= 2 * rayon::current_num_threads()
}

fn gemm_par(outer: bool) -> gemm::Parallelism {
    if outer {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// `dst[m x n] (= dst +) lhs[m x k] * rhs[k x n]` with explicit strides (row stride, col stride).
#[allow(clippy::too_many_arguments)]
unsafe fn mm<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: *const T,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const T,
    rhs_rs: usize,
    rhs_cs: usize,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j * dst_cs) = T::ZERO;
                }
            }
        }
        return;
    }
    super::isa::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        par,
    );
}

thread_local! {
    /// Per-thread im2col / tile workspace, kept across kernel calls so that it is allocated (and
    /// zero-filled) once per thread instead of once per call and rayon split.
    static WORKSPACE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f(ws)` with this thread's workspace (a fresh one if it is already in use further up the
/// stack, e.g. when rayon runs another item on this thread while an outer item waits).
pub(crate) fn with_workspace<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut ws) => f(&mut ws),
        Err(_) => f(&mut Vec::new()),
    })
}

fn run_items<F>(items: usize, outer: bool, f: F)
where
    F: Fn(usize, &mut Vec<u8>) + Sync + Send,
{
    if outer {
        (0..items)
            .into_par_iter()
            .for_each(|i| with_workspace(|ws| f(i, ws)));
    } else {
        with_workspace(|ws| {
            for i in 0..items {
                f(i, ws);
            }
        });
    }
}

/// A typed workspace carved out of a reusable byte vector.
pub(crate) fn workspace<T: Elem>(ws: &mut Vec<u8>, len: usize) -> &mut [T] {
    let bytes = len * std::mem::size_of::<T>() + std::mem::align_of::<T>();
    if ws.len() < bytes {
        ws.resize(bytes, 0);
    }
    // SAFETY: the buffer holds at least `len` aligned elements after `align_to`; T is f32/f64, for
    // which every bit pattern is valid.
    let (_, mid, _) = unsafe { ws.as_mut_slice().align_to_mut::<T>() };
    &mut mid[..len]
}

/// Largest tolerated `(padded positions / output positions - 1) * output channels per group` for
/// the implicit-GEMM path. The padded grid computes (and discards) outputs on the padding rows
/// and columns; im2col instead copies every input `ktot` times, which costs roughly `40 / cog` of
/// the GEMM (an estimate from copy vs FMA throughput on AVX-512; the limit was then checked on the
/// demo plans). Below the limit the wasted multiply-adds cost less than the copies they replace.
const IMPLICIT_WASTE_LIMIT: f64 = 24.0;

/// Upper bound of the implicit-GEMM output tile (output channels x positions), in bytes: the tile
/// and the input rows it reads stay in L2 across all taps.
const IMPLICIT_TILE_BYTES: usize = 512 << 10;

/// A stride-1 convolution evaluated on the zero-padded input grid ("implicit GEMM").
///
/// With the input zero-padded to `pdims = inp + 2 p` and flattened, output position `o` (at flat
/// padded index `F(o)`) reads tap `t` at `F(o) + off[t]` with one fixed `off[t]` per tap, so
/// `y[:, F(o)] = sum_t W_t x_pad[:, F(o) + off_t]`: one GEMM per tap straight from the padded
/// input, no im2col copy. Positions of the flat range that fall on padding columns/rows are
/// computed and dropped when the tile is copied out.
struct Implicit {
    pdims: [usize; 3],
    ptot: usize,
    /// flat padded positions from the first to the last output (inclusive)
    len: usize,
    /// flat offset of every tap, in the weight's flattened kernel order
    offs: Vec<usize>,
}

impl Implicit {
    /// The plan when `g` is a stride-1 convolution with a kernel (or padding) and the padded grid
    /// wastes little work; `None` selects the im2col path.
    fn plan(g: &Geom) -> Option<Self> {
        if g.s != [1, 1, 1] || (g.ktot() == 1 && g.p == [0, 0, 0]) || g.out_sp() == 0 {
            return None;
        }
        let pdims: [usize; 3] = std::array::from_fn(|a| g.inp[a] + 2 * g.p[a]);
        let [o0, o1, o2] = g.out;
        let len = ((o0 - 1) * pdims[1] + o1 - 1) * pdims[2] + o2;
        let waste = len as f64 / g.out_sp() as f64 - 1.0;
        if waste * g.cog() as f64 > IMPLICIT_WASTE_LIMIT {
            return None;
        }
        let mut offs = Vec::with_capacity(g.ktot());
        for k0 in 0..g.k[0] {
            for k1 in 0..g.k[1] {
                for k2 in 0..g.k[2] {
                    offs.push((k0 * g.d[0] * pdims[1] + k1 * g.d[1]) * pdims[2] + k2 * g.d[2]);
                }
            }
        }
        Some(Implicit {
            pdims,
            ptot: pdims.iter().product(),
            len,
            offs,
        })
    }
}

/// Zero-pads `planes` contiguous planes of spatial size `dims` by `lo` before and after each axis.
fn pad_planes<T: Elem>(src: &[T], planes: usize, dims: [usize; 3], lo: [usize; 3]) -> Vec<T> {
    let pd: [usize; 3] = std::array::from_fn(|a| dims[a] + 2 * lo[a]);
    let (sp, ptot) = (dims.iter().product::<usize>(), pd.iter().product::<usize>());
    let mut out = vec![T::ZERO; planes * ptot];
    if sp == 0 {
        return out;
    }
    out.par_chunks_mut(ptot)
        .zip(src.par_chunks(sp))
        .for_each(|(dst, s)| {
            for i0 in 0..dims[0] {
                for i1 in 0..dims[1] {
                    let so = (i0 * dims[1] + i1) * dims[2];
                    let d = ((i0 + lo[0]) * pd[1] + i1 + lo[1]) * pd[2] + lo[2];
                    dst[d..d + dims[2]].copy_from_slice(&s[so..so + dims[2]]);
                }
            }
        });
    out
}

/// [`conv_fwd`] through [`Implicit`]: per `(image, tile)` one accumulating GEMM per tap into an
/// L2-sized tile, then a copy of the tile's valid positions (plus bias) into `y`.
fn conv_fwd_implicit<T: Elem>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    g: &Geom,
    plan: &Implicit,
) -> Vec<T> {
    let (out_sp, ktot) = (g.out_sp(), g.ktot());
    let (cig, cog) = (g.cig(), g.cog());
    let [_, pd1, pd2] = plan.pdims;
    let xp = pad_planes(x, g.n * g.cin, g.inp, g.p);
    // Per-tap weight matrices: wt[gi][t] is cog x cig, row-major.
    let mut wt = vec![T::ZERO; g.cout * cig * ktot];
    for gi in 0..g.groups {
        for co in 0..cog {
            for ci in 0..cig {
                for t in 0..ktot {
                    wt[((gi * ktot + t) * cog + co) * cig + ci] =
                        w[((gi * cog + co) * cig + ci) * ktot + t];
                }
            }
        }
    }
    let lc = (IMPLICIT_TILE_BYTES / std::mem::size_of::<T>() / (cog + cig).max(1))
        .max(256)
        .min(plan.len.max(1));
    let nchunks = plan.len.div_ceil(lc);
    let mut y = vec![T::ZERO; g.n * g.cout * out_sp];
    let yp = SendPtr(y.as_mut_ptr());
    let items = g.n * nchunks;
    let outer = outer_parallel(items);
    let par = gemm_par(outer);
    let [_, o1, o2] = g.out;
    run_items(items, outer, |item, ws| {
        let b = item / nchunks;
        let s0 = (item % nchunks) * lc;
        let l = lc.min(plan.len - s0);
        let tile = workspace::<T>(ws, cog * l);
        for gi in 0..g.groups {
            let xs = &xp[(b * g.cin + gi * cig) * plan.ptot..];
            for (t, &off) in plan.offs.iter().enumerate() {
                // SAFETY: rows of `xs` are `ptot` long and `s0 + off + l <= ptot` for every tap
                // (the last output reads at most the last padded element); `tile` is cog x l.
                unsafe {
                    mm(
                        cog,
                        l,
                        cig,
                        tile.as_mut_ptr(),
                        l,
                        1,
                        t > 0,
                        wt[(gi * ktot + t) * cog * cig..].as_ptr(),
                        cig,
                        1,
                        xs[s0 + off..].as_ptr(),
                        plan.ptot,
                        1,
                        par,
                    );
                }
            }
            for co in 0..cog {
                let c = gi * cog + co;
                let bv = bias.map_or(T::ZERO, |bs| bs[c]);
                let trow = &tile[co * l..(co + 1) * l];
                let mut q = s0;
                while q < s0 + l {
                    let (row, col) = (q / pd2, q % pd2);
                    let (i0, i1) = (row / pd1, row % pd1);
                    if i1 < o1 && col < o2 {
                        let e = (s0 + l).min(row * pd2 + o2);
                        // SAFETY: tiles of one image cover disjoint flat ranges, so they write
                        // disjoint output positions; the index is a valid output position.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                yp.get()
                                    .add((b * g.cout + c) * out_sp + (i0 * o1 + i1) * o2 + col),
                                e - q,
                            )
                        };
                        for (d, &v) in dst.iter_mut().zip(&trow[q - s0..e - s0]) {
                            *d = v + bv;
                        }
                    }
                    q = (row + 1) * pd2;
                }
            }
        }
    });
    y
}

/// Convolution forward: `x (n, cin, inp)`, `w (cout, cin/groups, k)`, optional `bias (cout)`.
pub(crate) fn conv_fwd<T: Elem>(x: &[T], w: &[T], bias: Option<&[T]>, g: &Geom) -> Vec<T> {
    if let Some(y) = super::direct::conv_fwd(x, w, bias, g) {
        return y;
    }
    if let Some(plan) = RowPlan::new::<T>(g) {
        match Implicit::plan(g) {
            Some(imp) if plan.oversized::<T>(g) => return conv_fwd_implicit(x, w, bias, g, &imp),
            _ => return conv_fwd_rows(x, w, bias, g, &plan),
        }
    }
    match Implicit::plan(g) {
        Some(plan) => conv_fwd_implicit(x, w, bias, g, &plan),
        None => conv_fwd_im2col(x, w, bias, g),
    }
}

/// Smallest GEMM width (output positions per work item) for which [`RowPlan`] is used.
const ROWS_MIN_POSITIONS: usize = 128;

/// A convolution with stride 1 along one outer axis (`axis`, 0 or 1; the axes before it are
/// trivial: kernel 1, stride 1, no padding) whose taps along that axis become *row offsets*: the
/// other taps are gathered by [`im2col`] on the grid of zero-padded rows along `axis`, and tap
/// `j` of `axis` is one accumulating GEMM that reads that buffer `j * dilation` rows further on.
/// The copy shrinks by the kernel size along `axis` (3x for a 3x3x3 kernel), with no wasted
/// multiply-adds: every GEMM column is a real output position.
struct RowPlan {
    /// im2col description of the remaining taps; along `axis` it reads padded row `v` from
    /// input row `v - p`
    ax: [AxisGather; 3],
    /// im2col grid rows per row along `axis` (`out[1]` for axis 0, 1 for axis 1)
    m: usize,
    taps: usize,
    dil: usize,
    /// independent slabs (`out[0]` for axis 1, else 1), output rows per slab (`out[axis]`) and
    /// padded rows per slab (`inp[axis] + 2 p[axis]`)
    outer: usize,
    rows: usize,
    vrows: usize,
    /// output positions per row along `axis`
    row_len: usize,
    /// taps gathered per row offset: `ktot / taps`
    kin: usize,
    /// output rows per work item and items per slab
    rpc: usize,
    nchunks: usize,
}

impl RowPlan {
    /// The plan for `g`, if it applies and its GEMMs are wide enough to beat im2col.
    fn new<T>(g: &Geom) -> Option<Self> {
        // Below ~128 positions per GEMM (the deepest, smallest levels) the split GEMMs lose to
        // one im2col GEMM over all taps.
        Self::build::<T>(g).filter(|p| p.rpc * p.row_len >= ROWS_MIN_POSITIONS)
    }

    /// Whether even the fewest rows per item overflow the workspace budget twice over (e.g. 32
    /// channels x 64^2 planes of a 3x3x3 kernel: 28 MB). The forward pass then prefers
    /// [`Implicit`] where that applies (the buffer streams through memory instead of cache:
    /// 125 against 250 GFLOP/s for that example).
    fn oversized<T>(&self, g: &Geom) -> bool {
        let col = g.cig() * self.kin * (self.rpc + self.span()) * self.row_len;
        col * std::mem::size_of::<T>() > 2 * COL_BUDGET_BYTES
    }

    /// The plan for `g` whenever it applies.
    fn build<T>(g: &Geom) -> Option<Self> {
        let axis = if g.s[0] == 1 && g.k[0] > 1 {
            0
        } else if g.k[0] == 1 && g.p[0] == 0 && g.s[0] == 1 && g.s[1] == 1 && g.k[1] > 1 {
            1
        } else {
            return None;
        };
        if g.out_sp() == 0 {
            return None;
        }
        let mut ax = fwd_axes(g);
        ax[axis] = AxisGather {
            grid: g.inp[axis] + 2 * g.p[axis],
            pos_stride: 1,
            offsets: vec![-(g.p[axis] as isize)],
            kidx: vec![0],
            src_len: g.inp[axis],
        };
        let (taps, dil) = (g.k[axis], g.d[axis]);
        let span = (taps - 1) * dil;
        let row_len = if axis == 0 {
            g.out[1] * g.out[2]
        } else {
            g.out[2]
        };
        let kin = g.ktot() / taps;
        let rows = g.out[axis];
        let per_row = (g.cig() * kin * row_len).max(1);
        // Rows per item: within the workspace budget, but at least 2 * span (else the overlap
        // re-gathers most rows), and small enough for two items per thread when that is possible.
        let slabs = g.n * if axis == 0 { 1 } else { g.out[0] };
        let want_items = 2 * rayon::current_num_threads();
        let par_cap = rows / want_items.div_ceil(slabs.max(1)).max(1);
        let rpc = (COL_BUDGET_BYTES / std::mem::size_of::<T>() / per_row)
            .saturating_sub(span)
            .max(2 * span)
            .min(par_cap)
            .clamp(1, rows);
        Some(RowPlan {
            ax,
            m: if axis == 0 { g.out[1] } else { 1 },
            taps,
            dil,
            outer: if axis == 0 { 1 } else { g.out[0] },
            rows,
            vrows: g.inp[axis] + 2 * g.p[axis],
            row_len,
            kin,
            rpc,
            nchunks: rows.div_ceil(rpc),
        })
    }

    fn items(&self, n: usize) -> usize {
        n * self.outer * self.nchunks
    }

    fn span(&self) -> usize {
        (self.taps - 1) * self.dil
    }

    /// `(image, slab, first output row, output rows)` of work item `item`.
    fn item(&self, item: usize) -> (usize, usize, usize, usize) {
        let per_image = self.outer * self.nchunks;
        let (b, rem) = (item / per_image, item % per_image);
        let (o, c) = (rem / self.nchunks, rem % self.nchunks);
        let h0 = c * self.rpc;
        (b, o, h0, self.rpc.min(self.rows - h0))
    }

    /// im2col of the padded rows item `(o, h0, nr)` reads, into `col` (`cig * kin` rows of
    /// `(nr + span) * row_len` positions).
    fn gather<T: Elem>(&self, src: &[T], g: &Geom, o: usize, h0: usize, nr: usize, col: &mut [T]) {
        let v0 = o * self.vrows + h0;
        let v1 = v0 + nr + self.span();
        im2col(src, g.inp, g.cig(), &self.ax, v0 * self.m, v1 * self.m, col);
    }

    /// Flattened kernel tap of row offset `j` and gathered tap `t`.
    fn tap(&self, j: usize, t: usize) -> usize {
        j * self.kin + t
    }
}

/// [`conv_fwd`] through a [`RowPlan`].
fn conv_fwd_rows<T: Elem>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    g: &Geom,
    plan: &RowPlan,
) -> Vec<T> {
    let (in_sp, out_sp) = (g.in_sp(), g.out_sp());
    let (cig, cog, ktot) = (g.cig(), g.cog(), g.ktot());
    let (taps, kin) = (plan.taps, plan.kin);
    let kc = cig * kin;
    // Per-row-offset weight matrices: wj[gi][j] is cog x (cig * kin), row-major.
    let mut wj = vec![T::ZERO; w.len()];
    for gi in 0..g.groups {
        for j in 0..taps {
            for co in 0..cog {
                let dst = &mut wj[((gi * taps + j) * cog + co) * kc..][..kc];
                for ci in 0..cig {
                    let src = &w[((gi * cog + co) * cig + ci) * ktot + plan.tap(j, 0)..][..kin];
                    dst[ci * kin..(ci + 1) * kin].copy_from_slice(src);
                }
            }
        }
    }
    let mut y = Uninit::<T>::new(g.n * g.cout * out_sp);
    let yp = SendPtr(y.ptr());
    let items = plan.items(g.n);
    let outer = outer_parallel(items);
    let par = gemm_par(outer);
    run_items(items, outer, |item, ws| {
        let (b, o, h0, nr) = plan.item(item);
        let cols = (nr + plan.span()) * plan.row_len;
        let n = nr * plan.row_len;
        let col = workspace::<T>(ws, kc * cols);
        for gi in 0..g.groups {
            let xs = &x[(b * g.cin + gi * cig) * in_sp..(b * g.cin + (gi + 1) * cig) * in_sp];
            plan.gather(xs, g, o, h0, nr, col);
            // SAFETY: items write disjoint output rows; all indices are in bounds. Tap 0 (or the
            // bias fill) writes every position of the rows before the others add to it.
            unsafe {
                let dst = yp
                    .get()
                    .add((b * g.cout + gi * cog) * out_sp + (o * plan.rows + h0) * plan.row_len);
                if let Some(bias) = bias {
                    for co in 0..cog {
                        fill_raw(dst.add(co * out_sp), n, bias[gi * cog + co]);
                    }
                }
                for j in 0..taps {
                    mm(
                        cog,
                        n,
                        kc,
                        dst,
                        out_sp,
                        1,
                        bias.is_some() || j > 0,
                        wj[(gi * taps + j) * cog * kc..].as_ptr(),
                        kc,
                        1,
                        col[j * plan.dil * plan.row_len..].as_ptr(),
                        cols,
                        1,
                        par,
                    );
                }
            }
        }
    });
    // SAFETY: the items cover every (image, channel, position).
    unsafe { y.assume_init() }
}

/// The blocked-im2col chunking shared by [`conv_fwd_im2col`] and [`conv_bwd_filter_im2col`]:
/// work item `item` is one image and a range of output grid rows (whole rows of `out[2]`
/// positions, as many as fit [`COL_BUDGET_BYTES`]); per group its GEMM operand is the gathered
/// `kc x positions` matrix, or the input itself when the gather is the identity.
struct Im2colPlan {
    ax: [AxisGather; 3],
    identity: bool,
    kc: usize,
    row_len: usize,
    total_rows: usize,
    rpc: usize,
    nchunks: usize,
}

impl Im2colPlan {
    fn new<T>(g: &Geom) -> Self {
        let kc = g.cig() * g.ktot();
        let ax = fwd_axes(g);
        let identity = ax.iter().all(AxisGather::is_identity);
        let total_rows = g.out[0] * g.out[1];
        let row_len = g.out[2];
        let rpc = rows_per_chunk::<T>(if identity { 0 } else { kc }, row_len, total_rows);
        Im2colPlan {
            ax,
            identity,
            kc,
            row_len,
            total_rows,
            rpc,
            nchunks: total_rows.div_ceil(rpc),
        }
    }

    fn items(&self, n: usize) -> usize {
        n * self.nchunks
    }

    /// `(image, first grid row, rows)` of work item `item`.
    fn item(&self, item: usize) -> (usize, usize, usize) {
        let r0 = (item % self.nchunks) * self.rpc;
        (item / self.nchunks, r0, self.rpc.min(self.total_rows - r0))
    }

    /// Group `gi`'s operand for rows `[r0, r0 + nr)` of image `b`: a pointer to `kc` rows of
    /// `nr * row_len` contiguous positions, and the stride between those rows. `ws` holds the
    /// gathered copy when one is needed.
    #[allow(clippy::too_many_arguments)]
    fn operand<T: Elem>(
        &self,
        x: &[T],
        g: &Geom,
        b: usize,
        gi: usize,
        r0: usize,
        nr: usize,
        ws: &mut Vec<u8>,
    ) -> (*const T, usize) {
        let (in_sp, cig) = (g.in_sp(), g.cig());
        let xs = &x[(b * g.cin + gi * cig) * in_sp..(b * g.cin + (gi + 1) * cig) * in_sp];
        if self.identity {
            return (xs[r0 * self.row_len..].as_ptr(), in_sp);
        }
        let pc = nr * self.row_len;
        let col = workspace::<T>(ws, self.kc * pc);
        im2col(xs, g.inp, cig, &self.ax, r0, r0 + nr, col);
        (col.as_ptr(), pc)
    }
}

/// Most output positions per image for a batch-wide GEMM ([`Im2colPlan::merged`]).
const MERGED_MAX_POSITIONS: usize = 512;
/// Largest batch-wide im2col buffer.
const MERGED_MAX_BYTES: usize = 64 << 20;

impl Im2colPlan {
    /// Whether the whole batch goes through one GEMM: the deep levels (a few hundred positions
    /// per image, hundreds of channels). Per-image GEMMs there re-pack the whole weight matrix
    /// (18.9 MB at 1024->512 channels) for every image's few hundred columns, and are too narrow
    /// to keep all threads busy; one GEMM over the images side by side packs it once.
    fn merged<T>(&self, g: &Geom) -> bool {
        let pc = self.total_rows * self.row_len;
        g.groups == 1
            && g.n > 1
            && !self.identity
            && self.nchunks == 1
            && pc <= MERGED_MAX_POSITIONS
            && self.kc * g.n * pc * std::mem::size_of::<T>() <= MERGED_MAX_BYTES
    }

    /// im2col of every image side by side: `kc` rows of `n * positions` (image-major), in
    /// parallel over blocks of input channels.
    fn gather_batch<T: Elem>(&self, x: &[T], g: &Geom, col: &mut [T]) {
        let pc = self.total_rows * self.row_len;
        let (ld, ntaps, in_sp) = (g.n * pc, g.ktot(), g.in_sp());
        let cb = g.cin.div_ceil(4 * rayon::current_num_threads()).max(1);
        col.par_chunks_mut(cb * ntaps * ld)
            .enumerate()
            .for_each(|(i, rows)| {
                let (c0, ch) = (i * cb, rows.len() / (ntaps * ld));
                for b in 0..g.n {
                    let xs = &x[(b * g.cin + c0) * in_sp..(b * g.cin + c0 + ch) * in_sp];
                    let dst = &mut rows[b * pc..];
                    im2col_ld(xs, g.inp, ch, &self.ax, (0, self.total_rows), dst, ld);
                }
            });
    }
}

/// `dy (n, cout, out)` -> `dst (cout, n * out)`: the output gradient's images side by side, the
/// GEMM operand of the batch-wide gradients.
fn side_by_side<T: Elem>(dy: &[T], g: &Geom, dst: &mut [T]) {
    let pc = g.out_sp();
    for (i, src) in dy.chunks_exact(pc).enumerate() {
        let (b, co) = (i / g.cout, i % g.cout);
        dst[co * g.n * pc + b * pc..][..pc].copy_from_slice(src);
    }
}

/// [`conv_fwd_im2col`] as one batch-wide GEMM ([`Im2colPlan::merged`]) into `[cout][n * out]`,
/// then copied out image by image (plus bias).
fn conv_fwd_merged<T: Elem>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    g: &Geom,
    plan: &Im2colPlan,
) -> Vec<T> {
    let (pc, kc) = (g.out_sp(), plan.kc);
    let ld = g.n * pc;
    let mut y = Uninit::<T>::new(g.n * g.cout * pc);
    let yp = SendPtr(y.ptr());
    with_workspace(|ws| {
        let buf = workspace::<T>(ws, kc * ld + g.cout * ld);
        let (col, tmp) = buf.split_at_mut(kc * ld);
        plan.gather_batch(x, g, col);
        // SAFETY: `tmp` is cout x ld, `w` cout x kc, `col` kc x ld.
        unsafe {
            mm(
                g.cout,
                ld,
                kc,
                tmp.as_mut_ptr(),
                ld,
                1,
                false,
                w.as_ptr(),
                kc,
                1,
                col.as_ptr(),
                ld,
                1,
                gemm_par(false),
            );
        }
        let tmp = &*tmp;
        (0..g.n * g.cout).into_par_iter().for_each(|i| {
            let (b, co) = (i / g.cout, i % g.cout);
            let bv = bias.map_or(T::ZERO, |bs| bs[co]);
            // SAFETY: every (image, channel) row of y is written by exactly one iteration.
            let dst = unsafe { std::slice::from_raw_parts_mut(yp.get().add(i * pc), pc) };
            for (d, &v) in dst.iter_mut().zip(&tmp[co * ld + b * pc..][..pc]) {
                *d = v + bv;
            }
        });
    });
    // SAFETY: every (image, channel) row was written above.
    unsafe { y.assume_init() }
}

/// [`conv_bwd_filter_im2col`] as one batch-wide GEMM ([`Im2colPlan::merged`]): `dw = dy' col^T`
/// with `dy'` the output gradient's images side by side, depth `n * out`.
fn conv_bwd_filter_merged<T: Elem>(x: &[T], dy: &[T], g: &Geom, plan: &Im2colPlan) -> Vec<T> {
    let (pc, kc) = (g.out_sp(), plan.kc);
    let ld = g.n * pc;
    let mut dw = Uninit::<T>::new(g.cout * kc);
    with_workspace(|ws| {
        let buf = workspace::<T>(ws, kc * ld + g.cout * ld);
        let (col, dym) = buf.split_at_mut(kc * ld);
        plan.gather_batch(x, g, col);
        side_by_side(dy, g, dym);
        // SAFETY: `dw` is cout x kc (row-major), `dym` cout x ld, `col` kc x ld.
        unsafe {
            mm(
                g.cout,
                kc,
                ld,
                dw.ptr(),
                kc,
                1,
                false,
                dym.as_ptr(),
                ld,
                1,
                col.as_ptr(),
                1,
                ld,
                gemm_par(false),
            );
        }
    });
    // SAFETY: the GEMM wrote every element.
    unsafe { dw.assume_init() }
}

/// [`conv_bwd_data`] for the deep levels ([`Im2colPlan::merged`]), any stride: one batch-wide
/// GEMM `cols[(ci, tap), n * out] = w^T dy'` that reads the weights transposed through its
/// strides (no transposed copy of them, no im2col of `dy`), then [`col2im_add`] per input
/// channel. The gather form ([`conv_bwd_data_as_fwd`]) first copied the whole weight tensor
/// into transposed, flipped order: 18.9 MB at 1024->512 channels for a GEMM of a few hundred
/// columns.
fn conv_bwd_data_merged<T: Elem>(dy: &[T], w: &[T], bias: Option<&[T]>, g: &Geom) -> Vec<T> {
    let (pc, in_sp, kc) = (g.out_sp(), g.in_sp(), g.cin * g.ktot());
    let ld = g.n * pc;
    let mut dx = vec![T::ZERO; g.n * g.cin * in_sp];
    let ax = fwd_axes(g);
    with_workspace(|ws| {
        let buf = workspace::<T>(ws, kc * ld + g.cout * ld);
        let (cols, dym) = buf.split_at_mut(kc * ld);
        side_by_side(dy, g, dym);
        // SAFETY: `cols` is kc x ld; `w` read as its transpose (kc x cout: row stride 1, column
        // stride kc); `dym` is cout x ld.
        unsafe {
            mm(
                kc,
                ld,
                g.cout,
                cols.as_mut_ptr(),
                ld,
                1,
                false,
                w.as_ptr(),
                1,
                kc,
                dym.as_ptr(),
                ld,
                1,
                gemm_par(false),
            );
        }
        let cols = &*cols;
        dx.par_chunks_mut(in_sp).enumerate().for_each(|(i, plane)| {
            let (b, ci) = (i / g.cin, i % g.cin);
            if let Some(bias) = bias {
                plane.fill(bias[ci]);
            }
            let rows = &cols[ci * g.ktot() * ld..(ci + 1) * g.ktot() * ld];
            col2im_add(rows, ld, b * pc, g, &ax, plane);
        });
    });
    dx
}

/// Adds one input channel's gathered gradient back onto its plane: `rows` holds one row per
/// kernel tap (row stride `ld`, this image's positions from column `off`), and tap `t` at output
/// position `o` lands on the input position the forward pass read it from (dropped where that
/// was padding). The adjoint of [`im2col`] for one channel.
fn col2im_add<T: Elem>(
    rows: &[T],
    ld: usize,
    off: usize,
    g: &Geom,
    ax: &[AxisGather; 3],
    plane: &mut [T],
) {
    let [_, o1, o2] = g.out;
    let (s2, i1n, i2n) = (g.s[2], g.inp[1], g.inp[2]);
    let mut t = 0;
    for &f0 in &ax[0].offsets {
        let (a0, b0) = ax[0].valid_range(f0);
        for &f1 in &ax[1].offsets {
            let (a1, b1) = ax[1].valid_range(f1);
            for &f2 in &ax[2].offsets {
                let (a2, b2) = ax[2].valid_range(f2);
                let row = &rows[t * ld + off..];
                t += 1;
                if a2 == b2 {
                    continue; // the tap reads only padding along the inner axis
                }
                for j0 in a0..b0 {
                    let i0 = (j0 * g.s[0]) as isize + f0;
                    for j1 in a1..b1 {
                        let i1 = (j1 * g.s[1]) as isize + f1;
                        let src = &row[(j0 * o1 + j1) * o2..][a2..b2];
                        let base = (i0 as usize * i1n + i1 as usize) * i2n;
                        let first = ((a2 * s2) as isize + f2) as usize;
                        let dst = &mut plane[base..base + i2n];
                        if s2 == 1 {
                            for (d, &v) in dst[first..first + src.len()].iter_mut().zip(src) {
                                *d += v;
                            }
                        } else {
                            for (d, &v) in dst[first..].iter_mut().step_by(s2).zip(src) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// [`conv_fwd`] on blocked im2col (any stride).
fn conv_fwd_im2col<T: Elem>(x: &[T], w: &[T], bias: Option<&[T]>, g: &Geom) -> Vec<T> {
    let (out_sp, cog) = (g.out_sp(), g.cog());
    if g.n * g.cout * out_sp == 0 {
        return Vec::new();
    }
    let plan = Im2colPlan::new::<T>(g);
    if plan.merged::<T>(g) {
        return conv_fwd_merged(x, w, bias, g, &plan);
    }
    let kc = plan.kc;
    let mut y = Uninit::<T>::new(g.n * g.cout * out_sp);
    let yp = SendPtr(y.ptr());
    let items = plan.items(g.n);
    let outer = outer_parallel(items);
    let par = gemm_par(outer);
    run_items(items, outer, |item, ws| {
        let (b, r0, nr) = plan.item(item);
        let pc = nr * plan.row_len;
        for gi in 0..g.groups {
            let (rhs, rhs_rs) = plan.operand(x, g, b, gi, r0, nr, ws);
            // SAFETY: chunks write disjoint rows of y (the GEMM overwrites them, or adds to the bias
            // fill); all indices are in bounds by construction.
            unsafe {
                let dst = yp
                    .get()
                    .add((b * g.cout + gi * cog) * out_sp + r0 * plan.row_len);
                if let Some(bias) = bias {
                    for co in 0..cog {
                        fill_raw(dst.add(co * out_sp), pc, bias[gi * cog + co]);
                    }
                }
                mm(
                    cog,
                    pc,
                    kc,
                    dst,
                    out_sp,
                    1,
                    bias.is_some(),
                    w[gi * cog * kc..].as_ptr(),
                    kc,
                    1,
                    rhs,
                    rhs_rs,
                    1,
                    par,
                );
            }
        }
    });
    // SAFETY: the chunks cover every (image, channel, position).
    unsafe { y.assume_init() }
}

/// Weight gradient: `x (n, cin, inp)`, `dy (n, cout, out)` -> `dw (cout, cin/groups, k)`.
pub(crate) fn conv_bwd_filter<T: Elem>(x: &[T], dy: &[T], g: &Geom) -> Vec<T> {
    if g.cout * g.cig() * g.ktot() == 0 {
        return vec![T::ZERO; g.cout * g.cig() * g.ktot()];
    }
    if let Some(plan) = RowPlan::new::<T>(g) {
        return conv_bwd_filter_rows(x, dy, g, &plan);
    }
    conv_bwd_filter_im2col(x, dy, g)
}

/// Runs weight-gradient work items `0..items`: `f(item, acc, first, ws, par)` adds item's
/// contribution to the accumulator `acc` (`wlen` elements), or, when `first`, overwrites every
/// element of it (the accumulators are not zero-filled: for the deep levels that fill was as
/// large as the gradient itself). Outer-parallel runs give each thread its own accumulator over a
/// contiguous range of items; the accumulators are returned unsummed.
fn filter_parts<T: Elem, F>(items: usize, wlen: usize, f: F) -> Vec<Vec<T>>
where
    F: Fn(usize, *mut T, bool, &mut Vec<u8>, gemm::Parallelism) + Sync + Send,
{
    if items == 0 {
        return vec![vec![T::ZERO; wlen]];
    }
    let outer = outer_parallel(items);
    let parts = if outer {
        rayon::current_num_threads().max(1).min(items)
    } else {
        1
    };
    let par = gemm_par(outer);
    let work = |part: usize| -> Vec<T> {
        let mut acc = Uninit::<T>::new(wlen);
        let (i0, i1) = (items * part / parts, items * (part + 1) / parts);
        with_workspace(|ws| {
            for item in i0..i1 {
                f(item, acc.ptr(), item == i0, ws, par);
            }
        });
        // SAFETY: every part has at least one item (parts <= items), and its first item wrote
        // every element.
        unsafe { acc.assume_init() }
    };
    if parts > 1 {
        (0..parts).into_par_iter().map(work).collect()
    } else {
        vec![work(0)]
    }
}

/// Writes `v` to `len` elements from `dst` (possibly uninitialised memory).
///
/// # Safety
/// `dst` must be valid for `len` writes.
unsafe fn fill_raw<T: Copy>(dst: *mut T, len: usize, v: T) {
    for i in 0..len {
        dst.add(i).write(v);
    }
}

/// A kernel output buffer that is written completely, through raw pointers, before it is read,
/// so it skips the zero-fill of `vec![0; len]`.
pub(crate) struct Uninit<T> {
    buf: Vec<std::mem::MaybeUninit<T>>,
}

impl<T: Elem> Uninit<T> {
    pub(crate) fn new(len: usize) -> Self {
        let mut buf = Vec::with_capacity(len);
        // SAFETY: `MaybeUninit` needs no initialisation.
        unsafe { buf.set_len(len) };
        Uninit { buf }
    }

    pub(crate) fn ptr(&mut self) -> *mut T {
        self.buf.as_mut_ptr().cast()
    }

    /// # Safety
    /// Every element must have been written.
    pub(crate) unsafe fn assume_init(self) -> Vec<T> {
        let mut buf = std::mem::ManuallyDrop::new(self.buf);
        Vec::from_raw_parts(buf.as_mut_ptr().cast(), buf.len(), buf.capacity())
    }
}

/// Sums the accumulators of [`filter_parts`] and lays them out as `dw (cout, cig * ktot)`. Per
/// group an accumulator is column-major (`kc` rows of `cog`, so that gemm streams the im2col rows
/// directly instead of transposing them while packing), with `dw` column `r` stored in row
/// `row_of[r]`. The transpose goes in 32 x 32 tiles (a plain strided transpose misses the cache
/// on every element once `cog * 4` bytes exceeds a line), parallel over blocks of output rows.
fn filter_reduce<T: Elem>(partials: &[Vec<T>], g: &Geom, row_of: &[usize]) -> Vec<T> {
    const TB: usize = 32;
    let (cog, kc) = (g.cog(), row_of.len());
    let mut dw = vec![T::ZERO; g.cout * kc];
    dw.par_chunks_mut(TB * kc)
        .enumerate()
        .for_each(|(blk, out)| {
            let row0 = blk * TB;
            let rows = out.len() / kc.max(1);
            for r0 in (0..kc).step_by(TB) {
                let r1 = (r0 + TB).min(kc);
                for i in 0..rows {
                    let (gi, co) = ((row0 + i) / cog, (row0 + i) % cog);
                    let base = gi * cog * kc + co;
                    for r in r0..r1 {
                        let idx = base + row_of[r] * cog;
                        let mut v = partials[0][idx];
                        for p in &partials[1..] {
                            v += p[idx];
                        }
                        out[i * kc + r] = v;
                    }
                }
            }
        });
    dw
}

/// [`conv_bwd_filter`] on blocked im2col (any geometry).
fn conv_bwd_filter_im2col<T: Elem>(x: &[T], dy: &[T], g: &Geom) -> Vec<T> {
    let (out_sp, cog) = (g.out_sp(), g.cog());
    let plan = Im2colPlan::new::<T>(g);
    if plan.merged::<T>(g) {
        return conv_bwd_filter_merged(x, dy, g, &plan);
    }
    let kc = plan.kc;
    // Fewer positions per item than gathered rows (the deep levels, e.g. 512 channels at 8 x 4):
    // the accumulators take dw's own row-major layout, so no transposing reduction rewrites them
    // (with GEMM depth 32 that reduction cost as much as the GEMMs). Otherwise column-major.
    let row_major = plan.rpc * plan.row_len < kc;
    let (dst_rs, dst_cs) = if row_major { (kc, 1) } else { (1, cog) };
    let partials = filter_parts(
        plan.items(g.n),
        g.cout * kc,
        |item, acc: *mut T, first, ws, par| {
            let (b, r0, nr) = plan.item(item);
            for gi in 0..g.groups {
                let (rhs, rhs_cs) = plan.operand(x, g, b, gi, r0, nr, ws);
                // SAFETY: in-bounds pointers; `acc` (cout * kc) is owned by this part.
                unsafe {
                    mm(
                        cog,
                        kc,
                        nr * plan.row_len,
                        acc.add(gi * cog * kc),
                        dst_rs,
                        dst_cs,
                        !first,
                        dy[(b * g.cout + gi * cog) * out_sp + r0 * plan.row_len..].as_ptr(),
                        out_sp,
                        1,
                        rhs,
                        1,
                        rhs_cs,
                        par,
                    );
                }
            }
        },
    );
    if row_major {
        return sum_parts(partials);
    }
    let row_of: Vec<usize> = (0..kc).collect();
    filter_reduce(&partials, g, &row_of)
}

/// Element-wise sum of the (row-major) accumulators of [`filter_parts`].
fn sum_parts<T: Elem>(partials: Vec<Vec<T>>) -> Vec<T> {
    let mut it = partials.into_iter();
    let mut sum = it.next().unwrap_or_default();
    for p in it {
        sum.par_iter_mut()
            .zip(p.par_iter())
            .for_each(|(s, &v)| *s += v);
    }
    sum
}

/// [`conv_bwd_filter`] through a [`RowPlan`]: per row offset `j` one GEMM of the output gradient
/// rows with the gathered rows `j * dilation` further on, into accumulator block `j`.
fn conv_bwd_filter_rows<T: Elem>(x: &[T], dy: &[T], g: &Geom, plan: &RowPlan) -> Vec<T> {
    let (in_sp, out_sp) = (g.in_sp(), g.out_sp());
    let (cig, cog, ktot) = (g.cig(), g.cog(), g.ktot());
    let (taps, kin) = (plan.taps, plan.kin);
    let kc = cig * kin;
    let partials = filter_parts(
        plan.items(g.n),
        g.cout * cig * ktot,
        |item, acc: *mut T, first, ws, par| {
            let (b, o, h0, nr) = plan.item(item);
            let cols = (nr + plan.span()) * plan.row_len;
            let col = workspace::<T>(ws, kc * cols);
            for gi in 0..g.groups {
                let xs = &x[(b * g.cin + gi * cig) * in_sp..(b * g.cin + (gi + 1) * cig) * in_sp];
                plan.gather(xs, g, o, h0, nr, col);
                let dys =
                    &dy[(b * g.cout + gi * cog) * out_sp + (o * plan.rows + h0) * plan.row_len..];
                for j in 0..taps {
                    // SAFETY: in-bounds pointers; `acc` (cout * kc) is owned by this part.
                    unsafe {
                        mm(
                            cog,
                            kc,
                            nr * plan.row_len,
                            acc.add((gi * taps + j) * kc * cog),
                            1,
                            cog,
                            !first,
                            dys.as_ptr(),
                            out_sp,
                            1,
                            col[j * plan.dil * plan.row_len..].as_ptr(),
                            1,
                            cols,
                            par,
                        );
                    }
                }
            }
        },
    );
    // dw column ci * ktot + tap(j, t) lives in accumulator row j * kc + ci * kin + t.
    let mut row_of = vec![0; cig * ktot];
    for ci in 0..cig {
        for j in 0..taps {
            for t in 0..kin {
                row_of[ci * ktot + plan.tap(j, t)] = j * kc + ci * kin + t;
            }
        }
    }
    filter_reduce(&partials, g, &row_of)
}

/// Input gradient (the transposed convolution): `dy (n, cout, out)`, `w (cout, cin/groups, k)`
/// -> `dx (n, cin, inp)`, optionally initialised with a per-channel `bias (cin)`.
pub(crate) fn conv_bwd_data<T: Elem>(dy: &[T], w: &[T], bias: Option<&[T]>, g: &Geom) -> Vec<T> {
    if Im2colPlan::new::<T>(g).merged::<T>(g) {
        return conv_bwd_data_merged(dy, w, bias, g);
    }
    if let Some(dx) = conv_bwd_data_as_fwd(dy, w, bias, g) {
        return dx;
    }
    conv_bwd_data_phases(dy, w, bias, g)
}

/// Per group, `w (cog, cig, ktot)` -> `(cig, cog, taps.len())` with
/// `out[ci][co][t] = w[co][ci][taps[t]]`: the input-gradient weights. Goes in 16 x 16 (ci, co)
/// tiles, parallel over blocks of `ci` (a plain loop reads `w` with a stride of `cig * ktot` and
/// was ~3% of a 2D step at 512 channels).
fn transpose_taps<T: Elem>(w: &[T], g: &Geom, taps: &[usize]) -> Vec<T> {
    const TB: usize = 16;
    let (cig, cog, ktot, nt) = (g.cig(), g.cog(), g.ktot(), taps.len());
    let row = cog * nt;
    let mut out = vec![T::ZERO; g.groups * cig * row];
    if row == 0 {
        return out;
    }
    // all taps in order (the single phase of a stride-1 input gradient): whole-row copies
    let identity = nt == ktot && taps.iter().enumerate().all(|(i, &t)| i == t);
    out.par_chunks_mut(TB * row)
        .enumerate()
        .for_each(|(blk, dst)| {
            let r0 = blk * TB;
            let rows = dst.len() / row;
            for co0 in (0..cog).step_by(TB) {
                for i in 0..rows {
                    let (gi, ci) = ((r0 + i) / cig, (r0 + i) % cig);
                    for co in co0..(co0 + TB).min(cog) {
                        let src = &w[((gi * cog + co) * cig + ci) * ktot..][..ktot];
                        let d = &mut dst[i * row + co * nt..][..nt];
                        if identity {
                            d.copy_from_slice(src);
                            continue;
                        }
                        for (v, &t) in d.iter_mut().zip(taps) {
                            *v = src[t];
                        }
                    }
                }
            }
        });
    out
}

/// One input phase of [`conv_bwd_data_phases`]: its offset `r` per axis, gather, taps, chunking
/// and sub-weight.
struct Phase<T> {
    r: [usize; 3],
    ax: [AxisGather; 3],
    ntaps: usize,
    identity: bool,
    rpc: usize,
    nchunks: usize,
    /// per group: cig x (cog * ntaps) sub-weight
    wp: Vec<T>,
}

/// The input phases of `g` that have at least one position and one tap (the others get
/// gradient 0, or the bias).
fn data_phases<T: Elem>(w: &[T], g: &Geom) -> Vec<Phase<T>> {
    let (cig, cog) = (g.cig(), g.cog());
    let single_phase = g.s.iter().all(|&s| s == 1);
    let mut phases: Vec<Phase<T>> = Vec::new();
    for rd in 0..g.s[0] {
        for rh in 0..g.s[1] {
            for rw in 0..g.s[2] {
                let r = [rd, rh, rw];
                let ax = phase_axes(g, r);
                if ax.iter().any(|a| a.grid == 0 || a.offsets.is_empty()) {
                    continue; // no positions, or positions no tap reaches: gradient 0 (or bias)
                }
                let ntaps: usize = ax.iter().map(|a| a.offsets.len()).product();
                let identity = ax.iter().all(AxisGather::is_identity);
                let kr = cog * ntaps;
                let total_rows = ax[0].grid * ax[1].grid;
                let rpc = rows_per_chunk::<T>(
                    if identity { 0 } else { kr } + if single_phase { 0 } else { cig },
                    ax[2].grid,
                    total_rows,
                );
                let nchunks = total_rows.div_ceil(rpc);
                let mut taps = Vec::with_capacity(ntaps);
                for &kd in &ax[0].kidx {
                    for &kh in &ax[1].kidx {
                        for &kw in &ax[2].kidx {
                            taps.push((kd * g.k[1] + kh) * g.k[2] + kw);
                        }
                    }
                }
                let wp = transpose_taps(w, g, &taps);
                phases.push(Phase {
                    r,
                    ax,
                    ntaps,
                    identity,
                    rpc,
                    nchunks,
                    wp,
                });
            }
        }
    }
    phases
}

/// [`conv_bwd_data`] in phase-gather form on blocked im2col (any stride).
fn conv_bwd_data_phases<T: Elem>(dy: &[T], w: &[T], bias: Option<&[T]>, g: &Geom) -> Vec<T> {
    let (in_sp, out_sp) = (g.in_sp(), g.out_sp());
    let (cig, cog) = (g.cig(), g.cog());
    let mut dx = vec![T::ZERO; g.n * g.cin * in_sp];
    if dx.is_empty() {
        return dx;
    }
    if (0..3)
        .all(|a| g.k[a] == g.s[a] && g.p[a] == 0 && g.d[a] == 1 && g.inp[a] == g.out[a] * g.k[a])
    {
        conv_bwd_data_k_eq_s(dy, w, bias, g, &mut dx);
        return dx;
    }
    if let Some(bias) = bias {
        for (i, c) in dx.chunks_mut(in_sp).enumerate() {
            c.fill(bias[i % g.cin]);
        }
    }
    let single_phase = g.s.iter().all(|&s| s == 1);
    let phases = data_phases(w, g);
    // Work items: (image, phase, chunk).
    let mut item_index = Vec::new();
    for b in 0..g.n {
        for (pi, ph) in phases.iter().enumerate() {
            for c in 0..ph.nchunks {
                item_index.push((b, pi, c));
            }
        }
    }
    let dxp = SendPtr(dx.as_mut_ptr());
    let outer = outer_parallel(item_index.len());
    let par = gemm_par(outer);
    let has_bias = bias.is_some();
    run_items(item_index.len(), outer, |item, ws| {
        let (b, pi, c) = item_index[item];
        let ph = &phases[pi];
        let ax = &ph.ax;
        let kr = cog * ph.ntaps;
        let total_rows = ax[0].grid * ax[1].grid;
        let row_len = ax[2].grid;
        let r0 = c * ph.rpc;
        let r1 = (r0 + ph.rpc).min(total_rows);
        let pc = (r1 - r0) * row_len;
        let col_len = if ph.identity { 0 } else { kr * pc };
        let tmp_len = if single_phase { 0 } else { cig * pc };
        let buf = workspace::<T>(ws, col_len + tmp_len);
        let (col, tmp) = buf.split_at_mut(col_len);
        for gi in 0..g.groups {
            let src = &dy[(b * g.cout + gi * cog) * out_sp..(b * g.cout + (gi + 1) * cog) * out_sp];
            let (rhs, rhs_rs) = if ph.identity {
                (src[r0 * row_len..].as_ptr(), out_sp)
            } else {
                im2col(src, g.out, cog, ax, r0, r1, col);
                (col.as_ptr(), pc)
            };
            let lhs = ph.wp[gi * cig * kr..].as_ptr();
            // SAFETY: each (image, phase, chunk) writes a disjoint set of dx positions.
            unsafe {
                let dx_img = dxp.get().add((b * g.cin + gi * cig) * in_sp);
                if single_phase {
                    mm(
                        cig,
                        pc,
                        kr,
                        dx_img.add(r0 * row_len),
                        in_sp,
                        1,
                        has_bias,
                        lhs,
                        kr,
                        1,
                        rhs,
                        rhs_rs,
                        1,
                        par,
                    );
                } else {
                    mm(
                        cig,
                        pc,
                        kr,
                        tmp.as_mut_ptr(),
                        pc,
                        1,
                        false,
                        lhs,
                        kr,
                        1,
                        rhs,
                        rhs_rs,
                        1,
                        par,
                    );
                    let g1 = ax[1].grid;
                    for ci in 0..cig {
                        let trow = &tmp[ci * pc..(ci + 1) * pc];
                        let dxc = dx_img.add(ci * in_sp);
                        for r in r0..r1 {
                            let id = (r / g1) * g.s[0] + ph.r[0];
                            let ih = (r % g1) * g.s[1] + ph.r[1];
                            let base = dxc.add((id * g.inp[1] + ih) * g.inp[2] + ph.r[2]);
                            let vals = &trow[(r - r0) * row_len..(r - r0 + 1) * row_len];
                            for (j, &v) in vals.iter().enumerate() {
                                *base.add(j * g.s[2]) += v;
                            }
                        }
                    }
                }
            }
        }
    });
    dx
}

/// [`conv_bwd_data`] of a stride-1 convolution as the forward convolution of `dy` with the
/// flipped, transposed kernel and padding `d (k - 1) - p`, through [`Implicit`] or a [`RowPlan`]
/// (`None` when that padding would be negative or neither applies).
fn conv_bwd_data_as_fwd<T: Elem>(
    dy: &[T],
    w: &[T],
    bias: Option<&[T]>,
    g: &Geom,
) -> Option<Vec<T>> {
    if g.s != [1, 1, 1] || (0..3).any(|a| g.p[a] > g.d[a] * (g.k[a] - 1)) {
        return None;
    }
    let t = Geom {
        n: g.n,
        cin: g.cout,
        cout: g.cin,
        groups: g.groups,
        inp: g.out,
        out: g.inp,
        k: g.k,
        s: [1, 1, 1],
        p: std::array::from_fn(|a| g.d[a] * (g.k[a] - 1) - g.p[a]),
        d: g.d,
    };
    if Implicit::plan(&t).is_none() && RowPlan::new::<T>(&t).is_none() {
        return None;
    }
    // w (cout, cig, k) -> wf (cin, cog, k) with the kernel reversed along every axis.
    let reversed: Vec<usize> = (0..g.ktot()).rev().collect();
    let wf = transpose_taps(w, g, &reversed);
    Some(conv_fwd(dy, &wf, bias, &t))
}

/// [`conv_bwd_data`] when kernel == stride, no padding/dilation and an exact tiling (the U-Net
/// decoder's transposed convolution): one GEMM over all taps, `tmp[(ci, tap), p] =
/// sum_co w[co, ci, tap] dy[co, p]`, then an interleaving copy that writes whole output rows.
fn conv_bwd_data_k_eq_s<T: Elem>(dy: &[T], w: &[T], bias: Option<&[T]>, g: &Geom, dx: &mut [T]) {
    let (in_sp, out_sp) = (g.in_sp(), g.out_sp());
    let (cig, cog) = (g.cig(), g.cog());
    let ktot = g.ktot();
    let mrows = cig * ktot;
    let total_rows = g.out[0] * g.out[1];
    let row_len = g.out[2];
    let rpc = rows_per_chunk::<T>(mrows, row_len, total_rows);
    let nchunks = total_rows.div_ceil(rpc);
    let items = g.n * nchunks;
    let outer = outer_parallel(items);
    let par = gemm_par(outer);
    let dxp = SendPtr(dx.as_mut_ptr());
    let [kd, kh, kw] = g.k;
    run_items(items, outer, |item, ws| {
        let b = item / nchunks;
        let r0 = (item % nchunks) * rpc;
        let r1 = (r0 + rpc).min(total_rows);
        let pc = (r1 - r0) * row_len;
        let tmp = workspace::<T>(ws, mrows * pc);
        for gi in 0..g.groups {
            // SAFETY: in-bounds pointers; each (image, chunk) writes disjoint output rows.
            unsafe {
                mm(
                    mrows,
                    pc,
                    cog,
                    tmp.as_mut_ptr(),
                    pc,
                    1,
                    false,
                    w[gi * cog * mrows..].as_ptr(),
                    1,
                    mrows,
                    dy[(b * g.cout + gi * cog) * out_sp + r0 * row_len..].as_ptr(),
                    out_sp,
                    1,
                    par,
                );
                for ci in 0..cig {
                    let c = gi * cig + ci;
                    let bv = bias.map_or(T::ZERO, |bs| bs[c]);
                    let dxc = dxp.get().add((b * g.cin + c) * in_sp);
                    for r in r0..r1 {
                        let (o0, o1) = (r / g.out[1], r % g.out[1]);
                        for td in 0..kd {
                            for th in 0..kh {
                                let orow = ((o0 * kd + td) * g.inp[1] + o1 * kh + th) * g.inp[2];
                                let out = std::slice::from_raw_parts_mut(dxc.add(orow), g.inp[2]);
                                for tw in 0..kw {
                                    let t = (td * kh + th) * kw + tw;
                                    let src = &tmp[(ci * ktot + t) * pc + (r - r0) * row_len..]
                                        [..row_len];
                                    for (j, &v) in src.iter().enumerate() {
                                        out[j * kw + tw] = v + bv;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(inp: [usize; 3], k: [usize; 3], s: [usize; 3], p: [usize; 3], d: [usize; 3]) -> Geom {
        let out = std::array::from_fn(|a| (inp[a] + 2 * p[a] - d[a] * (k[a] - 1) - 1) / s[a] + 1);
        Geom {
            n: 2,
            cin: 4,
            cout: 6,
            groups: 2,
            inp,
            out,
            k,
            s,
            p,
            d,
        }
    }

    fn naive_fwd(x: &[f64], w: &[f64], g: &Geom) -> Vec<f64> {
        let mut y = vec![0.0; g.n * g.cout * g.out_sp()];
        let (cig, cog) = (g.cig(), g.cog());
        for b in 0..g.n {
            for co in 0..g.cout {
                let gi = co / cog;
                for o0 in 0..g.out[0] {
                    for o1 in 0..g.out[1] {
                        for o2 in 0..g.out[2] {
                            let mut acc = 0.0;
                            for ci in 0..cig {
                                for k0 in 0..g.k[0] {
                                    for k1 in 0..g.k[1] {
                                        for k2 in 0..g.k[2] {
                                            let i0 = (o0 * g.s[0] + k0 * g.d[0]) as isize
                                                - g.p[0] as isize;
                                            let i1 = (o1 * g.s[1] + k1 * g.d[1]) as isize
                                                - g.p[1] as isize;
                                            let i2 = (o2 * g.s[2] + k2 * g.d[2]) as isize
                                                - g.p[2] as isize;
                                            if i0 < 0
                                                || i1 < 0
                                                || i2 < 0
                                                || i0 as usize >= g.inp[0]
                                                || i1 as usize >= g.inp[1]
                                                || i2 as usize >= g.inp[2]
                                            {
                                                continue;
                                            }
                                            let xi = (((b * g.cin + gi * cig + ci) * g.inp[0]
                                                + i0 as usize)
                                                * g.inp[1]
                                                + i1 as usize)
                                                * g.inp[2]
                                                + i2 as usize;
                                            let wi = (((co * cig + ci) * g.k[0] + k0) * g.k[1]
                                                + k1)
                                                * g.k[2]
                                                + k2;
                                            acc += x[xi] * w[wi];
                                        }
                                    }
                                }
                            }
                            y[(((b * g.cout + co) * g.out[0] + o0) * g.out[1] + o1) * g.out[2]
                                + o2] = acc;
                        }
                    }
                }
            }
        }
        y
    }

    fn seq(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64) - 0.5
            })
            .collect()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn assert_all_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (u, v) in a.iter().zip(b) {
            assert!((u - v).abs() < tol, "{what}: {u} vs {v}");
        }
    }

    /// Forward matches a naive loop; the input and weight gradients are the exact adjoints
    /// (<dy, conv(x, w)> == <bwd_data(dy, w), x> == <bwd_filter(x, dy), w>).
    #[test]
    fn kernels_match_naive_and_are_adjoint() {
        check_naive_and_adjoint();
    }

    /// The same with gemm's AVX2/FMA micro-kernels forced (`NNSEG_ISA=avx2`), as an AVX2-only
    /// CPU runs them; the selection is restored afterwards (both paths are exact to 1e-12, so a
    /// test running meanwhile on the other path is unaffected).
    #[test]
    fn kernels_on_forced_avx2_match_naive() {
        use crate::ops::isa::{gemm_isa, set_gemm_isa, GemmIsa};
        let before = gemm_isa();
        set_gemm_isa(GemmIsa::Avx2);
        let r = std::panic::catch_unwind(check_naive_and_adjoint);
        set_gemm_isa(before);
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    }

    #[test]
    fn copy_stride2_gathers_even_elements() {
        for n in 0..6 {
            let src: Vec<f64> = (0..2 * n + 1).map(|i| i as f64).collect();
            let mut dst = vec![-1.0; n];
            // the source may end right after the last element read
            copy_stride2(&mut dst, &src[..(2 * n).saturating_sub(1)]);
            let want: Vec<f64> = (0..n).map(|i| (2 * i) as f64).collect();
            assert_eq!(dst, want);
        }
    }

    fn check_naive_and_adjoint() {
        let cases = [
            geom([1, 5, 7], [1, 3, 3], [1, 1, 1], [0, 1, 1], [1, 1, 1]),
            geom([1, 6, 7], [1, 3, 3], [1, 2, 2], [0, 1, 1], [1, 1, 1]),
            geom([5, 6, 7], [3, 3, 3], [2, 1, 2], [1, 1, 1], [1, 1, 1]),
            geom([4, 6, 8], [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1]),
            geom([5, 6, 7], [3, 3, 3], [1, 1, 1], [2, 2, 2], [2, 2, 2]),
            geom([5, 7, 9], [1, 3, 3], [1, 2, 2], [0, 2, 0], [1, 2, 1]),
            geom([3, 4, 5], [1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1]),
            geom([6, 4, 9], [1, 1, 1], [2, 1, 3], [0, 0, 0], [1, 1, 1]),
            geom([4, 6, 9], [2, 2, 3], [2, 2, 3], [0, 0, 0], [1, 1, 1]),
            geom([4, 7, 9], [1, 2, 3], [1, 2, 3], [0, 0, 0], [1, 1, 1]),
        ];
        for g in cases {
            let x = seq(g.n * g.cin * g.in_sp(), 1);
            let w = seq(g.cout * g.cig() * g.ktot(), 2);
            let dy = seq(g.n * g.cout * g.out_sp(), 3);
            let y = conv_fwd(&x, &w, None, &g);
            assert_all_close(&y, &naive_fwd(&x, &w, &g), 1e-12, &format!("{g:?}"));
            let lhs = dot(&dy, &y);
            let dx = conv_bwd_data(&dy, &w, None, &g);
            let dw = conv_bwd_filter(&x, &dy, &g);
            assert!((lhs - dot(&dx, &x)).abs() < 1e-10, "{g:?} data adjoint");
            assert!((lhs - dot(&dw, &w)).abs() < 1e-10, "{g:?} filter adjoint");
        }
    }

    /// The batch-wide GEMMs of the deep levels ([`Im2colPlan::merged`]: one group, several
    /// images, few positions) match the naive convolution (forward) and are its adjoints (input
    /// and weight gradients), with and without bias, strided and padded, 2D and 3D.
    #[test]
    fn merged_batch_gemms_match_naive_and_are_adjoint() {
        let cases = [
            geom([1, 4, 3], [1, 3, 3], [1, 1, 1], [0, 1, 1], [1, 1, 1]),
            geom([1, 8, 6], [1, 3, 3], [1, 2, 2], [0, 1, 1], [1, 1, 1]),
            geom([3, 4, 5], [3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1]),
            geom([1, 5, 5], [1, 3, 3], [1, 1, 1], [0, 2, 2], [1, 2, 2]),
            // one-voxel axes: taps that read only padding
            geom([1, 2, 1], [1, 3, 3], [1, 1, 1], [0, 1, 1], [1, 1, 1]),
            geom([1, 1, 3], [1, 3, 3], [1, 1, 1], [0, 1, 1], [1, 1, 1]),
            geom([1, 1, 1], [1, 3, 3], [1, 1, 1], [0, 2, 2], [1, 2, 2]),
        ];
        for mut g in cases {
            (g.n, g.groups, g.cin, g.cout) = (3, 1, 5, 7);
            assert!(Im2colPlan::new::<f64>(&g).merged::<f64>(&g), "{g:?} merged");
            let x = seq(g.n * g.cin * g.in_sp(), 11);
            let w = seq(g.cout * g.cig() * g.ktot(), 12);
            let bias = seq(g.cout, 13);
            let dy = seq(g.n * g.cout * g.out_sp(), 14);
            let y = conv_fwd_im2col(&x, &w, Some(&bias), &g);
            let mut want = naive_fwd(&x, &w, &g);
            for (i, v) in want.iter_mut().enumerate() {
                *v += bias[(i / g.out_sp()) % g.cout];
            }
            assert_all_close(&y, &want, 1e-12, &format!("{g:?} fwd"));
            let lhs = dot(&dy, &naive_fwd(&x, &w, &g));
            let dx = conv_bwd_data_merged(&dy, &w, None, &g);
            assert!((lhs - dot(&dx, &x)).abs() < 1e-9, "{g:?} data adjoint");
            let dbias = seq(g.cin, 15);
            let a = conv_bwd_data_merged(&dy, &w, Some(&dbias), &g);
            let b = conv_bwd_data_phases(&dy, &w, Some(&dbias), &g);
            assert_all_close(&a, &b, 1e-12, &format!("{g:?} data"));
            let dw = conv_bwd_filter_im2col(&x, &dy, &g);
            assert!((lhs - dot(&dw, &w)).abs() < 1e-9, "{g:?} filter adjoint");
        }
    }

    /// The implicit-GEMM path (stride 1) agrees with the im2col path, forward and input gradient,
    /// including dilation, asymmetric kernels, groups, 1-voxel axes and padding larger than the
    /// kernel reach (where the input gradient keeps the phase path).
    #[test]
    fn implicit_gemm_matches_im2col() {
        let cases = [
            geom([1, 9, 11], [1, 3, 3], [1, 1, 1], [0, 1, 1], [1, 1, 1]),
            geom([5, 6, 7], [3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1]),
            geom([5, 6, 7], [3, 3, 3], [1, 1, 1], [2, 2, 2], [2, 2, 2]),
            geom([4, 5, 6], [3, 1, 3], [1, 1, 1], [1, 0, 1], [1, 1, 1]),
            geom([4, 5, 6], [2, 3, 1], [1, 1, 1], [0, 1, 0], [1, 1, 1]),
            geom([3, 3, 3], [3, 3, 3], [1, 1, 1], [3, 3, 3], [1, 1, 1]),
            geom([1, 1, 9], [1, 1, 3], [1, 1, 1], [0, 0, 1], [1, 1, 1]),
            geom([3, 4, 5], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]),
        ];
        let mut used = 0;
        for g in cases {
            let x = seq(g.n * g.cin * g.in_sp(), 4);
            let w = seq(g.cout * g.cig() * g.ktot(), 5);
            let bias = seq(g.cout, 6);
            let dy = seq(g.n * g.cout * g.out_sp(), 7);
            let dbias = seq(g.cin, 8);
            if let Some(plan) = Implicit::plan(&g) {
                used += 1;
                let a = conv_fwd_implicit(&x, &w, Some(&bias), &g, &plan);
                let b = conv_fwd_im2col(&x, &w, Some(&bias), &g);
                assert_all_close(&a, &b, 1e-12, &format!("{g:?} fwd"));
            }
            if let Some(a) = conv_bwd_data_as_fwd(&dy, &w, Some(&dbias), &g) {
                used += 1;
                let b = conv_bwd_data_phases(&dy, &w, Some(&dbias), &g);
                assert_all_close(&a, &b, 1e-12, &format!("{g:?} data"));
            }
        }
        assert!(used >= 12, "implicit path taken only {used} times");
    }

    /// The row-offset path ([`RowPlan`], along axis 0 or 1) agrees with the im2col path for the
    /// forward pass, the weight gradient and the input gradient (as a flipped forward), with
    /// strides and dilation on the gathered axes, groups, padding beyond the kernel reach and
    /// chunks smaller than an axis (a tiny workspace budget is forced through `rpc`).
    #[test]
    fn row_plan_matches_im2col() {
        let cases = [
            geom([5, 6, 7], [3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1]),
            geom([5, 6, 7], [3, 3, 3], [1, 2, 2], [1, 1, 1], [1, 1, 1]),
            geom([6, 5, 7], [3, 2, 3], [1, 2, 1], [2, 0, 1], [2, 1, 2]),
            geom([4, 5, 6], [2, 1, 3], [1, 1, 1], [0, 0, 1], [1, 1, 1]),
            geom([1, 9, 11], [1, 3, 3], [1, 1, 1], [0, 1, 1], [1, 1, 1]),
            geom([3, 9, 11], [1, 3, 3], [1, 1, 2], [0, 1, 1], [1, 2, 1]),
            geom([2, 7, 5], [1, 3, 1], [1, 1, 1], [0, 3, 0], [1, 1, 1]),
            geom([3, 3, 3], [3, 3, 3], [1, 1, 1], [3, 3, 3], [1, 1, 1]),
            // large enough for `RowPlan::new`, so the input gradient also takes the row path
            geom([6, 16, 16], [3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1]),
            geom([1, 24, 24], [1, 3, 3], [1, 1, 1], [0, 1, 1], [1, 1, 1]),
        ];
        let mut used = 0;
        for g in cases {
            let Some(mut plan) = RowPlan::build::<f64>(&g) else {
                continue;
            };
            let x = seq(g.n * g.cin * g.in_sp(), 11);
            let w = seq(g.cout * g.cig() * g.ktot(), 12);
            let bias = seq(g.cout, 13);
            let dy = seq(g.n * g.cout * g.out_sp(), 14);
            let dbias = seq(g.cin, 15);
            for rpc in [plan.rpc, 1, 2] {
                plan.rpc = rpc.min(plan.rows);
                plan.nchunks = plan.rows.div_ceil(plan.rpc);
                let what = format!("{g:?} rows/row {} rpc {}", plan.m, plan.rpc);
                let a = conv_fwd_rows(&x, &w, Some(&bias), &g, &plan);
                let b = conv_fwd_im2col(&x, &w, Some(&bias), &g);
                assert_all_close(&a, &b, 1e-12, &format!("{what} fwd"));
                let a = conv_bwd_filter_rows(&x, &dy, &g, &plan);
                let b = conv_bwd_filter_im2col(&x, &dy, &g);
                assert_all_close(&a, &b, 1e-12, &format!("{what} filter"));
            }
            used += 1;
            if let Some(a) = conv_bwd_data_as_fwd(&dy, &w, Some(&dbias), &g) {
                let b = conv_bwd_data_phases(&dy, &w, Some(&dbias), &g);
                assert_all_close(&a, &b, 1e-12, &format!("{g:?} data"));
            }
        }
        let large = geom([6, 16, 16], [3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1]);
        assert!(RowPlan::new::<f64>(&large).is_some());
        assert_eq!(used, 10, "row plan taken only {used} times");
    }

    /// Timing breakdown of the three kernels (run with
    /// `cargo test --release -p architectures -- --ignored kernel_timings --nocapture`).
    #[test]
    #[ignore = "benchmark: slow, run with --release -- --ignored --nocapture"]
    fn kernel_timings() {
        // (name, input, kernel, stride, padding, channels in, out); the "demo" rows are layers of
        // the demo plans (batch 2 there, 1 here).
        #[rustfmt::skip]
        let cases = [
            ("2d 256^2", [1, 256, 256], [1, 3, 3], [1, 1, 1], [0, 1, 1], 32, 32),
            ("3d 64^3", [64, 64, 64], [3, 3, 3], [1, 1, 1], [1, 1, 1], 32, 32),
            ("3d s122", [16, 128, 128], [1, 3, 3], [1, 2, 2], [0, 1, 1], 32, 32),
            ("demo l0", [24, 56, 56], [1, 3, 3], [1, 1, 1], [0, 1, 1], 32, 32),
            ("demo l1", [24, 28, 28], [1, 3, 3], [1, 1, 1], [0, 1, 1], 64, 64),
            ("demo l2", [24, 14, 14], [3, 3, 3], [1, 1, 1], [1, 1, 1], 128, 128),
            ("demo l2 dec", [24, 14, 14], [3, 3, 3], [1, 1, 1], [1, 1, 1], 256, 128),
            ("demo l3", [12, 7, 7], [3, 3, 3], [1, 1, 1], [1, 1, 1], 256, 256),
            ("2d demo l0", [1, 112, 128], [1, 3, 3], [1, 1, 1], [0, 1, 1], 32, 32),
            ("2d demo l1", [1, 56, 64], [1, 3, 3], [1, 1, 1], [0, 1, 1], 64, 64),
            ("2d demo l2", [1, 28, 32], [1, 3, 3], [1, 1, 1], [0, 1, 1], 128, 128),
            ("2d demo l3", [1, 14, 16], [1, 3, 3], [1, 1, 1], [0, 1, 1], 256, 256),
            ("demo l1 s122", [24, 56, 56], [1, 3, 3], [1, 2, 2], [0, 1, 1], 32, 64),
            ("demo l2 s122", [24, 28, 28], [3, 3, 3], [1, 2, 2], [1, 1, 1], 64, 128),
            ("demo l3 s222", [24, 14, 14], [3, 3, 3], [2, 2, 2], [1, 1, 1], 128, 256),
            ("demo l4 s211", [12, 7, 7], [3, 3, 3], [2, 1, 1], [1, 1, 1], 256, 320),
        ];
        for (name, inp, k, s, p, cin, cout) in cases {
            let mut g = geom(inp, k, s, p, [1, 1, 1]);
            g.cin = cin;
            g.cout = cout;
            g.groups = 1;
            let x: Vec<f32> = seq(g.n * g.cin * g.in_sp(), 1)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let w: Vec<f32> = seq(g.cout * g.cig() * g.ktot(), 2)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let dy: Vec<f32> = seq(g.n * g.cout * g.out_sp(), 3)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let flops = 2.0 * (g.n * g.cout * g.out_sp() * g.cig() * g.ktot()) as f64;
            let time = |f: &dyn Fn() -> Vec<f32>| {
                let _ = f();
                (0..5)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        let _ = f();
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::MAX, f64::min)
            };
            let a = time(&|| conv_fwd(&x, &w, None, &g));
            let b = time(&|| conv_bwd_data(&dy, &w, None, &g));
            let c = time(&|| conv_bwd_filter(&x, &dy, &g));
            println!(
                "{name}: fwd {a:.4}s ({:.0} GF/s) data {b:.4}s ({:.0}) filter {c:.4}s ({:.0})",
                flops / a / 1e9,
                flops / b / 1e9,
                flops / c / 1e9
            );
        }
    }
}
