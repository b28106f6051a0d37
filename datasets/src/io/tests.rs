use std::fs;
use std::path::{Path, PathBuf};

use ndarray::{Array3, ArrayD, IxDyn};
use nifti::writer::WriterOptions;
use nifti::NiftiHeader;

use super::*;

fn rotated_props() -> ImageProperties {
    // rotation of 30° about z combined with a tilt about x (LPS), anisotropic spacing, offset origin
    let (s, c) = (30f64.to_radians().sin(), 30f64.to_radians().cos());
    let (st, ct) = (10f64.to_radians().sin(), 10f64.to_radians().cos());
    let rz = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
    let rx = [[1.0, 0.0, 0.0], [0.0, ct, -st], [0.0, st, ct]];
    let mut d = [0.0; 9];
    for i in 0..3 {
        for j in 0..3 {
            d[3 * i + j] = (0..3).map(|k| rz[i][k] * rx[k][j]).sum();
        }
    }
    ImageProperties {
        spacing: [3.5, 0.75, 0.6],
        origin: [-120.5, 33.25, 80.0],
        direction: d,
        reader: "SimpleITKIO".into(),
        nifti: None,
    }
}

fn test_volume(nz: usize, ny: usize, nx: usize) -> Array3<f32> {
    Array3::from_shape_fn((nz, ny, nx), |(z, y, x)| {
        (z * 10000 + y * 100 + x) as f32 * 0.5 - 7.25
    })
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{what}: {a:?} vs {b:?}");
    }
}

fn no_temp_files(dir: &Path) {
    for e in fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains("nnseg-tmp"), "temp file left behind: {n}");
    }
}

#[test]
fn nifti_round_trip_keeps_data_and_geometry() {
    let t = tempfile::tempdir().unwrap();
    for ending in [".nii", ".nii.gz"] {
        for flip in [false, true] {
            let mut props = rotated_props();
            if flip {
                // improper rotation (det = -1) exercises qfac = -1
                for r in 0..3 {
                    props.direction[3 * r + 2] *= -1.0;
                }
            }
            let img = test_volume(4, 5, 6);
            let p = t.path().join(format!("img_{flip}{ending}"));
            write_image(&p, img.view(), &props).unwrap();
            let (back, bp) = read_images(std::slice::from_ref(&p)).unwrap();
            assert_eq!(back.shape(), &[1, 4, 5, 6]);
            assert_eq!(back.index_axis(Axis(0), 0), img);
            assert_close(&bp.spacing, &props.spacing, 1e-6, "spacing");
            assert_close(&bp.origin, &props.origin, 1e-4, "origin");
            assert_close(&bp.direction, &props.direction, 1e-6, "direction");
            let g = bp.nifti.clone().unwrap();
            assert_eq!((g.sform_code, g.qform_code), (1, 1));
            assert_eq!(g.qfac, if flip { -1.0 } else { 1.0 });

            // a label written with the image's properties gets the identical header geometry
            let seg = img.mapv(|v| (v.abs() as i16) % 3);
            let sp = t.path().join(format!("seg_{flip}{ending}"));
            write_seg(&sp, seg.view(), &bp).unwrap();
            let (sback, sprops) = read_seg(&sp).unwrap();
            assert_eq!(sback.index_axis(Axis(0), 0), seg);
            assert_eq!(sprops.nifti, bp.nifti);
            assert_eq!(sprops.spacing, bp.spacing);
            assert_eq!(sprops.origin, bp.origin);
            assert_eq!(sprops.direction, bp.direction);
            let hdr = NiftiHeader::from_file(&sp).unwrap();
            assert_eq!(hdr.datatype, 2, "labels 0..2 are stored as uint8");
        }
    }
    no_temp_files(t.path());
}

#[test]
fn seg_with_large_or_negative_labels_is_int16() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("s.nii.gz");
    let mut seg = Array3::<i16>::zeros((2, 3, 4));
    seg[[1, 2, 3]] = 300;
    seg[[0, 1, 1]] = -1;
    write_seg(
        &p,
        seg.view(),
        &ImageProperties::with_spacing([2.0, 1.0, 1.0]),
    )
    .unwrap();
    assert_eq!(NiftiHeader::from_file(&p).unwrap().datatype, 4);
    let (back, props) = read_seg(&p).unwrap();
    assert_eq!(back.index_axis(Axis(0), 0), seg);
    assert_eq!(props.spacing, [2.0, 1.0, 1.0]);
    assert_close(&props.direction, &IDENTITY_DIRECTION, 1e-12, "direction");
}

