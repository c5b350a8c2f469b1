"""What the distillation token does: the figures of the paper's section 5, for one model.

    python -m deit_jax.analyze --config=configs/quickstart.py:student \\
        --workdir=workdirs/quickstart/student --teacher_init=workdirs/quickstart/teacher \\
        --out=workdirs/quickstart/analysis
    python -m deit_jax.analyze --config=configs/deit_b.py:distill=hard \\
        --checkpoint=ckpt/deit_b_dist --max_examples=5000 --out=analysis_b   # converted weights

On the config's evaluation split (the same exact eval pipeline as training) it measures:

* the cosine between the cls and dist token embeddings entering the first block (layer 0) and
  leaving each block (layers 1..depth), mean and std over the images (paper: 0.06 for the
  learned tokens, rising to 0.93 after the last layer);
* the cosine of the learned ``cls_token`` and ``dist_token`` parameters themselves;
* top-1 of the cls head, the dist head and the fusion ``(cls + dist) / 2`` (paper Table 3);
* with a teacher (``--teacher_init``, the config's ``distillation.teacher`` model): its top-1
  and each head's agreement with it (the paper's disagreement analysis);
* attention of the cls and dist tokens over the patches in the last layer and as an attention
  rollout (Abnar & Zuidema 2020: heads averaged, identity added, rows renormalised, layers
  multiplied), for the first ``--num_maps`` images.

Writes ``analysis.json`` and PNG plots (matplotlib) to ``--out`` and prints a short table.
A model without a dist token gets the head accuracy, agreement and cls maps only.
"""

from __future__ import annotations

import json
import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402

from deit_jax import input_pipeline, models, pretrained  # noqa: E402

HEADS = ("cls", "dist", "fused")


# ------------------------------------------------------------------------------ the figures


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity over the last axis: ``[..., dim], [..., dim] -> [...]``."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norm = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.sum(a * b, axis=-1) / jnp.maximum(norm, 1e-12)


def attention_rollout(attention: jax.Array) -> jax.Array:
    """Attention rollout: ``[layers, batch, heads, n, n] -> [batch, n, n]``.

    Per layer the heads are averaged, the identity (the residual path) added and the rows
    renormalised; the layers' matrices are multiplied from the first to the last.
    """
    n = attention.shape[-1]
    a = attention.mean(axis=2) + jnp.eye(n)
    a = a / a.sum(axis=-1, keepdims=True)
    out = a[0]
    for layer in a[1:]:
        out = jnp.einsum("bij,bjk->bik", layer, out)
    return out


def forward(model, variables: dict, images: jax.Array) -> dict[str, jax.Array]:
    """One batch through a DeiT with its intermediates; returns per-image figures.

    ``images`` ``[batch, H, W, 3]``. Returns ``cls``/``dist``/``fused`` logits ``[batch,
    classes]`` (``dist``/``fused`` only for distilled models), ``cosine`` ``[depth + 1,
    batch]`` (cls vs dist embedding per layer; distilled only), and the cls (and dist) rows of
    the last layer's head-averaged attention and of the rollout over the patches, ``last_attn``
    and ``rollout`` ``[batch, prefix, patches]``.
    """
    out, state = model.apply(variables, images, train=False, both_heads=True,
                             mutable=["intermediates"])
    inter = flax.core.unfreeze(state["intermediates"])
    tokens = jnp.stack(inter["tokens"])  # [depth + 1, batch, n, dim]
    attention = jnp.stack([inter[f"blocks_{i}"]["attn"]["attention"][0]
                           for i in range(model.depth)])  # [depth, batch, heads, n, n]
    prefix = model.num_prefix_tokens
    result = {"last_attn": attention[-1].mean(axis=1)[:, :prefix, prefix:],
              "rollout": attention_rollout(attention)[:, :prefix, prefix:]}
    if models.is_distilled(model):
        cls_logits, dist_logits = out
        result.update(cls=cls_logits, dist=dist_logits, fused=(cls_logits + dist_logits) / 2,
                      cosine=cosine(tokens[:, :, 0], tokens[:, :, 1]))
    else:
        result["cls"] = out
    return result


