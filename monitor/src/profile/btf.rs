//! A reader of the kernel's `.BTF` section (Documentation/bpf/btf.rst):
//! types by name, and member offsets and sizes by path, through anonymous
//! structs/unions, typedefs and qualifiers, and into arrays (`count[2]`).
use super::bytes::{cstr_at, slice, u16_at, u32_at};
use super::error::ProfileError;
use std::collections::HashMap;

const BTF_MAGIC: u16 = 0xeb9f;
/// Typedef/qualifier chains are short; more is a loop in garbled data.
const MAX_CHAIN: usize = 64;
/// Anonymous members nest a few levels deep in the kernel.
const MAX_NESTING: usize = 16;

/// BTF kinds (btf.rst §2.2).
mod kind {
    pub const INT: u8 = 1;
    pub const PTR: u8 = 2;
    pub const ARRAY: u8 = 3;
    pub const STRUCT: u8 = 4;
    pub const UNION: u8 = 5;
    pub const ENUM: u8 = 6;
    pub const FWD: u8 = 7;
    pub const TYPEDEF: u8 = 8;
    pub const VOLATILE: u8 = 9;
    pub const CONST: u8 = 10;
    pub const RESTRICT: u8 = 11;
    pub const FUNC: u8 = 12;
    pub const FUNC_PROTO: u8 = 13;
    pub const VAR: u8 = 14;
    pub const DATASEC: u8 = 15;
    pub const FLOAT: u8 = 16;
    pub const DECL_TAG: u8 = 17;
    pub const TYPE_TAG: u8 = 18;
    pub const ENUM64: u8 = 19;
}

/// A member's byte offset and size inside its outermost struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Field {
    pub offset: u64,
    pub size: u64,
}

impl Field {
    /// The byte just past the field.
    pub fn end(&self) -> u64 {
        self.offset + self.size
    }
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u8,
    /// Size for INT/STRUCT/UNION/ENUM/FLOAT, target type for the others.
    size_or_type: u32,
    /// Range into `Btf::members` (STRUCT/UNION), or the array (elem, nelems).
    members: std::ops::Range<usize>,
    array: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    ty: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// The parsed type section; type id `n` is `types[n - 1]` (0 is void).
#[derive(Debug)]
pub struct Btf<'a> {
    strings: &'a [u8],
    types: Vec<Type>,
    members: Vec<Member>,
    /// (name, value) of every enumerator, for constants like MM_ANONPAGES.
    enumerators: Vec<(u32, i64)>,
    /// Struct/union name → id (the largest of that name).
    structs: HashMap<&'a str, u32>,
}

