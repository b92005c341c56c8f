//! Turns policy source into tokens. Newlines are tokens because they end statements.

use crate::diag::Diagnostic;
use crate::span::Span;
use crate::units::{self, UnitKind};

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    Int(i64),
    Float(f64),
    /// A duration (nanoseconds) or size (bytes) literal.
    Quantity(UnitKind, i64),
    Str(String),
    Ident(String),
    // Keywords.
    Let,
    Fn,
    If,
    Else,
    For,
    In,
    Return,
    Every,
    On,
    Where,
    Event,
    Window,
    True,
    False,
    And,
    Or,
    Not,
    // Punctuation.
    LParen,
    RParen,
    LBrace,
    RBrace,
    LBracket,
    RBracket,
    Comma,
    Colon,
    Semi,
    Dot,
    Arrow,
    Assign,
    PlusAssign,
    MinusAssign,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    EqEq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    Newline,
    Eof,
}

impl Tok {
    /// How the token is named in "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match self {
            Tok::Int(n) => format!("number `{n}`"),
            Tok::Float(f) => format!("number `{f}`"),
            Tok::Quantity(UnitKind::Duration, _) => "duration".into(),
            Tok::Quantity(UnitKind::Size, _) => "size".into(),
            Tok::Str(_) => "string".into(),
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Newline => "end of line".into(),
            Tok::Eof => "end of file".into(),
            other => format!("`{}`", other.text()),
        }
    }

    fn text(&self) -> &'static str {
        match self {
            Tok::Let => "let",
            Tok::Fn => "fn",
            Tok::If => "if",
            Tok::Else => "else",
            Tok::For => "for",
            Tok::In => "in",
            Tok::Return => "return",
            Tok::Every => "every",
            Tok::On => "on",
            Tok::Where => "where",
            Tok::Event => "event",
            Tok::Window => "window",
            Tok::True => "true",
            Tok::False => "false",
            Tok::And => "and",
            Tok::Or => "or",
            Tok::Not => "not",
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::LBrace => "{",
            Tok::RBrace => "}",
            Tok::LBracket => "[",
            Tok::RBracket => "]",
            Tok::Comma => ",",
            Tok::Colon => ":",
            Tok::Semi => ";",
            Tok::Dot => ".",
            Tok::Arrow => "->",
            Tok::Assign => "=",
            Tok::PlusAssign => "+=",
            Tok::MinusAssign => "-=",
            Tok::Plus => "+",
            Tok::Minus => "-",
            Tok::Star => "*",
            Tok::Slash => "/",
            Tok::Percent => "%",
            Tok::EqEq => "==",
            Tok::NotEq => "!=",
            Tok::Lt => "<",
            Tok::Le => "<=",
            Tok::Gt => ">",
            Tok::Ge => ">=",
            _ => "?",
        }
    }
}

pub fn is_keyword(word: &str) -> bool {
    keyword(word).is_some()
}

fn keyword(word: &str) -> Option<Tok> {
    Some(match word {
        "let" => Tok::Let,
        "fn" => Tok::Fn,
        "if" => Tok::If,
        "else" => Tok::Else,
        "for" => Tok::For,
        "in" => Tok::In,
        "return" => Tok::Return,
        "every" => Tok::Every,
        "on" => Tok::On,
        "where" => Tok::Where,
        "event" => Tok::Event,
        "window" => Tok::Window,
        "true" => Tok::True,
        "false" => Tok::False,
        "and" => Tok::And,
        "or" => Tok::Or,
        "not" => Tok::Not,
        _ => return None,
    })
}

#[derive(Debug, Clone)]
pub struct Token {
    pub tok: Tok,
    pub span: Span,
}

