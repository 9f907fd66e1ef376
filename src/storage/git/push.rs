//! Our push: git's receive-pack protocol (v0/v1) over gix-transport, with a pack
//! of the new objects built by gix-pack, and the report parsed. Every update
//! carries its expected old id: the push is the compare-and-swap.

use std::collections::HashMap;
use std::io::Write;

use gix::protocol::transport::client::blocking_io::{ExtendedBufRead, ReadlineBufRead, Transport};
use gix::protocol::transport::client::{Capabilities, MessageKind, WriteMode};
use gix::protocol::transport::packetline::PacketLineRef;
use gix::protocol::transport::{Protocol, Service};

use super::transport::{self, classify, HostFailure};
use crate::storage::{ObjectId, RefUpdate, RepoUrl, RequestContext, StorageError, UpdateOutcome};

/// What receive-pack offers that a push uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceiveCaps {
    pub atomic: bool,
    pub side_band_64k: bool,
    pub report_status: bool,
    pub quiet: bool,
}

/// What the server said about itself before we sent anything.
pub struct Advertisement {
    pub refs: HashMap<String, ObjectId>,
    pub caps: ReceiveCaps,
}

/// The outcome of a push and what its advertisement showed.
pub struct Pushed {
    pub outcome: UpdateOutcome,
    pub advertisement: Advertisement,
}

/// Push `updates` to the remote at `url`, taking new objects from `repo`.
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
) -> Result<Pushed, StorageError> {
    let (outcome, advertisement) = push_over_connection(repo, url, updates, ctx)?;
    Ok(Pushed { outcome: outcome?, advertisement })
}

