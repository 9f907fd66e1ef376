//! The `gitstate` binary: `gitstate serve` runs the local HTTP server;
//! `gitstate lambda` (or no subcommand under the Lambda runtime) serves Lambda
//! invocations. Both only build the App once and hand requests over.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use gitstate::app::App;
use gitstate::config::{Config, Entry, Settings};

#[derive(Parser)]
#[command(name = "gitstate", version, about = "A Terraform http state backend that keeps every state in git")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve AWS Lambda invocations (the default when AWS_LAMBDA_RUNTIME_API is set).
    Lambda {
        #[command(flatten)]
        settings: Settings,
    },
    /// Decrypt a stored state (an age file or a KMS envelope, e.g. `git show main:terraform.tfstate`)
    /// with the keys of the settings (GITSTATE_AGE_IDENTITIES / _FILE, GITSTATE_KMS_KEY_ID).
    Decrypt {
        /// The stored file; standard input when absent.
        file: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
    /// Serve the backend over HTTP on this machine.
    Serve {
        /// Run `gitstate doctor`'s checks on the repository first and refuse to start on a
        /// broken promise (git credentials from GITSTATE_GIT_USERNAME / GITSTATE_GIT_PASSWORD).
        #[arg(long)]
        check_host: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Check a repository on its git host for what gitstate's promises rest on, one line per
    /// check: exit 0 when they hold, 1 naming each broken one, 2 for a usage error.
    ///
    /// Reachable; credentials accepted for read and for write; protocol v2; receive-pack's
    /// capabilities; the compare-and-swap itself, on scratch refs under refs/gitstate-doctor/
    /// (removed afterwards); the round trip. Run it once before the first apply. Git
    /// credentials: --git-username / --git-password (GITSTATE_GIT_USERNAME / _PASSWORD).
    Doctor {
        #[command(flatten)]
        settings: Settings,
    },
    /// Run a command (Terraform, OpenTofu) against a one-time backend on a loopback port:
    /// `gitstate run [--state PATH] -- terraform apply`.
    ///
    /// The command finds the backend in TF_HTTP_ADDRESS, TF_HTTP_LOCK_ADDRESS,
    /// TF_HTTP_UNLOCK_ADDRESS, TF_HTTP_USERNAME and TF_HTTP_PASSWORD (a random pair valid for this
    /// run only), so `backend "http" {}` is all the configuration needs. gitstate exits with the
    /// command's exit code.
    Run(gitstate::run::RunArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Some(c) => c,
        None if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() => match Settings::from_env() {
            Ok(settings) => Command::Lambda { settings },
            Err(e) => return fail(e),
        },
        None => {
            eprintln!("gitstate: say `gitstate serve` to run the local server (see `gitstate --help`)");
            return std::process::ExitCode::from(2);
        }
    };
    match command {
        Command::Run(args) => gitstate::run::main(args),
        Command::Decrypt { file, settings } => run_async(decrypt(file, settings)),
        Command::Lambda { settings } => lambda(settings),
        Command::Doctor { settings } => doctor(&settings),
        Command::Serve { settings, check_host } => serve(settings, check_host),
    }
}

/// `gitstate lambda`: one JSON log object per line on stdout (CloudWatch), then the runtime loop.
fn lambda(settings: Settings) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .with_ansi(false)
        .with_env_filter(settings.log_filter("info"))
        .with_writer(std::io::stdout)
        .init();
    let config = match Config::from_settings(&settings, Entry::Lambda) {
        Ok(c) if c.repository.is_some() => c,
        Ok(_) => return fail("GITSTATE_REPOSITORY must be set under Lambda (its disk does not outlive the instance)"),
        Err(e) => return fail(e),
    };
    run_async(async move {
        let app = Arc::new(App::load(config).await.map_err(|e| e.to_string())?);
        gitstate::lambda::serve_invocations(app).await.map_err(|e| e.to_string())
    })
}