/// Lexes the whole source; stops at the first malformed token.
pub fn lex(src: &str) -> Result<Vec<Token>, Diagnostic> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\r' => i += 1,
            b'\n' => {
                out.push(Token { tok: Tok::Newline, span: Span::new(i, i + 1) });
                i += 1;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'0'..=b'9' => {
                let (tok, end) = lex_number(src, start)?;
                out.push(Token { tok, span: Span::new(start, end) });
                i = end;
            }
            b'"' => {
                let (s, end) = lex_string(src, start)?;
                out.push(Token { tok: Tok::Str(s), span: Span::new(start, end) });
                i = end;
            }
            c if c == b'_' || c.is_ascii_alphabetic() => {
                while i < bytes.len() && (bytes[i] == b'_' || bytes[i].is_ascii_alphanumeric()) {
                    i += 1;
                }
                let word = &src[start..i];
                let tok = keyword(word).unwrap_or_else(|| Tok::Ident(word.to_string()));
                out.push(Token { tok, span: Span::new(start, i) });
            }
            _ => {
                let two = src.get(i..i + 2).unwrap_or("");
                let (tok, len) = match two {
                    "->" => (Tok::Arrow, 2),
                    "==" => (Tok::EqEq, 2),
                    "!=" => (Tok::NotEq, 2),
                    "<=" => (Tok::Le, 2),
                    ">=" => (Tok::Ge, 2),
                    "+=" => (Tok::PlusAssign, 2),
                    "-=" => (Tok::MinusAssign, 2),
                    "&&" | "||" => {
                        let word = if two == "&&" { "and" } else { "or" };
                        return Err(Diagnostic::new(Span::new(i, i + 2), format!("unknown operator `{two}`"))
                            .with_help(format!("D-Script spells it `{word}`")));
                    }
                    _ => match c {
                        b'(' => (Tok::LParen, 1),
                        b')' => (Tok::RParen, 1),
                        b'{' => (Tok::LBrace, 1),
                        b'}' => (Tok::RBrace, 1),
                        b'[' => (Tok::LBracket, 1),
                        b']' => (Tok::RBracket, 1),
                        b',' => (Tok::Comma, 1),
                        b':' => (Tok::Colon, 1),
                        b';' => (Tok::Semi, 1),
                        b'.' => (Tok::Dot, 1),
                        b'=' => (Tok::Assign, 1),
                        b'+' => (Tok::Plus, 1),
                        b'-' => (Tok::Minus, 1),
                        b'*' => (Tok::Star, 1),
                        b'/' => (Tok::Slash, 1),
                        b'%' => (Tok::Percent, 1),
                        b'<' => (Tok::Lt, 1),
                        b'>' => (Tok::Gt, 1),
                        _ => {
                            let ch = src[i..].chars().next().unwrap_or('?');
                            let mut d = Diagnostic::new(Span::new(i, i + ch.len_utf8()), format!("unexpected character `{ch}`"));
                            if ch == '!' {
                                d = d.with_help("negate with `not`");
                            }
                            return Err(d);
                        }
                    },
                };
                out.push(Token { tok, span: Span::new(i, i + len) });
                i += len;
            }
        }
    }
    out.push(Token { tok: Tok::Eof, span: Span::new(src.len(), src.len()) });
    Ok(out)
}

/// A number, optionally with a fraction, exponent or unit suffix (`500ms`, `1.5GiB`).
fn lex_number(src: &str, start: usize) -> Result<(Tok, usize), Diagnostic> {
    lex_number_part(src, start, 0)
}

