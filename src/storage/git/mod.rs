//! The git stores: [`RemoteStore`], a remote reached through a bare cache repository
//! (fetch with gix, push with our own receive-pack client), and [`EmbeddedStore`], a
//! local bare repository moved by gix ref transactions. Both share `tree` (trees, commits, authors).

mod embedded;
mod fetch;
pub mod pack;
pub mod push;
pub mod remote;
mod smart_http;
pub(crate) mod ssh;
pub(crate) mod transport;
pub(crate) mod tree;

pub use embedded::EmbeddedStore;
pub use remote::RemoteStore;
pub use tree::Author;
