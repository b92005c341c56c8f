//! `dvisor policy`: check, replay and benchmark D-Script policies (see docs/dscript.md).
use clap::{Subcommand, ValueEnum};
use dscript::cli::{self, ReplayArgs, Style};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Check a policy without running it: unknown names, arity and type errors, misused
    /// durations and sizes. Prints diagnostics to stderr; exits 0 when clean (warnings
    /// allowed), 1 on errors, 2 when the file cannot be read.
    Check {
        /// The policy, e.g. leak.ds.
        file: PathBuf,
        /// Print diagnostics as JSON lines on stdout as well.
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value_t = ColorWhen::Auto)]
        color: ColorWhen,
    },
    /// Feed recorded events (JSON lines) through a policy and print the actions it would take,
    /// one per line: `[12.5s] restore("last-good")`. Each line is one event:
    /// {"t": "12.5s", "event": "crash", "reason": "panic", "mem_used": "512MiB"};
    /// `t` is a duration string or seconds (or `t_ms`), fields named like queries set their
    /// answers. Exits 1 if the policy has errors (checked or at run time), 2 on bad input.
    Replay {
        /// The policy, e.g. leak.ds.
        file: PathBuf,
        /// The recorded events, one JSON object per line.
        #[arg(long)]
        events: PathBuf,
        /// Print actions as JSON lines.
        #[arg(long)]
        json: bool,
        /// What a run-time error in a rule does to that rule.
        #[arg(long, value_enum, default_value_t = OnError::Disable)]
        on_error: OnError,
        /// Keep the clock running to this time after the last event (e.g. `1h`).
        #[arg(long)]
        until: Option<String>,
        /// Step budget per rule firing.
        #[arg(long)]
        max_steps: Option<u64>,
        #[arg(long, value_enum, default_value_t = ColorWhen::Auto)]
        color: ColorWhen,
    },
    /// Measure events per second through a 20-rule policy with statistics in replay mode,
    /// next to the cost of just decoding the same events. Build with --release.
    Bench {
        /// Number of events to generate.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Number of rules in the generated policy.
        #[arg(long, default_value_t = 20)]
        rules: usize,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the built-in functions, the host functions and events a replay provides.
    Functions,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ColorWhen {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnError {
    /// Disable the failing rule; the others keep running.
    Disable,
    /// Keep the failing rule enabled.
    Continue,
    /// Stop the replay at the first run-time error.
    Stop,
}

fn color(c: ColorWhen) -> bool {
    match c {
        ColorWhen::Auto => std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        ColorWhen::Always => true,
        ColorWhen::Never => false,
    }
}

pub fn run(cmd: PolicyCmd) -> anyhow::Result<i32> {
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr());
    let code = match cmd {
        PolicyCmd::Check { file, json, color: c } => cli::check_file(&file, Style { color: color(c), json }, &mut out, &mut err),
        PolicyCmd::Replay { file, events, json, on_error, until, max_steps, color: c } => {
            let until = match until.as_deref().map(parse_duration).transpose() {
                Ok(u) => u,
                Err(e) => anyhow::bail!(e),
            };
            let on_error = match on_error {
                OnError::Disable => dscript::ErrorMode::DisableRule,
                OnError::Continue => dscript::ErrorMode::KeepRule,
                OnError::Stop => dscript::ErrorMode::Stop,
            };
            let args = ReplayArgs { on_error, until, max_steps };
            cli::replay_file(&file, &events, args, Style { color: color(c), json }, &mut out, &mut err)
        }
        PolicyCmd::Bench { events, rules, json } => {
            if cfg!(debug_assertions) {
                eprintln!("dvisor: note: this is a debug build; build with --release for meaningful numbers");
            }
            let report = dscript::bench::run(&dscript::bench::BenchConfig { events, rules }).map_err(anyhow::Error::msg)?;
            println!("{}", if json { report.json() } else { report.text() });
            0
        }
        PolicyCmd::Functions => {
            print!("{}", dscript::cli::reference_text());
            0
        }
    };
    use std::io::Write;
    out.flush()?;
    Ok(code)
}

fn parse_duration(s: &str) -> Result<i64, String> {
    match dscript::units::parse_quantity(s) {
        Some((dscript::units::UnitKind::Duration, ns)) if ns >= 0 => Ok(ns),
        _ => Err(format!("--until wants a duration such as `10m`, got `{s}`")),
    }
}
