//! End-to-end tests: the real `sluice` binary on port 0, driven by real clients (async-openai,
//! and raw reqwest for SSE), against the testkit's mock upstream.

mod anthropic_ingress;
mod budgets;
mod cache;
mod cli;
mod errors;
mod harness;
mod keys;
mod lifecycle;
mod local_models;
mod log_api;
mod multinode;
mod openai_api;
mod providers;
mod routing;
