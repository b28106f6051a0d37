//! nnU-Net's `export_prediction.py`: logits in preprocessed space → segmentation (and
//! optionally probabilities) in the original image space.

use super::PredictError;
use ndarray::{s, Array3, Array4, Axis, Zip};
use plans::{Configuration, DatasetJson, Plans};
use preprocessing::resampling::resample_data_to_shape;
use preprocessing::storage::CaseProperties;

/// The resampling function nnseg implements (nnU-Net's default).
pub const RESAMPLING_FN: &str = "resample_data_or_seg_to_shape";

/// How network outputs become labels (nnU-Net's `LabelManager`).
#[derive(Debug, Clone, PartialEq)]
pub enum LabelHandling {
    /// Softmax + argmax; output channel `i` is label `labels[i]`.
    Softmax { labels: Vec<i64> },
    /// Sigmoid per region; voxels with probability > 0.5 of region `i` get
    /// `regions_class_order[i]`, later regions overwrite earlier ones.
    Regions { regions_class_order: Vec<i64> },
}

impl LabelHandling {
    pub fn from_dataset_json(ds: &DatasetJson) -> Result<Self, PredictError> {
        if ds.has_regions() {
            let order = ds.regions_class_order.clone().ok_or_else(|| {
                PredictError::Config(
                    "dataset.json defines regions but no `regions_class_order`".into(),
                )
            })?;
            let n = ds.num_segmentation_heads();
            if order.len() != n {
                return Err(PredictError::Config(format!(
                    "dataset.json: regions_class_order has {} entries but there are {n} regions",
                    order.len()
                )));
            }
            Ok(LabelHandling::Regions {
                regions_class_order: order,
            })
        } else {
            Ok(LabelHandling::Softmax {
                labels: ds.all_labels(),
            })
        }
    }

    pub fn num_outputs(&self) -> usize {
        match self {
            LabelHandling::Softmax { labels } => labels.len(),
            LabelHandling::Regions {
                regions_class_order,
            } => regions_class_order.len(),
        }
    }

    /// Softmax over channels or sigmoid, in place.
    pub fn apply_nonlin(&self, logits: &mut Array4<f32>) {
        match self {
            LabelHandling::Regions { .. } => logits.mapv_inplace(|v| 1.0 / (1.0 + (-v).exp())),
            LabelHandling::Softmax { .. } => {
                let (k, _, _, _) = logits.dim();
                let mut lanes: Vec<_> = logits.axis_iter_mut(Axis(0)).collect();
                // per-voxel max for stability
                let shape = lanes[0].raw_dim();
                let mut max = ndarray::Array3::<f32>::from_elem(shape, f32::NEG_INFINITY);
                for l in lanes.iter() {
                    Zip::from(&mut max).and(l).for_each(|m, &v| *m = m.max(v));
                }
                let mut sum = ndarray::Array3::<f32>::zeros(max.raw_dim());
                for l in lanes.iter_mut() {
                    Zip::from(l).and(&max).and(&mut sum).for_each(|v, &m, s| {
                        *v = (*v - m).exp();
                        *s += *v;
                    });
                }
                for l in lanes.iter_mut().take(k) {
                    Zip::from(l).and(&sum).for_each(|v, &s| *v /= s);
                }
            }
        }
    }

    /// Probabilities `(K, z, y, x)` → labels (argmax: first maximum, as numpy).
    pub fn to_segmentation(&self, probs: &Array4<f32>) -> Array3<i16> {
        let (_, z, y, x) = probs.dim();
        let mut seg = Array3::<i16>::zeros((z, y, x));
        match self {
            LabelHandling::Softmax { labels } => {
                let mut best = probs.index_axis(Axis(0), 0).to_owned();
                if let Some(&l0) = labels.first() {
                    seg.fill(l0 as i16);
                }
                for (c, &label) in labels.iter().enumerate().skip(1) {
                    Zip::from(&mut seg)
                        .and(&mut best)
                        .and(probs.index_axis(Axis(0), c))
                        .for_each(|s, b, &p| {
                            if p > *b {
                                *b = p;
                                *s = label as i16;
                            }
                        });
                }
            }
            LabelHandling::Regions {
                regions_class_order,
            } => {
                for (i, &c) in regions_class_order.iter().enumerate() {
                    Zip::from(&mut seg)
                        .and(probs.index_axis(Axis(0), i))
                        .for_each(|s, &p| {
                            if p > 0.5 {
                                *s = c as i16;
                            }
                        });
                }
            }
        }
        seg
    }
}

