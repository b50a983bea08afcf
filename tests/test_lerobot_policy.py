"""decoders.lerobot_policy: an ActionDecoder driven through LeRobot's policy contract, with batches shaped
as LeRobot builds them (``observation.images.<cam>`` float [B, C, H, W] in [0, 1], ``observation.state``,
``task``)."""

import pytest
import torch

from decoders.decoder import ActionDecoder
from decoders.lerobot_policy import LeRobotPolicy
from test_decoder import N_OBS, PX, TASKS, H, S, make_batch, make_config


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return ActionDecoder(make_config(make_batch(), objective="fm")).eval()


def lerobot_batch(step: int, b: int = 2) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "observation.images.front": torch.rand(b, 3, PX, PX, generator=g),
        "observation.state": torch.randn(b, S, generator=g),
        "task": [TASKS[i % 2] for i in range(b)],
    }


def as_frames(batch):
    return (batch["observation.images.front"] * 255).round().to(torch.uint8)


def test_select_action_runs_the_chunk_queue_and_matches_the_decoder(decoder):
    policy = LeRobotPolicy(decoder, n_action_steps=3, generator=torch.Generator().manual_seed(7))
    policy.reset()
    batches = [lerobot_batch(t) for t in range(5)]
    actions = [policy.select_action(b) for b in batches]
    assert all(a.shape == (2, decoder.config.action_dim) for a in actions)
    # the same calls by hand: chunk at t=0 from [f0, f0], chunk at t=3 from [f2, f3]
    g = torch.Generator().manual_seed(7)
    f = [as_frames(b) for b in batches]
    first = decoder.predict_action_chunk(
        torch.stack([f[0]] * N_OBS, 1), batches[0]["observation.state"], batches[0]["task"], generator=g
    )
    second = decoder.predict_action_chunk(
        torch.stack([f[2], f[3]], 1), batches[3]["observation.state"], batches[3]["task"], generator=g
    )
    expected = [first[:, 0], first[:, 1], first[:, 2], second[:, 0], second[:, 1]]
    for got, want in zip(actions, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    policy.reset()  # a new episode: the history and the queue start again
    assert policy.predict_action_chunk(batches[4]).shape == (2, H, decoder.config.action_dim)
    assert len(policy._frames) == N_OBS and torch.equal(policy._frames[0], policy._frames[1])


def test_bad_batches_are_named(decoder):
    policy = LeRobotPolicy(decoder)
    two_cams = {**lerobot_batch(0), "observation.images.wrist": torch.rand(2, 3, PX, PX)}
    with pytest.raises(KeyError, match="pass camera="):
        policy.select_action(two_cams)
    assert LeRobotPolicy(decoder, camera="wrist").select_action(two_cams).shape == (2, decoder.config.action_dim)
    no_state = {k: v for k, v in lerobot_batch(0).items() if k != "observation.state"}
    with pytest.raises(KeyError, match="observation.state"):
        LeRobotPolicy(decoder).select_action(no_state)
    with pytest.raises(ValueError, match="images must be"):
        LeRobotPolicy(decoder).select_action({**lerobot_batch(0), "observation.images.front": torch.rand(2, PX, PX)})
    with pytest.raises(ValueError, match="n_action_steps"):
        LeRobotPolicy(decoder, n_action_steps=H + 1)
