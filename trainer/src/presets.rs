//! Named trainer presets: nnU-Net's `-tr` trainer classes that only change hyper-parameters.
//!
//! A [`Presets`] value (not a global) maps names to [`TrainerConfig`]s;
//! [`Presets::default`] holds nnU-Net's `nnUNetTrainer` and its training-length, mirroring and
//! deep-supervision variants. Later features add their own entries with
//! [`Presets::register`] (for example a preset with a
//! [`TrainerConfig::network_override`]).

use crate::config::TrainerConfig;

/// Unknown or duplicate preset names.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PresetError {
    /// `get` was asked for a name nobody registered.
    #[error("unknown trainer `{name}`; known trainers: {}", known.join(", "))]
    Unknown {
        /// The requested name.
        name: String,
        /// Every registered name, in registration order.
        known: Vec<String>,
    },
    /// `register` was given a name that already exists.
    #[error("trainer preset `{0}` is registered twice")]
    Duplicate(String),
}

/// The epoch counts of nnU-Net's `nnUNetTrainer_{N}epochs` classes.
pub const EPOCH_VARIANTS: [usize; 11] = [5, 10, 20, 50, 100, 250, 500, 750, 2000, 4000, 8000];

/// An ordered name → [`TrainerConfig`] table.
#[derive(Debug, Clone)]
pub struct Presets {
    entries: Vec<(String, TrainerConfig)>,
}

impl Default for Presets {
    fn default() -> Self {
        let base = TrainerConfig::default();
        let mut entries = vec![("nnUNetTrainer".to_string(), base.clone())];
        entries.push((
            "nnUNetTrainer_1epoch".to_string(),
            TrainerConfig {
                num_epochs: 1,
                ..base.clone()
            },
        ));
        for n in EPOCH_VARIANTS {
            entries.push((
                format!("nnUNetTrainer_{n}epochs"),
                TrainerConfig {
                    num_epochs: n,
                    ..base.clone()
                },
            ));
        }
        entries.push((
            "nnUNetTrainerNoDeepSupervision".to_string(),
            TrainerConfig {
                enable_deep_supervision: false,
                ..base.clone()
            },
        ));
        entries.push((
            "nnUNetTrainerNoMirroring".to_string(),
            TrainerConfig {
                mirror_axes: Some(vec![]),
                ..base.clone()
            },
        ));
        entries.push((
            "nnUNetTrainer_onlyMirror01".to_string(),
            TrainerConfig {
                mirror_axes: Some(vec![0, 1]),
                ..base.clone()
            },
        ));
        entries.push((
            "nnUNetTrainerNoDA".to_string(),
            TrainerConfig {
                data_augmentation: false,
                mirror_axes: Some(vec![]),
                ..base.clone()
            },
        ));
        let mut p = Presets { entries };
        p.add_architecture_presets(&architectures::registry::Registry::default(), &base);
        p
    }
}

impl Presets {
    /// Adds every architecture preset of `registry` (`kiunet_minimal`, `convunext_tiny`, ...)
    /// as `base` with the network swapped and the preset's kwargs; names already present are
    /// left alone.
    pub fn add_architecture_presets(
        &mut self,
        registry: &architectures::registry::Registry,
        base: &TrainerConfig,
    ) {
        for (arch, preset) in registry.presets() {
            if self.entries.iter().any(|(n, _)| *n == preset.name) {
                continue;
            }
            let cfg = TrainerConfig {
                network_override: Some(arch),
                network_kwargs: preset.kwargs,
                ..base.clone()
            };
            self.entries.push((preset.name, cfg));
        }
    }

    /// A table without entries.
    pub fn empty() -> Self {
        Presets { entries: vec![] }
    }

