//! `arch_kwargs` → typed options, parsed once at the edge of a network family.
//!
//! A family declares its own keys as a serde struct (`#[serde(default)]`, every field an
//! `Option`) and reads the standard keys of dynamic-network-architectures' U-Nets as
//! [`crate::unet::options::UNetKwargs`]. [`typed`] deserializes either from the whole
//! `arch_kwargs` object (keys the struct does not declare are skipped there) and names the
//! JSON path of a bad value (`architecture.arch_kwargs.kernel_sizes[2]`); [`reject_unknown`]
//! rejects every key no struct declares, with its JSON path, the closest known key and the
//! list of known keys. The checks that need more than a type (a length per stage, a value
//! range) follow in the family's `from_kwargs`, with the same paths.

use crate::network::ArchError;
use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

/// An invalid option at `path`.
pub(crate) fn invalid(path: &str, message: impl Into<String>) -> ArchError {
    ArchError::InvalidOption {
        path: path.to_string(),
        message: message.into(),
    }
}

/// `path.key` (or `key` at the root).
pub(crate) fn key_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A JSON value for error messages (shortened).
pub(crate) fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}

/// Deserializes the typed options `T` from `kwargs` (at JSON path `path`). Keys `T` does not
/// declare are skipped (see [`reject_unknown`]); `null` is "not given" for `Option` fields.
pub fn typed<T: DeserializeOwned>(kwargs: &Map<String, Value>, path: &str) -> Result<T, ArchError> {
    serde_path_to_error::deserialize(Value::Object(kwargs.clone())).map_err(|e| {
        let inner = e.path().to_string();
        let p = if inner == "." {
            path.to_string()
        } else {
            key_path(path, &inner)
        };
        invalid(&p, humanize(e.into_inner().to_string()))
    })
}

/// serde's "invalid type: X, expected Y" as this crate words it: "expected Y, got X".
fn humanize(message: String) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((got, expected)) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once(", expected "))
        {
            let expected = match expected {
                "a boolean" => "true or false",
                "usize" => "a non-negative integer",
                "f64" => "a number",
                other => other,
            };
            return format!("expected {expected}, got {got}");
        }
    }
    message
}

/// Rejects the first key of `kwargs` outside `known` (at JSON path `path`): the error names
/// its path, the closest known key if it looks misspelled, and the known keys.
pub fn reject_unknown(
    kwargs: &Map<String, Value>,
    path: &str,
    known: &[&str],
) -> Result<(), ArchError> {
    let Some(k) = kwargs.keys().find(|k| !known.contains(&k.as_str())) else {
        return Ok(());
    };
    let mut sorted = known.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let hint = match plans::suggest_key(k, known) {
        Some(s) => format!("did you mean `{s}`? "),
        None => String::new(),
    };
    Err(invalid(
        &key_path(path, k),
        format!("unknown argument; {hint}accepted: {}", sorted.join(", ")),
    ))
}

/// The keys (field names) of a serde struct `T`.
pub fn keys<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields = None;
    let _ = T::deserialize(FieldProbe(&mut fields));
    fields.unwrap_or_default()
}

/// A deserializer that only records the field list a struct asks for.
struct FieldProbe<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> Deserializer<'de> for FieldProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// An integer or a list of them (per axis, per stage, ...): see [`PerStage`].
pub type IntOrList = PerStage;

/// A per-stage integer: one for every stage, or a list of one per stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PerStage {
    All(usize),
    Each(Vec<usize>),
}

impl PerStage {
    /// One value per stage (`n` of them), each at least `min` (`path` names the key).
    pub fn resolve(&self, n: usize, min: usize, path: &str) -> Result<Vec<usize>, ArchError> {
        let out = match self {
            PerStage::All(v) => vec![*v; n],
            PerStage::Each(v) if v.len() != n => {
                return Err(invalid(
                    path,
                    format!("has {} entries, expected {n} (one per stage)", v.len()),
                ))
            }
            PerStage::Each(v) => v.clone(),
        };
        match out.iter().position(|&x| x < min) {
            None => Ok(out),
            Some(i) => {
                let p = match self {
                    PerStage::All(_) => path.to_string(),
                    PerStage::Each(_) => format!("{path}[{i}]"),
                };
                Err(invalid(&p, format!("must be at least {min}")))
            }
        }
    }
}

