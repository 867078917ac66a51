#!/usr/bin/env bash
# Profiles both Trellis proxies during a single-stream bulk transfer and draws a flamegraph of each.
#
#   bash bench/profile-bulk.sh [OUT_DIR]      (root; default OUT_DIR: docs/bench)
#
# Runs `trellis-bench all --only 1 --bulk-mib 8192` (scenario 1 with 8 GiB transfers, writing nothing; it builds the
# mesh binaries as the suite does), waits for its first Trellis measurement, records each proxy with
# `perf record --call-graph dwarf` for 2 s, then stops the suite. Needs perf (Debian: linux-perf) and inferno
# (`cargo install inferno`). Release builds carry no debug info, but their symbols and unwind tables are enough for
# perf's DWARF unwinding.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/bench}
seconds=2
for tool in perf inferno-collapse-perf inferno-flamegraph; do
  command -v "$tool" >/dev/null || { echo "profile-bulk: $tool is not installed" >&2; exit 1; }
done
cargo build --release -p trellis-tests --bin trellis-bench
work=$(mktemp -d)
target/release/trellis-bench all --only 1 --bulk-mib 8192 >"$work/suite.log" 2>&1 &
suite=$!
trap 'kill $suite 2>/dev/null || true; wait $suite 2>/dev/null || true; rm -rf "$work"' EXIT
# The Trellis measurement of round 1 starts right after direct's.
while true; do
  grep -q "round 1, 1 stream(s), direct" "$work/suite.log" && break
  kill -0 $suite 2>/dev/null || { cat "$work/suite.log" >&2; echo "profile-bulk: the suite ended early" >&2; exit 1; }
  sleep 0.2
done
line=$(grep -m1 "Trellis proxies: client pid" "$work/suite.log") || { echo "profile-bulk: no proxy pids in the log" >&2; exit 1; }
client=$(sed -E 's/.*client pid ([0-9]+).*/\1/' <<<"$line")
server=$(sed -E 's/.*server pid ([0-9]+).*/\1/' <<<"$line")
sleep 0.5
date -u +"profiling from %H:%M:%S" >&2
perf record -q -p "$client" --call-graph dwarf,16384 -F 999 -o "$work/client.data" -- sleep $seconds &
perf record -q -p "$server" --call-graph dwarf,16384 -F 999 -o "$work/server.data" -- sleep $seconds
wait %1 || true
date -u +"profiles taken %H:%M:%S; suite log so far:" >&2
grep "round 1" "$work/suite.log" >&2 || true
mkdir -p "$out"
for side in client server; do
  perf script -i "$work/$side.data" 2>/dev/null | inferno-collapse-perf >"$work/$side.folded"
  inferno-flamegraph --title "trellis-proxy ($side side), single-stream bulk, $seconds s" \
    <"$work/$side.folded" >"$out/flame-bulk-$side-proxy.svg"
  echo "wrote $out/flame-bulk-$side-proxy.svg ($(wc -l <"$work/$side.folded") distinct stacks)"
done
