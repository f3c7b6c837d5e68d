"""Hand-made input tars for tests: members in any order, any names, cut anywhere."""

from __future__ import annotations

import io
import os
import tarfile


def write_raw_tar(path: str, members: list[tuple[str, bytes]]) -> int:
    """Write ``members`` (name, bytes) as they come, including what TarShardWriter refuses
    (unsafe or dotted keys, split samples); returns the file size."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return os.path.getsize(path)


def truncate_inside(path: str, member: str, keep: int = 10) -> None:
    """Cut the tar ``keep`` bytes into ``member``'s data, like an interrupted copy."""
    with tarfile.open(path) as tf:
        offset = tf.getmember(member).offset_data
    with open(path, "r+b") as f:
        f.truncate(offset + keep)
