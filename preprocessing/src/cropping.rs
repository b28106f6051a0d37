//! Cropping to the nonzero region (nnU-Net `preprocessing/cropping/cropping.py`).
//!
//! The mask is the OR over channels of `data != 0`, with holes filled exactly like
//! `scipy.ndimage.binary_fill_holes` (default cross structure, i.e. 6-connectivity in 3D):
//! every background voxel that is not 6-connected to the array border becomes foreground.
//! The data and segmentation are cropped to the bounding box of that mask, and in the
//! segmentation every voxel that is `0` and outside the mask becomes `-1`.

use ndarray::{s, Array3, Array4, ArrayView3, ArrayView4, Axis, Zip};

/// The label written into the segmentation for voxels outside the nonzero mask.
pub const NONZERO_LABEL: i16 = -1;

/// Result of [`crop_to_nonzero`].
#[derive(Debug, Clone)]
pub struct Cropped {
    /// Cropped data `(c, z, y, x)`, standard (C) layout.
    pub data: Array4<f32>,
    /// Cropped segmentation `(1, z, y, x)`. When no segmentation was given this is, as in
    /// nnU-Net, a generated one: `0` inside the (hole-filled) nonzero mask and `-1` outside,
    /// so it is always `Some` after cropping. The option is kept for API symmetry.
    pub seg: Option<Array4<i16>>,
    /// Half-open bounding box `[[z0, z1], [y0, y1], [x0, x1]]` in the input array.
    pub bbox: [[usize; 2]; 3],
}

const BG: u8 = 0;
const FG: u8 = 1;
const OUTSIDE: u8 = 2;

/// `create_nonzero_mask`: OR over channels of `data != 0`, then hole filling.
pub fn nonzero_mask(data: ArrayView4<f32>) -> Array3<bool> {
    let (_, nz, ny, nx) = data.dim();
    let mut state = Array3::<u8>::zeros((nz, ny, nx));
    for channel in data.axis_iter(Axis(0)) {
        Zip::from(&mut state).and(&channel).for_each(|m, &v| {
            if v != 0.0 {
                *m = FG;
            }
        });
    }
    fill_holes_state(&mut state);
    state.mapv(|v| v != OUTSIDE)
}

/// `scipy.ndimage.binary_fill_holes` with the default (6-connected) structure, in place.
pub fn binary_fill_holes(mask: &mut Array3<bool>) {
    let mut state = mask.mapv(|m| if m { FG } else { BG });
    fill_holes_state(&mut state);
    Zip::from(mask)
        .and(&state)
        .for_each(|m, &s| *m = s != OUTSIDE);
}

/// Marks every `BG` voxel 6-connected to the border as `OUTSIDE` (scanline flood fill along
/// x). `state` must be in standard layout (it is always created here).
fn fill_holes_state(state: &mut Array3<u8>) {
    let (nz, ny, nx) = state.dim();
    if nz == 0 || ny == 0 || nx == 0 {
        return;
    }
    if !state.is_standard_layout() {
        *state = state.as_standard_layout().into_owned();
    }
    let Some(flat) = state.as_slice_mut() else {
        return;
    };
    let row = |z: usize, y: usize| (z * ny + y) * nx;
    let mut stack: Vec<(usize, usize, usize)> = Vec::new();

    // Process one seed stack until empty.
    let drain = |flat: &mut [u8], stack: &mut Vec<(usize, usize, usize)>| {
        while let Some((z, y, x)) = stack.pop() {
            let base = row(z, y);
            if flat[base + x] != BG {
                continue;
            }
            let mut xl = x;
            while xl > 0 && flat[base + xl - 1] == BG {
                xl -= 1;
            }
            let mut xr = x;
            while xr + 1 < nx && flat[base + xr + 1] == BG {
                xr += 1;
            }
            for v in &mut flat[base + xl..=base + xr] {
                *v = OUTSIDE;
            }
            // The four 6-neighbour rows; a neighbour of (z, y, x) in them has the same x.
            let mut neighbours: [(usize, usize, bool); 4] = [(0, 0, false); 4];
            if z > 0 {
                neighbours[0] = (z - 1, y, true);
            }
            if z + 1 < nz {
                neighbours[1] = (z + 1, y, true);
            }
            if y > 0 {
                neighbours[2] = (z, y - 1, true);
            }
            if y + 1 < ny {
                neighbours[3] = (z, y + 1, true);
            }
            for &(zz, yy, valid) in &neighbours {
                if !valid {
                    continue;
                }
                let nb = row(zz, yy);
                let mut in_run = false;
                for xx in xl..=xr {
                    if flat[nb + xx] == BG {
                        if !in_run {
                            stack.push((zz, yy, xx));
                            in_run = true;
                        }
                    } else {
                        in_run = false;
                    }
                }
            }
        }
    };

    for z in 0..nz {
        for y in 0..ny {
            let base = row(z, y);
            let whole_row_on_border = z == 0 || z + 1 == nz || y == 0 || y + 1 == ny;
            if whole_row_on_border {
                for x in 0..nx {
                    if flat[base + x] == BG {
                        stack.push((z, y, x));
                        drain(flat, &mut stack);
                    }
                }
            } else {
                for x in [0, nx - 1] {
                    if flat[base + x] == BG {
                        stack.push((z, y, x));
                        drain(flat, &mut stack);
                    }
                }
            }
        }
    }
}

