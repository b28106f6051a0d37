//! Direct (im2col-free) 2D and 3D convolution, stride 1 or 2, for AVX2/FMA, f32.
//!
//! The GEMM formulations of [`super::kernels`] split a 3x3 convolution into GEMMs of depth
//! `C_in * 3` (one per kernel row) that read and write the output three times, and gemm's 16x6
//! AVX2 micro-kernel leaves a 2-wide edge tile at 32 output channels. Here a register tile of
//! [`CO_T`] output channels x [`POS_T`] positions of one output row accumulates over all input
//! channels and taps (`C_in * k_h * k_w`) in registers and is stored once. Each work item (image,
//! band of output rows) first copies the input rows it reads into a zero-padded band (per-thread
//! workspace, L2-sized), so the inner loop has no bounds checks. With stride 2 along a row the
//! band stores each padded row as its even columns followed by its odd ones, so every tap still
//! reads consecutive output positions as consecutive elements (the encoders' stride-2 3x3
//! convolutions, which im2col otherwise copies 9 times). The stride-1 input gradient runs here
//! too, as the forward convolution with the flipped kernel.
//!
//! Taken on every CPU with AVX2 and FMA (`isa::direct_kernels`, AVX-512 hosts included), for
//! f32, one group, in-plane strides 1 or 2 (depth stride 1 or 2, any depth kernel: per output
//! slice the band holds the `k_d` input slices it reads), whose output rows are at least
//! [`MIN_WIDTH`] wide; or, at stride 1 in the plane, narrower rows taken as a flattened plane
//! (the 14x14 levels of 3D plans, [`flat`]). Everything else keeps the GEMM kernels.

use super::kernels::{copy_stride2, with_workspace, workspace, Geom, SendPtr, Uninit};
use rayon::prelude::*;
use std::any::TypeId;

/// Output channels per register tile.
const CO_T: usize = 3;
/// Output positions per register tile: 4 vectors of 8 (3 x 4 accumulators + 3 weight broadcasts
/// + 1 input vector = the 16 AVX2 registers).
const POS_T: usize = 32;
/// Narrowest output row taken a row at a time: narrower rows waste most lanes of a 32-wide tile
/// (flattened planes take them instead where they apply, see [`flat`]).
const MIN_WIDTH: usize = 16;
/// Most padded-row length over output-row length of a flattened plane: the positions that fall on
/// the padding columns are computed and dropped. At 14x14 (14% more work) the 3x3x3 layers of
/// the 3D demo plan ran 7-10% faster than through the GEMM paths (AVX2, 2 threads: 128->128
/// forward 0.044 against 0.047-0.049 s); at 7x7 (29%) 10-20% slower.
const FLAT_MAX_WASTE: f64 = 1.2;
/// Target size of one work item's zero-padded input band (stays in L2).
const BAND_BYTES: usize = 192 << 10;
/// The same for a flattened band, which wants whole planes (a tile spans several rows).
const FLAT_BAND_BYTES: usize = 512 << 10;

/// Whether [`conv_fwd`] takes geometry `g`.
fn applies(g: &Geom) -> bool {
    let row_mode = g.out[2] >= MIN_WIDTH && (1..=2).contains(&g.s[1]) && (1..=2).contains(&g.s[2]);
    super::isa::direct_kernels()
        && g.groups == 1
        && (1..=2).contains(&g.s[0])
        && (row_mode || flat(g))
        && g.out_sp() > 0
        && g.cin > 0
        && g.cout > 0
}

/// Whether `g` runs on flattened planes: stride 1 within the plane, a flattened row (`ow` plus the
/// kernel's padding columns) shorter than the whole tiles a row at a time takes, and little
/// padding per row ([`FLAT_MAX_WASTE`]). E.g. rows of 16 (256 channels at 32x16 in 2D) fill half
/// a 32-wide tile a row at a time, and 18 of 32 flattened: the forward pass took 0.0069 against
/// 0.0116 s; rows of 28 (the 3D demo plan's 64-channel 1x3x3 level), 2-3% faster.
fn flat(g: &Geom) -> bool {
    let (ow, wp) = (g.out[2], g.out[2] + g.d[2] * (g.k[2] - 1));
    g.s[1] == 1
        && g.s[2] == 1
        && ow > 0
        && wp < ow.div_ceil(POS_T) * POS_T
        && wp as f64 <= FLAT_MAX_WASTE * ow as f64
}

/// The forward convolution of [`super::kernels::conv_fwd`] through the direct kernel, when it
/// applies (`T` = f32 and see [`applies`]); `None` leaves it to the GEMM paths.
pub(crate) fn conv_fwd<T: 'static>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    g: &Geom,
) -> Option<Vec<T>> {
    if TypeId::of::<T>() != TypeId::of::<f32>() || !applies(g) {
        return None;
    }
    // SAFETY: T is f32 (checked above).
    let cast = |s: &[T]| unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) };
    let y = std::mem::ManuallyDrop::new(fwd_f32(cast(x), cast(w), bias.map(cast), g));
    // SAFETY: T is f32; the vector's allocation is handed over unchanged.
    Some(unsafe { Vec::from_raw_parts(y.as_ptr() as *mut T, y.len(), y.capacity()) })
}