/// Writes a NIfTI with the nifti crate from an (x, y, z) array, with the given header.
fn write_raw<T>(path: &Path, xyz: &ArrayD<T>, hdr: &NiftiHeader)
where
    T: nifti::DataElement + bytemuck::Pod,
{
    WriterOptions::new(path)
        .reference_header(hdr)
        .write_nifti(xyz)
        .unwrap();
}

fn xyz_data(nx: usize, ny: usize, nz: usize) -> ArrayD<f64> {
    ArrayD::from_shape_fn(IxDyn(&[nx, ny, nz]), |i| {
        (i[0] + 10 * i[1] + 100 * i[2]) as f64
    })
}

#[test]
fn reads_all_common_datatypes_in_zyx_order() {
    let t = tempfile::tempdir().unwrap();
    let base = xyz_data(4, 3, 2);
    let hdr = NiftiHeader {
        pixdim: [1.0, 0.5, 0.6, 2.5, 1.0, 1.0, 1.0, 1.0],
        ..NiftiHeader::default()
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    macro_rules! case {
        ($t:ty, $name:expr) => {{
            let p = t.path().join(format!("{}.nii.gz", $name));
            write_raw(&p, &base.mapv(|v| v as $t), &hdr);
            paths.push(p);
        }};
    }
    case!(u8, "u8");
    case!(i8, "i8");
    case!(u16, "u16");
    case!(i16, "i16");
    case!(u32, "u32");
    case!(i32, "i32");
    case!(i64, "i64");
    case!(f32, "f32");
    case!(f64, "f64");
    for p in &paths {
        let (img, props) = read_images(std::slice::from_ref(p)).unwrap();
        assert_eq!(img.shape(), &[1, 2, 3, 4], "{}", p.display());
        // voxel (x=3, y=1, z=1) of the file is array element (0, z, y, x)
        assert_eq!(img[[0, 1, 1, 3]], 113.0, "{}", p.display());
        assert_eq!(img[[0, 0, 2, 1]], 21.0, "{}", p.display());
        assert_eq!(props.spacing, [2.5, 0.6000000238418579, 0.5]);
        let (seg, _) = read_seg(p).unwrap();
        assert_eq!(seg[[0, 1, 2, 3]], 123, "{}", p.display());
    }
}

/// Patches scl_slope (offset 112) and scl_inter (116) of an uncompressed .nii in place.
fn patch_scaling(path: &Path, slope: f32, inter: f32) {
    let mut b = fs::read(path).unwrap();
    b[112..116].copy_from_slice(&slope.to_ne_bytes());
    b[116..120].copy_from_slice(&inter.to_ne_bytes());
    fs::write(path, b).unwrap();
}

#[test]
fn scl_slope_and_inter_are_applied() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("scaled.nii");
    write_raw(
        &p,
        &xyz_data(2, 2, 2).mapv(|v| v as i16),
        &NiftiHeader::default(),
    );
    patch_scaling(&p, 2.0, 1.0);
    let (img, _) = read_images(std::slice::from_ref(&p)).unwrap();
    assert_eq!(img[[0, 1, 1, 1]], 111.0 * 2.0 + 1.0);
    // scaled integer labels are checked after scaling
    let (seg, _) = read_seg(&p).unwrap();
    assert_eq!(seg[[0, 1, 0, 1]], 101 * 2 + 1);
    patch_scaling(&p, 0.5, 0.0);
    let e = read_seg(&p).unwrap_err().to_string();
    assert!(
        e.contains("scaled.nii") && e.contains("non-integer value 0.5"),
        "{e}"
    );
}

