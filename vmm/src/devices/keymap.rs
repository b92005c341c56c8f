//! Linux input keycodes (`include/uapi/linux/input-event-codes.h`): their
//! names, the AT keyboard scancodes (set 2) the i8042 keyboard sends for
//! them, and text to key events for a US keyboard layout.
use serde::{Deserialize, Serialize};

pub const KEY_ESC: u16 = 1;
pub const KEY_BACKSPACE: u16 = 14;
pub const KEY_TAB: u16 = 15;
pub const KEY_ENTER: u16 = 28;
pub const KEY_LEFTCTRL: u16 = 29;
pub const KEY_A: u16 = 30;
pub const KEY_LEFTSHIFT: u16 = 42;
pub const KEY_SPACE: u16 = 57;
pub const KEY_UP: u16 = 103;

/// One key going down or up. `delay_ms` is how long to wait *before* this
/// event (after the previous one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEvent {
    pub code: u16,
    pub press: bool,
    pub delay_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeymapError {
    /// `index` counts characters (not bytes) from 0.
    #[error("character {ch:?} at position {index} has no key on the US keyboard layout")]
    Unsupported { ch: char, index: usize },
}

/// The scancode-set-2 bytes of a key: `Plain(c)` is `c` / `F0 c`,
/// `Ext(c)` is `E0 c` / `E0 F0 c`; Pause sends
/// `E1 14 77 E1 F0 14 F0 77` when pressed and nothing when released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Set2 {
    Plain(u8),
    Ext(u8),
    Pause,
}

impl Set2 {
    /// The bytes the keyboard sends in scancode set 2.
    pub fn bytes(self, press: bool) -> Vec<u8> {
        match (self, press) {
            (Set2::Plain(c), true) => vec![c],
            (Set2::Plain(c), false) => vec![0xf0, c],
            (Set2::Ext(c), true) => vec![0xe0, c],
            (Set2::Ext(c), false) => vec![0xe0, 0xf0, c],
            (Set2::Pause, true) => vec![0xe1, 0x14, 0x77, 0xe1, 0xf0, 0x14, 0xf0, 0x77],
            (Set2::Pause, false) => Vec::new(),
        }
    }
}

