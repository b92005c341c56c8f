//! One boot of a VM: KVM objects, memory, devices and vCPU threads, and the
//! loop that boots again on reset.
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::path::PathBuf;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::config::{OnReboot, VmConfig};
use crate::console::{self, InputTarget};
use crate::devices::acpi_pm::{AcpiPm, ACPI_PM_LEN, ACPI_PM_PORT};
use crate::devices::pci_host::{PciHost, PCI_CONFIG_LEN, PCI_CONFIG_PORT};
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT, KEYBOARD_GSI};
use crate::devices::serial::{ConsoleOut, Serial, COM1_GSI, COM1_LEN, COM1_PORT};
use crate::acpi::VirtioSlot;
use crate::api::protocol::{DeviceInfo, Lifecycle, MemoryRegion};
use crate::api::{ApiServer, BootHandles, ConsoleTee, CurrentBoot, DeviceHandle, EventHub};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::{EventFdIrq, VirtioDevice, VirtioError};
use crate::devices::{MmioBus, PioBus};
use crate::error::VmmError;
use crate::lifecycle::{self, EventReceiver, EventSender, VmEvent};
use crate::memory::GuestRam;
use crate::devices::set::{lock, BlockDevice, DeviceSet, NetDevice};
use crate::devices::vmgenid::VmGenId;
use crate::snapshot::{self, format, DevicesState, SnapshotError};
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
    restore: Option<RestoreFrom>,
) -> Result<RunOutcome, VmmError> {
    if restore.is_none() {
        config.validate()?;
    }
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
        .map(|n| if n.tap.is_empty() { Tap::detached() } else { Tap::open(&n.tap) }.map_err(|e| VmmError::Net(e.to_string())))
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
    let disks = Arc::new(Mutex::new(config.disks.clone()));
    let msr_indices = Arc::new(snapshot::vcpu::msr_index_list(&kvm)?);
    let restore_slot = RestoreSlot::default();
    // What the next boot starts: an adopted snapshot (ShadowReboot's
    // switch) changes the kernel, initrd and command line from then on.
    let mut config = config.clone();
    // A snapshot to start from: checked (CLI) and loaded before any VM.
    let mut pending: Option<(Vec<format::Loaded>, RestoreFrom)> = match restore {
        Some(r) => Some((snapshot::restore::prepare(&kvm, &r.dir, &config, false)?, r)),
        None => None,
    };

    loop {
        tracing::debug!(vcpus = config.vcpus, mem_mib = config.mem_mib, "booting");
        let ctx = BootContext {
            events: tx.clone(),
            hub: hub.clone(),
            number: boots.fetch_add(1, Ordering::Relaxed) + 1,
            taps: &taps,
            disks: disks.clone(),
        };
        let console_out: ConsoleOut = Box::new(ConsoleTee::new(make_console(), hub.clone()));
        let mut boot = match pending.take() {
            Some((chain, from)) => {
                let b = Boot::restore(&kvm, &config, &ctx, console_out, &input, &chain, &from, &msr_indices, &restore_slot)?;
                // Announced as a boot: the monitor maps the new memory and
                // looks for the kernel again, as after a reboot.
                hub.lifecycle(Lifecycle::Boot, format!("boot {} (restored from {})", ctx.number, from.dir.display()));
                b
            }
            None => {
                let b = Boot::start(&kvm, &config, &ctx, console_out, &input, &msr_indices, &restore_slot)?;
                hub.lifecycle(Lifecycle::Boot, format!("boot {}", ctx.number));
                b
            }
        };
        current.set(Some(boot.handles.clone()));
        let event = loop {
            let event = next_event(&rx);
            if event != VmEvent::Restore {
                break event;
            }
            let Some(req) = restore_slot.take() else { continue };
            let ctx = BootContext {
                events: tx.clone(),
                hub: hub.clone(),
                number: boots.load(Ordering::Relaxed) + 1,
                taps: &taps,
                disks: disks.clone(),
            };
            let switch = Switch { kvm: &kvm, config: &config, ctx: &ctx, input: &input, msr_indices: &msr_indices, restore_slot: &restore_slot };
            match switch.run(&boot, &req.from, make_console) {
                Ok((new_boot, new_config, switch_ns)) => {
                    boots.fetch_add(1, Ordering::Relaxed);
                    let old = std::mem::replace(&mut boot, new_boot);
                    current.set(Some(boot.handles.clone()));
                    old.stop();
                    config = new_config;
                    hub.lifecycle(Lifecycle::Boot, format!("boot {} (restored from {})", ctx.number, req.from.dir.display()));
                    let _ = req.reply.send(Ok(Restored { boot: boot.handles.boot, switch_ns }));
                }
                Err(e) => {
                    let _ = req.reply.send(Err(e));
                }
            }
        };
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
            VmEvent::Restore => {}
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
            VmEvent::Restore => {}
        }
    }
}

