//! Hooks: what only some networks need from a training run, kept out of the session and the
//! steps.
//!
//! A [`TrainHook`] can adjust the network before it is built (a resumed grown network),
//! check the built network, take over the forward pass of a training step to add a loss term,
//! add lines to the epoch log, and change the network after an epoch (before its checkpoints,
//! so every checkpoint records the network its weights belong to). [`Hooks::for_config`]
//! gives the trainer's hooks:
//! - [`ClassPresenceHook`]: networks with an image-level classification head (RUNext) are
//!   trained with BCE against "which foreground classes or regions occur in the patch";
//! - [`GrowthHook`]: growing networks (`growable_unet`) grow on the configured schedule.

use super::epoch_log::{mean, py_float, round4};
use super::step::Learner;
use super::TrainError;
use crate::checkpoint::NetworkMeta;
use crate::config::TrainerConfig;
use crate::data::LabelInfo;
use crate::growth::{apply_growth, GrowthError, GrowthOptions, GrowthSchedule};
use crate::logging::TrainingLog;
use architectures::growable::{is_growable, GROWN_WIDTHS_KEY};
use architectures::network::{NetworkIo, SegNetwork};
use architectures::runext::as_class_head;
use candle_core::{DType, Tensor};

/// The outputs of a training step's forward pass when a hook runs it.
#[derive(Debug, Clone)]
pub struct StepForward {
    /// Segmentation logits in f32, as [`SegNetwork::forward`] returns them.
    pub seg: Vec<Tensor>,
    /// Added to the segmentation loss (already weighted).
    pub extra_loss: Option<Tensor>,
}

/// What a hook sees of the run after an epoch.
pub struct EpochEnd<'a> {
    /// The epoch that just ended (0-based).
    pub epoch: usize,
    /// The log with this epoch's values.
    pub logging: &'a TrainingLog,
    pub learner: &'a mut Learner,
    /// The network description the next checkpoints record.
    pub network: &'a mut NetworkMeta,
    /// A fixed, unaugmented training batch for this epoch (built outside the loaders'
    /// streams, so resumed runs stay bit-exact).
    pub fixed_batch: &'a dyn Fn() -> Result<(Tensor, Vec<Tensor>), TrainError>,
}

/// One hook; every method has a "does nothing" default.
pub trait TrainHook: Send {
    /// Before the network is built; `resumed` is the network of the checkpoint a run resumes.
    fn before_build(&self, _spec: &mut plans::ArchitectureSpec, _resumed: Option<&NetworkMeta>) {}

    /// After the network is built: whether the hook can work with it.
    fn attach(
        &mut self,
        _network: &dyn SegNetwork,
        _spec: &plans::ArchitectureSpec,
        _io: &NetworkIo,
    ) -> Result<(), TrainError> {
        Ok(())
    }

    /// The forward pass of a training step, if the hook needs more than the segmentation
    /// outputs (`None`: the plain forward pass). `x` is f32; the forward runs in `dtype`.
    fn train_forward(
        &mut self,
        _network: &dyn SegNetwork,
        _x: &Tensor,
        _targets: &[Tensor],
        _dtype: DType,
    ) -> Option<candle_core::Result<StepForward>> {
        None
    }

    /// Lines for the epoch log (after the losses).
    fn epoch_lines(&mut self) -> Vec<String> {
        vec![]
    }

    /// After validation, before the epoch's checkpoints; returns log lines.
    fn after_epoch(&mut self, _end: &mut EpochEnd<'_>) -> Result<Vec<String>, TrainError> {
        Ok(vec![])
    }
}

/// The hooks of a run, called in order.
#[derive(Default)]
pub struct Hooks(Vec<Box<dyn TrainHook>>);

impl Hooks {
    /// No hooks (the benchmark, nnU-Net's own networks).
    pub fn none() -> Self {
        Hooks(vec![])
    }

    /// The trainer's hooks for `config`: the classification-presence loss (active for
    /// networks with a classification head) and growth.
    pub fn for_config(config: &TrainerConfig, labels: &LabelInfo) -> Result<Self, TrainError> {
        Ok(Hooks(vec![
            Box::new(ClassPresenceHook::new(
                config.class_loss_weight,
                labels.clone(),
            )),
            Box::new(GrowthHook::new(&config.growth, config.seed)?),
        ]))
    }

    pub fn push(&mut self, hook: Box<dyn TrainHook>) {
        self.0.push(hook);
    }

