//! Benchmark (figures, not a test) of issue 19: SSH beside smart HTTP and git://. Median
//! latency of GET, LOCK, POST, UNLOCK and a whole cycle through `App::handle`, warm, against
//! a real OpenSSH sshd, lighttpd + `git http-backend` and `git daemon` on 127.0.0.1; then the
//! cost of one connection and advertisement (a receive-pack look) on each, which is what a
//! kept SSH session would save per operation. Nothing is asserted on time.
//!
//! Run: `cargo build --release && cargo run --release --example bench_ssh [-- ROUNDS]`
//! (needs sshd, ssh-keygen, lighttpd and git: `bash scripts/test.sh` installs them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gitstate::app::App;
use gitstate::config::{AuthMode, Config};
use gitstate::context::{Credentials, RequestContext, SshIdentity};
use gitstate::storage::RepoUrl;
use gitstate_testkit::gitd::GitDaemon;
use gitstate_testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
use gitstate_testkit::races;
use gitstate_testkit::sshd::Sshd;

const BACKEND: (&str, &str) = ("bench", "bench-pw");

fn main() {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(20).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let sshd = Sshd::start();
    let httpd = GitHttpServer::start();
    let daemon = GitDaemon::start();
    println!(
        "gitstate SSH benchmark: {rounds} rounds per figure, {} build",
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );

    let identity =
        SshIdentity { private_key: sshd.client_key().private.clone().into(), known_hosts: sshd.known_hosts_line() };
    let backend = Some(Credentials { username: BACKEND.0.into(), password: BACKEND.1.into() });
    let hosts: Vec<(&str, String, Config)> = vec![
        ("git:// (git daemon)", daemon.create_repo("bench.git"), Config::default()),
        (
            "smart HTTP (lighttpd)",
            httpd.create_repo("bench.git"),
            Config {
                auth: AuthMode::Env,
                git_credentials: Some(Credentials { username: DEFAULT_USER.into(), password: DEFAULT_PASSWORD.into() }),
                backend_credentials: backend.clone(),
                ..Config::default()
            },
        ),
        (
            "SSH (OpenSSH sshd)",
            sshd.create_repo("bench.git"),
            Config {
                auth: AuthMode::Env,
                backend_credentials: backend.clone(),
                ssh: gitstate::config::SshSettings {
                    private_key: Some(identity.private_key.clone()),
                    known_hosts: Some(identity.known_hosts.clone()),
                },
                ..Config::default()
            },
        ),
    ];

    println!("== warm operations through App::handle (medians) ==");
    println!("{:<24} {:>9} {:>9} {:>9} {:>9} {:>9}", "host", "GET ms", "LOCK ms", "POST ms", "UNLOCK ms", "cycle ms");
    for (name, url, config) in &hosts {
        let mut config = config.clone();
        config.repository = Some(RepoUrl::parse(url).unwrap());
        config.cache_dir = tmp.path().join(format!("cache-{}", fastrand::u64(..)));
        let app = Arc::new(App::open(config).expect("open the App"));
        let f = rt.block_on(cycle(&app, rounds));
        println!("{name:<24} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}", f[0], f[1], f[2], f[3], f[4]);
    }

    println!("== one connection and receive-pack advertisement (a look), median ==");
    let ssh = Some(Arc::new(identity));
    for (name, url, config) in &hosts {
        let url = RepoUrl::parse(url).unwrap();
        let mut samples = Vec::new();
        for _ in 0..rounds {
            let ctx = RequestContext::new(
                config.git_credentials.clone(),
                gitstate::context::Deadline::after(Duration::from_secs(30)),
            )
            .with_ssh(ssh.clone());
            let t = Instant::now();
            gitstate::storage::git::push::look(&url, &ctx).expect("look");
            samples.push(ms(t.elapsed()));
        }
        println!("{name:<24} {:>9.2} ms", median(&mut samples));
    }
    drop(tmp);
}

/// Medians (ms) of GET, LOCK, POST, UNLOCK and a whole cycle, after one cycle not counted.
async fn cycle(app: &Arc<App>, rounds: usize) -> [f64; 5] {
    let mut samples: [Vec<f64>; 5] = Default::default();
    let path = "/state/bench/terraform.tfstate";
    for i in 0..=rounds {
        let id = format!("bench-{i}-{}", fastrand::u64(..));
        let lock = format!(
            r#"{{"ID":"{id}","Operation":"OperationTypeApply","Who":"bench","Version":"1.0.3","Created":"","Path":"","Info":""}}"#
        );
        let state = format!(
            "{{\n  \"version\": 4,\n  \"serial\": {},\n  \"lineage\": \"bench\",\n  \"outputs\": {{}}\n}}\n",
            i + 1_000_000 * (fastrand::u32(..) as usize)
        );
        let mut took = [0.0; 5];
        let whole = Instant::now();
        let t = Instant::now();
        assert_eq!(call(app, "LOCK", path, &lock).await, 200);
        took[1] = ms(t.elapsed());
        let t = Instant::now();
        let s = call(app, "GET", path, "").await;
        assert!(s == 200 || s == 204, "GET {s}");
        took[0] = ms(t.elapsed());
        let t = Instant::now();
        assert_eq!(call(app, "POST", &format!("{path}?ID={id}&force=true"), &state).await, 200);
        took[2] = ms(t.elapsed());
        let t = Instant::now();
        assert_eq!(call(app, "UNLOCK", path, &lock).await, 200);
        took[3] = ms(t.elapsed());
        took[4] = ms(whole.elapsed());
        if i > 0 {
            for (s, t) in samples.iter_mut().zip(took) {
                s.push(t);
            }
        }
    }
    samples.map(|mut s| median(&mut s))
}

async fn call(app: &Arc<App>, method: &str, uri: &str, body: &str) -> u16 {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", BACKEND.0, BACKEND.1));
    let mut req = races::request(method, uri, body);
    req.headers_mut().insert("Authorization", format!("Basic {auth}").parse().unwrap());
    let r = app.handle(req).await;
    let status = r.status().as_u16();
    if status >= 500 {
        eprintln!("{method} {uri}: {status} {}", String::from_utf8_lossy(r.body()));
    }
    status
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
