"""The one table of workloads: leaf shapes of flat and model-shaped trees.

`verify` runs on `transformer-tiny` by default, `bench` on flat leaves and the
larger models; the tests take their model-shaped trees from here too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

Shapes = dict[str, tuple[int, ...]]


def flat(size: int) -> Shapes:
    return {"w": (size,)}


def transformer_tiny() -> Shapes:
    """A two-layer transformer, d_model 64, vocab 1000, biases and norm
    scales, and a scalar (19 leaves, 172,585 parameters)."""
    shapes = {
        "embed": (1000, 64),
        "position": (128, 64),
        "final_norm.scale": (64,),
        "head.bias": (1000,),
        "temperature": (),
    }
    for layer in range(2):
        shapes |= {
            f"layer{layer}.norm.scale": (64,),
            f"layer{layer}.attention.qkv": (64, 192),
            f"layer{layer}.attention.qkv_bias": (192,),
            f"layer{layer}.attention.out": (64, 64),
            f"layer{layer}.mlp.up": (64, 256),
            f"layer{layer}.mlp.up_bias": (256,),
            f"layer{layer}.mlp.down": (256, 64),
        }
    return shapes


def gpt2_small() -> Shapes:
    """GPT-2 small's leaves (124M parameters, 148 leaves; tied embedding)."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    shapes = {"wte": (vocab, d), "wpe": (context, d), "ln_f.g": (d,), "ln_f.b": (d,)}
    for i in range(layers):
        shapes |= {
            f"h{i}.ln_1.g": (d,),
            f"h{i}.ln_1.b": (d,),
            f"h{i}.attn.c_attn.w": (d, 3 * d),
            f"h{i}.attn.c_attn.b": (3 * d,),
            f"h{i}.attn.c_proj.w": (d, d),
            f"h{i}.attn.c_proj.b": (d,),
            f"h{i}.ln_2.g": (d,),
            f"h{i}.ln_2.b": (d,),
            f"h{i}.mlp.c_fc.w": (d, 4 * d),
            f"h{i}.mlp.c_fc.b": (4 * d,),
            f"h{i}.mlp.c_proj.w": (4 * d, d),
            f"h{i}.mlp.c_proj.b": (d,),
        }
    return shapes


def llama_small() -> Shapes:
    """A Llama-shaped model scaled to fit a CPU host: d_model 512, 8 layers,
    SwiGLU width 1408, vocab 32000, untied head (58.5M parameters, 75 leaves)."""
    d, ffn, vocab, layers = 512, 1408, 32000, 8
    shapes = {"embed": (vocab, d), "norm": (d,), "lm_head": (d, vocab)}
    for i in range(layers):
        shapes |= {
            f"layers{i}.attention_norm": (d,),
            f"layers{i}.wq": (d, d),
            f"layers{i}.wk": (d, d),
            f"layers{i}.wv": (d, d),
            f"layers{i}.wo": (d, d),
            f"layers{i}.ffn_norm": (d,),
            f"layers{i}.w1": (d, ffn),
            f"layers{i}.w3": (d, ffn),
            f"layers{i}.w2": (ffn, d),
        }
    return shapes


MODELS: dict[str, Callable[[], Shapes]] = {
    "transformer-tiny": transformer_tiny,
    "gpt2-small": gpt2_small,
    "llama-small": llama_small,
}

# What `bench` measures by default.
BENCH_SIZES = "1M,4M,16M"
BENCH_MODELS = "gpt2-small,llama-small"


def parse_size(text: str) -> int:
    """'4M' -> 4 * 2**20, '64K' -> 65536, '1000' -> 1000."""
    match = re.fullmatch(r"\s*(\d+)\s*([KkMmGg]?)\s*", text)
    if not match or int(match[1]) == 0:
        raise ValueError(f"size {text!r} is not a positive count like 4M, 64K or 1000")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[match[2].lower()]


def size_label(size: int) -> str:
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def parse_workloads(sizes: str, models: str) -> dict[str, Shapes]:
    """`workloads` from comma-separated text ('' for none), e.g. "1M,64K"."""
    return workloads(
        [parse_size(s) for s in sizes.split(",") if s.strip()],
        [m.strip() for m in models.split(",") if m.strip()],
    )


def workloads(sizes: Iterable[int], models: Iterable[str]) -> dict[str, Shapes]:
    """{name: shapes}: flat leaves of each size, then the named model trees."""
    chosen = {f"flat-{size_label(s)}": flat(s) for s in sizes}
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        chosen[name] = MODELS[name]()
    return chosen
