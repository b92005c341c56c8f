//! The Pannus-style command file: one command a line,
//!
//! ```text
//! # comment
//! J target_function patch_function   # redirect a function
//! V target_variable HEXBYTES         # overwrite a variable (bytes in memory order)
//! P target_pointer patch_symbol      # point a pointer at a patch symbol
//! ```
//!
//! `#` starts a comment anywhere on a line; blank lines are ignored. Each
//! target may appear once. Errors carry `file:line:` and what was expected.
use std::collections::HashMap;

use super::PatchError;

/// What a command does to its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `J`: jump from the target function to `patch_function`.
    Jump { patch_function: String },
    /// `V`: write `bytes` (memory order) at the target variable.
    Variable { bytes: Vec<u8> },
    /// `P`: store the address of `patch_symbol` in the target pointer.
    Pointer { patch_symbol: String },
}

impl Action {
    pub fn letter(&self) -> char {
        match self {
            Action::Jump { .. } => 'J',
            Action::Variable { .. } => 'V',
            Action::Pointer { .. } => 'P',
        }
    }
}

/// One command, with the line it came from (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub line: usize,
    /// A symbol of the target program.
    pub target: String,
    pub action: Action,
}

/// A parsed command file. `name` labels error messages (usually the path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandFile {
    pub name: String,
    pub commands: Vec<Command>,
}

impl CommandFile {
    /// Parses a command file's text; `name` is used in error messages.
    /// A file without any command is an error.
    pub fn parse(name: &str, text: &str) -> Result<Self, PatchError> {
        let err = |line: usize, msg: String| PatchError::Command { file: name.to_string(), line, msg };
        let mut commands = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let body = raw.split('#').next().unwrap_or("");
            let words: Vec<&str> = body.split_whitespace().collect();
            let Some((&op, args)) = words.split_first() else { continue };
            let (usage, action_of): (&str, ArgParser) = match op {
                "J" => ("J target_function patch_function", |a| Ok(Action::Jump { patch_function: symbol(a, "J patch function")? })),
                "V" => ("V target_variable HEXBYTES", |a| Ok(Action::Variable { bytes: hex_bytes(a)? })),
                "P" => ("P target_pointer patch_symbol", |a| Ok(Action::Pointer { patch_symbol: symbol(a, "P patch symbol")? })),
                other => {
                    let hint = if matches!(other, "j" | "v" | "p") { " (commands are upper case)" } else { "" };
                    return Err(err(line, format!("unknown command {other:?}: use J, V or P{hint}")));
                }
            };
            let [target, arg] = args else {
                return Err(err(line, format!("{op} takes 2 arguments, got {}: expected `{usage}`", args.len())));
            };
            let target = symbol(target, &format!("{op} target")).map_err(|m| err(line, m))?;
            let action = action_of(arg).map_err(|m| err(line, m))?;
            if let Some(first) = seen.insert(target.clone(), line) {
                return Err(err(line, format!("{target} is already patched by line {first}; one command per target")));
            }
            commands.push(Command { line, target, action });
        }
        if commands.is_empty() {
            return Err(PatchError::CommandFile {
                file: name.to_string(),
                msg: "no commands: expected lines like `J target_function patch_function`, `V target_variable HEXBYTES` or `P target_pointer patch_symbol`".into(),
            });
        }
        Ok(CommandFile { name: name.to_string(), commands })
    }
}

/// Turns a command's last argument into its action, or says what is wrong.
type ArgParser = fn(&str) -> Result<Action, String>;

/// A C-ish symbol name: letters, digits, `_`, `.`, `$`, `@` (for versioned
/// or compiler-made names such as `names.0`), not starting with a digit.
fn symbol(word: &str, what: &str) -> Result<String, String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '$' | '@');
    if word.starts_with(|c: char| c.is_ascii_digit()) || !word.chars().all(ok_char) {
        return Err(format!("{what} {word:?} is not a symbol name"));
    }
    Ok(word.to_string())
}

