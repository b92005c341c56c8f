//! The embedder's side: host functions (queries and actions) and event schemas.
//!
//! A policy can touch the world only through what is registered here. The monitor registers
//! its queries (`mem_used()`), actions (`restore(name)`) and events (`crash {reason}`) with
//! typed signatures; the checker rejects any other call, and the engine hands each call to
//! the registered closure together with the embedder's context `C`.
//!
//! ```
//! use dscript::{Host, HostKind, Type, Value};
//!
//! struct Monitor { mem: i64, restored: Vec<String> }
//!
//! let mut host = Host::<Monitor>::new();
//! host.query("mem_used", &[], Type::Size, |m, _call| Ok(Value::Int(m.mem))).unwrap();
//! host.action("restore", &[("snapshot", Type::Str)], |m, call| {
//!     m.restored.push(call.str_arg(0)?.to_string());
//!     Ok(())
//! }).unwrap();
//! host.event("crash", &[("reason", Type::Str)]).unwrap();
//! assert_eq!(host.signatures().len(), 2);
//! ```

use crate::span::Span;
use crate::types::Type;
use crate::value::Value;
use thiserror::Error;

/// A host function's failure; the engine reports it at the call site like any run-time error.
#[derive(Debug, Clone, Error, PartialEq)]
#[error("{0}")]
pub struct HostError(pub String);

/// A problem with a registration itself (a programming error in the embedder).
#[derive(Debug, Clone, Error, PartialEq)]
pub enum RegisterError {
    #[error("`{0}` is already registered")]
    Duplicate(String),
    #[error("`{0}` is a D-Script keyword or built-in and cannot be registered")]
    Reserved(String),
    #[error("`{0}` is not a valid name (letters, digits and `_`, not starting with a digit)")]
    BadName(String),
    #[error("`{name}` uses type `{ty}`, which a host function cannot take or return")]
    BadType { name: String, ty: Type },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Reads state; returns a value.
    Query,
    /// Changes the world; returns nothing. Replay records these.
    Action,
}

/// A host function's typed signature: what the checker knows about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub name: String,
    pub params: Vec<(String, Type)>,
    pub ret: Type,
    pub kind: HostKind,
}

/// An event the host can deliver, with its typed fields (`event.reason` in a rule).
#[derive(Debug, Clone, PartialEq)]
pub struct EventSchema {
    pub name: String,
    pub fields: Vec<(String, Type)>,
}

/// What a host function receives besides the embedder context.
pub struct HostCall<'a> {
    pub name: &'a str,
    pub args: &'a [Value],
    pub params: &'a [(String, Type)],
    /// The engine clock in nanoseconds: the event's time, or the tick's time in `every` rules.
    pub now: i64,
    /// The rule that called, e.g. `on crash (line 12)`.
    pub rule: &'a str,
    pub span: Span,
}

impl HostCall<'_> {
    fn arg(&self, i: usize) -> Result<&Value, HostError> {
        self.args.get(i).ok_or_else(|| HostError(format!("{}: missing argument {i}", self.name)))
    }

    pub fn str_arg(&self, i: usize) -> Result<&str, HostError> {
        self.arg(i)?.as_str().ok_or_else(|| HostError(format!("{}: argument {i} is not a string", self.name)))
    }

    /// An `int`, `duration` (ns) or `size` (bytes) argument.
    pub fn int_arg(&self, i: usize) -> Result<i64, HostError> {
        self.arg(i)?.as_int().ok_or_else(|| HostError(format!("{}: argument {i} is not an integer", self.name)))
    }

    pub fn float_arg(&self, i: usize) -> Result<f64, HostError> {
        self.arg(i)?.as_f64().ok_or_else(|| HostError(format!("{}: argument {i} is not a number", self.name)))
    }

    pub fn bool_arg(&self, i: usize) -> Result<bool, HostError> {
        self.arg(i)?.as_bool().ok_or_else(|| HostError(format!("{}: argument {i} is not a bool", self.name)))
    }

    /// Arguments as policy source would show them: `"web", 5s`.
    pub fn display_args(&self) -> String {
        let parts: Vec<String> = self.args.iter().zip(self.params).map(|(v, (_, t))| v.quoted(t)).collect();
        parts.join(", ")
    }
}

