//! The engine: runs a checked policy against events and the clock, inside fixed limits.
//!
//! ```
//! use dscript::{Engine, EngineConfig, Host, Type, Value};
//!
//! #[derive(Default)]
//! struct World { alerts: Vec<String> }
//!
//! let mut host = Host::<World>::new();
//! host.action("alert", &[("msg", Type::Str)], |w, c| { w.alerts.push(c.str_arg(0)?.into()); Ok(()) }).unwrap();
//! host.event("crash", &[("reason", Type::Str)]).unwrap();
//! let src = "on crash where event.reason == \"panic\" { alert(\"guest panicked\") }";
//! let checked = dscript::check(src, &host);
//! let program = checked.compiled.expect("policy checks clean");
//! let mut world = World::default();
//! let mut engine = Engine::start(program, host, EngineConfig::default(), &mut world).unwrap();
//! let crash = engine.event_id("crash").unwrap();
//! engine.dispatch(&mut world, crash, 1_000_000_000, &[Value::str("panic")]).unwrap();
//! assert_eq!(world.alerts, ["guest panicked"]);
//! ```

use crate::diag::Diagnostic;
use crate::host::Host;
use crate::interp::{Machine, RtErr};
use crate::ir::{Compiled, RuleTrigger};
use crate::span::Span;
use crate::types::Type;
use crate::units::format_duration;
use crate::value::Value;
use crate::window::Window;
pub use crate::runtime::{value_fits, Limits};
use crate::runtime::State;
use thiserror::Error;

/// What happens to a rule after a run-time error in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorMode {
    /// Report the error and disable the rule; the other rules keep running.
    #[default]
    DisableRule,
    /// Report the error and keep the rule: it runs again on its next event or tick.
    KeepRule,
    /// Report the error and stop the engine: every later dispatch fails.
    Stop,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct EngineConfig {
    pub limits: Limits,
    pub on_error: ErrorMode,
}

/// A run-time error in a rule: where, when, and what happened to the rule.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{rule}: {message} (at {})", format_duration(*time))]
pub struct RuntimeError {
    pub rule: String,
    pub span: Span,
    pub message: String,
    /// Engine clock (ns) when it happened.
    pub time: i64,
    pub disabled: bool,
}

impl RuntimeError {
    /// A diagnostic for rendering against the policy source.
    pub fn diagnostic(&self) -> Diagnostic {
        let fate = if self.disabled { "the rule is now disabled" } else { "the rule stays enabled" };
        Diagnostic::new(self.span, format!("run-time error in `{}`: {}", self.rule, self.message))
            .with_label(self.message.clone())
            .with_note(format!("at {}; {fate}", format_duration(self.time)))
    }
}

/// Problems with how the embedder calls the engine.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum EngineError {
    #[error("the policy was checked against different host functions")]
    HostMismatch,
    #[error("no event with id {0}")]
    UnknownEvent(u32),
    #[error("event `{event}` has {want} fields, got {got}")]
    FieldCount { event: String, want: usize, got: usize },
    #[error("event `{event}` field `{field}` should be `{ty}`")]
    FieldType { event: String, field: String, ty: Type },
    #[error("starting the policy failed: {0}")]
    Init(RuntimeError),
    #[error("the engine stopped after a run-time error: {0}")]
    Stopped(RuntimeError),
}

/// Event handle: an index into the policy's event list.
pub type EventId = u32;

struct RuleState {
    enabled: bool,
    /// Next firing time of an `every` rule; `i64::MAX` when none.
    next: i64,
}

pub struct Engine<C> {
    prog: Compiled,
    host: Host<C>,
    config: EngineConfig,
    state: State,
    rules: Vec<RuleState>,
    /// For each event, the `on` rules that listen to it, in source order.
    listeners: Vec<Vec<u32>>,
    now: i64,
    next_due: i64,
    errors: Vec<RuntimeError>,
    stopped: Option<RuntimeError>,
}

