//! Golden diagnostics: each `tests/golden/NAME.ds` is a wrong program and
//! `NAME.stderr` the exact text `dvisor policy check` prints for it (without colour).
//! Regenerate after reviewing a change with `UPDATE_GOLDEN=1 cargo test -p dscript --test golden`.

use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn render(name: &str, src: &str) -> (String, bool) {
    let out = dscript::check(src, &dscript::replay::default_host());
    let text = dscript::diag::render_all(&out.diagnostics, &format!("{name}.ds"), src, false);
    (text, out.compiled.is_some())
}

#[test]
fn golden_diagnostics() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ds"))
        .collect();
    entries.sort();
    assert!(entries.len() >= 25, "expected at least 25 golden programs, found {}", entries.len());
    let mut failures = Vec::new();
    for path in entries {
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let src = std::fs::read_to_string(&path).expect("read golden program");
        let (got, compiled) = render(&name, &src);
        // Every golden program is wrong, except `dropped_value`, which only warns.
        assert_eq!(compiled, name == "dropped_value", "{name}: unexpected check result:\n{got}");
        assert!(!got.is_empty(), "{name}: no diagnostics");
        let expected_path = path.with_extension("stderr");
        if update {
            std::fs::write(&expected_path, &got).expect("write golden output");
            continue;
        }
        let want = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if want != got {
            failures.push(format!("--- {name}: expected\n{want}\n--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{} golden mismatches (UPDATE_GOLDEN=1 to accept):\n{}", failures.len(), failures.join("\n"));
}
