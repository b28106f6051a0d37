//! Atomic file writes and JSON reading/writing in nnU-Net's format.
//!
//! JSON is written like Python's `json.dump(obj, f, indent=4)` (what nnU-Net's `save_json` does):
//! 4-space indentation, `": "` after keys, floats in Python `repr` form (`1e-05`, `30.0`),
//! non-ASCII characters escaped as `\uXXXX`, no trailing newline. Files written by nnU-Net
//! therefore round-trip byte for byte.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter};
use serde_json::Value;

use crate::PlansError;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn io_err(action: &'static str, path: &Path, source: io::Error) -> PlansError {
    PlansError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Write `bytes` to `path` atomically: write a temporary file in the same folder, fsync it, then
/// rename it over `path` (readers never see a half-written file). The parent folder must exist.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PlansError> {
    let file_name = path.file_name().ok_or_else(|| {
        io_err(
            "write",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
        )
    })?;
    let dir: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        file_name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("write", path, e));
    }
    // Make the rename durable; not all platforms/filesystems allow syncing a folder.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Serialize `v` as JSON in nnU-Net's layout (see module docs) into a string.
pub fn to_json_string<T: Serialize + ?Sized>(v: &T) -> Result<String, serde_json::Error> {
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, PythonFormatter::new());
    v.serialize(&mut ser)?;
    // The formatter only emits ASCII.
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Write `v` as pretty JSON (4-space indent, Python-style numbers) atomically to `path`.
pub fn write_json_atomic<T: Serialize>(path: &Path, v: &T) -> Result<(), PlansError> {
    let s = to_json_string(v).map_err(|e| PlansError::Serialize {
        file: path.display().to_string(),
        message: e.to_string(),
    })?;
    write_atomic(path, s.as_bytes())
}

/// Read and parse a JSON file. Parse errors name the file, line and column.
pub fn read_json_file(path: &Path) -> Result<Value, PlansError> {
    let text = fs::read_to_string(path).map_err(|e| io_err("read", path, e))?;
    parse_json_str(path, &text)
}

/// Parse JSON text that came from `path` (used for error messages only).
pub fn parse_json_str(path: &Path, text: &str) -> Result<Value, PlansError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    serde_json::from_str(text).map_err(|e| PlansError::Parse {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: strip_position(&e.to_string()),
    })
}

/// serde_json appends " at line L column C"; the error reports those separately.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Format a finite f64 like Python's `repr(float)`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // Rust's `{:e}` gives the shortest round-trip digits ("-1.2345e-5"), but breaks ties between
    // equally short candidates differently from Python; re-round to that many digits exactly
    // (round-half-even on the exact binary value, like Python's dtoa) and keep it if it still
    // round-trips.
    let shortest = format!("{x:e}");
    let n_digits = shortest
        .split('e')
        .next()
        .map_or(1, |m| m.chars().filter(char::is_ascii_digit).count());
    let exact = format!("{:.*e}", n_digits.saturating_sub(1), x);
    let s = if exact.parse::<f64>().ok() == Some(x) {
        exact
    } else {
        shortest
    };
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.as_str()),
    };
    let (mant, exp) = s.split_once('e').unwrap_or((s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if !(-4..16).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.abs()));
    } else if exp >= 0 {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.push_str(&digits);
            out.push_str(&"0".repeat(int_len - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..int_len]);
            out.push('.');
            out.push_str(&digits[int_len..]);
        }
    } else {
        out.push_str("0.");
        out.push_str(&"0".repeat((-exp - 1) as usize));
        out.push_str(&digits);
    }
    out
}

/// serde_json formatter reproducing Python's `json.dump(indent=4)` (ensure_ascii=True).
struct PythonFormatter<'a> {
    inner: PrettyFormatter<'a>,
}

impl PythonFormatter<'_> {
    fn new() -> Self {
        PythonFormatter {
            inner: PrettyFormatter::with_indent(b"    "),
        }
    }
}

