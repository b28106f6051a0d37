//! Training checkpoints: one safetensors file per checkpoint holding the network weights, the
//! optimizer state and (in the safetensors header's `__metadata__`) the JSON metadata nnU-Net
//! keeps in its `.pth` dict (`current_epoch`, `logging`, `_best_ema`, `init_args`,
//! `trainer_name`, `inference_allowed_mirroring_axes`).
//!
//! One file per checkpoint makes the write atomic: it is written to a temp file in the same
//! folder and renamed, so a crash leaves either the previous checkpoint or the new one. The
//! file is created like every other output (mode 0666 minus the umask).
//!
//! Every checkpoint carries a SHA-256 of its metadata JSON and tensor data in the header
//! ([`CHECKSUM_KEY`], see [`checksum`]); [`Checkpoint::load`] recomputes it and refuses a file
//! whose bytes changed ([`CheckpointError::Checksum`]). Checkpoints written before checksums
//! existed have no such key: they load with a warning.

use crate::config::TrainerConfig;
use crate::logging::TrainingLog;
use candle_core::{Device, Tensor};
use safetensors::tensor::View;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// `format` of [`CheckpointMeta`].
pub const CHECKPOINT_FORMAT: &str = "nnseg-checkpoint-v1";
/// Header metadata key holding the JSON.
pub const METADATA_KEY: &str = "nnseg_checkpoint";
/// Header metadata key holding the hex SHA-256 of the checkpoint's content (see [`checksum`]).
pub const CHECKSUM_KEY: &str = "nnseg_sha256";
/// Tensor-name prefix of the network weights.
pub const NETWORK_PREFIX: &str = "network_weights/";
/// Tensor-name prefix of the optimizer state.
pub const OPTIMIZER_PREFIX: &str = "optimizer_state/";

/// The three checkpoints nnU-Net keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    Final,
    Latest,
    Best,
}

impl CheckpointKind {
    /// File name inside the fold folder (`checkpoint_final.safetensors`, ...).
    pub fn file_name(self) -> &'static str {
        match self {
            CheckpointKind::Final => "checkpoint_final.safetensors",
            CheckpointKind::Latest => "checkpoint_latest.safetensors",
            CheckpointKind::Best => "checkpoint_best.safetensors",
        }
    }

    /// nnU-Net's resume order for `--c`: final, then latest, then best.
    pub const RESUME_ORDER: [CheckpointKind; 3] = [
        CheckpointKind::Final,
        CheckpointKind::Latest,
        CheckpointKind::Best,
    ];
}

/// The network a checkpoint belongs to (enough to rebuild it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkMeta {
    pub network_class_name: String,
    pub arch_kwargs: serde_json::Map<String, serde_json::Value>,
    pub input_channels: usize,
    pub num_segmentation_heads: usize,
    pub enable_deep_supervision: bool,
}

/// Everything except the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// [`CHECKPOINT_FORMAT`].
    pub format: String,
    pub trainer_name: String,
    /// The epoch training resumes at (nnU-Net stores `current_epoch + 1` after an epoch).
    pub current_epoch: usize,
    pub logging: TrainingLog,
    /// Best EMA pseudo Dice so far.
    #[serde(rename = "_best_ema")]
    pub best_ema: Option<f64>,
    /// plans, configuration, fold, dataset_json, device (as nnU-Net's `init_args`).
    pub init_args: serde_json::Value,
    pub inference_allowed_mirroring_axes: Vec<usize>,
    pub trainer_config: TrainerConfig,
    pub network: NetworkMeta,
    /// Set in a `checkpoint_latest` written by a graceful stop in the middle of epoch
    /// `current_epoch` (see [`crate::train::StopFlag`]); absent at an epoch boundary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid_epoch: Option<MidEpoch>,
}

/// Where in an epoch a graceful stop left training: a resumed run continues with training
/// iteration `iterations_done` of the epoch, with the losses so far, so the epoch's log and
/// every weight come out as in an uninterrupted run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MidEpoch {
    /// Training iterations of the epoch already done (1..=num_iterations_per_epoch).
    pub iterations_done: usize,
    /// Their training losses.
    #[serde(with = "crate::logging::nan_as_null")]
    pub train_losses: Vec<f64>,
}

/// A checkpoint in memory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    /// state_dict name → tensor.
    pub network_weights: HashMap<String, Tensor>,
    /// Optimizer buffers by name (momentum buffers).
    pub optimizer_state: HashMap<String, Tensor>,
}

