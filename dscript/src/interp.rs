//! The interpreter: walks the resolved program with slot-indexed locals on one value stack.
//!
//! Deterministic by construction: no clocks, randomness or I/O except through host calls.
//! Every statement, loop turn and call costs a step; statistics cost one step per value.

use crate::builtins::{self, sample_value, Budget};
use crate::runtime::{value_fits, Limits, State};
use crate::host::{Host, HostCall};
use crate::ir::*;
use crate::span::Span;
use crate::types::Type;
use crate::value::Value;
use std::cmp::Ordering;
use std::sync::Arc;

/// A run-time error at a place in the source.
#[derive(Debug)]
pub struct RtErr {
    pub span: Span,
    pub message: String,
}

/// Boxed so a `Result<Value, _>` stays small on the hot path.
type R<T> = Result<T, Box<RtErr>>;

enum Flow {
    Next,
    Return(Value),
}

fn err<T>(span: Span, message: impl Into<String>) -> R<T> {
    Err(Box::new(RtErr { span, message: message.into() }))
}

/// One run of policy code: borrowed program, host and state, plus what the run sees.
pub(crate) struct Machine<'a, C> {
    pub prog: &'a Compiled,
    pub host: &'a Host<C>,
    pub st: &'a mut State,
    pub ctx: &'a mut C,
    /// The current event's fields (empty for `every` rules).
    pub fields: &'a [Value],
    pub now: i64,
    /// The running rule's name, passed to host functions.
    pub rule: &'a str,
    pub limits: Limits,
    /// The statement being run, blamed when the step budget runs out.
    pub current: Span,
}

