//! Networks and the N-d operations they are built from.
pub mod memory;
pub mod ops;
