"""Resuming a run whose parameter layout changed since its checkpoint (issue 15): the optimizer state
follows the parameter names recorded in ``optimizer.json``, renamed by the model's own rules.

A real tiny world-model run (toy data, 2 steps) is checkpointed, then its checkpoint is rewritten into
the layout the world model had before format 2 (``uwm.NETWORK_RENAMES``): the network's parameters
without ``net.``, and in that layout's parameter order. ``nn.Module.named_parameters`` lists a module's
own parameters before its children's, so the four that sat on ``WorldModel`` itself (``null_action``,
``action_pos``, ``video_pos``, ``register_tokens``) came first, then the children in registration order
(where ``net`` is now).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import toy_models
from wm_pipeline.cli.main import main
from wm_pipeline.training import checkpoint
from wm_pipeline.training.config import OptimConfig
from wm_pipeline.training.trainer import build_optimizer
from worldmodel.uwm import WorldModel

STEP = 2
ARGS = (
    "--preset",
    "tiny",
    "model.depth=1",
    "model.width=32",
    "model.encoder_channels=[8,16]",
    "train.ckpt_every=2",
    "train.progress=false",
    "data.batch_size=2",
    "data.num_workers=0",
)


def wm_train(data, run, steps):
    return main(["train", "worldmodel", "--data", str(data), "--out", str(run), *ARGS, f"train.max_steps={steps}"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return toy_models.make_dataset(tmp_path_factory.mktemp("toy") / "data")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("wm") / "run"
    assert wm_train(data, run, STEP) == 0
    return run


def copy_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def live(run):
    """A fresh model (the run's config, untrained weights) and optimizer as the trainer builds them."""
    config = WorldModel.from_pretrained(str(run / "final")).config
    model = WorldModel(config)
    return model, build_optimizer(model, OptimConfig())


def saved_state(trained):
    """``{parameter name: {key: value}}`` of the checkpoint, naming index i by the i-th parameter of the
    trainer's optimizer (not by the names the checkpoint records: those are what is tested)."""
    model, optimizer = live(trained)
    order = [
        name
        for group in optimizer.param_groups
        for p in group["params"]
        for name, q in model.named_parameters()
        if q is p
    ]
    ckpt = checkpoint.step_dir(trained, STEP)
    meta = json.loads((ckpt / "optimizer.json").read_text())
    out = {name: dict(meta["scalars"].get(str(i), {})) for i, name in enumerate(order)}
    for key, value in load_file(str(ckpt / "optimizer.safetensors")).items():
        _, i, k = key.split(".", 2)
        out[order[int(i)]][k] = value
    assert meta["param_names"] == {str(i): name for i, name in enumerate(order)}
    return out


def old_name(name):
    return name[len("net.") :] if name.startswith("net.") else name


def to_pre_split(ckpt, keep_names=True):
    """Rewrite the checkpoint ``ckpt`` as the pre-format-2 layout saved it (names, index order)."""
    for file in ("model.safetensors", "ema.safetensors"):
        weights = load_file(str(ckpt / file))
        save_file({old_name(k): v for k, v in weights.items()}, str(ckpt / file), metadata={"format": "pt"})
    meta = json.loads((ckpt / "optimizer.json").read_text())
    names = {int(i): n for i, n in meta["param_names"].items()}
    own = [n for n in names.values() if n.startswith("net.") and n.count(".") == 1]  # sat on WorldModel itself
    old_order = own + [n for n in names.values() if n not in own]
    group_of = {names[i]: g for g, group in enumerate(meta["param_groups"]) for i in group["params"]}
    new_index, counter = {}, 0
    for g in range(len(meta["param_groups"])):  # torch numbers group 0's parameters first
        for name in (n for n in old_order if group_of[n] == g):
            new_index[name], counter = counter, counter + 1
    index_of = {i: new_index[n] for i, n in names.items()}
    assert index_of != {i: i for i in names}  # the old order differs: by index the state would not line up
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    save_file(
        {f"state.{index_of[int(k.split('.')[1])]}.{k.split('.', 2)[2]}": v for k, v in tensors.items()},
        str(ckpt / "optimizer.safetensors"),
        metadata={"format": "pt"},
    )
    for group in meta["param_groups"]:
        group["params"] = sorted(index_of[i] for i in group["params"])
    meta["scalars"] = {str(index_of[int(i)]): v for i, v in meta["scalars"].items()}
    meta["param_names"] = {str(index_of[i]): old_name(n) for i, n in names.items()}
    if not keep_names:
        del meta["param_names"]
    (ckpt / "optimizer.json").write_text(json.dumps(meta))


def resumed_state(run):
    """Load the checkpoint of ``run`` into a fresh model and optimizer: ``{name: optimizer state}``."""
    model, optimizer = live(run)
    ema = WorldModel(model.config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint.load_checkpoint(
        checkpoint.step_dir(run, STEP), model=model, ema_model=ema, optimizer=optimizer, scheduler=scheduler
    )
    return {name: optimizer.state[p] for name, p in model.named_parameters()}


def assert_same_state(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        for k, v in want[name].items():
            torch.testing.assert_close(got[name][k], v, rtol=0, atol=0, msg=f"{name}: {k}")


def test_a_pre_split_checkpoint_resumes_each_parameters_optimizer_state(trained, data, tmp_path):
    want = saved_state(trained)
    run = copy_run(trained, tmp_path)
    to_pre_split(checkpoint.step_dir(run, STEP))
    assert_same_state(resumed_state(run), want)  # every parameter's moments and step, exactly

    # the real trainer resumes it and continues as from the checkpoint in today's layout
    same = copy_run(trained, tmp_path / "same")
    assert wm_train(data, run, STEP + 1) == 0 and wm_train(data, same, STEP + 1) == 0
    for file in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(checkpoint.step_dir(run, STEP + 1) / file))
        b = load_file(str(checkpoint.step_dir(same, STEP + 1) / file))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{file}: {key}")


def test_a_checkpoint_without_names_resumes_by_index(trained, tmp_path):
    """Saved before names were recorded: by index as before; under the pre-split order a one-line error."""
    want = saved_state(trained)
    run = copy_run(trained, tmp_path)
    ckpt = checkpoint.step_dir(run, STEP)
    meta = json.loads((ckpt / "optimizer.json").read_text())
    del meta["param_names"]
    (ckpt / "optimizer.json").write_text(json.dumps(meta))
    assert_same_state(resumed_state(run), want)

    shutil.rmtree(ckpt)
    shutil.copytree(checkpoint.step_dir(trained, STEP), ckpt)
    to_pre_split(ckpt, keep_names=False)
    with pytest.raises(ValueError) as e:
        resumed_state(run)
    assert str(e.value) == (
        f"{ckpt / 'optimizer.safetensors'}: state.0.exp_avg [1, 1, 32] does not fit the "
        f"parameter 'tokenizer.embed.weight' [32, 3, 8, 8]; an older parameter order? train from "
        f"its weights: --init {ckpt}"
    )


def test_a_name_that_matches_nothing_is_a_one_line_error(trained, data, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    ckpt = checkpoint.step_dir(run, STEP)
    meta = json.loads((ckpt / "optimizer.json").read_text())
    # as if a layout change renamed final_video without a rename rule
    meta["param_names"] = {i: n.replace("net.final_video.", "net.video_head.") for i, n in meta["param_names"].items()}
    (ckpt / "optimizer.json").write_text(json.dumps(meta))
    first = next(n for n in meta["param_names"].values() if n.startswith("net.video_head."))
    capsys.readouterr()
    assert wm_train(data, run, STEP + 1) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("wm train: error:")]
    assert (
        f"{ckpt}: cannot resume from it ({ckpt / 'optimizer.json'}: no saved state for the model's parameter "
        f"'{first.replace('video_head', 'final_video')}'" in line
    ), line
    assert not checkpoint.step_dir(run, STEP + 1).exists()
