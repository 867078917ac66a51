"""Fetch this process's X.509-SVID and trust bundle from the Trellis proxy's SPIFFE Workload API with py-spiffe
(`pip install spiffe`), as any SPIFFE application would; nothing here is Trellis-specific.

  SPIFFE_ENDPOINT_SOCKET=unix:///run/trellis/workload.sock python3 fetch_svid.py [OUT_DIR]

Prints the SPIFFE ID, the certificate's expiry and the trust domains; with OUT_DIR, also writes svid.pem,
svid_key.pem (0600) and bundle.pem there. Then a JWT-SVID for the audience $JWT_AUDIENCE (default "example"),
checked by the proxy's ValidateJWTSVID: its claims and a prefix of the token. A caller the proxy does not attest
gets PERMISSION_DENIED.
"""

import os
import sys

from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient


def main():
    audience = os.environ.get("JWT_AUDIENCE", "example")
    with WorkloadApiClient(default_timeout=10) as client:
        svid = client.fetch_x509_svid()
        bundles = client.fetch_x509_bundles()
        jwt_svid = client.fetch_jwt_svid(audience={audience})
        validated = client.validate_jwt_svid(jwt_svid.token, audience)
    print(f"SPIFFE ID:  {svid.spiffe_id}")
    print(f"expires:    {svid.leaf.not_valid_after_utc.isoformat()}")
    print(f"bundles:    {', '.join(sorted(str(b.trust_domain) for b in bundles.bundles))}")
    if len(sys.argv) > 1:
        out = sys.argv[1]
        svid.save(os.path.join(out, "svid.pem"), os.path.join(out, "svid_key.pem"), serialization.Encoding.PEM)
        bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        bundle.save(os.path.join(out, "bundle.pem"), serialization.Encoding.PEM)
        print(f"written:    {out}/svid.pem, svid_key.pem, bundle.pem")
    print(f"JWT-SVID:   sub {validated.spiffe_id}, aud {sorted(jwt_svid.audience)}, expires {jwt_svid.expiry}")
    print(f"            {jwt_svid.token[:40]}...")


if __name__ == "__main__":
    main()