/// Checkpoint I/O errors; all name the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// `reading`, `writing` or `renaming to`.
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    #[error("{}: {source}", path.display())]
    Candle {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error(
        "{}: checksum mismatch, the file is corrupted (header says sha256 {expected}, \
         content hashes to {actual}); restore it from a backup or retrain",
        path.display()
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// SHA-256 (lower-case hex) of a checkpoint's content: the metadata JSON, then each tensor in
/// name order (name, dtype, shape, raw little-endian bytes), every field length-prefixed.
pub fn checksum<'a, V: View + 'a>(
    meta_json: &str,
    tensors: impl IntoIterator<Item = (&'a str, &'a V)>,
) -> String {
    fn field(h: &mut Sha256, bytes: &[u8]) {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let mut h = Sha256::new();
    field(&mut h, meta_json.as_bytes());
    for (name, t) in tensors {
        field(&mut h, name.as_bytes());
        field(&mut h, format!("{:?}", t.dtype()).as_bytes());
        h.update((t.shape().len() as u64).to_le_bytes());
        for d in t.shape() {
            h.update((*d as u64).to_le_bytes());
        }
        field(&mut h, &t.data());
    }
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// Checks the stored [`CHECKSUM_KEY`] against the file's content; a file without one (written
/// before checksums existed) is accepted with a warning.
fn verify_checksum(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let fmt = |message: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message,
    };
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| fmt(format!("not a safetensors file: {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| fmt(format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let Some(expected) = meta.get(CHECKSUM_KEY) else {
        tracing::warn!(
            "{}: checkpoint has no checksum (written before nnseg stored one); \
             its integrity cannot be verified",
            path.display()
        );
        return Ok(());
    };
    let json = meta.get(METADATA_KEY).map(String::as_str).unwrap_or("");
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let actual = checksum(json, views.iter().map(|(k, v)| (k.as_str(), v)));
    if &actual != expected {
        return Err(CheckpointError::Checksum {
            path: path.to_path_buf(),
            expected: expected.clone(),
            actual,
        });
    }
    Ok(())
}

impl Checkpoint {
    /// Writes the checkpoint atomically (temp file in the same folder + rename; the temp file
    /// is removed on failure).
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let fmt = |message: String| CheckpointError::Format {
            path: path.to_path_buf(),
            message,
        };
        let json = serde_json::to_string(&self.meta).map_err(|e| fmt(e.to_string()))?;
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for (k, t) in &self.network_weights {
            tensors.insert(format!("{NETWORK_PREFIX}{k}"), t.clone());
        }
        for (k, t) in &self.optimizer_state {
            tensors.insert(format!("{OPTIMIZER_PREFIX}{k}"), t.clone());
        }
        // safetensors needs contiguous data
        let mut contiguous = Vec::with_capacity(tensors.len());
        for (k, t) in tensors {
            let t = t.contiguous().map_err(|source| CheckpointError::Candle {
                path: path.to_path_buf(),
                source,
            })?;
            contiguous.push((k, t));
        }
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let fname = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("checkpoint");
        // named like plans::io's temp files, so a rerun removes one left by a killed run
        let tmp = dir.join(format!(".{fname}.tmp.{}.0", std::process::id()));
        let sum = checksum(&json, contiguous.iter().map(|(k, t)| (k.as_str(), t)));
        let metadata = HashMap::from([
            (METADATA_KEY.to_string(), json),
            (CHECKSUM_KEY.to_string(), sum),
        ]);
        // serialize in memory and create the file ourselves: safetensors' own writer goes
        // through a private (0600) temp file, unlike every other output
        let bytes = safetensors::serialize(contiguous, Some(metadata))
            .map_err(|e| fmt(format!("serializing: {e}")))?;
        let res = write_synced(&tmp, &bytes)
            .map_err(|source| CheckpointError::Io {
                action: "writing",
                path: tmp.clone(),
                source,
            })
            .and_then(|()| {
                std::fs::rename(&tmp, path).map_err(|source| CheckpointError::Io {
                    action: "renaming to",
                    path: path.to_path_buf(),
                    source,
                })
            });
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    /// Reads only the metadata (the header) of a checkpoint.
    pub fn load_meta(path: &Path) -> Result<CheckpointMeta, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
            action: "reading",
            path: path.to_path_buf(),
            source,
        })?;
        meta_from_bytes(path, &bytes)
    }

    /// Reads a checkpoint and verifies its checksum; tensors are placed on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
            action: "reading",
            path: path.to_path_buf(),
            source,
        })?;
        let meta = meta_from_bytes(path, &bytes)?;
        verify_checksum(path, &bytes)?;
        let all = candle_core::safetensors::load_buffer(&bytes, device).map_err(|source| {
            CheckpointError::Candle {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let mut network_weights = HashMap::new();
        let mut optimizer_state = HashMap::new();
        for (k, t) in all {
            if let Some(n) = k.strip_prefix(NETWORK_PREFIX) {
                network_weights.insert(n.to_string(), t);
            } else if let Some(n) = k.strip_prefix(OPTIMIZER_PREFIX) {
                optimizer_state.insert(n.to_string(), t);
            } else {
                return Err(CheckpointError::Format {
                    path: path.to_path_buf(),
                    message: format!("unexpected tensor `{k}`"),
                });
            }
        }
        Ok(Checkpoint {
            meta,
            network_weights,
            optimizer_state,
        })
    }
}

/// Creates `path` (mode 0666 minus the umask), writes `bytes` and syncs them to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn meta_from_bytes(path: &Path, bytes: &[u8]) -> Result<CheckpointMeta, CheckpointError> {
    let fmt = |message: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| fmt(format!("not a safetensors file: {e}")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| {
            fmt(format!(
                "no `{METADATA_KEY}` metadata: not an nnseg checkpoint"
            ))
        })?;
    let meta: CheckpointMeta =
        serde_json::from_str(json).map_err(|e| fmt(format!("invalid checkpoint metadata: {e}")))?;
    if meta.format != CHECKPOINT_FORMAT {
        return Err(fmt(format!(
            "checkpoint format `{}`, expected `{CHECKPOINT_FORMAT}`",
            meta.format
        )));
    }
    Ok(meta)
}

