//! The backend rules: who holds a lock, when a write may land, what a commit says.
//! Works over any [`Storage`]; every decision that must hold across processes is settled
//! by the storage's compare-and-swap in one shared loop, never by a local mutex.

mod batch;
pub(crate) mod browse;
pub(crate) mod decide;
pub(crate) mod diff;
mod domain;
pub(crate) mod history;
mod lock_info;
mod memory;
pub mod sealing;
mod trailers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::storage::{ObjectId, RefUpdate, RequestContext, Storage, StorageError, Tips, UpdateOutcome};
pub use decide::StateBody;
use decide::{decide_write, Decision, Holder, Write};
pub use domain::{BackendError, Operation, Outcome, Stale};
pub use lock_info::{LockInfo, LockInfoError, MAX_LOCK_INFO_BYTES};
use memory::Memory;
use sealing::Sealing;
use trailers::Trailers;

/// Rejected creates of a lock with no holder in sight before the lock is taken to nest with
/// another (the first is our blind try; a real race would show a holder at the next look).
const NESTED_LOCK_EVIDENCE: u32 = 2;

/// Settings of the backend over one repository.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// Branch that holds the states when the request names none.
    pub branch: String,
    /// Pushes a write (or lock, or unlock) may make before it gives up on a moving branch;
    /// 0: as many as its deadline allows.
    pub write_retries: u32,
}

/// The backend over one repository.
pub struct Backend {
    storage: Arc<dyn Storage>,
    settings: BackendSettings,
    /// How states are encrypted before they reach storage, and opened after.
    sealing: Arc<Sealing>,
    /// LockInfos and last-seen tips. A tip is only ever a guess to push against: every push
    /// carries its expected old ids, and any answer other than a push comes from a fresh look.
    memory: Memory,
    /// Writes of this process waiting for the same branch, pushed together.
    lines: batch::Lines,
}

/// The refs a batch looks at: the branch, and both lock branches of every write's state.
fn batch_refs(branch_ref: &str, jobs: &[Arc<batch::Job>]) -> Vec<String> {
    let mut refs = vec![branch_ref.to_owned()];
    for lock_ref in jobs.iter().flat_map(|job| job.lock.refs()) {
        if !refs.contains(&lock_ref) {
            refs.push(lock_ref);
        }
    }
    refs
}

/// What one write of a batch comes to, given the tips.
enum JobStep {
    Answer(Result<Outcome, BackendError>),
    Commit { commit: ObjectId, updates: Vec<RefUpdate> },
}

/// What one step of a compare-and-swap loop comes to, given the tips.
enum Step {
    Answer(Result<Outcome, BackendError>),
    Push(Vec<RefUpdate>),
}