/// Geometry of the direct convolution: per output depth slice, a 2D convolution over the `kd`
/// input slices its depth taps read.
struct Plan {
    cin: usize,
    cout: usize,
    /// input / output depth slices, and the depth kernel, dilation, stride and padding
    id: usize,
    od: usize,
    kd: usize,
    dd: usize,
    sd: usize,
    pd: usize,
    /// input / output rows and columns
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    dh: usize,
    dw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    /// Band row layout: the padded input row's columns split by column mod `sw` into `sw`
    /// phases of `wph` elements each (one phase, `ow + dw (kw - 1)` long, at stride 1), so a
    /// tap reads `POS_T` consecutive output positions as consecutive elements; `wp = sw * wph`.
    wph: usize,
    wp: usize,
    /// padded input rows per band slab (one input slice of one channel)
    band_rows: usize,
    /// Tiles run over the band's flattened rows (output position `(r, q)` at `r wp + q`; the
    /// `wp - ow` positions at the end of each row are padding, computed and dropped) instead of
    /// along one output row at a time.
    flat: bool,
    /// output rows per work item and items per image slice
    rows: usize,
    nbands: usize,
}

impl Plan {
    fn new(g: &Geom) -> Self {
        let (kh, kw, dh, dw) = (g.k[1], g.k[2], g.d[1], g.d[2]);
        let (sh, sw) = (g.s[1], g.s[2]);
        let (oh, ow) = (g.out[1], g.out[2]);
        let wph = ((ow - 1) * sw + dw * (kw - 1) + 1).div_ceil(sw);
        let wp = sw * wph;
        let span = dh * (kh - 1);
        let flat = flat(g);
        let budget = if flat { FLAT_BAND_BYTES } else { BAND_BYTES };
        let per_row = (g.cin * g.k[0] * wp * std::mem::size_of::<f32>()).max(1);
        let want_items = 2 * rayon::current_num_threads();
        let planes = (g.n * g.out[0]).max(1);
        let par_cap = oh.div_ceil(want_items.div_ceil(planes).max(1));
        // output rows whose band (`(rows - 1) sh + span + 1` input rows) fits the budget
        let rows = ((budget / per_row).saturating_sub(span + 1) / sh + 1)
            .min(par_cap)
            .clamp(1, oh);
        Plan {
            cin: g.cin,
            cout: g.cout,
            id: g.inp[0],
            od: g.out[0],
            kd: g.k[0],
            dd: g.d[0],
            sd: g.s[0],
            pd: g.p[0],
            h: g.inp[1],
            w: g.inp[2],
            oh,
            ow,
            kh,
            kw,
            dh,
            dw,
            sh,
            sw,
            ph: g.p[1],
            pw: g.p[2],
            wph,
            wp,
            band_rows: (rows - 1) * sh + span + 1,
            flat,
            rows,
            nbands: oh.div_ceil(rows),
        }
    }

    /// One input slice of one channel in the band.
    fn slab(&self) -> usize {
        self.band_rows * self.wp
    }

    /// One channel in the band: its `kd` slabs.
    fn plane(&self) -> usize {
        self.kd * self.slab()
    }

    /// Offset within a band row of kernel column `j`'s first position: its phase, then its
    /// place in the phase.
    fn col_off(&self, j: usize) -> usize {
        let c = j * self.dw;
        (c % self.sw) * self.wph + c / self.sw
    }

    /// Offset in the band of every (input channel, depth tap, kernel row, kernel column), in the
    /// weights' order.
    fn offsets(&self) -> Vec<usize> {
        let mut offs = Vec::with_capacity(self.cin * self.kd * self.kh * self.kw);
        for ci in 0..self.cin {
            for t in 0..self.kd {
                for i in 0..self.kh {
                    for j in 0..self.kw {
                        let row = i * self.dh * self.wp;
                        offs.push(ci * self.plane() + t * self.slab() + row + self.col_off(j));
                    }
                }
            }
        }
        offs
    }

    /// Copies the input rows that output rows `[r0, r0 + rows)` of output slice `z` read (all
    /// channels and depth taps of one image `x`) into `band`, zero-padded: band row `r` of
    /// channel `c`, depth tap `t` is padded input row `r0 sh + r` (input row `r0 sh + r - ph`, its
    /// columns shifted by `pw`) of input slice `z sd + t dd - pd`, in the phase layout of
    /// [`Plan::wph`]; a slice outside the input is zeros. The `POS_T` elements after the last
    /// plane are zeroed too (the last tile may read that far).
    fn fill_band(&self, x: &[f32], z: usize, r0: usize, band: &mut [f32]) {
        let hw = self.h * self.w;
        for c in 0..self.cin {
            for t in 0..self.kd {
                let slab = &mut band[c * self.plane() + t * self.slab()..][..self.slab()];
                let iz = (z * self.sd + t * self.dd).wrapping_sub(self.pd);
                if iz >= self.id {
                    slab.fill(0.0);
                    continue;
                }
                self.fill_slab(&x[(c * self.id + iz) * hw..][..hw], r0, slab);
            }
        }
        band[self.cin * self.plane()..].fill(0.0);
    }

    /// One slab of [`Plan::fill_band`] from input slice `xc`.
    fn fill_slab(&self, xc: &[f32], r0: usize, slab: &mut [f32]) {
        for r in 0..self.band_rows {
            let dst = &mut slab[r * self.wp..][..self.wp];
            let ih = (r0 * self.sh + r).wrapping_sub(self.ph);
            if ih >= self.h {
                dst.fill(0.0);
                continue;
            }
            let src = &xc[ih * self.w..][..self.w];
            if self.sw == 1 {
                let n = self.w.min(self.wp - self.pw);
                dst[..self.pw].fill(0.0);
                dst[self.pw..self.pw + n].copy_from_slice(&src[..n]);
                dst[self.pw + n..].fill(0.0);
                continue;
            }
            for (phase, part) in dst.chunks_exact_mut(self.wph).enumerate() {
                // element i holds input column i sw + phase - pw: in range for i in [lo, hi)
                let lo = self
                    .pw
                    .saturating_sub(phase)
                    .div_ceil(self.sw)
                    .min(self.wph);
                let hi = (self.w + self.pw)
                    .saturating_sub(phase)
                    .div_ceil(self.sw)
                    .clamp(lo, self.wph);
                part[..lo].fill(0.0);
                part[hi..].fill(0.0);
                if lo < hi {
                    let first = lo * self.sw + phase - self.pw;
                    copy_stride2(&mut part[lo..hi], &src[first..]);
                }
            }
        }
    }
}

