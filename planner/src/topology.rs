//! Network topology from spacing and patch size (nnU-Net
//! `experiment_planning/experiment_planners/network_topology.py`).

/// What `get_pool_and_conv_props` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolAndConvProps {
    /// Number of downsamplings per axis.
    pub num_pool_per_axis: Vec<usize>,
    /// Per stage strides; the first stage is always all ones (`strides` in the plans).
    pub pool_op_kernel_sizes: Vec<Vec<usize>>,
    /// Per stage conv kernel sizes; the bottleneck is always all threes (`kernel_sizes`).
    pub conv_kernel_sizes: Vec<Vec<usize>>,
    /// The patch padded up to a multiple of `shape_must_be_divisible_by`.
    pub patch_size: Vec<usize>,
    /// `2 ** num_pool_per_axis`.
    pub shape_must_be_divisible_by: Vec<usize>,
}

impl PoolAndConvProps {
    /// Number of resolution stages (`len(pool_op_kernel_sizes)`).
    pub fn n_stages(&self) -> usize {
        self.pool_op_kernel_sizes.len()
    }
}

/// `get_shape_must_be_divisible_by`: `2 ** num_pool_per_axis`.
pub fn get_shape_must_be_divisible_by(num_pool_per_axis: &[usize]) -> Vec<usize> {
    num_pool_per_axis
        .iter()
        .map(|&p| 1usize << p.min(63))
        .collect()
}

/// `pad_shape`: round each axis up to the next multiple of `must_be_divisible_by`.
///
/// The shape is a float because nnU-Net may pass a median shape such as `93.5` as the initial
/// patch; Python then computes `93.5 + 32 - 93.5 % 32 = 96.0` and truncates with `astype(int)`.
pub fn pad_shape(shape: &[f64], must_be_divisible_by: &[usize]) -> Vec<usize> {
    shape
        .iter()
        .zip(must_be_divisible_by)
        .map(|(&s, &m)| {
            let m = m as f64;
            let rem = s % m;
            let padded = if rem == 0.0 { s } else { s + m - rem };
            padded.max(0.0) as usize
        })
        .collect()
}

