//! Group commit: the writes of one process waiting for the same branch go out together, one
//! commit each (history stays one version per commit) and one push for all. The first writer
//! to find no push under way leads: it takes every write in line and answers each; the others
//! wait, within their deadline, for their answer. Correctness never rests on this (other
//! instances still race, settled by the compare-and-swap); it makes one instance one racer.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::decide::{StateBody, Write};
use super::{BackendError, LockName, Outcome};

/// The most writes one push carries, and the most state bytes (at least one write always goes).
const MAX_WRITES: usize = 32;
const MAX_BYTES: usize = 32 << 20;

/// One write waiting for its turn, owned so that a leader on another thread can make it.
pub(super) struct Job {
    pub path: String,
    pub content: Option<StateBody>,
    pub lock_id: Option<String>,
    pub force: bool,
    pub subject: Option<String>,
    pub lock: LockName,
    answer: Mutex<Option<Result<Outcome, BackendError>>>,
}

impl Job {
    pub fn new(write: &Write<'_>, lock: LockName) -> Arc<Self> {
        Arc::new(Job {
            path: write.path.to_owned(),
            content: write.content.cloned(),
            lock_id: write.lock_id.map(str::to_owned),
            force: write.force,
            subject: write.subject.map(str::to_owned),
            lock,
            answer: Mutex::new(None),
        })
    }

    pub fn write(&self) -> Write<'_> {
        Write {
            path: &self.path,
            content: self.content.as_ref(),
            lock_id: self.lock_id.as_deref(),
            force: self.force,
            subject: self.subject.as_deref(),
        }
    }

    pub fn answer(&self, result: Result<Outcome, BackendError>) {
        *self.answer.lock().expect("answer poisoned") = Some(result);
    }

    fn take_answer(&self) -> Option<Result<Outcome, BackendError>> {
        self.answer.lock().expect("answer poisoned").take()
    }

    fn bytes(&self) -> usize {
        self.content.as_ref().map_or(0, |c| c.bytes().len())
    }
}

/// The writes in line per branch. A branch no one waits for is forgotten, so the table never
/// outgrows the writes in flight.
#[derive(Default)]
pub(super) struct Lines {
    lines: Mutex<HashMap<String, Line>>,
    changed: Condvar,
}

#[derive(Default)]
struct Line {
    leading: bool,
    waiting: VecDeque<Arc<Job>>,
}

impl Lines {
    /// `job`'s answer: made by this thread as the leader of a batch (`push` makes one batch and
    /// answers each of its jobs), or by another's. `None`: the deadline passed first.
    pub fn submit(
        &self,
        branch: &str,
        job: Arc<Job>,
        deadline: Instant,
        mut push: impl FnMut(&mut Batch<'_>),
    ) -> Option<Result<Outcome, BackendError>> {
        let mut lines = self.lines.lock().expect("lines poisoned");
        lines.entry(branch.to_owned()).or_default().waiting.push_back(Arc::clone(&job));
        loop {
            if let Some(answer) = job.take_answer() {
                return Some(answer);
            }
            let line = lines.get_mut(branch).expect("a line with a job in it");
            if !line.leading {
                line.leading = true;
                let mut batch = Batch { lines: self, branch, jobs: Vec::new(), bytes: 0 };
                take_batch(&mut line.waiting, &mut batch.jobs, &mut batch.bytes);
                drop(lines);
                push(&mut batch);
                for unanswered in batch.jobs.iter().filter(|j| j.answer.lock().expect("answer poisoned").is_none()) {
                    unanswered.answer(Err(BackendError::Storage(crate::storage::StorageError::Local(
                        "a batch of writes ended without answering one".into(),
                    ))));
                }
                lines = self.lines.lock().expect("lines poisoned");
                let line = lines.get_mut(branch).expect("a led line");
                line.leading = false;
                if line.waiting.is_empty() {
                    lines.remove(branch);
                }
                self.changed.notify_all();
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Still in line: withdrawn. Taken into a batch: its push may land, and the
                // caller hears the deadline (a retry then finds it stored).
                line.waiting.retain(|j| !Arc::ptr_eq(j, &job));
                if line.waiting.is_empty() && !line.leading {
                    lines.remove(branch);
                }
                return None;
            }
            lines = self.changed.wait_timeout(lines, left).expect("lines poisoned").0;
        }
    }

    #[cfg(test)]
    fn branches(&self) -> usize {
        self.lines.lock().expect("lines poisoned").len()
    }
}

/// The writes one leader pushes together.
pub(super) struct Batch<'a> {
    lines: &'a Lines,
    branch: &'a str,
    pub jobs: Vec<Arc<Job>>,
    bytes: usize,
}

