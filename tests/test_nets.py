"""The shared network pieces in nets/."""

import pytest
import torch

from nets.spatial_softmax import SpatialSoftmax


def test_spatial_softmax_finds_the_peak():
    x = torch.full((2, 3, 5, 7), -30.0)
    x[0, 0, 0, 0] = 30.0      # top-left
    x[0, 1, 4, 6] = 30.0      # bottom-right
    x[0, 2, 2, 3] = 30.0      # centre
    x[1] = 0.0                # flat: the mean position, the centre
    out = SpatialSoftmax()(x)
    assert out.shape == (2, 6)
    xs, ys = out[:, :3], out[:, 3:]
    assert torch.allclose(xs[0], torch.tensor([-1.0, 1.0, 0.0]), atol=1e-4)
    assert torch.allclose(ys[0], torch.tensor([-1.0, 1.0, 0.0]), atol=1e-4)
    assert torch.allclose(out[1], torch.zeros(6), atol=1e-6)


def test_keypoints_follow_an_object_and_learn():
    """Learned keypoints: a bright square's position is regressed from the keypoints of a 1x1 conv."""
    torch.manual_seed(0)
    layer = SpatialSoftmax(channels=1, keypoints=4)
    head = torch.nn.Linear(8, 2)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=3e-2)

    def batch(n=64):
        pos = torch.randint(0, 12, (n, 2))
        img = torch.zeros(n, 1, 16, 16)
        for i, (r, c) in enumerate(pos.tolist()):
            img[i, 0, r : r + 4, c : c + 4] = 1.0
        target = (pos.float() + 1.5) / 7.5 - 1.0           # the square's centre in [-1, 1]
        return img, target.flip(-1)                         # (x, y)

    losses = []
    for _ in range(300):
        img, target = batch()
        loss = torch.nn.functional.mse_loss(head(layer(img)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.02 < losses[0]


def test_spatial_softmax_rejects_keypoints_without_channels():
    with pytest.raises(ValueError, match="channels"):
        SpatialSoftmax(0, keypoints=4)
