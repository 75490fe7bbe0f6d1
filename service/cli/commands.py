"""What the `nlg` subcommands that run a model once do (answer, summarize, generate, score, fetch, models),
and what every command shares: running one (`run`) and loading the model from its flags (`load`). The
others are `service.cli.serving` (serve), `service.cli.batch` (batch) and `service.cli.measure` (eval,
bench, make-random); `service.cli.parser` parses the command line and calls them. Heavy imports happen
inside the commands so `nlg --help` answers at once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from model.registry import DEFAULT_MODEL, NAMES


def run(args) -> int:
    """Run one parsed command in this process; returns the exit status."""
    from model.registry import ModelNotFound

    try:
        args.run(args)
    except (ModelNotFound, FileNotFoundError, ValueError) as e:
        print(f"nlg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def load(args):
    from service.engine.generator import TextGenerator

    return TextGenerator.load(args.model, **load_options(args))


def load_options(args) -> dict:
    """`TextGenerator.load`'s arguments from the command line, but the model's name."""
    return {
        "device": args.device,
        "dtype": dtype_of(args),
        "quantization": args.quantize,
        "compile": args.compile,
        "context": args.context,
        "kv_memory": args.kv_cache_memory,
        "prefix_caching": not args.no_prefix_caching,
        "prompt_lookup": args.prompt_lookup,
        "chat_template": Path(args.chat_template).read_text() if args.chat_template else None,
    }


def dtype_of(args):
    """--dtype, or float32 on CPUs and bfloat16 on CUDA (float16 on cards without bf16, such as the V100)."""
    import torch

    if args.dtype:
        return getattr(torch, args.dtype)
    if str(args.device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _bars():
    """A plan's `progress` as tqdm bars on stderr: one per staged generation (a map round), closed at its end."""
    from tqdm import tqdm

    open_bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = open_bars.get(stage)
        if bar is None:
            bar = open_bars[stage] = tqdm(total=total, desc=f"nlg: {stage}", unit="piece", file=sys.stderr)
        bar.update(done - bar.n)
        if done == total:
            bar.close()
            del open_bars[stage]

    return progress


def _emit(args, data: dict, text: str) -> None:
    print(json.dumps(data, ensure_ascii=False) if args.json else text)


def cmd_answer(args) -> None:
    from service.tasks.answer import answer

    found = _file_passages(args.question, args.file or [])
    passages = (args.passage or []) + [p.text for p in found]
    a = answer(load(args), args.question, passages, args.max_tokens)
    data = {
        "answer": a.answer,
        "passage_index": a.passage_index,
        "answered": a.answered,
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
    }
    where = f"\n(drawn from passage {a.passage_index})" if a.passage_index is not None else ""
    cited = a.passage_index - len(args.passage or []) if a.passage_index is not None else -1
    if cited >= 0:
        p = found[cited]
        data["citation"] = {"file": p.file, "part": p.part, "start": p.start, "end": p.end, "passage": p.text}
        where = f"\n(from {p.file}, {p.part}, characters {p.start}-{p.end})"
    _emit(args, data, a.answer + where)


def _file_passages(question: str, files: list[str]):
    """The passages of the files ranked best for the question (`service.retrieval`)."""
    if not files:
        return []
    from service import documents, retrieval

    docs = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        docs.append(documents.read(path.read_bytes(), path.name))
    return retrieval.rank(question, retrieval.passages(docs))


def cmd_summarize(args) -> None:
    """Summarize stdin or a file; a document past the context shows a progress bar per map round."""
    from service.tasks.summarize import summarize

    if args.file == "-":
        s = summarize(load(args), sys.stdin.read(), args.length, args.max_words, progress=_bars())
    else:
        from service.documents import read
        from service.tasks.document_summary import document_plan
        from service.tasks.plans import run_plan

        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        doc = read(path.read_bytes(), path.name)  # e-mail, Word, PowerPoint, Excel, PDF, HTML, text
        s = run_plan(gen := load(args), document_plan(gen, [doc], args.length, args.max_words), progress=_bars())
    data = {"summary": s.summary, "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens}
    data |= {"windows": s.windows, "rounds": s.rounds}
    if s.citations is not None:
        data["citations"] = s.citations
    _emit(args, data, s.summary)


def cmd_generate(args) -> None:
    from service.engine.sampling_params import SamplingParams

    gen = load(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        stop_token_ids=tuple(args.stop_token_id or ()),
        ignore_eos=args.ignore_eos,
    )
    ids = (
        gen.tokenizer.chat([{"role": "user", "content": args.prompt}])
        if args.chat
        else gen.tokenizer.encode(args.prompt)
    )
    stream = None if args.json else (lambda i, piece: print(piece, end="", flush=True))
    r = gen.generate([ids], [params], on_text=stream)[0]
    if args.json:
        print(
            json.dumps(
                {
                    "text": r.text,
                    "token_ids": r.token_ids,
                    "finish_reason": r.finish_reason,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                },
                ensure_ascii=False,
            )
        )
    else:
        print()


def cmd_score(args) -> None:
    gen = load(args)
    ids = gen.tokenizer.encode(args.text)
    logprobs = [None if t is None else t.logprob for t in gen.prompt_logprobs(ids)]
    tokens = gen.tokenizer.tokens(ids)
    if args.json:
        print(json.dumps({"tokens": tokens, "token_ids": ids, "logprobs": logprobs}, ensure_ascii=False))
        return
    for tok, i, lp in zip(tokens, ids, logprobs):
        print(f"{i:>8}  {'' if lp is None else f'{lp:9.4f}':>9}  {tok!r}")


def cmd_fetch(args) -> None:
    from model.registry import resolve

    print(resolve(args.name))


def cmd_models(args) -> None:
    from model.registry import cache_dir, converted_files

    rows = []
    for name, about in NAMES.items():
        ready = any(cache_dir().glob(f"{name}*/config.json"))
        rows.append({"name": name, "description": about, "cached": ready, "default": name == DEFAULT_MODEL})
    files = converted_files()
    if args.json:
        print(json.dumps({"models": rows, "converted_files": files, "cache": str(cache_dir())}))
        return
    for r in rows:
        flags = ", ".join(f for f, on in (("default", r["default"]), ("cached", r["cached"])) if on)
        print(f"{r['name']:<24} {r['description']}{f'  [{flags}]' if flags else ''}")
    for f in files:
        print(f"{f['file']}  [converted: {f['directory']}]")
    print("\nor any local Hugging Face directory (safetensors) or GGUF file (llama, qwen2, gpt2).")
    print(f"Cache: {cache_dir()}")


def replicas(args):
    """--replicas engine actors of --model, loaded as the command line says."""
    from service.jobs.cluster import Replicas

    gpus = str(args.device).startswith("cuda")
    return Replicas(args.model, load_options(args), args.replicas, args.replica_cpus, gpus, args.tp)
