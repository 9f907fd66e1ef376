//! Every relative link in README.md and docs/*.md (`[text](target)` and `![alt](target)`)
//! points at a file that exists, and every `#anchor` (in the same file or `file.md#anchor`) at
//! a heading that exists, named by GitHub's rule. Links to `http(s)://` and `mailto:` are not
//! followed. Plain std: the files are read as text.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every `.md` file of docs/.
fn markdown_files() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    let mut files = vec![root().join("README.md")];
    files.extend(docs);
    files
}

/// Whether a line opens or closes a fenced code block.
fn is_fence(line: &str) -> bool {
    line.trim_start().starts_with("```")
}

/// The text outside fenced code blocks, one paragraph at a time, with inline code removed
/// (a code span never crosses a paragraph).
fn prose(text: &str) -> Vec<String> {
    let mut paragraphs = Vec::new();
    let mut current = String::new();
    let mut in_fence = false;
    for line in text.lines() {
        if is_fence(line) {
            in_fence = !in_fence;
            paragraphs.push(std::mem::take(&mut current));
        } else if in_fence {
            continue;
        } else if line.trim().is_empty() {
            paragraphs.push(std::mem::take(&mut current));
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    paragraphs.push(current);
    paragraphs.iter().map(|p| without_code_spans(p.as_str())).collect()
}

/// A paragraph without what its backticks enclose.
fn without_code_spans(paragraph: &str) -> String {
    let outside: Vec<&str> = paragraph.split('`').step_by(2).collect();
    outside.join(" ")
}

/// The targets of the links in a piece of prose: what follows `](` up to `)`, without a title.
fn link_targets(prose: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = prose;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else {
            break;
        };
        let target = after[..end].split_whitespace().next().unwrap_or("");
        targets.push(target.to_string());
        rest = &after[end..];
    }
    targets
}

/// GitHub's anchor for a heading: lowercase; letters, digits, `_` and `-` kept; spaces become
/// `-`; everything else (punctuation, backticks, `/`) dropped.
fn slug(heading: &str) -> String {
    let mut slug = String::new();
    for c in heading.trim().to_lowercase().chars() {
        if c.is_alphanumeric() || c == '_' || c == '-' {
            slug.push(c);
        } else if c == ' ' {
            slug.push('-');
        }
    }
    slug
}

/// The anchors of a markdown file's headings (outside code blocks); a repeated heading gets
/// `-1`, `-2`, ... as on GitHub.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut in_fence = false;
    for line in text.lines() {
        if is_fence(line) {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if hashes == 0 || hashes > 6 {
            continue;
        }
        let Some(title) = line[hashes..].strip_prefix(' ') else {
            continue;
        };
        let base = slug(title);
        let mut candidate = base.clone();
        let mut n = 0;
        while seen.contains(&candidate) {
            n += 1;
            candidate = format!("{base}-{n}");
        }
        seen.insert(candidate);
    }
    seen
}

fn is_external(target: &str) -> bool {
    target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:")
}

#[test]
fn slugs_follow_githubs_rule() {
    assert_eq!(slug("Set-up commands"), "set-up-commands");
    assert_eq!(slug("The lineage/serial guard and `force=true`"), "the-lineageserial-guard-and-forcetrue");
    assert_eq!(slug("Lock promises, and what they cost"), "lock-promises-and-what-they-cost");
    assert_eq!(slug("Know your host: `gitstate doctor`"), "know-your-host-gitstate-doctor");
    assert_eq!(slug("503 Service Unavailable, with Retry-After"), "503-service-unavailable-with-retry-after");
    let repeated = anchors("# A\n\n```sh\n# not a heading\n```\n\n## A\n### B `c`\n");
    let expected: BTreeSet<String> = ["a", "a-1", "b-c"].iter().map(|s| s.to_string()).collect();
    assert_eq!(repeated, expected);
    assert_eq!(link_targets("see [x](a.md#b \"title\") and ![y](p.png)."), vec!["a.md#b", "p.png"]);
    assert_eq!(without_code_spans("a `[x](nowhere.md)` b"), "a   b");
}

#[test]
fn every_relative_link_points_at_a_file_and_a_heading_that_exist() {
    let mut followed = 0;
    let mut anchored = 0;
    let mut broken = Vec::new();
    let files = markdown_files();
    assert!(files.len() > 10, "README.md and the docs/ pages: found only {files:?}");
    for file in &files {
        let text = fs::read_to_string(file).expect("a markdown file");
        let dir = file.parent().expect("a file has a directory");
        let name = file.strip_prefix(root()).unwrap_or(file).display().to_string();
        for paragraph in prose(&text) {
            for target in link_targets(&paragraph) {
                if target.is_empty() || is_external(&target) {
                    continue;
                }
                followed += 1;
                let (path_part, anchor) = match target.split_once('#') {
                    Some((path_part, anchor)) => (path_part, Some(anchor)),
                    None => (target.as_str(), None),
                };
                let linked = if path_part.is_empty() { file.clone() } else { dir.join(path_part) };
                if !linked.exists() {
                    broken.push(format!("{name}: ({target}): no file {}", linked.display()));
                    continue;
                }
                let Some(anchor) = anchor else {
                    continue;
                };
                anchored += 1;
                let is_markdown = linked.extension().is_some_and(|e| e == "md");
                if !is_markdown {
                    broken.push(format!("{name}: ({target}): an anchor into a file that is not markdown"));
                    continue;
                }
                let headings = anchors(&fs::read_to_string(&linked).expect("a linked markdown file"));
                if !headings.contains(anchor) {
                    broken.push(format!("{name}: ({target}): no heading #{anchor} in {}", linked.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(followed >= 30, "only {followed} relative links found: is the link scan broken?");
    assert!(anchored >= 5, "only {anchored} links with an anchor found: is the link scan broken?");
}
