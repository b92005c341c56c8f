//! Replay: feed recorded events (JSON lines) through a policy and record the actions it takes.
//!
//! One event per line:
//!
//! ```text
//! {"t": "12.5s", "event": "crash", "reason": "panic"}
//! {"t_ms": 13000, "event": "heartbeat", "mem_used": "512MiB"}
//! {"t": 14, "mem_used": 600000000}
//! ```
//!
//! * `t` is the time since replay start: a duration string (`"12.5s"`) or a number of
//!   seconds; `t_ms` gives integer milliseconds instead. Without either, the previous time is
//!   kept. Times must not go backwards.
//! * `event` names the event; its declared fields must be present. A line without `event`
//!   only moves the clock (firing `every` rules) and updates query answers.
//! * Every other field whose name matches a replay query (`mem_used`, `cpu_load`, ...) sets
//!   that query's answer from the line's time on (timers due earlier saw the old answer;
//!   timers due at that very time see the new one); before any such field a query answers zero.
//!   Durations are strings (`"250ms"`) or seconds; sizes are strings (`"64MiB"`) or bytes.

use crate::engine::{Engine, EngineConfig, EngineError, RuntimeError};
use crate::host::{Host, HostCall, HostError, Signature};
use crate::ir::Compiled;
use crate::types::Type;
use crate::units::{self, format_duration, UnitKind};
use crate::value::Value;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use std::borrow::Cow;
use std::fmt;
use std::io::BufRead;
use std::sync::Arc;
use thiserror::Error;

/// One action the policy took during replay.
#[derive(Debug, Clone)]
pub struct ActionRecord {
    /// Engine time in nanoseconds.
    pub time: i64,
    pub action: String,
    pub args: Vec<(Value, Type)>,
    pub rule: String,
}

impl ActionRecord {
    /// `[12.5s] restore("last-good")`
    pub fn text(&self) -> String {
        let args: Vec<String> = self.args.iter().map(|(v, t)| v.quoted(t)).collect();
        format!("[{}] {}({})", format_duration(self.time), self.action, args.join(", "))
    }

    /// `{"t":"12.5s","t_ms":12500,"action":"restore","args":["last-good"],"rule":"on crash (line 4)"}`
    pub fn json(&self) -> String {
        let args: Vec<serde_json::Value> = self.args.iter().map(|(v, t)| v.to_json(t)).collect();
        serde_json::json!({
            "t": format_duration(self.time),
            "t_ms": self.time / units::MS,
            "action": self.action,
            "args": args,
            "rule": self.rule,
        })
        .to_string()
    }
}

/// The replay embedder's world: query answers taken from events, and recorded actions.
#[derive(Debug, Default)]
pub struct ReplayWorld {
    /// Current answer per state key (see [`state_keys`]), by index.
    pub state: Vec<Value>,
    pub actions: Vec<ActionRecord>,
}

/// Keys an event line may carry to set query answers, with their types.
pub fn state_keys() -> Vec<(&'static str, Type)> {
    vec![
        ("mem_used", Type::Size),
        ("mem_total", Type::Size),
        ("cpu_load", Type::Float),
        ("disk_io", Type::Int),
        ("net_io", Type::Int),
        ("keystrokes", Type::Int),
        ("latency", Type::Duration),
        ("uptime", Type::Duration),
        ("guest_state", Type::Str),
        ("last_snapshot", Type::Str),
        ("applied_patches", Type::list(Type::Str)),
    ]
}

fn state_slot(name: &str) -> usize {
    state_keys().iter().position(|(n, _)| *n == name).unwrap_or(0)
}

