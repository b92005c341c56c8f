//! The i8042 PS/2 controller with an MF2 AT keyboard behind it.
//!
//! What Linux's `i8042` and `atkbd` drivers need: the status register, the
//! controller command byte (CTR), the controller commands they issue while
//! probing (self test, interface test, CTR read/write, loopback through the
//! output buffer, enable/disable of the ports), and a keyboard that answers
//! the PS/2 keyboard commands (reset, get ID, LEDs, scancode set, typematic,
//! enable/disable, echo) and sends scancode set 2. With XLATE set in the CTR
//! (Linux keeps it on x86) the controller translates set 2 to set 1 the way
//! a real 8042 does, `F0` break prefixes included; the keyboard's ID
//! `AB 83` then arrives as `AB 41`, which atkbd knows as "translated".
//!
//! There is no AUX (mouse) port: the CTR's AUX-disable bit stays set
//! whatever the guest writes, so Linux's `i8042_check_aux` (when it probes
//! at all: with only a PNP0303 device in the DSDT it assumes no AUX port)
//! sees the port fail to enable and gives up. The loopback commands
//! (`D2`/`D3`) still work, bytes sent to the absent mouse (`D4`) come back
//! as `FE` with the timeout bit, and AUX bytes never interrupt (we have no
//! IRQ 12 line).
//!
//! The output buffer shows one byte at a time; answers of the controller go
//! first, then answers of the keyboard, then key scancodes (a key sequence
//! that has started keeps its `F0 xx` pair together). Each byte that
//! becomes visible raises IRQ 1 (one edge on the irqfd) if the CTR enables
//! the keyboard interrupt.
//!
//! Keys come from [`I8042::key`] as Linux keycodes. They are refused
//! (`KeyError::KeyboardDisabled` / `KeyError::PortDisabled`, nothing
//! queued) while the guest has the keyboard disabled (`F5`, until `F4`) or
//! the controller's keyboard port disabled (CTR bit 4, which is how the VM
//! starts: keys before the guest driver has set the keyboard up are
//! refused, so they cannot confuse its probe). Up to [`KEY_QUEUE_BYTES`]
//! bytes of scancodes wait for the guest; beyond that the oldest whole key
//! events are dropped and counted.
//!
//! Command 0xFE (or 0xD1 with bit 0 clear) pulses the CPU reset line.
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::devices::irq::IrqLine;
use crate::devices::keymap;
use crate::devices::{DeviceStateError, PioDevice};
use crate::lifecycle::{EventSender, VmEvent};

pub const I8042_PORT: u16 = 0x60;
/// The keyboard's ISA interrupt (IOAPIC pin 1, edge).
pub const KEYBOARD_GSI: u32 = 1;
/// Ports 0x60 (data) to 0x64 (status/command). Port 0x61 in between belongs
/// to the in-kernel PIT; offsets 1..=3 read 0xFF and ignore writes.
pub const I8042_LEN: u16 = 5;
/// Bytes of scancodes the keyboard holds for the guest (a real one holds
/// 16; injected text arrives faster than anyone types).
pub const KEY_QUEUE_BYTES: usize = 1024;
/// Pending command answers per queue: a guest that sends commands without
/// reading the answers loses the newest ones.
const ANSWER_QUEUE_BYTES: usize = 64;
/// The longest key event's scancodes (Pause, in set 2).
const KEY_PACKET_BYTES: usize = 8;
/// Names this device in [`DeviceStateError`]s.
const DEVICE: &str = "i8042";

const DATA: u16 = 0;
const COMMAND: u16 = 4;

// Status register (read from port 0x64).
const STR_OBF: u8 = 0x01;
// 0x02 (IBF, input buffer full) is never set: writes are consumed at once.
const STR_SYS: u8 = 0x04;
const STR_CMD: u8 = 0x08;
const STR_UNLOCKED: u8 = 0x10;
const STR_AUX_OBF: u8 = 0x20;
const STR_TIMEOUT: u8 = 0x40;

// Controller command byte.
const CTR_KBDINT: u8 = 0x01;
const CTR_AUXINT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
/// As firmware would leave it: translation on, system flag set, both ports
/// disabled and their interrupts off until the guest's driver enables them.
const INITIAL_CTR: u8 = CTR_XLATE | CTR_AUXDIS | CTR_KBDDIS | CTR_SYS;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_PASSWORD_INSTALLED: u8 = 0xa4;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OBUF: u8 = 0xd2;
const CMD_WRITE_AUX_OBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_READ_TEST_INPUTS: u8 = 0xe0;
const CMD_RESET_CPU: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const NO_PASSWORD: u8 = 0xf1;
/// Output port: reset line high (bit 0), A20 on (bit 1), and the bits
/// QEMU also reports as ones; bits 4/5 mirror the output buffer.
const INITIAL_OUTPUT_PORT: u8 = 0xcf;
const OUTPUT_PORT_RESET: u8 = 0x01;
const OUTPUT_PORT_KBD_OBF: u8 = 0x10;
const OUTPUT_PORT_AUX_OBF: u8 = 0x20;
/// Input port: keyboard not inhibited.
const INPUT_PORT: u8 = 0x80;

// Keyboard commands (port 0x60) and answers.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_DEFAULTS: u8 = 0xf6;
const KBD_RESEND: u8 = 0xfe;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_NAK: u8 = 0xfe;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// 10.9 characters/s after 500 ms.
const DEFAULT_TYPEMATIC: u8 = 0x2b;
const BREAK_PREFIX: u8 = 0xf0;

/// Set 2 to set 1 for codes below 0x80, as the 8042 translates (the
/// inverse of Linux's `atkbd_unxlate_table`). 0x83 (F7) and 0x84 (SysRq)
/// are the only codes above that change; the rest pass through.
const XLATE: [u8; 0x80] = [
    0xff, 0x43, 0x41, 0x3f, 0x3d, 0x3b, 0x3c, 0x58, 0x64, 0x44, 0x42, 0x40, 0x3e, 0x0f, 0x29, 0x59, //
    0x65, 0x38, 0x2a, 0x70, 0x1d, 0x10, 0x02, 0x5a, 0x66, 0x71, 0x2c, 0x1f, 0x1e, 0x11, 0x03, 0x5b, //
    0x67, 0x2e, 0x2d, 0x20, 0x12, 0x05, 0x04, 0x5c, 0x68, 0x39, 0x2f, 0x21, 0x14, 0x13, 0x06, 0x5d, //
    0x69, 0x31, 0x30, 0x23, 0x22, 0x15, 0x07, 0x5e, 0x6a, 0x72, 0x32, 0x24, 0x16, 0x08, 0x09, 0x5f, //
    0x6b, 0x33, 0x25, 0x17, 0x18, 0x0b, 0x0a, 0x60, 0x6c, 0x34, 0x35, 0x26, 0x27, 0x19, 0x0c, 0x61, //
    0x6d, 0x73, 0x28, 0x74, 0x1a, 0x0d, 0x62, 0x6e, 0x3a, 0x36, 0x1c, 0x1b, 0x75, 0x2b, 0x63, 0x76, //
    0x55, 0x56, 0x77, 0x78, 0x79, 0x7a, 0x0e, 0x7b, 0x7c, 0x4f, 0x7d, 0x4b, 0x47, 0x7e, 0x7f, 0x6f, //
    0x52, 0x53, 0x50, 0x4c, 0x4d, 0x48, 0x01, 0x45, 0x57, 0x4e, 0x51, 0x4a, 0x37, 0x49, 0x46, 0x54, //
];

fn xlate(code: u8) -> u8 {
    match code {
        0x00..=0x7f => XLATE[usize::from(code)],
        0x83 => 0x41,
        0x84 => 0x54,
        c => c,
    }
}

/// The controller's set 2 to set 1 translator: `F0` is swallowed and sets
/// the break bit (0x80) of the next byte.
#[derive(Debug, Default)]
struct Translator {
    break_pending: bool,
}

impl Translator {
    fn feed(&mut self, byte: u8) -> Option<u8> {
        if byte == BREAK_PREFIX {
            self.break_pending = true;
            return None;
        }
        let code = xlate(byte);
        Some(if std::mem::take(&mut self.break_pending) { code | 0x80 } else { code })
    }
}

fn to_set1(set2: &[u8]) -> Vec<u8> {
    let mut t = Translator::default();
    set2.iter().filter_map(|&b| t.feed(b)).collect()
}

