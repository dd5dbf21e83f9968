//! The injector (`control/src/inject/`): a stream of Kubernetes YAML documents in, the same
//! stream with Pillion added to each workload out.
//!
//! Input: the YAML text. Checks: no panic (a bad document is an error naming it); what was
//! written injects again without error and unchanged, every workload reported as already
//! injected or skipped (injecting twice is a no-op, as the module promises).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pillion_control::inject::{InjectOptions, Outcome, inject};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let options = InjectOptions::default();
    let Ok(first) = inject(text, &options) else {
        return;
    };
    let second = match inject(&first.output, &options) {
        Ok(second) => second,
        Err(e) => panic!(
            "the injector's own output is refused: {e}\n--- output ---\n{}",
            first.output
        ),
    };
    assert_eq!(
        second.output, first.output,
        "injecting twice changed the output\n--- input ---\n{text}"
    );
    for report in &second.reports {
        assert!(
            !matches!(report.outcome, Outcome::Injected),
            "{report} on the second pass\n--- input ---\n{text}"
        );
    }
});
