//! bf16 mixed precision ("autocast") with fp32 master weights.
//!
//! The network's `Var`s stay f32: the optimizer, gradient clipping and checkpoints see f32
//! only. [`forward_autocast`] casts the input to the compute dtype and the network's ops cast
//! each weight to their input's dtype where they use it (`architectures::ops::conv` and the
//! other weight-using ops; a differentiable `to_dtype`, so the f32 `Var` receives the gradient,
//! cast back to f32). Norms compute their statistics and affine transform in f32
//! (`architectures::ops` upcasts half-precision inputs). The outputs are cast back to f32
//! before the loss, so Dice + CE / BCE are computed in f32. This is PyTorch's
//! `torch.autocast(dtype=torch.bfloat16)` per op, without a loss scaler (bf16 has f32's
//! exponent range).

use architectures::network::SegNetwork;
use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Mixed-precision setting (`--amp auto|on|off`, `"amp"` in a trainer configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Amp {
    /// bf16 on CUDA, f32 on the CPU (whose fast kernels are f32 only).
    #[default]
    Auto,
    /// bf16 forward pass on every device (slow on the CPU: composite ops).
    On,
    /// f32 throughout.
    Off,
}

impl Amp {
    /// The dtype the forward pass runs in on `device`.
    pub fn compute_dtype(self, device: &Device) -> DType {
        match self {
            Amp::On => DType::BF16,
            Amp::Auto if device.is_cuda() => DType::BF16,
            Amp::Auto | Amp::Off => DType::F32,
        }
    }
}

impl std::str::FromStr for Amp {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Amp::Auto),
            "on" | "true" | "bf16" => Ok(Amp::On),
            "off" | "false" | "fp32" | "f32" => Ok(Amp::Off),
            _ => Err(format!("`{s}`: use auto, on or off")),
        }
    }
}

/// A log line naming the precision of the forward pass.
pub fn describe(dtype: DType) -> String {
    match dtype {
        DType::F32 => "precision: f32".into(),
        d => format!(
            "precision: {} mixed precision (forward in {}, f32 weights, optimizer and loss)",
            d.as_str(),
            d.as_str()
        ),
    }
}

/// `network.forward(x, train)` with the forward pass in `dtype`: `x` is cast to `dtype` and
/// every output back to f32. With `dtype` f32 this is the plain forward pass.
pub fn forward_autocast(
    network: &dyn SegNetwork,
    x: &Tensor,
    train: bool,
    dtype: DType,
) -> Result<Vec<Tensor>> {
    autocast(x, dtype, |x| network.forward(x, train))
}

/// Runs `forward` on `x` cast to `dtype` and casts its outputs back to f32 (for forward
/// passes other than [`SegNetwork::forward`], e.g. with auxiliary outputs).
pub fn autocast(
    x: &Tensor,
    dtype: DType,
    forward: impl FnOnce(&Tensor) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    forward(&x.to_dtype(dtype)?)?
        .into_iter()
        .map(|t| t.to_dtype(DType::F32))
        .collect()
}

#[cfg(test)]
mod tests;