#[test]
fn geometry_from_sform_or_qform_like_simpleitk() {
    let t = tempfile::tempdir().unwrap();
    let data = xyz_data(2, 2, 2).mapv(|v| v as f32);
    // sform (code 2) wins over a different qform
    let hdr = NiftiHeader {
        sform_code: 2,
        qform_code: 1,
        pixdim: [1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0],
        srow_x: [0.0, -3.0, 0.0, 10.0],
        srow_y: [2.0, 0.0, 0.0, 20.0],
        srow_z: [0.0, 0.0, 4.0, 30.0],
        quatern_x: 99.0,
        ..NiftiHeader::default()
    };
    let p = t.path().join("sform.nii.gz");
    write_raw(&p, &data, &hdr);
    let (_, props) = read_images(std::slice::from_ref(&p)).unwrap();
    assert_eq!(props.spacing, [4.0, 3.0, 2.0]);
    assert_eq!(props.origin, [-10.0, -20.0, 30.0]);
    // LPS: x and y rows flipped; column 0 (image x) points to RAS +y = LPS -y
    assert_eq!(
        props.direction,
        [0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    );

    // qform only: 180° about z (quaternion d = 1) → RAS direction diag(-1,-1,1) → LPS identity
    let hdr = NiftiHeader {
        sform_code: 0,
        qform_code: 1,
        pixdim: [-1.0, 1.5, 1.5, 3.0, 1.0, 1.0, 1.0, 1.0],
        quatern_b: 0.0,
        quatern_c: 0.0,
        quatern_d: 1.0,
        quatern_x: 5.0,
        quatern_y: 6.0,
        quatern_z: 7.0,
        ..NiftiHeader::default()
    };
    let p = t.path().join("qform.nii");
    write_raw(&p, &data, &hdr);
    let (_, props) = read_images(std::slice::from_ref(&p)).unwrap();
    assert_eq!(props.spacing, [3.0, 1.5, 1.5]);
    assert_close(&props.origin, &[-5.0, -6.0, 7.0], 1e-12, "origin");
    // qfac = -1 flips the z column
    assert_close(
        &props.direction,
        &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0],
        1e-12,
        "direction",
    );
    // writing with these properties copies the header geometry exactly
    let zyx: Array3<f32> = data.t().to_owned().into_dimensionality().unwrap();
    let out = t.path().join("copy.nii.gz");
    write_image(&out, zyx.view(), &props).unwrap();
    let (_, back) = read_images(std::slice::from_ref(&out)).unwrap();
    assert_eq!(back.nifti, props.nifti);
    assert_eq!(back.nifti.as_ref().unwrap().sform_code, 0);

    // changed spacing (e.g. a resampled output): geometry is rebuilt from the properties
    let mut changed = props.clone();
    changed.spacing = [6.0, 3.0, 3.0];
    write_image(&out, zyx.view(), &changed).unwrap();
    let (_, back) = read_images(std::slice::from_ref(&out)).unwrap();
    assert_eq!(back.spacing, [6.0, 3.0, 3.0]);
    assert_close(&back.origin, &changed.origin, 1e-5, "origin");
    assert_close(&back.direction, &changed.direction, 1e-6, "direction");
}

#[test]
fn truncated_or_corrupt_files_error_with_the_file_name() {
    let t = tempfile::tempdir().unwrap();
    let img = test_volume(6, 20, 20);
    for ending in [".nii.gz", ".nii"] {
        let p = t.path().join(format!("full{ending}"));
        write_image(&p, img.view(), &rotated_props()).unwrap();
        let bytes = fs::read(&p).unwrap();
        let cut = t.path().join(format!("truncated_case{ending}"));
        fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = read_images(std::slice::from_ref(&cut))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&cut.display().to_string()), "{e}");
        let e = read_seg(&cut).unwrap_err().to_string();
        assert!(e.contains("truncated_case"), "{e}");
    }
    let garbage = t.path().join("garbage.nii.gz");
    fs::write(&garbage, b"definitely not gzip").unwrap();
    let e = read_images(std::slice::from_ref(&garbage))
        .unwrap_err()
        .to_string();
    assert!(e.contains("garbage.nii.gz"), "{e}");
    let missing = t.path().join("missing.nii.gz");
    let e = read_images(std::slice::from_ref(&missing))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.nii.gz"), "{e}");
}

#[test]
fn invalid_segmentations_are_rejected() {
    let t = tempfile::tempdir().unwrap();
    let mut data = xyz_data(3, 3, 3).mapv(|_| 1.0f32);
    data[[2, 1, 0]] = 1.5;
    let p = t.path().join("float_labels.nii.gz");
    write_raw(&p, &data, &NiftiHeader::default());
    let e = read_seg(&p).unwrap_err().to_string();
    assert!(e.contains("float_labels.nii.gz"), "{e}");
    assert!(e.contains("(z=0, y=1, x=2)") && e.contains("1.5"), "{e}");

    let mut big = xyz_data(3, 3, 3).mapv(|_| 0i32);
    big[[0, 0, 0]] = 40000;
    let p = t.path().join("big_labels.nii");
    write_raw(&p, &big, &NiftiHeader::default());
    let e = read_seg(&p).unwrap_err().to_string();
    assert!(
        e.contains("big_labels.nii") && e.contains("40000") && e.contains("int16"),
        "{e}"
    );

    let mut nan = xyz_data(2, 2, 2).mapv(|v| v as f32);
    nan[[1, 1, 1]] = f32::NAN;
    let p = t.path().join("nan_labels.nii.gz");
    write_raw(&p, &nan, &NiftiHeader::default());
    let e = read_seg(&p).unwrap_err().to_string();
    assert!(e.contains("nan_labels.nii.gz") && e.contains("NaN"), "{e}");
}

