//! Port I/O, MSRs, CPUID, the TSC, the serial port, the local APIC and power-off.

use core::arch::asm;
use core::fmt;

/// Writes `v` to I/O port `port`.
///
/// # Safety
/// The port's device must accept the write (no memory is touched).
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: the caller vouches for the device; `out` touches no memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Writes `v` to I/O port `port` (32 bits).
///
/// # Safety
/// As [`outb`].
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: as outb.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads I/O port `port`.
///
/// # Safety
/// Reading the port must have no effect the caller does not expect.
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the caller vouches for the device; `in` touches no memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Reads I/O port `port` (32 bits).
///
/// # Safety
/// As [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as inb.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Reads MSR `msr`.
///
/// # Safety
/// The MSR must exist (else #GP).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller vouches that the MSR exists; rdmsr touches no memory.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// Writes MSR `msr`. Not `nomem`: some MSRs (kvmclock, the APIC) make the CPU or hypervisor
/// write memory or deliver interrupts, so the compiler must not move memory accesses across it.
///
/// # Safety
/// The MSR must exist and accept `v`; its effect must be what the caller expects.
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: the caller vouches for the MSR and value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    }
}

/// The TSC.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads a counter; CR4.TSD is clear (ring 0 anyway).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// CPUID leaf `leaf`, subleaf 0: `(eax, ebx, ecx, edx)`.
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Disables interrupts.
pub fn cli() {
    // SAFETY: only clears IF. Not `nomem`: the compiler must not move memory accesses across it.
    unsafe { asm!("cli", options(nostack)) }
}

/// Enables interrupts and halts until one arrives (atomically: `sti` takes effect after `hlt`
/// has started), returning with interrupts enabled.
pub fn sti_hlt() {
    // SAFETY: the IDT, TSS and IST stacks are set up before the first call; the handlers
    // preserve every register. Not `nomem`: handlers write memory the caller then reads.
    unsafe { asm!("sti", "hlt", options(nostack)) }
}

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// The 16550 serial port COM1 (tandem's console): polled, no interrupts.
pub struct Serial;

impl Serial {
    fn put(b: u8) {
        // SAFETY: COM1 is tandem's 16550; reading LSR and writing THR have no other effect.
        unsafe {
            while inb(LSR) & LSR_THR_EMPTY == 0 {}
            outb(COM1, b);
        }
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                Self::put(b'\r');
            }
            Self::put(b);
        }
        Ok(())
    }
}

/// tandem's hardware-reduced ACPI sleep-control register (the FADT's SLEEP_CONTROL_REG;
/// crates/devices/src/acpi_pm.rs).
const ACPI_SLEEP_CONTROL: u16 = 0x3c0;
/// `SLP_EN | SLP_TYP(5)`: S5, the `_S5_` type tandem's DSDT announces.
const ACPI_S5: u8 = (1 << 5) | (5 << 2);

