//! tandem's partitions: several VMs declared in one TOML file, each on host CPUs of its own, and
//! the shared-memory channels between them.
//!
//! - [`config`]: the file's schema, parsing and validation, every error naming the file and line;
//! - [`plan`]: each VM's `tandem run` command line; [`restart`]: restart policies with
//!   back-off and crash-loop detection;
//! - [`supervisor`]: `tandem up`: one process per VM, logs, restarts, signals; [`control`]: its
//!   socket protocol; [`locks`]: the host CPU locks that keep supervisors apart; [`output`]:
//!   the VMs' logs and terminal output, bounded;
//! - [`host`]: the CPUs and memory a config is checked against; [`size`]: `512M`-style sizes.
#![deny(missing_docs)]

pub mod config;
pub mod control;
pub mod host;
pub mod locks;
pub mod output;
pub mod plan;
pub mod restart;
pub mod size;
pub mod supervisor;

pub use config::{Config, ConfigError};