/// `w (cout, cin, kd, kh, kw)` -> `[co tile][ci][kd][kh][kw][N]` (`N` channels per tile),
/// zero-padded to whole tiles.
fn pack_weights<const N: usize>(w: &[f32], p: &Plan) -> Vec<f32> {
    let kt = p.kd * p.kh * p.kw;
    let ntiles = p.cout.div_ceil(N);
    let mut out = vec![0.0; ntiles * p.cin * kt * N];
    for co in 0..p.cout {
        let (t, c) = (co / N, co % N);
        for ci in 0..p.cin {
            for k in 0..kt {
                out[((t * p.cin + ci) * kt + k) * N + c] = w[(co * p.cin + ci) * kt + k];
            }
        }
    }
    out
}

/// What every work item of [`fwd_f32`] shares.
struct Job<'a, const N: usize> {
    p: Plan,
    /// the register tile: [`tile`] (`N` = [`N`]) or [`tile512`] (`N` = [`N512`])
    kernel: TileFn<N>,
    wt: Vec<f32>,
    offs: Vec<usize>,
    bias: Option<&'a [f32]>,
    y: SendPtr<f32>,
}

impl<const N: usize> Job<'_, N> {
    /// Output channel tiles: `(tile, packed weights, bias of each channel)`.
    fn tiles(&self) -> impl Iterator<Item = (usize, &[f32], [f32; N])> + '_ {
        let ktile = self.offs.len() * N;
        self.wt.chunks_exact(ktile).enumerate().map(|(t, wq)| {
            let init = std::array::from_fn(|c| {
                let co = (t * N + c).min(self.p.cout - 1);
                self.bias.map_or(0.0, |bs| bs[co])
            });
            (t, wq, init)
        })
    }

    /// Channels of tile `t`.
    fn width(&self, t: usize) -> usize {
        N.min(self.p.cout - t * N)
    }

    /// Output element `(image b, channel co, flat position at)` of slice `z`.
    fn out_ptr(&self, b: usize, co: usize, z: usize, at: usize) -> *mut f32 {
        let p = &self.p;
        let out_sp = p.od * p.oh * p.ow;
        // SAFETY (of the callers' writes): in bounds for an output position of the slice.
        unsafe {
            self.y
                .get()
                .add((b * p.cout + co) * out_sp + z * p.oh * p.ow + at)
        }
    }

    /// Rows `[r0, r1)` of output slice `z` of image `b`, a row at a time, from `band`.
    fn rows(&self, band: &[f32], b: usize, z: usize, r0: usize, r1: usize) {
        let p = &self.p;
        let mut spill = [0.0f32; POS_T];
        for r in r0..r1 {
            for q0 in (0..p.ow).step_by(POS_T) {
                let valid = POS_T.min(p.ow - q0);
                let src = band[(r - r0) * p.sh * p.wp + q0..].as_ptr();
                for (t, wq, init) in self.tiles() {
                    let mut dst = [spill.as_mut_ptr(); N];
                    for (c, d) in dst.iter_mut().enumerate().take(self.width(t)) {
                        *d = self.out_ptr(b, t * N + c, z, r * p.ow + q0);
                    }
                    // SAFETY: the tile reads `src` up to (cin - 1) * plane + the last slab's last
                    // row + the last phase + q0 + POS_T < band length (POS_T of slack), writes
                    // `valid` positions of each `dst` row (or of `spill`); items write disjoint
                    // rows.
                    unsafe { (self.kernel)(src, &self.offs, wq.as_ptr(), init, dst, valid) };
                }
            }
        }
    }

    /// Rows `[r0, r1)` of output slice `z` of image `b` through the flattened band: each tile
    /// covers `POS_T` consecutive band positions (several short rows), computed into a buffer
    /// whose positions on output columns are then copied out.
    fn flat_rows(&self, band: &[f32], b: usize, z: usize, r0: usize, r1: usize) {
        let p = &self.p;
        let len = (r1 - r0) * p.wp;
        let mut buf = [[0.0f32; POS_T]; N];
        for f0 in (0..len).step_by(POS_T) {
            let src = band[f0..].as_ptr();
            for (t, wq, init) in self.tiles() {
                let dst: [*mut f32; N] = std::array::from_fn(|c| buf[c].as_mut_ptr());
                // SAFETY: as in `rows` (band positions up to `len + POS_T` read at most the slack
                // after the last plane); `buf` holds POS_T positions per channel.
                unsafe { (self.kernel)(src, &self.offs, wq.as_ptr(), init, dst, POS_T) };
                let mut f = f0;
                while f < (f0 + POS_T).min(len) {
                    let (r, q) = (f / p.wp, f % p.wp);
                    let e = (f0 + POS_T).min(r * p.wp + p.ow);
                    if q < p.ow {
                        for (c, row) in buf.iter().enumerate().take(self.width(t)) {
                            let at = (r0 + r) * p.ow + q;
                            // SAFETY: `e - f` positions of output row `r0 + r` from column `q`
                            // (`e <= ` its end); items write disjoint rows.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    row[f - f0..].as_ptr(),
                                    self.out_ptr(b, t * N + c, z, at),
                                    e - f,
                                )
                            };
                        }
                    }
                    f = (r + 1) * p.wp;
                }
            }
        }
    }
}

