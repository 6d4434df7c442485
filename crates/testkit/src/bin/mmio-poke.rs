//! `mmio-poke FILE OFFSET VALUE COUNT`: maps FILE (a PCI BAR from sysfs, e.g.
//! `/sys/bus/pci/devices/0000:00:01.0/resource0`) and writes the 32-bit VALUE at OFFSET, COUNT
//! times: a guest hammering a device register, as tests of the VMM's bounds need.
//! Prints `mmio-poke wrote N` at the end.

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, offset, value, count] = args.as_slice() else {
        eprintln!("usage: mmio-poke FILE OFFSET VALUE COUNT");
        std::process::exit(2);
    };
    let (Some(offset), Some(value), Some(count)) = (number(offset), number(value), number(count))
    else {
        eprintln!("mmio-poke: OFFSET, VALUE and COUNT are numbers");
        std::process::exit(2);
    };
    if offset % 4 != 0 {
        eprintln!("mmio-poke: OFFSET must be a multiple of 4");
        std::process::exit(2);
    }
    let bar = tandem_testkit::BarMap::new(file);
    for _ in 0..count {
        bar.set(offset as usize / 4, value as u32);
    }
    println!("mmio-poke wrote {count}");
}
