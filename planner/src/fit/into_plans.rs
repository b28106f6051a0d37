//! [`fit_into_plans`]: fits a trainer preset's network to a configuration of a preprocessed
//! dataset's plans and, when it does not fit as is, writes the fitted configuration
//! `CONFIG__PRESET` (inheriting from CONFIG) into the plans file.

use std::fmt;
use std::path::PathBuf;

use architectures::import::num_input_channels;
use architectures::registry::{ArchError, NetworkIo, Registry};
use datasets::PreprocessedDir;
use plans::{ArchitectureSpec, DatasetJson, Plans};
use serde_json::{Map, Value};

use super::{fit_network, FitRequest, FittedConfiguration};
use crate::{PlannerError, PlannerKind};

/// The network a trainer preset (`-tr NAME`) trains instead of the plans' own.
pub struct PresetNetwork<'a> {
    /// The preset's name (`kiunet_minimal`); names the fitted configuration.
    pub name: &'a str,
    /// The preset's network for a configuration's architecture (its registry name and its
    /// `arch_kwargs` merged over the plans').
    pub resolve: &'a dyn Fn(&ArchitectureSpec) -> Result<ArchitectureSpec, ArchError>,
    /// The `arch_kwargs` the preset sets (kept when the topology is recomputed).
    pub kwargs: &'a Map<String, Value>,
    pub deep_supervision: bool,
}

/// What to fit, and where.
pub struct FitIntoPlans<'a> {
    pub registry: &'a Registry,
    /// Holds `{plans_name}.json` and `dataset.json`.
    pub dataset: &'a PreprocessedDir,
    pub plans_name: &'a str,
    pub configuration: &'a str,
    pub network: PresetNetwork<'a>,
    /// `-gpu_memory_target` in GB (`None`: the plans' planner default).
    pub gpu_memory_target_gb: Option<f64>,
    /// Write a fitted configuration into the plans file (`false`: only report).
    pub write: bool,
}

/// What [`fit_into_plans`] found (its `Display` is the report for the user).
#[derive(Debug, Clone, PartialEq)]
pub struct FitOutcome {
    pub preset: String,
    pub network_class_name: String,
    pub configuration: String,
    /// The configuration's patch and batch size in the plans.
    pub patch_size: Vec<usize>,
    pub batch_size: usize,
    /// The memory target used (GB).
    pub gpu_memory_target_gb: f64,
    pub fit: FittedConfiguration,
    /// The fitted configuration's name, when the network does not fit as is.
    pub fitted_name: Option<String>,
    /// The plans file the fitted configuration was written to (`write`).
    pub written_to: Option<PathBuf>,
}

impl FitOutcome {
    /// The configuration to train: the fitted one, or the original when the network fits.
    pub fn configuration_to_train(&self) -> &str {
        self.fitted_name.as_deref().unwrap_or(&self.configuration)
    }
}

impl fmt::Display for FitOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fit = &self.fit;
        let budget = format!(
            "{} GB budget: reference {:.3e} at batch {}",
            self.gpu_memory_target_gb, fit.reference, fit.reference_batch_size
        );
        let (preset, cfg, net) = (&self.preset, &self.configuration, &self.network_class_name);
        let Some(fitted_name) = &self.fitted_name else {
            return write!(
                f,
                "{preset}: {net} fits `{cfg}` (patch {:?}, batch {}): estimate {:.3e} per sample, {budget}",
                self.patch_size, self.batch_size, fit.estimate_original as f64
            );
        };
        write!(
            f,
            "{preset}: {net} does not fit `{cfg}` (patch {:?}, batch {}): estimate {:.3e} per \
             sample, {budget}. Fitted configuration `{fitted_name}`: patch {:?}, batch {}, estimate {:.3e}{}",
            self.patch_size,
            self.batch_size,
            fit.estimate_original as f64,
            fit.patch_size,
            fit.batch_size,
            fit.estimate_fitted as f64,
            match &self.written_to {
                Some(p) => format!(" (written to {})", p.display()),
                None => String::new(),
            }
        )
    }
}

