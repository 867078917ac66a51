//! How the proxy binary is linked (data-plane/build.rs): its relative relocations packed (DT_RELR), so that ~380 KB
//! of RELA entries, read by the dynamic loader at every start, no longer stay mapped in every proxy.

use std::path::Path;

const PT_DYNAMIC: u32 = 2;
const DT_NULL: u64 = 0;
const DT_RELR: u64 = 36;

/// The tags of the dynamic section of an ELF64 little-endian executable.
fn dynamic_tags(path: &Path) -> Vec<u64> {
    let elf = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&elf[..6], b"\x7fELF\x02\x01", "{}: not an ELF64 little-endian file", path.display());
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    let dynamic = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .find(|&ph| u32_at(ph) == PT_DYNAMIC)
        .unwrap_or_else(|| panic!("{}: no dynamic section", path.display()));
    let (offset, size) = (u64_at(dynamic + 8) as usize, u64_at(dynamic + 0x20) as usize);
    (offset..offset + size).step_by(16).map(u64_at).take_while(|&tag| tag != DT_NULL).collect()
}

#[test]
fn the_proxy_packs_its_relative_relocations_where_a_binary_linked_without_the_flag_does_not() {
    let proxy = dynamic_tags(Path::new(env!("CARGO_BIN_EXE_trellis-proxy")));
    assert!(proxy.contains(&DT_RELR), "trellis-proxy has no DT_RELR: linked without -z pack-relative-relocs");
    // Control: this test binary, linked by the same toolchain without the flag, read by the same code.
    let control = dynamic_tags(&std::env::current_exe().unwrap());
    assert!(!control.is_empty() && !control.contains(&DT_RELR), "the control binary has DT_RELR: {control:?}");
}
