//! The architecture registry: nnU-Net's `network_class_name` strings → a constructor and a
//! memory estimator.
//!
//! A [`Registry`] is a plain value (no global state). [`Registry::default`] knows nnU-Net's two
//! default networks; later architectures implement [`Architecture`] and are added with
//! [`Registry::register`]:
//!
//! ```no_run
//! use architectures::registry::{NetworkIo, Registry};
//! # fn f(spec: &plans::ArchitectureSpec) -> Result<(), architectures::registry::ArchError> {
//! let registry = Registry::default();
//! let io = NetworkIo { in_channels: 1, num_classes: 3, deep_supervision: true };
//! let (varmap, net) = registry.build_initialized(spec, &io, 12345, &candle_core::Device::Cpu)?;
//! # Ok(()) }
//! ```

// The vocabulary and the weight backends, re-exported so `architectures::registry::*` keeps
// working for the users of the registry.
pub use crate::init::{
    count_trainable, he_normal_std, seeded_init_backend, ParamInfo, SeededInit, ShapeRecorder,
};
pub(crate) use crate::network::CandleContext;
pub use crate::network::{
    ArchError, ArchPreset, Architecture, LayerRow, NetworkIo, SegNetwork, KWARGS_PATH,
};

use crate::memory::MemoryEstimate;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use std::sync::Arc;

/// Maps architecture names to their [`Architecture`].
#[derive(Clone)]
pub struct Registry {
    entries: Vec<Arc<dyn Architecture>>,
}

impl Default for Registry {
    /// PlainConvUNet and ResidualEncoderUNet.
    fn default() -> Self {
        let mut r = Registry::empty();
        for a in crate::unet::default_architectures()
            .into_iter()
            .chain(crate::kiunet::architectures())
            .chain(crate::uiunet::architectures())
            .chain(crate::runext::architectures())
            .chain(crate::convunext::architectures())
            .chain(crate::preact_resunet::architectures())
            .chain(crate::growable::architectures())
        {
            // the built-in names are distinct
            if let Err(e) = r.register(a) {
                unreachable!("built-in architectures clash: {e}");
            }
        }
        r
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("names", &self.known_names())
            .finish()
    }
}

impl Registry {
    /// A registry that knows nothing.
    pub fn empty() -> Self {
        Registry { entries: vec![] }
    }

    /// Adds an architecture; fails if one of its names is already taken.
    pub fn register(&mut self, arch: Arc<dyn Architecture>) -> Result<(), ArchError> {
        let mut names = vec![arch.name().to_string()];
        names.extend(arch.aliases());
        for n in &names {
            if self.find(n).is_some() {
                return Err(ArchError::DuplicateName(n.clone()));
            }
        }
        self.entries.push(arch);
        Ok(())
    }

    fn find(&self, name: &str) -> Option<&Arc<dyn Architecture>> {
        self.entries
            .iter()
            .find(|a| a.name() == name || a.aliases().iter().any(|x| x == name))
    }

    /// Every accepted name (canonical names and aliases), in registration order.
    pub fn known_names(&self) -> Vec<String> {
        let mut v = vec![];
        for a in &self.entries {
            v.push(a.name().to_string());
            v.extend(a.aliases());
        }
        v
    }

    /// The architecture registered under `name` (canonical or alias).
    pub fn get(&self, name: &str) -> Result<&dyn Architecture, ArchError> {
        self.find(name.trim())
            .map(|a| a.as_ref())
            .ok_or_else(|| ArchError::UnknownArchitecture {
                name: name.to_string(),
                known: self.known_names(),
            })
    }

    /// Builds the network of `spec` with weights from `vb` (a `VarMap`, loaded safetensors, ...).
    pub fn build(
        &self,
        spec: &plans::ArchitectureSpec,
        io: &NetworkIo,
        vb: VarBuilder,
    ) -> Result<Box<dyn SegNetwork>, ArchError> {
        self.get(&spec.network_class_name)?
            .build(&spec.arch_kwargs, KWARGS_PATH, io, vb)
    }

