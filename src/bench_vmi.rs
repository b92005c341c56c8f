//! `dvisor bench vmi`: a full process-list walk from outside, beside the
//! guest's own `ps` timed from the host, and page-table translations per
//! second with and without the translation cache.
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dvisor_monitor::paging::{self, PagingMode};
use dvisor_monitor::profile::KernelProfile;
use dvisor_monitor::vmi::{Vmi, MSR_LSTAR};
use dvisor_monitor::{paths, VmmClient};
use dvisor_vmm::api::protocol::{Request, Sregs};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct VmiBenchArgs {
    /// Walks (and guest ps runs) measured.
    #[arg(long, default_value_t = 20)]
    pub runs: u32,
    #[arg(long)]
    pub json: bool,
    #[arg(long, hide = true)]
    pub here: bool,
}

#[derive(Debug, Serialize)]
struct VmiBench {
    processes: usize,
    vmi_ps_median_ms: f64,
    guest_ps_median_ms: f64,
    translations: usize,
    uncached_per_s: f64,
    cached_per_s: f64,
}

pub fn vmi(args: VmiBenchArgs) -> anyhow::Result<i32> {
    let image = dvisor_images::current_guest_image()
        .or_else(|_| dvisor_images::build_guest_image(&Default::default()))
        .context("the benchmark boots the default guest image")?;
    if let Some(code) = crate::bench::in_carrier_if_needed(args.here, 1536)? {
        return Ok(code);
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let profile = KernelProfile::load_or_build(&image.vmlinux)?;
    let name = format!("benchvmi{}", std::process::id());
    let mut vm = crate::bench_vm::Vm::boot(&name)?;
    let r = measure(&args, &mut vm, &profile, &name);
    vm.stop();
    let r = r?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    println!("process list, {} processes, median of {} runs", r.processes, args.runs);
    println!("  dvisor (VMI walk from outside)  {:>9.2} ms", r.vmi_ps_median_ms);
    println!(
        "  baseline: guest's own ps        {:>9.2} ms   (typed at the console, timed from the host; VMI is {:.0}x faster)",
        r.guest_ps_median_ms,
        r.guest_ps_median_ms / r.vmi_ps_median_ms
    );
    println!("address translations ({} kernel and user addresses)", r.translations);
    println!("  page walk, uncached   {:>12.0} /s", r.uncached_per_s);
    println!("  with the cache        {:>12.0} /s   ({:.1}x)", r.cached_per_s, r.cached_per_s / r.uncached_per_s);
    Ok(0)
}

fn median_ms(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn measure(args: &VmiBenchArgs, vm: &mut crate::bench_vm::Vm, profile: &KernelProfile, name: &str) -> anyhow::Result<VmiBench> {
    let client = VmmClient::connect(&paths::api_socket(name), "dvisor-bench")?;
    let map = client.map_memory()?.context("the guest has no memory mapped yet")?;
    let sregs: Sregs = client.call(Request::GetSregs { vcpu: 0 })?;
    let lstar = client.read_msr(0, MSR_LSTAR)?;
    let vmi = Vmi::attach(&map, profile, sregs.cr3, sregs.cr4, lstar)?;

    let mut ours = Vec::new();
    let mut guest = Vec::new();
    let mut processes = 0;
    for i in 0..args.runs {
        let t = Instant::now();
        processes = vmi.processes()?.len();
        ours.push(t.elapsed());
        let marker = format!("PSDONE-{}", 1000 + i);
        // The shell computes the marker, so the echoed command never matches.
        guest.push(vm.time_command(&format!("ps >/dev/null; echo PSDONE-$((1000+{i}))"), &marker)?);
    }

    // Addresses to translate: every task_struct and kernel stack, and the
    // service's user pages.
    let procs = vmi.processes()?;
    let mode = PagingMode { la57: vmi.view.la57 };
    let mut vas: Vec<u64> = procs.iter().map(|p| p.task).collect();
    let svc = procs.iter().find(|p| p.comm == "demo-service").context("no demo-service in the guest")?;
    let pgd = vmi.mm_pgd(svc.mm)?;
    for v in vmi.vmas(svc.mm)? {
        vas.extend((v.start..v.end).step_by(4096).take(64));
    }
    vas.retain(|&va| paging::translate(&map, if va >> 63 == 1 { vmi.view.kernel_pgd } else { pgd }, mode, va).is_ok());
    let kernel: Vec<u64> = vas.iter().copied().filter(|va| va >> 63 == 1).collect();
    let user: Vec<u64> = vas.iter().copied().filter(|va| va >> 63 == 0).collect();
    let (ku, kc) = paging::bench_translations(&map, vmi.view.kernel_pgd, mode, &kernel);
    let (uu, uc) = paging::bench_translations(&map, pgd, mode, &user);
    let n = (kernel.len() + user.len()) as f64;
    let weighted = |k: f64, u: f64| (k * kernel.len() as f64 + u * user.len() as f64) / n;
    Ok(VmiBench {
        processes,
        vmi_ps_median_ms: median_ms(&mut ours),
        guest_ps_median_ms: median_ms(&mut guest),
        translations: vas.len(),
        uncached_per_s: weighted(ku, uu),
        cached_per_s: weighted(kc, uc),
    })
}
