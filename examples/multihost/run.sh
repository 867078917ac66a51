#!/usr/bin/env bash
# A three-host Trellis mesh on one Linux machine (run as root), with transparent capture:
#   host trl-ex-cp      10.200.250.1  control plane (and, being outside the mesh, a plaintext client)
#   host trl-ex-client  10.200.250.2  trellis-proxy --capture, workload demo/client, runs plain `curl`
#   host trl-ex-server  10.200.250.3  trellis-proxy --capture, workload demo/web, runs `python3 -m http.server`
# Hosts are network namespaces joined by a bridge in its own namespace (trl-ex-br); nothing is changed in the
# root namespace. Everything is removed on exit, also on failure or Ctrl-C.
#
#   sudo examples/multihost/run.sh            # uses target/release (built if missing)
#   sudo BIN_DIR=target/debug examples/multihost/run.sh
set -euo pipefail

cd "$(dirname "$0")/../.."
BIN_DIR=${BIN_DIR:-target/release}
NET=10.200.250
CP_IP=$NET.1 CLIENT_IP=$NET.2 SERVER_IP=$NET.3
HOSTS=(trl-ex-cp trl-ex-client trl-ex-server)
BRIDGE=trl-ex-br

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (network namespaces and nftables need it)"
for tool in ip nft curl python3 tcpdump; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
if [ ! -x "$BIN_DIR/trellis-proxy" ] || [ ! -x "$BIN_DIR/trellis-control" ] || [ ! -x "$BIN_DIR/trellisctl" ]; then
  [ "$BIN_DIR" = target/release ] || die "$BIN_DIR lacks trellis-proxy, trellis-control or trellisctl"
  cargo build --release -p trellis-control-plane -p trellis-data-plane
fi
BIN_DIR=$(cd "$BIN_DIR" && pwd)
WORK=

