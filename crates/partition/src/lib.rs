//! tandem's partitions: several VMs declared in one TOML file, each on host CPUs of its own, and
//! the shared-memory channels between them.
//!
//! - [`config`]: the file's schema, parsing and validation, every error naming the file and line;
//! - [`host`]: the CPUs and memory a config is checked against; [`size`]: `512M`-style sizes.
#![deny(missing_docs)]

pub mod config;
pub mod host;
pub mod size;

pub use config::{Config, ConfigError};