/// Why [`I8042::key`] did not queue a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key code {0} is not a key of the emulated AT keyboard")]
    Unknown(u16),
    #[error("the guest has not enabled the keyboard or has disabled it (command 0xF5); key dropped")]
    KeyboardDisabled,
    #[error("the guest has the i8042 keyboard port disabled (driver not loaded or busy); key dropped")]
    PortDisabled,
}

/// Counters and state of the keyboard, for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KeyboardStats {
    /// Key events accepted by [`I8042::key`].
    pub keys_queued: u64,
    /// Key events whose last scancode byte reached the output buffer.
    pub keys_delivered: u64,
    /// Key events dropped because the queue was full.
    pub keys_dropped: u64,
    /// Scancode bytes waiting for the guest.
    pub queued_bytes: usize,
    /// IRQ 1 edges raised.
    pub irqs: u64,
    /// LED state last set by the guest: bit 0 Scroll, 1 Num, 2 Caps Lock.
    pub leds: u8,
    /// The keyboard sends scancodes (the guest enabled it).
    pub scanning: bool,
    /// The controller translates to set 1 (CTR XLATE bit).
    pub translated: bool,
}

/// The scancodes of one key event (at most 8 bytes: Pause).
#[derive(Debug, Clone, Copy)]
struct KeyPacket {
    bytes: [u8; KEY_PACKET_BYTES],
    len: usize,
}

/// The PS/2 keyboard: command state, answers and buffered scancodes.
#[derive(Debug)]
struct Keyboard {
    scanning: bool,
    /// Scancode set 1 or 2 (set 3 is refused: it stays at the old set).
    set: u8,
    leds: u8,
    typematic: u8,
    /// A command waiting for its parameter byte.
    awaiting: Option<u8>,
    answers: VecDeque<u8>,
    keys: VecDeque<KeyPacket>,
    /// Bytes of `keys` not yet sent.
    key_bytes: usize,
    /// Bytes of `keys.front()` already sent.
    front_sent: usize,
    last_sent: u8,
    keys_queued: u64,
    keys_delivered: u64,
    keys_dropped: u64,
}

/// The keyboard's part of [`I8042State`]: its command state, the answers
/// and scancodes it has not sent yet, and its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyboardState {
    /// The guest enabled scanning (`F4`; cleared by `F5`).
    pub scanning: bool,
    /// Scancode set, 1 or 2.
    pub set: u8,
    /// LEDs as the guest last set them: bit 0 Scroll, 1 Num, 2 Caps Lock.
    pub leds: u8,
    /// Typematic rate and delay byte as the guest last set it (7 bits).
    pub typematic: u8,
    /// A keyboard command (`ED`, `F0` or `F3`) waiting for its parameter:
    /// the guest's next byte to port 0x60 is that parameter, and scancodes
    /// are held back until it comes.
    pub awaiting: Option<u8>,
    /// Command answers not yet sent, oldest first.
    pub answers: Vec<u8>,
    /// Queued key events, oldest first, each its whole scancode sequence
    /// (1 to 8 bytes), the front one possibly partly sent already.
    pub keys: Vec<Vec<u8>>,
    /// Bytes of the front key event already sent; less than its length.
    pub front_sent: u8,
    /// The last byte sent, which `FE` (resend) repeats and which tells
    /// whether a break prefix waits for its code.
    pub last_sent: u8,
    /// Key events accepted so far.
    pub keys_queued: u64,
    /// Key events wholly sent so far.
    pub keys_delivered: u64,
    /// Key events dropped so far (queue full or cleared by a command).
    pub keys_dropped: u64,
}

impl Keyboard {
    fn new() -> Self {
        Keyboard {
            scanning: true,
            set: 2,
            leds: 0,
            typematic: DEFAULT_TYPEMATIC,
            awaiting: None,
            answers: VecDeque::new(),
            keys: VecDeque::new(),
            key_bytes: 0,
            front_sent: 0,
            last_sent: 0,
            keys_queued: 0,
            keys_delivered: 0,
            keys_dropped: 0,
        }
    }

