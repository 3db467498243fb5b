//! Balloon tests.