/// Forward convolution, f32: the flattened planes of 3D convolutions through [`fwd_cv`] (no
/// padding columns computed: 7-10% faster than [`tile`] on the 3D demo plan's 28x28 and 14x14
/// levels on the AVX2 path; on the AVX-512 path 7-9% faster than [`tile512`] at 14x14, slower at
/// 28x28, so only rows under [`MIN_WIDTH`] there); the rest through [`tile512`] on the AVX-512
/// path ([`isa::direct_avx512`]) and [`tile`] on the AVX2 one.
fn fwd_f32(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geom) -> Vec<f32> {
    let avx512 = super::isa::direct_avx512();
    if g.out[0] > 1 && flat(g) && (!avx512 || g.out[2] < MIN_WIDTH) {
        return fwd_cv(x, w, bias, g);
    }
    let p = Plan::new(g);
    let mut y = Uninit::<f32>::new(g.n * p.cout * p.od * p.oh * p.ow);
    let yp = SendPtr(y.ptr());
    if avx512 {
        run(
            Job::<CO_T512> {
                wt: pack_weights::<CO_T512>(w, &p),
                kernel: tile512,
                offs: p.offsets(),
                bias,
                y: yp,
                p,
            },
            x,
        );
    } else {
        run(
            Job::<CO_T> {
                wt: pack_weights::<CO_T>(w, &p),
                kernel: tile,
                offs: p.offsets(),
                bias,
                y: yp,
                p,
            },
            x,
        );
    }
    // SAFETY: the items cover every (image, slice, channel, row) and the tiles every column.
    unsafe { y.assume_init() }
}

/// Every work item of `job` (image, output slice, band of rows), in parallel.
fn run<const N: usize>(job: Job<'_, N>, x: &[f32]) {
    let p = &job.p;
    let in_img = p.cin * p.id * p.h * p.w;
    (0..(x.len() / in_img.max(1)) * p.od * p.nbands)
        .into_par_iter()
        .for_each(|item| {
            let (b, z) = (item / (p.od * p.nbands), item / p.nbands % p.od);
            let r0 = (item % p.nbands) * p.rows;
            let r1 = (r0 + p.rows).min(p.oh);
            with_workspace(|ws| {
                let band = workspace::<f32>(ws, p.cin * p.plane() + POS_T);
                p.fill_band(&x[b * in_img..(b + 1) * in_img], z, r0, band);
                if p.flat {
                    job.flat_rows(band, b, z, r0, r1);
                } else {
                    job.rows(band, b, z, r0, r1);
                }
            });
        });
}

/// Lane masks: `MASK[8 - n..16 - n]` enables the first `n` lanes.
static MASK: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

/// One register tile: `CO_T` output channels x `POS_T` positions of one output row, summed over
/// every input channel and tap of the band at `src` (the tile's first position of the first
/// tap), plus `init`; writes the first `valid` positions to each `dst` row. `offs` holds the
/// offset of every (input channel, tap) in weight order (one flat loop: nested loops over the
/// three short axes cost ~10% in loop overhead, and unrolling the taps made LLVM spill
/// accumulators).
///
/// # Safety
/// AVX2 + FMA; `src + off` readable for `POS_T` elements for every `off` of `offs`, `wq` for
/// `offs.len() * CO_T` weights, every `dst` writable for `valid <= POS_T` elements.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // register-tile indices read clearer than zipped iterators
unsafe fn tile(
    src: *const f32,
    offs: &[usize],
    wq: *const f32,
    init: [f32; CO_T],
    dst: [*mut f32; CO_T],
    valid: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 4]; CO_T];
    for c in 0..CO_T {
        acc[c] = [_mm256_set1_ps(init[c]); 4];
    }
    let mut wq = wq;
    for &off in offs {
        let xs = src.add(off);
        let wv = [
            _mm256_broadcast_ss(&*wq),
            _mm256_broadcast_ss(&*wq.add(1)),
            _mm256_broadcast_ss(&*wq.add(2)),
        ];
        for v in 0..4 {
            let xv = _mm256_loadu_ps(xs.add(8 * v));
            for c in 0..CO_T {
                acc[c][v] = _mm256_fmadd_ps(wv[c], xv, acc[c][v]);
            }
        }
        wq = wq.add(CO_T);
    }
    for c in 0..CO_T {
        for v in 0..4 {
            let n = valid.saturating_sub(8 * v).min(8);
            if n == 8 {
                _mm256_storeu_ps(dst[c].add(8 * v), acc[c][v]);
            } else if n > 0 {
                let m = _mm256_loadu_si256(MASK[8 - n..].as_ptr().cast());
                _mm256_maskstore_ps(dst[c].add(8 * v), m, acc[c][v]);
            }
        }
    }
}

/// A register tile kernel: `(src, offs, wq, init, dst, valid)` as [`tile`] takes them.
type TileFn<const N: usize> =
    unsafe fn(*const f32, &[usize], *const f32, [f32; N], [*mut f32; N], usize);

/// Output channels per AVX-512 register tile.
const CO_T512: usize = 8;

