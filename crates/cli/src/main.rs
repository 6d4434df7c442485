//! `tandem`: the command-line front end.

mod check;
mod doctor;
mod logging;
mod run;
mod spec;
mod stats;
mod terminal;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for bad input (also what clap uses for usage errors).
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "A partitioning VMM on KVM: real-time and general-purpose OSes side by side"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one VM from a Linux kernel and run it until the guest powers off.
    Run(Box<run::RunArgs>),
    /// Check this host: /dev/kvm, KVM capabilities, and whether guests run at hardware speed.
    Doctor,
    /// Validate a partition config (several VMs and their channels) without starting anything.
    Check(check::CheckArgs),
    /// Start every VM of a partition config and supervise them (foreground).
    Up(up::UpArgs),
    /// Show the VMs of the running `tandem up`.
    Ps(up::StateArgs),
    /// Stop one VM of the running `tandem up` (it is not restarted).
    Stop(up::VmArgs),
    /// Restart one VM of the running `tandem up`.
    Restart(up::VmArgs),
    /// Stop every VM of the running `tandem up` and end it.
    Down(up::StateArgs),
    /// Show what takes a VM's vCPUs out of guest mode: KVM's exit counts per vCPU and the
    /// exits tandem's devices handled, with rates.
    Stats(stats::StatsArgs),
}

fn main() -> ExitCode {
    logging::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::from(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        EXIT_USAGE
                    } else {
                        0
                    },
                );
            }
            // One line: clap's first line, without the usage block.
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let line = first.join(" ");
            eprintln!(
                "tandem: {} (see tandem --help)",
                line.trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Run(args) => run::main(*args),
        Command::Doctor => doctor::main(),
        Command::Check(args) => check::main(args),
        Command::Up(args) => up::up(args),
        Command::Ps(a) => up::ps(a),
        Command::Stop(a) => up::stop(a),
        Command::Restart(a) => up::restart(a),
        Command::Down(a) => up::down(a),
        Command::Stats(a) => stats::main(a),
    }
}

// An x86 kernel given to the aarch64 build: bad input (status 2), found before /dev/kvm is
// asked anything (under qemu-user it is this host's x86_64 KVM, whose answers make no sense
// to an aarch64 program). The integration tests (bad_input.rs) run on x86_64 only, so this
// one runs in the aarch64 unit tests.
#[cfg(all(test, not(target_arch = "x86_64")))]
mod tests {
    use super::*;

    #[test]
    fn run_refuses_an_x86_kernel_as_bad_input() {
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let kernel = std::env::temp_dir().join(format!("tandem-bz-{}", std::process::id()));
        std::fs::write(&kernel, &bz).unwrap();
        let cli = Cli::try_parse_from([
            "tandem".as_ref(),
            "run".as_ref(),
            "--kernel".as_ref(),
            kernel.as_os_str(),
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not a run command");
        };
        assert_eq!(run::main(*args), ExitCode::from(EXIT_USAGE));
        std::fs::remove_file(&kernel).unwrap();
    }
}
