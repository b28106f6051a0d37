//! `nnUNetv2_move_plans_between_datasets`: reuse one dataset's plans for another (transfer
//! learning: the same network topology, patch and spacing on a new dataset).
//!
//! As nnU-Net does: the plans get the target's `dataset_name`, the target's image
//! reader/writer (from its dataset.json), the new `plans_name`, and — when the plans identifier
//! changes — data identifiers renamed after it, so the target's preprocessed data does not
//! collide with data made from other plans. The plans hold no label count: the segmentation
//! heads come from the target's dataset.json when training. Unlike nnU-Net, a target whose
//! channel count differs from the plans' normalization schemes is refused here (nnU-Net fails
//! later, in preprocessing), and the plans are validated before they are written.

use std::path::PathBuf;

use datasets::layout::RawDir;
use datasets::paths::{dataset_name_from_arg, NnUnetPaths};
use plans::{DatasetJson, Plans};
use serde_json::Value;

use crate::experiment::reader_writer_for;
use crate::PlannerError;

/// What to move: `-s`, `-t`, `-sp`, `-tp` of nnU-Net's command.
#[derive(Debug, Clone)]
pub struct MovePlans {
    /// Source dataset (id or name), which has `nnUNet_preprocessed/<source>/<source_plans>.json`.
    pub source: String,
    /// Target dataset (id or name), which needs a raw dataset (its dataset.json).
    pub target: String,
    pub source_plans: String,
    /// Plans identifier in the target (default: `source_plans`).
    pub target_plans: Option<String>,
}

/// Writes `nnUNet_preprocessed/<target>/<target_plans>.json`; returns its path.
pub fn move_plans_between_datasets(
    req: &MovePlans,
    paths: &NnUnetPaths,
) -> Result<PathBuf, PlannerError> {
    let source_name = dataset_name_from_arg(paths, &req.source)?;
    let target_name = dataset_name_from_arg(paths, &req.target)?;
    let target_plans = req.target_plans.as_deref().unwrap_or(&req.source_plans);
    datasets::layout::check_name("plans identifier", target_plans)?;
    let source_dir = paths.preprocessed_dir(&source_name)?;
    let source_file = source_dir.plans_file(&req.source_plans);
    if !source_file.is_file() {
        return Err(PlannerError::ExistingPlans {
            path: source_file,
            message: "source plans are missing; run plan_experiment (or plan_and_preprocess) \
                      for the source dataset first"
                .into(),
        });
    }
    let mut plans = Plans::load(&source_file)?;
    let raw = RawDir::new(paths.raw_dataset_folder(datasets::parse_dataset_id(&target_name)?)?);
    let target_json = DatasetJson::load(&raw.dataset_json())?;
    check_channels(
        &plans,
        target_json.num_channels(),
        &target_name,
        &source_file,
    )?;

    plans.dataset_name = target_name.clone();
    if target_plans != req.source_plans {
        rename_data_identifiers(&mut plans, &req.source_plans, target_plans);
    }
    plans.image_reader_writer = reader_writer_for(
        &target_json.file_ending,
        target_json.overwrite_image_reader_writer.as_deref(),
    );
    plans.plans_name = target_plans.to_string();
    plans.validate_all()?;

    let target_dir = paths.preprocessed_dir(&target_name)?;
    std::fs::create_dir_all(target_dir.path()).map_err(|e| PlannerError::ExistingPlans {
        path: target_dir.path().to_path_buf(),
        message: format!("cannot create the folder: {e}"),
    })?;
    let target_file = target_dir.plans_file(target_plans);
    if target_file.exists() {
        tracing::warn!("replacing {}", target_file.display());
    }
    plans.save(&target_file)?;
    Ok(target_file)
}

/// nnU-Net's rule: `{source_plans}_X` becomes `{target_plans}_X`, any other identifier `I`
/// becomes `{target_plans}_I`.
fn rename_data_identifiers(plans: &mut Plans, source_plans: &str, target_plans: &str) {
    for cfg in plans.configurations.values_mut() {
        let Some(Value::String(old)) = cfg.get("data_identifier") else {
            continue;
        };
        let new = match old.strip_prefix(source_plans) {
            Some(rest) => format!("{target_plans}{rest}"),
            None => format!("{target_plans}_{old}"),
        };
        cfg["data_identifier"] = Value::String(new);
    }
}

/// Every configuration normalizes as many channels as the target dataset has.
fn check_channels(
    plans: &Plans,
    channels: usize,
    target_name: &str,
    source_file: &std::path::Path,
) -> Result<(), PlannerError> {
    for name in plans.configuration_names() {
        let cfg = plans.configuration(&name)?;
        let n = cfg.normalization_schemes.len();
        if n != channels {
            return Err(PlannerError::ExistingPlans {
                path: source_file.to_path_buf(),
                message: format!(
                    "configurations.{name}.normalization_schemes has {n} entries, but the target \
                     dataset {target_name} has {channels} channel(s): these plans cannot be used \
                     for it"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