/// An in-place restore: the running boot is paused (not stopped) while the
/// restored one is built, so that a restore that fails half way leaves the
/// guest as it was and resumes it; only once the new boot runs is the old
/// one stopped. The pause is the guest's downtime.
struct Switch<'a> {
    kvm: &'a Kvm,
    config: &'a VmConfig,
    ctx: &'a BootContext<'a>,
    input: &'a InputTarget,
    msr_indices: &'a Arc<Vec<u32>>,
    restore_slot: &'a RestoreSlot,
}

impl Switch<'_> {
    fn run(&self, old: &Boot, from: &RestoreFrom, make_console: &dyn Fn() -> ConsoleOut) -> Result<(Boot, VmConfig, u64), String> {
        // Everything that can refuse the snapshot runs while the guest runs.
        let chain = snapshot::restore::prepare(self.kvm, &from.dir, self.config, from.adopt).map_err(|e| e.to_string())?;
        let mut config = self.config.clone();
        if from.adopt {
            // A shadow VM's state: its kernel is this VM's from now on.
            if let Some(last) = chain.last() {
                let saved = &last.state.config;
                config.kernel = saved.kernel.clone();
                config.initrd = saved.initrd.clone();
                config.cmdline = saved.cmdline.clone();
            }
        }
        let t = std::time::Instant::now();
        // Frames that arrive from now on wait in the taps for the new guest
        // instead of going into the old one's memory, which is about to be
        // dropped (a client's SYN lost there costs it a 1 s retransmit).
        // Taking each device's lock once waits out a delivery in progress;
        // it is not held (a vCPU's queue notify takes it too, and must
        // reach the pause).
        old.rx_hold.store(true, Ordering::Release);
        for n in &old.handles.device_set.nets {
            drop(lock(n));
        }
        let (already, _) = old.control.pause();
        let old_serial = old.handles.device_set.serial.clone();
        // Completed writes reach the files (an overlay's index too) before
        // the new boot's devices open them.
        for b in &old.handles.device_set.blocks {
            if let Err(e) = lock(b).device_mut().sync() {
                tracing::warn!("syncing a disk before the switch: {e}");
            }
        }
        let console_out: ConsoleOut = Box::new(ConsoleTee::new(make_console(), self.ctx.hub.clone()));
        match Boot::restore(self.kvm, &config, self.ctx, console_out, self.input, &chain, from, self.msr_indices, self.restore_slot) {
            Ok(b) => Ok((b, config, t.elapsed().as_nanos() as u64)),
            Err(e) => {
                old.rx_hold.store(false, Ordering::Release);
                // The old boot never stopped: it goes on where it was.
                self.input.set(Some(old_serial));
                if !already {
                    old.control.resume();
                }
                tracing::warn!("in-place restore failed; the running guest continues: {e}");
                Err(format!("{e} (the running guest was resumed as it was)"))
            }
        }
    }
}

fn next_event(rx: &EventReceiver) -> VmEvent {
    // The sender side lives in this function's caller, so recv only fails
    // if every sender is gone, which cannot happen while we hold `tx`.
    rx.recv().unwrap_or(VmEvent::Signal(libc::SIGTERM))
}


/// Where to start from instead of booting (`dvisor run --restore`, or an
/// in-place restore through the support API).
#[derive(Clone, Debug)]
pub struct RestoreFrom {
    pub dir: PathBuf,
    /// Keep the vCPUs parked after the restore.
    pub paused: bool,
    /// Give the guest a new VM generation ID (always, except when the
    /// caller restores the very same VM, e.g. a test of determinism).
    pub new_generation: bool,
    /// The snapshot is another VM's of this shape (ShadowReboot's shadow):
    /// this VM keeps its disk files and taps, whose identity is not
    /// compared, and takes the snapshot's kernel, initrd and command line.
    pub adopt: bool,
}

