//! nnU-Net's `nnUNetLogger` (the per-epoch lists stored in checkpoints and plotted in
//! `progress.png`) and the `training_log_YYYY_M_D_H_M_S.txt` file.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Per-epoch values, one entry per finished epoch (nnU-Net's `my_fantastic_logging`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingLog {
    /// Mean pseudo Dice over foreground classes (NaN classes skipped; NaN if all are).
    #[serde(with = "nan_as_null")]
    pub mean_fg_dice: Vec<f64>,
    /// Exponential moving average of `mean_fg_dice` (0.9 old + 0.1 new).
    #[serde(with = "nan_as_null")]
    pub ema_fg_dice: Vec<f64>,
    /// Pseudo Dice per foreground class or region.
    #[serde(with = "nan_as_null_2d")]
    pub dice_per_class_or_region: Vec<Vec<f64>>,
    #[serde(with = "nan_as_null")]
    pub train_losses: Vec<f64>,
    #[serde(with = "nan_as_null")]
    pub val_losses: Vec<f64>,
    /// Learning rate used in the epoch.
    pub lrs: Vec<f64>,
    /// Seconds since the Unix epoch.
    pub epoch_start_timestamps: Vec<f64>,
    /// Seconds since the Unix epoch.
    pub epoch_end_timestamps: Vec<f64>,
}

/// JSON has no NaN: NaN ↔ `null`.
pub mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let o: Vec<Option<f64>> = v.iter().map(|x| x.is_finite().then_some(*x)).collect();
        o.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let o: Vec<Option<f64>> = Vec::deserialize(d)?;
        Ok(o.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
    }
}

/// [`nan_as_null`] for nested lists.
pub mod nan_as_null_2d {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[Vec<f64>], s: S) -> Result<S::Ok, S::Error> {
        let o: Vec<Vec<Option<f64>>> = v
            .iter()
            .map(|r| r.iter().map(|x| x.is_finite().then_some(*x)).collect())
            .collect();
        o.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f64>>, D::Error> {
        let o: Vec<Vec<Option<f64>>> = Vec::deserialize(d)?;
        Ok(o.into_iter()
            .map(|r| r.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
            .collect())
    }
}

/// NaN-skipping mean (NaN for no values), as `np.nanmean`.
pub fn nanmean(values: &[f64]) -> f64 {
    let v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

impl TrainingLog {
    /// Number of completed epochs recorded.
    pub fn epochs(&self) -> usize {
        self.train_losses.len()
    }

    /// Records the pseudo Dice of an epoch and updates the EMA exactly as nnU-Net
    /// (`ema = 0.9 * previous + 0.1 * mean`, the first EMA being the first mean). Returns the
    /// new EMA.
    pub fn push_dice(&mut self, per_class: Vec<f64>) -> f64 {
        let mean = nanmean(&per_class);
        let ema = match self.ema_fg_dice.last() {
            Some(prev) => 0.9 * prev + 0.1 * mean,
            None => mean,
        };
        self.mean_fg_dice.push(mean);
        self.ema_fg_dice.push(ema);
        self.dice_per_class_or_region.push(per_class);
        ema
    }

    /// Epoch durations in seconds.
    pub fn epoch_durations(&self) -> Vec<f64> {
        self.epoch_start_timestamps
            .iter()
            .zip(&self.epoch_end_timestamps)
            .map(|(s, e)| e - s)
            .collect()
    }

    /// Drops entries beyond `epochs` complete epochs (a crash between pushes must not leave
    /// lists of different lengths).
    pub fn truncate(&mut self, epochs: usize) {
        self.mean_fg_dice.truncate(epochs);
        self.ema_fg_dice.truncate(epochs);
        self.dice_per_class_or_region.truncate(epochs);
        self.train_losses.truncate(epochs);
        self.val_losses.truncate(epochs);
        self.lrs.truncate(epochs);
        self.epoch_start_timestamps.truncate(epochs);
        self.epoch_end_timestamps.truncate(epochs);
    }
}

/// Seconds since the Unix epoch.
pub fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Broken-down local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    pub year: i32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub microsecond: u32,
}

/// Local time of `unix_seconds` (UTC if the C library cannot convert it).
pub fn local_time(unix_seconds: f64) -> LocalTime {
    let secs = unix_seconds.floor();
    let micros = ((unix_seconds - secs) * 1e6) as u32;
    let t = secs as libc::time_t;
    // SAFETY: `localtime_r` only writes into the zero-initialised `tm` we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if ok {
        LocalTime {
            year: tm.tm_year + 1900,
            month: (tm.tm_mon + 1) as u32,
            day: tm.tm_mday as u32,
            hour: tm.tm_hour as u32,
            minute: tm.tm_min as u32,
            second: tm.tm_sec as u32,
            microsecond: micros,
        }
    } else {
        utc_time(secs as i64, micros)
    }
}

