//! Helpers shared by the integration tests: real components only
//! (DESIGN.md §7). Each test starts what it needs and stops it on drop.
#![allow(dead_code)]

pub mod gitd;
pub mod httpd;
pub mod lambda;
pub mod moto;
pub mod serve;
pub mod terraform;