/// What each default query and action means, for `--help` and the reference.
pub const HOST_DOCS: &[(&str, &str)] = &[
    ("mem_used() -> size", "guest memory in use"),
    ("mem_total() -> size", "guest memory size"),
    ("cpu_load() -> float", "guest CPU load, 0.0 to 1.0"),
    ("disk_io() -> int", "disk requests in the last window"),
    ("net_io() -> int", "network packets in the last window"),
    ("keystrokes() -> int", "keystrokes injected in the last window"),
    ("latency() -> duration", "service response time"),
    ("uptime() -> duration", "time since the guest booted"),
    ("guest_state() -> string", "running, paused, crashed, ..."),
    ("last_snapshot() -> string", "name of the newest snapshot (replay: set by snapshot())"),
    ("patch_applied(patch: string) -> bool", "whether a live patch is in place (replay: `applied_patches` field)"),
    ("snapshot(name: string)", "take a snapshot of the VM"),
    ("restore(name: string)", "restore a snapshot into the running VM"),
    ("live_patch(patch: string)", "apply a live patch (replay: marks it applied)"),
    ("shadow_reboot(update: string)", "ShadowReboot into an update; \"\" rejuvenates the same software"),
    ("isolate(scope: string)", "cut the guest off: \"network\", \"disk\" or \"all\""),
    ("keep_evidence(label: string)", "keep a forensic copy of guest memory and logs"),
    ("ask_operator(id: string, question: string)", "ask the operator; the answer arrives as an `operator_answer` event"),
    ("alert(msg: string)", "notify the operator"),
    ("log(msg: string)", "write to the monitor log"),
];

/// Events the monitor delivers (the replay accepts the same).
pub fn default_events() -> Vec<(&'static str, Vec<(&'static str, Type)>)> {
    vec![
        ("heartbeat", vec![]),
        ("crash", vec![("reason", Type::Str)]),
        ("console", vec![("line", Type::Str)]),
        ("io_window", vec![("injected", Type::Int), ("disk_io", Type::Int), ("net_io", Type::Int)]),
        ("update_available", vec![("update", Type::Str)]),
        ("operator_answer", vec![("id", Type::Str), ("approved", Type::Bool)]),
        ("lifecycle", vec![("state", Type::Str)]),
    ]
}

fn record(w: &mut ReplayWorld, call: &HostCall) -> Result<(), HostError> {
    let args = call.args.iter().cloned().zip(call.params.iter().map(|(_, t)| t.clone())).collect();
    w.actions.push(ActionRecord { time: call.now, action: call.name.to_string(), args, rule: call.rule.to_string() });
    Ok(())
}

/// The host a replay uses: the monitor's default queries, actions and events.
pub fn default_host() -> Host<ReplayWorld> {
    let mut host = Host::new();
    // Registration of fixed, valid names cannot fail; a failure would be a bug caught by tests.
    let _ = register_defaults(&mut host);
    host
}

fn register_defaults(host: &mut Host<ReplayWorld>) -> Result<(), crate::host::RegisterError> {
    for (name, ty) in state_keys() {
        if name == "applied_patches" {
            continue;
        }
        let slot = state_slot(name);
        host.query(name, &[], ty, move |w, _| Ok(w.state.get(slot).cloned().unwrap_or(Value::Unit)))?;
    }
    let patches = state_slot("applied_patches");
    host.query("patch_applied", &[("patch", Type::Str)], Type::Bool, move |w, call| {
        let name = call.str_arg(0)?;
        let applied = match w.state.get(patches) {
            Some(Value::List(items)) => items.iter().any(|v| v.as_str() == Some(name)),
            _ => false,
        };
        Ok(Value::Bool(applied))
    })?;
    let s = Type::Str;
    host.action("snapshot", &[("name", s.clone())], move |w, call| {
        let slot = state_slot("last_snapshot");
        if let Some(x) = w.state.get_mut(slot) {
            *x = Value::str(call.str_arg(0)?);
        }
        record(w, call)
    })?;
    host.action("restore", &[("name", s.clone())], record)?;
    host.action("live_patch", &[("patch", s.clone())], move |w, call| {
        if let Some(Value::List(items)) = w.state.get_mut(patches) {
            let name = call.str_arg(0)?;
            if !items.iter().any(|v| v.as_str() == Some(name)) {
                Arc::make_mut(items).push(Value::str(name));
            }
        }
        record(w, call)
    })?;
    host.action("shadow_reboot", &[("update", s.clone())], record)?;
    host.action("isolate", &[("scope", s.clone())], record)?;
    host.action("keep_evidence", &[("label", s.clone())], record)?;
    host.action("ask_operator", &[("id", s.clone()), ("question", s.clone())], record)?;
    host.action("alert", &[("msg", s.clone())], record)?;
    host.action("log", &[("msg", s)], record)?;
    for (name, fields) in default_events() {
        host.event(name, &fields)?;
    }
    Ok(())
}