    pub fn before_build(&self, spec: &mut plans::ArchitectureSpec, resumed: Option<&NetworkMeta>) {
        self.0.iter().for_each(|h| h.before_build(spec, resumed));
    }

    pub fn attach(
        &mut self,
        network: &dyn SegNetwork,
        spec: &plans::ArchitectureSpec,
        io: &NetworkIo,
    ) -> Result<(), TrainError> {
        self.0
            .iter_mut()
            .try_for_each(|h| h.attach(network, spec, io))
    }

    /// The first hook's forward pass that takes over, if any.
    pub fn train_forward(
        &mut self,
        network: &dyn SegNetwork,
        x: &Tensor,
        targets: &[Tensor],
        dtype: DType,
    ) -> Option<candle_core::Result<StepForward>> {
        self.0
            .iter_mut()
            .find_map(|h| h.train_forward(network, x, targets, dtype))
    }

    pub fn epoch_lines(&mut self) -> Vec<String> {
        self.0.iter_mut().flat_map(|h| h.epoch_lines()).collect()
    }

    pub fn after_epoch(&mut self, end: &mut EpochEnd<'_>) -> Result<Vec<String>, TrainError> {
        let mut lines = vec![];
        for h in &mut self.0 {
            lines.extend(h.after_epoch(end)?);
        }
        Ok(lines)
    }
}

/// BCE of a network's image-level classification head against the presence of each
/// foreground class (or region) in the patch, weighted and added to the loss; the epoch log
/// gets its mean.
pub struct ClassPresenceHook {
    weight: f64,
    labels: LabelInfo,
    /// Foreground classes or regions; `None` until attached to a network with a head.
    foreground: Option<usize>,
    losses: Vec<f64>,
}

impl ClassPresenceHook {
    pub fn new(weight: f64, labels: LabelInfo) -> Self {
        ClassPresenceHook {
            weight,
            labels,
            foreground: None,
            losses: vec![],
        }
    }

    fn forward(
        &mut self,
        network: &dyn SegNetwork,
        x: &Tensor,
        target: &Tensor,
        dtype: DType,
        foreground: usize,
    ) -> Option<candle_core::Result<StepForward>> {
        let head = as_class_head(network)?;
        let run = || {
            let out = head.forward_with_class(&x.to_dtype(dtype)?, true)?;
            let seg = out
                .seg
                .into_iter()
                .map(|t| t.to_dtype(DType::F32))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let logits = out.class_logits.to_dtype(DType::F32)?;
            let bce = class_presence_loss(&logits, target, &self.labels, foreground)?;
            let value = bce.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            Ok((seg, bce.affine(self.weight, 0.0)?, value))
        };
        Some(run().map(|(seg, extra, value)| {
            self.losses.push(value);
            StepForward {
                seg,
                extra_loss: Some(extra),
            }
        }))
    }
}

impl TrainHook for ClassPresenceHook {
    fn attach(
        &mut self,
        network: &dyn SegNetwork,
        _spec: &plans::ArchitectureSpec,
        io: &NetworkIo,
    ) -> Result<(), TrainError> {
        let foreground = match &self.labels.regions {
            Some(r) => r.len(),
            None => io.num_classes.saturating_sub(1),
        };
        self.foreground = as_class_head(network).map(|_| foreground);
        Ok(())
    }

    fn train_forward(
        &mut self,
        network: &dyn SegNetwork,
        x: &Tensor,
        targets: &[Tensor],
        dtype: DType,
    ) -> Option<candle_core::Result<StepForward>> {
        let foreground = self.foreground?;
        let target = targets.first()?;
        self.forward(network, x, target, dtype, foreground)
    }

    fn epoch_lines(&mut self) -> Vec<String> {
        if self.losses.is_empty() {
            return vec![];
        }
        let line = format!(
            "train classification BCE (weight {}) {}",
            py_float(self.weight),
            py_float(round4(mean(&self.losses)))
        );
        self.losses.clear();
        vec![line]
    }
}

