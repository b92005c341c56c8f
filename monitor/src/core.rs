//! The monitor's core: its one connection to the VMM and the guest memory
//! mapped from it. Every service reaches the VM through here, and only
//! through the narrow `VmControl` interface (pause, resume, registers) and
//! the memory mapping; the services own everything else they know.
use std::sync::RwLock;

use dvisor_api::protocol::{ApiError, ErrorCode, Regs, Request, RunState, Status, VcpuState};
use dvisor_api::VmmClient;
use serde::Deserialize;

use crate::error::MonitorError;
use crate::guest_memory::GuestMemoryMap;

/// What services may ask of the VM itself. The live monitor does it over
/// the support API (`Core`); unit tests do it on a memory image.
pub trait VmControl {
    /// Pauses the VM; true when it was paused already.
    fn pause(&self) -> Result<bool, MonitorError>;
    /// Pauses the VM and returns every vCPU as it stopped, in one round
    /// trip. On an error the VM is let run again.
    fn pause_with_state(&self) -> Result<Vec<VcpuState>, MonitorError>;
    fn resume(&self) -> Result<(), MonitorError>;
    fn set_regs(&self, vcpu: u32, regs: Regs) -> Result<(), MonitorError>;
    fn run_state(&self) -> Result<RunState, MonitorError>;
}

pub struct Core {
    vmm: VmmClient,
    memory: RwLock<Option<GuestMemoryMap>>,
}

impl Core {
    /// The core of a freshly connected VMM (memory not mapped yet).
    pub fn new(vmm: VmmClient) -> Self {
        Core { vmm, memory: RwLock::new(None) }
    }

    pub fn vmm(&self) -> &VmmClient {
        &self.vmm
    }

    /// (Re)maps guest RAM: once at attach, again after every reboot.
    pub fn remap(&self) -> Result<(), MonitorError> {
        // Between boots there is no memory to map; the Boot event brings
        // us back here.
        let map = GuestMemoryMap::from_vmm(&self.vmm)?;
        if let Some(m) = &map {
            tracing::info!(boot = m.boot, size = m.size(), "guest memory mapped");
        }
        *self.memory.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// The boot the current mapping belongs to; None when nothing is mapped.
    pub fn boot(&self) -> Option<u64> {
        self.memory.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|m| m.boot)
    }

    /// Runs `f` on the current guest-memory mapping.
    pub fn with_memory<T>(&self, f: impl FnOnce(&GuestMemoryMap) -> Result<T, MonitorError>) -> Result<T, MonitorError> {
        // Attached before the first boot set up its memory, or a Boot
        // event was missed: try once more before giving up.
        if self.boot().is_none() {
            self.remap()?;
        }
        let g = self.memory.read().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some(m) => f(m),
            None => Err(MonitorError::Api(ApiError::new(ErrorCode::WrongState, "no guest memory mapped (the guest is rebooting)"))),
        }
    }
}

impl VmControl for Core {
    fn pause(&self) -> Result<bool, MonitorError> {
        #[derive(Deserialize)]
        struct Paused {
            already: bool,
        }
        Ok(self.vmm.call::<Paused>(Request::Pause)?.already)
    }

    fn pause_with_state(&self) -> Result<Vec<VcpuState>, MonitorError> {
        #[derive(Deserialize)]
        struct Paused {
            vcpus: Vec<VcpuState>,
        }
        match self.vmm.call::<Paused>(Request::PauseWithState) {
            Ok(p) => Ok(p.vcpus),
            Err(e) => {
                let _ = self.resume();
                Err(e.into())
            }
        }
    }

    fn resume(&self) -> Result<(), MonitorError> {
        let _: serde_json::Value = self.vmm.call(Request::Resume)?;
        Ok(())
    }

    fn set_regs(&self, vcpu: u32, regs: Regs) -> Result<(), MonitorError> {
        let _: serde_json::Value = self.vmm.call(Request::SetRegs { vcpu, regs })?;
        Ok(())
    }

    fn run_state(&self) -> Result<RunState, MonitorError> {
        Ok(self.vmm.call::<Status>(Request::Status)?.state)
    }
}