/// Powers the VM off (tandem then exits 0).
pub fn power_off() -> ! {
    // SAFETY: the sleep-control register only ends the VM.
    unsafe { outb(ACPI_SLEEP_CONTROL, ACPI_S5) };
    loop {
        cli();
        // SAFETY: halting with interrupts off; the VM is being torn down.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const MSR_X2APIC_BASE: u32 = 0x800;
/// IA32_TSC_DEADLINE.
const MSR_TSC_DEADLINE: u32 = 0x6e0;

const APIC_ID: u32 = 0x20;
const APIC_TPR: u32 = 0x80;
const APIC_EOI: u32 = 0xb0;
const APIC_SVR: u32 = 0xf0;
const APIC_LVT_TIMER: u32 = 0x320;
const APIC_LVT_LINT0: u32 = 0x350;
const APIC_LVT_LINT1: u32 = 0x360;
const APIC_LVT_ERROR: u32 = 0x370;
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
/// LVT timer mode bits 18:17 = 10b.
const LVT_TSC_DEADLINE: u32 = 2 << 17;

/// The local APIC, in x2APIC mode (MSRs) when the CPU has it, else xAPIC (MMIO).
pub struct Apic {
    mmio: Option<u64>,
}

impl Apic {
    /// Enables the local APIC with every LVT masked but the timer, in TSC-deadline mode on
    /// `vector`, and the legacy PICs masked.
    pub fn init(vector: u8) -> Self {
        let x2apic = cpuid(1).2 & (1 << 21) != 0;
        // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU; from the reset state (xAPIC
        // enabled) setting EXTD is a valid transition. The 8259 PICs' data ports only take
        // masks; masking all keeps their interrupts (ExtINT through LINT0) away.
        let apic = unsafe {
            outb(0x21, 0xff);
            outb(0xa1, 0xff);
            let base = rdmsr(MSR_APIC_BASE);
            if x2apic {
                wrmsr(MSR_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
                Self { mmio: None }
            } else {
                wrmsr(MSR_APIC_BASE, base | APIC_BASE_ENABLE);
                Self {
                    mmio: Some(base & 0xf_ffff_f000),
                }
            }
        };
        apic.write(APIC_TPR, 0);
        apic.write(APIC_LVT_LINT0, LVT_MASKED);
        apic.write(APIC_LVT_LINT1, LVT_MASKED);
        apic.write(APIC_LVT_ERROR, LVT_MASKED);
        apic.write(
            APIC_SVR,
            SVR_ENABLE | u32::from(crate::boot::SPURIOUS_VECTOR),
        );
        apic.write(APIC_LVT_TIMER, LVT_TSC_DEADLINE | u32::from(vector));
        // SDM 10.5.4.1: order the LVT write before the first IA32_TSC_DEADLINE write.
        // SAFETY: a fence.
        unsafe { asm!("mfence", options(nostack, preserves_flags)) };
        apic
    }

    /// Whether the APIC is driven through x2APIC MSRs.
    pub fn is_x2apic(&self) -> bool {
        self.mmio.is_none()
    }

    fn write(&self, reg: u32, v: u32) {
        match self.mmio {
            // SAFETY: x2APIC mode is on; 0x800 + reg/16 is the register's MSR.
            None => unsafe { wrmsr(MSR_X2APIC_BASE + (reg >> 4), u64::from(v)) },
            // SAFETY: the xAPIC page (identity-mapped) at the base IA32_APIC_BASE names; the
            // register is 32 bits at a 16-byte aligned offset in it.
            Some(base) => unsafe {
                core::ptr::write_volatile((base + u64::from(reg)) as *mut u32, v)
            },
        }
    }

    /// The local APIC's ID (the destination of an MSI to this CPU).
    pub fn id(&self) -> u32 {
        match self.mmio {
            // SAFETY: x2APIC mode is on; MSR 0x802 is the x2APIC ID register (read-only).
            None => unsafe { rdmsr(MSR_X2APIC_BASE + (APIC_ID >> 4)) as u32 },
            // SAFETY: the xAPIC ID register of the identity-mapped APIC page; the ID is bits
            // 31:24.
            Some(base) => unsafe {
                core::ptr::read_volatile((base + u64::from(APIC_ID)) as *const u32) >> 24
            },
        }
    }

    /// Where an interrupt stub writes 0 to send the EOI: the xAPIC EOI register's address, or
    /// 0 in x2APIC mode (the EOI MSR).
    pub fn eoi_mmio(&self) -> u64 {
        self.mmio.map_or(0, |base| base + u64::from(APIC_EOI))
    }

    /// Signals the end of the interrupt being handled.
    pub fn eoi(&self) {
        self.write(APIC_EOI, 0);
    }

    /// Arms the timer to fire when the TSC reaches `tsc` (at once if it has).
    pub fn arm(&self, tsc: u64) {
        // SAFETY: the caller checked CPUID.1:ECX[24] (TSC-deadline) before init; the LVT timer
        // is in TSC-deadline mode.
        unsafe { wrmsr(MSR_TSC_DEADLINE, tsc) }
    }
}

/// Whether the CPU has the TSC-deadline timer (CPUID.1:ECX bit 24).
pub fn has_tsc_deadline() -> bool {
    cpuid(1).2 & (1 << 24) != 0
}