impl LabelHandling {
    /// The segmentation of `logits` `(K, ...)` from one class at a time: `class(c)` gives class
    /// `c`'s logits in the output geometry (e.g. resampled), so only one resampled class exists
    /// at a time instead of all `K` (the export's memory does not grow with the classes).
    /// Softmax: argmax of the logits (softmax does not change the order; first maximum wins,
    /// as numpy's argmax); regions: sigmoid > 0.5 in `regions_class_order`.
    pub fn segmentation_class_by_class<'a>(
        &self,
        logits: &Array4<f32>,
        class: impl Fn(usize) -> ndarray::CowArray<'a, f32, ndarray::Ix3>,
    ) -> Array3<i16> {
        let k = logits.dim().0;
        match self {
            LabelHandling::Softmax { labels } => {
                let mut best = class(0).into_owned();
                let mut seg = Array3::<i16>::from_elem(best.raw_dim(), labels[0] as i16);
                for (c, &label) in labels.iter().enumerate().take(k).skip(1) {
                    Zip::from(&mut seg)
                        .and(&mut best)
                        .and(&class(c))
                        .par_for_each(|s, b, &v| {
                            if v > *b {
                                *b = v;
                                *s = label as i16;
                            }
                        });
                }
                seg
            }
            LabelHandling::Regions {
                regions_class_order,
            } => {
                let mut seg: Option<Array3<i16>> = None;
                for (i, &label) in regions_class_order.iter().enumerate().take(k) {
                    let l = class(i);
                    let seg = seg.get_or_insert_with(|| Array3::zeros(l.raw_dim()));
                    Zip::from(seg).and(&l).par_for_each(|s, &v| {
                        if 1.0 / (1.0 + (-v).exp()) > 0.5 {
                            *s = label as i16;
                        }
                    });
                }
                seg.unwrap_or_else(|| Array3::zeros((0, 0, 0)))
            }
        }
    }
}

/// A prediction in the original image space.
#[derive(Debug, Clone)]
pub struct ExportedPrediction {
    /// `(z, y, x)` in the reader's axis order (transpose reverted, crop reverted).
    pub segmentation: Array3<i16>,
    /// `(K, z, y, x)` probabilities in the reader's axis order (background 1 outside the
    /// crop for softmax outputs), when requested.
    pub probabilities: Option<Array4<f32>>,
}

fn validate_transpose(t: &[usize], what: &str) -> Result<[usize; 3], PredictError> {
    let mut sorted = t.to_vec();
    sorted.sort_unstable();
    if sorted != [0, 1, 2] {
        return Err(PredictError::Config(format!(
            "plans.json: {what} {t:?} must be a permutation of [0, 1, 2]"
        )));
    }
    Ok([t[0], t[1], t[2]])
}