/// A finished in-place restore.
#[derive(Clone, Copy, Debug)]
pub struct Restored {
    pub boot: u64,
    /// From the old guest's pause to the restored guest's start.
    pub switch_ns: u64,
}

/// An in-place restore asked for through the support API.
pub struct RestoreRequest {
    pub from: RestoreFrom,
    /// Gets the new boot, or why the restore failed.
    pub reply: std::sync::mpsc::SyncSender<Result<Restored, String>>,
}

/// Hands an in-place restore request from an API thread to the VM loop.
#[derive(Clone, Default)]
pub struct RestoreSlot(Arc<Mutex<Option<RestoreRequest>>>);

impl RestoreSlot {
    /// Refuses a second request while one waits.
    pub fn put(&self, r: RestoreRequest) -> Result<(), RestoreRequest> {
        let mut g = lock(&self.0);
        if g.is_some() {
            return Err(r);
        }
        *g = Some(r);
        Ok(())
    }

    pub fn take(&self) -> Option<RestoreRequest> {
        lock(&self.0).take()
    }
}

/// What a boot gets from the VM loop.
struct BootContext<'a> {
    events: EventSender,
    hub: EventHub,
    number: u64,
    taps: &'a [Tap],
    /// The disk files to open (shared with the API: a clone point moves
    /// the VM onto overlays).
    disks: Arc<Mutex<Vec<crate::config::DiskConfig>>>,
}

/// The virtio devices of one boot.
struct VirtioDevices {
    bus: Arc<MmioBus>,
    slots: Vec<VirtioSlot>,
    handles: Vec<DeviceHandle>,
    blocks: Vec<BlockDevice>,
    /// Network devices with their tap fd, for the RX threads.
    nets: Vec<(NetDevice, i32)>,
}

