//! `dvisor bench api`: what the support API costs a monitor.
//! - pause→resume round trip over 1000 rounds (median, p99), beside a
//!   request that does not touch the vCPUs (`status`) as the socket floor;
//! - guest-memory read throughput through the shared memfd mapping, beside
//!   a copy through the socket (`read_memory`) and a plain memcpy of the
//!   same size (the physical limit).
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dvisor_monitor::{paths, VmmClient};
use dvisor_vmm::api::protocol::{Request, MAX_READ_BYTES};
use serde::{Deserialize, Serialize};

#[derive(Debug, Args)]
pub struct ApiBenchArgs {
    /// Pause/resume round trips (and status round trips).
    #[arg(long, default_value_t = 1000)]
    pub rounds: u32,
    /// MiB of guest memory read per throughput measurement.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub read_mib: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Run here even without hardware KVM (used inside the carrier).
    #[arg(long, hide = true)]
    pub here: bool,
}

#[derive(Debug, Serialize)]
struct Latency {
    median_us: f64,
    p99_us: f64,
}

#[derive(Debug, Serialize)]
struct ApiBench {
    rounds: u32,
    pause_resume: Latency,
    vcpu_stop: Latency,
    status_baseline: Latency,
    read_bytes: u64,
    mapped_first_touch_mib_s: f64,
    mapped_read_mib_s: f64,
    socket_read_mib_s: f64,
    memcpy_mib_s: f64,
}

pub fn api(args: ApiBenchArgs) -> anyhow::Result<i32> {
    dvisor_images::current_guest_image()
        .or_else(|_| dvisor_images::build_guest_image(&Default::default()))
        .context("the benchmark boots the default guest image")?;
    if let Some(code) = crate::bench::in_carrier_if_needed(args.here, 1536)? {
        return Ok(code);
    }
    if args.rounds == 0 || args.read_mib == 0 {
        bail!("--rounds and --read-mib must be at least 1");
    }
    let name = format!("bench{}", std::process::id());
    let mut vm = crate::bench_vm::Vm::boot(&name)?;
    let result = measure(&args, &paths::api_socket(&name));
    vm.stop();
    let r = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    println!("support API, {} rounds (times as the monitor sees them)", r.rounds);
    println!(
        "  pause+resume round trip  median {:>9.1} µs   p99 {:>9.1} µs",
        r.pause_resume.median_us, r.pause_resume.p99_us
    );
    println!(
        "    of which vCPUs stopping median {:>9.1} µs   p99 {:>9.1} µs",
        r.vcpu_stop.median_us, r.vcpu_stop.p99_us
    );
    println!(
        "  baseline: status request median {:>9.1} µs   p99 {:>9.1} µs   (ratio pause+resume/status {:.1}x)",
        r.status_baseline.median_us,
        r.status_baseline.p99_us,
        r.pause_resume.median_us / r.status_baseline.median_us
    );
    println!("guest memory read, {} MiB", r.read_bytes >> 20);
    println!("  shared mapping (memfd)   {:>10.0} MiB/s   (first touch of each page: {:.0} MiB/s)", r.mapped_read_mib_s, r.mapped_first_touch_mib_s);
    println!(
        "  baseline: via the socket {:>10.0} MiB/s   (mapping is {:.1}x faster)",
        r.socket_read_mib_s,
        r.mapped_read_mib_s / r.socket_read_mib_s
    );
    println!(
        "  limit: memcpy same size  {:>10.0} MiB/s   (mapping reaches {:.0}% of it)",
        r.memcpy_mib_s,
        100.0 * r.mapped_read_mib_s / r.memcpy_mib_s
    );
    Ok(0)
}

fn measure(args: &ApiBenchArgs, api: &std::path::Path) -> anyhow::Result<ApiBench> {
    let client = VmmClient::connect(api, "dvisor-bench")?;
    #[derive(Deserialize)]
    struct Paused {
        stop_ns: u64,
    }
    let mut round = Vec::new();
    let mut stop = Vec::new();
    let mut status = Vec::new();
    for _ in 0..args.rounds {
        let t = Instant::now();
        let p: Paused = client.call(Request::Pause)?;
        let _: serde_json::Value = client.call(Request::Resume)?;
        round.push(t.elapsed());
        stop.push(Duration::from_nanos(p.stop_ns));
        let t = Instant::now();
        let _: serde_json::Value = client.call(Request::Status)?;
        status.push(t.elapsed());
    }

    let map = client.map_memory()?.context("the guest has no memory mapped yet")?;
    // The largest region holds the bytes we read.
    let region = map.regions().iter().max_by_key(|r| r.size).context("no memory regions")?.clone();
    let total = (args.read_mib << 20).min(region.size & !0xfffff);
    let chunk = MAX_READ_BYTES as usize;
    let mut buf = vec![0u8; chunk];

    // First pass: every page faults into our mapping once; second pass:
    // what a monitor that keeps its mapping pays from then on.
    let mut passes = [Duration::ZERO; 2];
    for p in passes.iter_mut() {
        let t = Instant::now();
        let mut off = 0;
        while off < total {
            map.read(region.gpa + off, &mut buf)?;
            off += chunk as u64;
        }
        *p = t.elapsed();
    }
    let [first_touch, mapped] = passes;

    #[derive(Deserialize)]
    struct Bytes {
        hex: String,
    }
    let t = Instant::now();
    let mut off = 0;
    let mut check = 0usize;
    while off < total {
        let b: Bytes = client.call(Request::ReadMemory { gpa: region.gpa + off, len: chunk as u64 })?;
        check += b.hex.len();
        off += chunk as u64;
    }
    let socket = t.elapsed();
    if check as u64 != total * 2 {
        bail!("socket reads returned {check} hex digits for {total} bytes");
    }

    let src = vec![1u8; total as usize];
    let t = Instant::now();
    for c in src.chunks(chunk) {
        buf[..c.len()].copy_from_slice(c);
        std::hint::black_box(&buf);
    }
    let memcpy = t.elapsed();

    let mib_s = |d: Duration| (total as f64 / (1 << 20) as f64) / d.as_secs_f64();
    Ok(ApiBench {
        rounds: args.rounds,
        pause_resume: latency(&mut round),
        vcpu_stop: latency(&mut stop),
        status_baseline: latency(&mut status),
        read_bytes: total,
        mapped_first_touch_mib_s: mib_s(first_touch),
        mapped_read_mib_s: mib_s(mapped),
        socket_read_mib_s: mib_s(socket),
        memcpy_mib_s: mib_s(memcpy),
    })
}

fn latency(v: &mut [Duration]) -> Latency {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    Latency { median_us: at(0.5), p99_us: at(0.99) }
}
