//! `dvisor policy`: check and replay D-Script policies.
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {}

pub fn run(cmd: PolicyCmd) -> anyhow::Result<i32> {
    match cmd {}
}
