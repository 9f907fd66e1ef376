//! Benchmark (figures, not a test): median latency of GET, LOCK, POST, UNLOCK and a
//! full apply cycle through `App::handle` against a local `git daemon`, next to the
//! git CLI doing the same git work, with cold and warm caches and several history sizes;
//! then the tables of issues 13 and 22: requests to a smart-HTTP host per operation and per
//! real `terraform apply`/`plan` of each Terraform version (lighttpd's access log), latency
//! through a latency-injecting proxy next to the git CLI over git:// and over HTTPS (lighttpd
//! with `mod_openssl`; requests per cycle and new TLS handshakes while warm), states per
//! repository, 1 to 256 concurrent writers at 0 and 20 ms each way, cold start (a new App, a
//! fresh `gitstate serve` process, a fresh Lambda instance under the emulator, the binary's
//! size), and the peak memory of `gitstate serve` with large states. Every target is printed
//! beside its figure; nothing is asserted on time.
//!
//! Run: `cargo build --release && cargo run --release --example bench [-- ROUNDS] [--tiny]
//! [--table=N]` (needs `git` for the daemon and the comparison, lighttpd, openssl and Terraform
//! for the request counts and HTTPS, cargo-lambda for the Lambda row; a table whose tools are
//! missing says so and is skipped; gitstate itself never runs git). `--tiny` shrinks every
//! table (100 states instead of 10,000, writers up to 4, a 1 MB state instead of 5 and 50 MB)
//! so that `tests/bench_runs.rs` can run it in a debug build; `--table=N` runs the N-th table
//! (from 1, in the order of [`HEADINGS`]) only.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gitstate::app::App;
use gitstate_testkit::gitd::{git, git_out, git_with_input, GitDaemon};
use gitstate_testkit::latency::LatencyProxy;
use gitstate_testkit::races;

/// The heading printed above each table (tests/bench_runs.rs checks that each one appears).
const HEADINGS: [&str; 11] = [
    "== latency by history size (git daemon, medians) ==",
    "== history pages ==",
    "== encryption ==",
    "== 5 MB state in this process ==",
    "== requests to the git host per operation (lighttpd access log) ==",
    "== latency with an added round trip (latency proxy in front of git daemon) ==",
    "== latency over HTTPS (latency proxy in front of lighttpd with mod_openssl) ==",
    "== states per repository ==",
    "== concurrent writers on one repository ==",
    "== cold start ==",
    "== memory of gitstate serve ==",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tiny = args.iter().any(|a| a == "--tiny");
    let rounds: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(20).max(1);
    install_event_counter();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let daemon = GitDaemon::start();
    let started = Instant::now();
    println!(
        "gitstate benchmark: {rounds} rounds per figure{}, {} build, git daemon on 127.0.0.1:{}",
        if tiny { ", tiny sizes" } else { "" },
        if cfg!(debug_assertions) { "debug" } else { "release" },
        daemon.port()
    );
    // `--table=N` (N from 1) runs one table only.
    let only: Option<usize> = args.iter().find_map(|a| a.strip_prefix("--table=")?.parse().ok());
    for (i, heading) in HEADINGS.iter().enumerate() {
        if only.is_some_and(|n| n != i + 1) {
            continue;
        }
        println!("{heading} [{:.0} s]", started.elapsed().as_secs_f64());
        match i {
            0 => latency_by_history(&rt, &daemon, tmp.path(), rounds),
            1 => history(&rt, &daemon, tmp.path()),
            2 => encryption(&rt, &daemon, tmp.path(), rounds),
            3 => {
                let url = repo_with_history(&daemon, "big.git", 10);
                let (before, after, took) = rt.block_on(big_state(&url, tmp.path(), 5));
                println!(
                    "5 MB state POST + GET: {took:.1} ms; peak RSS of this process {before:.1} MiB before, {after:.1} MiB after (+{:.1} MiB)",
                    after - before
                );
            }
            4 => requests_per_operation(),
            5 => latency(&rt, &daemon, tmp.path(), rounds, tiny),
            6 => tls_latency(&rt, tmp.path(), rounds, tiny),
            7 => states_per_repository(&rt, &daemon, tmp.path(), rounds, tiny),
            8 => concurrency(&rt, tmp.path(), rounds, tiny),
            9 => cold_start(&rt, &daemon, tmp.path(), rounds, tiny),
            _ => memory(&daemon, tiny),
        }
    }
    println!("benchmark done [{:.0} s]", started.elapsed().as_secs_f64());
}

/// Latency of each operation by history size, warm and cold, beside the git CLI.
fn latency_by_history(rt: &tokio::runtime::Runtime, daemon: &GitDaemon, tmp: &Path, rounds: usize) {
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "scenario", "GET ms", "LOCK ms", "POST ms", "UNLOCK ms", "cycle ms", "git CLI ms"
    );
    for history in [10usize, 1_000, 10_000] {
        let name = format!("h{history}.git");
        let url = repo_with_history(daemon, &name, history);
        for cold in [false, true] {
            let figures = run(rt, &url, tmp, rounds, cold);
            let cli = git_cli_cycle(&url, tmp, rounds.min(10));
            println!(
                "{:<28} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>12.2}",
                format!("{history} commits, {}", if cold { "cold cache" } else { "warm cache" }),
                figures[0],
                figures[1],
                figures[2],
                figures[3],
                figures[4],
                cli
            );
        }
    }
}

/// Medians (ms) of GET, LOCK, POST, UNLOCK and a whole LOCK+GET+POST+UNLOCK cycle.
fn run(rt: &tokio::runtime::Runtime, url: &str, tmp: &Path, rounds: usize, cold: bool) -> [f64; 5] {
    run_samples(rt, url, tmp, rounds, cold).map(|mut s| median(&mut s))
}

/// Every sample (ms) of GET, LOCK, POST, UNLOCK and a whole LOCK+GET+POST+UNLOCK cycle, `rounds`
/// cycles. Warm: one App, after one cycle not counted (the App's first look fills its cache);
/// cold: a new App with an empty cache directory for every cycle.
fn run_samples(rt: &tokio::runtime::Runtime, url: &str, tmp: &Path, rounds: usize, cold: bool) -> [Vec<f64>; 5] {
    run_samples_as(rt, url, tmp, rounds, cold, None, &mut || {})
}

/// [`run_samples`] with an `Authorization` header on every request (handed on to the git host);
/// `measuring` is called once, before the first cycle that counts (to read counters). Apps are
/// opened and dropped outside the runtime (over HTTPS an App holds a blocking HTTP client).
fn run_samples_as(
    rt: &tokio::runtime::Runtime,
    url: &str,
    tmp: &Path,
    rounds: usize,
    cold: bool,
    auth: Option<&str>,
    measuring: &mut dyn FnMut(),
) -> [Vec<f64>; 5] {
    let mut samples: [Vec<f64>; 5] = Default::default();
    let mut app = new_app(url, tmp, 0);
    let path = "/state/bench/terraform.tfstate";
    let warmup = usize::from(!cold);
    for i in 0..rounds + warmup {
        if cold {
            app = new_app(url, tmp, i + 1);
        }
        if i == warmup {
            measuring();
        }
        let id = format!("bench-{i}-{}", fastrand::u64(..));
        let lock = format!(
            r#"{{"ID":"{id}","Operation":"OperationTypeApply","Who":"bench","Version":"1.0.3","Created":"","Path":"","Info":""}}"#
        );
        let state = format!(
            "{{\n  \"version\": 4,\n  \"serial\": {},\n  \"lineage\": \"bench\",\n  \"outputs\": {{}}\n}}\n",
            i + 1_000_000 * (fastrand::u32(..) as usize)
        );
        let mut took = [0.0; 5];
        let cycle = Instant::now();
        let t = Instant::now();
        assert_eq!(rt.block_on(call_as(&app, "LOCK", path, &lock, auth)), 200);
        took[1] = ms(t.elapsed());
        let t = Instant::now();
        let s = rt.block_on(call_as(&app, "GET", path, "", auth));
        assert!(s == 200 || s == 204);
        took[0] = ms(t.elapsed());
        let t = Instant::now();
        let s = rt.block_on(call_as(&app, "POST", &format!("{path}?ID={id}&force=true"), &state, auth));
        assert_eq!(s, 200);
        took[2] = ms(t.elapsed());
        let t = Instant::now();
        assert_eq!(rt.block_on(call_as(&app, "UNLOCK", path, &lock, auth)), 200);
        took[3] = ms(t.elapsed());
        took[4] = ms(cycle.elapsed());
        if i >= warmup {
            for (s, t) in samples.iter_mut().zip(took) {
                s.push(t);
            }
        }
    }
    samples
}