impl Formatter for PythonFormatter<'_> {
    fn write_f64<W: ?Sized + Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        writer.write_all(python_float_repr(value).as_bytes())
    }
    fn write_f32<W: ?Sized + Write>(&mut self, writer: &mut W, value: f32) -> io::Result<()> {
        // Python has no f32; json.dump of a float32 cast to float prints the f64 repr.
        writer.write_all(python_float_repr(f64::from(value)).as_bytes())
    }
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if fragment.bytes().all(|b| b < 0x7f) {
            return writer.write_all(fragment.as_bytes());
        }
        let mut buf = [0u16; 2];
        for ch in fragment.chars() {
            if (ch as u32) < 0x7f {
                let mut b = [0u8; 4];
                writer.write_all(ch.encode_utf8(&mut b).as_bytes())?;
            } else {
                for unit in ch.encode_utf16(&mut buf) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
    fn begin_array<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.inner.begin_array(writer)
    }
    fn end_array<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.inner.end_array(writer)
    }
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.inner.begin_array_value(writer, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.inner.end_array_value(writer)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.inner.begin_object(writer)
    }
    fn end_object<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.inner.end_object(writer)
    }
    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.inner.begin_object_key(writer, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.inner.begin_object_value(writer)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.inner.end_object_value(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_float_repr_matches_python() {
        let cases: &[(f64, &str)] = &[
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (0.00012345, "0.00012345"),
            (30.0, "30.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (93.5, "93.5"),
            (0.800000011920929, "0.800000011920929"),
            (-100.95292663574219, "-100.95292663574219"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-7, "1.5e-07"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (1e100, "1e+100"),
            (-26.812454223632812, "-26.812454223632812"),
            (242.05740356445312, "242.05740356445312"),
            (1e23, "1e+23"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (123456.789, "123456.789"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(*x), *want, "repr of {x:e}");
        }
    }

    #[test]
    fn json_layout_matches_python_json_dump() {
        let v = json!({"a": [1, 2.5, 1e-05], "b": {}, "c": [], "d": null, "é": "ü\u{1F600}\u{7f}", "e": true});
        let s = to_json_string(&v).unwrap();
        let want = "{\n    \"a\": [\n        1,\n        2.5,\n        1e-05\n    ],\n    \"b\": {},\n    \"c\": [],\n    \"d\": null,\n    \"\\u00e9\": \"\\u00fc\\ud83d\\ude00\\u007f\",\n    \"e\": true\n}";
        assert_eq!(s, want);
        // And it parses back to the same value.
        let back: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn write_atomic_writes_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two");
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn write_atomic_error_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing_folder").join("plans.json");
        let err = write_atomic(&p, b"x").unwrap_err().to_string();
        assert!(err.contains("cannot write"), "{err}");
        assert!(err.contains("missing_folder/plans.json"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn write_atomic_read_only_folder() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        fs::create_dir(&ro).unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        let p = ro.join("plans.json");
        let res = write_atomic(&p, b"x");
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
        // root can write anywhere; only check the message when it failed.
        if let Err(e) = res {
            let msg = e.to_string();
            assert!(msg.contains("ro/plans.json"), "{msg}");
        }
    }

    #[test]
    fn read_json_file_reports_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.json");
        fs::write(&p, "{\n    \"a\": 1,\n    \"b\": [1, 2,]\n}").unwrap();
        let err = read_json_file(&p).unwrap_err();
        match &err {
            PlansError::Parse { line, column, .. } => {
                assert_eq!(*line, 3);
                assert_eq!(*column, 16);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("bad.json:3:16: invalid JSON"), "{msg}");
        let missing = read_json_file(&dir.path().join("nope.json"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("cannot read") && missing.contains("nope.json"),
            "{missing}"
        );
    }

    #[test]
    fn write_json_atomic_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.json");
        let v = json!({"x": [1.0, 2], "y": "z"});
        write_json_atomic(&p, &v).unwrap();
        assert_eq!(read_json_file(&p).unwrap(), v);
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "{\n    \"x\": [\n        1.0,\n        2\n    ],\n    \"y\": \"z\"\n}"
        );
    }
}