/// Puts each disk, then each network interface, behind its own virtio-mmio
/// window and IOAPIC pin. With `saved`, each device continues from its
/// snapshot state instead of starting reset.
fn attach_virtio(
    vm: &VmFd,
    ram: &GuestRam,
    disks: &[crate::config::DiskConfig],
    nets: &[crate::config::NetConfig],
    taps: &[Tap],
    saved: Option<&DevicesState>,
) -> Result<VirtioDevices, VmmError> {
    let mut devs = VirtioDevices {
        bus: Arc::new(MmioBus::new()),
        slots: Vec::new(),
        handles: Vec::new(),
        blocks: Vec::new(),
        nets: Vec::new(),
    };
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
    let restore_err = |device: String, reason: String| VmmError::Snapshot(SnapshotError::DeviceRestore { device, reason });
    for (i, disk) in disks.iter().enumerate() {
        let (slot, irq) = next_slot(vm)?;
        let block = match saved.and_then(|s| s.blocks.get(i)) {
            // The guest keeps the disk serial it saw.
            Some((_, bs)) => crate::devices::virtio::disk::open_image(&disk.path, disk.read_only)
                .map_err(VirtioError::from)
                .and_then(|img| Block::from_state(bs, img)),
            None => Block::open(&disk.path, disk.read_only),
        }
        .map_err(|e| VmmError::Disk(e.to_string()))?;
        let stats = block.stats();
        let name = format!("vd{}", (b'a' + i as u8) as char);
        let transport = match saved.and_then(|s| s.blocks.get(i)) {
            Some((t, _)) => MmioTransport::from_state(block, ram.memory.clone(), irq, t)
                .map_err(|e| restore_err(name.clone(), e.to_string()))?,
            None => transport(block, ram, irq)?,
        };
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(slot.base, layout::VIRTIO_MMIO_SIZE, transport.clone());
        devs.blocks.push(transport);
        devs.handles.push(DeviceHandle { info: DeviceInfo { name, kind: "virtio-blk".into() }, stats });
    }
    for (i, (net, tap)) in nets.iter().zip(taps).enumerate() {
        let (slot, irq) = next_slot(vm)?;
        let tap = tap.try_clone().map_err(|e| VmmError::Net(format!("tap {}: {e}", net.tap)))?;
        let fd = tap.as_raw_fd();
        let name = format!("eth{i}");
        let (stats, transport) = match saved.and_then(|s| s.nets.get(i)) {
            Some((t, n)) => {
                let dev = Net::from_state(tap, n).map_err(|e| restore_err(name.clone(), e.to_string()))?;
                let stats = dev.stats();
                let tr = MmioTransport::from_state(dev, ram.memory.clone(), irq, t)
                    .map_err(|e| restore_err(name.clone(), e.to_string()))?;
                (stats, tr)
            }
            None => {
                let dev = Net::new(tap, net.mac);
                (dev.stats(), transport(dev, ram, irq)?)
            }
        };
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(slot.base, layout::VIRTIO_MMIO_SIZE, transport.clone());
        devs.nets.push((transport, fd));
        devs.handles.push(DeviceHandle { info: DeviceInfo { name, kind: "virtio-net".into() }, stats });
    }
    devs.bus = Arc::new(bus);
    Ok(devs)
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
    hold: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, VmmError> {
    std::thread::Builder::new()
        .name("net-rx".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let blocked = dev.lock().map(|d| d.device().rx_blocked()).unwrap_or(true);
                if blocked || hold.load(Ordering::Acquire) {
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
                        // During a switch (in-place restore) frames stay in
                        // the tap for the new guest.
                        if !stop.load(Ordering::Acquire) && !hold.load(Ordering::Acquire) {
                            d.process_rx();
                        }
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
    /// Makes the net RX threads leave frames in the taps (a switch).
    rx_hold: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    device_threads: Vec<JoinHandle<()>>,
}

/// A VM with its interrupt controllers, PIT and RAM slots, no vCPU yet.
fn new_vm(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(|e| VmmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.create_irq_chip().map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))?;
    for (slot, region) in ram.memory.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `ram`, which the
        // Boot keeps alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(r) }.map_err(|e| VmmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(vm)
}

/// The devices of a boot, built fresh or from their snapshot state.
struct Devices {
    set: Arc<DeviceSet>,
    pio: Arc<PioBus>,
    virtio: VirtioDevices,
}

fn build_devices(
    vm: &VmFd,
    ram: &GuestRam,
    config: &VmConfig,
    ctx: &BootContext<'_>,
    console_out: ConsoleOut,
    saved: Option<&DevicesState>,
) -> Result<Devices, VmmError> {
    let events = ctx.events.clone();
    let restore_err = |device: &str, reason: String| {
        VmmError::Snapshot(SnapshotError::DeviceRestore { device: device.into(), reason })
    };
    let disks = lock(&ctx.disks).clone();
    let virtio = attach_virtio(vm, ram, &disks, &config.nets, ctx.taps, saved)?;
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&serial_irq, COM1_GSI).map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
    let serial = match saved {
        Some(s) => Serial::from_state(serial_irq, console_out, &s.serial).map_err(|e| restore_err("serial", e.to_string()))?,
        None => Serial::new(serial_irq, console_out),
    };
    let serial = Arc::new(Mutex::new(serial));
    let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&kbd_irq, KEYBOARD_GSI).map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
    let kbd_irq = Box::new(EventFdIrq(kbd_irq));
    let i8042 = match saved {
        Some(s) => I8042::from_state(events.clone(), kbd_irq, &s.i8042).map_err(|e| restore_err("i8042", e.to_string()))?,
        None => I8042::new(events.clone(), kbd_irq),
    };
    let i8042 = Arc::new(Mutex::new(i8042));
    let acpi_pm = match saved {
        Some(s) => AcpiPm::from_state(events.clone(), &s.acpi_pm).map_err(|e| restore_err("acpi-pm", e.to_string()))?,
        None => AcpiPm::new(events.clone()),
    };
    let acpi_pm = Arc::new(Mutex::new(acpi_pm));
    let pci_host = Arc::new(Mutex::new(match saved {
        Some(s) => PciHost::from_state(&s.pci_host),
        None => PciHost::new(),
    }));
    let genid_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&genid_irq, layout::GED_GSI).map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
    let genid_irq = Box::new(EventFdIrq(genid_irq));
    let vmgenid = match saved {
        Some(s) => VmGenId::restore(&ram.memory, genid_irq, &s.vmgenid).map_err(|e| restore_err("vmgenid", e.to_string()))?,
        None => VmGenId::new(&ram.memory, genid_irq).map_err(|e| VmmError::Boot(format!("VM generation ID: {e}")))?,
    };
    let mut pio = PioBus::new();
    pio.insert(COM1_PORT.into(), COM1_LEN.into(), serial.clone());
    pio.insert(I8042_PORT.into(), I8042_LEN.into(), i8042.clone());
    pio.insert(ACPI_PM_PORT.into(), ACPI_PM_LEN.into(), acpi_pm.clone());
    pio.insert(PCI_CONFIG_PORT.into(), PCI_CONFIG_LEN.into(), pci_host.clone());
    let set = Arc::new(DeviceSet {
        serial,
        i8042,
        acpi_pm,
        pci_host,
        blocks: virtio.blocks.clone(),
        nets: virtio.nets.iter().map(|(n, _)| n.clone()).collect(),
        vmgenid: Arc::new(Mutex::new(vmgenid)),
    });
    Ok(Devices { set, pio: Arc::new(pio), virtio })
}

