//! The documents tell the truth about the code: every command the README's
//! command table names exists (its `--help` answers), every command there
//! is appears in that table, the status table of docs/architecture.md names
//! only commands and test files that exist, and no document links outside
//! the repository or to a file that is not there. No guest needed.
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The rows of the markdown table whose header row starts with `header`.
fn table_rows(doc: &str, header: &str) -> Vec<Vec<String>> {
    let mut lines = doc.lines().skip_while(|l| !l.starts_with(header));
    assert!(lines.next().is_some(), "no table with header {header:?}");
    lines
        .skip(1) // the | --- | row
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let inner = l.trim().strip_prefix('|').unwrap_or(l);
            let inner = inner.strip_suffix('|').unwrap_or(inner);
            inner.split('|').map(|c| c.trim().to_string()).collect()
        })
        .collect()
}

/// The backticked snippets of a table cell.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// Commands of a README cell: "`dvisor snapshot create`, `verify`" is
/// `snapshot create` and `snapshot verify` (a bare word continues the
/// first command's parent).
fn commands_of_cell(cell: &str) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut parent: Vec<String> = Vec::new();
    for span in code_spans(cell) {
        let words: Vec<String> = span.split_whitespace().map(str::to_string).collect();
        if words.first().map(String::as_str) == Some("dvisor") {
            let cmd = words[1..].to_vec();
            parent = cmd[..cmd.len().saturating_sub(1)].to_vec();
            out.push(cmd);
        } else if words.len() == 1 || (words.len() == 2 && words[0] != "dvisor") {
            // `image path` beside `dvisor image build`: a full sub-path;
            // `verify` beside `dvisor snapshot create`: a sibling.
            let mut cmd = if words.len() == 2 { Vec::new() } else { parent.clone() };
            cmd.extend(words);
            out.push(cmd);
        }
    }
    out
}

fn help_succeeds(cmd: &[String]) -> bool {
    common::dvisor().args(cmd).arg("--help").output().is_ok_and(|o| o.status.success())
}

/// The subcommands `dvisor [path] --help` lists.
fn subcommands(path: &[&str]) -> Vec<String> {
    let out = common::dvisor().args(path).arg("--help").output().expect("run dvisor --help");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn readme_command_table_matches_the_cli() {
    let rows = table_rows(&read("README.md"), "| command | what it does |");
    let mut documented = BTreeSet::new();
    for row in &rows {
        for cmd in commands_of_cell(&row[0]) {
            assert!(help_succeeds(&cmd), "README names `dvisor {}`, which does not exist", cmd.join(" "));
            documented.insert(cmd.join(" "));
        }
    }
    for top in subcommands(&[]) {
        let subs = subcommands(&[&top]);
        if subs.is_empty() {
            assert!(documented.contains(&top), "`dvisor {top}` is missing from the README's command table");
        } else {
            for s in subs {
                let full = format!("{top} {s}");
                assert!(documented.contains(&full), "`dvisor {full}` is missing from the README's command table");
            }
        }
    }
}

#[test]
fn architecture_status_names_real_commands_and_tests() {
    let rows = table_rows(&read("docs/architecture.md"), "| part | state | try | tested in |");
    assert!(rows.len() >= 10, "status table has {} rows", rows.len());
    for row in &rows {
        assert_eq!(row.len(), 4, "status row {row:?}");
        let (state, tried, tests) = (&row[1], &row[2], &row[3]);
        assert!(state == "works" || state == "planned" || state.starts_with("partial"), "state {state:?} in {row:?}");
        for cmd in commands_of_cell(tried) {
            assert!(help_succeeds(&cmd), "docs/architecture.md names `dvisor {}`, which does not exist", cmd.join(" "));
        }
        for t in code_spans(tests) {
            assert!(repo().join(&t).is_file(), "docs/architecture.md names the test {t}, which does not exist");
        }
        if state == "works" {
            assert!(!code_spans(tests).is_empty(), "{row:?} works but names no test");
        }
    }
}

/// Relative links `](target)` of a markdown document, without anchors.
fn links(doc: &str) -> Vec<String> {
    doc.split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .map(|t| t.split('#').next().unwrap_or("").to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

#[test]
fn documents_link_only_inside_the_repository() {
    let mut docs: Vec<PathBuf> = vec![repo().join("README.md")];
    for e in std::fs::read_dir(repo().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            docs.push(p);
        }
    }
    assert!(links(&read("README.md")).len() > 5, "the link scan finds the README's links");
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        let name = doc.strip_prefix(repo()).unwrap().display().to_string();
        for bad in ["../shared", "/work/"] {
            assert!(!text.contains(bad), "{name} refers to {bad}, outside the repository");
        }
        for target in links(&text) {
            assert!(!target.contains("://"), "{name} links outside the repository: {target}");
            let resolved = doc.parent().unwrap_or(Path::new(".")).join(&target);
            assert!(resolved.exists(), "{name} links to {target}, which does not exist");
        }
    }
}
