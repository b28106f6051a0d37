//! NIfTI geometry: quaternion <-> matrix conversions (the formulas of `nifti1_io.c`
//! `nifti_quatern_to_mat44` / `nifti_mat44_to_quatern`) and the conversion of a NIfTI (RAS)
//! affine to the LPS origin/direction that SimpleITK reports.

/// 3x4 affine `[R | t]` in NIfTI (RAS+) world coordinates; columns are the voxel axes i, j, k
/// (= x, y, z of the file).
pub(crate) type Affine = [[f64; 4]; 3];

/// `nifti_quatern_to_mat44`: affine from quaternion parameters, offsets, voxel sizes and qfac.
pub(crate) fn quatern_to_affine(
    bcd: [f64; 3],
    offset: [f64; 3],
    pixdim: [f64; 3],
    qfac: f64,
) -> Affine {
    let [mut b, mut c, mut d] = bcd;
    let mut a = 1.0 - (b * b + c * c + d * d);
    if a < 1.0e-7 {
        // special case: a == 0, the quaternion is re-normalised
        a = 1.0 / (b * b + c * c + d * d).sqrt();
        b *= a;
        c *= a;
        d *= a;
        a = 0.0;
    } else {
        a = a.sqrt();
    }
    let xd = if pixdim[0] > 0.0 { pixdim[0] } else { 1.0 };
    let yd = if pixdim[1] > 0.0 { pixdim[1] } else { 1.0 };
    let mut zd = if pixdim[2] > 0.0 { pixdim[2] } else { 1.0 };
    if qfac < 0.0 {
        zd = -zd;
    }
    [
        [
            (a * a + b * b - c * c - d * d) * xd,
            2.0 * (b * c - a * d) * yd,
            2.0 * (b * d + a * c) * zd,
            offset[0],
        ],
        [
            2.0 * (b * c + a * d) * xd,
            (a * a + c * c - b * b - d * d) * yd,
            2.0 * (c * d - a * b) * zd,
            offset[1],
        ],
        [
            2.0 * (b * d - a * c) * xd,
            2.0 * (c * d + a * b) * yd,
            (a * a + d * d - c * c - b * b) * zd,
            offset[2],
        ],
    ]
}

/// Quaternion representation of an affine: (b, c, d), offsets and qfac (the voxel sizes are
/// the column norms of the affine).
pub(crate) struct Quatern {
    pub bcd: [f64; 3],
    pub offset: [f64; 3],
    pub qfac: f64,
}

/// `nifti_mat44_to_quatern` for an affine whose 3x3 part is (close to) orthogonal up to column
/// scaling. Columns are normalised and orthogonalised (Gram-Schmidt) before the conversion.
pub(crate) fn affine_to_quatern(m: &Affine) -> Quatern {
    let mut cols = [[0.0f64; 3]; 3];
    for j in 0..3 {
        let v = [m[0][j], m[1][j], m[2][j]];
        let n = norm(v);
        if n > 0.0 && n.is_finite() {
            cols[j] = [v[0] / n, v[1] / n, v[2] / n];
        } else {
            cols[j] = [0.0; 3];
            cols[j][j] = 1.0;
        }
    }
    let cols = orthonormalize(cols);
    // r[row][col]
    let mut r = [[0.0f64; 3]; 3];
    for (j, col) in cols.iter().enumerate() {
        for i in 0..3 {
            r[i][j] = col[i];
        }
    }
    let det = det3(&r);
    let qfac = if det > 0.0 {
        1.0
    } else {
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
        -1.0
    };
    let (r11, r12, r13) = (r[0][0], r[0][1], r[0][2]);
    let (r21, r22, r23) = (r[1][0], r[1][1], r[1][2]);
    let (r31, r32, r33) = (r[2][0], r[2][1], r[2][2]);
    let mut a = r11 + r22 + r33 + 1.0;
    let (mut b, mut c, mut d);
    if a > 0.5 {
        a = 0.5 * a.sqrt();
        b = 0.25 * (r32 - r23) / a;
        c = 0.25 * (r13 - r31) / a;
        d = 0.25 * (r21 - r12) / a;
    } else {
        let xd = 1.0 + r11 - (r22 + r33);
        let yd = 1.0 + r22 - (r11 + r33);
        let zd = 1.0 + r33 - (r11 + r22);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r12 + r21) / b;
            d = 0.25 * (r13 + r31) / b;
            a = 0.25 * (r32 - r23) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r12 + r21) / c;
            d = 0.25 * (r23 + r32) / c;
            a = 0.25 * (r13 - r31) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r13 + r31) / d;
            c = 0.25 * (r23 + r32) / d;
            a = 0.25 * (r21 - r12) / d;
        }
        if a < 0.0 {
            b = -b;
            c = -c;
            d = -d;
        }
    }
    Quatern {
        bcd: [b, c, d],
        offset: [m[0][3], m[1][3], m[2][3]],
        qfac,
    }
}

