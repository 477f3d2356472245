//! What quantixctl does without an agent: help with its exit statuses, shell
//! completions, the man page.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn ctl(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quantixctl"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn help_lists_the_exit_statuses_and_the_output_formats() {
    let (ok, help) = ctl(&["--help"]);
    assert!(ok);
    assert!(help.contains("Exit status:"), "{help}");
    assert!(help.contains("10  permission denied"), "{help}");
    for format in ["table", "wide", "json", "yaml", "name"] {
        assert!(help.contains(format), "{format} missing: {help}");
    }
}

#[test]
fn completions_and_the_man_page_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let (ok, script) = ctl(&["completion", shell]);
        assert!(ok, "{shell}");
        assert!(
            script.contains("quantixctl") && script.contains("create"),
            "{shell}: {script}"
        );
    }
    let (ok, man) = ctl(&["man"]);
    assert!(ok);
    assert!(
        man.starts_with(".ie") || man.contains(".TH quantixctl"),
        "{man}"
    );
    assert!(
        man.contains("Exit status"),
        "the man page has the exit statuses"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_quantixctl"))
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}
