//! Validation of state paths and branch names: whatever a caller sends must be
//! usable both as a file path in a git tree and inside a ref name (`locks/<path>`).

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

/// True when `name` (e.g. a branch `main` or `envs/prod`) is a valid ref name below `refs/heads/`.
pub fn is_valid_ref_component_path(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('/') && name.split('/').all(|c| check_component(c).is_ok())
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
        assert!(is_valid_ref_component_path("main"));
        assert!(is_valid_ref_component_path("team/states"));
        assert!(!is_valid_ref_component_path("a..b"));
        assert!(!is_valid_ref_component_path(".hidden"));
        assert!(!is_valid_ref_component_path("x.lock"));
    }
}
