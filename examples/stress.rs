//! Stress command of the safety proof (issue 5): races against a real `git daemon`
//! that this command starts, every racer its own `App` with its own cache directory
//! (as separate processes or Lambda instances), git's compare-and-swap the only arbiter.
//!
//! - lock race: ROUNDS × LOCKERS lockers LOCK one state at the same moment; exactly one
//!   must win every round (the others get 423 naming it); the winner unlocks. Even rounds
//!   use fresh instances (cold caches), odd rounds reuse the previous ones (warm).
//! - 16 writers: 16 instances write 16 distinct states of one repository at once, ROUNDS/10
//!   times (fresh instances on even rounds, warm on odd ones); every write must land and the
//!   final tree hold each state's last content.
//!   Attempts per write come from gitstate's own `state written` log event (`attempts=N`).
//! - 2 writers, one state, no lock: both read, both write the next serial at once; exactly
//!   one lands, the guard answers 409 to the other, nothing acknowledged is lost.
//!
//! Run: `cargo run --release --example stress -- [ROUNDS] [LOCKERS]` (default 100 × 10 =
//! 1,000 lock trials); `GITSTATE_WRITE_RETRIES` sets the retry budget of the writers. Needs `git` (for the daemon and to inspect the server repository).
//! Prints a table of figures; exits non-zero when any invariant broke.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gitstate::app::App;
use gitstate_testkit::gitd::{self, git_try};
use gitstate_testkit::races;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// `attempts` and `elapsed_ms` of every `state written` event, and how many writes gave up.
static WRITTEN: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
static GAVE_UP: AtomicUsize = AtomicUsize::new(0);

/// Counts gitstate's write events: the figures come from the server code itself.
struct WriteEvents;

#[derive(Default)]
struct Fields {
    message: String,
    attempts: Option<u64>,
    elapsed_ms: Option<u64>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "attempts" => self.attempts = Some(value),
            "elapsed_ms" => self.elapsed_ms = Some(value),
            _ => {}
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_u64(field, value.max(0) as u64);
    }
}

impl<S: tracing::Subscriber> Layer<S> for WriteEvents {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        match f.message.as_str() {
            "state written" => WRITTEN.lock().unwrap().push((f.attempts.unwrap_or(0), f.elapsed_ms.unwrap_or(0))),
            "write gave up" => {
                GAVE_UP.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100).max(1);
    let lockers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10).max(2);
    let writer_rounds = (rounds / 10).max(1);
    let pair_rounds = (rounds / 4).max(1);
    let writers = 16;

