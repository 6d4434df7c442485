//! Ping-pong mode (`pingpong=ping|pong rounds=N peer=P`): two guests ring each other's channel
//! doorbell, delivered as MSI-X, to count what a doorbell round trip costs. The ping side rings,
//! sleeps in `hlt` until the reply, `rounds` times, then reports and powers off; the pong side
//! rings back for every doorbell until the ping side's done word, then reports and powers off.
//! Output is one start line and one result line each, the same length for any 5-digit count.

use core::fmt::Write;
use core::sync::atomic::Ordering;

use tandem_rtref::cmdline::{PingPong, Role};
use tandem_rtref::shm::{PING_DONE, PING_DONE_OFFSET, PONG_READY, PONG_READY_OFFSET};

use crate::boot::{DOORBELLS, DOORBELL_VECTOR, EOI_MMIO, TIMER_VECTOR};
use crate::hw::{self, Apic, Serial};
use crate::{fail, pci};

/// Sleeps until the doorbell count differs from `seen`; returns it, with interrupts disabled.
fn wait_for_doorbell(seen: u64) -> u64 {
    loop {
        hw::cli();
        let n = DOORBELLS.load(Ordering::Relaxed);
        if n != seen {
            return n;
        }
        hw::sti_hlt();
    }
}

/// Runs the ping-pong; never returns.
pub fn run(pp: &PingPong) -> ! {
    let Some(ch) = pci::find_channel() else {
        fail(format_args!(
            "pingpong: no channel (ivshmem device) on bus 0"
        ))
    };
    let apic = Apic::init(TIMER_VECTOR);
    EOI_MMIO.store(apic.eoi_mmio(), Ordering::Relaxed);
    if let Err(e) = ch.enable_msix(DOORBELL_VECTOR, apic.id()) {
        fail(format_args!("pingpong: {e}"));
    }
    let (ready, done) = (ch.word(PONG_READY_OFFSET), ch.word(PING_DONE_OFFSET));
    match pp.role {
        Role::Ping => {
            let _ = writeln!(
                Serial,
                "rtref: pingpong role=ping peer={} rounds={} channel {ch}",
                pp.peer, pp.rounds
            );
            while ready.load(Ordering::Acquire) != PONG_READY {
                core::hint::spin_loop();
            }
            let mut seen = DOORBELLS.load(Ordering::Relaxed);
            for _ in 0..pp.rounds {
                ch.ring(pp.peer);
                seen = wait_for_doorbell(seen);
            }
            done.store(PING_DONE, Ordering::Release);
            ch.ring(pp.peer);
            let _ = writeln!(
                Serial,
                "rtref: pingpong role=ping round_trips={} doorbells={seen}",
                pp.rounds
            );
        }
        Role::Pong => {
            let _ = writeln!(
                Serial,
                "rtref: pingpong role=pong peer={} channel {ch}",
                pp.peer
            );
            done.store(0, Ordering::Relaxed);
            ready.store(PONG_READY, Ordering::Release);
            let mut answered = 0;
            loop {
                let n = wait_for_doorbell(answered);
                if done.load(Ordering::Acquire) == PING_DONE {
                    answered = n;
                    break;
                }
                for _ in answered..n {
                    ch.ring(pp.peer);
                }
                answered = n;
            }
            let _ = writeln!(Serial, "rtref: pingpong role=pong doorbells={answered}");
        }
    }
    hw::power_off()
}