/// `get_bbox_from_mask` (acvl_utils): half-open bbox per axis; an empty mask keeps the full
/// extent, exactly like nnU-Net.
pub fn bbox_of_mask(mask: ArrayView3<bool>) -> [[usize; 2]; 3] {
    let (nz, ny, nx) = mask.dim();
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    let mut any = false;
    for (z, plane) in mask.axis_iter(Axis(0)).enumerate() {
        for (y, line) in plane.axis_iter(Axis(0)).enumerate() {
            let first = line.iter().position(|&m| m);
            if let Some(first) = first {
                let last = line.iter().rposition(|&m| m).unwrap_or(first);
                any = true;
                lo[0] = lo[0].min(z);
                hi[0] = hi[0].max(z + 1);
                lo[1] = lo[1].min(y);
                hi[1] = hi[1].max(y + 1);
                lo[2] = lo[2].min(first);
                hi[2] = hi[2].max(last + 1);
            }
        }
    }
    if !any {
        return [[0, nz], [0, ny], [0, nx]];
    }
    [[lo[0], hi[0]], [lo[1], hi[1]], [lo[2], hi[2]]]
}

/// nnU-Net's `crop_to_nonzero(data, seg, nonzero_label=-1)`.
///
/// The outputs are in standard layout; only the cropped region is copied. The seg must have
/// shape `(1, z, y, x)` with the data's spatial shape; a mismatching seg is ignored (a seg is
/// generated from the mask as if none had been given). Use [`crop_to_nonzero_checked`] to get
/// an error instead, and to pass views of any layout (e.g. transposed).
pub fn crop_to_nonzero(data: &Array4<f32>, seg: Option<&Array4<i16>>) -> Cropped {
    let seg = seg
        .map(|s| s.view())
        .filter(|s| s.dim().0 == 1 && s.shape()[1..] == data.shape()[1..]);
    crop_impl(data.view(), seg)
}

/// Error of [`crop_to_nonzero_checked`]: the segmentation's spatial shape differs from the
/// data's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("segmentation shape {seg:?} does not match image shape {data:?} (expected (1, z, y, x))")]
pub struct SegShapeMismatch {
    /// Data shape `(c, z, y, x)`.
    pub data: Vec<usize>,
    /// Segmentation shape.
    pub seg: Vec<usize>,
}

/// [`crop_to_nonzero`] on views of any memory layout, reporting a seg/data shape mismatch.
pub fn crop_to_nonzero_checked(
    data: ArrayView4<f32>,
    seg: Option<ArrayView4<i16>>,
) -> Result<Cropped, SegShapeMismatch> {
    if let Some(s) = &seg {
        if s.dim().0 != 1 || s.shape()[1..] != data.shape()[1..] {
            return Err(SegShapeMismatch {
                data: data.shape().to_vec(),
                seg: s.shape().to_vec(),
            });
        }
    }
    Ok(crop_impl(data, seg))
}

