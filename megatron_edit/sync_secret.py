"""The secret replica jobs share (`--sync-secret-file`, or MEGATRON_EDIT_SYNC_SECRET_FILE): a replica proves it to the
lighthouse's gate before it may join a quorum (lighthouse.py), and to a live replica before heal state is served or
taken (heal_transport.py). The proofs are HMAC-SHA256 over fresh nonces; the secret itself never leaves this process,
the command line, logs and checkpoints hold the file's path only.

Without a secret file the key is empty: replicas on one machine's loopback, where every process is the user's own,
still prove they belong to the same kind of run, and one with a secret cannot meet one without.
"""
import hashlib
import hmac
import os
import stat
from typing import Optional

from megatron_edit.errors import require

SECRET_FILE_VARIABLE = "MEGATRON_EDIT_SYNC_SECRET_FILE"
MIN_SECRET_BYTES = 16


def secret_file(flag: Optional[str]) -> Optional[str]:
    return flag or os.environ.get(SECRET_FILE_VARIABLE) or None


def check_secret_file(path: str) -> None:
    """One line for a file that is missing, empty or short, or readable by others than its owner."""
    how = f"--sync-secret-file {path}"
    require(os.path.isfile(path), f"{how}: no such file (make one with: head -c 32 /dev/urandom > FILE; "
                                  "chmod 600 FILE, and copy it to every replica's machine)")
    require(os.path.getsize(path) >= MIN_SECRET_BYTES,
            f"{how}: {os.path.getsize(path)} bytes; a secret needs at least {MIN_SECRET_BYTES} "
            "(head -c 32 /dev/urandom > FILE)")
    mode = os.stat(path).st_mode
    require(not mode & (stat.S_IRWXG | stat.S_IRWXO),
            f"{how}: readable by others than its owner (mode {stat.filemode(mode)}); chmod 600 {path}")


def read_secret(path: Optional[str]) -> bytes:
    if path is None:
        return b""
    check_secret_file(path)
    with open(path, "rb") as file:
        return file.read()


def proof(secret: bytes, *parts) -> bytes:
    """HMAC-SHA256 of the parts (str, int or bytes), which a holder of the same secret alone can produce."""
    message = b"\0".join(part if isinstance(part, bytes) else str(part).encode() for part in parts)
    return hmac.new(secret, message, hashlib.sha256).digest()


def same_proof(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
