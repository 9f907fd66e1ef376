//! Validation of state paths and branch names: whatever a caller sends must be usable as
//! a file path in a git tree that hosts' fsck accepts, inside a ref name (`locks/<path>`),
//! and as a file name of a loose ref on disk.

/// Why a path was refused, in words fit for the caller.
pub fn check_state_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the state path is empty".into());
    }
    if path.starts_with('/') {
        return Err("the state path must be relative".into());
    }
    if path.len() > 1024 {
        return Err("the state path is longer than 1024 bytes".into());
    }
    for component in path.split('/') {
        check_component(component)?;
    }
    Ok(())
}

/// Why `name` cannot be a branch that holds states: it must be a valid ref name below
/// `refs/heads/`, and outside gitstate's lock namespace (`locks` and `locks/...`).
pub fn check_branch(name: &str) -> Result<(), String> {
    if name.is_empty() || name.starts_with('/') {
        return Err("not a valid branch name".into());
    }
    if name.len() > 1024 {
        return Err("the branch name is longer than 1024 bytes".into());
    }
    for c in name.split('/') {
        check_component(c).map_err(|_| "not a valid branch name".to_string())?;
    }
    if name == "locks" || name.starts_with("locks/") {
        return Err("`locks` and `locks/...` hold gitstate's locks and cannot hold states".into());
    }
    Ok(())
}

/// Longest component: a loose ref `<component>.lock` must fit the filesystem's 255-byte name limit.
const MAX_COMPONENT_BYTES: usize = 250;

/// Code points HFS+ ignores in names: git's fsck reads `\u{200c}.git` as `.git` and refuses it.
fn is_hfs_ignorable(ch: char) -> bool {
    matches!(ch, '\u{200c}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{206a}'..='\u{206f}' | '\u{feff}')
}

fn check_component(c: &str) -> Result<(), String> {
    if c.is_empty() {
        return Err("the state path has an empty component (`//` or a trailing `/`)".into());
    }
    if c.starts_with('.') {
        return Err(format!(
            "the path component `{}` starts with `.` (`.`, `..` and `.git` are not allowed)",
            sanitize(c)
        ));
    }
    if c.contains("..") {
        return Err("the state path must not contain `..`".into());
    }
    if c.ends_with(".lock") {
        return Err("a path component must not end in `.lock`".into());
    }
    if c.ends_with('.') {
        return Err("a path component must not end in `.`".into());
    }
    if c.contains("@{") || c == "@" {
        return Err("the state path must not contain `@{` or be `@`".into());
    }
    if let Some(bad) = c.chars().find(|&ch| ch.is_ascii_control() || " ~^:?*[\\".contains(ch)) {
        return Err(format!("the state path contains {:?}, which git does not allow in a ref name", bad));
    }
    if c.len() > MAX_COMPONENT_BYTES {
        return Err(format!("a path component is longer than {MAX_COMPONENT_BYTES} bytes"));
    }
    // What git's fsck refuses in tree entries (hosts with receive.fsckObjects, e.g. GitHub and
    // GitLab, reject such pushes): names that some filesystem reads as `.git`.
    if c.chars().any(|ch| is_hfs_ignorable(ch) || ch.is_control()) {
        return Err("the state path contains an invisible or control character".into());
    }
    if c.to_ascii_lowercase().starts_with("git~") {
        return Err("a path component must not look like a short name of `.git` (`git~1`)".into());
    }
    Ok(())
}

/// Keep error bodies short and printable.
fn sanitize(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for p in
            ["terraform.tfstate", "envs/prod/terraform.tfstate", "a-b_c/d+e@f", "x/y.tfstate.json", "ünïcode/state"]
        {
            assert!(check_state_path(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn refuses_traversal_hidden_and_ref_breaking_paths() {
        for p in [
            "",
            "/abs",
            "../x",
            "a/../b",
            "a/./b",
            ".git/config",
            "a/.git",
            "a/.hidden",
            "a//b",
            "a/",
            "x.lock",
            "a.lock/b",
            "a/b.",
            "sp ace",
            "ti~lde",
            "ca^ret",
            "co:lon",
            "q?",
            "st*r",
            "br[acket",
            "back\\slash",
            "at@{x}",
            "@",
            "nl\nx",
            "del\u{7f}",
        ] {
            assert!(check_state_path(p).is_err(), "{p:?} should be refused");
        }
    }

    #[test]
    fn branch_names() {
        assert!(check_branch("main").is_ok());
        assert!(check_branch("team/states").is_ok());
        assert!(check_branch("lockstep").is_ok());
        assert!(check_branch("team/locks").is_ok());
        for bad in ["a..b", ".hidden", "x.lock", "", "/x", "a//b", "@", "a/@/b", "locks", "locks/x", "locks/@/main/@/a"]
        {
            assert!(check_branch(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(check_branch(&"a".repeat(251)).is_err());
        assert!(check_branch(&format!("{}/b", "a".repeat(250))).is_ok());
    }

    #[test]
    fn names_hosts_fsck_would_refuse_are_refused_up_front() {
        for p in [
            "\u{200c}.git/config",
            "a/\u{200d}.git",
            "a/.g\u{200c}it",
            "a/\u{feff}x",
            "GIT~1/x",
            "a/git~2",
            "a/\u{202e}gnp.exe",
            "a/x\u{85}y",
        ] {
            assert!(check_state_path(p).is_err(), "{p:?} should be refused");
        }
        assert!(check_state_path(&"a".repeat(251)).is_err());
        assert!(check_state_path(&"a".repeat(250)).is_ok());
        assert!(check_state_path("git/x").is_ok());
    }
}
