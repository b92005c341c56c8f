//! Just enough AML (ACPI Machine Language) to describe our devices in the
//! DSDT (ACPI 6.4, chapter 20), encoded by rust-vmm's `acpi_tables::aml`.
//!
//! Devices must be in the DSDT even when they sit at their legacy ports:
//! with a hardware-reduced FADT the kernel sets up no legacy PIC and only
//! wires ISA interrupts that ACPI resources name.
//!
//! The functions here take and return encoded terms (`Vec<u8>`), so the
//! DSDT is built from values rather than from borrowed `acpi_tables`
//! objects; [`Encoded`] hands such bytes back to the crate as a child.
//! One descriptor is our own: `acpi_tables` has no IRQNoFlags (the small
//! IRQ descriptor, ACPI 6.4 §6.4.2.1), which the COM1 and PS/2 entries
//! need; the encodings are checked byte for byte against iasl below.
use acpi_tables::aml::{self as a, Path};
use acpi_tables::{Aml, AmlSink};

/// Already encoded AML, as a child of an `acpi_tables` object.
struct Encoded<'a>(&'a [u8]);

impl Aml for Encoded<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.0);
    }
}

fn encode(term: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    term.to_aml_bytes(&mut out);
    out
}

/// Runs `f` with `terms` as `acpi_tables` children.
fn with_children<R>(terms: &[Vec<u8>], f: impl FnOnce(Vec<&dyn Aml>) -> R) -> R {
    let wrapped: Vec<Encoded> = terms.iter().map(|t| Encoded(t)).collect();
    f(wrapped.iter().map(|e| e as &dyn Aml).collect())
}

/// An integer in its shortest encoding (Zero, One, Byte/Word/DWord/QWord).
pub fn integer(v: u64) -> Vec<u8> {
    encode(&v)
}

pub fn string(s: &str) -> Vec<u8> {
    encode(&s.to_string())
}

/// A compressed EISA id such as "PNP0501", as _HID expects (three
/// uppercase letters, four hex digits: our own constants only).
pub fn eisa_id(id: &str) -> Vec<u8> {
    encode(&a::EISAName::new(id))
}

/// Name (path, value). Paths are 4-character segments: "\\_SB_.COM1".
pub fn name(path: &str, value: Vec<u8>) -> Vec<u8> {
    encode(&a::Name::new(Path::new(path), &Encoded(&value)))
}

pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    with_children(elements, |c| encode(&a::Package::new(c)))
}

pub fn scope(path: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    with_children(terms, |c| encode(&a::Scope::new(Path::new(path), c)))
}

pub fn device(path: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    with_children(terms, |c| encode(&a::Device::new(Path::new(path), c)))
}

/// A ResourceTemplate buffer holding `descriptors` plus the end tag.
pub fn resource_template(descriptors: &[Vec<u8>]) -> Vec<u8> {
    with_children(descriptors, |c| encode(&a::ResourceTemplate::new(c)))
}

/// IO (Decode16, base, base, 1, len).
pub fn io_port(base: u16, len: u8) -> Vec<u8> {
    encode(&a::IO::new(base, base, 1, len))
}

/// IRQNoFlags () { irq }: an edge-triggered, active-high ISA interrupt
/// (not in `acpi_tables`).
pub fn isa_irq(irq: u8) -> Vec<u8> {
    let mask = 1u16 << (irq & 0xf);
    let [lo, hi] = mask.to_le_bytes();
    vec![0x22, lo, hi]
}

/// Memory32Fixed (ReadWrite or ReadOnly, base, len): a large resource
/// descriptor (ACPI 6.4 §6.4.3.4).
pub fn memory32_fixed(base: u32, len: u32, writable: bool) -> Vec<u8> {
    encode(&a::Memory32Fixed::new(writable, base, len))
}

/// Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }: the
/// Extended Interrupt Descriptor (ACPI 6.4 §6.4.3.6). Edge, because an
/// irqfd pulses the line: a level-triggered pin pulsed while the guest is
/// still servicing it would lose that interrupt.
pub fn extended_irq(gsi: u32) -> Vec<u8> {
    encode(&a::Interrupt::new(true, true, false, false, gsi))
}

