//! A stand-in for `dvisor policy` that needs only this crate:
//! `cargo run -p dscript --example policy -- check FILE.ds`
//! `cargo run -p dscript --example policy -- replay FILE.ds EVENTS.jsonl [--json]`
//! `cargo run --release -p dscript --example policy -- bench [EVENTS]`
use dscript::cli::{self, ReplayArgs, Style};
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let style = Style { color: false, json };
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let code = match args.first().map(String::as_str) {
        Some("check") if args.len() >= 2 => cli::check_file(Path::new(&args[1]), style, &mut out, &mut err),
        Some("replay") if args.len() >= 3 => {
            cli::replay_file(Path::new(&args[1]), Path::new(&args[2]), ReplayArgs::default(), style, &mut out, &mut err)
        }
        Some("bench") => {
            let events = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1_000_000);
            let rules = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(20);
            let report = dscript::bench::run(&dscript::bench::BenchConfig { events, rules });
            match report {
                Ok(r) => {
                    println!("{}", r.text());
                    0
                }
                Err(e) => {
                    eprintln!("{e}");
                    1
                }
            }
        }
        _ => {
            eprintln!("usage: policy check FILE | replay FILE EVENTS [--json] | bench [EVENTS]");
            2
        }
    };
    std::process::exit(code);
}
