//! Prediction with what `find_best_configuration` recommended (`inference_information.json`
//! of the dataset's results folder): the winning model, or each member of the winning
//! ensemble followed by ensembling, then the recommended postprocessing. The last level of
//! `nnseg cross_validate --predict IN OUT`, and `nnseg predict_best_configuration`.
//!
//! Folders, following nnU-Net's inference instructions: ensemble members go to
//! `{OUT}_model_{k}`, the prediction before postprocessing to `{OUT}_before_postprocessing`,
//! the postprocessed segmentations to `OUT`.

use super::ClusterError;
use crate::data::Fold;
use crate::evaluation::{apply_postprocessing, ensemble_folders, EnsembleOptions};
use crate::predict::{predict_from_raw_folder, PredictRequest};
use candle_core::Device;
use datasets::{ModelId, PredictionDir, ResultsDir};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// What to predict.
#[derive(Debug, Clone)]
pub struct RecommendedPrediction {
    /// `nnUNet_results/DatasetXXX_Name` (holds `inference_information.json`).
    pub results: ResultsDir,
    pub input: PathBuf,
    pub output: PathBuf,
    pub device: Device,
    pub num_workers: usize,
}

/// The recommendation read from `inference_information.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    pub models: Vec<ModelId>,
    pub folds: Vec<Fold>,
    pub postprocessing_file: PathBuf,
}

/// Parses `inference_information.json` (as `find_best_configuration` writes it).
pub fn read_recommendation(path: &Path) -> Result<Recommendation, ClusterError> {
    let bad = |message: &str| ClusterError::Record {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    let info = crate::evaluation::json::read_json_with_nan(path)?;
    let best = &info["best_model_or_ensemble"];
    let selected = best["selected_model_or_models"]
        .as_array()
        .ok_or_else(|| bad("no best_model_or_ensemble.selected_model_or_models"))?;
    let mut models = Vec::new();
    for m in selected {
        let s = |k: &str| m[k].as_str().unwrap_or("").to_string();
        models.push(ModelId::new(
            s("trainer"),
            s("plans_identifier"),
            s("configuration"),
        )?);
    }
    let folds = info["folds"]
        .as_array()
        .ok_or_else(|| bad("no folds"))?
        .iter()
        .map(|f| {
            let text = match f {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            text.parse::<Fold>()
                .map_err(|e| bad(&format!("fold `{text}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pp = best["postprocessing_file"]
        .as_str()
        .ok_or_else(|| bad("no best_model_or_ensemble.postprocessing_file"))?;
    if models.is_empty() {
        return Err(bad("no selected model"));
    }
    Ok(Recommendation {
        models,
        folds,
        postprocessing_file: PathBuf::from(pp),
    })
}

fn sibling(output: &Path, suffix: &str) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    output.with_file_name(name)
}

fn predict_model(
    r: &RecommendedPrediction,
    model: &ModelId,
    folds: &[Fold],
    (output, probabilities): (&Path, bool),
) -> Result<(), ClusterError> {
    let mut req = PredictRequest::new(
        &r.input,
        output,
        r.results.model(model).path(),
        folds.to_vec(),
        r.device.clone(),
    );
    req.save_probabilities = probabilities;
    req.num_workers = r.num_workers.max(1);
    predict_from_raw_folder(&req).map_err(|e| ClusterError::Predict(Box::new(e)))?;
    Ok(())
}

/// Predicts `input` with the recommendation (see the module documentation); returns the
/// number of postprocessed cases written to `output`.
pub fn predict_recommended(r: &RecommendedPrediction) -> Result<usize, ClusterError> {
    let rec = read_recommendation(&r.results.inference_information())?;
    let dataset_json = r.results.model(&rec.models[0]).dataset_json();
    let ds = plans::DatasetJson::load(&dataset_json)?;
    let before = sibling(&r.output, "_before_postprocessing");
    if let [model] = rec.models.as_slice() {
        predict_model(r, model, &rec.folds, (&before, false))?;
    } else {
        let mut members = Vec::new();
        for (k, model) in rec.models.iter().enumerate() {
            let out = sibling(&r.output, &format!("_model_{}", k + 1));
            predict_model(r, model, &rec.folds, (&out, true))?;
            members.push(out);
        }
        let opts = EnsembleOptions::from_dataset_json(&ds, r.num_workers.max(1));
        ensemble_folders(&members, &before, &opts)?;
    }
    let n = apply_postprocessing(
        &before,
        &r.output,
        &rec.postprocessing_file,
        &ds.file_ending,
        r.num_workers.max(1),
    )?;
    ds.save(&PredictionDir::new(&r.output).dataset_json())?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recommendation_is_read_from_inference_information() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("inference_information.json");
        std::fs::write(
            &p,
            r#"{"folds": [0, 1, "all"], "best_model_or_ensemble": {
                "postprocessing_file": "/r/pp.json", "result_on_crossval_pre_pp": NaN,
                "selected_model_or_models": [
                  {"configuration": "2d", "trainer": "nnUNetTrainer", "plans_identifier": "nnUNetPlans"},
                  {"configuration": "3d_fullres", "trainer": "T", "plans_identifier": "P"}]}}"#,
        )
        .unwrap();
        let r = read_recommendation(&p).unwrap();
        assert_eq!(r.models.len(), 2);
        assert_eq!(r.models[1].to_string(), "T__P__3d_fullres");
        assert_eq!(
            r.folds,
            ["0", "1", "all"]
                .map(|f| f.parse::<Fold>().unwrap())
                .to_vec()
        );
        assert_eq!(r.postprocessing_file, PathBuf::from("/r/pp.json"));
        std::fs::write(&p, r#"{"folds": [0], "best_model_or_ensemble": {}}"#).unwrap();
        assert!(matches!(
            read_recommendation(&p),
            Err(ClusterError::Record { .. })
        ));
        assert_eq!(
            sibling(Path::new("/x/out"), "_model_1"),
            PathBuf::from("/x/out_model_1")
        );
    }
}