/// Shapes already checked.
fn crop_impl(data: ArrayView4<f32>, seg: Option<ArrayView4<i16>>) -> Cropped {
    let mask = nonzero_mask(data);
    let bbox = bbox_of_mask(mask.view());
    let [[z0, z1], [y0, y1], [x0, x1]] = bbox;
    let cropped_data = data
        .slice(s![.., z0..z1, y0..y1, x0..x1])
        .as_standard_layout()
        .into_owned();
    let mask_c = mask.slice(s![z0..z1, y0..y1, x0..x1]);
    let cropped_seg = match seg {
        Some(seg) => {
            let mut out = seg
                .slice(s![.., z0..z1, y0..y1, x0..x1])
                .as_standard_layout()
                .into_owned();
            Zip::from(out.index_axis_mut(Axis(0), 0))
                .and(&mask_c)
                .for_each(|v, &m| {
                    if *v == 0 && !m {
                        *v = NONZERO_LABEL;
                    }
                });
            out
        }
        None => {
            let plane = mask_c.mapv(|m| if m { 0i16 } else { NONZERO_LABEL });
            plane.insert_axis(Axis(0))
        }
    };
    Cropped {
        data: cropped_data,
        seg: Some(cropped_seg),
        bbox,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    fn sphere_shell(n: usize, r_in: f64, r_out: f64) -> Array4<f32> {
        let c = (n as f64 - 1.0) / 2.0;
        Array4::from_shape_fn((1, n, n, n), |(_, z, y, x)| {
            let d =
                ((z as f64 - c).powi(2) + (y as f64 - c).powi(2) + (x as f64 - c).powi(2)).sqrt();
            if d >= r_in && d <= r_out {
                5.0
            } else {
                0.0
            }
        })
    }

    #[test]
    fn hollow_sphere_is_filled_and_cropped() {
        let data = sphere_shell(15, 3.0, 5.0);
        let mask = nonzero_mask(data.view());
        // Centre was a hole (0 in data) but is enclosed, hence filled.
        assert!(mask[[7, 7, 7]]);
        assert_eq!(data[[0, 7, 7, 7]], 0.0);
        // Corners are outside.
        assert!(!mask[[0, 0, 0]]);
        let c = crop_to_nonzero(&data, None);
        assert_eq!(c.bbox, [[2, 13], [2, 13], [2, 13]]);
        assert_eq!(c.data.dim(), (1, 11, 11, 11));
        let seg = c.seg.unwrap();
        // Centre of the crop is inside the filled mask: 0, corners -1.
        assert_eq!(seg[[0, 5, 5, 5]], 0);
        assert_eq!(seg[[0, 0, 0, 0]], -1);
    }

    #[test]
    fn hole_touching_border_is_not_filled() {
        // A tube along z: ring in every slice, the inside touches the z-borders.
        let n = 9;
        let data = Array4::from_shape_fn((1, n, n, n), |(_, _, y, x)| {
            let ring = (y == 2 || y == 6) && (2..=6).contains(&x)
                || (x == 2 || x == 6) && (2..=6).contains(&y);
            if ring {
                1.0
            } else {
                0.0
            }
        });
        let mask = nonzero_mask(data.view());
        assert!(
            !mask[[4, 4, 4]],
            "tube interior is connected to the z border"
        );
        assert!(mask[[4, 2, 4]]);
        // Closing the tube at both ends makes the interior a hole.
        let mut closed = data.clone();
        for z in [1usize, 7] {
            for y in 2..=6 {
                for x in 2..=6 {
                    closed[[0, z, y, x]] = 1.0;
                }
            }
        }
        let mask = nonzero_mask(closed.view());
        assert!(mask[[4, 4, 4]]);
        assert!(!mask[[0, 4, 4]]);
        assert!(!mask[[8, 4, 4]]);
    }

    #[test]
    fn six_connectivity_diagonal_leak_does_not_count() {
        // Interior voxel whose only contact to the outside is diagonal: still a hole
        // under 6-connectivity.
        let n = 5;
        let mut data = Array4::<f32>::ones((1, n, n, n));
        data[[0, 2, 2, 2]] = 0.0; // hole
        data[[0, 1, 1, 1]] = 0.0; // diagonal neighbour, itself enclosed
        data[[0, 0, 0, 0]] = 0.0; // border corner, diagonal to (1,1,1)
        let mask = nonzero_mask(data.view());
        assert!(mask[[2, 2, 2]]);
        assert!(mask[[1, 1, 1]]);
        assert!(!mask[[0, 0, 0]]);
    }

    #[test]
    fn multi_channel_or_and_seg_minus_one() {
        let mut data = Array4::<f32>::zeros((2, 4, 6, 6));
        data[[0, 1, 2, 2]] = 1.0;
        data[[1, 2, 3, 4]] = -2.0;
        let mut seg = Array4::<i16>::zeros((1, 4, 6, 6));
        seg[[0, 1, 2, 2]] = 1;
        seg[[0, 1, 3, 2]] = 0; // inside bbox, outside mask -> -1
        seg[[0, 2, 2, 4]] = 2; // labelled but outside mask: keeps its label
        let c = crop_to_nonzero(&data, Some(&seg));
        assert_eq!(c.bbox, [[1, 3], [2, 4], [2, 5]]);
        let s = c.seg.unwrap();
        assert_eq!(s.dim(), (1, 2, 2, 3));
        assert_eq!(s[[0, 0, 0, 0]], 1);
        assert_eq!(s[[0, 0, 1, 0]], -1);
        assert_eq!(s[[0, 1, 0, 2]], 2);
        assert_eq!(s[[0, 1, 1, 2]], 0); // data nonzero in channel 1
        assert_eq!(c.data[[1, 1, 1, 2]], -2.0);
    }

    #[test]
    fn all_zero_keeps_full_extent() {
        let data = Array4::<f32>::zeros((1, 3, 4, 5));
        let seg = Array4::<i16>::zeros((1, 3, 4, 5));
        let c = crop_to_nonzero(&data, Some(&seg));
        assert_eq!(c.bbox, [[0, 3], [0, 4], [0, 5]]);
        assert_eq!(c.data.dim(), (1, 3, 4, 5));
        assert!(c.seg.unwrap().iter().all(|&v| v == -1));
    }

    #[test]
    fn pseudo_2d_holes_are_not_filled() {
        // With a singleton z axis every voxel touches the border (scipy semantics).
        let mut data = Array4::<f32>::zeros((1, 1, 5, 5));
        for i in 1..4 {
            data[[0, 0, 1, i]] = 1.0;
            data[[0, 0, 3, i]] = 1.0;
            data[[0, 0, i, 1]] = 1.0;
            data[[0, 0, i, 3]] = 1.0;
        }
        let mask = nonzero_mask(data.view());
        assert!(!mask[[0, 2, 2]]);
        assert!(mask[[0, 1, 1]]);
    }

    #[test]
    fn transposed_view_input() {
        let mut data = Array4::<f32>::zeros((1, 3, 4, 5));
        data[[0, 1, 2, 3]] = 7.0;
        let t = data.view().permuted_axes([0, 3, 2, 1]);
        let c = crop_to_nonzero_checked(t, None).unwrap();
        assert_eq!(c.bbox, [[3, 4], [2, 3], [1, 2]]);
        assert!(c.data.is_standard_layout());
        assert_eq!(c.data[[0, 0, 0, 0]], 7.0);
    }

    #[test]
    fn checked_rejects_shape_mismatch() {
        let data = Array4::<f32>::zeros((1, 3, 4, 5));
        let seg = Array4::<i16>::zeros((1, 3, 4, 6));
        assert!(crop_to_nonzero_checked(data.view(), Some(seg.view())).is_err());
    }

    #[test]
    fn fill_holes_matches_bruteforce_on_random_masks() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..30 {
            let dims = (
                rng.gen_range(1..7),
                rng.gen_range(1..7),
                rng.gen_range(1..7),
            );
            let mask0 = Array3::from_shape_fn(dims, |_| rng.gen_bool(0.6));
            let mut fast = mask0.clone();
            binary_fill_holes(&mut fast);
            // Brute force: iterate "dilation from border restricted to background".
            let (nz, ny, nx) = dims;
            let mut outside = Array3::from_elem(dims, false);
            loop {
                let mut changed = false;
                for z in 0..nz {
                    for y in 0..ny {
                        for x in 0..nx {
                            if mask0[[z, y, x]] || outside[[z, y, x]] {
                                continue;
                            }
                            let border = z == 0
                                || y == 0
                                || x == 0
                                || z + 1 == nz
                                || y + 1 == ny
                                || x + 1 == nx;
                            let nb = |dz: isize, dy: isize, dx: isize| {
                                let (zz, yy, xx) =
                                    (z as isize + dz, y as isize + dy, x as isize + dx);
                                zz >= 0
                                    && yy >= 0
                                    && xx >= 0
                                    && (zz as usize) < nz
                                    && (yy as usize) < ny
                                    && (xx as usize) < nx
                                    && outside[[zz as usize, yy as usize, xx as usize]]
                            };
                            if border
                                || nb(-1, 0, 0)
                                || nb(1, 0, 0)
                                || nb(0, -1, 0)
                                || nb(0, 1, 0)
                                || nb(0, 0, -1)
                                || nb(0, 0, 1)
                            {
                                outside[[z, y, x]] = true;
                                changed = true;
                            }
                        }
                    }
                }
                if !changed {
                    break;
                }
            }
            let expected = outside.mapv(|o| !o);
            assert_eq!(fast, expected);
        }
    }
}