    /// Adds a preset; the name must be new.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        config: TrainerConfig,
    ) -> Result<(), PresetError> {
        let name = name.into();
        if self.entries.iter().any(|(n, _)| *n == name) {
            return Err(PresetError::Duplicate(name));
        }
        self.entries.push((name, config));
        Ok(())
    }

    /// The configuration registered under `name`.
    pub fn get(&self, name: &str) -> Result<TrainerConfig, PresetError> {
        self.entries
            .iter()
            .find(|(n, _)| n == name.trim())
            .map(|(_, c)| c.clone())
            .ok_or_else(|| PresetError::Unknown {
                name: name.to_string(),
                known: self.names(),
            })
    }

    /// Every name, in registration order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// [`Presets::get`] on the default table.
pub fn get(name: &str) -> Result<TrainerConfig, PresetError> {
    Presets::default().get(name)
}

/// [`Presets::names`] of the default table.
pub fn names() -> Vec<String> {
    Presets::default().names()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nnunet_names_exist_with_their_settings() {
        let p = Presets::default();
        assert_eq!(p.get("nnUNetTrainer").unwrap(), TrainerConfig::default());
        assert_eq!(p.get("nnUNetTrainer_1epoch").unwrap().num_epochs, 1);
        for (name, epochs) in [
            ("nnUNetTrainer_5epochs", 5),
            ("nnUNetTrainer_10epochs", 10),
            ("nnUNetTrainer_20epochs", 20),
            ("nnUNetTrainer_50epochs", 50),
            ("nnUNetTrainer_100epochs", 100),
            ("nnUNetTrainer_250epochs", 250),
            ("nnUNetTrainer_500epochs", 500),
            ("nnUNetTrainer_750epochs", 750),
            ("nnUNetTrainer_2000epochs", 2000),
            ("nnUNetTrainer_4000epochs", 4000),
            ("nnUNetTrainer_8000epochs", 8000),
        ] {
            let c = p.get(name).unwrap();
            assert_eq!(c.num_epochs, epochs, "{name}");
            assert_eq!(c.num_iterations_per_epoch, 250, "{name}");
        }
        assert!(
            !p.get("nnUNetTrainerNoDeepSupervision")
                .unwrap()
                .enable_deep_supervision
        );
        assert_eq!(
            p.get("nnUNetTrainerNoMirroring").unwrap().mirror_axes,
            Some(vec![])
        );
        assert_eq!(
            p.get("nnUNetTrainer_onlyMirror01").unwrap().mirror_axes,
            Some(vec![0, 1])
        );
        assert_eq!(names(), p.names());
        assert_eq!(get("nnUNetTrainer_1epoch").unwrap().num_epochs, 1);
    }

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let msg = get("nnUNetTrainer_3epochs").unwrap_err().to_string();
        assert!(
            msg.contains("unknown trainer `nnUNetTrainer_3epochs`"),
            "{msg}"
        );
        assert!(msg.contains("nnUNetTrainer_8000epochs"), "{msg}");
        assert!(msg.contains("nnUNetTrainerNoMirroring"), "{msg}");
    }

    #[test]
    fn register_extends_and_rejects_duplicates() {
        let mut p = Presets::default();
        let kiunet = TrainerConfig {
            network_override: Some("KiUNet".into()),
            ..Default::default()
        };
        p.register("my_kiunet", kiunet.clone()).unwrap();
        assert_eq!(p.get("my_kiunet").unwrap(), kiunet);
        assert_eq!(
            p.register("my_kiunet", kiunet),
            Err(PresetError::Duplicate("my_kiunet".into()))
        );
        // the default table is a value: unaffected
        assert!(Presets::default().get("my_kiunet").is_err());
        // the architecture presets are in the default table, with their network and kwargs
        let k = Presets::default().get("kiunet_minimal").unwrap();
        assert_eq!(
            k.network_override.as_deref(),
            Some("nnseg.architectures.KiUNet")
        );
        assert_eq!(
            k.network_kwargs.get("feature_scale"),
            Some(&serde_json::json!(0.5))
        );
        assert_eq!(k.num_epochs, 1000);
        assert!(Presets::empty().names().is_empty());
    }
}
