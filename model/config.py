"""Model configuration: one frozen dataclass for both families, built from a Hugging Face
`config.json`, from GGUF metadata, or from a named preset. Totals only: a rank's share is computed
by the layers (`parallel.layers`), never written back here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ARCHS = ("llama", "gpt2")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" (Llama, Mistral, Qwen2, SmolLM) or "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False  # q/k/v bias (Qwen2); GPT-2 always has biases
    tie_word_embeddings: bool = True
    head_dim: int = 0  # 0: hidden_size // num_heads

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if self.arch == "gpt2" and self.num_kv_heads != self.num_heads:
            raise ValueError("GPT-2 has no grouped-query attention: num_kv_heads must equal num_heads")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face `config.json` (GPT-2 or a Llama-family model)."""
        model_type = cfg.get("model_type", "")
        if model_type == "gpt2":
            hidden = cfg["n_embd"]
            return cls(
                arch="gpt2",
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                num_layers=cfg["n_layer"],
                num_heads=cfg["n_head"],
                num_kv_heads=cfg["n_head"],
                intermediate_size=cfg.get("n_inner") or 4 * hidden,
                max_position=cfg["n_positions"],
                norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                attention_bias=True,
                tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            )
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported model_type {model_type!r}; supported: gpt2, llama, mistral, qwen2")
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {scaling} is not supported")
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", model_type == "mistral"):
            raise ValueError("sliding-window attention is not supported")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        return cls(
            arch="llama",
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            intermediate_size=cfg["intermediate_size"],
            max_position=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            head_dim=cfg.get("head_dim") or 0,
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> ModelConfig:
        """From GGUF key/value metadata (llama, qwen2 or gpt2 architecture), plus `vocab_rows`, the
        embedding's row count, and `tied`, whether the LM head is the embedding (no `output.weight` of
        its own, or one equal to it)."""
        arch = meta["general.architecture"]
        if arch not in ("llama", "qwen2", "gpt2"):  # model.gguf.ARCHITECTURES
            raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, gpt2)")
        heads = int(meta[f"{arch}.attention.head_count"])
        common = dict(
            vocab_size=int(meta["vocab_rows"]),
            hidden_size=int(meta[f"{arch}.embedding_length"]),
            num_layers=int(meta[f"{arch}.block_count"]),
            num_heads=heads,
            intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            max_position=int(meta[f"{arch}.context_length"]),
            tie_word_embeddings=bool(meta["tied"]),
        )
        if arch == "gpt2":
            eps = float(meta.get("gpt2.attention.layer_norm_epsilon", 1e-5))
            return cls(arch="gpt2", num_kv_heads=heads, norm_eps=eps, attention_bias=True, **common)
        return cls(
            arch="llama",
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            attention_bias=arch == "qwen2",
            **common,
        )

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` that `transformers` reads back as the same model."""
        if self.arch == "gpt2":
            return {
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "vocab_size": self.vocab_size,
                "n_embd": self.hidden_size,
                "n_layer": self.num_layers,
                "n_head": self.num_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_position,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": "gelu_new",
                "tie_word_embeddings": self.tie_word_embeddings,
            }
        qwen2 = self.attention_bias  # q/k/v bias without an output bias: Qwen2, not Llama's attention_bias
        return {
            "model_type": "qwen2" if qwen2 else "llama",
            "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "head_dim": self.head_dim,
            "attention_bias": self.attention_bias,
            "mlp_bias": False,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    def tp_sizes(self) -> list[int]:
        """Tensor-parallel sizes this model can be split into: heads divide evenly, KV heads divide or
        are replicated (tp a multiple of them), and the MLP width divides."""
        return [
            tp
            for tp in range(1, self.num_heads + 1)
            if self.num_heads % tp == 0
            and (self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0)
            and self.intermediate_size % tp == 0
        ]

    def check_tp(self, tp: int) -> None:
        if tp not in self.tp_sizes():
            raise ValueError(
                f"tensor-parallel size {tp} does not fit this model ({self.num_heads} heads, {self.num_kv_heads} "
                f"KV heads, MLP width {self.intermediate_size}); valid sizes: {', '.join(map(str, self.tp_sizes()))}"
            )


# Named shapes: the test model, the default model's shape, and a 1B Llama shape for benchmarks.
PRESETS: dict[str, ModelConfig] = {
    "tiny-random": ModelConfig(
        arch="llama",
        vocab_size=259,
        hidden_size=128,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=256,
        max_position=2048,
        norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": ModelConfig(
        arch="llama",
        vocab_size=49152,
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=1536,
        max_position=8192,
        norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama-400m": ModelConfig(  # 412M parameters: the sharded-loading benchmark's model
        arch="llama",
        vocab_size=49152,
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        num_kv_heads=4,
        intermediate_size=4096,
        max_position=4096,
        norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama-1b": ModelConfig(
        arch="llama",
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        max_position=8192,
        norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}
