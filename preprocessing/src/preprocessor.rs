//! preprocessor
