//! `gitstate doctor`: checks one repository on its git host for what gitstate's promises rest
//! on (reachable, credentials for read and write, receive-pack's capabilities, and the
//! compare-and-swap itself, tried on scratch refs no lock can ever be named) and reports one
//! line per check. `serve --check-host` runs the same checks before it starts.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::context::{Credentials, Deadline, RequestContext};
use crate::storage::git::push::{self, Advertisement};
use crate::storage::git::{tree, Author, RemoteStore};
use crate::storage::{ObjectId, RefUpdate, RepoUrl, Storage, StorageError, UpdateOutcome};

/// The name of the compare-and-swap checks in the report.
const CAS: &str = "compare-and-swap";

/// What one check came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The promise this check stands for holds.
    Pass,
    /// Worth knowing, not a broken promise (a capability that only saves requests).
    Note,
    /// A promise of gitstate's does not hold on this host.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub verdict: Verdict,
    pub name: &'static str,
    /// What was seen.
    pub detail: String,
    /// What it means for users, said where it is not a pass.
    pub meaning: &'static str,
}

/// Every check, in the order they ran.
#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether gitstate's promises hold on the host.
    pub fn healthy(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.verdict != Verdict::Fail)
    }

    /// The report as text, one line per check.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let tag = match c.verdict {
                Verdict::Pass => "PASS",
                Verdict::Note => "NOTE",
                Verdict::Fail => "FAIL",
            };
            out.push_str(&format!("{tag}  {}: {}", c.name, c.detail));
            if c.verdict != Verdict::Pass && !c.meaning.is_empty() {
                out.push_str(&format!(" ({})", c.meaning));
            }
            out.push('\n');
        }
        let mut broken: Vec<&str> = self.checks.iter().filter(|c| c.verdict == Verdict::Fail).map(|c| c.name).collect();
        broken.dedup();
        if broken.is_empty() {
            out.push_str("gitstate's promises hold on this host\n");
        } else {
            out.push_str(&format!("broken on this host: {}\n", broken.join(", ")));
        }
        out
    }

    fn add(&mut self, verdict: Verdict, name: &'static str, detail: impl Into<String>, meaning: &'static str) {
        self.checks.push(Check { verdict, name, detail: detail.into(), meaning });
    }
}

/// How long each step may take.
const STEP_BUDGET: Duration = Duration::from_secs(30);

/// Check `url` (states on `branch`) with `credentials`; `scratch_dir` holds a throwaway cache.
/// `ssh` is the deployment's SSH identity, for `ssh://` repositories.
pub fn check(
    url: &RepoUrl,
    branch: &str,
    credentials: Option<Credentials>,
    ssh: Option<std::sync::Arc<crate::context::SshIdentity>>,
    scratch_dir: &Path,
) -> Report {
    let mut report = Report::default();
    let ctx = || RequestContext::new(credentials.clone(), Deadline::after(STEP_BUDGET)).with_ssh(ssh.clone());
    let author = Author { name: "gitstate doctor".into(), email: "doctor@gitstate.invalid".into() };

    // Reachable, and the credentials read.
    let started = Instant::now();
    let read = RemoteStore::open(url.clone(), &scratch_dir.join("cache"), author.clone())
        .and_then(|store| store.fetch_tips(&ctx(), &[format!("refs/heads/{branch}")]));
    match read {
        Ok(tips) => report.add(
            Verdict::Pass,
            "reachable, read accepted",
            format!("branch {branch} {} ({} ms)", if tips.is_empty() { "not there yet" } else { "found" }, ms(started)),
            "",
        ),
        Err(e) => {
            report.add(Verdict::Fail, "reachable, read accepted", e.to_string(), meaning_of(&e));
            return report;
        }
    }

    // Protocol v2 for looks.
    report.checks.push(protocol_v2(url, &ctx()));

    // receive-pack's capabilities.
    let adv = match push::look(url, &ctx()) {
        Ok(adv) => adv,
        Err(e) => {
            report.add(Verdict::Fail, "receive-pack", e.to_string(), meaning_of(&e));
            return report;
        }
    };
    capabilities(&mut report, &adv);

    // The compare-and-swap itself, on scratch refs.
    match Scratch::new(url, &author, scratch_dir) {
        Ok(scratch) => scratch.check_into(&mut report, &ctx),
        Err(e) => report.add(Verdict::Fail, "compare-and-swap", format!("cannot prepare: {e}"), ""),
    }

    // Round trip.
    let mut times: Vec<u128> = (0..3)
        .filter_map(|_| {
            let t = Instant::now();
            push::look(url, &ctx()).ok().map(|_| t.elapsed().as_millis())
        })
        .collect();
    times.sort_unstable();
    if let Some(median) = times.get(times.len() / 2) {
        report.add(
            Verdict::Pass,
            "round trip",
            format!("{median} ms per advertisement (a look costs one request, a push two)"),
            "",
        );
    }
    report
}

