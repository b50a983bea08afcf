"""nets.augment.random_shift and the decoder's training-time augmentation (and its state_indices): frames move, by at most
``pad`` pixels and the same for every frame of a sample; actions, states and eval-mode outputs do not
change; a decoder trained with the shift still learns."""

import pytest
import torch

from decoders.decoder import ActionDecoder
from nets.augment import random_shift
from tests.test_decoder import N_OBS, make_batch, make_config, mean_of, train, wake_zero_layers


def _ramp(b=6, t=3, c=3, h=16, w=16):
    """Frames whose pixel value encodes its (row, col): a shift shows up as a readable offset."""
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    img = (rows * 16 + cols).to(torch.uint8)
    return img.expand(b, t, c, h, w).clone()


def test_random_shift_moves_each_sample_by_at_most_pad_and_the_same_for_its_frames():
    frames = _ramp()
    out = random_shift(frames, 4, generator=torch.Generator().manual_seed(0))
    assert out.shape == frames.shape and out.dtype == frames.dtype
    assert not torch.equal(out, frames)
    # All frames (and channels) of a sample got the same crop.
    assert torch.equal(out, out[:, :1, :1].expand_as(out))
    # Away from the replicated border, the value at (r, c) is frames' value at (r + dy, c + dx).
    centre = out[:, 0, 0, 6:10, 6:10].long()
    dy = centre[:, 0, 0] // 16 - 6
    dx = centre[:, 0, 0] % 16 - 6
    assert dy.abs().max() <= 4 and dx.abs().max() <= 4
    assert len({(int(a), int(b)) for a, b in zip(dy, dx)}) > 1  # offsets differ between samples
    for i in range(frames.shape[0]):
        want = frames[i, 0, 0, 6 + dy[i] : 10 + dy[i], 6 + dx[i] : 10 + dx[i]]
        assert torch.equal(out[i, 0, 0, 6:10, 6:10], want)
    assert torch.equal(random_shift(frames, 0), frames)


def test_decoder_augments_frames_in_training_only_and_keeps_actions():
    torch.manual_seed(0)
    batch = make_batch()
    plain = ActionDecoder(make_config(batch, objective="fm"))
    shifted = ActionDecoder(make_config(batch, objective="fm", augment_shift=4))
    shifted.load_state_dict(plain.state_dict())
    before = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}

    # Same weights, same flow noise: only the frames differ, so the losses do too (in training).
    torch.manual_seed(1)
    loss_plain, _ = plain(batch)
    torch.manual_seed(1)
    loss_shift, _ = shifted(batch)
    assert not torch.isclose(loss_plain, loss_shift)
    for k, v in before.items():  # the batch (frames, actions, states) is left as it was
        assert torch.equal(batch[k], v), k

    # Eval mode: no augmentation, identical predictions.
    plain.eval()
    shifted.eval()
    torch.manual_seed(1)
    a, _ = plain(batch)
    torch.manual_seed(1)
    b, _ = shifted(batch)
    torch.testing.assert_close(a, b)
    g = torch.Generator().manual_seed(3)
    chunk_a = plain.predict_action_chunk(
        batch["frames"][:, :N_OBS], batch["state"][:, N_OBS - 1], batch["task"], generator=g
    )
    g = torch.Generator().manual_seed(3)
    chunk_b = shifted.predict_action_chunk(
        batch["frames"][:, :N_OBS], batch["state"][:, N_OBS - 1], batch["task"], generator=g
    )
    torch.testing.assert_close(chunk_a, chunk_b)


def test_decoder_with_random_shift_still_learns():
    torch.manual_seed(0)
    batch = make_batch()
    model = ActionDecoder(make_config(batch, objective="fm", augment_shift=2))
    history = train(model, batch, steps=200, lr=3e-3)
    first, last = mean_of(history, "mse", slice(20)), mean_of(history, "mse", slice(-20, None))
    assert last < 0.5 * first, (first, last)


def test_state_indices_keep_only_the_chosen_state_dims():
    torch.manual_seed(0)
    batch = make_batch()
    model = ActionDecoder(make_config(batch, objective="fm", state_indices=[0, 1, 2, 3])).eval()
    assert model.state_proj.in_features == 4
    wake_zero_layers(model)

    def chunk(state):
        return model.predict_action_chunk(
            batch["frames"][:, :N_OBS], state, batch["task"], generator=torch.Generator().manual_seed(5)
        )

    state = batch["state"][:, N_OBS - 1]
    base = chunk(state)
    ignored = state.clone()
    ignored[:, 4:] += 100.0  # dims the decoder does not read
    torch.testing.assert_close(chunk(ignored), base)
    read = state.clone()
    read[:, 0] += 5.0  # a dim it reads
    assert not torch.allclose(chunk(read), base)
    with pytest.raises(ValueError, match="state_indices"):
        ActionDecoder(make_config(batch, state_indices=[0, 99]))
