//! tmemd: the tmem host daemon (see the library docs).
use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = tmemd::config::Args::parse();
    tmemd::init_logging();
    match tmemd::run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tmemd::print_error_chain(&e);
            std::process::ExitCode::FAILURE
        }
    }
}
