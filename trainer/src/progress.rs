//! `progress.png`, nnU-Net's `plot_progress_png`: three panels, top to bottom
//! 1. train loss (blue) and val loss (red), with pseudo Dice (green, dashed) and its EMA
//!    (green, solid) on a secondary 0..1 axis;
//! 2. epoch duration in seconds (blue);
//! 3. learning rate (blue).
//!
//! The x axis shows whole epochs only; with fewer than two epochs every value is also drawn as
//! a dot (a line needs two points), so the plot shows something from the first epoch on. Tick
//! labels use as many decimals as the axis span needs (scientific notation for tiny values such
//! as late learning rates).
//!
//! Text (titles, axis labels, legend) needs a font. nnseg embeds none and depends on no font
//! library: if a TrueType font is found in a usual system location it is used, otherwise the
//! plot is drawn without text (the colours above are the legend; the training log holds the
//! numbers).

use crate::logging::TrainingLog;
use plotters::chart::DualCoordChartContext;
use plotters::coord::types::{RangedCoordf64, RangedCoordi32};
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

/// The y range of `values` (finite ones), padded by 5% of the span; a single value (or a
/// constant series) gets ±10% of its magnitude so its tick labels stay short.
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
    let span = hi - lo;
    let pad = if span > 1e-9 * hi.abs().max(lo.abs()) {
        span * 0.05
    } else if hi.abs() > 0.0 {
        hi.abs() * 0.1
    } else {
        1.0
    };
    (lo - pad, hi + pad)
}

fn points(v: &[f64]) -> Vec<(i32, f64)> {
    v.iter()
        .enumerate()
        .filter(|(_, y)| y.is_finite())
        .map(|(i, &y)| (i as i32, y))
        .collect()
}

/// The x axis for `epochs` epochs: `0..epochs-1`, or `-1..1` for a single epoch (its point
/// in the middle). Integer coordinates, so every tick is a whole epoch.
fn x_range(epochs: usize) -> std::ops::Range<i32> {
    if epochs < 2 {
        -1..1
    } else {
        0..(epochs as i32 - 1)
    }
}

/// The label of an epoch tick; ticks outside `0..epochs` (the padding around a single epoch)
/// get none.
fn epoch_label(x: i32, epochs: usize) -> String {
    if x >= 0 && (x as usize) < epochs.max(1) {
        x.to_string()
    } else {
        String::new()
    }
}

/// A tick label for a value on an axis spanning `span`: as many decimals as the span needs
/// (at most 6), scientific notation for very small or large magnitudes.
fn tick_label(v: f64, span: f64) -> String {
    let mag = v.abs();
    if mag == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e5).contains(&mag) {
        return format!("{v:.1e}");
    }
    let step = (span / 5.0).abs();
    let decimals = if step > 0.0 && step.is_finite() {
        (-step.log10()).ceil().clamp(0.0, 6.0) as usize
    } else {
        2
    };
    format!("{v:.decimals$}")
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type XAxis = RangedCoordi32;

const GREEN: RGBColor = RGBColor(0, 150, 0);
const LABEL_FONT: u32 = 18;
const MARKER_RADIUS: i32 = 7;

/// One plotted series: values per epoch, colour, legend name, dashed or solid.
struct Series<'a> {
    values: &'a [f64],
    color: RGBColor,
    name: &'a str,
    dashed: bool,
}

/// The x axis coordinate of a panel: [`x_range`].
fn x_axis(epochs: usize) -> XAxis {
    x_range(epochs).into()
}

/// A chart on `panel` with the epoch axis and a `lo..hi` value axis; `right`: room for a
/// secondary axis on the right.
fn chart_on<'a, 'b>(
    panel: &'a Area<'b>,
    caption: &str,
    epochs: usize,
    (lo, hi): (f64, f64),
    (text, right): (bool, bool),
) -> DrawResult<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<XAxis, RangedCoordf64>>> {
    let label_size = if text { 40 } else { 0 };
    let mut b = ChartBuilder::on(panel);
    b.margin(20)
        .x_label_area_size(label_size)
        .y_label_area_size(label_size + 40);
    if right {
        b.right_y_label_area_size(label_size + 40);
    }
    if text {
        b.caption(caption, ("sans-serif", 24));
    }
    let y: RangedCoordf64 = (lo..hi).into();
    Ok(b.build_cartesian_2d(x_axis(epochs), y)?)
}

