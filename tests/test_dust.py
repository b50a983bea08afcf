"""DUST specifics: dual-stream blocks that meet only in attention, the asynchronous joint schedule, and
learning with variant="dust". The contract shared with UWM (modes, masking, checkpoints) is in test_uwm.py."""

import pytest
import torch

from worldmodel.dust import DualStreamBlock, joint_schedule
from worldmodel.uwm import WorldModel, WorldModelConfig, embodiment_spec


def dust_config(**kw) -> WorldModelConfig:
    """16 px frames, 1 current + 1 future frame (index 4), 4-step chunks of a 2-dim action."""
    base = dict(
        variant="dust",
        image_size=16,
        patch_size=4,
        n_obs=1,
        n_future=1,
        action_horizon=4,
        width=64,
        depth=2,
        heads=2,
        registers=2,
        encoder_channels=[16, 32],
        action_steps=3,
        video_steps=6,
        embodiments={"toy": embodiment_spec({"action": {"mean": [0.0, 0.0], "std": [0.5, 0.5]}})},
    )
    return WorldModelConfig(**{**base, **kw})


def action_dependent_data(n: int, seed: int) -> dict:
    """Future frame = top half action[0], bottom half action[1] (pixel units in [-1, 1]); current frame grey."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (n, 1, 1, 1, 1), generator=g, dtype=torch.uint8).expand(n, 5, 3, 16, 16).clone()
    a = torch.rand(n, 2, generator=g) * 2 - 1
    frames[:, 4, :, :8] = ((a[:, 0, None, None, None] + 1) * 127.5).round().to(torch.uint8)
    frames[:, 4, :, 8:] = ((a[:, 1, None, None, None] + 1) * 127.5).round().to(torch.uint8)
    return {
        "frames": frames,
        "action": a[:, None].expand(n, 5, 2).clone(),
        "action_mask": torch.ones(n, dtype=torch.bool),
        "embodiment": ["toy"] * n,
    }


def test_joint_schedule_steps_each_stream_its_own_number_of_times():
    for n_a, n_v in [(5, 10), (10, 10), (3, 7), (8, 4), (1, 1)]:
        sched = joint_schedule(n_a, n_v)
        assert len(sched) == max(n_a, n_v)
        assert sum(a for a, _ in sched) == n_a and sum(v for _, v in sched) == n_v
    # video twice as often: actions move on every second call, after the video has taken a step
    assert [a for a, _ in joint_schedule(3, 6)] == [False, True] * 3
    with pytest.raises(ValueError, match="action_steps=0"):
        joint_schedule(0, 4)


def test_dual_stream_block_keeps_separate_weights_that_meet_only_in_attention():
    torch.manual_seed(0)
    block = DualStreamBlock(width=32, heads=2)
    for stream in (block.action, block.video):
        torch.nn.init.normal_(stream.adaln.weight, std=0.1)  # leave the identity initialisation
    x, c, n_action = torch.randn(2, 7, 32), torch.randn(2, 32), 3
    before = block(x, c, n_action)
    with torch.no_grad():
        block.action.mlp[0].weight.add_(1.0)  # the action stream's own MLP ...
    after = block(x, c, n_action)
    assert not torch.allclose(before[:, :n_action], after[:, :n_action])
    assert torch.equal(before[:, n_action:], after[:, n_action:])  # ... leaves the video tokens untouched
    with torch.no_grad():
        block.action.qkv.weight.add_(0.5)  # but the action stream's keys and values are seen by the video
    assert not torch.allclose(after[:, n_action:], block(x, c, n_action)[:, n_action:])
    names = {n.split(".")[0] for n, _ in block.named_parameters()}
    assert names == {"action", "video"}


def test_asynchronous_joint_sampling_denoises_video_with_more_steps():
    model = WorldModel(dust_config()).eval()
    seen = []
    velocity = model._velocity

    def record(cond, t_a, t_v, *args):
        seen.append((round(t_a[0].item(), 4), round(t_v[0].item(), 4)))
        return velocity(cond, t_a, t_v, *args)

    model._velocity = record
    obs = action_dependent_data(2, seed=0)["frames"][:, :1]
    actions, video = model.sample_joint(obs, "toy")  # config: 3 action steps, 6 video steps
    assert actions.shape == (2, 4, 2) and video.shape == (2, 1, 3, 16, 16)
    t_v = [round(1 - k / 6, 4) for k in range(6)]
    t_a = [1.0, 1.0, round(2 / 3, 4), round(2 / 3, 4), round(1 / 3, 4), round(1 / 3, 4)]
    assert seen == list(zip(t_a, t_v))
    seen.clear()
    model.sample_policy(obs, "toy", steps=2)  # one stream only: its own steps, video pinned at t = 1
    assert seen == [(1.0, 1.0), (0.5, 1.0)]


def test_dust_overfits_one_batch():
    torch.manual_seed(0)
    model = WorldModel(dust_config(p_marginal=0.0))
    batch = action_dependent_data(8, seed=0)
    batch["frames"] = torch.randint(0, 256, batch["frames"].shape, dtype=torch.uint8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(80):
        loss, metrics = model(batch, generator=torch.Generator().manual_seed(0))  # fixed noise: memorisable
        first = first or metrics
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, metrics = model(batch, generator=torch.Generator().manual_seed(0))
    assert metrics["loss_action"] < first["loss_action"] / 10
    assert metrics["loss_video"] < first["loss_video"] / 10


def test_dust_uses_the_actions_to_predict_the_future():
    torch.manual_seed(0)
    model = WorldModel(dust_config())
    data = action_dependent_data(256, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, 256, (16,), generator=g)
        loss, _ = model({k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx]) for k, v in data.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = action_dependent_data(32, seed=1)
    obs, truth = test["frames"][:, :1], test["frames"][:, 4:5].float() / 127.5 - 1
    err_fd = (
        (
            model.sample_forward_dynamics(obs, test["action"][:, :4], "toy", generator=torch.Generator().manual_seed(0))
            - truth
        )
        ** 2
    ).mean()
    err_video = ((model.sample_video(obs, "toy", generator=torch.Generator().manual_seed(0)) - truth) ** 2).mean()
    assert err_fd < 0.5 * err_video, (err_fd, err_video)
