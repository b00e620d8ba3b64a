//! tmemctl: command-line client of tmemd (see the library docs).
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tmemctl::Cli::parse();
    match tmemctl::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tmemctl::print_error(&e);
            std::process::ExitCode::FAILURE
        }
    }
}