/// The grid and, with a font, the axis labels: integer epochs, y with [`tick_label`].
fn draw_mesh(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<XAxis, RangedCoordf64>>,
    y_desc: &str,
    (lo, hi): (f64, f64),
    (epochs, text): (usize, bool),
) -> DrawResult<()> {
    let y_fmt = move |y: &f64| tick_label(*y, hi - lo);
    let x_fmt = move |x: &i32| epoch_label(*x, epochs);
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("epoch")
            .y_desc(y_desc)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style(("sans-serif", LABEL_FONT));
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw()?;
    Ok(())
}

/// Draws a series into `chart` (a line, dashed or solid, plus with `markers` a dot per epoch so
/// a single epoch is visible) and, with `text`, its legend entry.
fn draw_series<DB, CT>(
    chart: &mut ChartContext<'_, DB, CT>,
    s: &Series<'_>,
    markers: bool,
    text: bool,
) -> DrawResult<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    CT: CoordTranslate<From = (i32, f64)>,
{
    let pts = points(s.values);
    let color = s.color;
    if markers {
        chart.draw_series(
            pts.iter()
                .map(|&p| Circle::new(p, MARKER_RADIUS, color.filled())),
        )?;
    }
    let anno = if s.dashed {
        chart.draw_series(DashedLineSeries::new(pts, 6, 6, color.stroke_width(2)))?
    } else {
        chart.draw_series(LineSeries::new(pts, color.stroke_width(3)))?
    };
    if text {
        anno.label(s.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
    }
    Ok(())
}

/// Panel (a): train and val loss on the left axis, pseudo Dice and its EMA on a 0..1 right
/// axis, with a legend.
fn draw_losses(panel: &Area<'_>, log: &TrainingLog, text: bool) -> DrawResult<()> {
    let n = log.epochs();
    let range = finite_range(&[&log.train_losses, &log.val_losses]);
    let mut chart = chart_on(panel, "loss / pseudo dice", n, range, (text, true))?
        .set_secondary_coord(x_axis(n), 0.0..1.0);
    draw_mesh(&mut chart, "loss", range, (n, text))?;
    if text {
        chart
            .configure_secondary_axes()
            .y_desc("pseudo dice")
            .y_label_formatter(&|y| format!("{y:.1}"))
            .label_style(("sans-serif", LABEL_FONT))
            .draw()?;
    }
    let markers = n < 2;
    for (values, color, name) in [
        (&log.train_losses, BLUE, "loss_tr"),
        (&log.val_losses, RED, "loss_val"),
    ] {
        let s = Series {
            values,
            color,
            name,
            dashed: false,
        };
        draw_series(&mut *chart, &s, markers, text)?;
    }
    // the pseudo Dice on the secondary (0..1) axis
    for (values, name, dashed) in [
        (&log.mean_fg_dice, "pseudo dice", true),
        (&log.ema_fg_dice, "pseudo dice (mov. avg.)", false),
    ] {
        let s = Series {
            values,
            color: GREEN,
            name,
            dashed,
        };
        draw_secondary(&mut chart, &s, markers, text)?;
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", LABEL_FONT))
            .draw()?;
    }
    Ok(())
}

type DualChart<'a, 'b> = DualCoordChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<XAxis, RangedCoordf64>,
    Cartesian2d<XAxis, RangedCoordf64>,
>;

/// [`draw_series`] on the secondary axis of a dual chart.
fn draw_secondary(
    chart: &mut DualChart<'_, '_>,
    s: &Series<'_>,
    markers: bool,
    text: bool,
) -> DrawResult<()> {
    let pts = points(s.values);
    let color = s.color;
    if markers {
        chart.draw_secondary_series(
            pts.iter()
                .map(|&p| Circle::new(p, MARKER_RADIUS, color.filled())),
        )?;
    }
    let anno = if s.dashed {
        chart.draw_secondary_series(DashedLineSeries::new(pts, 6, 6, color.stroke_width(2)))?
    } else {
        chart.draw_secondary_series(LineSeries::new(pts, color.stroke_width(3)))?
    };
    if text {
        anno.label(s.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
    }
    Ok(())
}

/// Panels (b) and (c): one series, no legend.
fn draw_single(
    panel: &Area<'_>,
    caption: &str,
    values: &[f64],
    epochs: usize,
    text: bool,
) -> DrawResult<()> {
    let range = finite_range(&[values]);
    let mut chart = chart_on(panel, caption, epochs, range, (text, false))?;
    draw_mesh(&mut chart, caption, range, (epochs, text))?;
    let s = Series {
        values,
        color: BLUE,
        name: caption,
        dashed: false,
    };
    draw_series(&mut chart, &s, epochs < 2, false)
}

fn draw(root: &Area<'_>, log: &TrainingLog) -> DrawResult<()> {
    let text = font_available();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));
    draw_losses(&panels[0], log, text)?;
    let n = log.epochs();
    draw_single(
        &panels[1],
        "epoch duration [s]",
        &log.epoch_durations(),
        n,
        text,
    )?;
    draw_single(&panels[2], "learning rate", &log.lrs, n, text)?;
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

    /// Pixels of exactly `c` in panel `panel` (0 top, 2 bottom) of a rendered plot.
    fn count_in_panel(rgb: &[u8], panel: usize, c: [u8; 3]) -> usize {
        let row = (WIDTH * 3) as usize;
        let rows = (HEIGHT / 3) as usize;
        rgb[panel * rows * row..(panel + 1) * rows * row]
            .chunks(3)
            .filter(|p| *p == c)
            .count()
    }

    #[test]
    fn every_series_is_visible_after_one_and_three_epochs() {
        for epochs in [1, 3] {
            let rgb = render(&log(epochs)).unwrap();
            for (panel, colour, what) in [
                (0, [0, 0, 255], "train loss"),
                (0, [255, 0, 0], "val loss"),
                (0, [0, 150, 0], "pseudo dice"),
                (1, [0, 0, 255], "epoch duration"),
                (2, [0, 0, 255], "learning rate"),
            ] {
                let n = count_in_panel(&rgb, panel, colour);
                // a marker of radius 7 alone is ~150 pixels; legend swatches are ~60
                assert!(
                    n > 100,
                    "{epochs} epoch(s): {what}: {n} pixels of {colour:?}"
                );
            }
        }
        // a single epoch draws a dot per value: without it the series would be invisible
        let one = render(&log(1)).unwrap();
        assert!(count_in_panel(&one, 1, [0, 0, 255]) > 100);
    }

    #[test]
    fn epoch_axis_is_whole_epochs() {
        assert_eq!(x_range(0), -1..1);
        assert_eq!(x_range(1), -1..1);
        assert_eq!(x_range(3), 0..2);
        // the padding ticks around a single epoch have no label
        let one: Vec<String> = (-1..=1).map(|x| epoch_label(x, 1)).collect();
        assert_eq!(one, ["", "0", ""]);
        assert_eq!(epoch_label(2, 3), "2");
        assert_eq!(epoch_label(3, 3), "");
    }

    #[test]
    fn tick_labels_are_short() {
        // one epoch of 22.01162 s: padded by 10%, labels with one decimal
        let (lo, hi) = finite_range(&[&[22.01162]]);
        assert!(hi - lo > 4.0, "{lo}..{hi}");
        assert_eq!(tick_label(22.01162, hi - lo), "22.0");
        assert_eq!(tick_label(0.5, 1.5), "0.5");
        assert_eq!(tick_label(0.008, 0.01), "0.008");
        assert_eq!(tick_label(0.00012, 0.0002), "1.2e-4");
        assert_eq!(tick_label(0.0, 0.0002), "0");
        assert_eq!(tick_label(120.0, 400.0), "120");
    }

    #[test]
    fn single_epoch_and_empty_logs_draw() {
        let dir = tempfile::tempdir().unwrap();
        plot_progress(&log(1), &dir.path().join("a.png")).unwrap();
        plot_progress(&TrainingLog::default(), &dir.path().join("b.png")).unwrap();
    }
}
