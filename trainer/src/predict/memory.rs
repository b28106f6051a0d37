//! The memory model of `predict`: the peak host memory one case needs, part by part, and the
//! check of that peak against the memory the machine has free before the case starts.
//!
//! With `P` the voxels of the case in the network's geometry (after resampling; `P'` padded to
//! at least one patch), `T` its voxels in the cropped original geometry, `O` before cropping,
//! `C` input channels, `K` network outputs, `B` network inputs per forward pass, `G` tiles
//! gathered at once (`max(1, B / M)`, `M` views per tile: 1 + mirror combinations), `V` patch
//! voxels, `s` bytes per stored sum (2 for `--accumulate f16`, 4 for `f32`):
//!
//! | part | bytes |
//! |---|---|
//! | runtime: code, thread stacks, allocator caches, weights of small networks | 120 MB |
//! | image (and its padded copy when smaller than a patch) | `4·C·P` (+ `4·C·P'`) |
//! | sliding-window sums + weight map | `s·K·P' + 4·P'` |
//! | logits of the case (further folds are added into them straight from their sums) | `4·K·P` |
//! | forward passes: a batch's tiles with their `M` views, their TTA sums, one pass's outputs and activations | `4·V·(G·M·C + G·K + B·K) + B·V·a` |
//! | export: one resampled class, its argmax, the segmentation | `4·T·3 + 2·T + 4·O` |
//! | export with `--save_probabilities`: all classes, uncropped, transposed | `4·K·T + 8·K·O` |
//! | pipeline queues: `-npp` images waiting, `-nps` logits waiting | `4·npp·C·P + 4·nps·K·P` |
//!
//! `a` is the network's activation bytes per input voxel, from the configuration's
//! `features_per_stage` and `strides` ([`activation_bytes_per_voxel`]). Queued cases are
//! assumed to be as large as this one. The model errs on the high side: it adds parts that are
//! alive at different moments (the export of one case overlaps the prediction of the next).

use super::sliding::SlidingWindowOptions;

/// The process itself: code, Candle and thread stacks, the allocator's caches and the weights
/// of small networks (measured: 140 MB peak for predicting the 8×32×32 fixture model).
pub const RUNTIME_BYTES: u64 = 120_000_000;

/// The geometry of one case as the memory model needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CaseGeometry {
    pub channels: usize,
    /// Spatial shape in the network's geometry (the preprocessed image).
    pub network: [usize; 3],
    /// Spatial shape after cropping, before resampling (what the export resamples back to).
    pub cropped: [usize; 3],
    /// Spatial shape before cropping (the written segmentation).
    pub original: [usize; 3],
}

/// Settings of the run that change the peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunShape {
    pub save_probabilities: bool,
    /// `-npp`: preprocessed images that may wait for the network.
    pub queued_images: usize,
    /// `-nps`: logits that may wait for their export.
    pub queued_logits: usize,
    /// Activation bytes per input voxel of one forward pass.
    pub activation_bytes_per_voxel: f64,
}

/// The peak estimate of one case, part by part (bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    pub parts: Vec<(&'static str, u64)>,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.parts.iter().map(|(_, b)| b).sum()
    }

    /// One line: the total and each part, in MB.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .filter(|(_, b)| *b > 0)
            .map(|(n, b)| format!("{n} {}", mb(*b)))
            .collect();
        format!("{} ({})", mb(self.total()), parts.join(", "))
    }
}

/// `bytes` as "123 MB".
pub fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

fn vox(s: [usize; 3]) -> f64 {
    s.iter().map(|&v| v as f64).product()
}

/// The peak host memory of predicting and exporting `case` (see the module docs).
pub fn estimate(
    case: &CaseGeometry,
    opts: &SlidingWindowOptions,
    run: &RunShape,
) -> MemoryEstimate {
    let (c, k) = (case.channels as f64, opts.num_classes as f64);
    let p = vox(case.network);
    let ext = tile_extent(&opts.patch_size);
    let padded: [usize; 3] = std::array::from_fn(|a| case.network[a].max(ext[a]));
    let pp = vox(padded);
    let v = vox(ext);
    let (t, o) = (vox(case.cropped), vox(case.original));
    let s = opts.accumulation.sum_bytes() as f64;
    let b = super::sliding::batch_inputs(opts) as f64;
    let tiles = super::sliding::tiles_per_batch(opts) as f64;
    let views = super::sliding::mirror_combinations(opts.mirror_axes.as_deref().unwrap_or(&[]))
        .len() as f64
        + 1.0;
    let pad_copy = if padded != case.network {
        4.0 * c * pp
    } else {
        0.0
    };
    let export = if run.save_probabilities {
        4.0 * k * t + 8.0 * k * o
    } else {
        12.0 * t + 2.0 * t + 4.0 * o
    };
    let parts = [
        ("runtime", RUNTIME_BYTES as f64),
        ("image", 4.0 * c * p + pad_copy),
        ("sums", s * k * pp + 4.0 * pp),
        ("logits", 4.0 * k * p),
        (
            "forward pass",
            4.0 * v * (tiles * views * c + tiles * k + b * k)
                + b * v * run.activation_bytes_per_voxel,
        ),
        ("export", export),
        (
            "queues",
            4.0 * run.queued_images as f64 * c * p + 4.0 * run.queued_logits as f64 * k * p,
        ),
    ];
    MemoryEstimate {
        parts: parts.iter().map(|&(n, b)| (n, b.ceil() as u64)).collect(),
    }
}