/// What a boot needs to start its vCPUs and serve the API.
struct Assembly<'a> {
    config: &'a VmConfig,
    ctx: &'a BootContext<'a>,
    vm: VmFd,
    ram: GuestRam,
    devices: Devices,
    msr_indices: &'a Arc<Vec<u32>>,
    restore_slot: &'a RestoreSlot,
    /// Start with the vCPUs parked (a restore asked to stay paused).
    paused: bool,
}

impl Boot {
    fn start(
        kvm: &Kvm,
        config: &VmConfig,
        ctx: &BootContext<'_>,
        console_out: ConsoleOut,
        input: &InputTarget,
        msr_indices: &Arc<Vec<u32>>,
        restore_slot: &RestoreSlot,
    ) -> Result<Boot, VmmError> {
        let ram = GuestRam::new(config.mem_mib << 20)?;
        let vm = new_vm(kvm, &ram)?;
        let devices = build_devices(&vm, &ram, config, ctx, console_out, None)?;
        let rsdp = acpi::write_tables(&ram.memory, config.vcpus, &devices.virtio.slots)?;
        let entry = boot::load_linux(&ram.memory, &config.kernel, config.initrd.as_deref(), &config.cmdline, rsdp)?;
        input.set(Some(devices.set.serial.clone()));
        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let asm = Assembly { config, ctx, vm, ram, devices, msr_indices, restore_slot, paused: false };
        Boot::launch(asm, |id, fd| {
            cpu::configure_common(fd, &cpu::cpuid_for(&base_cpuid, id, u32::from(config.vcpus)))?;
            if id == 0 {
                cpu::configure_boot_cpu(fd, entry)?;
            }
            Ok(())
        })
    }