cleanup() {
  set +e
  for ns in "${HOSTS[@]}" "$BRIDGE"; do
    pids=$(ip netns pids "$ns" 2>/dev/null)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    ip netns delete "$ns" 2>/dev/null
  done
  [ -z "$WORK" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 130" INT TERM
cleanup 2>/dev/null   # leftovers of an interrupted run
WORK=$(mktemp -d)

on() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
ctl() { on trl-ex-cp "$BIN_DIR/trellisctl" --config "$WORK/cp/admin.yaml" "$@"; }
wait_until() { # wait_until SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out waiting for $what"
    sleep 0.2
  done
}
fetch() { on "$1" curl -sS --max-time 5 "http://$SERVER_IP:8080/hello.txt"; }

say "1. Three hosts: network namespaces on $NET.0/24, joined by a bridge"
ip netns add "$BRIDGE"
ip -n "$BRIDGE" link add br0 type bridge
ip -n "$BRIDGE" link set br0 up
i=1
for ns in "${HOSTS[@]}"; do
  ip netns add "$ns"
  ip -n "$BRIDGE" link add "h$i" type veth peer name eth0 netns "$ns"
  ip -n "$BRIDGE" link set "h$i" master br0 up
  ip -n "$ns" addr add "$NET.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  echo "  $ns  $NET.$i"
  i=$((i + 1))
done

say "2. Control plane on trl-ex-cp ($CP_IP:15012)"
"$BIN_DIR/trellis-control" init --data-dir "$WORK/cp" --endpoint "$CP_IP:15012" >/dev/null
on trl-ex-cp "$BIN_DIR/trellis-control" serve --data-dir "$WORK/cp" --listen "$CP_IP:15012" >"$WORK/cp.log" 2>&1 &
wait_until 20 "the control plane" ctl nodes

say "3. A server (python3 http.server) on trl-ex-server, nothing mesh-specific in it"
mkdir -p "$WORK/www" && echo "hello from the server host" >"$WORK/www/hello.txt"
on trl-ex-server python3 -m http.server 8080 --bind "$SERVER_IP" --directory "$WORK/www" >/dev/null 2>&1 &
wait_until 20 "http.server" on trl-ex-server curl -sf "http://$SERVER_IP:8080/hello.txt"

proxy() { # proxy HOST NODE WORKLOAD IP PORTS
  local ns=$1 node=$2 workload=$3 ip=$4 ports=$5 token pin
  read -r token pin < <(ctl token create --node "$node" --namespace demo -o json |
    python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["token"], v["caPin"])')
  cat >"$WORK/$node.yaml" <<YAML
node: $node
controlPlane: {address: "$CP_IP:15012", caPin: "$pin", token: "$token"}
stateDir: $WORK/$node
hboneAddress: $ip:15008
workloads:
  - {name: $workload, namespace: demo, serviceAccount: $workload, labels: {app: $workload}, addresses: ["$ip"], ports: $ports}
YAML
  on "$ns" "$BIN_DIR/trellis-proxy" run --capture --config "$WORK/$node.yaml" >"$WORK/$node.log" 2>&1 &
  wait_until 30 "$node ready" on "$ns" curl -sf http://127.0.0.1:15000/healthz/ready
  echo "  $node: workload demo/$workload at $ip, capture rules installed:"
  on "$ns" nft list table inet trellis | sed 's/^/    /'
}

say "4. A proxy with transparent capture on each workload host"
proxy trl-ex-server server-host web "$SERVER_IP" '[{port: 8080, protocol: tcp}]'
proxy trl-ex-client client-host client "$CLIENT_IP" '[]'
wait_until 30 "the first request through the mesh" fetch trl-ex-client

say "5. Plain curl on the client host reaches $SERVER_IP:8080 by IP; on the wire only mTLS"
on "$BRIDGE" tcpdump --immediate-mode -U -i h2 -n -w "$WORK/wire.pcap" tcp 2>/dev/null &
TCPDUMP=$!
sleep 1
echo "  curl http://$SERVER_IP:8080/hello.txt -> $(fetch trl-ex-client)"
sleep 0.5
kill -TERM $TCPDUMP; wait $TCPDUMP 2>/dev/null || true
clear_packets=$(tcpdump -r "$WORK/wire.pcap" -n "dst host $SERVER_IP and dst port 8080" 2>/dev/null | wc -l)
tunnel_packets=$(tcpdump -r "$WORK/wire.pcap" -n "dst host $SERVER_IP and dst port 15008" 2>/dev/null | wc -l)
echo "  packets from the client host to $SERVER_IP:8080 (clear text): $clear_packets; to :15008 (HBONE, mTLS): $tunnel_packets"
[ "$clear_packets" = 0 ] && [ "$tunnel_packets" -gt 0 ] || die "expected only HBONE on the wire"
if tcpdump -r "$WORK/wire.pcap" -A 2>/dev/null | grep -q "hello from the server host"; then die "payload seen in clear"; fi
echo "  the response text does not appear on the wire"

say "6. A client outside the mesh (the control-plane host) sends plaintext: PERMISSIVE by default, so it gets in"
echo "  $(fetch trl-ex-cp)"

say "7. PeerAuthentication STRICT for namespace demo: plaintext refused, the mesh client still gets in"
ctl apply -f - <<'YAML'
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: demo}
spec: {mtls: {mode: STRICT}}
YAML
wait_until 20 "STRICT to refuse plaintext" bash -c "! ip netns exec trl-ex-cp curl -sS --max-time 5 http://$SERVER_IP:8080/hello.txt"
echo "  outside client: $(fetch trl-ex-cp 2>&1 || true)"
echo "  mesh client:    $(fetch trl-ex-client)"

say "8. AuthorizationPolicy: web admits only spiffe://cluster.local/ns/demo/sa/admin; the client is refused"
ctl apply -f - <<'YAML'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-admins-only, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/admin]}}]}]
YAML
wait_until 20 "the policy to refuse the client" bash -c "! ip netns exec trl-ex-client curl -sS --max-time 5 http://$SERVER_IP:8080/hello.txt"
echo "  mesh client: $(fetch trl-ex-client 2>&1 || true)"
grep -m1 "connection denied" "$WORK/server-host.log" | sed 's/^/  server proxy log: /' || true

say "9. Allow the client's identity too: it gets in again"
ctl apply -f - <<'YAML'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-admins-only, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/admin, cluster.local/ns/demo/sa/client]}}]}]
YAML
wait_until 20 "the client to be admitted" fetch trl-ex-client
echo "  mesh client: $(fetch trl-ex-client)"

say "10. Stop the client proxy (SIGTERM): it removes its rules"
kill -TERM $(ip netns pids trl-ex-client)
wait_until 20 "the client proxy to exit" bash -c "[ -z \"\$(ip netns pids trl-ex-client)\" ]"
echo "  nft list ruleset on the client host: '$(on trl-ex-client nft list ruleset)' (empty)"

say "Done: removing the hosts"
