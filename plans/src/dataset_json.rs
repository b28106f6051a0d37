//! `dataset.json` (nnU-Net v2 raw dataset description).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::json::{self as j, child, index};
use crate::{io, PlansError};

/// Largest label value a segmentation may hold (segmentations are stored as `i16`).
pub const MAX_LABEL_VALUE: i64 = i16::MAX as i64;

/// A label's value: one integer, or a list of integers for a region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LabelValue {
    Single(i64),
    Region(Vec<i64>),
}

impl LabelValue {
    /// The integer label values this entry covers.
    pub fn values(&self) -> Vec<i64> {
        match self {
            LabelValue::Single(v) => vec![*v],
            LabelValue::Region(r) => r.clone(),
        }
    }

    /// nnU-Net's region test: a list with more than one entry.
    pub fn is_region(&self) -> bool {
        matches!(self, LabelValue::Region(r) if r.len() > 1)
    }

    /// Background: `0` or a list containing only zeros.
    pub fn is_background(&self) -> bool {
        match self {
            LabelValue::Single(v) => *v == 0,
            LabelValue::Region(r) => !r.is_empty() && r.iter().all(|v| *v == 0),
        }
    }
}

/// One case of the explicit `dataset` map: image files (one per channel) and the label file.
/// Paths are relative to the dataset folder (nnU-Net also expands `$VARS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetEntry {
    pub images: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// `dataset.json`. Unknown (metadata) keys are kept in `extra` and written back.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DatasetJson {
    /// `{"0": "CT", "1": "T2"}`; the v1 key `modality` is accepted on load (saved as `channel_names`).
    pub channel_names: BTreeMap<String, String>,
    /// Label name → value, in file order.
    pub labels: Vec<(String, LabelValue)>,
    pub regions_class_order: Option<Vec<i64>>,
    /// `numTraining`.
    pub num_training: usize,
    pub file_ending: String,
    pub overwrite_image_reader_writer: Option<String>,
    pub dataset: Option<BTreeMap<String, DatasetEntry>>,
    pub extra: Map<String, Value>,
}

const KNOWN_KEYS: &[&str] = &[
    "channel_names",
    "modality",
    "labels",
    "regions_class_order",
    "numTraining",
    "file_ending",
    "overwrite_image_reader_writer",
    "dataset",
];

impl DatasetJson {
    /// Load and validate a dataset.json.
    pub fn load(path: &Path) -> Result<Self, PlansError> {
        let v = io::read_json_file(path)?;
        Self::from_value(&v, &path.display().to_string())
    }

    /// Write atomically (4-space indented JSON, like nnU-Net).
    pub fn save(&self, path: &Path) -> Result<(), PlansError> {
        io::write_json_atomic(path, self)
    }

