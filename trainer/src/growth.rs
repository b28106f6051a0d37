//! Growing a network while it trains (issue 8): when to grow ([`GrowthSchedule`]) and how to
//! apply a growth to the network, its `VarMap` and the optimizer ([`apply_growth`]).
//!
//! The training loop calls it through [`crate::train::hooks::GrowthHook`] after an epoch's
//! validation, with a fixed training batch and the normal loss; checkpoints then record the
//! grown widths ([`GrowthReport::grown_kwargs`]).
//!
//! The optimizer keeps its momentum: every parameter that changed shape gets its old buffer
//! back with zeros in the new slices ([`SgdNesterov::grow_var`]).

use crate::optim::{OptimError, SgdNesterov};
use architectures::growable::{as_growable, GrowRequest, GrowthMethod};
use architectures::init::is_buffer_name;
use architectures::network::{ArchError, SegNetwork};
use candle_core::Tensor;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum GrowthError {
    #[error("growth: the network `{0}` cannot grow (use network_class_name GrowableUNet / preset growable_unet)")]
    NotGrowable(String),
    #[error("growth option {option}: {message}")]
    InvalidOption { option: String, message: String },
    #[error("growth: {0}")]
    Arch(#[from] ArchError),
    #[error("growth: {0}")]
    Optim(#[from] OptimError),
}

fn bad(option: &str, message: impl Into<String>) -> GrowthError {
    GrowthError::InvalidOption {
        option: option.to_string(),
        message: message.into(),
    }
}

/// The growth method by name (`--grow-method split|sample_select|gradmax`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrowthMethodName {
    /// Duplicate the filter(s) with the largest gradient norm.
    Split,
    /// Keep the best of `n_candidates` random filters.
    #[default]
    #[serde(alias = "sample-select")]
    SampleSelect,
    /// Outgoing weights from the top singular vectors of the bridging gradient.
    #[serde(alias = "grad_max")]
    Gradmax,
}

impl GrowthMethodName {
    pub fn as_str(self) -> &'static str {
        match self {
            GrowthMethodName::Split => "split",
            GrowthMethodName::SampleSelect => "sample_select",
            GrowthMethodName::Gradmax => "gradmax",
        }
    }
}

impl std::fmt::Display for GrowthMethodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for GrowthMethodName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "split" => Ok(GrowthMethodName::Split),
            "sample_select" | "sample-select" => Ok(GrowthMethodName::SampleSelect),
            "gradmax" | "grad_max" => Ok(GrowthMethodName::Gradmax),
            other => Err(format!(
                "unknown growth method `{other}`; known: split, sample_select, gradmax"
            )),
        }
    }
}

/// One `--grow-schedule` entry: grow `layer` after (0-based) epoch `epoch` (`10:bottleneck`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleEntry {
    pub epoch: usize,
    pub layer: String,
}

impl std::str::FromStr for ScheduleEntry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (e, l) = s
            .split_once(':')
            .ok_or_else(|| format!("expects EPOCH:LAYER, got `{s}`"))?;
        let epoch = e
            .trim()
            .parse()
            .map_err(|_| format!("bad epoch in `{s}` (EPOCH:LAYER)"))?;
        if l.trim().is_empty() {
            return Err(format!("no layer in `{s}` (EPOCH:LAYER)"));
        }
        Ok(ScheduleEntry {
            epoch,
            layer: l.trim().to_string(),
        })
    }
}

/// When and how to grow. Serialised with the trainer configuration; `nnseg train`'s growth
/// flags set the fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GrowthOptions {
    /// `--grow-every N`: grow `layers` after every N-th epoch (after epochs N-1, 2N-1, ...).
    pub every: Option<usize>,
    /// `--grow-on-plateau P`: grow `layers` when the validation loss has not improved for P
    /// epochs (again after 2P, 3P, ... epochs without improvement).
    pub on_plateau: Option<usize>,
    /// `--grow-layers bottleneck down_3 up_0.conv2 ...` (a block name = both of its convs).
    pub layers: Vec<String>,
    /// `--grow-schedule 10:bottleneck 20:down_3`: per-epoch layers (0-based epoch after which
    /// to grow), in addition to `every` / `on_plateau`.
    pub schedule: BTreeMap<usize, Vec<String>>,
    /// `--grow-method split|sample_select|gradmax`
    pub method: GrowthMethodName,
    /// `--n-candidates N` (sample_select)
    pub n_candidates: usize,
    /// `--grow-n-new N`: filters added per conv and growth
    pub n_new_per_growth: usize,
    /// `--split-noise X`: asymmetry of the halved outgoing weights (split; function-preserving)
    pub split_noise: f64,
}

