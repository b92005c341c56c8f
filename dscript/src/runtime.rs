//! What the engine and the interpreter share: the limits of one firing, the
//! mutable state of a running policy, and the check that a value has a type.
//! A leaf module, so that `engine` (which drives `interp`) and `interp` do not
//! depend on each other.

use crate::types::Type;
use crate::value::Value;
use crate::window::Window;

/// Bounds that keep any policy's cost per firing fixed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Steps per rule firing (statements, loop iterations, calls, values walked by statistics).
    pub max_steps: u64,
    /// Nested function calls.
    pub max_depth: u32,
    /// Elements in one list.
    pub max_list: usize,
    /// Bytes in one string.
    pub max_string: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_steps: 100_000, max_depth: 64, max_list: 100_000, max_string: 64 * 1024 }
    }
}

/// Mutable state of a running policy.
pub(crate) struct State {
    pub globals: Vec<Value>,
    pub windows: Vec<Window>,
    pub stack: Vec<Value>,
    pub steps: u64,
    pub depth: u32,
}

/// Whether a value has the run-time shape of a type (for values coming from the embedder).
pub fn value_fits(v: &Value, ty: &Type) -> bool {
    match (v, ty) {
        (Value::Int(_), Type::Int | Type::Duration | Type::Size) => true,
        (Value::Float(_), Type::Float) => true,
        (Value::Bool(_), Type::Bool) => true,
        (Value::Str(_), Type::Str) => true,
        (Value::List(items), Type::List(e)) => items.iter().all(|x| value_fits(x, e)),
        (Value::Record(vals), Type::Record(fields)) => {
            vals.len() == fields.len() && vals.iter().zip(fields).all(|(x, (_, t))| value_fits(x, t))
        }
        _ => false,
    }
}