    /// Builds the network of `spec` with fresh weights, initialised as nnU-Net does
    /// (`InitWeights_He(1e-2)`, zero biases, norm weight 1 / bias 0; ResEnc also zeroes the
    /// last norm of each residual block), deterministically from `seed`.
    pub fn build_initialized(
        &self,
        spec: &plans::ArchitectureSpec,
        io: &NetworkIo,
        seed: u64,
        device: &Device,
    ) -> Result<(VarMap, Box<dyn SegNetwork>), ArchError> {
        let varmap = VarMap::new();
        let vb = seeded_init_backend(&varmap, seed, DType::F32, device);
        let net = self.build(spec, io, vb)?;
        Ok((varmap, net))
    }

    /// Every preset of every registered architecture: (architecture name, preset).
    pub fn presets(&self) -> Vec<(String, ArchPreset)> {
        self.entries
            .iter()
            .flat_map(|a| {
                let n = a.name().to_string();
                a.presets().into_iter().map(move |p| (n.clone(), p))
            })
            .collect()
    }

    /// The activation estimator of `spec` (nnU-Net's planner currency).
    pub fn estimate(
        &self,
        spec: &plans::ArchitectureSpec,
        io: &NetworkIo,
    ) -> Result<Box<dyn MemoryEstimate>, ArchError> {
        self.get(&spec.network_class_name)?
            .estimator(&spec.arch_kwargs, KWARGS_PATH, io)
    }

    /// Every parameter (and buffer) of the network: state_dict name, shape, initialiser. Builds
    /// the network on shape-only tensors, so nothing big is allocated.
    pub fn parameters(
        &self,
        spec: &plans::ArchitectureSpec,
        io: &NetworkIo,
    ) -> Result<Vec<ParamInfo>, ArchError> {
        Ok(self.shape_only(spec, io)?.0)
    }

    /// The network built on shape-only tensors (usable for [`SegNetwork::layers`], not for
    /// forward) and its parameter list.
    pub fn shape_only(
        &self,
        spec: &plans::ArchitectureSpec,
        io: &NetworkIo,
    ) -> Result<(Vec<ParamInfo>, Box<dyn SegNetwork>), ArchError> {
        let rec = ShapeRecorder::new();
        let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
        let net = self.build(spec, io, vb)?;
        Ok((rec.params(), net))
    }

