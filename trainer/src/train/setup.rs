//! What a training run reads before it writes anything: the plans' configuration, the
//! dataset description and the network to train (an unknown network or a bad plan fails here,
//! before any folder is created).

use super::{TrainError, TrainRequest};
use crate::data::{self, LabelInfo};
use architectures::network::NetworkIo;
use architectures::unet::options::UNetKwargs;
use std::path::PathBuf;

/// Everything set up before the session opens.
pub(super) struct Setup {
    /// `{plans_name}.json` in the preprocessed folder.
    pub plans_file: PathBuf,
    pub plans: plans::Plans,
    pub cfg: plans::Configuration,
    pub ds_json: plans::DatasetJson,
    /// The network to train (plans' architecture, preset override and kwargs merged).
    pub spec: plans::ArchitectureSpec,
    pub io: NetworkIo,
    pub labels: LabelInfo,
    pub batch_size: usize,
    /// One scale per deep-supervision output (one full-resolution scale without it).
    pub ds_scales: Vec<Vec<f64>>,
    pub mirror_axes: Vec<usize>,
}

impl Setup {
    /// Reads and checks the configuration of `req`.
    pub fn prepare(req: &TrainRequest) -> Result<Setup, TrainError> {
        req.config.validate()?;
        let pre = datasets::layout::PreprocessedDir::new(&req.preprocessed_dataset_folder);
        let plans_file = pre.plans_file(&req.plans_name);
        let (plans, cfg) = plans::Plans::load_configuration(&plans_file, &req.configuration)?;
        let ds_json = plans::DatasetJson::load(&pre.dataset_json())?;
        // resolved now so an unknown network name fails before anything is written
        let spec = req.config.network_spec(&cfg.architecture, &req.registry)?;
        let deep_supervision = req.config.enable_deep_supervision;
        let io = NetworkIo::for_configuration(&cfg, &ds_json, deep_supervision);
        let dim = cfg.patch_size.len();
        if !(dim == 2 || dim == 3) {
            return Err(TrainError::PatchDims {
                plans_file,
                configuration: req.configuration.clone(),
                patch_size: cfg.patch_size.clone(),
            });
        }
        let ds_scales = if deep_supervision {
            match UNetKwargs::plan_strides(&spec.arch_kwargs, dim) {
                Ok(strides) => data::ds_scales_from_strides(&strides),
                Err(source) => {
                    return Err(TrainError::DeepSupervisionStrides {
                        plans_file,
                        source: Box::new(source),
                    })
                }
            }
        } else {
            vec![vec![1.0; dim]]
        };
        Ok(Setup {
            batch_size: req.config.batch_size.unwrap_or(cfg.batch_size),
            mirror_axes: req.config.resolved_mirror_axes(dim),
            labels: LabelInfo::from_dataset_json(&ds_json),
            plans_file,
            plans,
            cfg,
            ds_json,
            spec,
            io,
            ds_scales,
        })
    }

    /// Number of foreground classes (or regions): the outputs of a classification head.
    pub fn foreground_count(&self) -> usize {
        self.labels
            .regions
            .as_ref()
            .map(|r| r.len())
            .unwrap_or(self.io.num_classes.saturating_sub(1))
    }
}
