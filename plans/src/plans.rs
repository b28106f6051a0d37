//! `nnUNetPlans.json`: the plans, one entry per configuration, with `inherits_from` resolution
//! and semantic validation.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::fingerprint::{intensity_map_from_value, intensity_map_to_json};
use crate::json::{self as j, child, index};
use crate::{io, IntensityProperties, NormalizationScheme, PlansError};

/// Resampling function names this implementation provides.
pub const RESAMPLING_FNS: &[&str] = &["resample_data_or_seg_to_shape"];

/// Keys of a configuration (after resolving `inherits_from`), in nnU-Net's order.
pub const CONFIGURATION_KEYS: &[&str] = &[
    "data_identifier",
    "preprocessor_name",
    "batch_size",
    "patch_size",
    "median_image_size_in_voxels",
    "spacing",
    "normalization_schemes",
    "use_mask_for_norm",
    "resampling_fn_data",
    "resampling_fn_seg",
    "resampling_fn_data_kwargs",
    "resampling_fn_seg_kwargs",
    "resampling_fn_probabilities",
    "resampling_fn_probabilities_kwargs",
    "architecture",
    "batch_dice",
    "next_stage",
    "previous_stage",
    "inherits_from",
];

/// Top-level keys of a plans file, in nnU-Net's order.
pub const PLANS_KEYS: &[&str] = &[
    "dataset_name",
    "plans_name",
    "original_median_spacing_after_transp",
    "original_median_shape_after_transp",
    "image_reader_writer",
    "transpose_forward",
    "transpose_backward",
    "configurations",
    "experiment_planner_used",
    "label_manager",
    "foreground_intensity_properties_per_channel",
];

/// Old name of `foreground_intensity_properties_per_channel`, still accepted by nnU-Net.
const LEGACY_INTENSITY_KEY: &str = "foreground_intensity_properties_by_modality";
const RESAMPLING_KWARGS_KEYS: &[&str] = &["is_seg", "order", "order_z", "force_separate_z"];
const ARCHITECTURE_KEYS: &[&str] = &["network_class_name", "arch_kwargs", "_kw_requires_import"];
/// Class names (last dotted component) of dynamic-network-architectures U-Nets whose
/// `arch_kwargs` are fully checked.
const DNA_UNETS: &[&str] = &["PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet"];

// ---------------------------------------------------------------------------------------------
// ResamplingKwargs

/// Keyword arguments of `resample_data_or_seg_to_shape`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResamplingKwargs {
    pub is_seg: bool,
    /// Spline order in-plane (0..=5).
    pub order: u8,
    /// Order along the low-resolution axis when resampling it separately (0..=5).
    pub order_z: u8,
    /// `null` = decide from the spacing anisotropy.
    pub force_separate_z: Option<bool>,
}

impl ResamplingKwargs {
    /// nnU-Net's `resampling_fn_data_kwargs`.
    pub fn data() -> Self {
        ResamplingKwargs {
            is_seg: false,
            order: 3,
            order_z: 0,
            force_separate_z: None,
        }
    }
    /// nnU-Net's `resampling_fn_seg_kwargs`.
    pub fn seg() -> Self {
        ResamplingKwargs {
            is_seg: true,
            order: 1,
            order_z: 0,
            force_separate_z: None,
        }
    }
    /// nnU-Net's `resampling_fn_probabilities_kwargs`.
    pub fn probabilities() -> Self {
        ResamplingKwargs {
            is_seg: false,
            order: 1,
            order_z: 0,
            force_separate_z: None,
        }
    }

    fn from_value(file: &str, path: &str, v: &Value) -> Result<Self, PlansError> {
        let o = j::as_object(file, path, v)?;
        j::closed_keys(file, path, o, RESAMPLING_KWARGS_KEYS)?;
        let order = |k: &str| -> Result<u8, PlansError> {
            let p = child(path, k);
            let x = j::require(file, path, o, k, "")?;
            match j::as_i64(file, &p, x) {
                Ok(i) if (0..=5).contains(&i) => Ok(i as u8),
                _ => Err(j::type_err(file, &p, "an interpolation order 0..=5", x)),
            }
        };
        let fsz_p = child(path, "force_separate_z");
        let force_separate_z = match j::require(file, path, o, "force_separate_z", "")? {
            Value::Null => None,
            Value::Bool(b) => Some(*b),
            other => return Err(j::type_err(file, &fsz_p, "true, false or null", other)),
        };
        Ok(ResamplingKwargs {
            is_seg: j::as_bool(
                file,
                &child(path, "is_seg"),
                j::require(file, path, o, "is_seg", "")?,
            )?,
            order: order("order")?,
            order_z: order("order_z")?,
            force_separate_z,
        })
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("is_seg".into(), Value::Bool(self.is_seg));
        m.insert("order".into(), Value::from(self.order));
        m.insert("order_z".into(), Value::from(self.order_z));
        m.insert(
            "force_separate_z".into(),
            self.force_separate_z.map_or(Value::Null, Value::Bool),
        );
        Value::Object(m)
    }
}

impl Serialize for ResamplingKwargs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ResamplingKwargs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        ResamplingKwargs::from_value("JSON", "", &v).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// ArchitectureSpec

/// `architecture` of a configuration. The class name is not checked here (the architectures
/// registry resolves it); `arch_kwargs` is kept as raw JSON with typed accessors.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ArchitectureSpec {
    pub network_class_name: String,
    pub arch_kwargs: Map<String, Value>,
    /// `_kw_requires_import`: arch_kwargs whose string values name Python classes.
    pub kw_requires_import: Vec<String>,
}

const ARCH_FILE: &str = "architecture";
const ARCH_PATH: &str = "architecture.arch_kwargs";

