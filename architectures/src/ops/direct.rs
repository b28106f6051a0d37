//! Direct (im2col-free) 2D convolution, stride 1 or 2, for AVX2/FMA, f32.
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
//! f32, one group, strides 1 or 2 and a 2D geometry, or a 3D one with a depth-1 kernel (no
//! depth stride or padding: the 1x3x3 stages of anisotropic 3D plans), run slice by slice, whose
//! output rows are at least [`MIN_WIDTH`] wide; everything else keeps the GEMM kernels.

use super::kernels::{copy_stride2, with_workspace, workspace, Geom, SendPtr, Uninit};
use rayon::prelude::*;
use std::any::TypeId;

/// Output channels per register tile.
const CO_T: usize = 3;
/// Output positions per register tile: 4 vectors of 8 (3 x 4 accumulators + 3 weight broadcasts
/// + 1 input vector = the 16 AVX2 registers).
const POS_T: usize = 32;
/// Narrowest output row taken here: narrower rows waste most lanes of a 32-wide tile.
const MIN_WIDTH: usize = 16;
/// Target size of one work item's zero-padded input band (stays in L2).
const BAND_BYTES: usize = 192 << 10;

/// Whether [`conv_fwd`] takes geometry `g`.
fn applies(g: &Geom) -> bool {
    super::isa::direct_kernels()
        && g.groups == 1
        && g.s[0] == 1
        && (1..=2).contains(&g.s[1])
        && (1..=2).contains(&g.s[2])
        && g.k[0] == 1
        && g.p[0] == 0
        && g.out[2] >= MIN_WIDTH
        && g.out_sp() > 0
        && g.cin > 0
        && g.cout > 0
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

/// Geometry of the 2D direct convolution (axes 1 and 2 of a [`Geom`]).
struct Plan {
    cin: usize,
    cout: usize,
    /// depth slices (a 3D input with a depth-1 kernel: each slice is one 2D convolution)
    depth: usize,
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
    /// padded input rows per band plane
    band_rows: usize,
    /// output rows per work item and items per image
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
        let per_row = (g.cin * wp * std::mem::size_of::<f32>()).max(1);
        let want_items = 2 * rayon::current_num_threads();
        let planes = (g.n * g.inp[0]).max(1);
        let par_cap = oh.div_ceil(want_items.div_ceil(planes).max(1));
        // output rows whose band (`(rows - 1) sh + span + 1` input rows) fits the budget
        let rows = ((BAND_BYTES / per_row).saturating_sub(span + 1) / sh + 1)
            .min(par_cap)
            .clamp(1, oh);
        Plan {
            cin: g.cin,
            cout: g.cout,
            depth: g.inp[0],
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
            rows,
            nbands: oh.div_ceil(rows),
        }
    }

    fn plane(&self) -> usize {
        self.band_rows * self.wp
    }

    /// Offset within a band row of kernel column `j`'s first position: its phase, then its
    /// place in the phase.
    fn col_off(&self, j: usize) -> usize {
        let c = j * self.dw;
        (c % self.sw) * self.wph + c / self.sw
    }

    /// Copies the input rows that output rows `[r0, r0 + rows)` read (all channels of depth
    /// slice `z` of one image `x`) into `band`, zero-padded: band row `r` of channel `c` is
    /// padded input row `r0 sh + r` (input row `r0 sh + r - ph`, its columns shifted by `pw`) in
    /// the phase layout of [`Plan::wph`]. The `POS_T` elements after the last plane are zeroed
    /// too (the last tile of a row may read that far).
    fn fill_band(&self, x: &[f32], z: usize, r0: usize, band: &mut [f32]) {
        let (plane, hw) = (self.plane(), self.h * self.w);
        for c in 0..self.cin {
            let xc = &x[(c * self.depth + z) * hw..][..hw];
            for r in 0..self.band_rows {
                let dst = &mut band[c * plane + r * self.wp..][..self.wp];
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
        band[self.cin * plane..].fill(0.0);
    }
}

/// `w (cout, cin, 1, kh, kw)` -> `[co tile][ci][kh][kw][CO_T]`, zero-padded to whole tiles.
fn pack_weights(w: &[f32], p: &Plan) -> Vec<f32> {
    let kt = p.kh * p.kw;
    let ntiles = p.cout.div_ceil(CO_T);
    let mut out = vec![0.0; ntiles * p.cin * kt * CO_T];
    for co in 0..p.cout {
        let (t, c) = (co / CO_T, co % CO_T);
        for ci in 0..p.cin {
            for k in 0..kt {
                out[((t * p.cin + ci) * kt + k) * CO_T + c] = w[(co * p.cin + ci) * kt + k];
            }
        }
    }
    out
}

/// Forward convolution, f32, through [`tile`].
fn fwd_f32(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geom) -> Vec<f32> {
    let p = Plan::new(g);
    let wt = pack_weights(w, &p);
    let (in_sp, out_sp) = (p.depth * p.h * p.w, p.depth * p.oh * p.ow);
    let mut y = Uninit::<f32>::new(g.n * p.cout * out_sp);
    let yp = SendPtr(y.ptr());
    let ktile = p.cin * p.kh * p.kw * CO_T;
    // offset in the band of every (input channel, kernel row, kernel column), in weight order
    let mut offs = Vec::with_capacity(p.cin * p.kh * p.kw);
    for ci in 0..p.cin {
        for i in 0..p.kh {
            for j in 0..p.kw {
                offs.push(ci * p.plane() + i * p.dh * p.wp + p.col_off(j));
            }
        }
    }
    (0..g.n * p.depth * p.nbands)
        .into_par_iter()
        .for_each(|item| {
            let (b, z) = (item / (p.depth * p.nbands), item / p.nbands % p.depth);
            let r0 = (item % p.nbands) * p.rows;
            let r1 = (r0 + p.rows).min(p.oh);
            // first output position of slice z (within a channel)
            let zo = z * p.oh * p.ow;
            with_workspace(|ws| {
                let band = workspace::<f32>(ws, p.cin * p.plane() + POS_T);
                p.fill_band(&x[b * p.cin * in_sp..(b + 1) * p.cin * in_sp], z, r0, band);
                let mut spill = [0.0f32; POS_T];
                for r in r0..r1 {
                    for q0 in (0..p.ow).step_by(POS_T) {
                        let valid = POS_T.min(p.ow - q0);
                        let src = band[(r - r0) * p.sh * p.wp + q0..].as_ptr();
                        for (t, wq) in wt.chunks_exact(ktile).enumerate() {
                            let mut init = [0.0; CO_T];
                            let mut dst = [spill.as_mut_ptr(); CO_T];
                            for c in 0..CO_T.min(p.cout - t * CO_T) {
                                let co = t * CO_T + c;
                                init[c] = bias.map_or(0.0, |bs| bs[co]);
                                // SAFETY: an in-bounds output position; items write disjoint rows.
                                let at = (b * p.cout + co) * out_sp + zo + r * p.ow + q0;
                                dst[c] = unsafe { yp.get().add(at) };
                            }
                            // SAFETY: the tile reads `src` up to (cin - 1) * plane + span rows +
                            // the last phase + q0 + POS_T < band length (POS_T of slack), writes
                            // `valid` positions of each `dst` row (or of `spill`).
                            unsafe { tile(src, &offs, wq.as_ptr(), init, dst, valid) };
                        }
                    }
                }
            });
        });
    // SAFETY: the items cover every (image, slice, channel, row) and the tiles every column.
    unsafe { y.assume_init() }
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

    fn naive(x: &[f32], w: &[f32], bias: &[f32], g: &Geom) -> Vec<f32> {
        let (h, wd, oh, ow) = (g.inp[1], g.inp[2], g.out[1], g.out[2]);
        let (kh, kw) = (g.k[1], g.k[2]);
        let mut y = vec![0.0f32; g.n * g.cout * oh * ow];
        for b in 0..g.n {
            for co in 0..g.cout {
                for r in 0..oh {
                    for q in 0..ow {
                        let mut acc = bias[co] as f64;
                        for ci in 0..g.cin {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let ih = (r * g.s[1] + i * g.d[1]) as isize - g.p[1] as isize;
                                    let iw = (q * g.s[2] + j * g.d[2]) as isize - g.p[2] as isize;
                                    if ih < 0 || iw < 0 || ih as usize >= h || iw as usize >= wd {
                                        continue;
                                    }
                                    let xi =
                                        ((b * g.cin + ci) * h + ih as usize) * wd + iw as usize;
                                    let wi = ((co * g.cin + ci) * kh + i) * kw + j;
                                    acc += x[xi] as f64 * w[wi] as f64;
                                }
                            }
                        }
                        y[((b * g.cout + co) * oh + r) * ow + q] = acc as f32;
                    }
                }
            }
        }
        y
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
            let y = fwd_f32(&x, &wt, Some(&bias), &g);
            let want = naive(&x, &wt, &bias, &g);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{g:?}: {a} vs {b}");
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
