//! The benchmark (`examples/bench.rs`) cannot rot: its tiny size runs in every `cargo test`
//! and must exit 0 having printed every table. Figures only; nothing is asserted on time.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Every table heading the benchmark prints (the same list as `HEADINGS` in examples/bench.rs).
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

/// `<target>/<profile>/examples/bench`, next to this test binary (`<target>/<profile>/deps/`);
/// `cargo test` builds the examples before it runs the tests.
fn bench_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test");
    let mut dir = exe.parent().expect("the directory of the running test").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let bin = dir.join("examples").join("bench");
    assert!(bin.is_file(), "{} is missing: `cargo build --examples` (cargo test builds it)", bin.display());
    bin
}

#[test]
fn the_benchmark_runs_at_a_tiny_size_and_prints_every_table() {
    let started = Instant::now();
    let mut child = Command::new(bench_bin())
        .args(["1", "--tiny"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the benchmark");
    // Read both pipes on threads so that a full pipe cannot stall the benchmark.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).map(|_| s)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).map(|_| s)
    });
    let deadline = started + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the benchmark still ran after 300 s; killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The pipes close when the benchmark and everything it started are gone: a server left
    // running with the benchmark's stdout would hang here.
    let out = out.join().unwrap().expect("the benchmark's stdout");
    let err = err.join().unwrap().expect("the benchmark's stderr");
    println!("{out}");
    eprintln!("{err}");
    println!("tiny benchmark: {:.0} s", started.elapsed().as_secs_f64());
    assert!(status.success(), "the benchmark failed ({status}):\n{out}\n{err}");
    for h in HEADINGS {
        assert!(out.contains(h), "the benchmark did not print the table {h:?}:\n{out}");
    }
    assert!(out.contains("benchmark done"), "{out}");
}