#[test]
fn four_d_files_are_rejected_but_singleton_t_is_fine() {
    let t = tempfile::tempdir().unwrap();
    let d4 = ArrayD::from_shape_fn(IxDyn(&[2, 2, 2, 3]), |i| i[3] as f32);
    let p = t.path().join("four_d.nii.gz");
    write_raw(&p, &d4, &NiftiHeader::default());
    let e = read_images(std::slice::from_ref(&p))
        .unwrap_err()
        .to_string();
    assert!(e.contains("four_d.nii.gz") && e.contains("_0001"), "{e}");
    let d4 = ArrayD::from_shape_fn(IxDyn(&[3, 2, 2, 1]), |i| i[0] as f32);
    let p = t.path().join("t1.nii.gz");
    write_raw(&p, &d4, &NiftiHeader::default());
    let (img, _) = read_images(std::slice::from_ref(&p)).unwrap();
    assert_eq!(img.shape(), &[1, 2, 2, 3]);
    assert_eq!(img[[0, 1, 1, 2]], 2.0);
    let d2 = ArrayD::from_shape_fn(IxDyn(&[3, 2]), |i| (i[0] + 10 * i[1]) as f32);
    let p = t.path().join("two_d.nii.gz");
    write_raw(&p, &d2, &NiftiHeader::default());
    let (img, _) = read_images(std::slice::from_ref(&p)).unwrap();
    assert_eq!(img.shape(), &[1, 1, 2, 3]);
    assert_eq!(img[[0, 0, 1, 2]], 12.0);
}

