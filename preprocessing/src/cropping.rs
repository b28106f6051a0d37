//! cropping