/// Civil UTC date of a Unix time (H. Hinnant's `civil_from_days`).
fn utc_time(secs: i64, microsecond: u32) -> LocalTime {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    LocalTime {
        year,
        month,
        day,
        hour: (sod / 3600) as u32,
        minute: (sod % 3600 / 60) as u32,
        second: (sod % 60) as u32,
        microsecond,
    }
}

/// nnU-Net's log file name, `"training_log_%d_%d_%d_%02.0d_%02.0d_%02.0d.txt"` of
/// `datetime.now()`: date fields unpadded, time fields padded to 2 digits
/// (`training_log_2026_1_5_09_03_07.txt`).
pub fn log_file_name(t: &LocalTime) -> String {
    format!(
        "training_log_{}_{}_{}_{:02}_{:02}_{:02}.txt",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// `2024-01-31 12:00:00.123456` (Python's `str(datetime.now())`).
pub fn timestamp_string(t: &LocalTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.microsecond
    )
}

/// The training log file: every line is prefixed with the local time, as nnU-Net's
/// `print_to_log_file`, and optionally echoed to stdout.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: File,
    echo: bool,
}

impl LogFile {
    /// Creates `folder/training_log_....txt` named after the current local time.
    pub fn create(folder: &Path, echo: bool) -> std::io::Result<Self> {
        let name = log_file_name(&local_time(now_seconds()));
        let path = folder.join(name);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(LogFile { path, file, echo })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one line (flushed immediately, so a crash keeps everything logged so far).
    pub fn log(&mut self, message: &str) -> std::io::Result<()> {
        let line = format!(
            "{}: {}\n",
            timestamp_string(&local_time(now_seconds())),
            message
        );
        if self.echo {
            print!("{line}");
        }
        self.file.write_all(line.as_bytes())?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_matches_nnunet() {
        let mut log = TrainingLog::default();
        assert_eq!(log.push_dice(vec![0.5, f64::NAN]), 0.5);
        let ema = log.push_dice(vec![1.0, 0.0]);
        assert!((ema - (0.9 * 0.5 + 0.1 * 0.5)).abs() < 1e-12);
        let ema = log.push_dice(vec![1.0]);
        assert!((ema - (0.9 * 0.5 + 0.1)).abs() < 1e-12);
        assert_eq!(log.mean_fg_dice, vec![0.5, 0.5, 1.0]);
        assert!(nanmean(&[f64::NAN]).is_nan());
    }

    #[test]
    fn names_and_timestamps() {
        let t = utc_time(1_700_000_000, 42);
        // 2023-11-14 22:13:20 UTC
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2023, 11, 14, 22, 13, 20)
        );
        assert_eq!(log_file_name(&t), "training_log_2023_11_14_22_13_20.txt");
        let t = utc_time(951_782_400 + 3_725, 0); // 2000-02-29 01:02:05
        assert_eq!(log_file_name(&t), "training_log_2000_2_29_01_02_05.txt");
        assert_eq!(timestamp_string(&t), "2000-02-29 01:02:05.000000");
    }

    #[test]
    fn log_file_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = LogFile::create(dir.path(), false).unwrap();
        f.log("Epoch 0").unwrap();
        f.log("Current learning rate: 0.01").unwrap();
        let name = f.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("training_log_") && name.ends_with(".txt"));
        let text = std::fs::read_to_string(f.path()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with(": Epoch 0"), "{}", lines[0]);
        assert_eq!(lines[0].as_bytes()[4], b'-');
    }
}