impl Backend {
    pub fn new(storage: Arc<dyn Storage>, settings: BackendSettings, sealing: Arc<Sealing>) -> Self {
        Backend { storage, settings, sealing, memory: Memory::default(), lines: batch::Lines::default() }
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Run one operation on the state at `path` of `branch` (default branch when `None`). Blocking.
    pub fn handle(
        &self,
        ctx: &RequestContext,
        branch: Option<&str>,
        path: &str,
        op: &Operation,
    ) -> Result<Outcome, BackendError> {
        match self.handle_once(ctx, branch, path, op) {
            // A broken cache (deleted directory, corrupt object) is cured by building a
            // fresh one and doing the request again from the remote.
            Err(BackendError::Storage(e)) if e.is_cache_corrupt() && self.storage.reset_cache()? => {
                tracing::warn!(error = %e, "cache failed; retrying on a fresh cache");
                self.memory.forget_tips();
                self.handle_once(ctx, branch, path, op)
            }
            other => other,
        }
    }

    fn handle_once(
        &self,
        ctx: &RequestContext,
        branch: Option<&str>,
        path: &str,
        op: &Operation,
    ) -> Result<Outcome, BackendError> {
        let branch = branch.unwrap_or(&self.settings.branch);
        let lock = LockName::new(branch, path);
        match op {
            Operation::GetState => self.get(ctx, branch, path),
            Operation::PutState { lock_id, body, force } => {
                let write =
                    Write { path, content: Some(body), lock_id: lock_id.as_deref(), force: *force, subject: None };
                self.write(ctx, branch, &lock, &write)
            }
            Operation::DeleteState { lock_id } => self.write(
                ctx,
                branch,
                &lock,
                &Write { path, content: None, lock_id: lock_id.as_deref(), force: true, subject: None },
            ),
            Operation::Lock(info) => self.lock(ctx, &lock, info),
            Operation::Unlock { id } => self.unlock(ctx, &lock, id.as_deref()),
            Operation::History { limit, before } => self.history(ctx, branch, path, *limit, *before),
            Operation::GetVersion { commit } => self.version(ctx, branch, path, *commit),
            Operation::Diff { from, to } => {
                let (from, to) = self.two_versions(ctx, branch, path, *from, *to)?;
                let mut body = serde_json::to_vec_pretty(&diff::diff(&from, &to)?).expect("a JSON value serializes");
                body.push(b'\n');
                Ok(Outcome::Json(body.into()))
            }
            Operation::Restore { commit, lock_id, force } => {
                self.restore(ctx, branch, &lock, *commit, lock_id.as_deref(), *force)
            }
            Operation::ListStates { limit, after } => {
                Ok(Outcome::States(self.list_states(ctx, branch, *limit, after.as_deref())?))
            }
            Operation::ViewState { history, before } => {
                Ok(Outcome::StateView(Box::new(self.view_state(ctx, branch, path, *history, *before)?)))
            }
            Operation::Compare { from, to } => {
                let (from, to) = self.two_versions(ctx, branch, path, *from, *to)?;
                Ok(Outcome::Comparison(Box::new(diff::compare(&from, &to)?)))
            }
            Operation::ForceUnlock { id, by } => {
                // A delete leaves no commit to carry a trailer: the log line is the record.
                tracing::warn!(lock_id = ?id, forced_by = ?by.as_deref().unwrap_or("anonymous"), "force-unlock from the web view");
                self.unlock(ctx, &lock, Some(id))
            }
            Operation::GetLock => {
                let tips = self.fetch_tips(ctx, &lock.refs())?;
                match self.lock_view(&tips, &lock)?.holder {
                    Some(h) => Ok(Outcome::LockInfo(h.info.raw)),
                    None => Err(BackendError::NoLock),
                }
            }
        }
    }

    /// Two versions of the state at `path`, as stored at commits `from` and `to` of the branch.
    fn two_versions(
        &self,
        ctx: &RequestContext,
        branch: &str,
        path: &str,
        from: ObjectId,
        to: ObjectId,
    ) -> Result<(Bytes, Bytes), BackendError> {
        let read = |c| match self.version(ctx, branch, path, c)? {
            Outcome::State(body) => Ok(body),
            _ => Err(BackendError::NoSuchVersion),
        };
        Ok((read(from)?, read(to)?))
    }

    fn get(&self, ctx: &RequestContext, branch: &str, path: &str) -> Result<Outcome, BackendError> {
        let branch_ref = branch_ref(branch);
        let tips = self.fetch_tips(ctx, std::slice::from_ref(&branch_ref))?;
        let Some(tip) = tips.get(&branch_ref) else { return Ok(Outcome::NoState) };
        let Some(blob) = self.storage.file_id(*tip, path)? else { return Ok(Outcome::NoState) };
        Ok(match self.storage.read_file(*tip, path)? {
            Some(stored) if !stored.is_empty() => {
                let plain = self.sealing.open(ctx, &stored)?;
                if self.memory.is_checked_state(&blob) {
                    Outcome::State(Bytes::copy_from_slice(&plain))
                } else {
                    let state = checked_state(path, plain)?;
                    self.memory.checked_state(blob);
                    Outcome::State(state)
                }
            }
            _ => Outcome::NoState,
        })
    }

    fn lock(&self, ctx: &RequestContext, lock: &LockName, info: &LockInfo) -> Result<Outcome, BackendError> {
        let trailers = Trailers {
            lock_id: Some(info.id.clone()),
            who: Some(info.who.clone()),
            operation: Some(info.operation.clone()),
            branch: Some(lock.branch.clone()),
            ..Trailers::default()
        };
        let message = format!("Lock {}\n\n{}", lock.path, trailers.write());
        let commit = self.storage.commit(None, &lock.file, Some(&info.raw), &message)?;
        // Try to create the lock straight away: a rejected create means a lock exists. Rejected
        // again with no lock to be seen, it is a nesting lock (`a` while `a/b` is held).
        let mut unseen_blockers = 0;
        let (outcome, _) = self.compare_and_swap(
            ctx,
            || lock.refs(),
            Some(Tips::new()),
            |tips| {
                let view = self.lock_view(tips, lock)?;
                Ok(match view.holder {
                    Some(h) if h.info.id == info.id => Step::Answer(Ok(Outcome::Done)),
                    Some(h) => Step::Answer(Err(BackendError::Locked { holder: h.info.raw })),
                    None if unseen_blockers >= NESTED_LOCK_EVIDENCE => {
                        Step::Answer(Err(BackendError::NestedLock(lock.path.clone())))
                    }
                    None => {
                        unseen_blockers += 1;
                        // The other layout's lock is never created, only checked absent.
                        let mut updates =
                            vec![RefUpdate { name: lock.reference.clone(), old: None, new: Some(commit) }];
                        updates.extend(view.absence_checks().filter(|check| check.name != lock.reference));
                        Step::Push(updates)
                    }
                })
            },
        )?;
        self.remember(commit, info.clone());
        tracing::info!(lock_id = ?info.id, "lock taken");
        Ok(outcome)
    }

    fn unlock(&self, ctx: &RequestContext, lock: &LockName, id: Option<&str>) -> Result<Outcome, BackendError> {
        let refs = lock.refs();
        // Usually this process took the lock itself: try the delete against what it knows first
        // (the push's advertisement says whether that is still so).
        let guess = self
            .memory
            .guess(&refs)
            .filter(|t| t.get(&lock.reference).is_some_and(|c| self.memory.lock_info(c).is_some()));
        self.compare_and_swap(
            ctx,
            || refs.clone(),
            guess,
            |tips| {
                Ok(match self.lock_view(tips, lock)?.holder {
                    None => Step::Answer(Ok(Outcome::Done)),
                    Some(h) if id.is_some_and(|id| id != h.info.id) => {
                        Step::Answer(Err(BackendError::WrongLockId { holder: h.info.raw }))
                    }
                    Some(h) => {
                        tracing::info!(lock_id = ?h.info.id, forced = id.is_none(), "releasing the lock");
                        Step::Push(vec![RefUpdate { name: h.reference.clone(), old: Some(h.commit), new: None }])
                    }
                })
            },
        )
        .map(|(outcome, _)| outcome)
    }

    /// A write (or delete, or restore): pushed together with the other writes of this process
    /// waiting for the same branch, one commit each.
    fn write(
        &self,
        ctx: &RequestContext,
        branch: &str,
        lock: &LockName,
        write: &Write<'_>,
    ) -> Result<Outcome, BackendError> {
        let branch_ref = branch_ref(branch);
        let job = batch::Job::new(write, lock.clone());
        let answer = self.lines.submit(&branch_ref, job, ctx.deadline.instant(), |batch| {
            self.push_batch(ctx, &branch_ref, batch);
        });
        answer.unwrap_or_else(|| {
            tracing::warn!("the other writes of this process on the branch took it until the deadline");
            Err(BackendError::DeadlineExceeded { pushes: 0 })
        })
    }

    /// Commit the writes of `batch` on `branch_ref`, one commit each in line, push them as one
    /// compare-and-swap (with every write's lock guard), and answer each. Writes that join the
    /// line while a push is lost go into the next attempt.
    fn push_batch(&self, ctx: &RequestContext, branch_ref: &str, batch: &mut batch::Batch<'_>) {
        let started = Instant::now();
        // Sealed once per write, on the first attempt that commits (a KMS seal costs a round trip).
        let mut sealed: Vec<Option<Vec<u8>>> = Vec::new();
        let mut answers: Vec<Option<Result<Outcome, BackendError>>> = Vec::new();
        let refs = batch_refs(branch_ref, &batch.jobs);
        // First try against what this process last saw (one round trip when nobody else wrote).
        let guess = self.memory.guess(&refs);
        let mut on_guess = guess.is_some();
        // The jobs are read by the step and grown before each look: both through one cell.
        let batch = std::cell::RefCell::new(batch);
        let outcome = self.compare_and_swap(
            ctx,
            || {
                let mut batch = batch.borrow_mut();
                batch.join_waiting();
                batch_refs(branch_ref, &batch.jobs)
            },
            guess,
            |tips| {
                let fresh = !std::mem::replace(&mut on_guess, false);
                let jobs = &batch.borrow().jobs;
                sealed.resize(jobs.len(), None);
                answers.resize(jobs.len(), None);
                self.batch_step(ctx, tips, branch_ref, jobs, fresh, &mut sealed, &mut answers)
            },
        );
        let batch = batch.into_inner();
        // A look that failed before any step leaves no answers yet: the outcome is everyone's.
        answers.resize(batch.jobs.len(), None);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let writes = batch.jobs.len();
        match &outcome {
            // A commit landed: how many pushes it took (the stress command reads this line).
            Ok((_, attempts @ 1..)) => tracing::info!(attempts, writes, elapsed_ms, "state written"),
            Ok(_) => tracing::info!(writes, elapsed_ms, "write answered without a commit"),
            Err(e) => tracing::info!(error = %e, writes, elapsed_ms, "write refused or failed"),
        }
        for (job, answer) in batch.jobs.iter().zip(answers) {
            job.answer(match (answer, &outcome) {
                (Some(answer), _) => answer,
                (None, Ok((outcome, _))) => Ok(outcome.clone()),
                (None, Err(e)) => Err(e.clone()),
            });
        }
    }

    /// One attempt of a batch over `tips`: each write decided on top of the one before it;
    /// the branch moves from its tip to the last commit, guarded by every write's lock.
    #[allow(clippy::too_many_arguments)]
    fn batch_step(
        &self,
        ctx: &RequestContext,
        tips: &Tips,
        branch_ref: &str,
        jobs: &[Arc<batch::Job>],
        fresh: bool,
        sealed: &mut [Option<Vec<u8>>],
        answers: &mut [Option<Result<Outcome, BackendError>>],
    ) -> Result<Step, BackendError> {
        let base = tips.get(branch_ref).copied();
        let mut head = base;
        let mut guards: Vec<RefUpdate> = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            answers[i] = None;
            match self.job_step(ctx, tips, head, job, &mut sealed[i])? {
                JobStep::Answer(answer) if fresh => answers[i] = Some(answer),
                // A guess may lead to a push, never to an answer: look again.
                JobStep::Answer(_) => return Ok(Step::Answer(Ok(Outcome::Done))),
                JobStep::Commit { commit, updates } => {
                    head = Some(commit);
                    for u in updates {
                        if !guards.iter().any(|g| g.name == u.name) {
                            guards.push(u);
                        }
                    }
                }
            }
        }
        if head == base {
            return Ok(Step::Answer(Ok(Outcome::Done)));
        }
        let mut updates = vec![RefUpdate { name: branch_ref.to_owned(), old: base, new: head }];
        updates.extend(guards);
        Ok(Step::Push(updates))
    }

