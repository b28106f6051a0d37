//! Planner presets: nnU-Net's `ExperimentPlanner` and the residual-encoder presets
//! `nnUNetPlannerResEnc{M,L,XL}` (`residual_unets/residual_encoder_unet_planners.py`).

use crate::arch_memory::UNetVariant;

/// Which nnU-Net planner to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlannerKind {
    /// `ExperimentPlanner` (`-pl ExperimentPlanner`, plans `nnUNetPlans`).
    ExperimentPlanner,
    /// `nnUNetPlannerResEncM` (8 GB).
    ResEncM,
    /// `nnUNetPlannerResEncL` (24 GB).
    ResEncL,
    /// `nnUNetPlannerResEncXL` (40 GB).
    ResEncXL,
}

/// Which `while` condition the patch-shrinking loop uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShrinkCondition {
    /// `ExperimentPlanner`: `estimate / ref_bs * 2 > reference`.
    PerSampleTimesTwo,
    /// `ResEncUNetPlanner`: `estimate > reference`.
    Plain,
}

/// The constants of one planner class.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannerConstants {
    pub class_name: &'static str,
    pub default_plans_name: &'static str,
    pub variant: UNetVariant,
    pub default_gpu_memory_target_gb: f64,
    pub reference_val_corresp_gb: f64,
    pub reference_val_3d: f64,
    pub reference_val_2d: f64,
    pub reference_bs_3d: usize,
    pub reference_bs_2d: usize,
    /// `n_conv_per_stage` (plain) or `n_blocks_per_stage` (residual), sliced to `n_stages`.
    pub blocks_per_stage_encoder: &'static [usize],
    pub blocks_per_stage_decoder: &'static [usize],
    pub max_dataset_covered: f64,
    pub base_num_features: usize,
    pub max_features_2d: usize,
    pub max_features_3d: usize,
    pub featuremap_min_edge_length: usize,
    pub min_batch_size: usize,
    pub shrink_condition: ShrinkCondition,
    /// ResEnc planners reuse `nnUNetPlans_2d` / `nnUNetPlans_3d_fullres` preprocessed data.
    pub reuse_default_data_identifiers: bool,
}

const PLAIN_ENC: [usize; 14] = [2; 14];
const PLAIN_DEC: [usize; 13] = [2; 13];
const RES_ENC: [usize; 13] = [1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6];
const RES_DEC: [usize; 12] = [1; 12];

/// nnU-Net's `configuration.ANISO_THRESHOLD`.
pub const ANISO_THRESHOLD: f64 = 3.0;
/// `lowres_creation_threshold`: a 3d_lowres is planned while the fullres patch covers less than
/// this fraction of the median image.
pub const LOWRES_CREATION_THRESHOLD: f64 = 0.25;
/// Spacing growth per 3d_lowres iteration ("used to be 1.01 but that is slow").
pub const LOWRES_SPACING_INCREASE_FACTOR: f64 = 1.03;

impl PlannerKind {
    /// All presets.
    pub const ALL: [PlannerKind; 4] = [
        PlannerKind::ExperimentPlanner,
        PlannerKind::ResEncM,
        PlannerKind::ResEncL,
        PlannerKind::ResEncXL,
    ];