/// `part` counts the pieces of a compound duration, which are bounded (d, h, m, s, ms, us, ns).
fn lex_number_part(src: &str, start: usize, part: usize) -> Result<(Tok, usize), Diagnostic> {
    let bytes = src.as_bytes();
    let mut i = start;
    let digits = |i: &mut usize| {
        while *i < bytes.len() && (bytes[*i].is_ascii_digit() || bytes[*i] == b'_') {
            *i += 1;
        }
    };
    digits(&mut i);
    let mut is_float = false;
    // A dot only belongs to the number when a digit follows (so `xs.len` style stays possible).
    if i + 1 < bytes.len() && bytes[i] == b'.' && bytes[i + 1].is_ascii_digit() {
        is_float = true;
        i += 1;
        digits(&mut i);
    }
    let num_end = i;
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        let mut j = i + 1;
        if j < bytes.len() && (bytes[j] == b'+' || bytes[j] == b'-') {
            j += 1;
        }
        if j < bytes.len() && bytes[j].is_ascii_digit() {
            i = j;
            digits(&mut i);
            let text: String = src[start..i].chars().filter(|&c| c != '_').collect();
            let value = text.parse::<f64>().map_err(|_| Diagnostic::new(Span::new(start, i), "malformed number"))?;
            return Ok((Tok::Float(value), i));
        }
    }
    let suffix_start = i;
    while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
        i += 1;
    }
    let text = &src[start..num_end];
    let span = Span::new(start, i);
    if suffix_start < i {
        let suffix = &src[suffix_start..i];
        // A compound duration continues with more digits: `1h30m`, `2m10s`.
        if units::lookup(suffix).is_some_and(|(k, _)| k == UnitKind::Duration) && bytes.get(i).is_some_and(|b| b.is_ascii_digit()) {
            if part >= 7 {
                return Err(Diagnostic::new(Span::new(start, i), "too many parts in a compound duration"));
            }
            let (next, end) = lex_number_part(src, i, part + 1)?;
            let whole = Span::new(start, end);
            let own = units::scale(text, units::lookup(suffix).map(|(_, f)| f).unwrap_or(1));
            return match (next, own) {
                (Tok::Quantity(UnitKind::Duration, more), Some(own)) => match own.checked_add(more) {
                    Some(v) => Ok((Tok::Quantity(UnitKind::Duration, v), end)),
                    None => Err(Diagnostic::new(whole, "literal is too large")),
                },
                _ => Err(Diagnostic::new(whole, "a compound duration continues with another duration, e.g. `1h30m`")),
            };
        }
        let Some((kind, factor)) = units::lookup(suffix) else {
            let mut d = Diagnostic::new(span, format!("unknown unit `{suffix}`"));
            let hints = units::suggest(suffix);
            d = if hints.is_empty() {
                d.with_help(format!("units are {}", units::all_suffixes()))
            } else {
                let quoted: Vec<String> = hints.iter().map(|h| format!("`{h}`")).collect();
                d.with_help(format!("did you mean {}?", quoted.join(" or ")))
            };
            return Err(d);
        };
        let value = units::scale(text, factor).ok_or_else(|| Diagnostic::new(span, "literal is too large"))?;
        return Ok((Tok::Quantity(kind, value), i));
    }
    let clean: String = text.chars().filter(|&c| c != '_').collect();
    if is_float {
        let value = clean.parse::<f64>().map_err(|_| Diagnostic::new(span, "malformed number"))?;
        Ok((Tok::Float(value), i))
    } else {
        let value = clean
            .parse::<i64>()
            .map_err(|_| Diagnostic::new(span, "integer literal is too large").with_help("integers are 64-bit signed"))?;
        Ok((Tok::Int(value), i))
    }
}

fn lex_string(src: &str, start: usize) -> Result<(String, usize), Diagnostic> {
    let mut out = String::new();
    let mut chars = src[start + 1..].char_indices();
    while let Some((off, c)) = chars.next() {
        let at = start + 1 + off;
        match c {
            '"' => return Ok((out, at + 1)),
            '\n' => break,
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                Some((_, '\\')) => out.push('\\'),
                Some((_, '"')) => out.push('"'),
                Some((eoff, e)) => {
                    let end = start + 1 + eoff + e.len_utf8();
                    return Err(Diagnostic::new(Span::new(at, end), format!("unknown escape `\\{e}`"))
                        .with_help("escapes are \\n, \\t, \\\\ and \\\""));
                }
                None => break,
            },
            c => out.push(c),
        }
    }
    let line_end = src[start..].find('\n').map(|n| start + n).unwrap_or(src.len());
    Err(Diagnostic::new(Span::new(start, line_end), "unterminated string").with_help("close it with `\"` on the same line"))
}
