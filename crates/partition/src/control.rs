//! The supervisor's control socket: one JSON request per line, one JSON response per line, on a
//! Unix socket that only its owner may use. Bounded: a request line of at most
//! [`MAX_REQUEST`] bytes, [`MAX_CLIENTS`] clients at once, each given [`CLIENT_TIMEOUT`] to send
//! its request and read the answer.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// Longest request line, newline included.
pub const MAX_REQUEST: u64 = 64 << 10;
/// Clients served at once; one more is answered "busy" and disconnected.
pub const MAX_CLIENTS: usize = 16;
/// How long a client may take to send its request, and to read the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

fn refuse(why: &str) -> Response {
    Response {
        ok: false,
        error: Some(why.into()),
        vms: Vec::new(),
    }
}

fn answer(mut stream: &UnixStream, resp: &Response) {
    if let Ok(mut text) = serde_json::to_string(resp) {
        text.push('\n');
        let _ = stream.write_all(text.as_bytes());
    }
}

/// Reads one request from `stream` and writes `handle`'s answer.
fn serve_one(
    stream: &UnixStream,
    handle: &(impl Fn(Request) -> Response + ?Sized),
    timeout: Duration,
) {
    if stream.set_read_timeout(Some(timeout)).is_err()
        || stream.set_write_timeout(Some(timeout)).is_err()
    {
        return;
    }
    let mut line = Vec::new();
    // A client that says nothing is dropped at the timeout; one that never ends its line, at
    // the limit.
    if BufReader::new(stream)
        .take(MAX_REQUEST)
        .read_until(b'\n', &mut line)
        .is_err()
        || line.is_empty()
    {
        return;
    }
    if !line.ends_with(b"\n") && line.len() as u64 >= MAX_REQUEST {
        answer(
            stream,
            &refuse(&format!("request longer than {} KiB", MAX_REQUEST >> 10)),
        );
        return;
    }
    let resp = match serde_json::from_slice::<Request>(&line) {
        Ok(req) => handle(req),
        Err(e) => refuse(&format!("bad request: {e}")),
    };
    answer(stream, &resp);
}

/// Answers requests on `listener` with `handle`, each client in a thread of its own (at most
/// [`MAX_CLIENTS`] at once), giving each `timeout` to send its request and to read the answer.
/// Never returns: an `accept` that fails (out of descriptors, a client gone) is retried.
pub fn serve(
    listener: UnixListener,
    handle: impl Fn(Request) -> Response + Send + Sync + 'static,
    timeout: Duration,
) {
    let handle = Arc::new(handle);
    let clients = Arc::new(AtomicUsize::new(0));
    let mut failing = false;
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => {
                failing = false;
                s
            }
            Err(e) => {
                if !failing {
                    crate::say!("tandem: control socket: {e}; retrying");
                    failing = true;
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            if stream.set_nonblocking(true).is_ok() {
                answer(&stream, &refuse("busy: too many clients; try again"));
            }
            continue;
        }
        let (handle, held) = (handle.clone(), clients.clone());
        let spawned = std::thread::Builder::new().spawn(move || {
            serve_one(&stream, &*handle, timeout);
            held.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            clients.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A server that answers every request with ok, its thread filtered.
    fn server(name: &str, timeout: Duration) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("tandem-ctl-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            // Under its seccomp filter, as in `tandem up`: a syscall outside the control list
            // ends the test process by SIGSYS (with the syscall's number on stderr).
            let sandbox =
                tandem_sandbox::Sandbox::prepare(tandem_sandbox::SandboxConfig::default());
            sandbox
                .unwrap()
                .apply(tandem_sandbox::ThreadKind::Control)
                .unwrap();
            serve(
                listener,
                |_| Response {
                    ok: true,
                    ..Default::default()
                },
                timeout,
            )
        });
        path
    }

    #[test]
    fn an_endless_request_line_is_cut_off_and_the_next_client_served() {
        // A long timeout: what cuts the client off must be the length limit.
        let path = server("endless", Duration::from_secs(600));
        let s = UnixStream::connect(&path).unwrap();
        let mut w = s.try_clone().unwrap();
        let limit = 256u64 << 20;
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 16];
            let mut sent = 0u64;
            while sent < limit && w.write_all(&chunk).is_ok() {
                sent += chunk.len() as u64;
            }
            sent
        });
        let sent = writer.join().unwrap();
        assert!(sent < limit, "the server took {sent} bytes of one line");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = String::new();
        let _ = BufReader::new(&s).read_line(&mut answer);
        assert!(answer.contains("request longer than 64 KiB"), "{answer:?}");
        assert!(send(&path, &Request::Ps).unwrap().ok);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn silent_clients_neither_block_others_nor_stay() {
        let path = server("silent", Duration::from_millis(300));
        let one = UnixStream::connect(&path).unwrap();
        assert!(send(&path, &Request::Ps).unwrap().ok);
        let mut silent: Vec<UnixStream> = (1..MAX_CLIENTS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        silent.push(one);
        // One client too many is told so at once, not kept waiting.
        let busy = send(&path, &Request::Ps).unwrap();
        assert_eq!(
            busy.error.as_deref(),
            Some("busy: too many clients; try again")
        );
        // The silent ones are dropped at their timeout, and then there is room again.
        for s in &silent {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            (&*s).read_to_end(&mut Vec::new()).unwrap();
        }
        assert!(send(&path, &Request::Ps).unwrap().ok);
        let _ = std::fs::remove_file(&path);
    }

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
