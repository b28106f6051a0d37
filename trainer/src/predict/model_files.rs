//! The weights of one fold, whichever program wrote them: nnseg's
//! `checkpoint_*.safetensors`, nnU-Net v2's `checkpoint_*.pth` (read as it is, the weights
//! mapped by `architectures::import`) or `nnseg import_nnunet_model`'s `model.safetensors` +
//! `model.json`. Which file `-chk` means is decided by
//! [`datasets::layout::checkpoint_candidates`].

use super::{load_fold_network, CandleTileNetwork, PredictError};
use crate::amp::Amp;
use crate::import::{import_nnunet_model_with, MODEL_FORMAT};
use architectures::network::NetworkIo;
use architectures::registry::Registry;
use candle_core::{DType, Device};
use datasets::layout::{checkpoint_candidates, CheckpointFile};
use datasets::ModelDir;
use plans::{ArchitectureSpec, Configuration};
use std::path::Path;

/// The first of [`checkpoint_candidates`] that exists in `fold_folder`; none is an error that
/// names every file looked for.
pub fn find_fold_checkpoint(
    fold_folder: &Path,
    checkpoint_name: &str,
) -> Result<CheckpointFile, PredictError> {
    let candidates = checkpoint_candidates(fold_folder, checkpoint_name)?;
    if let Some(found) = candidates.iter().find(|c| c.path().is_file()) {
        return Ok(found.clone());
    }
    let tried: Vec<String> = candidates
        .iter()
        .map(|c| c.path().display().to_string())
        .collect();
    let hint = if fold_folder.is_dir() {
        "use -chk to pick another checkpoint (checkpoint_best, or `model` after \
         `nnseg import_nnunet_model`)"
    } else {
        "this fold was not trained (the folder does not exist)"
    };
    Err(PredictError::Config(format!(
        "-chk {checkpoint_name}: checkpoint not found; looked for {}: {hint}",
        tried.join(", ")
    )))
}

/// A fold's network, ready for inference, with its allowed mirroring axes (empty: none).
pub struct FoldNetwork {
    pub network: CandleTileNetwork,
    pub mirror_axes: Vec<usize>,
    /// The file the weights came from.
    pub source: CheckpointFile,
}

/// What [`load_fold`] needs besides the file.
pub struct LoadFoldOptions<'a> {
    pub model: &'a ModelDir,
    pub configuration_name: &'a str,
    pub configuration: &'a Configuration,
    pub device: &'a Device,
    pub amp: Amp,
    pub registry: &'a Registry,
}

/// Loads `fold`'s `-chk checkpoint_name` (see [`find_fold_checkpoint`]) as an inference network.
pub fn load_fold(
    opts: &LoadFoldOptions<'_>,
    fold: &str,
    checkpoint_name: &str,
) -> Result<FoldNetwork, PredictError> {
    let source = find_fold_checkpoint(&opts.model.fold(fold), checkpoint_name)?;
    let (network, mirror_axes) = match &source {
        CheckpointFile::Nnseg(path) => load_fold_network(
            path,
            opts.device,
            opts.amp,
            opts.registry,
            &opts.configuration.architecture,
        )?,
        CheckpointFile::Nnunet(path) => load_pth(opts, fold, path)?,
        CheckpointFile::Imported { weights, metadata } => load_imported(opts, weights, metadata)?,
    };
    Ok(FoldNetwork {
        network,
        mirror_axes,
        source,
    })
}

fn tile_network(
    network: Box<dyn architectures::network::SegNetwork>,
    input_channels: usize,
    opts: &LoadFoldOptions<'_>,
) -> CandleTileNetwork {
    CandleTileNetwork {
        network,
        device: opts.device.clone(),
        input_channels,
        compute_dtype: opts.amp.compute_dtype(opts.device),
    }
}

/// nnU-Net's `checkpoint_*.pth`, read directly.
fn load_pth(
    opts: &LoadFoldOptions<'_>,
    fold: &str,
    path: &Path,
) -> Result<(CandleTileNetwork, Vec<usize>), PredictError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| PredictError::Config(format!("{}: not a file name", path.display())))?;
    let imported = import_nnunet_model_with(
        opts.registry,
        opts.model.path(),
        fold,
        file_name,
        Some(opts.configuration_name),
    )?;
    let network = imported
        .build_network(opts.registry, false, opts.device)
        .map_err(|e| {
            PredictError::Config(format!(
                "{}: building the network from the checkpoint failed: {e}",
                path.display()
            ))
        })?;
    let axes = imported.mirror_axes.clone().unwrap_or_default();
    Ok((tile_network(network, imported.io.in_channels, opts), axes))
}

/// The fields of `model.json` (see `ImportedModel::metadata`) inference needs.
#[derive(serde::Deserialize)]
struct ImportedMeta {
    format: String,
    network_class_name: String,
    arch_kwargs: serde_json::Map<String, serde_json::Value>,
    #[serde(rename = "_kw_requires_import", default)]
    kw_requires_import: Vec<String>,
    input_channels: usize,
    num_segmentation_heads: usize,
    /// Absent (older imports) vs `null` (no mirroring).
    #[serde(default, deserialize_with = "present")]
    inference_allowed_mirroring_axes: Option<Option<Vec<usize>>>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<Vec<usize>>>, D::Error> {
    use serde::Deserialize;
    Option::<Vec<usize>>::deserialize(d).map(Some)
}

/// `model.safetensors` + `model.json` from `nnseg import_nnunet_model`.
fn load_imported(
    opts: &LoadFoldOptions<'_>,
    weights: &Path,
    metadata: &Path,
) -> Result<(CandleTileNetwork, Vec<usize>), PredictError> {
    let bad = |message: String| PredictError::Config(format!("{}: {message}", metadata.display()));
    let text = std::fs::read_to_string(metadata).map_err(super::io_err("reading", metadata))?;
    let meta: ImportedMeta = serde_json::from_str(&text)
        .map_err(|e| bad(format!("not an imported model's metadata: {e}")))?;
    if meta.format != MODEL_FORMAT {
        return Err(bad(format!(
            "`format` is \"{}\", expected \"{MODEL_FORMAT}\" (written by nnseg import_nnunet_model)",
            meta.format
        )));
    }
    let spec = ArchitectureSpec {
        network_class_name: meta.network_class_name,
        arch_kwargs: meta.arch_kwargs,
        kw_requires_import: meta.kw_requires_import,
    };
    let io = NetworkIo {
        in_channels: meta.input_channels,
        num_classes: meta.num_segmentation_heads,
        deep_supervision: false,
    };
    let axes: Vec<usize> = match meta.inference_allowed_mirroring_axes {
        Some(axes) => axes.unwrap_or_default(),
        None => {
            let all: Vec<usize> = (0..opts.configuration.patch_size.len()).collect();
            tracing::warn!(
                "{}: no `inference_allowed_mirroring_axes` (imported by an older nnseg); \
                 mirroring along all axes {all:?}, as nnU-Net's default trainer allows",
                metadata.display()
            );
            all
        }
    };
    let tensors = candle_core::safetensors::load(weights, opts.device).map_err(|source| {
        PredictError::Candle {
            context: format!("reading {}", weights.display()),
            source,
        }
    })?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, opts.device);
    let mut network = opts.registry.build(&spec, &io, vb).map_err(|e| {
        PredictError::Config(format!(
            "{}: building the network from the imported weights failed: {e}",
            weights.display()
        ))
    })?;
    network.set_deep_supervision(false);
    Ok((tile_network(network, io.in_channels, opts), axes))
}
