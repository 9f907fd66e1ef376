//! Protocol v2 `fetch` as one stateless request (gix's fetch always starts with its own
//! handshake and connection): the request's lines, and the answer's sections read as they
//! stream in. gix-protocol parses the section lines, gix-pack indexes the pack, which is
//! demultiplexed from side-band straight into the cache's pack directory.

use std::io::{self, BufReader, Read};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use gix::protocol::fetch::response;

use crate::storage::{ObjectId, StorageError, Tips};

/// What a fetch asks for.
pub(crate) enum Want<'a> {
    /// Commits by id (from a look just made): any object may be wanted in protocol v2.
    Ids(&'a [ObjectId]),
    /// Refs by name, answered with their ids (`want-ref`, where the host allows it).
    Refs(&'a [String]),
}

/// The depth of a fetch with `have`s. git's upload-pack honours a `have` only within the
/// depth asked for (at depth 1 it sends the whole tree again), and deepens a `have` declared
/// shallow that lies inside it (sending its parents). At depth 2 a tip one commit past a
/// `have` (the tip moved once since our last look) brings only what changed; a tip further
/// ahead, or of another history, comes whole with one parent, as at depth 1.
const HAVE_DEPTH: u32 = 2;

/// The body of a `command=fetch`: at depth 1 without `have`s, else at [`HAVE_DEPTH`]. Every
/// `have` is also declared `shallow`: the host then leaves out exactly that commit's objects,
/// never an ancestor's that our shallow cache may not hold.
pub(crate) fn request_body(want: &Want<'_>, haves: &[ObjectId]) -> Vec<u8> {
    let mut body = Vec::new();
    pkt(&mut body, "command=fetch\n");
    pkt(&mut body, concat!("agent=gitstate/", env!("CARGO_PKG_VERSION"), "\n"));
    body.extend_from_slice(b"0001");
    let depth = if haves.is_empty() { 1 } else { HAVE_DEPTH };
    for arg in ["no-progress".to_owned(), "ofs-delta".to_owned(), format!("deepen {depth}")] {
        pkt(&mut body, &format!("{arg}\n"));
    }
    for id in haves {
        pkt(&mut body, &format!("shallow {id}\n"));
    }
    match want {
        Want::Ids(ids) => ids.iter().for_each(|id| pkt(&mut body, &format!("want {id}\n"))),
        Want::Refs(names) => names.iter().for_each(|n| pkt(&mut body, &format!("want-ref {n}\n"))),
    }
    for id in haves {
        pkt(&mut body, &format!("have {id}\n"));
    }
    pkt(&mut body, "done\n");
    body.extend_from_slice(b"0000");
    body
}

pub(crate) fn pkt(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(format!("{:04x}", line.len() + 4).as_bytes());
    out.extend_from_slice(line.as_bytes());
}

/// What an answer brought besides its pack (which is in the cache when it is read).
#[derive(Debug, Default)]
pub(crate) struct Answer {
    /// The new shallow boundary, to be written to the cache's `shallow` file.
    pub shallow: Vec<gix_shallow::Update>,
    /// Ids of the refs asked for by name.
    pub wanted: Tips,
}

/// How the host replied to a fetch.
#[derive(Debug)]
pub(crate) enum Reply {
    Answer(Answer),
    /// An `ERR` line: the host read the request and refused what it named (a ref that does
    /// not exist, an object it will not serve). Nothing was written.
    Refused,
    /// No fetch answer at all: an empty body (git's upload-pack dies on a `want-ref` it does
    /// not take, before it writes a byte) or a reply of another protocol. Nothing was written.
    NotUnderstood,
}

/// Read a fetch answer from `from`, writing its pack into `pack_dir`.
pub(crate) fn read_answer(from: impl Read, pack_dir: &Path, interrupt: &AtomicBool) -> Result<Reply, StorageError> {
    let mut lines = PktReader { inner: from };
    let mut answer = Answer::default();
    let mut first = true;
    loop {
        let header = match lines.next() {
            Err(e) if first && e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Reply::NotUnderstood),
            other => other.map_err(broken)?,
        };
        let header = match header {
            Pkt::Data(data) if first && data.starts_with(b"ERR ") => return Ok(Reply::Refused),
            Pkt::Data(data) => data,
            _ if first => return Ok(Reply::NotUnderstood),
            other => return Err(garbage(&format!("{other:?} where a section should start"))),
        };
        match header.as_slice() {
            b"shallow-info\n" => {
                for line in section(&mut lines)? {
                    answer.shallow.push(response::shallow_update_from_line(&line).map_err(|_| garbage(&line))?);
                }
            }
            b"wanted-refs\n" => {
                for line in section(&mut lines)? {
                    let wanted = response::WantedRef::from_line(&line).map_err(|_| garbage(&line))?;
                    answer.wanted.insert(wanted.path.to_string(), wanted.id);
                }
            }
            b"acknowledgments\n" => {
                section(&mut lines)?;
            }
            b"packfile\n" => {
                write_pack(SideBand { lines: &mut lines, data: Vec::new(), at: 0, ended: false }, pack_dir, interrupt)?;
                return Ok(Reply::Answer(answer));
            }
            _ if first => return Ok(Reply::NotUnderstood),
            other => return Err(garbage(&String::from_utf8_lossy(other))),
        }
        first = false;
    }
}