/// The first existing checkpoint in nnU-Net's resume order (final, latest, best); a
/// `checkpoint_latest` further than `checkpoint_final` (written while extending a finished run
/// with `--c` and a larger `--num_epochs`) comes first.
pub fn find_resume_checkpoint(fold_folder: &Path) -> Option<(CheckpointKind, PathBuf)> {
    let first = CheckpointKind::RESUME_ORDER
        .iter()
        .map(|k| (*k, fold_folder.join(k.file_name())))
        .find(|(_, p)| p.is_file())?;
    if first.0 == CheckpointKind::Final {
        let latest = fold_folder.join(CheckpointKind::Latest.file_name());
        let epoch = |p: &Path| Checkpoint::load_meta(p).ok().map(|m| m.current_epoch);
        if latest.is_file() && epoch(&latest) > epoch(&first.1) {
            return Some((CheckpointKind::Latest, latest));
        }
    }
    Some(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn sample(device: &Device) -> Checkpoint {
        let mut logging = TrainingLog {
            train_losses: vec![0.5, 0.25],
            val_losses: vec![0.6, 0.3],
            lrs: vec![0.01, 0.005],
            epoch_start_timestamps: vec![1.0, 3.0],
            epoch_end_timestamps: vec![2.0, 5.0],
            ..Default::default()
        };
        logging.push_dice(vec![0.1, f64::NAN]);
        logging.push_dice(vec![0.4, 0.2]);
        let w = Tensor::arange(0f32, 24., device)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let m = Tensor::new(&[1.5f32, -2.0], device).unwrap();
        Checkpoint {
            meta: CheckpointMeta {
                format: CHECKPOINT_FORMAT.into(),
                trainer_name: "nnUNetTrainer".into(),
                current_epoch: 2,
                logging,
                best_ema: Some(0.13),
                init_args: json!({"configuration": "3d_fullres", "fold": 0}),
                inference_allowed_mirroring_axes: vec![0, 1, 2],
                trainer_config: TrainerConfig::default(),
                mid_epoch: None,
                network: NetworkMeta {
                    network_class_name: "PlainConvUNet".into(),
                    arch_kwargs: json!({"n_stages": 3}).as_object().unwrap().clone(),
                    input_channels: 1,
                    num_segmentation_heads: 3,
                    enable_deep_supervision: true,
                },
            },
            network_weights: HashMap::from([("encoder.stages.0.w".to_string(), w)]),
            optimizer_state: HashMap::from([("encoder.stages.0.w".to_string(), m)]),
        }
    }

    #[test]
    fn round_trip_is_exact_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let ck = sample(&dev);
        let path = dir.path().join(CheckpointKind::Latest.file_name());
        ck.save(&path).unwrap();
        // overwrite in place, as every save_every epochs
        ck.save(&path).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["checkpoint_latest.safetensors".to_string()]);
        let back = Checkpoint::load(&path, &dev).unwrap();
        assert_eq!(back.meta.current_epoch, 2);
        assert_eq!(back.meta.best_ema, Some(0.13));
        assert_eq!(back.meta.logging.train_losses, vec![0.5, 0.25]);
        assert!(back.meta.logging.dice_per_class_or_region[0][1].is_nan());
        assert_eq!(back.meta.logging.ema_fg_dice, ck.meta.logging.ema_fg_dice);
        assert_eq!(back.meta.trainer_config, ck.meta.trainer_config);
        assert_eq!(back.meta.network, ck.meta.network);
        let w = back.network_weights["encoder.stages.0.w"].clone();
        assert_eq!(w.dims(), &[2, 3, 4]);
        assert_eq!(
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..24).map(|x| x as f32).collect::<Vec<_>>()
        );
        assert_eq!(
            back.optimizer_state["encoder.stages.0.w"]
                .to_vec1::<f32>()
                .unwrap(),
            vec![1.5, -2.0]
        );
        assert_eq!(
            Checkpoint::load_meta(&path).unwrap().trainer_name,
            "nnUNetTrainer"
        );
    }

    #[test]
    fn resume_order_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(find_resume_checkpoint(dir.path()).is_none());
        let ck = sample(&Device::Cpu);
        ck.save(&dir.path().join(CheckpointKind::Best.file_name()))
            .unwrap();
        assert_eq!(
            find_resume_checkpoint(dir.path()).unwrap().0,
            CheckpointKind::Best
        );
        ck.save(&dir.path().join(CheckpointKind::Latest.file_name()))
            .unwrap();
        assert_eq!(
            find_resume_checkpoint(dir.path()).unwrap().0,
            CheckpointKind::Latest
        );
        ck.save(&dir.path().join(CheckpointKind::Final.file_name()))
            .unwrap();
        assert_eq!(
            find_resume_checkpoint(dir.path()).unwrap().0,
            CheckpointKind::Final
        );
        // extending a finished run: a latest past the final one comes first
        let mut further = sample(&Device::Cpu);
        further.meta.current_epoch = 3;
        further
            .save(&dir.path().join(CheckpointKind::Latest.file_name()))
            .unwrap();
        assert_eq!(
            find_resume_checkpoint(dir.path()).unwrap().0,
            CheckpointKind::Latest
        );
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"not a checkpoint").unwrap();
        let e = Checkpoint::load(&junk, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("junk.safetensors"), "{e}");
        // a plain safetensors file without our metadata
        let plain = dir.path().join("plain.safetensors");
        candle_core::safetensors::save(&ck.network_weights, &plain).unwrap();
        let e = Checkpoint::load(&plain, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an nnseg checkpoint"), "{e}");
    }

    /// Regression (issue 19): flipped bytes in the weights used to load silently.
    #[test]
    fn flipped_weight_bytes_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CheckpointKind::Final.file_name());
        sample(&Device::Cpu).save(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        // the tensor data is the tail of the file: flip bytes in it
        let n = bytes.len();
        for b in &mut bytes[n - 20..n - 4] {
            *b ^= 0xff;
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = Checkpoint::load(&path, &Device::Cpu).unwrap_err();
        assert!(matches!(e, CheckpointError::Checksum { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("checkpoint_final.safetensors"), "{msg}");
        assert!(msg.contains("checksum mismatch"), "{msg}");
    }

    #[test]
    fn checkpoints_without_a_checksum_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let ck = sample(&Device::Cpu);
        let path = dir.path().join("old.safetensors");
        // as written before checksums: only the metadata key
        let json = serde_json::to_string(&ck.meta).unwrap();
        let tensors: Vec<(String, Tensor)> = ck
            .network_weights
            .iter()
            .map(|(k, t)| (format!("{NETWORK_PREFIX}{k}"), t.clone()))
            .collect();
        let metadata = HashMap::from([(METADATA_KEY.to_string(), json)]);
        safetensors::serialize_to_file(tensors, Some(metadata), &path).unwrap();
        let back = Checkpoint::load(&path, &Device::Cpu).unwrap();
        assert_eq!(back.meta.current_epoch, ck.meta.current_epoch);
        assert_eq!(back.meta.network, ck.meta.network);
    }

    #[test]
    fn checkpoint_files_get_the_same_mode_as_other_outputs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CheckpointKind::Latest.file_name());
        sample(&Device::Cpu).save(&path).unwrap();
        let other = dir.path().join("other.json");
        std::fs::write(&other, b"{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&other));
    }
}
