//! The command line itself: shell completions and the man page.

use crate::support::{TestEnv, assert_ok, require_tool, stderr, stdout};

#[test]
fn completions_for_every_shell_name_the_subcommands() {
    let env = TestEnv::new();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = env.run(&["completions", shell]);
        assert_ok(&out);
        let script = stdout(&out);
        for sub in ["fetch", "extract", "pull", "verify", "runner-config"] {
            assert!(
                script.contains(sub),
                "{shell} completions lack {sub:?}:\n{script}"
            );
        }
        let option = if shell == "fish" {
            "-l replace"
        } else {
            "--replace"
        };
        assert!(
            script.contains(option),
            "{shell} completions lack fetch's options"
        );
    }
}

#[test]
fn bash_completions_are_valid_bash() {
    require_tool("bash", "bash");
    let env = TestEnv::new();
    let out = env.run(&["completions", "bash"]);
    assert_ok(&out);
    std::fs::write(env.join("hydrafy.bash"), &out.stdout).unwrap();
    let check = std::process::Command::new("bash")
        .arg("-n")
        .arg(env.join("hydrafy.bash"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn an_unknown_shell_is_a_usage_error_naming_the_choices() {
    let env = TestEnv::new();
    let out = env.run(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("tcsh") && err.contains("bash"), "{err}");
    assert_eq!(stdout(&out), "");
}

#[test]
fn man_prints_a_roff_page_that_covers_the_subcommands() {
    let env = TestEnv::new();
    let out = env.run(&["man"]);
    assert_ok(&out);
    let page = stdout(&out);
    assert!(page.starts_with(".ie") || page.starts_with(".TH"), "{page}");
    assert!(page.contains(".TH hydrafy 1"), "{page}");
    for sub in ["fetch", "extract", "pull", "runner\\-config", "completions"] {
        assert!(page.contains(sub), "the man page lacks {sub:?}:\n{page}");
    }
}

#[test]
fn the_man_page_renders_with_man() {
    require_tool("man", "man-db");
    let env = TestEnv::new();
    let out = env.run(&["man"]);
    assert_ok(&out);
    std::fs::write(env.join("hydrafy.1"), &out.stdout).unwrap();
    let shown = std::process::Command::new("man")
        .arg("-l")
        .arg(env.join("hydrafy.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "80")
        .output()
        .unwrap();
    assert!(
        shown.status.success(),
        "man -l: {}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("fetch"), "{text}");
}

#[test]
fn man_with_a_command_prints_that_commands_page() {
    let env = TestEnv::new();
    let out = env.run(&["man", "fetch"]);
    assert_ok(&out);
    let page = stdout(&out);
    assert!(page.contains(".TH hydrafy-fetch 1"), "{page}");
    assert!(page.contains("\\-\\-replace"), "{page}");
    let out = env.run(&["man", "nosuch"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("nosuch"), "{}", stderr(&out));
}
