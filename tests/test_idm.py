"""Inverse-dynamics model: learns real actions from frames, ignores unlabelled samples exactly."""

import dataclasses

import pytest
import torch

from latent_actions.idm import PRESETS, IDMConfig, InverseDynamicsModel


def random_walk(b: int, t: int, size: int = 32, sq: int = 6, max_step: int = 2, seed: int = 0):
    """A square doing a random walk. frames uint8 [b, t, 3, size, size]; action float32 [b, t, 2]
    = the displacement from frame t to frame t+1 (the last step's action is never seen)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.zeros(b, t, 3, size, size, dtype=torch.uint8)
    action = torch.zeros(b, t, 2)
    for i in range(b):
        pos = torch.randint(0, size - sq + 1, (2,), generator=g)
        for s in range(t):
            frames[i, s, :, pos[0] : pos[0] + sq, pos[1] : pos[1] + sq] = 255
            new = (pos + torch.randint(-max_step, max_step + 1, (2,), generator=g)).clamp(0, size - sq)
            action[i, s] = (new - pos).float()
            pos = new
    return frames, action


def stats_of(action: torch.Tensor) -> dict:
    # deliberately not zero-mean / unit-std: the model must undo the normalisation itself
    return {
        "square": {"action": {"mean": (action.mean((0, 1)) + 0.5).tolist(), "std": (action.std((0, 1)) * 2).tolist()}}
    }


def make_batch(frames, action, mask=None, embodiment="square"):
    b = frames.shape[0]
    mask = torch.ones(b, dtype=torch.bool) if mask is None else mask
    return {
        "frames": frames,
        "action": action,
        "action_mask": mask,
        "embodiment": [embodiment if m else "video" for m in mask.tolist()],
    }


def tiny_idm(stats: dict, **kw) -> InverseDynamicsModel:
    return InverseDynamicsModel(dataclasses.replace(PRESETS["tiny"], action_dim=2, stats=stats, **kw))


def r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    return (1 - ((pred - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()).item()


def test_idm_overfits_square_displacement():
    torch.manual_seed(0)
    frames, action = random_walk(8, 6)
    model = tiny_idm(stats_of(action))
    batch = make_batch(frames, action)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(200):
        loss, metrics = model(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < first / 30 and metrics["r2"] > 0.97:
            break
    assert loss.item() < first / 10, (first, metrics)
    assert metrics["r2"] > 0.9, metrics

    # predictions come back in raw units (pixels moved), steps 0..T-2 (the last has no future)
    pred = model.predict_actions(frames)
    assert pred.shape == action.shape
    p, y = pred[:, :-1].reshape(-1, 2), action[:, :-1].reshape(-1, 2)
    assert r2(p, y) > 0.9
    assert (p.round() == y).float().mean() > 0.8
    # and it generalises a little to walks it never saw (not required to be good: 8 videos)
    assert torch.isfinite(model.predict_actions(random_walk(2, 6, seed=1)[0], "square")).all()


def test_idm_ignores_unlabelled_samples_exactly():
    torch.manual_seed(0)
    frames, action = random_walk(4, 5)
    model = tiny_idm(stats_of(action))
    mask = torch.tensor([True, False, True, False])

    def grads(frames, action):
        model.zero_grad()
        loss, metrics = model(make_batch(frames, action, mask))
        loss.backward()
        return loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]

    loss_a, metrics, grads_a = grads(frames, action)
    # change everything about the unlabelled samples: other frames, garbage actions (NaN, huge)
    frames_b, action_b = frames.clone(), action.clone()
    frames_b[~mask] = torch.randint(0, 256, frames_b[~mask].shape, dtype=torch.uint8)
    action_b[1] = float("nan")
    action_b[3] = 1e9
    loss_b, _, grads_b = grads(frames_b, action_b)
    assert torch.isfinite(loss_b)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert metrics["labelled_fraction"] == 0.5

    # the last step's action is masked too (its effect is outside the window)
    action_c = action.clone()
    action_c[:, -1] = 1e9
    assert torch.equal(grads(frames, action_c)[0], loss_a)

    # an all-unlabelled batch: zero loss, zero (not missing) gradients, no NaN
    model.zero_grad()
    loss, metrics = model(make_batch(frames, action_b, torch.zeros(4, dtype=torch.bool)))
    loss.backward()
    assert loss.item() == 0.0 and "r2" not in metrics
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_idm_normalisation_and_clear_errors():
    frames, action = random_walk(2, 4)
    stats = {
        "square": {"action": {"mean": [1.0, -2.0], "std": [2.0, 0.0]}},
        "video": {},
    }  # action-free embodiment: allowed, nothing to normalise
    model = tiny_idm(stats)
    model.eval()
    raw = model.predict_actions(frames)  # the only embodiment with actions is picked
    norm = model._predict_normalised(frames)
    # std 0 is floored (a constant action dim must not divide by zero)
    torch.testing.assert_close(raw, norm * torch.tensor([2.0, 1e-3]) + torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="no action stats for embodiment 'robot'"):
        model(make_batch(frames, action, embodiment="robot"))
    with pytest.raises(ValueError, match="action mean has 3 values"):
        IDMConfig(action_dim=2, stats={"x": {"action": {"mean": [0.0] * 3, "std": [1.0] * 2}}})
    with pytest.raises(ValueError, match="built for 3x32x32"):
        model.predict_actions(torch.zeros(1, 4, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"batch\['action'\]"):
        model(make_batch(frames, action[..., :1]))
    with pytest.raises(ValueError, match="max_frames"):
        tiny_idm(stats, max_frames=3).predict_actions(frames)


def test_idm_accepts_numpy_stats_and_round_trips(tmp_path):
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    frames, action = random_walk(2, 4)
    stats = {
        "square": {"action": {"mean": np.array([0.5, -0.5], np.float32), "std": np.array([1.5, 2.0], np.float32)}}
    }  # as embodiment_stats gives
    model = tiny_idm(stats, conv3d_stem=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, _ = model(make_batch(frames, action))
    loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)
    loaded = InverseDynamicsModel.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.config.stats["square"]["action"]["std"] == [1.5, 2.0]
    assert torch.equal(model.predict_actions(frames), loaded.predict_actions(frames))


def test_idm_augment_shift_in_training_only_and_learns_through_it():
    """augment_shift moves the frames of a window together in training (the motion it reads is kept); eval,
    labelling and predict_actions see the plain frames; the model still learns the displacement."""
    frames, action = random_walk(8, 6)
    stats = stats_of(action)
    torch.manual_seed(0)
    model = tiny_idm(stats, augment_shift=3)
    plain = tiny_idm(stats)
    plain.load_state_dict(model.state_dict())
    batch = make_batch(frames, action)
    with torch.no_grad():
        shifted = [model(batch)[0].item() for _ in range(3)]
        unshifted = plain(batch)[0].item()
    assert len(set(shifted)) > 1 and unshifted not in shifted, (shifted, unshifted)
    model.eval()
    plain.eval()
    assert torch.equal(model(batch)[0], plain(batch)[0])
    assert torch.equal(model.predict_actions(frames), plain.predict_actions(frames))
    assert torch.equal(batch["frames"], frames) and torch.equal(batch["action"], action)  # inputs untouched

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    fit = float("-inf")
    for step in range(300):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24:  # scored on the plain frames
            pred = model.predict_actions(frames)
            fit = r2(pred[:, :-1].reshape(-1, 2), action[:, :-1].reshape(-1, 2))
            if fit > 0.8:
                break
    assert fit > 0.8, fit
    with pytest.raises(ValueError, match="augment_shift"):
        IDMConfig(augment_shift=-1)
