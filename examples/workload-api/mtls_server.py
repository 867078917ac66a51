"""A plain mutual-TLS server from SVID files (`svidFiles` in proxy.yaml), Python's standard `ssl` only (plus
`cryptography` to print its own serial). It knows nothing of Trellis or SPIFFE libraries: it reads svid.pem,
svid_key.pem and bundle.pem again for every handshake, so a renewed certificate is used without a restart, requires a
client certificate that chains to the bundle, and accepts only the one SPIFFE ID it is told (the URI SAN).

  python3 mtls_server.py --dir /run/payments --listen 127.0.0.1:9443 \
      --allow spiffe://cluster.local/ns/shop/sa/orders [--pid-file /run/payments/server.pid]

Answers each accepted client with one JSON line: {"server_serial", "client_id", "sighups"}; a refused client gets
nothing, and the refusal and its reason go to stderr. SIGHUP (svidFiles.signal) only counts: files are reread anyway.
"""

import argparse
import json
import os
import signal
import socket
import ssl
import sys

from cryptography import x509

sighups = 0


def on_sighup(_signum, _frame):
    global sighups
    sighups += 1


def spiffe_ids(peer_cert):
    return [value for kind, value in peer_cert.get("subjectAltName", ()) if kind == "URI"]


def serial_of(path):
    with open(path, "rb") as f:
        return format(x509.load_pem_x509_certificate(f.read()).serial_number, "x")


def context(directory):
    """A new context from the files as they are now (one per handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.path.join(directory, "svid.pem"), os.path.join(directory, "svid_key.pem"))
    ctx.load_verify_locations(os.path.join(directory, "bundle.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--allow", required=True, help="the client SPIFFE ID to accept")
    ap.add_argument("--pid-file")
    args = ap.parse_args()
    signal.signal(signal.SIGHUP, on_sighup)
    host, port = args.listen.rsplit(":", 1)
    listener = socket.create_server((host, int(port)))
    if args.pid_file:
        with open(args.pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(args.pid_file + ".tmp", args.pid_file)
    print(f"listening on {args.listen}", file=sys.stderr, flush=True)
    while True:
        conn, addr = listener.accept()
        conn.settimeout(10)
        try:
            ctx = context(args.dir)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                ids = spiffe_ids(tls.getpeercert())
                if ids != [args.allow]:
                    print(f"refused {addr}: client SPIFFE ID {ids} is not {args.allow}", file=sys.stderr, flush=True)
                    continue
                reply = {"server_serial": serial_of(os.path.join(args.dir, "svid.pem")), "client_id": ids[0],
                         "sighups": sighups}
                tls.sendall((json.dumps(reply) + "\n").encode())
                print(f"served {ids[0]}", file=sys.stderr, flush=True)
        except (OSError, ssl.SSLError, ValueError) as err:
            print(f"handshake with {addr} failed: {err}", file=sys.stderr, flush=True)
            conn.close()


if __name__ == "__main__":
    main()
