"""deit_jax.analyze against hand computations on a tiny DeiT; the cls2 ablation's model and loss."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deit_jax import analyze, losses, models

TINY = dict(num_classes=3, img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2)


def _tiny(distilled=True):
    model = models.create_model("deit_tiny_distilled_patch16_224" if distilled
                                else "deit_tiny_patch16_224", **TINY)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    return model, flax.core.unfreeze(variables)


def test_cosine_of_known_vectors():
    a = jnp.array([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 3.0, 4.0]])
    b = jnp.array([[1.0, 1.0, 0.0], [-2.0, -4.0, -6.0], [0.0, 3.0, 4.0]])
    np.testing.assert_allclose(analyze.cosine(a, b), [1 / np.sqrt(2), -1.0, 1.0], rtol=1e-6)


def test_rollout_of_uniform_then_identity_attention():
    n = 3
    uniform = jnp.full((1, 1, 2, n, n), 1.0 / n)  # [layers, batch, heads, n, n]
    # One layer: (U + I) normalised = U/2 + I/2.
    expected = 0.5 * np.full((n, n), 1 / n) + 0.5 * np.eye(n)
    np.testing.assert_allclose(analyze.attention_rollout(uniform)[0], expected, rtol=1e-6)
    # An identity layer after it changes nothing ((I + I) / 2 = I).
    eye = jnp.broadcast_to(jnp.eye(n), (1, 1, 2, n, n))
    both = jnp.concatenate([uniform, eye])
    np.testing.assert_allclose(analyze.attention_rollout(both)[0], expected, rtol=1e-6)


def test_head_counts_on_a_fixed_batch():
    # 4 examples, the last one padding; labels 0, 1, 2, (2).
    cls = np.array([[5, 0, 0], [0, 5, 0], [5, 0, 0], [0, 0, 5]], np.float32)  # 0 1 0 2
    dist = np.array([[0, 5, 0], [0, 5, 0], [0, 0, 5], [0, 0, 5]], np.float32)  # 1 1 2 2
    teacher = np.array([[0, 9, 0], [0, 9, 0], [9, 0, 0], [0, 0, 9]], np.float32)  # 1 1 0 2
    labels, mask = np.array([0, 1, 2, 2]), np.array([1, 1, 1, 0], np.float32)
    counts = analyze.head_counts({"cls": cls, "dist": dist, "fused": (cls + dist) / 2}, labels,
                                 mask, teacher)
    # fused: [2.5,2.5,0] (tie -> argmax 0), [0,5,0] -> 1, [2.5,0,2.5] -> 0.
    assert counts == {"count": 3.0, "top1_teacher": 1.0, "top1_cls": 2.0, "agree_cls": 2.0,
                      "top1_dist": 2.0, "agree_dist": 2.0, "top1_fused": 2.0,
                      "agree_fused": 2.0}


def test_intermediates_leave_the_outputs_and_params_unchanged():
    model, variables = _tiny()
    assert set(variables) == {"params"}  # sow adds nothing unless asked
    images = jax.random.normal(jax.random.key(1), (5, 8, 8, 3))
    plain = model.apply(variables, images, both_heads=True)
    out, state = model.apply(variables, images, both_heads=True, mutable=["intermediates"])
    np.testing.assert_array_equal(plain[0], out[0])
    np.testing.assert_array_equal(plain[1], out[1])
    inter = state["intermediates"]
    assert len(inter["tokens"]) == 3 and inter["tokens"][0].shape == (5, 4 + 2, 8)
    attn = inter["blocks_1"]["attn"]["attention"][0]
    assert attn.shape == (5, 2, 6, 6)
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)


def test_forward_cosines_match_the_blocks_outputs():
    model, variables = _tiny()
    images = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    out = analyze.forward(model, variables, images)
    # Independent route: flax's capture_intermediates records every Block's output.
    _, state = model.apply(variables, images, both_heads=True,
                           capture_intermediates=lambda mdl, _: type(mdl).__name__ == "Block")
    p = variables["params"]
    x0 = np.concatenate([p["cls_token"], p["dist_token"]], 1)[0] + p["pos_embed"][0, :2]
    layer0 = x0[0] @ x0[1] / np.linalg.norm(x0[0]) / np.linalg.norm(x0[1])
    np.testing.assert_allclose(out["cosine"][0], np.full(4, layer0), rtol=1e-5)
    for i in range(2):
        x = np.asarray(state["intermediates"][f"blocks_{i}"]["__call__"][0])
        hand = (x[:, 0] * x[:, 1]).sum(-1) / np.linalg.norm(x[:, 0], axis=-1) / np.linalg.norm(
            x[:, 1], axis=-1)
        np.testing.assert_allclose(out["cosine"][i + 1], hand, rtol=1e-5)
    cls, dist = model.apply(variables, images, both_heads=True)
    np.testing.assert_allclose(out["fused"], (cls + dist) / 2, rtol=1e-6)
    assert out["last_attn"].shape == (4, 2, 4) and out["rollout"].shape == (4, 2, 4)


def test_analyze_figures_json_and_plots(tmp_path):
    model, variables = _tiny()
    rng = np.random.RandomState(0)
    batches = [{"image": rng.randn(6, 8, 8, 3).astype(np.float32),
                "label": rng.randint(0, 3, 6), "mask": np.array([1, 1, 1, 1, 1, 0], np.float32)}
               for _ in range(2)]
    teacher, t_vars = _tiny(distilled=False)
    figures = analyze.analyze(model, variables, batches, teacher=teacher,
                              teacher_variables=t_vars, num_maps=3)
    assert figures["num_examples"] == 10
    # Hand: the heads' top-1 over the 10 real examples.
    correct = {"cls": 0, "dist": 0, "fused": 0, "teacher": 0}
    cosines = []
    for b in batches:
        cls, dist = model.apply(variables, b["image"], both_heads=True)
        preds = {"cls": cls, "dist": dist, "fused": (cls + dist) / 2,
                 "teacher": teacher.apply(t_vars, b["image"])}
        for k, v in preds.items():
            correct[k] += int(((np.argmax(v, -1) == b["label"]) * b["mask"]).sum())
        cosines.extend(np.asarray(analyze.forward(model, variables, b["image"])["cosine"][-1])[
            b["mask"] > 0])
    for k, v in correct.items():
        assert figures["top1"][k] == pytest.approx(10.0 * v)
    np.testing.assert_allclose(figures["cls_dist_cosine"]["mean"][-1], np.mean(cosines),
                               rtol=1e-5)
    np.testing.assert_allclose(figures["cls_dist_cosine"]["std"][-1], np.std(cosines),
                               rtol=1e-3, atol=1e-6)
    p = variables["params"]
    a, b = p["cls_token"].ravel(), p["dist_token"].ravel()
    assert figures["learned_token_cosine"] == pytest.approx(
        float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), rel=1e-5)
    assert figures["maps"]["rollout"].shape == (3, 2, 4)
    paths = analyze.write_plots(figures, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["attention_maps.png",
                                                          "cls_dist_cosine.png"]
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and (tmp_path / path.rsplit("/", 1)[1]).stat(
            ).st_size > 2000
    table = analyze.format_table(figures)
    assert "| top-1 fused |" in table and "block_2" in table
    assert analyze.to_json(figures)["maps"]["num_images"] == 3


def test_cls2_ablation_model_and_loss():
    plain, v_plain = _tiny(distilled=False)
    two, v_two = _tiny()
    count = lambda v: sum(x.size for x in jax.tree.leaves(v))  # noqa: E731
    d, c = TINY["embed_dim"], TINY["num_classes"]
    # The second token, its position embedding and its head (kernel + bias).
    assert count(v_two) - count(v_plain) == d + d + d * c + c
    images = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    cls, second = two.apply(v_two, images, train=True)
    assert cls.shape == second.shape == (2, 3)
    targets = losses.smoothed_one_hot(jnp.array([0, 2]), 3, 0.1)
    got = losses.deit_loss(cls, second, targets, None, distillation="cls2", alpha=0.5)
    ce = lambda z: -np.mean(np.sum(targets * jax.nn.log_softmax(z), -1))  # noqa: E731
    np.testing.assert_allclose(got, 0.5 * ce(cls) + 0.5 * ce(second), rtol=1e-6)
    with pytest.raises(ValueError, match="second token"):
        losses.deit_loss(cls, None, targets, None, distillation="cls2")