impl<C> Machine<'_, C> {
    /// Runs a rule: its condition, then its body, with a fresh step budget.
    pub fn run_rule(&mut self, rule: &RuleCode) -> R<()> {
        self.st.steps = 0;
        self.st.depth = 0;
        let base = self.st.stack.len();
        if rule.n_slots == 0 {
            return self.rule_inner(rule, base);
        }
        self.st.stack.resize(base + rule.n_slots as usize, Value::Unit);
        let result = self.rule_inner(rule, base);
        self.st.stack.truncate(base);
        result
    }

    fn rule_inner(&mut self, rule: &RuleCode, base: usize) -> R<()> {
        if let Some(cond) = &rule.condition {
            self.current = rule.span;
            if !self.eval_bool(cond, base)? {
                return Ok(());
            }
        }
        self.block(&rule.body, base)?;
        Ok(())
    }

    /// Runs a body with `slots` locals (used for global initialisers).
    pub fn run_body(&mut self, body: &[St], slots: u32) -> R<()> {
        self.st.steps = 0;
        let base = self.st.stack.len();
        self.st.stack.resize(base + slots as usize, Value::Unit);
        let r = self.block(body, base);
        self.st.stack.truncate(base);
        r.map(|_| ())
    }

    fn step(&mut self, n: u64) -> R<()> {
        self.st.steps += n;
        if self.st.steps > self.limits.max_steps {
            return err(self.current, format!("step budget of {} exhausted", self.limits.max_steps));
        }
        Ok(())
    }

    fn block(&mut self, stmts: &[St], base: usize) -> R<Flow> {
        for s in stmts {
            self.current = s.span;
            self.step(1)?;
            match &s.kind {
                StKind::SetLocal(slot, e) => {
                    let v = self.eval(e, base)?;
                    self.set_local(base, *slot, v, s.span)?;
                }
                StKind::SetGlobal(g, e) => {
                    let v = self.eval(e, base)?;
                    match self.st.globals.get_mut(*g as usize) {
                        Some(x) => *x = v,
                        None => return err(s.span, "internal: no such global"),
                    }
                }
                StKind::If(c, t, e) => {
                    let flow = if self.eval_bool(c, base)? { self.block(t, base)? } else { self.block(e, base)? };
                    if let Flow::Return(v) = flow {
                        return Ok(Flow::Return(v));
                    }
                }
                StKind::ForList(slot, e, body) => {
                    let Value::List(items) = self.eval(e, base)? else { return err(s.span, "internal: loop over a non-list") };
                    for item in items.iter() {
                        self.step(1)?;
                        self.set_local(base, *slot, item.clone(), s.span)?;
                        if let Flow::Return(v) = self.block(body, base)? {
                            return Ok(Flow::Return(v));
                        }
                    }
                }
                StKind::ForWindow(slot, e, elem, body) => {
                    let Value::Window(w) = self.eval(e, base)? else { return err(s.span, "internal: loop over a non-window") };
                    let samples: Vec<f64> = match self.st.windows.get_mut(w as usize) {
                        Some(win) => {
                            win.make_contiguous();
                            win.values().to_vec()
                        }
                        None => return err(s.span, "internal: no such window"),
                    };
                    for x in samples {
                        self.step(1)?;
                        self.set_local(base, *slot, sample_value(x, elem), s.span)?;
                        if let Flow::Return(v) = self.block(body, base)? {
                            return Ok(Flow::Return(v));
                        }
                    }
                }
                StKind::Return(e) => {
                    let v = match e {
                        Some(e) => self.eval(e, base)?,
                        None => Value::Unit,
                    };
                    return Ok(Flow::Return(v));
                }
                StKind::Expr(e) => {
                    self.eval(e, base)?;
                }
            }
        }
        Ok(Flow::Next)
    }

    fn set_local(&mut self, base: usize, slot: u32, v: Value, span: Span) -> R<()> {
        match self.st.stack.get_mut(base + slot as usize) {
            Some(x) => {
                *x = v;
                Ok(())
            }
            None => err(span, "internal: no such local"),
        }
    }

    fn eval_bool(&mut self, e: &Ex, base: usize) -> R<bool> {
        match self.eval(e, base)? {
            Value::Bool(b) => Ok(b),
            _ => err(self.current, "internal: condition is not a bool"),
        }
    }

    fn eval(&mut self, e: &Ex, base: usize) -> R<Value> {
        match e {
            Ex::Const(v) => Ok(v.clone()),
            Ex::Local(s) => match self.st.stack.get(base + *s as usize) {
                Some(v) => Ok(v.clone()),
                None => err(self.current, "internal: no such local"),
            },
            Ex::Global(g) => match self.st.globals.get(*g as usize) {
                Some(v) => Ok(v.clone()),
                None => err(self.current, "internal: no such global"),
            },
            Ex::EventField(i) => match self.fields.get(*i as usize) {
                Some(v) => Ok(v.clone()),
                None => err(self.current, "internal: no such event field"),
            },
            Ex::Not(x) => Ok(Value::Bool(!self.eval_bool(x, base)?)),
            Ex::And(a, b) => Ok(Value::Bool(self.eval_bool(a, base)? && self.eval_bool(b, base)?)),
            Ex::Or(a, b) => Ok(Value::Bool(self.eval_bool(a, base)? || self.eval_bool(b, base)?)),
            Ex::Bin(op, a, b, span) => {
                let x = self.eval(a, base)?;
                let y = self.eval(b, base)?;
                // The common integer cases inline; everything else in `binop`.
                if let (Value::Int(p), Value::Int(q)) = (&x, &y) {
                    match op {
                        Op::CmpI(c) => return Ok(Value::Bool(cmp(*c, p.cmp(q)))),
                        Op::AddI => {
                            if let Some(r) = p.checked_add(*q) {
                                return Ok(Value::Int(r));
                            }
                        }
                        Op::Eq => return Ok(Value::Bool(p == q)),
                        _ => {}
                    }
                }
                self.binop(*op, x, y).map_err(|message| Box::new(RtErr { span: *span, message }))
            }
            Ex::Call(f, args, span) => self.call(*f, args, base, *span),
            Ex::Host(h, args, span) => self.host_call(*h, args, base, *span),
            Ex::Builtin(b, args, span) => self.builtin(b, args, base, *span),
            _ => self.eval_rest(e, base),
        }
    }

    /// The less frequent expressions, kept out of `eval` so its frame stays small.
    #[inline(never)]
    fn eval_rest(&mut self, e: &Ex, base: usize) -> R<Value> {
        match e {
            Ex::NegI(x, span) => match self.eval(x, base)? {
                Value::Int(n) => n.checked_neg().map(Value::Int).ok_or_else(|| Box::new(RtErr { span: *span, message: "integer overflow".into() })),
                _ => err(*span, "internal: negating a non-integer"),
            },
            Ex::NegF(x) => Ok(Value::Float(-self.eval_f64(x, base)?)),
            Ex::ToFloat(x) => Ok(Value::Float(self.eval_f64(x, base)?)),
            Ex::List(items, span) => {
                self.step(items.len() as u64)?;
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    out.push(self.eval(item, base)?);
                }
                if out.len() > self.limits.max_list {
                    return err(*span, format!("list longer than the limit of {}", self.limits.max_list));
                }
                Ok(Value::List(Arc::new(out)))
            }
            Ex::Record(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    out.push(self.eval(item, base)?);
                }
                Ok(Value::Record(Arc::new(out)))
            }
            Ex::Field(r, i) => match self.eval(r, base)? {
                Value::Record(vals) => vals.get(*i as usize).cloned().ok_or_else(|| Box::new(RtErr { span: self.current, message: "internal: no such field".into() })),
                _ => err(self.current, "internal: field of a non-record"),
            },
            Ex::Index(l, i, span) => {
                let list = self.eval(l, base)?;
                let i = self.eval_int(i, base)?;
                let Value::List(items) = list else { return err(*span, "internal: index into a non-list") };
                match resolve_index(i, items.len()) {
                    Some(k) => Ok(items[k].clone()),
                    None => err(*span, format!("index {i} is out of range for a list of {} elements", items.len())),
                }
            }
            Ex::WindowIndex(w, i, elem, span) => {
                let Value::Window(w) = self.eval(w, base)? else { return err(*span, "internal: index into a non-window") };
                let i = self.eval_int(i, base)?;
                let Some(win) = self.st.windows.get(w as usize) else { return err(*span, "internal: no such window") };
                match resolve_index(i, win.len()).and_then(|k| win.get(k)) {
                    Some(x) => Ok(sample_value(x, elem)),
                    None => err(*span, format!("index {i} is out of range for a window of {} samples", win.len())),
                }
            }
            _ => err(self.current, "internal: unexpected expression"),
        }
    }

    #[inline(never)]
    fn builtin(&mut self, b: &builtins::Builtin, args: &[Ex], base: usize, span: Span) -> R<Value> {
        use builtins::Builtin as B;
        // Sampling into a window and asking its length happen on every event; skip the
        // argument stack for them.
        match (b, args) {
            (B::Len, [Ex::Const(Value::Window(w))]) => {
                if let Some(win) = self.st.windows.get(*w as usize) {
                    return Ok(Value::Int(win.len() as i64));
                }
            }
            (B::Push(_), [Ex::Const(Value::Window(w)), x]) => {
                let v = self.eval_f64(x, base)?;
                if let Some(win) = self.st.windows.get_mut(*w as usize) {
                    win.push(self.now, v);
                    return Ok(Value::Unit);
                }
            }
            (B::Now, []) => return Ok(Value::Int(self.now)),
            _ => {}
        }
        let start = self.push_args(args, base)?;
        let st = &mut *self.st;
        let budget = Budget { steps: &mut st.steps, max_list: self.limits.max_list };
        let r = builtins::call(b, &st.stack[start..], &mut st.windows, self.now, budget);
        st.stack.truncate(start);
        let v = r.map_err(|message| Box::new(RtErr { span, message }))?;
        self.step(0)?;
        Ok(v)
    }

    fn eval_f64(&mut self, e: &Ex, base: usize) -> R<f64> {
        self.eval(e, base)?.as_f64().ok_or_else(|| Box::new(RtErr { span: self.current, message: "internal: expected a number".into() }))
    }

    fn eval_int(&mut self, e: &Ex, base: usize) -> R<i64> {
        self.eval(e, base)?.as_int().ok_or_else(|| Box::new(RtErr { span: self.current, message: "internal: expected an integer".into() }))
    }

    /// Evaluates arguments onto the stack; returns where they start.
    fn push_args(&mut self, args: &[Ex], base: usize) -> R<usize> {
        let start = self.st.stack.len();
        if args.is_empty() {
            return Ok(start);
        }
        for a in args {
            let v = match self.eval(a, base) {
                Ok(v) => v,
                Err(e) => {
                    self.st.stack.truncate(start);
                    return Err(e);
                }
            };
            self.st.stack.push(v);
        }
        Ok(start)
    }

    #[inline(never)]
    fn call(&mut self, f: u32, args: &[Ex], base: usize, span: Span) -> R<Value> {
        let prog = self.prog;
        let Some(func) = prog.functions.get(f as usize) else { return err(span, "internal: no such function") };
        self.step(1)?;
        if self.st.depth >= self.limits.max_depth {
            return err(span, format!("recursion limit of {} calls reached in `{}`", self.limits.max_depth, func.name));
        }
        let frame = self.push_args(args, base)?;
        self.st.stack.resize(frame + func.n_slots as usize, Value::Unit);
        self.st.depth += 1;
        let saved = self.current;
        let r = self.block(&func.body, frame);
        self.current = saved;
        self.st.depth -= 1;
        self.st.stack.truncate(frame);
        match r? {
            Flow::Return(v) => Ok(v),
            Flow::Next => Ok(Value::Unit),
        }
    }

    #[inline(never)]
    fn host_call(&mut self, h: u32, args: &[Ex], base: usize, span: Span) -> R<Value> {
        let host = self.host;
        let Some(hf) = host.function(h as usize) else { return err(span, "internal: no such host function") };
        self.step(1)?;
        let start = self.push_args(args, base)?;
        let call = HostCall { name: &hf.sig.name, args: &self.st.stack[start..], params: &hf.sig.params, now: self.now, rule: self.rule, span };
        let r = (hf.f)(self.ctx, &call);
        self.st.stack.truncate(start);
        let v = r.map_err(|e| Box::new(RtErr { span, message: format!("`{}` failed: {}", hf.sig.name, e.0) }))?;
        // A buggy embedder must not break the checker's promises: check the shape it returned.
        let fits = match (&v, &hf.sig.ret) {
            (Value::Int(_), Type::Int | Type::Duration | Type::Size) | (Value::Float(_), Type::Float) | (Value::Unit, Type::Unit) => true,
            (Value::Bool(_), Type::Bool) | (Value::Str(_), Type::Str) => true,
            (v, t) => value_fits(v, t),
        };
        if !fits {
            return err(span, format!("host function `{}` returned a value that is not `{}`", hf.sig.name, hf.sig.ret));
        }
        Ok(v)
    }

    #[inline(never)]
    fn binop(&mut self, op: Op, a: Value, b: Value) -> Result<Value, String> {
        use Value::{Float as F, Int as I};
        let overflow = || "integer overflow".to_string();
        let zero = || "division by zero".to_string();
        Ok(match (op, &a, &b) {
            (Op::AddI, I(x), I(y)) => I(x.checked_add(*y).ok_or_else(overflow)?),
            (Op::SubI, I(x), I(y)) => I(x.checked_sub(*y).ok_or_else(overflow)?),
            (Op::MulI, I(x), I(y)) => I(x.checked_mul(*y).ok_or_else(overflow)?),
            (Op::DivI, I(_), I(0)) | (Op::RemI, I(_), I(0)) | (Op::RatioQ, I(_), I(0)) => return Err(zero()),
            (Op::DivI, I(x), I(y)) => I(x.checked_div(*y).ok_or_else(overflow)?),
            (Op::RemI, I(x), I(y)) => I(x.checked_rem(*y).ok_or_else(overflow)?),
            (Op::RatioQ, I(x), I(y)) => F(*x as f64 / *y as f64),
            (Op::AddF, F(x), F(y)) => F(x + y),
            (Op::SubF, F(x), F(y)) => F(x - y),
            (Op::MulF, F(x), F(y)) => F(x * y),
            (Op::DivF | Op::RemF, F(_), F(y)) if *y == 0.0 => return Err(zero()),
            (Op::DivF, F(x), F(y)) => F(x / y),
            (Op::RemF, F(x), F(y)) => F(x % y),
            (Op::MulQF, I(q), F(f)) | (Op::MulQF, F(f), I(q)) => I(round_int(*q as f64 * f)?),
            (Op::DivQF, I(_), F(f)) if *f == 0.0 => return Err(zero()),
            (Op::DivQF, I(q), F(f)) => I(round_int(*q as f64 / f)?),
            (Op::CmpI(c), I(x), I(y)) => Value::Bool(cmp(c, x.cmp(y))),
            (Op::CmpF(c), F(x), F(y)) => Value::Bool(x.partial_cmp(y).is_some_and(|o| cmp(c, o))),
            (Op::CmpS(c), Value::Str(x), Value::Str(y)) => Value::Bool(cmp(c, x.cmp(y))),
            (Op::Eq, _, _) => Value::Bool(a.equals(&b)),
            (Op::Ne, _, _) => Value::Bool(!a.equals(&b)),
            (Op::ConcatS, Value::Str(x), Value::Str(y)) => {
                if x.len() + y.len() > self.limits.max_string {
                    return Err(format!("string longer than the limit of {} bytes", self.limits.max_string));
                }
                let mut s = String::with_capacity(x.len() + y.len());
                s.push_str(x);
                s.push_str(y);
                Value::Str(Arc::new(s))
            }
            (Op::ConcatL, Value::List(x), Value::List(y)) => {
                let n = x.len() + y.len();
                if n > self.limits.max_list {
                    return Err(format!("list longer than the limit of {}", self.limits.max_list));
                }
                self.charge(n as u64)?;
                let mut v = Vec::with_capacity(n);
                v.extend(x.iter().cloned());
                v.extend(y.iter().cloned());
                Value::List(Arc::new(v))
            }
            (Op::InList, x, Value::List(items)) => {
                self.charge(items.len() as u64)?;
                Value::Bool(items.iter().any(|i| i.equals(x)))
            }
            (Op::InStr, Value::Str(x), Value::Str(y)) => Value::Bool(y.contains(&**x)),
            _ => return Err(format!("internal: operator {op:?} on mismatched values")),
        })
    }

    /// Charges steps from inside an operator (which reports its own span).
    fn charge(&mut self, n: u64) -> Result<(), String> {
        self.st.steps += n;
        if self.st.steps > self.limits.max_steps {
            return Err(format!("step budget of {} exhausted", self.limits.max_steps));
        }
        Ok(())
    }
}

fn cmp(c: Cmp, o: Ordering) -> bool {
    match c {
        Cmp::Lt => o == Ordering::Less,
        Cmp::Le => o != Ordering::Greater,
        Cmp::Gt => o == Ordering::Greater,
        Cmp::Ge => o != Ordering::Less,
    }
}

fn round_int(f: f64) -> Result<i64, String> {
    let r = f.round();
    if r.is_finite() && r >= i64::MIN as f64 && r <= i64::MAX as f64 {
        Ok(r as i64)
    } else {
        Err("result does not fit in an integer".into())
    }
}

/// `i` as an index into `len` elements; negative counts from the end.
fn resolve_index(i: i64, len: usize) -> Option<usize> {
    let k = if i < 0 { (len as i64).checked_add(i)? } else { i };
    if k >= 0 && (k as usize) < len {
        Some(k as usize)
    } else {
        None
    }
}
