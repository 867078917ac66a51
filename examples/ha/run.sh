#!/usr/bin/env bash
# A highly available control plane on one machine: a 3-member etcd cluster, three trellis-control replicas sharing
# it, and two proxies, each connected to a different replica. A policy applied through replica 0 reaches both
# proxies; a token created on replica 1 is refused on replica 2 once used. Everything listens on 127.0.0.1 and is
# stopped and removed on exit, also on failure or Ctrl-C.
#
#   examples/ha/run.sh                          # uses target/debug (cargo build --workspace first)
#   BIN_DIR=target/release examples/ha/run.sh
# Needs etcd and etcdctl (Debian: apt-get install etcd-server etcd-client), python3, openssl.
set -euo pipefail

cd "$(dirname "$0")/../.."
BIN_DIR=$(cd "${BIN_DIR:-target/debug}" && pwd)
BASE=${BASE_PORT:-27000}   # ports BASE..BASE+99 on 127.0.0.1
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "error: $*" >&2; exit 1; }
for tool in etcd etcdctl python3 openssl; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
for b in trellis-control trellisctl trellis-proxy; do [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing"; done

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  set +e
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 130" INT TERM
wait_until() { # wait_until SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out waiting for $what (logs in $WORK)"
    sleep 0.2
  done
}

say "1. etcd: three members"
CLUSTER="" ENDPOINTS=""
for i in 0 1 2; do
  CLUSTER+="${CLUSTER:+,}m$i=http://127.0.0.1:$((BASE + 10 + i))"
  ENDPOINTS+="${ENDPOINTS:+,}http://127.0.0.1:$((BASE + i))"
done
for i in 0 1 2; do
  etcd --name "m$i" --data-dir "$WORK/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:$((BASE + i))" --advertise-client-urls "http://127.0.0.1:$((BASE + i))" \
    --listen-peer-urls "http://127.0.0.1:$((BASE + 10 + i))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((BASE + 10 + i))" \
    --initial-cluster "$CLUSTER" --max-txn-ops 100000 --logger zap --log-level warn >"$WORK/etcd-$i.log" 2>&1 &
  PIDS+=($!)
done
wait_until 30 "etcd to have a leader" etcdctl --endpoints "$ENDPOINTS" put /probe 1
echo "  endpoints: $ENDPOINTS"

say "2. A key-encryption key (0600) and one init against etcd"
openssl rand -hex 32 >"$WORK/kek" && chmod 600 "$WORK/kek"
STORE=(--store etcd --etcd-endpoints "$ENDPOINTS" --kek-file "$WORK/kek")
"$BIN_DIR/trellis-control" init --data-dir "$WORK/cp-0" --endpoint "127.0.0.1:$((BASE + 20))" "${STORE[@]}"
echo "  CA key as etcd stores it: $(etcdctl --endpoints "$ENDPOINTS" get /trellis/ca_files/ca/ca-key.pem --print-value-only | head -c 34) (then nonce and ciphertext)"

say "3. Three replicas, each with its own data dir (filled from etcd at start)"
for i in 0 1 2; do
  "$BIN_DIR/trellis-control" serve --data-dir "$WORK/cp-$i" --listen "127.0.0.1:$((BASE + 20 + i))" \
    --metrics-listen "127.0.0.1:$((BASE + 30 + i))" --replica-name "cp-$i" "${STORE[@]}" >"$WORK/cp-$i.log" 2>&1 &
  PIDS+=($!)
  wait_until 30 "replica $i" python3 -c "import socket; socket.create_connection(('127.0.0.1', $((BASE + 20 + i))))"
done
for i in 1 2; do
  sed "s/127.0.0.1:$((BASE + 20))/127.0.0.1:$((BASE + 20 + i))/" "$WORK/cp-0/admin.yaml" >"$WORK/admin-$i.yaml"
done
cp "$WORK/cp-0/admin.yaml" "$WORK/admin-0.yaml"
ctl() { local i=$1; shift; "$BIN_DIR/trellisctl" --config "$WORK/admin-$i.yaml" "$@"; }

say "4. Two proxies: node-a on replica 1, node-b on replica 2"
proxy() { # proxy NODE REPLICA OFFSET IP
  local node=$1 replica=$2 p=$((BASE + 40 + $3 * 10)) ip=$4 token pin
  read -r token pin < <(ctl "$replica" token create --node "$node" --namespace demo -o json |
    python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["token"], v["caPin"])')
  cat >"$WORK/$node.yaml" <<YAML
node: $node
controlPlane: {address: "127.0.0.1:$((BASE + 20 + replica))", caPin: "$pin", token: "$token"}
stateDir: $WORK/$node
hboneAddress: 127.0.0.1:$p
listen: {hbone: "127.0.0.1:$p", outbound: "127.0.0.1:$((p + 1))", inbound: "127.0.0.1:$((p + 2))",
  socks5: "127.0.0.1:$((p + 3))", admin: "127.0.0.1:$((p + 4))", metrics: "127.0.0.1:$((p + 5))",
  ready: "127.0.0.1:$((p + 6))", workloadApi: none}
workloads:
  - {name: $node-web, namespace: demo, serviceAccount: web, addresses: ["$ip"], ports: [{port: 8080, protocol: tcp}]}
YAML
  "$BIN_DIR/trellis-proxy" run --config "$WORK/$node.yaml" >"$WORK/$node.log" 2>&1 &
  PIDS+=($!)
  wait_until 30 "$node ready" python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$((p + 6))/healthz/ready')"
  echo "  $node: connected to replica $replica, token $token"
  echo "$token" >"$WORK/$node.token"
}
proxy node-a 1 0 127.0.10.1
proxy node-b 2 1 127.0.10.2

say "5. A policy applied through replica 0 reaches both proxies (through etcd's watch on replicas 1 and 2)"
ctl 0 apply -f - <<'YAML'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ha-demo, namespace: demo}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/demo/sa/web"]}}]}]
YAML
for p in $((BASE + 44)) $((BASE + 54)); do
  wait_until 30 "the policy at the proxy with admin port $p" \
    python3 -c "import urllib.request,sys; sys.exit('ha-demo' not in urllib.request.urlopen('http://127.0.0.1:$p/config_dump').read().decode())"
done
for i in 0 1 2; do echo "  replica $i serves config version $(ctl "$i" proxy-status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["currentVersion"])')"; done

say "6. node-a's token, already used through replica 1, is refused by replica 2"
# node-a's config, pointed at replica 2, with a fresh state dir and ports of its own.
python3 - "$WORK" "$BASE" <<'PY'
import sys
work, base = sys.argv[1], int(sys.argv[2])
text = open(f"{work}/node-a.yaml").read().replace(f"127.0.0.1:{base + 21}", f"127.0.0.1:{base + 22}")
for k in range(7):
    text = text.replace(f"127.0.0.1:{base + 40 + k}", f"127.0.0.1:{base + 60 + k}")
open(f"{work}/again.yaml", "w").write(text.replace(f"{work}/node-a", f"{work}/again"))
PY
"$BIN_DIR/trellis-proxy" run --config "$WORK/again.yaml" >"$WORK/again.log" 2>&1 &
again=$!
PIDS+=($again)
wait_until 30 "the second join to be refused" grep -q "already used" "$WORK/again.log"
echo "  $(grep -m1 -o 'join token was already used' "$WORK/again.log")"

say "Done: stopping everything"
