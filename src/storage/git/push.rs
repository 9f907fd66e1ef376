//! Our push: git's receive-pack protocol (v0/v1) over gix-transport, with a pack
//! of the new objects built by gix-pack, and the report parsed. Every update
//! carries its expected old id: the push is the compare-and-swap.

use std::collections::HashMap;
use std::io::Write;

use gix::protocol::transport::client::blocking_io::{ExtendedBufRead, ReadlineBufRead, Transport};
use gix::protocol::transport::client::{Capabilities, MessageKind, WriteMode};
use gix::protocol::transport::packetline::PacketLineRef;
use gix::protocol::transport::{Protocol, Service};

use super::transport::{self, classify};
use crate::storage::{ObjectId, RefUpdate, RepoUrl, RequestContext, StorageError, UpdateOutcome};

/// What receive-pack offers that a push uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceiveCaps {
    pub atomic: bool,
    pub side_band_64k: bool,
    pub report_status: bool,
    pub quiet: bool,
    pub delete_refs: bool,
}

impl ReceiveCaps {
    /// The capabilities named in `names` (each `name` or `name=value`).
    pub(crate) fn from_names<'a>(names: impl Iterator<Item = &'a str>) -> Self {
        let names: Vec<&str> = names.map(|n| n.split('=').next().unwrap_or_default()).collect();
        let has = |name: &str| names.contains(&name);
        ReceiveCaps {
            atomic: has("atomic"),
            side_band_64k: has("side-band-64k"),
            report_status: has("report-status"),
            quiet: has("quiet"),
            delete_refs: has("delete-refs"),
        }
    }
}

/// What the server said about itself before we sent anything.
pub struct Advertisement {
    pub refs: HashMap<String, ObjectId>,
    pub caps: ReceiveCaps,
}

/// The outcome of a push and what its advertisement showed.
pub struct PushReport {
    pub outcome: UpdateOutcome,
    pub advertisement: Advertisement,
    /// Rejected by the host's own report (not by our check of its advertisement): a lost race
    /// or the host's policy, which a second push's advertisement tells apart.
    pub refused_by_host: bool,
}

/// One push conversation with receive-pack: its advertisement, then either nothing more or
/// the commands with their pack and the host's report. Over gix's transport (one connection),
/// or over smart HTTP's pooled client (`smart_http.rs`: two requests on kept-alive
/// connections).
pub(crate) trait Conversation {
    /// End without commands (receive-pack then does nothing). Best effort.
    fn end(&mut self);
    /// Send `commands` (command lines, capabilities on the first) and `pack`; the report's
    /// lines. A failure after the commands went out is `OutcomeUnknown` or a deadline.
    fn send(&mut self, commands: &[String], pack: Option<&[u8]>, side_band: bool) -> Result<Vec<String>, StorageError>;
}

/// A conversation started: the way to go on, and the advertisement that opened it.
pub(crate) type Started<'a> = (Box<dyn Conversation + 'a>, Advertisement);

/// A conversation over gix's transport.
struct OverTransport<'a> {
    transport: Box<dyn Transport + Send>,
    url: &'a RepoUrl,
    ctx: &'a RequestContext,
}

impl Conversation for OverTransport<'_> {
    fn end(&mut self) {
        end_without_commands(&mut self.transport);
    }

    fn send(&mut self, commands: &[String], pack: Option<&[u8]>, side_band: bool) -> Result<Vec<String>, StorageError> {
        let (url, ctx) = (self.url, self.ctx);
        let io_err = |e: std::io::Error| after_send(classify(url, ctx, &e));
        let mut writer = self
            .transport
            .request(WriteMode::OneLfTerminatedLinePerWriteCall, MessageKind::Flush, false)
            .map_err(|e| classify(url, ctx, &e))?;
        for line in commands {
            writer.write_all(line.as_bytes()).map_err(io_err)?;
        }
        writer.write_message(MessageKind::Flush).map_err(io_err)?;
        // The pack goes raw, not in packet lines.
        let (mut raw, mut reader) = writer.into_parts();
        if let Some(pack) = pack {
            raw.write_all(pack).map_err(io_err)?;
        }
        raw.flush().map_err(io_err)?;
        drop(raw);
        // The reader stopped at the flush ending the advertisement.
        reader.reset(Protocol::V1);
        read_report(&mut reader, side_band, url, ctx).map_err(after_send)
    }
}

