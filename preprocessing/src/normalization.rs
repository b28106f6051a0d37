//! Intensity normalization schemes (nnU-Net `preprocessing/normalization/`).
//!
//! All functions work in place on `f32` data and follow nnU-Net's float32 arithmetic: the
//! statistics (mean, std) are accumulated in `f64` (numpy accumulates float32 pairwise, so
//! results agree to float32 precision) and then applied as float32 operations, exactly as
//! `image -= mean; image /= max(std, 1e-8)` does on a float32 array.

use ndarray::{ArrayView3, ArrayViewMut3, ArrayViewMut4, Axis, Zip};
use rayon::prelude::*;

/// The scheme names and their parsing live in the plans; this module applies them.
pub use plans::NormalizationScheme;

/// The dataset-level foreground statistics CT normalization needs (a subset of the
/// fingerprint's `foreground_intensity_properties_per_channel` entry).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelIntensityStats {
    /// Foreground mean.
    pub mean: f64,
    /// Foreground standard deviation.
    pub std: f64,
    /// Foreground 0.5th percentile (lower clip bound).
    pub percentile_00_5: f64,
    /// Foreground 99.5th percentile (upper clip bound).
    pub percentile_99_5: f64,
}

/// Errors of the normalization functions.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NormalizationError {
    /// CT normalization without the channel's entry in
    /// `foreground_intensity_properties_per_channel`.
    #[error(
        "channel {channel}: {scheme} needs foreground_intensity_properties_per_channel[\"{channel}\"] \
         (from the fingerprint / plans), but it is missing"
    )]
    MissingIntensityProperties {
        /// Channel index.
        channel: usize,
        /// Scheme class name.
        scheme: &'static str,
    },
    /// RGB normalization on values outside `0..=255`.
    #[error(
        "channel {channel}: RGBTo01Normalization expects 8-bit values in 0..255, found min {min} and max {max}"
    )]
    RgbOutOfRange {
        /// Channel index.
        channel: usize,
        /// Smallest value found.
        min: f32,
        /// Largest value found.
        max: f32,
    },
    /// `use_mask_for_norm` is set but no segmentation / nonzero mask was given.
    #[error("channel {channel}: use_mask_for_norm is true but no segmentation mask was given")]
    MaskRequired {
        /// Channel index.
        channel: usize,
    },
    /// The mask's shape differs from the image's.
    #[error("channel {channel}: mask shape {mask:?} differs from image shape {image:?}")]
    MaskShape {
        /// Channel index.
        channel: usize,
        /// Image shape (z, y, x).
        image: Vec<usize>,
        /// Mask shape (z, y, x).
        mask: Vec<usize>,
    },
    /// The per-channel lists do not match the number of channels.
    #[error(
        "the data has {channels} channels but the configuration lists {schemes} normalization_schemes \
         and {masks} use_mask_for_norm entries"
    )]
    ChannelCount {
        /// Number of channels in the data.
        channels: usize,
        /// Entries of `normalization_schemes`.
        schemes: usize,
        /// Entries of `use_mask_for_norm`.
        masks: usize,
    },
}

/// Sum and count (f64) of the values, optionally only where `seg >= 0`. Deterministic:
/// per-slice partial sums are reduced in slice order.
fn masked_sum(
    image: &ArrayView3<f32>,
    mask: Option<&ArrayView3<i16>>,
    center: f64,
) -> (f64, f64, usize) {
    let parts: Vec<(f64, f64, usize)> = match mask {
        None => image
            .axis_iter(Axis(0))
            .into_par_iter()
            .map(|plane| {
                let mut s = 0.0f64;
                let mut sq = 0.0f64;
                for &v in plane.iter() {
                    let d = v as f64 - center;
                    s += d;
                    sq += d * d;
                }
                (s, sq, plane.len())
            })
            .collect(),
        Some(mask) => Zip::from(image.axis_iter(Axis(0)))
            .and(mask.axis_iter(Axis(0)))
            .par_map_collect(|plane, mplane| {
                let mut s = 0.0f64;
                let mut sq = 0.0f64;
                let mut n = 0usize;
                Zip::from(&plane).and(&mplane).for_each(|&v, &m| {
                    if m >= 0 {
                        let d = v as f64 - center;
                        s += d;
                        sq += d * d;
                        n += 1;
                    }
                });
                (s, sq, n)
            })
            .into_iter()
            .collect(),
    };
    parts
        .into_iter()
        .fold((0.0, 0.0, 0), |(a, b, c), (x, y, z)| (a + x, b + y, c + z))
}

