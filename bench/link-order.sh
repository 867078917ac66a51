#!/usr/bin/env bash
# Regenerates data-plane/trellis-proxy.order, the functions the release trellis-proxy links first (data-plane/build.rs;
# BENCHMARKS.md, "Idle RSS: a smaller binary, and its start-up code together"). An idle proxy's RSS is mostly its
# binary's code, and the kernel maps the 64 KiB around every page a process touches, so code that runs once (start-up,
# joining, the first connection) scattered over the whole binary made nearly all of it resident. This finds the
# functions a proxy runs in scenario 4 of the ztunnel comparison (start, warm-up, rounds of idle tunnels), by running
# the bench from a file system without readahead, so that exactly the pages the processes touched enter the page cache.
# The proxy profiled is a release build with every function aligned to a page of its own (the same code and symbols,
# only spread out), so a touched page names exactly one function.
#   bash bench/link-order.sh /path/to/ztunnel     # root (a loop device, network namespaces); after a release build
# Functions that are new since the file was made are linked after the listed ones: the proxy still works, an idle one
# just maps a little more. Regenerate after large changes to start-up or the data path.
set -euo pipefail
cd "$(dirname "$0")/.."
ztunnel=${1:?usage: bench/link-order.sh PATH-TO-ZTUNNEL}
release=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
loop=
cleanup() {
    umount "$work/mnt" 2>/dev/null || true
    [ -n "$loop" ] && losetup -d "$loop"
    rm -rf "$work"
}
trap cleanup EXIT

truncate -s 512M "$work/fs.img"
mkfs.ext2 -q -F "$work/fs.img"
loop=$(losetup -f --show "$work/fs.img")
# No readahead on this device: a page fault brings in only the page touched (the kernel's fault-around then maps only
# pages already cached).
echo 0 >"/sys/block/$(basename "$loop")/queue/read_ahead_kb"
mkdir "$work/mnt"
mount "$loop" "$work/mnt"
for bin in trellis-bench trellis-control trellisctl trellis-spiffe-client trellis-echo trellis-http-echo; do
    cp "$release/$bin" "$work/mnt/"
done
cargo rustc --release -p trellis-data-plane --bin trellis-proxy -- -C llvm-args=-align-all-functions=12
cp "$release/trellis-proxy" "$work/mnt/"
sync
python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' \
    "$work/mnt/trellis-proxy"
"$work/mnt/trellis-bench" all --quick --no-build --only 4 --ztunnel "$ztunnel"
python3 bench/link-order.py "$work/mnt/trellis-proxy" data-plane/trellis-proxy.order
# The next release build links the proxy again, unaligned and in the new order.
touch data-plane/build.rs
