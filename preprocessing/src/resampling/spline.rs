//! One-dimensional B-spline machinery, replicating `scipy.ndimage` (`ni_splines.c`,
//! `NI_ZoomShift` / `NI_GeometricTransform` in `ni_interpolation.c`) for `mode='nearest'`.
//!
//! scipy's n-D interpolation is a tensor product of 1-D operators: edge padding by
//! [`NPAD`] voxels, the causal/anticausal B-spline prefilter (orders > 1), and the spline
//! evaluation at `((k + 0.5) * zoom - 0.5) + npad` with taps clamped to the (padded) line.
//! Applying these per axis therefore reproduces scipy up to floating point rounding.

/// `_prepad_for_spline_filter`: scipy pads by 12 voxels (edge mode) before prefiltering
/// when `mode == 'nearest'`.
pub(crate) const NPAD: usize = 12;

/// Highest spline order scipy supports.
pub(crate) const MAX_ORDER: usize = 5;

/// Terms of the causal initialisation sum beyond which `|z|^i` is below 1e-18 relative
/// (|z| <= 0.4306 for all supported orders), so truncating there changes nothing visible.
const CAUSAL_INIT_TERMS: usize = 52;

/// `get_spline_interpolation_weights`: the `order + 1` weights of the taps
/// `start ..= start + order` for coordinate `x`.
pub(crate) fn spline_weights(x: f64, order: usize, w: &mut [f64]) {
    debug_assert!(w.len() > order);
    if order == 0 {
        w[0] = 1.0;
        return;
    }
    let x = x - if order & 1 == 1 {
        x.floor()
    } else {
        (x + 0.5).floor()
    };
    let mut y = x;
    let mut z = 1.0 - x;
    match order {
        1 => {
            w[0] = 1.0 - x;
        }
        2 => {
            w[1] = 0.75 - x * x;
            let y = 0.5 - x;
            w[0] = 0.5 * y * y;
        }
        3 => {
            w[1] = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0;
            w[2] = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0;
            w[0] = z * z * z / 6.0;
        }
        4 => {
            let t = x * x;
            w[2] = t * (t * 0.25 - 0.625) + 115.0 / 192.0;
            y = 1.0 + x;
            w[1] = y * (y * (y * (5.0 - y) / 6.0 - 1.25) + 5.0 / 24.0) + 55.0 / 96.0;
            w[3] = z * (z * (z * (5.0 - z) / 6.0 - 1.25) + 5.0 / 24.0) + 55.0 / 96.0;
            let y = 0.5 - x;
            let t = y * y;
            w[0] = t * t / 24.0;
        }
        _ => {
            let t = y * y;
            w[2] = t * (t * (0.25 - y / 12.0) - 0.5) + 0.55;
            let t = z * z;
            w[3] = t * (t * (0.25 - z / 12.0) - 0.5) + 0.55;
            y += 1.0;
            w[1] = y * (y * (y * (y * (y / 24.0 - 0.375) + 1.25) - 1.75) + 0.625) + 0.425;
            z += 1.0;
            w[4] = z * (z * (z * (z * (z / 24.0 - 0.375) + 1.25) - 1.75) + 0.625) + 0.425;
            let y = 1.0 - x;
            let t = y * y;
            w[0] = y * t * t / 120.0;
        }
    }
    w[order] = 1.0;
    for i in 0..order {
        w[order] -= w[i];
    }
}

/// `get_filter_poles`.
pub(crate) fn filter_poles(order: usize) -> &'static [f64] {
    match order {
        2 => &[-0.171_572_875_253_809_9],
        3 => &[-0.267_949_192_431_122_7],
        4 => &[-0.361_341_225_900_220_17, -0.013_725_429_297_339_121],
        5 => &[-0.430_575_347_099_973_8, -0.043_096_288_203_264_65],
        _ => &[],
    }
}

