//! The checker: resolves names, checks types and lowers the syntax tree to [`ir`].
//!
//! It reports every error it can find (not just the first) and never runs policy code.

use crate::ast::{self, BinOp, Expr, ExprKind, Item, StmtKind, Trigger, TypeExpr, TypeExprKind, UnOp};
use crate::builtins;
use crate::diag::Diagnostic;
use crate::host::{EventSchema, Signature};
use crate::ir::*;
use crate::span::Span;
use crate::types::Type;
use crate::units::{self, UnitKind};
use crate::value::Value;
use crate::window::{Capacity, MAX_COUNT};
use std::collections::HashMap;

/// Shortest `every` period accepted, so a replay cannot be asked for billions of ticks per second.
pub const MIN_PERIOD: i64 = units::MS;

/// What the checker found: the runnable program when there were no errors, and all diagnostics.
pub struct CheckOutput {
    pub compiled: Option<Compiled>,
    pub diagnostics: Vec<Diagnostic>,
}

pub fn check(src: &str, prog: &ast::Program, sigs: &[Signature], host_events: &[EventSchema]) -> CheckOutput {
    let mut c = Checker {
        src,
        sigs,
        diags: Vec::new(),
        globals: Vec::new(),
        global_index: HashMap::new(),
        fns: HashMap::new(),
        fn_sigs: Vec::new(),
        events: host_events.to_vec(),
        windows: Vec::new(),
        scopes: Vec::new(),
        n_slots: 0,
        ctx: Ctx::Init,
        block_depth: 0,
    };
    let compiled = c.program(prog);
    let has_errors = c.diags.iter().any(Diagnostic::is_error);
    c.diags.sort_by_key(|d| (d.span.start, d.span.end));
    CheckOutput { compiled: if has_errors { None } else { Some(compiled) }, diagnostics: c.diags }
}

#[derive(Clone)]
enum Local {
    Slot(u32, Type),
    Window(u32, Type),
}

#[derive(Clone)]
enum Ctx {
    Init,
    Function(Type),
    Rule(Option<u32>),
}

struct FnSig {
    params: Vec<(String, Type)>,
    ret: Type,
    span: Span,
}

struct Checker<'a> {
    src: &'a str,
    sigs: &'a [Signature],
    diags: Vec<Diagnostic>,
    globals: Vec<(String, Type)>,
    global_index: HashMap<String, u32>,
    fns: HashMap<String, u32>,
    fn_sigs: Vec<FnSig>,
    events: Vec<EventSchema>,
    windows: Vec<WindowSpec>,
    scopes: Vec<Vec<(String, Local)>>,
    n_slots: u32,
    ctx: Ctx,
    block_depth: usize,
}

fn poison() -> (Ex, Type) {
    (Ex::Const(Value::Unit), Type::Error)
}