    fn answer(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.answers.len() < ANSWER_QUEUE_BYTES {
                self.answers.push_back(b);
            }
        }
    }

    fn clear_keys(&mut self) {
        self.keys_dropped += self.keys.len() as u64;
        self.keys.clear();
        self.key_bytes = 0;
        self.front_sent = 0;
    }

    /// Defaults (F5, F6, FF): set 2, default typematic, LEDs off, and the
    /// scancode buffer cleared.
    fn set_defaults(&mut self) {
        self.set = 2;
        self.typematic = DEFAULT_TYPEMATIC;
        self.leds = 0;
        self.awaiting = None;
        self.clear_keys();
    }

    /// The parameter byte of `cmd`.
    fn write_param(&mut self, cmd: u8, byte: u8) {
        match (cmd, byte) {
            (KBD_SET_LEDS, leds) => {
                self.leds = leds & 0x07;
                tracing::debug!(leds = self.leds, "keyboard LEDs");
                self.answer(&[KBD_ACK]);
            }
            (KBD_TYPEMATIC, rate) => {
                self.typematic = rate & 0x7f;
                self.answer(&[KBD_ACK]);
            }
            (KBD_SCANCODE_SET, 0) => {
                let set = self.set;
                self.answer(&[KBD_ACK, set]);
            }
            (KBD_SCANCODE_SET, set @ (1 | 2)) => {
                if self.set != set {
                    // Queued scancodes are in the old set.
                    self.clear_keys();
                    self.set = set;
                }
                self.answer(&[KBD_ACK]);
            }
            // Set 3 (or junk): acknowledged but not taken; the driver's
            // query afterwards sees set 2 and it falls back to that.
            _ => self.answer(&[KBD_ACK]),
        }
    }

    /// A byte from the controller: a command or a command's parameter.
    fn write(&mut self, byte: u8) {
        if let Some(cmd) = self.awaiting.take() {
            self.write_param(cmd, byte);
            return;
        }
        match byte {
            KBD_SET_LEDS | KBD_TYPEMATIC | KBD_SCANCODE_SET => {
                self.awaiting = Some(byte);
                self.answer(&[KBD_ACK]);
            }
            KBD_ECHO => self.answer(&[KBD_ECHO]),
            KBD_GET_ID => self.answer(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_ENABLE => {
                self.scanning = true;
                self.answer(&[KBD_ACK]);
            }
            KBD_DISABLE => {
                self.set_defaults();
                self.scanning = false;
                self.answer(&[KBD_ACK]);
            }
            KBD_DEFAULTS => {
                self.set_defaults();
                self.scanning = true;
                self.answer(&[KBD_ACK]);
            }
            KBD_RESEND => {
                let last = self.last_sent;
                self.answer(&[last]);
            }
            KBD_RESET => {
                self.set_defaults();
                self.answers.clear();
                self.scanning = true;
                self.answer(&[KBD_ACK, KBD_BAT_OK]);
            }
            // Set-3 key attribute commands: nothing to do in set 2.
            0xf7..=0xfd => self.answer(&[KBD_ACK]),
            other => {
                tracing::debug!(byte = other, "unknown keyboard command");
                self.answer(&[KBD_NAK]);
            }
        }
    }

    fn state(&self) -> KeyboardState {
        KeyboardState {
            scanning: self.scanning,
            set: self.set,
            leds: self.leds,
            typematic: self.typematic,
            awaiting: self.awaiting,
            answers: self.answers.iter().copied().collect(),
            keys: self.keys.iter().map(|p| p.bytes[..p.len].to_vec()).collect(),
            // Always below the front packet's length, at most 7.
            front_sent: self.front_sent as u8,
            last_sent: self.last_sent,
            keys_queued: self.keys_queued,
            keys_delivered: self.keys_delivered,
            keys_dropped: self.keys_dropped,
        }
    }

    /// Checks what `next_byte` and `push_key` rely on: packets of 1 to 8
    /// bytes, the front one not wholly sent, no more than the queue holds;
    /// and what only a run of the keyboard could have produced.
    fn from_state(s: &KeyboardState) -> Result<Keyboard, DeviceStateError> {
        let bad = |reason: String| Err(DeviceStateError::invalid(DEVICE, format!("keyboard: {reason}")));
        if !matches!(s.set, 1 | 2) {
            return bad(format!("scancode set {} (only 1 and 2 exist)", s.set));
        }
        if s.leds & !0x07 != 0 {
            return bad(format!("LED byte {:#x} has bits beyond the three LEDs", s.leds));
        }
        if s.typematic & 0x80 != 0 {
            return bad(format!("typematic byte {:#x} has bit 7 set", s.typematic));
        }
        if let Some(cmd) = s.awaiting.filter(|c| !matches!(*c, KBD_SET_LEDS | KBD_TYPEMATIC | KBD_SCANCODE_SET)) {
            return bad(format!("command {cmd:#x} takes no parameter"));
        }
        if s.answers.len() > ANSWER_QUEUE_BYTES {
            return bad(format!("{} answer bytes queued, the limit is {ANSWER_QUEUE_BYTES}", s.answers.len()));
        }
        if !s.scanning && !s.keys.is_empty() {
            return bad("scancodes queued while scanning is disabled".into());
        }
        let mut keys = VecDeque::with_capacity(s.keys.len().min(KEY_QUEUE_BYTES));
        let mut total: usize = 0;
        for (i, k) in s.keys.iter().enumerate() {
            if k.is_empty() || k.len() > KEY_PACKET_BYTES {
                return bad(format!("key event {i} has {} scancode bytes, not 1 to {KEY_PACKET_BYTES}", k.len()));
            }
            total = total.saturating_add(k.len());
            if total > KEY_QUEUE_BYTES + KEY_PACKET_BYTES {
                return bad(format!("more than {KEY_QUEUE_BYTES} scancode bytes queued"));
            }
            let mut packet = KeyPacket { bytes: [0; KEY_PACKET_BYTES], len: k.len() };
            packet.bytes[..k.len()].copy_from_slice(k);
            keys.push_back(packet);
        }
        let front_sent = usize::from(s.front_sent);
        match keys.front() {
            Some(front) if front_sent >= front.len => {
                return bad(format!("{front_sent} bytes of a {}-byte key event already sent", front.len));
            }
            None if front_sent != 0 => return bad(format!("{front_sent} bytes sent of no key event")),
            _ => {}
        }
        let key_bytes = total - front_sent;
        if key_bytes > KEY_QUEUE_BYTES {
            return bad(format!("{key_bytes} scancode bytes queued, the limit is {KEY_QUEUE_BYTES}"));
        }
        Ok(Keyboard {
            scanning: s.scanning,
            set: s.set,
            leds: s.leds,
            typematic: s.typematic,
            awaiting: s.awaiting,
            answers: s.answers.iter().copied().collect(),
            keys,
            key_bytes,
            front_sent,
            last_sent: s.last_sent,
            keys_queued: s.keys_queued,
            keys_delivered: s.keys_delivered,
            keys_dropped: s.keys_dropped,
        })
    }

    /// Queues one key event's scancodes, dropping the oldest whole events
    /// (never the one being sent) if the buffer would overflow.
    fn push_key(&mut self, bytes: &[u8]) {
        let mut packet = KeyPacket { bytes: [0; KEY_PACKET_BYTES], len: bytes.len().min(KEY_PACKET_BYTES) };
        packet.bytes[..packet.len].copy_from_slice(&bytes[..packet.len]);
        while self.key_bytes + packet.len > KEY_QUEUE_BYTES {
            let oldest = usize::from(self.front_sent > 0);
            match self.keys.remove(oldest) {
                Some(p) => {
                    self.key_bytes -= p.len;
                    self.keys_dropped += 1;
                }
                None => {
                    self.keys_dropped += 1;
                    return;
                }
            }
        }
        self.key_bytes += packet.len;
        self.keys.push_back(packet);
        self.keys_queued += 1;
    }

    /// Whether `next_byte` would give a byte (or start a packet the
    /// translator may swallow a prefix of).
    fn has_byte(&self) -> bool {
        let mid_break = self.front_sent > 0 && self.last_sent == BREAK_PREFIX;
        (!mid_break && !self.answers.is_empty()) || ((mid_break || self.awaiting.is_none()) && !self.keys.is_empty())
    }

    /// The next byte to send to the controller, if any.
    fn next_byte(&mut self) -> Option<u8> {
        // Answers overtake scancodes, even in the middle of a key's
        // sequence (Linux's libps2 takes the ACK it waits for without
        // touching atkbd's prefix state), but never between F0 and its code:
        // the controller's translator pairs them.
        let mid_break = self.front_sent > 0 && self.last_sent == BREAK_PREFIX;
        if !mid_break {
            if let Some(b) = self.answers.pop_front() {
                self.last_sent = b;
                return Some(b);
            }
            // While a command waits for its parameter, scancodes wait too:
            // libps2 would swallow them as stray bytes.
            if self.awaiting.is_some() {
                return None;
            }
        }
        let front = self.keys.front()?;
        let b = front.bytes[self.front_sent];
        let len = front.len;
        self.front_sent += 1;
        self.key_bytes -= 1;
        if self.front_sent == len {
            self.keys.pop_front();
            self.front_sent = 0;
            self.keys_delivered += 1;
        }
        self.last_sent = b;
        Some(b)
    }
}

/// A byte in the controller's output buffer, with the status bits that
/// come with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutByte {
    /// What port 0x60 reads.
    pub data: u8,
    /// It came from the AUX port (status bit 5).
    pub aux: bool,
    /// The controller timed out getting it (status bit 6).
    pub timeout: bool,
}

impl OutByte {
    fn kbd(data: u8) -> Self {
        OutByte { data, aux: false, timeout: false }
    }
    fn aux(data: u8) -> Self {
        OutByte { data, aux: true, timeout: false }
    }
}

/// A controller command waiting for its parameter on port 0x60: the
/// guest's next data byte goes to the controller, not the keyboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerParam {
    /// `60`: the new command byte.
    Ctr,
    /// `61`..`7F`: a byte of controller RAM (ignored).
    Ram,
    /// `D1`: the new output port.
    OutputPort,
    /// `D2`: a byte to loop back as keyboard data.
    KbdObuf,
    /// `D3`: a byte to loop back as AUX data.
    AuxObuf,
    /// `D4`: a byte for the (absent) mouse.
    Aux,
}

/// Everything that makes up the controller and its keyboard as the guest
/// sees them, for snapshots. Not the event channel or the interrupt line:
/// those belong to the VM that runs the device and are passed to
/// [`I8042::from_state`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Controller command byte (CTR).
    pub ctr: u8,
    /// Output port as last written (`D1`); the buffer-full bits are
    /// computed when read.
    pub output_port: u8,
    /// The last write went to port 0x64 (status bit 3).
    pub last_write_command: bool,
    /// A controller command waiting for its parameter byte.
    pub param: Option<ControllerParam>,
    /// The byte in the output buffer, if full.
    pub obuf: Option<OutByte>,
    /// What port 0x60 reads while the output buffer is empty.
    pub last_read: u8,
    /// Controller answers (and loopback bytes) behind the output buffer.
    pub answers: Vec<OutByte>,
    /// The set 1 translator has swallowed an `F0` and will set the break
    /// bit of the next byte.
    pub translator_break_pending: bool,
    /// The keyboard behind the controller.
    pub keyboard: KeyboardState,
    /// IRQ 1 edges raised so far (statistics).
    pub irqs: u64,
}

pub struct I8042 {
    events: EventSender,
    irq: Box<dyn IrqLine>,
    ctr: u8,
    output_port: u8,
    /// The last write went to port 0x64 (status bit 3).
    last_write_command: bool,
    param: Option<ControllerParam>,
    obuf: Option<OutByte>,
    /// What port 0x60 reads when the output buffer is empty.
    last_read: u8,
    /// Answers of the controller itself (and loopback bytes).
    answers: VecDeque<OutByte>,
    xlate: Translator,
    kbd: Keyboard,
    irqs: u64,
}

impl I8042 {
    pub fn new(events: EventSender, irq: Box<dyn IrqLine>) -> Self {
        I8042 {
            events,
            irq,
            ctr: INITIAL_CTR,
            output_port: INITIAL_OUTPUT_PORT,
            last_write_command: false,
            param: None,
            obuf: None,
            last_read: 0,
            answers: VecDeque::new(),
            xlate: Translator::default(),
            kbd: Keyboard::new(),
            irqs: 0,
        }
    }