/// [`tile`] for AVX-512: [`CO_T512`] output channels x `POS_T` positions in 16 zmm accumulators
/// (2 vectors of 16 per channel). Per input channel and tap it loads 2 input vectors and 8
/// weights for 16 FMAs, against 4 vectors (2 of them split across cache lines at odd offsets)
/// and 3 weights for 12 FMAs of 8 lanes in [`tile`].
///
/// # Safety
/// AVX-512F; as [`tile`], with `wq` holding `offs.len() * CO_T512` weights.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // register-tile indices read clearer than zipped iterators
unsafe fn tile512(
    src: *const f32,
    offs: &[usize],
    wq: *const f32,
    init: [f32; CO_T512],
    dst: [*mut f32; CO_T512],
    valid: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; CO_T512];
    for c in 0..CO_T512 {
        acc[c] = [_mm512_set1_ps(init[c]); 2];
    }
    let mut wq = wq;
    for &off in offs {
        let xs = src.add(off);
        let xv = [_mm512_loadu_ps(xs), _mm512_loadu_ps(xs.add(16))];
        for c in 0..CO_T512 {
            let wv = _mm512_set1_ps(*wq.add(c));
            acc[c][0] = _mm512_fmadd_ps(wv, xv[0], acc[c][0]);
            acc[c][1] = _mm512_fmadd_ps(wv, xv[1], acc[c][1]);
        }
        wq = wq.add(CO_T512);
    }
    for c in 0..CO_T512 {
        for v in 0..2 {
            let n = valid.saturating_sub(16 * v).min(16);
            if n == 16 {
                _mm512_storeu_ps(dst[c].add(16 * v), acc[c][v]);
            } else if n > 0 {
                _mm512_mask_storeu_ps(dst[c].add(16 * v), ((1u32 << n) - 1) as u16, acc[c][v]);
            }
        }
    }
}

/// Output channels of a channel-vector tile (2 AVX2 vectors).
const CV_CO: usize = 16;
/// Output positions of a channel-vector tile.
const CV_POS: usize = 6;
/// Input channels per block (the block's weights stay in L1).
const CV_CI: usize = 16;

/// Forward convolution through [`cv_tile512`] (AVX-512 path) or [`cv_tile`] (channels in vector
/// lanes, positions broadcast): every output position is a real one, however short the rows.
/// Taken for the flattened planes of 3D convolutions (see [`fwd_f32`]).
fn fwd_cv(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geom) -> Vec<f32> {
    if super::isa::direct_avx512() {
        cv_run::<CV_CO512>(x, w, bias, g, cv_tile512)
    } else {
        cv_run::<CV_CO>(x, w, bias, g, cv_tile)
    }
}

/// [`fwd_cv`] with `CO`-channel tiles of `kernel`.
fn cv_run<const CO: usize>(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &Geom,
    kernel: CvTileFn<CO>,
) -> Vec<f32> {
    let p = Plan::new(g);
    let mut y = Uninit::<f32>::new(g.n * p.cout * p.od * p.oh * p.ow);
    let mut bz = vec![0.0f32; p.cout.div_ceil(CO) * CO];
    if let Some(bs) = bias {
        bz[..p.cout].copy_from_slice(bs);
    }
    let job = CvJob::<CO> {
        kernel,
        wt: pack_weights::<CO>(w, &p),
        offs: p.offsets(),
        bias: bz,
        y: SendPtr(y.ptr()),
        p,
    };
    let p = &job.p;
    let in_img = p.cin * p.id * p.h * p.w;
    (0..g.n * p.od * p.nbands).into_par_iter().for_each(|item| {
        let (b, z) = (item / (p.od * p.nbands), item / p.nbands % p.od);
        let r0 = (item % p.nbands) * p.rows;
        let r1 = (r0 + p.rows).min(p.oh);
        with_workspace(|ws| {
            let band = workspace::<f32>(ws, p.cin * p.plane() + POS_T);
            p.fill_band(&x[b * in_img..(b + 1) * in_img], z, r0, band);
            job.item(band, b, z, r0, r1);
        });
    });
    // SAFETY: the items cover every (image, slice, row) and the tiles every channel.
    unsafe { y.assume_init() }
}

/// What every work item of [`fwd_cv`] shares.
struct CvJob<const CO: usize> {
    p: Plan,
    kernel: CvTileFn<CO>,
    /// `[co tile][ci][tap][CO]`
    wt: Vec<f32>,
    offs: Vec<usize>,
    /// biases, zero-padded to whole tiles
    bias: Vec<f32>,
    y: SendPtr<f32>,
}

