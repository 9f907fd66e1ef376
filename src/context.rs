//! What one request carries from `App` down to storage: the git credentials, the
//! deadline that bounds every network wait, and the counters of its log line.
//! A leaf module: every layer may use it, it uses none of them.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Credentials for the git host (HTTP basic auth). Never printed: `Debug` hides them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// The deployment's SSH identity for `ssh://` remotes: a private key (OpenSSH format) and
/// the host keys it trusts (known_hosts lines). Never printed: `Debug` hides the key.
#[derive(Clone)]
pub struct SshIdentity {
    pub private_key: zeroize::Zeroizing<String>,
    pub known_hosts: String,
}

impl std::fmt::Debug for SshIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SshIdentity(<redacted>)")
    }
}

/// The instant by which a request must be answered.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn at(instant: Instant) -> Self {
        Deadline(instant)
    }

    pub fn after(budget: Duration) -> Self {
        Deadline(Instant::now() + budget)
    }

    pub fn instant(&self) -> Instant {
        self.0
    }

    /// Time left, `None` once it has passed.
    pub fn remaining(&self) -> Option<Duration> {
        self.0.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    pub fn expired(&self) -> bool {
        self.remaining().is_none()
    }

    /// A timeout for one socket wait: what is left, at most `cap`, never zero (zero means "forever" to std).
    pub fn io_timeout(&self, cap: Duration) -> Duration {
        self.remaining().unwrap_or(Duration::from_millis(1)).min(cap).max(Duration::from_millis(1))
    }
}

/// Conversations with the git host and their time, for the request's log line.
#[derive(Debug, Default)]
pub struct Counters {
    round_trips: AtomicU32,
    micros: AtomicU64,
}

impl Counters {
    pub fn record(&self, took: Duration) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.micros.fetch_add(took.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    pub fn round_trips(&self) -> u32 {
        self.round_trips.load(Ordering::Relaxed)
    }

    pub fn time(&self) -> Duration {
        Duration::from_micros(self.micros.load(Ordering::Relaxed))
    }
}

/// One request's context. Cheap to share: the flag and counters are behind `Arc`s so the
/// entry point keeps a handle while the work runs on the blocking pool.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub credentials: Option<Credentials>,
    /// The deployment's SSH identity (`env` and `secret` modes), for `ssh://` remotes.
    pub ssh: Option<Arc<SshIdentity>>,
    pub deadline: Deadline,
    /// Set when the deadline passes; handed to gix so that a long fetch stops.
    pub interrupt: Arc<AtomicBool>,
    pub counters: Arc<Counters>,
}

impl RequestContext {
    pub fn new(credentials: Option<Credentials>, deadline: Deadline) -> Self {
        RequestContext {
            credentials,
            ssh: None,
            deadline,
            interrupt: Arc::new(AtomicBool::new(false)),
            counters: Arc::new(Counters::default()),
        }
    }

    /// A context with a generous deadline and no credentials (tools, tests, start-up).
    pub fn unbounded() -> Self {
        Self::new(None, Deadline::after(Duration::from_secs(3600)))
    }

    /// The same context carrying the deployment's SSH identity.
    pub fn with_ssh(mut self, ssh: Option<Arc<SshIdentity>>) -> Self {
        self.ssh = ssh;
        self
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// Whether the request must stop now: its deadline passed or it was interrupted.
    pub fn out_of_time(&self) -> bool {
        self.interrupt.load(Ordering::Relaxed) || self.deadline.expired()
    }

    /// Sleep `wanted`, but never past the deadline. Returns false when no time is left.
    pub fn pause(&self, wanted: Duration) -> bool {
        match self.deadline.remaining() {
            Some(left) if left > wanted => {
                std::thread::sleep(wanted);
                true
            }
            _ => false,
        }
    }

    /// Run one conversation with the git host, counting it.
    pub fn count_round_trip<T>(&self, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        self.counters.record(started.elapsed());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_bounds_waits_and_pauses() {
        let past = RequestContext::new(None, Deadline::at(Instant::now() - Duration::from_millis(5)));
        assert!(past.out_of_time());
        assert!(!past.pause(Duration::from_millis(1)));
        assert_eq!(past.deadline.io_timeout(Duration::from_secs(60)), Duration::from_millis(1));
        let soon = RequestContext::new(None, Deadline::after(Duration::from_millis(200)));
        assert!(!soon.out_of_time());
        assert!(soon.deadline.io_timeout(Duration::from_secs(60)) <= Duration::from_millis(200));
        assert!(!soon.pause(Duration::from_secs(1)), "a pause past the deadline is refused");
        soon.interrupt.store(true, Ordering::Relaxed);
        assert!(soon.out_of_time());
        let c = Counters::default();
        c.record(Duration::from_millis(3));
        c.record(Duration::from_millis(4));
        assert_eq!((c.round_trips(), c.time()), (2, Duration::from_millis(7)));
    }
}