/// Hex digits, two per byte, in memory order (`32000000` is the
/// little-endian int 50).
fn hex_bytes(word: &str) -> Result<Vec<u8>, String> {
    if word.starts_with("0x") || word.starts_with("0X") {
        return Err(format!(
            "V takes raw bytes in memory order without 0x, got {word:?} (little-endian: the int 50 is 32000000)"
        ));
    }
    if let Some(bad) = word.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("V: {bad:?} in {word:?} is not a hex digit"));
    }
    if word.len() & 1 == 1 {
        return Err(format!("V needs an even number of hex digits (2 per byte), got {} in {word:?}", word.len()));
    }
    hex::decode(word).map_err(|e| format!("V: bad hex in {word:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CommandFile, PatchError> {
        CommandFile::parse("patch.cmd", text)
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("parsed {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_all_three_commands_with_comments() {
        let f = parse("# header\n\nJ get_message patched_get_message\n  V config_interval_ms 32000000  # 50\nP message_ptr patched_message\n").unwrap();
        assert_eq!(f.name, "patch.cmd");
        assert_eq!(
            f.commands,
            vec![
                Command { line: 3, target: "get_message".into(), action: Action::Jump { patch_function: "patched_get_message".into() } },
                Command { line: 4, target: "config_interval_ms".into(), action: Action::Variable { bytes: vec![0x32, 0, 0, 0] } },
                Command { line: 5, target: "message_ptr".into(), action: Action::Pointer { patch_symbol: "patched_message".into() } },
            ]
        );
        assert_eq!(f.commands[1].action.letter(), 'V');
        // CRLF and tabs are fine; hex is case-insensitive.
        let f = parse("V\tx\tABcd\r\n").unwrap();
        assert_eq!(f.commands[0].action, Action::Variable { bytes: vec![0xab, 0xcd] });
    }

    #[test]
    fn errors_name_the_line_and_what_was_expected() {
        assert_eq!(err("J a b\n\nX foo bar\n"), r#"patch.cmd:3: unknown command "X": use J, V or P"#);
        assert_eq!(err("j a b"), r#"patch.cmd:1: unknown command "j": use J, V or P (commands are upper case)"#);
        assert_eq!(err("# c\nV counter 123\n"), r#"patch.cmd:2: V needs an even number of hex digits (2 per byte), got 3 in "123""#);
        assert!(err("V counter 12zz").contains("patch.cmd:1: V: 'z' in \"12zz\" is not a hex digit"));
        assert!(err("V counter 0x32").contains("without 0x"));
        assert_eq!(err("J get_message"), "patch.cmd:1: J takes 2 arguments, got 1: expected `J target_function patch_function`");
        assert_eq!(err("P a b c"), "patch.cmd:1: P takes 2 arguments, got 3: expected `P target_pointer patch_symbol`");
        assert!(err("J 1abc f").contains("patch.cmd:1: J target \"1abc\" is not a symbol name"));
        assert!(err("J f a-b").contains("patch.cmd:1: J patch function \"a-b\" is not a symbol name"));
    }

    #[test]
    fn duplicate_targets_are_an_error() {
        assert_eq!(
            err("J get_message a\nV x 00\nP get_message b\n"),
            "patch.cmd:3: get_message is already patched by line 1; one command per target"
        );
    }

    #[test]
    fn empty_files_are_an_error() {
        for text in ["", "\n\n", "# only a comment\n   # another\n"] {
            assert!(err(text).starts_with("patch.cmd: no commands: expected lines like"), "{text:?}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let alphabet = b"JVP xX#\n\t0123456789abcdefg_.\r\xff";
        for _ in 0..20_000 {
            let len = (super::super::tests::xorshift(&mut seed) % 40) as usize;
            let bytes: Vec<u8> =
                (0..len).map(|_| alphabet[(super::super::tests::xorshift(&mut seed) % alphabet.len() as u64) as usize]).collect();
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }
    }
}
