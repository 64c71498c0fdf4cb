//! The `hydrafy` binary: parse options, run one command, report, exit.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use hydrafy::cli::{CacheAction, Cli, Command};
use hydrafy::commands::cache;
use hydrafy::commands::pull::PullSummary;
use hydrafy::error::{Exit, report, sanitize};
use hydrafy::seed::publish::Summary;
use hydrafy::ui::cancel::Cancel;
use hydrafy::ui::progress::{Progress, Reporter, Style};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A value clap's parsers refused (a platform, a mirror) is one line,
        // as every other failure is; help, version and usage errors are clap's.
        Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or_default();
            eprintln!("hydrafy: {}", sanitize(line));
            return Exit::Usage.into();
        }
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hydrafy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cancel = Cancel::new();
    runtime.spawn(watch_signals(cancel.clone()));
    let code = runtime.block_on(run(cli, cancel));
    // Blocking threads have finished their work; do not wait for idle ones.
    runtime.shutdown_background();
    ExitCode::from(code)
}

async fn run(cli: Cli, cancel: Cancel) -> Exit {
    match cli.command {
        Command::Fetch(args) => {
            let progress = reporter(&args.report);
            let result = match args.options() {
                Ok(opts) => hydrafy::commands::fetch::fetch(&opts, progress.clone(), &cancel).await,
                Err(e) => Err(e),
            };
            finish_reported(result, &progress, args.report.json, Summary::line)
        }
        Command::Pull(args) => {
            let progress = reporter(&args.report);
            let result = match args.options() {
                Ok(opts) => hydrafy::commands::pull::pull(&opts, progress.clone(), &cancel).await,
                Err(e) => Err(e),
            };
            finish_reported(result, &progress, args.report.json, PullSummary::line)
        }
        Command::Extract(args) if args.list => {
            let progress = reporter(&args.report);
            let result = match args.options() {
                Ok(opts) => {
                    hydrafy::commands::extract::list(&opts, progress.clone(), &cancel).await
                }
                Err(e) => Err(e),
            };
            progress.finish();
            if let (Ok(listing), false) = (&result, args.report.json) {
                print_stdout(&listing.render());
            }
            finish(result, args.report.json)
        }
        Command::Extract(args) => {
            let progress = reporter(&args.report);
            let result = match args.options() {
                Ok(opts) => {
                    hydrafy::commands::extract::extract(&opts, progress.clone(), &cancel).await
                }
                Err(e) => Err(e),
            };
            finish_reported(result, &progress, args.report.json, Summary::line)
        }
        Command::Cache(args) => {
            let action = match args.action {
                CacheAction::Path => cache::Action::Path,
                CacheAction::Du { json } => cache::Action::Du { json },
                CacheAction::Clear => cache::Action::Clear,
            };
            let result = hydrafy::cli::cache_dir()
                .and_then(|dir| cache::run(action, &dir, &mut std::io::stdout().lock()));
            finish(result, false)
        }
        Command::Verify(args) => {
            let progress = Progress::new(Style::detect(args.report.quiet));
            let flag = cancel.flag();
            match hydrafy::nix::verify::verify(&args.options(), &progress, &flag) {
                Ok(report) => {
                    // The bad paths are the result: stdout, unless JSON holds them.
                    let lines: Vec<String> = report
                        .problems
                        .iter()
                        .map(|p| sanitize(&p.to_string()))
                        .collect();
                    if args.report.json {
                        lines.iter().for_each(|l| eprintln!("{l}"));
                    } else {
                        print_stdout(&lines.join("\n"));
                    }
                    conclude(&report, args.report.json, report.failure())
                }
                Err(e) => finish::<()>(Err(e), false),
            }
        }
        Command::Gc(args) => {
            let progress = Progress::new(Style::detect(args.report.quiet));
            let report = args
                .options()
                .and_then(|opts| hydrafy::gc::gc(&opts, &progress, &cancel.flag()));
            match report {
                Ok(report) => {
                    if !args.report.json && (!args.report.quiet || report.dry_run) {
                        print_stdout(&report.lines().join("\n"));
                    }
                    conclude(&report, args.report.json, None)
                }
                Err(e) => finish::<()>(Err(e), false),
            }
        }
        Command::Status(args) => {
            let progress = Progress::new(Style::detect(args.report.quiet));
            match hydrafy::commands::status::status(&args.options(), &progress, &cancel.flag()) {
                Ok(report) => {
                    if !args.report.json {
                        print_stdout(&report.render());
                    }
                    conclude(&report, args.report.json, None)
                }
                Err(e) => finish::<()>(Err(e), false),
            }
        }
        Command::RunnerConfig(args) => {
            let progress = Progress::new(Style::detect(args.report.quiet));
            match hydrafy::commands::runner_config::runner_config(&args.options(), &progress) {
                Ok(report) => {
                    if !args.report.json {
                        print_stdout(report.diff.trim_end());
                    }
                    conclude(&report, args.report.json, None)
                }
                Err(e) => finish::<()>(Err(e), false),
            }
        }
        Command::Completions(args) => {
            print_bytes(&hydrafy::cli::completions(args.shell));
            Exit::Success
        }
        Command::Man(args) => match hydrafy::cli::man_page(args.command.as_deref()) {
            Ok(page) => {
                print_bytes(&page);
                Exit::Success
            }
            Err(e) => finish::<()>(Err(e), false),
        },
    }
}