/// One page of `/history/` (50 versions) at 10 / 1,000 / 10,000 commits that all touch the
/// state: cold (a new process, empty cache), warm (the same page again), and page 3 after
/// pages 1 and 2; connections to the git daemon counted from its log.
fn history(rt: &tokio::runtime::Runtime, daemon: &GitDaemon, tmp: &Path) {
    println!(
        "{:<28} {:>12} {:>8} {:>12} {:>8} {:>12} {:>8}",
        "history page (50 versions)", "cold ms", "conns", "warm ms", "conns", "page 3 ms", "conns"
    );
    for commits in [10usize, 1_000, 10_000] {
        let name = format!("hist{commits}.git");
        let dir = daemon.repo_dir(&name);
        git(daemon.base_dir(), &["init", "-q", "--bare", "-b", "main", dir.to_str().unwrap()]);
        let mut script = String::new();
        for i in 1..=commits {
            let content = format!("{{\"version\": 4, \"serial\": {i}, \"lineage\": \"h\"}}\n");
            let message = format!("Update h.tfstate\n\nSerial: {i}\nLineage: h\n");
            script.push_str(&format!(
                "commit refs/heads/main\ncommitter b <b@b> {} +0000\ndata {}\n{message}M 100644 inline h.tfstate\ndata {}\n{content}\n",
                1_700_000_000 + i,
                message.len(),
                content.len(),
            ));
        }
        git_with_input(&dir, &["fast-import", "--quiet"], script.as_bytes());
        let url = daemon.url(&name);
        let app = new_app(&url, tmp, commits);
        let connections = || daemon.log().matches("Connection from").count();
        let page = |uri: String| {
            let before = connections();
            let t = Instant::now();
            let (status, body) = rt.block_on(races::call(&app, "GET", &uri, ""));
            assert_eq!(status, 200, "{uri}: {body}");
            let json: serde_json::Value = serde_json::from_str(&body).expect("a history page");
            (ms(t.elapsed()), connections() - before, json["next"].as_str().map(str::to_owned))
        };
        let (cold, cold_conns, next) = page("/history/h.tfstate".into());
        let (warm, warm_conns, _) = page("/history/h.tfstate".into());
        let third = next.map(|n| {
            let (_, _, next) = page(format!("/history/h.tfstate?before={n}"));
            next.map(|n| page(format!("/history/h.tfstate?before={n}")))
        });
        let (p3, p3_conns) = match third.flatten() {
            Some((t, c, _)) => (format!("{t:.2}"), c.to_string()),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<28} {cold:>12.2} {cold_conns:>8} {warm:>12.2} {warm_conns:>8} {p3:>12} {p3_conns:>8}",
            format!("{commits} commits")
        );
    }
}

/// Median POST and GET of a ~200 KB state (warm cache) in clear, with age and with KMS (against
/// moto, when `GITSTATE_MOTO_SERVER` or `.venv` has it), and the cost over clear.
fn encryption(rt: &tokio::runtime::Runtime, daemon: &GitDaemon, tmp: &Path, rounds: usize) {
    let identity = age::x25519::Identity::generate();
    let secret = {
        use age::secrecy::ExposeSecret;
        identity.to_string().expose_secret().to_string()
    };
    let recipient = identity.to_public().to_string();
    let mut modes: Vec<(&str, Vec<(String, String)>)> = vec![
        ("clear", vec![]),
        ("age", vec![("GITSTATE_AGE_RECIPIENTS".into(), recipient), ("GITSTATE_AGE_IDENTITIES".into(), secret)]),
    ];
    let moto = std::panic::catch_unwind(gitstate_testkit::moto::Moto::start).ok();
    if let Some(moto) = &moto {
        let key = moto.create_kms_key("bench");
        let mut env = moto.aws_env();
        env.push(("GITSTATE_KMS_KEY_ID".into(), key));
        modes.push(("KMS (moto)", env));
    } else {
        println!("encryption: KMS skipped in this benchmark (no moto_server; `bash scripts/test.sh` installs it)");
    }
    println!(
        "{:<28} {:>10} {:>10} {:>14} {:>14}",
        "encryption, 200 KB state", "POST ms", "GET ms", "POST +ms", "GET +ms"
    );
    let mut clear = (0.0, 0.0);
    for (name, env) in modes {
        let url = repo_with_history(daemon, &format!("enc-{}.git", name.split(' ').next().unwrap_or(name)), 10);
        let lookup = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        for (k, v) in &env {
            if k.starts_with("AWS_") {
                std::env::set_var(k, v);
            }
        }
        let mut config = gitstate::config::Config::from_lookup(lookup).expect("bench settings");
        config.repository = Some(gitstate::storage::RepoUrl::parse(&url).unwrap());
        config.cache_dir = tmp.join(format!("enc-cache-{}", fastrand::u64(..)));
        let app = Arc::new(rt.block_on(App::load(config)).expect("open the app"));
        let (post, get) = rt.block_on(post_get(&app, rounds));
        if name == "clear" {
            clear = (post, get);
        }
        println!("{name:<28} {post:>10.2} {get:>10.2} {:>14.2} {:>14.2}", post - clear.0, get - clear.1);
    }
}

/// Medians (ms) of POST and GET of a ~200 KB state, each POST a new serial.
async fn post_get(app: &Arc<App>, rounds: usize) -> (f64, f64) {
    let mut body = String::new();
    while body.len() < 200 << 10 {
        body.push_str(&format!("    {{\"name\": \"r{}\", \"value\": \"{:032x}\"}},\n", body.len(), fastrand::u128(..)));
    }
    let (mut posts, mut gets) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let state = format!("{{\n  \"version\": 4,\n  \"serial\": {},\n  \"lineage\": \"bench\",\n  \"resources\": [\n{body}    {{}}\n  ]\n}}\n", i + 1);
        let t = Instant::now();
        assert_eq!(call(app, "POST", "/state/enc.tfstate", &state).await, 200);
        posts.push(ms(t.elapsed()));
        let t = Instant::now();
        assert_eq!(call(app, "GET", "/state/enc.tfstate", "").await, 200);
        gets.push(ms(t.elapsed()));
    }
    (median(&mut posts), median(&mut gets))
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Write and read back a state of `mib` MiB; returns (peak RSS before, after) in MiB.
async fn big_state(url: &str, tmp: &Path, mib: usize) -> (f64, f64, f64) {
    let app = new_app(url, tmp, 999_999);
    let mut state =
        String::from("{\n  \"version\": 4,\n  \"serial\": 1,\n  \"lineage\": \"big\",\n  \"resources\": [\n");
    let mut i = 0;
    while state.len() < mib << 20 {
        state.push_str(&format!("    {{\"name\": \"r{i}\", \"value\": \"{:032x}\"}},\n", fastrand::u128(..)));
        i += 1;
    }
    state.push_str("    {}\n  ]\n}\n");
    let before = peak_rss_mib();
    let t = Instant::now();
    assert_eq!(call(&app, "POST", "/state/big.tfstate?force=true", &state).await, 200);
    assert_eq!(call(&app, "GET", "/state/big.tfstate", "").await, 200);
    (before, peak_rss_mib(), ms(t.elapsed()))
}

/// A new App over `url` with a cache directory of its own (fresh for every `n`).
fn new_app(url: &str, tmp: &Path, n: usize) -> Arc<App> {
    races::new_app(url, tmp.join(format!("cache-{}-{n}", fastrand::u64(..))))
}

/// One request through `App::handle` as Terraform sends it; the status.
async fn call(app: &Arc<App>, method: &str, uri: &str, body: &str) -> u16 {
    races::call(app, method, uri, body).await.0
}

/// [`call`] with an `Authorization` header, if any.
async fn call_as(app: &Arc<App>, method: &str, uri: &str, body: &str, auth: Option<&str>) -> u16 {
    let mut request = races::request(method, uri, body);
    if let Some(auth) = auth {
        request.headers_mut().insert(http::header::AUTHORIZATION, auth.parse().expect("a header value"));
    }
    app.handle(request).await.status().as_u16()
}

