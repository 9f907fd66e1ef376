//! Real components for the integration tests and examples (DESIGN.md §7): git servers,
//! `gitstate serve`, Terraform, the Lambda emulator, moto, a stalling TCP proxy, and the
//! shared fixtures. Behind the `testkit` feature; each harness stops what it started on drop.

pub mod fixtures;
pub mod gitd;
pub mod httpd;
pub mod lambda;
pub mod memory;
pub mod moto;
pub mod races;
pub mod serve;
pub mod stall;
pub mod terraform;
