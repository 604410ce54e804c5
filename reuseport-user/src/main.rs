//! `reuseport`: the command-line front of the library.
use std::process::ExitCode;

use clap::Parser;
use reuseport::{cli::Cli, Error};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    match reuseport::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // Stopped as asked, and cleaned up: not a failure.
        Err(e @ Error::Interrupted { .. }) => {
            log::info!("{e}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            if let Error::Verifier { log, .. } = &e {
                for line in log.lines() {
                    eprintln!("  {line}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s.replace('\n', " ")
}