/// The same git work with the CLI: shallow fetch, commit, push; create and delete a lock branch.
fn git_cli_cycle(url: &str, tmp: &Path, rounds: usize) -> f64 {
    median(&mut git_cli_samples(url, tmp, rounds))
}

/// [`git_cli_cycle`]'s every sample (ms).
fn git_cli_samples(url: &str, tmp: &Path, rounds: usize) -> Vec<f64> {
    let work = tmp.join(format!("cli-{}", fastrand::u64(..)));
    git(tmp, &["clone", "-q", "--depth", "1", url, work.to_str().unwrap()]);
    let mut samples = Vec::new();
    for i in 0..rounds {
        let t = Instant::now();
        git(&work, &["push", "-q", "origin", "HEAD:refs/heads/locks/bench/terraform.tfstate"]);
        git(&work, &["fetch", "-q", "--depth", "1", "origin", "main"]);
        git(&work, &["reset", "-q", "--hard", "FETCH_HEAD"]);
        std::fs::create_dir_all(work.join("bench")).unwrap();
        // Unique content: every call commits something, even with one round per call.
        std::fs::write(
            work.join("bench/cli.tfstate"),
            format!("{{\"serial\": {i}, \"run\": {}}}\n", fastrand::u64(..)),
        )
        .unwrap();
        git(&work, &["add", "bench/cli.tfstate"]);
        git(&work, &["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "Update bench/cli.tfstate"]);
        git(&work, &["push", "-q", "origin", "HEAD:main"]);
        git(&work, &["push", "-q", "origin", ":refs/heads/locks/bench/terraform.tfstate"]);
        samples.push(ms(t.elapsed()));
    }
    samples
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// A bare repository `name` of `daemon` whose `main` has `commits` commits, built with
/// fast-import; returns its URL. (Not `GitDaemon::create_repo`: no `receive.fsckObjects`,
/// so that the figures stay comparable with earlier runs.)
fn repo_with_history(daemon: &GitDaemon, name: &str, commits: usize) -> String {
    let dir = daemon.repo_dir(name);
    git(daemon.base_dir(), &["init", "-q", "--bare", "-b", "main", dir.to_str().unwrap()]);
    let mut script = String::new();
    for i in 0..commits {
        let content = format!("{{\"history\": {i}}}\n");
        script.push_str(&format!(
            "commit refs/heads/main\ncommitter b <b@b> {} +0000\ndata 7\nhistory\nM 100644 inline history/{}.json\ndata {}\n{}\n",
            1_700_000_000 + i,
            i % 100,
            content.len(),
            content
        ));
    }
    git_with_input(&dir, &["fast-import", "--quiet"], script.as_bytes());
    daemon.url(name)
}

// ---------------------------------------------------------------------------------------------
// Issue 13's tables
// ---------------------------------------------------------------------------------------------

/// p-th percentile (0..=100) of `v` (nearest rank), 0 when empty.
fn percentile(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return 0.0;
    }
    let rank = (p * v.len()).div_ceil(100).max(1);
    v[rank - 1]
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// `pushes` of every `compare-and-swap applied` event and how many `lost the race` events
/// gitstate logged: the attempts per write come from the server code's own events.
static APPLIED: Mutex<Vec<u64>> = Mutex::new(Vec::new());
static LOST_RACES: AtomicUsize = AtomicUsize::new(0);

struct EventCounter;

#[derive(Default)]
struct EventFields {
    message: String,
    pushes: Option<u64>,
}

impl tracing::field::Visit for EventFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        }
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "pushes" {
            self.pushes = Some(value);
        }
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.record_u64(field, value.max(0) as u64);
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for EventCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = EventFields::default();
        event.record(&mut f);
        match f.message.as_str() {
            "compare-and-swap applied" => APPLIED.lock().unwrap().push(f.pushes.unwrap_or(0)),
            "lost the race; looking again" => {
                LOST_RACES.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

/// The event counter, plus gitstate's errors on stderr (`GITSTATE_LOG` for more).
fn install_event_counter() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("GITSTATE_LOG").unwrap_or_else(|_| "error".into());
    tracing_subscriber::registry()
        .with(EventCounter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter))
        .init();
}

// --- 1. requests per operation ---------------------------------------------------------------

fn basic_auth() -> String {
    use base64::Engine as _;
    use gitstate_testkit::httpd::{DEFAULT_PASSWORD, DEFAULT_USER};
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{DEFAULT_USER}:{DEFAULT_PASSWORD}")))
}

/// `GET info/refs, POST git-upload-pack`: what the git host answered, in short.
fn describe(reqs: &[gitstate_testkit::httpd::AccessEntry]) -> String {
    reqs.iter()
        .map(|r| {
            let what = r.target.split_once(".git/").map_or(r.target.as_str(), |(_, w)| w);
            let what = what.split('?').next().unwrap_or(what);
            format!("{} {what}{}", r.method, if r.status >= 300 { format!(" ({})", r.status) } else { String::new() })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Requests the git host (lighttpd + git http-backend) answered per operation through
/// `gitstate serve`, warm and cold, and per real `terraform apply` / `plan`.
fn requests_per_operation() {
    use gitstate_testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
    use gitstate_testkit::serve::{http, Serve, ServeOpts};
    use gitstate_testkit::terraform::{terraform_bin, terraform_version_bin, HttpBackend, TfWorkdir};

    if std::panic::catch_unwind(gitstate_testkit::httpd::lighttpd_bin).is_err() {
        println!("skipped: lighttpd not found (`bash scripts/test.sh` installs it)");
        return;
    }
    let terraform = std::panic::catch_unwind(terraform_bin).is_ok();
    const STATE: &str = "envs/bench/terraform.tfstate";
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("counts.git");
    let auth = basic_auth();
    let h = [("Authorization", auth.as_str())];
    // One flush of lighttpd's log per row: each count starts where the previous one ended.
    let seen = std::cell::Cell::new(httpd.access_log().len());
    let count = |f: &mut dyn FnMut()| {
        f();
        let log = httpd.access_log();
        let new = log[seen.get()..].to_vec();
        seen.set(log.len());
        new
    };
    let tf_for = |serve: &Serve| {
        let mut backend = HttpBackend::lock_unlock(serve.state_url(STATE));
        backend.username = Some(DEFAULT_USER.into());
        backend.password = Some(DEFAULT_PASSWORD.into());
        TfWorkdir::new(backend)
    };
    println!("{:<52} {:>8} {:>9} {:>8} {:>7}  requests", "operation", "requests", "info/refs", "target", "");
    let row = |name: &str, reqs: &[gitstate_testkit::httpd::AccessEntry], target: Option<usize>| {
        let adverts = reqs.iter().filter(|r| r.target.contains("info/refs")).count();
        let (t, m) = match target {
            Some(t) => (format!("<= {t}"), met(reqs.len() <= t)),
            None => ("-".to_string(), ""),
        };
        println!("{name:<52} {:>8} {adverts:>9} {t:>8} {m:>7}  {}", reqs.len(), describe(reqs));
    };
    let serial = std::cell::Cell::new(100u64);
    let next_state = || {
        serial.set(serial.get() + 1);
        gitstate_testkit::fixtures::state_with_lineage("bench", serial.get(), "x")
    };
    let serve = Serve::start(ServeOpts::new().repository(&url));
    if terraform {
        let mut tf = tf_for(&serve);
        tf.set_outputs(&[("x", "one")]);
        let reqs = count(&mut || {
            tf.init().assert_success();
            tf.apply().assert_success();
        });
        row("terraform init + first apply (new serve, empty cache)", &reqs, None);
        tf.set_outputs(&[("x", "two")]);
        let reqs = count(&mut || {
            tf.apply().assert_success();
        });
        row("terraform apply with a change, warm", &reqs, Some(7));
        let reqs = count(&mut || {
            tf.plan();
        });
        row("terraform plan, warm", &reqs, Some(5));
        // Newer Terraform reads the state before it locks: one look more per apply and plan.
        for version in ["1.6.6", "1.15.5"] {
            let Ok(bin) = std::panic::catch_unwind(|| terraform_version_bin(version)) else {
                println!("terraform {version} rows skipped: not installed (`bash scripts/test.sh` installs it)");
                continue;
            };
            // A state of its own: an older Terraform refuses a state a newer one wrote.
            let mut backend = HttpBackend::lock_unlock(serve.state_url(&format!("{STATE}.{version}")));
            backend.username = Some(DEFAULT_USER.into());
            backend.password = Some(DEFAULT_PASSWORD.into());
            let mut tf = TfWorkdir::with_terraform(backend, bin);
            tf.set_outputs(&[("x", "one")]);
            count(&mut || {
                tf.init().assert_success();
                tf.apply().assert_success();
            });
            tf.set_outputs(&[("x", "two")]);
            let reqs = count(&mut || {
                tf.apply().assert_success();
            });
            row(&format!("terraform {version} apply with a change, warm"), &reqs, None);
            let reqs = count(&mut || {
                tf.plan();
            });
            row(&format!("terraform {version} plan, warm"), &reqs, None);
        }
    } else {
        println!("terraform rows skipped: Terraform 1.0.3 not found (`bash scripts/test.sh` installs it)");
        // Warm the server up as an apply would.
        count(&mut || {
            assert_eq!(http("POST", &serve.state_url(STATE), &h, Some(next_state().as_bytes())).status, 200);
        });
    }
    let lock = gitstate_testkit::fixtures::lock_info("bench-warm");
    let op = |serve: &Serve, method: &str, query: &str, body: Option<&[u8]>| {
        let got = http(method, &format!("{}{query}", serve.state_url(STATE)), &h, body);
        assert!(got.status == 200 || got.status == 204, "{method} {STATE}: {} {}", got.status, got.text());
    };
    let reqs = count(&mut || op(&serve, "LOCK", "", Some(lock.as_bytes())));
    row("LOCK, warm", &reqs, Some(2));
    let reqs = count(&mut || op(&serve, "GET", "", None));
    row("GET of an unchanged state, warm", &reqs, Some(1));
    let reqs = count(&mut || op(&serve, "POST", "?ID=bench-warm&force=true", Some(next_state().as_bytes())));
    row("POST under the lock, warm", &reqs, Some(2));
    let reqs = count(&mut || op(&serve, "UNLOCK", "", Some(lock.as_bytes())));
    row("UNLOCK, warm", &reqs, Some(2));
    let server = httpd.repo_dir("counts.git");
    let other = git_out(&server, &["commit-tree", "main^{tree}", "-p", "main", "-m", "someone else"]);
    git(&server, &["update-ref", "refs/heads/main", &other]);
    let reqs = count(&mut || op(&serve, "GET", "", None));
    row("GET after another writer moved the branch, warm", &reqs, None);
    // Cold: each operation by a new `gitstate serve` with an empty cache.
    let lock = gitstate_testkit::fixtures::lock_info("bench-cold");
    let cold_ops: [(&str, &str, Option<Vec<u8>>); 4] = [
        ("GET", "", None),
        ("POST", "?force=true", Some(next_state().into_bytes())),
        ("LOCK", "", Some(lock.clone().into_bytes())),
        ("UNLOCK", "", Some(lock.into_bytes())),
    ];
    for (method, query, body) in cold_ops {
        let fresh = Serve::start(ServeOpts::new().repository(&url));
        let reqs = count(&mut || op(&fresh, method, query, body.as_deref()));
        row(&format!("{method}, cold (new serve, empty cache)"), &reqs, None);
    }
    if terraform {
        let fresh = Serve::start(ServeOpts::new().repository(&url));
        let mut tf = tf_for(&fresh);
        tf.set_outputs(&[("x", "three")]);
        let init = count(&mut || {
            tf.init().assert_success();
        });
        let reqs = count(&mut || {
            tf.apply().assert_success();
        });
        row("terraform apply with a change, cold (after init)", &reqs, Some(9));
        let mut both = init;
        both.extend(reqs);
        row("terraform init + apply, cold (new serve)", &both, None);
        let fresh = Serve::start(ServeOpts::new().repository(&url));
        let mut tf = tf_for(&fresh);
        tf.set_outputs(&[("x", "three")]);
        count(&mut || {
            tf.init().assert_success();
        });
        let reqs = count(&mut || {
            tf.plan();
        });
        row("terraform plan, cold (after init)", &reqs, Some(7));
    }
    println!("targets: warm apply <= 7, warm plan 5; a warm look 1 request, a warm push 2 (its own advertisement, for lock safety); cold at most 2 more than warm");
}

/// New connections (each a TLS handshake) to an HTTPS git host per apply, cold and warm,
/// counted by a forwarding proxy in front of lighttpd with `mod_openssl`.
fn tls_handshakes() {
    use gitstate_testkit::fixtures::{lock_info, state};
    use gitstate_testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
    use gitstate_testkit::serve::{http, Serve, ServeOpts};
    use gitstate_testkit::stall::StallProxy;
    use gitstate_testkit::tls::{server_cert, test_ca};
    let dir = tempfile::tempdir().unwrap();
    let made = std::panic::catch_unwind(|| {
        let ca = test_ca(dir.path(), "ca");
        (ca, server_cert(dir.path(), "ca", "host", "IP:127.0.0.1", false))
    });
    let Ok((ca, pem)) = made else {
        println!("TLS handshakes skipped: openssl not found (`bash scripts/test.sh` installs it)");
        return;
    };
    let httpd = GitHttpServer::start_tls(&pem);
    httpd.create_repo("tls.git");
    let proxy = StallProxy::start(([127, 0, 0, 1], httpd.port()).into());
    let url = format!("https://127.0.0.1:{}/git/tls.git", proxy.port());
    let serve = Serve::start(ServeOpts::new().repository(&url).env("SSL_CERT_FILE", ca.display().to_string()));
    use base64::Engine as _;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{DEFAULT_USER}:{DEFAULT_PASSWORD}"))
    );
    let h = [("Authorization", auth.as_str())];
    let target = serve.state_url("tls.tfstate");
    let apply = |serial: u64| {
        assert_eq!(http("LOCK", &target, &h, Some(lock_info("bench").as_bytes())).status, 200);
        http("GET", &target, &h, None);
        let url = format!("{target}?ID=bench");
        assert_eq!(http("POST", &url, &h, Some(state(serial, "tls").as_bytes())).status, 200);
        assert_eq!(http("UNLOCK", &target, &h, Some(lock_info("bench").as_bytes())).status, 200);
    };
    apply(1);
    let cold = proxy.connections();
    apply(2);
    let warm = proxy.connections() - cold;
    println!(
        "TLS handshakes per apply (LOCK, GET, POST, UNLOCK over HTTPS): cold {cold}, warm {warm}  target warm 0 {}",
        met(warm == 0)
    );
}

// --- 2. latency with an added round trip -----------------------------------------------------

fn latency(rt: &tokio::runtime::Runtime, daemon: &GitDaemon, tmp: &Path, rounds: usize, tiny: bool) {
    repo_with_history(daemon, "latency.git", 10);
    let delays: &[u64] = if tiny { &[0, 20] } else { &[0, 10, 20] };
    println!(
        "{:<18} {:>15} {:>15} {:>15} {:>15} {:>15} {:>15} {:>7} {:>13} {:>8}",
        "added each way",
        "GET p50/p90",
        "LOCK p50/p90",
        "POST p50/p90",
        "UNLOCK p50/p90",
        "cycle p50/p90",
        "git CLI p50/p90",
        "ratio",
        "RTTs cyc/CLI",
        "target"
    );
    let mut at_zero = (0.0, 0.0);
    for &d in delays {
        let proxy = LatencyProxy::start(daemon.port(), Duration::from_millis(d));
        let proxied = format!("git://127.0.0.1:{}/latency.git", proxy.port);
        let mut samples = run_samples(rt, &proxied, tmp, rounds, false);
        let mut cli = git_cli_samples(&proxied, tmp, rounds);
        let cell = |v: &mut Vec<f64>| format!("{:.1}/{:.1}", percentile(v, 50), percentile(v, 90));
        let (cycle, cli50) = (percentile(&mut samples[4], 50), percentile(&mut cli, 50));
        let ratio = cycle / cli50;
        if d == 0 {
            at_zero = (cycle, cli50);
        }
        // Round trips a cycle costs: its growth over the 0 ms row, in units of the added RTT.
        let rtts = if d == 0 {
            "-".to_string()
        } else {
            let rtt = 2.0 * d as f64;
            format!("{:.1}/{:.1}", (cycle - at_zero.0) / rtt, (cli50 - at_zero.1) / rtt)
        };
        let target = if d == 20 { format!("<= 0.25 {}", met(ratio <= 0.25)) } else { "-".into() };
        println!(
            "{:<18} {:>15} {:>15} {:>15} {:>15} {:>15} {:>15} {:>7.3} {:>13} {:>8}",
            format!("{d} ms (RTT +{} ms)", 2 * d),
            cell(&mut samples[0]),
            cell(&mut samples[1]),
            cell(&mut samples[2]),
            cell(&mut samples[3]),
            cell(&mut samples[4]),
            cell(&mut cli),
            ratio,
            rtts,
            target
        );
    }
    println!("ms through App::handle (warm, one App) and the git CLI's fetch + commit + 3 pushes; ratio = cycle p50 / git CLI p50; RTTs = (p50 - p50 at 0 ms) / added RTT, i.e. round trips per cycle; target at 20 ms each way: <= 0.25");
}

// --- 2b. latency over HTTPS -------------------------------------------------------------------

/// lighttpd with `mod_openssl` serving `git http-backend`, its certificate signed by a test CA
/// (`ca`, what gitstate is told to trust through `SSL_CERT_FILE`, the git CLI through
/// `http.sslCAInfo`).
struct HttpsHost {
    httpd: gitstate_testkit::httpd::GitHttpServer,
    ca: std::path::PathBuf,
    _certs: tempfile::TempDir,
}

/// An [`HttpsHost`], or `None` (said on stdout) when lighttpd or openssl is missing.
fn https_host() -> Option<HttpsHost> {
    use gitstate_testkit::tls::{server_cert, test_ca};
    if std::panic::catch_unwind(gitstate_testkit::httpd::lighttpd_bin).is_err() {
        println!("skipped: lighttpd not found (`bash scripts/test.sh` installs it)");
        return None;
    }
    let certs = tempfile::tempdir().unwrap();
    let made = std::panic::catch_unwind(|| {
        let ca = test_ca(certs.path(), "ca");
        (ca, server_cert(certs.path(), "ca", "host", "IP:127.0.0.1", false))
    });
    let Ok((ca, pem)) = made else {
        println!("skipped: openssl not found (`bash scripts/test.sh` installs it)");
        return None;
    };
    let httpd = gitstate_testkit::httpd::GitHttpServer::start_tls(&pem);
    Some(HttpsHost { httpd, ca, _certs: certs })
}

impl HttpsHost {
    /// `https://127.0.0.1:<port>/git/<name>`, the port being a proxy's in front of this host.
    fn url_via(&self, port: u16, name: &str) -> String {
        format!("https://127.0.0.1:{port}/git/{name}")
    }

    /// Requests to repositories lighttpd answered so far (its access log, flushed by SIGHUP;
    /// without the `PRI * HTTP/2.0` line it logs for each HTTP/2 connection's preface).
    fn requests(&self) -> Vec<gitstate_testkit::httpd::AccessEntry> {
        self.httpd.access_log_by_signal().into_iter().filter(|r| r.target.starts_with("/git/")).collect()
    }
}

/// The latency table over smart HTTPS through the delaying proxy, beside the git CLI through
/// the same proxy; the requests of a warm cycle from lighttpd's access log and the new
/// connections (TLS handshakes) the proxy accepted during the warm cycles.
fn tls_latency(rt: &tokio::runtime::Runtime, tmp: &Path, rounds: usize, tiny: bool) {
    use gitstate_testkit::httpd::{DEFAULT_PASSWORD, DEFAULT_USER};
    let Some(host) = https_host() else { return };
    host.httpd.create_repo("tls-latency.git");
    // The in-process Apps read the trusted roots when they build their HTTP client; the git CLI
    // (curl) takes them from GIT_SSL_CAINFO (`-c http.sslCAInfo` did not reach its clone).
    std::env::set_var("SSL_CERT_FILE", &host.ca);
    std::env::set_var("GIT_SSL_CAINFO", &host.ca);
    let auth = basic_auth();
    let delays: &[u64] = if tiny { &[0, 20] } else { &[0, 10, 20] };
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>15} {:>15} {:>6} {:>9} {:>7} {:>8}  target",
        "each way",
        "GET p50",
        "LOCK p50",
        "POST p50",
        "UNLK p50",
        "cycle p50/p90",
        "git CLI p50/p90",
        "reqs",
        "bound ms",
        "new TLS",
        "own CPU"
    );
    for &d in delays {
        let proxy = LatencyProxy::start(host.httpd.port(), Duration::from_millis(d));
        let url = host.url_via(proxy.port, "tls-latency.git");
        let (mut requests_before, mut connections_before, mut cpu_before) = (0, 0, 0.0);
        let mut samples = run_samples_as(rt, &url, tmp, rounds, false, Some(&auth), &mut || {
            requests_before = host.requests().len();
            connections_before = proxy.connections();
            cpu_before = own_cpu_ms();
        });
        let own_cpu = (own_cpu_ms() - cpu_before) / rounds as f64;
        let new_connections = proxy.connections() - connections_before;
        let requests = (host.requests().len() - requests_before) as f64 / rounds as f64;
        let cli_url = format!("https://{DEFAULT_USER}:{DEFAULT_PASSWORD}@127.0.0.1:{}/git/tls-latency.git", proxy.port);
        let mut cli = git_cli_samples(&cli_url, tmp, rounds);
        let cell = |v: &mut Vec<f64>| format!("{:.1}/{:.1}", percentile(v, 50), percentile(v, 90));
        let cycle = percentile(&mut samples[4], 50);
        // A warm apply: every request one round trip, plus one round trip of slack.
        let rtt = 2.0 * d as f64;
        let bound = requests * rtt + rtt;
        let target = if d == 20 {
            format!("cycle <= bound {}, new TLS 0 {}", met(cycle <= bound), met(new_connections == 0))
        } else {
            "-".into()
        };
        println!(
            "{:<10} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>15} {:>15} {requests:>6.1} {bound:>9.0} {new_connections:>7} {own_cpu:>8.1}  {target}",
            format!("{d} ms"),
            percentile(&mut samples[0], 50),
            percentile(&mut samples[1], 50),
            percentile(&mut samples[2], 50),
            percentile(&mut samples[3], 50),
            cell(&mut samples[4]),
            cell(&mut cli),
        );
    }
    std::env::remove_var("SSL_CERT_FILE");
    std::env::remove_var("GIT_SSL_CAINFO");
    println!(
        "ms through App::handle (one warm App, passthrough basic auth) over HTTPS to lighttpd + mod_openssl, and the git CLI's fetch + commit + 3 pushes through the same proxy; reqs = requests per warm cycle (LOCK, GET, POST, UNLOCK) in lighttpd's access log; bound = reqs x RTT + RTT; new TLS = connections the proxy accepted during the {rounds} warm cycles (each a TLS handshake); own CPU = ms of CPU this process (the App and the in-process proxy; not lighttpd and git) spent per warm cycle; target at 20 ms each way: cycle p50 <= bound, no new TLS handshake while warm"
    );
    tls_handshakes();
}

/// CPU time (user + system) of this process so far, in ms: the App's work, not the host's.
fn own_cpu_ms() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct it is given and nothing else.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

// --- 3. states per repository -----------------------------------------------------------------

/// A bare repository `name` of `daemon` whose `main` holds `states` states in one commit
/// (fast-import): `envs/<n % 100>/<n>.tfstate` with `dirs`, else `<n>.tfstate` at the top.
fn repo_with_states(daemon: &GitDaemon, name: &str, states: usize, dirs: bool) -> String {
    fill_with_states(&daemon.repo_dir(name), states, dirs);
    daemon.url(name)
}

/// [`repo_with_states`] at the directory `dir` (of any git host).
fn fill_with_states(dir: &Path, states: usize, dirs: bool) {
    git(dir.parent().unwrap(), &["init", "-q", "--bare", "-b", "main", dir.to_str().unwrap()]);
    let mut script = String::from("commit refs/heads/main\ncommitter b <b@b> 1700000000 +0000\ndata 6\nstates\n");
    for n in 0..states {
        let content = gitstate_testkit::fixtures::state_with_lineage(&format!("s{n}"), 1, &format!("state {n}"));
        script.push_str(&format!("M 100644 inline {}\ndata {}\n{content}\n", state_path(n, dirs), content.len()));
    }
    git_with_input(dir, &["fast-import", "--quiet"], script.as_bytes());
}

fn state_path(n: usize, dirs: bool) -> String {
    if dirs {
        format!("envs/{}/{n}.tfstate", n % 100)
    } else {
        format!("{n}.tfstate")
    }
}

fn states_per_repository(rt: &tokio::runtime::Runtime, daemon: &GitDaemon, tmp: &Path, rounds: usize, tiny: bool) {
    let counts: &[usize] = if tiny { &[1, 100] } else { &[1, 100, 10_000] };
    println!(
        "{:<34} {:>10} {:>10} {:>11} {:>11} {:>16}",
        "states in the repository", "POST ms", "GET ms", "POST ratio", "GET ratio", "target"
    );
    for dirs in [true, false] {
        let mut base = (0.0, 0.0);
        for &n in counts {
            let name = format!("states-{n}-{}.git", if dirs { "dirs" } else { "flat" });
            let url = repo_with_states(daemon, &name, n, dirs);
            let app = new_app(&url, tmp, 0);
            let uri = format!("/state/{}", state_path(0, dirs));
            let (post, get) = rt.block_on(async {
                // Warm: the first look and write fill the cache.
                assert_eq!(call(&app, "GET", &uri, "").await, 200);
                let (mut posts, mut gets) = (Vec::new(), Vec::new());
                for i in 0..=rounds {
                    let state =
                        gitstate_testkit::fixtures::state_with_lineage("s0", i as u64 + 2, &format!("round {i}"));
                    let t = Instant::now();
                    assert_eq!(call(&app, "POST", &uri, &state).await, 200);
                    let post = ms(t.elapsed());
                    let t = Instant::now();
                    assert_eq!(call(&app, "GET", &uri, "").await, 200);
                    if i > 0 {
                        posts.push(post);
                        gets.push(ms(t.elapsed()));
                    }
                }
                (median(&mut posts), median(&mut gets))
            });
            if n == 1 {
                base = (post, get);
            }
            let (pr, gr) = (post / base.0, get / base.1);
            let target = if dirs && n > 1 { format!("<= 1.5 {}", met(pr <= 1.5 && gr <= 1.5)) } else { "-".into() };
            println!(
                "{:<34} {post:>10.2} {get:>10.2} {pr:>11.2} {gr:>11.2} {target:>16}",
                format!("{n} ({})", if dirs { "envs/<n % 100>/<n>" } else { "flat: <n>.tfstate" })
            );
        }
    }
    println!("medians of a warm App writing and reading one state; ratio to the 1-state repository of the same layout");
}

// --- 4. concurrent writers --------------------------------------------------------------------

/// One row of the writers table: `n` writers at once, spread over up to 16 Apps.
struct WritersRow {
    apps: usize,
    writes: usize,
    failed: usize,
    writes_per_s: f64,
    attempts_p50: f64,
    attempts_max: f64,
    /// Landed writes per applied push (group commit: one push carries the writes of one App).
    per_push: f64,
    p99_ms: f64,
    pushes: usize,
    lost_races: usize,
    /// Why writes failed: each answer's first words, numbers left out, with how many.
    failures: std::collections::BTreeMap<String, usize>,
}

/// The first words of a failed write's answer, its numbers replaced by `N` (so that "ran out
/// of time after 6 push attempts" and "... after 8 ..." count as one reason).
fn failure_reason(status: u16, body: &str) -> String {
    let words: Vec<String> = body
        .split_whitespace()
        .take(10)
        .map(|w| if w.chars().any(|c| c.is_ascii_digit()) { "N".into() } else { w.to_string() })
        .collect();
    format!("{status} {}", words.join(" "))
}

/// Writers at 1, 4, 16, 64 and 256 (the last one a stretch), with 0 and 20 ms added each way.
/// Their own `git daemon` without a connection limit: git-daemon's default (32) kills another
/// connection from the same address when it is reached, and sleeps a second before it
/// accepts again, which would measure the daemon, not gitstate.
fn concurrency(rt: &tokio::runtime::Runtime, tmp: &Path, rounds: usize, tiny: bool) {
    let daemon = GitDaemon::start_with_args(&["--max-connections=0"]);
    let writers: &[usize] = if tiny { &[1, 4] } else { &[1, 4, 16, 64, 256] };
    // 256 writers write fewer times each: about 512 writes per row at most.
    let per_writer = |n: usize| if tiny { 2 } else { rounds.max(5).min((512 / n).max(1)) };
    println!(
        "{:<8} {:>5} {:>10} {:>7} {:>7} {:>9} {:>9} {:>9} {:>7} {:>10} {:>8} {:>8}  target",
        "writers",
        "apps",
        "each way",
        "writes",
        "failed",
        "writes/s",
        "att. p50",
        "att. max",
        "w/push",
        "p99 ms",
        "pushes",
        "lost"
    );
    for delay in [0u64, 20] {
        let proxy = LatencyProxy::start(daemon.port(), Duration::from_millis(delay));
        for &n in writers {
            let name = format!("writers-{n}-{delay}.git");
            daemon.create_repo(&name);
            let url = format!("git://127.0.0.1:{}/{name}", proxy.port);
            let r = writers_row(rt, &daemon, &url, tmp, n, per_writer(n));
            let target = match n {
                16 => format!("no failure, att. p50 <= 3 {}", met(r.failed == 0 && r.attempts_p50 <= 3.0)),
                64 => format!("0 failed (required) {}", met(r.failed == 0)),
                256 => format!("0 failed (stretch) {}", met(r.failed == 0)),
                _ => "-".into(),
            };
            println!(
                "{n:<8} {:>5} {:>10} {:>7} {:>7} {:>9.1} {:>9} {:>9} {:>7.1} {:>10.0} {:>8} {:>8}  {target}",
                r.apps,
                format!("{delay} ms"),
                r.writes,
                r.failed,
                r.writes_per_s,
                r.attempts_p50,
                r.attempts_max,
                r.per_push,
                r.p99_ms,
                r.pushes,
                r.lost_races
            );
            for (reason, count) in &r.failures {
                println!("{:>8} failed: {count} x {reason}", "");
            }
        }
    }
    println!(
        "every writer its own state (conc/w<i>.tfstate), {} writes each ({} at 256 writers), no lock, all at once, through the latency proxy in front of git daemon (--max-connections=0); writers spread over up to 16 Apps (own caches, as Lambda instances); failed = any answer but 200; p99 = 99th percentile of one POST's time; attempts = pushes until one applied, from gitstate's own `compare-and-swap applied` event (pushes=N), one per applied push; w/push = landed writes per applied push (group commit: one push may carry several writes of one App); pushes = `Request receive-pack` lines of git daemon's log; lost = gitstate's `lost the race` events",
        per_writer(1),
        per_writer(256)
    );
}

/// `n` writers on distinct states of the repository at `url`, `per_writer` POSTs each, all
/// starting at once, spread over up to 16 warm Apps.
fn writers_row(
    rt: &tokio::runtime::Runtime,
    daemon: &GitDaemon,
    url: &str,
    tmp: &Path,
    n: usize,
    per_writer: usize,
) -> WritersRow {
    let app_count = n.min(16);
    let apps: Vec<Arc<App>> = (0..app_count).map(|i| new_app(url, tmp, 10_000 + i)).collect();
    let pushes = || daemon.log().matches("Request receive-pack").count();
    rt.block_on(async {
        // Warm instances: each has looked at the repository once.
        for app in &apps {
            let s = call(app, "GET", "/state/warmup.tfstate", "").await;
            assert!(s == 200 || s == 204);
        }
        APPLIED.lock().unwrap().clear();
        LOST_RACES.store(0, Ordering::SeqCst);
        let pushes_before = pushes();
        let barrier = Arc::new(tokio::sync::Barrier::new(n));
        let start = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|w| {
                let app = Arc::clone(&apps[w % app_count]);
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    let mut writes = Vec::new();
                    for k in 0..per_writer {
                        let body = gitstate_testkit::fixtures::state_with_lineage(
                            &format!("w{w}"),
                            k as u64 + 1,
                            &format!("writer {w} write {k}"),
                        );
                        let t = Instant::now();
                        let (status, answer) =
                            races::call(&app, "POST", &format!("/state/conc/w{w}.tfstate"), &body).await;
                        writes.push((status, answer, ms(t.elapsed())));
                    }
                    writes
                })
            })
            .collect();
        let mut times = Vec::new();
        let mut failed = 0;
        let mut failures = std::collections::BTreeMap::new();
        for t in tasks {
            for (status, answer, took) in t.await.expect("writer task") {
                if status != 200 {
                    failed += 1;
                    *failures.entry(failure_reason(status, &answer)).or_insert(0) += 1;
                }
                times.push(took);
            }
        }
        let took = start.elapsed();
        let mut attempts: Vec<f64> = APPLIED.lock().unwrap().iter().map(|&p| p as f64).collect();
        let writes = times.len();
        WritersRow {
            apps: app_count,
            writes,
            failed,
            writes_per_s: (writes - failed) as f64 / took.as_secs_f64(),
            attempts_p50: percentile(&mut attempts, 50),
            attempts_max: attempts.iter().cloned().fold(0.0, f64::max),
            per_push: (writes - failed) as f64 / attempts.len().max(1) as f64,
            p99_ms: percentile(&mut times, 99),
            pushes: pushes() - pushes_before,
            lost_races: LOST_RACES.load(Ordering::SeqCst),
            failures,
        }
    })
}

