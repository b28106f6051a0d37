//! nnU-Net's `ExperimentPlanner` (`default_experiment_planner.py`) and the ResEnc presets.
//!
//! The planner works on a plain [`PlanningInput`] (what it needs from dataset.json and the
//! fingerprint) and produces the plans as a `serde_json::Value` with nnU-Net's key order, so the
//! file we write is the file nnU-Net writes. [`crate::plan_experiment`] wraps it for the typed
//! `plans` crate.

use crate::arch_memory::{MemoryEstimate, UNetEstimate, UNetTopology};
use plans::NormalizationScheme;
use preprocessing::resampling::compute_new_shape;
use serde_json::{json, Map, Value};

use crate::error::PlannerError;
use crate::numpy::{argmax, argsort_last, median, per_column, percentile, prod, round_half_even};
use crate::presets::{
    PlannerConstants, PlannerKind, ShrinkCondition, ANISO_THRESHOLD, LOWRES_CREATION_THRESHOLD,
    LOWRES_SPACING_INCREASE_FACTOR,
};
use crate::topology::{get_pool_and_conv_props, PoolAndConvProps};

/// nnU-Net's `max_numpool` argument (no explicit pooling cap in v2).
const MAX_NUMPOOL: usize = 999_999;
/// Safety net for the 3d_lowres loop (nnU-Net has none; 1.03**2000 is astronomically large).
const MAX_LOWRES_ITERATIONS: usize = 2000;

/// Options of `nnUNetv2_plan_experiment`.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannerOptions {
    /// `-pl`
    pub kind: PlannerKind,
    /// `-gpu_memory_target` in GB; `None` = the preset's default.
    pub gpu_memory_target_gb: Option<f64>,
    /// `-overwrite_target_spacing` (reader axis order, 3 values); 3d_fullres only.
    pub overwrite_target_spacing: Option<Vec<f64>>,
    /// `-overwrite_plans_name`
    pub overwrite_plans_name: Option<String>,
}

impl Default for PlannerOptions {
    fn default() -> Self {
        PlannerOptions {
            kind: PlannerKind::ExperimentPlanner,
            gpu_memory_target_gb: None,
            overwrite_target_spacing: None,
            overwrite_plans_name: None,
        }
    }
}

impl PlannerOptions {
    /// The plans identifier (`nnUNetPlans`, `nnUNetResEncUNetLPlans`, or the override).
    pub fn plans_name(&self) -> String {
        self.overwrite_plans_name
            .clone()
            .unwrap_or_else(|| self.kind.constants().default_plans_name.to_string())
    }
}

/// What the planner reads from dataset.json and dataset_fingerprint.json.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanningInput {
    /// `channel_names` values in channel order.
    pub channel_names: Vec<String>,
    /// `len(dataset_json['labels'])`: nnU-Net passes this as the number of output channels to
    /// the memory estimate (it counts background, an ignore label and region entries alike).
    pub num_labels: usize,
    /// `numTraining`
    pub num_training: usize,
    /// `file_ending`
    pub file_ending: String,
    /// `overwrite_image_reader_writer`
    pub overwrite_image_reader_writer: Option<String>,
    /// dataset.json `use_mask_for_norm: true` forces the mask for schemes that support it
    /// (newer nnU-Net; absent = false).
    pub force_use_mask_for_norm: bool,
    /// Fingerprint `spacings` (reader axis order).
    pub spacings: Vec<Vec<f64>>,
    /// Fingerprint `shapes_after_crop` (reader axis order).
    pub shapes_after_crop: Vec<Vec<usize>>,
    /// Fingerprint `median_relative_size_after_cropping`.
    pub median_relative_size_after_cropping: f64,
    /// Fingerprint `foreground_intensity_properties_per_channel`, copied into the plans.
    pub foreground_intensity_properties_per_channel: Value,
}

/// One planned configuration (the values of `get_plans_for_configuration`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigurationPlan {
    pub data_identifier: String,
    pub batch_size: usize,
    pub patch_size: Vec<usize>,
    pub median_image_size_in_voxels: Vec<f64>,
    /// 3d_lowres writes its median shape as Python ints (`round()`), the others as floats.
    pub median_is_integer: bool,
    pub spacing: Vec<f64>,
    pub normalization_schemes: Vec<NormalizationScheme>,
    pub use_mask_for_norm: Vec<bool>,
    pub topology: PoolAndConvProps,
    pub features_per_stage: Vec<usize>,
    pub n_blocks_per_stage_encoder: Vec<usize>,
    pub n_conv_per_stage_decoder: Vec<usize>,
    /// The final `compute_conv_feature_map_size` estimate.
    pub estimate: u64,
    pub batch_dice: Option<bool>,
    pub next_stage: Option<String>,
}

/// The planner: constants, options and input.
#[derive(Debug, Clone)]
pub struct Planner<'a> {
    pub constants: PlannerConstants,
    pub options: &'a PlannerOptions,
    pub input: &'a PlanningInput,
    gpu_memory_target_gb: f64,
}