    /// The guest-visible state of controller and keyboard, for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            output_port: self.output_port,
            last_write_command: self.last_write_command,
            param: self.param,
            obuf: self.obuf,
            last_read: self.last_read,
            answers: self.answers.iter().copied().collect(),
            translator_break_pending: self.xlate.break_pending,
            keyboard: self.kbd.state(),
            irqs: self.irqs,
        }
    }

    /// Rebuilds the controller from `state`, refusing what no run of the
    /// device could have produced. Raises no interrupt: an edge in flight
    /// at the snapshot is the interrupt controller's state; call
    /// [`I8042::reassert_irq`] to send another if that is not restored.
    pub fn from_state(events: EventSender, irq: Box<dyn IrqLine>, state: &I8042State) -> Result<I8042, DeviceStateError> {
        if state.ctr & CTR_AUXDIS == 0 {
            return Err(DeviceStateError::invalid(
                DEVICE,
                format!("command byte {:#x} enables the AUX port, which does not exist", state.ctr),
            ));
        }
        if state.answers.len() > ANSWER_QUEUE_BYTES {
            return Err(DeviceStateError::invalid(
                DEVICE,
                format!("{} controller answers queued, the limit is {ANSWER_QUEUE_BYTES}", state.answers.len()),
            ));
        }
        let kbd = Keyboard::from_state(&state.keyboard)?;
        // Every change that could make a byte available refills an empty
        // output buffer at once; one left empty with bytes behind it would
        // never show them to the guest (reads refill only what they empty).
        let waiting = !state.answers.is_empty() || (state.ctr & CTR_KBDDIS == 0 && kbd.has_byte());
        if state.obuf.is_none() && waiting {
            return Err(DeviceStateError::invalid(DEVICE, "output buffer empty with bytes waiting behind it"));
        }
        Ok(I8042 {
            events,
            irq,
            ctr: state.ctr,
            output_port: state.output_port,
            last_write_command: state.last_write_command,
            param: state.param,
            obuf: state.obuf,
            last_read: state.last_read,
            answers: state.answers.iter().copied().collect(),
            xlate: Translator { break_pending: state.translator_break_pending },
            kbd,
            irqs: state.irqs,
        })
    }

    /// Raises IRQ 1 again if a keyboard byte waits in the output buffer
    /// with the interrupt enabled. After a restore whose interrupt
    /// controller state may have lost the edge, this keeps the guest from
    /// waiting forever; if the edge was not lost the guest's handler sees
    /// one spurious interrupt (nothing to read after the first), which
    /// Linux's i8042 driver ignores.
    pub fn reassert_irq(&mut self) {
        if matches!(self.obuf, Some(b) if !b.aux) && self.ctr & CTR_KBDINT != 0 {
            self.raise_irq();
        }
    }

    /// Presses (`press`) or releases a key, `code` being a Linux input
    /// keycode (`KEY_A` = 30, ...). The keyboard queues its scancodes
    /// (set 2, or set 1 if the guest asked for it; the controller
    /// translates to set 1 when XLATE is on) and the guest gets IRQ 1.
    pub fn key(&mut self, code: u16, press: bool) -> Result<(), KeyError> {
        let scan = keymap::set2_scancode(code).ok_or(KeyError::Unknown(code))?;
        if !self.kbd.scanning {
            return Err(KeyError::KeyboardDisabled);
        }
        if self.ctr & CTR_KBDDIS != 0 {
            return Err(KeyError::PortDisabled);
        }
        let mut bytes = scan.bytes(press);
        if self.kbd.set == 1 {
            bytes = to_set1(&bytes);
        }
        if !bytes.is_empty() {
            self.kbd.push_key(&bytes);
            self.refill();
        }
        Ok(())
    }

    /// Key events whose scancodes have all reached the guest-visible
    /// output buffer.
    pub fn keys_delivered(&self) -> u64 {
        self.kbd.keys_delivered
    }

    pub fn stats(&self) -> KeyboardStats {
        KeyboardStats {
            keys_queued: self.kbd.keys_queued,
            keys_delivered: self.kbd.keys_delivered,
            keys_dropped: self.kbd.keys_dropped,
            queued_bytes: self.kbd.key_bytes,
            irqs: self.irqs,
            leds: self.kbd.leds,
            scanning: self.kbd.scanning,
            translated: self.ctr & CTR_XLATE != 0,
        }
    }

    fn raise_irq(&mut self) {
        self.irqs += 1;
        if let Err(e) = self.irq.trigger() {
            tracing::warn!(error = %e, "i8042: cannot raise IRQ 1");
        }
    }

    /// Moves the next byte into the empty output buffer: controller answers
    /// first, then the keyboard's bytes unless its port is disabled.
    fn refill(&mut self) {
        if self.obuf.is_some() {
            return;
        }
        let next = match self.answers.pop_front() {
            Some(b) => Some(b),
            None if self.ctr & CTR_KBDDIS == 0 => self.next_keyboard_byte(),
            None => None,
        };
        let Some(byte) = next else { return };
        self.obuf = Some(byte);
        // AUX bytes would raise IRQ 12, a line this VM does not have.
        let (enable, line) = if byte.aux { (CTR_AUXINT, false) } else { (CTR_KBDINT, true) };
        if line && self.ctr & enable != 0 {
            self.raise_irq();
        }
    }

    fn next_keyboard_byte(&mut self) -> Option<OutByte> {
        loop {
            let raw = self.kbd.next_byte()?;
            if self.ctr & CTR_XLATE == 0 {
                return Some(OutByte::kbd(raw));
            }
            if let Some(code) = self.xlate.feed(raw) {
                return Some(OutByte::kbd(code));
            }
        }
    }

    fn controller_answer(&mut self, byte: OutByte) {
        if self.answers.len() < ANSWER_QUEUE_BYTES {
            self.answers.push_back(byte);
        }
        self.refill();
    }

    fn write_ctr(&mut self, value: u8) {
        let old = self.ctr;
        // No AUX port: it stays disabled.
        self.ctr = value | CTR_AUXDIS;
        if (old ^ self.ctr) & CTR_XLATE != 0 {
            self.xlate = Translator::default();
        }
        tracing::debug!(ctr = self.ctr, "i8042 command byte");
        // The interrupt line follows "output buffer full and enabled": a
        // byte waiting when the guest enables the interrupt is an edge.
        if let Some(b) = self.obuf {
            if !b.aux && self.ctr & CTR_KBDINT != 0 && old & CTR_KBDINT == 0 {
                self.raise_irq();
            }
        }
        self.refill();
    }

    fn write_output_port(&mut self, value: u8) {
        self.output_port = value;
        if value & OUTPUT_PORT_RESET == 0 {
            let _ = self.events.send(VmEvent::Reset { source: "i8042 reset line" });
        }
    }

    fn output_port_value(&self) -> u8 {
        let mut v = self.output_port & !(OUTPUT_PORT_KBD_OBF | OUTPUT_PORT_AUX_OBF);
        match self.obuf {
            Some(b) if b.aux => v |= OUTPUT_PORT_AUX_OBF,
            Some(_) => v |= OUTPUT_PORT_KBD_OBF,
            None => {}
        }
        v
    }

    fn status(&self) -> u8 {
        let mut s = STR_UNLOCKED;
        if self.ctr & CTR_SYS != 0 {
            s |= STR_SYS;
        }
        if self.last_write_command {
            s |= STR_CMD;
        }
        if let Some(b) = self.obuf {
            s |= STR_OBF;
            if b.aux {
                s |= STR_AUX_OBF;
            }
            if b.timeout {
                s |= STR_TIMEOUT;
            }
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.obuf.take() {
            self.last_read = b.data;
            self.refill();
        }
        self.last_read
    }

    fn write_data(&mut self, value: u8) {
        self.last_write_command = false;
        match self.param.take() {
            Some(ControllerParam::Ctr) => self.write_ctr(value),
            Some(ControllerParam::Ram) => {}
            Some(ControllerParam::OutputPort) => self.write_output_port(value),
            Some(ControllerParam::KbdObuf) => self.controller_answer(OutByte::kbd(value)),
            Some(ControllerParam::AuxObuf) => self.controller_answer(OutByte::aux(value)),
            // No mouse: the controller times out and answers "resend".
            Some(ControllerParam::Aux) => self.controller_answer(OutByte { data: KBD_NAK, aux: true, timeout: true }),
            None => {
                self.kbd.write(value);
                // Sending to the keyboard enables its port (as QEMU does).
                if self.ctr & CTR_KBDDIS != 0 {
                    self.ctr &= !CTR_KBDDIS;
                }
                self.refill();
            }
        }
    }

    fn write_command(&mut self, cmd: u8) {
        self.last_write_command = true;
        self.param = None;
        match cmd {
            CMD_READ_CTR => self.controller_answer(OutByte::kbd(self.ctr)),
            // The rest of the controller's RAM: zeros, writes ignored.
            0x21..=0x3f => self.controller_answer(OutByte::kbd(0)),
            CMD_WRITE_CTR => self.param = Some(ControllerParam::Ctr),
            0x61..=0x7f => self.param = Some(ControllerParam::Ram),
            CMD_PASSWORD_INSTALLED => self.controller_answer(OutByte::kbd(NO_PASSWORD)),
            CMD_AUX_DISABLE => self.write_ctr(self.ctr | CTR_AUXDIS),
            // No AUX port to enable: the disable bit stays set, which is how
            // Linux's i8042_toggle_aux tells that the port is absent.
            CMD_AUX_ENABLE => {}
            CMD_AUX_TEST => self.controller_answer(OutByte::kbd(0)),
            CMD_SELF_TEST => {
                self.ctr |= CTR_SYS;
                self.controller_answer(OutByte::kbd(SELF_TEST_OK));
            }
            CMD_KBD_TEST => self.controller_answer(OutByte::kbd(0)),
            CMD_KBD_DISABLE => self.write_ctr(self.ctr | CTR_KBDDIS),
            CMD_KBD_ENABLE => self.write_ctr(self.ctr & !CTR_KBDDIS),
            CMD_READ_INPUT_PORT => self.controller_answer(OutByte::kbd(INPUT_PORT)),
            CMD_READ_OUTPUT_PORT => {
                let v = self.output_port_value();
                self.controller_answer(OutByte::kbd(v));
            }
            CMD_WRITE_OUTPUT_PORT => self.param = Some(ControllerParam::OutputPort),
            CMD_WRITE_KBD_OBUF => self.param = Some(ControllerParam::KbdObuf),
            CMD_WRITE_AUX_OBUF => self.param = Some(ControllerParam::AuxObuf),
            CMD_WRITE_AUX => self.param = Some(ControllerParam::Aux),
            CMD_READ_TEST_INPUTS => self.controller_answer(OutByte::kbd(0)),
            CMD_RESET_CPU => {
                let _ = self.events.send(VmEvent::Reset { source: "i8042 reset line" });
            }
            // Pulses of the other output lines (0xFF is Linux's "null
            // command"): nothing to do.
            0xf0..=0xff => {}
            other => tracing::debug!(cmd = other, "unknown i8042 command"),
        }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = match offset {
            DATA => self.read_data(),
            COMMAND => self.status(),
            _ => 0xff,
        };
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = v;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        tracing::trace!(offset, ?data, "i8042 write");
        let Some(&v) = data.first() else { return };
        match offset {
            DATA => self.write_data(v),
            COMMAND => self.write_command(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::keymap::{text_to_events, Set2, KEY_A, KEY_ENTER, KEY_LEFTSHIFT, KEY_UP};
    use crate::lifecycle::{self, EventReceiver};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    struct CountingIrq(Arc<AtomicU64>);

    impl IrqLine for CountingIrq {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Rig {
        dev: I8042,
        irqs: Arc<AtomicU64>,
        events: EventReceiver,
    }

    impl Rig {
        fn new() -> Self {
            let (tx, rx) = lifecycle::channel();
            let irqs = Arc::new(AtomicU64::new(0));
            let dev = I8042::new(tx, Box::new(CountingIrq(irqs.clone())));
            Rig { dev, irqs, events: rx }
        }

        fn irqs(&self) -> u64 {
            self.irqs.load(Ordering::SeqCst)
        }

        fn status(&mut self) -> u8 {
            let mut b = [0u8];
            self.dev.read(COMMAND, &mut b);
            b[0]
        }

        fn read(&mut self) -> u8 {
            let mut b = [0u8];
            self.dev.read(DATA, &mut b);
            b[0]
        }

        fn cmd(&mut self, c: u8) {
            self.dev.write(COMMAND, &[c]);
        }

        fn data(&mut self, v: u8) {
            self.dev.write(DATA, &[v]);
        }

        /// i8042_flush: everything that is waiting.
        fn drain(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while self.status() & STR_OBF != 0 {
                out.push(self.read());
                assert!(out.len() <= 4 * KEY_QUEUE_BYTES, "output never ends");
            }
            out
        }

        /// __i8042_command: command, parameters, then `n` answers, each
        /// only after the status shows the output buffer full.
        fn command(&mut self, c: u8, params: &[u8], n: usize) -> Vec<u8> {
            assert_eq!(self.status() & 0x02, 0, "IBF");
            self.cmd(c);
            for &p in params {
                self.data(p);
            }
            (0..n)
                .map(|_| {
                    assert_ne!(self.status() & STR_OBF, 0, "no answer to {c:#x}");
                    self.read()
                })
                .collect()
        }

        /// ps2_command through i8042_kbd_write: every byte is ACKed, then
        /// `n` answer bytes.
        fn kbd_command(&mut self, bytes: &[u8], n: usize) -> Vec<u8> {
            for &b in bytes {
                self.data(b);
                assert_eq!(self.read(), KBD_ACK, "no ACK for {b:#x}");
            }
            (0..n).map(|_| self.read()).collect()
        }

        /// What Linux does from i8042_init to a working atkbd, with the
        /// controller translating or not (`i8042.direct`).
        fn linux_probe(&mut self, translate: bool) {
            // i8042_controller_check: nothing buffered.
            assert!(self.drain().is_empty());
            // i8042_platform_init: A20 on, null command.
            self.command(CMD_WRITE_OUTPUT_PORT, &[0xdf], 0);
            self.command(0xff, &[], 0);
            assert!(self.events.try_recv().is_err());
            // A controller self test (i8042.reset).
            assert_eq!(self.command(CMD_SELF_TEST, &[], 1), [SELF_TEST_OK]);
            // i8042_controller_init: a stable CTR read, no keylock.
            let ctr = self.command(CMD_READ_CTR, &[], 1)[0];
            assert_eq!(self.command(CMD_READ_CTR, &[], 1)[0], ctr);
            assert_ne!(ctr & CTR_XLATE, 0);
            assert_ne!(self.status() & STR_UNLOCKED, 0);
            let mut ctr = (ctr | CTR_KBDDIS) & !CTR_KBDINT;
            if !translate {
                ctr &= !CTR_XLATE;
            }
            self.command(CMD_WRITE_CTR, &[ctr], 0);
            assert!(self.drain().is_empty());
            // i8042_setup_kbd / i8042_enable_kbd_port.
            ctr = (ctr & !CTR_KBDDIS) | CTR_KBDINT;
            self.command(CMD_WRITE_CTR, &[ctr], 0);
            // atkbd_probe: get ID, deactivate.
            let id = self.kbd_command(&[KBD_GET_ID], 2);
            assert_eq!(id, [0xab, if translate { 0x41 } else { 0x83 }]);
            self.kbd_command(&[KBD_DISABLE], 0);
            if !translate {
                // atkbd_select_set: untranslated keyboards are asked.
                let set = self.kbd_command(&[KBD_SCANCODE_SET, 0], 1);
                assert_eq!(set, [2]);
            }
            // atkbd_reset_state, atkbd_activate.
            self.kbd_command(&[KBD_SET_LEDS, 0], 0);
            self.kbd_command(&[KBD_TYPEMATIC, 0], 0);
            self.kbd_command(&[KBD_ENABLE], 0);
            assert!(self.drain().is_empty());
        }
    }

    #[test]
    fn linux_probe_translated() {
        let mut r = Rig::new();
        r.linux_probe(true);
        // ID (3 bytes) + deactivate + 2 LEDs + 2 typematic + enable, each
        // byte one edge; nothing before the CTR enabled the interrupt.
        assert_eq!(r.irqs(), 9);
        let s = r.dev.stats();
        assert!(s.translated && s.scanning);
        assert_eq!(s.leds, 0);
    }

    #[test]
    fn linux_probe_untranslated() {
        let mut r = Rig::new();
        r.linux_probe(false);
        assert_eq!(r.irqs(), 12);
        assert!(!r.dev.stats().translated);
    }

    #[test]
    fn status_and_command_byte() {
        let mut r = Rig::new();
        let s = r.status();
        assert_eq!(s & (STR_OBF | 0x02), 0);
        assert_ne!(s & STR_UNLOCKED, 0);
        assert_eq!(r.command(CMD_READ_CTR, &[], 1), [INITIAL_CTR]);
        assert_ne!(r.status() & STR_CMD, 0);
        r.command(CMD_WRITE_CTR, &[0x00], 0);
        assert_eq!(r.status() & (STR_CMD | STR_SYS), 0);
        // The AUX port cannot be enabled, by command or CTR write.
        assert_eq!(r.command(CMD_READ_CTR, &[], 1), [CTR_AUXDIS]);
        r.command(CMD_AUX_ENABLE, &[], 0);
        assert_eq!(r.command(CMD_READ_CTR, &[], 1), [CTR_AUXDIS]);
        r.command(CMD_KBD_DISABLE, &[], 0);
        assert_eq!(r.command(CMD_READ_CTR, &[], 1), [CTR_AUXDIS | CTR_KBDDIS]);
        r.command(CMD_KBD_ENABLE, &[], 0);
        assert_eq!(r.command(CMD_READ_CTR, &[], 1), [CTR_AUXDIS]);
        assert_eq!(r.command(CMD_KBD_TEST, &[], 1), [0]);
        assert_eq!(r.command(CMD_PASSWORD_INSTALLED, &[], 1), [NO_PASSWORD]);
        assert_eq!(r.command(CMD_READ_OUTPUT_PORT, &[], 1), [INITIAL_OUTPUT_PORT]);
        // Offsets 1..=3 are not ours.
        let mut b = [0u8];
        r.dev.read(1, &mut b);
        assert_eq!(b[0], 0xff);
        r.dev.write(2, &[0xfe]);
        assert!(r.events.try_recv().is_err());
        // An empty output buffer reads as the last byte.
        assert_eq!(r.read(), 0xcf);
    }

    #[test]
    fn aux_probe_finds_no_port() {
        let mut r = Rig::new();
        // i8042_check_aux: the loopback works and comes back as AUX data...
        r.cmd(CMD_WRITE_AUX_OBUF);
        r.data(0x5a);
        assert_eq!(r.status() & (STR_OBF | STR_AUX_OBF), STR_OBF | STR_AUX_OBF);
        assert_eq!(r.read(), 0x5a);
        // ...but i8042_toggle_aux(true) never sees the disable bit clear.
        r.command(CMD_AUX_DISABLE, &[], 0);
        assert_ne!(r.command(CMD_READ_CTR, &[], 1)[0] & CTR_AUXDIS, 0);
        r.command(CMD_AUX_ENABLE, &[], 0);
        assert_ne!(r.command(CMD_READ_CTR, &[], 1)[0] & CTR_AUXDIS, 0);
        // A byte for the missing mouse times out.
        r.command(CMD_WRITE_AUX, &[0xff], 0);
        assert_eq!(r.status() & (STR_AUX_OBF | STR_TIMEOUT), STR_AUX_OBF | STR_TIMEOUT);
        assert_eq!(r.read(), KBD_NAK);
        // The keyboard loopback is keyboard data; no AUX byte interrupted.
        r.command(CMD_WRITE_CTR, &[CTR_KBDINT | CTR_AUXINT | CTR_XLATE], 0);
        assert_eq!(r.irqs(), 0);
        r.cmd(CMD_WRITE_KBD_OBUF);
        r.data(0x77);
        assert_eq!(r.status() & (STR_OBF | STR_AUX_OBF), STR_OBF);
        assert_eq!(r.read(), 0x77);
        assert_eq!(r.irqs(), 1);
        r.cmd(CMD_WRITE_AUX_OBUF);
        r.data(0x78);
        assert_eq!(r.read(), 0x78);
        assert_eq!(r.irqs(), 1);
    }

    #[test]
    fn keyboard_commands() {
        let mut r = Rig::new();
        r.command(CMD_WRITE_CTR, &[CTR_SYS], 0); // untranslated, no IRQ
        assert_eq!(r.kbd_command(&[KBD_RESET], 1), [KBD_BAT_OK]);
        assert_eq!(r.kbd_command(&[KBD_GET_ID], 2), [0xab, 0x83]);
        r.kbd_command(&[KBD_SET_LEDS, 0x04], 0);
        assert_eq!(r.dev.stats().leds, 4);
        assert_eq!(r.kbd_command(&[KBD_SCANCODE_SET, 0], 1), [2]);
        r.kbd_command(&[KBD_SCANCODE_SET, 1], 0);
        assert_eq!(r.kbd_command(&[KBD_SCANCODE_SET, 0], 1), [1]);
        r.kbd_command(&[KBD_SCANCODE_SET, 3], 0); // refused quietly
        assert_eq!(r.kbd_command(&[KBD_SCANCODE_SET, 0], 1), [1]);
        r.kbd_command(&[KBD_TYPEMATIC, 0x20], 0);
        r.data(KBD_ECHO);
        assert_eq!(r.read(), KBD_ECHO);
        r.data(KBD_RESEND);
        assert_eq!(r.read(), KBD_ECHO);
        r.data(0x42); // not a command
        assert_eq!(r.read(), KBD_NAK);
        r.kbd_command(&[0xf8], 0); // set-3 "all keys make/break": ACK
        r.kbd_command(&[KBD_DISABLE], 0);
        assert!(!r.dev.stats().scanning);
        assert_eq!(r.dev.key(KEY_A, true), Err(KeyError::KeyboardDisabled));
        r.kbd_command(&[KBD_DEFAULTS], 0);
        assert!(r.dev.stats().scanning);
        assert_eq!(r.kbd_command(&[KBD_SCANCODE_SET, 0], 1), [2]);
        assert_eq!(r.dev.stats().leds, 0);
        assert!(r.drain().is_empty());
        assert_eq!(r.irqs(), 0);
    }

    #[test]
    fn keys_translated_to_set_1() {
        let mut r = Rig::new();
        r.linux_probe(true);
        let before = r.irqs();
        r.dev.key(KEY_A, true).unwrap();
        r.dev.key(KEY_A, false).unwrap();
        r.dev.key(KEY_UP, true).unwrap();
        r.dev.key(KEY_UP, false).unwrap();
        r.dev.key(65, true).unwrap(); // F7: set 2 0x83
        r.dev.key(65, false).unwrap();
        assert_eq!(r.drain(), [0x1e, 0x9e, 0xe0, 0x48, 0xe0, 0xc8, 0x41, 0xc1]);
        assert_eq!(r.irqs() - before, 8);
        assert_eq!(r.dev.keys_delivered(), 6);
        r.dev.key(119, true).unwrap(); // Pause
        r.dev.key(119, false).unwrap(); // sends nothing
        assert_eq!(r.drain(), [0xe1, 0x1d, 0x45, 0xe1, 0x9d, 0xc5]);
    }

    #[test]
    fn keys_in_set_2_untranslated() {
        let mut r = Rig::new();
        r.linux_probe(false);
        let before = r.irqs();
        r.dev.key(KEY_A, true).unwrap();
        r.dev.key(KEY_A, false).unwrap();
        r.dev.key(KEY_UP, true).unwrap();
        r.dev.key(KEY_UP, false).unwrap();
        assert_eq!(r.drain(), [0x1c, 0xf0, 0x1c, 0xe0, 0x75, 0xe0, 0xf0, 0x75]);
        assert_eq!(r.irqs() - before, 8);
        // A keyboard switched to set 1 with translation off sends set 1.
        r.kbd_command(&[KBD_SCANCODE_SET, 1], 0);
        r.dev.key(KEY_UP, true).unwrap();
        r.dev.key(KEY_UP, false).unwrap();
        assert_eq!(r.drain(), [0xe0, 0x48, 0xe0, 0xc8]);
    }

    #[test]
    fn keys_refused_until_the_port_is_enabled() {
        let mut r = Rig::new();
        assert_eq!(r.dev.key(KEY_A, true), Err(KeyError::PortDisabled));
        assert_eq!(r.dev.key(0, true), Err(KeyError::Unknown(0)));
        assert_eq!(r.dev.key(9999, true), Err(KeyError::Unknown(9999)));
        assert!(r.drain().is_empty());
        r.linux_probe(true);
        r.command(CMD_KBD_DISABLE, &[], 0);
        assert_eq!(r.dev.key(KEY_A, true), Err(KeyError::PortDisabled));
        r.command(CMD_KBD_ENABLE, &[], 0);
        r.dev.key(KEY_A, true).unwrap();
        assert_eq!(r.drain(), [0x1e]);
    }

    #[test]
    fn irq_follows_the_interrupt_enable_bit() {
        let mut r = Rig::new();
        r.linux_probe(true);
        let ctr = r.command(CMD_READ_CTR, &[], 1)[0];
        let base = r.irqs();
        // The CTR answer itself interrupted (KBDINT was on).
        assert_eq!(base, 10);
        r.command(CMD_WRITE_CTR, &[ctr & !CTR_KBDINT], 0);
        r.dev.key(KEY_A, true).unwrap();
        r.dev.key(KEY_A, false).unwrap();
        assert_eq!(r.irqs(), base);
        // Enabling the interrupt with a byte waiting is an edge.
        r.command(CMD_WRITE_CTR, &[ctr], 0);
        assert_eq!(r.irqs(), base + 1);
        assert_eq!(r.drain(), [0x1e, 0x9e]);
        assert_eq!(r.irqs(), base + 2);
        assert_eq!(r.dev.stats().irqs, base + 2);
    }

    #[test]
    fn answers_overtake_queued_keys_but_not_a_break_pair() {
        let mut r = Rig::new();
        r.linux_probe(true);
        r.dev.key(KEY_UP, true).unwrap();
        r.dev.key(KEY_UP, false).unwrap();
        // E0 is in the output buffer; the guest sets the LEDs (Caps Lock).
        r.data(KBD_SET_LEDS);
        assert_eq!(r.read(), 0xe0);
        assert_eq!(r.read(), KBD_ACK);
        // No key bytes while the keyboard waits for the parameter...
        assert_eq!(r.status() & STR_OBF, 0);
        r.data(0x04);
        assert_eq!(r.read(), KBD_ACK);
        // ...then the rest of the keys, intact.
        assert_eq!(r.drain(), [0x48, 0xe0, 0xc8]);

        // Untranslated: F0 and its code are never split by an answer.
        let mut r = Rig::new();
        r.linux_probe(false);
        r.dev.key(KEY_UP, false).unwrap(); // E0 F0 75
        assert_eq!(r.read(), 0xe0);
        assert_eq!(r.read(), 0xf0);
        r.data(KBD_ECHO);
        assert_eq!(r.drain(), [0x75, KBD_ECHO]);
    }

    #[test]
    fn translator_keeps_a_break_pair_together() {
        // With XLATE on, E0 F0 75 comes out as E0 C8 even with an answer
        // slipping in after the E0.
        let mut r = Rig::new();
        r.linux_probe(true);
        r.dev.key(KEY_UP, false).unwrap();
        r.data(KBD_ECHO);
        assert_eq!(r.drain(), [0xe0, KBD_ECHO, 0xc8]);
    }

    #[test]
    fn queue_overflow_drops_oldest_whole_keys() {
        let mut r = Rig::new();
        r.linux_probe(true);
        for _ in 0..1000 {
            r.dev.key(KEY_UP, true).unwrap(); // 2 bytes each
        }
        let s = r.dev.stats();
        assert!(s.queued_bytes <= KEY_QUEUE_BYTES);
        assert_eq!(s.keys_queued, 1000);
        assert!(s.keys_dropped > 400, "{s:?}");
        let out = r.drain();
        assert_eq!(out.len() % 2, 0);
        assert!(out.chunks(2).all(|c| c == [0xe0, 0x48]));
        let s = r.dev.stats();
        assert_eq!(s.keys_delivered + s.keys_dropped, 1000);
        assert_eq!(s.queued_bytes, 0);
    }

    #[test]
    fn reset_line() {
        let mut r = Rig::new();
        r.cmd(CMD_RESET_CPU);
        assert_eq!(r.events.try_recv().ok(), Some(VmEvent::Reset { source: "i8042 reset line" }));
        for c in [0xf0, 0xfa, 0xfc, 0xff] {
            r.cmd(c);
        }
        assert!(r.events.try_recv().is_err());
        // Writing the output port with the reset bit low resets too.
        r.command(CMD_WRITE_OUTPUT_PORT, &[0xde], 0);
        assert!(matches!(r.events.try_recv(), Ok(VmEvent::Reset { .. })));
    }

    /// Turns what the guest reads back into key events, as atkbd would.
    fn decode(bytes: &[u8], translated: bool) -> Vec<(u16, bool)> {
        let mut out = Vec::new();
        let (mut ext, mut brk) = (false, false);
        for &b in bytes {
            match b {
                0xe0 => ext = true,
                0xf0 if !translated => brk = true,
                _ => {
                    let (code, release) = if translated { (b & 0x7f, b & 0x80 != 0) } else { (b, brk) };
                    let key = (0..=255u16)
                        .find(|&k| match keymap::set2_scancode(k) {
                            Some(Set2::Plain(c)) if !ext => (if translated { xlate(c) } else { c }) == code,
                            Some(Set2::Ext(c)) if ext => (if translated { xlate(c) } else { c }) == code,
                            _ => false,
                        })
                        .expect("scancode of no key");
                    out.push((key, !release));
                    ext = false;
                    brk = false;
                }
            }
        }
        out
    }

    #[test]
    fn typed_text_round_trips() {
        for translated in [true, false] {
            let mut r = Rig::new();
            r.linux_probe(translated);
            let events = text_to_events("Hello, World! ~/a_b|c\n", 0, 0).unwrap();
            let mut bytes = Vec::new();
            for e in &events {
                r.dev.key(e.code, e.press).unwrap();
                // Read like an interrupt handler: one byte per edge.
                bytes.extend(r.drain());
            }
            let expected: Vec<(u16, bool)> = events.iter().map(|e| (e.code, e.press)).collect();
            assert_eq!(decode(&bytes, translated), expected);
            assert!(expected.contains(&(KEY_LEFTSHIFT, true)) && expected.contains(&(KEY_ENTER, true)));
        }
    }

    #[test]
    fn every_key_round_trips_in_both_modes() {
        for translated in [true, false] {
            let mut r = Rig::new();
            r.linux_probe(translated);
            for code in (0..=255u16).filter(|&k| matches!(keymap::set2_scancode(k), Some(Set2::Plain(_) | Set2::Ext(_)))) {
                r.dev.key(code, true).unwrap();
                r.dev.key(code, false).unwrap();
                assert_eq!(decode(&r.drain(), translated), [(code, true), (code, false)], "key {code}");
            }
        }
    }

    /// A rig around the device rebuilt from `r`'s state, after a trip
    /// through JSON as a snapshot file would take.
    fn restored(r: &Rig) -> Rig {
        let state = r.dev.state();
        let json = serde_json::to_string(&state).unwrap();
        let back: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let (tx, rx) = lifecycle::channel();
        let irqs = Arc::new(AtomicU64::new(0));
        let dev = I8042::from_state(tx, Box::new(CountingIrq(irqs.clone())), &back).unwrap();
        assert_eq!(dev.state(), state);
        Rig { dev, irqs, events: rx }
    }

    /// What the guest sees of the rest of the device's life: every status
    /// and data read of a script of commands and keys, the interrupts it
    /// gets, and the counters at the end.
    fn transcript(r: &mut Rig) -> (Vec<u8>, u64, KeyboardStats) {
        let irqs = r.irqs();
        let mut seen = vec![r.status()];
        let step = |r: &mut Rig, seen: &mut Vec<u8>| {
            seen.push(r.status());
            seen.extend(r.drain());
        };
        // Parameters the state left pending go where they were meant to.
        r.data(0x77);
        step(r, &mut seen);
        r.data(0x02);
        step(r, &mut seen);
        r.dev.key(KEY_A, true).unwrap();
        r.dev.key(KEY_UP, false).unwrap();
        step(r, &mut seen);
        seen.extend(r.command(CMD_READ_CTR, &[], 1));
        seen.extend(r.command(CMD_READ_OUTPUT_PORT, &[], 1));
        r.data(KBD_RESEND);
        step(r, &mut seen);
        seen.push(r.read()); // empty: the last byte again
        (seen, r.irqs() - irqs, r.dev.stats())
    }

    /// Keys queued, the front one (Pause, 8 bytes) partly read, LED and
    /// controller commands waiting for their parameters, a changed command
    /// byte: a restored device carries on exactly as the original does.
    #[test]
    fn state_round_trips_mid_packet_with_parameters_pending() {
        for translate in [true, false] {
            let mut r = Rig::new();
            r.linux_probe(translate);
            // Scroll Lock on (an LED), then a CTR without the SYS flag.
            r.kbd_command(&[KBD_SET_LEDS, 0x01], 0);
            let ctr = r.command(CMD_READ_CTR, &[], 1)[0];
            r.command(CMD_WRITE_CTR, &[ctr & !CTR_SYS], 0);
            r.dev.key(119, true).unwrap(); // Pause
            r.dev.key(KEY_A, true).unwrap();
            r.dev.key(KEY_A, false).unwrap();
            let first = [r.read(), r.read()];
            r.data(KBD_SET_LEDS); // ACK overtakes; scancodes then wait for the LEDs
            r.cmd(CMD_WRITE_KBD_OBUF); // the next data byte is loopback
            let s = r.dev.state();
            assert!(s.keyboard.front_sent > 0 && s.keyboard.keys.len() == 3, "{s:?}");
            assert_eq!((s.keyboard.awaiting, s.param), (Some(KBD_SET_LEDS), Some(ControllerParam::KbdObuf)));
            assert_eq!(s.keyboard.leds, 1);

            let mut back = restored(&r);
            let (ours, theirs) = (transcript(&mut r), transcript(&mut back));
            assert_eq!(ours, theirs, "translate {translate}, after {first:x?}");
            assert!(ours.0.contains(&0x77) && ours.0.contains(&KBD_ACK), "{:x?}", ours.0);
            assert_eq!(ours.2.leds, 2);
            assert_eq!(back.dev.state(), r.dev.state());
            assert!(back.events.try_recv().is_err());
        }
    }

    #[test]
    fn reassert_irq_only_with_a_keyboard_byte_and_the_interrupt_on() {
        let mut r = Rig::new();
        r.linux_probe(true);
        r.dev.reassert_irq();
        let base = r.irqs();
        assert_eq!(base, 9, "nothing waiting: no edge");
        r.dev.key(KEY_A, true).unwrap();
        let mut back = restored(&r);
        assert_eq!(back.irqs(), 0, "restoring raises nothing by itself");
        back.dev.reassert_irq();
        assert_eq!(back.irqs(), 1);
        assert_eq!(back.drain(), [0x1e]);
        assert_eq!(r.drain(), [0x1e]);
    }

    fn rebuild(state: &I8042State) -> Result<I8042, DeviceStateError> {
        let (tx, _rx) = lifecycle::channel();
        I8042::from_state(tx, Box::new(CountingIrq(Arc::default())), state)
    }

    #[test]
    fn impossible_states_are_refused() {
        let mut r = Rig::new();
        r.linux_probe(false);
        r.dev.key(119, true).unwrap();
        r.read();
        let good = r.dev.state();
        assert!(rebuild(&good).is_ok());
        /// Turns a good state into a bad one.
        type Spoil = fn(&mut I8042State);
        let cases: &[(&str, Spoil)] = &[
            ("9-byte key event", |s| s.keyboard.keys.push(vec![0x1c; 9])),
            ("huge key event", |s| s.keyboard.keys.push(vec![0x1c; 1 << 20])),
            ("empty key event", |s| s.keyboard.keys.push(Vec::new())),
            ("front wholly sent", |s| s.keyboard.front_sent = 8),
            ("front past its end", |s| s.keyboard.front_sent = 200),
            ("sent of nothing", |s| {
                s.keyboard.keys.clear();
                s.keyboard.front_sent = 1;
            }),
            ("key queue over-full", |s| s.keyboard.keys.extend(std::iter::repeat_n(vec![0xe0, 0x75], 600))),
            ("too many answers", |s| s.keyboard.answers = vec![KBD_ACK; ANSWER_QUEUE_BYTES + 1]),
            ("too many controller answers", |s| s.answers = vec![OutByte::kbd(0); ANSWER_QUEUE_BYTES + 1]),
            ("scancode set 3", |s| s.keyboard.set = 3),
            ("LED bits", |s| s.keyboard.leds = 0x08),
            ("typematic bit 7", |s| s.keyboard.typematic = 0x80),
            ("parameter of no command", |s| s.keyboard.awaiting = Some(KBD_ECHO)),
            ("keys while not scanning", |s| s.keyboard.scanning = false),
            ("AUX port enabled", |s| s.ctr &= !CTR_AUXDIS),
            ("empty output buffer, answers behind", |s| {
                s.obuf = None;
                s.answers.push(OutByte::kbd(SELF_TEST_OK));
            }),
            ("empty output buffer, keys behind", |s| s.obuf = None),
        ];
        for &(what, spoil) in cases {
            let mut bad = good.clone();
            spoil(&mut bad);
            match rebuild(&bad) {
                Err(DeviceStateError::Invalid { device: "i8042", reason }) => assert!(!reason.is_empty()),
                Err(e) => panic!("{what}: {e}"),
                Ok(_) => panic!("{what}: accepted"),
            }
        }
        // At the limits exactly: accepted.
        let mut full = good.clone();
        full.keyboard.keys = vec![vec![0x1c]; KEY_QUEUE_BYTES];
        full.keyboard.front_sent = 0;
        full.keyboard.answers = vec![KBD_ACK; ANSWER_QUEUE_BYTES];
        assert!(rebuild(&full).is_ok());
    }

    /// Every state the device can reach restores, and the restored device
    /// carries on as the original does.
    #[test]
    fn random_reachable_states_restore() {
        // Bytes a driver would send, so that the random walk reaches the
        // interesting states (parameters pending, packets half sent, the
        // port disabled with keys queued) often.
        const DATA_BYTES: [u8; 12] = [KBD_SET_LEDS, KBD_TYPEMATIC, KBD_SCANCODE_SET, 0, 1, 2, 4, KBD_ENABLE, KBD_ECHO, KBD_RESEND, KBD_GET_ID, 0x41];
        const COMMANDS: [u8; 12] = [CMD_READ_CTR, CMD_WRITE_CTR, CMD_KBD_DISABLE, CMD_KBD_ENABLE, CMD_WRITE_KBD_OBUF, CMD_WRITE_AUX_OBUF, CMD_WRITE_AUX, CMD_SELF_TEST, CMD_READ_OUTPUT_PORT, 0x61, CMD_AUX_DISABLE, 0x21];
        let (mut half_sent, mut awaiting, mut param, mut parked) = (0, 0, 0, 0);
        for seed in 1..=8u64 {
            let mut seed = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
            let mut rng = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let mut r = Rig::new();
            r.linux_probe(seed % 2 == 0);
            for round in 0..200 {
                for _ in 0..rng() % 40 {
                    let x = rng();
                    let pick = (x >> 8) as usize % 12;
                    match x % 8 {
                        0 | 1 => {
                            r.read();
                        }
                        2 => r.data(DATA_BYTES[pick]),
                        3 => r.cmd(COMMANDS[pick]),
                        4 if pick == 0 => r.data((x >> 16) as u8),
                        _ => {
                            let _ = r.dev.key((x >> 32) as u16 % 130, x & (1 << 40) != 0);
                        }
                    }
                }
                let s = r.dev.state();
                half_sent += usize::from(s.keyboard.front_sent > 0);
                awaiting += usize::from(s.keyboard.awaiting.is_some());
                param += usize::from(s.param.is_some());
                parked += usize::from(s.ctr & CTR_KBDDIS != 0 && !s.keyboard.keys.is_empty());
                let mut back = restored(&r);
                // A slice of the future: the same reads give the same bytes.
                for _ in 0..8 {
                    assert_eq!((back.status(), back.read()), (r.status(), r.read()), "seed {seed} round {round}");
                }
                assert_eq!(back.dev.state(), r.dev.state());
                r = back;
            }
        }
        assert!(half_sent > 20 && awaiting > 20 && param > 20 && parked > 20, "{half_sent} {awaiting} {param} {parked}");
    }

    #[test]
    fn random_port_io_never_panics() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut r = Rig::new();
        for _ in 0..200_000 {
            let x = next();
            let offset = (x % u64::from(I8042_LEN)) as u16;
            let len = [1usize, 1, 1, 2, 4][(x >> 8) as usize % 5];
            let value = (x >> 16) as u8;
            match (x >> 24) % 8 {
                0..=2 => {
                    let mut buf = [0u8; 4];
                    r.dev.read(offset, &mut buf[..len]);
                }
                3 | 4 => r.dev.write(offset, &[value; 4][..len]),
                5 => r.dev.write(COMMAND, &[value]),
                6 => {
                    let _ = r.dev.key((x >> 32) as u16 % 300, x & (1 << 40) != 0);
                }
                _ => r.dev.write(DATA, &[]),
            }
            assert!(r.dev.kbd.key_bytes <= KEY_QUEUE_BYTES);
            assert!(r.dev.kbd.answers.len() <= ANSWER_QUEUE_BYTES);
            assert!(r.dev.answers.len() <= ANSWER_QUEUE_BYTES);
        }
        // Whatever state it ended in, the guest can still drain it.
        r.drain();
    }
}
