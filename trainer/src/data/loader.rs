//! Batch assembly and the multi-threaded background loader.
//!
//! Batch `k` is built from an RNG seeded with `(seed, k)` only, and batches are delivered in
//! order `k = 0, 1, 2, …` whatever the number of workers or their scheduling: worker `w`
//! builds `k = w, w + N, w + 2N, …` into its own bounded channel and the consumer reads the
//! channels round-robin.

use ndarray::Axis;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::augment::{augment, center_crop, make_targets, to3, AugmentationConfig};
use super::dataset::PreprocessedDataset;
use super::sampling::{force_foreground, sample_patch};
use super::{DataError, LabelInfo};

/// One batch on the host, ready to become tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// Image data, C order.
    pub data: Vec<f32>,
    /// `(B, C, *spatial)`.
    pub data_shape: Vec<usize>,
    /// One target per deep-supervision scale (full resolution first): values and shape
    /// `(B, 1 or R, *spatial_scaled)`; label values (labels) or 0/1 (regions, ignore last).
    pub targets: Vec<(Vec<f32>, Vec<usize>)>,
    /// Case identifier of every sample.
    pub keys: Vec<String>,
}

/// Loader settings (nnU-Net's defaults where it has them).
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderOptions {
    /// Final patch size (2 or 3 entries).
    pub patch_size: Vec<usize>,
    /// Samples per batch.
    pub batch_size: usize,
    /// Fraction of samples forced to contain foreground (0.33).
    pub oversample_foreground_percent: f64,
    /// Deep-supervision scales ([`super::ds_scales_from_strides`]); empty = full resolution
    /// only.
    pub ds_scales: Vec<Vec<f64>>,
    /// Seed; batch `k` depends only on `(seed, k)`.
    pub seed: u64,
    /// Index `k` of the first batch delivered (0 for a fresh run). A resumed training sets
    /// it to the number of batches the interrupted run consumed, so that the resumed stream
    /// continues the uninterrupted one exactly.
    pub first_batch: u64,
    /// Background threads (0 = build batches in the consumer's thread).
    pub num_workers: usize,
    /// Batches buffered in total (at least one per worker).
    pub queue_len: usize,
    /// Training augmentation on (enlarged patch + pipeline); off = validation loader (final
    /// patch, targets only; foreground oversampling still applies, as nnU-Net).
    pub augment: bool,
    /// Augmentation parameters; `None` = [`AugmentationConfig::nnunet_default`] for
    /// `patch_size`.
    pub augmentation: Option<AugmentationConfig>,
    /// Plans' `use_mask_for_norm` per channel (image masking after augmentation).
    pub use_mask_for_norm: Vec<bool>,
}

impl LoaderOptions {
    /// nnU-Net's defaults for a patch size and batch size.
    pub fn new(
        patch_size: Vec<usize>,
        batch_size: usize,
        ds_scales: Vec<Vec<f64>>,
        seed: u64,
    ) -> Self {
        LoaderOptions {
            patch_size,
            batch_size,
            oversample_foreground_percent: 0.33,
            ds_scales,
            seed,
            first_batch: 0,
            num_workers: 2,
            queue_len: 6,
            augment: true,
            augmentation: None,
            use_mask_for_norm: Vec::new(),
        }
    }

    /// The effective augmentation config (`None` when `augment` is off).
    pub fn augmentation_config(&self) -> Option<AugmentationConfig> {
        if !self.augment {
            return None;
        }
        let mut cfg = self
            .augmentation
            .clone()
            .unwrap_or_else(|| AugmentationConfig::nnunet_default(&self.patch_size));
        cfg.patch_size = self.patch_size.clone();
        if cfg.mask_channels.is_empty() {
            cfg.mask_channels = self
                .use_mask_for_norm
                .iter()
                .enumerate()
                .filter(|(_, m)| **m)
                .map(|(i, _)| i)
                .collect();
        }
        Some(cfg)
    }

    fn validate(&self) -> Result<(), DataError> {
        let dim = self.patch_size.len();
        if dim != 2 && dim != 3 {
            return Err(DataError::Options(format!(
                "patch_size must have 2 or 3 entries, got {:?}",
                self.patch_size
            )));
        }
        if self.patch_size.contains(&0) || self.batch_size == 0 {
            return Err(DataError::Options(format!(
                "patch_size {:?} and batch_size {} must be positive",
                self.patch_size, self.batch_size
            )));
        }
        if !(0.0..=1.0).contains(&self.oversample_foreground_percent) {
            return Err(DataError::Options(format!(
                "oversample_foreground_percent {} is not in [0, 1]",
                self.oversample_foreground_percent
            )));
        }
        if let Some(s) = self.ds_scales.iter().find(|s| s.len() != dim) {
            return Err(DataError::Options(format!(
                "deep supervision scale {s:?} does not have {dim} entries like patch_size"
            )));
        }
        Ok(())
    }
}

