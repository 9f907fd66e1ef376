//! Benchmark (figures, not a test): median latency of GET, LOCK, POST, UNLOCK and a
//! full apply cycle through `App::handle` against a local `git daemon`, next to the
//! git CLI doing the same git work, with cold and warm caches and several history sizes.
//!
//! Run: `cargo run --release --example bench [-- ROUNDS]` (needs `git` for the daemon
//! and the comparison; gitstate itself never runs it).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gitstate::app::App;
use gitstate_testkit::gitd::{git, git_with_input, GitDaemon};
use gitstate_testkit::races;

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let daemon = GitDaemon::start();
    println!("gitstate benchmark: {rounds} rounds per figure, git daemon on 127.0.0.1:{}", daemon.port());
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "scenario", "GET ms", "LOCK ms", "POST ms", "UNLOCK ms", "cycle ms", "git CLI ms"
    );
    for history in [10usize, 1_000, 10_000] {
        let name = format!("h{history}.git");
        let url = repo_with_history(&daemon, &name, history);
        for cold in [false, true] {
            let figures = rt.block_on(run(&url, tmp.path(), rounds, cold));
            let cli = git_cli_cycle(&url, tmp.path(), rounds.min(10));
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
    history(&rt, &daemon, tmp.path());
    encryption(&rt, &daemon, tmp.path(), rounds);
    let (before, after, took) = rt.block_on(big_state(&repo_with_history(&daemon, "big.git", 10), tmp.path(), 5));
    println!(
        "5 MB state POST + GET: {took:.1} ms; peak RSS of this process {before:.1} MiB before, {after:.1} MiB after (+{:.1} MiB)",
        after - before
    );
}

/// Medians (ms) of GET, LOCK, POST, UNLOCK and a whole LOCK+GET+POST+UNLOCK cycle.
async fn run(url: &str, tmp: &Path, rounds: usize, cold: bool) -> [f64; 5] {
    let mut samples: [Vec<f64>; 5] = Default::default();
    let mut app = new_app(url, tmp, 0);
    let path = "/state/bench/terraform.tfstate";
    for i in 0..rounds {
        if cold {
            app = new_app(url, tmp, i + 1);
        }
        let id = format!("bench-{i}-{}", fastrand::u64(..));
        let lock = format!(
            r#"{{"ID":"{id}","Operation":"OperationTypeApply","Who":"bench","Version":"1.0.3","Created":"","Path":"","Info":""}}"#
        );
        let state = format!(
            "{{\n  \"version\": 4,\n  \"serial\": {},\n  \"lineage\": \"bench\",\n  \"outputs\": {{}}\n}}\n",
            i + 1_000_000 * (fastrand::u32(..) as usize)
        );
        let cycle = Instant::now();
        let t = Instant::now();
        assert_eq!(call(&app, "LOCK", path, &lock).await, 200);
        samples[1].push(ms(t.elapsed()));
        let t = Instant::now();
        let s = call(&app, "GET", path, "").await;
        assert!(s == 200 || s == 204);
        samples[0].push(ms(t.elapsed()));
        let t = Instant::now();
        let s = call(&app, "POST", &format!("{path}?ID={id}&force=true"), &state).await;
        assert_eq!(s, 200);
        samples[2].push(ms(t.elapsed()));
        let t = Instant::now();
        assert_eq!(call(&app, "UNLOCK", path, &lock).await, 200);
        samples[3].push(ms(t.elapsed()));
        samples[4].push(ms(cycle.elapsed()));
    }
    samples.map(|mut s| median(&mut s))
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

/// The same git work with the CLI: shallow fetch, commit, push; create and delete a lock branch.
fn git_cli_cycle(url: &str, tmp: &Path, rounds: usize) -> f64 {
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
    median(&mut samples)
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