/// Open a conversation over gix's transport and read the advertisement.
pub(crate) fn over_transport<'a>(url: &'a RepoUrl, ctx: &'a RequestContext) -> Result<Started<'a>, StorageError> {
    over(transport::connect(url, Protocol::V1, ctx)?, url, ctx)
}

/// Open a conversation over `transport` (not yet handshaken, asking for protocol v1) and
/// read the advertisement.
pub(crate) fn over<'a>(
    mut transport: Box<dyn Transport + Send>,
    url: &'a RepoUrl,
    ctx: &'a RequestContext,
) -> Result<Started<'a>, StorageError> {
    let adv = advertisement(&mut transport, url, ctx)?;
    Ok((Box::new(OverTransport { transport, url, ctx }), adv))
}

/// Push `updates` to the remote at `url`, taking new objects from `repo`, over gix's transport.
///
/// Every `old` is first checked against the advertised refs; any mismatch rejects
/// the whole set without sending a command. Guards (`old == new`) travel as real
/// commands in an atomic push where the server offers `atomic`; otherwise they are
/// only checked against the advertisement (check-then-push, with a warning).
pub fn push(
    repo: &gix::Repository,
    url: &RepoUrl,
    updates: &[RefUpdate],
    ctx: &RequestContext,
) -> Result<PushReport, StorageError> {
    push_with(|| over_transport(url, ctx), repo, url, updates, ctx, true)
}

/// receive-pack's advertisement of `url` (its refs and capabilities), asking nothing more.
pub fn look(url: &RepoUrl, ctx: &RequestContext) -> Result<Advertisement, StorageError> {
    transport::retrying(ctx, || {
        let (mut conversation, adv) = over_transport(url, ctx)?;
        conversation.end();
        Ok(adv)
    })
}

/// Send `updates` as they are, whatever the advertisement shows: the host's own
/// compare-and-swap decides (`gitstate doctor` checks that it does).
pub fn push_unchecked(
    repo: &gix::Repository,
    url: &RepoUrl,
    updates: &[RefUpdate],
    ctx: &RequestContext,
) -> Result<PushReport, StorageError> {
    push_with(|| over_transport(url, ctx), repo, url, updates, ctx, false)
}

/// The push itself over the conversations `open` starts; with `check_olds`, an old id the
/// advertisement contradicts rejects the whole set before anything is sent.
pub(crate) fn push_with<'a>(
    mut open: impl FnMut() -> Result<Started<'a>, StorageError>,
    repo: &gix::Repository,
    url: &RepoUrl,
    updates: &[RefUpdate],
    ctx: &RequestContext,
    check_olds: bool,
) -> Result<PushReport, StorageError> {
    // Until the advertisement is read nothing was asked of the server: safe to repeat.
    let (mut conversation, adv) = transport::retrying(ctx, &mut open)?;

    let stale: Vec<(String, String)> = updates
        .iter()
        .filter_map(|u| {
            let actual = adv.refs.get(&u.name);
            (actual != u.old.as_ref()).then(|| (u.name.clone(), describe_mismatch(u.old, actual)))
        })
        .collect();
    if check_olds && !stale.is_empty() {
        conversation.end();
        return Ok(PushReport { outcome: UpdateOutcome::Rejected(stale), advertisement: adv, refused_by_host: false });
    }

    // Absence checks were settled by the advertisement above: "0000 0000" is no command.
    let commands: Vec<&RefUpdate> = if adv.caps.atomic {
        updates.iter().filter(|u| !u.is_absence_check()).collect()
    } else {
        if updates.iter().any(RefUpdate::is_guard) {
            tracing::warn!(
                remote = %url,
                "the git server does not offer `atomic`: guards are only checked before the push, \
                 so atomicity with the lock is not guaranteed by this server"
            );
        }
        updates.iter().filter(|u| !u.is_guard() && !u.is_absence_check()).collect()
    };
    if commands.is_empty() {
        conversation.end();
        return Ok(PushReport { outcome: UpdateOutcome::Applied, advertisement: adv, refused_by_host: false });
    }
    if !adv.caps.report_status {
        conversation.end();
        return Err(StorageError::Protocol(format!(
            "{url} does not offer report-status; cannot learn the outcome of a push"
        )));
    }
    let pack = pack_for(repo, &commands, |id| adv.refs.values().any(|have| have == id))?;
    // From here on the server may act: a failure is never repeated blindly, and one that
    // ends the request says whether the push may have happened.
    let lines = command_lines(&commands, adv.caps, repo.object_hash().null());
    let report = conversation.send(&lines, pack.as_deref(), adv.caps.side_band_64k)?;
    let outcome = outcome(&report, &commands, url)?;
    let refused_by_host = matches!(outcome, UpdateOutcome::Rejected(_));
    Ok(PushReport { outcome, advertisement: adv, refused_by_host })
}

