//! [`TrainerConfig`]: the knobs of nnU-Net's `nnUNetTrainer.__init__` (and the few that its
//! variants change), as one serde value with nnU-Net's defaults.

use serde::{Deserialize, Serialize};

/// Training hyper-parameters. `Default` is nnU-Net's `nnUNetTrainer`.
///
/// Missing keys in a JSON file take the defaults; unknown keys are rejected (a typo must not
/// silently train with the default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Number of epochs (`num_epochs`, 1000).
    pub num_epochs: usize,
    /// Training iterations per epoch (250).
    pub num_iterations_per_epoch: usize,
    /// Validation iterations per epoch (50).
    pub num_val_iterations_per_epoch: usize,
    /// Initial learning rate of the poly schedule (1e-2).
    pub initial_lr: f64,
    /// Exponent of the poly schedule (0.9).
    pub poly_exponent: f64,
    /// SGD weight decay (3e-5).
    pub weight_decay: f64,
    /// SGD momentum (0.99, Nesterov).
    pub momentum: f64,
    /// Fraction of each batch forced to contain foreground (0.33).
    pub oversample_foreground_percent: f64,
    /// Deep supervision (true).
    pub enable_deep_supervision: bool,
    /// `checkpoint_latest` is written every `save_every` epochs (50).
    pub save_every: usize,
    /// Gradient-norm clipping threshold (12).
    pub grad_clip_norm: f64,
    /// Mirroring axes for training augmentation and test-time augmentation, as spatial axis
    /// indices (`None`: all spatial axes, nnU-Net's default; `Some(vec![])`: no mirroring).
    pub mirror_axes: Option<Vec<usize>>,
    /// Turns the whole data augmentation off (`nnUNetTrainerNoDA`); validation batches are
    /// never augmented.
    pub data_augmentation: bool,
    /// Replaces the plans' batch size (`None`: use the plans).
    pub batch_size: Option<usize>,
    /// Replaces the plans' `network_class_name` with another registry name (architecture
    /// presets such as `kiunet_minimal`).
    pub network_override: Option<String>,
    /// `arch_kwargs` entries merged over the plans' (architecture presets such as
    /// `kiunet_minimal` set `feature_scale` here). Empty: the plans' kwargs unchanged.
    pub network_kwargs: serde_json::Map<String, serde_json::Value>,
    /// Weight of the BCE loss of a network's image-level classification head (RUNext),
    /// added to the segmentation loss. Networks without such a head ignore it.
    pub class_loss_weight: f64,
    /// Growing the network while it trains (`growable_unet`); off unless a schedule is set.
    pub growth: crate::growth::GrowthOptions,
    /// Seed of the network initialisation and of the data loader. nnU-Net does not seed;
    /// nnseg runs are reproducible.
    pub seed: u64,
    /// Data-loading worker threads (`None`: automatic).
    pub num_workers: Option<usize>,
    /// bf16 mixed precision (`auto`: on for CUDA, off on the CPU); see [`crate::amp`].
    pub amp: crate::amp::Amp,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            num_epochs: 1000,
            num_iterations_per_epoch: 250,
            num_val_iterations_per_epoch: 50,
            initial_lr: 1e-2,
            poly_exponent: 0.9,
            weight_decay: 3e-5,
            momentum: 0.99,
            oversample_foreground_percent: 0.33,
            enable_deep_supervision: true,
            save_every: 50,
            grad_clip_norm: 12.0,
            mirror_axes: None,
            data_augmentation: true,
            batch_size: None,
            network_override: None,
            network_kwargs: serde_json::Map::new(),
            class_loss_weight: 1.0,
            growth: crate::growth::GrowthOptions::default(),
            seed: 12345,
            num_workers: None,
            amp: crate::amp::Amp::Auto,
        }
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid trainer configuration: `{field}` {message}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl TrainerConfig {
    /// Checks ranges that would otherwise fail deep inside training.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, message: &str| {
            Err(ConfigError {
                field,
                message: message.to_string(),
            })
        };
        if self.num_epochs == 0 {
            return err("num_epochs", "must be at least 1");
        }
        if self.num_iterations_per_epoch == 0 {
            return err("num_iterations_per_epoch", "must be at least 1");
        }
        if !(self.initial_lr.is_finite() && self.initial_lr > 0.0) {
            return err("initial_lr", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return err("momentum", "must be in [0, 1)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return err("weight_decay", "must be >= 0");
        }
        if !(0.0..=1.0).contains(&self.oversample_foreground_percent) {
            return err("oversample_foreground_percent", "must be in [0, 1]");
        }
        if self.save_every == 0 {
            return err("save_every", "must be at least 1");
        }
        if self.grad_clip_norm.is_nan() || self.grad_clip_norm <= 0.0 {
            return err("grad_clip_norm", "must be > 0");
        }
        if self.batch_size == Some(0) {
            return err("batch_size", "must be at least 1");
        }
        if let Some(axes) = &self.mirror_axes {
            if axes.iter().any(|&a| a > 2) {
                return err("mirror_axes", "holds spatial axis indices 0, 1 or 2");
            }
        }
        Ok(())
    }

    /// The network this configuration trains: `base` (the plans' architecture) with
    /// `network_override` resolved through `registry` (an unknown name is an error listing the
    /// known ones) and `network_kwargs` merged over its `arch_kwargs`.
    pub fn network_spec(
        &self,
        base: &plans::ArchitectureSpec,
        registry: &architectures::registry::Registry,
    ) -> Result<plans::ArchitectureSpec, architectures::network::ArchError> {
        let mut spec = base.clone();
        if let Some(name) = &self.network_override {
            spec.network_class_name = registry.get(name)?.name().to_string();
        }
        for (k, v) in &self.network_kwargs {
            spec.arch_kwargs.insert(k.clone(), v.clone());
        }
        Ok(spec)
    }

    /// The mirroring axes for a network with `spatial_dims` spatial axes (nnU-Net's
    /// `configure_rotation_dummyDA_mirroring_and_inital_patch_size`: all axes by default).
    pub fn resolved_mirror_axes(&self, spatial_dims: usize) -> Vec<usize> {
        match &self.mirror_axes {
            Some(a) => a.iter().copied().filter(|&x| x < spatial_dims).collect(),
            None => (0..spatial_dims).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_nnunets() {
        let c = TrainerConfig::default();
        assert_eq!(c.num_epochs, 1000);
        assert_eq!(c.num_iterations_per_epoch, 250);
        assert_eq!(c.num_val_iterations_per_epoch, 50);
        assert_eq!(c.initial_lr, 1e-2);
        assert_eq!(c.weight_decay, 3e-5);
        assert_eq!(c.momentum, 0.99);
        assert_eq!(c.oversample_foreground_percent, 0.33);
        assert!(c.enable_deep_supervision);
        assert_eq!(c.save_every, 50);
        assert_eq!(c.grad_clip_norm, 12.0);
        assert!(c.validate().is_ok());
        assert_eq!(c.resolved_mirror_axes(3), vec![0, 1, 2]);
        assert_eq!(c.resolved_mirror_axes(2), vec![0, 1]);
    }

    #[test]
    fn serde_round_trip_and_partial_json() {
        let c = TrainerConfig {
            num_epochs: 7,
            mirror_axes: Some(vec![0, 1]),
            network_override: Some("KiUNet".into()),
            batch_size: Some(3),
            amp: crate::amp::Amp::Off,
            ..Default::default()
        };
        let s = serde_json::to_string(&c).unwrap();
        let back: TrainerConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
        let partial: TrainerConfig = serde_json::from_str(r#"{"num_epochs": 5}"#).unwrap();
        assert_eq!(partial.num_epochs, 5);
        assert_eq!(partial.num_iterations_per_epoch, 250);
        assert_eq!(partial.amp, crate::amp::Amp::Auto);
        let on: TrainerConfig = serde_json::from_str(r#"{"amp": "on"}"#).unwrap();
        assert_eq!(on.amp, crate::amp::Amp::On);
        let typo = serde_json::from_str::<TrainerConfig>(r#"{"num_epoch": 5}"#);
        assert!(typo.unwrap_err().to_string().contains("num_epoch"));
    }

    #[test]
    fn validation_rejects_bad_values() {
        let bad = TrainerConfig {
            momentum: 1.5,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "momentum");
        let bad = TrainerConfig {
            num_epochs: 0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("num_epochs"));
        let bad = TrainerConfig {
            mirror_axes: Some(vec![3]),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
