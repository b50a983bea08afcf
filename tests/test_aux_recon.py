"""The decoder's auxiliary reconstruction loss (``aux_recon_weight`` / ``aux_recon_size``): a small head
redraws the current frame from the per-frame feature the policy conditions on. It is off by default
and validated, it trains the image encoder (the reconstruction error falls, the encoder gets a
gradient from it alone), and samples without actions still count: action-free frames train the
encoder through it."""

import pytest
import torch

from decoders.decoder import ActionDecoder
from nets.frame_decoder import FrameDecoder
from tests.test_decoder import make_batch, make_config, mean_of, train


def _blob_batch(seed=0):
    """Frames with one bright square at a per-sample position on a fixed background: only the
    square's place changes between samples, as the arm and the objects do in a fixed scene."""
    batch = make_batch(seed)
    b, t, c, h, w = batch["frames"].shape
    g = torch.Generator().manual_seed(seed)
    frames = torch.full((b, t, c, h, w), 40, dtype=torch.uint8)
    ys, xs = torch.randint(0, h - 4, (b,), generator=g), torch.randint(0, w - 4, (b,), generator=g)
    for i in range(b):
        frames[i, :, :, ys[i] : ys[i] + 4, xs[i] : xs[i] + 4] = 230
    batch["frames"] = frames
    return batch


def test_frame_decoder_shapes_and_sizes():
    assert FrameDecoder(16, 32, 3, width=32)(torch.randn(5, 16)).shape == (5, 3, 32, 32)
    assert FrameDecoder(16, 4, 1)(torch.randn(2, 16)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="power of two"):
        FrameDecoder(16, 24)


def test_aux_recon_is_off_by_default_and_validated():
    batch = make_batch()
    assert ActionDecoder(make_config(batch)).aux_recon_head is None
    with pytest.raises(ValueError, match="aux_recon_size 12"):
        ActionDecoder(make_config(batch, aux_recon_weight=1.0, aux_recon_size=12))
    with pytest.raises(ValueError, match="aux_recon_weight must be >= 0"):
        ActionDecoder(make_config(batch, aux_recon_weight=-1.0))


def test_aux_recon_trains_the_encoder_and_counts_action_free_samples():
    torch.manual_seed(0)
    batch = _blob_batch()
    batch["action_mask"] = torch.zeros_like(batch["action_mask"])  # no sample has actions
    model = ActionDecoder(make_config(batch, objective="fm", aux_recon_weight=1.0, aux_recon_size=8))
    loss, metrics = model(batch)
    loss.backward()  # the flow loss is masked out entirely: any encoder gradient is the reconstruction's
    grad = model.image_encoder.stages[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert metrics["aux_recon_mse"] > 0

    history = train(model, batch, steps=150, lr=3e-3)
    first = mean_of(history, "aux_recon_mse", slice(10))
    last = mean_of(history, "aux_recon_mse", slice(-10, None))
    assert last < 0.3 * first, (first, last)

    # the feature places the square: the redrawn frame is brightest where the square is
    model.eval()
    with torch.no_grad():
        obs = batch["frames"][:, 1]
        drawn = model.aux_recon_head(model.image_features(batch["frames"][:, :2])[:, -1]).mean(1)
    target = torch.nn.functional.adaptive_avg_pool2d(obs.float(), 8).mean(1)
    hit = (drawn.flatten(1).argmax(1) == target.flatten(1).argmax(1)).float().mean()
    assert hit >= 0.75, hit