    /// One write of a batch over `tips`, on top of `head` (the branch's tip, or the commit of
    /// the write before it): its answer, or its commit and the lock checks it lands under.
    fn job_step(
        &self,
        ctx: &RequestContext,
        tips: &Tips,
        head: Option<ObjectId>,
        job: &batch::Job,
        sealed: &mut Option<Vec<u8>>,
    ) -> Result<JobStep, BackendError> {
        let write = job.write();
        let view = self.lock_view(tips, &job.lock)?;
        let holder = view.holder.as_ref();
        let stored = self.stored_for_rules(ctx, head, &write)?;
        let (message, guard) = match decide_write(&write, holder, stored.as_ref().map(|s| s.as_slice())) {
            Decision::Answer(answer) => return Ok(JobStep::Answer(answer)),
            Decision::Commit { message, guard } => (message, guard),
        };
        let content = match (write.content, sealed) {
            (None, _) => None,
            (Some(_), Some(done)) => Some(done.as_slice()),
            (Some(plain), slot) => Some(slot.insert(self.sealing.seal(ctx, plain.bytes())?).as_slice()),
        };
        let commit = match self.storage.commit(head, write.path, content, &message) {
            Err(e @ StorageError::PathConflict { .. }) => return Ok(JobStep::Answer(Err(e.into()))),
            other => other?,
        };
        // The write lands only if the lock is still this one at that instant (a guard in an
        // atomic push); no other lock may appear meanwhile (checked against the push's own
        // ref advertisement).
        let mut updates = Vec::new();
        if let (Some(h), Some(held)) = (holder, guard) {
            updates.push(RefUpdate { name: h.reference.clone(), old: Some(held), new: Some(held) });
        }
        updates.extend(view.absence_checks());
        Ok(JobStep::Commit { commit, updates })
    }

