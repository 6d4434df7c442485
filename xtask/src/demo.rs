//! `cargo xtask demo`: tandem's end-to-end demo in the testbed. A realtime partition runs the
//! reference RT guest; a general Linux partition reads its live figures from their channel and
//! serves them over HTTP; the testbed carries that port out to this machine's loopback, where
//! `curl` shows the tick count growing. Runs until Ctrl-C, then stops everything and says what,
//! if anything, was left behind. `--check` makes two requests a few seconds apart itself, stops
//! the demo and fails unless the tick count grew and nothing was left.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::bench_dev::overlay;
use crate::{assets, tasks, testbed};

/// The partitions, with the test host's paths.
pub const PARTITIONS: &str = include_str!("demo/partitions.toml");
const SCRIPT: &str = include_str!("demo/demo.sh");
/// The port of the general partition's forward in the test host.
const WEB_PORT: u16 = 8080;
/// A connection to this port of the test host stops the demo.
const STOP_PORT: u16 = 8081;

/// `cargo xtask demo [--port N] [--check]`.
pub fn demo(root: &Path, args: &[String]) -> Result<i32, String> {
    let mut port = WEB_PORT;
    let mut check = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--check" => check = true,
            "--port" => {
                port = it
                    .next()
                    .and_then(|p| p.parse().ok())
                    .filter(|&p| p > 0)
                    .ok_or("demo: --port needs a port number")?
            }
            other => return Err(format!("demo: unknown option {other} (--port N, --check)")),
        }
    }
    tasks::ensure_host_packages()?;
    tasks::cargo(
        root,
        &["build", "--release", "-p", "tandem", "-p", "tandem-testkit"],
    )?;
    tasks::build_rtref(root)?;
    assets::ensure(&assets::cache_root()?)?;
    let rt_status = root.join("target/release/rt-status");
    let in_host = PathBuf::from("/usr/bin/rt-status");
    let run_dir = std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    let script_path = run_dir.join("demo.sh");
    let script = format!(
        "set -u\nmkdir -p /usr/bin\n{}cat > /tmp/demo.toml <<'TOML'\n{PARTITIONS}TOML\n{SCRIPT}",
        overlay(&[(in_host.clone(), rt_status.clone())])
    );
    std::fs::write(&script_path, script).map_err(|e| format!("{}: {e}", script_path.display()))?;
    let stop_port = port.checked_add(1).ok_or("demo: --port too high")?;
    let opts = testbed::Options {
        arch: crate::Arch::X86_64,
        mem: "2G".into(),
        cpus: 2,
        with: vec![
            (rt_status, in_host.display().to_string()),
            (script_path, "/tmp/demo.sh".into()),
        ],
        timeout: if check { 900 } else { 86_400 },
        no_build: true,
        forwards: vec![(port, WEB_PORT), (stop_port, STOP_PORT)],
        cmd: vec!["sh".into(), "/tmp/demo.sh".into()],
    };
    let url = format!("http://127.0.0.1:{port}/");
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let watcher = {
        let (url, seen) = (url.clone(), seen.clone());
        thread::spawn(move || watch(&url, port, stop_port, check, &seen))
    };
    eprintln!("demo: starting the test host and the partitions (a minute or two) ...");
    let status = testbed::run(&opts);
    let _ = std::fs::remove_dir_all(&run_dir);
    let status = status?;
    let _ = watcher.join();
    if check {
        let ticks = seen.lock().map(|t| t.clone()).unwrap_or_default();
        eprintln!("demo: tick counts seen at {url}: {ticks:?}");
        if ticks.len() < 2 || ticks[1] <= ticks[0] {
            return Err("demo --check: the tick count did not grow between two requests".into());
        }
    }
    Ok(status)
}

/// One GET of `url`'s body, if the server answers.
fn get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: demo\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    body.contains("rtref: state=").then_some(body)
}

/// The `ticks=` of a figures line.
pub fn ticks(body: &str) -> Option<u64> {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("ticks="))?
        .parse()
        .ok()
}

/// Waits until the demo answers with figures, prints its URL; with `check`, takes two readings
/// a few seconds apart into `seen` and asks the test host to stop.
fn watch(url: &str, port: u16, stop_port: u16, check: bool, seen: &Mutex<Vec<u64>>) {
    let deadline = Instant::now() + Duration::from_secs(if check { 600 } else { 86_400 });
    while Instant::now() < deadline {
        if let Some(body) = get(port) {
            eprintln!("\ndemo: the RT partition's live figures are at {url}  (try: curl {url})");
            eprintln!("demo: Ctrl-C stops the demo\n");
            if !check {
                return;
            }
            let first = ticks(&body);
            thread::sleep(Duration::from_secs(5));
            let second = get(port).as_deref().and_then(ticks);
            if let Ok(mut s) = seen.lock() {
                s.extend(first);
                s.extend(second);
            }
            eprintln!("demo --check: ticks {first:?}, then 5 s later {second:?}; stopping");
            let _ = TcpStream::connect(("127.0.0.1", stop_port));
            return;
        }
        thread::sleep(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_read_from_the_figures_line() {
        assert_eq!(
            ticks("...\n\nrtref: state=running ticks=1234 planned=86400000 period_ns=1000000\n"),
            Some(1234)
        );
        assert_eq!(ticks("rtref: no figures yet"), None);
    }
}
