//! (being written)

use crate::registry::{ArchError, Architecture, SegNetwork};
use candle_core::Tensor;
use candle_nn::VarMap;
use serde_json::{Map, Value};
use std::sync::Arc;

/// The architectures this module registers.
pub fn architectures() -> Vec<Arc<dyn Architecture>> {
    vec![]
}

/// A network whose layers can gain filters while training without changing its function.
/// (Interface draft; the growth helper owns and may refine it.)
pub trait Growable {
    /// Names of the layers that can grow (`down_0`, ..., `bottleneck`, `up_0`, ...).
    fn growable_layers(&self) -> Vec<String>;
    /// Widens one layer. `loss` computes a scalar training loss of the network on a fixed
    /// batch (used for gradient-based scores). Variables are replaced in `varmap` under the
    /// same names; the report says which parameters changed shape and where the new slices
    /// are, so an optimizer can extend its state.
    fn grow(
        &mut self,
        layer: &str,
        varmap: &VarMap,
        loss: &mut dyn FnMut(&dyn SegNetwork) -> candle_core::Result<Tensor>,
    ) -> Result<Vec<String>, ArchError>;
    /// `arch_kwargs` that rebuild the network with its current (grown) widths.
    fn grown_kwargs(&self) -> Map<String, Value>;
}
