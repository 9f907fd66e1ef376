//! Our push: git's receive-pack protocol (v0/v1) over gix-transport, with a pack
//! of the new objects built by gix-pack, and the report parsed. Every update
//! carries its expected old id: the push is the compare-and-swap.

use std::collections::HashMap;
use std::io::Write;

use gix::protocol::transport::client::blocking_io::{ExtendedBufRead, ReadlineBufRead, Transport};
use gix::protocol::transport::client::{Capabilities, MessageKind, WriteMode};
use gix::protocol::transport::packetline::PacketLineRef;
use gix::protocol::transport::{Protocol, Service};

use super::remote::{self, redacted, Failed};
use crate::storage::{Credentials, ObjectId, RefUpdate, StorageError, UpdateOutcome};

/// What the server said about itself before we sent anything.
struct Advertisement {
    refs: HashMap<String, ObjectId>,
    atomic: bool,
    side_band_64k: bool,
    report_status: bool,
    quiet: bool,
}

/// Push `updates` to the remote at `url`, taking new objects from `repo`.
///
/// Every `old` is first checked against the advertised refs; any mismatch rejects
/// the whole set without sending a command. Guards (`old == new`) travel as real
/// commands in an atomic push where the server offers `atomic`; otherwise they are
/// only checked against the advertisement (check-then-push, with a warning).
pub fn push(
    repo: &gix::Repository,
    url: &gix::Url,
    updates: &[RefUpdate],
    creds: Option<&Credentials>,
) -> Result<UpdateOutcome, StorageError> {
    // Until the advertisement is read nothing was asked of the server: safe to repeat.
    let (mut transport, adv) = remote::retrying(|| {
        let mut transport = remote::connect(url, Protocol::V1, creds)?;
        let adv = advertisement(&mut transport, url)?;
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
        return Ok(UpdateOutcome::Rejected(stale));
    }

    // Absence checks were settled by the advertisement above: "0000 0000" is no command.
    let commands: Vec<&RefUpdate> = if adv.atomic {
        updates.iter().filter(|u| !u.is_absence_check()).collect()
    } else {
        if updates.iter().any(RefUpdate::is_guard) {
            tracing::warn!(
                remote = %redacted(url),
                "the git server does not offer `atomic`: guards are only checked before the push, \
                 so atomicity with the lock is not guaranteed by this server"
            );
        }
        updates.iter().filter(|u| !u.is_guard() && !u.is_absence_check()).collect()
    };
    if commands.is_empty() {
        end_without_commands(&mut transport);
        return Ok(UpdateOutcome::Applied);
    }
    if !adv.report_status {
        end_without_commands(&mut transport);
        return Err(StorageError::Protocol(format!(
            "{} does not offer report-status; cannot learn the outcome of a push",
            redacted(url)
        )));
    }

    // receive-pack wants a pack unless every command is a delete, even an empty one.
    let pack = if commands.iter().any(|u| u.new.is_some()) {
        let new_commits: Vec<ObjectId> = commands
            .iter()
            .filter(|u| !u.is_guard())
            .filter_map(|u| u.new)
            .filter(|id| !adv.refs.values().any(|have| have == id))
            .collect();
        // A server accepting these commits must hold their parents, and so all the parents hold.
        let mut remote_has = Vec::new();
        for id in &new_commits {
            let commit = repo.find_commit(*id).map_err(|e| StorageError::local(format!("commit {id} to push: {e}")))?;
            remote_has.extend(commit.parent_ids().map(|p| p.detach()));
        }
        Some(super::pack::build_pack(repo, &new_commits, &remote_has)?)
    } else {
        None
    };

    let io_err = |e: std::io::Error| StorageError::Unavailable(format!("{}: sending the push: {e}", redacted(url)));
    let mut writer = transport
        .request(WriteMode::OneLfTerminatedLinePerWriteCall, MessageKind::Flush, false)
        .map_err(|e| transport_error(url, e))?;
    let null = repo.object_hash().null();
    for (i, u) in commands.iter().enumerate() {
        let mut line = format!("{} {} {}", u.old.unwrap_or(null), u.new.unwrap_or(null), u.name);
        if i == 0 {
            line.push('\0');
            line.push_str(&capabilities(&adv));
        }
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
    let report = read_report(&mut reader, adv.side_band_64k, url)?;
    drop(reader);
    outcome(&report, &commands, url)
}

/// Handshake for receive-pack and read the v0/v1 ref advertisement to its end.
fn advertisement(transport: &mut Box<dyn Transport + Send>, url: &gix::Url) -> Result<Advertisement, Failed> {
    let response = transport.handshake(Service::ReceivePack, &[]).map_err(|e| {
        let retry =
            matches!(&e, gix::protocol::transport::client::Error::Io(io) if remote::is_broken_connection(io.kind()));
        Failed { error: transport_error(url, e), retry }
    })?;
    if response.actual_protocol == Protocol::V2 {
        return Err(StorageError::Protocol(format!("{} answered receive-pack with protocol v2", redacted(url))).into());
    }
    let caps: &Capabilities = &response.capabilities;
    let has = |name: &str| caps.contains(name);
    let (atomic, side_band_64k, report_status, quiet) =
        (has("atomic"), has("side-band-64k"), has("report-status"), has("quiet"));
    let mut lines =
        response.refs.ok_or_else(|| StorageError::Protocol(format!("{} sent no ref advertisement", redacted(url))))?;
    let mut refs = HashMap::new();
    while let Some(line) = lines.readline() {
        let line = line
            .map_err(|e| Failed {
                retry: remote::is_broken_connection(e.kind()),
                error: io_error(url, "reading the ref advertisement", e),
            })?
            .map_err(|e| StorageError::Protocol(format!("{}: {}", redacted(url), remote::chain(&e))))?;
        let Some(text) = line.as_slice() else {
            continue;
        };
        let text = String::from_utf8_lossy(text);
        // Capabilities were cut off the first line by gix; `capabilities^{}` (empty
        // repository), `.have` and `shallow` lines name no ref of ours.
        let Some((id, name)) = text.trim_end().split_once(' ') else {
            return Err(garbage(url, &text).into());
        };
        if name == "capabilities^{}" || name.ends_with("^{}") || name == ".have" || id == "shallow" {
            continue;
        }
        let id = ObjectId::from_hex(id.as_bytes()).map_err(|_| garbage(url, &text))?;
        refs.insert(name.to_owned(), id);
    }
    Ok(Advertisement { refs, atomic, side_band_64k, report_status, quiet })
}

/// The capabilities we ask for on the first command line.
fn capabilities(adv: &Advertisement) -> String {
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
    url: &gix::Url,
) -> Result<Vec<String>, StorageError> {
    let mut lines = Vec::new();
    let mut band_data = Vec::new();
    while let Some(line) = reader.readline() {
        let line = line
            .map_err(|e| io_error(url, "reading the push report", e))?
            .map_err(|e| StorageError::Protocol(format!("{}: {}", redacted(url), remote::chain(&e))))?;
        let PacketLineRef::Data(data) = line else {
            break;
        };
        if !side_band {
            lines.push(String::from_utf8_lossy(data).trim_end().to_owned());
            continue;
        }
        match data.split_first() {
            Some((1, rest)) => band_data.extend_from_slice(rest),
            Some((2, progress)) => {
                tracing::debug!(remote = %redacted(url), "remote: {}", String::from_utf8_lossy(progress).trim_end());
            }
            Some((3, error)) => {
                return Err(StorageError::Protocol(format!(
                    "{}: remote error: {}",
                    redacted(url),
                    String::from_utf8_lossy(error).trim_end()
                )))
            }
            _ => return Err(garbage(url, &String::from_utf8_lossy(data))),
        }
    }
    if side_band {
        lines = split_pkt_lines(&band_data).ok_or_else(|| garbage(url, &String::from_utf8_lossy(&band_data)))?;
    }
    Ok(lines)
}

/// The data lines of packet-line `bytes`, up to the first flush.
fn split_pkt_lines(mut bytes: &[u8]) -> Option<Vec<String>> {
    let mut lines = Vec::new();
    while !bytes.is_empty() {
        let len = std::str::from_utf8(bytes.get(..4)?).ok()?;
        let len = usize::from_str_radix(len, 16).ok()?;
        if len == 0 {
            break;
        }
        let data = bytes.get(4..len)?;
        lines.push(String::from_utf8_lossy(data).trim_end().to_owned());
        bytes = &bytes[len..];
    }
    Some(lines)
}

/// `unpack ok`, then `ok <ref>` or `ng <ref> <reason>` for every command.
fn outcome(report: &[String], commands: &[&RefUpdate], url: &gix::Url) -> Result<UpdateOutcome, StorageError> {
    let mut lines = report.iter();
    match lines.next().map(String::as_str) {
        Some("unpack ok") => {}
        Some(other) => {
            let reason = other.strip_prefix("unpack ").unwrap_or(other);
            return Err(StorageError::Protocol(format!("{} could not unpack our pack: {reason}", redacted(url))));
        }
        None => return Err(StorageError::Protocol(format!("{} sent an empty report", redacted(url)))),
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
    if !rejected.is_empty() {
        return Ok(UpdateOutcome::Rejected(rejected));
    }
    match commands.iter().find(|u| !ok.contains(&u.name)) {
        Some(u) => Err(StorageError::Protocol(format!("{} did not report on {}", redacted(url), u.name))),
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

fn garbage(url: &gix::Url, line: &str) -> StorageError {
    StorageError::Protocol(format!("{} sent an unexpected line: {:?}", redacted(url), line))
}

/// An `ERR` line from the server is a protocol answer; any other io error a broken connection.
fn io_error(url: &gix::Url, doing: &str, err: std::io::Error) -> StorageError {
    if remote::is_err_line(&err) {
        StorageError::Protocol(format!("{}: {doing}: {}", redacted(url), remote::chain(&err)))
    } else {
        StorageError::Unavailable(format!("{}: {doing}: {err}", redacted(url)))
    }
}

fn transport_error(url: &gix::Url, err: gix::protocol::transport::client::Error) -> StorageError {
    use gix::protocol::transport::client::Error;
    match err {
        // gix's HTTP transport reports a 401 as PermissionDenied.
        Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => StorageError::AuthRejected,
        Error::Io(io) => io_error(url, "connecting", io),
        Error::AuthenticationRefused(_) => StorageError::AuthRejected,
        other => {
            let text = format!("{}: {}", redacted(url), remote::chain(&other));
            if gix::error::classify(&other).is_unauthenticated() {
                StorageError::AuthRejected
            } else {
                StorageError::Protocol(text)
            }
        }
    }
}