    /// A boot that continues a snapshot (`chain`: base first, the
    /// snapshot to restore last).
    #[allow(clippy::too_many_arguments)]
    fn restore(
        kvm: &Kvm,
        config: &VmConfig,
        ctx: &BootContext<'_>,
        console_out: ConsoleOut,
        input: &InputTarget,
        chain: &[format::Loaded],
        from: &RestoreFrom,
        msr_indices: &Arc<Vec<u32>>,
        restore_slot: &RestoreSlot,
    ) -> Result<Boot, VmmError> {
        let Some(last) = chain.last() else {
            return Err(VmmError::Snapshot(SnapshotError::Invalid("empty snapshot chain".into())));
        };
        let state = &last.state;
        let started = std::time::Instant::now();
        let ram = GuestRam::new(config.mem_mib << 20)?;
        let load = snapshot::restore::load_memory(&ram, chain)?;
        let vm = new_vm(kvm, &ram)?;
        if load.lazy.is_some() {
            snapshot::restore::prefault_kvm_pages(&ram.memory, state);
        }
        let devices = build_devices(&vm, &ram, config, ctx, console_out, Some(&state.devices))?;
        state.vm.restore(&vm)?;
        input.set(Some(devices.set.serial.clone()));
        tracing::info!(
            dir = %last.dir.display(),
            eager_bytes = load.eager_bytes,
            lazy = load.lazy.is_some(),
            took_ms = started.elapsed().as_millis() as u64,
            "restoring"
        );
        let vcpus = state.vcpus.clone();
        let asm = Assembly { config, ctx, vm, ram, devices, msr_indices, restore_slot, paused: from.paused };
        let boot = Boot::launch(asm, move |id, fd| {
            let v = vcpus.get(id as usize).ok_or_else(|| SnapshotError::Invalid(format!("no state for vCPU {id}")))?;
            v.restore(fd)?;
            Ok(())
        })?;
        if let Some(l) = load.lazy {
            *lock(&boot.handles.lazy) = Some(l);
        }
        // An interrupt edge raised while the devices were rebuilt may have
        // been overwritten by the restored interrupt controllers: raise
        // the pending ones again (at worst one spurious interrupt), and
        // hand a frame held for want of an RX buffer to the guest.
        {
            let set = &boot.handles.device_set;
            lock(&set.serial).reassert_irq();
            lock(&set.i8042).reassert_irq();
            for b in &set.blocks {
                lock(b).reassert_irq();
            }
            for n in &set.nets {
                let mut n = lock(n);
                n.reassert_irq();
                n.process_rx();
            }
        }
        if from.new_generation {
            // A restored or cloned guest is a fork of the one that was
            // saved: its kernel must reseed its RNG (docs/snapshots.md).
            // After the vCPUs' LAPICs are restored, or the interrupt that
            // announces it would be overwritten.
            let mem = boot.handles.memory.clone();
            lock(&boot.handles.device_set.vmgenid).regenerate(&mem).map_err(|e| {
                VmmError::Snapshot(SnapshotError::DeviceRestore { device: "vmgenid".into(), reason: e.to_string() })
            })?;
        }
        Ok(boot)
    }

    /// Creates the vCPUs (each set up by `setup` on this thread, before it
    /// ever runs), starts their threads and the device threads.
    fn launch(asm: Assembly<'_>, setup: impl Fn(u32, &VcpuFd) -> Result<(), VmmError>) -> Result<Boot, VmmError> {
        let Assembly { config, ctx, vm, ram, devices, msr_indices, restore_slot, paused } = asm;
        let stop = Arc::new(AtomicBool::new(false));
        let rx_hold = Arc::new(AtomicBool::new(false));
        let control = Arc::new(VcpuControl::new(usize::from(config.vcpus)));
        if paused {
            control.request_pause();
        }
        let vm = Arc::new(vm);
        let mut fds = Vec::new();
        for id in 0..u32::from(config.vcpus) {
            let fd = vm.create_vcpu(u64::from(id)).map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
            setup(id, &fd)?;
            fds.push(fd);
        }
        let mut device_threads = Vec::new();
        for (dev, fd) in &devices.virtio.nets {
            device_threads.push(spawn_net_rx(dev.clone(), *fd, stop.clone(), rx_hold.clone())?);
        }
        let handles = Arc::new(BootHandles {
            boot: ctx.number,
            vm: vm.clone(),
            control: control.clone(),
            memfd: ram.memfd.try_clone().map_err(VmmError::GuestMemory)?,
            memory: ram.memory.clone(),
            regions: memory_regions(&ram),
            mem_bytes: ram.size,
            keyboard: devices.set.i8042.clone(),
            devices: devices.virtio.handles,
            kernel: std::path::absolute(&config.kernel).unwrap_or_else(|_| config.kernel.clone()),
            device_set: devices.set.clone(),
            config: config.clone(),
            disks: ctx.disks.clone(),
            msr_indices: msr_indices.clone(),
            snapshot_lock: Mutex::new(()),
            dirty_log_on: std::sync::atomic::AtomicBool::new(false),
            restore: restore_slot.clone(),
            events: ctx.events.clone(),
            lazy: Mutex::new(None),
        });
        let mut boot = Boot { handles, _ram: ram, control: control.clone(), stop, rx_hold, threads: Vec::new(), device_threads };
        let mmio = devices.virtio.bus.clone();
        for (id, fd) in (0u32..).zip(fds) {
            let runner = VcpuRunner {
                id,
                fd,
                pio: devices.pio.clone(),
                mmio: mmio.clone(),
                control: control.clone(),
                events: ctx.events.clone(),
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
                // The thread is alive (not finished, not joined); the kick
                // handler does nothing but end its KVM_RUN.
                let _ = t.kill(signals::kick_signal());
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
