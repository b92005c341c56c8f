//! Boots a kernel on D-Visor with no CLI around it:
//! `boot KERNEL [INITRD] [VCPUS] [CMDLINE]`. Handy when bisecting a boot
//! problem without the image and carrier machinery.
use dvisor_vmm::{OnReboot, RunOutcome, VmConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(kernel) = args.get(1) else {
        eprintln!("usage: boot KERNEL [INITRD] [VCPUS] [CMDLINE]");
        std::process::exit(2);
    };
    let config = VmConfig {
        name: "example".into(),
        kernel: kernel.into(),
        initrd: args.get(2).map(Into::into),
        vcpus: args.get(3).and_then(|v| v.parse().ok()).unwrap_or(1),
        cmdline: args.get(4).cloned().unwrap_or_else(|| "console=ttyS0 quiet".into()),
        mem_mib: 256,
        on_reboot: OnReboot::Exit,
        disks: Vec::new(),
        nets: Vec::new(),
        api_socket: None,
    };
    match dvisor_vmm::run(&config, &|| Box::new(std::io::stdout()), None) {
        Ok(RunOutcome::PowerOff) => std::process::exit(0),
        Ok(other) => {
            eprintln!("{other:?}");
            std::process::exit(3)
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1)
        }
    }
}
