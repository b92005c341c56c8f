//! `dvisor image ...` and `dvisor carrier -- CMD...`.
use clap::{Args, Subcommand};
use dvisor_images::carrier::{self, CarrierOptions};
use dvisor_images::{BuildOptions, ImageError};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Build the default guest image (and refresh the carrier image) from
    /// Debian packages into the cache; reused when already built.
    Build {
        /// Rebuild even if an image with the same content key exists.
        #[arg(long)]
        force: bool,
        /// Also build/refresh the carrier VM image (kernel with 9p + KVM).
        #[arg(long)]
        carrier: bool,
        /// No progress lines.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Print the directory of the last built guest image.
    Path {
        /// Print the manifest's file paths as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct CarrierArgs {
    /// Memory of the carrier VM in MiB.
    #[arg(long, default_value_t = CarrierOptions::default().mem_mib)]
    pub mem: u32,
    /// vCPUs of the carrier VM.
    #[arg(long, default_value_t = CarrierOptions::default().cpus)]
    pub cpus: u32,
    /// Extra environment for the command, NAME=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// The command to run inside the carrier (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}

pub fn run_image(cmd: ImageCmd) -> anyhow::Result<i32> {
    match cmd {
        ImageCmd::Build { force, carrier, quiet } => {
            let opts = BuildOptions { force, quiet };
            let img = dvisor_images::build_guest_image(&opts)?;
            if carrier {
                carrier::build_carrier_image(&opts)?;
            }
            println!("{}", img.dir.display());
            Ok(0)
        }
        ImageCmd::Path { json } => {
            let img = match dvisor_images::current_guest_image() {
                Ok(img) => img,
                Err(e @ ImageError::NoImage) => {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                let m = dvisor_images::read_manifest(&img.dir)?;
                let v = serde_json::json!({
                    "dir": img.dir,
                    "kernel": img.kernel,
                    "vmlinux": img.vmlinux,
                    "initrd": img.initrd,
                    "disk": img.disk,
                    "service_binary": img.service_binary,
                    "service_guest_path": m.service_guest_path,
                    "programs": img.programs,
                    "patches_dir": img.patches_dir,
                    "kernel_release": img.kernel_release,
                    "default_cmdline": m.default_cmdline,
                    "manifest": m,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", img.dir.display());
            }
            Ok(0)
        }
    }
}

pub fn run_carrier(args: CarrierArgs) -> anyhow::Result<i32> {
    let mut extra_env = Vec::new();
    for kv in &args.env {
        let (k, v) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("--env expects NAME=VALUE, got `{kv}`"))?;
        extra_env.push((k.to_string(), v.to_string()));
    }
    let opts = CarrierOptions { mem_mib: args.mem, cpus: args.cpus, extra_env };
    Ok(carrier::run(&args.cmd, &opts)?)
}
