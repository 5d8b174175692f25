"""SS58 addresses (the chain's text form of a public key) to and from raw public keys.

A hotkey is shown on the chain as an SS58 address; the Rust programs name identities by their
32-byte sr25519 public keys in hex. Only the single-byte prefixes (0..63) are handled, which
covers Bittensor (42) and every generic Substrate chain.
"""

from __future__ import annotations

import hashlib

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
_CONTEXT = b"SS58PRE"
BITTENSOR_FORMAT = 42


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def _b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        if c not in _INDEX:
            raise ValueError(f"{text!r} is not an SS58 address: {c!r} is not a base58 digit")
        n = n * 58 + _INDEX[c]
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + body


def _checksum(payload: bytes) -> bytes:
    return hashlib.blake2b(_CONTEXT + payload, digest_size=64).digest()[:2]


def encode(public_key: bytes, ss58_format: int = BITTENSOR_FORMAT) -> str:
    """The SS58 address of a 32-byte public key."""
    if len(public_key) != 32:
        raise ValueError(f"a public key is 32 bytes, got {len(public_key)}")
    if not 0 <= ss58_format < 64:
        raise ValueError(f"only SS58 formats 0..63 are supported, got {ss58_format}")
    payload = bytes([ss58_format]) + public_key
    return _b58encode(payload + _checksum(payload))


def decode(address: str) -> bytes:
    """The 32-byte public key of an SS58 address; ValueError when it is malformed."""
    raw = _b58decode(address.strip())
    if len(raw) != 35 or raw[0] >= 64:
        raise ValueError(f"{address!r} is not a single-byte-prefix SS58 address of a 32-byte key")
    payload, check = raw[:33], raw[33:]
    if _checksum(payload) != check:
        raise ValueError(f"{address!r} is not an SS58 address: its checksum does not match")
    return payload[1:]


def to_hex(key: str) -> str:
    """A hotkey given as SS58 or as hex (with or without 0x) → its public key in hex."""
    text = key.strip()
    bare = text[2:] if text.lower().startswith("0x") else text
    if len(bare) == 64:
        try:
            return bytes.fromhex(bare).hex()
        except ValueError:
            pass
    return decode(text).hex()
