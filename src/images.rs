//! `dvisor image ...` and `dvisor carrier -- CMD...`.
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {}

#[derive(Debug, Args)]
pub struct CarrierArgs {}

pub fn run_image(cmd: ImageCmd) -> anyhow::Result<i32> {
    match cmd {}
}

pub fn run_carrier(_args: CarrierArgs) -> anyhow::Result<i32> {
    anyhow::bail!("carrier not built yet")
}