/// BCE of an image-level classification head against "which foreground classes (or regions)
/// occur in the patch", derived from the full-resolution target (no extra annotation).
pub fn class_presence_loss(
    class_logits: &Tensor,
    target: &Tensor,
    labels: &LabelInfo,
    fg_count: usize,
) -> candle_core::Result<Tensor> {
    let (b, n) = class_logits.dims2()?;
    if n != fg_count {
        candle_core::bail!(
            "the classification head has {n} outputs but the dataset has {fg_count} \
             foreground classes/regions"
        );
    }
    let flat = target.flatten_from(1)?; // (B, C_t * voxels)
    let mut cols = Vec::with_capacity(n);
    if labels.regions.is_some() {
        // target (B, R(+1 ignore), *sp) of 0/1 per region
        let per = target.dims()[1];
        let t = target.reshape((b, per, ()))?;
        for r in 0..n {
            cols.push(t.narrow(1, r, 1)?.squeeze(1)?.max(1)?.gt(0.5)?);
        }
    } else {
        for c in 1..=n {
            cols.push(flat.eq(c as f64)?.max(1)?);
        }
    }
    let presence = Tensor::stack(&cols, 1)?.to_dtype(class_logits.dtype())?;
    crate::loss::bce_with_logits(class_logits, &presence)
}

/// Growing a network while it trains ([`crate::growth`]): a resumed run rebuilds the widths its
/// checkpoint recorded; with a schedule, the network grows after the epochs it names.
pub struct GrowthHook {
    schedule: Option<GrowthSchedule>,
    seed: u64,
}

impl GrowthHook {
    /// Checks `options`; `seed` is the run's seed.
    pub fn new(options: &GrowthOptions, seed: u64) -> Result<Self, GrowthError> {
        let schedule = if options.enabled() {
            Some(GrowthSchedule::new(options.clone())?)
        } else {
            None
        };
        Ok(GrowthHook { schedule, seed })
    }

    fn grow(
        &self,
        schedule: &GrowthSchedule,
        layers: &[String],
        end: &mut EpochEnd<'_>,
    ) -> Result<String, TrainError> {
        let (x, targets) = (end.fixed_batch)()?;
        let learner = &mut *end.learner;
        let ds_loss = &learner.loss;
        let mut loss_fn = |n: &dyn SegNetwork| ds_loss.loss_ds(&n.forward(&x, true)?, &targets);
        let report = apply_growth(
            learner.network.as_mut(),
            &learner.varmap,
            &mut learner.optimizer,
            layers,
            &schedule.options,
            self.seed ^ (end.epoch as u64).wrapping_mul(0x9E37_79B9),
            &mut loss_fn,
        )
        .map_err(|source| TrainError::GrowthAtEpoch {
            epoch: end.epoch,
            source: Box::new(source),
        })?;
        learner.refresh_vars();
        for (k, v) in &report.grown_kwargs {
            end.network.arch_kwargs.insert(k.clone(), v.clone());
        }
        Ok(report.log_line())
    }
}

impl TrainHook for GrowthHook {
    fn before_build(&self, spec: &mut plans::ArchitectureSpec, resumed: Option<&NetworkMeta>) {
        if let Some(widths) = resumed.and_then(|m| m.arch_kwargs.get(GROWN_WIDTHS_KEY)) {
            spec.arch_kwargs
                .insert(GROWN_WIDTHS_KEY.into(), widths.clone());
        }
    }

    fn attach(
        &mut self,
        network: &dyn SegNetwork,
        spec: &plans::ArchitectureSpec,
        _io: &NetworkIo,
    ) -> Result<(), TrainError> {
        if self.schedule.is_some() && !is_growable(network) {
            return Err(GrowthError::NotGrowable(spec.network_class_name.clone()).into());
        }
        Ok(())
    }