type HostClosure<C> = Box<dyn Fn(&mut C, &HostCall) -> Result<Value, HostError> + Send + Sync>;

pub(crate) struct HostFn<C> {
    pub sig: Signature,
    pub f: HostClosure<C>,
}

/// The registry of host functions and events for an embedder with context type `C`.
pub struct Host<C> {
    fns: Vec<HostFn<C>>,
    sigs: Vec<Signature>,
    events: Vec<EventSchema>,
}

impl<C> Default for Host<C> {
    fn default() -> Self {
        Host { fns: Vec::new(), sigs: Vec::new(), events: Vec::new() }
    }
}

impl<C> Host<C> {
    pub fn new() -> Host<C> {
        Host::default()
    }

    /// Registers a query: `f` returns a value of type `ret`.
    pub fn query<F>(&mut self, name: &str, params: &[(&str, Type)], ret: Type, f: F) -> Result<&mut Self, RegisterError>
    where
        F: Fn(&mut C, &HostCall) -> Result<Value, HostError> + Send + Sync + 'static,
    {
        self.add(name, params, ret, HostKind::Query, Box::new(f))
    }

    /// Registers an action: something the policy asks the monitor to do.
    pub fn action<F>(&mut self, name: &str, params: &[(&str, Type)], f: F) -> Result<&mut Self, RegisterError>
    where
        F: Fn(&mut C, &HostCall) -> Result<(), HostError> + Send + Sync + 'static,
    {
        self.add(name, params, Type::Unit, HostKind::Action, Box::new(move |c, call| f(c, call).map(|()| Value::Unit)))
    }

    /// Declares an event the host will deliver, with its fields.
    pub fn event(&mut self, name: &str, fields: &[(&str, Type)]) -> Result<&mut Self, RegisterError> {
        check_name(name)?;
        if self.events.iter().any(|e| e.name == name) {
            return Err(RegisterError::Duplicate(name.into()));
        }
        let fields = owned_params(name, fields)?;
        self.events.push(EventSchema { name: name.into(), fields });
        Ok(self)
    }

    fn add(&mut self, name: &str, params: &[(&str, Type)], ret: Type, kind: HostKind, f: HostClosure<C>) -> Result<&mut Self, RegisterError> {
        check_name(name)?;
        if crate::builtins::is_builtin(name) {
            return Err(RegisterError::Reserved(name.into()));
        }
        if self.sigs.iter().any(|s| s.name == name) {
            return Err(RegisterError::Duplicate(name.into()));
        }
        if matches!(ret, Type::Window(_) | Type::Error) {
            return Err(RegisterError::BadType { name: name.into(), ty: ret });
        }
        let params = owned_params(name, params)?;
        let sig = Signature { name: name.into(), params, ret, kind };
        self.sigs.push(sig.clone());
        self.fns.push(HostFn { sig, f });
        Ok(self)
    }

    /// All host function signatures, in registration order (the checker resolves calls by index).
    pub fn signatures(&self) -> &[Signature] {
        &self.sigs
    }

    pub fn events(&self) -> &[EventSchema] {
        &self.events
    }

    pub(crate) fn function(&self, index: usize) -> Option<&HostFn<C>> {
        self.fns.get(index)
    }
}

fn check_name(name: &str) -> Result<(), RegisterError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic()) && chars.all(|c| c == '_' || c.is_ascii_alphanumeric());
    if !ok {
        return Err(RegisterError::BadName(name.into()));
    }
    if crate::lexer::is_keyword(name) {
        return Err(RegisterError::Reserved(name.into()));
    }
    Ok(())
}

fn owned_params(owner: &str, params: &[(&str, Type)]) -> Result<Vec<(String, Type)>, RegisterError> {
    params
        .iter()
        .map(|(n, t)| {
            check_name(n)?;
            if matches!(t, Type::Window(_) | Type::Unit | Type::Error) {
                return Err(RegisterError::BadType { name: format!("{owner}.{n}"), ty: t.clone() });
            }
            Ok((n.to_string(), t.clone()))
        })
        .collect()
}