/// The most commits one push carries (a batch of writes is far smaller).
const MAX_PUSHED_COMMITS: usize = 1024;

/// The one parent of `id`, `None` for a root (or a merge, which gitstate never makes).
fn single_parent(repo: &gix::Repository, id: ObjectId) -> Result<Option<ObjectId>, StorageError> {
    let commit = repo.find_commit(id).map_err(|e| StorageError::CacheCorrupt(format!("commit {id} to push: {e}")))?;
    let mut parents = commit.parent_ids();
    Ok(match (parents.next(), parents.next()) {
        (Some(p), None) => Some(p.detach()),
        _ => None,
    })
}

/// The pack a push of `commands` needs: the new commits (those the remote does not have
/// already, by `remote_has`) and what they add to their parents. `None` when every command
/// is a delete (receive-pack then wants no pack at all).
pub(crate) fn pack_for(
    repo: &gix::Repository,
    commands: &[&RefUpdate],
    remote_has: impl Fn(&ObjectId) -> bool,
) -> Result<Option<Vec<u8>>, StorageError> {
    if !commands.iter().any(|u| u.new.is_some()) {
        return Ok(None);
    }
    // A command may move a ref over a chain of new commits (a batch of writes, one commit
    // each): all of them travel, from its new id back to its old one.
    let mut new_commits: Vec<ObjectId> = Vec::new();
    for u in commands.iter().filter(|u| !u.is_guard()) {
        let mut next = u.new;
        while let Some(id) = next.filter(|id| Some(*id) != u.old && !remote_has(id) && !new_commits.contains(id)) {
            if new_commits.len() >= MAX_PUSHED_COMMITS {
                return Err(StorageError::Local(format!("more than {MAX_PUSHED_COMMITS} new commits in one push")));
            }
            new_commits.push(id);
            next = single_parent(repo, id)?;
        }
    }
    // A guard's commit travels whether or not the host seems to have it: receive-pack skips
    // (rather than fails) a command whose objects are missing, even in an atomic push, so a
    // lock commit pruned on the host would turn the guard into no check at all. With its
    // objects in the pack, the guard is compared with the ref's value, always.
    for id in commands.iter().filter(|u| u.is_guard()).filter_map(|u| u.new) {
        if !new_commits.contains(&id) {
            new_commits.push(id);
        }
    }
    // A server accepting these commits must hold their parents outside the pack, and so all
    // the parents hold.
    let mut parents = Vec::new();
    for id in &new_commits {
        let commit =
            repo.find_commit(*id).map_err(|e| StorageError::CacheCorrupt(format!("commit {id} to push: {e}")))?;
        parents.extend(commit.parent_ids().map(|p| p.detach()).filter(|p| !new_commits.contains(p)));
    }
    Ok(Some(super::pack::build_pack(repo, &new_commits, &parents)?))
}

/// The command lines of a push, capabilities on the first.
pub(crate) fn command_lines(commands: &[&RefUpdate], caps: ReceiveCaps, null: ObjectId) -> Vec<String> {
    commands
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let mut line = format!("{} {} {}", u.old.unwrap_or(null), u.new.unwrap_or(null), u.name);
            if i == 0 {
                line.push('\0');
                line.push_str(&capabilities(caps));
            }
            line
        })
        .collect()
}