    fn after_epoch(&mut self, end: &mut EpochEnd<'_>) -> Result<Vec<String>, TrainError> {
        let Some(schedule) = &self.schedule else {
            return Ok(vec![]);
        };
        let due = schedule.due(end.epoch, &end.logging.val_losses);
        if due.is_empty() {
            return Ok(vec![]);
        }
        Ok(vec![self.grow(schedule, &due, end)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use architectures::registry::Registry;
    use candle_core::Device;
    use serde_json::json;

    /// A 3-stage 2D plan for `name`, with the kwargs of the registry preset `preset`.
    fn spec(name: &str, preset: Option<&str>) -> plans::ArchitectureSpec {
        let mut kw = json!({
            "n_stages": 3, "features_per_stage": [4, 8, 16],
            "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": 3, "strides": [1, 2, 2],
            "n_conv_per_stage": 2, "n_conv_per_stage_decoder": 2, "conv_bias": true,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": true},
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
        })
        .as_object()
        .unwrap()
        .clone();
        if let Some(p) = preset {
            let (_, p) = Registry::default()
                .presets()
                .into_iter()
                .find(|(_, x)| x.name == p)
                .unwrap();
            kw.extend(p.kwargs);
        }
        plans::ArchitectureSpec {
            network_class_name: name.into(),
            arch_kwargs: kw,
            kw_requires_import: vec![],
        }
    }

    const IO: NetworkIo = NetworkIo {
        in_channels: 1,
        num_classes: 3,
        deep_supervision: false,
    };

    fn build(spec: &plans::ArchitectureSpec) -> Box<dyn SegNetwork> {
        Registry::default()
            .build_initialized(spec, &IO, 0, &Device::Cpu)
            .unwrap()
            .1
    }

    #[test]
    fn growth_hook_restores_grown_widths_and_needs_a_growable_network() {
        let off = GrowthHook::new(&GrowthOptions::default(), 0).unwrap();
        let mut s = spec("GrowableUNet", Some("growable_unet"));
        let meta = NetworkMeta {
            network_class_name: s.network_class_name.clone(),
            arch_kwargs: json!({GROWN_WIDTHS_KEY: {"bottleneck": [17, 17]}})
                .as_object()
                .unwrap()
                .clone(),
            input_channels: 1,
            num_segmentation_heads: 3,
            enable_deep_supervision: false,
        };
        off.before_build(&mut s, None);
        assert_eq!(s.arch_kwargs[GROWN_WIDTHS_KEY], json!({}));
        off.before_build(&mut s, Some(&meta));
        assert_eq!(
            s.arch_kwargs[GROWN_WIDTHS_KEY],
            meta.arch_kwargs[GROWN_WIDTHS_KEY]
        );
        // without a schedule any network will do; with one, only a growable network
        let plain_spec = spec("PlainConvUNet", None);
        let plain = build(&plain_spec);
        let mut off = off;
        off.attach(plain.as_ref(), &plain_spec, &IO).unwrap();
        let every = GrowthOptions {
            every: Some(1),
            ..GrowthOptions::default()
        };
        let mut on = GrowthHook::new(&every, 0).unwrap();
        let e = on.attach(plain.as_ref(), &plain_spec, &IO).unwrap_err();
        assert!(
            matches!(&e, TrainError::Growth(g) if matches!(**g, GrowthError::NotGrowable(_))),
            "{e}"
        );
        on.attach(build(&s).as_ref(), &s, &IO).unwrap();
        // bad options are growth errors too
        let bad = GrowthOptions {
            every: Some(0),
            ..GrowthOptions::default()
        };
        assert!(matches!(
            GrowthHook::new(&bad, 0),
            Err(GrowthError::InvalidOption { .. })
        ));
    }

    #[test]
    fn class_presence_hook_only_takes_over_networks_with_a_class_head() {
        let mut hooks = Hooks(vec![Box::new(ClassPresenceHook::new(
            0.5,
            LabelInfo::plain(3),
        ))]);
        let x = Tensor::randn(0f32, 1.0, (2, 1, 16, 16), &Device::Cpu).unwrap();
        let t = Tensor::from_vec(
            (0..512).map(|i| (i % 3) as f32).collect::<Vec<_>>(),
            (2, 1, 16, 16),
            &Device::Cpu,
        )
        .unwrap();
        let plain_spec = spec("PlainConvUNet", None);
        let plain = build(&plain_spec);
        hooks.attach(plain.as_ref(), &plain_spec, &IO).unwrap();
        let none = hooks.train_forward(plain.as_ref(), &x, std::slice::from_ref(&t), DType::F32);
        assert!(none.is_none());
        assert!(hooks.epoch_lines().is_empty());

        let runext_spec = spec("runext", Some("runext"));
        let runext = build(&runext_spec);
        hooks.attach(runext.as_ref(), &runext_spec, &IO).unwrap();
        let f = hooks
            .train_forward(runext.as_ref(), &x, std::slice::from_ref(&t), DType::F32)
            .expect("the hook runs RUNext's forward pass")
            .unwrap();
        assert_eq!(f.seg.len(), 1);
        assert_eq!(f.seg[0].dims(), &[2, 3, 16, 16]);
        assert!(f.extra_loss.is_some());
        let lines = hooks.epoch_lines();
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("train classification BCE (weight 0.5) "),
            "{lines:?}"
        );
        assert!(hooks.epoch_lines().is_empty(), "the mean is per epoch");
    }
}
