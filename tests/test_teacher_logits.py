"""Precomputed teacher logits: the command's store, resume, top-k, validation, and the train
step's equivalence with an on-the-fly teacher when both see the same views."""

from __future__ import annotations

import functools
import json
import shutil

import flax
import jax
import numpy as np
import pytest
from absl import flags
from flax import jax_utils

from configs import deit_ti
from deit_jax import checkpoint, input_pipeline, models, optim, steps, teacher_logits, train
from deit_jax.steps import Teacher

# Train views equal eval views: a full-image "random" crop of the square synthetic images, no
# flip or erasing, and an eval resize to the crop size itself (crop ratio 1). No mixup.
SAME_VIEWS = {"aug.scale": (1.0, 1.0), "aug.ratio": (1.0, 1.0), "aug.hflip": 0.0,
              "aug.re_prob": 0.0, "aug.eval_crop_ratio": 1.0, "mixup.mixup_alpha": 0.0,
              "mixup.cutmix_alpha": 0.0}
NUM_EXAMPLES, NUM_CLASSES, SHARD = 256, 10, 64  # the smoke variant's synthetic set
VARIANT = "distill=hard,smoke"


def smoke_config(teacher_init, variant=VARIANT, **overrides):
    config = deit_ti.get_config(variant)
    config.unlock()
    config.distillation.teacher_init = str(teacher_init)
    for key, value in {**SAME_VIEWS, **overrides}.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    config.lock()
    return config


def eval_views(config):
    """Every training example's eval view: ``(images [256, 32, 32, 3], ids [256])``."""
    source = input_pipeline.synthetic("train", NUM_EXAMPLES, NUM_CLASSES, 32)
    layout = input_pipeline.Layout(NUM_EXAMPLES, 0, 1, 1)
    (batch,) = input_pipeline.eval_batches(config, source, layout, image_size=32)
    return batch["image"][0], batch["index"][0]