/// Fits `req.network` to `req.configuration` of the plans under the GPU memory budget (the
/// memory currency of the plans' `experiment_planner_used`, nnU-Net's default planner if
/// unknown). If it does not fit and `req.write` is set, the fitted configuration
/// `CONFIG__PRESET` is inserted into the plans file (replacing a different one of that name).
pub fn fit_into_plans(req: &FitIntoPlans) -> Result<FitOutcome, PlannerError> {
    let configuration = req.configuration;
    let preset = req.network.name;
    let wrap = |source: PlannerError| PlannerError::Fit {
        preset: preset.to_string(),
        configuration: configuration.to_string(),
        source: Box::new(source),
    };
    let plans_path = req.dataset.plans_file(req.plans_name);
    let (mut plans, cfg) = Plans::load_configuration(&plans_path, configuration)?;
    let ds = DatasetJson::load(&req.dataset.dataset_json())?;
    let spec = (req.network.resolve)(&cfg.architecture)?;
    let io = NetworkIo {
        in_channels: num_input_channels(&cfg, &ds),
        num_classes: ds.num_segmentation_heads(),
        deep_supervision: req.network.deep_supervision,
    };
    let planner = PlannerKind::from_name(&plans.experiment_planner_used)
        .unwrap_or(PlannerKind::ExperimentPlanner);
    let fit = fit_network(
        req.registry,
        &FitRequest {
            configuration_name: configuration,
            configuration: &cfg,
            network: &spec,
            preset_kwargs: req.network.kwargs,
            io,
            gpu_memory_target_gb: req.gpu_memory_target_gb,
            planner,
        },
    )
    .map_err(wrap)?;
    let mut outcome = FitOutcome {
        preset: preset.to_string(),
        network_class_name: spec.network_class_name.clone(),
        configuration: configuration.to_string(),
        patch_size: cfg.patch_size.clone(),
        batch_size: cfg.batch_size,
        gpu_memory_target_gb: req
            .gpu_memory_target_gb
            .unwrap_or(planner.constants().default_gpu_memory_target_gb),
        fitted_name: None,
        written_to: None,
        fit,
    };
    if outcome.fit.fits_as_is {
        return Ok(outcome);
    }
    let fitted_name = FittedConfiguration::name(configuration, preset);
    if req.write {
        let new = outcome.fit.to_json(configuration);
        if plans.configurations.get(&fitted_name) != Some(&new) {
            if plans.configurations.contains_key(&fitted_name) {
                tracing::warn!(
                    "replacing the existing configuration `{fitted_name}` in {}",
                    plans_path.display()
                );
            }
            plans.configurations.insert(fitted_name.clone(), new);
            plans.save(&plans_path)?;
        }
        outcome.written_to = Some(plans_path);
    }
    outcome.fitted_name = Some(fitted_name);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A preprocessed folder with `nnUNetPlans.json` (the fit tests' 3d_fullres) and a
    /// one-channel dataset.json.
    fn dataset(dir: &std::path::Path) -> PreprocessedDir {
        let pre = PreprocessedDir::new(dir);
        let cfg = super::super::tests::demo_cfg();
        let plans = super::super::tests::plans_with(&cfg);
        plans::io::write_json_atomic(&pre.plans_file("nnUNetPlans"), &plans).unwrap();
        let ds = json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
            "numTraining": 4, "file_ending": ".nii.gz"});
        plans::io::write_json_atomic(&pre.dataset_json(), &ds).unwrap();
        pre
    }

    fn same_network(base: &ArchitectureSpec) -> Result<ArchitectureSpec, ArchError> {
        Ok(base.clone())
    }

    fn request<'a>(
        pre: &'a PreprocessedDir,
        registry: &'a Registry,
        kwargs: &'a Map<String, Value>,
        gb: f64,
        write: bool,
    ) -> FitIntoPlans<'a> {
        FitIntoPlans {
            registry,
            dataset: pre,
            plans_name: "nnUNetPlans",
            configuration: "3d_fullres",
            network: PresetNetwork {
                name: "small",
                resolve: &same_network,
                kwargs,
                deep_supervision: true,
            },
            gpu_memory_target_gb: Some(gb),
            write,
        }
    }

    #[test]
    fn a_fitting_network_leaves_the_plans_alone() {
        let t = tempfile::tempdir().unwrap();
        let pre = dataset(t.path());
        let before = std::fs::read(pre.plans_file("nnUNetPlans")).unwrap();
        let (reg, kw) = (Registry::default(), Map::new());
        let out = fit_into_plans(&request(&pre, &reg, &kw, 8.0, true)).unwrap();
        assert!(out.fit.fits_as_is);
        assert_eq!(out.configuration_to_train(), "3d_fullres");
        assert_eq!(
            (out.fitted_name.as_deref(), out.written_to.as_ref()),
            (None, None)
        );
        assert_eq!(
            std::fs::read(pre.plans_file("nnUNetPlans")).unwrap(),
            before
        );
        let msg = out.to_string();
        assert!(
            msg.starts_with("small: ") && msg.contains("fits `3d_fullres`"),
            "{msg}"
        );
        assert!(msg.contains("8 GB budget"), "{msg}");
    }

    #[test]
    fn a_network_too_large_is_fitted_into_the_plans() {
        let t = tempfile::tempdir().unwrap();
        let pre = dataset(t.path());
        let plans_file = pre.plans_file("nnUNetPlans");
        let (reg, kw) = (Registry::default(), Map::new());
        // report only: nothing written
        let dry = fit_into_plans(&request(&pre, &reg, &kw, 1.0, false)).unwrap();
        assert_eq!(dry.fitted_name.as_deref(), Some("3d_fullres__small"));
        assert_eq!(dry.written_to, None);
        assert!(!dry.to_string().contains("written to"), "{dry}");
        let p = Plans::load(&plans_file).unwrap();
        assert!(!p.configurations.contains_key("3d_fullres__small"));
        // written: an inheriting configuration with the fitted patch and batch
        let out = fit_into_plans(&request(&pre, &reg, &kw, 1.0, true)).unwrap();
        assert_eq!(out.configuration_to_train(), "3d_fullres__small");
        assert_eq!(out.written_to.as_deref(), Some(plans_file.as_path()));
        let msg = out.to_string();
        assert!(msg.contains("does not fit `3d_fullres`"), "{msg}");
        assert!(
            msg.contains(&format!("written to {}", plans_file.display())),
            "{msg}"
        );
        let p = Plans::load(&plans_file).unwrap();
        assert_eq!(
            p.configurations["3d_fullres__small"]["inherits_from"],
            json!("3d_fullres")
        );
        let fitted = p.configuration("3d_fullres__small").unwrap();
        assert_eq!(fitted.patch_size, out.fit.patch_size);
        assert_eq!(fitted.batch_size, out.fit.batch_size);
        // a second run finds the same configuration and leaves the file as it is
        let before = std::fs::read(&plans_file).unwrap();
        fit_into_plans(&request(&pre, &reg, &kw, 1.0, true)).unwrap();
        assert_eq!(std::fs::read(&plans_file).unwrap(), before);
    }

    #[test]
    fn errors_name_the_preset_and_the_file() {
        let t = tempfile::tempdir().unwrap();
        let pre = dataset(t.path());
        let (reg, kw) = (Registry::default(), Map::new());
        let e = fit_into_plans(&request(&pre, &reg, &kw, 1e-6, true))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fitting `-tr small` to configuration `3d_fullres`")
                && e.contains("cannot fit"),
            "{e}"
        );
        let mut r = request(&pre, &reg, &kw, 8.0, true);
        r.plans_name = "missingPlans";
        let e = fit_into_plans(&r).unwrap_err().to_string();
        assert!(e.contains("missingPlans.json"), "{e}");
    }
}