def head_counts(outputs: dict[str, jax.Array], labels: jax.Array, mask: jax.Array,
                teacher_logits: jax.Array | None = None) -> dict[str, float]:
    """Correct counts of each head (``top1_<head>``), agreement counts with the teacher's
    argmax (``agree_<head>``) and the teacher's own (``top1_teacher``), and ``count``.

    ``outputs`` maps head names to logits ``[batch, classes]``; ``labels`` int ``[batch]``;
    ``mask`` ``[batch]`` (1 = real example, 0 = padding).
    """
    mask = np.asarray(mask, np.float64)
    labels = np.asarray(labels)
    counts = {"count": float(mask.sum())}
    teacher_pred = None if teacher_logits is None else np.asarray(teacher_logits).argmax(-1)
    if teacher_pred is not None:
        counts["top1_teacher"] = float(((teacher_pred == labels) * mask).sum())
    for head, logits in outputs.items():
        pred = np.asarray(logits).argmax(-1)
        counts[f"top1_{head}"] = float(((pred == labels) * mask).sum())
        if teacher_pred is not None:
            counts[f"agree_{head}"] = float(((pred == teacher_pred) * mask).sum())
    return counts


def analyze(model, variables: dict, batches, *, teacher=None, teacher_variables=None,
            max_examples: int = 0, num_maps: int = 4) -> dict[str, Any]:
    """Runs the figures over ``batches`` (dicts with ``image`` ``[batch, H, W, 3]``, ``label``
    and ``mask`` ``[batch]``). Returns a JSON-able dict of figures plus ``maps``:
    numpy arrays of the first ``num_maps`` images, their attention rows and labels."""
    fwd = jax.jit(lambda v, x: forward(model, v, x))
    t_fwd = None if teacher is None else jax.jit(
        lambda v, x: teacher.apply(v, x, train=False))
    totals: dict[str, float] = {}
    cos_sum = cos_sq = None
    maps: dict[str, list] = {"image": [], "label": [], "last_attn": [], "rollout": []}
    seen = 0
    for batch in batches:
        batch = {k: np.asarray(v) for k, v in batch.items()}
        mask = batch["mask"].astype(np.float64)
        if max_examples:
            mask = mask * (seen + np.cumsum(mask) <= max_examples)
        if not mask.any():
            break
        out = jax.device_get(fwd(variables, batch["image"]))
        t_logits = None if t_fwd is None else jax.device_get(t_fwd(teacher_variables,
                                                                   batch["image"]))
        heads = {h: out[h] for h in HEADS if h in out}
        for k, v in head_counts(heads, batch["label"], mask, t_logits).items():
            totals[k] = totals.get(k, 0.0) + v
        if "cosine" in out:
            c = np.asarray(out["cosine"], np.float64)  # [layers, batch]
            s, sq = (c * mask).sum(1), (c * c * mask).sum(1)
            cos_sum = s if cos_sum is None else cos_sum + s
            cos_sq = sq if cos_sq is None else cos_sq + sq
        take = np.flatnonzero(mask)[:max(0, num_maps - len(maps["label"]))]
        for k, src in (("image", batch["image"]), ("label", batch["label"]),
                       ("last_attn", out["last_attn"]), ("rollout", out["rollout"])):
            maps[k].extend(np.asarray(src)[take])
        seen += int(mask.sum())
        if max_examples and seen >= max_examples:
            break
    count = totals.pop("count", 0.0)
    if not count:
        raise ValueError("the evaluation split gave no examples")
    figures: dict[str, Any] = {"num_examples": int(count)}
    figures["top1"] = {k[5:]: 100.0 * v / count for k, v in totals.items()
                       if k.startswith("top1_")}
    agree = {k[6:]: 100.0 * v / count for k, v in totals.items() if k.startswith("agree_")}
    if agree:
        figures["agreement_with_teacher"] = agree
    params = variables["params"]
    if cos_sum is not None:
        mean = cos_sum / count
        figures["cls_dist_cosine"] = {
            "layers": ["input"] + [f"block_{i + 1}" for i in range(len(mean) - 1)],
            "mean": mean.tolist(),
            "std": np.sqrt(np.maximum(cos_sq / count - mean**2, 0.0)).tolist()}
        figures["learned_token_cosine"] = float(cosine(params["cls_token"].reshape(-1),
                                                       params["dist_token"].reshape(-1)))
    figures["maps"] = {k: np.stack(v) if v else np.zeros((0,)) for k, v in maps.items()}
    return figures