/// Wrap a float for JSON; `None` for non-finite values (which JSON cannot hold).
fn f(v: f64) -> Value {
    serde_json::Number::from_f64(v)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

fn permute<T: Copy>(v: &[T], order: &[usize]) -> Vec<T> {
    order.iter().map(|&i| v[i]).collect()
}

impl<'a> Planner<'a> {
    /// Validate options and input.
    pub fn new(
        input: &'a PlanningInput,
        options: &'a PlannerOptions,
    ) -> Result<Self, PlannerError> {
        let constants = options.kind.constants();
        let gpu = options
            .gpu_memory_target_gb
            .unwrap_or(constants.default_gpu_memory_target_gb);
        if !(gpu.is_finite() && gpu > 0.0) {
            return Err(PlannerError::InvalidOption {
                option: "-gpu_memory_target",
                message: format!("must be a positive number of GB, got {gpu}"),
            });
        }
        if options.kind != PlannerKind::ExperimentPlanner
            && gpu != constants.default_gpu_memory_target_gb
        {
            tracing::warn!(
                "You are running {} with a non-standard gpu_memory_target_in_gb. Expected {}, got {}. You \
                 should only see this warning if you modified this value intentionally!",
                constants.class_name,
                constants.default_gpu_memory_target_gb,
                gpu
            );
        }
        if let Some(name) = &options.overwrite_plans_name {
            if name.is_empty() || name.contains(['/', '\\']) {
                return Err(PlannerError::InvalidOption {
                    option: "-overwrite_plans_name",
                    message: format!("`{name}` is not a valid file name stem"),
                });
            }
        }
        validate_input(input)?;
        let dim = input.spacings[0].len();
        if let Some(ts) = &options.overwrite_target_spacing {
            if ts.len() != dim || ts.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(PlannerError::InvalidOption {
                    option: "-overwrite_target_spacing",
                    message: format!("expected {dim} positive spacings, got {ts:?}"),
                });
            }
        }
        Ok(Planner {
            constants,
            options,
            input,
            gpu_memory_target_gb: gpu,
        })
    }

    /// The GPU memory target actually used.
    pub fn gpu_memory_target_gb(&self) -> f64 {
        self.gpu_memory_target_gb
    }

    /// `determine_fullres_target_spacing` without the override: per-axis median spacing, except
    /// for strongly anisotropic data, where the low-resolution axis gets the 10th percentile of
    /// its spacings (but never finer than the other axes).
    pub fn automatic_target_spacing(&self) -> Vec<f64> {
        let spacings = &self.input.spacings;
        let sizes: Vec<Vec<f64>> = self
            .input
            .shapes_after_crop
            .iter()
            .map(|s| s.iter().map(|&v| v as f64).collect())
            .collect();
        // validated non-empty
        let mut target = per_column(spacings, |c| percentile(c, 50.0)).unwrap_or_default();
        let target_size = per_column(&sizes, |c| percentile(c, 50.0)).unwrap_or_default();
        let worst = argmax(&target);
        let others: Vec<usize> = (0..target.len()).filter(|&i| i != worst).collect();
        if others.is_empty() {
            return target;
        }
        let max_other_spacing = others
            .iter()
            .map(|&i| target[i])
            .fold(f64::NEG_INFINITY, f64::max);
        let min_other_size = others
            .iter()
            .map(|&i| target_size[i])
            .fold(f64::INFINITY, f64::min);
        let has_aniso_spacing = target[worst] > ANISO_THRESHOLD * max_other_spacing;
        let has_aniso_voxels = target_size[worst] * ANISO_THRESHOLD < min_other_size;
        if has_aniso_spacing && has_aniso_voxels {
            let axis: Vec<f64> = spacings.iter().map(|s| s[worst]).collect();
            let mut t = percentile(&axis, 10.0).unwrap_or(target[worst]);
            // don't let the spacing of that axis get finer than the other axes
            if t < max_other_spacing {
                t = max_other_spacing.max(t) + 1e-5;
            }
            target[worst] = t;
        }
        target
    }

    /// `determine_fullres_target_spacing`: the override if given, else the automatic one.
    pub fn fullres_target_spacing(&self) -> Vec<f64> {
        match &self.options.overwrite_target_spacing {
            Some(ts) => ts.clone(),
            None => self.automatic_target_spacing(),
        }
    }

    /// `determine_transpose`: the lowest-resolution axis first, the others in order.
    pub fn transpose(&self) -> (Vec<usize>, Vec<usize>) {
        determine_transpose(&self.fullres_target_spacing())
    }

    /// Normalization schemes and `use_mask_for_norm` per channel.
    pub fn normalization(&self) -> (Vec<NormalizationScheme>, Vec<bool>) {
        let schemes: Vec<NormalizationScheme> = self
            .input
            .channel_names
            .iter()
            .map(|c| NormalizationScheme::from_channel_name(c))
            .collect();
        let use_mask = self.input.median_relative_size_after_cropping < 3.0 / 4.0
            || self.input.force_use_mask_for_norm;
        let mask = schemes
            .iter()
            .map(|s| use_mask && s.leaves_outside_mask_zero())
            .collect();
        (schemes, mask)
    }

    fn data_identifier(&self, configuration: &str) -> String {
        if self.constants.reuse_default_data_identifiers
            && (configuration == "2d" || configuration == "3d_fullres")
        {
            // ResEnc presets do not deviate from ExperimentPlanner here and reuse its data
            format!("nnUNetPlans_{configuration}")
        } else {
            format!("{}_{configuration}", self.options.plans_name())
        }
    }

    fn estimate(
        &self,
        props: &PoolAndConvProps,
        features: &[usize],
        enc: &[usize],
        dec: &[usize],
    ) -> u64 {
        let dim = props.patch_size.len();
        let est = UNetEstimate {
            variant: self.constants.variant,
            topology: UNetTopology {
                input_channels: self.input.channel_names.len(),
                n_stages: props.n_stages(),
                features_per_stage: features.to_vec(),
                kernel_sizes: props.conv_kernel_sizes.clone(),
                strides: props.pool_op_kernel_sizes.clone(),
                n_conv_per_stage: enc.to_vec(),
                n_conv_per_stage_decoder: dec.to_vec(),
                num_classes: self.input.num_labels,
                // nnU-Net builds the network for the estimate without deep supervision
                deep_supervision: false,
            },
        };
        debug_assert_eq!(est.topology.kernel_sizes.len(), est.topology.n_stages);
        debug_assert!(dim > 0);
        est.conv_feature_map_size(&props.patch_size)
    }

    fn blocks(&self, n_stages: usize) -> (Vec<usize>, Vec<usize>) {
        let c = &self.constants;
        // nnU-Net slices fixed-length tuples; repeat the last entry for deeper networks instead of
        // silently producing a too-short list (dna would then assert)
        let take = |src: &[usize], n: usize| -> Vec<usize> {
            (0..n)
                .map(|i| src.get(i).or(src.last()).copied().unwrap_or(2))
                .collect()
        };
        (
            take(c.blocks_per_stage_encoder, n_stages),
            take(c.blocks_per_stage_decoder, n_stages.saturating_sub(1)),
        )
    }

    /// `get_plans_for_configuration`.
    pub fn plan_configuration(
        &self,
        spacing: &[f64],
        median_shape: &[f64],
        median_is_integer: bool,
        configuration: &str,
        approximate_n_voxels_dataset: f64,
    ) -> Result<ConfigurationPlan, PlannerError> {
        let c = &self.constants;
        let dim = spacing.len();
        if spacing.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
            return Err(PlannerError::Fingerprint(format!(
                "{configuration}: spacing must be > 0, got {spacing:?}"
            )));
        }
        // initial patch: aspect ratio from the spacing, volume of 256**3 (3D) or 2048**2 (2D)
        let tmp: Vec<f64> = spacing.iter().map(|s| 1.0 / s).collect();
        let scale = match dim {
            3 => (256f64.powi(3) / prod(&tmp)).powf(1.0 / 3.0),
            2 => (2048f64.powi(2) / prod(&tmp)).powf(1.0 / 2.0),
            _ => {
                return Err(PlannerError::Fingerprint(format!(
                    "{configuration}: only 2D and 3D configurations can be planned, got {dim} axes"
                )))
            }
        };
        // clip to the median shape (Python's min keeps a float median such as 93.5)
        let initial: Vec<f64> = tmp
            .iter()
            .zip(median_shape)
            .map(|(t, &m)| round_half_even(t * scale).min(m))
            .collect();

        let min_fm = c.featuremap_min_edge_length;
        let mut props = get_pool_and_conv_props(spacing, &initial, min_fm, MAX_NUMPOOL);
        let mut features = c.features_per_stage(props.n_stages(), dim);
        let (mut enc, mut dec) = self.blocks(props.n_stages());
        let mut estimate = self.estimate(&props, &features, &enc, &dec);

        let ref_val = if dim == 2 {
            c.reference_val_2d
        } else {
            c.reference_val_3d
        };
        let reference = ref_val * (self.gpu_memory_target_gb / c.reference_val_corresp_gb);
        let ref_bs = if dim == 2 {
            c.reference_bs_2d
        } else {
            c.reference_bs_3d
        } as f64;
        let too_big = |estimate: u64| match c.shrink_condition {
            // "we enforce a batch size of at least two, reference values may have been computed
            // for different batch sizes"
            ShrinkCondition::PerSampleTimesTwo => estimate as f64 / ref_bs * 2.0 > reference,
            ShrinkCondition::Plain => estimate as f64 > reference,
        };

        while too_big(estimate) {
            // reduce the axis that is largest relative to the median shape
            let ratios: Vec<f64> = props
                .patch_size
                .iter()
                .zip(median_shape)
                .map(|(&p, &m)| p as f64 / m)
                .collect();
            let axis = argsort_last(&ratios);
            // subtracting shape_must_be_divisible_by directly could skip valid sizes (256 - 64
            // skips 224), so recompute the divisor for the already-reduced patch first
            let mut reduced: Vec<f64> = props.patch_size.iter().map(|&p| p as f64).collect();
            reduced[axis] -= props.shape_must_be_divisible_by[axis] as f64;
            let divisor = get_pool_and_conv_props(spacing, &reduced, min_fm, MAX_NUMPOOL)
                .shape_must_be_divisible_by;
            let new_len = props.patch_size[axis] as i64 - divisor[axis] as i64;
            if new_len < 1 {
                return Err(PlannerError::PatchDoesNotFit {
                    configuration: configuration.to_string(),
                    patch: props.patch_size.clone(),
                    estimate,
                    reference,
                });
            }
            let mut patch: Vec<f64> = props.patch_size.iter().map(|&p| p as f64).collect();
            patch[axis] = new_len as f64;
            props = get_pool_and_conv_props(spacing, &patch, min_fm, MAX_NUMPOOL);
            features = c.features_per_stage(props.n_stages(), dim);
            (enc, dec) = self.blocks(props.n_stages());
            estimate = self.estimate(&props, &features, &enc, &dec);
        }

        // batch size from the remaining headroom, capped to max_dataset_covered of the dataset
        let batch_size = round_half_even(reference / estimate as f64 * ref_bs);
        let patch_f: Vec<f64> = props.patch_size.iter().map(|&p| p as f64).collect();
        let cap =
            round_half_even(approximate_n_voxels_dataset * c.max_dataset_covered / prod(&patch_f));
        let batch_size = batch_size.min(cap).max(c.min_batch_size as f64) as usize;

        let (normalization_schemes, use_mask_for_norm) = self.normalization();
        Ok(ConfigurationPlan {
            data_identifier: self.data_identifier(configuration),
            batch_size,
            patch_size: props.patch_size.clone(),
            median_image_size_in_voxels: median_shape.to_vec(),
            median_is_integer,
            spacing: spacing.to_vec(),
            normalization_schemes,
            use_mask_for_norm,
            topology: props,
            features_per_stage: features,
            n_blocks_per_stage_encoder: enc,
            n_conv_per_stage_decoder: dec,
            estimate,
            batch_dice: None,
            next_stage: None,
        })
    }

    /// `plan_experiment`: all default configurations plus the plans header, as nnU-Net's JSON.
    pub fn plan(&self, dataset_name: &str) -> Result<Value, PlannerError> {
        let auto_spacing = self.automatic_target_spacing();
        let fullres_spacing = self.fullres_target_spacing();
        let (transpose_forward, transpose_backward) = determine_transpose(&fullres_spacing);
        let fullres_spacing_t = permute(&fullres_spacing, &transpose_forward);
        let new_median_t = permute(&self.median_new_shape(&fullres_spacing), &transpose_forward);
        let approx_n_voxels = prod(&new_median_t) * self.input.num_training as f64;

        let (plan_fullres, plan_lowres) = if new_median_t.len() == 3 && new_median_t[0] != 1.0 {
            // only run 3d if this is a 3d dataset
            let (fullres, lowres) =
                self.plan_3d(&fullres_spacing_t, &new_median_t, approx_n_voxels)?;
            (Some(fullres), lowres)
        } else {
            (None, None)
        };

        // 2d: slices along the first (transposed) axis. nnU-Net documents
        // -overwrite_target_spacing as affecting 3d_fullres only, but its code feeds the
        // overwritten spacing into 2d as well; we follow the documented intent and plan 2d from
        // the automatic target spacing (identical to nnU-Net when no override is given).
        let (spacing_2d, median_2d, approx_2d) = if self.options.overwrite_target_spacing.is_some()
        {
            let m = permute(&self.median_new_shape(&auto_spacing), &transpose_forward);
            let a = prod(&m) * self.input.num_training as f64;
            (permute(&auto_spacing, &transpose_forward), m, a)
        } else {
            (fullres_spacing_t, new_median_t, approx_n_voxels)
        };
        let plan_2d = self.plan_2d(&spacing_2d, &median_2d, approx_2d)?;

        let mut configurations = Map::new();
        configurations.insert("2d".into(), self.configuration_json(&plan_2d));
        if let Some(l) = &plan_lowres {
            configurations.insert("3d_lowres".into(), self.configuration_json(l));
        }
        if let Some(fr) = &plan_fullres {
            configurations.insert("3d_fullres".into(), self.configuration_json(fr));
            if plan_lowres.is_some() {
                configurations.insert(
                    "3d_cascade_fullres".into(),
                    json!({"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}),
                );
            }
        }
        let transposes = (transpose_forward, transpose_backward);
        Ok(self.plans_json(dataset_name, &transposes, configurations))
    }

    /// Median over the training cases of their shapes after resampling to `target` spacing.
    fn median_new_shape(&self, target: &[f64]) -> Vec<f64> {
        let new_shapes: Vec<Vec<f64>> = self
            .input
            .spacings
            .iter()
            .zip(&self.input.shapes_after_crop)
            .map(|(sp, sh)| {
                compute_new_shape(sh, sp, target)
                    .into_iter()
                    .map(|v| v as f64)
                    .collect()
            })
            .collect();
        per_column(&new_shapes, median).unwrap_or_default()
    }

    /// 3d_fullres, plus 3d_lowres when the fullres patch covers too little of the median image
    /// (nnU-Net's loop: coarsen the spacing until the patch covers
    /// [`LOWRES_CREATION_THRESHOLD`] of it; dropped again when the size difference is < 2×).
    /// Sets `batch_dice` of both as nnU-Net does.
    fn plan_3d(
        &self,
        fullres_spacing_t: &[f64],
        new_median_t: &[f64],
        approx_n_voxels: f64,
    ) -> Result<(ConfigurationPlan, Option<ConfigurationPlan>), PlannerError> {
        let mut fullres = self.plan_configuration(
            fullres_spacing_t,
            new_median_t,
            false,
            "3d_fullres",
            approx_n_voxels,
        )?;
        let median_voxels_fullres = prod(new_median_t);
        let mut median_num_voxels = median_voxels_fullres;
        let mut num_voxels_in_patch = patch_voxels(&fullres);
        let mut lowres_spacing = fullres.spacing.clone();
        let mut lowres: Option<ConfigurationPlan> = None;
        let mut iterations = 0;
        while num_voxels_in_patch / median_num_voxels < LOWRES_CREATION_THRESHOLD {
            iterations += 1;
            if iterations > MAX_LOWRES_ITERATIONS {
                return Err(PlannerError::LowresDidNotConverge(MAX_LOWRES_ITERATIONS));
            }
            coarsen_lowres_spacing(&mut lowres_spacing);
            let lowres_median: Vec<f64> = fullres
                .spacing
                .iter()
                .zip(&lowres_spacing)
                .zip(new_median_t)
                .map(|((fs, ls), m)| fs / ls * m)
                .collect();
            median_num_voxels = prod(&lowres_median);
            let rounded: Vec<f64> = lowres_median.iter().map(|&v| round_half_even(v)).collect();
            let plan = self.plan_configuration(
                &lowres_spacing,
                &rounded,
                true,
                "3d_lowres",
                median_num_voxels * self.input.num_training as f64,
            )?;
            num_voxels_in_patch = patch_voxels(&plan);
            tracing::debug!(
                "Attempting to find 3d_lowres config. Current spacing: {:?}. Current patch size: {:?}. Current \
                 median shape: {:?}",
                lowres_spacing,
                plan.patch_size,
                lowres_median
            );
            lowres = Some(plan);
        }
        // nnU-Net prints "Dropping 3d_lowres" even when no lowres was ever attempted; we only
        // report a real drop
        if lowres.is_some() && median_voxels_fullres / median_num_voxels < 2.0 {
            tracing::info!(
                "Dropping 3d_lowres config because the image size difference to 3d_fullres is too small. \
                 3d_fullres: {:?}",
                new_median_t
            );
            lowres = None;
        }
        if let Some(l) = lowres.as_mut() {
            l.batch_dice = Some(false);
            l.next_stage = Some("3d_cascade_fullres".to_string());
            fullres.batch_dice = Some(true);
        } else {
            fullres.batch_dice = Some(false);
        }
        Ok((fullres, lowres))
    }

    /// The 2d configuration from the (transposed) 3-axis spacing and median shape: slices along
    /// the first axis.
    fn plan_2d(
        &self,
        spacing: &[f64],
        median_shape: &[f64],
        approx_n_voxels: f64,
    ) -> Result<ConfigurationPlan, PlannerError> {
        if spacing.len() < 3 {
            return Err(PlannerError::Fingerprint(format!(
                "spacings must have 3 axes (2D images use spacing 999 on the first), got {}",
                spacing.len()
            )));
        }
        let mut plan_2d = self.plan_configuration(
            &spacing[1..],
            &median_shape[1..],
            false,
            "2d",
            approx_n_voxels,
        )?;
        plan_2d.batch_dice = Some(true);
        Ok(plan_2d)
    }

    /// The plans header around `configurations`, in nnU-Net's key order.
    fn plans_json(
        &self,
        dataset_name: &str,
        (transpose_forward, transpose_backward): &(Vec<usize>, Vec<usize>),
        configurations: Map<String, Value>,
    ) -> Value {
        let input = self.input;
        // median spacing and shape of the raw data, for reference
        let median_spacing = permute(
            &per_column(&input.spacings, median).unwrap_or_default(),
            transpose_forward,
        );
        let shapes_f: Vec<Vec<f64>> = input
            .shapes_after_crop
            .iter()
            .map(|s| s.iter().map(|&v| v as f64).collect())
            .collect();
        let median_shape = permute(
            &per_column(&shapes_f, median).unwrap_or_default(),
            transpose_forward,
        );
        let mut plans = Map::new();
        plans.insert("dataset_name".into(), json!(dataset_name));
        plans.insert("plans_name".into(), json!(self.options.plans_name()));
        plans.insert(
            "original_median_spacing_after_transp".into(),
            Value::Array(median_spacing.iter().map(|&v| f(v)).collect()),
        );
        plans.insert(
            "original_median_shape_after_transp".into(),
            Value::Array(
                median_shape
                    .iter()
                    .map(|&v| json!(round_half_even(v) as i64))
                    .collect(),
            ),
        );
        plans.insert(
            "image_reader_writer".into(),
            json!(self.image_reader_writer()),
        );
        plans.insert("transpose_forward".into(), json!(transpose_forward));
        plans.insert("transpose_backward".into(), json!(transpose_backward));
        plans.insert("configurations".into(), Value::Object(configurations));
        plans.insert(
            "experiment_planner_used".into(),
            json!(self.constants.class_name),
        );
        plans.insert("label_manager".into(), json!("LabelManager"));
        plans.insert(
            "foreground_intensity_properties_per_channel".into(),
            input.foreground_intensity_properties_per_channel.clone(),
        );
        Value::Object(plans)
    }

    /// nnU-Net's reader/writer choice from dataset.json (see [`reader_writer_for`]).
    pub fn image_reader_writer(&self) -> String {
        reader_writer_for(
            &self.input.file_ending,
            self.input.overwrite_image_reader_writer.as_deref(),
        )
    }

    /// One configuration as nnU-Net writes it (same keys, same order).
    pub fn configuration_json(&self, p: &ConfigurationPlan) -> Value {
        let c = &self.constants;
        let dim = p.spacing.len();
        let conv_op = if dim == 2 {
            "torch.nn.modules.conv.Conv2d"
        } else {
            "torch.nn.modules.conv.Conv3d"
        };
        let norm_op = if dim == 2 {
            "torch.nn.modules.instancenorm.InstanceNorm2d"
        } else {
            "torch.nn.modules.instancenorm.InstanceNorm3d"
        };
        let mut arch = Map::new();
        arch.insert("n_stages".into(), json!(p.topology.n_stages()));
        arch.insert("features_per_stage".into(), json!(p.features_per_stage));
        arch.insert("conv_op".into(), json!(conv_op));
        arch.insert("kernel_sizes".into(), json!(p.topology.conv_kernel_sizes));
        arch.insert("strides".into(), json!(p.topology.pool_op_kernel_sizes));
        arch.insert(
            c.encoder_blocks_key().into(),
            json!(p.n_blocks_per_stage_encoder),
        );
        arch.insert(
            "n_conv_per_stage_decoder".into(),
            json!(p.n_conv_per_stage_decoder),
        );
        arch.insert("conv_bias".into(), json!(true));
        arch.insert("norm_op".into(), json!(norm_op));
        arch.insert(
            "norm_op_kwargs".into(),
            json!({"eps": 1e-5, "affine": true}),
        );
        arch.insert("dropout_op".into(), Value::Null);
        arch.insert("dropout_op_kwargs".into(), Value::Null);
        arch.insert("nonlin".into(), json!("torch.nn.LeakyReLU"));
        arch.insert("nonlin_kwargs".into(), json!({"inplace": true}));

        let mut architecture = Map::new();
        architecture.insert("network_class_name".into(), json!(c.network_class_name()));
        architecture.insert("arch_kwargs".into(), Value::Object(arch));
        architecture.insert(
            "_kw_requires_import".into(),
            json!(["conv_op", "norm_op", "dropout_op", "nonlin"]),
        );

        let median: Value = if p.median_is_integer {
            Value::Array(
                p.median_image_size_in_voxels
                    .iter()
                    .map(|&v| json!(v as i64))
                    .collect(),
            )
        } else {
            Value::Array(
                p.median_image_size_in_voxels
                    .iter()
                    .map(|&v| f(v))
                    .collect(),
            )
        };
        let kwargs = |is_seg: bool, order: u8| json!({"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": null});

        let mut m = Map::new();
        m.insert("data_identifier".into(), json!(p.data_identifier));
        m.insert("preprocessor_name".into(), json!("DefaultPreprocessor"));
        m.insert("batch_size".into(), json!(p.batch_size));
        m.insert("patch_size".into(), json!(p.patch_size));
        m.insert("median_image_size_in_voxels".into(), median);
        m.insert(
            "spacing".into(),
            Value::Array(p.spacing.iter().map(|&v| f(v)).collect()),
        );
        m.insert(
            "normalization_schemes".into(),
            json!(p.normalization_schemes),
        );
        m.insert("use_mask_for_norm".into(), json!(p.use_mask_for_norm));
        m.insert(
            "resampling_fn_data".into(),
            json!("resample_data_or_seg_to_shape"),
        );
        m.insert(
            "resampling_fn_seg".into(),
            json!("resample_data_or_seg_to_shape"),
        );
        m.insert("resampling_fn_data_kwargs".into(), kwargs(false, 3));
        m.insert("resampling_fn_seg_kwargs".into(), kwargs(true, 1));
        m.insert(
            "resampling_fn_probabilities".into(),
            json!("resample_data_or_seg_to_shape"),
        );
        m.insert(
            "resampling_fn_probabilities_kwargs".into(),
            kwargs(false, 1),
        );
        m.insert("architecture".into(), Value::Object(architecture));
        if let Some(bd) = p.batch_dice {
            m.insert("batch_dice".into(), json!(bd));
        }
        if let Some(ns) = &p.next_stage {
            m.insert("next_stage".into(), json!(ns));
        }
        Value::Object(m)
    }
}

/// `determine_transpose` for a target spacing: `[argmax] + remaining axes`, and its inverse.
pub fn determine_transpose(target_spacing: &[f64]) -> (Vec<usize>, Vec<usize>) {
    let n = target_spacing.len();
    if n == 0 {
        return (vec![], vec![]);
    }
    let w = argmax(target_spacing);
    let mut forward = vec![w];
    forward.extend((0..n).filter(|&i| i != w));
    let mut backward = vec![0; n];
    for (pos, &axis) in forward.iter().enumerate() {
        backward[axis] = pos;
    }
    (forward, backward)
}

fn validate_input(input: &PlanningInput) -> Result<(), PlannerError> {
    if input.spacings.is_empty() {
        return Err(PlannerError::Fingerprint(
            "`spacings` is empty (no training cases?)".into(),
        ));
    }
    if input.spacings.len() != input.shapes_after_crop.len() {
        return Err(PlannerError::Fingerprint(format!(
            "`spacings` has {} cases but `shapes_after_crop` has {}",
            input.spacings.len(),
            input.shapes_after_crop.len()
        )));
    }
    let dim = input.spacings[0].len();
    if dim != 3 {
        return Err(PlannerError::Fingerprint(format!(
            "spacings[0] has {dim} axes; nnU-Net fingerprints always have 3 (2D images use spacing 999 on the first)"
        )));
    }
    for (i, (sp, sh)) in input
        .spacings
        .iter()
        .zip(&input.shapes_after_crop)
        .enumerate()
    {
        if sp.len() != dim || sh.len() != dim {
            return Err(PlannerError::Fingerprint(format!(
                "case {i}: spacings[{i}] has {} axes and shapes_after_crop[{i}] has {}, expected {dim}",
                sp.len(),
                sh.len()
            )));
        }
        if sp.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(PlannerError::Fingerprint(format!(
                "spacings[{i}] = {sp:?}: spacings must be positive"
            )));
        }
        if sh.contains(&0) {
            return Err(PlannerError::Fingerprint(format!(
                "shapes_after_crop[{i}] = {sh:?}: empty image (all zero?)"
            )));
        }
    }
    if input.channel_names.is_empty() {
        return Err(PlannerError::DatasetJson("`channel_names` is empty".into()));
    }
    if input.num_labels == 0 {
        return Err(PlannerError::DatasetJson("`labels` is empty".into()));
    }
    if input.num_training == 0 {
        return Err(PlannerError::DatasetJson("`numTraining` is 0".into()));
    }
    Ok(())
}

