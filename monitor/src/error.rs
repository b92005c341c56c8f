//! Errors of the monitor, each naming the thing and the fix.
use std::path::PathBuf;

use dvisor_api::protocol::ApiError;
use dvisor_api::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The support-API connection failed in a way of its own (connect).
    #[error(transparent)]
    Client(ClientError),
    #[error("the VMM at {0} closed the connection (the VM stopped?)")]
    Disconnected(PathBuf),
    #[error("the VMM refused: {0}")]
    Api(ApiError),
    /// The monitor's own answer to a CLI request: its message says it all.
    #[error("{}", .0.message)]
    Monitor(ApiError),
    #[error("support API protocol error: {0}")]
    Protocol(String),
    #[error("guest physical range {gpa:#x}+{len:#x} is not guest RAM")]
    OutOfRange { gpa: u64, len: usize },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("no monitor serves {0}: {1} (start the VM with `dvisor run`, or attach one with `dvisor monitor --attach API_SOCKET`)")]
    NoMonitor(PathBuf, std::io::Error),
    #[error("introspection: {0}")]
    Vmi(String),
    /// A live patch that cannot be applied or reverted (now).
    #[error("{0}")]
    Patch(String),
    /// A patch object, command file or program that is wrong in itself.
    #[error("{0}")]
    PatchInput(String),
    #[error("{0} is already served by a running monitor (pid {1})")]
    MonitorRunning(PathBuf, String),
}

impl From<ClientError> for MonitorError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Disconnected(p) => MonitorError::Disconnected(p),
            ClientError::Api(e) => MonitorError::Api(e),
            ClientError::Protocol(m) => MonitorError::Protocol(m),
            ClientError::Io(what, e) => MonitorError::Io(what, e),
            e @ ClientError::Connect(..) => MonitorError::Client(e),
        }
    }
}
