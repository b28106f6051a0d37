//! Resampling (nnU-Net `preprocessing/resampling/default_resampling.py`).

/// `compute_new_shape`: `round(old_spacing / new_spacing * old_shape)` per axis, with
/// numpy's round-half-to-even so shapes match nnU-Net exactly.
pub fn compute_new_shape(old_shape: &[usize], old_spacing: &[f64], new_spacing: &[f64]) -> Vec<usize> {
    old_shape
        .iter()
        .zip(old_spacing.iter().zip(new_spacing))
        .map(|(&s, (&o, &n))| ((o / n) * s as f64).round_ties_even().max(0.0) as usize)
        .collect()
}