// --- 5. cold start ----------------------------------------------------------------------------

fn cold_start(rt: &tokio::runtime::Runtime, daemon: &GitDaemon, tmp: &Path, rounds: usize, tiny: bool) {
    let url = repo_with_states(daemon, "cold.git", if tiny { 100 } else { 1_000 }, true);
    let uri = format!("/state/{}", state_path(0, true));
    println!(
        "{:<18} {:>22} {:>26} {:>8} {:>10}",
        "added each way", "cold first GET p50 ms", "warm GET, changed, p50 ms", "ratio", "target"
    );
    let writer = new_app(&url, tmp, 20_000);
    let serial = AtomicUsize::new(10);
    for d in [0u64, 20] {
        let proxy = LatencyProxy::start(daemon.port(), Duration::from_millis(d));
        let proxied = format!("git://127.0.0.1:{}/cold.git", proxy.port);
        let warm = new_app(&proxied, tmp, 20_001 + d as usize);
        let (cold, changed) = rt.block_on(async {
            assert_eq!(call(&warm, "GET", &uri, "").await, 200);
            let (mut cold, mut changed) = (Vec::new(), Vec::new());
            for i in 0..rounds {
                let fresh = new_app(&proxied, tmp, 30_000 + i);
                let t = Instant::now();
                assert_eq!(call(&fresh, "GET", &uri, "").await, 200);
                cold.push(ms(t.elapsed()));
                // Another instance writes the state, then the warm one reads it.
                let n = serial.fetch_add(1, Ordering::SeqCst) as u64;
                let state = gitstate_testkit::fixtures::state_with_lineage("s0", n, &format!("changed {n}"));
                assert_eq!(call(&writer, "POST", &uri, &state).await, 200);
                let t = Instant::now();
                assert_eq!(call(&warm, "GET", &uri, "").await, 200);
                changed.push(ms(t.elapsed()));
            }
            (median(&mut cold), median(&mut changed))
        });
        let ratio = cold / changed;
        println!(
            "{:<18} {cold:>22.2} {changed:>26.2} {ratio:>8.2} {:>10}",
            format!("{d} ms (RTT +{} ms)", 2 * d),
            format!("<= 2 {}", met(ratio <= 2.0))
        );
    }
    println!("cold: a new App with an empty cache directory; warm: an App that read the state before another App wrote it (both need a fetch); the repository holds {} states", if tiny { 100 } else { 1_000 });
    cold_process(tmp, rounds, tiny);
    cold_lambda(tiny);
    binary_size();
}