impl Default for GrowthOptions {
    fn default() -> Self {
        GrowthOptions {
            every: None,
            on_plateau: None,
            layers: vec!["bottleneck".into()],
            schedule: BTreeMap::new(),
            method: GrowthMethodName::SampleSelect,
            n_candidates: 10,
            n_new_per_growth: 1,
            split_noise: 0.01,
        }
    }
}

impl GrowthOptions {
    /// Whether any trigger is configured.
    pub fn enabled(&self) -> bool {
        self.every.is_some() || self.on_plateau.is_some() || !self.schedule.is_empty()
    }

    /// Adds schedule entries.
    pub fn add_schedule(&mut self, entries: &[ScheduleEntry]) {
        for e in entries {
            self.schedule
                .entry(e.epoch)
                .or_default()
                .push(e.layer.clone());
        }
    }

    /// The growth method with its settings.
    pub fn growth_method(&self) -> GrowthMethod {
        match self.method {
            GrowthMethodName::Split => GrowthMethod::Split {
                noise: self.split_noise,
                incoming_noise: 0.0,
            },
            GrowthMethodName::SampleSelect => GrowthMethod::SampleSelect {
                n_candidates: self.n_candidates.max(1),
            },
            GrowthMethodName::Gradmax => GrowthMethod::GradMax { scale: 1.0 },
        }
    }

    /// Checks values (positive counts, a layer to grow, the split noise).
    pub fn validate(&self) -> Result<(), GrowthError> {
        if self.every == Some(0) {
            return Err(bad("every", "must be at least 1"));
        }
        if self.on_plateau == Some(0) {
            return Err(bad("on_plateau", "must be at least 1"));
        }
        if self.n_new_per_growth == 0 {
            return Err(bad("n_new_per_growth", "must be at least 1"));
        }
        if self.n_candidates == 0 {
            return Err(bad("n_candidates", "must be at least 1"));
        }
        if (self.every.is_some() || self.on_plateau.is_some()) && self.layers.is_empty() {
            return Err(bad("layers", "no layers to grow"));
        }
        if !(0.0..0.5).contains(&self.split_noise) {
            return Err(bad("split_noise", "must be in [0, 0.5)"));
        }
        Ok(())
    }
}

/// Decides after which epochs to grow.
#[derive(Debug, Clone)]
pub struct GrowthSchedule {
    pub options: GrowthOptions,
}

impl GrowthSchedule {
    pub fn new(options: GrowthOptions) -> Result<Self, GrowthError> {
        options.validate()?;
        Ok(GrowthSchedule { options })
    }

    /// Layers to grow after epoch `epoch` (0-based) has finished; `val_history[e]` is the
    /// validation loss of epoch `e` (at least up to `epoch`). Stateless: the plateau rule
    /// fires when the epochs since the best validation loss reach a multiple of the patience.
    pub fn due(&self, epoch: usize, val_history: &[f64]) -> Vec<String> {
        let o = &self.options;
        let mut out: Vec<String> = vec![];
        let mut add = |ls: &[String]| {
            for l in ls {
                if !out.contains(l) {
                    out.push(l.clone());
                }
            }
        };
        if let Some(k) = o.every {
            if k > 0 && (epoch + 1).is_multiple_of(k) {
                add(&o.layers);
            }
        }
        if let Some(p) = o.on_plateau {
            let hist = &val_history[..val_history.len().min(epoch + 1)];
            let best = hist
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i);
            if let (Some(b), true) = (best, hist.len() == epoch + 1) {
                let since = epoch - b;
                if p > 0 && since > 0 && since.is_multiple_of(p) {
                    add(&o.layers);
                }
            }
        }
        if let Some(ls) = o.schedule.get(&epoch) {
            add(ls);
        }
        out
    }
}

