"""The decoder's diagnostic auxiliary loss (``aux_state_indices`` / ``aux_state_weight``): a linear head
reads chosen state dims off the current frame's image feature. It trains the image encoder (the head's
error falls, the encoder gets a gradient it would not get otherwise), is off by default, and is a
training target only: the policy's actions never read the auxiliary dims."""

import pytest
import torch

from decoders.decoder import ActionDecoder
from tests.test_decoder import N_OBS, make_batch, make_config, mean_of, predict, train, wake_zero_layers


def _batch_with_state_in_frames():
    """Frames whose brightness is the (normalised) state dim 5 of the current step: learnable from pixels."""
    batch = make_batch()
    s = batch["state"][:, N_OBS - 1, 5]
    level = ((s - s.min()) / (s.max() - s.min()) * 200 + 20).round().to(torch.uint8)
    batch["frames"] = level[:, None, None, None, None].expand_as(batch["frames"]).clone()
    return batch


def test_aux_state_loss_is_off_by_default_and_validated():
    batch = make_batch()
    assert ActionDecoder(make_config(batch)).aux_state_head is None
    with pytest.raises(ValueError, match="aux_state_indices"):
        ActionDecoder(make_config(batch, aux_state_weight=1.0))
    with pytest.raises(ValueError, match="must lie in"):
        ActionDecoder(make_config(batch, aux_state_weight=1.0, aux_state_indices=[99]))


def test_aux_state_head_learns_the_state_from_the_frames_through_the_encoder():
    torch.manual_seed(0)
    batch = _batch_with_state_in_frames()
    model = ActionDecoder(
        make_config(batch, objective="fm", state_indices=[0, 1, 2, 3], aux_state_indices=[5], aux_state_weight=1.0)
    )
    loss, metrics = model(batch)
    loss.backward()
    with_aux = model.image_encoder.proj.weight.grad.clone()
    model.zero_grad()
    plain = ActionDecoder(make_config(batch, objective="fm", state_indices=[0, 1, 2, 3]))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("aux_state_head")})
    torch.manual_seed(1)
    loss_p, _ = plain(batch)
    loss_p.backward()
    assert not torch.allclose(with_aux, plain.image_encoder.proj.weight.grad)  # the head trains the encoder

    history = train(model, batch, steps=150, lr=3e-3)
    first, last = mean_of(history, "aux_state_mse", slice(10)), mean_of(history, "aux_state_mse", slice(-10, None))
    assert last < 0.3 * first, (first, last)


def test_the_policy_never_reads_the_aux_state_dims():
    torch.manual_seed(0)
    batch = make_batch()
    model = ActionDecoder(
        make_config(
            batch, objective="fm", state_indices=[0, 1, 2, 3], aux_state_indices=[4, 5, 6], aux_state_weight=1.0
        )
    ).eval()
    wake_zero_layers(model)
    base = predict(model, batch)
    changed = {**batch, "state": batch["state"].clone()}
    changed["state"][..., 4:7] += 10.0
    torch.testing.assert_close(predict(model, changed), base)