impl Checker<'_> {
    fn error(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn program(&mut self, prog: &ast::Program) -> Compiled {
        let host_event_count = self.events.len();
        for item in &prog.items {
            if let Item::Event(e) = item {
                self.event_decl(e, host_event_count);
            }
        }
        for item in &prog.items {
            if let Item::Fn(f) = item {
                self.fn_signature(f);
            }
        }
        // Globals in order: an initialiser sees only the globals above it.
        let mut init = Vec::new();
        self.begin_body(Ctx::Init);
        for item in &prog.items {
            if let Item::Let(l) = item {
                let (ex, ty) = self.let_value(l);
                if self.global_index.contains_key(&l.name.name) {
                    self.error(Diagnostic::new(l.name.span, format!("`{}` is already declared", l.name.name)));
                    continue;
                }
                let index = self.globals.len() as u32;
                self.globals.push((l.name.name.clone(), ty));
                self.global_index.insert(l.name.name.clone(), index);
                init.push(St { kind: StKind::SetGlobal(index, ex), span: l.name.span });
            }
        }
        let init_slots = self.n_slots;
        let mut functions = Vec::new();
        for item in &prog.items {
            // Only the first of same-named functions is registered; skip the others' bodies.
            let registered = |f: &ast::FnDecl| self.fns.get(&f.name.name).is_some_and(|&i| self.fn_sigs[i as usize].span == f.name.span);
            if let Item::Fn(f) = item {
                if registered(f) {
                    functions.push(self.fn_body(f));
                }
            }
        }
        let mut rules = Vec::new();
        for item in &prog.items {
            if let Item::Rule(r) = item {
                if let Some(rule) = self.rule(r) {
                    rules.push(rule);
                }
            }
        }
        Compiled {
            globals: self.globals.clone(),
            init,
            init_slots,
            functions,
            rules,
            windows: std::mem::take(&mut self.windows),
            events: self.events.clone(),
            host_sigs: self.sigs.to_vec(),
        }
    }

    fn event_decl(&mut self, e: &ast::EventDecl, host_count: usize) {
        if let Some(i) = self.events.iter().position(|x| x.name == e.name.name) {
            let what = if i < host_count { "the host already delivers an event" } else { "an event is already declared" };
            self.error(Diagnostic::new(e.name.span, format!("{what} named `{}`", e.name.name)));
            return;
        }
        let mut fields: Vec<(String, Type)> = Vec::new();
        for p in &e.fields {
            let ty = self.resolve_type(&p.ty);
            if fields.iter().any(|(n, _)| *n == p.name.name) {
                self.error(Diagnostic::new(p.name.span, format!("field `{}` is declared twice", p.name.name)));
            }
            if matches!(ty, Type::Window(_)) {
                self.error(Diagnostic::new(p.ty.span, "event fields cannot be windows"));
            }
            fields.push((p.name.name.clone(), ty));
        }
        self.events.push(EventSchema { name: e.name.name.clone(), fields });
    }

    fn fn_signature(&mut self, f: &ast::FnDecl) {
        let name = &f.name.name;
        if builtins::is_builtin(name) || self.sigs.iter().any(|s| s.name == *name) {
            let what = if builtins::is_builtin(name) { "a built-in" } else { "a host function" };
            self.error(Diagnostic::new(f.name.span, format!("`{name}` is {what}; pick another name")));
        }
        if let Some(&i) = self.fns.get(name) {
            let (line, _) = self.fn_sigs[i as usize].span.line_col(self.src);
            self.error(Diagnostic::new(f.name.span, format!("function `{name}` is defined twice"))
                .with_note(format!("first defined on line {line}")));
            return;
        }
        let params = f.params.iter().map(|p| (p.name.name.clone(), self.resolve_type(&p.ty))).collect();
        let ret = f.ret.as_ref().map(|t| self.resolve_type(t)).unwrap_or(Type::Unit);
        self.fns.insert(name.clone(), self.fn_sigs.len() as u32);
        self.fn_sigs.push(FnSig { params, ret, span: f.name.span });
    }

    fn resolve_type(&mut self, t: &TypeExpr) -> Type {
        match &t.kind {
            TypeExprKind::Named(n) => match n.as_str() {
                "int" => Type::Int,
                "float" => Type::Float,
                "string" => Type::Str,
                "bool" => Type::Bool,
                "duration" => Type::Duration,
                "size" => Type::Size,
                _ => {
                    let help = match n.as_str() {
                        "str" | "String" => "did you mean `string`?".to_string(),
                        "i64" | "integer" | "number" => "did you mean `int`?".to_string(),
                        "f64" | "double" => "did you mean `float`?".to_string(),
                        _ => "types are int, float, string, bool, duration, size, list<T>, window<T> and {field: T}".to_string(),
                    };
                    self.error(Diagnostic::new(t.span, format!("unknown type `{n}`")).with_help(help));
                    Type::Error
                }
            },
            TypeExprKind::List(e) => Type::list(self.resolve_type(e)),
            TypeExprKind::Window(e) => {
                let elem = self.resolve_type(e);
                if !elem.is_numeric() && elem != Type::Error {
                    self.error(Diagnostic::new(e.span, format!("windows hold numbers, not `{elem}`")));
                }
                Type::Window(Box::new(elem))
            }
            TypeExprKind::Record(fields) => {
                let mut out: Vec<(String, Type)> = Vec::new();
                for p in fields {
                    if out.iter().any(|(n, _)| *n == p.name.name) {
                        self.error(Diagnostic::new(p.name.span, format!("field `{}` is declared twice", p.name.name)));
                    }
                    let ty = self.resolve_type(&p.ty);
                    out.push((p.name.name.clone(), ty));
                }
                Type::record(out)
            }
        }
    }

    fn begin_body(&mut self, ctx: Ctx) {
        self.ctx = ctx;
        self.scopes = vec![Vec::new()];
        self.n_slots = 0;
        self.block_depth = 0;
    }

    fn declare(&mut self, name: &str, ty: Type) -> u32 {
        let slot = self.n_slots;
        self.n_slots += 1;
        if let Some(scope) = self.scopes.last_mut() {
            scope.push((name.to_string(), Local::Slot(slot, ty)));
        }
        slot
    }

    fn lookup_local(&self, name: &str) -> Option<Local> {
        self.scopes.iter().rev().flat_map(|s| s.iter().rev()).find(|(n, _)| n == name).map(|(_, l)| l.clone())
    }

    fn fn_body(&mut self, f: &ast::FnDecl) -> Function {
        let index = self.fns.get(&f.name.name).copied().unwrap_or(0) as usize;
        let (params, ret) = match self.fn_sigs.get(index) {
            Some(s) => (s.params.clone(), s.ret.clone()),
            None => (Vec::new(), Type::Unit),
        };
        self.begin_body(Ctx::Function(ret.clone()));
        for (p, (_, ty)) in f.params.iter().zip(params) {
            if self.lookup_local(&p.name.name).is_some() {
                self.error(Diagnostic::new(p.name.span, format!("parameter `{}` is declared twice", p.name.name)));
            }
            self.declare(&p.name.name, ty);
        }
        let body = self.block(&f.body);
        if ret != Type::Unit && ret != Type::Error && !always_returns(&body) {
            self.error(
                Diagnostic::new(f.name.span, format!("function `{}` may end without returning a `{ret}`", f.name.name))
                    .with_help("end every path with `return VALUE`"),
            );
        }
        Function { name: f.name.name.clone(), n_params: f.params.len() as u32, n_slots: self.n_slots, body }
    }

    fn rule(&mut self, r: &ast::Rule) -> Option<RuleCode> {
        let (line, _) = r.span.line_col(self.src);
        let header = self.src.get(r.span.range()).unwrap_or("rule");
        let name = format!("{header} (line {line})");
        let trigger = match &r.trigger {
            Trigger::Every(e) => self.period(e).map(RuleTrigger::Every),
            Trigger::On(ev) => match self.events.iter().position(|x| x.name == ev.name) {
                Some(i) => Some(RuleTrigger::On(i as u32)),
                None => {
                    let names: Vec<&str> = self.events.iter().map(|e| e.name.as_str()).collect();
                    let mut d = Diagnostic::new(ev.span, format!("unknown event `{}`", ev.name));
                    d = match closest(&ev.name, names.iter().copied()) {
                        Some(s) => d.with_help(format!("did you mean `{s}`?")),
                        None => d.with_help("declare it: `event NAME { field: type }`"),
                    };
                    if !names.is_empty() {
                        d = d.with_note(format!("known events: {}", names.join(", ")));
                    }
                    self.error(d);
                    None
                }
            },
        };
        let event = match trigger {
            Some(RuleTrigger::On(i)) => Some(i),
            _ => None,
        };
        // Check the body even when the header is wrong, so all errors show at once.
        self.begin_body(Ctx::Rule(event));
        let condition = r.condition.as_ref().map(|c| self.expect_type(c, &Type::Bool, "a `where` condition"));
        let body = self.block(&r.body);
        Some(RuleCode { name, trigger: trigger?, condition, body, n_slots: self.n_slots, span: r.span })
    }

    /// The period of an `every` rule: a positive duration literal.
    fn period(&mut self, e: &Expr) -> Option<i64> {
        let d = match &e.kind {
            ExprKind::Quantity(UnitKind::Duration, ns) if *ns >= MIN_PERIOD => return Some(*ns),
            ExprKind::Quantity(UnitKind::Duration, _) => Diagnostic::new(e.span, "`every` period is too short")
                .with_help(format!("the shortest period is {}", units::format_duration(MIN_PERIOD))),
            ExprKind::Int(n) => Diagnostic::new(e.span, "`every` needs a duration, found `int`")
                .with_label("this number has no unit")
                .with_help(format!("write a unit: `every {n}s` or `every {n}ms`")),
            ExprKind::Quantity(UnitKind::Size, _) => Diagnostic::new(e.span, "`every` needs a duration, found `size`")
                .with_help("a period is a time such as `30s`"),
            _ => Diagnostic::new(e.span, "`every` needs a duration literal such as `30s`"),
        };
        self.error(d);
        None
    }

    fn block(&mut self, b: &ast::Block) -> Vec<St> {
        self.scopes.push(Vec::new());
        self.block_depth += 1;
        let out = b.stmts.iter().filter_map(|s| self.stmt(s)).collect();
        self.block_depth -= 1;
        self.scopes.pop();
        out
    }

    fn let_value(&mut self, l: &ast::Let) -> (Ex, Type) {
        match &l.ty {
            Some(t) => {
                let ty = self.resolve_type(t);
                if matches!(ty, Type::Window(_)) {
                    self.error(Diagnostic::new(t.span, "declare windows with `window NAME: T[capacity]` in a rule"));
                    return poison();
                }
                let ex = self.expect_type(&l.value, &ty, "the declared type");
                (ex, ty)
            }
            None => {
                let (ex, ty) = self.expr(&l.value, None);
                if ty == Type::Unit {
                    self.error(Diagnostic::new(l.value.span, "this produces no value to bind"));
                    return poison();
                }
                if matches!(ty, Type::Window(_)) {
                    self.error(Diagnostic::new(l.value.span, "windows cannot be copied into a `let`; use the window's name"));
                    return poison();
                }
                (ex, ty)
            }
        }
    }

    fn stmt(&mut self, s: &ast::Stmt) -> Option<St> {
        let kind = match &s.kind {
            StmtKind::Let(l) => {
                let (ex, ty) = self.let_value(l);
                let slot = self.declare(&l.name.name, ty);
                StKind::SetLocal(slot, ex)
            }
            StmtKind::Assign { target, op, value } => self.assign(target, *op, value)?,
            StmtKind::If { cond, then, otherwise } => {
                let c = self.expect_type(cond, &Type::Bool, "an `if` condition");
                let t = self.block(then);
                let o = otherwise.as_ref().map(|b| self.block(b)).unwrap_or_default();
                StKind::If(c, t, o)
            }
            StmtKind::For { var, iter, body } => {
                let (ex, ty) = self.expr(iter, None);
                self.scopes.push(Vec::new());
                let kind = match &ty {
                    Type::List(e) => {
                        let slot = self.declare(&var.name, (**e).clone());
                        StKind::ForList(slot, ex, Vec::new())
                    }
                    Type::Window(e) => {
                        let slot = self.declare(&var.name, (**e).clone());
                        StKind::ForWindow(slot, ex, (**e).clone(), Vec::new())
                    }
                    Type::Error => {
                        let slot = self.declare(&var.name, Type::Error);
                        StKind::ForList(slot, ex, Vec::new())
                    }
                    other => {
                        let mut d = Diagnostic::new(iter.span, format!("cannot loop over `{other}`"))
                            .with_label(format!("this is `{other}`, not a list or window"));
                        if *other == Type::Int {
                            d = d.with_help("to count, loop over `range(n)`");
                        }
                        self.error(d);
                        let slot = self.declare(&var.name, Type::Error);
                        StKind::ForList(slot, ex, Vec::new())
                    }
                };
                let b = self.block(body);
                self.scopes.pop();
                match kind {
                    StKind::ForList(slot, ex, _) => StKind::ForList(slot, ex, b),
                    StKind::ForWindow(slot, ex, t, _) => StKind::ForWindow(slot, ex, t, b),
                    k => k,
                }
            }
            StmtKind::Return(value) => self.return_stmt(s.span, value.as_ref())?,
            StmtKind::Expr(e) => {
                let (ex, ty) = self.expr(e, None);
                if ty != Type::Unit && ty != Type::Error {
                    let help = match &e.kind {
                        ExprKind::Binary(BinOp::Eq, ..) => "to assign, write `=` instead of `==`",
                        _ => "bind it with `let` or use it in a condition",
                    };
                    self.diags.push(
                        Diagnostic::warning(e.span, format!("this `{ty}` value is computed and then dropped")).with_help(help),
                    );
                }
                StKind::Expr(ex)
            }
            StmtKind::Window { name, elem, capacity } => {
                self.window_decl(s.span, name, elem, capacity);
                return None;
            }
        };
        Some(St { kind, span: s.span })
    }

    fn return_stmt(&mut self, span: Span, value: Option<&Expr>) -> Option<StKind> {
        match (self.ctx.clone(), value) {
            (Ctx::Function(ret), Some(v)) => {
                if ret == Type::Unit {
                    self.error(Diagnostic::new(v.span, "this function declares no return type")
                        .with_help("add `-> TYPE` after the parameters, or drop the value"));
                    return None;
                }
                let ex = self.expect_type(v, &ret, "the function's return type");
                Some(StKind::Return(Some(ex)))
            }
            (Ctx::Function(ret), None) if ret != Type::Unit && ret != Type::Error => {
                self.error(Diagnostic::new(span, format!("this function must return a `{ret}`")));
                None
            }
            (Ctx::Rule(_), Some(v)) => {
                self.error(Diagnostic::new(v.span, "rules do not return values").with_help("use a bare `return` to stop the rule"));
                None
            }
            _ => Some(StKind::Return(None)),
        }
    }

    fn window_decl(&mut self, span: Span, name: &ast::Ident, elem: &TypeExpr, capacity: &Expr) {
        if !matches!(self.ctx, Ctx::Rule(_)) || self.block_depth != 1 {
            self.error(Diagnostic::new(span, "`window` must be declared at the top of a rule body")
                .with_note("a window keeps its samples across firings of its rule"));
            return;
        }
        let ty = self.resolve_type(elem);
        if !ty.is_numeric() && ty != Type::Error {
            self.error(Diagnostic::new(elem.span, format!("windows hold numbers, not `{ty}`"))
                .with_help("use int, float, duration or size"));
        }
        let cap = match &capacity.kind {
            ExprKind::Int(n) if *n >= 1 && (*n as u64) <= MAX_COUNT as u64 => Some(Capacity::Count(*n as usize)),
            ExprKind::Int(_) => {
                self.error(Diagnostic::new(capacity.span, format!("window capacity must be between 1 and {MAX_COUNT} samples")));
                None
            }
            ExprKind::Quantity(UnitKind::Duration, ns) if *ns > 0 => Some(Capacity::Age(*ns)),
            ExprKind::Quantity(UnitKind::Size, _) => {
                self.error(Diagnostic::new(capacity.span, "window capacity is a size")
                    .with_help("give a sample count like `[60]` or a time span like `[10m]`"));
                None
            }
            _ => {
                self.error(Diagnostic::new(capacity.span, "window capacity must be a count like `[60]` or a positive time span like `[10m]`"));
                None
            }
        };
        let dup = self.scopes.last().and_then(|s| s.iter().find(|(n, _)| *n == name.name)).is_some();
        if dup {
            self.error(Diagnostic::new(name.span, format!("`{}` is already declared in this rule", name.name)));
            return;
        }
        let id = self.windows.len() as u32;
        self.windows.push(WindowSpec { capacity: cap.unwrap_or(Capacity::Count(1)), elem: ty.clone() });
        if let Some(scope) = self.scopes.last_mut() {
            scope.push((name.name.clone(), Local::Window(id, ty)));
        }
    }

    fn assign(&mut self, target: &ast::Ident, op: Option<BinOp>, value: &Expr) -> Option<StKind> {
        let (slot, ty) = match self.lookup_local(&target.name) {
            Some(Local::Slot(s, t)) => (Ok(s), t),
            Some(Local::Window(..)) => {
                self.error(Diagnostic::new(target.span, format!("`{}` is a window and cannot be reassigned", target.name))
                    .with_help(format!("add samples with `push({}, x)` or empty it with `clear({})`", target.name, target.name)));
                return None;
            }
            None => match self.global_index.get(&target.name) {
                Some(&g) => (Err(g), self.globals[g as usize].1.clone()),
                None => {
                    self.unknown_name(&target.name, target.span);
                    return None;
                }
            },
        };
        let ex = match op {
            None => self.expect_type(value, &ty, &format!("the type of `{}`", target.name)),
            Some(op) => {
                let current = match slot {
                    Ok(s) => Ex::Local(s),
                    Err(g) => Ex::Global(g),
                };
                let (rhs, rty) = self.expr(value, Some(&ty));
                let span = target.span.to(value.span);
                let (ex, out) = self.binary(op, (current, ty.clone(), target.span), (rhs, rty, value.span), span);
                if !out.fits(&ty) {
                    self.error(Diagnostic::new(span, format!("`{}` is `{ty}` but this gives `{out}`", target.name)));
                }
                ex
            }
        };
        Some(match slot {
            Ok(s) => StKind::SetLocal(s, ex),
            Err(g) => StKind::SetGlobal(g, ex),
        })
    }

    /// Checks `e` against `want`, widening ints to floats; reports a mismatch once.
    fn expect_type(&mut self, e: &Expr, want: &Type, what: &str) -> Ex {
        let (ex, ty) = self.expr(e, Some(want));
        match coerce(ex, &ty, want) {
            Some(ex) => ex,
            None => {
                let mut d = Diagnostic::new(e.span, format!("expected `{want}` for {what}, found `{ty}`"))
                    .with_label(format!("this is `{ty}`"));
                if let Some(h) = unit_hint(&ty, want) {
                    d = d.with_help(h);
                }
                self.error(d);
                Ex::Const(Value::Unit)
            }
        }
    }

    fn unknown_name(&mut self, name: &str, span: Span) {
        let mut d = Diagnostic::new(span, format!("unknown name `{name}`"));
        if self.fns.contains_key(name) || builtins::is_builtin(name) || self.sigs.iter().any(|s| s.name == name) {
            d = d.with_help(format!("`{name}` is a function; call it: `{name}(...)`"));
        } else if units::lookup(name).is_some() {
            d = d.with_help(format!("a unit goes right after its number, with no space: `5{name}`"));
        } else if name == "event" {
            d = d.with_help("`event` is only available inside `on` rules");
        } else {
            let locals: Vec<String> = self.scopes.iter().flatten().map(|(n, _)| n.clone()).collect();
            let candidates = locals.iter().map(String::as_str).chain(self.globals.iter().map(|(n, _)| n.as_str()));
            if let Some(s) = closest(name, candidates) {
                d = d.with_help(format!("did you mean `{s}`?"));
            }
        }
        self.error(d);
    }

    fn expr(&mut self, e: &Expr, expect: Option<&Type>) -> (Ex, Type) {
        match &e.kind {
            ExprKind::Int(n) => (Ex::Const(Value::Int(*n)), Type::Int),
            ExprKind::Float(f) => (Ex::Const(Value::Float(*f)), Type::Float),
            ExprKind::Quantity(k, n) => {
                (Ex::Const(Value::Int(*n)), if *k == UnitKind::Duration { Type::Duration } else { Type::Size })
            }
            ExprKind::Str(s) => (Ex::Const(Value::str(s)), Type::Str),
            ExprKind::Bool(b) => (Ex::Const(Value::Bool(*b)), Type::Bool),
            ExprKind::Name(n) => match self.lookup_local(n) {
                Some(Local::Slot(s, t)) => (Ex::Local(s), t),
                Some(Local::Window(id, t)) => (Ex::Const(Value::Window(id)), Type::Window(Box::new(t))),
                None => match self.global_index.get(n) {
                    Some(&g) => (Ex::Global(g), self.globals[g as usize].1.clone()),
                    None => {
                        self.unknown_name(n, e.span);
                        poison()
                    }
                },
            },
            ExprKind::EventRef => {
                let d = match self.ctx {
                    Ctx::Rule(Some(ev)) => {
                        let fields: Vec<&str> = self.events[ev as usize].fields.iter().map(|(n, _)| n.as_str()).collect();
                        Diagnostic::new(e.span, "`event` is not a value by itself").with_help(if fields.is_empty() {
                            "this event has no fields".to_string()
                        } else {
                            format!("use one of its fields: {}", fields.iter().map(|f| format!("event.{f}")).collect::<Vec<_>>().join(", "))
                        })
                    }
                    _ => Diagnostic::new(e.span, "`event` is only available inside `on` rules"),
                };
                self.error(d);
                poison()
            }
            ExprKind::List(items) => self.list(e.span, items, expect),
            ExprKind::Record(fields) => {
                let mut out: Vec<(String, Ex, Type)> = Vec::new();
                for (name, value) in fields {
                    let want = expect.and_then(|t| t.field(&name.name)).map(|(_, t)| t.clone());
                    let (ex, ty) = self.expr(value, want.as_ref());
                    if out.iter().any(|(n, _, _)| *n == name.name) {
                        self.error(Diagnostic::new(name.span, format!("field `{}` is given twice", name.name)));
                        continue;
                    }
                    out.push((name.name.clone(), ex, ty));
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                let ty = Type::Record(out.iter().map(|(n, _, t)| (n.clone(), t.clone())).collect());
                (Ex::Record(out.into_iter().map(|(_, ex, _)| ex).collect()), ty)
            }
            ExprKind::Field(base, field) => self.field(base, field),
            ExprKind::Index(base, index) => {
                let (b, bt) = self.expr(base, None);
                let i = self.expect_type(index, &Type::Int, "an index");
                match bt {
                    Type::List(elem) => (Ex::Index(Box::new(b), Box::new(i), e.span), *elem),
                    Type::Window(elem) => (Ex::WindowIndex(Box::new(b), Box::new(i), (*elem).clone(), e.span), *elem),
                    Type::Error => poison(),
                    other => {
                        self.error(Diagnostic::new(base.span, format!("cannot index into `{other}`")));
                        poison()
                    }
                }
            }
            ExprKind::Call(callee, args) => self.call(e.span, callee, args),
            ExprKind::Unary(op, inner) => {
                let (ex, ty) = self.expr(inner, None);
                match (op, &ty) {
                    (_, Type::Error) => poison(),
                    (UnOp::Not, Type::Bool) => (Ex::Not(Box::new(ex)), Type::Bool),
                    (UnOp::Neg, Type::Float) => (Ex::NegF(Box::new(ex)), Type::Float),
                    (UnOp::Neg, t) if t.is_int_repr() => (Ex::NegI(Box::new(ex), e.span), ty),
                    (UnOp::Not, t) => {
                        self.error(Diagnostic::new(inner.span, format!("`not` needs a bool, found `{t}`")));
                        poison()
                    }
                    (UnOp::Neg, t) => {
                        self.error(Diagnostic::new(inner.span, format!("cannot negate `{t}`")));
                        poison()
                    }
                }
            }
            ExprKind::Binary(op, l, r) => {
                let (lex, lt) = self.expr(l, None);
                // The left side tells an empty list on the right what it is.
                let (rex, rt) = self.expr(r, Some(&lt));
                self.binary(*op, (lex, lt, l.span), (rex, rt, r.span), e.span)
            }
        }
    }

    fn list(&mut self, span: Span, items: &[Expr], expect: Option<&Type>) -> (Ex, Type) {
        let mut elem = expect.and_then(Type::elem).cloned();
        if items.is_empty() {
            return match elem {
                Some(t) => (Ex::List(Vec::new(), span), Type::list(t)),
                None => {
                    self.error(Diagnostic::new(span, "cannot tell what this empty list holds")
                        .with_help("declare its type: `let xs: list<int> = []`"));
                    poison()
                }
            };
        }
        let mut out = Vec::new();
        for item in items {
            let (ex, ty) = self.expr(item, elem.as_ref());
            let want = match &elem {
                Some(t) => t.clone(),
                None => {
                    elem = Some(ty.clone());
                    ty.clone()
                }
            };
            match coerce(ex, &ty, &want) {
                Some(ex) => out.push(ex),
                None => {
                    let mut d = Diagnostic::new(item.span, format!("list elements must all be `{want}`, found `{ty}`"));
                    if let Some(h) = unit_hint(&ty, &want) {
                        d = d.with_help(h);
                    }
                    self.error(d);
                    out.push(Ex::Const(Value::Unit));
                }
            }
        }
        (Ex::List(out, span), Type::list(elem.unwrap_or(Type::Error)))
    }

    fn field(&mut self, base: &Expr, field: &ast::Ident) -> (Ex, Type) {
        if let ExprKind::EventRef = base.kind {
            let Ctx::Rule(Some(ev)) = self.ctx else {
                self.error(Diagnostic::new(base.span, "`event` is only available inside `on` rules"));
                return poison();
            };
            let schema = &self.events[ev as usize];
            if let Some(i) = schema.fields.iter().position(|(n, _)| *n == field.name) {
                return (Ex::EventField(i as u32), schema.fields[i].1.clone());
            }
            let names: Vec<&str> = schema.fields.iter().map(|(n, _)| n.as_str()).collect();
            let mut d = Diagnostic::new(field.span, format!("event `{}` has no field `{}`", schema.name, field.name));
            d = match closest(&field.name, names.iter().copied()) {
                Some(s) => d.with_help(format!("did you mean `{s}`?")),
                None if names.is_empty() => d.with_help(format!("`{}` has no fields", schema.name)),
                None => d.with_help(format!("fields are: {}", names.join(", "))),
            };
            self.error(d);
            return poison();
        }
        let (b, bt) = self.expr(base, None);
        if bt == Type::Error {
            return poison();
        }
        match bt.field(&field.name) {
            Some((i, t)) => (Ex::Field(Box::new(b), i as u32), t.clone()),
            None => {
                self.error(Diagnostic::new(field.span, format!("`{bt}` has no field `{}`", field.name)));
                poison()
            }
        }
    }

    fn call(&mut self, span: Span, callee: &ast::Ident, args: &[Expr]) -> (Ex, Type) {
        let name = callee.name.as_str();
        if let Some(&index) = self.fns.get(name) {
            let (params, ret) = {
                let s = &self.fn_sigs[index as usize];
                (s.params.clone(), s.ret.clone())
            };
            let exs = self.call_args(span, name, args, &params);
            return (Ex::Call(index, exs, span), ret);
        }
        if let Some(index) = self.sigs.iter().position(|s| s.name == name) {
            let sig = &self.sigs[index];
            let params = sig.params.clone();
            let ret = sig.ret.clone();
            let exs = self.call_args(span, name, args, &params);
            return (Ex::Host(index as u32, exs, span), ret);
        }
        if builtins::is_builtin(name) {
            let mut exs = Vec::new();
            let mut tys = Vec::new();
            for a in args {
                let (ex, ty) = self.expr(a, None);
                exs.push(ex);
                tys.push(ty);
            }
            if tys.contains(&Type::Error) {
                return poison();
            }
            return match builtins::check(name, &tys) {
                Ok(c) => {
                    exs.extend(c.defaults.into_iter().map(Ex::Const));
                    (Ex::Builtin(Box::new(c.builtin), exs, span), c.ret)
                }
                Err(msg) => {
                    self.error(Diagnostic::new(span, msg));
                    poison()
                }
            };
        }
        for a in args {
            self.expr(a, None);
        }
        let mut d = Diagnostic::new(callee.span, format!("unknown function `{name}`"));
        let user: Vec<String> = self.fns.keys().cloned().collect();
        let candidates = builtins::SIGNATURES
            .iter()
            .map(|(n, _)| *n)
            .chain(self.sigs.iter().map(|s| s.name.as_str()))
            .chain(user.iter().map(String::as_str));
        if let Some(s) = closest(name, candidates) {
            d = d.with_help(format!("did you mean `{s}`?"));
        } else {
            d = d.with_note("policies can call built-ins, their own functions and the host's functions; nothing else");
        }
        self.error(d);
        poison()
    }

    fn call_args(&mut self, span: Span, name: &str, args: &[Expr], params: &[(String, Type)]) -> Vec<Ex> {
        if args.len() != params.len() {
            let list: Vec<String> = params.iter().map(|(n, t)| format!("{n}: {t}")).collect();
            self.error(Diagnostic::new(
                span,
                format!("`{name}` takes {} argument{}, got {}", params.len(), if params.len() == 1 { "" } else { "s" }, args.len()),
            )
            .with_help(format!("signature: {name}({})", list.join(", "))));
            for a in args {
                self.expr(a, None);
            }
            return Vec::new();
        }
        args.iter()
            .zip(params)
            .enumerate()
            .map(|(i, (a, (pname, t)))| self.expect_type(a, t, &format!("argument {} (`{pname}`) of `{name}`", i + 1)))
            .collect()
    }

    /// Types a binary operation and picks the specialised operator.
    fn binary(&mut self, op: BinOp, l: (Ex, Type, Span), r: (Ex, Type, Span), span: Span) -> (Ex, Type) {
        let (lex, lt, _) = l;
        let (rex, rt, _) = r;
        if lt == Type::Error || rt == Type::Error {
            return poison();
        }
        let bin = |o: Op, a: Ex, b: Ex| Ex::Bin(o, Box::new(a), Box::new(b), span);
        let float = |x: Ex, t: &Type| if *t == Type::Int { Ex::ToFloat(Box::new(x)) } else { x };
        let is_num = |t: &Type| matches!(t, Type::Int | Type::Float);
        use Type::*;
        let result = match op {
            BinOp::And | BinOp::Or if lt == Bool && rt == Bool => {
                let e = if op == BinOp::And { Ex::And(Box::new(lex), Box::new(rex)) } else { Ex::Or(Box::new(lex), Box::new(rex)) };
                Some((e, Bool))
            }
            BinOp::Eq | BinOp::Ne if rt.fits(&lt) || (is_num(&lt) && is_num(&rt)) => {
                if matches!(lt, Window(_)) || lt == Unit {
                    None
                } else {
                    Some((bin(if op == BinOp::Eq { Op::Eq } else { Op::Ne }, lex, rex), Bool))
                }
            }
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                let c = match op {
                    BinOp::Lt => Cmp::Lt,
                    BinOp::Le => Cmp::Le,
                    BinOp::Gt => Cmp::Gt,
                    _ => Cmp::Ge,
                };
                match (&lt, &rt) {
                    (a, b) if a == b && a.is_int_repr() => Some((bin(Op::CmpI(c), lex, rex), Bool)),
                    (a, b) if is_num(a) && is_num(b) => Some((bin(Op::CmpF(c), float(lex, a), float(rex, b)), Bool)),
                    (Str, Str) => Some((bin(Op::CmpS(c), lex, rex), Bool)),
                    _ => None,
                }
            }
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => self.arith(op, (lex, &lt), (rex, &rt), span),
            BinOp::In => match (&lt, &rt) {
                (x, List(e)) if x.fits(e) || (is_num(x) && is_num(e)) => Some((bin(Op::InList, lex, rex), Bool)),
                (Str, Str) => Some((bin(Op::InStr, lex, rex), Bool)),
                _ => None,
            },
            _ => None,
        };
        if let Some(r) = result {
            return r;
        }
        let verb = match op {
            BinOp::Add => format!("cannot add `{lt}` and `{rt}`"),
            BinOp::Sub => format!("cannot subtract `{rt}` from `{lt}`"),
            BinOp::Mul => format!("cannot multiply `{lt}` by `{rt}`"),
            BinOp::Div => format!("cannot divide `{lt}` by `{rt}`"),
            BinOp::Rem => format!("cannot take `{lt}` modulo `{rt}`"),
            BinOp::And | BinOp::Or => format!("`{}` needs two bools, found `{lt}` and `{rt}`", op.symbol()),
            BinOp::In => format!("cannot look for `{lt}` in `{rt}`"),
            _ => format!("cannot compare `{lt}` with `{rt}`"),
        };
        let mut d = Diagnostic::new(span, verb).with_label(format!("`{lt}` {} `{rt}`", op.symbol()));
        if let Some(h) = unit_hint(&lt, &rt).or_else(|| unit_hint(&rt, &lt)) {
            d = d.with_help(h);
        } else if op == BinOp::Add && (lt == Str || rt == Str) {
            d = d.with_help("turn the other side into text with `str(...)`");
        }
        self.error(d);
        poison()
    }

    fn arith(&mut self, op: BinOp, l: (Ex, &Type), r: (Ex, &Type), span: Span) -> Option<(Ex, Type)> {
        use Type::*;
        let (lex, lt) = l;
        let (rex, rt) = r;
        let bin = |o: Op, a: Ex, b: Ex| Some(Ex::Bin(o, Box::new(a), Box::new(b), span));
        let float = |x: Ex, t: &Type| if *t == Int { Ex::ToFloat(Box::new(x)) } else { x };
        let int_op = match op {
            BinOp::Add => Op::AddI,
            BinOp::Sub => Op::SubI,
            BinOp::Mul => Op::MulI,
            BinOp::Div => Op::DivI,
            _ => Op::RemI,
        };
        let float_op = match op {
            BinOp::Add => Op::AddF,
            BinOp::Sub => Op::SubF,
            BinOp::Mul => Op::MulF,
            BinOp::Div => Op::DivF,
            _ => Op::RemF,
        };
        let (ex, ty) = match (lt, rt) {
            (Int, Int) => (bin(int_op, lex, rex), Int),
            (Int | Float, Int | Float) => (bin(float_op, float(lex, lt), float(rex, rt)), Float),
            (q, p) if q == p && q.is_quantity() => match op {
                BinOp::Add | BinOp::Sub | BinOp::Rem => (bin(int_op, lex, rex), q.clone()),
                BinOp::Div => (bin(Op::RatioQ, lex, rex), Float),
                _ => return None,
            },
            (q, Int) if q.is_quantity() && matches!(op, BinOp::Mul | BinOp::Div) => (bin(int_op, lex, rex), q.clone()),
            (Int, q) if q.is_quantity() && op == BinOp::Mul => (bin(Op::MulI, lex, rex), q.clone()),
            (q, Float) if q.is_quantity() && op == BinOp::Mul => (bin(Op::MulQF, lex, rex), q.clone()),
            (q, Float) if q.is_quantity() && op == BinOp::Div => (bin(Op::DivQF, lex, rex), q.clone()),
            (Float, q) if q.is_quantity() && op == BinOp::Mul => (bin(Op::MulQF, lex, rex), q.clone()),
            (Str, Str) if op == BinOp::Add => (bin(Op::ConcatS, lex, rex), Str),
            (List(a), List(b)) if op == BinOp::Add && b.fits(a) => (bin(Op::ConcatL, lex, rex), lt.clone()),
            _ => return None,
        };
        ex.map(|e| (e, ty))
    }
}