/// One grown conv.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GrownLayer {
    pub layer: String,
    pub method: String,
    pub old_width: usize,
    pub new_width: usize,
    /// sample_select: winning candidate(s); split: duplicated filter(s)
    pub chosen: Vec<usize>,
    /// sample_select: the best score per added filter; gradmax: the top singular values
    pub scores: Vec<f64>,
}

/// What [`apply_growth`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GrowthReport {
    pub grown: Vec<GrownLayer>,
    pub params_before: usize,
    pub params_after: usize,
    /// names of the parameters whose shapes changed
    pub changed_params: Vec<String>,
    /// merge over the configuration's `arch_kwargs` to rebuild the grown network
    pub grown_kwargs: Map<String, Value>,
}

impl GrowthReport {
    /// One line for the training log.
    pub fn log_line(&self) -> String {
        let parts: Vec<String> = self
            .grown
            .iter()
            .map(|g| format!("{} {}→{}", g.layer, g.old_width, g.new_width))
            .collect();
        let method = self.grown.first().map(|g| g.method.as_str()).unwrap_or("-");
        format!(
            "Network growth ({method}): {}; parameters {} → {}",
            parts.join(", "),
            self.params_before,
            self.params_after
        )
    }
}

fn trainable_count(varmap: &VarMap) -> usize {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter()
        .filter(|(n, _)| !is_buffer_name(n))
        .map(|(_, v)| v.elem_count())
        .sum()
}