    // Warnings of gitstate (e.g. `write gave up`) on stderr; the write events counted either way.
    let filter = tracing_subscriber::EnvFilter::try_from_env("GITSTATE_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::registry()
        .with(WriteEvents)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter))
        .init();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let daemon = gitd::GitDaemon::start();
    let url = daemon.create_repo("stress.git");
    let server = daemon.repo_dir("stress.git");
    let tmp = tempfile::tempdir().unwrap();
    let made = AtomicUsize::new(0);
    // GITSTATE_WRITE_RETRIES is honoured, to try other retry budgets.
    let mut base = gitstate::config::Config::default();
    if let Some(n) = std::env::var("GITSTATE_WRITE_RETRIES").ok().and_then(|v| v.parse().ok()) {
        base.write_retries = n;
    }
    let retries = base.write_retries;
    let app = || {
        races::new_app_with(
            base.clone(),
            &url,
            tmp.path().join(format!("cache-{}", made.fetch_add(1, Ordering::SeqCst))),
        )
    };
    println!(
        "gitstate stress: git daemon on 127.0.0.1:{}, {} build, write retries {retries}; every racer its own App and cache",
        daemon.port(),
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    let mut violations: Vec<String> = Vec::new();
    let started = Instant::now();

    // Lock race.
    let t = Instant::now();
    let mut apps: Vec<Arc<App>> = Vec::new();
    let (mut min_w, mut max_w, mut refused) = (usize::MAX, 0, 0);
    for round in 0..rounds {
        if round % 2 == 0 {
            apps = (0..lockers).map(|_| app()).collect();
        }
        let r = rt.block_on(races::lock_round(&apps, &server, "envs/stress/terraform.tfstate", round));
        min_w = min_w.min(r.winners);
        max_w = max_w.max(r.winners);
        refused += r.refused;
        violations.extend(r.violations);
        if (round + 1) % 10 == 0 {
            eprintln!("lock race: {} of {rounds} rounds", round + 1);
        }
    }
    let lock_time = t.elapsed();
    drop(apps);

    // 16 writers on 16 distinct states.
    let t = Instant::now();
    WRITTEN.lock().unwrap().clear();
    GAVE_UP.store(0, Ordering::SeqCst);
    let mut apps: Vec<Arc<App>> = Vec::new();
    let (mut writes, mut landed, mut lost_w) = (0, 0, 0);
    for round in 0..writer_rounds {
        if round % 2 == 0 {
            apps = (0..writers).map(|_| app()).collect();
        }
        let r = rt.block_on(races::writers_round(&apps, &server, "team", round));
        writes += r.writes;
        landed += r.landed;
        lost_w += r.lost;
        violations.extend(r.violations);
    }
    let written = std::mem::take(&mut *WRITTEN.lock().unwrap());
    let gave_up = GAVE_UP.load(Ordering::SeqCst);
    let mut attempts: Vec<u64> = written.iter().map(|w| w.0).collect();
    let mut write_ms: Vec<u64> = written.iter().map(|w| w.1).collect();
    let writers_time = t.elapsed();
    drop(apps);

    // Two writers on one state, no lock.
    let t = Instant::now();
    let (a, b) = (app(), app());
    let (mut pair_landed, mut pair_refused, mut lost_p) = (0, 0, 0);
    for round in 0..pair_rounds {
        let r = rt.block_on(races::pair_round([&a, &b], &server, "shared.tfstate", round));
        pair_landed += r.landed;
        pair_refused += r.refused;
        lost_p += r.lost;
        violations.extend(r.violations);
    }
    let pair_time = t.elapsed();

    let fsck = git_try(&server, &["fsck", "--strict"]);
    if !fsck.status.success() {
        violations.push(format!("git fsck --strict: {}", String::from_utf8_lossy(&fsck.stderr)));
    }

    let row = |what: &str, figure: String, time: Duration| {
        println!("| {what:<34} | {figure:<72} | {:>8.1} s |", time.as_secs_f64())
    };
    println!("| {:<34} | {:<72} | {:>10} |", "scenario", "figures", "time");
    println!("|{:-<36}|{:-<74}|{:-<12}|", "", "", "");
    row(
        "lock race",
        format!(
            "{} trials ({rounds} rounds x {lockers} lockers); winners per round min {min_w} max {max_w}; {refused} refused with 423",
            rounds * lockers
        ),
        lock_time,
    );
    row(
        &format!("{writers} writers, {writers} states"),
        format!(
            "{writes} writes ({writer_rounds} rounds); {landed} landed; {gave_up} gave up (503); lost updates {lost_w}"
        ),
        writers_time,
    );
    row(
        &format!("  retries per write at {writers} writers"),
        format!(
            "attempts median {} max {} (1 = no retry); write time median {} ms max {} ms",
            median(&mut attempts),
            attempts.iter().max().copied().unwrap_or(0),
            median(&mut write_ms),
            write_ms.iter().max().copied().unwrap_or(0)
        ),
        Duration::ZERO,
    );
    row(
        "2 writers, 1 state, no lock",
        format!("{pair_rounds} rounds; {pair_landed} landed; {pair_refused} refused with 409; lost updates {lost_p}"),
        pair_time,
    );
    row(
        "total",
        format!("lost updates {}; invariant violations {}", lost_w + lost_p, violations.len()),
        started.elapsed(),
    );
    if violations.is_empty() {
        println!("all invariants held");
        ExitCode::SUCCESS
    } else {
        println!("INVARIANTS BROKEN:");
        for v in &violations {
            println!("  {v}");
        }
        ExitCode::FAILURE
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}