    /// The `-pl` name (= nnU-Net class name, written as `experiment_planner_used`).
    pub fn cli_name(self) -> &'static str {
        self.constants().class_name
    }

    /// Parse a `-pl` value. Accepts the nnU-Net class names and the short forms `ResEncM` etc.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "ExperimentPlanner" | "default" => Some(PlannerKind::ExperimentPlanner),
            "nnUNetPlannerResEncM" | "ResEncM" => Some(PlannerKind::ResEncM),
            "nnUNetPlannerResEncL" | "ResEncL" => Some(PlannerKind::ResEncL),
            "nnUNetPlannerResEncXL" | "ResEncXL" => Some(PlannerKind::ResEncXL),
            _ => None,
        }
    }

    /// The constants table (nnunet-v2.md §3.1).
    pub fn constants(self) -> PlannerConstants {
        let base = PlannerConstants {
            class_name: "ExperimentPlanner",
            default_plans_name: "nnUNetPlans",
            variant: UNetVariant::PlainConv,
            default_gpu_memory_target_gb: 8.0,
            reference_val_corresp_gb: 8.0,
            reference_val_3d: 560_000_000.0,
            reference_val_2d: 85_000_000.0,
            reference_bs_3d: 2,
            reference_bs_2d: 12,
            blocks_per_stage_encoder: &PLAIN_ENC,
            blocks_per_stage_decoder: &PLAIN_DEC,
            max_dataset_covered: 0.05,
            base_num_features: 32,
            max_features_2d: 512,
            max_features_3d: 320,
            featuremap_min_edge_length: 4,
            min_batch_size: 2,
            shrink_condition: ShrinkCondition::PerSampleTimesTwo,
            reuse_default_data_identifiers: false,
        };
        let resenc = PlannerConstants {
            variant: UNetVariant::ResidualEncoder,
            blocks_per_stage_encoder: &RES_ENC,
            blocks_per_stage_decoder: &RES_DEC,
            shrink_condition: ShrinkCondition::Plain,
            reuse_default_data_identifiers: true,
            max_dataset_covered: 1.0,
            ..base.clone()
        };
        match self {
            PlannerKind::ExperimentPlanner => base,
            PlannerKind::ResEncM => PlannerConstants {
                class_name: "nnUNetPlannerResEncM",
                default_plans_name: "nnUNetResEncUNetMPlans",
                default_gpu_memory_target_gb: 8.0,
                reference_val_corresp_gb: 8.0,
                reference_val_3d: 680_000_000.0,
                reference_val_2d: 135_000_000.0,
                ..resenc
            },
            PlannerKind::ResEncL => PlannerConstants {
                class_name: "nnUNetPlannerResEncL",
                default_plans_name: "nnUNetResEncUNetLPlans",
                default_gpu_memory_target_gb: 24.0,
                reference_val_corresp_gb: 24.0,
                reference_val_3d: 2_100_000_000.0,
                reference_val_2d: 380_000_000.0,
                ..resenc
            },
            PlannerKind::ResEncXL => PlannerConstants {
                class_name: "nnUNetPlannerResEncXL",
                default_plans_name: "nnUNetResEncUNetXLPlans",
                default_gpu_memory_target_gb: 40.0,
                reference_val_corresp_gb: 40.0,
                reference_val_3d: 3_600_000_000.0,
                reference_val_2d: 560_000_000.0,
                ..resenc
            },
        }
    }
}

impl PlannerConstants {
    /// dna class path written as `network_class_name`.
    pub fn network_class_name(&self) -> &'static str {
        match self.variant {
            UNetVariant::PlainConv => {
                "dynamic_network_architectures.architectures.unet.PlainConvUNet"
            }
            UNetVariant::ResidualEncoder => {
                "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
            }
        }
    }

    /// `arch_kwargs` key holding the encoder depth per stage.
    pub fn encoder_blocks_key(&self) -> &'static str {
        match self.variant {
            UNetVariant::PlainConv => "n_conv_per_stage",
            UNetVariant::ResidualEncoder => "n_blocks_per_stage",
        }
    }

    /// `features_per_stage[i] = min(max_features, base * 2**i)`.
    pub fn features_per_stage(&self, n_stages: usize, dim: usize) -> Vec<usize> {
        let max_f = if dim == 2 {
            self.max_features_2d
        } else {
            self.max_features_3d
        };
        (0..n_stages)
            .map(|i| {
                let f = self
                    .base_num_features
                    .saturating_mul(1usize.checked_shl(i as u32).unwrap_or(usize::MAX));
                f.min(max_f)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip() {
        for k in PlannerKind::ALL {
            assert_eq!(PlannerKind::from_name(k.cli_name()), Some(k));
        }
        assert_eq!(
            PlannerKind::from_name("nnUNetPlannerResEncXL"),
            Some(PlannerKind::ResEncXL)
        );
        assert_eq!(PlannerKind::from_name("nnUNetPlannerXYZ"), None);
    }

    #[test]
    fn table_values() {
        let l = PlannerKind::ResEncL.constants();
        assert_eq!(l.default_plans_name, "nnUNetResEncUNetLPlans");
        assert_eq!(l.reference_val_3d, 2.1e9);
        assert_eq!(l.max_dataset_covered, 1.0);
        assert_eq!(l.blocks_per_stage_encoder[..6], [1, 3, 4, 6, 6, 6]);
        let d = PlannerKind::ExperimentPlanner.constants();
        assert_eq!(d.max_dataset_covered, 0.05);
        assert_eq!(
            d.features_per_stage(7, 2),
            vec![32, 64, 128, 256, 512, 512, 512]
        );
        assert_eq!(d.features_per_stage(6, 3), vec![32, 64, 128, 256, 320, 320]);
        assert_eq!(d.features_per_stage(70, 3)[69], 320);
    }
}