/// Mean and population std (numpy `ddof=0`), two-pass; `None` if no voxel is selected.
fn mean_std(image: &ArrayView3<f32>, mask: Option<&ArrayView3<i16>>) -> Option<(f64, f64)> {
    let (sum, _, n) = masked_sum(image, mask, 0.0);
    if n == 0 {
        return None;
    }
    let mean = sum / n as f64;
    let (_, sq, _) = masked_sum(image, mask, mean);
    Some((mean, (sq / n as f64).sqrt()))
}

fn min_max(image: &ArrayView3<f32>) -> (f32, f32) {
    image
        .axis_iter(Axis(0))
        .into_par_iter()
        .map(|plane| {
            plane
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                })
        })
        .reduce(
            || (f32::INFINITY, f32::NEG_INFINITY),
            |(a, b), (c, d)| (a.min(c), b.max(d)),
        )
}

fn par_apply(image: &mut ArrayViewMut3<f32>, f: impl Fn(f32) -> f32 + Sync + Send) {
    image
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .for_each(|mut plane| plane.mapv_inplace(&f));
}

/// Normalizes one channel in place.
///
/// * `mask`: the (cropped) segmentation of the case, where `-1` marks voxels outside the
///   nonzero mask; only used by z-score with `use_mask_for_norm`.
/// * `stats`: this channel's fingerprint foreground statistics; required for CT only.
/// * `channel`: used in error messages.
pub fn normalize_channel(
    mut image: ArrayViewMut3<f32>,
    mask: Option<ArrayView3<i16>>,
    scheme: NormalizationScheme,
    use_mask_for_norm: bool,
    stats: Option<&ChannelIntensityStats>,
    channel: usize,
) -> Result<(), NormalizationError> {
    match scheme {
        NormalizationScheme::Ct => {
            let st = stats.ok_or(NormalizationError::MissingIntensityProperties {
                channel,
                scheme: scheme.name(),
            })?;
            let lo = st.percentile_00_5 as f32;
            let hi = st.percentile_99_5 as f32;
            let mean = st.mean as f32;
            let div = st.std.max(1e-8) as f32;
            // np.clip(x, lo, hi) = min(max(x, lo), hi) (no panic if lo > hi).
            par_apply(&mut image, |x| (x.max(lo).min(hi) - mean) / div);
        }
        NormalizationScheme::ZScore => {
            if use_mask_for_norm {
                let mask = mask.ok_or(NormalizationError::MaskRequired { channel })?;
                if mask.shape() != image.shape() {
                    return Err(NormalizationError::MaskShape {
                        channel,
                        image: image.shape().to_vec(),
                        mask: mask.shape().to_vec(),
                    });
                }
                // nnU-Net: mask = seg >= 0; image[mask] = (image[mask] - mean) / max(std, 1e-8);
                // voxels outside the mask are left as they are (0 outside the nonzero mask).
                let Some((mean, std)) = mean_std(&image.view(), Some(&mask)) else {
                    return Ok(());
                };
                let (mean, div) = (mean as f32, std.max(1e-8) as f32);
                Zip::from(image.axis_iter_mut(Axis(0)))
                    .and(mask.axis_iter(Axis(0)))
                    .par_for_each(|mut plane, mplane| {
                        Zip::from(&mut plane).and(&mplane).for_each(|v, &m| {
                            if m >= 0 {
                                *v = (*v - mean) / div;
                            }
                        })
                    });
            } else {
                let Some((mean, std)) = mean_std(&image.view(), None) else {
                    return Ok(());
                };
                let (mean, div) = (mean as f32, std.max(1e-8) as f32);
                par_apply(&mut image, |x| (x - mean) / div);
            }
        }
        NormalizationScheme::NoNorm => {}
        NormalizationScheme::RescaleTo01 => {
            if image.is_empty() {
                return Ok(());
            }
            // image -= image.min(); image /= clip(image.max(), 1e-8)
            let (lo, _) = min_max(&image.view());
            par_apply(&mut image, |x| x - lo);
            let (_, hi) = min_max(&image.view());
            let div = hi.max(1e-8);
            par_apply(&mut image, |x| x / div);
        }
        NormalizationScheme::RgbTo01 => {
            if image.is_empty() {
                return Ok(());
            }
            let (lo, hi) = min_max(&image.view());
            if !(lo >= 0.0 && hi <= 255.0) {
                return Err(NormalizationError::RgbOutOfRange {
                    channel,
                    min: lo,
                    max: hi,
                });
            }
            par_apply(&mut image, |x| x / 255.0);
        }
    }
    Ok(())
}