impl ReplayWorld {
    pub fn new() -> ReplayWorld {
        ReplayWorld { state: state_keys().iter().map(|(_, t)| Value::zero(t)).collect(), actions: Vec::new() }
    }
}

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("reading events: {0}")]
    Io(#[from] std::io::Error),
    #[error("events line {line}: {message}")]
    Line { line: usize, message: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Something the replay reports as it happens, in order.
#[derive(Debug, Clone)]
pub enum ReplayItem {
    Action(ActionRecord),
    Error(RuntimeError),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayOptions {
    pub config: EngineConfig,
    /// Keep the clock running to this time (ns) after the last event, firing `every` rules.
    pub until: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct ReplaySummary {
    /// Lines read (events and clock-only lines).
    pub lines: u64,
    /// Events delivered to rules.
    pub events: u64,
    pub actions: u64,
    pub errors: u64,
    pub end_time: i64,
    pub disabled_rules: Vec<String>,
}

/// Replays JSON-line events through a policy checked against [`default_host`].
pub fn replay(
    compiled: Compiled,
    input: impl BufRead,
    opts: ReplayOptions,
    mut sink: impl FnMut(ReplayItem),
) -> Result<ReplaySummary, ReplayError> {
    let mut r = Replayer::new(compiled, opts)?;
    let mut line = String::new();
    let mut input = input;
    let mut lineno = 0;
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 {
            break;
        }
        lineno += 1;
        if line.trim().is_empty() {
            continue;
        }
        r.feed_line(&line).map_err(|message| ReplayError::Line { line: lineno, message })?;
        r.drain(&mut sink);
        if let Some(e) = r.stopped.take() {
            return Err(ReplayError::Engine(e));
        }
    }
    if let Some(until) = opts.until {
        let res = r.engine.advance_to(&mut r.world, until);
        r.drain(&mut sink);
        res?;
    }
    Ok(r.summary())
}

/// A replay in progress; feeds decoded lines to the engine.
pub struct Replayer {
    pub engine: Engine<ReplayWorld>,
    pub world: ReplayWorld,
    /// Few enough that a linear scan beats hashing.
    state_index: Vec<(&'static str, Type)>,
    fields: Vec<Value>,
    last_t: i64,
    summary: ReplaySummary,
    stopped: Option<EngineError>,
}

impl Replayer {
    pub fn new(compiled: Compiled, opts: ReplayOptions) -> Result<Replayer, EngineError> {
        let mut world = ReplayWorld::new();
        let engine = Engine::start(compiled, default_host(), opts.config, &mut world)?;
        let state_index = state_keys();
        Ok(Replayer { engine, world, state_index, fields: Vec::new(), last_t: 0, summary: ReplaySummary::default(), stopped: None })
    }

    /// Decodes and delivers one JSON line. Engine stops (in `ErrorMode::Stop`) are kept for the caller.
    pub fn feed_line(&mut self, line: &str) -> Result<(), String> {
        let raw = decode_line(line)?;
        self.summary.lines += 1;
        self.feed(raw)
    }

    pub fn feed(&mut self, raw: RawEvent) -> Result<(), String> {
        let t = match raw.time {
            Some(t) if t < self.last_t => {
                return Err(format!("time goes backwards: {} after {}", format_duration(t), format_duration(self.last_t)))
            }
            Some(t) => t,
            None => self.last_t,
        };
        self.last_t = t;
        // Timers due before this line see the answers as they were; the line's fields
        // take effect at its own time.
        if t > 0 {
            if let Err(e) = self.engine.advance_to(&mut self.world, t - 1) {
                self.stopped = Some(e);
                return Ok(());
            }
        }
        for (key, val) in &raw.fields {
            if let Some(slot) = self.state_index.iter().position(|(n, _)| *n == key.as_ref()) {
                let v = to_value(val, &self.state_index[slot].1).map_err(|m| format!("field `{key}`: {m}"))?;
                self.world.state[slot] = v;
            }
        }
        let result = match &raw.event {
            None => self.engine.advance_to(&mut self.world, t),
            Some(name) => {
                let id = self.engine.event_id(name).ok_or_else(|| format!("unknown event `{name}`"))?;
                self.fields.clear();
                let schema = &self.engine.events()[id as usize];
                for (fname, fty) in &schema.fields {
                    let val = raw.fields.iter().find(|(k, _)| k == fname).map(|(_, v)| v);
                    let val = val.ok_or_else(|| format!("event `{name}` is missing field `{fname}` ({fty})"))?;
                    self.fields.push(to_value(val, fty).map_err(|m| format!("field `{fname}`: {m}"))?);
                }
                self.summary.events += 1;
                let fields = std::mem::take(&mut self.fields);
                let r = self.engine.dispatch(&mut self.world, id, t, &fields);
                self.fields = fields;
                r
            }
        };
        if let Err(e) = result {
            self.stopped = Some(e);
        }
        Ok(())
    }

    /// Hands recorded actions and errors to `sink`, in the order they happened.
    pub fn drain(&mut self, sink: &mut impl FnMut(ReplayItem)) {
        let errors = self.engine.take_errors();
        if self.world.actions.is_empty() && errors.is_empty() {
            return;
        }
        let mut items: Vec<(i64, usize, ReplayItem)> = Vec::new();
        for (i, a) in self.world.actions.drain(..).enumerate() {
            items.push((a.time, i, ReplayItem::Action(a)));
        }
        let n = items.len();
        for (i, e) in errors.into_iter().enumerate() {
            items.push((e.time, n + i, ReplayItem::Error(e)));
        }
        // Stable by time; within one instant, actions before the errors that followed them.
        items.sort_by_key(|(t, i, _)| (*t, *i));
        for (_, _, item) in items {
            match &item {
                ReplayItem::Action(_) => self.summary.actions += 1,
                ReplayItem::Error(_) => self.summary.errors += 1,
            }
            sink(item);
        }
    }

    pub fn summary(&self) -> ReplaySummary {
        ReplaySummary {
            end_time: self.engine.now(),
            disabled_rules: self.engine.disabled_rules().into_iter().map(String::from).collect(),
            ..self.summary.clone()
        }
    }
}

/// A field value as read from JSON; scalars without allocation where possible.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Other(serde_json::Value),
}

/// One decoded line: its time, event name and other fields.
#[derive(Debug, Default)]
pub struct RawEvent<'a> {
    pub time: Option<i64>,
    pub event: Option<Cow<'a, str>>,
    pub fields: Vec<(Cow<'a, str>, Json<'a>)>,
}

/// Decodes one JSON line into a [`RawEvent`].
pub fn decode_line(line: &str) -> Result<RawEvent<'_>, String> {
    let mut de = serde_json::Deserializer::from_str(line);
    let raw = de.deserialize_map(LineVisitor).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    let mut out = RawEvent { time: None, event: None, fields: Vec::with_capacity(raw.len()) };
    for (k, v) in raw {
        match k.as_ref() {
            "event" => match v {
                Json::Str(s) => out.event = Some(s),
                _ => return Err("`event` must be a string".into()),
            },
            "t" => out.time = Some(json_duration(&v).map_err(|m| format!("`t`: {m}"))?),
            "t_ms" => match v {
                Json::Int(ms) if ms >= 0 => out.time = Some(ms.checked_mul(units::MS).ok_or("`t_ms` is too large")?),
                _ => return Err("`t_ms` must be a non-negative integer".into()),
            },
            _ => out.fields.push((k, v)),
        }
    }
    Ok(out)
}

fn json_duration(v: &Json) -> Result<i64, String> {
    match v {
        Json::Str(s) => match units::parse_quantity(s) {
            Some((UnitKind::Duration, ns)) => Ok(ns),
            _ => Err(format!("expected a duration like \"5s\", got \"{s}\"")),
        },
        Json::Int(n) => n.checked_mul(units::SEC).ok_or_else(|| "duration too large".into()),
        Json::Float(f) if f.is_finite() && f.abs() < 9.2e9 => Ok((f * 1e9).round() as i64),
        _ => Err("expected a duration (a string like \"5s\" or a number of seconds)".into()),
    }
}

/// Converts a JSON field to a value of the declared type.
pub fn to_value(v: &Json, ty: &Type) -> Result<Value, String> {
    match (v, ty) {
        (Json::Other(j), _) => json_to_value(j, ty),
        (Json::Int(n), Type::Int) => Ok(Value::Int(*n)),
        (Json::Int(n), Type::Float) => Ok(Value::Float(*n as f64)),
        (Json::Float(f), Type::Float) => Ok(Value::Float(*f)),
        (Json::Bool(b), Type::Bool) => Ok(Value::Bool(*b)),
        (Json::Str(s), Type::Str) => Ok(Value::str(s)),
        (_, Type::Duration) => json_duration(v).map(Value::Int),
        (Json::Int(n), Type::Size) if *n >= 0 => Ok(Value::Int(*n)),
        (Json::Str(s), Type::Size) => match units::parse_quantity(s) {
            Some((UnitKind::Size, b)) => Ok(Value::Int(b)),
            _ => Err(format!("expected a size like \"64MiB\", got \"{s}\"")),
        },
        _ => Err(format!("expected `{ty}`, got {}", describe(v))),
    }
}

fn describe(v: &Json) -> String {
    match v {
        Json::Null => "null".into(),
        Json::Bool(b) => b.to_string(),
        Json::Int(n) => n.to_string(),
        Json::Float(f) => f.to_string(),
        Json::Str(s) => format!("\"{s}\""),
        Json::Other(j) => j.to_string(),
    }
}

fn json_to_value(j: &serde_json::Value, ty: &Type) -> Result<Value, String> {
    use serde_json::Value as J;
    match (j, ty) {
        (J::Array(items), Type::List(e)) => {
            Ok(Value::List(Arc::new(items.iter().map(|x| json_to_value(x, e)).collect::<Result<_, _>>()?)))
        }
        (J::Object(map), Type::Record(fields)) => {
            let vals = fields
                .iter()
                .map(|(n, t)| map.get(n).ok_or_else(|| format!("missing field `{n}`")).and_then(|x| json_to_value(x, t)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Value::Record(Arc::new(vals)))
        }
        (J::Array(_) | J::Object(_), _) => Err(format!("expected `{ty}`, got {j}")),
        _ => to_value(&scalar(j), ty),
    }
}

fn scalar(j: &serde_json::Value) -> Json<'_> {
    use serde_json::Value as J;
    match j {
        J::Null => Json::Null,
        J::Bool(b) => Json::Bool(*b),
        J::Number(n) => n.as_i64().map(Json::Int).unwrap_or_else(|| Json::Float(n.as_f64().unwrap_or(f64::NAN))),
        J::String(s) => Json::Str(Cow::Borrowed(s)),
        other => Json::Other(other.clone()),
    }
}

/// Reads a JSON object as (key, value) pairs, borrowing strings from the line when it can.
struct LineVisitor;

impl<'de> Visitor<'de> for LineVisitor {
    type Value = Vec<(Cow<'de, str>, Json<'de>)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(k) = map.next_key_seed(CowStr)? {
            let v = map.next_value_seed(JsonSeed)?;
            out.push((k, v));
        }
        Ok(out)
    }
}

struct CowStr;

impl<'de> DeserializeSeed<'de> for CowStr {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for CowStr {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
}

struct JsonSeed;

impl<'de> DeserializeSeed<'de> for JsonSeed {
    type Value = Json<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonSeed {
    type Value = Json<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Json::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map(Json::Int).unwrap_or(Json::Float(v as f64)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Json::Float(v))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Json::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Json::Str(Cow::Owned(v.to_string())))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(x) = seq.next_element::<serde_json::Value>()? {
            items.push(x);
        }
        Ok(Json::Other(serde_json::Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
            out.insert(k, v);
        }
        Ok(Json::Other(serde_json::Value::Object(out)))
    }
}

/// The signatures of the default host, for checking without building closures.
pub fn default_signatures() -> Vec<Signature> {
    default_host().signatures().to_vec()
}