@pytest.fixture(scope="module")
def teacher_init(tmp_path_factory):
    """A regnety_002 teacher checkpoint whose predictions differ clearly between examples.

    Built in numpy (He-normal kernels, identity BatchNorm; no XLA init to compile), then the
    head is scaled up and centred on the training set so that softmax is far from uniform and
    the argmax varies: a store that mixed up example ids would change the losses below.
    """
    model = models.create_model("regnety_002", num_classes=NUM_CLASSES)
    rng = np.random.RandomState(0)
    flat = {}
    for key, leaf in flax.traverse_util.flatten_dict(steps.variable_shapes(model, 32)).items():
        if key[-1] == "kernel":
            value = rng.randn(*leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            value = np.full(leaf.shape, 1.0 if key[-1] in ("scale", "var") else 0.0)
        flat[key] = value.astype(leaf.dtype)
    flat["params", "head_fc", "kernel"] *= 30.0
    variables = flax.traverse_util.unflatten_dict(flat)
    images, _ = eval_views(smoke_config("random"))
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    flat["params", "head_fc", "bias"] = -np.asarray(logits).mean(0)
    out = tmp_path_factory.mktemp("teacher")
    checkpoint.save_variables(str(out), flax.traverse_util.unflatten_dict(flat))
    return out


def run_command(teacher_init, out, *args):
    """``python -m deit_jax.teacher_logits ARGS`` in this process, on its own flag registry."""
    argv = ["teacher_logits", f"--config=configs/deit_ti.py:{VARIANT}",
            f"--config.distillation.teacher_init={teacher_init}",
            "--config.aug.eval_crop_ratio=1.0", f"--out={out}", f"--shard_size={SHARD}", *args]
    flag_values = teacher_logits.define_flags(flags.FlagValues(), argv)
    flag_values(argv)
    return teacher_logits.run(flag_values)


def open_store(directory, **overrides):
    kw = dict(dataset="synthetic", split="train", num_classes=NUM_CLASSES,
              num_examples=NUM_EXAMPLES) | overrides
    return teacher_logits.TeacherLogitsStore.open(str(directory), **kw)


@pytest.fixture(scope="module")
def store_dir(teacher_init, tmp_path_factory):
    out = tmp_path_factory.mktemp("logits") / "full"
    result = run_command(teacher_init, out)
    assert result["written"] == [0, 1, 2, 3] and result["skipped"] == []
    return out


@pytest.fixture(scope="module")
def teacher(teacher_init):
    """The teacher as the training loop builds it."""
    config = smoke_config(teacher_init)
    student = models.create_model(config.model.name, **steps.model_overrides(config, 10))
    return train.build_teacher(config, student, NUM_CLASSES, 32)


def test_store_holds_the_teachers_logits_of_the_eval_views(store_dir, teacher, teacher_init):
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["top_k"] is None
    assert (manifest["teacher"], manifest["dataset"], manifest["split"]) == (
        "regnety_002", "synthetic", "train")
    assert manifest["num_examples"] == NUM_EXAMPLES and manifest["num_classes"] == NUM_CLASSES
    assert manifest["transform"] == {"name": "eval", "image_size": 32, "crop_ratio": 1.0,
                                     "interpolation": "bicubic"}
    assert manifest["teacher_fingerprint"] == teacher_logits.variables_fingerprint(
        teacher.variables)
    shard = np.load(store_dir / "shard-00001-of-00004.npz")
    assert shard["values"].dtype == np.float16 and shard["values"].shape == (SHARD, NUM_CLASSES)
    np.testing.assert_array_equal(shard["ids"], np.arange(SHARD, 2 * SHARD))
    assert shard["decoded"].dtype == bool and shard["decoded"].all()

    images, ids = eval_views(smoke_config(teacher_init))
    expected = np.zeros((NUM_EXAMPLES, NUM_CLASSES), np.float32)
    expected[ids] = jax.jit(functools.partial(teacher.model.apply, train=False))(
        teacher.variables, images)
    # The rows must differ between examples, or an id mix-up would go unnoticed.
    assert np.std(expected, axis=0).min() > 0.5 and len(set(expected.argmax(1))) >= 5
    store = open_store(store_dir)
    ids = np.random.RandomState(0).permutation(NUM_EXAMPLES)
    got = store.lookup(ids)
    assert got.dtype == np.float32 and got.shape == (NUM_EXAMPLES, NUM_CLASSES)
    # float16 storage: relative rounding 2^-11, plus CPU batch-size-dependent summation.
    np.testing.assert_allclose(got, expected[ids], rtol=2e-3, atol=1e-4)
    assert store.lookup(ids.reshape(8, 32)).shape == (8, 32, NUM_CLASSES)
    # Hard distillation's labels: the argmax survives float16 storage.
    np.testing.assert_array_equal(got.argmax(1), expected[ids].argmax(1))


def test_resume_rewrites_only_the_missing_shard(store_dir, teacher_init, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(store_dir, out)
    removed = out / "shard-00002-of-00004.npz"
    before = np.load(removed)["values"]
    removed.unlink()
    with pytest.raises(ValueError, match=r"lacks teacher logits for 64 of 256 example ids "
                                         r"\(first: \[128, .*shard-00002-of-00004.npz.*rerun"):
        open_store(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    result = run_command(teacher_init, out)
    assert result["written"] == [2] and result["skipped"] == [0, 1, 3]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")
            if p.name in mtimes} == mtimes
    np.testing.assert_array_equal(np.load(removed)["values"], before)
    open_store(out)  # complete again
    # Resuming with other settings would mix two stores: refused, nothing written.
    with pytest.raises(ValueError, match="other settings .*top_k: None -> 3.*another --out"):
        run_command(teacher_init, out, "--top_k=3")


def test_top_k_store_is_the_top_k_of_the_full_logits(store_dir, teacher_init, tmp_path):
    run_command(teacher_init, tmp_path, "--top_k=3", "--batch_size=64")
    shard = np.load(tmp_path / "shard-00000-of-00004.npz")
    assert shard["values"].shape == shard["indices"].shape == (SHARD, 3)
    assert shard["values"].dtype == np.float16 and shard["indices"].dtype == np.int32
    full = open_store(store_dir).lookup(np.arange(NUM_EXAMPLES))
    top = open_store(tmp_path)
    assert top.top_k == 3
    got = top.lookup(np.arange(NUM_EXAMPLES))
    top3 = np.argsort(-full, axis=1)[:, :3]
    kept = np.zeros_like(full, bool)
    np.put_along_axis(kept, top3, True, axis=1)
    np.testing.assert_allclose(got[kept], full[kept], rtol=2e-3, atol=1e-4)
    assert (got[~kept] == teacher_logits.TOPK_FILL).all()
    # The teacher's distribution renormalised over its top 3 (tau = 1 and the paper's 3).
    for tau in (1.0, 3.0):
        p = np.asarray(jax.nn.softmax(got / tau, axis=-1))
        q = np.where(kept, np.exp((full - full.max(1, keepdims=True)) / tau), 0.0)
        np.testing.assert_allclose(p, q / q.sum(1, keepdims=True), atol=2e-3)
        assert p[~kept].max() == 0.0


@pytest.mark.parametrize("overrides,match", [
    ({"dataset": "imagenet2012"}, r"dataset 'synthetic' split 'train', but this run trains on "
                                  r"'imagenet2012' split 'train'.*teacher_logits"),
    ({"split": "train[:90%]"}, r"split 'train', but this run trains on .* split 'train\[:90%\]'"),
    ({"num_classes": 1000}, r"over 10 classes, but the student predicts 1000"),
    ({"num_examples": 300}, r"for 256 examples .* this run's split has 300"),
])
def test_mismatched_store_is_refused(store_dir, overrides, match):
    with pytest.raises(ValueError, match=match):
        open_store(store_dir, **overrides)


def test_unfinished_or_absent_store_is_refused(store_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a teacher-logits store.*--out=DIR"):
        open_store(tmp_path)
    shutil.copytree(store_dir, tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    with pytest.raises(ValueError, match="unfinished.*rerun the same teacher_logits command"):
        open_store(tmp_path / "s")


def test_training_config_names_the_store(store_dir):
    config = smoke_config("", **{"distillation.teacher": f"precomputed:{store_dir}",
                                 "dataset.train_split": "other"})
    with pytest.raises(ValueError, match="split 'other'"):
        teacher_logits.open_for_training(config, num_classes=10, num_examples=NUM_EXAMPLES)
    with pytest.raises(ValueError, match="names no precomputed store"):
        teacher_logits.open_for_training(smoke_config(""), num_classes=10,
                                         num_examples=NUM_EXAMPLES)


def test_precomputed_step_equals_on_the_fly_step_on_the_same_views(store_dir, teacher,
                                                                   teacher_init):
    # Soft distillation with the paper's T = 3 checks the tau handling of the precomputed
    # probabilities; batch-mean KL keeps the kd term large enough to notice a wrong row. (Hard
    # distillation uses the same targets' argmax: the store test checks it is the teacher's.)
    config = smoke_config(teacher_init, "distill=soft,smoke", **{
        "distillation.tau": 3.0, "distillation.alpha": 0.5,
        "distillation.kd_reduction": "batchmean"})
    source = input_pipeline.synthetic("train", NUM_EXAMPLES, NUM_CLASSES, 32)
    layout = input_pipeline.Layout.current(config.batch_size)
    store = teacher_logits.open_for_training(
        smoke_config(teacher_init, **{"distillation.teacher": f"precomputed:{store_dir}"}),
        num_classes=10, num_examples=NUM_EXAMPLES)
    batches = teacher_logits.attach(
        input_pipeline.train_batches(config, source, layout, image_size=32), store)
    batch = next(batches)
    assert batch["teacher_logits"].shape == (8, 4, NUM_CLASSES)
    # The premise: this training view is the eval view the store's teacher saw.
    images, ids = eval_views(config)
    np.testing.assert_array_equal(ids, np.arange(NUM_EXAMPLES))
    np.testing.assert_array_equal(batch["image"].reshape(-1, 32, 32, 3),
                                  images[batch["index"].reshape(-1)])

    model = models.create_model(config.model.name, **steps.model_overrides(config, 10))
    tx, lr_fn = optim.create_optimizer(config, steps_per_epoch=8)
    state = steps.create_train_state(config, model, tx, jax.random.key(0), 32)
    # A fresh student predicts ~uniformly, and KL(teacher || uniform) hardly depends on which
    # example's teacher row is used; a confident dist head makes the loss depend on it.
    params = flax.core.unfreeze(state.params)
    params["head_dist"]["kernel"] = params["head_dist"]["kernel"] * 30.0
    state = jax_utils.replicate(state.replace(params=params))

    def p_train_step(teacher):
        return jax.pmap(functools.partial(steps.train_step, model=model, teacher=teacher, tx=tx,
                                          lr_fn=lr_fn, config=config), axis_name=steps.AXIS)

    _, fly = p_train_step(teacher)(
        state, {k: v for k, v in batch.items() if k != "teacher_logits"},
        jax_utils.replicate(teacher.variables))
    p_pre = p_train_step(Teacher(precomputed_dir=str(store_dir)))
    _, pre = p_pre(state, batch, None)
    loss_fly, loss_pre = float(fly["loss"][0]), float(pre["loss"][0])
    # What differs: float16 storage of the teacher's logits (relative 2^-11) and the
    # round trip tau * log(softmax(logits / tau)) of the precomputed path.
    # Measured: 7e-6 relative on the loss (8.83), 2e-7 on the gradient norm.
    assert loss_pre == pytest.approx(loss_fly, rel=5e-5)
    np.testing.assert_allclose(pre["grad_norm"][0], fly["grad_norm"][0], rtol=1e-4)
    # The comparison can fail: other examples' logits change the loss by far more.
    wrong = dict(batch, teacher_logits=np.roll(batch["teacher_logits"], 1, axis=1))
    _, bad = p_pre(state, wrong, None)
    assert abs(float(bad["loss"][0]) - loss_fly) > 100 * 5e-5 * loss_fly  # measured: 1e-2