/// `gitstate serve`: logs on stderr, an optional host check, then the HTTP server.
fn serve(settings: Settings, check_host: bool) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(settings.log_filter("info"))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::from_settings(&settings, Entry::Local) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if check_host {
        let Some(url) = config.repository.clone() else {
            return fail("--check-host needs a repository on a git host (--repository)");
        };
        let ssh = match gitstate::auth::ssh_identity(&config, None, None) {
            Ok(ssh) => ssh,
            Err(e) => return fail(e),
        };
        let report = check_repository(&url, &config.branch, config.git_credentials.clone(), ssh);
        eprint!("{}", report.render());
        if !report.healthy() {
            return fail("refusing to start: gitstate's promises do not hold on this git host");
        }
    }
    let listen = config.listen;
    run_async(async move {
        let app = Arc::new(App::load(config).await.map_err(|e| e.to_string())?);
        gitstate::serve::listen(app, listen).await.map_err(|e| e.to_string())
    })
}

/// `gitstate doctor`: the report on standard output, the exit code by its verdict.
fn doctor(settings: &Settings) -> std::process::ExitCode {
    let usage = |why: String| {
        eprintln!("gitstate doctor: {why}");
        std::process::ExitCode::from(2)
    };
    let config = match Config::from_settings(settings, Entry::Local) {
        Ok(c) => c,
        Err(e) => return usage(e.to_string()),
    };
    let Some(url) = config.repository.clone() else {
        return usage("name the repository: --repository URL (or GITSTATE_REPOSITORY)".into());
    };
    // The deployment's SSH key and pinned host keys, checked as at start (for ssh:// repositories).
    let ssh = match gitstate::auth::ssh_identity(&config, None, None) {
        Ok(ssh) => ssh,
        Err(e) => return usage(e.to_string()),
    };
    let report = check_repository(&url, &config.branch, config.git_credentials.clone(), ssh);
    print!("{}", report.render());
    if report.healthy() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

fn check_repository(
    url: &gitstate::storage::RepoUrl,
    branch: &str,
    credentials: Option<gitstate::context::Credentials>,
    ssh: Option<std::sync::Arc<gitstate::context::SshIdentity>>,
) -> gitstate::doctor::Report {
    let scratch = std::env::temp_dir().join(format!("gitstate-doctor-{}-{:x}", std::process::id(), fastrand::u32(..)));
    let report = gitstate::doctor::check(url, branch, credentials, ssh, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    report
}

fn run_async<E: std::fmt::Display>(f: impl std::future::Future<Output = Result<(), E>>) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    match rt.block_on(f) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: impl std::fmt::Display) -> std::process::ExitCode {
    eprintln!("gitstate: {e}");
    std::process::ExitCode::FAILURE
}

/// `gitstate decrypt`: what a stored state holds, on standard output.
async fn decrypt(file: Option<PathBuf>, settings: Settings) -> Result<(), String> {
    use gitstate::backend::sealing::Sealing;
    use std::io::{Read, Write};
    let config = Config::from_settings(&settings, Entry::Local).map_err(|e| e.to_string())?;
    let mut stored = Vec::new();
    match &file {
        Some(path) => stored = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?,
        None => {
            std::io::stdin().read_to_end(&mut stored).map_err(|e| format!("standard input: {e}"))?;
        }
    }
    let mut keys = config.sealing.clone();
    // Reading needs no recipient: any configured key that may open is enough.
    if keys.age_recipients.is_empty() && keys.age_identities.is_some() && keys.kms_key_id.is_none() {
        keys.age_recipients.push(placeholder_recipient(&keys)?);
    }
    let sealing = if keys.kms_key_id.is_some() {
        let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        Sealing::new(&keys, Some((&sdk, tokio::runtime::Handle::current())))
    } else {
        Sealing::new(&keys, None)
    }
    .map_err(|e| e.to_string())?;
    let ctx = gitstate::context::RequestContext::unbounded();
    let plain = tokio::task::block_in_place(|| sealing.open(&ctx, &stored)).map_err(|e| e.to_string())?;
    std::io::stdout().write_all(&plain).map_err(|e| format!("standard output: {e}"))
}

/// The public key of the first identity, so that a decrypt-only configuration is complete.
fn placeholder_recipient(keys: &gitstate::backend::sealing::SealingSettings) -> Result<String, String> {
    gitstate::backend::sealing::first_recipient_of(keys).ok_or_else(|| "no readable age identity".to_string())
}
