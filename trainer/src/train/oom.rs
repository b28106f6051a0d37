//! Out-of-memory errors of a training run: which configuration did not fit, and what to try.

use super::TrainError;
use std::path::PathBuf;

/// A device allocation failed while training; names the configuration and the ways to fit it.
#[derive(Debug, thiserror::Error)]
#[error(
    "out of GPU memory training configuration `{configuration}` of {dataset} (network \
     {network}, patch size {patch_size:?}, batch size {batch_size}, {precision}) at {context}: \
     {source}\n{hint}"
)]
pub struct OutOfMemoryError {
    pub dataset: String,
    pub configuration: String,
    pub network: String,
    pub patch_size: Vec<usize>,
    pub batch_size: usize,
    /// `bf16 mixed precision` or `f32`.
    pub precision: String,
    /// Where it failed (`epoch 3, iteration 17: backward`).
    pub context: String,
    /// Suggestions, one per line.
    pub hint: String,
    #[source]
    pub source: candle_core::Error,
}

/// Whether a candle error is a failed device allocation (CUDA driver, cuBLAS or cuDNN).
pub fn is_out_of_memory(e: &candle_core::Error) -> bool {
    let text = format!("{e} {e:?}").to_ascii_lowercase();
    ["out of memory", "out_of_memory", "alloc_failed"]
        .iter()
        .any(|s| text.contains(s))
}

/// What an out-of-memory error of this run reports.
pub(super) struct OomInfo {
    pub dataset: String,
    pub configuration: String,
    pub plans_file: PathBuf,
    pub network: String,
    pub patch_size: Vec<usize>,
    pub batch_size: usize,
    pub bf16: bool,
}

impl OomInfo {
    /// `e` as [`TrainError::OutOfMemory`] if it is a failed allocation, else unchanged.
    pub fn classify(&self, e: TrainError) -> TrainError {
        match e {
            TrainError::Candle { context, source } if is_out_of_memory(&source) => {
                TrainError::OutOfMemory(Box::new(OutOfMemoryError {
                    dataset: self.dataset.clone(),
                    configuration: self.configuration.clone(),
                    network: self.network.clone(),
                    patch_size: self.patch_size.clone(),
                    batch_size: self.batch_size,
                    precision: if self.bf16 {
                        "bf16 mixed precision".into()
                    } else {
                        "f32".into()
                    },
                    context,
                    hint: self.hint(),
                    source,
                }))
            }
            e => e,
        }
    }

    fn hint(&self) -> String {
        let (ds, cfg) = (&self.dataset, &self.configuration);
        let mut lines = vec!["To fit the GPU:".to_string()];
        if self.batch_size > 1 {
            let b = self.batch_size / 2;
            lines.push(format!(
                "  - a smaller batch: add a configuration to {} that inherits this one, e.g. \
                 \"{cfg}_bs{b}\": {{\"inherits_from\": \"{cfg}\", \"batch_size\": {b}}}, and \
                 train `{cfg}_bs{b}`",
                self.plans_file.display()
            ));
        }
        lines.push(format!(
            "  - plans for less memory (smaller patch and batch): nnseg plan_and_preprocess -d \
             {ds} -gpu_memory_target GB with GB below this GPU's memory \
             (-overwrite_plans_name NAME keeps the current plans)"
        ));
        lines.push(format!(
            "  - the memory estimate of a network preset and the configuration fitted to a \
             budget: nnseg show_network {ds} {cfg} -tr PRESET -gpu_memory_target GB (nnseg \
             train ... -tr PRESET -gpu_memory_target GB trains the fitted configuration)"
        ));
        if !self.bf16 {
            lines.push(
                "  - bf16 mixed precision (about half the activation memory): --amp on".into(),
            );
        }
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(batch_size: usize, bf16: bool) -> OomInfo {
        OomInfo {
            dataset: "Dataset002_Heart".into(),
            configuration: "3d_fullres".into(),
            plans_file: "/pre/Dataset002_Heart/nnUNetPlans.json".into(),
            network: "PlainConvUNet".into(),
            patch_size: vec![80, 192, 160],
            batch_size,
            bf16,
        }
    }

    /// What candle returns for a failed `cuMemAllocAsync` (a boxed cudarc `DriverError`).
    fn cuda_oom() -> candle_core::Error {
        #[derive(Debug)]
        struct DriverError;
        impl std::fmt::Display for DriverError {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
                )
            }
        }
        impl std::error::Error for DriverError {}
        candle_core::Error::Cuda(Box::new(DriverError))
    }

    #[test]
    fn out_of_memory_errors_are_recognised() {
        assert!(is_out_of_memory(&cuda_oom()));
        assert!(is_out_of_memory(&cuda_oom().context("conv forward")));
        assert!(is_out_of_memory(&candle_core::Error::Msg(
            "cuBLAS: CUBLAS_STATUS_ALLOC_FAILED".into()
        )));
        assert!(!is_out_of_memory(&candle_core::Error::Msg(
            "shape mismatch in add".into()
        )));
    }

    #[test]
    fn out_of_memory_names_the_configuration_and_suggests_fits() {
        let e = info(2, true).classify(TrainError::Candle {
            context: "epoch 0, iteration 3: backward".into(),
            source: cuda_oom(),
        });
        assert!(matches!(e, TrainError::OutOfMemory(_)), "{e:?}");
        let m = e.to_string();
        for want in [
            "out of GPU memory training configuration `3d_fullres` of Dataset002_Heart",
            "network PlainConvUNet, patch size [80, 192, 160], batch size 2, bf16 mixed precision",
            "at epoch 0, iteration 3: backward: DriverError(CUDA_ERROR_OUT_OF_MEMORY",
            "/pre/Dataset002_Heart/nnUNetPlans.json",
            r#""3d_fullres_bs1": {"inherits_from": "3d_fullres", "batch_size": 1}"#,
            "nnseg plan_and_preprocess -d Dataset002_Heart -gpu_memory_target GB",
            "nnseg show_network Dataset002_Heart 3d_fullres -tr PRESET -gpu_memory_target GB",
        ] {
            assert!(m.contains(want), "missing {want:?} in:\n{m}");
        }
        assert!(!m.contains("--amp on"), "{m}");
        // batch 1 has no smaller batch; f32 runs are told about bf16
        let m = info(1, false)
            .classify(TrainError::Candle {
                context: "x".into(),
                source: cuda_oom(),
            })
            .to_string();
        assert!(
            !m.contains("batch_size\": 0") && !m.contains("a smaller batch"),
            "{m}"
        );
        assert!(m.contains("f32) at x") && m.contains("--amp on"), "{m}");
        // other errors pass through
        let e = info(2, true).classify(TrainError::Candle {
            context: "x".into(),
            source: candle_core::Error::Msg("shape mismatch".into()),
        });
        assert!(matches!(e, TrainError::Candle { .. }));
    }
}
