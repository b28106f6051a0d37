//! One writer per fold: `train` holds an advisory lock ([`datasets::layout::fold_lock_file`])
//! in the fold folder for as long as it runs, so a second training of the same fold fails at
//! once instead of silently replacing the first one's checkpoints and validation.
//!
//! The lock is an OS advisory lock (`flock`, via `fs2`) on the file, which also records who
//! holds it (pid, host, start time) for the error message. The OS drops the lock when the
//! holder exits, however it exits, so a lock file left by a killed run is stale: the next
//! `train` takes it over with a warning. The guard removes the file when dropped.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Who holds (or held) a fold lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: u32,
    pub host: String,
    /// Unix seconds.
    pub started: u64,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on host {} (started at unix time {})",
            self.pid, self.host, self.started
        )
    }
}

/// Fold-lock errors; each names the lock file.
#[derive(Debug, thiserror::Error)]
pub enum FoldLockError {
    #[error(
        "{}: this fold is already being trained by {holder}; wait for it to finish or stop it \
         (two trainings of one fold would overwrite each other's checkpoints)",
        path.display()
    )]
    Held { path: PathBuf, holder: String },
    #[error("{action} the fold lock {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; released (and its file removed) on drop.
#[derive(Debug)]
pub struct FoldLock {
    file: File,
    path: PathBuf,
    /// The stale holder this lock was taken over from, if any.
    pub taken_over: Option<LockHolder>,
}

impl FoldLock {
    /// Creates `fold_folder` if needed and takes its lock; fails at once with
    /// [`FoldLockError::Held`] when another process holds it.
    pub fn acquire(fold_folder: &Path) -> Result<FoldLock, FoldLockError> {
        let path = datasets::layout::fold_lock_file(fold_folder);
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| FoldLockError::Io {
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(fold_folder).map_err(io("creating the folder of", &path))?;
        // retry while the file we locked was removed or replaced by its previous holder
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io("opening", &path))?;
            let previous = read_holder(&mut file);
            if let Err(e) = fs2::FileExt::try_lock_exclusive(&file) {
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.raw_os_error() == fs2::lock_contended_error().raw_os_error()
                {
                    let holder = previous
                        .map(|h| h.to_string())
                        .unwrap_or_else(|| "another process".into());
                    return Err(FoldLockError::Held { path, holder });
                }
                return Err(io("locking", &path)(e));
            }
            if !same_file(&file, &path) {
                continue;
            }
            let previous = read_holder(&mut file);
            if let Some(h) = &previous {
                tracing::warn!(
                    "{}: taking over a stale fold lock left by {h}, which no longer runs",
                    path.display()
                );
            }
            write_holder(&mut file, &this_process()).map_err(io("writing", &path))?;
            return Ok(FoldLock {
                file,
                path,
                taken_over: previous,
            });
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FoldLock {
    fn drop(&mut self) {
        // remove while still locked, so nobody locks a file that is about to vanish unnoticed
        // (acquire re-checks that the locked file is still the one at the path)
        let _ = std::fs::remove_file(&self.path);
        let _ = fs2::FileExt::unlock(&self.file);
    }
}

fn read_holder(file: &mut File) -> Option<LockHolder> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    serde_json::from_str(&s).ok()
}

fn write_holder(file: &mut File, holder: &LockHolder) -> std::io::Result<()> {
    let json = serde_json::to_string(holder).map_err(std::io::Error::other)?;
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(json.as_bytes())?;
    file.sync_all()
}

fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn this_process() -> LockHolder {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    LockHolder {
        pid: std::process::id(),
        host: host_name(),
        started,
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
    // (or truncates, which we tolerate by stopping at the first NUL or the end).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 19): two trainings of one fold used to run at once unwarned.
    #[test]
    fn a_second_writer_fails_at_once_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let fold = dir.path().join("fold_0");
        let first = FoldLock::acquire(&fold).unwrap();
        assert!(first.taken_over.is_none());
        let e = FoldLock::acquire(&fold).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, FoldLockError::Held { .. }), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&host_name()), "{msg}");
        assert!(msg.contains(".nnseg_train.lock"), "{msg}");
        drop(first);
        assert!(!datasets::layout::fold_lock_file(&fold).exists());
        let again = FoldLock::acquire(&fold).unwrap();
        assert!(again.taken_over.is_none());
    }

    #[test]
    fn a_stale_lock_of_a_dead_process_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = LockHolder {
            pid: dead,
            host: host_name(),
            started: 1,
        };
        std::fs::write(
            datasets::layout::fold_lock_file(dir.path()),
            serde_json::to_string(&stale).unwrap(),
        )
        .unwrap();
        let lock = FoldLock::acquire(dir.path()).unwrap();
        assert_eq!(lock.taken_over, Some(stale));
        let now = read_holder(&mut File::open(lock.path()).unwrap()).unwrap();
        assert_eq!(now.pid, std::process::id());
    }

    #[test]
    fn an_unwritable_folder_is_an_error_naming_the_action() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not_a_folder");
        std::fs::write(&file, b"x").unwrap();
        let e = FoldLock::acquire(&file.join("fold_0"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("creating the folder of") && e.contains("not_a_folder"),
            "{e}"
        );
    }
}