/// Method (path, args, Serialized or NotSerialized) { terms }, sync
/// level 0.
pub fn method(path: &str, args: u8, serialized: bool, terms: &[Vec<u8>]) -> Vec<u8> {
    with_children(terms, |c| encode(&a::Method::new(Path::new(path), args, serialized, c)))
}

/// Return (value)
pub fn return_value(value: Vec<u8>) -> Vec<u8> {
    encode(&a::Return::new(&Encoded(&value)))
}

/// If (predicate) { terms }
pub fn if_then(predicate: Vec<u8>, terms: &[Vec<u8>]) -> Vec<u8> {
    with_children(terms, |c| encode(&a::If::new(&Encoded(&predicate), c)))
}

/// LEqual (a, b)
pub fn equal(left: Vec<u8>, right: Vec<u8>) -> Vec<u8> {
    encode(&a::Equal::new(&Encoded(&left), &Encoded(&right)))
}

/// ArgN, the method's argument `n` (0 to 6).
pub fn arg(n: u8) -> Vec<u8> {
    encode(&a::Arg(n.min(6)))
}

/// Notify (path, value)
pub fn notify(path: &str, value: u64) -> Vec<u8> {
    encode(&a::Notify::new(&Path::new(path), &value))
}

/// The VM generation ID device (`devices/vmgenid.rs`). Linux's vmgenid
/// driver (drivers/virt/vmgenid.c) binds to _HID or _CID "VMGENCTR" or
/// "VM_GEN_COUNTER" and evaluates `ADDR`, a package of two integers: the
/// low and high 32 bits of the ID's guest-physical address. The _CID and
/// _DDN are the names Microsoft's VM generation ID specification gives
/// (ACPICA upper-cases a string _CID, so Linux matches it too).
pub fn vmgenid_device(addr: u64) -> Vec<u8> {
    device(
        "VGEN",
        &[
            name("_HID", string("VMGENCTR")),
            name("_CID", string("VM_Gen_Counter")),
            name("_DDN", string("VM_Gen_Counter")),
            method(
                "ADDR",
                0,
                false,
                &[return_value(package(&[integer(addr & 0xffff_ffff), integer(addr >> 32)]))],
            ),
        ],
    )
}

/// The ACPI Generic Event Device (ACPI 6.4 §5.6.9, Linux
/// drivers/acpi/evged.c): with a hardware-reduced FADT there is no GPE
/// block, so this is how the VMM raises an ACPI event. Linux requests the
/// _CRS interrupt and, when it fires, runs _EVT with the GSI as Arg0 (it
/// looks for `_Exx` first and falls back to _EVT); our _EVT notifies
/// `target` with 0x80, which reaches the driver bound to that device.
pub fn ged_device(gsi: u32, target: &str) -> Vec<u8> {
    device(
        "GED_",
        &[
            name("_HID", string("ACPI0013")),
            name("_UID", integer(0)),
            name("_CRS", resource_template(&[extended_irq(gsi)])),
            method("_EVT", 1, true, &[if_then(equal(arg(0), integer(u64::from(gsi))), &[notify(target, 0x80)])]),
        ],
    )
}

/// A virtio-mmio device as QEMU microvm describes one, which the Linux
/// virtio_mmio driver binds to by its _HID. `index` names the device
/// (VR00..VRFF) and is its _UID.
pub fn virtio_mmio_device(index: u8, base: u32, gsi: u32) -> Vec<u8> {
    device(
        &format!("VR{index:02X}"),
        &[
            name("_HID", string("LNRO0005")),
            name("_UID", integer(u64::from(index))),
            name("_CCA", integer(1)),
            name(
                "_CRS",
                resource_template(&[
                    memory32_fixed(base, crate::devices::virtio::MMIO_LEN as u32, true),
                    extended_irq(gsi),
                ]),
            ),
        ],
    )
}