/// A fresh `gitstate serve` process (empty cache) on an HTTPS host through the delaying proxy:
/// how long `gitstate --version` takes (the process itself), from spawn to its start banner
/// (listening: settings read, App loaded), and its first GET with the requests it cost.
fn cold_process(tmp: &Path, rounds: usize, tiny: bool) {
    let Some(host) = https_host() else { return };
    let name = "cold-serve.git";
    fill_with_states(&host.httpd.repo_dir(name), if tiny { 100 } else { 1_000 }, true);
    let path = state_path(0, true);
    let auth = basic_auth();
    let version = median(&mut (0..rounds).map(|_| exec_version_ms()).collect::<Vec<_>>());
    println!(
        "{:<10} {:<12} {:>8} {:>10} {:>9} {:>9} {:>8}  {:<38} requests of the first GET",
        "each way", "want-ref", "exec ms", "listening", "GET ms", "requests", "new TLS", "target"
    );
    let mut dominant = String::new();
    let rows: &[(u64, bool)] =
        if tiny { &[(0, true), (0, false)] } else { &[(0, true), (0, false), (20, true), (20, false)] };
    for &(d, ref_in_want) in rows {
        // Whether the host takes `want-ref` (git's `uploadpack.allowRefInWant`, off by default).
        let allow = if ref_in_want { "true" } else { "false" };
        git(&host.httpd.repo_dir(name), &["config", "uploadpack.allowRefInWant", allow]);
        let proxy = LatencyProxy::start(host.httpd.port(), Duration::from_millis(d));
        let url = host.url_via(proxy.port, name);
        let (mut listening, mut get, mut counts, mut conns) = (vec![], vec![], vec![], vec![]);
        let mut last = Vec::new();
        for i in 0..rounds {
            let (requests_before, connections_before) = (host.requests().len(), proxy.connections());
            let serve = FreshServe::spawn(&url, &host.ca, &tmp.join(format!("cold-serve-{d}-{i}")));
            listening.push(serve.listening_ms);
            let t = Instant::now();
            let got = gitstate_testkit::serve::http(
                "GET",
                &format!("http://{}/state/{path}", serve.addr),
                &[("Authorization", &auth)],
                None,
            );
            assert_eq!(got.status, 200, "{}", got.text());
            get.push(ms(t.elapsed()));
            conns.push(proxy.connections() - connections_before);
            last = host.requests()[requests_before..].to_vec();
            counts.push(last.len() as f64);
        }
        let requests = median(&mut counts);
        let (listening, get) = (median(&mut listening), median(&mut get));
        dominant = format!(
            "at {d} ms each way, of a fresh process's first answer ({:.0} ms from spawn) {:.0}% is the start up to listening ({:.0}% of that the bare process start, `--version`) and {:.0}% the first GET",
            listening + get,
            100.0 * listening / (listening + get),
            100.0 * version / listening,
            100.0 * get / (listening + get)
        );
        println!(
            "{:<10} {:<12} {version:>8.1} {:>10.1} {:>9.1} {requests:>9} {:>8}  {:<38} {}",
            format!("{d} ms"),
            if ref_in_want { "allowed" } else { "not allowed" },
            listening,
            get,
            median(&mut conns.iter().map(|&c| c as f64).collect::<Vec<_>>()),
            format!("<= handshakes + 1 request {}", met(requests <= 1.0)),
            describe(&last)
        );
    }
    println!(
        "medians of {rounds} fresh `gitstate serve` processes, each with an empty cache, over HTTPS through the latency proxy (a repository of {} states), with the host taking `want-ref` (uploadpack.allowRefInWant) or not (git's default); exec = `gitstate --version` (process start and exit); listening = spawn to the start banner on stdout (settings, App::load, bind); GET = the first GET of a state, the requests it cost at lighttpd and the new connections (TCP + TLS handshakes) at the proxy",
        if tiny { 100 } else { 1_000 }
    );
    println!("{dominant}");
}

