//! Output folders of predict and ensemble that cannot be mistaken for finished ones.
//!
//! - [`begin`] removes the temp files earlier runs left behind (their writer no longer runs)
//!   and writes the [`PredictionDir::incomplete_marker`]; [`RunMarker::finish`] removes it
//!   once every case is written. A failed or interrupted run keeps the marker, and ensembling
//!   or evaluating such a folder is refused ([`ensure_complete`]).
//! - Each case is one unit: its probabilities and properties are written (temp name + rename)
//!   before its segmentation, so a segmentation on disk always has its companions.

use datasets::layout::{temp_file_pid, PredictionDir};
use std::path::{Path, PathBuf};

/// Output-folder errors; each names the path and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: the run that wrote this folder did not finish (it failed or was interrupted; \
         see {}); rerun it before using its outputs",
        folder.display(),
        marker.display()
    )]
    Incomplete { folder: PathBuf, marker: PathBuf },
}

/// The incomplete-marker of a run in progress; [`RunMarker::finish`] removes it. Dropping it
/// without finishing (an error) keeps the marker on disk.
#[derive(Debug)]
pub struct RunMarker {
    path: PathBuf,
}

/// Starts writing into `dir` (which must exist): cleans stale temp files, writes the marker.
pub fn begin(dir: &PredictionDir, what: &str) -> Result<RunMarker, OutputError> {
    begin_part(dir, what, (0, 1))
}

/// [`begin`] for part `part_id` of `num_parts` runs sharing the folder (each its own marker).
pub fn begin_part(
    dir: &PredictionDir,
    what: &str,
    (part_id, num_parts): (usize, usize),
) -> Result<RunMarker, OutputError> {
    remove_stale_temp_files(dir.path())?;
    let path = dir.incomplete_marker_of_part(part_id, num_parts);
    let text = format!(
        "{what} (pid {}) is writing this folder or stopped before finishing; \
         its outputs are not a finished result. Rerun it.\n",
        std::process::id()
    );
    std::fs::write(&path, text).map_err(|source| OutputError::Io {
        action: "writing",
        path: path.clone(),
        source,
    })?;
    Ok(RunMarker { path })
}

impl RunMarker {
    /// Marks the folder finished.
    pub fn finish(self) -> Result<(), OutputError> {
        std::fs::remove_file(&self.path).map_err(|source| OutputError::Io {
            action: "removing",
            path: self.path.clone(),
            source,
        })
    }
}

/// Refuses a folder whose writer did not finish.
pub fn ensure_complete(folder: &Path) -> Result<(), OutputError> {
    match PredictionDir::new(folder)
        .incomplete_markers()
        .into_iter()
        .next()
    {
        Some(marker) => Err(OutputError::Incomplete {
            folder: folder.to_path_buf(),
            marker,
        }),
        None => Ok(()),
    }
}

/// Removes temp files of nnseg's atomic writers whose writer process no longer runs (left in
/// `folder` by a killed run; only its own files, so a folder shared with running writers is
/// safe).
pub fn remove_stale_temp_files(folder: &Path) -> Result<(), OutputError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| OutputError::Io {
            action,
            path,
            source,
        }
    };
    let entries = std::fs::read_dir(folder).map_err(io("listing", folder))?;
    for entry in entries {
        let entry = entry.map_err(io("listing", folder))?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_file_pid) else {
            continue;
        };
        if process_runs(pid) {
            continue;
        }
        let path = entry.path();
        tracing::warn!(
            "removing a stale temp file of an earlier run: {}",
            path.display()
        );
        std::fs::remove_file(&path).map_err(io("removing", &path))?;
    }
    Ok(())
}

/// Whether a process with this pid runs on this host (our own pid counts as running).
fn process_runs(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; nothing is sent
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn a_rerun_removes_stale_temp_files_and_the_marker_tracks_completion() {
        let dir = tempfile::tempdir().unwrap();
        let out = PredictionDir::new(dir.path());
        let stale = dir
            .path()
            .join(format!(".nnseg-tmp-{}-0.nii.gz", dead_pid()));
        let ours = dir
            .path()
            .join(format!(".a.npz.tmp-{}-0", std::process::id()));
        let kept = dir.path().join("case.nii.gz");
        for p in [&stale, &ours, &kept] {
            std::fs::write(p, b"x").unwrap();
        }
        let marker = begin(&out, "predict").unwrap();
        assert!(!stale.exists() && ours.exists() && kept.exists());
        let e = ensure_complete(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("did not finish") && e.contains(INCOMPLETE),
            "{e}"
        );
        drop(marker); // a failed run: the marker stays
        assert!(out.incomplete_marker().exists());
        begin(&out, "predict").unwrap().finish().unwrap();
        ensure_complete(dir.path()).unwrap();
    }

    const INCOMPLETE: &str = datasets::layout::INCOMPLETE_MARKER;

    #[test]
    fn io_errors_say_what_failed() {
        let e = begin(&PredictionDir::new("/nonexistent/out"), "predict")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("listing /nonexistent/out: "), "{e}");
        assert!(e.contains("No such file"), "{e}");
    }
}
