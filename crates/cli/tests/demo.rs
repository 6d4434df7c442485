//! The end-to-end demo (`cargo xtask demo`) in the test host, with the demo's own partitions and
//! script: the reference RT guest in a realtime partition publishes its figures into a channel,
//! the general partition serves them over HTTP through a forward; two requests a few seconds
//! apart show the tick count growing; stopping the demo leaves no process, lock or nft table.

mod common;

use common::{case, guest_overlay, run_script_with, testkit_program};

const PARTITIONS: &str = include_str!("../../../xtask/src/demo/partitions.toml");
const SCRIPT: &str = include_str!("../../../xtask/src/demo/demo.sh");

fn ticks(body: &str) -> u64 {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("ticks="))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no tick count in:\n{body}"))
}

#[test]
fn the_demo_serves_growing_rt_figures_and_stops_without_leftovers() {
    let rt_status = testkit_program("rt-status");
    let (overlay, files) = guest_overlay("bench", &[&rt_status]);
    let script = format!(
        r#"
{overlay}
sed 's#rt-status serve#{rt_status} serve#' > /tmp/demo.toml <<'TOML'
{PARTITIONS}
TOML
cat > /tmp/demo.sh <<'DEMO'
{SCRIPT}
DEMO
sh /tmp/demo.sh > /tmp/demo.out 2>&1 &
demo=$!
i=0
while [ $i -lt 300 ] && ! wget -q -O /tmp/r1 http://127.0.0.1:8080/ 2>/dev/null; do sleep 1; i=$((i+1)); done
record first cat /tmp/r1
sleep 4
record second wget -q -O - http://127.0.0.1:8080/
record ps tandem ps --state-dir /run/tandem-demo
nc 127.0.0.1 8081 </dev/null
wait $demo
record demo cat /tmp/demo.out
"#
    );
    let with: Vec<&str> = files.iter().map(String::as_str).collect();
    let (cases, all) = run_script_with(&script, &with);
    let demo = &case(&cases, &all, "demo").output;
    let first = case(&cases, &all, "first");
    assert!(
        first.output.contains("rtref: state=running"),
        "the general partition serves the RT guest's figures:\n{}\ndemo:\n{demo}",
        first.output
    );
    let second = case(&cases, &all, "second");
    let (t1, t2) = (ticks(&first.output), ticks(&second.output));
    eprintln!("demo: ticks {t1}, then {t2} about 4 s later");
    assert!(t2 > t1, "the tick count grows: {t1} then {t2}");
    let ps = &case(&cases, &all, "ps").output;
    assert!(
        ps.lines()
            .any(|l| l.starts_with("rt ") && l.contains("realtime") && l.contains("running")),
        "{ps}"
    );
    let left = demo
        .lines()
        .find(|l| l.starts_with("demo: left behind:"))
        .unwrap_or_else(|| panic!("no report of leftovers:\n{demo}"));
    assert!(
        left.contains("processes=[] locks=[] nft=[]"),
        "stopping the demo leaves nothing running or held:\n{demo}"
    );
}