/// nnU-Net's `get_pool_and_conv_props(spacing, patch_size, min_feature_map_size, max_numpool)`.
///
/// Repeatedly pools every axis that is at least `2 * min_feature_map_size` large and whose
/// current spacing is within a factor 2 of the finest such axis (a single remaining axis must be
/// at least `3 * min_feature_map_size`). An axis gets conv kernel 3 once its spacing is within a
/// factor 2 of the finest current spacing, 1 before that. nnU-Net calls this with
/// `min_feature_map_size = 4` and `max_numpool = 999999`.
pub fn get_pool_and_conv_props(
    spacing: &[f64],
    patch_size: &[f64],
    min_feature_map_size: usize,
    max_numpool: usize,
) -> PoolAndConvProps {
    let dim = spacing.len();
    let min_fm = min_feature_map_size as f64;
    let mut current_spacing = spacing.to_vec();
    let mut current_size = patch_size.to_vec();
    let mut pool_op_kernel_sizes = vec![vec![1usize; dim]];
    let mut conv_kernel_sizes: Vec<Vec<usize>> = Vec::new();
    let mut num_pool_per_axis = vec![0usize; dim];
    let mut kernel_size = vec![1usize; dim];

    loop {
        // axes that can still be pooled without going below the minimum feature map size
        let mut valid: Vec<usize> = (0..dim)
            .filter(|&i| current_size[i] >= 2.0 * min_fm)
            .collect();
        if valid.is_empty() {
            break;
        }
        // only axes within a factor 2 of the finest valid spacing
        let min_spacing_of_valid = valid
            .iter()
            .map(|&i| current_spacing[i])
            .fold(f64::INFINITY, f64::min);
        valid.retain(|&i| current_spacing[i] / min_spacing_of_valid < 2.0);
        valid.retain(|&i| num_pool_per_axis[i] < max_numpool);
        if valid.len() == 1 && current_size[valid[0]] < 3.0 * min_fm {
            break;
        }
        if valid.is_empty() {
            break;
        }
        // kernel 3 once an axis is within a factor 2 of the finest current spacing; stays 3
        let min_current = current_spacing
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        for d in 0..dim {
            if kernel_size[d] != 3 && current_spacing[d] / min_current < 2.0 {
                kernel_size[d] = 3;
            }
        }
        let mut pool = vec![1usize; dim];
        for &v in &valid {
            pool[v] = 2;
            num_pool_per_axis[v] += 1;
            current_spacing[v] *= 2.0;
            current_size[v] = (current_size[v] / 2.0).ceil();
        }
        pool_op_kernel_sizes.push(pool);
        conv_kernel_sizes.push(kernel_size.clone());
    }

    let must_be_divisible_by = get_shape_must_be_divisible_by(&num_pool_per_axis);
    let patch = pad_shape(patch_size, &must_be_divisible_by);
    // the bottleneck always uses 3x3(x3) convs
    conv_kernel_sizes.push(vec![3; dim]);
    PoolAndConvProps {
        num_pool_per_axis,
        pool_op_kernel_sizes,
        conv_kernel_sizes,
        patch_size: patch,
        shape_must_be_divisible_by: must_be_divisible_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_shape_like_python() {
        assert_eq!(
            pad_shape(&[93.5, 97.0, 96.0], &[32, 16, 32]),
            vec![96, 112, 96]
        );
        assert_eq!(pad_shape(&[30.0], &[1]), vec![30]);
        assert_eq!(pad_shape(&[30.5], &[1]), vec![31]);
    }

    #[test]
    fn anisotropic_3d_dataset501() {
        // Dataset501 3d_fullres: spacing (3, .8, .8), patch clipped to the median (30, 97, 93.5)
        let p = get_pool_and_conv_props(&[3.0, 0.8, 0.8], &[30.0, 97.0, 93.5], 4, 999_999);
        assert_eq!(p.num_pool_per_axis, vec![3, 4, 4]);
        assert_eq!(p.patch_size, vec![32, 112, 96]);
        assert_eq!(p.shape_must_be_divisible_by, vec![8, 16, 16]);
        assert_eq!(
            p.pool_op_kernel_sizes,
            vec![
                vec![1, 1, 1],
                vec![1, 2, 2],
                vec![2, 2, 2],
                vec![2, 2, 2],
                vec![2, 2, 2]
            ]
        );
        assert_eq!(
            p.conv_kernel_sizes,
            vec![
                vec![1, 3, 3],
                vec![3, 3, 3],
                vec![3, 3, 3],
                vec![3, 3, 3],
                vec![3, 3, 3]
            ]
        );
    }

    #[test]
    fn isotropic_2d_pools_to_min_feature_map() {
        let p = get_pool_and_conv_props(&[1.0, 1.0], &[512.0, 512.0], 4, 999_999);
        // 512 -> 256 -> ... -> 8 -> 4 : 7 pools; 4 < 8 stops
        assert_eq!(p.num_pool_per_axis, vec![7, 7]);
        assert_eq!(p.n_stages(), 8);
        assert_eq!(p.patch_size, vec![512, 512]);
        // one remaining axis needs >= 12
        let p = get_pool_and_conv_props(&[1.0, 1.0], &[64.0, 10.0], 4, 999_999);
        // both pool once (64->32, 10->5); then only axis 0 (32, 16 >= 12); 8 < 12 stops
        assert_eq!(p.num_pool_per_axis, vec![3, 1]);
        assert_eq!(p.pool_op_kernel_sizes[2], vec![2, 1]);
        assert_eq!(p.patch_size, vec![64, 10]);
        // max_numpool caps
        let p = get_pool_and_conv_props(&[1.0, 1.0], &[512.0, 512.0], 4, 3);
        assert_eq!(p.num_pool_per_axis, vec![3, 3]);
    }

    #[test]
    fn tiny_patch_never_pools() {
        let p = get_pool_and_conv_props(&[1.0, 1.0, 1.0], &[5.0, 7.0, 3.0], 4, 999_999);
        assert_eq!(p.num_pool_per_axis, vec![0, 0, 0]);
        assert_eq!(p.n_stages(), 1);
        assert_eq!(p.conv_kernel_sizes, vec![vec![3, 3, 3]]);
        assert_eq!(p.patch_size, vec![5, 7, 3]);
    }
}