/// Keycode, Linux name, set-2 scancode. The scancodes are those of a
/// standard MF2 keyboard, the inverse of the default table of Linux's
/// atkbd driver (`atkbd_set2_keycode`).
const KEYS: &[(u16, &str, Set2)] = &[
    (1, "KEY_ESC", Set2::Plain(0x76)),
    (2, "KEY_1", Set2::Plain(0x16)),
    (3, "KEY_2", Set2::Plain(0x1e)),
    (4, "KEY_3", Set2::Plain(0x26)),
    (5, "KEY_4", Set2::Plain(0x25)),
    (6, "KEY_5", Set2::Plain(0x2e)),
    (7, "KEY_6", Set2::Plain(0x36)),
    (8, "KEY_7", Set2::Plain(0x3d)),
    (9, "KEY_8", Set2::Plain(0x3e)),
    (10, "KEY_9", Set2::Plain(0x46)),
    (11, "KEY_0", Set2::Plain(0x45)),
    (12, "KEY_MINUS", Set2::Plain(0x4e)),
    (13, "KEY_EQUAL", Set2::Plain(0x55)),
    (14, "KEY_BACKSPACE", Set2::Plain(0x66)),
    (15, "KEY_TAB", Set2::Plain(0x0d)),
    (16, "KEY_Q", Set2::Plain(0x15)),
    (17, "KEY_W", Set2::Plain(0x1d)),
    (18, "KEY_E", Set2::Plain(0x24)),
    (19, "KEY_R", Set2::Plain(0x2d)),
    (20, "KEY_T", Set2::Plain(0x2c)),
    (21, "KEY_Y", Set2::Plain(0x35)),
    (22, "KEY_U", Set2::Plain(0x3c)),
    (23, "KEY_I", Set2::Plain(0x43)),
    (24, "KEY_O", Set2::Plain(0x44)),
    (25, "KEY_P", Set2::Plain(0x4d)),
    (26, "KEY_LEFTBRACE", Set2::Plain(0x54)),
    (27, "KEY_RIGHTBRACE", Set2::Plain(0x5b)),
    (28, "KEY_ENTER", Set2::Plain(0x5a)),
    (29, "KEY_LEFTCTRL", Set2::Plain(0x14)),
    (30, "KEY_A", Set2::Plain(0x1c)),
    (31, "KEY_S", Set2::Plain(0x1b)),
    (32, "KEY_D", Set2::Plain(0x23)),
    (33, "KEY_F", Set2::Plain(0x2b)),
    (34, "KEY_G", Set2::Plain(0x34)),
    (35, "KEY_H", Set2::Plain(0x33)),
    (36, "KEY_J", Set2::Plain(0x3b)),
    (37, "KEY_K", Set2::Plain(0x42)),
    (38, "KEY_L", Set2::Plain(0x4b)),
    (39, "KEY_SEMICOLON", Set2::Plain(0x4c)),
    (40, "KEY_APOSTROPHE", Set2::Plain(0x52)),
    (41, "KEY_GRAVE", Set2::Plain(0x0e)),
    (42, "KEY_LEFTSHIFT", Set2::Plain(0x12)),
    (43, "KEY_BACKSLASH", Set2::Plain(0x5d)),
    (44, "KEY_Z", Set2::Plain(0x1a)),
    (45, "KEY_X", Set2::Plain(0x22)),
    (46, "KEY_C", Set2::Plain(0x21)),
    (47, "KEY_V", Set2::Plain(0x2a)),
    (48, "KEY_B", Set2::Plain(0x32)),
    (49, "KEY_N", Set2::Plain(0x31)),
    (50, "KEY_M", Set2::Plain(0x3a)),
    (51, "KEY_COMMA", Set2::Plain(0x41)),
    (52, "KEY_DOT", Set2::Plain(0x49)),
    (53, "KEY_SLASH", Set2::Plain(0x4a)),
    (54, "KEY_RIGHTSHIFT", Set2::Plain(0x59)),
    (55, "KEY_KPASTERISK", Set2::Plain(0x7c)),
    (56, "KEY_LEFTALT", Set2::Plain(0x11)),
    (57, "KEY_SPACE", Set2::Plain(0x29)),
    (58, "KEY_CAPSLOCK", Set2::Plain(0x58)),
    (59, "KEY_F1", Set2::Plain(0x05)),
    (60, "KEY_F2", Set2::Plain(0x06)),
    (61, "KEY_F3", Set2::Plain(0x04)),
    (62, "KEY_F4", Set2::Plain(0x0c)),
    (63, "KEY_F5", Set2::Plain(0x03)),
    (64, "KEY_F6", Set2::Plain(0x0b)),
    (65, "KEY_F7", Set2::Plain(0x83)),
    (66, "KEY_F8", Set2::Plain(0x0a)),
    (67, "KEY_F9", Set2::Plain(0x01)),
    (68, "KEY_F10", Set2::Plain(0x09)),
    (69, "KEY_NUMLOCK", Set2::Plain(0x77)),
    (70, "KEY_SCROLLLOCK", Set2::Plain(0x7e)),
    (71, "KEY_KP7", Set2::Plain(0x6c)),
    (72, "KEY_KP8", Set2::Plain(0x75)),
    (73, "KEY_KP9", Set2::Plain(0x7d)),
    (74, "KEY_KPMINUS", Set2::Plain(0x7b)),
    (75, "KEY_KP4", Set2::Plain(0x6b)),
    (76, "KEY_KP5", Set2::Plain(0x73)),
    (77, "KEY_KP6", Set2::Plain(0x74)),
    (78, "KEY_KPPLUS", Set2::Plain(0x79)),
    (79, "KEY_KP1", Set2::Plain(0x69)),
    (80, "KEY_KP2", Set2::Plain(0x72)),
    (81, "KEY_KP3", Set2::Plain(0x7a)),
    (82, "KEY_KP0", Set2::Plain(0x70)),
    (83, "KEY_KPDOT", Set2::Plain(0x71)),
    (86, "KEY_102ND", Set2::Plain(0x61)),
    (87, "KEY_F11", Set2::Plain(0x78)),
    (88, "KEY_F12", Set2::Plain(0x07)),
    (89, "KEY_RO", Set2::Plain(0x51)),
    (90, "KEY_KATAKANA", Set2::Plain(0x63)),
    (91, "KEY_HIRAGANA", Set2::Plain(0x62)),
    (92, "KEY_HENKAN", Set2::Plain(0x64)),
    (93, "KEY_KATAKANAHIRAGANA", Set2::Plain(0x13)),
    (94, "KEY_MUHENKAN", Set2::Plain(0x67)),
    (95, "KEY_KPJPCOMMA", Set2::Plain(0x27)),
    (96, "KEY_KPENTER", Set2::Ext(0x5a)),
    (97, "KEY_RIGHTCTRL", Set2::Ext(0x14)),
    (98, "KEY_KPSLASH", Set2::Ext(0x4a)),
    (99, "KEY_SYSRQ", Set2::Ext(0x7c)),
    (100, "KEY_RIGHTALT", Set2::Ext(0x11)),
    (102, "KEY_HOME", Set2::Ext(0x6c)),
    (103, "KEY_UP", Set2::Ext(0x75)),
    (104, "KEY_PAGEUP", Set2::Ext(0x7d)),
    (105, "KEY_LEFT", Set2::Ext(0x6b)),
    (106, "KEY_RIGHT", Set2::Ext(0x74)),
    (107, "KEY_END", Set2::Ext(0x69)),
    (108, "KEY_DOWN", Set2::Ext(0x72)),
    (109, "KEY_PAGEDOWN", Set2::Ext(0x7a)),
    (110, "KEY_INSERT", Set2::Ext(0x70)),
    (111, "KEY_DELETE", Set2::Ext(0x71)),
    (113, "KEY_MUTE", Set2::Ext(0x23)),
    (114, "KEY_VOLUMEDOWN", Set2::Ext(0x21)),
    (115, "KEY_VOLUMEUP", Set2::Ext(0x32)),
    (116, "KEY_POWER", Set2::Ext(0x37)),
    (117, "KEY_KPEQUAL", Set2::Plain(0x0f)),
    (119, "KEY_PAUSE", Set2::Pause),
    (121, "KEY_KPCOMMA", Set2::Plain(0x6d)),
    (124, "KEY_YEN", Set2::Plain(0x6a)),
    (125, "KEY_LEFTMETA", Set2::Ext(0x1f)),
    (126, "KEY_RIGHTMETA", Set2::Ext(0x27)),
    (127, "KEY_COMPOSE", Set2::Ext(0x2f)),
    (128, "KEY_STOP", Set2::Ext(0x28)),
    (140, "KEY_CALC", Set2::Ext(0x2b)),
    (142, "KEY_SLEEP", Set2::Ext(0x3f)),
    (143, "KEY_WAKEUP", Set2::Ext(0x5e)),
    (155, "KEY_MAIL", Set2::Ext(0x48)),
    (156, "KEY_BOOKMARKS", Set2::Ext(0x18)),
    (157, "KEY_COMPUTER", Set2::Ext(0x40)),
    (158, "KEY_BACK", Set2::Ext(0x38)),
    (159, "KEY_FORWARD", Set2::Ext(0x30)),
    (163, "KEY_NEXTSONG", Set2::Ext(0x4d)),
    (164, "KEY_PLAYPAUSE", Set2::Ext(0x34)),
    (165, "KEY_PREVIOUSSONG", Set2::Ext(0x15)),
    (166, "KEY_STOPCD", Set2::Ext(0x3b)),
    (172, "KEY_HOMEPAGE", Set2::Ext(0x3a)),
    (173, "KEY_REFRESH", Set2::Ext(0x20)),
    (183, "KEY_F13", Set2::Plain(0x08)),
    (184, "KEY_F14", Set2::Plain(0x10)),
    (185, "KEY_F15", Set2::Plain(0x18)),
    (186, "KEY_F16", Set2::Plain(0x20)),
    (187, "KEY_F17", Set2::Plain(0x28)),
    (188, "KEY_F18", Set2::Plain(0x30)),
    (189, "KEY_F19", Set2::Plain(0x38)),
    (190, "KEY_F20", Set2::Plain(0x40)),
    (191, "KEY_F21", Set2::Plain(0x48)),
    (192, "KEY_F22", Set2::Plain(0x50)),
    (193, "KEY_F23", Set2::Plain(0x57)),
    (194, "KEY_F24", Set2::Plain(0x5f)),
    (217, "KEY_SEARCH", Set2::Ext(0x10)),
    (226, "KEY_MEDIA", Set2::Ext(0x50)),
];

