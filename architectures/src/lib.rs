//! Networks and the N-d operations they are built from.
pub mod convunext;
pub mod doctor;
pub mod growable;
pub mod import;
pub mod init;
pub mod kiunet;
pub mod kwargs;
pub mod memory;
pub mod network;
pub mod ops;
pub mod preact_resunet;
pub mod registry;
pub mod runext;
pub mod summary;
#[cfg(test)]
mod test_util;
pub mod uiunet;
pub mod unet;
