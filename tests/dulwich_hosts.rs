//! Know your host (issue 24): gitstate against a git server that is not git's own, dulwich,
//! over git:// and smart HTTP. A host that does not speak protocol v2 over HTTP gets the
//! full handshake, not 503; an advertisement that made gix's parser panic (an empty
//! repository whose `symref=HEAD:refs/heads/main` names an unborn HEAD) is read; real
//! Terraform runs init, apply, plan and force-unlock on an empty repository and on one with
//! history. (Lock conflicts are not tested here: dulwich's receive-pack is no
//! compare-and-swap, which `gitstate doctor` reports, see tests/doctor.rs.)

use gitstate_testkit::dulwich::{Dialect, DulwichServer};
use gitstate_testkit::fixtures::{lock_info, state};
use gitstate_testkit::gitd::git_out;
use gitstate_testkit::serve::{http, Serve, ServeOpts};
use gitstate_testkit::terraform::{HttpBackend, TfWorkdir};

const P: &str = "envs/dulwich/terraform.tfstate";

#[test]
fn every_operation_works_on_dulwich_from_an_empty_repository() {
    for dialect in [Dialect::Git, Dialect::Http] {
        let host = DulwichServer::start(dialect);
        let url = host.create_repo("states.git");
        let serve = Serve::start(ServeOpts::new().repository(&url));
        let what = format!("{dialect:?}");
        // The first request of a fresh process on an empty repository: a look, then a lock.
        let got = http("GET", &serve.state_url(P), &[], None);
        assert_eq!(got.status, 204, "{what}: GET on an empty repository: {}\n{}", got.text(), serve.stderr_log());
        let got = http("LOCK", &serve.state_url(P), &[], Some(lock_info("d1").as_bytes()));
        assert_eq!(got.status, 200, "{what}: LOCK on an empty repository: {}\n{}", got.text(), serve.stderr_log());
        let got = http("POST", &format!("{}?ID=d1", serve.state_url(P)), &[], Some(state(1, "d").as_bytes()));
        assert_eq!(got.status, 200, "{what}: POST: {}\n{}", got.text(), serve.stderr_log());
        assert_eq!(http("UNLOCK", &serve.state_url(P), &[], Some(lock_info("d1").as_bytes())).status, 200);
        let got = http("GET", &serve.state_url(P), &[], None);
        assert_eq!((got.status, got.text()), (200, state(1, "d")), "{what}");
        let stored = git_out(&host.repo_dir("states.git"), &["show", &format!("main:{P}")]);
        assert_eq!(stored, state(1, "d").trim_end(), "{what}");
        // A fresh process on a repository with history.
        let fresh = Serve::start(ServeOpts::new().repository(&url));
        let got = http("GET", &fresh.state_url(P), &[], None);
        assert_eq!((got.status, got.text()), (200, state(1, "d")), "{what}: a fresh process");
        let log = format!("{}{}", serve.stderr_log(), fresh.stderr_log());
        assert!(!log.contains("panicked"), "{what}: a panic:\n{log}");
    }
}

#[test]
fn terraform_runs_on_dulwich() {
    for dialect in [Dialect::Git, Dialect::Http] {
        let host = DulwichServer::start(dialect);
        let url = host.create_repo("states.git");
        let serve = Serve::start(ServeOpts::new().repository(&url));
        let what = format!("{dialect:?}");
        let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(P)));
        tf.set_outputs(&[("x", "one")]);
        tf.init().assert_success();
        tf.apply().assert_success();
        tf.set_outputs(&[("x", "two")]);
        tf.apply().assert_success();
        tf.plan().assert_success();
        let stored = git_out(&host.repo_dir("states.git"), &["show", &format!("main:{P}")]);
        assert!(stored.contains("\"two\""), "{what}: {stored}");
        // A lock left behind, removed by force-unlock.
        assert_eq!(http("LOCK", &serve.state_url(P), &[], Some(lock_info("stuck").as_bytes())).status, 200);
        tf.force_unlock("stuck").assert_success();
        tf.set_outputs(&[("x", "three")]);
        tf.apply().assert_success();
        let stored = git_out(&host.repo_dir("states.git"), &["show", &format!("main:{P}")]);
        assert!(stored.contains("\"three\""), "{what}: {stored}");
    }
}
