//! OpenTofu's http client as it speaks on the wire (read from its
//! `internal/backend/remote-state/http/client.go`, 1.6 to 1.10; no registry reachable here
//! ships an OpenTofu binary), replayed through `gitstate serve` against a real smart-HTTP host:
//! extra `headers` (1.7+), `Authorization: Bearer <token>` without a username (1.8+), a
//! force-unlock that sends `{"ID": ...}` (1.10+), and client-side encrypted states (1.7+).

use base64::Engine as _;
use gitstate_testkit::fixtures::lock_info;
use gitstate_testkit::gitd::git_out;
use gitstate_testkit::httpd::GitHttpServer;
use gitstate_testkit::serve::{http, Serve, ServeOpts};

const P: &str = "envs/tofu/terraform.tfstate";
const TOKEN: &str = "glpat-0123456789abcdef";

/// What OpenTofu 1.8+ sends with `headers = { Authorization = "Bearer ..." }` and no username.
fn tofu_headers(token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Authorization", format!("Bearer {token}")),
        ("X-Team", "platform".into()),
        ("Content-Type", "application/json".into()),
    ]
}

fn call(method: &str, url: &str, token: &str, body: Option<&[u8]>) -> gitstate_testkit::serve::HttpResponse {
    let headers = tofu_headers(token);
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    http(method, url, &h, body)
}

/// An OpenTofu client-side encrypted state: `serial` and `lineage` in clear.
fn encrypted(serial: u64, lineage: &str, data: &str) -> String {
    let data = base64::engine::general_purpose::STANDARD.encode(data);
    format!(
        "{{\"serial\":{serial},\"lineage\":\"{lineage}\",\"meta\":{{\"key_provider.pbkdf2.k\":\"e30=\"}},\"encrypted_data\":\"{data}\",\"encryption_version\":\"v0\"}}"
    )
}

#[test]
fn a_bearer_token_reaches_the_git_host_as_basic_auth_with_the_fixed_username() {
    let httpd = GitHttpServer::start_with_users(&[("x-access-token", TOKEN)]);
    let url = httpd.create_repo("states.git");
    let serve = Serve::start(ServeOpts::new().repository(&url));
    let state_url = serve.state_url(P);
    assert_eq!(call("LOCK", &state_url, TOKEN, Some(lock_info("tofu-1").as_bytes())).status, 200);
    let got = call("POST", &format!("{state_url}?ID=tofu-1"), TOKEN, Some(encrypted(1, "L", "one").as_bytes()));
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(call("UNLOCK", &state_url, TOKEN, Some(lock_info("tofu-1").as_bytes())).status, 200);
    let got = call("GET", &state_url, TOKEN, None);
    assert_eq!((got.status, got.text()), (200, encrypted(1, "L", "one")));
    // The host saw the pair, user `x-access-token`.
    let users: Vec<Option<String>> = httpd.access_log().into_iter().map(|e| e.user).collect();
    assert!(users.iter().any(|u| u.as_deref() == Some("x-access-token")), "{users:?}");
    // A wrong token is the host's refusal: 401, and no token in the log.
    let got = call("GET", &state_url, "wrong-token", None);
    assert_eq!(got.status, 401, "{}", got.text());
    let log = serve.stderr_log();
    assert!(!log.contains(TOKEN) && !log.contains("wrong-token"), "a token reached the log:\n{log}");
    // Another fixed username by setting.
    let other = Serve::start(ServeOpts::new().repository(&url).env("GITSTATE_BEARER_USERNAME", "oauth2"));
    assert_eq!(call("GET", &other.state_url(P), TOKEN, None).status, 401, "the host knows no user oauth2");
}