impl<const CO: usize> CvJob<CO> {
    /// Rows `[r0, r1)` of output slice `z` of image `b` from `band`: per tile of `CV_CO` output
    /// channels, blocks of `CV_CI` input channels (whose weights stay in L1) over every group of
    /// `CV_POS` positions, accumulated in `acc`, then copied out.
    fn item(&self, band: &[f32], b: usize, z: usize, r0: usize, r1: usize) {
        let p = &self.p;
        let (kt, out_sp) = (p.kd * p.kh * p.kw, p.od * p.oh * p.ow);
        let ktile = self.offs.len() * CO;
        // band offset and output index (within a channel) of every output position
        let pos: Vec<(usize, usize)> = (r0..r1)
            .flat_map(|r| {
                let (src, dst) = ((r - r0) * p.sh * p.wp, (z * p.oh + r) * p.ow);
                (0..p.ow).map(move |q| (src + q, dst + q))
            })
            .collect();
        let mut acc = vec![[[0.0f32; CO]; CV_POS]; pos.len().div_ceil(CV_POS)];
        for t in 0..p.cout.div_ceil(CO) {
            let wq = &self.wt[t * ktile..(t + 1) * ktile];
            for ci0 in (0..p.cin).step_by(CV_CI) {
                let taps = ci0 * kt..(ci0 + CV_CI).min(p.cin) * kt;
                for (a, grp) in acc.iter_mut().zip(pos.chunks(CV_POS)) {
                    let at = std::array::from_fn(|k| grp[k.min(grp.len() - 1)].0);
                    let init = if ci0 == 0 {
                        [std::array::from_fn(|c| self.bias[t * CO + c]); CV_POS]
                    } else {
                        *a
                    };
                    // SAFETY: every position reads the band within its taps' reach (as `tile`
                    // does); `wq` holds the weights of every tap of `offs`.
                    unsafe {
                        (self.kernel)(
                            band.as_ptr(),
                            &at,
                            &self.offs[taps.clone()],
                            wq[taps.start * CO..].as_ptr(),
                            &init,
                            a,
                        )
                    };
                }
            }
            for (a, grp) in acc.iter().zip(pos.chunks(CV_POS)) {
                for (k, &(_, o)) in grp.iter().enumerate() {
                    for (c, &v) in a[k].iter().enumerate().take(p.cout - t * CO) {
                        let at = (b * p.cout + t * CO + c) * out_sp + o;
                        // SAFETY: an output position of this item's rows; items are disjoint.
                        unsafe { *self.y.get().add(at) = v };
                    }
                }
            }
        }
    }
}

/// A channel-vector tile kernel: `(src, at, offs, wq, init, out)` as [`cv_tile`] takes them.
type CvTileFn<const CO: usize> = unsafe fn(
    *const f32,
    &[usize; CV_POS],
    &[usize],
    *const f32,
    &[[f32; CO]; CV_POS],
    &mut [[f32; CO]; CV_POS],
);

/// Output channels of an AVX-512 channel-vector tile (2 zmm vectors).
const CV_CO512: usize = 32;

/// [`cv_tile`] for AVX-512: `CV_CO512` channels (two 16-lane vectors) x `CV_POS` positions.
///
/// # Safety
/// AVX-512F; as [`cv_tile`], with `wq` holding `offs.len() * CV_CO512` weights.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // register-tile indices read clearer than zipped iterators
unsafe fn cv_tile512(
    src: *const f32,
    at: &[usize; CV_POS],
    offs: &[usize],
    wq: *const f32,
    init: &[[f32; CV_CO512]; CV_POS],
    out: &mut [[f32; CV_CO512]; CV_POS],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; CV_POS];
    for k in 0..CV_POS {
        let i = init[k].as_ptr();
        acc[k] = [_mm512_loadu_ps(i), _mm512_loadu_ps(i.add(16))];
    }
    let ptrs: [*const f32; CV_POS] = std::array::from_fn(|k| src.add(at[k]));
    let mut wq = wq;
    for &off in offs {
        let w0 = _mm512_loadu_ps(wq);
        let w1 = _mm512_loadu_ps(wq.add(16));
        for k in 0..CV_POS {
            let v = _mm512_set1_ps(*ptrs[k].add(off));
            acc[k][0] = _mm512_fmadd_ps(w0, v, acc[k][0]);
            acc[k][1] = _mm512_fmadd_ps(w1, v, acc[k][1]);
        }
        wq = wq.add(CV_CO512);
    }
    for k in 0..CV_POS {
        _mm512_storeu_ps(out[k].as_mut_ptr(), acc[k][0]);
        _mm512_storeu_ps(out[k].as_mut_ptr().add(16), acc[k][1]);
    }
}

