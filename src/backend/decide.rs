//! The write rules as pure functions: given what is stored and who holds the lock,
//! what answer a write gets, or which commit it makes. No I/O here, so every rule is
//! tested in microseconds.

use bytes::Bytes;

use super::trailers::{one_line, Trailers};
use super::{BackendError, LockInfo, Outcome, Stale};

/// Who holds a lock, as read from its branch.
#[derive(Debug, Clone)]
pub struct Holder {
    pub commit: gix::ObjectId,
    /// The LockInfo as stored (its bytes shown to competitors as they are).
    pub info: LockInfo,
    /// The lock branch it was read from (full ref name).
    pub reference: String,
}

/// A write (or delete, `content: None`) as the caller asked for it.
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    pub path: &'a str,
    /// The state to store, checked once where it arrived; `None` deletes.
    pub content: Option<&'a StateBody>,
    pub lock_id: Option<&'a str>,
    /// `?force=true`: skip the lineage/serial guard.
    pub force: bool,
    /// The commit subject when it is not `Update <path>` / `Delete <path>` (a restore).
    pub subject: Option<&'a str>,
}

/// What a write comes to, given the current tips.
#[derive(Debug)]
pub enum Decision {
    /// Answer now; nothing to commit.
    Answer(Result<Outcome, BackendError>),
    /// Commit with this message; push guarded by the lock of `guard` (`None`: no lock may appear).
    Commit { message: String, guard: Option<gix::ObjectId> },
}

/// Decide a write over `stored` (the current file, if any) with `holder` holding the lock.
pub fn decide_write(write: &Write<'_>, holder: Option<&Holder>, stored: Option<&[u8]>) -> Decision {
    let guard = match (write.lock_id, holder) {
        (Some(id), Some(h)) if h.info.id == id => Some(h),
        (_, Some(h)) => return Decision::Answer(Err(BackendError::Locked { holder: h.info.raw.clone() })),
        (Some(id), None) => return Decision::Answer(Err(BackendError::NotLocked(id.to_string()))),
        (None, None) => None,
    };
    if stored == write.content.map(|c| c.bytes().as_ref()) {
        // A retried write (or deleting what is not there): already in place, nothing to commit.
        return Decision::Answer(Ok(Outcome::Done));
    }
    // What is stored is not a state (damaged, or not ours): no guard can read it, so only a
    // deliberate overwrite replaces it.
    let stored = match stored.map(|bytes| (bytes, StateHead::check(bytes))) {
        Some((_, Err(why))) if !write.force => {
            return Decision::Answer(Err(BackendError::StaleState(Stale::StoredNotAState(why))))
        }
        Some((_, Err(why))) => {
            tracing::warn!(reason = %why, "a stored file that is not a state replaced with force=true");
            None
        }
        Some((bytes, Ok(head))) => Some((bytes, head)),
        None => None,
    };
    if let (Some((bytes, head)), Some(incoming)) = (stored, write.content) {
        match guard_serial(bytes, &head, incoming) {
            SerialCheck::Write => {}
            SerialCheck::AlreadyStored => return Decision::Answer(Ok(Outcome::Done)),
            SerialCheck::Refuse(why) if !write.force => return Decision::Answer(Err(BackendError::StaleState(why))),
            SerialCheck::Refuse(why) => tracing::warn!(reason = %why, "guard overridden with force=true"),
        }
    }
    Decision::Commit { message: commit_message(write, guard), guard: guard.map(|h| h.commit) }
}

fn commit_message(write: &Write<'_>, lock: Option<&Holder>) -> String {
    let (path, content) = (write.path, write.content);
    let mut m = match (write.subject, content) {
        (Some(subject), _) => format!("{}\n\n", one_line(subject)),
        (None, Some(_)) => format!("Update {path}\n\n"),
        (None, None) => format!("Delete {path}\n\n"),
    };
    let mut trailers = Trailers::default();
    if let Some(h) = lock {
        trailers.lock_id = Some(h.info.id.clone());
        trailers.who = Some(h.info.who.clone());
        trailers.operation = Some(h.info.operation.clone());
    }
    if let Some(state) = content {
        trailers.serial = state.head().serial;
        trailers.lineage = state.head().lineage.clone();
    }
    m.push_str(&trailers.write());
    m
}

/// A state document as checked once, where it arrived: its bytes and the head read from them.
/// Only [`StateBody::check`] makes one, so every rule downstream reads the same head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateBody {
    bytes: Bytes,
    head: StateHead,
}

impl StateBody {
    pub fn check(bytes: Bytes) -> Result<Self, NotAState> {
        let head = StateHead::check(&bytes)?;
        Ok(StateBody { bytes, head })
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn head(&self) -> &StateHead {
        &self.head
    }
}

/// The fields of a state the guard and the trailers need, read without building the whole
/// document. A body "is guarded" when it carries `serial` or `lineage`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StateHead {
    pub serial: Option<u64>,
    pub lineage: Option<String>,
}