    /// Parse and validate from JSON; `file` is used in error messages.
    pub fn from_value(v: &Value, file: &str) -> Result<Self, PlansError> {
        let obj = j::as_object(file, "", v)?;

        // Misspelled known keys (only those not present under their right name).
        for k in obj.keys() {
            if KNOWN_KEYS.contains(&k.as_str()) {
                continue;
            }
            let absent: Vec<&str> = KNOWN_KEYS
                .iter()
                .copied()
                .filter(|kk| !obj.contains_key(*kk))
                .filter(|kk| !(*kk == "modality" && obj.contains_key("channel_names")))
                .filter(|kk| !(*kk == "channel_names" && obj.contains_key("modality")))
                .collect();
            if let Some(s) = j::suggest(k, &absent) {
                return Err(j::misspelled(file, "", k, s));
            }
        }

        let (ch_key, ch_val) = match (obj.get("channel_names"), obj.get("modality")) {
            (Some(_), Some(_)) => {
                return Err(j::invalid(
                    file,
                    "modality",
                    j::describe(&obj["modality"]),
                    "give either `channel_names` or its nnU-Net v1 alias `modality`, not both",
                ))
            }
            (Some(c), None) => ("channel_names", c),
            (None, Some(m)) => ("modality", m),
            (None, None) => {
                return Err(j::missing(
                    file,
                    "",
                    obj,
                    "channel_names",
                    " (e.g. \"channel_names\": {\"0\": \"CT\"}; the v1 key `modality` is also accepted)",
                ))
            }
        };
        let channel_names = parse_channel_names(file, ch_key, ch_val)?;

        let labels_v = j::require(
            file,
            "",
            obj,
            "labels",
            " (e.g. \"labels\": {\"background\": 0, \"tumor\": 1})",
        )?;
        let labels = parse_labels(file, labels_v)?;

        let regions_class_order = match obj.get("regions_class_order") {
            None | Some(Value::Null) => None,
            Some(v) => Some(j::as_vec(
                file,
                "regions_class_order",
                v,
                "a list of integers",
                |p, e| j::as_i64(file, p, e),
            )?),
        };

        let num_training = j::as_usize(
            file,
            "numTraining",
            j::require(file, "", obj, "numTraining", "")?,
            false,
        )?;
        let file_ending = j::as_string(
            file,
            "file_ending",
            j::require(file, "", obj, "file_ending", " (e.g. \".nii.gz\")")?,
        )?;
        let overwrite_image_reader_writer = match obj.get("overwrite_image_reader_writer") {
            None => None,
            Some(v) => j::as_opt_string(file, "overwrite_image_reader_writer", v)?,
        };
        let dataset = match obj.get("dataset") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_dataset_map(file, v)?),
        };

        let extra: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();

        let ds = DatasetJson {
            channel_names,
            labels,
            regions_class_order,
            num_training,
            file_ending,
            overwrite_image_reader_writer,
            dataset,
            extra,
        };
        ds.validate(file)?;
        Ok(ds)
    }

    /// Semantic checks: background present, ignore label = max label + 1, regions need a
    /// matching `regions_class_order`, label values within the int16 range.
    pub fn validate(&self, file: &str) -> Result<(), PlansError> {
        if self.channel_names.is_empty() {
            return Err(j::invalid(
                file,
                "channel_names",
                "{}".into(),
                "at least one channel is required, e.g. {\"0\": \"CT\"}",
            ));
        }
        if !self
            .labels
            .iter()
            .any(|(k, v)| k != "ignore" && v.is_background())
        {
            return Err(j::invalid(
                file,
                "labels",
                j::describe(&labels_to_value(&self.labels)),
                "labels must contain the background with value 0, e.g. \"background\": 0",
            ));
        }
        for (name, v) in &self.labels {
            for x in v.values() {
                if !(0..=MAX_LABEL_VALUE).contains(&x) {
                    return Err(j::invalid(
                        file,
                        &child("labels", name),
                        x.to_string(),
                        format!("label values must be integers in 0..={MAX_LABEL_VALUE}"),
                    ));
                }
            }
            if let LabelValue::Region(r) = v {
                if r.is_empty() {
                    return Err(j::invalid(
                        file,
                        &child("labels", name),
                        "[]".into(),
                        "a region must list at least one label value",
                    ));
                }
            }
        }
        if let Some((_, v)) = self.labels.iter().find(|(k, _)| k == "ignore") {
            let max_label = self.all_labels().into_iter().max().unwrap_or(0);
            match v {
                LabelValue::Single(ig) if *ig == max_label + 1 => {}
                LabelValue::Single(ig) => {
                    return Err(j::invalid(
                        file,
                        "labels.ignore",
                        ig.to_string(),
                        format!(
                            "the ignore label must be the highest label + 1 = {}",
                            max_label + 1
                        ),
                    ))
                }
                LabelValue::Region(_) => {
                    return Err(j::invalid(
                        file,
                        "labels.ignore",
                        j::describe(&serde_json::to_value(v).unwrap_or(Value::Null)),
                        "the ignore label must be a single integer",
                    ))
                }
            }
        }
        if self.has_regions() {
            let n_regions = self.foreground_regions().len();
            let Some(order) = &self.regions_class_order else {
                return Err(PlansError::MissingKey {
                    file: file.to_string(),
                    parent: "the top-level object".into(),
                    key: "regions_class_order".into(),
                    note: format!(
                        " (required because `labels` defines regions; give one output label per region, {n_regions} entries)"
                    ),
                });
            };
            if order.len() != n_regions {
                return Err(j::invalid(
                    file,
                    "regions_class_order",
                    format!("{order:?}"),
                    format!("needs one entry per foreground region: {n_regions} entries"),
                ));
            }
            let ignore = self.ignore_label();
            for (i, v) in order.iter().enumerate() {
                if Some(*v) == ignore || *v < 0 || *v > MAX_LABEL_VALUE {
                    return Err(j::invalid(
                        file,
                        &index("regions_class_order", i),
                        v.to_string(),
                        format!("must be a label value in 0..={MAX_LABEL_VALUE} and not the ignore label"),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn num_channels(&self) -> usize {
        self.channel_names.len()
    }

    /// Channel names ordered by their numeric index ("0", "1", ..., "10").
    pub fn channel_names_ordered(&self) -> Vec<(usize, String)> {
        let mut v: Vec<(usize, String)> = self
            .channel_names
            .iter()
            .map(|(k, n)| (k.trim().parse::<usize>().unwrap_or(usize::MAX), n.clone()))
            .collect();
        v.sort();
        v
    }

    /// Any label value is a list with more than one entry (nnU-Net's region-based training).
    pub fn has_regions(&self) -> bool {
        self.labels
            .iter()
            .any(|(k, v)| k != "ignore" && v.is_region())
    }

    pub fn ignore_label(&self) -> Option<i64> {
        self.labels.iter().find_map(|(k, v)| match (k.as_str(), v) {
            ("ignore", LabelValue::Single(x)) => Some(*x),
            _ => None,
        })
    }

    /// All label values (regions flattened), sorted and unique, excluding the ignore label.
    pub fn all_labels(&self) -> Vec<i64> {
        let mut all: Vec<i64> = self
            .labels
            .iter()
            .filter(|(k, _)| k != "ignore")
            .flat_map(|(_, v)| v.values())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// `all_labels` without the background 0.
    pub fn foreground_labels(&self) -> Vec<i64> {
        self.all_labels().into_iter().filter(|l| *l != 0).collect()
    }

    /// With regions: the regions in file order (single labels as one-element regions),
    /// background and ignore excluded. Without regions: `[[l]]` for each foreground label.
    pub fn foreground_regions(&self) -> Vec<Vec<i64>> {
        if self.has_regions() {
            self.labels
                .iter()
                .filter(|(k, v)| k != "ignore" && !v.is_background())
                .map(|(_, v)| v.values())
                .collect()
        } else {
            self.foreground_labels()
                .into_iter()
                .map(|l| vec![l])
                .collect()
        }
    }

    /// Number of network outputs: regions (sigmoid) or labels incl. background (softmax).
    pub fn num_segmentation_heads(&self) -> usize {
        if self.has_regions() {
            self.foreground_regions().len()
        } else {
            self.all_labels().len()
        }
    }

    /// Build the JSON object (key order: nnU-Net's generate_dataset_json, then extra keys).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let ch: Map<String, Value> = self
            .channel_names_ordered_keys()
            .into_iter()
            .map(|(k, n)| (k, Value::String(n)))
            .collect();
        m.insert("channel_names".into(), Value::Object(ch));
        m.insert("labels".into(), labels_to_value(&self.labels));
        m.insert("numTraining".into(), Value::from(self.num_training));
        m.insert(
            "file_ending".into(),
            Value::String(self.file_ending.clone()),
        );
        if let Some(o) = &self.regions_class_order {
            m.insert("regions_class_order".into(), Value::from(o.clone()));
        }
        if let Some(o) = &self.overwrite_image_reader_writer {
            m.insert(
                "overwrite_image_reader_writer".into(),
                Value::String(o.clone()),
            );
        }
        if let Some(d) = &self.dataset {
            let dm: Map<String, Value> = d
                .iter()
                .map(|(case, e)| {
                    let mut em = Map::new();
                    em.insert("images".into(), Value::from(e.images.clone()));
                    if let Some(l) = &e.label {
                        em.insert("label".into(), Value::String(l.clone()));
                    }
                    (case.clone(), Value::Object(em))
                })
                .collect();
            m.insert("dataset".into(), Value::Object(dm));
        }
        for (k, v) in &self.extra {
            if !m.contains_key(k) {
                m.insert(k.clone(), v.clone());
            }
        }
        m
    }

    /// Channel keys in numeric order (so "10" comes after "9"), then non-numeric keys.
    fn channel_names_ordered_keys(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .channel_names
            .iter()
            .map(|(k, n)| (k.clone(), n.clone()))
            .collect();
        v.sort_by_key(|(k, _)| (k.trim().parse::<usize>().unwrap_or(usize::MAX), k.clone()));
        v
    }
}

fn labels_to_value(labels: &[(String, LabelValue)]) -> Value {
    let m: Map<String, Value> = labels
        .iter()
        .map(|(k, v)| {
            let val = match v {
                LabelValue::Single(x) => Value::from(*x),
                LabelValue::Region(r) => Value::from(r.clone()),
            };
            (k.clone(), val)
        })
        .collect();
    Value::Object(m)
}

fn parse_channel_names(
    file: &str,
    key: &str,
    v: &Value,
) -> Result<BTreeMap<String, String>, PlansError> {
    let obj = j::as_object(file, key, v)?;
    let mut out = BTreeMap::new();
    let mut indices = Vec::new();
    for (k, name) in obj {
        let p = child(key, k);
        let idx: usize = k.trim().parse().map_err(|_| {
            j::invalid(
                file,
                &p,
                format!("key {k:?}"),
                "channel keys must be channel indices \"0\", \"1\", ...",
            )
        })?;
        indices.push(idx);
        out.insert(k.clone(), j::as_string(file, &p, name)?);
    }
    indices.sort_unstable();
    if let Some((pos, _)) = indices.iter().enumerate().find(|(i, idx)| *i != **idx) {
        return Err(j::invalid(
            file,
            key,
            j::describe(v),
            format!(
                "channel indices must be 0..{} without gaps or repeats (index {pos} is missing)",
                indices.len()
            ),
        ));
    }
    Ok(out)
}

fn parse_labels(file: &str, v: &Value) -> Result<Vec<(String, LabelValue)>, PlansError> {
    let obj = j::as_object(file, "labels", v)?;
    let mut out = Vec::with_capacity(obj.len());
    for (name, val) in obj {
        let p = child("labels", name);
        let lv = match val {
            Value::Array(a) => LabelValue::Region(
                a.iter()
                    .enumerate()
                    .map(|(i, e)| j::as_i64(file, &index(&p, i), e))
                    .collect::<Result<_, _>>()?,
            ),
            other => LabelValue::Single(j::as_i64(file, &p, other).map_err(|_| {
                j::type_err(
                    file,
                    &p,
                    "an integer label value or a list of integers (a region)",
                    other,
                )
            })?),
        };
        out.push((name.clone(), lv));
    }
    Ok(out)
}

fn parse_dataset_map(file: &str, v: &Value) -> Result<BTreeMap<String, DatasetEntry>, PlansError> {
    let obj = j::as_object(file, "dataset", v)?;
    let mut out = BTreeMap::new();
    for (case, e) in obj {
        let p = child("dataset", case);
        let eo = j::as_object(file, &p, e)?;
        j::closed_keys(file, &p, eo, &["images", "label"])?;
        let images = j::as_vec(
            file,
            &child(&p, "images"),
            j::require(file, &p, eo, "images", "")?,
            "a list of file paths",
            |pp, x| j::as_string(file, pp, x),
        )?;
        if images.is_empty() {
            return Err(j::invalid(
                file,
                &child(&p, "images"),
                "[]".into(),
                "at least one image file (one per channel)",
            ));
        }
        let label = match eo.get("label") {
            None => None,
            Some(l) => j::as_opt_string(file, &child(&p, "label"), l)?,
        };
        out.insert(case.clone(), DatasetEntry { images, label });
    }
    Ok(out)
}

impl Serialize for DatasetJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for DatasetJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        DatasetJson::from_value(&v, "dataset.json").map_err(serde::de::Error::custom)
    }
}
