# The demo in the test host (cargo xtask demo): the guest initramfs gains rt-status, then
# `tandem up` runs the two partitions until Ctrl-C (SIGINT: the script stops tandem up with
# SIGTERM, as a background job ignores SIGINT) or a
# connection to port 8081 (the stop request of `cargo xtask demo --check`); then it reports
# whatever tandem left behind.
mv /tmp/bench.gz /tmp/demo.gz
up_state=/run/tandem-demo
tandem up /tmp/demo.toml --state-dir $up_state &
up=$!
trap 'echo; echo "demo: stopping"; kill -TERM $up 2>/dev/null' INT TERM
(nc -l -p 8081 </dev/null >/dev/null 2>&1; kill -TERM $up 2>/dev/null) &
stopper=$!
rc=0
while kill -0 $up 2>/dev/null; do wait $up; rc=$?; done
kill $stopper 2>/dev/null
sleep 1
procs=""
for p in /proc/[0-9]*; do
  [ "$(cat $p/comm 2>/dev/null)" = tandem ] && procs="$procs ${p#/proc/}"
done
held=""
for l in /run/tandem/locks/*; do
  [ -e "$l" ] || continue
  ino=$(ls -i "$l" | awk '{print $1}')
  grep -q ":$ino " /proc/locks && held="$held $l"
done
tables=$(nft list tables 2>/dev/null | grep tandem)
echo "demo: tandem up ended with status $rc"
echo "demo: left behind: processes=[${procs# }] locks=[${held# }] nft=[${tables}] state=[$(ls $up_state 2>/dev/null | tr '\n' ' ')]"
