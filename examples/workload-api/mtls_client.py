"""A plain mutual-TLS client from SVID files (`svidFiles` in proxy.yaml), Python's standard `ssl` only (plus
`cryptography` to print its own serial): one connection, with a context built from the files as they are now; the
server's certificate must chain to bundle.pem and carry the expected SPIFFE ID (its URI SAN; no host name check, as
SPIFFE says).

  python3 mtls_client.py --dir /run/orders --connect 127.0.0.1:9443 --expect spiffe://cluster.local/ns/shop/sa/payments

Prints the server's JSON line with "server_id" and "client_serial" added; exits 2, the reason on stderr, when the
server is not who it should be or the handshake fails.
"""

import argparse
import json
import os
import socket
import ssl
import sys

from cryptography import x509


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--connect", required=True)
    ap.add_argument("--expect", required=True, help="the server SPIFFE ID to accept")
    args = ap.parse_args()
    with open(os.path.join(args.dir, "svid.pem"), "rb") as f:
        own_serial = format(x509.load_pem_x509_certificate(f.read()).serial_number, "x")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE: the identity is the URI SAN, checked below
    ctx.load_cert_chain(os.path.join(args.dir, "svid.pem"), os.path.join(args.dir, "svid_key.pem"))
    ctx.load_verify_locations(os.path.join(args.dir, "bundle.pem"))
    host, port = args.connect.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:
                ids = [v for k, v in tls.getpeercert().get("subjectAltName", ()) if k == "URI"]
                if ids != [args.expect]:
                    print(f"refused: server SPIFFE ID {ids} is not {args.expect}", file=sys.stderr)
                    return 2
                line = tls.makefile("r").readline()
    except (OSError, ssl.SSLError) as err:
        print(f"handshake failed: {err}", file=sys.stderr)
        return 2
    if not line:
        print("the server closed the connection without an answer (refused us)", file=sys.stderr)
        return 2
    reply = json.loads(line)
    reply["client_serial"] = own_serial
    reply["server_id"] = ids[0]
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