/// Handshake for receive-pack and read the v0/v1 ref advertisement to its end, with
/// gix-protocol's parser (peeled tags, `.have` and `shallow` lines name no ref of ours).
fn advertisement(
    transport: &mut Box<dyn Transport + Send>,
    url: &RepoUrl,
    ctx: &RequestContext,
) -> Result<Advertisement, StorageError> {
    let response = transport.handshake(Service::ReceivePack, &[]).map_err(|e| classify(url, ctx, &e))?;
    if response.actual_protocol == Protocol::V2 {
        return Err(StorageError::Protocol(format!("{url} answered receive-pack with protocol v2")));
    }
    let caps: &Capabilities = &response.capabilities;
    let names: Vec<String> = caps.iter().map(|c| c.name().to_string()).collect();
    let receive_caps = ReceiveCaps::from_names(names.iter().map(String::as_str));
    let mut lines = response.refs.ok_or_else(|| StorageError::Protocol(format!("{url} sent no ref advertisement")))?;
    let mut frames = Vec::new();
    while let Some(line) = lines.readline() {
        let line = line
            .map_err(|e| classify(url, ctx, &e))?
            .map_err(|e| StorageError::Protocol(format!("{url}: {}", transport::chain(&e))))?;
        let PacketLineRef::Data(data) = line else { break };
        frames.push(data.to_vec());
    }
    let refs = advertised_refs(frames.iter().map(Vec::as_slice)).map_err(|line| {
        StorageError::Protocol(format!("{url} sent an advertisement line we cannot read: {:?}", line.escape_debug()))
    })?;
    Ok(Advertisement { refs, caps: receive_caps })
}

/// The refs of a v0/v1 ref advertisement, read by us: gix-protocol's parser panics on some
/// hosts' answers (a `symref=` capability naming an unborn HEAD), and nothing a host sends may
/// panic gitstate. Peeled tags, `.have` lines, `shallow` lines and the `capabilities^{}`
/// placeholder of an empty repository name no ref of ours. An unreadable line comes back.
pub(crate) fn advertised_refs<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Result<HashMap<String, ObjectId>, String> {
    let mut refs = HashMap::new();
    for raw in lines {
        // The first line carries the capabilities after a NUL.
        let line = raw.split(|b| *b == 0).next().unwrap_or_default();
        let line = std::str::from_utf8(line).map_err(|_| String::from_utf8_lossy(raw).into_owned())?;
        let line = line.trim_end_matches('\n');
        if line.starts_with("shallow ") {
            continue;
        }
        let bad = || line.to_owned();
        let (id, name) = line.split_once(' ').ok_or_else(bad)?;
        let id = ObjectId::from_hex(id.as_bytes()).map_err(|_| bad())?;
        if name.ends_with("^{}") || name == ".have" {
            continue;
        }
        if name.is_empty() || name.contains(' ') {
            return Err(bad());
        }
        refs.insert(name.to_owned(), id);
    }
    Ok(refs)
}

/// The capabilities we ask for on the first command line.
fn capabilities(adv: ReceiveCaps) -> String {
    let mut caps = vec!["report-status".to_owned()];
    if adv.atomic {
        caps.push("atomic".into());
    }
    if adv.side_band_64k {
        caps.push("side-band-64k".into());
    }
    if adv.quiet {
        caps.push("quiet".into());
    }
    caps.push(format!("agent=gitstate/{}", env!("CARGO_PKG_VERSION")));
    caps.join(" ")
}

/// A flush instead of commands: receive-pack then ends without doing anything.
/// Best effort: the answer is already known, a broken connection changes nothing.
fn end_without_commands(transport: &mut Box<dyn Transport + Send>) {
    if let Ok(writer) = transport.request(WriteMode::OneLfTerminatedLinePerWriteCall, MessageKind::Flush, false) {
        let _ = writer.into_read();
    }
}

/// The report-status lines, demultiplexed from side-band channel 1 when negotiated.
fn read_report(
    reader: &mut Box<dyn ExtendedBufRead<'_> + Unpin + '_>,
    side_band: bool,
    url: &RepoUrl,
    ctx: &RequestContext,
) -> Result<Vec<String>, StorageError> {
    let mut frames = Vec::new();
    while let Some(line) = reader.readline() {
        let line = line
            .map_err(|e| classify(url, ctx, &e))?
            .map_err(|e| StorageError::Protocol(format!("{url}: {}", transport::chain(&e))))?;
        let PacketLineRef::Data(data) = line else {
            break;
        };
        frames.push(data.to_vec());
    }
    report_lines(frames.iter().map(Vec::as_slice), side_band, url)
}

/// The report-status lines of a whole response body (a push over smart HTTP).
pub(crate) fn report_from_bytes(body: &[u8], side_band: bool, url: &RepoUrl) -> Result<Vec<String>, StorageError> {
    let frames = pkt_frames(body).ok_or_else(|| garbage(url, "a broken packet line"))?;
    report_lines(frames.into_iter(), side_band, url)
}

