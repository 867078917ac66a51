"""A SPIFFE Workload API client built on py-spiffe (PyPI `spiffe`, over grpc-python's C core), for
tests/tests/workload_api.rs. Finds the socket through SPIFFE_ENDPOINT_SOCKET, as the SPIFFE spec says.

  x509 OUT_DIR            FetchX509SVID and FetchX509Bundles: prints {"spiffe_id", "trust_domains"}, writes
                          svid.pem (leaf and intermediates), svid_key.pem and bundle.pem
  jwt AUDIENCE OUT_DIR    FetchJWTSVID and FetchJWTBundles: prints {"spiffe_id", "token"}, writes jwks.json (the
                          trust domain's JWT bundle as the Workload API sent it)
  validate TOKEN AUDIENCE ValidateJWTSVID: prints {"spiffe_id"}

A refusal exits with status 2 and the gRPC status on stderr ("CODE: details").
"""

import json
import os
import sys

from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient


def grpc_status(err):
    """The gRPC status under py-spiffe's error wrapping, as "CODE: details"."""
    seen = err
    while seen is not None:
        code = getattr(seen, "code", None)
        if callable(code):
            return f"{code().name}: {seen.details()}"
        seen = seen.__cause__ or seen.__context__
    return f"{type(err).__name__}: {err}"


def main():
    command = sys.argv[1]
    client = WorkloadApiClient(default_timeout=30)
    try:
        if command == "x509":
            out = sys.argv[2]
            svid = client.fetch_x509_svid()
            bundles = client.fetch_x509_bundles()
            td = svid.spiffe_id.trust_domain
            svid.save(os.path.join(out, "svid.pem"), os.path.join(out, "svid_key.pem"), serialization.Encoding.PEM)
            bundles.get_bundle_for_trust_domain(td).save(os.path.join(out, "bundle.pem"), serialization.Encoding.PEM)
            domains = sorted(str(b.trust_domain) for b in bundles.bundles)
            print(json.dumps({"spiffe_id": str(svid.spiffe_id), "trust_domains": domains}))
        elif command == "jwt":
            audience, out = sys.argv[2], sys.argv[3]
            svid = client.fetch_jwt_svid(audience={audience})
            bundles = client.fetch_jwt_bundles()
            td = svid.spiffe_id.trust_domain
            bundle = bundles.get_bundle_for_trust_domain(td)
            keys = []
            for kid, key in bundle.jwt_authorities.items():
                pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                keys.append({"kid": kid, "pem": pem.decode()})
            with open(os.path.join(out, "jwt_bundle.json"), "w") as f:
                json.dump({"trust_domain": str(td), "keys": keys}, f)
            print(json.dumps({"spiffe_id": str(svid.spiffe_id), "token": svid.token}))
        elif command == "validate":
            token, audience = sys.argv[2], sys.argv[3]
            svid = client.validate_jwt_svid(token, audience)
            print(json.dumps({"spiffe_id": str(svid.spiffe_id)}))
        else:
            print(f"unknown command {command}", file=sys.stderr)
            return 64
    except Exception as err:  # noqa: BLE001 - every refusal is reported the same way
        print(grpc_status(err), file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