/// Grows `layers` (names or block names) of `net` with the method of `opts`, replacing the
/// variables in `varmap` and extending the optimizer's parameters and momentum buffers.
/// `loss` computes the training loss of a network on a fixed batch (gradient scores).
pub fn apply_growth(
    net: &mut dyn SegNetwork,
    varmap: &VarMap,
    optimizer: &mut SgdNesterov,
    layers: &[String],
    opts: &GrowthOptions,
    seed: u64,
    loss: &mut dyn FnMut(&dyn SegNetwork) -> candle_core::Result<Tensor>,
) -> Result<GrowthReport, GrowthError> {
    let method = opts.growth_method();
    if opts.n_new_per_growth == 0 {
        return Err(bad("n_new_per_growth", "must be at least 1"));
    }
    let params_before = trainable_count(varmap);
    let g = as_growable(net).ok_or_else(|| GrowthError::NotGrowable("this network".into()))?;
    let mut convs = vec![];
    for l in layers {
        for c in g.resolve_layer(l)? {
            if !convs.contains(&c) {
                convs.push(c);
            }
        }
    }
    let mut grown = vec![];
    let mut changed = vec![];
    for (i, layer) in convs.into_iter().enumerate() {
        let req = GrowRequest {
            layer,
            method: method.clone(),
            n_new: opts.n_new_per_growth,
            seed: seed.wrapping_add(i as u64),
        };
        let out = g.grow(&req, varmap, loss)?;
        for c in &out.changes {
            optimizer.grow_var(&c.name, c.var.clone(), c.axis, c.offset, c.count)?;
            if !changed.contains(&c.name) {
                changed.push(c.name.clone());
            }
        }
        let scores = if out.singular_values.is_empty() {
            out.scores
                .iter()
                .zip(&out.chosen)
                .map(|(s, &c)| s.get(c).copied().unwrap_or(0.0))
                .collect()
        } else {
            out.singular_values.clone()
        };
        grown.push(GrownLayer {
            layer: out.layer,
            method: out.method,
            old_width: out.old_width,
            new_width: out.new_width,
            chosen: out.chosen,
            scores,
        });
    }
    let grown_kwargs = g.grown_kwargs();
    Ok(GrowthReport {
        grown,
        params_before,
        params_after: trainable_count(varmap),
        changed_params: changed,
        grown_kwargs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{DcAndCeLoss, LossOptions, SegLoss};
    use crate::optim::SgdOptions;
    use architectures::registry::{NetworkIo, Registry};
    use candle_core::{DType, Device, Var};
    use serde_json::json;

    fn kwargs(features: [usize; 3]) -> Map<String, Value> {
        json!({
            "n_stages": 3,
            "features_per_stage": features,
            "conv_op": "torch.nn.modules.conv.Conv2d",
            "kernel_sizes": 3,
            "strides": [1, 2, 2],
            "n_conv_per_stage": 2,
            "n_conv_per_stage_decoder": 2,
            "conv_bias": true,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": true},
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": true}
        })
        .as_object()
        .unwrap()
        .clone()
    }

    fn build(kw: &Map<String, Value>, seed: u64) -> (VarMap, Box<dyn SegNetwork>) {
        let spec = plans::ArchitectureSpec {
            network_class_name: "GrowableUNet".into(),
            arch_kwargs: kw.clone(),
            kw_requires_import: vec![],
        };
        let io = NetworkIo {
            in_channels: 1,
            num_classes: 2,
            deep_supervision: false,
        };
        Registry::default()
            .build_initialized(&spec, &io, seed, &Device::Cpu)
            .unwrap()
    }

    fn vars(vm: &VarMap) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Tiny segmentation task: bright discs on noise, label = disc.
    fn data() -> (Tensor, Tensor) {
        let (b, h, w) = (4usize, 16usize, 16usize);
        let mut x = vec![0f32; b * h * w];
        let mut y = vec![0f32; b * h * w];
        for s in 0..b {
            let (cy, cx, r) = (
                4.0 + 2.0 * s as f32,
                11.0 - 2.0 * s as f32,
                3.0 + (s % 2) as f32,
            );
            for i in 0..h {
                for j in 0..w {
                    let k = s * h * w + i * w + j;
                    let inside = ((i as f32 - cy).powi(2) + (j as f32 - cx).powi(2)).sqrt() < r;
                    let noise = (((k * 7919) % 101) as f32 / 101.0 - 0.5) * 0.6;
                    x[k] = if inside { 1.0 } else { 0.0 } + noise;
                    y[k] = if inside { 1.0 } else { 0.0 };
                }
            }
        }
        (
            Tensor::from_vec(x, (b, 1, h, w), &Device::Cpu).unwrap(),
            Tensor::from_vec(y, (b, 1, h, w), &Device::Cpu).unwrap(),
        )
    }

    fn loss_value(net: &dyn SegNetwork, x: &Tensor, y: &Tensor) -> f64 {
        let l = DcAndCeLoss::new(LossOptions::default());
        l.loss(&net.forward(x, false).unwrap()[0], y)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Trains `steps` SGD steps; `grow_at` maps a step to layers to grow before it.
    fn train(
        features: [usize; 3],
        steps: usize,
        grow_at: &[(usize, &str, &str)],
    ) -> (Vec<f64>, Vec<GrowthReport>, usize) {
        train_kw(&kwargs(features), steps, grow_at)
    }

    fn train_kw(
        kw: &Map<String, Value>,
        steps: usize,
        grow_at: &[(usize, &str, &str)],
    ) -> (Vec<f64>, Vec<GrowthReport>, usize) {
        let (x, y) = data();
        let (vm, mut net) = build(kw, 3);
        let mut opt = SgdNesterov::new(
            vars(&vm),
            SgdOptions {
                lr: 0.01,
                momentum: 0.9,
                weight_decay: 3e-5,
                nesterov: true,
            },
        );
        let ce = DcAndCeLoss::new(LossOptions::default());
        let mut losses = vec![];
        let mut reports = vec![];
        for step in 0..steps {
            for &(s, layer, method) in grow_at {
                if s == step {
                    let before = loss_value(net.as_ref(), &x, &y);
                    let opts = GrowthOptions {
                        method: method.parse().unwrap(),
                        n_candidates: 4,
                        n_new_per_growth: 2,
                        ..GrowthOptions::default()
                    };
                    let (xc, yc) = (x.clone(), y.clone());
                    let mut loss = |n: &dyn SegNetwork| {
                        DcAndCeLoss::new(LossOptions::default())
                            .loss(&n.forward(&xc, true)?[0], &yc)
                    };
                    let r = apply_growth(
                        net.as_mut(),
                        &vm,
                        &mut opt,
                        &[layer.to_string()],
                        &opts,
                        step as u64,
                        &mut loss,
                    )
                    .unwrap();
                    let after = loss_value(net.as_ref(), &x, &y);
                    assert!(
                        (before - after).abs() < 1e-5,
                        "{method} on {layer}: loss {before} -> {after}"
                    );
                    reports.push(r);
                }
            }
            let out = net.forward(&x, true).unwrap();
            let l = ce.loss(&out[0], &y).unwrap();
            let mut grads = l.backward().unwrap();
            opt.clip_grad_norm(&mut grads, 12.0).unwrap();
            opt.step(&grads).unwrap();
            losses.push(l.to_scalar::<f32>().unwrap() as f64);
        }
        let n: usize = vars(&vm).iter().map(|(_, v)| v.elem_count()).sum();
        (losses, reports, n)
    }

    #[test]
    fn schedule_every_plateau_and_per_epoch() {
        let s = GrowthSchedule::new(GrowthOptions {
            every: Some(3),
            layers: vec!["bottleneck".into(), "down_1".into()],
            ..GrowthOptions::default()
        })
        .unwrap();
        let due: Vec<usize> = (0..9).filter(|&e| !s.due(e, &[]).is_empty()).collect();
        assert_eq!(due, vec![2, 5, 8]);
        assert_eq!(s.due(2, &[]), vec!["bottleneck", "down_1"]);

        let mut o = GrowthOptions {
            on_plateau: Some(2),
            ..GrowthOptions::default()
        };
        o.schedule.insert(1, vec!["up_0".into()]);
        let s = GrowthSchedule::new(o).unwrap();
        let val = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75, 0.71, 0.72, 0.73];
        let due: Vec<usize> = (0..val.len())
            .filter(|&e| !s.due(e, &val[..=e]).is_empty())
            .collect();
        // best at 1 -> plateau fires at 3; best at 4 -> fires at 6 and 8; schedule at 1
        assert_eq!(due, vec![1, 3, 6, 8]);
        assert_eq!(s.due(1, &val[..=1]), vec!["up_0"]);
    }

    #[test]
    fn typed_options_and_serde() {
        let mut o = GrowthOptions::default();
        assert!(!o.enabled());
        o.every = Some(10);
        o.layers = vec!["bottleneck".into(), "down_3".into()];
        o.method = "split".parse().unwrap();
        o.n_candidates = 20;
        let entries: Vec<ScheduleEntry> = ["10:bottleneck", "20:down_3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        o.add_schedule(&entries);
        o.validate().unwrap();
        assert!(o.enabled());
        assert_eq!(o.schedule[&20], vec!["down_3"]);
        assert!(matches!(o.growth_method(), GrowthMethod::Split { .. }));
        let text = serde_json::to_string(&o).unwrap();
        assert!(text.contains(r#""method":"split""#), "{text}");
        let back: GrowthOptions = serde_json::from_str(&text).unwrap();
        assert_eq!(back, o);
        let partial: GrowthOptions = serde_json::from_str(r#"{"every": 5}"#).unwrap();
        assert_eq!(partial.layers, vec!["bottleneck"]);
        assert_eq!(partial.method, GrowthMethodName::SampleSelect);
        let e = "firefly".parse::<GrowthMethodName>().unwrap_err();
        assert!(e.contains("firefly") && e.contains("gradmax"), "{e}");
        assert!(serde_json::from_str::<GrowthOptions>(r#"{"method": "firefly"}"#).is_err());
        assert!("x:bottleneck".parse::<ScheduleEntry>().is_err());
        assert!("10".parse::<ScheduleEntry>().is_err());
        let bad = GrowthOptions {
            every: Some(0),
            ..GrowthOptions::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("every"));
    }

    #[test]
    fn optimizer_state_is_extended_not_reset() {
        let (x, y) = data();
        let (vm, mut net) = build(&kwargs([4, 6, 8]), 1);
        let mut opt = SgdNesterov::new(vars(&vm), SgdOptions::default());
        let ce = DcAndCeLoss::new(LossOptions::default());
        for _ in 0..2 {
            let l = ce.loss(&net.forward(&x, true).unwrap()[0], &y).unwrap();
            opt.step(&l.backward().unwrap()).unwrap();
        }
        let old_state = opt.state();
        let mut loss = |n: &dyn SegNetwork| ce.loss(&n.forward(&x, true)?[0], &y);
        let opts = GrowthOptions {
            method: GrowthMethodName::Gradmax,
            ..GrowthOptions::default()
        };
        let r = apply_growth(
            net.as_mut(),
            &vm,
            &mut opt,
            &["down_1.conv2".into()],
            &opts,
            0,
            &mut loss,
        )
        .unwrap();
        // conv weight, bias, norm weight, bias; next down conv1 + skip consumer
        assert_eq!(r.changed_params.len(), 6, "{:?}", r.changed_params);
        assert_eq!(r.grown[0].new_width, 7);
        assert_eq!(
            r.params_after - r.params_before,
            9 * 6 + 1 + 2 + 9 * 8 + 9 * 4
        );
        assert_eq!(r.grown_kwargs["grown_widths"]["down_1"], json!([6, 7]));
        let state = opt.state();
        let skip = "up_sample_layers.0.conv1.weight"; // input = [up 8 | skip 6] -> new at 14
        let (old, new) = (&old_state[skip], &state[skip]);
        assert_eq!(new.dims(), &[4, 15, 3, 3]);
        let diff = (new.narrow(1, 0, 14).unwrap() - old)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        let z = new
            .narrow(1, 14, 1)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(z.to_scalar::<f32>().unwrap(), 0.0);
        let w = "down_sample_layers.1.conv2.weight";
        assert_eq!(state[w].dims(), &[7, 6, 3, 3]);
        // the optimizer holds the new variables (the ones in the VarMap)
        let in_map = vm.data().lock().unwrap()[w].clone();
        let in_opt = opt.vars().iter().find(|(n, _)| n == w).unwrap().1.clone();
        assert_eq!(in_map.as_tensor().id(), in_opt.as_tensor().id());
        // a step after growth works and moves the new filter's incoming weights off zero
        let l = ce.loss(&net.forward(&x, true).unwrap()[0], &y).unwrap();
        opt.step(&l.backward().unwrap()).unwrap();
        let moved = in_map
            .as_tensor()
            .narrow(0, 6, 1)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(moved > 0.0);
        // a wrong slice is rejected
        let e = opt
            .grow_var(w, in_map.clone(), 0, 0, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains(w), "{e}");
    }

    #[test]
    fn training_grows_twice_and_keeps_learning() {
        let (losses, reports, n) = train(
            [4, 6, 8],
            36,
            &[
                (12, "bottleneck", "split"),
                (24, "up_1.conv2", "sample_select"),
            ],
        );
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].grown.len(), 2);
        assert!(reports[0].params_after > reports[0].params_before);
        assert_eq!(reports[1].params_before, reports[0].params_after);
        assert_eq!(n, reports[1].params_after);
        let first = losses[..3].iter().sum::<f64>() / 3.0;
        let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
        assert!(last < 0.8 * first, "loss {first} -> {last}: {losses:?}");
        // still learning after the last growth
        assert!(losses[35] < losses[24], "{losses:?}");
        assert!(
            reports[1].log_line().contains("up_1.conv2 4→6"),
            "{}",
            reports[1].log_line()
        );
    }

    /// Numbers for the report: `cargo test -p trainer growth_vs_static -- --ignored --nocapture`.
    #[test]
    #[ignore = "report numbers (growth vs static loss curves): run with -- --ignored --nocapture"]
    fn growth_vs_static_at_equal_final_size() {
        let steps = 60;
        for method in ["split", "sample_select", "gradmax"] {
            let (lg, reports, n) = train(
                [4, 6, 8],
                steps,
                &[(15, "bottleneck", method), (30, "up_1", method)],
            );
            let mut kw = kwargs([4, 6, 8]);
            for (k, v) in &reports[1].grown_kwargs {
                kw.insert(k.clone(), v.clone());
            }
            let (ls, _, n2) = train_kw(&kw, steps, &[]);
            assert_eq!(n, n2);
            let pick = |l: &[f64]| {
                [0, 14, 15, 29, 30, 45, steps - 1]
                    .iter()
                    .map(|&i| format!("{i}:{:.3}", l[i]))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            println!(
                "{method}: params {} -> {} -> {}\n  grown : {}\n  static: {}",
                reports[0].params_before,
                reports[0].params_after,
                n,
                pick(&lg),
                pick(&ls)
            );
        }
    }
}
