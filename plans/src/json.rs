//! Small helpers to read a `serde_json::Value` with precise error messages (file + JSON path).

use serde_json::{Map, Value};

use crate::PlansError;

/// Compact, truncated rendering of a JSON value for error messages.
pub(crate) fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        let head: String = s.chars().take(77).collect();
        format!("{head}...")
    } else {
        s
    }
}

/// `parent.key`, or `key` at the top level.
pub(crate) fn child(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[i]`.
pub(crate) fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// How an object path is shown in "missing key ... in X" messages.
pub(crate) fn object_name(path: &str) -> String {
    if path.is_empty() {
        "the top-level object".to_string()
    } else {
        path.to_string()
    }
}

pub(crate) fn type_err(file: &str, path: &str, expected: &str, got: &Value) -> PlansError {
    PlansError::Type {
        file: file.to_string(),
        path: if path.is_empty() {
            "(top level)".to_string()
        } else {
            path.to_string()
        },
        expected: expected.to_string(),
        got: describe(got),
    }
}

pub(crate) fn invalid(
    file: &str,
    path: &str,
    value: String,
    allowed: impl Into<String>,
) -> PlansError {
    PlansError::Invalid {
        file: file.to_string(),
        path: path.to_string(),
        value,
        allowed: allowed.into(),
    }
}

pub(crate) fn as_object<'v>(
    file: &str,
    path: &str,
    v: &'v Value,
) -> Result<&'v Map<String, Value>, PlansError> {
    v.as_object()
        .ok_or_else(|| type_err(file, path, "a JSON object", v))
}

pub(crate) fn as_array<'v>(
    file: &str,
    path: &str,
    v: &'v Value,
    expected: &str,
) -> Result<&'v Vec<Value>, PlansError> {
    v.as_array()
        .ok_or_else(|| type_err(file, path, expected, v))
}

pub(crate) fn as_string(file: &str, path: &str, v: &Value) -> Result<String, PlansError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| type_err(file, path, "a string", v))
}

/// A string or null.
pub(crate) fn as_opt_string(
    file: &str,
    path: &str,
    v: &Value,
) -> Result<Option<String>, PlansError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(type_err(file, path, "a string or null", v)),
    }
}

pub(crate) fn as_bool(file: &str, path: &str, v: &Value) -> Result<bool, PlansError> {
    v.as_bool()
        .ok_or_else(|| type_err(file, path, "a boolean (true or false)", v))
}

/// A JSON integer (an integral float such as `4.0` is accepted too).
fn integer_of(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    match v.as_f64() {
        Some(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
        _ => None,
    }
}

pub(crate) fn as_i64(file: &str, path: &str, v: &Value) -> Result<i64, PlansError> {
    integer_of(v).ok_or_else(|| type_err(file, path, "an integer", v))
}

/// A non-negative integer; `positive` additionally rejects 0.
pub(crate) fn as_usize(
    file: &str,
    path: &str,
    v: &Value,
    positive: bool,
) -> Result<usize, PlansError> {
    let expected = if positive {
        "a positive integer"
    } else {
        "a non-negative integer"
    };
    match integer_of(v) {
        Some(i) if i > 0 || (i == 0 && !positive) => Ok(i as usize),
        _ => Err(type_err(file, path, expected, v)),
    }
}

pub(crate) fn as_f64(file: &str, path: &str, v: &Value) -> Result<f64, PlansError> {
    v.as_f64()
        .ok_or_else(|| type_err(file, path, "a number", v))
}

/// A finite number > 0.
pub(crate) fn as_positive_f64(file: &str, path: &str, v: &Value) -> Result<f64, PlansError> {
    match v.as_f64() {
        Some(f) if f.is_finite() && f > 0.0 => Ok(f),
        _ => Err(type_err(file, path, "a positive number", v)),
    }
}

/// A list, each element converted with `f(path_of_element, element)`.
pub(crate) fn as_vec<T>(
    file: &str,
    path: &str,
    v: &Value,
    expected: &str,
    mut f: impl FnMut(&str, &Value) -> Result<T, PlansError>,
) -> Result<Vec<T>, PlansError> {
    let arr = as_array(file, path, v, expected)?;
    arr.iter()
        .enumerate()
        .map(|(i, e)| f(&index(path, i), e))
        .collect()
}

/// Levenshtein distance on characters.
pub(crate) fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0usize; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn normalize_key(k: &str) -> String {
    k.to_ascii_lowercase().replace(['-', ' '], "_")
}

/// The closest candidate to `key` if it is near enough to be a plausible misspelling:
/// equal up to case/`-`/`_`, or within edit distance 1 (keys of ≤ 4 chars), 2 (≤ 10 chars) or 3.
pub fn suggest<'c>(key: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let nk = normalize_key(key);
    let mut best: Option<(usize, &'c str)> = None;
    for &c in candidates {
        if c == key {
            continue;
        }
        let nc = normalize_key(c);
        let d = levenshtein(&nk, &nc);
        let len = nc.chars().count().max(nk.chars().count());
        let limit = if len <= 4 {
            1
        } else if len <= 10 {
            2
        } else {
            3
        };
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Fetch a required key, with a "missing key" error that mentions a near-miss key if one exists.
pub(crate) fn require<'v>(
    file: &str,
    parent: &str,
    map: &'v Map<String, Value>,
    key: &str,
    note: &str,
) -> Result<&'v Value, PlansError> {
    map.get(key)
        .ok_or_else(|| missing(file, parent, map, key, note))
}

pub(crate) fn missing(
    file: &str,
    parent: &str,
    map: &Map<String, Value>,
    key: &str,
    note: &str,
) -> PlansError {
    let mut note = note.to_string();
    let present: Vec<&str> = map.keys().map(String::as_str).collect();
    if let Some(near) = suggest(key, &present) {
        note.push_str(&format!(" (found `{near}` instead: misspelled?)"));
    }
    PlansError::MissingKey {
        file: file.to_string(),
        parent: object_name(parent),
        key: key.to_string(),
        note,
    }
}

pub(crate) fn misspelled(file: &str, parent: &str, key: &str, suggestion: &str) -> PlansError {
    PlansError::MisspelledKey {
        file: file.to_string(),
        parent: object_name(parent),
        key: key.to_string(),
        suggestion: suggestion.to_string(),
    }
}

pub(crate) fn unknown(file: &str, parent: &str, key: &str, allowed: &[&str]) -> PlansError {
    PlansError::UnknownKey {
        file: file.to_string(),
        parent: object_name(parent),
        key: key.to_string(),
        allowed: allowed.join(", "),
    }
}

/// For objects with a closed key set: error on any key not in `allowed` (suggesting the closest).
pub(crate) fn closed_keys(
    file: &str,
    parent: &str,
    map: &Map<String, Value>,
    allowed: &[&str],
) -> Result<(), PlansError> {
    for k in map.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(match suggest(k, allowed) {
                Some(s) => misspelled(file, parent, k, s),
                None => unknown(file, parent, k, allowed),
            });
        }
    }
    Ok(())
}

/// Render a list of names as "`a`, `b`" (or "(none)").
pub(crate) fn name_list<S: AsRef<str>>(names: &[S]) -> String {
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names
            .iter()
            .map(|n| format!("`{}`", n.as_ref()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
