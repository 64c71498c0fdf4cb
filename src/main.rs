//! The `hydrafy` binary: parse options, run one command, report, exit.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use hydrafy::cache;
use hydrafy::cancel::Cancel;
use hydrafy::cli::{CacheAction, Cli, Command};
use hydrafy::error::report;
use hydrafy::progress::{Progress, Reporter, Style};

fn main() -> ExitCode {
    let cli = Cli::parse();
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

async fn run(cli: Cli, cancel: Cancel) -> u8 {
    match cli.command {
        Command::Fetch(args) => {
            let progress = Arc::new(Progress::new(Style::detect(args.report.quiet)));
            let result = match args.options() {
                Ok(opts) => hydrafy::fetch::fetch(&opts, progress.clone(), &cancel).await,
                Err(e) => Err(e),
            };
            progress.finish();
            finish(result, args.report.json)
        }
        Command::Pull(args) => {
            let progress = Arc::new(Progress::new(Style::detect(args.report.quiet)));
            let result = match args.options() {
                Ok(opts) => hydrafy::pull::pull(&opts, progress.clone(), &cancel).await,
                Err(e) => Err(e),
            };
            progress.finish();
            finish(result, args.report.json)
        }
        Command::Extract(args) => {
            let progress = Arc::new(Progress::new(Style::detect(args.report.quiet)));
            let result = match args.options() {
                Ok(opts) => hydrafy::extract::extract(&opts, progress.clone(), &cancel).await,
                Err(e) => Err(e),
            };
            progress.finish();
            finish(result, args.report.json)
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
    }
}

/// Print the outcome: the JSON summary on stdout, or one error line on stderr.
fn finish<T: serde::Serialize>(result: hydrafy::Result<T>, json: bool) -> u8 {
    match result {
        Ok(summary) => {
            if json {
                let mut out = std::io::stdout().lock();
                let text = serde_json::to_string(&summary).expect("summary serialises");
                // A closed pipe (`hydrafy ... --json | head -c0`) is not an error.
                let _ = writeln!(out, "{text}");
            }
            0
        }
        Err(e) => {
            eprintln!("hydrafy: error: {}", report(&e));
            e.exit_code() as u8
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
    std::process::exit(130);
}
