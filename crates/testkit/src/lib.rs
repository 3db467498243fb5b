//! Tiny guest programs and helpers for rvirt's KVM tests.
