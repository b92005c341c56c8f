//! The `dvisor` command line: parses arguments and calls the crates.
mod bench;
mod images;
mod policy;
mod run;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "dvisor", version, about = "Keep services alive while their OS and programs are patched, updated and watched from outside the VM")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot a guest on D-Visor and attach its console (the default image
    /// unless --kernel is given).
    Run(run::RunArgs),
    /// Build or locate the default guest image.
    #[command(subcommand)]
    Image(images::ImageCmd),
    /// Run a command inside the QEMU-TCG carrier VM, which has a real /dev/kvm.
    Carrier(images::CarrierArgs),
    /// Check, replay and benchmark D-Script policies.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Benchmarks that print a ratio against a baseline measured side by side.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("DVISOR_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Image(c) => images::run_image(c),
        Cmd::Carrier(a) => images::run_carrier(a),
        Cmd::Policy(c) => policy::run(c),
        Cmd::Bench(c) => bench::run(c),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("dvisor: error: {e:#}");
            std::process::exit(2);
        }
    }
}