impl<'de> Deserialize<'de> for PerStage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PerStage;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative integer or a list of them (one per stage)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PerStage, E> {
                Ok(PerStage::All(v as usize))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PerStage, A::Error> {
                let mut out = vec![];
                while let Some(x) = seq.next_element::<usize>()? {
                    out.push(x);
                }
                Ok(PerStage::Each(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A per-stage, per-axis integer (kernel sizes, strides): one for everything, or one entry per
/// stage that is a number (every axis) or a list of one per spatial axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PerStageAxes {
    All(usize),
    Each(Vec<PerStage>),
}

impl PerStageAxes {
    /// `n` stages × `dim` axes, every value at least 1 (`path` names the key).
    pub fn resolve(&self, n: usize, dim: usize, path: &str) -> Result<Vec<Vec<usize>>, ArchError> {
        let positive = |x: usize, p: &str| {
            if x == 0 {
                Err(invalid(p, "must be at least 1"))
            } else {
                Ok(x)
            }
        };
        let stages = match self {
            PerStageAxes::All(x) => return Ok(vec![vec![positive(*x, path)?; dim]; n]),
            PerStageAxes::Each(s) => s,
        };
        if stages.len() != n {
            return Err(invalid(
                path,
                format!("has {} entries, expected {n} (one per stage)", stages.len()),
            ));
        }
        let mut out = Vec::with_capacity(n);
        for (i, stage) in stages.iter().enumerate() {
            let sp = format!("{path}[{i}]");
            match stage {
                PerStage::All(x) => out.push(vec![positive(*x, &sp)?; dim]),
                PerStage::Each(axes) if axes.len() != dim => {
                    return Err(invalid(
                        &sp,
                        format!(
                            "has {} entries, expected {dim} (one per spatial axis)",
                            axes.len()
                        ),
                    ))
                }
                PerStage::Each(axes) => out.push(
                    axes.iter()
                        .enumerate()
                        .map(|(j, &x)| positive(x, &format!("{sp}[{j}]")))
                        .collect::<Result<_, _>>()?,
                ),
            }
        }
        Ok(out)
    }
}

impl<'de> Deserialize<'de> for PerStageAxes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PerStageAxes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer or a list (one integer or list of integers per stage)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PerStageAxes, E> {
                Ok(PerStageAxes::All(v as usize))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PerStageAxes, A::Error> {
                let mut out = vec![];
                while let Some(x) = seq.next_element::<PerStage>()? {
                    out.push(x);
                }
                Ok(PerStageAxes::Each(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string choice read case-insensitively (`"Batch"` = `"batch"`); `T` lists the choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice<T>(pub T);

/// The choices of a [`Choice`].
pub trait Choices: Sized + Copy + 'static {
    /// `(name, value)`, names lower case.
    const CHOICES: &'static [(&'static str, Self)];
}

impl<'de, T: Choices> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let lower = s.trim().to_ascii_lowercase();
        T::CHOICES
            .iter()
            .find(|(name, _)| *name == lower)
            .map(|(_, v)| Choice(*v))
            .ok_or_else(|| {
                let names: Vec<String> = T::CHOICES
                    .iter()
                    .map(|(name, _)| format!("\"{name}\""))
                    .collect();
                de::Error::custom(format!("expected one of {}, got \"{s}\"", names.join(", ")))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Own {
        depth: Option<usize>,
        scale: Option<f64>,
        strides: Option<PerStageAxes>,
        flag: Option<bool>,
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn typed_options_name_the_path_of_a_bad_value() {
        let p = "architecture.arch_kwargs";
        let o: Own = typed(&map(json!({"depth": 3, "scale": 2, "other": "x"})), p).unwrap();
        assert_eq!((o.depth, o.scale, o.flag), (Some(3), Some(2.0), None));
        let o: Own = typed(&map(json!({"depth": null})), p).unwrap();
        assert_eq!(o.depth, None);
        let e = typed::<Own>(&map(json!({"depth": "deep"})), p).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"architecture.arch_kwargs.depth: expected a non-negative integer, got string "deep""#
        );
        let e = typed::<Own>(&map(json!({"flag": 1})), p).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("flag: expected true or false, got integer `1`"),
            "{e}"
        );
        let e = typed::<Own>(&map(json!({"strides": [1, [2, "x"]]})), p).unwrap_err();
        assert!(e.to_string().contains("arch_kwargs.strides[1][1]: "), "{e}");
        assert_eq!(keys::<Own>(), &["depth", "scale", "strides", "flag"]);
    }

    #[test]
    fn unknown_keys_get_a_did_you_mean_and_the_known_list() {
        let e = reject_unknown(&map(json!({"dept": 1})), "a", &["depth", "scale"]).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("a.dept: unknown argument; did you mean `depth`? accepted: depth, scale"),
            "{e}"
        );
        let e = reject_unknown(&map(json!({"zzz": 1})), "a", &["depth"]).unwrap_err();
        assert!(!e.to_string().contains("did you mean"), "{e}");
        assert!(reject_unknown(&map(json!({"depth": 1})), "a", &["depth"]).is_ok());
    }

    #[test]
    fn per_stage_values_resolve_with_paths() {
        assert_eq!(PerStage::All(2).resolve(3, 1, "k").unwrap(), vec![2; 3]);
        let e = PerStage::Each(vec![1, 0]).resolve(2, 1, "k").unwrap_err();
        assert!(e.to_string().starts_with("k[1]: must be at least 1"), "{e}");
        let e = PerStage::Each(vec![1]).resolve(2, 0, "k").unwrap_err();
        assert!(e.to_string().contains("has 1 entries, expected 2"), "{e}");
        let s = PerStageAxes::Each(vec![PerStage::All(1), PerStage::Each(vec![1, 2])]);
        assert_eq!(s.resolve(2, 2, "s").unwrap(), vec![vec![1, 1], vec![1, 2]]);
        let e = s.resolve(2, 3, "s").unwrap_err();
        assert!(
            e.to_string().starts_with("s[1]: has 2 entries, expected 3"),
            "{e}"
        );
    }
}