/// Extra spellings accepted by [`key_by_name`] (after normalization to
/// upper case without the `KEY_` prefix).
const ALIASES: &[(&str, u16)] = &[
    ("ESCAPE", 1),
    ("RETURN", 28),
    ("CTRL", 29),
    ("CONTROL", 29),
    ("SHIFT", 42),
    ("ALT", 56),
    ("ALTGR", 100),
    ("PERIOD", 52),
    ("PGUP", 104),
    ("PGDN", 109),
    ("PAGEDN", 109),
    ("INS", 110),
    ("DEL", 111),
    ("META", 125),
    ("SUPER", 125),
    ("WIN", 125),
    ("PRINTSCREEN", 99),
    ("PRTSC", 99),
];

/// The set-2 scancode of `code`, if the emulated keyboard has that key.
pub fn set2_scancode(code: u16) -> Option<Set2> {
    KEYS.iter().find(|k| k.0 == code).map(|k| k.2)
}

/// The Linux name of a key the emulated keyboard has ("KEY_ENTER").
pub fn key_name(code: u16) -> Option<&'static str> {
    KEYS.iter().find(|k| k.0 == code).map(|k| k.1)
}

/// The keycode for a name: "KEY_ENTER", "enter", "Enter", "a", "leftshift",
/// "f5", "1", plus a few aliases ("esc"/"escape", "ctrl", "shift", "alt",
/// "pgup", "pgdn", "del", "ins", "super"). Case does not matter.
pub fn key_by_name(name: &str) -> Option<u16> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("KEY_").unwrap_or(&upper);
    if bare.is_empty() {
        return None;
    }
    KEYS.iter()
        .find(|k| k.1.strip_prefix("KEY_") == Some(bare))
        .map(|k| k.0)
        .or_else(|| ALIASES.iter().find(|a| a.0 == bare).map(|a| a.1))
}

