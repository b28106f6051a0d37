//! (being written)

use crate::registry::Architecture;
use std::sync::Arc;

/// The architectures this module registers.
pub fn architectures() -> Vec<Arc<dyn Architecture>> {
    vec![]
}