/// The lines of a section, up to the delimiter (or the flush) that ends it.
fn section<R: Read>(lines: &mut PktReader<R>) -> Result<Vec<String>, StorageError> {
    let mut out = Vec::new();
    loop {
        match lines.next().map_err(broken)? {
            Pkt::Data(data) => out.push(String::from_utf8_lossy(&data).trim_end().to_owned()),
            Pkt::Delim | Pkt::Flush => return Ok(out),
            Pkt::End => return Err(garbage("response-end inside a section")),
        }
    }
}

fn write_pack(pack: impl Read, pack_dir: &Path, interrupt: &AtomicBool) -> Result<(), StorageError> {
    let outcome = gix::odb::pack::Bundle::write_to_directory(
        &mut BufReader::with_capacity(64 * 1024, pack),
        Some(pack_dir),
        &mut gix::progress::Discard,
        interrupt,
        None::<gix::objs::find::Never>,
        gix::hash::Kind::Sha1,
        gix::odb::pack::bundle::write::Options::default(),
    )
    .map_err(|e| {
        // The side-band reader says why it stopped (the host's error, a broken connection).
        let text = e.to_string();
        StorageError::Protocol(format!("the pack the git host sent could not be stored: {text}"))
    })?;
    // The .keep file protects a new pack until refs point into it; our refs live in memory.
    if let Some(keep) = outcome.keep_path {
        let _ = std::fs::remove_file(keep);
    }
    Ok(())
}

fn broken(e: io::Error) -> StorageError {
    StorageError::HostUnavailable(format!("the fetch answer broke off: {e}"))
}

fn garbage(what: &str) -> StorageError {
    StorageError::Protocol(format!("unexpected line in a fetch answer: {}", what.escape_debug()))
}

#[derive(Debug)]
enum Pkt {
    Data(Vec<u8>),
    Flush,
    Delim,
    End,
}

/// Packet lines read one by one from a stream.
struct PktReader<R> {
    inner: R,
}

impl<R: Read> PktReader<R> {
    fn next(&mut self) -> io::Result<Pkt> {
        let mut len = [0u8; 4];
        self.inner.read_exact(&mut len)?;
        let len = std::str::from_utf8(&len)
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a packet-line length"))?;
        match len {
            0 => Ok(Pkt::Flush),
            1 => Ok(Pkt::Delim),
            2 => Ok(Pkt::End),
            3 => Err(io::Error::new(io::ErrorKind::InvalidData, "packet-line length 3")),
            n => {
                let mut data = vec![0u8; n - 4];
                self.inner.read_exact(&mut data)?;
                Ok(Pkt::Data(data))
            }
        }
    }
}

/// The pack's bytes: band 1 of the side-band packet lines up to the flush; band 2 (progress)
/// is dropped, band 3 is the host's error.
struct SideBand<'a, R> {
    lines: &'a mut PktReader<R>,
    data: Vec<u8>,
    at: usize,
    ended: bool,
}

