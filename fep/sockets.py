"""Who may open fep's Unix sockets. The HIS socket and the admin socket belong to different groups (config
`his.unix_group`, default `fep-his`; `admin.unix_group`, default `fep`), both mode 0660: an HIS program put in
`fep-his` can post trades and cannot reach the admin socket, which can reverse, replay and drop them and shows
every answer whole. The daemon's user must be a member of both groups to give a socket to it (scripts/install
makes `fep` one; systemd/fep.service adds `fep-his` as a supplementary group)."""

from __future__ import annotations

import grp
import os
from pathlib import Path

from twisted.logger import Logger

log = Logger()


def chown_group(path: Path | str, group: str) -> bool:
    """Give the socket at `path` to `group` (owner unchanged), mode 0660. False, with a warning, when the group
    does not exist or fep may not give it (a development machine): the socket then keeps fep's own group."""
    try:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except KeyError:
        log.warn("no group {group} for {path}: it keeps fep's own group", group=group, path=str(path))
        return False
    except PermissionError:
        log.warn("fep may not give {path} to group {group} (it is not a member): it keeps fep's own group",
                 group=group, path=str(path))
        return False
    os.chmod(path, 0o660)
    return True
