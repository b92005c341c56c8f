//! One boot of a VM: KVM objects, memory, devices and vCPU threads, and the
//! loop that boots again on reset.
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use crate::api::protocol::{DeviceInfo, Lifecycle, MemoryRegion};
use crate::api::{ApiServer, BootHandles, ConsoleTee, CurrentBoot, DeviceHandle, EventHub};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::{EventFdIrq, VirtioDevice};
use crate::devices::vmgenid::VmGenId;
use crate::devices::{MmioBus, PioBus};
use crate::error::VmmError;
use crate::lifecycle::{self, EventReceiver, EventSender, VmEvent};
use crate::memory::GuestRam;
use crate::vcpu::VcpuRunner;
use crate::vcpu_control::VcpuControl;
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
    // Taps are opened once: the host side (and its address) must survive
    // guest reboots.
    let taps = config
        .nets
        .iter()
        .map(|n| Tap::open(&n.tap).map_err(|e| VmmError::Net(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let (tx, rx) = lifecycle::channel();
    signals::install_handlers(tx.clone())?;
    let input = InputTarget::default();
    console::spawn_input_pump(input.clone(), std::io::stdin());
    let hub = EventHub::default();
    let current = CurrentBoot::default();
    let _api = match &config.api_socket {
        Some(path) => Some(
            ApiServer::start(path, current.clone(), hub.clone()).map_err(|e| VmmError::Api(path.clone(), e))?,
        ),
        None => None,
    };
    let boots = AtomicU64::new(0);

    loop {
        tracing::debug!(vcpus = config.vcpus, mem_mib = config.mem_mib, "booting");
        let ctx = BootContext {
            events: tx.clone(),
            hub: hub.clone(),
            number: boots.fetch_add(1, Ordering::Relaxed) + 1,
            taps: &taps,
        };
        let console_out: ConsoleOut = Box::new(ConsoleTee::new(make_console(), hub.clone()));
        let boot = Boot::start(&kvm, config, &ctx, console_out, &input)?;
        current.set(Some(boot.handles.clone()));
        hub.lifecycle(Lifecycle::Boot, format!("boot {}", ctx.number));
        let event = next_event(&rx);
        tracing::debug!(?event, "lifecycle event; stopping vCPUs");
        current.set(None);
        boot.stop();
        tracing::debug!("vCPUs stopped");
        input.set(None);
        match &event {
            VmEvent::PowerOff => hub.lifecycle(Lifecycle::Shutdown, "guest powered off"),
            VmEvent::Signal(s) => hub.lifecycle(Lifecycle::Shutdown, format!("VMM stopped by signal {s}")),
            VmEvent::Fatal { vcpu, reason, .. } => hub.lifecycle(Lifecycle::Crash, format!("vCPU {vcpu}: {reason}")),
            VmEvent::Reset { source } => hub.lifecycle(Lifecycle::Reboot, format!("reset through {source}")),
        }
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

/// What a boot gets from the VM loop.
struct BootContext<'a> {
    events: EventSender,
    hub: EventHub,
    number: u64,
    taps: &'a [Tap],
}

type NetDevice = Arc<Mutex<MmioTransport<Net<Tap>>>>;

/// The virtio devices of one boot.
struct VirtioDevices {
    bus: Arc<MmioBus>,
    slots: Vec<VirtioSlot>,
    handles: Vec<DeviceHandle>,
    /// Network devices with their tap fd, for the RX threads.
    nets: Vec<(NetDevice, i32)>,
}

/// Puts each disk, then each network interface, behind its own virtio-mmio
/// window and IOAPIC pin.
fn attach_virtio(vm: &VmFd, ram: &GuestRam, config: &VmConfig, taps: &[Tap]) -> Result<VirtioDevices, VmmError> {
    let mut devs = VirtioDevices { bus: Arc::new(MmioBus::new()), slots: Vec::new(), handles: Vec::new(), nets: Vec::new() };
    let mut bus = MmioBus::new();
    let mut next_slot = |vm: &VmFd| -> Result<(VirtioSlot, Box<EventFdIrq>), VmmError> {
        let i = devs.slots.len();
        let slot = VirtioSlot {
            base: layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE,
            gsi: layout::VIRTIO_GSI_BASE + i as u32,
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&irq, slot.gsi).map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
        devs.slots.push(slot);
        Ok((slot, Box::new(EventFdIrq(irq))))
    };
    for (i, disk) in config.disks.iter().enumerate() {
        let (slot, irq) = next_slot(vm)?;
        let block = Block::open(&disk.path, disk.read_only).map_err(|e| VmmError::Disk(e.to_string()))?;
        let stats = block.stats();
        let transport = transport(block, ram, irq)?;
        bus.insert(slot.base, layout::VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(transport)));
        let name = format!("vd{}", (b'a' + i as u8) as char);
        devs.handles.push(DeviceHandle { info: DeviceInfo { name, kind: "virtio-blk".into() }, stats });
    }
    for (i, (net, tap)) in config.nets.iter().zip(taps).enumerate() {
        let (slot, irq) = next_slot(vm)?;
        let tap = tap.try_clone().map_err(|e| VmmError::Net(format!("tap {}: {e}", net.tap)))?;
        let fd = tap.as_raw_fd();
        let dev = Net::new(tap, net.mac);
        let stats = dev.stats();
        let transport = Arc::new(Mutex::new(transport(dev, ram, irq)?));
        bus.insert(slot.base, layout::VIRTIO_MMIO_SIZE, transport.clone());
        devs.nets.push((transport, fd));
        devs.handles.push(DeviceHandle { info: DeviceInfo { name: format!("eth{i}"), kind: "virtio-net".into() }, stats });
    }
    devs.bus = Arc::new(bus);
    Ok(devs)
}

/// The VM generation ID, a new random one each boot, and the irqfd on the
/// GED's pin that announces a regenerated one.
fn attach_vmgenid(vm: &VmFd, ram: &GuestRam) -> Result<Arc<Mutex<VmGenId>>, VmmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&irq, layout::GED_GSI).map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
    let dev = VmGenId::new(&ram.memory, Box::new(EventFdIrq(irq)))
        .map_err(|e| VmmError::Boot(format!("VM generation ID: {e}")))?;
    tracing::debug!(id = %dev.hex_id(), "VM generation ID");
    Ok(Arc::new(Mutex::new(dev)))
}

