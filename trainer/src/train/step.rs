//! One training step and one validation step of nnU-Net's recipe, on a [`Learner`] (the
//! network, its variables, the SGD optimizer and the deep-supervision loss).
//!
//! A training step is: host batch → device tensors, forward pass (in the compute dtype, see
//! [`crate::amp`]), deep-supervision loss (plus what the hooks add), backward, gradient-norm
//! clipping, SGD step. `nnseg bench_train` times the same three phases
//! ([`Learner::forward_loss`], [`Learner::backward`], [`Learner::apply_gradients`]), so the
//! benchmark and the training loop share their hyper-parameters ([`TrainerConfig`]).

use super::hooks::Hooks;
use super::metrics::{self, DiceCounts};
use super::{Ctx, TrainError};
use crate::amp::forward_autocast;
use crate::config::TrainerConfig;
use crate::data::{HostBatch, LabelInfo};
use crate::loss::{self, DcAndBceLoss, DcAndCeLoss, DeepSupervisionLoss, LossOptions, SegLoss};
use crate::optim::{clip_coef, SgdNesterov, SgdOptions};
use architectures::init::is_buffer_name;
use architectures::registry::SegNetwork;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// Where a step runs, for error messages (`epoch 3, iteration 17`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepAt {
    pub epoch: usize,
    pub iteration: usize,
    pub validation: bool,
}

impl StepAt {
    /// Training iteration `iteration` of `epoch`.
    pub fn train(epoch: usize, iteration: usize) -> Self {
        StepAt {
            epoch,
            iteration,
            validation: false,
        }
    }

    /// Validation iteration `iteration` of `epoch`.
    pub fn val(epoch: usize, iteration: usize) -> Self {
        StepAt {
            validation: true,
            ..StepAt::train(epoch, iteration)
        }
    }

    pub(super) fn ctx(self, what: &'static str) -> impl FnOnce() -> String {
        move || format!("{self}: {what}")
    }
}

impl fmt::Display for StepAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.validation { "validation " } else { "" };
        write!(
            f,
            "epoch {}, {kind}iteration {}",
            self.epoch, self.iteration
        )
    }
}

/// nnU-Net's loss for a dataset: Dice + CE (labels) or Dice + BCE (regions), wrapped for
/// `n_outputs` deep-supervision outputs.
pub fn nnunet_loss(options: LossOptions, regions: bool, n_outputs: usize) -> DeepSupervisionLoss {
    let inner: Box<dyn SegLoss> = if regions {
        Box::new(DcAndBceLoss::new(options))
    } else {
        Box::new(DcAndCeLoss::new(options))
    };
    DeepSupervisionLoss::new(inner, loss::deep_supervision_weights(n_outputs))
}

