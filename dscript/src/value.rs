//! Run-time values. Types are static, so `int`, `duration` and `size` all travel as `Int`.

use crate::types::Type;
use crate::units::{format_duration, format_size};
use std::sync::Arc;

/// `repr(u64)` puts every payload at an aligned offset, so copies are two aligned words
/// (odd-offset partial copies stalled store forwarding on the hot path).
#[derive(Debug, Clone)]
#[repr(u64)]
pub enum Value {
    Unit,
    Bool(bool),
    /// An `int`, a `duration` (nanoseconds) or a `size` (bytes).
    Int(i64),
    Float(f64),
    /// `Arc<String>` rather than `Arc<str>` keeps `Value` at 16 bytes.
    Str(Arc<String>),
    List(Arc<Vec<Value>>),
    /// Field values in the order of the record type's sorted field names.
    Record(Arc<Vec<Value>>),
    /// A handle to a window kept by the engine.
    Window(u32),
}

impl Value {
    pub fn str(s: &str) -> Value {
        Value::Str(Arc::new(s.to_string()))
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(n) => Some(*n as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The zero value of a type: what a query answers before it has any data.
    pub fn zero(ty: &Type) -> Value {
        match ty {
            Type::Int | Type::Duration | Type::Size => Value::Int(0),
            Type::Float => Value::Float(0.0),
            Type::Str => Value::str(""),
            Type::Bool => Value::Bool(false),
            Type::List(_) => Value::List(Arc::new(Vec::new())),
            Type::Record(fields) => Value::Record(Arc::new(fields.iter().map(|(_, t)| Value::zero(t)).collect())),
            Type::Unit | Type::Window(_) | Type::Error => Value::Unit,
        }
    }

    /// Structural equality, as `==` sees it.
    pub fn equals(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Unit, Value::Unit) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Float(a), Value::Float(b)) => a == b,
            (Value::Int(a), Value::Float(b)) | (Value::Float(b), Value::Int(a)) => (*a as f64) == *b,
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::List(a), Value::List(b)) => a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| x.equals(y)),
            (Value::Record(a), Value::Record(b)) => a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| x.equals(y)),
            (Value::Window(a), Value::Window(b)) => a == b,
            _ => false,
        }
    }

    /// Text for `str()` and action output; `ty` says how to show an `Int`.
    pub fn display(&self, ty: &Type) -> String {
        match (self, ty) {
            (Value::Int(n), Type::Duration) => format_duration(*n),
            (Value::Int(n), Type::Size) => format_size(*n),
            (Value::Int(n), _) => n.to_string(),
            (Value::Float(f), _) => format_float(*f),
            (Value::Bool(b), _) => b.to_string(),
            (Value::Str(s), _) => s.to_string(),
            (Value::Unit, _) => "()".into(),
            (Value::Window(_), _) => "<window>".into(),
            (Value::List(items), t) => {
                let elem = t.elem().cloned().unwrap_or(Type::Error);
                let parts: Vec<String> = items.iter().map(|v| v.quoted(&elem)).collect();
                format!("[{}]", parts.join(", "))
            }
            (Value::Record(vals), Type::Record(fields)) => {
                let parts: Vec<String> =
                    fields.iter().zip(vals.iter()).map(|((n, t), v)| format!("{n}: {}", v.quoted(t))).collect();
                format!("{{{}}}", parts.join(", "))
            }
            (Value::Record(_), _) => "{...}".into(),
        }
    }

    /// Like `display`, but strings in quotes: how arguments are shown in action output.
    pub fn quoted(&self, ty: &Type) -> String {
        match self {
            Value::Str(s) => format!("{s:?}"),
            _ => self.display(ty),
        }
    }

    /// JSON form for `--json` output: numbers stay numbers, durations and sizes become text.
    pub fn to_json(&self, ty: &Type) -> serde_json::Value {
        use serde_json::Value as J;
        match (self, ty) {
            (Value::Int(_), Type::Duration | Type::Size) => J::String(self.display(ty)),
            (Value::Int(n), _) => J::from(*n),
            (Value::Float(f), _) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
            (Value::Bool(b), _) => J::Bool(*b),
            (Value::Str(s), _) => J::String(s.to_string()),
            (Value::List(items), t) => {
                let elem = t.elem().cloned().unwrap_or(Type::Error);
                J::Array(items.iter().map(|v| v.to_json(&elem)).collect())
            }
            (Value::Record(vals), Type::Record(fields)) => {
                J::Object(fields.iter().zip(vals.iter()).map(|((n, t), v)| (n.clone(), v.to_json(t))).collect())
            }
            _ => J::Null,
        }
    }
}

/// Floats always show a decimal point so they read as floats: `2.0`, `0.25`.
pub fn format_float(f: f64) -> String {
    if f.is_finite() && f == f.trunc() && f.abs() < 1e15 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}