/// nnU-Net's reader/writer choice from dataset.json (`determine_reader_writer_from_dataset_json`
/// without trying to open an example file): `overwrite_image_reader_writer` unless it is
/// `"None"`, else by `file_ending`.
pub fn reader_writer_for(file_ending: &str, overwrite: Option<&str>) -> String {
    if let Some(rw) = overwrite.filter(|rw| *rw != "None") {
        return rw.to_string();
    }
    match file_ending.to_lowercase().as_str() {
        ".png" | ".bmp" | ".tif" => "NaturalImage2DIO",
        ".nii.gz" | ".nrrd" | ".mha" | ".gipl" => "SimpleITKIO",
        ".tiff" => "Tiff3DIO",
        ".nii" => "NibabelIO",
        _ => "SimpleITKIO",
    }
    .to_string()
}

/// Number of voxels in a configuration's patch.
fn patch_voxels(plan: &ConfigurationPlan) -> f64 {
    plan.patch_size.iter().map(|&p| p as f64).product()
}

/// One step of nnU-Net's 3d_lowres search: increase the anisotropic (finer) axes first until
/// within a factor 2 of the coarsest, then all axes.
fn coarsen_lowres_spacing(spacing: &mut [f64]) {
    let max_spacing = spacing.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let finer: Vec<bool> = spacing.iter().map(|&s| max_spacing / s > 2.0).collect();
    let any_finer = finer.iter().any(|&b| b);
    for (s, &is_finer) in spacing.iter_mut().zip(&finer) {
        if is_finer || !any_finer {
            *s *= LOWRES_SPACING_INCREASE_FACTOR;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(spacings: Vec<Vec<f64>>, shapes: Vec<Vec<usize>>) -> PlanningInput {
        PlanningInput {
            channel_names: vec!["CT".into()],
            num_labels: 3,
            num_training: spacings.len(),
            file_ending: ".nii.gz".into(),
            overwrite_image_reader_writer: None,
            force_use_mask_for_norm: false,
            spacings,
            shapes_after_crop: shapes,
            median_relative_size_after_cropping: 1.0,
            foreground_intensity_properties_per_channel: json!({}),
        }
    }

    #[test]
    fn transpose_puts_lowres_axis_first() {
        assert_eq!(
            determine_transpose(&[0.8, 0.8, 3.0]),
            (vec![2, 0, 1], vec![1, 2, 0])
        );
        assert_eq!(
            determine_transpose(&[3.0, 0.8, 0.8]),
            (vec![0, 1, 2], vec![0, 1, 2])
        );
        assert_eq!(
            determine_transpose(&[0.8, 2.0, 0.8]),
            (vec![1, 0, 2], vec![1, 0, 2])
        );
        // ties: first maximum
        assert_eq!(determine_transpose(&[1.0, 1.0, 1.0]).0, vec![0, 1, 2]);
    }

    #[test]
    fn anisotropic_target_spacing_uses_10th_percentile() {
        // Dataset501: z in {3, 3.5, 4, 5}, ~25 slices vs ~95 in-plane -> z target 3.0
        let sp: Vec<Vec<f64>> = [3.0, 3.5, 4.0, 5.0]
            .iter()
            .cycle()
            .take(12)
            .map(|&z| vec![z, 0.8, 0.8])
            .collect();
        let sh = vec![vec![25, 95, 95]; 12];
        let inp = input(sp, sh);
        let opts = PlannerOptions::default();
        let p = Planner::new(&inp, &opts).unwrap();
        assert_eq!(p.automatic_target_spacing(), vec![3.0, 0.8, 0.8]);
        // not enough voxel anisotropy -> plain median 3.75
        let mut inp2 = inp.clone();
        inp2.shapes_after_crop = vec![vec![60, 95, 95]; 12];
        let p2 = Planner::new(&inp2, &opts).unwrap();
        assert_eq!(p2.automatic_target_spacing(), vec![3.75, 0.8, 0.8]);
        // 10th percentile finer than in-plane -> clamped to in-plane + 1e-5
        let sp3: Vec<Vec<f64>> = (0..10)
            .map(|i| vec![if i == 0 { 0.5 } else { 5.0 }, 1.0, 1.0])
            .collect();
        let inp3 = input(sp3, vec![vec![20, 200, 200]; 10]);
        let p3 = Planner::new(&inp3, &opts).unwrap();
        // percentile 10 of [0.5, 5 x9] = 0.5 + 4.5*0.9 = 4.55 (> 1, kept)
        assert!((p3.automatic_target_spacing()[0] - (0.5 + 4.5 * (9.0 * 0.1))).abs() < 1e-12);
    }

    #[test]
    fn normalization_and_mask() {
        let mut inp = input(vec![vec![1.0, 1.0, 1.0]], vec![vec![10, 10, 10]]);
        inp.channel_names = vec![
            "T2".into(),
            "ct".into(),
            "noNorm".into(),
            "rescale_to_0_1".into(),
        ];
        let opts = PlannerOptions::default();
        let p = Planner::new(&inp, &opts).unwrap();
        let (schemes, mask) = p.normalization();
        assert_eq!(
            serde_json::to_value(&schemes).unwrap(),
            json!([
                "ZScoreNormalization",
                "CTNormalization",
                "NoNormalization",
                "RescaleTo01Normalization"
            ])
        );
        assert_eq!(mask, vec![false; 4]);
        inp.median_relative_size_after_cropping = 0.5;
        let p = Planner::new(&inp, &opts).unwrap();
        assert_eq!(p.normalization().1, vec![true, false, false, false]);
    }

    #[test]
    fn invalid_options_are_errors() {
        let inp = input(vec![vec![1.0, 1.0, 1.0]], vec![vec![10, 10, 10]]);
        let mut opts = PlannerOptions {
            gpu_memory_target_gb: Some(-1.0),
            ..Default::default()
        };
        assert!(matches!(
            Planner::new(&inp, &opts),
            Err(PlannerError::InvalidOption { .. })
        ));
        opts.gpu_memory_target_gb = None;
        opts.overwrite_target_spacing = Some(vec![1.0, 1.0]);
        assert!(matches!(
            Planner::new(&inp, &opts),
            Err(PlannerError::InvalidOption { .. })
        ));
        let bad = input(vec![vec![1.0, 0.0, 1.0]], vec![vec![10, 10, 10]]);
        assert!(matches!(
            Planner::new(&bad, &PlannerOptions::default()),
            Err(PlannerError::Fingerprint(_))
        ));
    }

    #[test]
    fn resenc_reuses_default_data_identifiers() {
        let inp = input(vec![vec![1.0, 1.0, 1.0]; 4], vec![vec![300, 300, 300]; 4]);
        let opts = PlannerOptions {
            kind: PlannerKind::ResEncL,
            ..Default::default()
        };
        let p = Planner::new(&inp, &opts).unwrap();
        assert_eq!(p.data_identifier("2d"), "nnUNetPlans_2d");
        assert_eq!(p.data_identifier("3d_fullres"), "nnUNetPlans_3d_fullres");
        assert_eq!(
            p.data_identifier("3d_lowres"),
            "nnUNetResEncUNetLPlans_3d_lowres"
        );
        let opts = PlannerOptions {
            overwrite_plans_name: Some("custom".into()),
            ..Default::default()
        };
        let p = Planner::new(&inp, &opts).unwrap();
        assert_eq!(p.data_identifier("3d_lowres"), "custom_3d_lowres");
        assert_eq!(p.data_identifier("2d"), "custom_2d");
    }
}
