//! ConvUNext options: a normal nnU-Net `arch_kwargs` (PlainConvUNet or ResidualEncoderUNet plan)
//! plus the ConvUNext keys documented in [`super`]. Every error names its JSON path.

use crate::network::{ArchError, NetworkIo};
use crate::unet::options::{invalid, UNetConfig};
use serde_json::{Map, Value};

/// The ConvUNext keys this module reads (everything else goes to the nnU-Net parser, which
/// rejects unknown keys).
pub const OWN_KEYS: &[&str] = &[
    "variant",
    "depth",
    "initial_filters",
    "blocks_per_level",
    "drop_path_rate",
    "convnext_version",
    "block_form",
    "use_bias",
    "dw_kernel",
    "stem_kernel",
    "expansion",
    "expansion_level0",
];

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
        let key = |k: &str| {
            if path.is_empty() {
                k.to_string()
            } else {
                format!("{path}.{k}")
            }
        };
        // nnU-Net part: everything that is not ours
        let mut rest = kwargs.clone();
        let mut own = Map::new();
        for k in OWN_KEYS {
            if let Some(v) = rest.remove(*k) {
                if !v.is_null() {
                    own.insert((*k).to_string(), v);
                }
            }
        }
        let residual_plan = rest.contains_key("n_blocks_per_stage");
        let plan = UNetConfig::from_kwargs(
            &rest,
            path,
            residual_plan,
            io.in_channels,
            io.num_classes,
            io.deep_supervision,
        )?;
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

        let variant = match own.get("variant") {
            None => None,
            Some(Value::String(s)) => Some(
                VARIANTS
                    .iter()
                    .find(|v| v.name == s.as_str())
                    .copied()
                    .ok_or_else(|| {
                        invalid(
                            &key("variant"),
                            format!(
                                "unknown variant `{s}`; known: {}",
                                VARIANTS.map(|v| v.name).join(", ")
                            ),
                        )
                    })?,
            ),
            Some(v) => {
                return Err(invalid(
                    &key("variant"),
                    format!("expected a variant name string, got {v}"),
                ))
            }
        };

        let depth = match get_usize(&own, "depth", &key)? {
            Some(d) => d,
            // a variant deeper than the plan is clipped to the plan's poolings
            None => variant.map_or(n_stages - 1, |v| v.depth.min(n_stages - 1)),
        };
        if depth == 0 {
            return Err(invalid(&key("depth"), "must be at least 1"));
        }
        if depth > n_stages - 1 {
            return Err(invalid(
                &key("depth"),
                format!(
                    "{depth} poolings, but the plan has only {} strides below full resolution \
                     (n_stages = {n_stages}); use a smaller depth or a plan with more stages",
                    n_stages - 1
                ),
            ));
        }
        let initial_filters = match get_usize(&own, "initial_filters", &key)? {
            Some(0) => return Err(invalid(&key("initial_filters"), "must be at least 1")),
            Some(f) => Some(f),
            None => variant.map(|v| v.initial_filters),
        };
        let features: Vec<usize> = match initial_filters {
            Some(f0) => (0..=depth).map(|i| f0 << i).collect(),
            None => plan.features_per_stage[..=depth].to_vec(),
        };
        let blocks_per_level = match get_usize(&own, "blocks_per_level", &key)? {
            Some(0) => return Err(invalid(&key("blocks_per_level"), "must be at least 1")),
            Some(b) => b,
            None => variant.map_or(2, |v| v.blocks_per_level),
        };
        let drop_path_rate = match own.get("drop_path_rate") {
            None => variant.map_or(0.0, |v| v.drop_path_rate),
            Some(v) => {
                let p = v.as_f64().ok_or_else(|| {
                    invalid(
                        &key("drop_path_rate"),
                        format!("expected a number, got {v}"),
                    )
                })?;
                if !(0.0..1.0).contains(&p) {
                    return Err(invalid(
                        &key("drop_path_rate"),
                        format!("must be in [0, 1), got {p}"),
                    ));
                }
                p
            }
        };
        let version = match get_str(&own, "convnext_version", &key)? {
            None | Some("v2") => BlockVersion::V2,
            Some("v1") => BlockVersion::V1,
            Some(s) => {
                return Err(invalid(
                    &key("convnext_version"),
                    format!("expected \"v1\" or \"v2\", got \"{s}\""),
                ))
            }
        };
        let form = match get_str(&own, "block_form", &key)? {
            None | Some("paper") => BlockForm::Paper,
            Some("residual") => BlockForm::Residual,
            Some("seed") => BlockForm::Seed,
            Some(s) => {
                return Err(invalid(
                    &key("block_form"),
                    format!("expected \"paper\", \"residual\" or \"seed\", got \"{s}\""),
                ))
            }
        };
        let use_bias = match own.get("use_bias") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(invalid(
                    &key("use_bias"),
                    format!("expected true or false, got {v}"),
                ))
            }
        };
        let dw = get_kernel(&own, "dw_kernel", dim, &key)?.unwrap_or(vec![7; dim]);
        let stem = get_kernel(&own, "stem_kernel", dim, &key)?.unwrap_or(vec![7; dim]);
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
        let expansion = get_usize(&own, "expansion", &key)?.unwrap_or(4);
        if expansion == 0 {
            return Err(invalid(&key("expansion"), "must be at least 1"));
        }
        let expansion_level0 = match get_usize(&own, "expansion_level0", &key)? {
            Some(0) => return Err(invalid(&key("expansion_level0"), "must be at least 1")),
            Some(e) => e,
            None if dim == 3 => 1,
            None => expansion,
        };
        let mut expansions = vec![expansion; depth + 1];
        expansions[0] = expansion_level0;
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

fn get_usize(
    m: &Map<String, Value>,
    k: &str,
    key: &dyn Fn(&str) -> String,
) -> Result<Option<usize>, ArchError> {
    match m.get(k) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|u| Some(u as usize))
            .ok_or_else(|| invalid(&key(k), format!("expected a non-negative integer, got {v}"))),
    }
}

fn get_str<'a>(
    m: &'a Map<String, Value>,
    k: &str,
    key: &dyn Fn(&str) -> String,
) -> Result<Option<&'a str>, ArchError> {
    match m.get(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(invalid(&key(k), format!("expected a string, got {v}"))),
    }
}

/// An odd kernel size: an int (all axes) or a list with one int per spatial axis.
fn get_kernel(
    m: &Map<String, Value>,
    k: &str,
    dim: usize,
    key: &dyn Fn(&str) -> String,
) -> Result<Option<Vec<usize>>, ArchError> {
    let p = key(k);
    let one = |v: &Value, path: &str| -> Result<usize, ArchError> {
        match v.as_u64() {
            Some(x) if x % 2 == 1 => Ok(x as usize),
            _ => Err(invalid(
                path,
                format!("expected an odd positive integer (\"same\" padding), got {v}"),
            )),
        }
    };
    match m.get(k) {
        None => Ok(None),
        Some(Value::Array(a)) => {
            if a.len() != dim {
                return Err(invalid(
                    &p,
                    format!(
                        "has {} entries, expected {dim} (one per spatial axis)",
                        a.len()
                    ),
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, v)| one(v, &format!("{p}[{i}]")))
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        }
        Some(v) => Ok(Some(vec![one(v, &p)?; dim])),
    }
}
