//! What the tests send and check, in one copy: LockInfos and states as Terraform 1.0.3
//! sends them, and a strict fsck of a server repository.

use std::path::Path;

use super::gitd::git_try;

/// The lineage of every [`state`].
pub const LINEAGE: &str = "lin-1";

/// A LockInfo as Terraform 1.0.3 sends it, as JSON text: `ID` = `id`, `Who` = `<id>@test`,
/// `Operation` = `OperationTypeApply`.
pub fn lock_info(id: &str) -> String {
    format!(
        r#"{{"ID":"{id}","Operation":"OperationTypeApply","Info":"","Who":"{id}@test","Version":"1.0.3","Created":"2026-01-01T00:00:00Z","Path":""}}"#
    )
}

/// A LockInfo with holder `who` and `operation` (e.g. `OperationTypePlan`), as a JSON value
/// (for tests that send it over HTTP or compare it with what the server answers).
pub fn lock_info_value(id: &str, who: &str, operation: &str) -> serde_json::Value {
    serde_json::json!({
        "ID": id,
        "Operation": operation,
        "Info": "",
        "Who": who,
        "Version": "1.0.3",
        "Created": "2024-01-01T00:00:00.000000000Z",
        "Path": "",
    })
}

/// A Terraform state body of lineage [`LINEAGE`] with output `x` = `value` (indented,
/// trailing newline, as Terraform sends it).
pub fn state(serial: u64, value: &str) -> String {
    state_with_lineage(LINEAGE, serial, value)
}

/// Like [`state`], of lineage `lineage`.
pub fn state_with_lineage(lineage: &str, serial: u64, value: &str) -> String {
    format!(
        "{{\n  \"version\": 4,\n  \"terraform_version\": \"1.0.3\",\n  \"serial\": {serial},\n  \"lineage\": \"{lineage}\",\n  \"outputs\": {{\"x\": {{\"value\": \"{value}\", \"type\": \"string\"}}}},\n  \"resources\": []\n}}\n"
    )
}

/// `git fsck --strict` of `repo` (bare or not); panics with git's report unless it
/// succeeds without an error or warning line.
#[track_caller]
pub fn fsck_clean(repo: &Path) {
    let out = git_try(repo, &["fsck", "--strict", "--no-dangling", "--no-progress"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "git fsck --strict of {} failed ({}):\n{text}", repo.display(), out.status);
    assert!(
        !text.lines().any(|l| l.starts_with("error") || l.starts_with("warning")),
        "git fsck --strict of {} complained:\n{text}",
        repo.display()
    );
}