/// Milliseconds `gitstate --version` takes: starting and ending the process, nothing else.
fn exec_version_ms() -> f64 {
    let t = Instant::now();
    let out = std::process::Command::new(gitstate_testkit::serve::server_bin()).arg("--version").output();
    assert!(out.is_ok_and(|o| o.status.success()), "gitstate --version failed");
    ms(t.elapsed())
}

/// A `gitstate serve` child with an empty cache directory, started here (not through the
/// testkit's `Serve`, which polls its port every 50 ms) to time the start precisely: the
/// banner on stdout is printed once the port is bound. Killed on drop.
struct FreshServe {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    listening_ms: f64,
}

impl FreshServe {
    fn spawn(url: &str, ca: &Path, dir: &Path) -> FreshServe {
        use std::io::BufRead as _;
        use std::process::{Command, Stdio};
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", gitstate_testkit::gitd::free_port()).parse().unwrap();
        let mut cmd = Command::new(gitstate_testkit::serve::server_bin());
        cmd.args(["serve", "--listen", &addr.to_string(), "--repository", url, "--data-dir"]).arg(dir.join("data"));
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with("GITSTATE_") || k.starts_with("GIT_")) {
                cmd.env_remove(k);
            }
        }
        cmd.env("PATH", gitstate_testkit::serve::path_without_git())
            .env("GITSTATE_CACHE_DIR", dir.join("cache"))
            .env("SSL_CERT_FILE", ca)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn gitstate serve");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if lines.next().is_some() {
                let _ = tx.send(Instant::now());
            }
            for _ in lines {}
        });
        let banner = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            panic!("gitstate serve printed no banner:\n{}", std::fs::read_to_string(dir.join("stderr.log")).unwrap())
        });
        FreshServe { child, addr, listening_ms: ms(banner - started) }
    }
}

