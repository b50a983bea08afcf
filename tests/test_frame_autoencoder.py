"""The frame autoencoder (latent_actions/frame_autoencoder.py) and the decoder built on its frozen encoder:
the autoencoder learns to reconstruct frames; `wm train autoencoder` -> `wm train decoder
model.encoder_init=RUN model.freeze_encoder=true` starts from the pretrained stages and leaves them
unchanged (a frozen encoder gets no gradient) while its projection trains; the trained decoder loads
without the autoencoder folder; the features `wm label --labeller RUN_AE` caches equal the decoder's
frozen encoder output on the same frames; a folder that is not an autoencoder is a one-line error."""

import itertools
import shutil

import numpy as np
import torch
from safetensors.torch import load_file

from decoders.decoder import ActionDecoder
from latent_actions.frame_autoencoder import FrameAutoencoder, FrameAutoencoderConfig
from shards.sidecar import read_sidecar
from shards.stream import iter_samples
from tests.test_decoder import make_batch, make_config, wake_zero_layers
from tests.test_policies_more import _demos, _make, _video
from wm_pipeline.cli.main import main

TRAIN = ["train.progress=false", "train.log_every=1"]


def _squares(n=48, size=32, seed=0):
    """Frames with one bright square at a random place: reconstruction has to say where it is."""
    g = np.random.default_rng(seed)
    frames = np.full((n, 3, size, size), 40, np.uint8)
    for i, (y, x) in enumerate(g.integers(0, size - 6, (n, 2))):
        frames[i, :, y : y + 6, x : x + 6] = 220
    return torch.from_numpy(frames)


def test_frame_autoencoder_learns_to_reconstruct_frames():
    torch.manual_seed(0)
    model = FrameAutoencoder(FrameAutoencoderConfig(image_size=32, encoder_channels=[8, 16], code_channels=8))
    frames = _squares()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, _ = model({"frames": frames[:, None]})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:10]), (losses[:3], losses[-3:])
    assert model.features(frames[:2]).shape == (2, 16 * 4 * 4)


def test_a_frozen_encoder_gets_no_gradient_and_its_projection_does():
    torch.manual_seed(0)
    batch = make_batch()
    model = ActionDecoder(make_config(batch, objective="fm", freeze_encoder=True))
    wake_zero_layers(model)
    loss, _ = model(batch)
    loss.backward()
    assert all(p.grad is None for p in model.image_encoder.stages.parameters())
    assert model.image_encoder.proj.weight.grad is not None and model.image_encoder.proj.weight.grad.abs().sum() > 0


