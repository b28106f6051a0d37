//! The training log: the run's log file ([`RunLog`]) and nnU-Net's lines for each epoch
//! (numbers written as Python's `str(round(x, 4))`).

use super::{io_err, TrainError};
use crate::logging::LogFile;
use std::path::{Path, PathBuf};

/// The run's `training_log_*.txt` (echoed to stdout when asked).
pub struct RunLog {
    file: LogFile,
    path: PathBuf,
}

impl RunLog {
    /// A new log file in `folder`.
    pub fn create(folder: &Path, echo: bool) -> Result<Self, TrainError> {
        let file = LogFile::create(folder, echo).map_err(io_err(folder))?;
        let path = file.path().to_path_buf();
        Ok(RunLog { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one line.
    pub fn say(&mut self, message: &str) -> Result<(), TrainError> {
        self.file.log(message).map_err(io_err(&self.path))
    }

    /// Writes every line.
    pub fn say_all(&mut self, lines: &[String]) -> Result<(), TrainError> {
        lines.iter().try_for_each(|l| self.say(l))
    }
}

/// Python's `str(float)` for the values we log (`0.0`, `0.1234`, `nan`).
pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else {
        format!("{x:?}")
    }
}

/// `round(x, 4)`.
pub fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// A Python list of rounded floats (`[0.1234, nan]`).
pub fn fmt_list(v: &[f64]) -> String {
    let items: Vec<String> = v.iter().map(|x| py_float(round4(*x))).collect();
    format!("[{}]", items.join(", "))
}

/// Mean of `v` (NaN when empty).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The lines that open an epoch.
pub fn epoch_start_lines(epoch: usize, lr: f64) -> Vec<String> {
    vec![
        String::new(),
        format!("Epoch {epoch}"),
        format!(
            "Current learning rate: {}",
            py_float((lr * 1e5).round() / 1e5)
        ),
    ]
}

/// What an epoch measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EpochRecord {
    pub train_losses: Vec<f64>,
    pub val_losses: Vec<f64>,
    /// Pseudo Dice per foreground class or region.
    pub dice: Vec<f64>,
    /// Unix seconds.
    pub start: f64,
    pub end: f64,
    /// Seconds spent waiting for the training loader, and in the training steps.
    pub data_wait_s: f64,
    pub step_s: f64,
}

/// nnU-Net's end-of-epoch lines; `extra` (lines of the hooks) follow the losses.
pub fn epoch_end_lines(r: &EpochRecord, extra: Vec<String>) -> Vec<String> {
    let mut lines = vec![
        format!("train_loss {}", py_float(round4(mean(&r.train_losses)))),
        format!("val_loss {}", py_float(round4(mean(&r.val_losses)))),
    ];
    lines.extend(extra);
    lines.push(format!("Pseudo dice {}", fmt_list(&r.dice)));
    lines.push(format!(
        "Epoch time: {} s",
        py_float(((r.end - r.start) * 100.0).round() / 100.0)
    ));
    let n_it = r.train_losses.len().max(1) as f64;
    lines.push(format!(
        "Per training iteration: data wait {:.4} s, step {:.4} s",
        r.data_wait_s / n_it,
        r.step_s / n_it
    ));
    lines
}

/// The line logged when the EMA pseudo Dice improves.
pub fn new_best_line(ema: f64) -> String {
    format!("Yayy! New best EMA pseudo Dice: {}", py_float(round4(ema)))
}

/// The lines of a run that starts at epoch 0.
#[allow(clippy::too_many_arguments)]
pub fn run_start_lines(
    trainer: &str,
    configuration: &str,
    fold: &str,
    train_cases: usize,
    val_cases: usize,
    batch_size: usize,
    patch_size: &[usize],
    parameters: usize,
) -> Vec<String> {
    vec![
        format!(
            "nnseg {}: trainer {trainer}, configuration {configuration}, fold {fold}, \
             {train_cases} training / {val_cases} validation cases, batch size {batch_size}, \
             patch size {patch_size:?}, {parameters} trainable parameters",
            env!("CARGO_PKG_VERSION"),
        ),
        "progress.png: blue = train loss, red = val loss, green dashed = pseudo dice, green \
         solid = EMA pseudo dice (right axis); then epoch time [s]; then learning rate"
            .to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_as_python_does() {
        assert_eq!(py_float(0.0), "0.0");
        assert_eq!(py_float(round4(0.123456)), "0.1235");
        assert_eq!(py_float(f64::NAN), "nan");
        assert_eq!(fmt_list(&[0.5, f64::NAN]), "[0.5, nan]");
        assert!(mean(&[]).is_nan());
        assert_eq!(
            epoch_start_lines(3, 0.00912345)[2],
            "Current learning rate: 0.00912"
        );
    }

    #[test]
    fn epoch_lines_keep_nnunets_order_with_hook_lines_after_the_losses() {
        let r = EpochRecord {
            train_losses: vec![1.0, 0.5],
            val_losses: vec![0.25],
            dice: vec![0.5],
            start: 10.0,
            end: 12.5,
            data_wait_s: 0.2,
            step_s: 1.0,
        };
        let lines = epoch_end_lines(&r, vec!["extra".into()]);
        assert_eq!(
            lines,
            vec![
                "train_loss 0.75",
                "val_loss 0.25",
                "extra",
                "Pseudo dice [0.5]",
                "Epoch time: 2.5 s",
                "Per training iteration: data wait 0.1000 s, step 0.5000 s",
            ]
        );
    }
}