    /// The state stored at `base` as the rules see it: as Terraform sent it, never its stored
    /// form. `None` also when the same state is stored in a form this deployment no longer
    /// writes (clear, or under another KMS key): writing it again is how a repository gets
    /// encrypted.
    fn stored_for_rules(
        &self,
        ctx: &RequestContext,
        base: Option<ObjectId>,
        write: &Write<'_>,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, BackendError> {
        let raw = base.map(|tip| self.storage.read_file(tip, write.path)).transpose()?.flatten();
        let Some(raw) = raw else { return Ok(None) };
        let stored = match self.sealing.open(ctx, &raw) {
            Ok(stored) => stored,
            // A damaged sealed form holds no state anyone can read: only a deliberate
            // overwrite replaces it.
            Err(sealing::SealError::Damaged(why)) if write.force => {
                tracing::warn!(reason = %why, "a damaged stored state replaced with force=true");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        if write.content.is_some_and(|c| c.bytes().as_ref() == stored.as_slice())
            && self.sealing.needs_reseal(ctx, &raw)?
        {
            return Ok(None);
        }
        Ok(Some(stored))
    }

    /// The one compare-and-swap loop of lock, unlock and write. `step` turns tips into an
    /// answer or ref updates to push. Tips come first from `guess` (what this process last
    /// saw): a guess may only lead to a push, never to an answer; every other look is fresh.
    /// A rejected push is a lost race: look again, after a jittered pause, until the
    /// attempts or the deadline run out.
    fn compare_and_swap(
        &self,
        ctx: &RequestContext,
        mut refs: impl FnMut() -> Vec<String>,
        mut guess: Option<Tips>,
        mut step: impl FnMut(&Tips) -> Result<Step, BackendError>,
    ) -> Result<(Outcome, u32), BackendError> {
        let attempts = self.settings.write_retries;
        let budget = ctx.deadline.remaining().unwrap_or_default();
        let mut pushes = 0;
        loop {
            if ctx.out_of_time() {
                return Err(BackendError::DeadlineExceeded { pushes });
            }
            let fresh = guess.is_none();
            let refs = refs();
            let tips = match guess.take() {
                Some(tips) => tips,
                None => self.fetch_tips(ctx, &refs)?,
            };
            let updates = match step(&tips)? {
                Step::Answer(answer) if fresh => return answer.map(|a| (a, pushes)),
                Step::Answer(_) => continue,
                Step::Push(updates) => updates,
            };
            pushes += 1;
            let pushed = match self.update(ctx, &updates) {
                Err(BackendError::Storage(StorageError::OutcomeUnknown(why))) => {
                    // The push may have landed: never send it again blindly. One look tells.
                    tracing::warn!(reason = %why, "the git host's answer to a push was lost; looking whether it landed");
                    self.landed(ctx, &refs, &updates)?
                }
                other => other?,
            };
            match pushed {
                // The first update is what the operation is for (the branch of a write, the
                // lock of a lock or unlock); the rest only guard it. Once it is applied the
                // operation happened, whatever became of its guards, and is never pushed again.
                outcome if outcome.applied(&updates[0].name) => {
                    tracing::debug!(pushes, guessed = !fresh, "compare-and-swap applied");
                    return Ok((Outcome::Done, pushes));
                }
                UpdateOutcome::Applied => unreachable!("an applied push applied its first update"),
                UpdateOutcome::Rejected(why) | UpdateOutcome::PartlyApplied { rejected: why, .. } => {
                    tracing::info!(attempt = pushes, rejected = ?why, "lost the race; looking again");
                    if attempts > 0 && pushes >= attempts {
                        tracing::warn!(attempts, "gave up on a moving branch");
                        return Err(BackendError::Contended { attempts });
                    }
                    let left = share_left(ctx.deadline.remaining().unwrap_or_default(), budget);
                    if fresh && !ctx.pause(jitter(pushes, round_trip(ctx), left)) {
                        return Err(BackendError::DeadlineExceeded { pushes });
                    }
                }
            }
        }
    }

    /// After a push whose answer was lost: applied when its first ref is at the id it pushed
    /// (a deleted ref: absent), else a lost race, to be looked at again and redone.
    fn landed(
        &self,
        ctx: &RequestContext,
        refs: &[String],
        updates: &[RefUpdate],
    ) -> Result<UpdateOutcome, BackendError> {
        let tips = self.fetch_tips(ctx, refs)?;
        let primary = &updates[0];
        if tips.get(&primary.name).copied() == primary.new {
            for u in updates {
                self.memory.set_tip(&u.name, tips.get(&u.name).copied());
            }
            return Ok(UpdateOutcome::Applied);
        }
        Ok(UpdateOutcome::Rejected(vec![(primary.name.clone(), "not applied: the answer was lost".into())]))
    }

    /// Fresh tips from the source of truth, remembered as the latest guess.
    fn fetch_tips(&self, ctx: &RequestContext, refs: &[String]) -> Result<Tips, BackendError> {
        let tips = self.storage.fetch_tips(ctx, refs)?;
        self.memory.saw(refs, &tips);
        Ok(tips)
    }

    /// Push `updates` and remember what came of it.
    fn update(&self, ctx: &RequestContext, updates: &[RefUpdate]) -> Result<UpdateOutcome, BackendError> {
        let outcome = self.storage.update(ctx, updates)?;
        for u in updates {
            if outcome.applied(&u.name) {
                self.memory.set_tip(&u.name, u.new);
            } else {
                self.memory.forget_tip(&u.name);
            }
        }
        Ok(outcome)
    }

    /// Who holds `lock` according to `tips`.
    /// Who holds `lock` according to `tips` (its own branch first, else the other layout's),
    /// and which of its branches are absent.
    fn lock_view(&self, tips: &Tips, lock: &LockName) -> Result<LockView, BackendError> {
        let mut view = LockView { holder: None, absent: Vec::new() };
        for reference in lock.refs() {
            let Some(&commit) = tips.get(&reference) else {
                view.absent.push(reference);
                continue;
            };
            if view.holder.is_some() || (reference == lock.legacy && self.is_plain_branch_lock(lock, commit)?) {
                continue;
            }
            let info = match self.memory.lock_info(&commit) {
                Some(info) => info,
                None => {
                    let stored = self.storage.read_file(commit, &lock.file)?.unwrap_or_default();
                    let info = LockInfo::read_stored(stored.into(), &reference, commit);
                    self.memory.remember_lock_info(commit, info.clone());
                    info
                }
            };
            view.holder = Some(Holder { commit, info, reference });
        }
        Ok(view)
    }

    /// Whether `commit`, found on `locks/<path>` while looking at another branch's lock, is
    /// [`PLAIN_LOCKS_BRANCH`]'s own lock as this version takes it (its commit says so): then it
    /// locks that branch only. Without the trailer it is a lock of the older layout (or
    /// terraform-backend-git's), which does not say for which branch: it holds every branch.
    fn is_plain_branch_lock(&self, lock: &LockName, commit: ObjectId) -> Result<bool, BackendError> {
        if lock.branch == PLAIN_LOCKS_BRANCH {
            return Ok(false);
        }
        let message = self.storage.commit_info(commit)?.map(|c| c.message).unwrap_or_default();
        Ok(Trailers::read(&message).branch.as_deref() == Some(PLAIN_LOCKS_BRANCH))
    }

    fn remember(&self, commit: ObjectId, info: LockInfo) {
        self.memory.remember_lock_info(commit, info);
    }
}

/// The branch whose locks keep terraform-backend-git's layout, `locks/<path>`.
pub const PLAIN_LOCKS_BRANCH: &str = "main";

/// What the lock branches of one state show.
struct LockView {
    holder: Option<Holder>,
    /// Lock branches that do not exist: no lock may appear there while an operation lands.
    absent: Vec<String>,
}

impl LockView {
    /// Checks, settled by the push's advertisement, that the absent lock branches stay absent.
    fn absence_checks(&self) -> impl Iterator<Item = RefUpdate> + '_ {
        self.absent.iter().map(|name| RefUpdate { name: name.clone(), old: None, new: None })
    }
}

/// The branch holding the lock of one state, and the file in its commit. A function of the
/// branch and the path alone: every deployment, whatever its settings, takes the same lock.
#[derive(Clone)]
struct LockName {
    branch: String,
    path: String,
    /// `locks/<path>` for [`PLAIN_LOCKS_BRANCH`] (terraform-backend-git's layout, so both tools
    /// see each other's locks); `locks/@/<branch>/@/<path>` for any other branch. `@` is never
    /// a component of a branch or a state path, so no two (branch, path) pairs share a lock
    /// or collide as refs.
    reference: String,
    /// The lock the other layout names for this state. Earlier versions chose the layout by
    /// the deployment's default branch, and terraform-backend-git takes `locks/<path>` on every
    /// branch: such a lock is honoured (it blocks, its holder may write and unlock) until it
    /// is released, and never created. A `locks/<path>` that this version took for
    /// [`PLAIN_LOCKS_BRANCH`] says so in its commit and blocks that branch only.
    legacy: String,
    file: String,
}

impl LockName {
    fn new(branch: &str, path: &str) -> Self {
        let plain = format!("refs/heads/locks/{path}");
        let tagged = format!("refs/heads/locks/@/{branch}/@/{path}");
        let (reference, legacy) = if branch == PLAIN_LOCKS_BRANCH { (plain, tagged) } else { (tagged, plain) };
        LockName { branch: branch.to_owned(), path: path.to_owned(), reference, legacy, file: format!("{path}.lock") }
    }

