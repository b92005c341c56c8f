//! Static types of D-Script values.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Type {
    Int,
    Float,
    Str,
    Bool,
    /// Nanoseconds; written `500ms`, `5s`, `1h`.
    Duration,
    /// Bytes; written `64KiB`, `1GiB`.
    Size,
    /// What actions and statements return.
    Unit,
    List(Box<Type>),
    /// Fields sorted by name, so two record types with the same fields are equal.
    Record(Vec<(String, Type)>),
    /// A series of numbers with timestamps, kept across rule firings.
    Window(Box<Type>),
    /// The type of an expression that already failed to check; never reported twice.
    Error,
}

impl Type {
    pub fn list(elem: Type) -> Type {
        Type::List(Box::new(elem))
    }

    pub fn record(mut fields: Vec<(String, Type)>) -> Type {
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        Type::Record(fields)
    }

    /// Types that hold an `i64` at run time and take part in statistics.
    pub fn is_numeric(&self) -> bool {
        matches!(self, Type::Int | Type::Float | Type::Duration | Type::Size)
    }

    /// Durations and sizes: numbers that carry a unit.
    pub fn is_quantity(&self) -> bool {
        matches!(self, Type::Duration | Type::Size)
    }

    /// Whether held as `Value::Int` at run time.
    pub fn is_int_repr(&self) -> bool {
        matches!(self, Type::Int | Type::Duration | Type::Size)
    }

    /// `self` is acceptable where `want` is expected (`Error` matches anything to avoid cascades).
    pub fn fits(&self, want: &Type) -> bool {
        match (self, want) {
            (Type::Error, _) | (_, Type::Error) => true,
            (Type::List(a), Type::List(b)) | (Type::Window(a), Type::Window(b)) => a.fits(b),
            (Type::Record(a), Type::Record(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && x.1.fits(&y.1))
            }
            (a, b) => a == b,
        }
    }

    /// The field's index and type in a record type.
    pub fn field(&self, name: &str) -> Option<(usize, &Type)> {
        match self {
            Type::Record(fields) => fields.iter().enumerate().find(|(_, f)| f.0 == name).map(|(i, f)| (i, &f.1)),
            _ => None,
        }
    }

    /// Element type of something `for` and statistics can walk: a list or a window.
    pub fn elem(&self) -> Option<&Type> {
        match self {
            Type::List(e) | Type::Window(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Int => write!(f, "int"),
            Type::Float => write!(f, "float"),
            Type::Str => write!(f, "string"),
            Type::Bool => write!(f, "bool"),
            Type::Duration => write!(f, "duration"),
            Type::Size => write!(f, "size"),
            Type::Unit => write!(f, "nothing"),
            Type::List(e) => write!(f, "list<{e}>"),
            Type::Window(e) => write!(f, "window<{e}>"),
            Type::Record(fields) => {
                write!(f, "{{")?;
                for (i, (name, ty)) in fields.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{name}: {ty}")?;
                }
                write!(f, "}}")
            }
            Type::Error => write!(f, "?"),
        }
    }
}
