//! Fitting another registry network to a planned configuration.
//!
//! nnU-Net's planner sizes patch and batch for its own U-Net. A trainer preset that swaps the
//! network (`-tr kiunet_minimal`) may need far more activation memory at the same patch. Instead
//! of telling the user to "use the minimal config on a 24 GB GPU", [`fit_network`] runs nnU-Net's
//! patch-shrink loop with *that* network's estimate and returns a configuration that fits the
//! same GPU memory target; the caller writes it into the plans as a new configuration that
//! inherits from the original (see [`FittedConfiguration::to_json`]); [`fit_into_plans`] does
//! both for a preprocessed dataset's plans file.

use crate::numpy::{argsort_last, round_half_even};
use crate::presets::{PlannerConstants, PlannerKind};
use crate::topology::{get_pool_and_conv_props, PoolAndConvProps};
use crate::PlannerError;
use architectures::registry::{NetworkIo, Registry};
use plans::{ArchitectureSpec, Configuration};
use serde_json::{json, Map, Value};

mod into_plans;
pub use into_plans::{fit_into_plans, FitIntoPlans, FitOutcome, PresetNetwork};

/// nnU-Net's `get_pool_and_conv_props(..., max_numpool=999999)`.
const MAX_NUMPOOL: usize = 999_999;

/// What to fit.
#[derive(Debug, Clone)]
pub struct FitRequest<'a> {
    /// Name of the configuration in the plans (`3d_fullres`).
    pub configuration_name: &'a str,
    /// The resolved configuration.
    pub configuration: &'a Configuration,
    /// The network to fit: registry name and the merged `arch_kwargs` (plans + preset).
    pub network: &'a ArchitectureSpec,
    /// `arch_kwargs` keys the preset set (kept when the topology is recomputed).
    pub preset_kwargs: &'a Map<String, Value>,
    pub io: NetworkIo,
    /// `-gpu_memory_target` in GB (`None`: the planner's default, 8 GB).
    pub gpu_memory_target_gb: Option<f64>,
    /// The planner whose reference values define the memory currency
    /// (`experiment_planner_used` of the plans; unknown names use nnU-Net's default planner).
    pub planner: PlannerKind,
}

/// The outcome of [`fit_network`].
#[derive(Debug, Clone, PartialEq)]
pub struct FittedConfiguration {
    /// True when the network already fits the configuration's patch and batch.
    pub fits_as_is: bool,
    pub patch_size: Vec<usize>,
    pub batch_size: usize,
    /// The architecture entry for the fitted configuration: the plans' original network class
    /// with `arch_kwargs` re-derived for the new patch (stages, strides, kernels).
    pub architecture: ArchitectureSpec,
    /// The network's estimate at the original patch and at the fitted patch (per sample).
    pub estimate_original: u64,
    pub estimate_fitted: u64,
    /// The budget the estimates are compared with (nnU-Net's reference value scaled to the
    /// memory target, for the reference batch size).
    pub reference: f64,
    pub reference_batch_size: usize,
}

impl FittedConfiguration {
    /// The JSON of a configuration that inherits from `parent` and overrides what the fit
    /// changed (nnU-Net's `inherits_from` merges top-level keys only, so the architecture is
    /// written whole).
    pub fn to_json(&self, parent: &str) -> Value {
        json!({
            "inherits_from": parent,
            "patch_size": self.patch_size,
            "batch_size": self.batch_size,
            "architecture": {
                "network_class_name": self.architecture.network_class_name,
                "arch_kwargs": Value::Object(self.architecture.arch_kwargs.clone()),
                "_kw_requires_import": self.architecture.kw_requires_import,
            }
        })
    }

    /// The conventional name of the fitted configuration: `3d_fullres__kiunet_minimal`.
    pub fn name(configuration: &str, preset: &str) -> String {
        format!("{configuration}__{preset}")
    }
}

fn arch_err(configuration: &str, e: impl std::fmt::Display) -> PlannerError {
    PlannerError::InvalidOption {
        option: "-tr",
        message: format!("configuration `{configuration}`: {e}"),
    }
}

/// Repeats the last entry (or truncates) so a per-stage list has `n` entries.
fn resize_list(v: Option<&Value>, n: usize) -> Option<Value> {
    let arr = v?.as_array()?;
    let last = arr.last()?.clone();
    Some(Value::Array(
        (0..n)
            .map(|i| arr.get(i).cloned().unwrap_or_else(|| last.clone()))
            .collect(),
    ))
}

