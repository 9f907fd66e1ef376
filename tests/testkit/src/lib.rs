//! Real components for the integration tests and examples (DESIGN.md §7): git servers (git
//! daemon, lighttpd + http-backend, dulwich, OpenSSH sshd), `gitstate serve`, Terraform, headless
//! Chromium, the Lambda emulator, moto, a stalling and a delaying TCP proxy, and the
//! shared fixtures, an in-memory store. A crate of its own (dev-dependency only); each harness
//! stops what it started on drop.

pub mod browser;
pub mod dulwich;
pub mod fixtures;
pub mod gitd;
pub mod httpd;
pub mod lambda;
pub mod latency;
pub mod memory;
pub mod moto;
pub mod races;
pub mod serve;
pub mod sshd;
pub mod stall;
pub mod terraform;
pub mod tls;

/// The root of the gitstate repository (where `.venv`, `events/` and `Cargo.toml` live).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
