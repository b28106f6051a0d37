//! The shared vocabulary of the networks: what a network is ([`SegNetwork`]), what it is built
//! for ([`NetworkIo`]), how a family of networks is described ([`Architecture`]) and the errors
//! ([`ArchError`]). Every family module depends on this module; [`crate::registry`] lists the
//! families and depends on them, never the other way round.
//!
//! Abilities only some networks have are not methods here: a family exposes them itself
//! (`crate::growable::as_growable`, `crate::runext::as_class_head`), found by downcasting a
//! `&dyn SegNetwork` (every network is [`Any`]).

use crate::memory::MemoryEstimate;
use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde_json::{Map, Value};
use std::any::Any;
use std::path::PathBuf;

/// JSON path of `arch_kwargs` in a configuration (the prefix of option errors).
pub const KWARGS_PATH: &str = "architecture.arch_kwargs";

/// Errors of the registry, the network constructors and the checkpoint importer.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("unknown architecture `{name}`; known: {}", known.join(", "))]
    UnknownArchitecture { name: String, known: Vec<String> },
    #[error("architecture name `{0}` is registered twice")]
    DuplicateName(String),
    #[error("{path}: {message}")]
    InvalidOption { path: String, message: String },
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plans(#[from] plans::PlansError),
    #[error("{}: missing weight `{key}` (expected shape {expected:?})", file.display())]
    MissingWeight {
        file: PathBuf,
        key: String,
        expected: Vec<usize>,
    },
    #[error("{}: weight `{key}` has shape {found:?}, the network expects {expected:?}", file.display())]
    ShapeMismatch {
        file: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{}: {} weight(s) the network does not have: {}", file.display(), keys.len(), keys.join(", "))]
    UnexpectedWeights { file: PathBuf, keys: Vec<String> },
    #[error("{}: {message}", file.display())]
    Checkpoint { file: PathBuf, message: String },
}

/// Attaches a context string to candle errors.
pub(crate) trait CandleContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ArchError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ArchError> {
        self.map_err(|source| ArchError::Candle {
            context: context(),
            source,
        })
    }
}

/// What nnU-Net passes to a network constructor besides `arch_kwargs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkIo {
    pub in_channels: usize,
    /// Number of segmentation heads (labels incl. background, or regions).
    pub num_classes: usize,
    pub deep_supervision: bool,
}

impl NetworkIo {
    /// What nnU-Net gives the network of configuration `cfg` of a dataset: the image channels
    /// (plus one per foreground label for a cascade stage) and one head per label or region.
    pub fn for_configuration(
        cfg: &plans::Configuration,
        dataset: &plans::DatasetJson,
        deep_supervision: bool,
    ) -> Self {
        NetworkIo {
            in_channels: Self::input_channels(cfg, dataset),
            num_classes: dataset.num_segmentation_heads(),
            deep_supervision,
        }
    }

    /// Number of input channels nnU-Net gives the network: the image channels, plus one per
    /// foreground label for a cascade stage (`previous_stage` set).
    pub fn input_channels(cfg: &plans::Configuration, dataset: &plans::DatasetJson) -> usize {
        let extra = if cfg.previous_stage.is_some() {
            dataset.foreground_labels().len()
        } else {
            0
        };
        dataset.num_channels() + extra
    }
}

/// One row of a layer table (see [`crate::summary`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRow {
    /// state_dict prefix of the layer (`encoder.stages.0.0.convs.0`).
    pub name: String,
    /// Human-readable description (`Conv3d 1→32 k[1,3,3] s[1,1,1] + InstanceNorm + LeakyReLU`).
    pub kind: String,
    /// Output shape without the batch axis: `(C, *spatial)`.
    pub output_shape: Vec<usize>,
    /// Parameters owned by this layer (running statistics excluded).
    pub params: u64,
    /// Number of activation tensors of `output_shape` this layer keeps for backward (conv,
    /// norm and nonlinearity outputs count separately).
    pub stored_activations: usize,
}

/// A segmentation network: input `(N, C, *spatial)` → logits.
///
/// Every network is [`Any`], so a family can offer abilities of its own networks through a
/// downcast (see the module documentation).
pub trait SegNetwork: Any + Send + Sync {
    /// Logits, full resolution first. With deep supervision off there is exactly one output;
    /// with it on, one per decoder stage (nnU-Net's order: full, 1/2, 1/4, ...). `train`
    /// switches dropout and batch-norm statistics.
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>>;
    /// Turns the extra low-resolution outputs on or off. nnU-Net's own U-Nets always build
    /// their heads; the other families build them only with deep supervision
    /// ([`NetworkIo::deep_supervision`]), so turning the outputs on works only for a network
    /// built with it (otherwise it stays off).
    fn set_deep_supervision(&mut self, on: bool);
    fn deep_supervision(&self) -> bool;
    /// Spatial dimensionality (2 or 3).
    fn spatial_dims(&self) -> usize;
    /// The layer table for one sample of spatial size `patch` (no tensors are computed).
    fn layers(&self, patch: &[usize]) -> Vec<LayerRow>;
}

/// A named set of `arch_kwargs` overrides an architecture offers as a trainer preset
/// (`-tr kiunet_minimal`): the trainer swaps the plans' network for this architecture and
/// merges `kwargs` over the plans' `arch_kwargs`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchPreset {
    pub name: String,
    pub description: String,
    pub kwargs: Map<String, Value>,
}

/// A family of networks that can be built from `arch_kwargs`.
pub trait Architecture: Send + Sync {
    /// The canonical `network_class_name` (nnU-Net's dotted Python path).
    fn name(&self) -> &str;
    /// Other accepted names (short names).
    fn aliases(&self) -> Vec<String>;
    /// Builds the network, reading (or creating) its weights through `vb`. `kwargs_path` is the
    /// JSON path of `arch_kwargs` used in error messages.
    fn build(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
        vb: VarBuilder,
    ) -> Result<Box<dyn SegNetwork>, ArchError>;
    /// nnU-Net's activation estimate (`compute_conv_feature_map_size`) for this network.
    fn estimator(
        &self,
        kwargs: &Map<String, Value>,
        kwargs_path: &str,
        io: &NetworkIo,
    ) -> Result<Box<dyn MemoryEstimate>, ArchError>;
    /// Trainer presets this architecture offers (none by default).
    fn presets(&self) -> Vec<ArchPreset> {
        vec![]
    }
}