/// `arch_kwargs` of `base` with the topology replaced by `props` (per-stage lists keep the
/// user's values where stages remain, the last value repeats for new stages).
fn kwargs_for_topology(
    base: &Map<String, Value>,
    props: &crate::topology::PoolAndConvProps,
) -> Map<String, Value> {
    let n = props.n_stages();
    let mut kw = base.clone();
    kw.insert("n_stages".into(), json!(n));
    kw.insert("kernel_sizes".into(), json!(props.conv_kernel_sizes));
    kw.insert("strides".into(), json!(props.pool_op_kernel_sizes));
    for key in [
        "features_per_stage",
        "n_conv_per_stage",
        "n_blocks_per_stage",
    ] {
        if let Some(v) = resize_list(base.get(key), n) {
            kw.insert(key.into(), v);
        }
    }
    if let Some(v) = resize_list(base.get("n_conv_per_stage_decoder"), n.saturating_sub(1)) {
        kw.insert("n_conv_per_stage_decoder".into(), v);
    }
    kw
}

/// The memory reference (nnU-Net's `reference_val` scaled to the GPU memory target) and the
/// reference batch size of a `dim`-D configuration.
fn memory_reference(
    c: &PlannerConstants,
    gpu_memory_target_gb: Option<f64>,
    dim: usize,
) -> Result<(f64, usize), PlannerError> {
    let target = gpu_memory_target_gb.unwrap_or(c.default_gpu_memory_target_gb);
    if !(target > 0.0 && target.is_finite()) {
        return Err(PlannerError::InvalidOption {
            option: "-gpu_memory_target",
            message: format!("must be a positive number of GB, got {target}"),
        });
    }
    let (ref_val, ref_bs) = if dim == 2 {
        (c.reference_val_2d, c.reference_bs_2d)
    } else {
        (c.reference_val_3d, c.reference_bs_3d)
    };
    Ok((ref_val * (target / c.reference_val_corresp_gb), ref_bs))
}

/// One step of nnU-Net's patch-shrink loop: the axis largest relative to the median image
/// shrinks by its divisibility step and the topology is recomputed. `None` when the patch
/// cannot shrink further (an empty axis, or too small to downsample at all).
fn shrink_patch_once(
    spacing: &[f64],
    props: &PoolAndConvProps,
    median: &[f64],
    min_fm: usize,
) -> Option<PoolAndConvProps> {
    let patch_f = |p: &[usize]| p.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let ratios: Vec<f64> = props
        .patch_size
        .iter()
        .zip(median)
        .map(|(&p, &m)| p as f64 / m.max(1.0))
        .collect();
    let axis = argsort_last(&ratios);
    let mut reduced = patch_f(&props.patch_size);
    reduced[axis] -= props.shape_must_be_divisible_by[axis] as f64;
    let divisor =
        get_pool_and_conv_props(spacing, &reduced, min_fm, MAX_NUMPOOL).shape_must_be_divisible_by;
    let new_len = props.patch_size[axis] as i64 - divisor[axis] as i64;
    if new_len < 1 {
        return None;
    }
    let mut patch = patch_f(&props.patch_size);
    patch[axis] = new_len as f64;
    let shrunk = get_pool_and_conv_props(spacing, &patch, min_fm, MAX_NUMPOOL);
    (shrunk.n_stages() >= 2).then_some(shrunk)
}