#[test]
fn a_bearer_token_is_no_backend_auth_in_env_mode() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let serve = Serve::start(
        ServeOpts::new()
            .repository(&url)
            .env("GITSTATE_AUTH", "env")
            .env("GITSTATE_USERNAME", "tf")
            .env("GITSTATE_PASSWORD", "tf-pass")
            .env("GITSTATE_GIT_USERNAME", gitstate_testkit::httpd::DEFAULT_USER)
            .env("GITSTATE_GIT_PASSWORD", gitstate_testkit::httpd::DEFAULT_PASSWORD),
    );
    let got = call("GET", &serve.state_url(P), TOKEN, None);
    assert_eq!(got.status, 401, "{}", got.text());
    assert!(got.header("www-authenticate").is_some_and(|v| v.starts_with("Basic")), "{:?}", got.headers);
}

#[test]
fn opentofu_force_unlock_sends_the_id() {
    let httpd = GitHttpServer::start_with_users(&[("x-access-token", TOKEN)]);
    let url = httpd.create_repo("states.git");
    let serve = Serve::start(ServeOpts::new().repository(&url));
    let lock_url = serve.lock_url(P);
    assert_eq!(call("LOCK", &lock_url, TOKEN, Some(lock_info("held-by-a").as_bytes())).status, 200);
    // `tofu force-unlock other-id`: refused with the holder.
    let got = call("UNLOCK", &lock_url, TOKEN, Some(br#"{"ID":"other-id"}"#));
    assert_eq!(got.status, 409, "{}", got.text());
    assert!(got.text().contains("held-by-a"), "{}", got.text());
    // `tofu force-unlock held-by-a`: released.
    assert_eq!(call("UNLOCK", &lock_url, TOKEN, Some(br#"{"ID":"held-by-a"}"#)).status, 200);
    assert_eq!(call("GET", &lock_url, TOKEN, None).status, 404);
}

#[test]
fn client_side_encrypted_states_are_guarded_listed_and_compared() {
    let httpd = GitHttpServer::start_with_users(&[("x-access-token", TOKEN)]);
    let url = httpd.create_repo("states.git");
    let repo = httpd.repo_dir("states.git");
    let serve = Serve::start(ServeOpts::new().repository(&url));
    let state_url = serve.state_url(P);
    for serial in 1..=2 {
        let got = call("POST", &state_url, TOKEN, Some(encrypted(serial, "L", &format!("v{serial}")).as_bytes()));
        assert_eq!(got.status, 200, "{}", got.text());
    }
    // Stored byte for byte.
    assert_eq!(git_out(&repo, &["show", &format!("main:{P}")]), encrypted(2, "L", "v2"));
    // Guarded by the clear serial and lineage.
    for (what, body) in [
        ("an older serial", encrypted(1, "L", "old")),
        ("the same serial, other content", encrypted(2, "L", "other")),
        ("another lineage", encrypted(3, "M", "x")),
    ] {
        let got = call("POST", &state_url, TOKEN, Some(body.as_bytes()));
        assert_eq!(got.status, 409, "{what}: {}", got.text());
    }
    // Listed with their serial and lineage.
    let history = call("GET", &format!("{}/history/{P}", serve.base_url()), TOKEN, None);
    assert_eq!(history.status, 200, "{}", history.text());
    let versions = history.json()["versions"].as_array().unwrap().clone();
    assert_eq!(versions.len(), 2, "{}", history.text());
    assert_eq!(versions[0]["serial"], 2);
    assert_eq!(versions[0]["lineage"], "L");
    // Compared as far as the clear fields go, saying the client encrypted the rest.
    let (to, from) = (versions[0]["commit"].as_str().unwrap(), versions[1]["commit"].as_str().unwrap());
    let diff = call("GET", &format!("{}/diff/{P}?from={from}&to={to}", serve.base_url()), TOKEN, None);
    assert_eq!(diff.status, 200, "{}", diff.text());
    let diff = diff.json();
    assert_eq!(diff["encrypted_by_client"], true, "{diff}");
    assert_eq!(diff["from"]["serial"], 1);
    assert_eq!(diff["to"]["serial"], 2);
}
