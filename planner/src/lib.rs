//! Experiment planning: nnU-Net v2's `ExperimentPlanner` and the `nnUNetPlannerResEnc{M,L,XL}`
//! presets, reproducing nnU-Net's plans files value for value.
//!
//! - [`plan_experiment`]: dataset.json + fingerprint → [`plans::Plans`] (2d, 3d_fullres and, when
//!   useful, 3d_lowres + 3d_cascade_fullres).
//! - [`save_plans_merging`]: write the plans, keeping custom configurations a user added to an
//!   existing file.
//! - The building blocks are public for tests and tools: [`topology::get_pool_and_conv_props`],
//!   [`experiment::Planner`] (target spacing, transpose, normalization, per-configuration plan),
//!   [`numpy`] (numpy-exact percentile/median/rounding).

pub mod error;
pub mod experiment;
pub mod fit;
pub mod move_plans;
pub mod numpy;
pub mod presets;
pub mod topology;

/// The memory estimator lives in `architectures::memory`.
pub(crate) mod arch_memory {
    pub use architectures::memory::*;
}

use std::path::Path;

use plans::{DatasetJson, Fingerprint, Plans};
use serde_json::Value;

pub use error::PlannerError;
pub use experiment::{
    determine_transpose, ConfigurationPlan, Planner, PlannerOptions, PlanningInput,
};
pub use presets::{PlannerConstants, PlannerKind};
pub use topology::{
    get_pool_and_conv_props, get_shape_must_be_divisible_by, pad_shape, PoolAndConvProps,
};

/// The configuration names nnU-Net's planner writes (and overwrites on re-planning).
pub const DEFAULT_CONFIGURATIONS: [&str; 4] =
    ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"];

/// Python truthiness of a JSON value (for `dataset.json` flags such as `use_mask_for_norm`).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Collect what the planner needs from dataset.json and the fingerprint.
pub fn planning_input(
    ds_json: &DatasetJson,
    fp: &Fingerprint,
) -> Result<PlanningInput, PlannerError> {
    let fg =
        serde_json::to_value(&fp.foreground_intensity_properties_per_channel).map_err(|e| {
            PlannerError::Fingerprint(format!("foreground_intensity_properties_per_channel: {e}"))
        })?;
    Ok(PlanningInput {
        channel_names: ds_json
            .channel_names_ordered()
            .into_iter()
            .map(|(_, n)| n)
            .collect(),
        num_labels: ds_json.labels.len(),
        num_training: ds_json.num_training,
        file_ending: ds_json.file_ending.clone(),
        overwrite_image_reader_writer: ds_json.overwrite_image_reader_writer.clone(),
        force_use_mask_for_norm: ds_json.extra.get("use_mask_for_norm").is_some_and(truthy),
        spacings: fp.spacings.clone(),
        shapes_after_crop: fp.shapes_after_crop.clone(),
        median_relative_size_after_cropping: fp.median_relative_size_after_cropping,
        foreground_intensity_properties_per_channel: fg,
    })
}

/// Plan all default configurations, as nnU-Net's JSON (key order included).
pub fn plan_experiment_json(
    dataset_name: &str,
    ds_json: &DatasetJson,
    fp: &Fingerprint,
    opts: &PlannerOptions,
) -> Result<Value, PlannerError> {
    let input = planning_input(ds_json, fp)?;
    Planner::new(&input, opts)?.plan(dataset_name)
}

/// `nnUNetv2_plan_experiment`: plan 2d, 3d_fullres and (if useful) 3d_lowres +
/// 3d_cascade_fullres for a dataset.
pub fn plan_experiment(
    dataset_name: &str,
    ds_json: &DatasetJson,
    fp: &Fingerprint,
    opts: &PlannerOptions,
) -> Result<Plans, PlannerError> {
    let v = plan_experiment_json(dataset_name, ds_json, fp, opts)?;
    Ok(Plans::from_value(&v, "planner output")?)
}

/// Merge freshly planned configurations into the plans already at `path` (if any): the
/// configurations the planner produced replace the old ones; configurations the user added by
/// hand are kept, after the planned ones, in their old order.
///
/// nnU-Net only drops old configurations whose names occur in the *new* plans, so a stale
/// `3d_lowres`/`3d_cascade_fullres` (e.g. after re-planning with another GPU target) would
/// survive and point at data that no longer matches. We treat every default configuration name
/// as planner-owned and drop it too.
pub fn merge_configurations(
    new: &mut Plans,
    old_plans_json: &Value,
    path: &Path,
) -> Result<(), PlannerError> {
    let old = old_plans_json
        .get("configurations")
        .and_then(Value::as_object)
        .ok_or_else(|| PlannerError::ExistingPlans {
            path: path.to_path_buf(),
            message: "existing plans file has no `configurations` object; refusing to overwrite it"
                .into(),
        })?;
    for (name, cfg) in old {
        if DEFAULT_CONFIGURATIONS.contains(&name.as_str()) || new.configurations.contains_key(name)
        {
            continue;
        }
        new.configurations.insert(name.clone(), cfg.clone());
    }
    Ok(())
}

/// Write `plans` to `path` atomically, keeping custom configurations of an existing file
/// (nnU-Net's `save_plans`). An existing file that cannot be read as JSON is an error rather
/// than being silently replaced.
pub fn save_plans_merging(plans: &Plans, path: &Path) -> Result<(), PlannerError> {
    let mut merged = plans.clone();
    if path.exists() {
        let old = plans::io::read_json_file(path)?;
        merge_configurations(&mut merged, &old, path)?;
    }
    merged.save(path)?;
    Ok(())
}
