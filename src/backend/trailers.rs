//! The trailers of gitstate's commits, written and read in this one place: history is listed
//! from them alone, and a lock commit says which branch it locks. Renaming a key here renames
//! it on both sides.

/// The trailers a commit may carry, in the order they are written.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Trailers {
    pub lock_id: Option<String>,
    pub who: Option<String>,
    pub operation: Option<String>,
    pub serial: Option<u64>,
    pub lineage: Option<String>,
    /// On a lock commit: the branch the lock is for.
    pub branch: Option<String>,
}

const LOCK_ID: &str = "Lock-ID";
const WHO: &str = "Who";
const OPERATION: &str = "Operation";
const SERIAL: &str = "Serial";
const LINEAGE: &str = "Lineage";
const BRANCH: &str = "Branch";

/// A value as a trailer may hold it: one line and short, whatever the client sent.
pub fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(200).collect()
}

impl Trailers {
    /// The trailer block: one `Key: value` line for each field that is set.
    pub fn write(&self) -> String {
        let serial = self.serial.map(|s| s.to_string());
        let fields = [
            (LOCK_ID, self.lock_id.as_deref()),
            (WHO, self.who.as_deref()),
            (OPERATION, self.operation.as_deref()),
            (SERIAL, serial.as_deref()),
            (LINEAGE, self.lineage.as_deref()),
            (BRANCH, self.branch.as_deref()),
        ];
        fields.iter().filter_map(|(key, value)| value.map(|v| format!("{key}: {}\n", one_line(v)))).collect()
    }

    /// The trailers of a commit `message` (the last line of each key counts).
    pub fn read(message: &str) -> Self {
        let get = |key: &str| {
            message
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(": ")))
                .map(str::to_owned)
        };
        Trailers {
            lock_id: get(LOCK_ID),
            who: get(WHO),
            operation: get(OPERATION),
            serial: get(SERIAL).and_then(|s| s.parse().ok()),
            lineage: get(LINEAGE),
            branch: get(BRANCH),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_round_trip_and_stay_on_one_line() {
        let all = Trailers {
            lock_id: Some("a1b2".into()),
            who: Some("me@host".into()),
            operation: Some("OperationTypeApply".into()),
            serial: Some(u64::MAX),
            lineage: Some("lin-1".into()),
            branch: Some("main".into()),
        };
        let block = all.write();
        assert_eq!(
            block,
            "Lock-ID: a1b2\nWho: me@host\nOperation: OperationTypeApply\nSerial: 18446744073709551615\nLineage: lin-1\nBranch: main\n"
        );
        assert_eq!(Trailers::read(&format!("Update x\n\n{block}")), all);
        assert_eq!(Trailers::read("Update x\n"), Trailers::default());
        // A value with line breaks cannot forge another trailer.
        let hostile = Trailers { who: Some("me\nSerial: 999\rLock-ID: forged".into()), ..Default::default() };
        let read = Trailers::read(&format!("Update x\n\n{}", hostile.write()));
        assert_eq!(read.serial, None);
        assert_eq!(read.lock_id, None);
        assert_eq!(read.who.as_deref(), Some("me Serial: 999 Lock-ID: forged"));
        assert_eq!(one_line(&"x".repeat(500)).len(), 200);
    }
}
