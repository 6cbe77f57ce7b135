"""DPoP proofs (RFC 9449) without a server: the RFCs' own examples, and every way a proof
can be malformed or forged, each refused with the one opaque ``ProofInvalid``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from factories.devices import DeviceKey
from phivault.devices.dpop import (
    NonceMaker,
    access_token_hash,
    jwk_thumbprint,
    normalise_htu,
    parse_proof,
)
from phivault.devices.errors import ProofInvalid

# RFC 9449 §4.1, Figure 4: a proof for POST https://server.example.com/token.
RFC9449_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNo"
    "UklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERW"
    "clUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0"
    "dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-F"
    "dWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg"
)
RFC9449_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"  # §6.1


def test_the_rfc_9449_example_proof_verifies_with_its_thumbprint() -> None:
    proof = parse_proof(RFC9449_PROOF)
    assert proof.jkt == RFC9449_JKT
    assert (proof.algorithm, proof.htm, proof.htu, proof.iat) == (
        "ES256",
        "POST",
        "https://server.example.com/token",
        1562262616.0,
    )
    assert proof.jti == "-BwC3ESc6acc2lTc"


def test_thumbprints_match_the_rfc_examples() -> None:
    # RFC 8037 Appendix A.3 (Ed25519) and RFC 9449 §6.1 (P-256).
    ed25519 = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(ed25519) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    p256 = {
        "kty": "EC",
        "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
        "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA",
        "crv": "P-256",
        "use": "sig",  # members outside RFC 7638 §3.2's list do not count
    }
    assert jwk_thumbprint(p256) == RFC9449_JKT


def test_access_token_hash_matches_the_rfc_9449_example() -> None:
    # RFC 9449 §7.1, Figure 12.
    assert access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == (
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    )


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
def test_proofs_of_both_algorithms_verify(algorithm: str) -> None:
    key = DeviceKey(algorithm)
    proof = parse_proof(key.proof("PATCH", "https://h.example/api/v1/uploads/x", token="t", nonce="n"))
    assert proof.jkt == key.thumbprint
    assert proof.ath == access_token_hash("t")
    assert proof.nonce == "n"
    assert "d" not in proof.jwk


def _b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _flip_last_signature_character(token: str) -> str:
    head, _, signature = token.rpartition(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    return f"{head}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"


def _swap_claims(token: str, claims: dict[str, Any]) -> str:
    header, _, rest = token.partition(".")
    _, _, signature = rest.partition(".")
    return f"{header}.{_b64(claims)}.{signature}"


def _forgeries() -> dict[str, str]:
    key = DeviceKey("EdDSA")
    other = DeviceKey("EdDSA")
    good = key.proof("POST", "https://h.example/t")
    claims = {"jti": "j", "htm": "POST", "htu": "https://h.example/t", "iat": 1}
    private_jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.private))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    return {
        "tampered signature": _flip_last_signature_character(good),
        "claims changed after signing": _swap_claims(good, {**claims, "htu": "https://evil.example/t"}),
        "signed by another key than its jwk": jwt.encode(
            claims, other.private, algorithm="EdDSA", headers={"typ": "dpop+jwt", "jwk": key.jwk}
        ),
        "typ is JWT": key.proof("POST", "https://h.example/t", typ="JWT"),
        "alg none": f"{_b64({'typ': 'dpop+jwt', 'alg': 'none', 'jwk': key.jwk})}.{_b64(claims)}.",
        "alg HS256 with the public key as secret": jwt.encode(
            claims,
            "secret-bytes-of-the-public-key!!",
            algorithm="HS256",
            headers={"typ": "dpop+jwt", "jwk": key.jwk},
        ),
        "RSA key": jwt.encode(
            claims, rsa_key, algorithm="RS256", headers={"typ": "dpop+jwt", "jwk": rsa_jwk}
        ),
        "jwk holds the private key": jwt.encode(
            claims, key.private, algorithm="EdDSA", headers={"typ": "dpop+jwt", "jwk": private_jwk}
        ),
        "no jwk": jwt.encode(claims, key.private, algorithm="EdDSA", headers={"typ": "dpop+jwt"}),
        "EC key declared as EdDSA": jwt.encode(
            claims,
            ec.generate_private_key(ec.SECP256R1()),
            algorithm="ES256",
            headers={"typ": "dpop+jwt", "jwk": key.jwk},
        ),
        "no jti": jwt.encode(
            {k: v for k, v in claims.items() if k != "jti"},
            key.private,
            algorithm="EdDSA",
            headers={"typ": "dpop+jwt", "jwk": key.jwk},
        ),
        "iat is text": jwt.encode(
            {**claims, "iat": "yesterday"},
            key.private,
            algorithm="EdDSA",
            headers={"typ": "dpop+jwt", "jwk": key.jwk},
        ),
        "not a JWS": "not.a.jws",
        "empty": "",
        "too long": "a" * 5000,
    }


@pytest.mark.parametrize("case", sorted(_forgeries()))
def test_malformed_or_forged_proofs_are_refused(case: str) -> None:
    with pytest.raises(ProofInvalid):
        parse_proof(_forgeries()[case])


def test_an_ed25519_key_cannot_pass_as_p256() -> None:
    key = DeviceKey("EdDSA", private=Ed25519PrivateKey.generate())
    jwk = {**key.jwk, "kty": "EC", "crv": "P-256", "y": key.jwk["x"]}
    forged = jwt.encode(
        {"jti": "j", "htm": "GET", "htu": "https://h/", "iat": 1},
        key.private,
        algorithm="EdDSA",
        headers={"typ": "dpop+jwt", "jwk": jwk},
    )
    with pytest.raises(ProofInvalid):
        parse_proof(forged)


def test_htu_comparison_follows_rfc_3986_normalisation() -> None:
    assert normalise_htu("HTTPS://Server.Example:443/a/b?x=1#f") == "https://server.example/a/b"
    assert normalise_htu("https://server.example:8443/a") == "https://server.example:8443/a"
    assert normalise_htu("https://server.example/a") != normalise_htu("https://server.example/A")
    assert normalise_htu("https://server.example:bad/a") == ""


def test_nonces_verify_only_within_their_lifetime_and_under_their_key() -> None:
    maker = NonceMaker(b"k" * 32, lifetime=300)
    nonce = maker.current(1_000_000.0)
    assert maker.current(1_000_010.0) == nonce  # one nonce per half lifetime
    assert maker.valid(nonce, 1_000_100.0, skew=5)
    assert not maker.valid(nonce, 1_000_000.0 + 300, skew=5)  # expired
    assert not NonceMaker(b"x" * 32, lifetime=300).valid(nonce, 1_000_100.0, skew=5)  # another key
    assert not maker.valid(nonce[:-2] + ("AA" if nonce[-2:] != "AA" else "BB"), 1_000_100.0, skew=5)
    assert not maker.valid("garbage!", 1_000_100.0, skew=5)
    # a nonce issued by a replica whose clock runs a little ahead is accepted
    assert maker.valid(maker.current(1_000_150.0), 1_000_148.0, skew=5)