# --------------------------------------------------------------------------- table and plots


def format_table(figures: dict[str, Any]) -> str:
    """A short text table of ``analyze``'s figures."""
    lines = [f"{figures['num_examples']} evaluation images", "| figure | value |", "|---|---|"]
    for head, v in figures["top1"].items():
        lines.append(f"| top-1 {head} | {v:.2f} |")
    for head, v in figures.get("agreement_with_teacher", {}).items():
        lines.append(f"| agreement with teacher, {head} | {v:.2f} |")
    if "learned_token_cosine" in figures:
        lines.append(f"| cosine of the learned cls/dist tokens | "
                     f"{figures['learned_token_cosine']:.3f} |")
        cos = figures["cls_dist_cosine"]
        for name, m, s in zip(cos["layers"], cos["mean"], cos["std"], strict=True):
            lines.append(f"| cls/dist cosine, {name} | {m:.3f} +- {s:.3f} |")
    return "\n".join(lines)


def write_plots(figures: dict[str, Any], out_dir: str) -> list[str]:
    """PNGs: the per-layer cosine (distilled models) and the attention maps; returns paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    if "cls_dist_cosine" in figures:
        cos = figures["cls_dist_cosine"]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        x = np.arange(len(cos["mean"]))
        ax.errorbar(x, cos["mean"], yerr=cos["std"], marker="o", capsize=3)
        ax.set_xticks(x, ["in"] + [str(i) for i in x[1:]])
        ax.set_xlabel("layer (input, then after each block)")
        ax.set_ylabel("cosine(cls, dist)")
        ax.set_title(f"learned tokens: cos {figures['learned_token_cosine']:.2f}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "cls_dist_cosine.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    maps = figures["maps"]
    n = len(maps["label"])
    if n:
        prefix = maps["rollout"].shape[1]
        side = int(round(np.sqrt(maps["rollout"].shape[2])))
        names = ["cls", "dist"][:prefix]
        cols = 1 + 2 * prefix
        fig, axes = plt.subplots(n, cols, figsize=(1.8 * cols, 1.8 * n), squeeze=False)
        for i in range(n):
            image = maps["image"][i]
            axes[i, 0].imshow((image - image.min()) / max(np.ptp(image), 1e-6))
            axes[i, 0].set_title(f"label {int(maps['label'][i])}", fontsize=8)
            for t, name in enumerate(names):
                for j, kind in enumerate(("last_attn", "rollout")):
                    ax = axes[i, 1 + 2 * t + j]
                    ax.imshow(maps[kind][i, t].reshape(side, side), cmap="viridis")
                    ax.set_title(f"{name} {'last' if j == 0 else 'rollout'}", fontsize=8)
        for ax in axes.flat:
            ax.set_axis_off()
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "attention_maps.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def to_json(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures without the arrays of the maps (those go to the plots)."""
    out = {k: v for k, v in figures.items() if k != "maps"}
    out["maps"] = {"num_images": len(figures["maps"]["label"]),
                   "labels": [int(x) for x in figures["maps"]["label"]]}
    return out


# ------------------------------------------------------------------------------- the command