/// The RNG of batch `k`.
pub fn batch_rng(seed: u64, k: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(k);
    rng
}

/// Builds batch `k` (deterministic in `(opts.seed, k)`): cases drawn with replacement, the
/// last `batch_size − round(batch_size·(1 − p))` samples forced to foreground, augmented
/// (training) or not (validation), targets converted and downsampled.
pub fn build_batch(
    ds: &PreprocessedDataset,
    case_ids: &[String],
    opts: &LoaderOptions,
    aug: Option<&AugmentationConfig>,
    labels: &LabelInfo,
    k: u64,
) -> Result<HostBatch, DataError> {
    if case_ids.is_empty() {
        return Err(DataError::Options("no cases to sample from".into()));
    }
    let mut rng = batch_rng(opts.seed, k);
    let final_patch = &opts.patch_size;
    let (patch, need): (Vec<usize>, Vec<usize>) = match aug {
        Some(cfg) => {
            let init = cfg.initial_patch_size();
            let need = init
                .iter()
                .zip(final_patch)
                .map(|(i, f)| i.saturating_sub(*f))
                .collect();
            (init, need)
        }
        None => (final_patch.clone(), vec![0; final_patch.len()]),
    };
    let out3 = to3(final_patch);
    let bs = opts.batch_size;
    let mut data: Vec<f32> = Vec::new();
    let mut channels = None;
    let mut targets: Vec<(Vec<f32>, Vec<usize>)> = Vec::new();
    let mut keys = Vec::with_capacity(bs);
    for j in 0..bs {
        let key = &case_ids[rng.gen_range(0..case_ids.len())];
        let mut srng = ChaCha8Rng::seed_from_u64(rng.gen());
        let force = force_foreground(j, bs, opts.oversample_foreground_percent);
        let case = ds.case(key)?;
        let mut sample = sample_patch(key, &case, &patch, &need, force, labels, &mut srng)?;
        match aug {
            Some(cfg) => augment(&mut sample, cfg, &mut srng),
            None => center_crop(&mut sample, out3),
        }
        if let Some(mut prev) = sample.prev.take() {
            // nnU-Net's MoveSegAsOneHotToData + the two cascade corruptions (training only)
            if aug.is_some() {
                super::cascade::random_binary_operator(&mut prev, 0.4, &mut srng);
                super::cascade::remove_random_component(&mut prev, 0.2, &mut srng);
            }
            sample.data = ndarray::concatenate(Axis(0), &[sample.data.view(), prev.view()])
                .map_err(|e| DataError::BadCase {
                    case: key.clone(),
                    message: format!("previous-stage channels: {e}"),
                })?;
        }
        let c = sample.data.shape()[0];
        if *channels.get_or_insert(c) != c {
            return Err(DataError::BadCase {
                case: key.clone(),
                message: format!(
                    "has {c} channels, other cases in the batch have {}",
                    channels.unwrap_or(0)
                ),
            });
        }
        data.extend(sample.data.iter());
        let ts = make_targets(&sample.seg, labels, &opts.ds_scales);
        if targets.is_empty() {
            targets = ts
                .iter()
                .map(|t| {
                    let sh = t.shape();
                    let mut shape = vec![bs, sh[0]];
                    if final_patch.len() == 3 {
                        shape.push(sh[1]);
                    }
                    shape.extend(&sh[2..]);
                    (Vec::with_capacity(bs * t.len()), shape)
                })
                .collect();
        }
        for (dst, t) in targets.iter_mut().zip(&ts) {
            dst.0.extend(t.iter());
        }
        keys.push(key.clone());
    }
    let mut data_shape = vec![bs, channels.unwrap_or(0)];
    data_shape.extend(final_patch);
    Ok(HostBatch {
        data,
        data_shape,
        targets,
        keys,
    })
}

type Item = Result<HostBatch, DataError>;

struct Shared {
    ds: Arc<PreprocessedDataset>,
    case_ids: Vec<String>,
    opts: LoaderOptions,
    aug: Option<AugmentationConfig>,
    labels: LabelInfo,
}

impl Shared {
    fn build(&self, k: u64) -> Item {
        build_batch(
            &self.ds,
            &self.case_ids,
            &self.opts,
            self.aug.as_ref(),
            &self.labels,
            k,
        )
    }
}

