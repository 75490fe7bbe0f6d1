"""`nlg`: the command line. Every subcommand takes `--model NAME_OR_PATH`; those whose output is
data take `--json`. The commands themselves are in `service.cli.commands`, `serving`, `batch` and
`measure`. Flags that vLLM names otherwise also answer to vLLM's name (`--tensor-parallel-size`,
`--max-model-len`, `--max-num-seqs`), and every `--help` shows each option's default."""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

from model.config import PRESETS
from model.registry import DEFAULT_MODEL, NAMES
from parallel.forms import QUANTIZATIONS
from service.cli import batch, commands, measure, serving
from service.engine.memory import CPU_SHARE, GPU_SHARE, memory_size


class Defaults(argparse.HelpFormatter):
    """Help that ends with the option's default, unless the help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a model name ({', '.join(NAMES)}) or a local Hugging Face directory (default: {DEFAULT_MODEL})",
    )
    common.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu); with --tp, rank i uses cuda:i")
    common.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weights and KV cache (default: float32 on CPUs, bfloat16 on CUDA, float16 on CUDA cards without "
        "bf16; bfloat16 also batches faster on CPUs with AMX)",
    )
    common.add_argument(
        "--tp", "--tensor-parallel-size", type=int, default=1, metavar="N", help="split the model over N local ranks"
    )
    common.add_argument(
        "--context",
        "--max-model-len",
        type=int,
        metavar="N",
        help="tokens per sequence, prompt plus output (default: the model's context); with --slots it sizes the "
        "KV cache",
    )
    common.add_argument(
        "--kv-cache-memory",
        type=memory_size,
        metavar="SIZE",
        help="bytes of KV cache per rank, e.g. 2GiB or 512MB (default: what --slots sequences of --context tokens "
        f"need, at most {CPU_SHARE * 100:.0f}%% of the machine's memory on CPUs and {GPU_SHARE * 100:.0f}%% of what is "
        "free after "
        "the weights on CUDA); start-up prints how many tokens it holds",
    )
    common.add_argument(
        "--no-prefix-caching",
        "--no-enable-prefix-caching",
        action="store_true",
        help="compute every prompt anew instead of reusing the KV cache blocks of earlier prompts' shared "
        "prefixes (then no request's latency depends on another's prompt)",
    )
    common.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="N",
        help="speculative decoding from the prompt: verify up to N tokens that followed the last earlier "
        "occurrence of a sequence's final words, in one forward, when every decoding sequence is greedy "
        "(the same output in fewer steps; default 5 on CPUs, off with CUDA graphs; 0: off)",
    )
    common.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a Jinja chat template to use instead of the model's (e.g. one that writes tools, for tool calls)",
    )
    common.add_argument(
        "--quantize",
        choices=list(QUANTIZATIONS),
        default="auto",
        help="auto (default): a checkpoint stored quantized (a GGUF file's blocks, as the named models are) runs "
        "int4 on a CPU, anything else as loaded; or quantize the linear layers' weights after loading: int8 in "
        "blocks of 32 as GGUF's Q8_0 (a quarter of their fp32 bytes), int4 in groups of 32 (an eighth), on CPU "
        "our own kernels (built once on first use; without a C++ compiler int8 per row through FBGEMM); a GGUF's "
        "5-8 bit tensors stay as stored; the LM head is int8 at most. See README",
    )
    common.add_argument(
        "--compile",
        action="store_true",
        help="CUDA: torch.compile the decode step the CUDA graphs record (minutes of compiling: `serve` does it "
        "before /ready turns 200, other commands at their first steps)",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print one JSON object")

    p = argparse.ArgumentParser(
        prog="nlg",
        description="Full-sentence answers and abstractive summaries from a decoder-only transformer.",
        formatter_class=Defaults,
    )
    sub = p.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=partial(argparse.ArgumentParser, formatter_class=Defaults),
    )

    a = sub.add_parser("answer", parents=[common, as_json], help="answer a question in one full sentence")
    a.add_argument("question")
    a.add_argument("--passage", action="append", metavar="TEXT", help="a context passage (repeatable)")
    a.add_argument(
        "--file",
        action="append",
        metavar="FILE",
        help="a document to answer from (repeatable): .eml, .docx, .pptx, .xlsx, .pdf, .html, .txt, ...; its "
        "passages best ranked for the question are used, and the answer cites file, part and characters",
    )
    a.add_argument("--max-tokens", type=int, default=80, help="tokens the answer may take")
    a.set_defaults(run=commands.cmd_answer)

    s = sub.add_parser("summarize", parents=[common, as_json], help="summarize a document (file or stdin)")
    s.add_argument(
        "file",
        nargs="?",
        default="-",
        help="a document: .eml, .docx, .pptx, .xlsx, .pdf, .html, .txt, .md, ... (type from the content and the "
        "extension; a deck is summarized with its slide labels, a workbook with its sheet names), or - for UTF-8 "
        "text on stdin (default)",
    )
    s.add_argument("--length", choices=["short", "medium", "long"], default="medium", help="summary length")
    s.add_argument("--max-words", type=int, help="at most this many words (overrides --length)")
    s.set_defaults(run=commands.cmd_summarize)

    g = sub.add_parser("generate", parents=[common, as_json], help="continue a prompt (streams to stdout)")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this mass")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty on seen tokens")
    g.add_argument("--seed", type=int, help="the same seed gives the same sample")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable; not returned)")
    g.add_argument("--stop-token-id", action="append", type=int, metavar="ID", help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-turn tokens")
    g.set_defaults(run=commands.cmd_generate)

    c = sub.add_parser("score", parents=[common, as_json], help="per-token log-probabilities of a text")
    c.add_argument("text")
    c.set_defaults(run=commands.cmd_score)

    m = sub.add_parser("models", parents=[as_json], help="list the named models")
    m.set_defaults(run=commands.cmd_models)

    v = sub.add_parser("serve", parents=[common], help="run the HTTP service")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    v.add_argument("--port", type=int, default=8000, help="port to listen on")
    v.add_argument(
        "--api-key",
        action="append",
        help="require 'Authorization: Bearer KEY' on /v1 routes; repeat for several keys (or set NLG_API_KEY, "
        "keys separated by commas)",
    )
    v.add_argument("--api-key-file", metavar="FILE", help="more keys, one per line ('#' starts a comment)")
    v.add_argument(
        "--allowed-origins",
        action="append",
        metavar="ORIGINS",
        help="browser origins allowed to call the API (CORS), separated by commas or repeated; '*': any "
        "(default: none)",
    )
    v.add_argument(
        "--slots",
        "--max-num-seqs",
        type=int,
        default=16,
        help="sequences decoded together at most (they share the KV cache: see --kv-cache-memory; default 16)",
    )
    v.add_argument(
        "--served-model-name",
        metavar="NAME",
        help='the name clients send as "model" and /v1/models lists (default: the --model argument)',
    )
    v.add_argument("--max-waiting", type=int, default=64, help="queued sequences before 429 (default 64)")
    v.add_argument("--request-timeout", type=float, default=600, help="seconds before a request gets 504")
    v.add_argument(
        "--score-traffic",
        action="store_true",
        help="score every answer (sentence, support) and summary (support, novelty) into the Prometheus "
        "histogram nlg_quality_score",
    )
    v.add_argument("--jobs-db", help="SQLite file of batch jobs (default: jobs.sqlite in the model cache)")
    add_ray(v, "--replicas engine replicas on a Ray cluster behind one ingress (Ray Serve, the ray extra):")
    v.add_argument(
        "--routing",
        choices=["prefix", "round-robin"],
        default="prefix",
        help="--ray: a request goes to the replica that served its prompt's leading text last (prefix, the "
        "default: its prefix cache is warm) or to each replica in turn",
    )
    v.set_defaults(run=serving.cmd_serve)

    b = sub.add_parser(
        "bench",
        parents=[common, as_json],
        help="our engine vs transformers generate(), same run",
        description="Our engine vs transformers generate() on the same weights, in one run. With --tp N: the "
        "same model at every valid tensor-parallel size up to N, each in fresh processes (per-rank peak RSS "
        "after loading, decode tokens/s). With --device cuda: random weights of the SmolLM2-135M and 1B Llama "
        "shapes, bf16, single-stream and batch-32, CUDA graphs on and off, and the card's copy bandwidth.",
    )
    b.add_argument(
        "target",
        nargs="?",
        choices=["engine", "serve", "batch", "replicas"],
        default="engine",
        help="engine (default); serve: concurrent HTTP clients vs one at a time; batch: `nlg batch` on one machine vs "
        "on a local Ray cluster with 1 and 2 replicas (the ray extra); replicas: `nlg serve --ray` on a local "
        "cluster, prefix routing vs round robin, 1 vs 2 replicas, the ingress's cost per request",
    )
    b.add_argument("--data", help="bench batch: JSONL of {document} records (e.g. DialogSum's dev.jsonl)")
    b.add_argument("--limit", type=int, default=64, help="bench batch: the first N records (default 64)")
    b.add_argument("--clients", type=int, default=16, help="bench serve, replicas: concurrent clients (default 16)")
    b.add_argument("--tokens", type=int, default=64, help="tokens generated per sequence (default 64)")
    b.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    b.add_argument(
        "--no-peers",
        action="store_true",
        help="skip the other engines installed (llama.cpp, CTranslate2, ONNX Runtime GenAI: the bench extra)",
    )
    b.add_argument("--save", metavar="FILE", help="--device cuda: also write the JSON report to FILE, shape by shape")
    b.set_defaults(run=measure.cmd_bench)
    j = sub.add_parser(
        "batch",
        parents=[common],
        help="summarize or answer every line of a JSONL file, or a folder of documents (resumable)",
    )
    j.add_argument("task", choices=["summarize", "answer"])
    j.add_argument(
        "input",
        help="JSONL: {document, length?, max_words?} or {question, passages?}, optional id; or, to summarize, a folder "
        "or a quoted glob of documents ('mail/*.eml'), each result keyed by its file name",
    )
    j.add_argument("-o", "--output", required=True, help="results JSONL (appended; a rerun resumes)")
    j.add_argument("--workers", type=int, default=8, help="records in flight, batched by the engine (default 8)")
    j.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray(
        j,
        "run on a Ray cluster (the ray extra); INPUT is then JSONL (a file, a folder of *.jsonl or a quoted glob), "
        "results come back as shards merged into OUTPUT at the end, each record once across reruns: ADDRESS",
    )
    j.set_defaults(run=batch.cmd_batch)

    e = sub.add_parser("eval", parents=[common, as_json], help="run a task over a data set and score it")
    e.add_argument("task", choices=["summarize", "qa", "lambada", "wikitext"])
    e.add_argument(
        "--data",
        required=True,
        help="JSONL: {id, document, summary} (summarize), {id, question, context, answers} (qa), {text} (lambada); "
        "a text file (wikitext)",
    )
    e.add_argument("--limit", type=int, help="only the first N examples (wikitext: the first N tokens)")
    e.add_argument(
        "--retrieve",
        action="store_true",
        help="qa: answer each question from the passages ranked best among every example's context pooled (BM25, "
        "fused with dense embeddings where installed), not from its own; adds retrieved_gold",
    )
    e.add_argument(
        "--other-passages",
        metavar="FILE",
        help="qa: ask each question of another article's passage (FILE's JSONL records, context or document, none "
        "holding its answer) instead of its own; a right answer says the passage does not answer (abstained)",
    )
    e.add_argument("--out", default="eval-out", help="directory for report.json, report.md, scores.png")
    e.add_argument("--length", choices=["short", "medium", "long"], default="medium", help="summary length")
    e.add_argument("--workers", type=int, default=8, help="examples in flight, batched by the engine")
    e.add_argument("--window", type=int, default=2048, help="wikitext: tokens per window (default 2048)")
    e.add_argument("--stride", type=int, help="wikitext: tokens between window starts (default window - 1)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(run=measure.cmd_eval)

    f = sub.add_parser("fetch", help="fetch and convert a named model into the cache now (images do it at build)")
    f.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"a model name (default: {DEFAULT_MODEL})")
    f.set_defaults(run=commands.cmd_fetch)

    r = sub.add_parser("make-random", help="write a random-weight model directory of a named shape")
    r.add_argument("out", help="directory to write (config.json, model.safetensors, tokenizer)")
    r.add_argument("--preset", default="llama-400m", choices=sorted(PRESETS), help="shape (default llama-400m)")
    r.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    r.set_defaults(run=measure.cmd_make_random)
    return p


def add_ray(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help=f"{what} `auto`, `ray://HOST:10001` or HOST:6379; none starts a local cluster",
    )
    parser.add_argument("--replicas", type=int, default=1, metavar="N", help="--ray: engine replicas (default 1)")
    parser.add_argument(
        "--replica-cpus",
        type=float,
        metavar="N",
        help="--ray: CPU cores reserved per replica, its torch threads (default: the cluster's cores / replicas)",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    on_ray = args.command in ("batch", "serve") and args.ray  # then each replica starts its own ranks (`jobs.ranks`)
    if (
        args.command != "bench"
        and not on_ray
        and (getattr(args, "tp", 1) > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1)
    ):
        from service.cli.launcher import run_tensor_parallel

        return run_tensor_parallel(args)
    return commands.run(args)


if __name__ == "__main__":
    sys.exit(main())