/// Why bytes are not a Terraform state document: the one check for what a caller sends and
/// for what is found stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAState {
    /// JSON is UTF-8 (RFC 8259): a byte sequence that is not is refused wherever it stands.
    #[error("the body is not UTF-8: invalid byte at offset {0}")]
    NotUtf8(usize),
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("the state must be a JSON object")]
    NotAnObject,
    #[error("the state is malformed: {0}")]
    Field(StateFieldError),
}

/// Why a body's guard fields cannot be trusted; the caller gets a 400 naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateFieldError {
    #[error("`serial` must be a whole number from 0 to 18446744073709551615")]
    Serial,
    #[error("`lineage` must be a string")]
    Lineage,
    #[error("`{0}` appears more than once")]
    Duplicate(&'static str),
    #[error("the body is not a JSON object")]
    NotAnObject,
}

impl StateHead {
    /// Check that `body` is a state document (UTF-8, one JSON object, guard fields well
    /// typed) and read its head. Validates without building the document: a state can be
    /// many megabytes.
    pub fn check(body: &[u8]) -> Result<Self, NotAState> {
        let text = std::str::from_utf8(body).map_err(|e| NotAState::NotUtf8(e.valid_up_to()))?;
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => NotAState::NotAnObject,
                Err(e) => NotAState::NotJson(e.to_string()),
            });
        }
        // One pass: the whole object is parsed while its head is read.
        let mut de = serde_json::Deserializer::from_str(text);
        let head = Self::visit(&mut de).map_err(|e| NotAState::NotJson(e.to_string()))?;
        de.end().map_err(|e| NotAState::NotJson(e.to_string()))?;
        head.map_err(NotAState::Field)
    }

    /// Read `serial` and `lineage` of a JSON object, refusing any that is mistyped or repeated
    /// (two parsers must never read two different serials from one body).
    pub fn read(body: &[u8]) -> Result<Self, StateFieldError> {
        let mut de = serde_json::Deserializer::from_slice(body);
        Self::visit(&mut de).unwrap_or(Err(StateFieldError::NotAnObject))
    }

    /// The head of the JSON object `de` holds: a syntax error outside, a field error inside.
    fn visit<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Result<Self, StateFieldError>, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, Visitor};
        struct Head;
        impl<'de> Visitor<'de> for Head {
            type Value = Result<StateHead, StateFieldError>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut head = StateHead::default();
                let (mut seen_serial, mut seen_lineage) = (false, false);
                let mut failure = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "serial" => {
                            let value: serde_json::Value = map.next_value()?;
                            failure =
                                failure.or(if seen_serial { Some(StateFieldError::Duplicate("serial")) } else { None });
                            seen_serial = true;
                            match value.as_u64().filter(|_| value.is_u64()) {
                                Some(n) => head.serial = Some(n),
                                None => failure = failure.or(Some(StateFieldError::Serial)),
                            }
                        }
                        "lineage" => {
                            let value: serde_json::Value = map.next_value()?;
                            failure = failure.or(if seen_lineage {
                                Some(StateFieldError::Duplicate("lineage"))
                            } else {
                                None
                            });
                            seen_lineage = true;
                            match value {
                                serde_json::Value::String(l) => head.lineage = Some(l),
                                _ => failure = failure.or(Some(StateFieldError::Lineage)),
                            }
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(match failure {
                    Some(f) => Err(f),
                    None => Ok(head),
                })
            }
        }
        de.deserialize_map(Head)
    }

    fn is_guarded(&self) -> bool {
        self.serial.is_some() || self.lineage.is_some()
    }
}

/// Equal as JSON (formatting aside). Only reached for two states of the same serial.
fn same_json(a: &[u8], b: &[u8]) -> bool {
    let parse = |x: &[u8]| serde_json::from_slice::<serde_json::Value>(x).ok();
    matches!((parse(a), parse(b)), (Some(x), Some(y)) if x == y)
}

/// What the lineage/serial guard says about writing `incoming` over `stored`.
#[derive(Debug, PartialEq, Eq)]
pub enum SerialCheck {
    Write,
    /// Same serial and the same JSON: a retried write, nothing to do.
    AlreadyStored,
    Refuse(Stale),
}