fn ms(since: Instant) -> u128 {
    since.elapsed().as_millis()
}

/// What a failure to reach or read means for users.
fn meaning_of(e: &StorageError) -> &'static str {
    match e {
        StorageError::CredentialsRefused => "the credentials are refused: every request would answer 401",
        StorageError::RepositoryNotFound(_) => "the repository does not exist for these credentials: 502",
        StorageError::CertificateRefused(_) => "the host's TLS certificate is refused: trust its CA (SSL_CERT_FILE)",
        StorageError::HostKeyRefused { .. } => {
            "the SSH host's key is not the one pinned: check it and fix GITSTATE_SSH_KNOWN_HOSTS (every request would answer 502)"
        }
        StorageError::SshKeyRefused { .. } => {
            "the host refuses the deployment's SSH key: add it (e.g. as a deploy key with write access); 502"
        }
        StorageError::HostUnavailable(_) | StorageError::ConnectionDropped(_) | StorageError::DeadlineExceeded(_) => {
            "the host cannot be reached: 503"
        }
        _ => "gitstate cannot work with this host",
    }
}

fn protocol_v2(url: &RepoUrl, ctx: &RequestContext) -> Check {
    use gix::protocol::transport::client::blocking_io::Transport as _;
    use gix::protocol::transport::{Protocol, Service};
    let spoke = crate::storage::git::transport::connect(url, Protocol::V2, ctx)
        .map_err(|f| f.to_string())
        .and_then(|mut t| t.handshake(Service::UploadPack, &[]).map(|r| r.actual_protocol).map_err(|e| e.to_string()));
    match spoke {
        Ok(Protocol::V2) => {
            Check { verdict: Verdict::Pass, name: "protocol v2", detail: "offered".into(), meaning: "" }
        }
        Ok(other) => Check {
            verdict: Verdict::Note,
            name: "protocol v2",
            detail: format!("not offered (the host answers {other:?})"),
            meaning: "each look needs the full handshake: more requests, nothing unsafe",
        },
        Err(e) => Check {
            verdict: Verdict::Note,
            name: "protocol v2",
            detail: format!("unknown: {e}"),
            meaning: "looks use the full handshake",
        },
    }
}

fn capabilities(report: &mut Report, adv: &Advertisement) {
    let caps = adv.caps;
    let has = |on: bool| if on { "offered" } else { "not offered" };
    report.add(
        if caps.report_status { Verdict::Pass } else { Verdict::Fail },
        "report-status",
        has(caps.report_status),
        "without it no push's outcome can be known: gitstate cannot write",
    );
    report.add(
        if caps.delete_refs { Verdict::Pass } else { Verdict::Fail },
        "delete-refs",
        has(caps.delete_refs),
        "without it no lock can be released",
    );
    report.add(
        if caps.atomic { Verdict::Pass } else { Verdict::Note },
        "atomic",
        has(caps.atomic),
        "a write under a lock is checked against the push's own advertisement only: a window of one round trip",
    );
    report.add(
        if caps.side_band_64k { Verdict::Pass } else { Verdict::Note },
        "side-band-64k",
        has(caps.side_band_64k),
        "the host's messages are not told from its report",
    );
}

/// One command of a scratch push: ref, old id, new id.
type Command<'a> = (&'a str, Option<ObjectId>, Option<ObjectId>);

/// Two scratch refs under `refs/gitstate-doctor/<random>/`, outside `refs/heads/` (no state,
/// no lock can ever be named there), and three commits to move them with.
struct Scratch {
    url: RepoUrl,
    repo: gix::Repository,
    a: String,
    b: String,
    c: [ObjectId; 3],
}

impl Scratch {
    fn new(url: &RepoUrl, author: &Author, dir: &Path) -> Result<Self, StorageError> {
        let repo = tree::open_or_init_bare(&dir.join("scratch.git"))?.to_thread_local();
        let run = format!("{:016x}", fastrand::u64(..));
        let mut c = [ObjectId::null(gix::hash::Kind::Sha1); 3];
        for (i, id) in c.iter_mut().enumerate() {
            let content = format!("gitstate doctor {run} commit {i}\n");
            *id = tree::write_commit(&repo, author, None, "doctor.txt", Some(content.as_bytes()), "gitstate doctor")?;
        }
        let base = format!("refs/gitstate-doctor/{run}");
        Ok(Scratch { url: url.clone(), repo, a: format!("{base}/a"), b: format!("{base}/b"), c })
    }

    fn push(
        &self,
        ctx: &RequestContext,
        updates: &[(&str, Option<ObjectId>, Option<ObjectId>)],
    ) -> Option<UpdateOutcome> {
        let updates: Vec<RefUpdate> =
            updates.iter().map(|(name, old, new)| RefUpdate { name: name.to_string(), old: *old, new: *new }).collect();
        push::push_unchecked(&self.repo, &self.url, &updates, ctx).ok().map(|p| p.outcome)
    }