/// An endless iterator of batches produced on background threads with bounded queues;
/// deterministic per seed; workers stop when the loader is dropped.
pub struct BackgroundLoader {
    shared: Arc<Shared>,
    receivers: Vec<Receiver<Item>>,
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    next: u64,
}

impl BackgroundLoader {
    /// Starts the workers. `case_ids` must all be in `ds`.
    pub fn new(
        ds: Arc<PreprocessedDataset>,
        case_ids: Vec<String>,
        opts: LoaderOptions,
        labels: LabelInfo,
    ) -> Result<Self, DataError> {
        opts.validate()?;
        if case_ids.is_empty() {
            return Err(DataError::Options("no cases to sample from".into()));
        }
        if let Some(missing) = case_ids.iter().find(|c| !ds.contains(c)) {
            return Err(DataError::MissingCase {
                case: missing.clone(),
                context: format!("loader cases, folder {}", ds.folder().display()),
            });
        }
        let aug = opts.augmentation_config();
        let n = opts.num_workers;
        let first = opts.first_batch;
        let per_worker = if n == 0 {
            0
        } else {
            opts.queue_len.div_ceil(n).max(1)
        };
        let shared = Arc::new(Shared {
            ds,
            case_ids,
            opts,
            aug,
            labels,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for w in 0..n {
            let (tx, rx) = sync_channel::<Item>(per_worker);
            let sh = shared.clone();
            let st = stop.clone();
            let h = std::thread::Builder::new()
                .name(format!("nnseg-loader-{w}"))
                .spawn(move || {
                    let mut k = first + w as u64;
                    while !st.load(Ordering::Relaxed) {
                        if tx.send(sh.build(k)).is_err() {
                            break;
                        }
                        k += n as u64;
                    }
                })
                .map_err(|e| DataError::Options(format!("cannot start loader thread: {e}")))?;
            receivers.push(rx);
            handles.push(h);
        }
        Ok(BackgroundLoader {
            shared,
            receivers,
            handles,
            stop,
            next: first,
        })
    }

    /// Index of the next batch.
    pub fn next_index(&self) -> u64 {
        self.next
    }
}

impl Iterator for BackgroundLoader {
    type Item = Item;
    fn next(&mut self) -> Option<Item> {
        let k = self.next;
        self.next += 1;
        if self.receivers.is_empty() {
            return Some(self.shared.build(k));
        }
        let w = ((k - self.shared.opts.first_batch) % self.receivers.len() as u64) as usize;
        Some(
            self.receivers[w]
                .recv()
                .map_err(|_| DataError::WorkerDied { worker: w })
                .and_then(|r| r),
        )
    }
}

impl Drop for BackgroundLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers unblocks workers waiting on a full queue.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sampling::tests::write_cases;

    fn setup(n: usize) -> (tempfile::TempDir, Arc<PreprocessedDataset>) {
        let dir = tempfile::tempdir().unwrap();
        write_cases(dir.path(), n, [6, 10, 12]);
        let ds = Arc::new(PreprocessedDataset::open(dir.path()).unwrap());
        (dir, ds)
    }

    fn opts(workers: usize) -> LoaderOptions {
        LoaderOptions {
            num_workers: workers,
            queue_len: 3,
            ..LoaderOptions::new(
                vec![4, 6, 6],
                3,
                vec![vec![1.0, 1.0, 1.0], vec![0.5, 0.5, 0.5]],
                42,
            )
        }
    }

    #[test]
    fn shapes_and_foreground_oversampling() {
        let (_d, ds) = setup(3);
        let ids = ds.case_ids().to_vec();
        let mut l = BackgroundLoader::new(ds, ids, opts(2), LabelInfo::plain(3)).unwrap();
        for _ in 0..4 {
            let b = l.next().unwrap().unwrap();
            assert_eq!(b.data_shape, vec![3, 2, 4, 6, 6]);
            assert_eq!(b.data.len(), 3 * 2 * 4 * 6 * 6);
            assert_eq!(b.targets.len(), 2);
            assert_eq!(b.targets[0].1, vec![3, 1, 4, 6, 6]);
            assert_eq!(b.targets[1].1, vec![3, 1, 2, 3, 3]);
            assert_eq!(b.targets[1].0.len(), 3 * 2 * 3 * 3);
            assert!(b.targets[0].0.iter().all(|v| (0.0..=2.0).contains(v)));
            assert_eq!(b.keys.len(), 3);
        }
        // validation loader: the last sample (j = 2 ≥ round(3·0.67) = 2) has foreground
        let (_d, ds) = setup(3);
        let ids = ds.case_ids().to_vec();
        let o = LoaderOptions {
            augment: false,
            ..opts(1)
        };
        let mut l = BackgroundLoader::new(ds, ids, o, LabelInfo::plain(3)).unwrap();
        let per = 4 * 6 * 6;
        for _ in 0..5 {
            let b = l.next().unwrap().unwrap();
            assert!(b.targets[0].0[2 * per..3 * per].iter().any(|&v| v > 0.0));
        }
    }

    #[test]
    fn deterministic_regardless_of_workers() {
        let (_d, ds) = setup(4);
        let ids = ds.case_ids().to_vec();
        let take = |w: usize| -> Vec<HostBatch> {
            BackgroundLoader::new(ds.clone(), ids.clone(), opts(w), LabelInfo::plain(3))
                .unwrap()
                .take(5)
                .map(|b| b.unwrap())
                .collect()
        };
        let a = take(0);
        assert_eq!(a, take(1));
        assert_eq!(a, take(3));
        assert_ne!(a[0], a[1]);
        let other = LoaderOptions {
            seed: 43,
            ..opts(0)
        };
        let b: Vec<HostBatch> =
            BackgroundLoader::new(ds.clone(), ids.clone(), other, LabelInfo::plain(3))
                .unwrap()
                .take(2)
                .map(|b| b.unwrap())
                .collect();
        assert_ne!(a[..2], b[..]);
    }

    #[test]
    fn first_batch_continues_the_stream() {
        let (_d, ds) = setup(4);
        let ids = ds.case_ids().to_vec();
        let all: Vec<HostBatch> =
            BackgroundLoader::new(ds.clone(), ids.clone(), opts(0), LabelInfo::plain(3))
                .unwrap()
                .take(7)
                .map(|b| b.unwrap())
                .collect();
        for workers in [0, 1, 2, 3] {
            let o = LoaderOptions {
                first_batch: 3,
                ..opts(workers)
            };
            let mut l =
                BackgroundLoader::new(ds.clone(), ids.clone(), o, LabelInfo::plain(3)).unwrap();
            assert_eq!(l.next_index(), 3);
            let rest: Vec<HostBatch> = l.by_ref().take(4).map(|b| b.unwrap()).collect();
            assert_eq!(rest[..], all[3..], "{workers} workers");
            assert_eq!(l.next_index(), 7);
        }
    }

    #[test]
    fn two_d_and_regions() {
        let (_d, ds) = setup(2);
        let ids = ds.case_ids().to_vec();
        let labels = LabelInfo {
            all_labels: vec![0, 1, 2],
            regions: Some(vec![vec![1, 2], vec![2]]),
            ignore_label: None,
        };
        let o = LoaderOptions {
            ds_scales: vec![vec![1.0, 1.0], vec![0.5, 0.5]],
            ..LoaderOptions::new(vec![8, 8], 2, vec![], 1)
        };
        let mut l = BackgroundLoader::new(ds, ids, o, labels).unwrap();
        let b = l.next().unwrap().unwrap();
        assert_eq!(b.data_shape, vec![2, 2, 8, 8]);
        assert_eq!(b.targets[0].1, vec![2, 2, 8, 8]);
        assert_eq!(b.targets[1].1, vec![2, 2, 4, 4]);
        assert!(b.targets[0].0.iter().all(|&v| v == 0.0 || v == 1.0));
    }

    #[test]
    fn errors_name_the_case() {
        let (d, ds) = setup(2);
        let err = BackgroundLoader::new(
            ds.clone(),
            vec!["case_000".into(), "ghost".into()],
            opts(1),
            LabelInfo::plain(3),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("ghost"), "{err}");
        assert!(BackgroundLoader::new(
            ds.clone(),
            vec!["case_000".into()],
            LoaderOptions::new(vec![4, 4, 4, 4], 2, vec![], 0),
            LabelInfo::plain(3)
        )
        .is_err());
        // a corrupted case surfaces as an error naming it
        std::fs::write(d.path().join("case_001.npy"), b"garbage").unwrap();
        let ds2 = Arc::new(PreprocessedDataset::open(d.path()).unwrap());
        let mut l =
            BackgroundLoader::new(ds2, vec!["case_001".into()], opts(2), LabelInfo::plain(3))
                .unwrap();
        let err = l.next().unwrap().unwrap_err();
        assert!(err.to_string().contains("case_001"), "{err}");
        drop(l); // clean shutdown with workers blocked on full queues
    }
}
