//! ConvUNext options: a normal nnU-Net `arch_kwargs` (PlainConvUNet or ResidualEncoderUNet plan)
//! plus the ConvUNext keys documented in [`super`]. Every error names its JSON path.

use crate::kwargs::{self, invalid, key_path, Choice, Choices, IntOrList};
use crate::network::{ArchError, NetworkIo};
use crate::unet::options::{UNetConfig, UNetKwargs};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The ConvUNext keys of `arch_kwargs` (see [`super`]), typed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ConvUNextKwargs {
    /// A name of [`VARIANTS`] (defaults for the keys below).
    pub variant: Option<String>,
    pub depth: Option<usize>,
    pub initial_filters: Option<usize>,
    pub blocks_per_level: Option<usize>,
    pub drop_path_rate: Option<f64>,
    pub convnext_version: Option<Choice<BlockVersion>>,
    pub block_form: Option<Choice<BlockForm>>,
    pub use_bias: Option<bool>,
    /// Odd depthwise kernel: one for every axis or one per spatial axis.
    pub dw_kernel: Option<IntOrList>,
    /// Odd stem kernel: one for every axis or one per spatial axis.
    pub stem_kernel: Option<IntOrList>,
    pub expansion: Option<usize>,
    pub expansion_level0: Option<usize>,
}

/// The ConvUNext keys ([`ConvUNextKwargs`]).
pub fn own_keys() -> &'static [&'static str] {
    kwargs::keys::<ConvUNextKwargs>()
}

impl Choices for BlockVersion {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("v1", BlockVersion::V1), ("v2", BlockVersion::V2)];
}

impl Choices for BlockForm {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("paper", BlockForm::Paper),
        ("residual", BlockForm::Residual),
        ("seed", BlockForm::Seed),
    ];
}

/// ConvNeXt block generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockVersion {
    /// LayerScale, no GRN.
    V1,
    /// GRN after GELU.
    V2,
}

/// Which of the three block forms to build (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockForm {
    /// facebookresearch ConvNeXt(-V2): `x + DropPath(block(x))`; V2 has no block γ and
    /// GRN γ = β = 0 at init; V1 has LayerScale γ = 1e-6.
    Paper,
    /// The seed code after its upstream fix (the fixture's form): `x + DropPath(γ·block(x))`,
    /// γ per channel init 1 projected to [0, 1], GRN γ = 1 at init.
    Residual,
    /// The seed commit as written: `γ·block(x)` with no residual, plain dropout inside the
    /// block, γ init 1 projected to [0, 1], GRN γ = 1 at init.
    Seed,
}

impl BlockForm {
    /// Whether the block has its own per-channel γ.
    pub fn has_gamma(self, version: BlockVersion) -> bool {
        !(self == BlockForm::Paper && version == BlockVersion::V2)
    }
    /// Whether γ is projected to [0, 1] (the seed's `ValueRangeConstraint`).
    pub fn clips_gamma(self) -> bool {
        self != BlockForm::Paper
    }
    /// Initial value of the block γ.
    pub fn gamma_init(self) -> f64 {
        match self {
            BlockForm::Paper => 1e-6,
            _ => 1.0,
        }
    }
    /// Initial value of the GRN γ.
    pub fn grn_gamma_init(self) -> f64 {
        match self {
            BlockForm::Paper => 0.0,
            _ => 1.0,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            BlockForm::Paper => "paper",
            BlockForm::Residual => "residual",
            BlockForm::Seed => "seed",
        }
    }
}

/// A seed variant (`MODEL_VARIANTS`, all ConvNeXt V2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    pub name: &'static str,
    pub depth: usize,
    pub initial_filters: usize,
    pub blocks_per_level: usize,
    pub drop_path_rate: f64,
}

/// The seed's variant table.
pub const VARIANTS: [Variant; 5] = [
    Variant {
        name: "tiny",
        depth: 3,
        initial_filters: 32,
        blocks_per_level: 2,
        drop_path_rate: 0.0,
    },
    Variant {
        name: "small",
        depth: 3,
        initial_filters: 48,
        blocks_per_level: 2,
        drop_path_rate: 0.1,
    },
    Variant {
        name: "base",
        depth: 4,
        initial_filters: 64,
        blocks_per_level: 3,
        drop_path_rate: 0.1,
    },
    Variant {
        name: "large",
        depth: 4,
        initial_filters: 96,
        blocks_per_level: 4,
        drop_path_rate: 0.2,
    },
    Variant {
        name: "xlarge",
        depth: 5,
        initial_filters: 128,
        blocks_per_level: 5,
        drop_path_rate: 0.3,
    },
];

