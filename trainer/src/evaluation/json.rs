//! JSON with Python's non-finite float literals (`NaN`, `Infinity`, `-Infinity`).
//!
//! [`Json`] is written like Python's `json.dump(obj, f, indent=4, sort_keys=...)`: 4-space
//! indent, floats in `repr` form, non-ASCII escaped, NaN as the bare literal `NaN`.
//! [`parse_json_with_nan`] reads such files: the literals (outside strings) become `null`.

use std::path::Path;

use serde_json::Value;

use super::{io_err, EvalError, Result};

/// A JSON tree that can hold non-finite floats.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Build an object from key/value pairs.
    pub fn obj<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Json)>) -> Json {
        Json::Obj(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// Python-style pretty text (indent 4). With `sort_keys`, object keys are sorted by their
    /// code points like Python's `sort_keys=True`.
    pub fn to_python_string(&self, sort_keys: bool) -> String {
        let mut s = String::new();
        self.write(&mut s, 0, sort_keys);
        s
    }

    fn write(&self, out: &mut String, level: usize, sort_keys: bool) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(i) => out.push_str(&i.to_string()),
            Json::Float(f) => out.push_str(&plans::io::python_float_repr(*f)),
            Json::Str(s) => out.push_str(&quote(s)),
            Json::Arr(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, level + 1);
                    v.write(out, level + 1, sort_keys);
                }
                newline(out, level);
                out.push(']');
            }
            Json::Obj(pairs) => {
                if pairs.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut refs: Vec<&(String, Json)> = pairs.iter().collect();
                if sort_keys {
                    refs.sort_by(|a, b| a.0.cmp(&b.0));
                }
                out.push('{');
                for (i, (k, v)) in refs.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, level + 1);
                    out.push_str(&quote(k));
                    out.push_str(": ");
                    v.write(out, level + 1, sort_keys);
                }
                newline(out, level);
                out.push('}');
            }
        }
    }
}

impl From<&Value> for Json {
    fn from(v: &Value) -> Json {
        match v {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Json::Int(i),
                None => Json::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Json::Str(s.clone()),
            Value::Array(a) => Json::Arr(a.iter().map(Json::from).collect()),
            Value::Object(m) => {
                Json::Obj(m.iter().map(|(k, v)| (k.clone(), Json::from(v))).collect())
            }
        }
    }
}

fn newline(out: &mut String, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn quote(s: &str) -> String {
    // plans' formatter escapes like Python (ensure_ascii); a plain string cannot fail.
    plans::io::to_json_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

/// Writes `v` atomically in Python's layout (NaN as `NaN`).
pub fn write_json_nan_atomic(path: &Path, v: &Json, sort_keys: bool) -> Result<()> {
    plans::io::write_atomic(path, v.to_python_string(sort_keys).as_bytes())?;
    Ok(())
}

/// Parses JSON text that may contain Python's `NaN`, `Infinity`, `-Infinity` literals outside
/// strings; they become `null`. Errors name `path`, line and column.
pub fn parse_json_with_nan(path: &Path, text: &str) -> Result<Value> {
    let mut cleaned = String::with_capacity(text.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            cleaned.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let mut replaced = false;
        for lit in ["-Infinity", "Infinity", "NaN"] {
            if rest.starts_with(lit) {
                // Keep the text length so that error columns stay meaningful.
                cleaned.push_str("null");
                rest = &rest[lit.len()..];
                replaced = true;
                break;
            }
        }
        if replaced {
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        cleaned.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Ok(plans::io::parse_json_str(path, &cleaned)?)
}

/// Reads a JSON file that may contain `NaN` literals (see [`parse_json_with_nan`]).
pub fn read_json_with_nan(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
    parse_json_with_nan(path, &text)
}

/// A number of a parsed JSON value as f64; `null` (a `NaN` literal) is NaN.
pub(crate) fn num(v: Option<&Value>, path: &Path, what: &str) -> Result<f64> {
    match v {
        Some(Value::Null) => Ok(f64::NAN),
        Some(Value::Number(n)) => Ok(n.as_f64().unwrap_or(f64::NAN)),
        _ => Err(EvalError::Invalid {
            path: path.to_path_buf(),
            message: format!("{what}: expected a number"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_python_layout_with_nan() {
        let j = Json::obj([
            ("b", Json::Float(f64::NAN)),
            ("a", Json::Arr(vec![Json::Int(1), Json::Float(0.5)])),
            ("c", Json::Obj(vec![])),
        ]);
        let s = j.to_python_string(true);
        assert_eq!(
            s,
            "{\n    \"a\": [\n        1,\n        0.5\n    ],\n    \"b\": NaN,\n    \"c\": {}\n}"
        );
        let v = parse_json_with_nan(Path::new("x.json"), &s).unwrap();
        assert!(v["b"].is_null());
        assert_eq!(v["a"][1], 0.5);
    }

    #[test]
    fn reader_keeps_nan_inside_strings() {
        let v = parse_json_with_nan(
            Path::new("x"),
            r#"{"NaN": "NaN \" Infinity", "x": -Infinity}"#,
        )
        .unwrap();
        assert_eq!(v["NaN"], "NaN \" Infinity");
        assert!(v["x"].is_null());
        assert!(parse_json_with_nan(Path::new("bad.json"), "{\"a\": nan}").is_err());
    }
}
