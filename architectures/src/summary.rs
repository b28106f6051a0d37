//! summary (in progress)
