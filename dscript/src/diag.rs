//! Diagnostics: one message anchored to a span, rendered with the source line underlined.

use crate::span::Span;
use ariadne::{Config, IndexType, Label, Report, ReportKind, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// A problem found in a policy, by the lexer, parser, checker or at run time.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub span: Span,
    pub message: String,
    /// Text shown under the caret; defaults to the message.
    pub label: Option<String>,
    /// Further places that explain the error (e.g. where a name was declared).
    pub secondary: Vec<(Span, String)>,
    pub help: Option<String>,
    pub note: Option<String>,
}

impl Diagnostic {
    pub fn new(span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            span,
            message: message.into(),
            label: None,
            secondary: Vec::new(),
            help: None,
            note: None,
        }
    }

    pub fn warning(span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::new(span, message) }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Diagnostic {
        self.label = Some(label.into());
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.note = Some(note.into());
        self
    }

    pub fn with_secondary(mut self, span: Span, text: impl Into<String>) -> Diagnostic {
        self.secondary.push((span, text.into()));
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// Renders like a compiler message: `file:line:col`, the source line and an underline.
    pub fn render(&self, file: &str, src: &str, color: bool) -> String {
        let clamp = |s: Span| {
            let end = (s.end as usize).min(src.len());
            let start = (s.start as usize).min(end);
            start..end
        };
        let kind = match self.severity {
            Severity::Error => ReportKind::Error,
            Severity::Warning => ReportKind::Warning,
        };
        let label_text = self.label.clone().unwrap_or_else(|| self.message.clone());
        let mut report = Report::build(kind, (file, clamp(self.span)))
            .with_config(Config::default().with_color(color).with_index_type(IndexType::Byte))
            .with_message(&self.message)
            .with_label(Label::new((file, clamp(self.span))).with_message(label_text).with_order(0));
        for (i, (span, text)) in self.secondary.iter().enumerate() {
            report = report.with_label(Label::new((file, clamp(*span))).with_message(text).with_order(i as i32 + 1));
        }
        if let Some(help) = &self.help {
            report = report.with_help(help);
        }
        if let Some(note) = &self.note {
            report = report.with_note(note);
        }
        let mut out = Vec::new();
        // Writing into a Vec cannot fail; a failure would only lose the pretty form, so fall back.
        if report.finish().write((file, Source::from(src)), &mut out).is_err() {
            return format!("{}\n", self.one_line(file, src));
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// One line, for logs: `file:line:col: error: message`.
    pub fn one_line(&self, file: &str, src: &str) -> String {
        let (line, col) = self.span.line_col(src);
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        format!("{file}:{line}:{col}: {sev}: {}", self.message)
    }
}

/// Renders many diagnostics in order.
pub fn render_all(diags: &[Diagnostic], file: &str, src: &str, color: bool) -> String {
    diags.iter().map(|d| d.render(file, src, color)).collect()
}
