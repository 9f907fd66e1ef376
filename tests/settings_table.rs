//! Every setting is declared once (src/config.rs, clap `env`): the configuration table (docs/configuration.md),
//! the variables the code names and the ones template.yaml sets all agree with that declaration.

use std::collections::BTreeSet;
use std::path::Path;

use clap::{Args, Command};
use gitstate::run::RunArgs;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Variable → flag, as declared (the settings and `run`'s `--state`).
fn declared() -> Vec<(String, String)> {
    let cmd = RunArgs::augment_args(Command::new("run"));
    cmd.get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_string_lossy().into_owned(), format!("--{}", a.get_long()?))))
        .collect()
}

fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("GITSTATE_") {
        let tail = &rest[at..];
        let end =
            tail.find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        let name = tail[..end].trim_end_matches('_');
        // `GITSTATE_*`, `GITSTATE_GIT_*`: a family, not a name.
        if !tail[end..].starts_with('*') {
            names.insert(name.to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The rows of the configuration table (docs/configuration.md, the page README links to):
/// (variables, flags) per row.
fn table_rows() -> Vec<(Vec<String>, Vec<String>)> {
    let page = std::fs::read_to_string(root().join("docs/configuration.md")).expect("docs/configuration.md");
    page.lines()
        .filter(|l| l.starts_with("| `GITSTATE_"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            let ticked = |cell: &str| cell.split('`').skip(1).step_by(2).map(String::from).collect::<Vec<_>>();
            (ticked(cells[0]), ticked(cells[1]).into_iter().filter(|f| f.starts_with("--")).collect())
        })
        .collect()
}

#[test]
fn configuration_table_lists_every_setting_with_its_flag_and_nothing_else() {
    let declared = declared();
    assert!(declared.len() > 25, "the declaration lost settings: {declared:?}");
    let rows = table_rows();
    assert!(!rows.is_empty(), "no `| `GITSTATE_` row found in docs/configuration.md");
    let mut in_table = BTreeSet::new();
    for (variables, flags) in &rows {
        assert_eq!(variables.len(), flags.len(), "one flag per variable in the row of {variables:?}");
        for (variable, flag) in variables.iter().zip(flags) {
            let (_, declared_flag) = declared
                .iter()
                .find(|(v, _)| v == variable)
                .unwrap_or_else(|| panic!("docs/configuration.md lists {variable}, which no setting declares"));
            assert_eq!(flag, declared_flag, "docs/configuration.md's flag of {variable}");
            in_table.insert(variable.clone());
        }
    }
    for (variable, _) in &declared {
        assert!(in_table.contains(variable), "{variable} is declared but missing from docs/configuration.md");
    }
}

#[test]
fn the_code_reads_no_variable_it_does_not_declare() {
    let declared: BTreeSet<String> = declared().into_iter().map(|(v, _)| v).collect();
    let mut files = vec![root().join("src")];
    let mut named = BTreeSet::new();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if path.extension().is_some_and(|e| e == "rs") {
            for name in names_in(&std::fs::read_to_string(&path).unwrap()) {
                named.insert((name, path.display().to_string()));
            }
        }
    }
    assert!(named.iter().any(|(n, _)| n == "GITSTATE_REPOSITORY"), "the scan found nothing");
    for (name, file) in named {
        assert!(declared.contains(&name), "{file} names {name}, which no setting declares");
    }
}

#[test]
fn template_sets_only_declared_variables() {
    let declared: BTreeSet<String> = declared().into_iter().map(|(v, _)| v).collect();
    let template = std::fs::read_to_string(root().join("template.yaml")).unwrap();
    let set: Vec<String> = template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("GITSTATE_").and_then(|rest| rest.split_once(':')))
        .filter(|(name, _)| name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .map(|(name, _)| format!("GITSTATE_{name}"))
        .collect();
    assert!(set.contains(&"GITSTATE_REPOSITORY".to_string()), "no variable found in template.yaml: {set:?}");
    for name in set.iter().chain(names_in(&template).iter()) {
        assert!(declared.contains(name), "template.yaml names {name}, which no setting declares");
    }
}

#[test]
fn a_flag_wins_over_its_variable_and_empty_counts_as_unset() {
    use gitstate::config::{Config, Entry, Settings};
    let env = |name: &str| match name {
        "GITSTATE_REF" => Some("from-env".to_string()),
        "GITSTATE_MAX_BLOCKING" => Some(String::new()),
        "GITSTATE_DATA_DIR" => Some("/data".to_string()),
        _ => None,
    };
    let settings = Settings::from_sources(&[("ref", "from-flag")], env).unwrap();
    let config = Config::from_settings(&settings, Entry::Local).unwrap();
    assert_eq!(config.branch, "from-flag");
    assert_eq!(config.max_blocking, Config::default().max_blocking);
    assert_eq!(config.cache_dir, Path::new("/data/cache"), "serve and run keep caches under the data directory");
    let lambda = Config::from_settings(&settings, Entry::Lambda).unwrap();
    assert_eq!(lambda.cache_dir, Config::default().cache_dir);
    // A bad value names its variable, never its value.
    let bad = Settings::from_sources(&[("max-blocking", "many"), ("username", "u"), ("password", "hunter2")], |_| None)
        .unwrap();
    let e = Config::from_settings(&bad, Entry::Local).map(|_| ()).expect_err("refused").to_string();
    assert!(e.contains("GITSTATE_MAX_BLOCKING") && !e.contains("hunter2"), "{e}");
}
