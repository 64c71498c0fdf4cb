//! Running one command: parse, dispatch, report, exit.
//!
//! Every command ends the same way: progress cleared, then one error line on
//! stderr with the exit status its kind calls for, or the summary (as JSON on
//! stdout with `--json`). The streaming commands (fetch, pull, extract) also
//! share how they start and their closing line, through [`streaming`].

use std::future::Future;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::cli::{CacheAction, Cli, Command, ReportArgs};
use crate::commands::cache;
use crate::commands::pull::PullSummary;
use crate::error::{Exit, Result, report, sanitize};
use crate::seed::publish::Summary;
use crate::ui::cancel::Cancel;
use crate::ui::progress::{Progress, Reporter};

/// The whole program: what `hydrafy` does with its command line.
pub fn main() -> ExitCode {
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
            let run = |opts, progress: Arc<Progress>| async move {
                crate::commands::fetch::fetch(&opts, progress, &cancel).await
            };
            streaming(&args.report, args.options(), run, Summary::line).await
        }
        Command::Pull(args) => {
            let run = |opts, progress: Arc<Progress>| async move {
                crate::commands::pull::pull(&opts, progress, &cancel).await
            };
            streaming(&args.report, args.options(), run, PullSummary::line).await
        }
        Command::Extract(args) if args.list => {
            let progress = Arc::new(args.report.progress());
            let result = match args.options() {
                Ok(opts) => crate::commands::extract::list(&opts, progress.clone(), &cancel).await,
                Err(e) => Err(e),
            };
            progress.finish();
            if let (Ok(listing), false) = (&result, args.report.json) {
                print_stdout(&listing.render());
            }
            finish(result, args.report.json)
        }
        Command::Extract(args) => {
            let run = |opts, progress: Arc<Progress>| async move {
                crate::commands::extract::extract(&opts, progress, &cancel).await
            };
            streaming(&args.report, args.options(), run, Summary::line).await
        }
        Command::Cache(args) => {
            let action = match args.action {
                CacheAction::Path => cache::Action::Path,
                CacheAction::Du { json } => cache::Action::Du { json },
                CacheAction::Clear => cache::Action::Clear,
            };
            let result = crate::cli::cache_dir()
                .and_then(|dir| cache::run(action, &dir, &mut std::io::stdout().lock()));
            finish(result, false)
        }
        Command::Verify(args) => {
            let progress = args.report.progress();
            let flag = cancel.flag();
            match crate::nix::verify::verify(&args.options(), &progress, &flag) {
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
                Err(e) => fail(e),
            }
        }
        Command::Gc(args) => {
            let progress = args.report.progress();
            let report = args
                .options()
                .and_then(|opts| crate::gc::gc(&opts, &progress, &cancel.flag()));
            match report {
                Ok(report) => {
                    if !args.report.json && (!args.report.quiet || report.dry_run) {
                        print_stdout(&report.lines().join("\n"));
                    }
                    conclude(&report, args.report.json, None)
                }
                Err(e) => fail(e),
            }
        }
        Command::Status(args) => {
            let progress = args.report.progress();
            match crate::commands::status::status(&args.options(), &progress, &cancel.flag()) {
                Ok(report) => {
                    if !args.report.json {
                        print_stdout(&report.render());
                    }
                    conclude(&report, args.report.json, None)
                }
                Err(e) => fail(e),
            }
        }
        Command::RunnerConfig(args) => {
            let progress = args.report.progress();
            match crate::commands::runner_config::runner_config(&args.options(), &progress) {
                Ok(report) => {
                    if !args.report.json {
                        print_stdout(report.diff.trim_end());
                    }
                    conclude(&report, args.report.json, None)
                }
                Err(e) => fail(e),
            }
        }
        Command::Completions(args) => {
            print_bytes(&crate::cli::completions(args.shell));
            Exit::Success
        }
        Command::Man(args) => match crate::cli::man_page(args.command.as_deref()) {
            Ok(page) => {
                print_bytes(&page);
                Exit::Success
            }
            Err(e) => fail(e),
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
fn conclude<T: serde::Serialize>(summary: &T, json: bool, failure: Option<crate::Error>) -> Exit {
    if json {
        let text = serde_json::to_string(summary).expect("summary serialises");
        print_stdout(&text);
    }
    failure.map_or(Exit::Success, fail)
}

/// One error line on stderr, and the exit status its kind calls for.
fn fail(e: crate::Error) -> Exit {
    eprintln!("hydrafy: error: {}", report(&e));
    e.exit()
}

/// Run a streaming command: progress on stderr in the style the options
/// and the terminal call for, the work (with the options, when they were
/// valid), then the progress display cleared and the outcome printed: on
/// success one last line on stderr saying what the run did (even with
/// `--json`, whose object goes to stdout; not with `--quiet`).
async fn streaming<O, T, F>(
    report: &ReportArgs,
    options: Result<O>,
    run: impl FnOnce(O, Arc<Progress>) -> F,
    line: fn(&T) -> String,
) -> Exit
where
    T: serde::Serialize,
    F: Future<Output = Result<T>>,
{
    let progress = Arc::new(report.progress());
    let result = match options {
        Ok(opts) => run(opts, Arc::clone(&progress)).await,
        Err(e) => Err(e),
    };
    match &result {
        Ok(summary) => progress.conclude(&line(summary)),
        Err(_) => progress.finish(),
    }
    finish(result, report.json)
}

/// Print the outcome: the JSON summary on stdout (when asked), or one
/// error line on stderr.
fn finish<T: serde::Serialize>(result: Result<T>, json: bool) -> Exit {
    match result {
        Ok(summary) => conclude(&summary, json, None),
        Err(e) => fail(e),
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