/// Runs nnU-Net's patch-shrink loop with the estimate of `req.network`.
///
/// The network fits when its per-sample estimate times `batch_size / reference_bs` stays
/// within the reference (the condition nnU-Net's planner ends with). Otherwise the patch axis
/// that is largest relative to the median image shrinks by its divisibility step, the
/// topology is recomputed for the new patch (as the planner does), and the batch size is
/// then taken from the remaining headroom, at least 2 and at most the original batch size.
pub fn fit_network(
    registry: &Registry,
    req: &FitRequest,
) -> Result<FittedConfiguration, PlannerError> {
    let cfg = req.configuration;
    let name = req.configuration_name;
    let dim = cfg.patch_size.len();
    let c = req.planner.constants();
    let (reference, ref_bs) = memory_reference(&c, req.gpu_memory_target_gb, dim)?;
    // nnU-Net estimates without deep supervision
    let io = NetworkIo {
        deep_supervision: false,
        ..req.io
    };
    let estimate_for = |spec: &ArchitectureSpec, patch: &[usize]| -> Result<u64, PlannerError> {
        let est = registry
            .estimate(spec, &io)
            .map_err(|e| arch_err(name, e))?;
        Ok(est.conv_feature_map_size(patch))
    };
    let estimate_original = estimate_for(req.network, &cfg.patch_size)?;
    let fits = |estimate: u64, bs: usize| estimate as f64 * bs as f64 / ref_bs as f64 <= reference;
    if fits(estimate_original, cfg.batch_size) {
        return Ok(FittedConfiguration {
            fits_as_is: true,
            patch_size: cfg.patch_size.clone(),
            batch_size: cfg.batch_size,
            architecture: cfg.architecture.clone(),
            estimate_original,
            estimate_fitted: estimate_original,
            reference,
            reference_batch_size: ref_bs,
        });
    }

    let spacing = &cfg.spacing;
    let median: Vec<f64> = if cfg.median_image_size_in_voxels.len() == dim {
        cfg.median_image_size_in_voxels.clone()
    } else {
        cfg.patch_size.iter().map(|&p| p as f64).collect()
    };
    let min_fm = c.featuremap_min_edge_length;
    let patch_f = |p: &[usize]| p.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let mut props =
        get_pool_and_conv_props(spacing, &patch_f(&cfg.patch_size), min_fm, MAX_NUMPOOL);
    let with_topology = |props: &crate::topology::PoolAndConvProps| {
        let plan_kw = kwargs_for_topology(&cfg.architecture.arch_kwargs, props);
        let mut net_kw = plan_kw.clone();
        for (k, v) in req.preset_kwargs {
            net_kw.insert(k.clone(), v.clone());
        }
        (
            ArchitectureSpec {
                network_class_name: cfg.architecture.network_class_name.clone(),
                arch_kwargs: plan_kw,
                kw_requires_import: cfg.architecture.kw_requires_import.clone(),
            },
            ArchitectureSpec {
                network_class_name: req.network.network_class_name.clone(),
                arch_kwargs: net_kw,
                kw_requires_import: req.network.kw_requires_import.clone(),
            },
        )
    };
    let (mut plan_arch, mut net_arch) = with_topology(&props);
    let mut estimate = estimate_for(&net_arch, &props.patch_size)?;
    // shrink until a batch of two fits, as nnU-Net's planner does
    while !fits(estimate, 2) {
        props = shrink_patch_once(spacing, &props, &median, min_fm).ok_or_else(|| {
            PlannerError::PatchDoesNotFit {
                configuration: format!("{name} with network {}", req.network.network_class_name),
                patch: props.patch_size.clone(),
                estimate,
                reference,
            }
        })?;
        (plan_arch, net_arch) = with_topology(&props);
        estimate = estimate_for(&net_arch, &props.patch_size)?;
    }
    let bs = round_half_even(reference / estimate as f64 * ref_bs as f64) as usize;
    let batch_size = bs.min(cfg.batch_size).max(2);
    Ok(FittedConfiguration {
        fits_as_is: false,
        patch_size: props.patch_size.clone(),
        batch_size,
        architecture: plan_arch,
        estimate_original,
        estimate_fitted: estimate,
        reference,
        reference_batch_size: ref_bs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn demo_cfg() -> Configuration {
        let v = json!({
            "data_identifier": "nnUNetPlans_3d_fullres",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": [64, 128, 128],
            "median_image_size_in_voxels": [80.0, 200.0, 200.0],
            "spacing": [2.5, 0.8, 0.8],
            "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [false],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": false, "order": 3, "order_z": 0, "force_separate_z": null},
            "resampling_fn_seg_kwargs": {"is_seg": true, "order": 1, "order_z": 0, "force_separate_z": null},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": false, "order": 1, "order_z": 0, "force_separate_z": null},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 6,
                    "features_per_stage": [32, 64, 128, 256, 320, 320],
                    "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                    "n_conv_per_stage": [2, 2, 2, 2, 2, 2],
                    "n_conv_per_stage_decoder": [2, 2, 2, 2, 2],
                    "conv_bias": true,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": true},
                    "dropout_op": null, "dropout_op_kwargs": null,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
                },
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]
            },
            "batch_dice": false
        });
        let mut plans = json!({
            "dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [2.5, 0.8, 0.8],
            "original_median_shape_after_transp": [80, 200, 200],
            "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {},
            "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}
        });
        plans["configurations"]["3d_fullres"] = v;
        let p = plans::Plans::from_value(&plans, "plans.json").unwrap();
        p.configuration("3d_fullres").unwrap()
    }

    fn request<'a>(
        cfg: &'a Configuration,
        net: &'a ArchitectureSpec,
        preset: &'a Map<String, Value>,
        gb: f64,
    ) -> FitRequest<'a> {
        FitRequest {
            configuration_name: "3d_fullres",
            configuration: cfg,
            network: net,
            preset_kwargs: preset,
            io: NetworkIo {
                in_channels: 1,
                num_classes: 3,
                deep_supervision: true,
            },
            gpu_memory_target_gb: Some(gb),
            planner: PlannerKind::ExperimentPlanner,
        }
    }

    #[test]
    fn plain_network_fits_its_own_plan() {
        let cfg = demo_cfg();
        let none = Map::new();
        let r = fit_network(
            &Registry::default(),
            &request(&cfg, &cfg.architecture, &none, 8.0),
        )
        .unwrap();
        assert!(r.fits_as_is);
        assert_eq!(r.patch_size, cfg.patch_size);
        assert!(r.estimate_original as f64 <= r.reference);
    }

    #[test]
    fn a_smaller_budget_shrinks_the_patch_and_recomputes_the_topology() {
        let cfg = demo_cfg();
        let none = Map::new();
        let registry = Registry::default();
        // 1 GB instead of 8: the same network no longer fits
        let r = fit_network(&registry, &request(&cfg, &cfg.architecture, &none, 1.0)).unwrap();
        assert!(!r.fits_as_is);
        assert!(r.estimate_original as f64 > r.reference);
        assert!(r.estimate_fitted as f64 <= r.reference, "{r:?}");
        let vox = |p: &[usize]| p.iter().product::<usize>();
        assert!(vox(&r.patch_size) < vox(&cfg.patch_size));
        assert_eq!(r.batch_size, 2);
        // the written architecture is consistent with the new patch: the stride product
        // divides every axis, the lists have n_stages entries
        let kw = &r.architecture.arch_kwargs;
        let n = kw["n_stages"].as_u64().unwrap() as usize;
        let strides: Vec<Vec<usize>> = serde_json::from_value(kw["strides"].clone()).unwrap();
        assert_eq!(strides.len(), n);
        assert_eq!(kw["features_per_stage"].as_array().unwrap().len(), n);
        assert_eq!(
            kw["n_conv_per_stage_decoder"].as_array().unwrap().len(),
            n - 1
        );
        for ax in 0..3 {
            let prod: usize = strides.iter().map(|s| s[ax]).product();
            assert_eq!(r.patch_size[ax] % prod, 0, "axis {ax}: {:?}", r.patch_size);
        }
        // the fitted configuration parses as an inheriting configuration
        let mut plans_json = plans_with(&cfg);
        plans_json["configurations"]["3d_fullres__small"] = r.to_json("3d_fullres");
        let p = plans::Plans::from_value(&plans_json, "plans.json").unwrap();
        let fitted = p.configuration("3d_fullres__small").unwrap();
        assert_eq!(fitted.patch_size, r.patch_size);
        assert_eq!(fitted.spacing, cfg.spacing);
        // and the plain network built from it is within budget
        let io = NetworkIo {
            deep_supervision: false,
            ..request(&cfg, &cfg.architecture, &none, 1.0).io
        };
        let est = registry
            .estimate(&fitted.architecture, &io)
            .unwrap()
            .conv_feature_map_size(&fitted.patch_size);
        assert_eq!(est, r.estimate_fitted);
    }

    pub(crate) fn plans_with(cfg: &Configuration) -> Value {
        let mut plans = json!({
            "dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [2.5, 0.8, 0.8],
            "original_median_shape_after_transp": [80, 200, 200],
            "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {},
            "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}
        });
        plans["configurations"]["3d_fullres"] = Value::Object(cfg.to_json());
        plans
    }

    #[test]
    fn impossible_budget_is_an_error_not_a_loop() {
        let cfg = demo_cfg();
        let none = Map::new();
        let e = fit_network(
            &Registry::default(),
            &request(&cfg, &cfg.architecture, &none, 1e-6),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot fit"), "{e}");
        let e = fit_network(
            &Registry::default(),
            &request(&cfg, &cfg.architecture, &none, -1.0),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("-gpu_memory_target"), "{e}");
    }
}