/// Channel-vector tile: `CV_CO` output channels (two 8-lane vectors of weights) x `CV_POS`
/// output positions (each a broadcast input value) at band offsets `at`, summed over every input
/// channel and tap of `offs`, plus `init`; writes `out[position][channel]`. Per tap: 2 weight
/// loads and 6 broadcasts for 12 FMAs, none split across cache lines.
///
/// # Safety
/// AVX2 + FMA; `src + at[k] + off` readable for every `k` and `off` of `offs`, `wq` holding
/// `offs.len() * CV_CO` weights.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // register-tile indices read clearer than zipped iterators
unsafe fn cv_tile(
    src: *const f32,
    at: &[usize; CV_POS],
    offs: &[usize],
    wq: *const f32,
    init: &[[f32; CV_CO]; CV_POS],
    out: &mut [[f32; CV_CO]; CV_POS],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; CV_POS];
    for k in 0..CV_POS {
        let i = init[k].as_ptr();
        acc[k] = [_mm256_loadu_ps(i), _mm256_loadu_ps(i.add(8))];
    }
    let ptrs: [*const f32; CV_POS] = std::array::from_fn(|k| src.add(at[k]));
    let mut wq = wq;
    for &off in offs {
        let w0 = _mm256_loadu_ps(wq);
        let w1 = _mm256_loadu_ps(wq.add(8));
        for k in 0..CV_POS {
            let v = _mm256_broadcast_ss(&*ptrs[k].add(off));
            acc[k][0] = _mm256_fmadd_ps(w0, v, acc[k][0]);
            acc[k][1] = _mm256_fmadd_ps(w1, v, acc[k][1]);
        }
        wq = wq.add(CV_CO);
    }
    for k in 0..CV_POS {
        _mm256_storeu_ps(out[k].as_mut_ptr(), acc[k][0]);
        _mm256_storeu_ps(out[k].as_mut_ptr().add(8), acc[k][1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// The direct convolution through every register tile this CPU runs: `fwd_f32` and `fwd_cv`
    /// on the detected path (AVX-512 where available) and on the forced AVX2 one.
    fn fwd_all_tiles(x: &[f32], w: &[f32], bias: &[f32], g: &Geom) -> Vec<Vec<f32>> {
        use crate::ops::isa::{gemm_isa, set_gemm_isa, GemmIsa};
        let before = gemm_isa();
        let mut ys = Vec::new();
        for isa in [GemmIsa::Auto, GemmIsa::Avx2] {
            set_gemm_isa(isa);
            ys.push(fwd_f32(x, w, Some(bias), g));
            ys.push(fwd_cv(x, w, Some(bias), g));
        }
        set_gemm_isa(before);
        ys
    }

    /// Naive N-d convolution (3D geometry; 2D as depth 1), accumulated in f64.
    fn naive(x: &[f32], w: &[f32], bias: &[f32], g: &Geom) -> Vec<f32> {
        let (inp, out, ktot) = (g.inp, g.out, g.ktot());
        let mut y = vec![0.0f32; g.n * g.cout * g.out_sp()];
        let at = |o: usize, k: usize, a: usize| {
            let v = (o * g.s[a] + k * g.d[a]) as isize - g.p[a] as isize;
            (v >= 0 && (v as usize) < inp[a]).then_some(v as usize)
        };
        for b in 0..g.n {
            for co in 0..g.cout {
                for (o, yo) in y[(b * g.cout + co) * g.out_sp()..][..g.out_sp()]
                    .iter_mut()
                    .enumerate()
                {
                    let oz = [o / (out[1] * out[2]), o / out[2] % out[1], o % out[2]];
                    let mut acc = bias[co] as f64;
                    for ci in 0..g.cin {
                        for t in 0..ktot {
                            let kz = [t / (g.k[1] * g.k[2]), t / g.k[2] % g.k[1], t % g.k[2]];
                            let (Some(i0), Some(i1), Some(i2)) = (
                                at(oz[0], kz[0], 0),
                                at(oz[1], kz[1], 1),
                                at(oz[2], kz[2], 2),
                            ) else {
                                continue;
                            };
                            let xi = (((b * g.cin + ci) * inp[0] + i0) * inp[1] + i1) * inp[2] + i2;
                            acc += x[xi] as f64 * w[(co * g.cin + ci) * ktot + t] as f64;
                        }
                    }
                    *yo = acc as f32;
                }
            }
        }
        y
    }

    /// Full 3D kernels (depth taps, depth stride and padding) and flattened planes (rows
    /// narrower than `MIN_WIDTH`, in 2D and 3D) match the naive convolution.
    #[test]
    fn depth_kernels_and_flat_planes_match_naive() {
        if !std::arch::is_x86_feature_detected!("avx2")
            || !std::arch::is_x86_feature_detected!("fma")
        {
            return;
        }
        // (cin, cout, inp, k, p, d, s)
        let cases = [
            (
                5,
                7,
                [6, 14, 14],
                [3, 3, 3],
                [1, 1, 1],
                [1, 1, 1],
                [1, 1, 1],
            ),
            (
                4,
                4,
                [8, 12, 12],
                [3, 3, 3],
                [1, 1, 1],
                [1, 1, 1],
                [2, 1, 1],
            ),
            (3, 5, [4, 9, 40], [3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 2, 2]),
            (6, 3, [7, 8, 18], [3, 3, 3], [2, 1, 1], [2, 1, 1], [2, 1, 1]),
            (
                70,
                4,
                [4, 40, 12],
                [3, 3, 3],
                [1, 1, 1],
                [1, 1, 1],
                [1, 1, 1],
            ),
            (
                3,
                2,
                [8, 12, 12],
                [1, 3, 3],
                [0, 1, 1],
                [1, 1, 1],
                [1, 1, 1],
            ),
            (
                2,
                3,
                [5, 11, 12],
                [2, 3, 1],
                [0, 1, 0],
                [1, 1, 1],
                [1, 1, 1],
            ),
        ];
        let mut flats = 0;
        for (cin, cout, inp, k, p, d, s) in cases {
            let out: [usize; 3] =
                std::array::from_fn(|a| (inp[a] + 2 * p[a] - d[a] * (k[a] - 1) - 1) / s[a] + 1);
            let g = Geom {
                n: 2,
                cin,
                cout,
                groups: 1,
                inp,
                out,
                k,
                s,
                p,
                d,
            };
            assert!(applies(&g), "{g:?}");
            flats += usize::from(flat(&g));
            let x = seq(g.n * cin * g.in_sp(), 11);
            let wt = seq(cout * cin * g.ktot(), 12);
            let bias = seq(cout, 13);
            let want = naive(&x, &wt, &bias, &g);
            for y in fwd_all_tiles(&x, &wt, &bias, &g) {
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{g:?}: {a} vs {b}");
                }
            }
        }
        assert_eq!(flats, 6, "cases on flattened planes");
    }

    /// The direct kernel matches a naive convolution: channel counts that
    /// leave partial channel tiles, widths with partial position tiles, dilation, asymmetric
    /// kernels and padding, several bands per image.
    #[test]
    fn direct_matches_naive() {
        if !std::arch::is_x86_feature_detected!("avx2")
            || !std::arch::is_x86_feature_detected!("fma")
        {
            return;
        }
        // (cin, cout, h, w, k, p, d, s)
        let cases = [
            (5, 7, 9, 37, [3, 3], [1, 1], [1, 1], [1, 1]),
            (3, 3, 40, 16, [3, 3], [1, 1], [1, 1], [1, 1]),
            (4, 8, 11, 33, [3, 3], [2, 2], [2, 2], [1, 1]),
            (2, 4, 7, 20, [3, 1], [1, 0], [1, 1], [1, 1]),
            (6, 5, 6, 18, [1, 3], [0, 2], [1, 1], [1, 1]),
            (3, 2, 5, 64, [1, 1], [0, 0], [1, 1], [1, 1]),
            (70, 4, 130, 17, [3, 3], [1, 1], [1, 1], [1, 1]),
            // stride 2: even and odd widths, dilation, one axis strided, many bands
            (5, 7, 9, 70, [3, 3], [1, 1], [1, 1], [2, 2]),
            (4, 4, 12, 33, [3, 3], [1, 1], [1, 1], [2, 2]),
            (3, 5, 10, 41, [3, 3], [2, 2], [2, 2], [2, 2]),
            (2, 3, 8, 36, [3, 3], [1, 1], [1, 1], [1, 2]),
            (3, 3, 9, 20, [3, 3], [1, 1], [1, 1], [2, 1]),
            (70, 4, 200, 40, [3, 3], [1, 1], [1, 1], [2, 2]),
        ];
        for (cin, cout, h, w, k, p, d, st) in cases {
            let out = |a: usize| (([h, w][a] + 2 * p[a]) - d[a] * (k[a] - 1) - 1) / st[a] + 1;
            let g = Geom {
                n: 2,
                cin,
                cout,
                groups: 1,
                inp: [1, h, w],
                out: [1, out(0), out(1)],
                k: [1, k[0], k[1]],
                s: [1, st[0], st[1]],
                p: [0, p[0], p[1]],
                d: [1, d[0], d[1]],
            };
            assert!(applies(&g) && g.out[2] >= MIN_WIDTH, "{g:?}");
            let x = seq(g.n * cin * h * w, 1);
            let wt = seq(cout * cin * k[0] * k[1], 2);
            let bias = seq(cout, 3);
            let want = naive(&x, &wt, &bias, &g);
            for y in fwd_all_tiles(&x, &wt, &bias, &g) {
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{g:?}: {a} vs {b}");
                }
            }
        }
    }

    /// A 3D input with a depth-1 kernel is convolved slice by slice: every depth slice matches
    /// the 2D convolution of that slice (strides 1 and 2).
    #[test]
    fn depth_one_kernels_run_slice_by_slice() {
        if !std::arch::is_x86_feature_detected!("avx2")
            || !std::arch::is_x86_feature_detected!("fma")
        {
            return;
        }
        let (n, cin, cout, depth, h, w) = (2, 5, 7, 3, 9, 37);
        for st in [1, 2] {
            let o = |len: usize| (len + 2 - 3) / st + 1;
            let (oh, ow) = (o(h), o(w));
            let g = Geom {
                n,
                cin,
                cout,
                groups: 1,
                inp: [depth, h, w],
                out: [depth, oh, ow],
                k: [1, 3, 3],
                s: [1, st, st],
                p: [0, 1, 1],
                d: [1, 1, 1],
            };
            assert!(applies(&g), "{g:?}");
            let x = seq(n * cin * depth * h * w, 7);
            let wt = seq(cout * cin * 9, 8);
            let bias = seq(cout, 9);
            let y = fwd_f32(&x, &wt, Some(&bias), &g);
            let g2 = Geom {
                inp: [1, h, w],
                out: [1, oh, ow],
                ..g
            };
            for z in 0..depth {
                let slice = |v: &[f32], ch: usize, sp: usize| -> Vec<f32> {
                    (0..n * ch)
                        .flat_map(|bc| v[(bc * depth + z) * sp..][..sp].to_vec())
                        .collect()
                };
                let want = naive(&slice(&x, cin, h * w), &wt, &bias, &g2);
                let got = slice(&y, cout, oh * ow);
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "stride {st} slice {z}: {a} vs {b}");
                }
            }
        }
    }

    /// The stride-1 input gradient on the forced AVX2 path (a flipped forward convolution, which
    /// this kernel runs) is the adjoint of the forward: `<dy, conv(x)> == <conv_bwd_data(dy), x>`.
    #[test]
    fn input_gradient_on_avx2_is_adjoint() {
        use crate::ops::isa::{gemm_isa, set_gemm_isa, GemmIsa};
        if !std::arch::is_x86_feature_detected!("avx2")
            || !std::arch::is_x86_feature_detected!("fma")
        {
            return;
        }
        let g = Geom {
            n: 2,
            cin: 6,
            cout: 5,
            groups: 1,
            inp: [1, 12, 20],
            out: [1, 12, 20],
            k: [1, 3, 3],
            s: [1, 1, 1],
            p: [0, 1, 1],
            d: [1, 1, 1],
        };
        let x = seq(g.n * g.cin * g.in_sp(), 4);
        let w = seq(g.cout * g.cin * 9, 5);
        let dy = seq(g.n * g.cout * g.out_sp(), 6);
        let before = gemm_isa();
        set_gemm_isa(GemmIsa::Avx2);
        let dx = super::super::kernels::conv_bwd_data(&dy, &w, None, &g);
        set_gemm_isa(before);
        let y = fwd_f32(&x, &w, None, &g);
        let dot = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(u, v)| *u as f64 * *v as f64)
                .sum::<f64>()
        };
        let (l, r) = (dot(&dy, &y), dot(&dx, &x));
        assert!((l - r).abs() < 1e-4 * l.abs().max(1.0), "{l} vs {r}");
    }
}