fn transport<D: VirtioDevice>(dev: D, ram: &GuestRam, irq: Box<EventFdIrq>) -> Result<MmioTransport<D>, VmmError> {
    MmioTransport::new(dev, ram.memory.clone(), irq).map_err(|e| VmmError::Disk(e.to_string()))
}

/// Moves frames from the tap to the guest. Polls with a timeout so that
/// it notices the boot ending.
fn spawn_net_rx(
    dev: NetDevice,
    fd: i32,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, VmmError> {
    std::thread::Builder::new()
        .name("net-rx".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let blocked = dev.lock().map(|d| d.device().rx_blocked()).unwrap_or(true);
                if blocked {
                    // The guest has no RX buffer; its next QueueNotify
                    // delivers the held frame.
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd; the tap fd lives as long as `dev`.
                let n = unsafe { libc::poll(&mut pfd, 1, 100) };
                if n > 0 {
                    if let Ok(mut d) = dev.lock() {
                        d.process_rx();
                    }
                }
            }
        })
        .map_err(VmmError::Thread)
}

/// A running boot: dropping it without `stop` would leak vCPU threads.
struct Boot {
    handles: Arc<BootHandles>,
    _ram: GuestRam,
    control: Arc<VcpuControl>,
    /// Stops the device threads (net RX).
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    device_threads: Vec<JoinHandle<()>>,
}

impl Boot {
    fn start(
        kvm: &Kvm,
        config: &VmConfig,
        ctx: &BootContext<'_>,
        console_out: ConsoleOut,
        input: &InputTarget,
    ) -> Result<Boot, VmmError> {
        let events = ctx.events.clone();
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

        let virtio = attach_virtio(&vm, &ram, config, ctx.taps)?;
        let mmio = virtio.bus.clone();
        let rsdp = acpi::write_tables(&ram.memory, config.vcpus, &virtio.slots)?;
        let vmgenid = attach_vmgenid(&vm, &ram)?;
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
        let control = Arc::new(VcpuControl::new(usize::from(config.vcpus)));
        let vm = Arc::new(vm);
        let mut device_threads = Vec::new();
        for (dev, fd) in &virtio.nets {
            device_threads.push(spawn_net_rx(dev.clone(), *fd, stop.clone())?);
        }
        let handles = Arc::new(BootHandles {
            boot: ctx.number,
            vm: vm.clone(),
            control: control.clone(),
            memfd: ram.memfd.try_clone().map_err(VmmError::GuestMemory)?,
            memory: ram.memory.clone(),
            regions: memory_regions(&ram),
            mem_bytes: ram.size,
            keyboard: i8042,
            devices: virtio.handles,
            vmgenid,
            kernel: std::path::absolute(&config.kernel).unwrap_or_else(|_| config.kernel.clone()),
        });
        let mut boot = Boot {
            handles,
            _ram: ram,
            control: control.clone(),
            stop: stop.clone(),
            threads: Vec::new(),
            device_threads,
        };
        for id in 0..u32::from(config.vcpus) {
            let fd = vm
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
                control: control.clone(),
                events: events.clone(),
                hub: ctx.hub.clone(),
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
        self.control.stop();
        while self.threads.iter().any(|t| !t.is_finished()) {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the thread is alive (not finished, not joined), so
                // its pthread_t is valid; the kick handler does nothing.
                unsafe { libc::pthread_kill(t.as_pthread_t(), signals::kick_signal()) };
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in self.threads.drain(..).chain(self.device_threads.drain(..)) {
            let _ = t.join();
        }
    }
}

/// Where each RAM range sits in the memfd, in the order GuestRam laid
/// them out.
fn memory_regions(ram: &GuestRam) -> Vec<MemoryRegion> {
    let mut offset = 0;
    ram.memory
        .iter()
        .map(|r| {
            let region = MemoryRegion { gpa: r.start_addr().0, size: r.len(), offset };
            offset += r.len();
            region
        })
        .collect()
}
