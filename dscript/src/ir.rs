//! The checked, resolved program the interpreter runs: names are slots, operators are typed.

use crate::builtins::Builtin;
use crate::host::EventSchema;
use crate::span::Span;
use crate::types::Type;
use crate::value::Value;
use crate::window::Capacity;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
}

/// A binary operator specialised to its operand representation by the checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AddI,
    SubI,
    MulI,
    DivI,
    RemI,
    AddF,
    SubF,
    MulF,
    DivF,
    RemF,
    /// A duration or size times (or divided by) a float, rounded back to whole units.
    MulQF,
    DivQF,
    /// Duration / duration or size / size: a plain ratio.
    RatioQ,
    CmpI(Cmp),
    CmpF(Cmp),
    CmpS(Cmp),
    Eq,
    Ne,
    ConcatS,
    ConcatL,
    InList,
    InStr,
}

#[derive(Debug, Clone)]
pub enum Ex {
    Const(Value),
    Local(u32),
    Global(u32),
    EventField(u32),
    NegI(Box<Ex>, Span),
    NegF(Box<Ex>),
    Not(Box<Ex>),
    ToFloat(Box<Ex>),
    Bin(Op, Box<Ex>, Box<Ex>, Span),
    And(Box<Ex>, Box<Ex>),
    Or(Box<Ex>, Box<Ex>),
    List(Vec<Ex>, Span),
    Record(Vec<Ex>),
    Field(Box<Ex>, u32),
    /// List index; negative counts from the end.
    Index(Box<Ex>, Box<Ex>, Span),
    /// Window index, with the element type to rebuild the value.
    WindowIndex(Box<Ex>, Box<Ex>, Type, Span),
    Call(u32, Vec<Ex>, Span),
    Host(u32, Vec<Ex>, Span),
    Builtin(Box<Builtin>, Vec<Ex>, Span),
}

#[derive(Debug, Clone)]
pub struct St {
    pub kind: StKind,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub enum StKind {
    SetLocal(u32, Ex),
    SetGlobal(u32, Ex),
    If(Ex, Vec<St>, Vec<St>),
    /// Loop over a list.
    ForList(u32, Ex, Vec<St>),
    /// Loop over a window's samples (copied first, so the body may push).
    ForWindow(u32, Ex, Type, Vec<St>),
    Return(Option<Ex>),
    Expr(Ex),
}

#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    pub n_params: u32,
    pub n_slots: u32,
    pub body: Vec<St>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleTrigger {
    /// Period in nanoseconds.
    Every(i64),
    /// Event index in [`Compiled::events`].
    On(u32),
}

#[derive(Debug, Clone)]
pub struct RuleCode {
    /// `every 5s (line 3)`: how messages and action records name the rule.
    pub name: String,
    pub trigger: RuleTrigger,
    pub condition: Option<Ex>,
    pub body: Vec<St>,
    pub n_slots: u32,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct WindowSpec {
    pub capacity: Capacity,
    pub elem: Type,
}

/// Everything the engine needs to run a checked policy.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub globals: Vec<(String, Type)>,
    /// Initialisers in source order, run once when the engine starts (in `init_slots` frame slots).
    pub init: Vec<St>,
    pub init_slots: u32,
    pub functions: Vec<Function>,
    pub rules: Vec<RuleCode>,
    pub windows: Vec<WindowSpec>,
    /// Host events first (same indices as the host's), then the policy's own `event` declarations.
    pub events: Vec<EventSchema>,
    /// The host signatures this was checked against, verified again when an engine starts.
    pub host_sigs: Vec<crate::host::Signature>,
}
