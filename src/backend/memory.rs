//! What one process remembers between requests, bounded whatever callers send: LockInfo
//! by lock-commit id (a lock commit never changes) and the last tip seen of each ref (only
//! ever a guess to push against). Least recently used entries go first.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;

use super::LockInfo;
use crate::storage::{ObjectId, Tips};

/// Bytes of LockInfo kept in memory (LockInfos are at most 64 KiB each; most are ~200 bytes).
const LOCK_INFO_BYTES: usize = 4 << 20;
/// Refs whose tips are remembered.
const KNOWN_REFS: usize = 4096;
/// Stored files (by blob id) remembered as checked to be states.
const CHECKED_STATES: usize = 4096;
/// Stored files (by blob id) remembered as sealed or not (a listing reads each file once).
const SEALED_FORMS: usize = 16384;

pub struct Memory {
    lock_infos: Mutex<(LruCache<ObjectId, LockInfo>, usize)>,
    tips: Mutex<LruCache<String, Option<ObjectId>>>,
    /// Blob ids of stored files found to be states: content-addressed, so one check is enough
    /// (a large state is not scanned again on every GET).
    checked_states: Mutex<LruCache<ObjectId, ()>>,
    /// Whether a stored file (by blob id) is sealed: content-addressed, so read once.
    sealed_forms: Mutex<LruCache<ObjectId, bool>>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            lock_infos: Mutex::new((LruCache::unbounded(), 0)),
            tips: Mutex::new(LruCache::new(NonZeroUsize::new(KNOWN_REFS).expect("not zero"))),
            checked_states: Mutex::new(LruCache::new(NonZeroUsize::new(CHECKED_STATES).expect("not zero"))),
            sealed_forms: Mutex::new(LruCache::new(NonZeroUsize::new(SEALED_FORMS).expect("not zero"))),
        }
    }
}

impl Memory {
    pub fn lock_info(&self, commit: &ObjectId) -> Option<LockInfo> {
        self.lock_infos.lock().expect("lock_infos poisoned").0.get(commit).cloned()
    }

    pub fn remember_lock_info(&self, commit: ObjectId, info: LockInfo) {
        let mut guard = self.lock_infos.lock().expect("lock_infos poisoned");
        let (cache, bytes) = &mut *guard;
        *bytes += info.raw.len();
        if let Some(old) = cache.put(commit, info) {
            *bytes -= old.raw.len();
        }
        while *bytes > LOCK_INFO_BYTES {
            match cache.pop_lru() {
                Some((_, old)) => *bytes -= old.raw.len(),
                None => break,
            }
        }
    }

    /// Whether the stored file `blob` is sealed, if known.
    pub fn is_sealed(&self, blob: &ObjectId) -> Option<bool> {
        self.sealed_forms.lock().expect("sealed_forms poisoned").get(blob).copied()
    }

    pub fn remember_sealed(&self, blob: ObjectId, sealed: bool) {
        self.sealed_forms.lock().expect("sealed_forms poisoned").put(blob, sealed);
    }

    /// Whether the stored file `blob` was found to be a state before.
    pub fn is_checked_state(&self, blob: &ObjectId) -> bool {
        self.checked_states.lock().expect("checked_states poisoned").get(blob).is_some()
    }

    pub fn checked_state(&self, blob: ObjectId) {
        self.checked_states.lock().expect("checked_states poisoned").put(blob, ());
    }

    /// Remember `tips` as the state of `refs` (a ref missing from `tips` was seen absent).
    pub fn saw(&self, refs: &[String], tips: &Tips) {
        let mut known = self.tips.lock().expect("tips poisoned");
        for r in refs {
            known.put(r.clone(), tips.get(r).copied());
        }
    }

    pub fn set_tip(&self, name: &str, tip: Option<ObjectId>) {
        self.tips.lock().expect("tips poisoned").put(name.to_owned(), tip);
    }

    pub fn forget_tip(&self, name: &str) {
        self.tips.lock().expect("tips poisoned").pop(name);
    }

    pub fn forget_tips(&self) {
        self.tips.lock().expect("tips poisoned").clear();
    }

    /// The remembered tips of `refs`, if every one of them has been seen.
    pub fn guess(&self, refs: &[String]) -> Option<Tips> {
        let mut known = self.tips.lock().expect("tips poisoned");
        let mut tips = Tips::new();
        for r in refs {
            if let Some(id) = known.get(r)? {
                tips.insert(r.clone(), *id);
            }
        }
        Some(tips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn id(n: u8) -> ObjectId {
        ObjectId::from_bytes_or_panic(&[n; 20])
    }

    #[test]
    fn lock_infos_are_bounded_by_bytes_and_tips_by_count() {
        let m = Memory::default();
        let mut raw = br#"{"ID":"x","Info":""#.to_vec();
        raw.resize((64 << 10) - 2, b'x');
        raw.extend_from_slice(br#""}"#);
        let big = LockInfo::parse(Bytes::from(raw)).unwrap();
        assert_eq!(big.raw.len(), 64 << 10);
        for n in 0..=255u8 {
            m.remember_lock_info(id(n), big.clone());
        }
        let kept = (0..=255u8).filter(|n| m.lock_info(&id(*n)).is_some()).count();
        assert!(kept * (64 << 10) <= LOCK_INFO_BYTES, "{kept} entries of 64 KiB kept");
        assert!(m.lock_info(&id(255)).is_some(), "the newest stays");
        assert!(m.lock_info(&id(0)).is_none(), "the oldest went");
        for n in 0..(KNOWN_REFS + 100) {
            m.set_tip(&format!("refs/heads/locks/{n}"), None);
        }
        assert!(m.guess(&["refs/heads/locks/0".to_string()]).is_none());
        assert!(m.guess(&[format!("refs/heads/locks/{}", KNOWN_REFS + 99)]).is_some());
        // Checked states: remembered by blob id, bounded by count.
        assert!(!m.is_checked_state(&id(1)));
        m.checked_state(id(1));
        assert!(m.is_checked_state(&id(1)) && !m.is_checked_state(&id(2)));
        for n in 0..(CHECKED_STATES + 10) {
            let mut bytes = [0u8; 20];
            bytes[..8].copy_from_slice(&(n as u64 + 1000).to_be_bytes());
            m.checked_state(ObjectId::from_bytes_or_panic(&bytes));
        }
        assert!(!m.is_checked_state(&id(1)), "the oldest went");
    }
}
