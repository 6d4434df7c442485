//! `tandem check FILE`: validates a partition config without starting anything.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use tandem_partition::config::{Restart, Role};
use tandem_partition::host::Host;
use tandem_partition::{Config, ConfigError};

use crate::{run, spec, EXIT_USAGE};

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The partition config (TOML).
    file: PathBuf,
}

fn readable(path: &Path) -> Result<(), String> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Loads `file` and checks everything that can be checked without starting a VM: the config's
/// own rules against this host, and each VM's kernel, initrd, disks, network and forwards.
pub fn load_and_check(file: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(file)?;
    config.validate(&Host::current())?;
    for vm in &config.vms {
        readable(vm.kernel.get_ref()).map_err(|m| config.error(vm.kernel.span(), m))?;
        if let Some(initrd) = &vm.initrd {
            readable(initrd.get_ref()).map_err(|m| config.error(initrd.span(), m))?;
        }
        for d in &vm.disks {
            let disk = spec::parse_disk(d.get_ref())
                .map_err(|e| config.error(d.span(), format!("disk '{}': {e}", d.get_ref())))?;
            readable(&disk.path).map_err(|m| config.error(d.span(), m))?;
        }
        if let Some(net) = &vm.net {
            run::parse_net(net.get_ref()).map_err(|e| config.error(net.span(), e))?;
        }
        for f in &vm.forwards {
            run::parse_forward(f.get_ref()).map_err(|e| config.error(f.span(), e))?;
        }
        for l in [&vm.disable_exits, &vm.disable_exits_optional]
            .into_iter()
            .flatten()
        {
            l.get_ref()
                .parse::<tandem_vmm::realtime::ExitSet>()
                .map_err(|e| config.error(l.span(), e))?;
        }
    }
    Ok(config)
}

fn cpus(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

pub fn main(args: CheckArgs) -> ExitCode {
    let config = match load_and_check(&args.file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    println!(
        "{}: ok, {} VM(s), {} channel(s)",
        args.file.display(),
        config.vms.len(),
        config.channels.len()
    );
    for vm in &config.vms {
        let role = match vm.role {
            Role::Realtime => "realtime",
            Role::General => "general",
        };
        let restart = match vm.restart {
            Restart::Never => "never",
            Restart::OnFailure => "on-failure",
            Restart::Always => "always",
        };
        println!(
            "  vm {:<16} {role:<8} cpus {:<8} {:>6} MiB  restart {restart}{}{}",
            vm.name.get_ref(),
            cpus(vm.cpus.get_ref()),
            vm.memory.get_ref().0 >> 20,
            if vm.lock_memory { "  locked" } else { "" },
            if vm.hugepages { "  hugepages" } else { "" },
        );
    }
    for ch in &config.channels {
        println!(
            "  channel {:<11} {:>6} KiB  {}",
            ch.name.get_ref(),
            ch.size.get_ref().0 >> 10,
            ch.members.get_ref().join(", ")
        );
    }
    ExitCode::SUCCESS
}