/// The trainable variables of `varmap` (batch-norm running statistics excluded), by name.
pub fn trainable_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<(String, Var)> = data
        .iter()
        .filter(|(n, _)| !is_buffer_name(n.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A network with everything a training step changes.
pub struct Learner {
    pub network: Box<dyn SegNetwork>,
    /// The network's variables (buffers included), as checkpoints store them.
    pub varmap: VarMap,
    pub optimizer: SgdNesterov,
    pub loss: DeepSupervisionLoss,
    /// Dtype of the forward pass (f32, or bf16 with mixed precision).
    pub compute_dtype: DType,
    grad_clip_norm: f64,
    clip_vars: Vec<Var>,
}

impl Learner {
    /// SGD with Nesterov momentum on the trainable variables, with `config`'s learning rate,
    /// momentum, weight decay, clipping threshold and precision.
    pub fn new(
        network: Box<dyn SegNetwork>,
        varmap: VarMap,
        loss: DeepSupervisionLoss,
        config: &TrainerConfig,
        device: &Device,
    ) -> Self {
        let optimizer = SgdNesterov::new(
            trainable_vars(&varmap),
            SgdOptions {
                lr: config.initial_lr,
                momentum: config.momentum,
                weight_decay: config.weight_decay,
                nesterov: true,
            },
        );
        let mut learner = Learner {
            network,
            varmap,
            optimizer,
            loss,
            compute_dtype: config.amp.compute_dtype(device),
            grad_clip_norm: config.grad_clip_norm,
            clip_vars: vec![],
        };
        learner.refresh_vars();
        learner
    }

    /// Re-reads the optimizer's variables for clipping (after the network changed shape).
    pub fn refresh_vars(&mut self) {
        self.clip_vars = self
            .optimizer
            .vars()
            .iter()
            .map(|(_, v)| v.clone())
            .collect();
    }

    /// Number of trainable parameters.
    pub fn trainable_parameters(&self) -> usize {
        self.optimizer
            .vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Forward pass and loss of a training step (with the hooks' extra terms).
    pub fn forward_loss(
        &self,
        x: &Tensor,
        targets: &[Tensor],
        hooks: &mut Hooks,
        at: StepAt,
    ) -> Result<Tensor, TrainError> {
        let net = self.network.as_ref();
        let fwd = hooks
            .train_forward(net, x, targets, self.compute_dtype)
            .transpose()
            .ctx(at.ctx("forward"))?;
        let (outputs, extra) = match fwd {
            Some(f) => (f.seg, f.extra_loss),
            None => (
                forward_autocast(net, x, true, self.compute_dtype).ctx(at.ctx("forward"))?,
                None,
            ),
        };
        check_outputs(&outputs, targets)?;
        let l = self.loss.loss_ds(&outputs, targets).ctx(at.ctx("loss"))?;
        match extra {
            Some(e) => (l + e).ctx(at.ctx("loss")),
            None => Ok(l),
        }
    }

    /// Gradients of `loss`. The graph is consumed as backward goes, so each activation is freed
    /// once no remaining step needs it (the peak stays near the forward pass's); `loss` keeps
    /// its value but is no longer tracked.
    pub fn backward(&self, loss: &Tensor, at: StepAt) -> Result<GradStore, TrainError> {
        loss.backward_consuming().ctx(at.ctx("backward"))
    }

    /// Gradient-norm clipping and the optimizer step. The clipping factor is folded into the
    /// optimizer's pass over the gradients (`step_scaled`; `clip_vars` are the optimizer's
    /// variables, so it scales exactly the gradients clipping would).
    pub fn apply_gradients(&mut self, grads: &mut GradStore, at: StepAt) -> Result<(), TrainError> {
        let (_, coef) = clip_coef(&self.clip_vars, grads, self.grad_clip_norm)
            .ctx(at.ctx("gradient clipping"))?;
        self.optimizer
            .step_scaled(grads, coef)
            .ctx(at.ctx("optimizer step"))
    }

    /// One training step; returns the loss.
    pub fn train_step(
        &mut self,
        x: &Tensor,
        targets: &[Tensor],
        hooks: &mut Hooks,
        at: StepAt,
    ) -> Result<f64, TrainError> {
        let l = self.forward_loss(x, targets, hooks, at)?;
        let mut grads = self.backward(&l, at)?;
        self.apply_gradients(&mut grads, at)?;
        scalar(&l).ctx(at.ctx("loss value"))
    }

    /// One validation step: the loss and the pseudo-Dice counts of the full-resolution output.
    pub fn val_step(
        &self,
        x: &Tensor,
        targets: &[Tensor],
        labels: &LabelInfo,
        at: StepAt,
    ) -> Result<(f64, DiceCounts), TrainError> {
        let outputs = forward_autocast(self.network.as_ref(), x, false, self.compute_dtype)
            .ctx(at.ctx("forward"))?;
        check_outputs(&outputs, targets)?;
        let l = self
            .loss
            .loss_ds(&outputs, targets)
            .and_then(|l| scalar(&l))
            .ctx(at.ctx("loss"))?;
        let counts = if labels.regions.is_some() {
            metrics::region_counts(&outputs[0], &targets[0], labels.ignore_label.is_some())
        } else {
            metrics::label_counts(&outputs[0], &targets[0], labels.ignore_label)
        }
        .ctx(at.ctx("pseudo dice"))?;
        Ok((l, counts))
    }

    /// Every variable of the network by name (buffers included).
    pub fn network_weights(&self) -> HashMap<String, Tensor> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        data.iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Sets the network's variables from a checkpoint's weights (`path` names the file in
    /// errors); names and shapes must match exactly.
    pub fn load_weights(
        &self,
        weights: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<(), TrainError> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut missing: Vec<String> = data
            .keys()
            .filter(|k| !weights.contains_key(*k))
            .cloned()
            .collect();
        missing.sort();
        let mut unexpected: Vec<String> = weights
            .keys()
            .filter(|k| !data.contains_key(*k))
            .cloned()
            .collect();
        unexpected.sort();
        if missing.is_empty() && !unexpected.is_empty() && !self.network.deep_supervision() {
            // written when every network built its deep-supervision heads
            return Err(TrainError::UnbuiltHeads {
                path: path.to_path_buf(),
                names: unexpected,
            });
        }
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(TrainError::WeightNames {
                path: path.to_path_buf(),
                missing,
                unexpected,
            });
        }
        for (name, var) in data.iter() {
            let t = &weights[name];
            if t.dims() != var.dims() {
                return Err(TrainError::WeightShape {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    found: t.dims().to_vec(),
                    expected: var.dims().to_vec(),
                });
            }
            let t = t
                .to_device(var.device())
                .and_then(|t| t.to_dtype(var.dtype()))
                .ctx(|| format!("loading weight `{name}`"))?;
            var.set(&t).ctx(|| format!("loading weight `{name}`"))?;
        }
        Ok(())
    }
}

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// A host batch as device tensors: input and one target per output resolution.
pub fn to_tensors(batch: HostBatch, device: &Device) -> Result<(Tensor, Vec<Tensor>), TrainError> {
    let x = Tensor::from_vec(batch.data, batch.data_shape.clone(), device)
        .ctx(|| format!("batch input of shape {:?}", batch.data_shape))?;
    let mut targets = Vec::with_capacity(batch.targets.len());
    for (values, shape) in batch.targets {
        targets.push(
            Tensor::from_vec(values, shape.clone(), device)
                .ctx(|| format!("batch target of shape {shape:?}"))?,
        );
    }
    Ok((x, targets))
}

/// Number of outputs `network` returns in training mode, from one forward pass of a zero
/// batch of one sample of `(in_channels, *patch)` without gradients.
pub fn probe_output_count(
    network: &dyn SegNetwork,
    in_channels: usize,
    patch: &[usize],
    device: &Device,
    compute_dtype: DType,
) -> Result<usize, TrainError> {
    let mut shape = vec![1, in_channels];
    shape.extend(patch);
    let x =
        Tensor::zeros(shape, DType::F32, device).ctx(|| "deep-supervision probe".to_string())?;
    let out = forward_autocast(network, &x, false, compute_dtype)
        .ctx(|| "deep-supervision probe: forward".to_string())?;
    Ok(out.len())
}

/// The network's outputs and the loader's targets must pair up (one target per output
/// resolution, same spatial shape).
fn check_outputs(outputs: &[Tensor], targets: &[Tensor]) -> Result<(), TrainError> {
    if outputs.len() != targets.len() {
        return Err(TrainError::OutputCount {
            outputs: outputs.len(),
            targets: targets.len(),
        });
    }
    for (i, (o, t)) in outputs.iter().zip(targets).enumerate() {
        if o.dims()[2..] != t.dims()[2..] {
            return Err(TrainError::OutputShape {
                output: i,
                found: o.dims()[2..].to_vec(),
                expected: t.dims()[2..].to_vec(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_positions_read_well() {
        assert_eq!(StepAt::train(3, 17).to_string(), "epoch 3, iteration 17");
        assert_eq!(
            StepAt::val(0, 2).to_string(),
            "epoch 0, validation iteration 2"
        );
    }

    #[test]
    fn mismatched_outputs_are_named_errors() {
        let d = Device::Cpu;
        let o = Tensor::zeros((1, 2, 4, 4), DType::F32, &d).unwrap();
        let t = Tensor::zeros((1, 1, 8, 8), DType::F32, &d).unwrap();
        let e = check_outputs(std::slice::from_ref(&o), &[t.clone(), t.clone()]).unwrap_err();
        assert!(
            matches!(
                e,
                TrainError::OutputCount {
                    outputs: 1,
                    targets: 2
                }
            ),
            "{e}"
        );
        let e = check_outputs(&[o], &[t]).unwrap_err();
        assert!(
            e.to_string().contains("[4, 4]") && e.to_string().contains("[8, 8]"),
            "{e}"
        );
    }
}
