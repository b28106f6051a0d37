//! `dataset_fingerprint.json` and the per-channel foreground intensity statistics.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::json::{self as j, child};
use crate::{io, PlansError};

/// Foreground intensity statistics of one channel (keys sorted like nnU-Net writes them).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct IntensityProperties {
    pub max: f64,
    pub mean: f64,
    pub median: f64,
    pub min: f64,
    pub percentile_00_5: f64,
    pub percentile_99_5: f64,
    pub std: f64,
}

const INTENSITY_KEYS: [&str; 7] = [
    "max",
    "mean",
    "median",
    "min",
    "percentile_00_5",
    "percentile_99_5",
    "std",
];

impl IntensityProperties {
    pub(crate) fn from_value(file: &str, path: &str, v: &Value) -> Result<Self, PlansError> {
        let o = j::as_object(file, path, v)?;
        j::closed_keys(file, path, o, &INTENSITY_KEYS)?;
        let g = |k: &str| -> Result<f64, PlansError> {
            j::as_f64(file, &child(path, k), j::require(file, path, o, k, "")?)
        };
        Ok(IntensityProperties {
            max: g("max")?,
            mean: g("mean")?,
            median: g("median")?,
            min: g("min")?,
            percentile_00_5: g("percentile_00_5")?,
            percentile_99_5: g("percentile_99_5")?,
            std: g("std")?,
        })
    }

    pub(crate) fn to_json(self) -> Value {
        let vals = [
            self.max,
            self.mean,
            self.median,
            self.min,
            self.percentile_00_5,
            self.percentile_99_5,
            self.std,
        ];
        Value::Object(
            INTENSITY_KEYS
                .iter()
                .zip(vals)
                .map(|(k, v)| (k.to_string(), Value::from(v)))
                .collect(),
        )
    }
}

impl Serialize for IntensityProperties {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for IntensityProperties {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        IntensityProperties::from_value("JSON", "", &v).map_err(serde::de::Error::custom)
    }
}

/// Parse `{"0": {...}, "1": {...}}`.
pub(crate) fn intensity_map_from_value(
    file: &str,
    path: &str,
    v: &Value,
) -> Result<BTreeMap<String, IntensityProperties>, PlansError> {
    let o = j::as_object(file, path, v)?;
    o.iter()
        .map(|(k, x)| {
            Ok((
                k.clone(),
                IntensityProperties::from_value(file, &child(path, k), x)?,
            ))
        })
        .collect()
}

/// Serialize the per-channel map with channel keys in numeric order.
pub(crate) fn intensity_map_to_json(m: &BTreeMap<String, IntensityProperties>) -> Value {
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort_by_key(|k| {
        (
            k.trim().parse::<usize>().unwrap_or(usize::MAX),
            (*k).clone(),
        )
    });
    Value::Object(
        keys.into_iter()
            .map(|k| (k.clone(), m[k].to_json()))
            .collect(),
    )
}

/// `dataset_fingerprint.json` (nnU-Net writes it with sorted keys, which is the field order here).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Fingerprint {
    pub foreground_intensity_properties_per_channel: BTreeMap<String, IntensityProperties>,
    pub median_relative_size_after_cropping: f64,
    /// Per case, reader axis order (not transposed).
    pub shapes_after_crop: Vec<Vec<usize>>,
    /// Per case, reader axis order (not transposed).
    pub spacings: Vec<Vec<f64>>,
}

const FINGERPRINT_KEYS: [&str; 4] = [
    "foreground_intensity_properties_per_channel",
    "median_relative_size_after_cropping",
    "shapes_after_crop",
    "spacings",
];

impl Fingerprint {
    pub fn load(path: &Path) -> Result<Self, PlansError> {
        let v = io::read_json_file(path)?;
        Self::from_value(&v, &path.display().to_string())
    }

    pub fn save(&self, path: &Path) -> Result<(), PlansError> {
        io::write_json_atomic(path, self)
    }

