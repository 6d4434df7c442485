//! The pure logic of tandem's reference real-time guest (`guests/rtref`): its command line, TSC
//! scaling, lateness statistics, the report it prints and the live figures it publishes.
//!
//! `no_std` so the freestanding guest can use it; unit-tested on the host like any crate.
#![no_std]
#![deny(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod clock;
pub mod cmdline;
pub mod report;
pub mod shm;
pub mod stats;
