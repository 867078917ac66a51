import json, sys, time
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa, ec, ed25519
from jwt.algorithms import RSAAlgorithm, ECAlgorithm, OKPAlgorithm

spec = json.load(sys.stdin)
keys = {}
for name, k in spec["keys"].items():
    kind = k["kind"]
    if kind.startswith("RS") or kind.startswith("PS"):
        priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(priv.public_key()))
    elif kind == "ES256":
        priv = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(priv.public_key()))
    elif kind == "ES384":
        priv = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(ECAlgorithm.to_jwk(priv.public_key()))
    elif kind == "EdDSA":
        priv = ed25519.Ed25519PrivateKey.generate()
        jwk = json.loads(OKPAlgorithm.to_jwk(priv.public_key()))
    jwk.update({"kid": k["kid"], "use": "sig"})
    keys[name] = (priv, kind, k["kid"], jwk)
now = int(time.time())
out = {"jwks": {n: json.dumps({"keys": [keys[k][3] for k in ks]}) for n, ks in spec["jwks"].items()}, "tokens": {}}
for name, t in spec["tokens"].items():
    claims = dict(t["claims"])
    for c in ("exp", "nbf", "iat"):
        if c in claims:
            claims[c] += now
    if t.get("alg") == "none":
        token = jwt.encode(claims, None, algorithm="none")
    else:
        priv, alg, kid, _ = keys[t["key"]]
        token = jwt.encode(claims, priv, algorithm=alg, headers={"kid": t.get("kid", kid)})
    out["tokens"][name] = token
print(json.dumps(out))
