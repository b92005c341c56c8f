//! D-Script: the policy language of the D-System Monitor (see `docs/dscript.md`).
//!
//! A policy says what to watch, when, which statistics mean something is wrong, and which
//! remedy to run. Mechanism stays in the embedder: it registers host functions and events in a
//! [`Host`], the [`check`] function turns source into a runnable [`Compiled`] program (or
//! diagnostics), and an [`Engine`] runs it against events and the clock within fixed limits.
//! [`replay`] feeds recorded events from JSON lines, so policies can be tested without a VM.

// Diagnostics are the product of the front end and only travel on the cold error path.
#![allow(clippy::result_large_err)]

pub mod ast;
pub mod bench;
pub mod cli;
mod builtins;
mod check;
pub mod diag;
pub mod engine;
pub mod host;
mod interp;
mod runtime;
pub mod ir;
pub mod lexer;
pub mod parser;
pub mod replay;
pub mod span;
mod stats;
pub mod types;
pub mod units;
pub mod value;
mod window;

pub use builtins::SIGNATURES as BUILTINS;
pub use check::CheckOutput;
pub use diag::{Diagnostic, Severity};
pub use engine::{Engine, EngineConfig, EngineError, ErrorMode, EventId, Limits, RuntimeError};
pub use host::{EventSchema, Host, HostCall, HostError, HostKind, RegisterError, Signature};
pub use ir::Compiled;
pub use span::Span;
pub use types::Type;
pub use value::Value;

/// Parses and checks a policy against a host's functions and events.
///
/// `compiled` is `Some` exactly when there are no errors (warnings may remain).
pub fn check<C>(src: &str, host: &Host<C>) -> CheckOutput {
    check_with(src, host.signatures(), host.events())
}

/// [`check`] given the host's signatures and events directly.
pub fn check_with(src: &str, sigs: &[Signature], events: &[EventSchema]) -> CheckOutput {
    match parser::parse(src) {
        Ok(program) => check::check(src, &program, sigs, events),
        Err(d) => CheckOutput { compiled: None, diagnostics: vec![d] },
    }
}