/// The push itself; the advertisement comes back whatever the outcome.
#[allow(clippy::type_complexity)]
fn push_over_connection(
    repo: &gix::Repository,
    url: &RepoUrl,
    updates: &[RefUpdate],
    ctx: &RequestContext,
) -> Result<(Result<UpdateOutcome, StorageError>, Advertisement), StorageError> {
    // Until the advertisement is read nothing was asked of the server: safe to repeat.
    let (mut transport, adv) = transport::retrying(ctx, || {
        let mut transport = transport::connect(url, Protocol::V1, ctx)?;
        let adv = advertisement(&mut transport, url, ctx)?;
        Ok((transport, adv))
    })?;

    let stale: Vec<(String, String)> = updates
        .iter()
        .filter_map(|u| {
            let actual = adv.refs.get(&u.name);
            (actual != u.old.as_ref()).then(|| (u.name.clone(), describe_mismatch(u.old, actual)))
        })
        .collect();
    if !stale.is_empty() {
        end_without_commands(&mut transport);
        return Ok((Ok(UpdateOutcome::Rejected(stale)), adv));
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
        end_without_commands(&mut transport);
        return Ok((Ok(UpdateOutcome::Applied), adv));
    }
    if !adv.caps.report_status {
        end_without_commands(&mut transport);
        return Err(StorageError::Protocol(format!(
            "{url} does not offer report-status; cannot learn the outcome of a push"
        )));
    }
    let pack = pack_for(repo, &commands, |id| adv.refs.values().any(|have| have == id))?;

    // From here on the server may act: a failure is never repeated blindly, and one that
    // ends the request says whether the push may have happened.
    let io_err = |e: std::io::Error| after_send(classify(url, ctx, &e).error);
    let mut writer = transport
        .request(WriteMode::OneLfTerminatedLinePerWriteCall, MessageKind::Flush, false)
        .map_err(|e| classify(url, ctx, &e).error)?;
    for line in command_lines(&commands, adv.caps, repo.object_hash().null()) {
        writer.write_all(line.as_bytes()).map_err(io_err)?;
    }
    writer.write_message(MessageKind::Flush).map_err(io_err)?;
    // The pack goes raw, not in packet lines.
    let (mut raw, mut reader) = writer.into_parts();
    if let Some(pack) = &pack {
        raw.write_all(pack).map_err(io_err)?;
    }
    raw.flush().map_err(io_err)?;
    drop(raw);
    // The reader stopped at the flush ending the advertisement.
    reader.reset(Protocol::V1);
    let report = read_report(&mut reader, adv.caps.side_band_64k, url, ctx).map_err(after_send)?;
    drop(reader);
    Ok((outcome(&report, &commands, url), adv))
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
    let mut new_commits: Vec<ObjectId> =
        commands.iter().filter(|u| !u.is_guard()).filter_map(|u| u.new).filter(|id| !remote_has(id)).collect();
    // A guard's commit travels whether or not the host seems to have it: receive-pack skips
    // (rather than fails) a command whose objects are missing, even in an atomic push, so a
    // lock commit pruned on the host would turn the guard into no check at all. With its
    // objects in the pack, the guard is compared with the ref's value, always.
    for id in commands.iter().filter(|u| u.is_guard()).filter_map(|u| u.new) {
        if !new_commits.contains(&id) {
            new_commits.push(id);
        }
    }
    // A server accepting these commits must hold their parents, and so all the parents hold.
    let mut parents = Vec::new();
    for id in &new_commits {
        let commit =
            repo.find_commit(*id).map_err(|e| StorageError::CacheCorrupt(format!("commit {id} to push: {e}")))?;
        parents.extend(commit.parent_ids().map(|p| p.detach()));
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
) -> Result<Advertisement, HostFailure> {
    let response = transport.handshake(Service::ReceivePack, &[]).map_err(|e| classify(url, ctx, &e))?;
    if response.actual_protocol == Protocol::V2 {
        return Err(StorageError::Protocol(format!("{url} answered receive-pack with protocol v2")).into());
    }
    let caps: &Capabilities = &response.capabilities;
    let has = |name: &str| caps.contains(name);
    let receive_caps = ReceiveCaps {
        atomic: has("atomic"),
        side_band_64k: has("side-band-64k"),
        report_status: has("report-status"),
        quiet: has("quiet"),
    };
    let mut lines = response.refs.ok_or_else(|| StorageError::Protocol(format!("{url} sent no ref advertisement")))?;
    let (advertised, _shallow) =
        gix::protocol::handshake::refs::from_v1_refs_received_as_part_of_handshake_and_capabilities(
            &mut lines,
            caps.iter(),
        )
        .map_err(|e| classify(url, ctx, &e))?;
    let mut refs = HashMap::new();
    for r in &advertised {
        if let (name, Some(id), _) = r.unpack() {
            refs.insert(name.to_string(), id.to_owned());
        }
    }
    Ok(Advertisement { refs, caps: receive_caps })
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
            .map_err(|e| classify(url, ctx, &e).error)?
            .map_err(|e| StorageError::Protocol(format!("{url}: {}", transport::chain(&e))))?;
        let PacketLineRef::Data(data) = line else {
            break;
        };
        frames.push(data.to_vec());
    }
    report_lines(frames.iter().map(Vec::as_slice), side_band, url)
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
        // A ref that moved under us is a lost race; anything else is the host's policy, for good.
        if let Some((reference, reason)) = rejected.iter().find(|(_, reason)| !is_race(reason)) {
            return Err(StorageError::PushRefused {
                reference: reference.clone(),
                reason: reason.escape_debug().to_string(),
            });
        }
        return Ok(UpdateOutcome::Rejected(rejected));
    }
    match commands.iter().find(|u| !ok.contains(&u.name)) {
        Some(u) => Err(StorageError::Protocol(format!("{url} did not report on {}", u.name))),
        None => Ok(UpdateOutcome::Applied),
    }
}

/// The reasons receive-pack gives (across git versions) when a ref transaction failed
/// because a ref was not at its expected old value or was locked by a concurrent push.
const RACE_REASONS: &[&str] = &[
    "failed to update ref",
    "failed to update refs",
    "failed to delete",
    "failed to lock",
    "atomic push failure",
    "atomic transaction failed",
    "transaction failed to start",
    "incorrect old value provided",
    "reference already exists",
    "reference is missing",
    "stale info",
];

fn is_race(reason: &str) -> bool {
    RACE_REASONS.contains(&reason.trim())
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
fn after_send(e: StorageError) -> StorageError {
    match e {
        StorageError::DeadlineExceeded(_) => {
            StorageError::DeadlineExceeded("after the push was sent; it may or may not have been applied")
        }
        other => other,
    }
}
