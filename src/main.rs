//! The `gitstate` binary: `gitstate serve` runs the local HTTP server; the
//! Lambda entry comes with the Lambda issue. Both only build the App and hand requests over.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use gitstate::{app::App, config::Config};

#[derive(Parser)]
#[command(name = "gitstate", version, about = "A Terraform http state backend that keeps every state in git")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the backend over HTTP on this machine.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "GITSTATE_LISTEN", default_value = "127.0.0.1:6061")]
        listen: SocketAddr,
        /// Git repository URL (git://, http://, https://); default: an embedded bare repository in the data directory.
        #[arg(long, env = "GITSTATE_REPOSITORY")]
        repository: Option<String>,
        /// Branch that holds the states.
        #[arg(long = "ref", env = "GITSTATE_REF", default_value = "main")]
        branch: String,
        /// Directory of the embedded repository and of the caches.
        #[arg(long, env = "GITSTATE_DATA_DIR", default_value = "./.gitstate")]
        data_dir: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GITSTATE_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { listen, repository, branch, data_dir } => {
            let mut config = match Config::from_env() {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            config.repository = repository.filter(|r| !r.is_empty());
            config.branch = branch;
            if std::env::var_os("GITSTATE_CACHE_DIR").is_none() {
                config.cache_dir = data_dir.join("cache");
            }
            config.data_dir = data_dir;
            if let Err(e) = config.validate() {
                return fail(e);
            }
            let app = match App::new(config) {
                Ok(app) => Arc::new(app),
                Err(e) => return fail(e),
            };
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            match rt.block_on(gitstate::serve::run(app, listen)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
    }
}

fn fail(e: impl std::fmt::Display) -> std::process::ExitCode {
    eprintln!("gitstate: {e}");
    std::process::ExitCode::FAILURE
}
