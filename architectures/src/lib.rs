//! Networks and the N-d operations they are built from.
pub mod import;
pub mod memory;
pub mod ops;
pub mod registry;
pub mod summary;
pub mod unet;