impl Drop for FreshServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh Lambda instance under the emulator (`cargo lambda watch`, which builds the function
/// with cargo first): time to its first answer (a request gitstate answers without the git
/// host), then its first GET of a state (empty cache) and a second one, with their requests.
fn cold_lambda(tiny: bool) {
    if tiny {
        // `cargo lambda watch` runs cargo first, which can take minutes on a busy machine.
        println!("Lambda emulator row skipped at --tiny (run the benchmark without --tiny for it)");
        return;
    }
    if std::panic::catch_unwind(gitstate_testkit::lambda::cargo_lambda_bin).is_err() {
        println!("Lambda emulator skipped: cargo-lambda not found (`bash scripts/test.sh` installs it)");
        return;
    }
    let Some(host) = https_host() else { return };
    let name = "cold-lambda.git";
    fill_with_states(&host.httpd.repo_dir(name), 100, true);
    let path = state_path(0, true);
    let auth = basic_auth();
    let proxy = LatencyProxy::start(host.httpd.port(), Duration::ZERO);
    let url = host.url_via(proxy.port, name);
    let ca = host.ca.display().to_string();
    println!(
        "{:<16} {:>11} {:>11} {:>11} {:>12} {:>9} {:>9} {:>13} {:>9}",
        "Lambda instance",
        "cargo ms",
        "up ms",
        "answer ms",
        "first GET ms",
        "requests",
        "new TLS",
        "second GET ms",
        "requests"
    );
    for i in 0..2 {
        let started = std::time::SystemTime::now();
        let emulator = gitstate_testkit::lambda::Emulator::start(&[
            ("GITSTATE_REPOSITORY", url.as_str()),
            ("SSL_CERT_FILE", ca.as_str()),
        ]);
        let get = || {
            let (requests_before, connections_before) = (host.requests().len(), proxy.connections());
            let t = Instant::now();
            let got =
                gitstate_testkit::serve::http("GET", &emulator.state_url(&path), &[("Authorization", &auth)], None);
            assert_eq!(got.status, 200, "{}", got.text());
            let took = ms(t.elapsed());
            (took, host.requests().len() - requests_before, proxy.connections() - connections_before)
        };
        let (first, first_requests, first_conns) = get();
        let (second, second_requests, _) = get();
        let log = emulator.log();
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "{:<16} {:>11} {:>11} {:>11.0} {first:>12.1} {first_requests:>9} {first_conns:>9} {second:>13.1} {second_requests:>9}",
            format!("{} start", if i == 0 { "first" } else { "another" }),
            cell(cargo_check_ms(&log)),
            cell(function_up_ms(&log, started)),
            ms(emulator.first_answer),
        );
    }
    println!(
        "ms from starting `cargo lambda watch`: cargo = cargo's build check before it runs the function (its `Finished ... in` line; a debug binary{}); up = the function's first log line (lambda_runtime's, once gitstate's init is done: settings, App::load), by its timestamp; answer = the function's first answer (a request gitstate answers without the git host); first GET: the instance's first look at the git host over HTTPS (empty /tmp cache), its requests at lighttpd and new connections at a proxy; the emulator reports no Init Duration",
        if cfg!(debug_assertions) { "" } else { ": cargo lambda watch builds its own" }
    );
}