/// The key and whether Shift is needed for `ch` on a US layout.
fn us_key(ch: char) -> Option<(u16, bool)> {
    // KEY_A, KEY_B, ... KEY_Z (the keycodes follow the QWERTY rows).
    const LETTERS: [u16; 26] = [
        30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20, 22, 47, 17, 45, 21, 44,
    ];
    const PLAIN: &[(char, u16)] = &[
        ('1', 2), ('2', 3), ('3', 4), ('4', 5), ('5', 6), ('6', 7), ('7', 8), ('8', 9), ('9', 10), ('0', 11),
        ('-', 12), ('=', 13), ('[', 26), (']', 27), (';', 39), ('\'', 40), ('`', 41), ('\\', 43),
        (',', 51), ('.', 52), ('/', 53), (' ', KEY_SPACE),
        ('\n', KEY_ENTER), ('\t', KEY_TAB), ('\x08', KEY_BACKSPACE), ('\x1b', KEY_ESC),
    ];
    const SHIFTED: &[(char, u16)] = &[
        ('!', 2), ('@', 3), ('#', 4), ('$', 5), ('%', 6), ('^', 7), ('&', 8), ('*', 9), ('(', 10), (')', 11),
        ('_', 12), ('+', 13), ('{', 26), ('}', 27), (':', 39), ('"', 40), ('~', 41), ('|', 43),
        ('<', 51), ('>', 52), ('?', 53),
    ];
    if ch.is_ascii_lowercase() {
        return Some((LETTERS[usize::from(ch as u8 - b'a')], false));
    }
    if ch.is_ascii_uppercase() {
        return Some((LETTERS[usize::from(ch as u8 - b'A')], true));
    }
    if let Some(&(_, k)) = PLAIN.iter().find(|p| p.0 == ch) {
        return Some((k, false));
    }
    SHIFTED.iter().find(|p| p.0 == ch).map(|&(_, k)| (k, true))
}