fn tile_extent(patch: &[usize]) -> [usize; 3] {
    match patch {
        [y, x] => [1, *y, *x],
        [z, y, x] => [*z, *y, *x],
        _ => [1, 1, 1],
    }
}

/// Activation bytes per input voxel of one inference forward pass of a U-Net with
/// `features_per_stage` and `strides` from a configuration's `arch_kwargs`: every stage's
/// skip tensor stays alive for the decoder (`Σ F_s / r_s`, `r_s` the downsampling factor of
/// stage `s`), each stage has about two more tensors of its size in flight, and the first
/// stage's convolution input, im2col workspace, output, norm and nonlinearity, and the
/// decoder's concatenation (two stages' features) and output meet at full resolution (`8·F_0`,
/// calibrated against the peak RSS of a 64×128×128 patch with 8..128 features); f32.
/// Networks without those keys get the values of nnU-Net's default 3D plan (32..320 features,
/// six stages of stride 2).
pub fn activation_bytes_per_voxel(
    kw: &serde_json::Map<String, serde_json::Value>,
    spatial_dims: usize,
) -> f64 {
    let features: Option<Vec<f64>> = kw
        .get("features_per_stage")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|f| f.as_f64()).collect());
    let factors: Option<Vec<f64>> = kw.get("strides").and_then(|v| v.as_array()).map(|a| {
        a.iter()
            .map(|s| match s {
                serde_json::Value::Array(per_axis) => {
                    per_axis.iter().filter_map(|x| x.as_f64()).product()
                }
                other => other.as_f64().unwrap_or(1.0).powi(spatial_dims as i32),
            })
            .collect()
    });
    let (features, factors) = match (features, factors) {
        (Some(f), Some(s)) if !f.is_empty() && f.len() == s.len() => (f, s),
        _ => (
            vec![32.0, 64.0, 128.0, 256.0, 320.0, 320.0],
            vec![1.0, 8.0, 8.0, 8.0, 8.0, 8.0],
        ),
    };
    let mut r = 1.0;
    let mut per_stage = 0.0;
    for (f, s) in features.iter().zip(&factors) {
        r *= s.max(1.0);
        per_stage += f / r;
    }
    4.0 * (3.0 * per_stage + 8.0 * features[0])
}