#[test]
fn read_images_stacks_channels_and_checks_geometry() {
    let t = tempfile::tempdir().unwrap();
    let props = rotated_props();
    let a = t.path().join("c_0000.nii.gz");
    let b = t.path().join("c_0001.nii.gz");
    write_image(&a, test_volume(3, 4, 5).view(), &props).unwrap();
    write_image(&b, test_volume(3, 4, 5).mapv(|v| -v).view(), &props).unwrap();
    let (img, p) = read_images(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(img.shape(), &[2, 3, 4, 5]);
    assert_eq!(img[[1, 2, 3, 4]], -img[[0, 2, 3, 4]]);
    assert_close(&p.spacing, &props.spacing, 1e-6, "spacing");

    let c = t.path().join("c_0002.nii.gz");
    write_image(&c, test_volume(3, 4, 6).view(), &props).unwrap();
    let e = read_images(&[a.clone(), c.clone()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("c_0000.nii.gz") && e.contains("c_0002.nii.gz") && e.contains("shape"),
        "{e}"
    );

    let mut other = props.clone();
    other.spacing[0] = 5.0;
    write_image(&c, test_volume(3, 4, 5).view(), &other).unwrap();
    let e = read_images(&[a.clone(), c.clone()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("spacing") && e.contains("c_0002.nii.gz"), "{e}");

    // origin differences are only warnings
    let mut moved = props.clone();
    moved.origin[0] += 1.0;
    write_image(&c, test_volume(3, 4, 5).view(), &moved).unwrap();
    let d = read_images_detailed(&[a, c]).unwrap();
    assert_eq!(d.channels_per_file, vec![1, 1]);
    assert_eq!(d.warnings.len(), 1);
    assert!(d.warnings[0].contains("origin"), "{:?}", d.warnings);
}

#[test]
fn png_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let img = Array3::from_shape_fn((1, 7, 9), |(_, y, x)| (y * 20 + x) as f32);
    let p = t.path().join("img.png");
    write_image(&p, img.view(), &ImageProperties::natural_2d()).unwrap();
    let (back, props) = read_images(std::slice::from_ref(&p)).unwrap();
    assert_eq!(back.shape(), &[1, 1, 7, 9]);
    assert_eq!(back.index_axis(Axis(0), 0), img);
    assert_eq!(props.spacing, [999.0, 1.0, 1.0]);
    assert_eq!(props.reader, "NaturalImage2DIO");

    // 8-bit and 16-bit labels
    let mut seg = Array3::<i16>::zeros((1, 5, 6));
    seg[[0, 1, 2]] = 2;
    let sp = t.path().join("seg.png");
    write_seg(&sp, seg.view(), &props).unwrap();
    assert_eq!(read_seg(&sp).unwrap().0.index_axis(Axis(0), 0), seg);
    seg[[0, 4, 5]] = 300;
    write_seg(&sp, seg.view(), &props).unwrap();
    assert_eq!(read_seg(&sp).unwrap().0.index_axis(Axis(0), 0), seg);

    // errors: negative labels, float values, 3D data
    seg[[0, 0, 0]] = -1;
    let e = write_seg(&sp, seg.view(), &props).unwrap_err().to_string();
    assert!(e.contains("seg.png") && e.contains("-1"), "{e}");
    let e = write_image(&p, img.mapv(|v| v + 0.5).view(), &props)
        .unwrap_err()
        .to_string();
    assert!(e.contains("integer"), "{e}");
    let e = write_image(&p, test_volume(2, 3, 3).view(), &props)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2D"), "{e}");
    no_temp_files(t.path());
}

fn encode_png(
    path: &Path,
    w: u32,
    h: u32,
    color: png::ColorType,
    palette: Option<Vec<u8>>,
    data: &[u8],
) {
    let f = fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    enc.set_color(color);
    enc.set_depth(png::BitDepth::Eight);
    if let Some(p) = palette {
        enc.set_palette(p);
    }
    let mut wr = enc.write_header().unwrap();
    wr.write_image_data(data).unwrap();
}

#[test]
fn png_rgb_gives_three_channels_and_palette_labels_give_indices() {
    let t = tempfile::tempdir().unwrap();
    let (w, h) = (4usize, 3usize);
    let rgb: Vec<u8> = (0..w * h)
        .flat_map(|i| [i as u8, 100 + i as u8, 200 + i as u8])
        .collect();
    let p = t.path().join("rgb.png");
    encode_png(&p, w as u32, h as u32, png::ColorType::Rgb, None, &rgb);
    let (img, _) = read_images(std::slice::from_ref(&p)).unwrap();
    assert_eq!(img.shape(), &[3, 1, 3, 4]);
    assert_eq!(img[[0, 0, 2, 1]], 9.0);
    assert_eq!(img[[1, 0, 2, 1]], 109.0);
    assert_eq!(img[[2, 0, 2, 1]], 209.0);
    let e = read_seg(&p).unwrap_err().to_string();
    assert!(e.contains("rgb.png") && e.contains("one channel"), "{e}");

    let idx: Vec<u8> = (0..w * h).map(|i| (i % 3) as u8).collect();
    let p = t.path().join("palette.png");
    encode_png(
        &p,
        w as u32,
        h as u32,
        png::ColorType::Indexed,
        Some(vec![0, 0, 0, 255, 0, 0, 0, 255, 0]),
        &idx,
    );
    let (seg, _) = read_seg(&p).unwrap();
    assert_eq!(seg.shape(), &[1, 1, 3, 4]);
    assert_eq!(seg[[0, 0, 1, 1]], 2);
    let (img, _) = read_images(std::slice::from_ref(&p)).unwrap();
    assert_eq!(img.shape(), &[3, 1, 3, 4]);
    assert_eq!(img[[0, 0, 0, 1]], 255.0);
}

#[test]
fn tiff_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let img = Array3::from_shape_fn((1, 6, 5), |(_, y, x)| y as f32 * 1.25 - x as f32);
    for ending in [".tif", ".tiff"] {
        let p = t.path().join(format!("img{ending}"));
        write_image(&p, img.view(), &ImageProperties::natural_2d()).unwrap();
        let (back, props) = read_images(std::slice::from_ref(&p)).unwrap();
        assert_eq!(back.index_axis(Axis(0), 0), img);
        assert_eq!(props.spacing, [999.0, 1.0, 1.0]);
        let mut seg = Array3::<i16>::zeros((1, 6, 5));
        seg[[0, 2, 3]] = 4;
        let sp = t.path().join(format!("seg{ending}"));
        write_seg(&sp, seg.view(), &props).unwrap();
        assert_eq!(read_seg(&sp).unwrap().0.index_axis(Axis(0), 0), seg);
        seg[[0, 0, 0]] = -5;
        write_seg(&sp, seg.view(), &props).unwrap();
        assert_eq!(read_seg(&sp).unwrap().0.index_axis(Axis(0), 0), seg);
        // float TIFF as segmentation: non-integer values are rejected
        let e = read_seg(&p).unwrap_err().to_string();
        assert!(
            e.contains(&format!("img{ending}")) && e.contains("non-integer"),
            "{e}"
        );
    }
    no_temp_files(t.path());
}

#[test]
fn unsupported_endings_and_names() {
    let p = PathBuf::from("/tmp/x.mha");
    let e = read_images(std::slice::from_ref(&p))
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.mha") && e.contains("unsupported"), "{e}");
    assert_eq!(reader_writer_name(".nii.gz"), Some("SimpleITKIO"));
    assert_eq!(reader_writer_name(".nii"), Some("NibabelIO"));
    assert_eq!(reader_writer_name("png"), Some("NaturalImage2DIO"));
    assert_eq!(reader_writer_name(".mha"), None);
    assert_eq!(
        Format::from_path(Path::new("A.NII.GZ")),
        Some(Format::NiftiGz)
    );
    assert_eq!(file_ending_of("case_1.nii.gz"), Some(".nii.gz"));
    assert_eq!(file_ending_of("case_1.NII"), Some(".NII"));
    assert_eq!(file_ending_of("a.tiff"), Some(".tiff"));
    assert_eq!(file_ending_of("a.tif"), Some(".tif"));
    assert_eq!(file_ending_of(".png"), None);
    assert_eq!(file_ending_of("summary.json"), None);
}

#[test]
fn properties_serialize_to_json_and_back() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("i.nii.gz");
    write_image(&p, test_volume(2, 2, 2).view(), &rotated_props()).unwrap();
    let (_, props) = read_images(std::slice::from_ref(&p)).unwrap();
    let s = serde_json::to_string(&props).unwrap();
    let back: ImageProperties = serde_json::from_str(&s).unwrap();
    assert_eq!(back, props);
    // properties without the nifti key (e.g. written by hand) still load
    let v = serde_json::json!({"spacing": [1.0, 2.0, 3.0], "origin": [0.0, 0.0, 0.0],
        "direction": IDENTITY_DIRECTION, "reader": "NaturalImage2DIO"});
    let p: ImageProperties = serde_json::from_value(v).unwrap();
    assert!(p.nifti.is_none());
}