def load_teacher(config: ml_collections.ConfigDict, teacher_init: str, num_classes: int,
                 image_size: int):
    """The teacher ``config.distillation.teacher`` with the variables of ``teacher_init``."""
    name = config.distillation.teacher
    overrides = {"num_classes": num_classes}
    if models.is_deit(name):
        overrides["img_size"] = image_size
    model = models.create_model(name, **overrides)
    variables = pretrained.load(teacher_init)
    return model, variables


def run(config: ml_collections.ConfigDict, *, weights: str, out_dir: str = "",
        teacher_init: str = "", max_examples: int = 0, num_maps: int = 4) -> dict[str, Any]:
    """Loads the model of ``config`` with the variables at ``weights`` (a training workdir or
    a converted checkpoint), analyses the eval split; writes JSON and plots when ``out_dir``."""
    if not models.is_deit(config.model.name):
        raise ValueError(f"analyze needs a DeiT model; the config's is {config.model.name}")
    image_size = models.image_size(config)
    source = input_pipeline.get_source(config, "eval", image_size)
    model, _ = models.from_config(config, source.num_classes)
    variables = {"params": pretrained.load(weights)["params"]}
    shapes = models.variable_shapes(model, image_size)["params"]
    got = jax.tree.map(np.shape, variables["params"])
    if jax.tree.map(lambda s: s.shape, shapes) != got:
        raise ValueError(f"the variables in {weights} do not fit {config.model.name} as "
                         "configured; pass the config the model was trained with")
    teacher = teacher_vars = None
    if teacher_init:
        teacher, teacher_vars = load_teacher(config, teacher_init, source.num_classes, image_size)
    layout = input_pipeline.Layout(global_batch=config.eval_batch_size, process_index=0,
                                   process_count=1, local_devices=1)
    # One device: drop the leading device axis ([1, batch, ...] -> [batch, ...]).
    batches = ({k: v[0] for k, v in b.items()} for b in input_pipeline.eval_batches(
        config, source, layout, image_size=image_size, batch_size=config.eval_batch_size))
    figures = analyze(model, variables, batches, teacher=teacher, teacher_variables=teacher_vars,
                      max_examples=max_examples, num_maps=num_maps)
    if out_dir:
        figures["plots"] = write_plots(figures, out_dir)
        with open(os.path.join(out_dir, "analysis.json"), "w") as f:
            json.dump(to_json(figures), f, indent=1)
    return figures


def main(argv):
    del argv
    from absl import flags

    from deit_jax import train

    FLAGS = flags.FLAGS
    if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
        raise app.UsageError("give exactly one of --workdir (a training run) or --checkpoint "
                             "(a converted checkpoint)")
    train.quiet_library_logs()
    config = FLAGS.config
    teacher_init = FLAGS.teacher_init or (config.distillation.teacher_init
                                          if config.distillation.kind in ("soft", "hard") else "")
    figures = run(config, weights=FLAGS.workdir or FLAGS.checkpoint, out_dir=FLAGS.out,
                  teacher_init=teacher_init, max_examples=FLAGS.max_examples,
                  num_maps=FLAGS.num_maps)
    print(format_table(figures), flush=True)
    if FLAGS.out:
        print(f"wrote {FLAGS.out}/analysis.json and {', '.join(figures['plots'])}")


def console() -> None:
    """The console entry point ``deit-analyze`` (= ``python -m deit_jax.analyze``)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "The model's config (as trained).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "", "A training workdir (its latest checkpoint).")
    flags.DEFINE_string("checkpoint", "", "A converted checkpoint (python -m deit_jax.convert).")
    flags.DEFINE_string("teacher_init", "", "Teacher variables (the config's "
                        "distillation.teacher model); default: the config's teacher_init.")
    flags.DEFINE_string("out", "", "Folder for analysis.json and the PNG plots.")
    flags.DEFINE_integer("max_examples", 0, "Analyse at most this many eval images (0: all).")
    flags.DEFINE_integer("num_maps", 4, "Images whose attention maps are plotted.")
    flags.mark_flags_as_required(["config"])
    from deit_jax import cli

    cli.run(main)


if __name__ == "__main__":
    console()