/// Write `bytes` to stdout as they are; a closed pipe is not an error.
fn print_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes).and_then(|()| out.flush());
}

/// Print `text` (and a newline) on stdout unless empty; a closed pipe is not an error.
fn print_stdout(text: &str) {
    if !text.is_empty() {
        let _ = writeln!(std::io::stdout().lock(), "{text}");
    }
}

/// Print the JSON summary when asked, then the failure (if any) on stderr.
fn conclude<T: serde::Serialize>(summary: &T, json: bool, failure: Option<hydrafy::Error>) -> Exit {
    if json {
        let text = serde_json::to_string(summary).expect("summary serialises");
        print_stdout(&text);
    }
    match failure {
        None => Exit::Success,
        Some(e) => {
            eprintln!("hydrafy: error: {}", report(&e));
            e.exit()
        }
    }
}

/// Progress on stderr in the style the options and the terminal call for.
fn reporter(report: &hydrafy::cli::ReportArgs) -> Arc<Progress> {
    Arc::new(Progress::new(Style::detect(report.quiet)))
}

/// Clear the progress display, then print the outcome: on success, one last
/// line on stderr saying what the run did (even with `--json`, whose object
/// goes to stdout; not with `--quiet`).
fn finish_reported<T: serde::Serialize>(
    result: hydrafy::Result<T>,
    progress: &Progress,
    json: bool,
    line: fn(&T) -> String,
) -> Exit {
    match &result {
        Ok(summary) => progress.conclude(&line(summary)),
        Err(_) => progress.finish(),
    }
    finish(result, json)
}

/// Print the outcome: the JSON summary on stdout, or one error line on stderr.
fn finish<T: serde::Serialize>(result: hydrafy::Result<T>, json: bool) -> Exit {
    match result {
        Ok(summary) => {
            if json {
                let mut out = std::io::stdout().lock();
                let text = serde_json::to_string(&summary).expect("summary serialises");
                // A closed pipe (`hydrafy ... --json | head -c0`) is not an error.
                let _ = writeln!(out, "{text}");
            }
            Exit::Success
        }
        Err(e) => {
            eprintln!("hydrafy: error: {}", report(&e));
            e.exit()
        }
    }
}

/// First Ctrl-C or SIGTERM: cancel and let the run clean up. Second: leave now.
async fn watch_signals(cancel: Cancel) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    eprintln!("hydrafy: interrupted; cleaning up (press Ctrl-C again to leave at once)");
    cancel.cancel();
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    std::process::exit(i32::from(Exit::Interrupted.code()));
}
