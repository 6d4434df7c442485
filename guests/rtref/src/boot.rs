//! From the PVH entry to Rust, and the CPU tables interrupts need.
//!
//! The host target's `core` is compiled for SSE and the System V red zone, so before any Rust
//! runs the entry code enables long mode (identity-mapped 4 GiB, 2 MiB pages) and SSE, and every
//! interrupt and exception is delivered on an IST stack: an interrupt pushing its frame on the
//! interrupted code's stack would overwrite that code's red zone.

use core::cell::UnsafeCell;
use core::sync::atomic::AtomicU64;

/// Vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x40;
/// Vector of the channel's MSI-X doorbell (ping-pong mode).
pub const DOORBELL_VECTOR: u8 = 0x41;
/// Vector of the LAPIC's spurious interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Code segment selector (64-bit) in the boot GDT.
const CODE_SELECTOR: u16 = 0x08;
/// TSS selector in the boot GDT.
const TSS_SELECTOR: u16 = 0x18;

/// TSC at the latest timer interrupt, written by the timer's interrupt stub; 0: none since the
/// main loop cleared it.
pub static TIMER_STAMP: AtomicU64 = AtomicU64::new(0);
/// Doorbells received, counted by the doorbell's interrupt stub.
pub static DOORBELLS: AtomicU64 = AtomicU64::new(0);
/// Where the doorbell stub writes its EOI: the xAPIC EOI register's address, or 0 for the
/// x2APIC EOI MSR. Set before MSI-X is enabled.
pub static EOI_MMIO: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    /* The PVH entry point, for the loader (XEN_ELFNOTE_PHYS32_ENTRY = 18). */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long pvh_start

    .section .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    /* PVH: flat 32-bit protected mode, paging off, %ebx = hvm_start_info. */
    cli
    cld
    movl %ebx, %esi

    /* Zero .bss (the loader copies only the file's bytes). */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb

    /* Page tables: PML4[0] -> PDPT, PDPT[0..4] -> 4 PDs of 512 2 MiB pages each: the low
       4 GiB identity-mapped (RAM, the PCI hole, the LAPIC). */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4
    movl $boot_pd, %eax
    orl $0x3, %eax
    movl $boot_pdpt, %edi
    movl $4, %ecx
1:  movl %eax, (%edi)
    addl $0x1000, %eax
    addl $8, %edi
    loop 1b
    movl $0x83, %eax
    movl $boot_pd, %edi
    movl $2048, %ecx
2:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    loop 2b

    /* CR4: PAE, OSFXSR and OSXMMEXCPT (SSE and its exceptions). */
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    /* EFER.LME */
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    /* CR0: PG, MP and PE on; EM and TS off (SSE instructions must not trap). */
    movl %cr0, %eax
    andl $0xfffffff3, %eax
    orl $0x80000003, %eax
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode

    .code64
long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    leaq boot_stack_top(%rip), %rsp
    fninit
    movl %esi, %edi
    call rtref_main
3:  cli
    hlt
    jmp 3b

    /* The LAPIC timer: stamp the TSC and return. The main loop, which sleeps in hlt, sends
       the EOI and reads the stamp. */
    .text
    .global rtref_isr_timer
rtref_isr_timer:
    pushq %rax
    pushq %rdx
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, {stamp}(%rip)
    popq %rdx
    popq %rax
    iretq

    /* The channel's doorbell (MSI-X): count it and send the EOI. */
    .global rtref_isr_doorbell
rtref_isr_doorbell:
    pushq %rax
    pushq %rcx
    pushq %rdx
    lock incq {doorbells}(%rip)
    movq {eoi_mmio}(%rip), %rax
    testq %rax, %rax
    jz 5f
    movl $0, (%rax)
    jmp 6f
5:  movl $0x80b, %ecx
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
6:  popq %rdx
    popq %rcx
    popq %rax
    iretq

    .global rtref_isr_spurious
rtref_isr_spurious:
    iretq

    /* Exceptions and unexpected interrupts: push the vector (and a 0 where the CPU pushes no
       error code), then report and stop in Rust. */
    .macro EXC_NOERR n
    .balign 16
rtref_exc_\n:
    pushq $0
    pushq $\n
    jmp rtref_exc_common
    .endm
    .macro EXC_ERR n
    .balign 16
rtref_exc_\n:
    pushq $\n
    jmp rtref_exc_common
    .endm
    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    EXC_NOERR \n
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
    EXC_ERR \n
    .endr
    /* Any other vector: reported as 256. */
    EXC_NOERR 256

rtref_exc_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call rtref_fault
4:  cli
    hlt
    jmp 4b

    .section .rodata
    .balign 8
    .global rtref_exc_table
rtref_exc_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,256
    .quad rtref_exc_\n
    .endr

    .section .data
    .balign 16
    .global boot_gdt
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
    .quad 0, 0                  /* 0x18: the TSS, filled in by init_cpu_tables */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd: .skip 4 * 4096
boot_stack: .skip 32768
boot_stack_top:
"#,
    stamp = sym TIMER_STAMP,
    doorbells = sym DOORBELLS,
    eoi_mmio = sym EOI_MMIO,
    options(att_syntax)
);