/// nnU-Net's `convert_predicted_logits_to_segmentation_with_correct_shape`: resample the logits
/// `(K, *preprocessed)` to the cropped shape (`resampling_fn_probabilities`), softmax/sigmoid,
/// argmax or regions, insert into the uncropped shape at the bbox, apply `transpose_backward`.
pub fn convert_logits_to_segmentation(
    logits: Array4<f32>,
    props: &CaseProperties,
    plans: &Plans,
    cfg: &Configuration,
    labels: &LabelHandling,
    return_probabilities: bool,
) -> Result<ExportedPrediction, PredictError> {
    let tf = validate_transpose(&plans.transpose_forward, "transpose_forward")?;
    let tb = validate_transpose(&plans.transpose_backward, "transpose_backward")?;
    if cfg.resampling_fn_probabilities != RESAMPLING_FN {
        return Err(PredictError::Config(format!(
            "resampling_fn_probabilities {:?} is not supported (supported: {RESAMPLING_FN:?})",
            cfg.resampling_fn_probabilities
        )));
    }
    if logits.dim().0 != labels.num_outputs() {
        return Err(PredictError::Config(format!(
            "the logits have {} channels but dataset.json defines {} outputs",
            logits.dim().0,
            labels.num_outputs()
        )));
    }
    let sp = props.spacing;
    let spacing_transposed = [sp[tf[0]], sp[tf[1]], sp[tf[2]]];
    let current_spacing: [f64; 3] = match cfg.spacing.as_slice() {
        [a, b] => [spacing_transposed[0], *a, *b],
        [a, b, c] => [*a, *b, *c],
        other => {
            return Err(PredictError::Config(format!(
                "configuration spacing {other:?} must have 2 or 3 entries"
            )))
        }
    };
    let target = props.shape_after_cropping_and_before_resampling;
    let cur = [logits.dim().1, logits.dim().2, logits.dim().3];
    let resample = |l: ndarray::ArrayView4<'_, f32>| {
        resample_data_to_shape(
            l,
            target,
            &current_spacing,
            &spacing_transposed,
            &cfg.resampling_fn_probabilities_kwargs,
        )
    };
    let (seg, probs) = if return_probabilities {
        let mut probs = if cur == target {
            logits
        } else {
            resample(logits.view())
        };
        labels.apply_nonlin(&mut probs);
        (labels.to_segmentation(&probs), Some(probs))
    } else {
        let seg = labels.segmentation_class_by_class(&logits, |c| {
            let one = logits.slice(s![c..c + 1, .., .., ..]);
            if cur == target {
                ndarray::CowArray::from(one.index_axis_move(Axis(0), 0))
            } else {
                ndarray::CowArray::from(resample(one).index_axis_move(Axis(0), 0))
            }
        });
        (seg, None)
    };
    let bbox = props.bbox_used_for_cropping;
    let before = props.shape_before_cropping;
    for a in 0..3 {
        if bbox[a][1] > before[a] || bbox[a][1] - bbox[a][0] != target[a] {
            return Err(PredictError::Config(format!(
                "case properties: bbox_used_for_cropping {bbox:?} does not fit shape_before_cropping \
                 {before:?} / shape_after_cropping_and_before_resampling {target:?}"
            )));
        }
    }
    let crop = s![
        bbox[0][0]..bbox[0][1],
        bbox[1][0]..bbox[1][1],
        bbox[2][0]..bbox[2][1]
    ];
    let mut full = Array3::<i16>::zeros((before[0], before[1], before[2]));
    full.slice_mut(crop).assign(&seg);
    let segmentation = full.permuted_axes(tb).as_standard_layout().into_owned();

    let probabilities = if let Some(probs) = probs {
        let k = probs.dim().0;
        let mut pfull = Array4::<f32>::zeros((k, before[0], before[1], before[2]));
        if matches!(labels, LabelHandling::Softmax { .. }) {
            pfull.index_axis_mut(Axis(0), 0).fill(1.0);
        }
        pfull
            .slice_mut(s![
                ..,
                bbox[0][0]..bbox[0][1],
                bbox[1][0]..bbox[1][1],
                bbox[2][0]..bbox[2][1]
            ])
            .assign(&probs);
        Some(
            pfull
                .permuted_axes([0, tb[0] + 1, tb[1] + 1, tb[2] + 1])
                .as_standard_layout()
                .into_owned(),
        )
    } else {
        None
    };
    Ok(ExportedPrediction {
        segmentation,
        probabilities,
    })
}
