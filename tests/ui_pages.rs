//! The web view without a browser: every page through `App::handle` over the in-memory store
//! (and the embedded one, and a real `git daemon` for the lock listing), 10,000 states paged,
//! an encrypted state, the stage rule, the CSRF check, escaping, auth and bad input.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use gitstate::app::App;
use gitstate::auth::Auth;
use gitstate::backend::sealing::{Sealing, SealingSettings};
use gitstate::config::{AuthMode, Config};
use gitstate::storage::{Credentials, Storage};
use gitstate_testkit::fixtures::lock_info;
use gitstate_testkit::memory::MemoryStore;
use gitstate_testkit::races::request;
use serde_json::{json, Value};

/// An answer, whole.
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }
}

async fn send(app: &Arc<App>, req: http::Request<Bytes>) -> Answer {
    let r = app.handle(req).await;
    Answer {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: String::from_utf8_lossy(r.body()).into_owned(),
    }
}

async fn get(app: &Arc<App>, uri: &str) -> Answer {
    send(app, request("GET", uri, "")).await
}

fn memory_app(store: &Arc<MemoryStore>, sealing: Sealing) -> Arc<App> {
    let config = Config::default();
    let auth = Auth::from_config(&config).unwrap();
    Arc::new(App::new(config, auth, Arc::clone(store) as Arc<dyn Storage>, sealing))
}

/// A Terraform state with `outputs` (name → (value, sensitive)) and one resource whose `ami`
/// attribute is `ami` and whose sensitive `password` attribute is `password`.
fn tf_state(serial: u64, outputs: &[(&str, Value, bool)], ami: &str, password: &str) -> String {
    let outputs: serde_json::Map<String, Value> = outputs
        .iter()
        .map(|(name, value, sensitive)| {
            let mut o = json!({"value": value, "type": "string"});
            if *sensitive {
                o["sensitive"] = json!(true);
            }
            (name.to_string(), o)
        })
        .collect();
    let state = json!({
        "version": 4, "terraform_version": "1.0.3", "serial": serial, "lineage": "lin-ui",
        "outputs": outputs,
        "resources": [
            {"mode": "managed", "type": "aws_instance", "name": "web", "provider": "provider[\"registry.terraform.io/hashicorp/aws\"]",
             "instances": [{"schema_version": 1, "attributes": {"ami": ami, "password": password},
                            "sensitive_attributes": [[{"type": "get_attr", "value": "password"}]]}]},
            {"module": "module.net", "mode": "data", "type": "aws_vpc", "name": "main", "provider": "p",
             "instances": [{"index_key": "eu", "attributes": {}}, {"index_key": "us", "attributes": {}}]}
        ]
    });
    format!("{}\n", serde_json::to_string_pretty(&state).unwrap())
}

async fn write(app: &Arc<App>, path: &str, body: &str) {
    let a = send(app, request("POST", &format!("/state/{path}"), body)).await;
    assert_eq!(a.status, 200, "POST {path}: {}", a.body);
}

/// The hidden CSRF field of a page.
fn csrf_field(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("the form's csrf field") + "name=\"csrf\" value=\"".len();
    html[at..].split('"').next().unwrap().to_string()
}

const SCRIPT: &str = "<script>document.title='pwned'</script>";