/// The report-status lines in packet-line `frames`, demultiplexed from side-band channel 1
/// when negotiated (channel 2 is progress, for the log; channel 3 the host's error).
fn report_lines<'a>(
    frames: impl Iterator<Item = &'a [u8]>,
    side_band: bool,
    url: &RepoUrl,
) -> Result<Vec<String>, StorageError> {
    if !side_band {
        return Ok(frames.map(|f| String::from_utf8_lossy(f).trim_end().to_owned()).collect());
    }
    let mut band_data = Vec::new();
    for frame in frames {
        match frame.split_first() {
            Some((1, rest)) => band_data.extend_from_slice(rest),
            Some((2, progress)) => {
                tracing::debug!(remote = %url, "remote: {}", String::from_utf8_lossy(progress).trim_end().escape_debug());
            }
            Some((3, error)) => {
                return Err(StorageError::Protocol(format!(
                    "{url}: remote error: {}",
                    String::from_utf8_lossy(error).trim_end().escape_debug()
                )))
            }
            _ => return Err(garbage(url, &String::from_utf8_lossy(frame))),
        }
    }
    split_pkt_lines(&band_data).ok_or_else(|| garbage(url, &String::from_utf8_lossy(&band_data)))
}

/// The data of each packet line of `bytes`, up to the first flush.
pub(crate) fn pkt_frames(mut bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let len = usize::from_str_radix(std::str::from_utf8(bytes.get(..4)?).ok()?, 16).ok()?;
        if len == 0 {
            break;
        }
        if len < 4 {
            // A delimiter (0001) or response-end (0002): no data.
            bytes = &bytes[4..];
            continue;
        }
        frames.push(bytes.get(4..len)?);
        bytes = &bytes[len..];
    }
    Some(frames)
}

/// The data lines of packet-line `bytes`, up to the first flush.
fn split_pkt_lines(bytes: &[u8]) -> Option<Vec<String>> {
    Some(pkt_frames(bytes)?.into_iter().map(|f| String::from_utf8_lossy(f).trim_end().to_owned()).collect())
}

