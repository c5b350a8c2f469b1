"""The CPU levers of deit_jax.models.layers, one at a time: ``deit_jax.benchmark`` with some of
them replaced by flax's ``nn.Dense`` / ``nn.LayerNorm`` / ``nn.gelu(approximate=False)``.

    python benchmarks/cpu_levers.py --levers=none -- --mode=train --batch_size=256 ...
    python benchmarks/cpu_levers.py --levers=gelu,dense -- ...   (those two on, the rest flax's)

``--levers``: a comma list of ``gelu``, ``dense``, ``layernorm``, ``attention`` (the head-major
einsums of ``vit.Attention``; without it, ``jax.nn.dot_product_attention``), or ``all`` /
``none``; ``+`` separates levers as a comma does (``--levers=gelu+dense``, for
benchmarks/train_side_by_side.py's comma list of variants). The arguments after ``--`` go to
``python -m deit_jax.benchmark``; its JSON line is printed with a ``levers`` field added. Run
each variant in its own process, alternating (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LEVERS = ("gelu", "dense", "layernorm", "attention")


def patch(levers: set[str]) -> None:
    """Replaces each lever not in ``levers`` by flax's module (same parameters and names)."""
    import flax.linen as nn

    from deit_jax.models import layers, vit

    if "gelu" not in levers:
        layers.gelu = lambda x: nn.gelu(x, approximate=False)
    if "dense" not in levers:
        vit._dense = lambda features, dtype, name: nn.Dense(
            features, dtype=dtype, kernel_init=vit._init_02, bias_init=nn.initializers.zeros,
            name=name)
    if "layernorm" not in levers:
        vit._layer_norm = lambda dtype, name: nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)
    if "attention" not in levers:
        # jax.nn.dot_product_attention's XLA implementation in [batch, tokens, heads, head_dim]
        # (what attention_impl=None ran before the head-major einsums).
        class Fused(vit.Attention):
            def __post_init__(self):
                if self.attention_impl is None:
                    object.__setattr__(self, "attention_impl", "xla")
                super().__post_init__()

        vit.Attention = Fused


def main() -> None:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levers", default="all")
    a = p.parse_args(own)
    named = set(a.levers.replace("+", ",").split(","))
    levers = {"all": set(LEVERS), "none": set()}.get(a.levers, named)
    unknown = levers - set(LEVERS)
    if unknown:
        raise SystemExit(f"unknown --levers {sorted(unknown)}; choose from {LEVERS}")
    patch(levers)
    import contextlib
    import io

    from deit_jax import benchmark

    with contextlib.redirect_stdout(io.StringIO()):
        result = benchmark.main(rest)
    result["levers"] = ",".join(sorted(levers)) or "none"
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