impl<C> Engine<C> {
    /// Starts a checked policy: initialises its globals (which may call host queries).
    pub fn start(prog: Compiled, host: Host<C>, config: EngineConfig, ctx: &mut C) -> Result<Engine<C>, EngineError> {
        if prog.host_sigs != host.signatures() || prog.events.get(..host.events().len()) != Some(host.events()) {
            return Err(EngineError::HostMismatch);
        }
        let mut listeners = vec![Vec::new(); prog.events.len()];
        let rules = prog
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| match r.trigger {
                RuleTrigger::Every(p) => RuleState { enabled: true, next: p },
                RuleTrigger::On(ev) => {
                    if let Some(l) = listeners.get_mut(ev as usize) {
                        l.push(i as u32);
                    }
                    RuleState { enabled: true, next: i64::MAX }
                }
            })
            .collect();
        let state = State {
            globals: prog.globals.iter().map(|(_, t)| Value::zero(t)).collect(),
            windows: prog.windows.iter().map(|w| Window::new(w.capacity)).collect(),
            stack: Vec::with_capacity(256),
            steps: 0,
            depth: 0,
        };
        let mut engine = Engine { prog, host, config, state, rules, listeners, now: 0, next_due: i64::MAX, errors: Vec::new(), stopped: None };
        engine.recompute_next_due();
        let init_slots = engine.prog.init_slots;
        let mut m = Machine {
            prog: &engine.prog,
            host: &engine.host,
            st: &mut engine.state,
            ctx,
            fields: &[],
            now: 0,
            rule: "policy start",
            limits: config.limits,
            current: Span::default(),
        };
        let r = m.run_body(&engine.prog.init, init_slots);
        if let Err(e) = r {
            let RtErr { span, message } = *e;
            return Err(EngineError::Init(RuntimeError { rule: "policy start".into(), span, message, time: 0, disabled: true }));
        }
        Ok(engine)
    }

    pub fn event_id(&self, name: &str) -> Option<EventId> {
        self.prog.events.iter().position(|e| e.name == name).map(|i| i as EventId)
    }

    pub fn events(&self) -> &[crate::host::EventSchema] {
        &self.prog.events
    }

    pub fn host(&self) -> &Host<C> {
        &self.host
    }

    /// The engine clock in nanoseconds.
    pub fn now(&self) -> i64 {
        self.now
    }

    /// Run-time errors since the last call.
    pub fn take_errors(&mut self) -> Vec<RuntimeError> {
        std::mem::take(&mut self.errors)
    }

    /// Names of rules disabled by errors.
    pub fn disabled_rules(&self) -> Vec<&str> {
        self.rules.iter().zip(&self.prog.rules).filter(|(s, _)| !s.enabled).map(|(_, r)| r.name.as_str()).collect()
    }

    /// Moves the clock to `t` (ns), firing every `every` rule due at or before it, in time order
    /// (ties in source order). Time never goes backwards: an earlier `t` is ignored.
    pub fn advance_to(&mut self, ctx: &mut C, t: i64) -> Result<(), EngineError> {
        if let Some(e) = &self.stopped {
            return Err(EngineError::Stopped(e.clone()));
        }
        while self.next_due <= t {
            let due = self.next_due;
            let Some(i) = self.rules.iter().position(|r| r.enabled && r.next == due) else { break };
            self.now = due;
            let period = match self.prog.rules[i].trigger {
                RuleTrigger::Every(p) => p,
                RuleTrigger::On(_) => i64::MAX,
            };
            self.rules[i].next = due.saturating_add(period);
            self.run_rule(ctx, i, &[])?;
            self.recompute_next_due();
        }
        self.now = self.now.max(t);
        Ok(())
    }

    /// Delivers event `id` at time `t` (ns) with its fields in schema order: first fires the
    /// timers due by `t`, then every enabled `on` rule for the event.
    pub fn dispatch(&mut self, ctx: &mut C, id: EventId, t: i64, fields: &[Value]) -> Result<(), EngineError> {
        let schema = self.prog.events.get(id as usize).ok_or(EngineError::UnknownEvent(id))?;
        if schema.fields.len() != fields.len() {
            return Err(EngineError::FieldCount { event: schema.name.clone(), want: schema.fields.len(), got: fields.len() });
        }
        for ((name, ty), v) in schema.fields.iter().zip(fields) {
            if !value_fits(v, ty) {
                return Err(EngineError::FieldType { event: schema.name.clone(), field: name.clone(), ty: ty.clone() });
            }
        }
        self.advance_to(ctx, t)?;
        let n = self.listeners[id as usize].len();
        for k in 0..n {
            let i = self.listeners[id as usize][k] as usize;
            self.run_rule(ctx, i, fields)?;
        }
        Ok(())
    }

    fn recompute_next_due(&mut self) {
        self.next_due = self.rules.iter().filter(|r| r.enabled).map(|r| r.next).min().unwrap_or(i64::MAX);
    }

    fn run_rule(&mut self, ctx: &mut C, i: usize, fields: &[Value]) -> Result<(), EngineError> {
        if !self.rules[i].enabled {
            return Ok(());
        }
        let rule = &self.prog.rules[i];
        let mut m = Machine {
            prog: &self.prog,
            host: &self.host,
            st: &mut self.state,
            ctx,
            fields,
            now: self.now,
            rule: &rule.name,
            limits: self.config.limits,
            current: rule.span,
        };
        let result = m.run_rule(rule);
        let Err(e) = result else { return Ok(()) };
        let RtErr { span, message } = *e;
        let disabled = self.config.on_error != ErrorMode::KeepRule;
        if disabled {
            self.rules[i].enabled = false;
            self.rules[i].next = i64::MAX;
            self.recompute_next_due();
        }
        let err = RuntimeError { rule: self.prog.rules[i].name.clone(), span, message, time: self.now, disabled };
        self.errors.push(err.clone());
        if self.config.on_error == ErrorMode::Stop {
            for r in &mut self.rules {
                r.enabled = false;
            }
            self.next_due = i64::MAX;
            self.stopped = Some(err.clone());
            return Err(EngineError::Stopped(err));
        }
        Ok(())
    }
}