/// nnU-Net's `DefaultPreprocessor._normalize`: every channel with its scheme.
///
/// `stats[c]` is channel `c`'s fingerprint entry (if any); `mask` is the cropped seg
/// `(z, y, x)` with `-1` outside the nonzero mask.
pub fn normalize(
    mut data: ArrayViewMut4<f32>,
    mask: Option<ArrayView3<i16>>,
    schemes: &[NormalizationScheme],
    use_mask_for_norm: &[bool],
    stats: &[Option<ChannelIntensityStats>],
) -> Result<(), NormalizationError> {
    let channels = data.dim().0;
    if schemes.len() != channels || use_mask_for_norm.len() != channels {
        return Err(NormalizationError::ChannelCount {
            channels,
            schemes: schemes.len(),
            masks: use_mask_for_norm.len(),
        });
    }
    for (c, image) in data.axis_iter_mut(Axis(0)).enumerate() {
        normalize_channel(
            image,
            mask,
            schemes[c],
            use_mask_for_norm[c],
            stats.get(c).and_then(|s| s.as_ref()),
            c,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, Array4};

    fn ramp() -> Array3<f32> {
        Array3::from_shape_fn((3, 4, 5), |(z, y, x)| (z * 20 + y * 5 + x) as f32)
    }

    #[test]
    fn zscore_whole_image() {
        let mut a = ramp();
        normalize_channel(
            a.view_mut(),
            None,
            NormalizationScheme::ZScore,
            false,
            None,
            0,
        )
        .unwrap();
        let n = a.len() as f64;
        let mean: f64 = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var: f64 = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 1e-5, "{mean}");
        assert!((var.sqrt() - 1.0).abs() < 1e-5);
        // 60 values 0..59: mean 29.5, std sqrt((60^2-1)/12)
        let std = ((3600.0f64 - 1.0) / 12.0).sqrt();
        assert!((a[[0, 0, 0]] as f64 - (-29.5 / std)).abs() < 1e-5);
    }

    #[test]
    fn zscore_masked_leaves_outside() {
        let mut a = Array3::<f32>::zeros((1, 2, 3));
        a.assign(&ndarray::array![[[0.0, 2.0, 4.0], [0.0, 6.0, 8.0]]]);
        let seg = ndarray::array![[[-1i16, 0, 1], [-1, 0, 0]]];
        normalize_channel(
            a.view_mut(),
            Some(seg.view()),
            NormalizationScheme::ZScore,
            true,
            None,
            0,
        )
        .unwrap();
        // inside values 2,4,6,8: mean 5, std sqrt(5)
        let s = 5f32.sqrt();
        assert_eq!(a[[0, 0, 0]], 0.0);
        assert_eq!(a[[0, 1, 0]], 0.0);
        assert!((a[[0, 0, 1]] - (-3.0 / s)).abs() < 1e-6);
        assert!((a[[0, 1, 2]] - (3.0 / s)).abs() < 1e-6);
        // without a mask -> error
        let mut b = Array3::<f32>::zeros((1, 2, 3));
        assert_eq!(
            normalize_channel(
                b.view_mut(),
                None,
                NormalizationScheme::ZScore,
                true,
                None,
                2
            ),
            Err(NormalizationError::MaskRequired { channel: 2 })
        );
    }

    #[test]
    fn zscore_constant_image_uses_eps() {
        let mut a = Array3::<f32>::from_elem((2, 2, 2), 3.0);
        normalize_channel(
            a.view_mut(),
            None,
            NormalizationScheme::ZScore,
            false,
            None,
            0,
        )
        .unwrap();
        assert!(a.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn ct_clips_then_scales() {
        let mut a = ndarray::array![[[-2000.0f32, 0.0, 50.0, 3000.0]]];
        let st = ChannelIntensityStats {
            mean: 100.0,
            std: 50.0,
            percentile_00_5: -1000.0,
            percentile_99_5: 1000.0,
        };
        normalize_channel(
            a.view_mut(),
            None,
            NormalizationScheme::Ct,
            false,
            Some(&st),
            0,
        )
        .unwrap();
        assert_eq!(a.as_slice().unwrap(), &[-22.0, -2.0, -1.0, 18.0]);
        let err = normalize_channel(a.view_mut(), None, NormalizationScheme::Ct, false, None, 3)
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("foreground_intensity_properties_per_channel[\"3\"]"));
    }

    #[test]
    fn rescale_and_rgb() {
        let mut a = ndarray::array![[[2.0f32, 4.0, 6.0]]];
        normalize_channel(
            a.view_mut(),
            None,
            NormalizationScheme::RescaleTo01,
            false,
            None,
            0,
        )
        .unwrap();
        assert_eq!(a.as_slice().unwrap(), &[0.0, 0.5, 1.0]);
        let mut b = ndarray::array![[[0.0f32, 51.0, 255.0]]];
        normalize_channel(
            b.view_mut(),
            None,
            NormalizationScheme::RgbTo01,
            false,
            None,
            0,
        )
        .unwrap();
        assert_eq!(b.as_slice().unwrap(), &[0.0, 0.2, 1.0]);
        let mut c = ndarray::array![[[0.0f32, 256.0]]];
        assert!(matches!(
            normalize_channel(
                c.view_mut(),
                None,
                NormalizationScheme::RgbTo01,
                false,
                None,
                1
            ),
            Err(NormalizationError::RgbOutOfRange { channel: 1, .. })
        ));
        let mut d = ndarray::array![[[1.5f32, -3.0]]];
        normalize_channel(
            d.view_mut(),
            None,
            NormalizationScheme::NoNorm,
            false,
            None,
            0,
        )
        .unwrap();
        assert_eq!(d.as_slice().unwrap(), &[1.5, -3.0]);
    }

    #[test]
    fn multi_channel_dispatch_and_counts() {
        let mut data = Array4::<f32>::zeros((2, 1, 1, 3));
        data.slice_mut(ndarray::s![0, 0, 0, ..])
            .assign(&ndarray::array![1.0, 2.0, 3.0]);
        data.slice_mut(ndarray::s![1, 0, 0, ..])
            .assign(&ndarray::array![10.0, 20.0, 30.0]);
        let schemes = [
            NormalizationScheme::NoNorm,
            NormalizationScheme::RescaleTo01,
        ];
        normalize(
            data.view_mut(),
            None,
            &schemes,
            &[false, false],
            &[None, None],
        )
        .unwrap();
        assert_eq!(data[[0, 0, 0, 2]], 3.0);
        assert_eq!(data[[1, 0, 0, 1]], 0.5);
        assert!(matches!(
            normalize(data.view_mut(), None, &schemes[..1], &[false], &[]),
            Err(NormalizationError::ChannelCount { channels: 2, .. })
        ));
    }
}