/// Files written by SimpleITK 2.5 / nibabel 5.4 (sform only, qform only, qfac = -1, int16
/// with scl_slope) and what SimpleITK 2.5.7 reports for them (`testdata/simpleitk_reference.json`).
#[test]
fn matches_simpleitk_on_reference_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/testdata");
    let reference: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("simpleitk_reference.json")).unwrap())
            .unwrap();
    let reference = reference.as_object().unwrap();
    assert_eq!(reference.len(), 4);
    let vec = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    for (name, r) in reference {
        let (img, props) = read_images(&[dir.join(name)]).unwrap();
        let shape: Vec<usize> = vec(&r["shape_zyx"]).iter().map(|&v| v as usize).collect();
        assert_eq!(&img.shape()[1..], shape.as_slice(), "{name}");
        assert_eq!(props.spacing.to_vec(), vec(&r["spacing_zyx"]), "{name}");
        assert_close(&props.origin, &vec(&r["origin"]), 1e-9, name);
        assert_close(&props.direction, &vec(&r["direction"]), 1e-7, name);
        assert_eq!(
            img[[0, 1, 2, 3]] as f64,
            r["v_1_2_3"].as_f64().unwrap(),
            "{name}"
        );
        let last = img[[0, shape[0] - 1, shape[1] - 1, shape[2] - 1]] as f64;
        assert_eq!(last, r["v_last"].as_f64().unwrap(), "{name}");
        let sum: f64 = img.iter().map(|&v| v as f64).sum();
        assert!(
            (sum - r["sum"].as_f64().unwrap()).abs() < 1e-6,
            "{name}: {sum}"
        );

        // a label written with these properties has the image's exact header geometry
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join(name);
        let seg = img.index_axis(Axis(0), 0).mapv(|v| (v.abs() as i16) % 3);
        write_seg(&out, seg.view(), &props).unwrap();
        let (back, sprops) = read_seg(&out).unwrap();
        assert_eq!(back.index_axis(Axis(0), 0), seg);
        assert_eq!(sprops.nifti, props.nifti, "{name}");
        assert_eq!(
            (sprops.origin, sprops.direction),
            (props.origin, props.direction),
            "{name}"
        );
    }
}