    /// The scratch refs as the host has them now.
    fn now(&self, ctx: &RequestContext) -> Option<(Option<ObjectId>, Option<ObjectId>)> {
        push::look(&self.url, ctx).ok().map(|adv| (adv.refs.get(&self.a).copied(), adv.refs.get(&self.b).copied()))
    }

    fn check_into(&self, report: &mut Report, ctx: &dyn Fn() -> RequestContext) {
        let [c1, c2, _] = self.c;
        // Write access: two creates.
        let created = self.push(&ctx(), &[(&self.a, None, Some(c1))]);
        let created_b = self.push(&ctx(), &[(&self.b, None, Some(c2))]);
        if created != Some(UpdateOutcome::Applied) || created_b != Some(UpdateOutcome::Applied) {
            report.add(
                Verdict::Fail,
                "write accepted",
                format!("creating {} was answered {created:?}", self.a),
                "these credentials cannot push: no state can be written, no lock taken",
            );
        } else {
            report.add(Verdict::Pass, "write accepted", format!("created {} and {}", self.a, self.b), "");
            self.check_refusals(report, ctx);
            self.check_atomic(report, ctx);
        }
        self.clean(report, ctx);
    }

    /// Each update that must be refused is, and is reported refused.
    fn check_refusals(&self, report: &mut Report, ctx: &dyn Fn() -> RequestContext) {
        let [c1, c2, c3] = self.c;
        let expect = Some((Some(c1), Some(c2)));
        let cases: [(&str, &[Command<'_>], &'static str); 3] = [
            (
                "a create of a ref that exists is refused",
                &[(&self.a, None, Some(c3))],
                "two clients could both take one lock",
            ),
            (
                "an update naming a wrong old id is refused",
                &[(&self.a, Some(c2), Some(c3))],
                "a write could land over another's",
            ),
            (
                "a delete naming a wrong old id is refused",
                &[(&self.a, Some(c2), None)],
                "an UNLOCK could delete another's lock",
            ),
        ];
        for (what, updates, meaning) in cases {
            let answer = self.push(&ctx(), updates);
            let after = self.now(&ctx());
            if after == expect && answer == Some(UpdateOutcome::Applied) {
                // Not applied, yet reported `ok`: every answer of this host is in doubt.
                report.add(
                    Verdict::Fail,
                    CAS,
                    format!("{what}, but the host answered `ok` for it"),
                    "a client refused by the host is told it succeeded: two clients can both hold one lock",
                );
            } else if after == expect {
                report.add(Verdict::Pass, CAS, what.to_string(), "");
            } else {
                report.add(
                    Verdict::Fail,
                    CAS,
                    format!("{what}: NOT SO (answered {answer:?}; {} is now {:?})", self.a, after.and_then(|(a, _)| a)),
                    meaning,
                );
                if let Some((Some(now), _)) = after {
                    // Put it back for the next case.
                    let _ = self.push(&ctx(), &[(&self.a, Some(now), Some(c1))]);
                }
            }
        }
    }

    /// An atomic push with one failing command applies nothing (when atomic is offered).
    fn check_atomic(&self, report: &mut Report, ctx: &dyn Fn() -> RequestContext) {
        let [c1, c2, c3] = self.c;
        let atomic = push::look(&self.url, &ctx()).map(|adv| adv.caps.atomic).unwrap_or(false);
        if !atomic {
            return;
        }
        let answer = self.push(&ctx(), &[(&self.a, Some(c1), Some(c3)), (&self.b, Some(c1), Some(c3))]);
        if self.now(&ctx()) == Some((Some(c1), Some(c2))) {
            report.add(Verdict::Pass, CAS, "an atomic push with one failing command applies nothing", "");
        } else {
            report.add(
                Verdict::Fail,
                CAS,
                format!("an atomic push with one failing command applied part of it (answered {answer:?})"),
                "a write under a lock could land after the lock moved",
            );
        }
    }

    /// Remove the scratch refs, whatever they point at now.
    fn clean(&self, report: &mut Report, ctx: &dyn Fn() -> RequestContext) {
        let Some((a, b)) = self.now(&ctx()) else { return };
        let mut left = Vec::new();
        for (name, at) in [(&self.a, a), (&self.b, b)] {
            if let Some(id) = at {
                if self.push(&ctx(), &[(name, Some(id), None)]) != Some(UpdateOutcome::Applied) {
                    left.push(name.clone());
                }
            }
        }
        if !left.is_empty() {
            report.add(
                Verdict::Note,
                "clean-up",
                format!("could not remove {}", left.join(", ")),
                "remove them by hand",
            );
        }
    }
}