/// Cargo's build check in the emulator's log: `Finished ... target(s) in 1.00s`, in ms.
fn cargo_check_ms(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("Finished") && l.contains(" in "))?;
    let took = line.rsplit(" in ").next()?.trim();
    took.strip_suffix('s')?.parse::<f64>().ok().map(|s| s * 1000.0)
}

/// How long after `started` the function wrote its first JSON log line (by the line's
/// `"timestamp":"2026-12-03T07:11:44.432637Z"`, UTC; compared as times of day).
fn function_up_ms(log: &str, started: std::time::SystemTime) -> Option<f64> {
    let line = log.lines().find(|l| l.starts_with('{') && l.contains("\"timestamp\""))?;
    let stamp = line.split("\"timestamp\":\"").nth(1)?.split('"').next()?;
    let clock = stamp.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = clock.split(':');
    let (h, m, s) =
        (parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?);
    let logged = h * 3600.0 + m * 60.0 + s;
    let since_epoch = started.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
    Some((logged - since_epoch % 86_400.0).rem_euclid(86_400.0) * 1000.0)
}

/// The size of the `gitstate` binary this benchmark runs.
fn binary_size() {
    let bin = gitstate_testkit::serve::server_bin();
    let bytes = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    println!(
        "binary: {} {:.1} MiB ({} build{})",
        bin.display(),
        bytes as f64 / (1 << 20) as f64,
        if cfg!(debug_assertions) { "debug" } else { "release" },
        if cfg!(debug_assertions) {
            "; the release binary is smaller: run the release benchmark"
        } else {
            ", stripped, thin LTO"
        }
    );
}

// --- 6. memory of gitstate serve --------------------------------------------------------------

/// VmHWM (peak resident set) of process `pid`, in MiB.
fn peak_rss_of(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn memory(daemon: &GitDaemon, tiny: bool) {
    use gitstate_testkit::serve::{http, Serve, ServeOpts};
    let sizes: &[usize] = if tiny { &[1] } else { &[5, 50] };
    println!(
        "{:<12} {:>14} {:>14} {:>14} {:>10} {:>10} {:>14}",
        "state", "RSS idle MiB", "after POST", "after GET", "POST ms", "GET ms", "target"
    );
    for &mib in sizes {
        let url = daemon.create_repo(&format!("memory-{mib}.git"));
        let serve = Serve::start(ServeOpts::new().repository(&url));
        let pid = serve.pid().expect("the server's pid");
        let uri = serve.state_url("big/terraform.tfstate");
        let small = gitstate_testkit::fixtures::state_with_lineage("big", 1, "small");
        assert_eq!(http("POST", &uri, &[], Some(small.as_bytes())).status, 200);
        assert_eq!(http("GET", &uri, &[], None).status, 200);
        let idle = peak_rss_of(pid);
        let mut state =
            String::from("{\n  \"version\": 4,\n  \"serial\": 2,\n  \"lineage\": \"big\",\n  \"resources\": [\n");
        let mut i = 0;
        while state.len() < mib << 20 {
            state.push_str(&format!("    {{\"name\": \"r{i}\", \"value\": \"{:032x}\"}},\n", fastrand::u128(..)));
            i += 1;
        }
        state.push_str("    {}\n  ]\n}\n");
        let md5 = gitstate::protocol::content_md5(state.as_bytes());
        let t = Instant::now();
        let got = http("POST", &uri, &[("Content-MD5", &md5)], Some(state.as_bytes()));
        assert_eq!(got.status, 200, "{}", got.text());
        let post = ms(t.elapsed());
        let after_post = peak_rss_of(pid);
        let t = Instant::now();
        let got = http("GET", &uri, &[], None);
        assert_eq!(got.status, 200);
        assert_eq!(got.body.len(), state.len());
        let get = ms(t.elapsed());
        let after_get = peak_rss_of(pid);
        let target = if mib >= 50 { format!("<= 256 {}", met(after_get <= 256.0)) } else { "-".into() };
        println!(
            "{:<12} {idle:>14.1} {after_post:>14.1} {after_get:>14.1} {post:>10.1} {get:>10.1} {target:>14}",
            format!("{mib} MB")
        );
    }
    println!("peak RSS (VmHWM of /proc/<pid>/status) of a `gitstate serve` child on a git daemon, one per size; target: a 50 MB state within 256 MiB");
}
