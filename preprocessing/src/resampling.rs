//! resampling
