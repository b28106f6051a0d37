//! `progress.png`, nnU-Net's `plot_progress_png`: three panels, top to bottom
//! 1. train loss (blue) and val loss (red), with pseudo Dice (green, dashed) and its EMA
//!    (green, solid) on a secondary 0..1 axis;
//! 2. epoch duration in seconds;
//! 3. learning rate.
//!
//! Text (titles, axis labels, legend) needs a font. nnseg embeds none and depends on no font
//! library: if a TrueType font is found in a usual system location it is used, otherwise the
//! plot is drawn without text (the colours above are the legend; the training log holds the
//! numbers).

use crate::logging::TrainingLog;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Width of `progress.png` in pixels.
pub const WIDTH: u32 = 1200;
/// Height of `progress.png` in pixels.
pub const HEIGHT: u32 = 1800;

const FONT_CANDIDATES: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers the first usable system font once; false if there is none.
fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        for p in FONT_CANDIDATES {
            if let Ok(bytes) = std::fs::read(p) {
                let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, leaked).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Errors while drawing or writing the plot.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("drawing {path}: {message}")]
    Draw { path: String, message: String },
    #[error("writing {path}: {message}")]
    Write { path: String, message: String },
}

fn finite_range(values: &[&[f64]]) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in values {
        for &x in v.iter() {
            if x.is_finite() {
                lo = lo.min(x);
                hi = hi.max(x);
            }
        }
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6 * hi.abs().max(1.0));
    (lo - pad, hi + pad)
}

fn points(v: &[f64]) -> Vec<(f64, f64)> {
    v.iter()
        .enumerate()
        .filter(|(_, y)| y.is_finite())
        .map(|(i, &y)| (i as f64, y))
        .collect()
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

const GREEN: RGBColor = RGBColor(0, 150, 0);

fn draw(root: &DrawingArea<BitMapBackend<'_>, Shift>, log: &TrainingLog) -> DrawResult<()> {
    let text = font_available();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));
    let n = log.epochs().max(2) as f64;
    let x_range = 0.0..(n - 1.0);
    let label_size = if text { 40 } else { 0 };

    // (a) losses + pseudo dice
    {
        let (lo, hi) = finite_range(&[&log.train_losses, &log.val_losses]);
        let mut b = ChartBuilder::on(&panels[0]);
        b.margin(20)
            .x_label_area_size(label_size)
            .y_label_area_size(label_size + 30)
            .right_y_label_area_size(label_size + 30);
        if text {
            b.caption("loss / pseudo dice", ("sans-serif", 24));
        }
        let mut chart = b
            .build_cartesian_2d(x_range.clone(), lo..hi)?
            .set_secondary_coord(x_range.clone(), 0.0..1.0);
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("epoch")
                .y_desc("loss")
                .x_label_formatter(&|x| format!("{}", x.round() as i64));
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw()?;
        if text {
            chart
                .configure_secondary_axes()
                .y_desc("pseudo dice")
                .draw()?;
        }
        let s = chart.draw_series(LineSeries::new(
            points(&log.train_losses),
            BLUE.stroke_width(3),
        ))?;
        if text {
            s.label("loss_tr")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
        }
        let s = chart.draw_series(LineSeries::new(
            points(&log.val_losses),
            RED.stroke_width(3),
        ))?;
        if text {
            s.label("loss_val")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        }
        let s = chart.draw_secondary_series(DashedLineSeries::new(
            points(&log.mean_fg_dice),
            6,
            6,
            GREEN.stroke_width(2),
        ))?;
        if text {
            s.label("pseudo dice")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN));
        }
        let s = chart.draw_secondary_series(LineSeries::new(
            points(&log.ema_fg_dice),
            GREEN.stroke_width(3),
        ))?;
        if text {
            s.label("pseudo dice (mov. avg.)")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN));
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .label_font(("sans-serif", 18))
                .draw()?;
        }
    }

    // (b) epoch duration, (c) learning rate
    let durations = log.epoch_durations();
    for (panel, values, caption, color) in [
        (&panels[1], &durations, "epoch duration [s]", BLACK),
        (&panels[2], &log.lrs, "learning rate", BLUE),
    ] {
        let (lo, hi) = finite_range(&[values]);
        let mut b = ChartBuilder::on(panel);
        b.margin(20)
            .x_label_area_size(label_size)
            .y_label_area_size(label_size + 30);
        if text {
            b.caption(caption, ("sans-serif", 24));
        }
        let mut chart = b.build_cartesian_2d(x_range.clone(), lo..hi)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("epoch")
                .y_desc(caption)
                .x_label_formatter(&|x| format!("{}", x.round() as i64));
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw()?;
        chart.draw_series(LineSeries::new(points(values), color.stroke_width(3)))?;
    }
    root.present()?;
    Ok(())
}

/// Renders the plot into an RGB buffer of `WIDTH × HEIGHT`.
pub fn render(log: &TrainingLog) -> Result<Vec<u8>, String> {
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, log).map_err(|e| e.to_string())?;
    }
    Ok(buf)
}

/// Encodes an RGB buffer as PNG.
pub fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| e.to_string())?;
        w.write_image_data(rgb).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Draws `log` into `path` (PNG, written atomically).
pub fn plot_progress(log: &TrainingLog, path: &Path) -> Result<(), ProgressError> {
    let p = path.display().to_string();
    let rgb = render(log).map_err(|message| ProgressError::Draw {
        path: p.clone(),
        message,
    })?;
    let bytes = encode_png(&rgb, WIDTH, HEIGHT).map_err(|message| ProgressError::Write {
        path: p.clone(),
        message,
    })?;
    plans::io::write_atomic(path, &bytes).map_err(|e| ProgressError::Write {
        path: p,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: usize) -> TrainingLog {
        let mut l = TrainingLog::default();
        for i in 0..n {
            l.train_losses.push(1.0 / (i + 1) as f64 - 0.5);
            l.val_losses.push(1.1 / (i + 1) as f64 - 0.5);
            l.push_dice(vec![i as f64 / n as f64, f64::NAN]);
            l.lrs.push(crate::logging::nanmean(&[
                0.01 * (1.0 - i as f64 / n as f64)
            ]));
            l.epoch_start_timestamps.push(10.0 * i as f64);
            l.epoch_end_timestamps
                .push(10.0 * i as f64 + 3.0 + i as f64);
        }
        l
    }

    #[test]
    fn writes_a_png_with_curves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.png");
        plot_progress(&log(6), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().unwrap();
        assert_eq!(reader.info().width, WIDTH);
        assert_eq!(reader.info().height, HEIGHT);
        // the curves' colours are drawn
        let rgb = render(&log(6)).unwrap();
        let count = |c: [u8; 3]| rgb.chunks(3).filter(|p| *p == c).count();
        assert!(count([0, 0, 255]) > 100, "blue");
        assert!(count([255, 0, 0]) > 100, "red");
        assert!(count([0, 150, 0]) > 100, "green");
        // only the PNG in the folder (atomic write)
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn single_epoch_and_empty_logs_draw() {
        let dir = tempfile::tempdir().unwrap();
        plot_progress(&log(1), &dir.path().join("a.png")).unwrap();
        plot_progress(&TrainingLog::default(), &dir.path().join("b.png")).unwrap();
    }
}
