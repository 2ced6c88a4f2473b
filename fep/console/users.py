"""The console's users file: one line a person, `name role scrypt$N$r$p$salt$hash`, kept by `fep user`.

Passwords are kept only as scrypt hashes (hashlib, the standard library's binding of OpenSSL's): a copy of the
file does not give the passwords away, and each guess costs 16 MiB and some 50 ms. Roles: office (views the
pages) and operator (views them, and sees the `fep` command for each action and ID numbers and names whole).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from fep.backup import fsync

ROLES = ("office", "operator")
NAME = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
N, R, P = 1 << 14, 8, 1  # scrypt's cost: 16 MiB of memory a guess
MIN_PASSWORD = 10


class UsersError(ValueError):
    """The users file, or what is asked of it, is wrong; the message says what and where."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    hash: str

    @property
    def sees_whole(self) -> bool:
        """ID numbers and names unmasked, and the `fep` commands: the operator's, who has the admin CLI anyway."""
        return self.role == "operator"


@functools.cache
def decoy() -> User:
    """A user no name has: a sign-in with an unknown name checks its password against this one's, so it takes as
    long as a wrong password does and the answer's time does not tell which names exist."""
    return User("", "", hashed(secrets.token_urlsafe(16)))


def hashed(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=N, r=R, p=P, dklen=32)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(digest)}"


def matches(user: User, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = user.hash.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected))
    except ValueError:
        return False
    return scheme == "scrypt" and hmac.compare_digest(got, expected)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def read(path: Path) -> dict[str, User]:
    """Every user in the file; none when it does not exist yet (no one can sign in)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise UsersError(f"cannot read the console's users file {path}: {e}") from None
    users = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[1] not in ROLES or not parts[2].startswith("scrypt$"):
            raise UsersError(f"{path}:{n}: a line is `name role scrypt$...` with a role of {' or '.join(ROLES)}; "
                             f"keep the file with `fep user`")
        users[parts[0]] = User(*parts)
    return users


def write(path: Path, users: dict[str, User]) -> None:
    """The whole file anew, in place at once (a rename): fep never reads half of it. Readable by its owner and
    group only: the group the file had, or else its directory's (/etc/fep is root:fep), so fep can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    lines = ["# fep console users: name role hash (kept by `fep user`; passwords are not in it)"]
    lines += [f"{u.name} {u.role} {u.hash}" for u in sorted(users.values(), key=lambda u: u.name)]
    group = (path if path.exists() else path.parent).stat().st_gid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.fchown(fd, -1, group)
    except PermissionError:  # not root nor in that group: the file keeps the writer's group
        pass
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)  # the rename itself, on the disk


def check_new(name: str, role: str, password: str) -> None:
    if not NAME.fullmatch(name):
        raise UsersError(f"a user name is lower-case letters, digits, _ . - (up to 32, a letter first), got {name!r}")
    if role not in ROLES:
        raise UsersError(f"a role is {' or '.join(ROLES)}, got {role!r}")
    check_password(password)


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UsersError(f"a password has at least {MIN_PASSWORD} characters")

