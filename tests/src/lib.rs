//! Harness shared by the end-to-end tests: the cached guest and test host fixtures.
