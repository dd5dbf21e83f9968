//! Golden-file comparison for the rule generators' tests: `testdata/<name>` must match byte for
//! byte. Run the tests with `PILLION_UPDATE_GOLDEN=1` to rewrite the files after an intended
//! change, then review the diff.

use std::path::PathBuf;

pub fn assert_golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name);
    if std::env::var_os("PILLION_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with PILLION_UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the generated text:\n--- expected\n{expected}--- actual\n{actual}",
        path.display()
    );
}
