//! Weight initialisation: nnU-Net's initialisers ([`he_normal_std`]) and the weight backends
//! for [`candle_nn::VarBuilder`]:
//! - [`SeededInit`] creates every requested weight in a `VarMap` from its init hint with a
//!   seeded ChaCha generator (independent of candle's global RNG; each tensor's stream depends
//!   only on the seed and its name, so construction order does not matter);
//! - [`ShapeRecorder`] records names, shapes and init hints and hands out zero-cost broadcast
//!   tensors, so a 100M-parameter network can be "built" to count parameters or to print its
//!   layer table without allocating its weights.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Arc, Mutex};

/// A parameter or buffer requested by a network.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// state_dict name.
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamInfo {
    /// False for batch-norm running statistics (buffers, not trained).
    pub fn trainable(&self) -> bool {
        !is_buffer_name(&self.name)
    }
}

/// Names of non-trainable buffers (batch-norm running statistics).
pub fn is_buffer_name(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// Standard deviation of `torch.nn.init.kaiming_normal_(w, a=neg_slope)` (fan_in mode,
/// leaky_relu gain): `sqrt(2 / (1 + a²)) / sqrt(fan_in)`, with fan_in = `shape[1] * prod(k)`
/// (PyTorch's rule, also applied to transposed-conv weights `(C_in, C_out, *k)`).
pub fn he_normal_std(shape: &[usize], neg_slope: f64) -> f64 {
    let fan_in = fan(shape, true).max(1) as f64;
    (2.0 / (1.0 + neg_slope * neg_slope)).sqrt() / fan_in.sqrt()
}

fn fan(shape: &[usize], fan_in: bool) -> usize {
    let receptive: usize = shape.iter().skip(2).product();
    match (shape.len(), fan_in) {
        (0, _) => 1,
        (1, true) => 1,
        (_, true) => shape[1] * receptive,
        (_, false) => shape[0] * receptive,
    }
}

/// 64-bit FNV-1a.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// splitmix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Values for one tensor drawn from `init` with a generator seeded by `(seed, name)`.
pub fn init_values(init: &Init, shape: &[usize], seed: u64, name: &str) -> Vec<f64> {
    let n: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed) ^ fnv1a(name));
    let normal = |rng: &mut ChaCha8Rng, n: usize, mean: f64, std: f64| {
        // Box-Muller, both outputs used
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
            let u2: f64 = rng.gen::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = std::f64::consts::TAU * u2;
            v.push(mean + std * r * t.cos());
            v.push(mean + std * r * t.sin());
        }
        v.truncate(n);
        v
    };
    match *init {
        Init::Const(c) => vec![c; n],
        Init::Randn { mean, stdev } => normal(&mut rng, n, mean, stdev),
        Init::Uniform { lo, up } => (0..n).map(|_| lo + (up - lo) * rng.gen::<f64>()).collect(),
        Init::Kaiming {
            dist,
            fan: f,
            non_linearity,
        } => {
            let fan_in = matches!(f, candle_nn::init::FanInOut::FanIn);
            let std = non_linearity.gain() / (fan(shape, fan_in).max(1) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Normal => normal(&mut rng, n, 0.0, std),
                candle_nn::init::NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    (0..n).map(|_| -b + 2.0 * b * rng.gen::<f64>()).collect()
                }
            }
        }
    }
}

/// Creates missing weights in a `VarMap`, deterministically from a seed.
#[derive(Clone)]
pub struct SeededInit {
    varmap: VarMap,
    seed: u64,
}

impl SeededInit {
    pub fn new(varmap: &VarMap, seed: u64) -> Self {
        SeededInit {
            varmap: varmap.clone(),
            seed,
        }
    }
}