    /// Parse and validate from JSON; `file` is used in error messages. Unknown keys that look
    /// like misspellings are errors; other unknown keys are ignored.
    pub fn from_value(v: &Value, file: &str) -> Result<Self, PlansError> {
        let o = j::as_object(file, "", v)?;
        for k in o.keys() {
            if !FINGERPRINT_KEYS.contains(&k.as_str()) {
                if let Some(s) = j::suggest(k, &FINGERPRINT_KEYS) {
                    return Err(j::misspelled(file, "", k, s));
                }
            }
        }
        let fip = intensity_map_from_value(
            file,
            "foreground_intensity_properties_per_channel",
            j::require(
                file,
                "",
                o,
                "foreground_intensity_properties_per_channel",
                "",
            )?,
        )?;
        let mrs_path = "median_relative_size_after_cropping";
        let mrs = j::as_f64(file, mrs_path, j::require(file, "", o, mrs_path, "")?)?;
        let shapes = j::as_vec(
            file,
            "shapes_after_crop",
            j::require(file, "", o, "shapes_after_crop", "")?,
            "a list of per-case shapes",
            |p, s| {
                j::as_vec(
                    file,
                    p,
                    s,
                    "a list of non-negative integers (a shape)",
                    |pp, x| j::as_usize(file, pp, x, false),
                )
            },
        )?;
        let spacings = j::as_vec(
            file,
            "spacings",
            j::require(file, "", o, "spacings", "")?,
            "a list of per-case spacings",
            |p, s| {
                j::as_vec(
                    file,
                    p,
                    s,
                    "a list of positive numbers (a spacing)",
                    |pp, x| j::as_positive_f64(file, pp, x),
                )
            },
        )?;
        if shapes.len() != spacings.len() {
            return Err(j::invalid(
                file,
                "spacings",
                format!("{} entries", spacings.len()),
                format!(
                    "must have one entry per case, like shapes_after_crop ({} entries)",
                    shapes.len()
                ),
            ));
        }
        for (i, (sh, sp)) in shapes.iter().zip(&spacings).enumerate() {
            if sh.len() != sp.len() {
                return Err(j::invalid(
                    file,
                    &j::index("spacings", i),
                    format!("{sp:?}"),
                    format!("must have as many axes as shapes_after_crop[{i}] = {sh:?}"),
                ));
            }
        }
        Ok(Fingerprint {
            foreground_intensity_properties_per_channel: fip,
            median_relative_size_after_cropping: mrs,
            shapes_after_crop: shapes,
            spacings,
        })
    }

    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(
            "foreground_intensity_properties_per_channel".into(),
            intensity_map_to_json(&self.foreground_intensity_properties_per_channel),
        );
        m.insert(
            "median_relative_size_after_cropping".into(),
            Value::from(self.median_relative_size_after_cropping),
        );
        m.insert(
            "shapes_after_crop".into(),
            Value::from(self.shapes_after_crop.clone()),
        );
        m.insert("spacings".into(), Value::from(self.spacings.clone()));
        m
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Fingerprint::from_value(&v, "dataset_fingerprint.json").map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EXAMPLE: &str = include_str!("testdata/example_dataset_fingerprint_Dataset501.json");

    fn err(v: Value) -> String {
        Fingerprint::from_value(&v, "dataset_fingerprint.json")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn example_round_trips_byte_for_byte() {
        let v: Value = serde_json::from_str(EXAMPLE).unwrap();
        let f = Fingerprint::from_value(&v, "x").unwrap();
        assert_eq!(f.shapes_after_crop[0], vec![25, 80, 83]);
        assert_eq!(f.spacings.len(), f.shapes_after_crop.len());
        assert!((f.median_relative_size_after_cropping - 0.7338549303816357).abs() < 1e-15);
        let ip = f.foreground_intensity_properties_per_channel["0"];
        assert_eq!(ip.max, 318.7719421386719);
        assert_eq!(ip.percentile_00_5, -26.812454223632812);
        assert_eq!(io::to_json_string(&f).unwrap(), EXAMPLE);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dataset_fingerprint.json");
        f.save(&p).unwrap();
        assert_eq!(Fingerprint::load(&p).unwrap(), f);
        let f2: Fingerprint = serde_json::from_str(EXAMPLE).unwrap();
        assert_eq!(f2, f);
    }

    #[test]
    fn errors_have_paths() {
        let v: Value = serde_json::from_str(EXAMPLE).unwrap();
        let mut bad = v.clone();
        bad["shapes_after_crop"][1][2] = json!(-3);
        assert!(err(bad).contains("dataset_fingerprint.json: shapes_after_crop[1][2]: expected a non-negative integer, got -3"));
        let mut bad = v.clone();
        bad["spacings"][0][0] = json!(0.0);
        assert!(err(bad).contains("spacings[0][0]: expected a positive number, got 0.0"));
        let mut bad = v.clone();
        bad["spacings"].as_array_mut().unwrap().pop();
        assert!(err(bad).contains("must have one entry per case"));
        let mut bad = v.clone();
        bad["spacings"][2] = json!([1.0, 1.0]);
        assert!(err(bad).contains(
            "spacings[2]: invalid value [1.0, 1.0]: must have as many axes as shapes_after_crop[2]"
        ));
        let mut bad = v.clone();
        bad["foreground_intensity_properties_per_channel"]["0"]
            .as_object_mut()
            .unwrap()
            .remove("std");
        assert!(
            err(bad).contains("missing key `std` in foreground_intensity_properties_per_channel.0")
        );
        let mut bad = v.clone();
        bad["foreground_intensity_properties_per_channel"]["0"]["percentile_99"] = json!(1.0);
        assert!(err(bad).contains("unknown key `percentile_99` in foreground_intensity_properties_per_channel.0: did you mean"));
        let mut bad = v.clone();
        let x = bad.as_object_mut().unwrap().remove("spacings").unwrap();
        bad.as_object_mut().unwrap().insert("spacing".into(), x);
        assert!(err(bad)
            .contains("unknown key `spacing` in the top-level object: did you mean `spacings`?"));
        // Far unknown keys are tolerated.
        let mut ok = v;
        ok["computed_by"] = json!("nnseg");
        Fingerprint::from_value(&ok, "x").unwrap();
    }
}