def test_decoder_on_a_pretrained_frozen_encoder_end_to_end(tmp_path, capsys):
    demos = _make(tmp_path / "demos", _demos, 4)
    video = _make(tmp_path / "video", _video, 4)
    ae = tmp_path / "ae"
    assert (
        main(
            [
                "train",
                "autoencoder",
                "--data",
                str(video),
                "--out",
                str(ae),
                "--preset",
                "tiny",
                "model.encoder_channels=8,16",
                "train.max_steps=20",
                "train.ckpt_every=20",
                *TRAIN,
            ]
        )
        == 0
    )
    ae_weights = {
        k[len("encoder.") :]: v
        for k, v in load_file(str(ae / "final" / "model.safetensors")).items()
        if k.startswith("encoder.")
    }
    assert ae_weights

    run = tmp_path / "dec"
    assert (
        main(
            [
                "train",
                "decoder",
                "--data",
                str(demos),
                "--out",
                str(run),
                "--preset",
                "tiny",
                f"model.encoder_init={ae}",
                "model.freeze_encoder=true",
                "train.max_steps=6",
                "train.ckpt_every=6",
                "data.batch_size=4",
                "model.horizon=4",
                "model.n_obs_steps=1",
                *TRAIN,
            ]
        )
        == 0
    )
    saved = load_file(str(run / "final" / "model.safetensors"))
    for k, v in ae_weights.items():  # the stages are the autoencoder's, untouched by training
        torch.testing.assert_close(saved[f"image_encoder.stages.{k}"], v, rtol=0, atol=0)

    # loading never reads the autoencoder's weights (its own weights follow): a corrupt file is not touched
    weights_file = ae / "final" / "model.safetensors"
    good = weights_file.read_bytes()
    weights_file.write_bytes(b"not safetensors")
    ActionDecoder.from_pretrained(str(run / "final"))
    weights_file.write_bytes(good)

    # the trained decoder is self-contained: it loads and acts with the autoencoder folder gone
    shutil.move(str(ae), str(tmp_path / "ae-moved"))
    decoder = ActionDecoder.from_pretrained(str(run / "final")).eval()
    assert decoder.config.freeze_encoder and decoder.config.encoder_channels == [8, 16]
    sample = next(iter(iter_samples(demos, split=False)))
    frames = sample.frames[None, :1]
    chunk = decoder.predict_action_chunk(
        frames, torch.as_tensor(sample.state[:1]), [sample.meta.task], generator=torch.Generator().manual_seed(0)
    )
    assert chunk.shape[1:] == (4, decoder.config.action_dim) and torch.isfinite(chunk).all()

    # cached features (wm label --labeller AE) equal what the decoder's frozen encoder computes
    shutil.move(str(tmp_path / "ae-moved"), str(ae))
    assert main(["label", "--labeller", str(ae), "--data", str(demos), "--no-progress"]) == 0
    rows = read_sidecar(demos, "autoencoder", "shard-000000.tar")
    row = rows[sample.meta.key if hasattr(sample.meta, "key") else sorted(rows)[0]]
    with torch.inference_mode():
        want = decoder.image_encoder.features(torch.as_tensor(sample.frames)).numpy()
    np.testing.assert_allclose(row["features"], want, rtol=1e-5, atol=1e-5)

    # training on the cached features: the same loss as running the frozen stages on the frames
    cached_run = tmp_path / "dec-cached"
    args = [
        "train",
        "decoder",
        "--data",
        str(demos),
        "--preset",
        "tiny",
        f"model.encoder_init={ae}",
        "model.freeze_encoder=true",
        "model.feature_key=autoencoder.features",
        "train.max_steps=4",
        "train.ckpt_every=4",
        "data.batch_size=4",
        "model.horizon=4",
        "model.n_obs_steps=1",
        *TRAIN,
    ]
    assert main([*args, "--out", str(cached_run)]) == 0
    from shards.stream import WindowStream, collate_windows

    model = ActionDecoder.from_pretrained(str(cached_run / "final"))
    windows = list(
        itertools.islice(
            WindowStream(str(demos), window=model.config.window_length, mode="train", seed=0, labels=("autoencoder",)),
            4,
        )
    )
    batch = collate_windows(windows)
    assert batch["autoencoder.features"].shape[-1] == 16 * 16
    live = {k: v for k, v in batch.items() if k != "autoencoder.features"}
    torch.manual_seed(3)
    loss_cached, _ = model(batch)
    torch.manual_seed(3)
    loss_live, _ = model(live)
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-5, atol=1e-6)
    # cached features with an augmentation, or from another autoencoder, are refused by name
    assert main([*args, "model.augment_shift=2", "--out", str(tmp_path / "no-aug")]) == 2
    assert "augment_shift" in capsys.readouterr().err
    other = tmp_path / "ae2"
    assert (
        main(
            [
                "train",
                "autoencoder",
                "--data",
                str(video),
                "--out",
                str(other),
                "--preset",
                "tiny",
                "model.encoder_channels=8,16",
                "train.max_steps=2",
                "train.ckpt_every=2",
                "train.seed=1",
                *TRAIN,
            ]
        )
        == 0
    )
    args[args.index(f"model.encoder_init={ae}")] = f"model.encoder_init={other}"
    assert main([*args, "--out", str(tmp_path / "no-other")]) == 2
    assert "other weights" in capsys.readouterr().err

    # a folder that is not an autoencoder is refused by name, before training
    assert (
        main(
            [
                "train",
                "decoder",
                "--data",
                str(demos),
                "--out",
                str(tmp_path / "no"),
                "--preset",
                "tiny",
                f"model.encoder_init={run}",
                "train.max_steps=1",
                *TRAIN,
            ]
        )
        == 2
    )
    assert "not a FrameAutoencoder" in capsys.readouterr().err