impl<'a> Btf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ProfileError> {
        let bad = |d: &str| ProfileError::no_btf(d.to_string());
        if u16_at(data, 0) != Some(BTF_MAGIC) {
            return Err(bad("no BTF magic 0xeb9f (big-endian BTF is not supported)"));
        }
        let hdr = |o| u32_at(data, o).map(u64::from).ok_or_else(|| bad("truncated BTF header"));
        let (hdr_len, type_off, type_len, str_off, str_len) = (hdr(4)?, hdr(8)?, hdr(12)?, hdr(16)?, hdr(20)?);
        let types_raw = slice(data, hdr_len + type_off, type_len).ok_or_else(|| bad("type section past the end"))?;
        let strings = slice(data, hdr_len + str_off, str_len).ok_or_else(|| bad("string section past the end"))?;
        let mut btf = Btf { strings, types: Vec::new(), members: Vec::new(), enumerators: Vec::new(), structs: HashMap::new() };
        btf.parse_types(types_raw).ok_or_else(|| bad("truncated or garbled type section"))?;
        btf.index_structs();
        Ok(btf)
    }

    fn index_structs(&mut self) {
        let mut structs: HashMap<&'a str, u32> = HashMap::new();
        for (i, t) in self.types.iter().enumerate() {
            if !matches!(t.kind, kind::STRUCT | kind::UNION) {
                continue;
            }
            let name = self.name(t.name_off);
            if name.is_empty() {
                continue;
            }
            let id = i as u32 + 1;
            let slot = structs.entry(name).or_insert(id);
            let current = self.ty(*slot).map_or(0, |c| c.size_or_type);
            if t.size_or_type > current {
                *slot = id;
            }
        }
        self.structs = structs;
    }

    /// Reads the type records; each is at least 12 bytes, so the loop is
    /// bounded by the section's length.
    fn parse_types(&mut self, t: &[u8]) -> Option<()> {
        let mut off = 0u64;
        while off < t.len() as u64 {
            let name_off = u32_at(t, off)?;
            let info = u32_at(t, off + 4)?;
            let size_or_type = u32_at(t, off + 8)?;
            let vlen = u64::from(info & 0xffff);
            let kind = ((info >> 24) & 0x1f) as u8;
            let kflag = info >> 31 == 1;
            let mut ty = Type { name_off, kind, size_or_type, members: 0..0, array: None };
            let body = off + 12;
            let extra = match kind {
                kind::INT | kind::VAR | kind::DECL_TAG => 4,
                kind::ARRAY => {
                    ty.array = Some((u32_at(t, body)?, u32_at(t, body + 8)?));
                    12
                }
                kind::STRUCT | kind::UNION => {
                    let first = self.members.len();
                    for i in 0..vlen {
                        let m = body + 12 * i;
                        let raw = u32_at(t, m + 8)?;
                        let (bit_offset, bitfield_size) = if kflag { (raw & 0xff_ffff, raw >> 24) } else { (raw, 0) };
                        self.members.push(Member { name_off: u32_at(t, m)?, ty: u32_at(t, m + 4)?, bit_offset, bitfield_size });
                    }
                    ty.members = first..self.members.len();
                    12 * vlen
                }
                kind::ENUM => {
                    for i in 0..vlen {
                        let e = body + 8 * i;
                        self.enumerators.push((u32_at(t, e)?, i64::from(u32_at(t, e + 4)? as i32)));
                    }
                    8 * vlen
                }
                kind::ENUM64 => {
                    for i in 0..vlen {
                        let e = body + 12 * i;
                        let v = u64::from(u32_at(t, e + 4)?) | (u64::from(u32_at(t, e + 8)?) << 32);
                        self.enumerators.push((u32_at(t, e)?, v as i64));
                    }
                    12 * vlen
                }
                kind::FUNC_PROTO => 8 * vlen,
                kind::DATASEC => 12 * vlen,
                kind::PTR | kind::FWD | kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::FUNC
                | kind::FLOAT | kind::TYPE_TAG => 0,
                _ => return None,
            };
            off = body + extra;
            if off > t.len() as u64 {
                return None;
            }
            self.types.push(ty);
        }
        Some(())
    }

    pub fn type_count(&self) -> usize {
        self.types.len()
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get(usize::try_from(id).ok()?.checked_sub(1)?)
    }

    fn name(&self, off: u32) -> &'a str {
        cstr_at(self.strings, u64::from(off), 4096).and_then(|s| std::str::from_utf8(s).ok()).unwrap_or("")
    }

    /// The struct or union called `name` (with members; a forward
    /// declaration is not it). If several share the name, the largest.
    pub fn find_struct(&self, name: &str) -> Option<u32> {
        self.structs.get(name).copied()
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        for _ in 0..MAX_CHAIN {
            let t = self.ty(id)?;
            match t.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => id = t.size_or_type,
                _ => return Some(id),
            }
        }
        None
    }

    /// The size in bytes of type `id`.
    pub fn size_of(&self, id: u32) -> Option<u64> {
        let id = self.resolve(id)?;
        let t = self.ty(id)?;
        match t.kind {
            kind::INT | kind::STRUCT | kind::UNION | kind::ENUM | kind::ENUM64 | kind::FLOAT => Some(u64::from(t.size_or_type)),
            kind::PTR => Some(8),
            kind::ARRAY => {
                let (elem, n) = t.array?;
                // Array elements are never arrays of themselves; bound the depth anyway.
                self.array_size(elem, n, MAX_CHAIN)
            }
            _ => None,
        }
    }

    fn array_size(&self, elem: u32, n: u32, depth: usize) -> Option<u64> {
        let id = self.resolve(elem)?;
        let t = self.ty(id)?;
        let elem_size = match (t.kind, t.array) {
            (kind::ARRAY, Some((e, m))) if depth > 0 => self.array_size(e, m, depth - 1)?,
            (kind::ARRAY, _) => return None,
            _ => self.size_of(id)?,
        };
        elem_size.checked_mul(u64::from(n))
    }

    /// The size of the struct or union called `name`.
    pub fn struct_size(&self, name: &str) -> Option<u64> {
        self.size_of(self.find_struct(name)?)
    }

    /// The offset and size of `path` (`tasks.next`, `d_name.len`,
    /// `rss_stat.count[1]`) inside the struct or union `type_name`.
    pub fn field(&self, type_name: &str, path: &str) -> Result<Field, String> {
        let root = self.find_struct(type_name).ok_or_else(|| format!("no struct or union named `{type_name}`"))?;
        self.field_in(root, path).map_err(|e| format!("`{type_name}.{path}`: {e}"))
    }

    fn field_in(&self, root: u32, path: &str) -> Result<Field, String> {
        let mut cur = root;
        let mut offset = 0u64;
        let mut size = self.size_of(root).ok_or("the type has no size")?;
        for part in path.split('.') {
            let (name, index) = split_index(part)?;
            let (member_off, member_ty) = self.member(cur, name, 0)?.ok_or_else(|| format!("no member `{name}`"))?;
            offset += member_off;
            cur = self.resolve(member_ty).ok_or("a type chain is broken")?;
            if let Some(i) = index {
                let t = self.ty(cur).ok_or("a type id is out of range")?;
                let (elem, n) = t.array.filter(|_| t.kind == kind::ARRAY).ok_or_else(|| format!("`{name}` is not an array"))?;
                if n != 0 && i >= u64::from(n) {
                    return Err(format!("index {i} is past `{name}`'s {n} elements"));
                }
                cur = self.resolve(elem).ok_or("a type chain is broken")?;
                let elem_size = self.size_of(cur).ok_or("the array element has no size")?;
                offset += i * elem_size;
            }
            size = self.size_of(cur).ok_or_else(|| format!("`{name}` has no size"))?;
        }
        Ok(Field { offset, size })
    }

    /// Finds member `name` in struct/union `id`, also inside its anonymous
    /// struct/union members (as C does); returns (byte offset, type).
    fn member(&self, id: u32, name: &str, depth: usize) -> Result<Option<(u64, u32)>, String> {
        let t = self.ty(id).ok_or("a type id is out of range")?;
        if !matches!(t.kind, kind::STRUCT | kind::UNION) {
            return Err(format!("cannot look up `{name}` in a type that is not a struct or union"));
        }
        let members = self.members.get(t.members.clone()).ok_or("a member range is out of bounds")?;
        for m in members {
            let here = self.name(m.name_off);
            if here == name {
                if m.bitfield_size != 0 || m.bit_offset % 8 != 0 {
                    return Err(format!("`{name}` is a bitfield"));
                }
                return Ok(Some((u64::from(m.bit_offset / 8), m.ty)));
            }
            if here.is_empty() && depth < MAX_NESTING {
                let inner = self.resolve(m.ty).ok_or("a type chain is broken")?;
                if self.ty(inner).is_some_and(|t| matches!(t.kind, kind::STRUCT | kind::UNION)) {
                    if let Some((off, ty)) = self.member(inner, name, depth + 1)? {
                        return Ok(Some((u64::from(m.bit_offset / 8) + off, ty)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The value of the enumerator `name` (first match).
    pub fn enum_value(&self, name: &str) -> Option<i64> {
        self.enumerators.iter().find(|(n, _)| self.name(*n) == name).map(|&(_, v)| v)
    }
}

/// `count[2]` → ("count", Some(2)); `tasks` → ("tasks", None).
fn split_index(part: &str) -> Result<(&str, Option<u64>), String> {
    match part.split_once('[') {
        None => Ok((part, None)),
        Some((name, rest)) => {
            let idx = rest.strip_suffix(']').and_then(|i| i.parse().ok()).ok_or_else(|| format!("bad index in `{part}`"))?;
            Ok((name, Some(idx)))
        }
    }
}