#[tokio::test]
async fn every_page_renders_escaped_with_its_headers() {
    let store = Arc::new(MemoryStore::new());
    let app = memory_app(&store, Sealing::clear());
    let outputs = |n: &str| {
        vec![
            ("greeting", json!(n), false),
            ("evil", json!(SCRIPT), false),
            ("db_password", json!(format!("hunter2-{n}")), true),
        ]
    };
    write(&app, "envs/prod.tfstate", &tf_state(1, &outputs("one"), "ami-1", "pw-secret-1")).await;
    write(&app, "envs/prod.tfstate", &tf_state(2, &outputs("two"), "ami-2", "pw-secret-2")).await;
    write(&app, "other.tfstate", &tf_state(1, &outputs("x"), "ami-1", "pw-secret-x")).await;
    let a = send(&app, request("LOCK", "/state/envs/prod.tfstate", &lock_info("ui-lock-1"))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // A lock on a path that holds no state yet (a first apply locks before it writes).
    let a = send(&app, request("LOCK", "/state/new/first.tfstate", &lock_info("first-lock"))).await;
    assert_eq!(a.status, 200, "{}", a.body);

    let states = get(&app, "/ui/").await;
    assert_eq!(states.status, 200, "{}", states.body);
    assert_eq!(states.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(states.header("cache-control"), "private, no-store");
    let csp = states.header("content-security-policy");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("style-src 'self'") && !csp.contains("script-src"),
        "{csp}"
    );
    assert!(states.body.contains("href=\"./state/envs/prod.tfstate\""), "{}", states.body);
    assert!(states.body.contains("locked by ui-lock-1@test"), "{}", states.body);
    assert!(states.body.contains("href=\"./state/new/first.tfstate\""), "the lock without a state: {}", states.body);
    assert!(states.body.contains("href=\"./style.css\""));

    let page = get(&app, "/ui/state/envs/prod.tfstate").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let html = &page.body;
    assert!(
        html.contains("&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;") || html.contains("&lt;script&gt;"),
        "{html}"
    );
    assert!(!html.contains("<script"), "a state value reached the page as markup: {html}");
    assert!(html.contains("db_password") && !html.contains("hunter2"), "sensitive output: {html}");
    assert!(html.contains("ui-lock-1") && html.contains("Force-unlock"), "{html}");
    assert!(
        html.contains("aws_instance.web") && html.contains("module.net") && html.contains("[&quot;eu&quot;]"),
        "{html}"
    );
    assert!(html.contains("href=\"../../style.css\""), "{html}");
    assert!(page.header("set-cookie").starts_with("gitstate_csrf="), "{:?}", page.headers);
    assert!(page.header("set-cookie").contains("SameSite=Strict") && page.header("set-cookie").contains("HttpOnly"));
    // History: two versions, the newer with its diff link to the older.
    let history: Value = serde_json::from_str(&get(&app, "/history/envs/prod.tfstate").await.body).unwrap();
    let versions: Vec<&str> =
        history["versions"].as_array().unwrap().iter().map(|v| v["commit"].as_str().unwrap()).collect();
    assert_eq!(versions.len(), 2);
    let link = format!("href=\"../../diff/envs/prod.tfstate?from={}&amp;to={}\"", versions[1], versions[0]);
    assert!(html.contains(&link), "{link} in {html}");

    // History by pages of one: the newest links to its diff with the older one off the page,
    // and to the next page.
    let first = get(&app, "/ui/state/envs/prod.tfstate?limit=1").await.body;
    assert!(first.contains(&link), "{first}");
    let next = format!("href=\"../../state/envs/prod.tfstate?before={}\"", versions[0]);
    assert!(first.contains(&next), "{next} in {first}");
    let second = get(&app, &format!("/ui/state/envs/prod.tfstate?limit=1&before={}", versions[0])).await.body;
    assert!(second.contains(&versions[1][..10]) && second.contains("first version"), "{second}");
    assert!(!second.contains("Older versions"), "the last page: {second}");

    let diff = get(&app, &format!("/ui/diff/envs/prod.tfstate?from={}&to={}", versions[1], versions[0])).await;
    assert_eq!(diff.status, 200, "{}", diff.body);
    assert!(
        diff.body.contains("greeting")
            && diff.body.contains("&quot;one&quot;")
            && diff.body.contains("&quot;two&quot;")
    );
    assert!(diff.body.contains("db_password") && !diff.body.contains("hunter2"), "{}", diff.body);
    assert!(diff.body.contains("ami-2") && !diff.body.contains("pw-secret"), "{}", diff.body);
    assert!(!diff.body.contains("<script"), "{}", diff.body);

    let download = get(&app, "/ui/download/envs/prod.tfstate").await;
    let api = get(&app, "/state/envs/prod.tfstate").await;
    assert_eq!((download.status, &download.body), (200, &api.body), "the download is the state as the API serves it");
    assert_eq!(download.header("content-disposition"), "attachment; filename=\"prod.tfstate\"");
    assert_eq!(download.header("cache-control"), "private, no-store");

    let css = get(&app, "/ui/style.css").await;
    assert_eq!((css.status, css.header("content-type")), (200, "text/css; charset=utf-8"));
    let to_root = get(&app, "/ui?ref=main").await;
    assert_eq!((to_root.status, to_root.header("location")), (308, "ui/?ref=main"));

    // The JSON listing for scripts.
    let listing: Value = serde_json::from_str(&get(&app, "/states").await.body).unwrap();
    let paths: Vec<&str> = listing["states"].as_array().unwrap().iter().map(|s| s["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["envs/prod.tfstate", "other.tfstate"]);
    assert_eq!(listing["states"][0]["lock"]["id"], "ui-lock-1");
    assert_eq!(listing["other_locks"][0]["path"], "new/first.tfstate");
    assert!(!listing.to_string().contains("hunter2"));
}

#[tokio::test]
async fn the_web_view_is_told_from_a_stage() {
    let store = Arc::new(MemoryStore::new());
    let app = memory_app(&store, Sealing::clear());
    write(&app, "ui/x.tfstate", &tf_state(1, &[("o", json!("v"), false)], "a", "p")).await;
    write(&app, "x.tfstate", &tf_state(1, &[("o", json!("v"), false)], "a", "p")).await;
    for uri in ["/ui/state/x.tfstate", "/prod/ui/state/x.tfstate"] {
        let a = get(&app, uri).await;
        assert_eq!((a.status, a.header("content-type")), (200, "text/html; charset=utf-8"), "{uri}: {}", a.body);
        assert!(a.body.contains("<h1>x.tfstate</h1>"), "{uri}: {}", a.body);
    }
    for uri in ["/ui/", "/prod/ui/"] {
        let a = get(&app, uri).await;
        assert!(a.body.contains("href=\"./state/x.tfstate\""), "{uri}: {}", a.body);
    }
    assert_eq!(get(&app, "/prod/ui").await.header("location"), "ui/");
    // The API keeps its addresses under a stage, a state whose path starts with `ui` included.
    for (uri, path) in [
        ("/prod/state/x.tfstate", "x.tfstate"),
        ("/state/ui/x.tfstate", "ui/x.tfstate"),
        ("/prod/state/ui/x.tfstate", "ui/x.tfstate"),
    ] {
        let a = get(&app, uri).await;
        assert_eq!((a.status, a.header("content-type")), (200, "application/json"), "{uri}");
        assert_eq!(a.body, String::from_utf8(store.file("main", path).unwrap()).unwrap(), "{uri}");
    }
    let listing = get(&app, "/prod/states").await;
    assert_eq!(listing.header("content-type"), "application/json");
}

#[tokio::test]
async fn force_unlock_needs_the_csrf_token_and_the_lock_id() {
    let store = Arc::new(MemoryStore::new());
    let app = memory_app(&store, Sealing::clear());
    write(&app, "a.tfstate", &tf_state(1, &[("o", json!("v"), false)], "a", "p")).await;
    assert_eq!(send(&app, request("LOCK", "/state/a.tfstate", &lock_info("held-1"))).await.status, 200);
    let page = get(&app, "/ui/state/a.tfstate").await;
    let token = csrf_field(&page.body);
    let cookie = page.header("set-cookie").split(';').next().unwrap().to_string();
    assert_eq!(cookie, format!("gitstate_csrf={token}"));
    let post = |cookie: Option<String>, body: String| {
        let mut b = http::Request::builder()
            .method("POST")
            .uri("/ui/unlock/a.tfstate")
            .header("content-type", "application/x-www-form-urlencoded")
            .header("host", "gitstate.test");
        if let Some(c) = cookie {
            b = b.header("cookie", c);
        }
        b.body(Bytes::from(body)).unwrap()
    };
    // No cookie, another token, a wrong lock ID: the lock stays.
    let a = send(&app, post(None, format!("csrf={token}&lock_id=held-1"))).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("token"), "{}", a.body);
    let other = "A".repeat(43);
    let a = send(&app, post(Some(format!("gitstate_csrf={other}")), format!("csrf={token}&lock_id=held-1"))).await;
    assert_eq!(a.status, 403);
    let a = send(&app, post(Some(cookie.clone()), format!("csrf={token}&lock_id=someone-else"))).await;
    assert_eq!(a.status, 409, "{}", a.body);
    assert_eq!(get(&app, "/lock/a.tfstate").await.status, 200, "the lock is still held");
    // Cookie, token and the holder's ID: released, back to the state's page.
    let a = send(&app, post(Some(cookie), format!("csrf={token}&lock_id=held-1"))).await;
    assert_eq!((a.status, a.header("location")), (303, "../state/a.tfstate"), "{}", a.body);
    assert_eq!(get(&app, "/lock/a.tfstate").await.status, 404, "the lock is gone");
    assert!(get(&app, "/ui/state/a.tfstate").await.body.contains("Nobody holds"));
}

#[tokio::test]
async fn bad_input_and_auth_answer_as_the_api_does() {
    let store = Arc::new(MemoryStore::new());
    let app = memory_app(&store, Sealing::clear());
    for (uri, status) in [
        ("/ui/state/../x", 400),
        ("/ui/state/a?limit=0", 400),
        ("/ui/?limit=100000", 400),
        ("/ui/diff/a?from=x&to=y", 400),
        ("/ui/nowhere", 404),
        ("/states?limit=0", 400),
        ("/ui/diff/a?from=0123456789abcdef0123456789abcdef01234567&to=0123456789abcdef0123456789abcdef01234567", 404),
    ] {
        let a = get(&app, uri).await;
        assert_eq!(a.status, status, "{uri}: {}", a.body);
        if uri.starts_with("/ui") {
            assert_eq!(a.header("content-type"), "text/html; charset=utf-8", "{uri}");
            assert_eq!(a.header("cache-control"), "private, no-store", "{uri}");
        }
    }
    let a = get(&app, "/ui/state/nothing.tfstate").await;
    assert!(a.status == 200 && a.body.contains("No state is stored"), "{}", a.body);

    // Backend basic auth, as for /state/: a browser is asked for it.
    let config = Config {
        auth: AuthMode::Env,
        backend_credentials: Some(Credentials { username: "tf".into(), password: "pw".into() }),
        git_credentials: Some(Credentials { username: "git".into(), password: "token".into() }),
        ..Config::default()
    };
    let auth = Auth::from_config(&config).unwrap();
    let app = Arc::new(App::new(config, auth, Arc::clone(&store) as Arc<dyn Storage>, Sealing::clear()));
    for uri in ["/ui/", "/ui/style.css", "/prod/ui/state/a", "/states"] {
        let a = get(&app, uri).await;
        assert_eq!(a.status, 401, "{uri}");
        assert!(a.header("www-authenticate").starts_with("Basic"), "{uri}");
    }
    let mut req = request("GET", "/ui/", "");
    req.headers_mut().insert("authorization", "Basic dGY6cHc=".parse().unwrap());
    assert_eq!(send(&app, req).await.status, 200);
}

#[tokio::test]
async fn an_encrypted_state_is_marked_and_shown_decrypted() {
    use age::secrecy::ExposeSecret;
    let identity = age::x25519::Identity::generate();
    let settings = SealingSettings {
        age_recipients: vec![identity.to_public().to_string()],
        age_identities: Some(zeroize::Zeroizing::new(identity.to_string().expose_secret().to_string())),
        ..SealingSettings::default()
    };
    let store = Arc::new(MemoryStore::new());
    let app = memory_app(&store, Sealing::new(&settings, None).unwrap());
    write(&app, "sealed.tfstate", &tf_state(1, &[("visible", json!("in-the-clear-here"), false)], "a", "p")).await;
    let stored = store.file("main", "sealed.tfstate").unwrap();
    assert!(stored.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----"));
    let listing: Value = serde_json::from_str(&get(&app, "/states").await.body).unwrap();
    assert_eq!(listing["states"][0]["encrypted"], true);
    assert_eq!(listing["states"][0]["size"], stored.len());
    let states = get(&app, "/ui/").await;
    assert!(states.body.contains("badge sealed"), "{}", states.body);
    let page = get(&app, "/ui/state/sealed.tfstate").await;
    assert!(page.body.contains("yes, at rest") && page.body.contains("in-the-clear-here"), "{}", page.body);
    let download = get(&app, "/ui/download/sealed.tfstate").await;
    assert!(download.body.contains("in-the-clear-here"), "the download is decrypted");
}

/// A state body of `size` bytes or so, with a serial.
fn small_state(n: usize) -> Vec<u8> {
    format!("{{\"version\": 4, \"serial\": 1, \"lineage\": \"l-{n}\", \"outputs\": {{}}, \"resources\": []}}\n")
        .into_bytes()
}

#[tokio::test]
async fn ten_thousand_states_are_paged_and_pages_stay_small() {
    let store = Arc::new(MemoryStore::new());
    let app = memory_app(&store, Sealing::clear());
    let paths: Vec<String> = (0..10_000).map(|i| format!("team-{:02}/env-{i:05}/terraform.tfstate", i % 37)).collect();
    store.put_files("main", paths.iter().enumerate().map(|(i, p)| (p.clone(), small_state(i))), "Update 10,000 states");
    store.put(
        "locks/team-05/env-00005/terraform.tfstate",
        "team-05/env-00005/terraform.tfstate.lock",
        Some(lock_info("big-lock").as_bytes()),
        "Lock",
    );

    // JSON: every state once, in byte order, in pages of the limit.
    let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let uri = match &after {
            Some(a) => format!("/states?limit=1000&after={a}"),
            None => "/states?limit=1000".into(),
        };
        let page: Value = serde_json::from_str(&get(&app, &uri).await.body).unwrap();
        pages += 1;
        let states = page["states"].as_array().unwrap();
        assert!(states.len() <= 1000);
        seen.extend(states.iter().map(|s| s["path"].as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
        assert!(pages <= 10, "paging does not end");
    }
    let mut expected = paths.clone();
    expected.sort();
    assert_eq!(seen, expected);
    assert_eq!(pages, 10);
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 10_000);

    // The page: 100 states, the lock badge where it belongs, a link to the next page.
    let first = get(&app, "/ui/").await;
    assert_eq!(first.body.matches("<tr>").count(), 101, "100 rows and the head");
    assert!(first.body.contains("Next page"));
    let locked = get(&app, "/ui/?after=team-05/env-00004/terraform.tfstate&limit=1").await;
    assert!(locked.body.contains("locked by big-lock@test"), "{}", locked.body);
    assert!(first.body.len() < 100_000, "a page is bounded: {} bytes", first.body.len());
}

/// Page weights and render times (a figure for docs/web-view.md, not a timed test).
#[tokio::test]
async fn page_weights_and_render_times() {
    for n in [1usize, 100, 10_000] {
        let store = Arc::new(MemoryStore::new());
        let app = memory_app(&store, Sealing::clear());
        let paths = (0..n).map(|i| (format!("envs/env-{i:05}/terraform.tfstate"), small_state(i)));
        store.put_files("main", paths, "Update");
        let _ = get(&app, "/ui/").await;
        let started = Instant::now();
        let rounds = 20;
        let mut bytes = 0;
        for _ in 0..rounds {
            let page = get(&app, "/ui/").await;
            assert_eq!(page.status, 200);
            bytes = page.body.len();
        }
        let per = started.elapsed() / rounds;
        let state = get(&app, "/ui/state/envs/env-00000/terraform.tfstate").await;
        eprintln!(
            "states page, memory store, {n:>6} states: {bytes} bytes, {per:?} per render; state page {} bytes",
            state.body.len()
        );
        assert!(bytes > 0);
    }
}

/// The same figures over the embedded store (gix: the tree walk, blob sizes, one read per blob
/// to tell a sealed state), its repository made by `git fast-import` in one commit.
#[tokio::test]
async fn page_weights_and_render_times_embedded() {
    for n in [1usize, 100, 10_000] {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("data/repo.git");
        std::fs::create_dir_all(&repo).unwrap();
        gitstate_testkit::gitd::git(&repo, &["init", "--bare", "-q", "-b", "main"]);
        let mut input = b"commit refs/heads/main\ncommitter t <t@example> 1767225600 +0000\ndata 6\nUpdate\n".to_vec();
        for i in 0..n {
            let body = small_state(i);
            input.extend(format!("M 100644 inline envs/env-{i:05}/terraform.tfstate\ndata {}\n", body.len()).bytes());
            input.extend(body);
            input.push(b'\n');
        }
        gitstate_testkit::gitd::git_with_input(&repo, &["fast-import", "--quiet"], &input);
        let config =
            Config { data_dir: tmp.path().join("data"), cache_dir: tmp.path().join("cache"), ..Config::default() };
        let app = Arc::new(App::open(config).unwrap());
        let started = Instant::now();
        let cold = get(&app, "/ui/").await;
        let cold_time = started.elapsed();
        assert_eq!(cold.status, 200, "{}", cold.body);
        assert_eq!(cold.body.matches("<tr>").count(), n.min(100) + 1);
        let rounds = 20;
        let started = Instant::now();
        for _ in 0..rounds {
            assert_eq!(get(&app, "/ui/").await.body.len(), cold.body.len());
        }
        eprintln!(
            "states page, embedded store, {n:>6} states: {} bytes, first render {cold_time:?}, then {:?} per render",
            cold.body.len(),
            started.elapsed() / rounds
        );
    }
}

#[tokio::test]
async fn the_embedded_store_lists_nested_trees_by_page() {
    let tmp = tempfile::tempdir().unwrap();
    let config = Config { data_dir: tmp.path().join("data"), cache_dir: tmp.path().join("cache"), ..Config::default() };
    let app = Arc::new(App::open(config).unwrap());
    let mut paths: Vec<String> = Vec::new();
    for (i, p) in ["a", "a.b", "a-c/x", "a/b/c", "a/b.c", "a/bb", "b/a", "z", "a0/q", "m/n/o/p"].iter().enumerate() {
        let path = format!("{p}.tfstate");
        write(&app, &path, &tf_state(1 + i as u64, &[("o", json!(i), false)], "a", "p")).await;
        paths.push(path);
    }
    paths.sort();
    assert_eq!(send(&app, request("LOCK", "/state/a/bb.tfstate", &lock_info("embedded-lock"))).await.status, 200);
    assert_eq!(send(&app, request("LOCK", "/state/not/yet.tfstate", &lock_info("early"))).await.status, 200);
    let (mut seen, mut after) = (Vec::new(), None::<String>);
    for _ in 0..20 {
        let uri = match &after {
            Some(a) => format!("/states?limit=3&after={a}"),
            None => "/states?limit=3".into(),
        };
        let page: Value = serde_json::from_str(&get(&app, &uri).await.body).unwrap();
        for s in page["states"].as_array().unwrap() {
            let lock = s["lock"]["id"].as_str();
            assert_eq!(lock, (s["path"] == "a/bb.tfstate").then_some("embedded-lock"), "{s}");
            seen.push(s["path"].as_str().unwrap().to_string());
        }
        if after.is_none() {
            assert_eq!(page["other_locks"][0]["path"], "not/yet.tfstate", "{page}");
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, paths, "every state once, in byte order");
}

/// An App over the remote `url` with its cache at `cache`, built off the async workers (the
/// smart-HTTP client blocks, and may be neither built nor dropped on them).
async fn remote_app(url: &str, cache: std::path::PathBuf) -> Arc<App> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || gitstate_testkit::races::new_app(&url, cache)).await.unwrap()
}

/// Locks listed through a remote store's cache: a cold instance sees every lock of the branch.
/// `auth`: the `Authorization` header handed on to the git host.
async fn remote_lists_its_locks(url: &str, auth: Option<&str>) {
    let with = |mut r: http::Request<Bytes>| {
        if let Some(a) = auth {
            r.headers_mut().insert("authorization", a.parse().unwrap());
        }
        r
    };
    let tmp = tempfile::tempdir().unwrap();
    let app = remote_app(url, tmp.path().join("cache")).await;
    for path in ["a.tfstate", "dev/b.tfstate"] {
        let body = tf_state(1, &[("o", json!(1), false)], "a", "p");
        let a = send(&app, with(request("POST", &format!("/state/{path}"), &body))).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let lock = |uri: &str, id: &str| with(request("LOCK", uri, &lock_info(id)));
    assert_eq!(send(&app, lock("/state/dev/b.tfstate", "remote-lock")).await.status, 200);
    assert_eq!(send(&app, lock("/state/b.tfstate?ref=other", "other-branch")).await.status, 200);
    // Another instance with a cold cache sees the same.
    let cold = remote_app(url, tmp.path().join("cache-2")).await;
    let answer = send(&cold, with(request("GET", "/states", ""))).await;
    let listing: Value =
        serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("{e}: {} {}", answer.status, answer.body));
    let locks: Vec<(&str, Option<&str>)> = listing["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["path"].as_str().unwrap(), s["lock"]["id"].as_str()))
        .collect();
    assert_eq!(locks, [("a.tfstate", None), ("dev/b.tfstate", Some("remote-lock"))], "{listing}");
    assert_eq!(listing["other_locks"], json!([]), "another branch's lock is not this branch's");
    // That branch's own listing shows it (`locks/@/other/@/b.tfstate`; the branch holds no state).
    let other: Value =
        serde_json::from_str(&send(&cold, with(request("GET", "/states?ref=other", ""))).await.body).unwrap();
    assert_eq!(
        (other["branch"].as_str(), other["states"].as_array().map(Vec::len)),
        (Some("other"), Some(0)),
        "{other}"
    );
    assert_eq!(other["other_locks"][0]["path"], "b.tfstate", "{other}");
    assert_eq!(other["other_locks"][0]["lock"]["reference"], "refs/heads/locks/@/other/@/b.tfstate", "{other}");
    let page = send(&cold, with(request("GET", "/ui/state/dev/b.tfstate", ""))).await;
    assert!(page.body.contains("remote-lock"), "{}", page.body);
    // Released: gone from a warm instance's listing too.
    assert_eq!(send(&app, with(request("UNLOCK", "/state/dev/b.tfstate", ""))).await.status, 200);
    let listing: Value = serde_json::from_str(&send(&cold, with(request("GET", "/states", ""))).await.body).unwrap();
    assert_eq!(listing["states"][1]["lock"], Value::Null, "{listing}");
    tokio::task::spawn_blocking(move || drop((app, cold))).await.unwrap();
}

#[tokio::test]
async fn a_git_daemon_repository_lists_its_locks() {
    let daemon = gitstate_testkit::gitd::GitDaemon::start();
    remote_lists_its_locks(&daemon.create_repo("states.git"), None).await;
}

#[tokio::test]
async fn a_smart_http_repository_lists_its_locks_without_advertisements() {
    use base64::Engine as _;
    use gitstate_testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let pair = base64::engine::general_purpose::STANDARD.encode(format!("{DEFAULT_USER}:{DEFAULT_PASSWORD}"));
    let auth = format!("Basic {pair}");
    remote_lists_its_locks(&url, Some(&auth)).await;
    // Warm: the listing is one blind `ls-refs` for the branch and one for the locks, no advertisement.
    let tmp = tempfile::tempdir().unwrap();
    let app = remote_app(&url, tmp.path().join("cache")).await;
    let listing = || {
        let mut r = request("GET", "/states", "");
        r.headers_mut().insert("authorization", auth.parse().unwrap());
        r
    };
    assert_eq!(send(&app, listing()).await.status, 200);
    let before = httpd.access_log().len();
    assert_eq!(send(&app, listing()).await.status, 200);
    let log = httpd.access_log();
    let requests: Vec<String> = log[before..].iter().map(|e| format!("{} {}", e.method, e.target)).collect();
    assert_eq!(requests, ["POST /git/states.git/git-upload-pack", "POST /git/states.git/git-upload-pack"], "{log:#?}");
    tokio::task::spawn_blocking(move || drop(app)).await.unwrap();
}

/// A REST API (v1) event under stage `prod`, as API Gateway sends it through `ANY /{proxy+}`,
/// reaches the page (the stage is no part of the web view's path), with a `Secure` cookie.
#[tokio::test]
async fn a_page_through_an_api_gateway_event_under_a_stage() {
    let store = Arc::new(MemoryStore::new());
    let app = memory_app(&store, Sealing::clear());
    write(&app, "envs/prod/terraform.tfstate", &tf_state(1, &[("o", json!("v"), false)], "a", "p")).await;
    let text = std::fs::read_to_string(gitstate_testkit::repo_root().join("events/v1-get.json")).unwrap();
    let event = text
        .replace("\"/state/envs/prod/terraform.tfstate\"", "\"/ui/state/envs/prod/terraform.tfstate\"")
        .replace("\"/prod/state/envs/prod/terraform.tfstate\"", "\"/prod/ui/state/envs/prod/terraform.tfstate\"")
        .replace("\"state/envs/prod/terraform.tfstate\"", "\"ui/state/envs/prod/terraform.tfstate\"");
    assert_ne!(event, text);
    let request = lambda_http::request::from_str(&event).unwrap();
    let response = gitstate::lambda::handle_event(&app, request).await;
    let (parts, body) = response.into_parts();
    let body = match body {
        lambda_http::Body::Text(t) => t,
        other => panic!("{other:?}"),
    };
    assert_eq!(parts.status, 200, "{body}");
    assert_eq!(parts.headers["content-type"], "text/html; charset=utf-8");
    assert!(body.contains("<h1>envs/prod/terraform.tfstate</h1>"), "{body}");
    assert!(body.contains("href=\"../../../style.css\""), "links are relative to the page: {body}");
    let cookie = parts.headers["set-cookie"].to_str().unwrap();
    assert!(cookie.ends_with("; Secure"), "over HTTPS the cookie is Secure: {cookie}");
}

/// Every log line the process writes, from the first call on (one global subscriber per test binary).
fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    Arc::clone(LOGS.get_or_init(|| {
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let writer = move || Capture(Arc::clone(&sink));
        tracing_subscriber::fmt().with_writer(writer).with_ansi(false).init();
        logs
    }))
}

struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_force_unlock_is_logged_with_who_asked_and_no_password() {
    let logs = captured_logs();
    let config = Config {
        auth: AuthMode::Env,
        backend_credentials: Some(Credentials {
            username: "alice-operator".into(),
            password: "pw-never-logged".into(),
        }),
        git_credentials: Some(Credentials { username: "git".into(), password: "token".into() }),
        ..Config::default()
    };
    let store = Arc::new(MemoryStore::new());
    let auth = Auth::from_config(&config).unwrap();
    let app = Arc::new(App::new(config, auth, Arc::clone(&store) as Arc<dyn Storage>, Sealing::clear()));
    let basic = "Basic YWxpY2Utb3BlcmF0b3I6cHctbmV2ZXItbG9nZ2Vk"; // alice-operator:pw-never-logged
    let with = |mut r: http::Request<Bytes>| {
        r.headers_mut().insert("authorization", basic.parse().unwrap());
        r
    };
    assert_eq!(send(&app, with(request("LOCK", "/state/logged.tfstate", &lock_info("logged-lock")))).await.status, 200);
    let page = send(&app, with(request("GET", "/ui/state/logged.tfstate", ""))).await;
    let token = csrf_field(&page.body);
    let form = http::Request::builder()
        .method("POST")
        .uri("/ui/unlock/logged.tfstate")
        .header("authorization", basic)
        .header("cookie", format!("gitstate_csrf={token}"))
        .body(Bytes::from(format!("csrf={token}&lock_id=logged-lock")))
        .unwrap();
    assert_eq!(send(&app, form).await.status, 303);
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let line = text.lines().find(|l| l.contains("force-unlock from the web view")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("alice-operator") && line.contains("logged-lock"), "{line}");
    assert!(!text.contains("pw-never-logged") && !text.contains(basic), "a credential reached the log");
}
