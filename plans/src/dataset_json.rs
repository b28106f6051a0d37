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
            Value::String(s) if name.trim().parse::<i64>().is_ok() => {
                return Err(j::invalid(
                    file,
                    &p,
                    format!("{s:?}"),
                    format!(
                        "labels map names to values in nnU-Net v2 (e.g. \"{s}\": {}); this looks like the v1 layout value → name",
                        name.trim()
                    ),
                ))
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURE: &str = include_str!("testdata/dataset_fixture3d.json");

    fn parse(v: Value) -> Result<DatasetJson, PlansError> {
        DatasetJson::from_value(&v, "dataset.json")
    }

    fn err(v: Value) -> String {
        match parse(v) {
            Ok(d) => panic!("expected an error, got {d:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for p in parts {
            assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
        }
    }

    fn brats() -> Value {
        json!({
            "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
            "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3},
            "numTraining": 484,
            "file_ending": ".nii.gz",
            "regions_class_order": [1, 2, 3]
        })
    }

    #[test]
    fn fixture_round_trips_byte_for_byte() {
        let v: Value = serde_json::from_str(FIXTURE).unwrap();
        let d = parse(v.clone()).unwrap();
        assert_eq!(d.num_channels(), 1);
        assert_eq!(d.num_training, 2);
        assert_eq!(d.file_ending, ".nii.gz");
        assert_eq!(d.all_labels(), vec![0, 1, 2]);
        assert_eq!(d.foreground_labels(), vec![1, 2]);
        assert_eq!(d.foreground_regions(), vec![vec![1], vec![2]]);
        assert!(!d.has_regions());
        assert_eq!(d.ignore_label(), None);
        assert_eq!(d.extra.get("name"), Some(&json!("Fixture3D")));
        assert_eq!(d.num_segmentation_heads(), 3);
        let out = io::to_json_string(&d).unwrap();
        assert_eq!(out, FIXTURE);
        // Through files.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dataset.json");
        d.save(&p).unwrap();
        assert_eq!(DatasetJson::load(&p).unwrap(), d);
        // serde entry point.
        let d2: DatasetJson = serde_json::from_str(FIXTURE).unwrap();
        assert_eq!(d2, d);
    }

    #[test]
    fn labels_keep_file_order() {
        let d = parse(json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 2, "aorta": 1},
            "numTraining": 3, "file_ending": ".nii.gz"}))
        .unwrap();
        let names: Vec<&str> = d.labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["background", "liver", "aorta"]);
        assert_eq!(d.all_labels(), vec![0, 1, 2]);
        let out: Value = serde_json::from_str(&io::to_json_string(&d).unwrap()).unwrap();
        let keys: Vec<&String> = out["labels"].as_object().unwrap().keys().collect();
        assert_eq!(keys, vec!["background", "liver", "aorta"]);
    }

    #[test]
    fn modality_alias() {
        let d = parse(
            json!({"modality": {"0": "MRI", "1": "ct"}, "labels": {"background": 0, "x": 1},
            "numTraining": 1, "file_ending": ".nii.gz"}),
        )
        .unwrap();
        assert_eq!(d.num_channels(), 2);
        assert_eq!(d.channel_names["1"], "ct");
        let out = d.to_json();
        assert!(out.contains_key("channel_names") && !out.contains_key("modality"));
        assert!(d.extra.is_empty());
        let e = err(
            json!({"modality": {"0": "MRI"}, "channel_names": {"0": "MRI"}, "labels": {"background": 0},
            "numTraining": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(
            &e,
            &[
                "dataset.json: modality",
                "either `channel_names` or its nnU-Net v1 alias `modality`",
            ],
        );
    }

    #[test]
    fn regions_and_class_order() {
        let d = parse(brats()).unwrap();
        assert!(d.has_regions());
        assert_eq!(
            d.foreground_regions(),
            vec![vec![1, 2, 3], vec![2, 3], vec![3]]
        );
        assert_eq!(d.all_labels(), vec![0, 1, 2, 3]);
        assert_eq!(d.regions_class_order, Some(vec![1, 2, 3]));
        assert_eq!(d.num_segmentation_heads(), 3);
        let back = parse(Value::Object(d.to_json())).unwrap();
        assert_eq!(back, d);

        let mut v = brats();
        v.as_object_mut().unwrap().remove("regions_class_order");
        assert_contains(
            &err(v),
            &[
                "missing key `regions_class_order`",
                "labels` defines regions",
                "3 entries",
            ],
        );
        let mut v = brats();
        v["regions_class_order"] = json!([1, 2]);
        assert_contains(&err(v), &["regions_class_order: invalid value [1, 2]: needs one entry per foreground region: 3 entries"]);
        let mut v = brats();
        v["regions_class_order"] = json!([1, "2", 3]);
        assert_contains(
            &err(v),
            &["regions_class_order[1]: expected an integer, got \"2\""],
        );
        // A single-element list is not a region (nnU-Net's rule).
        let d = parse(
            json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": [1]},
            "numTraining": 1, "file_ending": ".png"}),
        )
        .unwrap();
        assert!(!d.has_regions());
    }

    #[test]
    fn ignore_label() {
        let d = parse(json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2, "ignore": 3},
            "numTraining": 1, "file_ending": ".nii.gz"}))
        .unwrap();
        assert_eq!(d.ignore_label(), Some(3));
        assert_eq!(d.all_labels(), vec![0, 1, 2]);
        assert_eq!(d.foreground_labels(), vec![1, 2]);
        assert_eq!(d.foreground_regions(), vec![vec![1], vec![2]]);
        let e = err(
            json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "ignore": 5},
            "numTraining": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(&e, &["dataset.json: labels.ignore: invalid value 5: the ignore label must be the highest label + 1 = 2"]);
        let mut v = brats();
        v["labels"]["ignore"] = json!(4);
        let d = parse(v).unwrap();
        assert_eq!(d.foreground_regions().len(), 3);
        assert_eq!(d.ignore_label(), Some(4));
        let mut v = brats();
        v["labels"]["ignore"] = json!(4);
        v["regions_class_order"] = json!([1, 2, 4]);
        assert_contains(
            &err(v),
            &[
                "regions_class_order[2]: invalid value 4",
                "not the ignore label",
            ],
        );
    }

    #[test]
    fn extra_metadata_and_dataset_map() {
        let v = json!({
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "x": 1},
            "numTraining": 2,
            "file_ending": ".nii.gz",
            "overwrite_image_reader_writer": "NibabelIOWithReorient",
            "dataset": {
                "case_b": {"images": ["imgs/b_0000.nii.gz"], "label": "lbl/b.nii.gz"},
                "case_a": {"images": ["$DATA/a_0000.nii.gz"], "label": "lbl/a.nii.gz"}
            },
            "name": "X", "reference": "me", "licence": "CC-BY", "converted_by": {"who": "script", "version": 2}
        });
        let d = parse(v.clone()).unwrap();
        assert_eq!(
            d.overwrite_image_reader_writer.as_deref(),
            Some("NibabelIOWithReorient")
        );
        let ds = d.dataset.as_ref().unwrap();
        assert_eq!(ds["case_a"].images, vec!["$DATA/a_0000.nii.gz"]);
        assert_eq!(ds["case_b"].label.as_deref(), Some("lbl/b.nii.gz"));
        let extra_keys: Vec<&String> = d.extra.keys().collect();
        assert_eq!(
            extra_keys,
            vec!["name", "reference", "licence", "converted_by"]
        );
        let out = Value::Object(d.to_json());
        assert_eq!(out, v, "all keys and values written back");
        let mut bad = v.clone();
        bad["dataset"]["case_a"]["lable"] = json!("x");
        assert_contains(
            &err(bad),
            &["unknown key `lable` in dataset.case_a: did you mean `label`?"],
        );
        let mut bad = v.clone();
        bad["dataset"]["case_a"]["images"] = json!("a.nii.gz");
        assert_contains(
            &err(bad),
            &["dataset.case_a.images: expected a list of file paths, got \"a.nii.gz\""],
        );
        let mut bad = v;
        bad["dataset"]["case_a"]
            .as_object_mut()
            .unwrap()
            .remove("images");
        assert_contains(&err(bad), &["missing key `images` in dataset.case_a"]);
    }

    #[test]
    fn misspelled_and_missing_required_keys() {
        let e = err(
            json!({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTrainig": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(&e, &["dataset.json: unknown key `numTrainig` in the top-level object: did you mean `numTraining`?"]);
        let e = err(
            json!({"channel_names": {"0": "CT"}, "lables": {"background": 0}, "numTraining": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(&e, &["did you mean `labels`?"]);
        let e = err(
            json!({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": 1, "file_extension": ".nii.gz"}),
        );
        assert_contains(&e, &["missing key `file_ending` in the top-level object"]);
        let e =
            err(json!({"labels": {"background": 0}, "numTraining": 1, "file_ending": ".nii.gz"}));
        assert_contains(
            &e,
            &["missing key `channel_names`", "`modality` is also accepted"],
        );
        let e = err(
            json!({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": "two", "file_ending": ".nii.gz"}),
        );
        assert_contains(
            &e,
            &["dataset.json: numTraining: expected a non-negative integer, got \"two\""],
        );
        // A metadata key close to a present known key is fine.
        let d = parse(
            json!({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "label": "kept",
            "numTraining": 1, "file_ending": ".nii.gz"}),
        )
        .unwrap();
        assert_eq!(d.extra.get("label"), Some(&json!("kept")));
    }

    #[test]
    fn msd_style_metadata_is_not_mistaken_for_typos() {
        let v = json!({
            "name": "Liver", "description": "d", "reference": "r", "licence": "CC-BY-SA 4.0", "license": "x",
            "release": "1.0", "tensorImageSize": "3D", "citation": "c", "converted_by": "me", "dim": 3,
            "modality": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "cancer": 2},
            "numTraining": 131, "numTest": 70, "training": [{"image": "a", "label": "b"}], "test": ["c"],
            "file_ending": ".nii.gz"
        });
        let d = parse(v).unwrap();
        assert_eq!(d.extra.len(), 13);
        assert_eq!(d.num_training, 131);
    }

    #[test]
    fn label_and_channel_checks() {
        let e = err(
            json!({"channel_names": {"0": "CT"}, "labels": {"liver": 1}, "numTraining": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(
            &e,
            &[
                "dataset.json: labels: invalid value {\"liver\":1}",
                "background with value 0",
            ],
        );
        let e = err(
            json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "big": 40000}, "numTraining": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(&e, &["labels.big: invalid value 40000", "0..=32767"]);
        let e = err(
            json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": "one"}, "numTraining": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(&e, &["labels.x: expected an integer label value or a list of integers (a region), got \"one\""]);
        let e = err(
            json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": [1, 2.5]}, "numTraining": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(&e, &["labels.x[1]: expected an integer, got 2.5"]);
        let e = err(
            json!({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"}, "numTraining": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(
            &e,
            &[
                "labels.0: invalid value \"background\"",
                "(e.g. \"background\": 0)",
                "v1 layout",
            ],
        );
        let e = err(
            json!({"channel_names": {"0": "CT", "2": "T2"}, "labels": {"background": 0}, "numTraining": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(&e, &["channel_names", "index 1 is missing"]);
        let e = err(
            json!({"channel_names": {"zero": "CT"}, "labels": {"background": 0}, "numTraining": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(&e, &["channel_names.zero", "channel indices"]);
        let e = err(
            json!({"channel_names": {"0": 5}, "labels": {"background": 0}, "numTraining": 1, "file_ending": ".nii.gz"}),
        );
        assert_contains(&e, &["channel_names.0: expected a string, got 5"]);
    }

    #[test]
    fn many_channels_are_ordered_numerically() {
        let names: Map<String, Value> = (0..12)
            .map(|i| (i.to_string(), json!(format!("c{i}"))))
            .collect();
        let d = parse(json!({"channel_names": names, "labels": {"background": 0}, "numTraining": 1, "file_ending": ".nii.gz"}))
            .unwrap();
        assert_eq!(d.num_channels(), 12);
        assert_eq!(d.channel_names_ordered()[10], (10, "c10".to_string()));
        let keys: Vec<String> = d.to_json()["channel_names"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, (0..12).map(|i| i.to_string()).collect::<Vec<_>>());
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dataset.json");
        std::fs::write(&p, "{\"channel_names\": {\"0\": \"CT\"}, \"labels\": {\"background\": 0}, \"numTraining\": -1, \"file_ending\": \".nii.gz\"}").unwrap();
        let e = DatasetJson::load(&p).unwrap_err().to_string();
        assert_contains(
            &e,
            &[
                &p.display().to_string(),
                "numTraining: expected a non-negative integer, got -1",
            ],
        );
    }
}