impl Batch<'_> {
    /// Take in the writes that joined the line since (a leader that lost a race takes the
    /// writes that arrived meanwhile into its next attempt), within the bounds.
    pub fn join_waiting(&mut self) {
        let mut lines = self.lines.lines.lock().expect("lines poisoned");
        if let Some(line) = lines.get_mut(self.branch) {
            take_batch(&mut line.waiting, &mut self.jobs, &mut self.bytes);
        }
    }
}

/// Move writes from the head of the line into `batch`, up to the bounds (always at least one).
fn take_batch(waiting: &mut VecDeque<Arc<Job>>, batch: &mut Vec<Arc<Job>>, bytes: &mut usize) {
    while let Some(next) = waiting.front() {
        if !batch.is_empty() && (batch.len() >= MAX_WRITES || *bytes + next.bytes() > MAX_BYTES) {
            break;
        }
        *bytes += next.bytes();
        batch.extend(waiting.pop_front());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn job(path: &str) -> Arc<Job> {
        let write = Write { path, content: None, lock_id: None, force: false, subject: None };
        Job::new(&write, LockName::new("main", path))
    }

    #[test]
    fn one_leader_takes_everyone_waiting_and_answers_each() {
        let lines = Arc::new(Lines::default());
        let soon = || Instant::now() + Duration::from_secs(5);
        let (entered, release) = (Arc::new(std::sync::Barrier::new(2)), Arc::new(std::sync::Barrier::new(2)));
        let batches = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
        let record = {
            let batches = Arc::clone(&batches);
            move |batch: &mut Batch<'_>| {
                batches.lock().unwrap().push(batch.jobs.iter().map(|j| j.path.clone()).collect());
                for j in &batch.jobs {
                    j.answer(Ok(Outcome::Done));
                }
            }
        };
        // The first writer leads and holds its push until three more are in line.
        let leader = {
            let (lines, entered, release, record) =
                (Arc::clone(&lines), entered.clone(), release.clone(), record.clone());
            std::thread::spawn(move || {
                lines.submit("refs/heads/main", job("a"), soon(), |batch| {
                    entered.wait();
                    release.wait();
                    record(batch)
                })
            })
        };
        entered.wait();
        let mut followers = Vec::new();
        for path in ["b", "c", "d"] {
            let (mine, record) = (Arc::clone(&lines), record.clone());
            followers.push(std::thread::spawn(move || mine.submit("refs/heads/main", job(path), soon(), record)));
            while lines.lines.lock().unwrap().get("refs/heads/main").map_or(0, |l| l.waiting.len()) < followers.len() {
                std::thread::yield_now();
            }
        }
        // A writer whose deadline passes while in line leaves it and hears so.
        assert!(lines
            .submit("refs/heads/main", job("late"), Instant::now() + Duration::from_millis(20), |_| {})
            .is_none());
        release.wait();
        assert!(matches!(leader.join().unwrap(), Some(Ok(Outcome::Done))));
        for f in followers {
            assert!(matches!(f.join().unwrap(), Some(Ok(Outcome::Done))));
        }
        let batches = batches.lock().unwrap().clone();
        assert_eq!(batches, vec![vec!["a".to_string()], vec!["b".into(), "c".into(), "d".into()]]);
        assert_eq!(lines.branches(), 0, "a branch no one waits for is forgotten");
    }

    #[test]
    fn a_push_that_answers_nothing_still_answers_everyone() {
        let lines = Lines::default();
        let answer = lines.submit("refs/heads/main", job("a"), Instant::now() + Duration::from_secs(1), |_| {});
        assert!(matches!(answer, Some(Err(BackendError::Storage(_)))), "{answer:?}");
        assert_eq!(lines.branches(), 0);
    }

    #[test]
    fn batches_are_bounded() {
        let mut waiting: VecDeque<Arc<Job>> = (0..MAX_WRITES + 5).map(|n| job(&format!("s{n}"))).collect();
        let (mut batch, mut bytes) = (Vec::new(), 0);
        take_batch(&mut waiting, &mut batch, &mut bytes);
        assert_eq!((batch.len(), waiting.len()), (MAX_WRITES, 5));
        take_batch(&mut waiting, &mut batch, &mut bytes);
        assert_eq!(batch.len(), MAX_WRITES, "a full batch takes no more");
    }
}