extern "C" {
    static mut boot_gdt: [u64; 5];
    static rtref_exc_table: [u64; 33];
    fn rtref_isr_timer();
    fn rtref_isr_spurious();
    fn rtref_isr_doorbell();
}

/// What an exception stub leaves on its IST stack.
#[repr(C)]
pub struct Fault {
    /// The vector (256: an unexpected interrupt).
    pub vector: u64,
    /// The CPU's error code, or 0.
    pub error: u64,
    /// Where it happened.
    pub rip: u64,
    /// Code segment.
    pub cs: u64,
    /// Flags.
    pub rflags: u64,
    /// Stack pointer.
    pub rsp: u64,
}

/// A 64-bit TSS: only the IST pointers matter here.
#[repr(C, packed)]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

/// One IDT gate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate([u64; 2]);

impl Gate {
    /// A present ring-0 64-bit interrupt gate (IF cleared on entry) to `handler` on IST `ist`.
    fn new(handler: u64, ist: u8) -> Self {
        let lo = (handler & 0xffff)
            | (u64::from(CODE_SELECTOR) << 16)
            | (u64::from(ist) << 32)
            | (0x8e << 40)
            | ((handler >> 16) & 0xffff) << 48;
        Self([lo, handler >> 32])
    }
}

const STACK_SIZE: usize = 16384;

/// A stack for the IST.
#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);

/// Memory only the boot CPU touches, before interrupts are enabled; then only the CPU itself
/// (IST stacks).
struct Boot<T>(UnsafeCell<T>);
// SAFETY: one CPU; the contents are written once in init_cpu_tables before interrupts are on.
unsafe impl<T> Sync for Boot<T> {}

static TSS: Boot<Tss> = Boot(UnsafeCell::new(Tss {
    _reserved0: 0,
    rsp: [0; 3],
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: core::mem::size_of::<Tss>() as u16,
}));
static IDT: Boot<[Gate; 256]> = Boot(UnsafeCell::new([Gate([0, 0]); 256]));
/// IST1: interrupts (timer, doorbell, spurious).
static IST_IRQ: Boot<Stack> = Boot(UnsafeCell::new(Stack([0; STACK_SIZE])));
/// IST2: exceptions (a fault in an interrupt stub must not reuse the stub's stack).
static IST_EXC: Boot<Stack> = Boot(UnsafeCell::new(Stack([0; STACK_SIZE])));

/// Loads the TSS (with the IST stacks) and the IDT. Interrupts stay disabled.
pub fn init_cpu_tables() {
    let top = |s: &Boot<Stack>| s.0.get() as u64 + STACK_SIZE as u64;
    let tss = TSS.0.get();
    // SAFETY: single CPU, interrupts off; TSS is a static no other code references.
    unsafe {
        (*tss).ist[0] = top(&IST_IRQ);
        (*tss).ist[1] = top(&IST_EXC);
    }
    let base = tss as u64;
    let limit = (core::mem::size_of::<Tss>() - 1) as u64;
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    // SAFETY: boot_gdt is the GDT loaded at entry (5 entries); entries 3-4 are the free TSS slot,
    // written before `ltr` reads them. Interrupts are off.
    unsafe {
        let gdt = &raw mut boot_gdt;
        (*gdt)[3] = lo;
        (*gdt)[4] = base >> 32;
        core::arch::asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack, preserves_flags));
    }

    let idt = IDT.0.get();
    // SAFETY: rtref_exc_table is the asm table of 33 stub addresses; IDT is a static only this
    // function writes, before `lidt` and with interrupts off.
    unsafe {
        let table = &rtref_exc_table;
        for (v, gate) in (*idt).iter_mut().enumerate() {
            *gate = Gate::new(table[v.min(32)], 2);
        }
        (*idt)[usize::from(TIMER_VECTOR)] = Gate::new(rtref_isr_timer as *const () as u64, 1);
        (*idt)[usize::from(DOORBELL_VECTOR)] = Gate::new(rtref_isr_doorbell as *const () as u64, 1);
        (*idt)[usize::from(SPURIOUS_VECTOR)] = Gate::new(rtref_isr_spurious as *const () as u64, 1);
        let ptr: [u16; 5] = {
            let b = idt as u64;
            [
                (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
                b as u16,
                (b >> 16) as u16,
                (b >> 32) as u16,
                (b >> 48) as u16,
            ]
        };
        core::arch::asm!("lidt [{0}]", in(reg) ptr.as_ptr(), options(nostack, preserves_flags));
    }
}

/// Stops the CPU the hard way (an empty IDT, then an exception: a triple fault), which tandem
/// reports as a vCPU failure with a non-zero status: how the guest says that it failed.
pub fn triple_fault() -> ! {
    let empty: [u16; 5] = [0; 5];
    // SAFETY: deliberately loads an empty IDT and raises #UD: the CPU shuts down; nothing
    // after this runs.
    unsafe {
        core::arch::asm!("cli", "lidt [{0}]", "ud2", in(reg) empty.as_ptr(), options(noreturn, nostack));
    }
}