impl ArchitectureSpec {
    fn from_value(file: &str, path: &str, v: &Value) -> Result<Self, PlansError> {
        let o = j::as_object(file, path, v)?;
        j::closed_keys(file, path, o, ARCHITECTURE_KEYS)?;
        let ncn_p = child(path, "network_class_name");
        let network_class_name = j::as_string(
            file,
            &ncn_p,
            j::require(file, path, o, "network_class_name", "")?,
        )?;
        if network_class_name.trim().is_empty() {
            return Err(j::invalid(file, &ncn_p, "\"\"".into(), "a network class name, e.g. \"dynamic_network_architectures.architectures.unet.PlainConvUNet\""));
        }
        let arch_kwargs = j::as_object(
            file,
            &child(path, "arch_kwargs"),
            j::require(file, path, o, "arch_kwargs", "")?,
        )?
        .clone();
        let kw_requires_import = match o.get("_kw_requires_import") {
            None | Some(Value::Null) => Vec::new(),
            Some(x) => j::as_vec(
                file,
                &child(path, "_kw_requires_import"),
                x,
                "a list of arch_kwargs names",
                |p, e| j::as_string(file, p, e),
            )?,
        };
        Ok(ArchitectureSpec {
            network_class_name,
            arch_kwargs,
            kw_requires_import,
        })
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "network_class_name".into(),
            Value::String(self.network_class_name.clone()),
        );
        m.insert(
            "arch_kwargs".into(),
            Value::Object(self.arch_kwargs.clone()),
        );
        m.insert(
            "_kw_requires_import".into(),
            Value::from(self.kw_requires_import.clone()),
        );
        Value::Object(m)
    }

    /// The class name without its module path (`PlainConvUNet`).
    pub fn short_class_name(&self) -> &str {
        self.network_class_name
            .rsplit('.')
            .next()
            .unwrap_or(&self.network_class_name)
    }

    /// True for dynamic-network-architectures' PlainConvUNet / ResidualEncoderUNet / ResidualUNet.
    pub fn is_dna_unet(&self) -> bool {
        DNA_UNETS.contains(&self.short_class_name())
    }

    /// Raw access to one arch_kwargs value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.arch_kwargs.get(key)
    }

    fn req(&self, key: &str) -> Result<&Value, PlansError> {
        j::require(ARCH_FILE, ARCH_PATH, &self.arch_kwargs, key, "")
    }

    /// A required non-negative integer arch_kwarg.
    pub fn usize_arg(&self, key: &str) -> Result<usize, PlansError> {
        j::as_usize(ARCH_FILE, &child(ARCH_PATH, key), self.req(key)?, false)
    }

    /// A required boolean arch_kwarg.
    pub fn bool_arg(&self, key: &str) -> Result<bool, PlansError> {
        j::as_bool(ARCH_FILE, &child(ARCH_PATH, key), self.req(key)?)
    }

    /// A string-or-null arch_kwarg (missing = None).
    pub fn str_arg(&self, key: &str) -> Result<Option<String>, PlansError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => j::as_opt_string(ARCH_FILE, &child(ARCH_PATH, key), v),
        }
    }

    /// A required number arch_kwarg.
    pub fn f64_arg(&self, key: &str) -> Result<f64, PlansError> {
        j::as_f64(ARCH_FILE, &child(ARCH_PATH, key), self.req(key)?)
    }

    /// A required per-stage integer list; a scalar is repeated `n` times (as dna does).
    pub fn stage_list(&self, key: &str, n: usize) -> Result<Vec<usize>, PlansError> {
        stage_list(ARCH_FILE, &child(ARCH_PATH, key), self.req(key)?, n)
    }

    pub fn n_stages(&self) -> Result<usize, PlansError> {
        j::as_usize(
            ARCH_FILE,
            &child(ARCH_PATH, "n_stages"),
            self.req("n_stages")?,
            true,
        )
    }

    pub fn features_per_stage(&self) -> Result<Vec<usize>, PlansError> {
        self.stage_list("features_per_stage", self.n_stages()?)
    }

    /// `kernel_sizes` as `n_stages` × `dim` (scalars expanded).
    pub fn kernel_sizes(&self, dim: usize) -> Result<Vec<Vec<usize>>, PlansError> {
        per_axis_list(
            ARCH_FILE,
            &child(ARCH_PATH, "kernel_sizes"),
            self.req("kernel_sizes")?,
            self.n_stages()?,
            dim,
        )
    }

    /// `strides` as `n_stages` × `dim` (scalars expanded).
    pub fn strides(&self, dim: usize) -> Result<Vec<Vec<usize>>, PlansError> {
        per_axis_list(
            ARCH_FILE,
            &child(ARCH_PATH, "strides"),
            self.req("strides")?,
            self.n_stages()?,
            dim,
        )
    }

    pub fn n_conv_per_stage(&self) -> Result<Vec<usize>, PlansError> {
        self.stage_list("n_conv_per_stage", self.n_stages()?)
    }

    pub fn n_blocks_per_stage(&self) -> Result<Vec<usize>, PlansError> {
        self.stage_list("n_blocks_per_stage", self.n_stages()?)
    }

    pub fn n_conv_per_stage_decoder(&self) -> Result<Vec<usize>, PlansError> {
        self.stage_list(
            "n_conv_per_stage_decoder",
            self.n_stages()?.saturating_sub(1),
        )
    }

    pub fn conv_bias(&self) -> Result<bool, PlansError> {
        self.bool_arg("conv_bias")
    }

    /// Spatial dimension implied by `conv_op` (`...Conv2d` → 2, `...Conv3d` → 3), if recognisable.
    pub fn conv_dim(&self) -> Option<usize> {
        self.get("conv_op").and_then(Value::as_str).and_then(op_dim)
    }

    /// Check the arch_kwargs against a patch size. `key_path` is the JSON path of the
    /// `architecture` object, `patch_path` that of `patch_size`.
    pub(crate) fn validate(
        &self,
        file: &str,
        arch_path: &str,
        patch: &[usize],
        patch_path: &str,
    ) -> Result<(), PlansError> {
        let kp = child(arch_path, "arch_kwargs");
        let kw = &self.arch_kwargs;
        let dim = patch.len();
        let strict = self.is_dna_unet();
        let get = |k: &str| -> Result<Option<&Value>, PlansError> {
            match kw.get(k) {
                Some(v) => Ok(Some(v)),
                None if strict => Err(j::missing(
                    file,
                    &kp,
                    kw,
                    k,
                    &format!(" (required by {})", self.short_class_name()),
                )),
                None => Ok(None),
            }
        };
        let n_stages = match get("n_stages")? {
            Some(v) => Some(j::as_usize(file, &child(&kp, "n_stages"), v, true)?),
            None => None,
        };
        for op_key in ["conv_op", "norm_op"] {
            if let Some(Value::String(s)) = kw.get(op_key) {
                if let Some(d) = op_dim(s) {
                    if d != dim {
                        return Err(j::invalid(
                            file,
                            &child(&kp, op_key),
                            format!("{s:?}"),
                            format!("a {dim}D operation is needed because patch_size has {dim} entries ({d}D given)"),
                        ));
                    }
                }
            }
        }
        if let Some(n) = n_stages {
            if let Some(v) = get("features_per_stage")? {
                stage_list(file, &child(&kp, "features_per_stage"), v, n)?;
            }
            let nconv = kw.get("n_conv_per_stage");
            let nblocks = kw.get("n_blocks_per_stage");
            if strict && nconv.is_none() && nblocks.is_none() {
                return Err(j::missing(
                    file,
                    &kp,
                    kw,
                    if self.short_class_name() == "PlainConvUNet" {
                        "n_conv_per_stage"
                    } else {
                        "n_blocks_per_stage"
                    },
                    &format!(
                        " (required by {}: `n_conv_per_stage` or `n_blocks_per_stage`)",
                        self.short_class_name()
                    ),
                ));
            }
            for (k, v) in [("n_conv_per_stage", nconv), ("n_blocks_per_stage", nblocks)] {
                if let Some(v) = v {
                    stage_list(file, &child(&kp, k), v, n)?;
                }
            }
            if let Some(v) = get("n_conv_per_stage_decoder")? {
                stage_list(
                    file,
                    &child(&kp, "n_conv_per_stage_decoder"),
                    v,
                    n.saturating_sub(1),
                )?;
            }
            if let Some(v) = get("kernel_sizes")? {
                per_axis_list(file, &child(&kp, "kernel_sizes"), v, n, dim)?;
            }
            if let Some(v) = get("strides")? {
                let strides = per_axis_list(file, &child(&kp, "strides"), v, n, dim)?;
                for (axis, &p) in patch.iter().enumerate() {
                    let prod: usize = strides.iter().map(|s| s[axis]).product();
                    if prod > 0 && p % prod != 0 {
                        let factors: Vec<String> =
                            strides.iter().map(|s| s[axis].to_string()).collect();
                        return Err(j::invalid(
                            file,
                            &index(patch_path, axis),
                            p.to_string(),
                            format!(
                                "must be divisible by {prod} = the product of the strides on axis {axis} ({}; {}); e.g. {} or {}",
                                factors.join("×"),
                                child(&kp, "strides"),
                                (p / prod).max(1) * prod,
                                (p / prod + 1) * prod
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn op_dim(s: &str) -> Option<usize> {
    let last = s.rsplit('.').next().unwrap_or(s);
    if !(last.contains("Conv") || last.contains("Norm")) {
        return None;
    }
    if last.ends_with("2d") {
        Some(2)
    } else if last.ends_with("3d") {
        Some(3)
    } else if last.ends_with("1d") {
        Some(1)
    } else {
        None
    }
}

/// Positive integer per stage: a list of length `n`, or a scalar repeated.
fn stage_list(file: &str, path: &str, v: &Value, n: usize) -> Result<Vec<usize>, PlansError> {
    if let Value::Array(a) = v {
        if a.len() != n {
            return Err(j::invalid(
                file,
                path,
                j::describe(v),
                format!("needs {n} entries (one per stage), got {}", a.len()),
            ));
        }
        a.iter()
            .enumerate()
            .map(|(i, e)| j::as_usize(file, &index(path, i), e, true))
            .collect()
    } else {
        let x = j::as_usize(file, path, v, true)
            .map_err(|_| j::type_err(file, path, &format!("a list of {n} positive integers"), v))?;
        Ok(vec![x; n])
    }
}

/// `n` stages × `dim` axes of positive integers; scalars (per stage or overall) are expanded.
fn per_axis_list(
    file: &str,
    path: &str,
    v: &Value,
    n: usize,
    dim: usize,
) -> Result<Vec<Vec<usize>>, PlansError> {
    let Value::Array(a) = v else {
        let x = j::as_usize(file, path, v, true).map_err(|_| {
            j::type_err(
                file,
                path,
                &format!("a list of {n} per-stage lists of {dim} positive integers"),
                v,
            )
        })?;
        return Ok(vec![vec![x; dim]; n]);
    };
    if a.len() != n {
        return Err(j::invalid(
            file,
            path,
            j::describe(v),
            format!(
                "needs {n} entries (one per stage, n_stages = {n}), got {}",
                a.len()
            ),
        ));
    }
    a.iter()
        .enumerate()
        .map(|(i, e)| {
            let p = index(path, i);
            match e {
                Value::Array(axes) => {
                    if axes.len() != dim {
                        return Err(j::invalid(
                            file,
                            &p,
                            j::describe(e),
                            format!("needs {dim} entries (one per spatial axis of the {dim}D patch_size), got {}", axes.len()),
                        ));
                    }
                    axes.iter().enumerate().map(|(k, x)| j::as_usize(file, &index(&p, k), x, true)).collect()
                }
                other => {
                    let x = j::as_usize(file, &p, other, true)
                        .map_err(|_| j::type_err(file, &p, &format!("a list of {dim} positive integers"), other))?;
                    Ok(vec![x; dim])
                }
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// One fully-resolved configuration (after `inherits_from`).
#[derive(Debug, Clone, PartialEq)]
pub struct Configuration {
    pub data_identifier: String,
    pub preprocessor_name: String,
    pub batch_size: usize,
    pub patch_size: Vec<usize>,
    pub median_image_size_in_voxels: Vec<f64>,
    pub spacing: Vec<f64>,
    pub normalization_schemes: Vec<NormalizationScheme>,
    pub use_mask_for_norm: Vec<bool>,
    pub resampling_fn_data: String,
    pub resampling_fn_seg: String,
    pub resampling_fn_data_kwargs: ResamplingKwargs,
    pub resampling_fn_seg_kwargs: ResamplingKwargs,
    pub resampling_fn_probabilities: String,
    pub resampling_fn_probabilities_kwargs: ResamplingKwargs,
    pub architecture: ArchitectureSpec,
    pub batch_dice: bool,
    pub next_stage: Option<String>,
    pub previous_stage: Option<String>,
    /// Unknown keys (kept and written back).
    pub extra: Map<String, Value>,
}

/// Where each key of a (resolved) configuration lives, for error paths.
struct Loc {
    /// key → JSON path of the object it came from.
    owner: HashMap<String, String>,
    /// Object path for keys not in `owner` (and for "missing key" errors).
    base: String,
    /// Appended to "missing key" errors (the inherits_from chain).
    note: String,
}

impl Loc {
    fn plain(base: &str) -> Self {
        Loc {
            owner: HashMap::new(),
            base: base.to_string(),
            note: String::new(),
        }
    }
    fn parent(&self, key: &str) -> &str {
        self.owner
            .get(key)
            .map_or(self.base.as_str(), String::as_str)
    }
    fn key(&self, key: &str) -> String {
        child(self.parent(key), key)
    }
}

impl Configuration {
    /// The spatial dimension (2 or 3).
    pub fn dim(&self) -> usize {
        self.patch_size.len()
    }

    /// Parse and validate a standalone configuration object. `file` and `path` (the JSON path of
    /// the object, e.g. `configurations.3d_fullres`) are used in error messages.
    pub fn from_value(v: &Value, file: &str, path: &str) -> Result<Self, PlansError> {
        let o = j::as_object(file, path, v)?;
        let c = Self::from_map(file, o, &Loc::plain(path))?;
        c.validate_at(file, path)?;
        Ok(c)
    }

    fn from_map(file: &str, o: &Map<String, Value>, loc: &Loc) -> Result<Self, PlansError> {
        let upgraded;
        let o = if !o.contains_key("architecture") && o.contains_key("UNet_class_name") {
            upgraded = upgrade_old_style(file, o, loc)?;
            &upgraded
        } else {
            o
        };
        let mut extra = Map::new();
        for (k, v) in o {
            if CONFIGURATION_KEYS.contains(&k.as_str()) {
                continue;
            }
            if let Some(s) = j::suggest(k, CONFIGURATION_KEYS) {
                return Err(j::misspelled(file, loc.parent(k), k, s));
            }
            extra.insert(k.clone(), v.clone());
        }
        let req = |k: &str| -> Result<&Value, PlansError> {
            o.get(k)
                .ok_or_else(|| j::missing(file, &loc.base, o, k, &loc.note))
        };
        let string =
            |k: &str| -> Result<String, PlansError> { j::as_string(file, &loc.key(k), req(k)?) };
        let opt_string = |k: &str| -> Result<Option<String>, PlansError> {
            match o.get(k) {
                None => Ok(None),
                Some(v) => j::as_opt_string(file, &loc.key(k), v),
            }
        };
        let kwargs = |k: &str| -> Result<ResamplingKwargs, PlansError> {
            ResamplingKwargs::from_value(file, &loc.key(k), req(k)?)
        };
        let pos_f64_list = |k: &str| -> Result<Vec<f64>, PlansError> {
            j::as_vec(
                file,
                &loc.key(k),
                req(k)?,
                "a list of positive numbers",
                |p, e| j::as_positive_f64(file, p, e),
            )
        };
        Ok(Configuration {
            data_identifier: string("data_identifier")?,
            preprocessor_name: string("preprocessor_name")?,
            batch_size: j::as_usize(file, &loc.key("batch_size"), req("batch_size")?, true)?,
            patch_size: j::as_vec(
                file,
                &loc.key("patch_size"),
                req("patch_size")?,
                "a list of 2 or 3 positive integers",
                |p, e| j::as_usize(file, p, e, true),
            )?,
            median_image_size_in_voxels: pos_f64_list("median_image_size_in_voxels")?,
            spacing: pos_f64_list("spacing")?,
            normalization_schemes: j::as_vec(
                file,
                &loc.key("normalization_schemes"),
                req("normalization_schemes")?,
                "a list of normalization scheme names",
                |p, e| NormalizationScheme::from_value(file, p, e),
            )?,
            use_mask_for_norm: j::as_vec(
                file,
                &loc.key("use_mask_for_norm"),
                req("use_mask_for_norm")?,
                "a list of booleans",
                |p, e| j::as_bool(file, p, e),
            )?,
            resampling_fn_data: string("resampling_fn_data")?,
            resampling_fn_seg: string("resampling_fn_seg")?,
            resampling_fn_data_kwargs: kwargs("resampling_fn_data_kwargs")?,
            resampling_fn_seg_kwargs: kwargs("resampling_fn_seg_kwargs")?,
            resampling_fn_probabilities: string("resampling_fn_probabilities")?,
            resampling_fn_probabilities_kwargs: kwargs("resampling_fn_probabilities_kwargs")?,
            architecture: ArchitectureSpec::from_value(
                file,
                &loc.key("architecture"),
                req("architecture")?,
            )?,
            batch_dice: j::as_bool(file, &loc.key("batch_dice"), req("batch_dice")?)?,
            next_stage: match o.get("next_stage") {
                // nnU-Net also accepts a list of next stages; one is supported here.
                Some(Value::Array(a)) if a.len() == 1 => Some(j::as_string(
                    file,
                    &index(&loc.key("next_stage"), 0),
                    &a[0],
                )?),
                Some(v @ Value::Array(_)) => {
                    return Err(j::invalid(
                        file,
                        &loc.key("next_stage"),
                        j::describe(v),
                        "a single configuration name (multiple next stages are not supported)",
                    ))
                }
                _ => opt_string("next_stage")?,
            },
            previous_stage: opt_string("previous_stage")?,
            extra,
        })
    }

    /// Semantic validation of an in-memory configuration (paths relative to the configuration).
    pub fn validate(&self) -> Result<(), PlansError> {
        self.validate_at("configuration", "")
    }

    /// Semantic validation; errors name `file` and paths below `path`.
    pub fn validate_at(&self, file: &str, path: &str) -> Result<(), PlansError> {
        self.validate_loc(file, &Loc::plain(path))
    }

    fn validate_loc(&self, file: &str, loc: &Loc) -> Result<(), PlansError> {
        let dim = self.patch_size.len();
        let list = |v: &[f64]| format!("{v:?}");
        if dim != 2 && dim != 3 {
            return Err(j::invalid(
                file,
                &loc.key("patch_size"),
                format!("{:?}", self.patch_size),
                "needs 2 (2D) or 3 (3D) entries",
            ));
        }
        if self.batch_size == 0 {
            return Err(j::invalid(
                file,
                &loc.key("batch_size"),
                "0".into(),
                "must be a positive integer",
            ));
        }
        if let Some(i) = self.patch_size.iter().position(|p| *p == 0) {
            return Err(j::invalid(
                file,
                &index(&loc.key("patch_size"), i),
                "0".into(),
                "must be a positive integer",
            ));
        }
        for (k, v) in [
            ("spacing", &self.spacing),
            (
                "median_image_size_in_voxels",
                &self.median_image_size_in_voxels,
            ),
        ] {
            if v.len() != dim {
                return Err(j::invalid(
                    file,
                    &loc.key(k),
                    list(v),
                    format!("needs {dim} entries, like patch_size {:?}", self.patch_size),
                ));
            }
            if let Some(i) = v.iter().position(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(j::invalid(
                    file,
                    &index(&loc.key(k), i),
                    v[i].to_string(),
                    "must be a positive number",
                ));
            }
        }
        if self.normalization_schemes.is_empty() {
            return Err(j::invalid(
                file,
                &loc.key("normalization_schemes"),
                "[]".into(),
                "needs one scheme per input channel",
            ));
        }
        if self.use_mask_for_norm.len() != self.normalization_schemes.len() {
            return Err(j::invalid(
                file,
                &loc.key("use_mask_for_norm"),
                format!("{:?}", self.use_mask_for_norm),
                format!(
                    "needs one entry per normalization scheme ({} entries, like normalization_schemes)",
                    self.normalization_schemes.len()
                ),
            ));
        }
        for (k, name) in [
            ("resampling_fn_data", &self.resampling_fn_data),
            ("resampling_fn_seg", &self.resampling_fn_seg),
            (
                "resampling_fn_probabilities",
                &self.resampling_fn_probabilities,
            ),
        ] {
            if !RESAMPLING_FNS.contains(&name.as_str()) {
                return Err(j::invalid(
                    file,
                    &loc.key(k),
                    format!("{name:?}"),
                    format!(
                        "known resampling functions: {}",
                        j::name_list(RESAMPLING_FNS)
                    ),
                ));
            }
        }
        for (k, kw) in [
            ("resampling_fn_data_kwargs", &self.resampling_fn_data_kwargs),
            ("resampling_fn_seg_kwargs", &self.resampling_fn_seg_kwargs),
            (
                "resampling_fn_probabilities_kwargs",
                &self.resampling_fn_probabilities_kwargs,
            ),
        ] {
            for (kk, o) in [("order", kw.order), ("order_z", kw.order_z)] {
                if o > 5 {
                    return Err(j::invalid(
                        file,
                        &child(&loc.key(k), kk),
                        o.to_string(),
                        "an interpolation order 0..=5",
                    ));
                }
            }
        }
        self.architecture.validate(
            file,
            &loc.key("architecture"),
            &self.patch_size,
            &loc.key("patch_size"),
        )
    }

    /// The configuration as a JSON object in nnU-Net's key order (extra keys last).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(
            "data_identifier".into(),
            Value::String(self.data_identifier.clone()),
        );
        m.insert(
            "preprocessor_name".into(),
            Value::String(self.preprocessor_name.clone()),
        );
        m.insert("batch_size".into(), Value::from(self.batch_size));
        m.insert("patch_size".into(), Value::from(self.patch_size.clone()));
        m.insert(
            "median_image_size_in_voxels".into(),
            Value::from(self.median_image_size_in_voxels.clone()),
        );
        m.insert("spacing".into(), Value::from(self.spacing.clone()));
        m.insert(
            "normalization_schemes".into(),
            Value::from(
                self.normalization_schemes
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>(),
            ),
        );
        m.insert(
            "use_mask_for_norm".into(),
            Value::from(self.use_mask_for_norm.clone()),
        );
        m.insert(
            "resampling_fn_data".into(),
            Value::String(self.resampling_fn_data.clone()),
        );
        m.insert(
            "resampling_fn_seg".into(),
            Value::String(self.resampling_fn_seg.clone()),
        );
        m.insert(
            "resampling_fn_data_kwargs".into(),
            self.resampling_fn_data_kwargs.to_json(),
        );
        m.insert(
            "resampling_fn_seg_kwargs".into(),
            self.resampling_fn_seg_kwargs.to_json(),
        );
        m.insert(
            "resampling_fn_probabilities".into(),
            Value::String(self.resampling_fn_probabilities.clone()),
        );
        m.insert(
            "resampling_fn_probabilities_kwargs".into(),
            self.resampling_fn_probabilities_kwargs.to_json(),
        );
        m.insert("architecture".into(), self.architecture.to_json());
        m.insert("batch_dice".into(), Value::Bool(self.batch_dice));
        if let Some(s) = &self.next_stage {
            m.insert("next_stage".into(), Value::String(s.clone()));
        }
        if let Some(s) = &self.previous_stage {
            m.insert("previous_stage".into(), Value::String(s.clone()));
        }
        for (k, v) in &self.extra {
            if !m.contains_key(k) {
                m.insert(k.clone(), v.clone());
            }
        }
        m
    }
}

/// Keys of nnU-Net's older plans format, converted like `ConfigurationManager.__init__` does.
const OLD_STYLE_KEYS: &[&str] = &[
    "UNet_class_name",
    "UNet_base_num_features",
    "n_conv_per_stage_encoder",
    "n_conv_per_stage_decoder",
    "num_pool_per_axis",
    "pool_op_kernel_sizes",
    "conv_kernel_sizes",
    "unet_max_num_features",
];

/// Rebuild the `architecture` entry from old-style keys (nnU-Net's backwards compatibility path).
fn upgrade_old_style(
    file: &str,
    o: &Map<String, Value>,
    loc: &Loc,
) -> Result<Map<String, Value>, PlansError> {
    let req = |k: &str| -> Result<&Value, PlansError> {
        o.get(k).ok_or_else(|| {
            j::missing(
                file,
                &loc.base,
                o,
                k,
                " (needed to convert old-style plans)",
            )
        })
    };
    let class_path = loc.key("UNet_class_name");
    let class = j::as_string(file, &class_path, req("UNet_class_name")?)?;
    let (network_class_name, blocks_key) = match class.as_str() {
        "PlainConvUNet" => ("dynamic_network_architectures.architectures.unet.PlainConvUNet", "n_conv_per_stage"),
        "ResidualEncoderUNet" => (
            "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet",
            "n_blocks_per_stage",
        ),
        _ => {
            return Err(j::invalid(
                file,
                &class_path,
                format!("{class:?}"),
                "old-style plans can only be converted for `PlainConvUNet` and `ResidualEncoderUNet`; re-run planning",
            ))
        }
    };
    let enc = req("n_conv_per_stage_encoder")?;
    let n_stages = j::as_array(
        file,
        &loc.key("n_conv_per_stage_encoder"),
        enc,
        "a list of positive integers",
    )?
    .len();
    let dim = j::as_array(
        file,
        &loc.key("patch_size"),
        req("patch_size")?,
        "a list of 2 or 3 positive integers",
    )?
    .len();
    let base = j::as_usize(
        file,
        &loc.key("UNet_base_num_features"),
        req("UNet_base_num_features")?,
        true,
    )?;
    let max_f = j::as_usize(
        file,
        &loc.key("unet_max_num_features"),
        req("unet_max_num_features")?,
        true,
    )?;
    let features: Vec<usize> = (0..n_stages)
        .map(|i| {
            base.saturating_mul(1usize.checked_shl(i as u32).unwrap_or(usize::MAX))
                .min(max_f)
        })
        .collect();
    let mut kw = Map::new();
    kw.insert("n_stages".into(), Value::from(n_stages));
    kw.insert("features_per_stage".into(), Value::from(features));
    kw.insert(
        "conv_op".into(),
        Value::String(format!("torch.nn.modules.conv.Conv{dim}d")),
    );
    kw.insert("kernel_sizes".into(), req("conv_kernel_sizes")?.clone());
    kw.insert("strides".into(), req("pool_op_kernel_sizes")?.clone());
    kw.insert(blocks_key.into(), enc.clone());
    kw.insert(
        "n_conv_per_stage_decoder".into(),
        req("n_conv_per_stage_decoder")?.clone(),
    );
    kw.insert("conv_bias".into(), Value::Bool(true));
    kw.insert(
        "norm_op".into(),
        Value::String(format!("torch.nn.modules.instancenorm.InstanceNorm{dim}d")),
    );
    kw.insert(
        "norm_op_kwargs".into(),
        serde_json::json!({"eps": 1e-05, "affine": true}),
    );
    kw.insert("dropout_op".into(), Value::Null);
    kw.insert("dropout_op_kwargs".into(), Value::Null);
    kw.insert("nonlin".into(), Value::String("torch.nn.LeakyReLU".into()));
    kw.insert("nonlin_kwargs".into(), serde_json::json!({"inplace": true}));
    let mut arch = Map::new();
    arch.insert(
        "network_class_name".into(),
        Value::String(network_class_name.into()),
    );
    arch.insert("arch_kwargs".into(), Value::Object(kw));
    arch.insert(
        "_kw_requires_import".into(),
        serde_json::json!(["conv_op", "norm_op", "dropout_op", "nonlin"]),
    );
    let mut out: Map<String, Value> = o
        .iter()
        .filter(|(k, _)| !OLD_STYLE_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert("architecture".into(), Value::Object(arch));
    Ok(out)
}

impl Serialize for Configuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Configuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Configuration::from_value(&v, "configuration", "").map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// Plans

/// A plans file (`nnUNetPlans.json`, `nnUNetResEncUNetLPlans.json`, ...).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plans {
    pub dataset_name: String,
    pub plans_name: String,
    pub original_median_spacing_after_transp: Vec<f64>,
    /// Written as integers when integral (nnU-Net writes ints here).
    pub original_median_shape_after_transp: Vec<f64>,
    pub image_reader_writer: String,
    pub transpose_forward: Vec<usize>,
    pub transpose_backward: Vec<usize>,
    /// Raw configurations as written (may use `inherits_from`); see [`Plans::configuration`].
    pub configurations: Map<String, Value>,
    pub experiment_planner_used: String,
    pub label_manager: String,
    pub foreground_intensity_properties_per_channel: BTreeMap<String, IntensityProperties>,
    /// Unknown top-level keys (kept and written back).
    pub extra: Map<String, Value>,
}

/// (merged JSON, inherits_from chain, key → owning object path)
type Resolved = (Map<String, Value>, Vec<String>, HashMap<String, String>);

impl Plans {
    /// Load a plans file. Configurations are checked to be JSON objects; each one is fully
    /// validated when requested with [`Plans::configuration`] (or [`Plans::validate_all`]).
    pub fn load(path: &Path) -> Result<Self, PlansError> {
        let v = io::read_json_file(path)?;
        Self::from_value(&v, &path.display().to_string())
    }

    /// Write atomically, in nnU-Net's layout.
    pub fn save(&self, path: &Path) -> Result<(), PlansError> {
        io::write_json_atomic(path, self)
    }

    /// Load a plans file and resolve + validate one configuration; errors name `path`.
    pub fn load_configuration(
        path: &Path,
        name: &str,
    ) -> Result<(Self, Configuration), PlansError> {
        let plans = Self::load(path)?;
        let cfg = plans
            .configuration(name)
            .map_err(|e| e.with_file(path.display().to_string()))?;
        Ok((plans, cfg))
    }

    /// Parse from JSON; `file` is used in error messages.
    pub fn from_value(v: &Value, file: &str) -> Result<Self, PlansError> {
        let o = j::as_object(file, "", v)?;
        let mut extra = Map::new();
        for (k, x) in o {
            if PLANS_KEYS.contains(&k.as_str()) {
                continue;
            }
            if k == LEGACY_INTENSITY_KEY
                && !o.contains_key("foreground_intensity_properties_per_channel")
            {
                continue;
            }
            let absent: Vec<&str> = PLANS_KEYS
                .iter()
                .copied()
                .filter(|kk| !o.contains_key(*kk))
                .collect();
            if let Some(s) = j::suggest(k, &absent) {
                return Err(j::misspelled(file, "", k, s));
            }
            extra.insert(k.clone(), x.clone());
        }
        let req = |k: &str| j::require(file, "", o, k, "");
        let string = |k: &str| -> Result<String, PlansError> { j::as_string(file, k, req(k)?) };
        let f64s = |k: &str| -> Result<Vec<f64>, PlansError> {
            j::as_vec(file, k, req(k)?, "a list of positive numbers", |p, e| {
                j::as_positive_f64(file, p, e)
            })
        };
        let perm = |k: &str| -> Result<Vec<usize>, PlansError> {
            j::as_vec(file, k, req(k)?, "a list of axis indices", |p, e| {
                j::as_usize(file, p, e, false)
            })
        };
        let configurations = j::as_object(file, "configurations", req("configurations")?)?.clone();
        for (name, c) in &configurations {
            let p = child("configurations", name);
            let co = j::as_object(file, &p, c)?;
            if let Some(parent) = co.get("inherits_from") {
                j::as_string(file, &child(&p, "inherits_from"), parent)?;
            }
        }
        let plans = Plans {
            dataset_name: string("dataset_name")?,
            plans_name: string("plans_name")?,
            original_median_spacing_after_transp: f64s("original_median_spacing_after_transp")?,
            original_median_shape_after_transp: f64s("original_median_shape_after_transp")?,
            image_reader_writer: string("image_reader_writer")?,
            transpose_forward: perm("transpose_forward")?,
            transpose_backward: perm("transpose_backward")?,
            configurations,
            experiment_planner_used: string("experiment_planner_used")?,
            label_manager: string("label_manager")?,
            foreground_intensity_properties_per_channel: match (
                o.get("foreground_intensity_properties_per_channel"),
                o.get(LEGACY_INTENSITY_KEY),
            ) {
                (None, Some(legacy)) => {
                    intensity_map_from_value(file, LEGACY_INTENSITY_KEY, legacy)?
                }
                _ => intensity_map_from_value(
                    file,
                    "foreground_intensity_properties_per_channel",
                    req("foreground_intensity_properties_per_channel")?,
                )?,
            },
            extra,
        };
        plans.validate_transpose(file)?;
        Ok(plans)
    }

    fn validate_transpose(&self, file: &str) -> Result<(), PlansError> {
        let n = self.transpose_forward.len();
        let mut sorted = self.transpose_forward.clone();
        sorted.sort_unstable();
        if sorted != (0..n).collect::<Vec<_>>() {
            return Err(j::invalid(
                file,
                "transpose_forward",
                format!("{:?}", self.transpose_forward),
                format!("must be a permutation of 0..{n}"),
            ));
        }
        let expected: Vec<usize> = (0..n)
            .map(|i| {
                self.transpose_forward
                    .iter()
                    .position(|&a| a == i)
                    .unwrap_or(i)
            })
            .collect();
        if self.transpose_backward != expected {
            return Err(j::invalid(
                file,
                "transpose_backward",
                format!("{:?}", self.transpose_backward),
                format!(
                    "must be the inverse of transpose_forward {:?}, i.e. {expected:?}",
                    self.transpose_forward
                ),
            ));
        }
        Ok(())
    }

    /// File description used in configuration errors (plans do not remember their path).
    pub fn file_label(&self) -> String {
        format!("{}.json ({})", self.plans_name, self.dataset_name)
    }

    /// Configuration names in file order.
    pub fn configuration_names(&self) -> Vec<String> {
        self.configurations.keys().cloned().collect()
    }

    /// The configuration's JSON after resolving `inherits_from` (child keys override parent keys,
    /// like nnU-Net's `dict.update`); the `inherits_from` key itself is dropped. Also returns
    /// the chain `[name, parent, grandparent, ...]` and, per key, the configuration it came from.
    fn resolve(&self, name: &str) -> Result<Resolved, PlansError> {
        let file = self.file_label();
        let available = || j::name_list(&self.configuration_names());
        let mut chain: Vec<String> = vec![name.to_string()];
        let mut objects: Vec<&Map<String, Value>> = Vec::new();
        let mut cur = name.to_string();
        loop {
            let raw = match self.configurations.get(&cur) {
                Some(r) => r,
                None if chain.len() == 1 => {
                    return Err(PlansError::UnknownConfiguration {
                        file,
                        name: cur,
                        available: available(),
                    })
                }
                None => {
                    return Err(PlansError::UnknownParent {
                        file,
                        child: chain[chain.len() - 2].clone(),
                        parent: cur,
                        available: available(),
                    })
                }
            };
            let path = child("configurations", &cur);
            let obj = j::as_object(&file, &path, raw)?;
            objects.push(obj);
            let Some(parent) = obj.get("inherits_from") else {
                break;
            };
            let parent = j::as_string(&file, &child(&path, "inherits_from"), parent)?;
            if chain.contains(&parent) {
                chain.push(parent);
                return Err(PlansError::InheritanceCycle {
                    file,
                    cycle: chain.join(" → "),
                });
            }
            chain.push(parent.clone());
            cur = parent;
        }
        let mut merged = Map::new();
        let mut owner = HashMap::new();
        for (obj, cname) in objects.iter().zip(&chain).rev() {
            for (k, v) in obj.iter() {
                if k == "inherits_from" {
                    continue;
                }
                merged.insert(k.clone(), v.clone());
                owner.insert(k.clone(), child("configurations", cname));
            }
        }
        Ok((merged, chain, owner))
    }

    /// The configuration's raw JSON after resolving `inherits_from` (not validated).
    pub fn resolved_configuration_json(
        &self,
        name: &str,
    ) -> Result<Map<String, Value>, PlansError> {
        Ok(self.resolve(name)?.0)
    }

    /// Resolve `inherits_from` and validate one configuration.
    pub fn configuration(&self, name: &str) -> Result<Configuration, PlansError> {
        let file = self.file_label();
        let (merged, chain, owner) = self.resolve(name)?;
        let base = chain.last().cloned().unwrap_or_else(|| name.to_string());
        let note = if chain.len() > 1 {
            format!(" (after resolving inherits_from {})", chain.join(" → "))
        } else {
            String::new()
        };
        let loc = Loc {
            owner,
            base: child("configurations", &base),
            note,
        };
        let cfg = Configuration::from_map(&file, &merged, &loc)?;
        cfg.validate_loc(&file, &loc)?;
        for (k, stage) in [
            ("next_stage", &cfg.next_stage),
            ("previous_stage", &cfg.previous_stage),
        ] {
            if let Some(s) = stage {
                if !self.configurations.contains_key(s) {
                    return Err(j::invalid(
                        &file,
                        &loc.key(k),
                        format!("{s:?}"),
                        format!(
                            "must name a configuration of these plans: {}",
                            j::name_list(&self.configuration_names())
                        ),
                    ));
                }
            }
        }
        Ok(cfg)
    }

    /// Resolve and validate every configuration.
    pub fn validate_all(&self) -> Result<(), PlansError> {
        for n in self.configuration_names() {
            self.configuration(&n)?;
        }
        Ok(())
    }

    /// Write a full (resolved) configuration under `name`, replacing any existing entry in place
    /// (new names are appended).
    pub fn set_configuration(&mut self, name: &str, cfg: &Configuration) {
        self.configurations
            .insert(name.to_string(), Value::Object(cfg.to_json()));
    }

    /// The plans as a JSON object in nnU-Net's key order (extra keys last).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(
            "dataset_name".into(),
            Value::String(self.dataset_name.clone()),
        );
        m.insert("plans_name".into(), Value::String(self.plans_name.clone()));
        m.insert(
            "original_median_spacing_after_transp".into(),
            Value::from(self.original_median_spacing_after_transp.clone()),
        );
        let shape: Vec<Value> = self
            .original_median_shape_after_transp
            .iter()
            .map(|&x| {
                if x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e15 {
                    Value::from(x as i64)
                } else {
                    Value::from(x)
                }
            })
            .collect();
        m.insert(
            "original_median_shape_after_transp".into(),
            Value::Array(shape),
        );
        m.insert(
            "image_reader_writer".into(),
            Value::String(self.image_reader_writer.clone()),
        );
        m.insert(
            "transpose_forward".into(),
            Value::from(self.transpose_forward.clone()),
        );
        m.insert(
            "transpose_backward".into(),
            Value::from(self.transpose_backward.clone()),
        );
        m.insert(
            "configurations".into(),
            Value::Object(self.configurations.clone()),
        );
        m.insert(
            "experiment_planner_used".into(),
            Value::String(self.experiment_planner_used.clone()),
        );
        m.insert(
            "label_manager".into(),
            Value::String(self.label_manager.clone()),
        );
        m.insert(
            "foreground_intensity_properties_per_channel".into(),
            intensity_map_to_json(&self.foreground_intensity_properties_per_channel),
        );
        for (k, v) in &self.extra {
            if !m.contains_key(k) {
                m.insert(k.clone(), v.clone());
            }
        }
        m
    }
}

impl Serialize for Plans {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Plans {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Plans::from_value(&v, "plans").map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