/// A `VarBuilder` that fills `varmap` with seeded nnU-Net-style initial weights.
pub fn seeded_init_backend<'a>(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> VarBuilder<'a> {
    VarBuilder::from_backend(Box::new(SeededInit::new(varmap, seed)), dtype, dev.clone())
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "{name}: existing shape {:?} != requested {:?}",
                    v.shape(),
                    s
                );
            }
            return v.as_tensor().to_dtype(dtype);
        }
        let vals = init_values(&h, s.dims(), self.seed, name);
        let t = Tensor::from_vec(vals, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        match data.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// Records every requested weight; returns broadcast zeros (no allocation).
#[derive(Clone, Default)]
pub struct ShapeRecorder {
    seen: Arc<Mutex<Vec<ParamInfo>>>,
}

impl ShapeRecorder {
    pub fn new() -> Self {
        Self::default()
    }
    /// The recorded weights in request order (each name once).
    pub fn params(&self) -> Vec<ParamInfo> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl SimpleBackend for ShapeRecorder {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| candle_core::Error::Msg("recorder lock poisoned".into()))?;
        if let Some(p) = seen.iter().find(|p| p.name == name) {
            if p.shape != s.dims() {
                candle_core::bail!(
                    "{name}: requested with shapes {:?} and {:?}",
                    p.shape,
                    s.dims()
                );
            }
        } else {
            seen.push(ParamInfo {
                name: name.to_string(),
                shape: s.dims().to_vec(),
                init: h,
            });
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("shape recorder: unchecked access to {name} is not supported")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.seen
            .lock()
            .map(|v| v.iter().any(|p| p.name == name))
            .unwrap_or(false)
    }
}

/// Sum of the element counts of the trainable entries.
pub fn count_trainable(params: &[ParamInfo]) -> u64 {
    params
        .iter()
        .filter(|p| p.trainable())
        .map(|p| p.shape.iter().product::<usize>() as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn he_std_matches_torch_formula() {
        // conv (32, 16, 3, 3, 3): fan_in = 16*27 = 432, gain = sqrt(2/1.0001)
        let s = he_normal_std(&[32, 16, 3, 3, 3], 1e-2);
        assert!((s - (2.0f64 / 1.0001).sqrt() / 432f64.sqrt()).abs() < 1e-12);
        // transposed conv (C_in=64, C_out=32, 2, 2, 2): torch uses dim 1 → 32*8
        let t = he_normal_std(&[64, 32, 2, 2, 2], 1e-2);
        assert!((t - (2.0f64 / 1.0001).sqrt() / 256f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn seeded_values_are_deterministic_and_normal() {
        let init = Init::Randn {
            mean: 0.0,
            stdev: 2.0,
        };
        let a = init_values(&init, &[100, 100], 7, "w");
        let b = init_values(&init, &[100, 100], 7, "w");
        let c = init_values(&init, &[100, 100], 8, "w");
        let d = init_values(&init, &[100, 100], 7, "w2");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        let n = a.len() as f64;
        let mean = a.iter().sum::<f64>() / n;
        let std = (a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 0.06, "{mean}");
        assert!((std - 2.0).abs() < 0.05, "{std}");
        assert_eq!(init_values(&Init::Const(1.0), &[3], 0, "x"), vec![1.0; 3]);
    }

    #[test]
    fn seeded_backend_fills_varmap_once() {
        let vm = VarMap::new();
        let vb = seeded_init_backend(&vm, 3, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints(
                (4, 2),
                "a.weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )
            .unwrap();
        let again = vb
            .get_with_hints((4, 2), "a.weight", Init::Const(0.0))
            .unwrap();
        assert_eq!(w.to_vec2::<f32>().unwrap(), again.to_vec2::<f32>().unwrap());
        assert!(vb
            .get_with_hints((2, 4), "a.weight", Init::Const(0.0))
            .is_err());
        assert_eq!(vm.all_vars().len(), 1);
        let vm2 = VarMap::new();
        let w2 = seeded_init_backend(&vm2, 3, DType::F32, &Device::Cpu)
            .get_with_hints(
                (4, 2),
                "a.weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )
            .unwrap();
        assert_eq!(w.to_vec2::<f32>().unwrap(), w2.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn recorder_records_without_allocating() {
        let rec = ShapeRecorder::new();
        let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
        let t = vb
            .pp("enc")
            .get_with_hints((320, 320, 3, 3, 3), "w", Init::Const(0.0))
            .unwrap();
        assert_eq!(t.dims(), &[320, 320, 3, 3, 3]);
        assert_eq!(t.stride(), &[0, 0, 0, 0, 0]);
        vb.pp("bn")
            .get_with_hints(8, "running_mean", Init::Const(0.0))
            .unwrap();
        let p = rec.params();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "enc.w");
        assert!(p[0].trainable() && !p[1].trainable());
    }
}