/// Interpolation plan along one axis: for every output index the clamped input taps and
/// their weights. Input indices refer to the padded line when `npad > 0`.
#[derive(Debug, Clone)]
pub(crate) struct AxisPlan {
    pub n_in: usize,
    pub n_out: usize,
    pub order: usize,
    /// Edge padding applied before the prefilter (12 for orders > 1, else 0).
    pub npad: usize,
    /// `n_out * (order + 1)` tap indices into the (padded) line.
    pub idx: Vec<usize>,
    /// `n_out * (order + 1)` weights.
    pub w: Vec<f64>,
}

impl AxisPlan {
    /// scipy `zoom(..., grid_mode=True, mode='nearest')` along one axis, which is also
    /// `map_coordinates(..., mode='nearest')` at `in/out * (k + 0.5) - 0.5` (nnU-Net's
    /// separate-z step).
    pub(crate) fn zoom(n_in: usize, n_out: usize, order: usize) -> Self {
        let order = order.min(MAX_ORDER);
        let npad = if order > 1 { NPAD } else { 0 };
        let len = (n_in + 2 * npad) as isize;
        let zoom = if n_out != 0 {
            n_in as f64 / n_out as f64
        } else {
            1.0
        };
        let taps = order + 1;
        let mut idx = Vec::with_capacity(n_out * taps);
        let mut w = vec![0.0; n_out * taps];
        for k in 0..n_out {
            let mut cc = k as f64;
            cc += 0.5;
            cc *= zoom;
            cc -= 0.5;
            cc += npad as f64;
            let start = if order & 1 == 1 {
                cc.floor() as isize - (order / 2) as isize
            } else {
                (cc + 0.5).floor() as isize - (order / 2) as isize
            };
            for h in 0..taps {
                idx.push((start + h as isize).clamp(0, (len - 1).max(0)) as usize);
            }
            spline_weights(cc, order, &mut w[k * taps..(k + 1) * taps]);
        }
        AxisPlan {
            n_in,
            n_out,
            order,
            npad,
            idx,
            w,
        }
    }

    /// Identity along an axis that is not resampled (one tap of weight 1).
    pub(crate) fn identity(n: usize) -> Self {
        AxisPlan {
            n_in: n,
            n_out: n,
            order: 0,
            npad: 0,
            idx: (0..n).collect(),
            w: vec![1.0; n],
        }
    }

    pub(crate) fn taps(&self) -> usize {
        self.order + 1
    }

    /// Length of the (padded) line the taps index into.
    pub(crate) fn padded_len(&self) -> usize {
        self.n_in + 2 * self.npad
    }

    pub(crate) fn needs_prefilter(&self) -> bool {
        self.order > 1
    }
}

