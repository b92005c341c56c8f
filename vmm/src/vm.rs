//! One boot of a VM: KVM objects, memory, devices and vCPU threads, and the
//! loop that boots again on reset.
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{OnReboot, VmConfig};
use crate::console::{self, InputTarget};
use crate::devices::acpi_pm::{AcpiPm, ACPI_PM_LEN, ACPI_PM_PORT};
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT, KEYBOARD_GSI};
use crate::devices::serial::{ConsoleOut, Serial, COM1_GSI, COM1_LEN, COM1_PORT};
use crate::acpi::VirtioSlot;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::EventFdIrq;
use crate::devices::{MmioBus, PioBus};
use crate::error::VmmError;
use crate::lifecycle::{self, EventReceiver, EventSender, VmEvent};
use crate::memory::GuestRam;
use crate::vcpu::VcpuRunner;
use crate::{acpi, boot, cpu, layout, signals};

/// How a run of the VMM ended (errors aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    PowerOff,
    /// The guest rebooted and the configuration said to exit.
    Reboot,
    /// A termination signal arrived (its number).
    Signal(i32),
}

/// Runs the VM until the guest powers off, reboots with
/// `OnReboot::Exit`, fails, or the process is told to stop. Console output
/// goes to `make_console()` (called once per boot), input from stdin.
pub fn run(
    config: &VmConfig,
    make_console: &dyn Fn() -> ConsoleOut,
) -> Result<RunOutcome, VmmError> {
    config.validate()?;
    let kvm = Kvm::new().map_err(VmmError::KvmOpen)?;
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Pit2, "in-kernel PIT"),
        (Cap::Irqfd, "irqfd"),
        (Cap::ImmediateExit, "immediate exit"),
        (Cap::SetTssAddr, "TSS address"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::KvmCapability(name));
        }
    }
    let (tx, rx) = lifecycle::channel();
    signals::install_handlers(tx.clone())?;
    let input = InputTarget::default();
    console::spawn_input_pump(input.clone(), std::io::stdin());

    loop {
        tracing::debug!(vcpus = config.vcpus, mem_mib = config.mem_mib, "booting");
        let boot = Boot::start(&kvm, config, tx.clone(), make_console(), &input)?;
        let event = next_event(&rx);
        tracing::debug!(?event, "lifecycle event; stopping vCPUs");
        boot.stop();
        tracing::debug!("vCPUs stopped");
        input.set(None);
        // Events the dead boot sent while it stopped are stale, except a
        // termination signal: Ctrl-C during a reboot still stops the VMM.
        let late_signal = rx
            .try_iter()
            .filter_map(|e| match e {
                VmEvent::Signal(s) => Some(s),
                _ => None,
            })
            .last();
        match event {
            VmEvent::PowerOff => return Ok(RunOutcome::PowerOff),
            VmEvent::Signal(s) => return Ok(RunOutcome::Signal(s)),
            VmEvent::Fatal { vcpu, reason, registers } => {
                return Err(VmmError::GuestFatal { vcpu, reason, registers })
            }
            VmEvent::Reset { source } => {
                tracing::info!("guest reset through {source}");
                if let Some(s) = late_signal {
                    return Ok(RunOutcome::Signal(s));
                }
                if config.on_reboot == OnReboot::Exit {
                    return Ok(RunOutcome::Reboot);
                }
            }
        }
    }
}

fn next_event(rx: &EventReceiver) -> VmEvent {
    // The sender side lives in this function's caller, so recv only fails
    // if every sender is gone, which cannot happen while we hold `tx`.
    rx.recv().unwrap_or(VmEvent::Signal(libc::SIGTERM))
}

/// Puts each disk behind its own virtio-mmio window and IOAPIC pin.
fn attach_disks(
    vm: &VmFd,
    ram: &GuestRam,
    config: &VmConfig,
) -> Result<(Arc<MmioBus>, Vec<VirtioSlot>), VmmError> {
    let mut bus = MmioBus::new();
    let mut slots = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let slot = VirtioSlot {
            base: layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE,
            gsi: layout::VIRTIO_GSI_BASE + i as u32,
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&irq, slot.gsi)
            .map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
        let block = Block::open(&disk.path, disk.read_only).map_err(|e| VmmError::Disk(e.to_string()))?;
        let transport = MmioTransport::new(block, ram.memory.clone(), Box::new(EventFdIrq(irq)))
            .map_err(|e| VmmError::Disk(e.to_string()))?;
        bus.insert(slot.base, layout::VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(transport)));
        slots.push(slot);
    }
    Ok((Arc::new(bus), slots))
}

/// A running boot: dropping it without `stop` would leak vCPU threads.
struct Boot {
    vm: VmFd,
    _ram: GuestRam,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Boot {
    fn start(
        kvm: &Kvm,
        config: &VmConfig,
        events: EventSender,
        console_out: ConsoleOut,
        input: &InputTarget,
    ) -> Result<Boot, VmmError> {
        let vm = kvm.create_vm().map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?;
        vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(|e| VmmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm.create_irq_chip().map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))?;

        let ram = GuestRam::new(config.mem_mib << 20)?;
        for (slot, region) in ram.memory.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which this
            // Boot keeps alive for as long as the VM exists.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|e| VmmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }

        let (mmio, virtio_slots) = attach_disks(&vm, &ram, config)?;
        let rsdp = acpi::write_tables(&ram.memory, config.vcpus, &virtio_slots)?;
        let entry = boot::load_linux(
            &ram.memory,
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
            rsdp,
        )?;

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_GSI)
            .map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, console_out)));
        let mut pio = PioBus::new();
        pio.insert(COM1_PORT.into(), COM1_LEN.into(), serial.clone());
        let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&kbd_irq, KEYBOARD_GSI)
            .map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
        let i8042 = Arc::new(Mutex::new(I8042::new(events.clone(), Box::new(EventFdIrq(kbd_irq)))));
        pio.insert(I8042_PORT.into(), I8042_LEN.into(), i8042.clone());
        pio.insert(ACPI_PM_PORT.into(), ACPI_PM_LEN.into(), Arc::new(Mutex::new(AcpiPm::new(events.clone()))));
        let pio = Arc::new(pio);
        input.set(Some(serial));

        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut boot = Boot { vm, _ram: ram, stop: stop.clone(), threads: Vec::new() };
        for id in 0..u32::from(config.vcpus) {
            let fd = boot
                .vm
                .create_vcpu(u64::from(id))
                .map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
            cpu::configure_common(&fd, &cpu::cpuid_for(&base_cpuid, id, u32::from(config.vcpus)))?;
            if id == 0 {
                cpu::configure_boot_cpu(&fd, entry)?;
            }
            let runner = VcpuRunner {
                id,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                stop: stop.clone(),
                events: events.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || runner.run())
                .map_err(VmmError::Thread)?;
            boot.threads.push(handle);
        }
        Ok(boot)
    }

    /// Stops every vCPU thread: raise the flag, then keep kicking until each
    /// has left KVM_RUN (a kick can land just before a thread re-enters it).
    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        while self.threads.iter().any(|t| !t.is_finished()) {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the thread is alive (not finished, not joined), so
                // its pthread_t is valid; the kick handler does nothing.
                unsafe { libc::pthread_kill(t.as_pthread_t(), signals::kick_signal()) };
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