impl<R: Read> Read for SideBand<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.data.len() {
            if self.ended {
                return Ok(0);
            }
            match self.lines.next()? {
                Pkt::Data(mut data) => match data.first() {
                    Some(1) => {
                        data.remove(0);
                        self.data = data;
                        self.at = 0;
                    }
                    Some(2) => {}
                    Some(3) => {
                        let text = String::from_utf8_lossy(&data[1..]).trim_end().escape_debug().to_string();
                        return Err(io::Error::other(format!("the git host: {text}")));
                    }
                    _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "unknown side-band channel")),
                },
                Pkt::Flush => self.ended = true,
                other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{other:?} inside the pack"))),
            }
        }
        let n = buf.len().min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn line(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        pkt(&mut out, text);
        out
    }

    #[test]
    fn haves_are_declared_shallow_and_set_the_depth_and_wants_take_either_form() {
        let id = ObjectId::from_hex(b"1111111111111111111111111111111111111111").unwrap();
        let body = String::from_utf8(request_body(&Want::Ids(&[id]), &[id])).unwrap();
        assert!(body.contains(&format!("shallow {id}\n")) && body.contains(&format!("have {id}\n")), "{body}");
        assert!(body.contains(&format!("want {id}\n")) && body.ends_with("0009done\n0000"), "{body}");
        assert!(body.contains(&format!("deepen {HAVE_DEPTH}\n")), "{body}");
        let body = String::from_utf8(request_body(&Want::Refs(&["refs/heads/main".into()]), &[])).unwrap();
        assert!(body.contains("want-ref refs/heads/main\n") && !body.contains("have "), "{body}");
        assert!(body.contains("deepen 1\n"), "nothing to stop at: the tip alone, {body}");
    }

    #[test]
    fn an_error_or_a_v0_reply_is_no_answer_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let flag = AtomicBool::new(false);
        let refused = read_answer(line("ERR unknown ref refs/heads/nope").as_slice(), dir.path(), &flag).unwrap();
        assert!(matches!(refused, Reply::Refused), "{refused:?}");
        for reply in [line("NAK\n"), b"0000".to_vec(), Vec::new(), line("version 2\n")] {
            let got = read_answer(reply.as_slice(), dir.path(), &flag).unwrap();
            assert!(matches!(got, Reply::NotUnderstood), "{got:?} for {reply:?}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn broken_or_garbled_answers_are_errors_not_answers() {
        let dir = tempfile::tempdir().unwrap();
        let flag = AtomicBool::new(false);
        let id = "2222222222222222222222222222222222222222";
        type Expected = fn(&StorageError) -> bool;
        let cases: Vec<(Vec<u8>, Expected)> = vec![
            // Cut off inside a section: the connection broke.
            (answer(&[&line("shallow-info\n"), &line(&format!("shallow {id}\n"))]), StorageError::is_spurious),
            // A section line that is not what the section holds.
            (answer(&[&line("shallow-info\n"), &line("deepen 1\n"), b"0001"]), |e| {
                matches!(e, StorageError::Protocol(_))
            }),
            (answer(&[&line("wanted-refs\n"), &line("zz refs/heads/main\n"), b"0001"]), |e| {
                matches!(e, StorageError::Protocol(_))
            }),
            // The host's error on band 3 while the pack streams.
            (answer(&[&line("packfile\n"), b"0011\x03out of memory", b"0000"]), |e| {
                matches!(e, StorageError::Protocol(_))
            }),
            // An unknown band.
            (answer(&[&line("packfile\n"), b"0006\x07x", b"0000"]), |e| matches!(e, StorageError::Protocol(_))),
        ];
        for (reply, expected) in cases {
            let err = read_answer(reply.as_slice(), dir.path(), &flag).unwrap_err();
            assert!(expected(&err), "{err:?} for {:?}", String::from_utf8_lossy(&reply));
        }
    }

    #[test]
    fn sections_are_read_before_the_pack() {
        let dir = tempfile::tempdir().unwrap();
        let flag = AtomicBool::new(false);
        let id = "3333333333333333333333333333333333333333";
        // An empty pack: header and checksum only.
        let empty: Vec<u8> = {
            let mut p = b"PACK\0\0\0\x02\0\0\0\0".to_vec();
            let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
            hasher.update(&p);
            p.extend_from_slice(hasher.try_finalize().unwrap().as_slice());
            p
        };
        let mut band = vec![1u8];
        band.extend_from_slice(&empty);
        let mut packet = format!("{:04x}", band.len() + 4).into_bytes();
        packet.extend_from_slice(&band);
        let reply = answer(&[
            &line("shallow-info\n"),
            &line(&format!("shallow {id}\n")),
            b"0001",
            &line("wanted-refs\n"),
            &line(&format!("{id} refs/heads/main\n")),
            b"0001",
            &line("packfile\n"),
            &line("\x02progress is dropped\n"),
            &packet,
            b"0000",
        ]);
        let Reply::Answer(got) = read_answer(reply.as_slice(), dir.path(), &flag).unwrap() else {
            panic!("not an answer")
        };
        let id = ObjectId::from_hex(id.as_bytes()).unwrap();
        assert_eq!(got.shallow, vec![gix_shallow::Update::Shallow(id)]);
        assert_eq!(got.wanted.get("refs/heads/main"), Some(&id));
        // The pack (empty here; real ones in tests/request_counts.rs) was read whole from band 1
        // past the progress line: gix verified its checksum.
    }
}