/// `unpack ok`, then `ok <ref>` or `ng <ref> <reason>` for every command.
pub(crate) fn outcome(
    report: &[String],
    commands: &[&RefUpdate],
    url: &RepoUrl,
) -> Result<UpdateOutcome, StorageError> {
    let mut lines = report.iter();
    match lines.next().map(String::as_str) {
        Some("unpack ok") => {}
        Some(other) => {
            let reason = other.strip_prefix("unpack ").unwrap_or(other);
            return Err(StorageError::Protocol(format!("{url} could not unpack our pack: {reason}")));
        }
        None => return Err(StorageError::Protocol(format!("{url} sent an empty report"))),
    }
    let mut ok = Vec::new();
    let mut rejected = Vec::new();
    for line in lines {
        if let Some(name) = line.strip_prefix("ok ") {
            ok.push(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("ng ") {
            let (name, reason) = rest.split_once(' ').unwrap_or((rest, "rejected"));
            rejected.push((name.to_owned(), reason.to_owned()));
        } else {
            return Err(garbage(url, line));
        }
    }
    if !rejected.is_empty() && !ok.is_empty() {
        // The host applied part of the push (it did not honour `atomic`, or skipped a command):
        // what was applied stays applied, and the caller must hear which.
        return Ok(UpdateOutcome::PartlyApplied { applied: ok, rejected });
    }
    if !rejected.is_empty() {
        // Whether this was a lost race or the host's policy is not in the words (every
        // implementation has its own): the caller decides on the refs' state.
        return Ok(UpdateOutcome::Rejected(rejected));
    }
    match commands.iter().find(|u| !ok.contains(&u.name)) {
        Some(u) => Err(StorageError::Protocol(format!("{url} did not report on {}", u.name))),
        None => Ok(UpdateOutcome::Applied),
    }
}

fn describe_mismatch(expected: Option<ObjectId>, actual: Option<&ObjectId>) -> String {
    match (expected, actual) {
        (None, Some(actual)) => format!("already exists at {actual}"),
        (Some(expected), None) => format!("expected at {expected} but does not exist"),
        (Some(expected), Some(actual)) => format!("expected at {expected} but is at {actual}"),
        (None, None) => "unchanged".into(),
    }
}

fn garbage(url: &RepoUrl, line: &str) -> StorageError {
    StorageError::Protocol(format!("{url} sent an unexpected line: {:?}", line))
}

/// Once the commands are sent, running out of time leaves the outcome unknown: say so.
pub(crate) fn after_send(e: StorageError) -> StorageError {
    match e {
        StorageError::DeadlineExceeded(_) => {
            StorageError::DeadlineExceeded("after the push was sent; it may or may not have been applied")
        }
        StorageError::HostUnavailable(why) | StorageError::ConnectionDropped(why) => StorageError::OutcomeUnknown(why),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    fn id(hex: &str) -> ObjectId {
        ObjectId::from_hex(hex.as_bytes()).unwrap()
    }

    #[test]
    fn advertisements_that_made_gix_panic_are_read() {
        // dulwich's receive-pack on an empty repository: the placeholder line, with a symref
        // capability naming an unborn HEAD (gix-protocol's v1 parser reaches `unreachable!()`).
        let empty = format!(
            "{} capabilities^{{}}\0report-status delete-refs side-band-64k quiet atomic ofs-delta symref=HEAD:refs/heads/main agent=dulwich/0.22.8\n",
            "0".repeat(40)
        );
        assert_eq!(advertised_refs([empty.as_bytes()].into_iter()), Ok(HashMap::new()));
        // A symref to a branch that exists, peeled tags, `.have` and `shallow` lines.
        let lines = [
            format!("{A} HEAD\0report-status atomic symref=HEAD:refs/heads/main\n"),
            format!("{A} refs/heads/main\n"),
            format!("{B} refs/heads/locks/a.tfstate\n"),
            format!("{B} refs/tags/v1\n"),
            format!("{A} refs/tags/v1^{{}}\n"),
            format!("{B} .have\n"),
            format!("shallow {A}\n"),
        ];
        let refs = advertised_refs(lines.iter().map(|l| l.as_bytes())).unwrap();
        assert_eq!(refs.len(), 4, "{refs:?}");
        assert_eq!(refs["refs/heads/main"], id(A));
        assert_eq!(refs["refs/heads/locks/a.tfstate"], id(B));
        assert_eq!(refs["refs/tags/v1"], id(B));
    }

    #[test]
    fn unreadable_advertisement_lines_are_refused_not_guessed() {
        for bad in [
            "not-an-id refs/heads/main\n".to_string(),
            format!("{A}\n"),
            format!("{A} \n"),
            format!("{A} refs/heads/a b\n"),
            "ERR something broke\n".to_string(),
        ] {
            assert!(advertised_refs([bad.as_bytes()].into_iter()).is_err(), "{bad:?}");
        }
        assert!(advertised_refs([&b"\xff\xfe refs/heads/main"[..]].into_iter()).is_err());
    }

    fn update(name: &str) -> RefUpdate {
        RefUpdate { name: name.into(), old: Some(id(A)), new: Some(id(B)) }
    }

    #[test]
    fn reports_are_read_per_ref() {
        let url = RepoUrl::parse("http://127.0.0.1/x.git").unwrap();
        let (main, lock) = (update("refs/heads/main"), update("refs/heads/locks/a"));
        let commands = [&main, &lock];
        let report = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        assert_eq!(
            outcome(&report(&["unpack ok", "ok refs/heads/main", "ok refs/heads/locks/a"]), &commands, &url).unwrap(),
            UpdateOutcome::Applied
        );
        // A host that did not honour `atomic`: one ref applied, one refused, whatever the reason.
        for reason in ["failed to lock", "hook declined", "missing necessary objects", "something else entirely"] {
            let got = outcome(
                &report(&["unpack ok", "ok refs/heads/main", &format!("ng refs/heads/locks/a {reason}")]),
                &commands,
                &url,
            )
            .unwrap();
            assert!(got.applied("refs/heads/main") && !got.applied("refs/heads/locks/a"), "{reason}: {got:?}");
            assert!(matches!(got, UpdateOutcome::PartlyApplied { .. }), "{got:?}");
        }
        // All refused as a lost race: nothing applied.
        let got = outcome(
            &report(&["unpack ok", "ng refs/heads/main failed to lock", "ng refs/heads/locks/a atomic push failure"]),
            &commands,
            &url,
        )
        .unwrap();
        assert!(matches!(got, UpdateOutcome::Rejected(_)) && !got.applied("refs/heads/main"), "{got:?}");
        // A report that leaves a command out is no answer.
        assert!(outcome(&report(&["unpack ok", "ok refs/heads/main"]), &commands, &url).is_err());
        assert!(outcome(&report(&["unpack error: index-pack abnormal exit"]), &commands, &url).is_err());
    }
}
