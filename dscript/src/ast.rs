//! The syntax tree the parser produces, with spans for every diagnostic.

use crate::span::Span;
use crate::units::UnitKind;

#[derive(Debug, Clone)]
pub struct Program {
    pub items: Vec<Item>,
}

#[derive(Debug, Clone)]
pub enum Item {
    /// A top-level `let`: a global shared by all rules, kept across events.
    Let(Let),
    Fn(FnDecl),
    Event(EventDecl),
    Rule(Rule),
}

#[derive(Debug, Clone)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Let {
    pub name: Ident,
    pub ty: Option<TypeExpr>,
    pub value: Expr,
}

#[derive(Debug, Clone)]
pub struct Param {
    pub name: Ident,
    pub ty: TypeExpr,
}

#[derive(Debug, Clone)]
pub struct FnDecl {
    pub name: Ident,
    pub params: Vec<Param>,
    pub ret: Option<TypeExpr>,
    pub body: Block,
}

/// `event name { field: type, ... }`: an event the policy expects beyond the host's.
#[derive(Debug, Clone)]
pub struct EventDecl {
    pub name: Ident,
    pub fields: Vec<Param>,
}

#[derive(Debug, Clone)]
pub enum Trigger {
    Every(Expr),
    On(Ident),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub trigger: Trigger,
    pub condition: Option<Expr>,
    pub body: Block,
    /// The rule header, `every 5s` or `on crash`, used to name the rule in messages.
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Block {
    pub stmts: Vec<Stmt>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub enum StmtKind {
    Let(Let),
    /// `x = e`, `x += e`, `x -= e`.
    Assign { target: Ident, op: Option<BinOp>, value: Expr },
    If { cond: Expr, then: Block, otherwise: Option<Block> },
    For { var: Ident, iter: Expr, body: Block },
    Return(Option<Expr>),
    Expr(Expr),
    /// `window name: type[capacity]`, a series kept across firings of its rule.
    Window { name: Ident, elem: TypeExpr, capacity: Expr },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    In,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "and",
            BinOp::Or => "or",
            BinOp::In => "in",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Debug, Clone)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Quantity(UnitKind, i64),
    Str(String),
    Bool(bool),
    Name(String),
    /// The `event` keyword inside an `on` rule.
    EventRef,
    List(Vec<Expr>),
    Record(Vec<(Ident, Expr)>),
    Field(Box<Expr>, Ident),
    Index(Box<Expr>, Box<Expr>),
    Call(Ident, Vec<Expr>),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone)]
pub struct TypeExpr {
    pub kind: TypeExprKind,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub enum TypeExprKind {
    Named(String),
    List(Box<TypeExpr>),
    Window(Box<TypeExpr>),
    Record(Vec<Param>),
}
