//! Recursive-descent parser: tokens to [`ast::Program`]. Stops at the first syntax error.

use crate::ast::*;
use crate::diag::Diagnostic;
use crate::lexer::{lex, Tok, Token};
use crate::span::{Span, MAX_SOURCE_LEN};

/// Deepest nesting of expressions and blocks accepted; keeps every later pass's recursion bounded.
pub const MAX_DEPTH: usize = 64;

pub fn parse(src: &str) -> Result<Program, Diagnostic> {
    if src.len() > MAX_SOURCE_LEN {
        return Err(Diagnostic::new(Span::new(0, 0), format!("policy is larger than {MAX_SOURCE_LEN} bytes")));
    }
    let tokens = lex(src)?;
    let mut p = Parser { tokens, pos: 0, depth: 0 };
    p.program()
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

type PResult<T> = Result<T, Diagnostic>;

impl Parser {
    fn peek(&self) -> &Tok {
        self.tokens.get(self.pos).map(|t| &t.tok).unwrap_or(&Tok::Eof)
    }

    fn span(&self) -> Span {
        self.tokens.get(self.pos).or(self.tokens.last()).map(|t| t.span).unwrap_or_default()
    }

    fn prev_span(&self) -> Span {
        self.tokens.get(self.pos.wrapping_sub(1)).map(|t| t.span).unwrap_or_default()
    }

    fn bump(&mut self) -> Tok {
        let tok = self.peek().clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        tok
    }

    fn at(&self, tok: &Tok) -> bool {
        self.peek() == tok
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        if self.at(tok) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn skip_newlines(&mut self) {
        while matches!(self.peek(), Tok::Newline | Tok::Semi) {
            self.bump();
        }
    }

    /// Newlines inside brackets do not end anything.
    fn skip_nl_only(&mut self) {
        while self.at(&Tok::Newline) {
            self.bump();
        }
    }

    fn error_here(&self, expected: &str) -> Diagnostic {
        Diagnostic::new(self.span(), format!("expected {expected}, found {}", self.peek().describe()))
    }

    fn expect(&mut self, tok: Tok, what: &str) -> PResult<Span> {
        if self.at(&tok) {
            let s = self.span();
            self.bump();
            Ok(s)
        } else {
            Err(self.error_here(what))
        }
    }

    fn ident(&mut self, what: &str) -> PResult<Ident> {
        match self.peek().clone() {
            Tok::Ident(name) => {
                let span = self.span();
                self.bump();
                Ok(Ident { name, span })
            }
            _ => Err(self.error_here(what)),
        }
    }

    fn enter(&mut self) -> PResult<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Diagnostic::new(self.span(), "nesting is too deep")
                .with_help(format!("at most {MAX_DEPTH} levels of nested expressions and blocks")));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn program(&mut self) -> PResult<Program> {
        let mut items = Vec::new();
        loop {
            self.skip_newlines();
            if self.at(&Tok::Eof) {
                return Ok(Program { items });
            }
            items.push(self.item()?);
            self.end_of_statement()?;
        }
    }

    fn item(&mut self) -> PResult<Item> {
        match self.peek() {
            Tok::Let => Ok(Item::Let(self.let_binding()?)),
            Tok::Fn => self.fn_decl(),
            Tok::Event => self.event_decl(),
            Tok::Every | Tok::On => self.rule(),
            _ => Err(self.error_here("`let`, `fn`, `event`, `every` or `on` at top level")),
        }
    }

    fn let_binding(&mut self) -> PResult<Let> {
        self.expect(Tok::Let, "`let`")?;
        let name = self.ident("a name after `let`")?;
        let ty = if self.eat(&Tok::Colon) { Some(self.type_expr()?) } else { None };
        self.expect(Tok::Assign, "`=`")?;
        self.skip_nl_only();
        let value = self.expr()?;
        Ok(Let { name, ty, value })
    }

    fn fn_decl(&mut self) -> PResult<Item> {
        self.expect(Tok::Fn, "`fn`")?;
        let name = self.ident("a function name")?;
        self.expect(Tok::LParen, "`(`")?;
        let params = self.params(Tok::RParen)?;
        let ret = if self.eat(&Tok::Arrow) { Some(self.type_expr()?) } else { None };
        let body = self.block()?;
        Ok(Item::Fn(FnDecl { name, params, ret, body }))
    }

    /// `name: type, ...` up to and including `close`.
    fn params(&mut self, close: Tok) -> PResult<Vec<Param>> {
        self.separated(close, |p| {
            let name = p.ident("a parameter name")?;
            p.expect(Tok::Colon, "`:` and a type")?;
            let ty = p.type_expr()?;
            Ok(Param { name, ty })
        })
    }

    /// Items separated by commas up to and including `close`; a trailing comma and
    /// newlines anywhere are fine.
    fn separated<T>(&mut self, close: Tok, mut item: impl FnMut(&mut Self) -> PResult<T>) -> PResult<Vec<T>> {
        let mut items = Vec::new();
        loop {
            self.skip_nl_only();
            if self.eat(&close) {
                return Ok(items);
            }
            items.push(item(self)?);
            self.skip_nl_only();
            if !self.eat(&Tok::Comma) {
                self.expect(close.clone(), &format!("`,` or {}", close.describe()))?;
                return Ok(items);
            }
        }
    }

    fn event_decl(&mut self) -> PResult<Item> {
        self.expect(Tok::Event, "`event`")?;
        let name = self.ident("an event name")?;
        self.expect(Tok::LBrace, "`{`")?;
        let fields = self.params(Tok::RBrace)?;
        Ok(Item::Event(EventDecl { name, fields }))
    }

    fn rule(&mut self) -> PResult<Item> {
        let start = self.span();
        let trigger = if self.eat(&Tok::Every) {
            Trigger::Every(self.expr()?)
        } else {
            self.expect(Tok::On, "`on`")?;
            Trigger::On(self.ident("an event name after `on`")?)
        };
        let span = start.to(self.prev_span());
        let condition = if self.eat(&Tok::Where) { Some(self.expr()?) } else { None };
        let body = self.block()?;
        Ok(Item::Rule(Rule { trigger, condition, body, span }))
    }

    fn type_expr(&mut self) -> PResult<TypeExpr> {
        self.enter()?;
        let start = self.span();
        let kind = if self.eat(&Tok::LBrace) {
            TypeExprKind::Record(self.params(Tok::RBrace)?)
        } else if self.eat(&Tok::Window) {
            TypeExprKind::Window(Box::new(self.type_arg()?))
        } else {
            let name = self.ident("a type")?;
            if name.name == "list" {
                TypeExprKind::List(Box::new(self.type_arg()?))
            } else {
                TypeExprKind::Named(name.name)
            }
        };
        self.leave();
        Ok(TypeExpr { kind, span: start.to(self.prev_span()) })
    }

    fn type_arg(&mut self) -> PResult<TypeExpr> {
        self.expect(Tok::Lt, "`<` and an element type")?;
        let t = self.type_expr()?;
        self.expect(Tok::Gt, "`>`")?;
        Ok(t)
    }

    fn block(&mut self) -> PResult<Block> {
        self.enter()?;
        let start = self.expect(Tok::LBrace, "`{`")?;
        let mut stmts = Vec::new();
        loop {
            self.skip_newlines();
            if self.at(&Tok::RBrace) {
                let end = self.span();
                self.bump();
                self.leave();
                return Ok(Block { stmts, span: start.to(end) });
            }
            if self.at(&Tok::Eof) {
                return Err(Diagnostic::new(start, "this `{` is never closed").with_label("unclosed block"));
            }
            stmts.push(self.stmt()?);
            self.end_of_statement()?;
        }
    }

    /// A statement ends at a newline, `;`, a closing `}` or the end of the file.
    fn end_of_statement(&mut self) -> PResult<()> {
        match self.peek() {
            Tok::Newline | Tok::Semi => {
                self.bump();
                Ok(())
            }
            Tok::RBrace | Tok::Eof => Ok(()),
            Tok::Ident(word) if crate::units::lookup(word).is_some() && matches!(self.peek_at_back(1), Tok::Int(_) | Tok::Float(_)) => {
                Err(self.error_here("end of line").with_help(format!("a unit goes right after its number, with no space: `5{word}`")))
            }
            _ => Err(self.error_here("end of line")),
        }
    }

    fn stmt(&mut self) -> PResult<Stmt> {
        let start = self.span();
        let kind = match self.peek() {
            Tok::Let => StmtKind::Let(self.let_binding()?),
            Tok::If => return self.if_stmt(),
            Tok::For => {
                self.bump();
                let var = self.ident("a loop variable")?;
                self.expect(Tok::In, "`in`")?;
                let iter = self.expr()?;
                let body = self.block()?;
                StmtKind::For { var, iter, body }
            }
            Tok::Return => {
                self.bump();
                let value = match self.peek() {
                    Tok::Newline | Tok::Semi | Tok::RBrace | Tok::Eof => None,
                    _ => Some(self.expr()?),
                };
                StmtKind::Return(value)
            }
            Tok::Window => {
                self.bump();
                let name = self.ident("a window name")?;
                self.expect(Tok::Colon, "`:` and an element type")?;
                let elem = self.type_expr()?;
                self.expect(Tok::LBracket, "`[` and a capacity, e.g. `[60]` or `[5m]`")?;
                let capacity = self.expr()?;
                self.expect(Tok::RBracket, "`]`")?;
                StmtKind::Window { name, elem, capacity }
            }
            Tok::Ident(_) if matches!(self.peek_at(1), Tok::Assign | Tok::PlusAssign | Tok::MinusAssign) => {
                let target = self.ident("a name")?;
                let op = match self.bump() {
                    Tok::PlusAssign => Some(BinOp::Add),
                    Tok::MinusAssign => Some(BinOp::Sub),
                    _ => None,
                };
                self.skip_nl_only();
                let value = self.expr()?;
                StmtKind::Assign { target, op, value }
            }
            _ => StmtKind::Expr(self.expr()?),
        };
        Ok(Stmt { kind, span: start.to(self.prev_span()) })
    }

    fn peek_at_back(&self, n: usize) -> &Tok {
        self.tokens.get(self.pos.wrapping_sub(n)).map(|t| &t.tok).unwrap_or(&Tok::Eof)
    }

    fn peek_at(&self, n: usize) -> &Tok {
        self.tokens.get(self.pos + n).map(|t| &t.tok).unwrap_or(&Tok::Eof)
    }

    fn if_stmt(&mut self) -> PResult<Stmt> {
        self.enter()?;
        let start = self.expect(Tok::If, "`if`")?;
        let cond = self.expr()?;
        let then = self.block()?;
        // `else` may sit on the next line after `}`.
        let save = self.pos;
        self.skip_nl_only();
        let otherwise = if self.eat(&Tok::Else) {
            if self.at(&Tok::If) {
                let nested = self.if_stmt()?;
                let span = nested.span;
                Some(Block { stmts: vec![nested], span })
            } else {
                Some(self.block()?)
            }
        } else {
            self.pos = save;
            None
        };
        self.leave();
        Ok(Stmt { kind: StmtKind::If { cond, then, otherwise }, span: start.to(self.prev_span()) })
    }

    pub fn expr(&mut self) -> PResult<Expr> {
        self.enter()?;
        let e = self.binary(0);
        self.leave();
        e
    }

    /// Precedence climbing: one frame per operator nesting (not per precedence level), so
    /// deep input costs little stack. Parses operators of level `min_level` or tighter.
    fn binary(&mut self, min_level: usize) -> PResult<Expr> {
        // `not` binds looser than comparisons: `not x in xs` means `not (x in xs)`.
        let mut lhs = if min_level <= COMPARE_LEVEL && self.at(&Tok::Not) {
            let start = self.span();
            self.bump();
            self.enter()?;
            let inner = self.binary(COMPARE_LEVEL);
            self.leave();
            let inner = inner?;
            let span = start.to(inner.span);
            Expr { kind: ExprKind::Unary(UnOp::Not, Box::new(inner)), span }
        } else {
            self.unary()?
        };
        let mut chain = 0;
        let mut after_comparison = false;
        while let Some((level, op)) = op_at(self.peek()) {
            if level < min_level {
                break;
            }
            // Comparisons do not chain: `a < b < c` is an error rather than a surprise.
            if after_comparison && level == COMPARE_LEVEL {
                return Err(Diagnostic::new(self.span(), "comparisons cannot be chained")
                    .with_help("combine them with `and`: `a < b and b < c`"));
            }
            after_comparison = level == COMPARE_LEVEL;
            chain += 1;
            // A long left-leaning chain is as deep as nesting for later passes.
            if self.depth + chain > MAX_DEPTH {
                return Err(Diagnostic::new(self.span(), "expression is too long").with_help("split it with `let`"));
            }
            self.bump();
            self.skip_nl_only();
            self.enter()?;
            let rhs = self.binary(level + 1);
            self.leave();
            let rhs = rhs?;
            let span = lhs.span.to(rhs.span);
            lhs = Expr { kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)), span };
        }
        Ok(lhs)
    }

    fn unary(&mut self) -> PResult<Expr> {
        let start = self.span();
        let op = match self.peek() {
            Tok::Minus => UnOp::Neg,
            _ => return self.postfix(),
        };
        self.bump();
        self.enter()?;
        let inner = self.unary()?;
        self.leave();
        // Fold `-5s` and `-3` into literals so `i64::MIN` and negative quantities read naturally.
        let span = start.to(inner.span);
        let kind = match (op, &inner.kind) {
            (UnOp::Neg, ExprKind::Int(n)) => ExprKind::Int(n.wrapping_neg()),
            (UnOp::Neg, ExprKind::Float(f)) => ExprKind::Float(-f),
            (UnOp::Neg, ExprKind::Quantity(k, n)) => ExprKind::Quantity(*k, n.wrapping_neg()),
            _ => ExprKind::Unary(op, Box::new(inner)),
        };
        Ok(Expr { kind, span })
    }

    fn postfix(&mut self) -> PResult<Expr> {
        let mut e = self.primary()?;
        let mut n = 0;
        loop {
            n += 1;
            if self.depth + n > MAX_DEPTH {
                return Err(Diagnostic::new(self.span(), "expression is too long").with_help("split it with `let`"));
            }
            if self.eat(&Tok::Dot) {
                let field = self.ident("a field name after `.`")?;
                let span = e.span.to(field.span);
                e = Expr { kind: ExprKind::Field(Box::new(e), field), span };
            } else if self.at(&Tok::LBracket) {
                self.bump();
                self.skip_nl_only();
                let index = self.expr()?;
                self.skip_nl_only();
                let end = self.expect(Tok::RBracket, "`]`")?;
                let span = e.span.to(end);
                e = Expr { kind: ExprKind::Index(Box::new(e), Box::new(index)), span };
            } else {
                return Ok(e);
            }
        }
    }

    fn primary(&mut self) -> PResult<Expr> {
        let span = self.span();
        let kind = match self.peek().clone() {
            Tok::Int(n) => ExprKind::Int(n),
            Tok::Float(f) => ExprKind::Float(f),
            Tok::Quantity(k, n) => ExprKind::Quantity(k, n),
            Tok::Str(s) => ExprKind::Str(s),
            Tok::True => ExprKind::Bool(true),
            Tok::False => ExprKind::Bool(false),
            Tok::Event => ExprKind::EventRef,
            Tok::Ident(name) => {
                self.bump();
                if self.at(&Tok::LParen) {
                    self.bump();
                    let args = self.comma_list(Tok::RParen)?;
                    let callee = Ident { name, span };
                    return Ok(Expr { kind: ExprKind::Call(callee, args), span: span.to(self.prev_span()) });
                }
                return Ok(Expr { kind: ExprKind::Name(name), span });
            }
            Tok::LParen => {
                self.bump();
                self.skip_nl_only();
                let inner = self.expr()?;
                self.skip_nl_only();
                self.expect(Tok::RParen, "`)`")?;
                return Ok(Expr { kind: inner.kind, span: span.to(self.prev_span()) });
            }
            Tok::LBracket => {
                self.bump();
                let items = self.comma_list(Tok::RBracket)?;
                return Ok(Expr { kind: ExprKind::List(items), span: span.to(self.prev_span()) });
            }
            Tok::LBrace => {
                self.bump();
                return self.record(span);
            }
            _ => return Err(self.error_here("an expression")),
        };
        self.bump();
        Ok(Expr { kind, span })
    }

    /// Comma-separated expressions up to and including `close`.
    fn comma_list(&mut self, close: Tok) -> PResult<Vec<Expr>> {
        self.separated(close, |p| p.expr())
    }

    fn record(&mut self, start: Span) -> PResult<Expr> {
        let fields = self.separated(Tok::RBrace, |p| {
            let name = p.ident("a field name")?;
            p.expect(Tok::Colon, "`:` after the field name")?;
            p.skip_nl_only();
            Ok((name, p.expr()?))
        })?;
        Ok(Expr { kind: ExprKind::Record(fields), span: start.to(self.prev_span()) })
    }
}

/// Binary operator levels, loosest first.
const LEVELS: [&[(Tok, BinOp)]; 5] = [
    &[(Tok::Or, BinOp::Or)],
    &[(Tok::And, BinOp::And)],
    &[
        (Tok::EqEq, BinOp::Eq),
        (Tok::NotEq, BinOp::Ne),
        (Tok::Lt, BinOp::Lt),
        (Tok::Le, BinOp::Le),
        (Tok::Gt, BinOp::Gt),
        (Tok::Ge, BinOp::Ge),
        (Tok::In, BinOp::In),
    ],
    &[(Tok::Plus, BinOp::Add), (Tok::Minus, BinOp::Sub)],
    &[(Tok::Star, BinOp::Mul), (Tok::Slash, BinOp::Div), (Tok::Percent, BinOp::Rem)],
];
const COMPARE_LEVEL: usize = 2;

/// The operator a token spells, with its precedence level.
fn op_at(tok: &Tok) -> Option<(usize, BinOp)> {
    LEVELS.iter().enumerate().find_map(|(level, ops)| ops.iter().find(|(t, _)| t == tok).map(|(_, op)| (level, *op)))
}
