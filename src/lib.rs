//! gitstate: a Terraform `http` state backend that keeps every state in a git repository.
//!
//! Request flow: an entry point (Lambda in `main.rs`, or `gitstate serve`) hands an
//! `http::Request` to [`app::App::handle`]; [`protocol`] decodes it into a backend
//! request; [`backend`] applies the state and lock rules over a [`storage::Storage`];
//! [`storage::git`] keeps files on branches and settles every race with a
//! compare-and-swap ref update (our own receive-pack push, or a gix ref transaction).
//! [`error`] is the one table from failure to HTTP status.

pub mod app;
pub mod auth;
pub mod backend;
pub mod config;
pub mod error;
pub mod lambda;
pub mod protocol;
pub mod serve;
pub mod storage;