/// Terraform's own rule for a persistent state manager: never replace a state of another
/// lineage or a newer serial. A stored state that carries neither field (e.g. an encrypted
/// envelope) is unguarded; a guarded one is only replaced by a body that proves it is newer.
pub fn guard_serial(stored: &[u8], old: &StateHead, incoming: &StateBody) -> SerialCheck {
    if !old.is_guarded() {
        return SerialCheck::Write;
    }
    let new = incoming.head();
    if !new.is_guarded() {
        return SerialCheck::Refuse(Stale::Unguarded);
    }
    if let (Some(a), Some(b)) = (&old.lineage, &new.lineage) {
        if a != b {
            return SerialCheck::Refuse(Stale::Lineage { stored: a.clone(), incoming: b.clone() });
        }
    }
    if old.lineage.is_some() && new.lineage.is_none() {
        return SerialCheck::Refuse(Stale::Unguarded);
    }
    match (old.serial, new.serial) {
        (Some(_), None) => SerialCheck::Refuse(Stale::Unguarded),
        (Some(a), Some(b)) if b < a => SerialCheck::Refuse(Stale::Serial { stored: a, incoming: b }),
        (Some(a), Some(b)) if a == b && !same_json(stored, incoming.bytes()) => {
            SerialCheck::Refuse(Stale::SameSerial { serial: a })
        }
        (Some(a), Some(b)) if a == b => SerialCheck::AlreadyStored,
        _ => SerialCheck::Write,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(lineage: &str, serial: u64, v: &str) -> Vec<u8> {
        format!(r#"{{"version":4,"lineage":"{lineage}","serial":{serial},"outputs":{{"x":"{v}"}}}}"#).into_bytes()
    }

    fn holder(id: &str) -> Holder {
        Holder {
            commit: gix::ObjectId::empty_tree(gix::hash::Kind::Sha1),
            info: LockInfo::parse(Bytes::from(format!(
                r#"{{"ID":"{id}","Who":"me@host","Operation":"OperationTypeApply"}}"#
            )))
            .unwrap(),
            reference: "refs/heads/locks/a.tfstate".into(),
        }
    }

    fn write<'a>(content: Option<&'a StateBody>, lock_id: Option<&'a str>, force: bool) -> Write<'a> {
        Write { path: "a.tfstate", content, lock_id, force, subject: None }
    }

    fn body(bytes: &[u8]) -> StateBody {
        StateBody::check(Bytes::copy_from_slice(bytes)).expect("a state")
    }

    /// The guard over two documents, each checked as it would be where it arrives.
    fn guard(stored: &[u8], incoming: &[u8]) -> SerialCheck {
        guard_serial(stored, &StateHead::check(stored).unwrap(), &body(incoming))
    }

    #[test]
    fn serial_and_lineage_guard() {
        assert_eq!(guard(&st("L", 1, "a"), &st("L", 2, "b")), SerialCheck::Write);
        assert!(matches!(guard(&st("L", 1, "a"), &st("M", 2, "b")), SerialCheck::Refuse(Stale::Lineage { .. })));
        assert_eq!(
            guard(&st("L", 3, "a"), &st("L", 2, "b")),
            SerialCheck::Refuse(Stale::Serial { stored: 3, incoming: 2 })
        );
        assert_eq!(guard(&st("L", 3, "a"), &st("L", 3, "b")), SerialCheck::Refuse(Stale::SameSerial { serial: 3 }));
        // Same JSON, other formatting: a retry.
        let pretty =
            serde_json::to_vec_pretty(&serde_json::from_slice::<serde_json::Value>(&st("L", 3, "a")).unwrap()).unwrap();
        assert_eq!(guard(&st("L", 3, "a"), &pretty), SerialCheck::AlreadyStored);
        // No serial/lineage (an encrypted envelope) over a guarded state: refused (force overrides).
        assert_eq!(guard(&st("L", 3, "a"), br#"{"encrypted_data":"xyz"}"#), SerialCheck::Refuse(Stale::Unguarded));
        // ... but stored over nothing guarded, and a state may replace an envelope.
        assert_eq!(guard(br#"{"encrypted_data":"old"}"#, br#"{"encrypted_data":"xyz"}"#), SerialCheck::Write);
        assert_eq!(guard(br#"{"encrypted_data":"old"}"#, &st("L", 1, "a")), SerialCheck::Write);
        // Dropping a field the stored state has is not proof of being newer.
        assert_eq!(guard(&st("L", 3, "a"), br#"{"version":4,"lineage":"L"}"#), SerialCheck::Refuse(Stale::Unguarded));
        assert_eq!(guard(&st("L", 3, "a"), br#"{"version":4,"serial":9}"#), SerialCheck::Refuse(Stale::Unguarded));
    }

    #[test]
    fn locks_decide_who_may_write() {
        let stored_body = st("L", 2, "b");
        let body = body(&stored_body);
        let mine = holder("mine");
        let answer = |d: Decision| match d {
            Decision::Answer(a) => a,
            Decision::Commit { .. } => panic!("expected an answer, got a commit"),
        };
        // Another holder: 423 with the holder's LockInfo, with or without an ID.
        for id in [Some("other"), None] {
            match answer(decide_write(&write(Some(&body), id, false), Some(&mine), None)) {
                Err(BackendError::Locked { holder }) => assert_eq!(holder, mine.info.raw),
                other => panic!("{other:?}"),
            }
        }
        // An ID that holds nothing.
        assert!(matches!(
            answer(decide_write(&write(Some(&body), Some("gone"), false), None, None)),
            Err(BackendError::NotLocked(id)) if id == "gone"
        ));
        // The holder writes: a commit guarded by its lock commit, with trailers.
        match decide_write(&write(Some(&body), Some("mine"), false), Some(&mine), None) {
            Decision::Commit { message, guard } => {
                assert_eq!(guard, Some(mine.commit));
                assert!(message.starts_with("Update a.tfstate\n\n"), "{message}");
                for t in [
                    "Lock-ID: mine\n",
                    "Who: me@host\n",
                    "Operation: OperationTypeApply\n",
                    "Serial: 2\n",
                    "Lineage: L\n",
                ] {
                    assert!(message.contains(t), "{t} missing in {message}");
                }
            }
            other => panic!("{other:?}"),
        }
        // No lock anywhere: a commit that no lock may appear under.
        assert!(matches!(
            decide_write(&write(None, None, false), None, Some(&stored_body)),
            Decision::Commit { guard: None, ref message } if message.starts_with("Delete a.tfstate")
        ));
    }

    #[test]
    fn retries_and_the_guard() {
        let stored = st("L", 3, "a");
        // The identical write again, or a delete of nothing: 200 and no commit.
        assert!(matches!(
            decide_write(&write(Some(&body(&stored)), None, false), None, Some(&stored)),
            Decision::Answer(Ok(Outcome::Done))
        ));
        assert!(matches!(decide_write(&write(None, None, false), None, None), Decision::Answer(Ok(Outcome::Done))));
        // A stale serial is refused, unless forced.
        let old = body(&st("L", 2, "z"));
        assert!(matches!(
            decide_write(&write(Some(&old), None, false), None, Some(&stored)),
            Decision::Answer(Err(BackendError::StaleState(Stale::Serial { stored: 3, incoming: 2 })))
        ));
        assert!(matches!(decide_write(&write(Some(&old), None, true), None, Some(&stored)), Decision::Commit { .. }));
    }

    #[test]
    fn mistyped_or_repeated_guard_fields_are_named() {
        let bad: &[(&str, StateFieldError)] = &[
            (r#"{"version":4,"serial":-1,"lineage":"L"}"#, StateFieldError::Serial),
            (r#"{"version":4,"serial":1.5,"lineage":"L"}"#, StateFieldError::Serial),
            (r#"{"version":4,"serial":1.0,"lineage":"L"}"#, StateFieldError::Serial),
            (r#"{"version":4,"serial":"7","lineage":"L"}"#, StateFieldError::Serial),
            (r#"{"version":4,"serial":1e300,"lineage":"L"}"#, StateFieldError::Serial),
            (r#"{"version":4,"serial":18446744073709551616,"lineage":"L"}"#, StateFieldError::Serial),
            (r#"{"version":4,"serial":null,"lineage":"L"}"#, StateFieldError::Serial),
            (r#"{"version":4,"serial":[1],"lineage":"L"}"#, StateFieldError::Serial),
            (r#"{"version":4,"serial":1,"lineage":7}"#, StateFieldError::Lineage),
            (r#"{"version":4,"serial":1,"lineage":null}"#, StateFieldError::Lineage),
            (r#"{"version":4,"serial":1,"lineage":{"a":1}}"#, StateFieldError::Lineage),
            (r#"{"version":4,"serial":1,"serial":9,"lineage":"L"}"#, StateFieldError::Duplicate("serial")),
            (r#"{"version":4,"serial":1,"lineage":"L","lineage":"M"}"#, StateFieldError::Duplicate("lineage")),
            ("[1,2]", StateFieldError::NotAnObject),
        ];
        for (body, want) in bad {
            assert_eq!(StateHead::read(body.as_bytes()).as_ref(), Err(want), "{body}");
        }
        assert_eq!(
            StateHead::read(br#"{"version":4,"serial":18446744073709551615,"lineage":"L","x":{"serial":"nested"}}"#),
            Ok(StateHead { serial: Some(u64::MAX), lineage: Some("L".into()) })
        );
        assert_eq!(StateHead::read(br#"{"encrypted_data":"x"}"#), Ok(StateHead::default()));
    }

    #[test]
    fn trailers_stay_on_one_line() {
        assert_eq!(one_line("a\nb\rc\u{1b}"), "a b c ");
    }
}