/// A fully resolved ConvUNext.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvUNextConfig {
    /// 2 or 3 spatial dims.
    pub dim: usize,
    pub input_channels: usize,
    pub num_classes: usize,
    pub deep_supervision: bool,
    /// Number of poolings; there are `depth + 1` resolution levels (the last is the
    /// bottleneck).
    pub depth: usize,
    /// Channels per level, `depth + 1` entries.
    pub features: Vec<usize>,
    /// Pooling (and upsampling) factor below level `l`, `depth` entries (the plan's
    /// `strides[l + 1]`).
    pub pool: Vec<Vec<usize>>,
    /// Depthwise kernel per level, `depth + 1` entries.
    pub dw_kernels: Vec<Vec<usize>>,
    pub stem_kernel: Vec<usize>,
    pub blocks_per_level: usize,
    /// Expansion of the inverted bottleneck per level, `depth + 1` entries.
    pub expansions: Vec<usize>,
    pub drop_path_rate: f64,
    pub version: BlockVersion,
    pub form: BlockForm,
    pub use_bias: bool,
}

impl ConvUNextConfig {
    /// Drop rate of block `b` at level `level` (`level == depth`: bottleneck, full rate).
    pub fn drop_rate(&self, level: usize, b: usize) -> f64 {
        if level >= self.depth {
            return self.drop_path_rate;
        }
        let bpl = self.blocks_per_level;
        self.drop_path_rate * (level * bpl + b) as f64 / (self.depth * bpl).max(1) as f64
    }

    /// Spatial size of each level for an input `patch` (`depth + 1` entries).
    pub fn level_sizes(&self, patch: &[usize]) -> Vec<Vec<usize>> {
        let mut out = vec![patch.to_vec()];
        for p in &self.pool {
            let last = out.last().cloned().unwrap_or_default();
            out.push(last.iter().zip(p).map(|(&n, &s)| n / s.max(1)).collect());
        }
        out
    }

    /// Parses `arch_kwargs`. `path` is the JSON path of the kwargs object.
    pub fn from_kwargs(
        kwargs: &Map<String, Value>,
        path: &str,
        io: &NetworkIo,
    ) -> Result<Self, ArchError> {
        let key = |k: &str| key_path(path, k);
        let residual_plan = kwargs.contains_key("n_blocks_per_stage");
        let known: Vec<&str> = UNetKwargs::keys(residual_plan)
            .iter()
            .chain(own_keys())
            .copied()
            .collect();
        kwargs::reject_unknown(kwargs, path, &known)?;
        let own: ConvUNextKwargs = kwargs::typed(kwargs, path)?;
        let plan =
            UNetConfig::from_typed(&UNetKwargs::parse(kwargs, path)?, path, residual_plan, io)?;
        let dim = plan.dim().n();
        let n_stages = plan.n_stages();
        if n_stages < 2 {
            return Err(invalid(
                &key("n_stages"),
                "ConvUNext needs at least 2 stages (one pooling)",
            ));
        }
        if plan.strides[0].iter().any(|&s| s != 1) {
            return Err(invalid(
                &format!("{}[0]", key("strides")),
                format!(
                    "ConvUNext's stem keeps full resolution; the first stride must be 1, got {:?}",
                    plan.strides[0]
                ),
            ));
        }

        let variant = own.variant(path)?;
        let depth = own.depth(variant, n_stages, path)?;
        let initial_filters = match own.initial_filters {
            Some(0) => return Err(invalid(&key("initial_filters"), "must be at least 1")),
            Some(f) => Some(f),
            None => variant.map(|v| v.initial_filters),
        };
        let features: Vec<usize> = match initial_filters {
            Some(f0) => (0..=depth).map(|i| f0 << i).collect(),
            None => plan.features_per_stage[..=depth].to_vec(),
        };
        let blocks_per_level = match own.blocks_per_level {
            Some(0) => return Err(invalid(&key("blocks_per_level"), "must be at least 1")),
            Some(b) => b,
            None => variant.map_or(2, |v| v.blocks_per_level),
        };
        let drop_path_rate = match own.drop_path_rate {
            None => variant.map_or(0.0, |v| v.drop_path_rate),
            Some(p) if (0.0..1.0).contains(&p) => p,
            Some(p) => {
                return Err(invalid(
                    &key("drop_path_rate"),
                    format!("must be in [0, 1), got {p}"),
                ))
            }
        };
        let version = own.convnext_version.map_or(BlockVersion::V2, |c| c.0);
        let form = own.block_form.map_or(BlockForm::Paper, |c| c.0);
        let use_bias = own.use_bias.unwrap_or(true);
        let dw = odd_kernel(&own.dw_kernel, dim, &key("dw_kernel"))?;
        let stem = odd_kernel(&own.stem_kernel, dim, &key("stem_kernel"))?;
        // clip to the plan's anisotropy: an axis the plan convolves with 1 stays 1
        let clip = |k: &[usize], plan_k: &[usize]| -> Vec<usize> {
            k.iter()
                .zip(plan_k)
                .map(|(&k, &p)| if p == 1 { 1 } else { k })
                .collect()
        };
        let dw_kernels = (0..=depth)
            .map(|l| clip(&dw, &plan.kernel_sizes[l]))
            .collect();
        let stem_kernel = clip(&stem, &plan.kernel_sizes[0]);
        let expansions = own.expansions(depth, dim, path)?;
        Ok(ConvUNextConfig {
            dim,
            input_channels: io.in_channels,
            num_classes: io.num_classes,
            deep_supervision: io.deep_supervision,
            depth,
            features,
            pool: plan.strides[1..=depth].to_vec(),
            dw_kernels,
            stem_kernel,
            blocks_per_level,
            expansions,
            drop_path_rate,
            version,
            form,
            use_bias,
        })
    }
}

