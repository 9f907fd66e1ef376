//! `template.yaml` passes `cfn-lint` and `sam validate --lint`, offline (both
//! from PyPI, installed into `.venv` by `scripts/test.sh`), and says what the
//! deployment needs: the function, its environment, the HTTP API routes and the
//! backend block in the outputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `$<var>`, else `.venv/bin/<name>`; panics with the set-up command when missing.
fn tool(var: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin").join(name));
    assert!(
        path.is_file(),
        "{name} not found at {}: run `bash scripts/test.sh` (it installs cfn-lint and aws-sam-cli into .venv)",
        path.display()
    );
    path
}

fn run(program: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(root()).stdin(Stdio::null());
    // Offline and independent of any AWS configuration on the machine.
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("AWS_") && k != "AWS_CA_BUNDLE" {
                cmd.env_remove(k);
            }
        }
    }
    let home = tempfile::tempdir().unwrap();
    cmd.env("HOME", home.path())
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("SAM_CLI_TELEMETRY", "0")
        .env("SAM_CLI_DISABLE_VERSION_CHECK", "1");
    cmd.output().unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

#[track_caller]
fn assert_clean(what: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed ({}):\n{stdout}\n{stderr}", out.status);
}

#[test]
fn cfn_lint_is_clean() {
    let out = run(&tool("GITSTATE_CFN_LINT", "cfn-lint"), &["--format", "parseable", "template.yaml"]);
    assert_clean("cfn-lint template.yaml", &out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "", "cfn-lint reported findings");
}

#[test]
fn sam_validate_lint_is_clean() {
    let out = run(&tool("GITSTATE_SAM", "sam"), &["validate", "--lint", "--template-file", "template.yaml"]);
    assert_clean("sam validate --lint", &out);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("is a valid SAM Template"), "sam validate --lint said:\n{text}");
}

/// The parts of the template docs/lambda.md and the tests rely on.
#[test]
fn template_declares_the_function_the_api_and_the_backend_block() {
    let t = std::fs::read_to_string(root().join("template.yaml")).unwrap();
    for needle in [
        "Runtime: provided.al2023",
        "Architectures: [arm64]",
        "BuildMethod: rust-cargolambda",
        "Binary: gitstate",
        "Handler: bootstrap",
        "GITSTATE_REPOSITORY: !Ref RepositoryUrl",
        "GITSTATE_REF: !Ref Branch",
        "GITSTATE_ALLOWED_REPOSITORIES:",
        "GITSTATE_AUTH:",
        "GITSTATE_GIT_CREDENTIALS_SECRET:",
        "GITSTATE_CACHE_DIR: /tmp/gitstate",
        "GITSTATE_LOG:",
        "GITSTATE_KMS_KEY_ID:",
        "kms:GenerateDataKey",
        "secretsmanager:GetSecretValue",
        "Type: AWS::Serverless::HttpApi",
        "Path: /{proxy+}",
        "lock_method    = \"POST\"",
        "unlock_method  = \"DELETE\"",
        "/lock/terraform.tfstate",
        "/state/terraform.tfstate",
    ] {
        assert!(t.contains(needle), "template.yaml lacks {needle:?}");
    }
    // Within API Gateway's integration timeout (29 s REST, 30 s HTTP API).
    let timeout: u32 =
        t.lines().find_map(|l| l.trim().strip_prefix("Timeout:")).expect("a Timeout").trim().parse().unwrap();
    assert!((1..29).contains(&timeout), "Timeout {timeout} is not below API Gateway's limit");
    // Reading the secret is granted only under the condition that one is configured.
    let grant = t.find("secretsmanager:GetSecretValue").unwrap();
    let before = &t[..grant];
    let cond = before.rfind("- HasGitCredentialsSecret").expect("the grant is under HasGitCredentialsSecret");
    assert!(before[cond..].contains("Statement:"), "the grant is not inside the !If on HasGitCredentialsSecret");
    // KMS is granted only with a key, and only on that key.
    let grant = t.find("kms:GenerateDataKey").unwrap();
    let before = &t[..grant];
    let cond = before.rfind("- HasKmsKey").expect("the KMS grant is under HasKmsKey");
    assert!(before[cond..].contains("Statement:"), "the KMS grant is not inside the !If on HasKmsKey");
    let after = &t[grant..];
    let resource =
        after.lines().find(|l| l.trim_start().starts_with("Resource:")).expect("a Resource for the KMS grant");
    assert!(resource.contains(":key/${KmsKeyId}"), "the KMS grant is not limited to the key: {resource}");
}