fn norm(v: [f64; 3]) -> f64 {
    (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt()
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn orthonormalize(cols: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut out = cols;
    for j in 0..3 {
        let mut v = cols[j];
        for prev in out.iter().take(j) {
            let p = dot(v, *prev);
            for i in 0..3 {
                v[i] -= p * prev[i];
            }
        }
        let n = norm(v);
        if n > 1e-12 {
            out[j] = [v[0] / n, v[1] / n, v[2] / n];
        } else {
            out[j] = cols[j];
        }
    }
    out
}

pub(crate) fn det3(r: &[[f64; 3]; 3]) -> f64 {
    r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0])
}

/// Origin (LPS, x/y/z) and direction (LPS, row-major, columns = image axes x, y, z) of a RAS
/// affine, as SimpleITK reports them.
pub(crate) fn affine_to_lps(m: &Affine) -> ([f64; 3], [f64; 9]) {
    let flip = [-1.0, -1.0, 1.0];
    let origin = [flip[0] * m[0][3], flip[1] * m[1][3], flip[2] * m[2][3]];
    let mut direction = [0.0f64; 9];
    for c in 0..3 {
        let n = norm([m[0][c], m[1][c], m[2][c]]);
        let n = if n > 0.0 && n.is_finite() { n } else { 1.0 };
        for r in 0..3 {
            direction[3 * r + c] = flip[r] * m[r][c] / n;
        }
    }
    (origin, direction)
}

/// RAS affine from spacing (x, y, z order), LPS origin and LPS direction.
pub(crate) fn lps_to_affine(
    spacing_xyz: [f64; 3],
    origin: [f64; 3],
    direction: [f64; 9],
) -> Affine {
    let flip = [-1.0, -1.0, 1.0];
    let mut m = [[0.0f64; 4]; 3];
    for r in 0..3 {
        for c in 0..3 {
            m[r][c] = flip[r] * direction[3 * r + c] * spacing_xyz[c];
        }
        m[r][3] = flip[r] * origin[r];
    }
    m
}

/// `numpy.allclose(a, b)` with explicit tolerances: `|a - b| <= atol + rtol * |b|`.
pub(crate) fn allclose(a: &[f64], b: &[f64], rtol: f64, atol: f64) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= atol + rtol * y.abs() || (x.is_nan() && y.is_nan()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rot_z(theta: f64) -> [[f64; 3]; 3] {
        let (s, c) = theta.sin_cos();
        [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    }

    #[test]
    fn quaternion_round_trip_proper_and_improper_rotations() {
        for (theta, flip_z) in [
            (0.3, false),
            (2.9, false),
            (1.1, true),
            (0.0, true),
            (std::f64::consts::PI, false),
            (3.0, true),
        ] {
            let r = rot_z(theta);
            let sp = [0.7, 0.8, 3.0];
            let mut m: Affine = [[0.0; 4]; 3];
            for i in 0..3 {
                for j in 0..3 {
                    let s = if j == 2 && flip_z { -1.0 } else { 1.0 };
                    m[i][j] = r[i][j] * sp[j] * s;
                }
            }
            m[0][3] = 10.0;
            m[1][3] = -20.0;
            m[2][3] = 5.5;
            let q = affine_to_quatern(&m);
            assert_eq!(q.qfac, if flip_z { -1.0 } else { 1.0 });
            let back = quatern_to_affine(q.bcd, q.offset, sp, q.qfac);
            for i in 0..3 {
                for j in 0..4 {
                    assert!(
                        (back[i][j] - m[i][j]).abs() < 1e-9,
                        "theta {theta}: {back:?} vs {m:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn lps_conversion_round_trip() {
        let dir = [0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        let m = lps_to_affine([0.5, 0.6, 2.0], [1.0, 2.0, 3.0], dir);
        assert_eq!(m[0][3], -1.0);
        assert_eq!(m[1][3], -2.0);
        let (o, d) = affine_to_lps(&m);
        assert_eq!(o, [1.0, 2.0, 3.0]);
        for k in 0..9 {
            assert!((d[k] - dir[k]).abs() < 1e-12);
        }
    }

    #[test]
    fn allclose_matches_numpy_semantics() {
        assert!(allclose(&[1.0, 2.0], &[1.0 + 1e-9, 2.0], 1e-5, 1e-8));
        assert!(!allclose(&[1.0, 2.0], &[1.001, 2.0], 1e-5, 1e-8));
        assert!(!allclose(&[1.0], &[1.0, 2.0], 1e-5, 1e-8));
    }
}