impl ConvUNextKwargs {
    /// The named variant, if any.
    fn variant(&self, path: &str) -> Result<Option<Variant>, ArchError> {
        let Some(s) = &self.variant else {
            return Ok(None);
        };
        VARIANTS
            .iter()
            .find(|v| v.name == s.as_str())
            .copied()
            .map(Some)
            .ok_or_else(|| {
                invalid(
                    &key_path(path, "variant"),
                    format!(
                        "unknown variant `{s}`; known: {}",
                        VARIANTS.map(|v| v.name).join(", ")
                    ),
                )
            })
    }

    /// Number of poolings: `depth`, else the variant's or the plan's (a variant deeper than
    /// the plan is clipped to the plan's poolings).
    fn depth(
        &self,
        variant: Option<Variant>,
        n_stages: usize,
        path: &str,
    ) -> Result<usize, ArchError> {
        let p = key_path(path, "depth");
        let depth = match self.depth {
            Some(d) => d,
            None => variant.map_or(n_stages - 1, |v| v.depth.min(n_stages - 1)),
        };
        if depth == 0 {
            return Err(invalid(&p, "must be at least 1"));
        }
        if depth > n_stages - 1 {
            return Err(invalid(
                &p,
                format!(
                    "{depth} poolings, but the plan has only {} strides below full resolution \
                     (n_stages = {n_stages}); use a smaller depth or a plan with more stages",
                    n_stages - 1
                ),
            ));
        }
        Ok(depth)
    }

    /// The MLP expansion of each level (`expansion_level0` at full resolution: 1 in 3D).
    fn expansions(&self, depth: usize, dim: usize, path: &str) -> Result<Vec<usize>, ArchError> {
        let expansion = self.expansion.unwrap_or(4);
        if expansion == 0 {
            return Err(invalid(&key_path(path, "expansion"), "must be at least 1"));
        }
        let level0 = match self.expansion_level0 {
            Some(0) => {
                return Err(invalid(
                    &key_path(path, "expansion_level0"),
                    "must be at least 1",
                ))
            }
            Some(e) => e,
            None if dim == 3 => 1,
            None => expansion,
        };
        let mut expansions = vec![expansion; depth + 1];
        expansions[0] = level0;
        Ok(expansions)
    }
}

/// An odd kernel size (default 7): an int (all axes) or a list with one int per spatial axis.
fn odd_kernel(v: &Option<IntOrList>, dim: usize, path: &str) -> Result<Vec<usize>, ArchError> {
    let odd = |x: usize, p: &str| {
        if x % 2 == 1 {
            Ok(x)
        } else {
            Err(invalid(
                p,
                format!("expected an odd positive integer (\"same\" padding), got {x}"),
            ))
        }
    };
    match v {
        None => Ok(vec![7; dim]),
        Some(IntOrList::All(x)) => Ok(vec![odd(*x, path)?; dim]),
        Some(IntOrList::Each(a)) if a.len() != dim => Err(invalid(
            path,
            format!(
                "has {} entries, expected {dim} (one per spatial axis)",
                a.len()
            ),
        )),
        Some(IntOrList::Each(a)) => a
            .iter()
            .enumerate()
            .map(|(i, &x)| odd(x, &format!("{path}[{i}]")))
            .collect(),
    }
}