/// Memory the machine can still give this process, in bytes: `MemAvailable` of
/// `/proc/meminfo`, capped by the cgroup's `memory.max` minus its current use when one is set;
/// `None` where neither can be read.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let available = meminfo.as_deref().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let cgroup = match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => None,
    };
    match (available, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// This process's resident memory in bytes (`/proc/self/statm`), `None` where unreadable.
pub fn resident_memory() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The first of `candidates` (settings to try, in order of preference, with their estimates)
/// whose estimate fits into `budget` bytes: its index and settings. `Err` with the smallest
/// estimate when none fits.
pub fn first_fitting<T>(
    candidates: Vec<(T, MemoryEstimate)>,
    budget: u64,
) -> Result<(usize, T, MemoryEstimate), MemoryEstimate> {
    let mut smallest: Option<MemoryEstimate> = None;
    for (i, (settings, est)) in candidates.into_iter().enumerate() {
        if est.total() <= budget {
            return Ok((i, settings, est));
        }
        if smallest.as_ref().is_none_or(|s| est.total() < s.total()) {
            smallest = Some(est);
        }
    }
    Err(smallest.unwrap_or(MemoryEstimate { parts: vec![] }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::sliding::Accumulation;

    fn opts(acc: Accumulation) -> SlidingWindowOptions {
        let mut o = SlidingWindowOptions::new(&[64, 128, 128], 5);
        o.accumulation = acc;
        o
    }

    fn run() -> RunShape {
        RunShape {
            save_probabilities: false,
            queued_images: 0,
            queued_logits: 0,
            activation_bytes_per_voxel: 0.0,
        }
    }

    fn case() -> CaseGeometry {
        CaseGeometry {
            channels: 1,
            network: [128, 256, 256],
            cropped: [128, 256, 256],
            original: [128, 256, 256],
        }
    }

    fn part(e: &MemoryEstimate, name: &str) -> u64 {
        e.parts.iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn sums_take_half_the_memory_in_f16_and_the_export_does_not_grow_with_classes() {
        let p = 128 * 256 * 256u64;
        let f32 = estimate(&case(), &opts(Accumulation::F32), &run());
        let f16 = estimate(&case(), &opts(Accumulation::NnunetF16), &run());
        assert_eq!(part(&f32, "sums"), 4 * 5 * p + 4 * p);
        assert_eq!(part(&f16, "sums"), 2 * 5 * p + 4 * p);
        assert_eq!(part(&f16, "image"), 4 * p);
        assert_eq!(part(&f16, "logits"), 4 * 5 * p);
        assert_eq!(part(&f16, "export"), 18 * p);
        let mut probs = run();
        probs.save_probabilities = true;
        let e = estimate(&case(), &opts(Accumulation::NnunetF16), &probs);
        assert_eq!(part(&e, "export"), 4 * 5 * p + 8 * 5 * p);
    }

    #[test]
    fn small_cases_count_their_padded_copy_and_queues_scale() {
        let small = CaseGeometry {
            channels: 2,
            network: [1, 20, 16],
            cropped: [1, 20, 16],
            original: [1, 20, 16],
        };
        let o = SlidingWindowOptions::new(&[32, 32], 2);
        let mut r = run();
        r.queued_images = 3;
        r.queued_logits = 2;
        let e = estimate(&small, &o, &r);
        assert_eq!(part(&e, "image"), 4 * 2 * 320 + 4 * 2 * 1024);
        assert_eq!(part(&e, "queues"), 4 * 3 * 2 * 320 + 4 * 2 * 2 * 320);
    }

    #[test]
    fn the_first_fitting_candidate_wins_and_none_fitting_reports_the_smallest() {
        let o = opts(Accumulation::F32);
        let mut r = run();
        r.activation_bytes_per_voxel = 1000.0;
        let many = SlidingWindowOptions {
            batch_inputs: Some(8),
            ..o.clone()
        };
        let f16 = SlidingWindowOptions {
            accumulation: Accumulation::NnunetF16,
            ..many.clone()
        };
        let one = SlidingWindowOptions {
            batch_inputs: Some(1),
            ..f16.clone()
        };
        let cands = || {
            vec![
                ("as asked", estimate(&case(), &many, &r)),
                ("f16 sums", estimate(&case(), &f16, &r)),
                ("f16 sums, batch 1", estimate(&case(), &one, &r)),
            ]
        };
        let totals: Vec<u64> = cands().iter().map(|(_, e)| e.total()).collect();
        assert!(totals[0] > totals[1] && totals[1] > totals[2]);
        assert_eq!(first_fitting(cands(), totals[0]).unwrap().0, 0);
        assert_eq!(first_fitting(cands(), totals[0] - 1).unwrap().1, "f16 sums");
        assert_eq!(first_fitting(cands(), totals[2]).unwrap().0, 2);
        let err = first_fitting(cands(), totals[2] - 1).unwrap_err();
        assert_eq!(err.total(), totals[2]);
        assert!(err.describe().contains("sums"));
    }

    #[test]
    fn activations_follow_features_and_strides() {
        let kw = serde_json::json!({
            "n_stages": 2, "features_per_stage": [8, 16], "strides": [[1, 1, 1], [2, 2, 2]]
        });
        // stages: 8/1 + 16/8 = 10 → 4 * (3 * 10 + 8 * 8)
        let a = activation_bytes_per_voxel(kw.as_object().unwrap(), 3);
        assert_eq!(a, 4.0 * (30.0 + 64.0));
        // scalar strides apply to every axis of a 2-d patch
        let kw = serde_json::json!({"features_per_stage": [4, 8], "strides": [1, 2]});
        assert_eq!(
            activation_bytes_per_voxel(kw.as_object().unwrap(), 2),
            4.0 * (3.0 * 6.0 + 32.0)
        );
        // unknown architectures get nnU-Net's default 3D plan
        let default = activation_bytes_per_voxel(&serde_json::Map::new(), 3);
        assert!(default > 4.0 * 3.0 * 32.0 * 2.0);
    }
}
