//! normalization
