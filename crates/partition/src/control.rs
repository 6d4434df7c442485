//! The supervisor's control socket: one JSON request per line, one JSON response per line, on a
//! Unix socket that only its owner may use.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A request to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Every VM's state.
    Ps,
    /// Stop one VM (it is not restarted).
    Stop {
        /// The VM.
        vm: String,
    },
    /// Stop (if running) and start one VM, forgetting its restart history.
    Restart {
        /// The VM.
        vm: String,
    },
    /// Stop every VM and end the supervisor.
    Down,
}

/// One VM's state as `tandem ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Name.
    pub name: String,
    /// `realtime` or `general`.
    pub role: String,
    /// `running`, `stopped`, `restarting in Ns`, `crash-loop`, ...
    pub state: String,
    /// Its process, when running.
    pub pid: Option<u32>,
    /// Restarts so far.
    pub restarts: u32,
    /// Host CPUs of its vCPUs.
    pub cpus: String,
    /// Scheduling policy of its vCPUs.
    pub policy: String,
    /// Guest memory locked.
    pub locked: bool,
    /// Guest memory on huge pages.
    pub hugepages: bool,
    /// Seconds since it started, when running.
    pub uptime_s: Option<u64>,
    /// How its last run ended.
    pub last_exit: Option<String>,
}

/// The supervisor's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// The VMs (for `ps`, and after every request).
    pub vms: Vec<VmStatus>,
}

/// Sends `req` to the supervisor listening on `socket`.
pub fn send(socket: &Path, req: &Request) -> std::io::Result<Response> {
    let mut s = UnixStream::connect(socket)?;
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_object_each() {
        assert_eq!(
            serde_json::to_string(&Request::Ps).unwrap(),
            r#"{"cmd":"ps"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"stop","vm":"ui"}"#).unwrap(),
            Request::Stop { vm: "ui".into() }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
    }
}
