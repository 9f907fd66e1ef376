//! gitstate: a Terraform `http` state backend that keeps every state in a git repository.
//!
//! Request flow: an entry point ([`lambda`] or [`serve`]) hands an `http::Request` to
//! [`app::App::handle`], which authorizes it ([`auth`]); [`protocol`] decodes it into a
//! [`backend`] operation; the backend applies the state and lock rules over a
//! [`storage::Storage`], whose git stores keep files on branches and settle every race with
//! a compare-and-swap ref update. A [`context::RequestContext`] (credentials, deadline,
//! counters) travels the whole way down; [`error`] is the one table from failure to status.
//! Requests under `/ui/` take the same way and are rendered as pages by [`ui`].

// Unsafe code lives in one module only (`run::sys`, two libc calls), which allows itself.
#![deny(unsafe_code)]

pub mod app;
pub mod auth;
pub mod backend;
pub mod config;
pub mod context;
pub mod doctor;
pub mod error;
pub mod lambda;
pub mod protocol;
pub mod run;
pub mod serve;
pub mod storage;
pub mod ui;
