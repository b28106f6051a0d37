//! The few numpy / Python numerics the planner depends on, reproduced bit for bit.
//!
//! nnU-Net's plans are sensitive to the last bit of some values (a spacing of
//! `0.7510548372420769` ends up in the plans file, a batch size is `round()`ed), so these follow
//! numpy 2.x exactly rather than the "obvious" formula.

/// Python's `round(x)` (and numpy's `np.round`): round half to even.
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.percentile(values, q)` with the default `method="linear"`.
///
/// numpy computes the virtual index `(n - 1) * (q / 100)` and interpolates with
/// `a + (b - a) * t` for `t < 0.5` but `b - (b - a) * (1 - t)` for `t >= 0.5`; the two differ
/// in the last bit, so `percentile(x, 50)` is not always `median(x)`.
/// Returns `None` for an empty slice.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let virtual_index = (n - 1) as f64 * (q / 100.0);
    let (prev, next) = if virtual_index >= (n - 1) as f64 {
        (n - 1, n - 1)
    } else if virtual_index < 0.0 {
        (0, 0)
    } else {
        let p = virtual_index.floor() as usize;
        (p, (p + 1).min(n - 1))
    };
    let gamma = if virtual_index >= (n - 1) as f64 {
        // numpy sets both indices to -1; a == b so gamma does not matter
        0.0
    } else {
        virtual_index - prev as f64
    };
    let (a, b) = (v[prev], v[next]);
    let diff = b - a;
    Some(if gamma >= 0.5 {
        b - diff * (1.0 - gamma)
    } else {
        a + diff * gamma
    })
}

/// `np.median(values)`: the middle element, or the mean `(a + b) / 2` of the two middle ones.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Per-column reduction of a row-major table (`np.xxx(table, axis=0)`).
pub fn per_column(rows: &[Vec<f64>], f: impl Fn(&[f64]) -> Option<f64>) -> Option<Vec<f64>> {
    let dim = rows.first()?.len();
    (0..dim)
        .map(|d| {
            let col: Vec<f64> = rows.iter().map(|r| r[d]).collect();
            f(&col)
        })
        .collect()
}

/// `np.prod(values, dtype=np.float64)`: a left-to-right product.
pub fn prod(values: &[f64]) -> f64 {
    values.iter().fold(1.0, |acc, &v| acc * v)
}

/// `np.argmax`: index of the first maximum.
pub fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// `np.argsort(values)[-1]`: index of the maximum, the *last* one on ties (numpy sorts arrays
/// this short with a stable insertion sort).
pub fn argsort_last(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v >= values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_is_bankers() {
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(-0.5), -0.0);
        assert_eq!(round_half_even(15.18), 15.0);
    }

    #[test]
    fn percentile_matches_numpy() {
        // np.percentile([3,3,3,3.5,3.5,3.5,4,4,4,5,5,5], 50) == 3.75 ; 10 -> 3.0
        let z = [3.0, 3.5, 4.0, 5.0, 3.0, 3.5, 4.0, 5.0, 3.0, 3.5, 4.0, 5.0];
        assert_eq!(percentile(&z, 50.0), Some(3.75));
        assert_eq!(percentile(&z, 10.0), Some(3.0));
        // np.percentile([1, 2, 3, 4], 10) == 1.3 (1 + 1*0.30000000000000004)
        assert_eq!(
            percentile(&[4.0, 3.0, 2.0, 1.0], 10.0),
            Some(1.0 + 1.0 * (3.0 * 0.1))
        );
        // t >= 0.5 takes the b - (b-a)(1-t) branch: np.percentile([0.1, 0.7], 50)
        let (a, b) = (0.1f64, 0.7f64);
        assert_eq!(percentile(&[a, b], 50.0), Some(b - (b - a) * 0.5));
        assert_eq!(percentile(&[1.0, 2.0, 9.0], 100.0), Some(9.0));
        assert_eq!(percentile(&[1.0, 2.0, 9.0], 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn median_and_args() {
        assert_eq!(median(&[93.0, 94.0, 1.0, 100.0]), Some(93.5));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argsort_last(&[1.0, 3.0, 3.0]), 2);
        assert_eq!(argsort_last(&[3.0, 1.0, 2.0]), 0);
        assert_eq!(prod(&[2.0, 3.0, 4.0]), 24.0);
        let cols = per_column(&[vec![1.0, 10.0], vec![3.0, 30.0]], median).unwrap();
        assert_eq!(cols, vec![2.0, 20.0]);
    }
}
