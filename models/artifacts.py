"""Model and adapter artifacts by URI: a local directory as it is, or an fsspec URL (an object store,
a remote registry) copied once into a local cache — engines load weights from local paths."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_copy(uri: str, cache_dir: str | Path, version: str) -> Path:
    """A local directory with the artifact at ``uri`` (downloaded into ``cache_dir`` once per version)."""
    if is_local(uri):
        path = Path(uri.removeprefix("file://"))
        if not path.is_dir():
            raise FileNotFoundError(f"artifact {uri!r} is not a directory")
        return path
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    target = Path(cache_dir) / version
    if (target / ".ok").exists():
        return target
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    try:
        for f in fs.ls(root, detail=False):
            if fs.isfile(f):
                fs.get_file(f, str(tmp / Path(f).name))
        (tmp / ".ok").touch()
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
