//! Built-in functions: their type rules (for the checker) and their implementations.

use crate::stats;
use crate::types::Type;
use crate::value::Value;
use crate::window::Window;
use std::borrow::Cow;
use std::sync::Arc;

/// Whether a number result is held as an `Int` (durations, sizes, ints) or a `Float`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr {
    Int,
    Float,
}

impl Repr {
    fn of(t: &Type) -> Repr {
        if t.is_int_repr() {
            Repr::Int
        } else {
            Repr::Float
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Sum,
    Mean,
    Median,
    Stddev,
    Min,
    Max,
    Last,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Builtin {
    Len,
    Str(Type),
    ToInt,
    ToFloat,
    Bytes,
    Seconds,
    Millis,
    Abs(Repr),
    Round,
    Min2(Repr),
    Max2(Repr),
    Agg(Agg, Repr),
    Percentile(Repr),
    Ewma(Repr),
    Slope(Repr),
    Rate(Repr),
    Shewhart(Repr),
    EwmaLimits(Repr),
    Pearson,
    Spearman,
    Push(Repr),
    Clear,
    Now,
    Range,
}

/// Every built-in name with a one-line signature, for docs and "did you mean" hints.
pub const SIGNATURES: &[(&str, &str)] = &[
    ("len", "len(xs: list|window|string) -> int"),
    ("str", "str(x) -> string"),
    ("int", "int(x: int|float) -> int  (truncates)"),
    ("float", "float(x: int|float) -> float"),
    ("bytes", "bytes(s: size) -> int"),
    ("seconds", "seconds(d: duration) -> float"),
    ("millis", "millis(d: duration) -> int"),
    ("abs", "abs(x: T) -> T"),
    ("round", "round(x: float, digits: int = 0) -> float"),
    ("min", "min(a: T, b: T) -> T  |  min(xs) -> T"),
    ("max", "max(a: T, b: T) -> T  |  max(xs) -> T"),
    ("sum", "sum(xs) -> T"),
    ("mean", "mean(xs) -> U"),
    ("median", "median(xs) -> U"),
    ("stddev", "stddev(xs) -> U"),
    ("percentile", "percentile(xs, p: float) -> U"),
    ("ewma", "ewma(xs, weight: float) -> U"),
    ("slope", "slope(xs) -> U  (change per sample)"),
    ("rate", "rate(w: window<T>, per: duration) -> U  (change per `per`)"),
    ("shewhart", "shewhart(xs, k: float = 3.0) -> {center: U, lower: U, upper: U}"),
    ("ewma_limits", "ewma_limits(xs, weight: float, k: float = 3.0) -> {center: U, lower: U, upper: U}"),
    ("pearson", "pearson(xs, ys) -> float"),
    ("spearman", "spearman(xs, ys) -> float"),
    ("last", "last(xs) -> T"),
    ("push", "push(w: window<T>, x: T)"),
    ("clear", "clear(w: window<T>)"),
    ("now", "now() -> duration"),
    ("range", "range(n: int) | range(from: int, to: int) -> list<int>"),
];

pub fn is_builtin(name: &str) -> bool {
    SIGNATURES.iter().any(|(n, _)| *n == name)
}

pub fn signature(name: &str) -> Option<&'static str> {
    SIGNATURES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The result of checking a call to a built-in.
pub struct Checked {
    pub builtin: Builtin,
    pub ret: Type,
    /// Values appended for omitted optional arguments.
    pub defaults: Vec<Value>,
}

/// The unit a statistic keeps: means of sizes are sizes, means of ints are floats.
fn stat_unit(t: &Type) -> Type {
    if *t == Type::Int {
        Type::Float
    } else {
        t.clone()
    }
}

fn limits_type(u: &Type) -> Type {
    Type::record(vec![("center".into(), u.clone()), ("lower".into(), u.clone()), ("upper".into(), u.clone())])
}

/// Type-checks a call to built-in `name`; `Err` holds the message for the call site.
pub fn check(name: &str, args: &[Type]) -> Result<Checked, String> {
    let sig = signature(name).unwrap_or("");
    let arity = |lo: usize, hi: usize| -> Result<(), String> {
        if args.len() < lo || args.len() > hi {
            let want = if lo == hi { format!("{lo}") } else { format!("{lo} to {hi}") };
            Err(format!("`{name}` takes {want} argument{}, got {}; usage: {sig}", if hi == 1 { "" } else { "s" }, args.len()))
        } else {
            Ok(())
        }
    };
    let bad = |i: usize, want: &str| -> String { format!("`{name}` expects {want} as argument {}, found `{}`", i + 1, args[i]) };
    // Element type of a numeric list or window argument.
    let series = |i: usize| -> Result<Type, String> {
        match args[i].elem() {
            Some(e) if e.is_numeric() => Ok(e.clone()),
            _ => Err(bad(i, "a list or window of numbers")),
        }
    };
    let number = |i: usize| -> Result<(), String> {
        if matches!(args[i], Type::Int | Type::Float) {
            Ok(())
        } else {
            Err(bad(i, "a number"))
        }
    };
    let ok = |builtin: Builtin, ret: Type| Ok(Checked { builtin, ret, defaults: Vec::new() });
    match name {
        "len" => {
            arity(1, 1)?;
            match &args[0] {
                Type::List(_) | Type::Window(_) | Type::Str => ok(Builtin::Len, Type::Int),
                _ => Err(bad(0, "a list, window or string")),
            }
        }
        "str" => {
            arity(1, 1)?;
            ok(Builtin::Str(args[0].clone()), Type::Str)
        }
        "int" | "float" => {
            arity(1, 1)?;
            number(0)?;
            if name == "int" {
                ok(Builtin::ToInt, Type::Int)
            } else {
                ok(Builtin::ToFloat, Type::Float)
            }
        }
        "bytes" | "seconds" | "millis" => {
            arity(1, 1)?;
            let (want, builtin, ret) = match name {
                "bytes" => (Type::Size, Builtin::Bytes, Type::Int),
                "seconds" => (Type::Duration, Builtin::Seconds, Type::Float),
                _ => (Type::Duration, Builtin::Millis, Type::Int),
            };
            if args[0] != want {
                return Err(bad(0, &format!("a {want}")));
            }
            ok(builtin, ret)
        }
        "abs" => {
            arity(1, 1)?;
            if !args[0].is_numeric() {
                return Err(bad(0, "a number, duration or size"));
            }
            ok(Builtin::Abs(Repr::of(&args[0])), args[0].clone())
        }
        "round" => {
            arity(1, 2)?;
            number(0)?;
            if args.len() == 2 && args[1] != Type::Int {
                return Err(bad(1, "an int (decimal places)"));
            }
            let defaults = if args.len() == 1 { vec![Value::Int(0)] } else { Vec::new() };
            Ok(Checked { builtin: Builtin::Round, ret: Type::Float, defaults })
        }
        "min" | "max" if args.len() == 2 => {
            let t = match (&args[0], &args[1]) {
                (Type::Int, Type::Float) | (Type::Float, Type::Int) => Type::Float,
                (a, b) if a == b && a.is_numeric() => a.clone(),
                _ => return Err(format!("`{name}` needs two numbers of the same kind, found `{}` and `{}`", args[0], args[1])),
            };
            let r = Repr::of(&t);
            ok(if name == "min" { Builtin::Min2(r) } else { Builtin::Max2(r) }, t)
        }
        "min" | "max" | "sum" | "last" | "mean" | "median" | "stddev" => {
            arity(1, 1)?;
            let e = series(0)?;
            let (agg, ret) = match name {
                "min" => (Agg::Min, e.clone()),
                "max" => (Agg::Max, e.clone()),
                "sum" => (Agg::Sum, e.clone()),
                "last" => (Agg::Last, e.clone()),
                "mean" => (Agg::Mean, stat_unit(&e)),
                "median" => (Agg::Median, stat_unit(&e)),
                _ => (Agg::Stddev, stat_unit(&e)),
            };
            ok(Builtin::Agg(agg, Repr::of(&ret)), ret)
        }
        "percentile" | "ewma" => {
            arity(2, 2)?;
            let u = stat_unit(&series(0)?);
            number(1)?;
            let b = if name == "ewma" { Builtin::Ewma(Repr::of(&u)) } else { Builtin::Percentile(Repr::of(&u)) };
            ok(b, u)
        }
        "slope" => {
            arity(1, 1)?;
            let u = stat_unit(&series(0)?);
            ok(Builtin::Slope(Repr::of(&u)), u)
        }
        "rate" => {
            arity(2, 2)?;
            let u = match &args[0] {
                Type::Window(e) if e.is_numeric() => stat_unit(e),
                _ => return Err(bad(0, "a window (rates need sample times)")),
            };
            if args[1] != Type::Duration {
                return Err(bad(1, "a duration such as `1h`"));
            }
            ok(Builtin::Rate(Repr::of(&u)), u)
        }
        "shewhart" | "ewma_limits" => {
            let (lo, hi) = if name == "shewhart" { (1, 2) } else { (2, 3) };
            arity(lo, hi)?;
            let u = stat_unit(&series(0)?);
            for i in 1..args.len() {
                number(i)?;
            }
            let mut defaults = Vec::new();
            if args.len() < hi {
                defaults.push(Value::Float(3.0));
            }
            let r = Repr::of(&u);
            let builtin = if name == "shewhart" { Builtin::Shewhart(r) } else { Builtin::EwmaLimits(r) };
            Ok(Checked { builtin, ret: limits_type(&u), defaults })
        }
        "pearson" | "spearman" => {
            arity(2, 2)?;
            series(0)?;
            series(1)?;
            ok(if name == "pearson" { Builtin::Pearson } else { Builtin::Spearman }, Type::Float)
        }
        "push" => {
            arity(2, 2)?;
            let Type::Window(e) = &args[0] else { return Err(bad(0, "a window")) };
            let fits = args[1].fits(e) || (**e == Type::Float && args[1] == Type::Int);
            if !fits {
                return Err(format!("cannot push `{}` into `{}`", args[1], args[0]));
            }
            ok(Builtin::Push(Repr::of(e)), Type::Unit)
        }
        "clear" => {
            arity(1, 1)?;
            if !matches!(args[0], Type::Window(_)) {
                return Err(bad(0, "a window"));
            }
            ok(Builtin::Clear, Type::Unit)
        }
        "now" => {
            arity(0, 0)?;
            ok(Builtin::Now, Type::Duration)
        }
        "range" => {
            arity(1, 2)?;
            if let Some(i) = args.iter().position(|t| *t != Type::Int) {
                return Err(bad(i, "an int"));
            }
            ok(Builtin::Range, Type::list(Type::Int))
        }
        _ => Err(format!("unknown function `{name}`")),
    }
}

/// Limits the implementations need from the engine.
pub struct Budget<'a> {
    pub steps: &'a mut u64,
    pub max_list: usize,
}

/// Runs a built-in on evaluated arguments.
pub fn call(b: &Builtin, args: &[Value], windows: &mut [Window], now: i64, budget: Budget) -> Result<Value, String> {
    let arg = |i: usize| args.get(i).ok_or_else(|| "internal: missing argument".to_string());
    let num = |i: usize| arg(i)?.as_f64().ok_or_else(|| "internal: expected a number".to_string());
    let int = |i: usize| arg(i)?.as_int().ok_or_else(|| "internal: expected an integer".to_string());
    // Statistics read window samples as slices; lay them out first.
    for a in args {
        if let Value::Window(w) = a {
            window_mut(windows, *w)?.make_contiguous();
        }
    }
    match b {
        Builtin::Len => match arg(0)? {
            Value::List(xs) => Ok(Value::Int(xs.len() as i64)),
            Value::Str(s) => Ok(Value::Int(s.chars().count() as i64)),
            Value::Window(w) => Ok(Value::Int(window(windows, *w)?.len() as i64)),
            _ => Err("internal: len of a non-collection".into()),
        },
        Builtin::Str(t) => Ok(Value::str(&arg(0)?.display(t))),
        Builtin::ToInt => match arg(0)? {
            Value::Int(n) => Ok(Value::Int(*n)),
            Value::Float(f) => to_int(f.trunc()),
            _ => Err("internal: int of a non-number".into()),
        },
        Builtin::ToFloat => Ok(Value::Float(num(0)?)),
        Builtin::Bytes => Ok(Value::Int(int(0)?)),
        Builtin::Seconds => Ok(Value::Float(int(0)? as f64 / 1e9)),
        Builtin::Millis => Ok(Value::Int(int(0)? / 1_000_000)),
        Builtin::Abs(Repr::Int) => int(0)?.checked_abs().map(Value::Int).ok_or_else(overflow),
        Builtin::Abs(Repr::Float) => Ok(Value::Float(num(0)?.abs())),
        Builtin::Round => {
            let digits = int(1)?.clamp(-15, 15) as i32;
            let scale = 10f64.powi(digits);
            Ok(Value::Float((num(0)? * scale).round() / scale))
        }
        Builtin::Min2(r) | Builtin::Max2(r) => {
            let is_min = matches!(b, Builtin::Min2(_));
            match r {
                Repr::Int => {
                    let (x, y) = (int(0)?, int(1)?);
                    Ok(Value::Int(if is_min { x.min(y) } else { x.max(y) }))
                }
                Repr::Float => {
                    let (x, y) = (num(0)?, num(1)?);
                    Ok(Value::Float(if is_min { x.min(y) } else { x.max(y) }))
                }
            }
        }
        Builtin::Agg(agg, r) => {
            let xs = numbers(arg(0)?, windows, budget.steps)?;
            let v = match agg {
                Agg::Sum => stats::sum(&xs),
                Agg::Mean => stats::mean(&xs)?,
                Agg::Median => stats::percentile(&xs, 50.0)?,
                Agg::Stddev => stats::stddev(&xs)?,
                Agg::Min => stats::min(&xs)?,
                Agg::Max => stats::max(&xs)?,
                Agg::Last => *xs.last().ok_or("last of an empty series")?,
            };
            // Sums and extremes of ints stay exact instead of passing through f64.
            if let (Agg::Sum | Agg::Min | Agg::Max | Agg::Last, Value::List(items)) = (agg, arg(0)?) {
                if *r == Repr::Int {
                    return exact_int_agg(*agg, items);
                }
            }
            repr(*r, v)
        }
        Builtin::Percentile(r) => repr(*r, stats::percentile(&numbers(arg(0)?, windows, budget.steps)?, num(1)?)?),
        Builtin::Ewma(r) => repr(*r, stats::ewma(&numbers(arg(0)?, windows, budget.steps)?, num(1)?)?),
        Builtin::Slope(r) => repr(*r, stats::slope(&numbers(arg(0)?, windows, budget.steps)?)?),
        Builtin::Rate(r) => {
            let Value::Window(w) = arg(0)? else { return Err("internal: rate of a non-window".into()) };
            let per = int(1)? as f64;
            let win = window(windows, *w)?;
            *budget.steps += win.len() as u64;
            let xs: Vec<f64> = win.times().iter().map(|&t| t as f64).collect();
            repr(*r, stats::regression_slope(&xs, win.values())? * per)
        }
        Builtin::Shewhart(r) | Builtin::EwmaLimits(r) => {
            let xs = numbers(arg(0)?, windows, budget.steps)?;
            let (c, lo, hi) = match b {
                Builtin::Shewhart(_) => stats::shewhart(&xs, num(1)?)?,
                _ => stats::ewma_limits(&xs, num(1)?, num(2)?)?,
            };
            // Field order follows the record type: center, lower, upper (sorted names).
            Ok(Value::Record(Arc::new(vec![repr(*r, c)?, repr(*r, lo)?, repr(*r, hi)?])))
        }
        Builtin::Pearson | Builtin::Spearman => {
            let xs = numbers(arg(0)?, windows, budget.steps)?;
            let ys = numbers(arg(1)?, windows, budget.steps)?;
            let v = if *b == Builtin::Pearson { stats::pearson(&xs, &ys)? } else { stats::spearman(&xs, &ys)? };
            Ok(Value::Float(v))
        }
        Builtin::Push(_) => {
            let Value::Window(w) = arg(0)? else { return Err("internal: push to a non-window".into()) };
            let x = num(1)?;
            window_mut(windows, *w)?.push(now, x);
            Ok(Value::Unit)
        }
        Builtin::Clear => {
            let Value::Window(w) = arg(0)? else { return Err("internal: clear of a non-window".into()) };
            window_mut(windows, *w)?.clear();
            Ok(Value::Unit)
        }
        Builtin::Now => Ok(Value::Int(now)),
        Builtin::Range => {
            let (from, to) = if args.len() == 1 { (0, int(0)?) } else { (int(0)?, int(1)?) };
            let n = to.saturating_sub(from).max(0) as u64;
            if n > budget.max_list as u64 {
                return Err(format!("range of {n} values exceeds the list limit of {}", budget.max_list));
            }
            *budget.steps += n;
            Ok(Value::List(Arc::new((from..to.max(from)).map(Value::Int).collect())))
        }
    }
}

fn overflow() -> String {
    "integer overflow".into()
}

fn to_int(f: f64) -> Result<Value, String> {
    if f.is_finite() && f >= i64::MIN as f64 && f <= i64::MAX as f64 {
        Ok(Value::Int(f as i64))
    } else {
        Err(format!("{f} does not fit in an integer"))
    }
}

fn repr(r: Repr, v: f64) -> Result<Value, String> {
    match r {
        Repr::Float => Ok(Value::Float(v)),
        Repr::Int => to_int(v.round()),
    }
}

fn exact_int_agg(agg: Agg, items: &[Value]) -> Result<Value, String> {
    let mut ints = items.iter().filter_map(Value::as_int);
    let v = match agg {
        Agg::Sum => ints.try_fold(0i64, |a, x| a.checked_add(x)).ok_or_else(overflow)?,
        Agg::Min => ints.min().ok_or("min of an empty list")?,
        Agg::Max => ints.max().ok_or("max of an empty list")?,
        _ => ints.next_back().ok_or("last of an empty list")?,
    };
    Ok(Value::Int(v))
}

fn window(windows: &[Window], w: u32) -> Result<&Window, String> {
    windows.get(w as usize).ok_or_else(|| "internal: no such window".into())
}

fn window_mut(windows: &mut [Window], w: u32) -> Result<&mut Window, String> {
    windows.get_mut(w as usize).ok_or_else(|| "internal: no such window".into())
}

/// The numbers of a list (copied) or window (borrowed), charging one step per value.
fn numbers<'w>(v: &Value, windows: &'w [Window], steps: &mut u64) -> Result<Cow<'w, [f64]>, String> {
    let out = match v {
        Value::List(items) => Cow::Owned(items.iter().filter_map(Value::as_f64).collect()),
        Value::Window(w) => Cow::Borrowed(window(windows, *w)?.values()),
        _ => return Err("internal: statistics of a non-series".into()),
    };
    *steps += out.len() as u64;
    Ok(out)
}

/// Converts a window sample back to its element's representation.
pub fn sample_value(x: f64, elem: &Type) -> Value {
    if elem.is_int_repr() {
        Value::Int(x.round() as i64)
    } else {
        Value::Float(x)
    }
}