    /// Number of trainable parameters (running statistics excluded), as PyTorch counts them.
    pub fn parameter_count(
        &self,
        spec: &plans::ArchitectureSpec,
        io: &NetworkIo,
    ) -> Result<u64, ArchError> {
        Ok(count_trainable(&self.parameters(spec, io)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use serde_json::{json, Value};
    use std::collections::HashMap;

    fn spec(name: &str, kwargs: Value) -> plans::ArchitectureSpec {
        plans::ArchitectureSpec {
            network_class_name: name.to_string(),
            arch_kwargs: kwargs.as_object().unwrap().clone(),
            kw_requires_import: vec![],
        }
    }

    #[test]
    fn names_resolve_and_unknown_lists_known() {
        let r = Registry::default();
        for n in [
            "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "PlainConvUNet",
        ] {
            assert_eq!(
                r.get(n).unwrap().name(),
                "dynamic_network_architectures.architectures.unet.PlainConvUNet"
            );
        }
        for n in [
            "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "ResidualEncoderUNet",
            "ResEncUNet",
        ] {
            assert_eq!(
                r.get(n).unwrap().name(),
                "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
            );
        }
        let e = r.get("dynamic_network_architectures.architectures.unet.ResidualUNet");
        let msg = e.err().unwrap().to_string();
        assert!(msg.contains("unknown architecture"), "{msg}");
        assert!(
            msg.contains("ResEncUNet") && msg.contains("PlainConvUNet"),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_registration_fails() {
        let mut r = Registry::default();
        let again = crate::unet::default_architectures().remove(0);
        assert!(matches!(
            r.register(again),
            Err(ArchError::DuplicateName(_))
        ));
        let mut empty = Registry::empty();
        assert!(empty.known_names().is_empty());
        for a in crate::unet::default_architectures() {
            empty.register(a).unwrap();
        }
        // the default registry starts with nnU-Net's networks, then the other families
        let all = Registry::default().known_names();
        assert_eq!(empty.known_names()[..], all[..empty.known_names().len()]);
        for n in [
            "kiunet",
            "uiunet",
            "runext",
            "convunext",
            "preact_resunet",
            "growable_unet",
        ] {
            assert!(all.contains(&n.to_string()), "{n} not registered");
        }
        // every preset belongs to a registered architecture and has a unique name
        let presets = Registry::default().presets();
        let mut names: Vec<&str> = presets.iter().map(|(_, p)| p.name.as_str()).collect();
        assert!(names.contains(&"kiunet_minimal") && names.contains(&"convunext_xlarge"));
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate preset names");
    }

    /// A preset's network at a tiny 3-stage 3D plan (4..16 features, deep supervision).
    fn tiny_3d_network(
        r: &Registry,
        arch: &str,
        preset: &ArchPreset,
        dev: &Device,
    ) -> (VarMap, Box<dyn SegNetwork>) {
        let mut s = spec(
            arch,
            json!({
                "n_stages": 3, "features_per_stage": [4, 8, 16],
                "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": 3,
                "strides": [1, 2, 2], "n_conv_per_stage": 2, "n_conv_per_stage_decoder": 2,
                "conv_bias": true, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-5, "affine": true},
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
            }),
        );
        s.arch_kwargs.extend(preset.kwargs.clone());
        let io = NetworkIo {
            in_channels: 1,
            num_classes: 2,
            deep_supervision: true,
        };
        r.build_initialized(&s, &io, 0, dev).unwrap()
    }

    /// No family leaves an op graph on its weight gradients: the gradients stay in the
    /// `GradStore` until the optimizer step, and a graph there would keep upstream gradients
    /// (whole feature maps) alive that long.
    #[test]
    fn weight_gradients_carry_no_graph() {
        let r = Registry::default();
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 1, 16, 16, 16), &dev).unwrap();
        let mut bad = vec![];
        for (arch, preset) in r.presets() {
            let (varmap, net) = tiny_3d_network(&r, &arch, &preset, &dev);
            let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
            for o in net.forward(&x, true).unwrap() {
                loss = (loss + o.sqr().unwrap().sum_all().unwrap()).unwrap();
            }
            let g = loss.backward().unwrap();
            for (name, v) in varmap.data().lock().unwrap().iter() {
                if g.get(v.as_tensor()).is_some_and(|t| t.track_op()) {
                    bad.push(format!("{} / {name}", preset.name));
                }
            }
        }
        assert!(bad.is_empty(), "gradients with a graph: {bad:?}");
    }

    /// The trainer's `backward_consuming` (the vendored candle-core patch) gives every family
    /// exactly the gradients of Candle's `backward`, and takes nothing a later step needs: a
    /// second step through the same network still reaches every weight.
    #[test]
    fn consuming_backward_matches_backward_and_keeps_networks_trainable() {
        let r = Registry::default();
        let dev = Device::Cpu;
        let n = 16 * 16 * 16;
        let x = ((Tensor::arange(0u32, n as u32, &dev).unwrap())
            .to_dtype(DType::F32)
            .unwrap()
            * 0.37)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((1, 1, 16, 16, 16))
            .unwrap();
        for (arch, preset) in r.presets() {
            let (varmap, net) = tiny_3d_network(&r, &arch, &preset, &dev);
            // eval mode: some families drop paths at random in training mode
            let loss = || {
                let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
                for o in net.forward(&x, false).unwrap() {
                    loss = (loss + o.sqr().unwrap().sum_all().unwrap()).unwrap();
                }
                loss
            };
            let reference = loss().backward().unwrap();
            for round in 0..2 {
                let l = loss();
                let g = l.backward_consuming().unwrap();
                assert!(!l.track_op(), "{}: the graph was not consumed", preset.name);
                for (name, v) in varmap.data().lock().unwrap().iter() {
                    let (a, b) = match (reference.get(v.as_tensor()), g.get(v.as_tensor())) {
                        (Some(a), Some(b)) => (a, b),
                        (None, None) => continue, // a weight the forward pass does not use
                        (a, _) => panic!(
                            "{} round {round}: {name} has a gradient only in {}",
                            preset.name,
                            if a.is_some() {
                                "backward"
                            } else {
                                "backward_consuming"
                            }
                        ),
                    };
                    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                    let scale = a.abs().unwrap().max_all().unwrap();
                    let (diff, scale) = (
                        diff.to_scalar::<f32>().unwrap(),
                        scale.to_scalar::<f32>().unwrap(),
                    );
                    assert!(
                        diff <= 1e-5 * scale.max(1e-3),
                        "{} round {round}: {name} differs by {diff} (scale {scale})",
                        preset.name
                    );
                }
            }
        }
    }

    /// Deep-supervision heads exist only with deep supervision in the research families
    /// (nnU-Net's U-Nets always build theirs): the network without deep supervision has the
    /// parameters of the one with it minus its low-resolution heads, gives one output, and
    /// loads from the weights trained with deep supervision (the heads' are not read).
    #[test]
    fn deep_supervision_heads_only_where_deep_supervision_is_on() {
        let r = Registry::default();
        let dev = Device::Cpu;
        let base = json!({
            "n_stages": 3, "features_per_stage": [4, 8, 16],
            "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": 3,
            "strides": [1, 2, 2], "n_conv_per_stage": 2, "n_conv_per_stage_decoder": 2,
            "conv_bias": true, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": true},
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
        });
        let mut cases = vec![(
            "PlainConvUNet".to_string(),
            "plain".to_string(),
            spec("PlainConvUNet", base.clone()),
        )];
        for (arch, preset) in r.presets() {
            let mut s = spec(&arch, base.clone());
            s.arch_kwargs.extend(preset.kwargs.clone());
            cases.push((arch, preset.name, s));
        }
        let io = |ds| NetworkIo {
            in_channels: 1,
            num_classes: 3,
            deep_supervision: ds,
        };
        let x = Tensor::randn(0f32, 1., (1, 1, 32, 32), &dev).unwrap();
        for (arch, name, s) in cases {
            let on = r.parameters(&s, &io(true)).unwrap();
            let off = r.parameters(&s, &io(false)).unwrap();
            let extra: Vec<&str> = on
                .iter()
                .filter(|p| !off.iter().any(|q| q.name == p.name && q.shape == p.shape))
                .map(|p| p.name.as_str())
                .collect();
            assert_eq!(
                on.len() - off.len(),
                extra.len(),
                "{name}: DS off has its own weights"
            );
            let head = |n: &&str| {
                [
                    "deep_supervision_heads.",
                    "ds_heads.",
                    "heads.",
                    "seg_layers.",
                ]
                .iter()
                .any(|h| n.contains(h))
            };
            assert!(extra.iter().all(head), "{name}: {extra:?}");
            let nnunet = arch.ends_with("PlainConvUNet") || arch.ends_with("ResidualEncoderUNet");
            let fused = name.starts_with("uiunet"); // every side head feeds the fused output
            if nnunet || fused {
                assert!(extra.is_empty(), "{name}: {extra:?}");
            }
            let with_heads = ["kiunet", "runext", "convunext_tiny", "preact_resunet"];
            if with_heads.contains(&name.as_str()) || name == "growable_unet" {
                assert!(!extra.is_empty(), "{name}: no deep-supervision heads");
            }
            // the DS-off network from the DS-on weights = the DS-on network with DS off
            let (varmap, mut net_on) = r.build_initialized(&s, &io(true), 1, &dev).unwrap();
            let weights: HashMap<String, Tensor> = varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
            let net_off = r.build(&s, &io(false), vb).unwrap();
            net_on.set_deep_supervision(false);
            let (a, b) = (
                net_on.forward(&x, false).unwrap(),
                net_off.forward(&x, false).unwrap(),
            );
            assert_eq!((a.len(), b.len()), (1, 1), "{name}");
            let d = (&a[0] - &b[0]).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
    }

    #[test]
    fn estimate_goes_through_the_registry() {
        let r = Registry::default();
        let s = spec(
            "PlainConvUNet",
            json!({
                "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.Conv2d",
                "kernel_sizes": 3, "strides": [1, 2], "n_conv_per_stage": 2,
                "n_conv_per_stage_decoder": [1], "norm_op": null, "nonlin": null
            }),
        );
        let io = NetworkIo {
            in_channels: 1,
            num_classes: 3,
            deep_supervision: false,
        };
        // same hand count as memory.rs: 576 + 528
        assert_eq!(
            r.estimate(&s, &io).unwrap().conv_feature_map_size(&[8, 6]),
            1104
        );
    }
}
