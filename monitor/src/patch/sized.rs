//! A patch of the demo service's `get_message` of a chosen size, for the
//! patch benchmark: half code, half read-only data, all of it written into
//! the process like any patch.
//!
//! The code half is a long function that the patch function calls with the
//! last word of the data half, so both halves are really used.

/// C source of a patch that makes `get_message` return "v2" and whose
/// object carries about `kib` KiB of code and data.
pub fn sized_patch_source(kib: u64) -> String {
    let half = kib * 1024 / 2;
    let words = (half / 8).max(1);
    let fills = (half / 512).max(1);
    format!(
        "static const unsigned long pad[{words}] = {{ [{last}] = 2 }};\n\
         static volatile unsigned long pad_index = {last};\n\
         __attribute__((noinline)) unsigned long filler(unsigned long x)\n{{\n{body}\treturn x;\n}}\n\
         const char *patched_get_message(void)\n{{\n\treturn filler(pad[pad_index]) == 2 ? \"v2\" : \"v2?\";\n}}\n",
        last = words - 1,
        body = "\t__asm__ volatile(\".fill 512, 1, 0x90\");\n".repeat(fills as usize),
    )
}
