//! Terraform's LockInfo, both directions in one type: parsed strictly from what a caller sends
//! ([`LockInfo::parse`]), read leniently from what a lock branch holds ([`LockInfo::read_stored`]),
//! and always kept with the bytes it arrived as (stored and shown to competitors as they are).

use bytes::Bytes;

/// The largest LockInfo accepted: Terraform's are a few hundred bytes.
pub const MAX_LOCK_INFO_BYTES: usize = 64 << 10;
/// The longest lock ID accepted: it goes into log lines, commit trailers and error bodies.
const MAX_LOCK_ID_BYTES: usize = 1024;

/// A LockInfo: the fields gitstate reads, and the bytes it arrived as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    pub id: String,
    pub who: String,
    pub operation: String,
    pub raw: Bytes,
}

/// Why a caller's LockInfo (or lock ID) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockInfoError {
    #[error("the LockInfo is larger than {MAX_LOCK_INFO_BYTES} bytes")]
    TooLarge,
    #[error("the LockInfo is not UTF-8: invalid byte at offset {0}")]
    NotUtf8(usize),
    #[error("the body is not a Terraform LockInfo JSON object with a string `ID`")]
    NotLockInfo,
    #[error("the LockInfo has an empty ID")]
    EmptyId,
    #[error("the lock ID contains control characters")]
    ControlCharacters,
    #[error("the lock ID is longer than {MAX_LOCK_ID_BYTES} bytes")]
    IdTooLong,
}

#[derive(serde::Deserialize)]
struct Fields {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Who", default)]
    who: String,
    #[serde(rename = "Operation", default)]
    operation: String,
}

impl LockInfo {
    /// A caller's LockInfo: only `ID` is required (OpenTofu's force-unlock sends only it).
    pub fn parse(raw: Bytes) -> Result<Self, LockInfoError> {
        if raw.len() > MAX_LOCK_INFO_BYTES {
            return Err(LockInfoError::TooLarge);
        }
        std::str::from_utf8(&raw).map_err(|e| LockInfoError::NotUtf8(e.valid_up_to()))?;
        // Via Value: serde's derived reader would also take a JSON array as the struct.
        let value: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| LockInfoError::NotLockInfo)?;
        if !value.is_object() {
            return Err(LockInfoError::NotLockInfo);
        }
        let f: Fields = serde_json::from_value(value).map_err(|_| LockInfoError::NotLockInfo)?;
        if f.id.trim().is_empty() {
            return Err(LockInfoError::EmptyId);
        }
        Self::check_id(&f.id)?;
        Ok(LockInfo { id: f.id, who: f.who, operation: f.operation, raw })
    }

    /// A lock ID, whether from a LockInfo body or from `?ID=`: printable and short.
    pub fn check_id(id: &str) -> Result<(), LockInfoError> {
        if id.chars().any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')) {
            return Err(LockInfoError::ControlCharacters);
        }
        if id.len() > MAX_LOCK_ID_BYTES {
            return Err(LockInfoError::IdTooLong);
        }
        Ok(())
    }

    /// What the lock branch `reference` holds at `commit`, fit to show Terraform: the stored
    /// LockInfo when it has an ID (another tool's may lack the rest), or one made from what is
    /// known (a lock branch made by hand still blocks, and says so).
    pub fn read_stored(stored: Bytes, reference: &str, commit: gix::ObjectId) -> Self {
        let value = serde_json::from_slice::<serde_json::Value>(&stored).ok();
        let field = |k: &str| value.as_ref().and_then(|v| v.get(k)).and_then(|x| x.as_str()).unwrap_or_default();
        if !field("ID").is_empty() {
            let (id, who, operation) = (field("ID").to_owned(), field("Who").to_owned(), field("Operation").to_owned());
            return LockInfo { id, who, operation, raw: stored };
        }
        let info = serde_json::json!({
            "ID": "unknown",
            "Operation": "",
            "Info": format!("the lock branch {reference} (commit {commit}) holds no valid LockInfo; remove it with force-unlock"),
            "Who": "",
            "Version": "",
            "Created": "",
            "Path": "",
        });
        let raw = Bytes::from(serde_json::to_vec(&info).expect("a JSON value serializes"));
        LockInfo { id: "unknown".into(), who: String::new(), operation: String::new(), raw }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_reads_back_the_same() {
        let raw = Bytes::from_static(br#"{"ID":"abc","Operation":"OperationTypeApply","Who":"me@host","Info":""}"#);
        let parsed = LockInfo::parse(raw.clone()).unwrap();
        assert_eq!(
            (parsed.id.as_str(), parsed.who.as_str(), parsed.operation.as_str()),
            ("abc", "me@host", "OperationTypeApply")
        );
        let commit = gix::ObjectId::empty_tree(gix::hash::Kind::Sha1);
        assert_eq!(LockInfo::read_stored(raw, "refs/heads/locks/a", commit), parsed);
    }

    #[test]
    fn callers_are_held_to_the_form_stored_locks_are_not() {
        for (body, want) in [
            (&br#"[{"ID":"a"}]"#[..], LockInfoError::NotLockInfo),
            (br#"{"ID":7}"#, LockInfoError::NotLockInfo),
            (br#"{"ID":"  "}"#, LockInfoError::EmptyId),
            (b"{\"ID\":\"a\\u0007\"}", LockInfoError::ControlCharacters),
            (b"{\"ID\":\"\xff\"}", LockInfoError::NotUtf8(7)),
        ] {
            assert_eq!(LockInfo::parse(Bytes::copy_from_slice(body)), Err(want), "{body:?}");
        }
        assert_eq!(LockInfo::parse(Bytes::from(vec![b' '; MAX_LOCK_INFO_BYTES + 1])), Err(LockInfoError::TooLarge));
        assert_eq!(LockInfo::check_id(&"x".repeat(1025)), Err(LockInfoError::IdTooLong));
        // A lock branch made by hand, or by another tool, still holds: with what it says or with a note.
        let commit = gix::ObjectId::empty_tree(gix::hash::Kind::Sha1);
        let bare = LockInfo::read_stored(Bytes::from_static(br#"{"ID":"x"}"#), "r", commit);
        assert_eq!((bare.id.as_str(), bare.who.as_str()), ("x", ""));
        for stored in [&b"not json"[..], b"", br#"{"ID":""}"#, br#"{"Who":"w"}"#] {
            let info = LockInfo::read_stored(Bytes::copy_from_slice(stored), "refs/heads/locks/a", commit);
            assert_eq!(info.id, "unknown");
            let v: serde_json::Value = serde_json::from_slice(&info.raw).unwrap();
            assert!(v["Info"].as_str().unwrap().contains("refs/heads/locks/a"), "{v}");
        }
    }
}