/// Accepts `ex: from` where `to` is wanted, widening `int` to `float`.
fn coerce(ex: Ex, from: &Type, to: &Type) -> Option<Ex> {
    if from.fits(to) {
        Some(ex)
    } else if *from == Type::Int && *to == Type::Float {
        Some(Ex::ToFloat(Box::new(ex)))
    } else {
        None
    }
}

/// Advice for mixing plain numbers with durations and sizes.
fn unit_hint(a: &Type, b: &Type) -> Option<String> {
    use Type::*;
    match (a, b) {
        (Int | Float, Duration) => Some("give the number a unit, e.g. `5s` or `500ms`".into()),
        (Int | Float, Size) => Some("give the number a unit, e.g. `64MiB`, or convert the size with `bytes(...)`".into()),
        (Duration, Size) | (Size, Duration) => {
            Some("a size (bytes) and a duration (time) measure different things; a rate is `rate(window, 1h)`".into())
        }
        _ => None,
    }
}

fn always_returns(body: &[St]) -> bool {
    match body.last().map(|s| &s.kind) {
        Some(StKind::Return(_)) => true,
        Some(StKind::If(_, t, e)) => always_returns(t) && always_returns(e),
        _ => false,
    }
}

/// The candidate nearest to `name` by edit distance, if it is plausibly a typo.
pub fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.len() / 3).max(1);
    candidates.map(|c| (edit_distance(name, c), c)).filter(|(d, _)| *d <= limit).min_by_key(|(d, _)| *d).map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