/// B-spline prefilter (`apply_filter` with the mirror initialisation scipy uses for
/// `mode='nearest'`) of `lanes` interleaved lines: `buf[i * lanes + l]` is sample `i` of
/// line `l`; all lines have `n` samples.
#[inline(always)]
pub(crate) fn prefilter_lanes(buf: &mut [f64], n: usize, lanes: usize, order: usize) {
    if n <= 1 {
        return;
    }
    let poles = filter_poles(order);
    if poles.is_empty() {
        return;
    }
    let buf = &mut buf[..n * lanes];
    let mut gain = 1.0;
    for &z in poles {
        gain *= (1.0 - z) * (1.0 - 1.0 / z);
    }
    for v in buf.iter_mut() {
        *v *= gain;
    }
    for &z in poles {
        // causal initialisation (`_init_causal_mirror`)
        let z_n_1 = z.powf((n - 1) as f64);
        let denom = 1.0 - z_n_1 * z_n_1;
        let (first, rest) = buf.split_at_mut(lanes);
        let last_row = (n - 1 - 1) * lanes; // offset of row n-1 inside `rest`
        for (l, c0) in first.iter_mut().enumerate() {
            *c0 += z_n_1 * rest[last_row + l];
        }
        let mut z_i = z;
        for i in 1..(n - 1).min(CAUSAL_INIT_TERMS) {
            let row = (i - 1) * lanes;
            let mirror = (n - 1 - i - 1) * lanes;
            for (l, c0) in first.iter_mut().enumerate() {
                *c0 += z_i * (rest[row + l] + z_n_1 * rest[mirror + l]);
            }
            z_i *= z;
        }
        for c0 in first.iter_mut() {
            *c0 /= denom;
        }
        // causal recursion
        for i in 1..n {
            let (prev, cur) = buf.split_at_mut(i * lanes);
            let prev = &prev[(i - 1) * lanes..];
            for (c, p) in cur[..lanes].iter_mut().zip(prev) {
                *c += z * *p;
            }
        }
        // anticausal initialisation (`_init_anticausal_mirror`)
        {
            let (head, last) = buf.split_at_mut((n - 1) * lanes);
            let prev = &head[(n - 2) * lanes..];
            let f = z / (z * z - 1.0);
            for (c, p) in last.iter_mut().zip(prev) {
                *c = (z * *p + *c) * f;
            }
        }
        // anticausal recursion
        for i in (0..n - 1).rev() {
            let (cur, next) = buf.split_at_mut((i + 1) * lanes);
            let cur = &mut cur[i * lanes..];
            for (c, nx) in cur.iter_mut().zip(&next[..lanes]) {
                *c = z * (*nx - *c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_reproduce_knots() {
        let mut w = [0.0; 6];
        for order in 1..=5 {
            for &x in &[0.0, 0.1, 0.25, 0.5, 0.75, 0.99, 3.3, -1.7] {
                spline_weights(x, order, &mut w);
                let s: f64 = w[..=order].iter().sum();
                assert!((s - 1.0).abs() < 1e-12, "order {order} x {x}: {s}");
            }
        }
        // cubic B-spline at a knot: (1/6, 4/6, 1/6, 0)
        spline_weights(5.0, 3, &mut w);
        assert!((w[0] - 1.0 / 6.0).abs() < 1e-15);
        assert!((w[1] - 4.0 / 6.0).abs() < 1e-15);
        assert!((w[2] - 1.0 / 6.0).abs() < 1e-15);
        assert!(w[3].abs() < 1e-15);
    }

    #[test]
    fn prefilter_inverts_cubic_sampling() {
        // Filtering then evaluating the spline at the knots must give back the samples.
        let n = 40;
        let lanes = 3;
        let mut buf = vec![0.0; n * lanes];
        let sample = |i: usize, l: usize| ((i * 7 + l * 3) % 11) as f64 - 4.0 + 0.1 * i as f64;
        for i in 0..n {
            for l in 0..lanes {
                buf[i * lanes + l] = sample(i, l);
            }
        }
        prefilter_lanes(&mut buf, n, lanes, 3);
        for i in 1..n - 1 {
            for l in 0..lanes {
                let c = |j: usize| buf[j * lanes + l];
                let v = (c(i - 1) + 4.0 * c(i) + c(i + 1)) / 6.0;
                assert!((v - sample(i, l)).abs() < 1e-9, "i {i} l {l}: {v}");
            }
        }
    }

    #[test]
    fn zoom_plan_coordinates() {
        // downsampling by two with linear interpolation averages neighbour pairs
        let p = AxisPlan::zoom(8, 4, 1);
        assert_eq!(&p.idx[..4], &[0, 1, 2, 3]);
        assert_eq!(&p.w[..2], &[0.5, 0.5]);
        // nearest: floor(cc + 0.5), clamped
        let p = AxisPlan::zoom(3, 6, 0);
        assert_eq!(p.idx, vec![0, 0, 1, 1, 2, 2]);
        let p = AxisPlan::zoom(4, 2, 0);
        // cc = 0.5 -> floor(1.0) = 1; cc = 2.5 -> 3
        assert_eq!(p.idx, vec![1, 3]);
    }
}