/// The i8042 keyboard controller as QEMU describes it (PNP0303, "IBM
/// Enhanced keyboard"): with a hardware-reduced FADT Linux's i8042 driver
/// only probes a controller that firmware names, and takes its data and
/// command ports (one byte each, as it insists) and IRQ from here. No PS/2
/// mouse (PNP0F13) entry: Linux then assumes the AUX port is absent.
pub fn ps2_keyboard(data_port: u16, command_port: u16, irq: u8) -> Vec<u8> {
    device(
        "PS2K",
        &[
            name("_HID", eisa_id("PNP0303")),
            name("_STA", integer(0x0f)),
            name(
                "_CRS",
                resource_template(&[io_port(data_port, 1), io_port(command_port, 1), isa_irq(irq)]),
            ),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_iasl() {
        // iasl: Name (_HID, EisaId ("PNP0501")) => 08 5F 48 49 44 0C 41 D0 05 01
        assert_eq!(name("_HID", eisa_id("PNP0501")), [0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01]);
        // PkgLength counts its own bytes: one byte up to 63, then two.
        assert_eq!(package(&vec![integer(0); 9])[..3], [0x12, 11, 9]);
        assert_eq!(package(&vec![integer(0); 63])[..4], [0x12, 0x42, 0x04, 63]);
        assert_eq!(notify("\\_SB_.COM1", 0x80)[..3], [0x86, b'\\', 0x2e]);
        assert_eq!(io_port(0x3f8, 8), [0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]);
        assert_eq!(isa_irq(4), [0x22, 0x10, 0x00]);
        assert_eq!(package(&[integer(5)]), [0x12, 0x04, 0x01, 0x0a, 0x05]);
    }

    #[test]
    fn virtio_mmio_entry_matches_iasl() {
        // iasl: Memory32Fixed (ReadWrite, 0xD0000000, 0x200)
        assert_eq!(memory32_fixed(0xd000_0000, 0x200, true), [0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x02, 0x00, 0x00]);
        // iasl: Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 5 }
        assert_eq!(extended_irq(5), [0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00]);
        // The AML iasl (20200925) compiles from:
        // Device (VR01) { Name (_HID, "LNRO0005") Name (_UID, 1) Name (_CCA, One)
        //   Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, 0xD0000200, 0x200)
        //     Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 6 } }) }
        let expected: &[u8] = &[
            0x5b, 0x82, 0x41, 0x04, b'V', b'R', b'0', b'1',
            0x08, b'_', b'H', b'I', b'D', 0x0d, b'L', b'N', b'R', b'O', b'0', b'0', b'0', b'5', 0x00,
            0x08, b'_', b'U', b'I', b'D', 0x01,
            0x08, b'_', b'C', b'C', b'A', 0x01,
            0x08, b'_', b'C', b'R', b'S', 0x11, 0x1a, 0x0a, 0x17,
            0x86, 0x09, 0x00, 0x01, 0x00, 0x02, 0x00, 0xd0, 0x00, 0x02, 0x00, 0x00,
            0x89, 0x06, 0x00, 0x03, 0x01, 0x06, 0x00, 0x00, 0x00,
            0x79, 0x00,
        ];
        assert_eq!(virtio_mmio_device(1, 0xd000_0200, 6), expected);
    }

    #[test]
    fn ps2_keyboard_matches_iasl() {
        // The AML iasl (20200925) compiles from:
        // Device (PS2K) { Name (_HID, EisaId ("PNP0303")) Name (_STA, 0x0F)
        //   Name (_CRS, ResourceTemplate () { IO (Decode16, 0x0060, 0x0060, 0x01, 0x01)
        //     IO (Decode16, 0x0064, 0x0064, 0x01, 0x01) IRQNoFlags () {1} }) }
        let expected: &[u8] = &[
            0x5b, 0x82, 0x34, b'P', b'S', b'2', b'K',
            0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x03, 0x03,
            0x08, b'_', b'S', b'T', b'A', 0x0a, 0x0f,
            0x08, b'_', b'C', b'R', b'S', 0x11, 0x18, 0x0a, 0x15,
            0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01,
            0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01,
            0x22, 0x02, 0x00,
            0x79, 0x00,
        ];
        assert_eq!(ps2_keyboard(0x60, 0x64, 1), expected);
    }

    #[test]
    fn vmgenid_and_ged_match_iasl() {
        // The AML iasl (20200925, -f because it wants hex digits after the
        // first four _HID characters; -on: no name-path shortening)
        // compiles from:
        // Scope (\_SB_) {
        //   Device (VGEN) { Name (_HID, "VMGENCTR") Name (_CID, "VM_Gen_Counter")
        //     Name (_DDN, "VM_Gen_Counter")
        //     Method (ADDR, 0, NotSerialized) { Return (Package (0x02) { 0x000FE000, Zero }) } }
        //   Device (GED_) { Name (_HID, "ACPI0013") Name (_UID, Zero)
        //     Name (_CRS, ResourceTemplate () {
        //       Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 5 } })
        //     Method (_EVT, 1, Serialized) { If (LEqual (Arg0, 0x05)) { Notify (\_SB_.VGEN, 0x80) } } } }
        let vgen: &[u8] = &[
            0x5b, 0x82, 0x40, 0x05, b'V', b'G', b'E', b'N',
            0x08, b'_', b'H', b'I', b'D', 0x0d, b'V', b'M', b'G', b'E', b'N', b'C', b'T', b'R', 0x00,
            0x08, b'_', b'C', b'I', b'D', 0x0d,
            b'V', b'M', b'_', b'G', b'e', b'n', b'_', b'C', b'o', b'u', b'n', b't', b'e', b'r', 0x00,
            0x08, b'_', b'D', b'D', b'N', 0x0d,
            b'V', b'M', b'_', b'G', b'e', b'n', b'_', b'C', b'o', b'u', b'n', b't', b'e', b'r', 0x00,
            0x14, 0x10, b'A', b'D', b'D', b'R', 0x00,
            0xa4, 0x12, 0x08, 0x02, 0x0c, 0x00, 0xe0, 0x0f, 0x00, 0x00,
        ];
        let ged: &[u8] = &[
            0x5b, 0x82, 0x49, 0x04, b'G', b'E', b'D', b'_',
            0x08, b'_', b'H', b'I', b'D', 0x0d, b'A', b'C', b'P', b'I', b'0', b'0', b'1', b'3', 0x00,
            0x08, b'_', b'U', b'I', b'D', 0x00,
            0x08, b'_', b'C', b'R', b'S', 0x11, 0x0e, 0x0a, 0x0b,
            0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00,
            0x79, 0x00,
            0x14, 0x19, b'_', b'E', b'V', b'T', 0x09,
            0xa0, 0x12, 0x93, 0x68, 0x0a, 0x05,
            0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'V', b'G', b'E', b'N', 0x0a, 0x80,
        ];
        assert_eq!(vmgenid_device(0xfe000), vgen);
        assert_eq!(ged_device(5, "\\_SB_.VGEN"), ged);
        let whole = scope("\\_SB_", &[vmgenid_device(0xfe000), ged_device(5, "\\_SB_.VGEN")]);
        assert_eq!(whole[..8], [0x10, 0x44, 0x0a, b'\\', b'_', b'S', b'B', b'_']);
        assert_eq!(whole.len(), 165);
    }

    #[test]
    fn vmgenid_address_above_4g_splits_into_two_dwords() {
        let d = vmgenid_device(0x2_2345_6000);
        let ret = [0xa4, 0x12, 0x09, 0x02, 0x0c, 0x00, 0x60, 0x45, 0x23, 0x0a, 0x02];
        assert!(d.windows(ret.len()).any(|w| w == ret), "{d:02x?}");
        assert_eq!(method("ADDR", 0, false, &[])[..], [0x14, 0x06, b'A', b'D', b'D', b'R', 0x00]);
        assert_eq!(method("_EVT", 1, true, &[])[6], 0x09);
        assert_eq!(arg(0), [0x68]);
    }
}
