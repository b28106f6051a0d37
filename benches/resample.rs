//! Resampling throughput (output voxels per second) on a 512 x 512 x 100 CT-like volume.
//!
//! `cargo bench --bench resample`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::Array4;
use plans::ResamplingKwargs;
use preprocessing::resampling::{compute_new_shape, resample_data_to_shape, resample_seg_to_shape};

const SHAPE: [usize; 3] = [100, 512, 512];

/// Smooth structure plus deterministic noise (xorshift), roughly HU-like values.
fn make_image() -> Array4<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    Array4::from_shape_fn((1, SHAPE[0], SHAPE[1], SHAPE[2]), |(_, z, y, x)| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let (fy, fx) = (y as f32 - 256.0, x as f32 - 256.0);
        let body = if fy * fy + fx * fx < 200.0 * 200.0 {
            40.0
        } else {
            -1000.0
        };
        body + 30.0 * ((z as f32) * 0.1).sin() + 20.0 * noise
    })
}

/// Background, a large disc, a sphere and some thin structures (labels 0..=3).
fn make_seg() -> Array4<i16> {
    Array4::from_shape_fn((1, SHAPE[0], SHAPE[1], SHAPE[2]), |(_, z, y, x)| {
        let (fy, fx, fz) = (y as f32 - 256.0, x as f32 - 256.0, z as f32 * 5.0 - 250.0);
        if (fy + 56.0).powi(2) + (fx - 44.0).powi(2) + fz * fz < 60.0 * 60.0 {
            2
        } else if x % 37 == 0 && fy * fy + fx * fx < 150.0 * 150.0 {
            3
        } else if fy * fy + fx * fx < 150.0 * 150.0 {
            1
        } else {
            0
        }
    })
}

fn kwargs(is_seg: bool, order: u8, force_separate_z: Option<bool>) -> ResamplingKwargs {
    ResamplingKwargs {
        is_seg,
        order,
        order_z: 0,
        force_separate_z,
    }
}

fn target(spacing: [f64; 3], new_spacing: [f64; 3]) -> [usize; 3] {
    let s = compute_new_shape(&SHAPE, &spacing, &new_spacing);
    [s[0], s[1], s[2]]
}

/// (name, current spacing, new spacing, force_separate_z)
type Case = (&'static str, [f64; 3], [f64; 3], Option<bool>);

fn bench(c: &mut Criterion) {
    let image = make_image();
    let seg = make_seg();
    let cases: [Case; 3] = [
        // anisotropic CT: nnU-Net picks separate z; in-plane 0.7 -> 1.0, z kept
        ("sepz_inplane", [2.5, 0.7, 0.7], [2.5, 1.0, 1.0], None),
        // separate z with the low-resolution axis resampled too (nearest, order_z 0)
        ("sepz_z_too", [2.5, 0.7, 0.7], [2.0, 1.0, 1.0], None),
        // isotropic-ish: full 3-D cubic spline along all three axes
        ("3d_all_axes", [0.8, 0.7, 0.7], [1.0, 1.0, 1.0], None),
    ];
    let mut group = c.benchmark_group("resample");
    group.sample_size(10);
    for (name, cur, new, force) in cases {
        let shape = target(cur, new);
        group.throughput(Throughput::Elements(shape.iter().product::<usize>() as u64));
        let kw = kwargs(false, 3, force);
        group.bench_function(format!("data_order3_{name}"), |b| {
            b.iter(|| resample_data_to_shape(image.view(), shape, &cur, &new, &kw))
        });
        let kw = kwargs(true, 1, force);
        group.bench_function(format!("seg_order1_{name}"), |b| {
            b.iter(|| resample_seg_to_shape(seg.view(), shape, &cur, &new, &kw))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
