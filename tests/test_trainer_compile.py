"""train.compile (torch.compile of the training forward + loss) and optim.impl (AdamW's kernel):
the compiled run learns like the eager one and saves the same keys; every kernel takes the same steps."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

import toy_models
from wm_pipeline.training import checkpoint
from wm_pipeline.training.config import ConfigError, OptimConfig, resolve
from wm_pipeline.training.registry import get_model
from wm_pipeline.training.trainer import build_optimizer, optimizer_impl, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return toy_models.make_dataset(tmp_path_factory.mktemp("toy") / "data")


@pytest.fixture(scope="module")
def can_compile():
    """torch.compile on the CPU needs a working C++ compiler (inductor builds its kernels with it)."""
    try:
        torch._dynamo.reset()
        out = torch.compile(lambda x: torch.sin(x) * 2 + 1)(torch.ones(3))
        assert torch.allclose(out, torch.sin(torch.ones(3)) * 2 + 1)
    except Exception as e:  # noqa: BLE001 - whatever stops inductor here is the reason to skip
        pytest.skip(f"torch.compile cannot run on this machine: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def toy_cfg(data, *overrides):
    spec = get_model("toy")
    return resolve(
        "toy",
        spec.config_cls,
        spec.presets,
        preset="tiny",
        data_paths=[str(data)],
        overrides=list(overrides),
        run_presets=spec.run_presets,
    ), spec


def losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def saved_keys(run, step):
    ck = checkpoint.step_dir(run, step)
    return {name: sorted(load_file(str(ck / name))) for name in ("model.safetensors", "ema.safetensors")} | {
        "final": sorted(load_file(str(run / "final" / "model.safetensors")))
    }


def test_compiled_run_learns_like_eager_and_saves_the_same_keys(data, tmp_path, can_compile):
    common = (
        "train.max_steps=40",
        "train.ckpt_every=20",
        "train.log_every=10",
        "optim.lr=3e-3",
        "train.progress=false",
    )
    runs, graphs = {}, {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        cfg, spec = toy_cfg(data, *common, f"train.compile={flag}")
        torch._dynamo.reset()
        counters.clear()
        runs[name] = tmp_path / name
        assert train(cfg, spec, runs[name]).step == 40
        graphs[name] = counters["stats"]["unique_graphs"]
    assert graphs["eager"] == 0 and 1 <= graphs["compiled"] <= 4, graphs  # compiled once, not per batch
    eager, compiled = losses(runs["eager"]), losses(runs["compiled"])
    assert compiled[-1] < 0.75 * compiled[0], compiled
    # the same maths: the loss curves agree (inductor's kernels round differently, nothing more)
    assert compiled == pytest.approx(eager, rel=2e-2), (eager, compiled)
    keys = saved_keys(runs["compiled"], 40)
    assert keys == saved_keys(runs["eager"], 40)
    assert not any("_orig_mod" in k for names in keys.values() for k in names)
    # a compiled run resumes from its checkpoint (the weights load into the eager module it wraps)
    cfg, spec = toy_cfg(data, *common, "train.compile=true", "train.max_steps=50")
    result = train(cfg, spec, runs["compiled"])
    assert result.resumed_from == 40 and result.step == 50


def first_steps(impl: str, steps: int = 4) -> list[torch.Tensor]:
    """Weights after ``steps`` AdamW steps of the toy model on fixed random batches, seeded."""
    torch.manual_seed(0)
    model = toy_models.ToyPolicy(toy_models.ToyConfig(action_dim=3, state_dim=2, image_size=[16, 16]))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, impl=impl))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = {
            "frames": torch.randint(0, 256, (4, 2, 3, 16, 16), dtype=torch.uint8, generator=g),
            "action": torch.randn(4, 2, 3, generator=g),
            "state": torch.randn(4, 2, 2, generator=g),
            "action_mask": torch.ones(4, dtype=torch.bool),
        }
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def test_every_adamw_kernel_takes_the_same_steps():
    assert optimizer_impl("auto", torch.device("cuda")) == {"fused": True}
    assert optimizer_impl("auto", torch.device("cpu")) == {"foreach": True, "fused": False}
    reference = first_steps("for-loop")
    start = [
        p.detach().clone()
        for p in toy_models.ToyPolicy(toy_models.ToyConfig(action_dim=3, state_dim=2, image_size=[16, 16])).parameters()
    ]
    assert any(not torch.allclose(a, b) for a, b in zip(reference, start))  # the steps moved the weights
    for impl in ("foreach", "fused", "auto"):
        for a, b in zip(first_steps(impl), reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=impl)


def test_resume_may_change_the_kernel(data, tmp_path):
    """The kernel is not state: a run checkpointed with fused AdamW resumes with the for-loop one (the
    saved flags do not win) and ends where the uninterrupted fused run ends."""
    common = ("train.max_steps=20", "train.ckpt_every=10", "train.progress=false", "ema.decay=0")
    cfg, spec = toy_cfg(data, *common, "optim.impl=fused")
    run = tmp_path / "run"
    train(cfg, spec, run)
    straight = load_file(str(checkpoint.step_dir(run, 20) / "model.safetensors"))
    groups = json.loads((checkpoint.step_dir(run, 20) / "optimizer.json").read_text())["param_groups"]
    assert all(g["fused"] for g in groups)
    for path in (checkpoint.step_dir(run, 20), run / "final"):
        shutil.rmtree(path)
    cfg, spec = toy_cfg(data, *common, "optim.impl=for-loop")
    result = train(cfg, spec, run)
    assert result.resumed_from == 10 and result.step == 20
    groups = json.loads((checkpoint.step_dir(run, 20) / "optimizer.json").read_text())["param_groups"]
    assert not any(g["fused"] or g["foreach"] for g in groups)
    resumed = load_file(str(checkpoint.step_dir(run, 20) / "model.safetensors"))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.impl=fast", "'optim.impl': 'fast' is not one of"),
        ("train.compile_mode=turbo", "'train.compile_mode': 'turbo' is not one of"),
        ("train.compile=maybe", "'train.compile'"),
    ],
)
def test_bad_compile_and_kernel_values_are_one_line_errors(data, override, message):
    with pytest.raises(ConfigError, match=message):
        toy_cfg(data, override)