    /// Both lock branches, this layout's first.
    fn refs(&self) -> Vec<String> {
        vec![self.reference.clone(), self.legacy.clone()]
    }
}

/// A stored state as it may be served: content that a POST would refuse is never handed out
/// as a state (it is damaged, or not ours).
fn checked_state(path: &str, plain: impl AsRef<[u8]>) -> Result<Bytes, BackendError> {
    let plain = plain.as_ref();
    match decide::StateHead::check(plain) {
        Ok(_) => Ok(Bytes::copy_from_slice(plain)),
        Err(why) => Err(BackendError::StoredNotAState { path: path.to_owned(), why }),
    }
}

fn branch_ref(branch: &str) -> String {
    format!("refs/heads/{branch}")
}

/// Back off before retrying a lost race: a random pause up to a ceiling that grows with the
/// attempt from the git host's round trip (a racer that waits less than a round trip only
/// meets the winner's push again), so racers spread out over what one push costs. The
/// ceiling stops at 16 round trips: one instance is one racer (its writes go out together),
/// and a longer pause only leaves the branch idle. The ceiling shrinks with the cube of
/// `left`, the share of its deadline a write still has: nothing orders racers of different
/// instances, so the writes that have lost longest get the better odds of going next (from
/// half its deadline on, a write's ceiling is below a newcomer's), and none loses every race
/// until its deadline.
fn jitter(attempt: u32, round_trip: Duration, left: f64) -> Duration {
    let unit = round_trip.clamp(Duration::from_millis(5), Duration::from_millis(500));
    let ceiling = (unit * (1u32 << attempt.min(4))).mul_f64(left.clamp(0.0, 1.0).powi(3));
    Duration::from_micros(fastrand::u64(1..=ceiling.as_micros().max(1) as u64))
}

/// The share of `budget` that `remaining` still is (1 for an unbounded or spent budget).
fn share_left(remaining: Duration, budget: Duration) -> f64 {
    if budget.is_zero() {
        return 1.0;
    }
    (remaining.as_secs_f64() / budget.as_secs_f64()).min(1.0)
}

/// The mean time of this request's conversations with the git host so far.
fn round_trip(ctx: &RequestContext) -> Duration {
    match ctx.counters.round_trips() {
        0 => Duration::from_millis(10),
        n => ctx.counters.time() / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_grows_from_the_round_trip_and_stays_bounded() {
        for attempt in 0..20 {
            let pause = jitter(attempt, Duration::from_millis(40), 1.0);
            assert!(pause <= Duration::from_millis(40) * (1 << attempt.min(4)), "{attempt}: {pause:?}");
        }
        // A slow host's round trip is capped: 500 ms × 16 at most.
        assert!(jitter(30, Duration::from_secs(10), 1.0) <= Duration::from_millis(500) * 16);
        // A write with a tenth of its deadline left pauses at most a thousandth of the ceiling.
        for _ in 0..100 {
            assert!(jitter(10, Duration::from_millis(100), 0.1) <= Duration::from_micros(1_600));
        }
        assert_eq!(share_left(Duration::from_secs(5), Duration::from_secs(20)), 0.25);
        assert_eq!(share_left(Duration::from_secs(5), Duration::ZERO), 1.0);
        let ctx = RequestContext::unbounded();
        assert_eq!(round_trip(&ctx), Duration::from_millis(10));
        ctx.counters.record(Duration::from_millis(30));
        ctx.counters.record(Duration::from_millis(50));
        assert_eq!(round_trip(&ctx), Duration::from_millis(40));
    }
}
