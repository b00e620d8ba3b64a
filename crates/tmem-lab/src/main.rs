//! `tmem-lab`: reproduce "Self-ballooning + Tmem Performance Analysis" with real guests.
use clap::Parser;

fn main() -> std::process::ExitCode {
    tmem_lab::init_logging();
    let cli = tmem_lab::Cli::parse();
    match tmem_lab::main_with(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tmem-lab: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