/// Key events that type `text` on a US keyboard. Each character is a press
/// and, `hold_ms` later, a release; characters are `gap_ms` apart (the first
/// starts at once). Upper case and shifted symbols are wrapped in a
/// LEFTSHIFT press (before the key, same instant) and release (right after
/// the key's release). '\n' is Enter, '\t' Tab, '\x08' Backspace and
/// '\x1b' Escape; any other character without a key (non-ASCII, other
/// control characters, '\r') is an error naming it and its position, and no
/// events are returned.
pub fn text_to_events(text: &str, hold_ms: u32, gap_ms: u32) -> Result<Vec<KeyEvent>, KeymapError> {
    let mut events = Vec::with_capacity(text.len() * 2);
    for (index, ch) in text.chars().enumerate() {
        let (code, shift) = us_key(ch).ok_or(KeymapError::Unsupported { ch, index })?;
        let first_delay = if index == 0 { 0 } else { gap_ms };
        if shift {
            events.push(KeyEvent { code: KEY_LEFTSHIFT, press: true, delay_ms: first_delay });
            events.push(KeyEvent { code, press: true, delay_ms: 0 });
        } else {
            events.push(KeyEvent { code, press: true, delay_ms: first_delay });
        }
        events.push(KeyEvent { code, press: false, delay_ms: hold_ms });
        if shift {
            events.push(KeyEvent { code: KEY_LEFTSHIFT, press: false, delay_ms: 0 });
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pressed(events: &[KeyEvent]) -> Vec<u16> {
        events.iter().filter(|e| e.press).map(|e| e.code).collect()
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(key_by_name("KEY_ENTER"), Some(KEY_ENTER));
        assert_eq!(key_by_name("enter"), Some(KEY_ENTER));
        assert_eq!(key_by_name("Enter"), Some(KEY_ENTER));
        assert_eq!(key_by_name("a"), Some(KEY_A));
        assert_eq!(key_by_name("leftshift"), Some(KEY_LEFTSHIFT));
        assert_eq!(key_by_name("f5"), Some(63));
        assert_eq!(key_by_name("F12"), Some(88));
        assert_eq!(key_by_name("1"), Some(2));
        assert_eq!(key_by_name("key_0"), Some(11));
        assert_eq!(key_by_name("esc"), Some(KEY_ESC));
        assert_eq!(key_by_name("Escape"), Some(KEY_ESC));
        assert_eq!(key_by_name("up"), Some(KEY_UP));
        assert_eq!(key_by_name("pgdn"), Some(109));
        assert_eq!(key_by_name(""), None);
        assert_eq!(key_by_name("KEY_"), None);
        assert_eq!(key_by_name("nosuchkey"), None);
        assert_eq!(key_name(KEY_ENTER), Some("KEY_ENTER"));
        assert_eq!(key_name(0), None);
        assert_eq!(key_name(9999), None);
        for &(code, name, _) in KEYS {
            assert!(name.starts_with("KEY_"), "{name}");
            assert_eq!(key_by_name(name), Some(code), "{name}");
            assert_eq!(key_name(code), Some(name));
        }
    }

    #[test]
    fn table_has_no_duplicate_codes_or_scancodes() {
        for (i, a) in KEYS.iter().enumerate() {
            for b in &KEYS[i + 1..] {
                assert_ne!(a.0, b.0, "{} twice", a.1);
                assert_ne!(a.2, b.2, "{} and {} share a scancode", a.1, b.1);
            }
        }
        for &(alias, code) in ALIASES {
            assert!(key_name(code).is_some(), "alias {alias}");
            assert!(KEYS.iter().all(|k| k.1.strip_prefix("KEY_") != Some(alias)), "alias {alias} shadows a name");
        }
    }

    #[test]
    fn required_keys_have_scancodes() {
        // Letters, digits, punctuation, whitespace, modifiers, navigation,
        // function keys.
        for code in (1..=88).filter(|c| ![84, 85].contains(c)) {
            assert!(set2_scancode(code).is_some(), "keycode {code}");
        }
        for code in [96, 97, 98, 99, 100, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 119, 125, 126, 127] {
            assert!(set2_scancode(code).is_some(), "keycode {code}");
        }
        assert_eq!(set2_scancode(KEY_A), Some(Set2::Plain(0x1c)));
        assert_eq!(set2_scancode(KEY_UP), Some(Set2::Ext(0x75)));
        assert_eq!(Set2::Ext(0x75).bytes(false), [0xe0, 0xf0, 0x75]);
        assert_eq!(set2_scancode(240), None);
    }

    #[test]
    fn typing_plain_text() {
        let ev = text_to_events("ab", 20, 50).unwrap();
        assert_eq!(
            ev,
            [
                KeyEvent { code: KEY_A, press: true, delay_ms: 0 },
                KeyEvent { code: KEY_A, press: false, delay_ms: 20 },
                KeyEvent { code: 48, press: true, delay_ms: 50 },
                KeyEvent { code: 48, press: false, delay_ms: 20 },
            ]
        );
    }

    #[test]
    fn typing_shifted_characters() {
        let ev = text_to_events("A!", 10, 30).unwrap();
        assert_eq!(
            ev,
            [
                KeyEvent { code: KEY_LEFTSHIFT, press: true, delay_ms: 0 },
                KeyEvent { code: KEY_A, press: true, delay_ms: 0 },
                KeyEvent { code: KEY_A, press: false, delay_ms: 10 },
                KeyEvent { code: KEY_LEFTSHIFT, press: false, delay_ms: 0 },
                KeyEvent { code: KEY_LEFTSHIFT, press: true, delay_ms: 30 },
                KeyEvent { code: 2, press: true, delay_ms: 0 },
                KeyEvent { code: 2, press: false, delay_ms: 10 },
                KeyEvent { code: KEY_LEFTSHIFT, press: false, delay_ms: 0 },
            ]
        );
    }

    #[test]
    fn typing_a_shell_line() {
        let ev = text_to_events("echo \"Hi\" | tr a-z A-Z\n\t\x08\x1b", 1, 1).unwrap();
        // Every press has a matching release and the keys balance out.
        assert_eq!(ev.iter().filter(|e| e.press).count(), ev.iter().filter(|e| !e.press).count());
        let p = pressed(&ev);
        assert_eq!(&p[..5], &[18, 46, 35, 24, KEY_SPACE]);
        assert_eq!(&p[p.len() - 4..], &[KEY_ENTER, KEY_TAB, KEY_BACKSPACE, KEY_ESC]);
        assert!(p.contains(&43)); // '|' is Shift+backslash
        // Every key typed has a scancode on the emulated keyboard.
        assert!(ev.iter().all(|e| set2_scancode(e.code).is_some()));
    }

    #[test]
    fn all_printable_ascii_is_typable() {
        let text: String = (0x20u8..0x7f).map(char::from).collect();
        let ev = text_to_events(&text, 0, 0).unwrap();
        assert_eq!(pressed(&ev).iter().filter(|&&c| c != KEY_LEFTSHIFT).count(), text.len());
    }

    #[test]
    fn unsupported_characters_are_named_with_their_position() {
        let err = text_to_events("caf\u{e9}", 1, 1).unwrap_err();
        assert_eq!(err, KeymapError::Unsupported { ch: '\u{e9}', index: 3 });
        assert_eq!(err.to_string(), "character '\u{e9}' at position 3 has no key on the US keyboard layout");
        let err = text_to_events("a\rb", 1, 1).unwrap_err();
        assert_eq!(err.to_string(), "character '\\r' at position 1 has no key on the US keyboard layout");
        assert_eq!(text_to_events("", 1, 1), Ok(Vec::new()));
    }

    #[test]
    fn key_events_serialize() {
        let e = KeyEvent { code: KEY_ENTER, press: true, delay_ms: 5 };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, r#"{"code":28,"press":true,"delay_ms":5}"#);
        assert_eq!(serde_json::from_str::<KeyEvent>(&json).unwrap(), e);
    }
}
