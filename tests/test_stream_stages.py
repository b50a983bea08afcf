"""Each stage of the window stream (shards.stages) alone, on tiny real shard datasets written by
shards.writer; WindowStream's composition of them is tested in test_stream.py."""

import copy
import itertools
import logging

import numpy as np
import pytest
import torch

from shards import batch_keys as bk
from shards.decode import DecodeError
from shards.format import FormatError, read_manifest
from shards.sidecar import write_sidecar_shard
from shards.stages import (
    Decoded,
    SampleReader,
    SkipLog,
    batched,
    cut_windows,
    dataset_shards,
    decode,
    flatten,
    label_starts,
    long_episodes,
    mix,
    random_starts,
    read_samples,
    shard_cycles,
    shuffle,
    split_shards,
    tiled_starts,
)
from test_stream import LENGTHS, _corrupt_copy, make_dataset, stored

KEYS = [f"ep{i}" for i in range(len(LENGTHS))]  # 2 per shard: shard-000000 ep0 ep1, -000001 ep2 ep3, -000002 ep4


@pytest.fixture(scope="module")
def robot(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("robot"))


@pytest.fixture(scope="module")
def truth(robot):
    return stored(robot)


def _samples(robot, **kw):
    shards = [(robot, s) for s in dataset_shards(robot, read_manifest(robot))]
    return list(read_samples(shards, SampleReader(**kw)))


# ---------------------------------------------------------------- 1. list shards


def test_dataset_shards_lists_the_shards_holding_wanted_keys(robot):
    manifest = read_manifest(robot)
    assert [s.name for s in dataset_shards(robot, manifest)] == [f"shard-00000{i}.tar" for i in range(3)]
    assert [s.name for s in dataset_shards(robot, manifest, {"ep3", "nope"})] == ["shard-000001.tar"]
    assert dataset_shards(robot, manifest, set()) == []


def test_split_shards_is_disjoint_and_complete_for_every_rank_and_worker():
    items = list(range(11))
    for world, workers in itertools.product([1, 2, 3], [1, 2, 4]):
        parts = [split_shards(items, r, world, w, workers) for r in range(world) for w in range(workers)]
        assert sorted(sum(parts, [])) == items
    assert split_shards(items, 1, 2, 0, 2) == [1, 5, 9]


def test_shard_cycles_walk_this_slots_shards_in_a_fresh_order_each_cycle():
    shards = [f"s{i}" for i in range(6)]
    cycles = shard_cycles(shards, np.random.default_rng(0), slot=1, slots=3)
    first = list(itertools.islice(cycles, 8))
    assert all(sorted(c) == ["s1", "s4"] for c in first)  # disjoint slice when shards >= slots
    assert len({tuple(c) for c in first}) == 2  # both orders come up: reshuffled per cycle
    few = next(shard_cycles(shards[:2], np.random.default_rng(0), slot=2, slots=3))
    assert sorted(few) == ["s0", "s1"]  # fewer shards than slots: everyone walks all
    again = list(itertools.islice(shard_cycles(shards, np.random.default_rng(0), 1, 3), 8))
    assert again == first  # seeded


# ---------------------------------------------------------------- 2. read samples


def test_sample_reader_gives_checked_samples_in_order_and_joins_sidecars(robot, truth, tmp_path):
    import shutil

    samples = _samples(robot)
    assert [s.key for s in samples] == KEYS
    for s in samples:
        assert s.meta.n_frames == LENGTHS[int(s.key[2:])] and s.camera == "front" and s.labels == {}
        assert np.array_equal(s.action, truth[s.key]["action"])
    assert [s.camera for s in _samples(robot, camera="wrist")] == ["wrist"] * 5
    assert [s.key for s in _samples(robot, keys={robot: {"ep1", "ep4"}})] == ["ep1", "ep4"]
    # sidecar rows join by key
    robot = shutil.copytree(robot, tmp_path / "copy")
    entry = read_manifest(robot)["shards"][0]
    write_sidecar_shard(
        robot,
        "toy",
        entry["name"],
        {k: {"code": np.arange(LENGTHS[int(k[2:])]) + 100 * int(k[2:])} for k in entry["keys"]},
    )
    joined = list(SampleReader(labels={robot: ["toy"]})(robot, robot / entry["name"]))
    assert [s.labels["toy"]["code"][0] for s in joined] == [0, 100]


def test_sample_reader_raises_or_counts_a_key_the_shard_lacks(robot, caplog):
    manifest = copy.deepcopy(read_manifest(robot))
    manifest["shards"][1]["keys"] = [*manifest["shards"][1]["keys"], "ghost"]  # the manifest promises more
    shard = robot / manifest["shards"][1]["name"]
    with pytest.raises(FormatError, match=r"shard-000001.tar: 1 sample\(s\) the manifest lists .*'ghost'"):
        list(SampleReader(manifests={robot: manifest})(robot, shard))
    skips = SkipLog()
    with caplog.at_level(logging.WARNING):
        got = list(SampleReader(manifests={robot: manifest}, on_error="skip", skips=skips)(robot, shard))
    assert [s.key for s in got] == ["ep2", "ep3"] and skips.count == 1
    assert any("ghost" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="on_error"):
        SampleReader(on_error="ignore")


def test_long_episodes_keep_what_holds_a_window_cycle_after_cycle(robot):
    shards = dataset_shards(robot, read_manifest(robot))
    rng = np.random.default_rng(0)
    got = list(itertools.islice(long_episodes(shard_cycles(shards, rng, 0, 1), robot, SampleReader(), 8, 2), 9))
    assert {s.key for s in got} == {"ep0", "ep2", "ep4"}  # 20, 17, 24 frames >= 15; 13, 9 not
    assert sorted(s.key for s in got[:3]) == sorted(s.key for s in got[3:6]) == ["ep0", "ep2", "ep4"]
    with pytest.raises(FormatError, match="no episode with at least 25 frames"):
        next(long_episodes(shard_cycles(shards, rng, 0, 1), robot, SampleReader(), 25, 1))


def test_mix_draws_each_item_from_a_source_by_weight():
    rng = np.random.default_rng(0)
    drawn = list(itertools.islice(mix([itertools.repeat("a"), itertools.repeat("b")], [0.8, 0.2], rng), 2000))
    assert 0.75 < drawn.count("a") / len(drawn) < 0.85
    assert set(itertools.islice(mix([itertools.repeat("a"), itertools.repeat("b")], [1.0, 0.0], rng), 50)) == {"a"}


# ---------------------------------------------------------------- 3. window starts


def test_tiled_starts_tile_each_episode_or_start_every_kth_frame(robot, caplog):
    samples = _samples(robot)
    assert [st for _, st in tiled_starts(samples, 4, 2)] == [label_starts(n, 4, 2) for n in LENGTHS]
    assert [st for _, st in tiled_starts(samples, 4, 2, every=3)] == [list(range(0, n - 6, 3)) for n in LENGTHS]
    with caplog.at_level(logging.WARNING):
        short = dict((s.key, st) for s, st in tiled_starts(samples, 10, 1))
    assert short["ep3"] == [] and any("ep3: 9 frames, too short" in r.getMessage() for r in caplog.records)


def test_random_starts_are_sorted_in_range_and_seeded(robot):
    samples = _samples(robot)
    draw = list(random_starts(samples, np.random.default_rng(3), 3, 3, per_episode=5))
    for sample, starts in draw:
        assert len(starts) == 5 and starts == sorted(starts)
        assert 0 <= starts[0] and starts[-1] + 6 < sample.meta.n_frames  # a window spans 7 frames
    assert draw == list(random_starts(samples, np.random.default_rng(3), 3, 3, per_episode=5))


# ---------------------------------------------------------------- 4. decode


def test_decode_gives_the_frames_the_windows_need_once(robot, truth):
    s0, s3 = _samples(robot)[0], _samples(robot)[3]
    out = list(decode([(s0, [0, 5]), (s3, []), (s3, [0, 1, 2])], window=4, stride=2, backend="pyav"))
    assert [d.sample.key for d in out] == ["ep0", "ep3"]  # an episode without starts is passed over
    assert out[0].index.tolist() == [0, 2, 4, 5, 6, 7, 9, 11]
    assert np.array_equal(out[0].frames.numpy(), truth["ep0"]["frames"][out[0].index].transpose(0, 3, 1, 2))
    assert out[1].index is None and out[1].frames.shape == (9, 3, 32, 32)  # every frame needed: all decoded
    small = next(decode([(s0, [0])], window=2, stride=1, backend="pyav", size=(16, 8)))
    assert small.frames.shape == (2, 3, 16, 8) and small.frames.dtype == torch.uint8


def test_decode_raises_or_counts_an_undecodable_video(robot, tmp_path):
    bad = _corrupt_copy(robot, tmp_path / "bad", "ep2")
    items = [(s, [0]) for s in _samples(bad)]
    with pytest.raises(DecodeError, match="shard-000001.tar:ep2"):
        list(decode(items, window=4, stride=1, backend="pyav"))
    skips = SkipLog()
    kept = list(decode(items, window=4, stride=1, backend="pyav", on_error="skip", skips=skips))
    assert [d.sample.key for d in kept] == ["ep0", "ep1", "ep3", "ep4"] and skips.count == 1


# ---------------------------------------------------------------- 5. cut windows


def test_cut_windows_follow_the_contract_and_equal_the_stored_arrays(robot, truth):
    s1 = _samples(robot)[1]
    s1.labels["lam"] = {"code": np.arange(13, dtype=np.int64), "summary": np.array([1.0, 2.0], np.float32)}
    frames = torch.from_numpy(truth["ep1"]["frames"]).permute(0, 3, 1, 2).contiguous()
    (group,) = cut_windows(
        [Decoded(s1, [0, 6], frames, None)],
        window=4,
        stride=2,
        action_dim=6,
        state_dim=3,
        optional_labels={"lam": {}, "idm": {"pseudo_action": ((2,), np.dtype("float32"))}},
    )
    assert [w[bk.START] for w in group] == [0, 6]
    w = group[1]
    idx = 6 + 2 * np.arange(4)
    assert set(w) == {
        bk.FRAMES,
        bk.ACTION,
        bk.STATE,
        bk.ACTION_MASK,
        bk.STATE_MASK,
        bk.EMBODIMENT,
        bk.TASK,
        bk.KEY,
        bk.START,
        "lam.code",
        "lam.summary",
        "lam.present",
        "idm.present",
        "idm.pseudo_action",
    }
    assert torch.equal(w[bk.FRAMES], frames[idx])
    assert w[bk.ACTION].shape == (4, 6) and np.array_equal(w[bk.ACTION][:, :4].numpy(), truth["ep1"]["action"][idx])
    assert not w[bk.ACTION][:, 4:].any()  # zero-padded to the widest embodiment
    assert np.array_equal(w[bk.STATE].numpy(), truth["ep1"]["state"][idx])
    assert w[bk.ACTION_MASK] is True and (w[bk.EMBODIMENT], w[bk.TASK], w[bk.KEY]) == ("sawyer", "task1", "ep1")
    assert w["lam.code"].tolist() == idx.tolist() and w["lam.summary"].tolist() == [1.0, 2.0]  # per-frame: cut
    assert w["lam.present"] is True and w["idm.present"] is False
    assert w["idm.pseudo_action"].shape == (4, 2) and not w["idm.pseudo_action"].any()
    needed = np.arange(0, 13, 2)
    sparse = Decoded(s1, [0, 6], frames[needed], needed)  # only the frames the windows need
    (again,) = cut_windows([sparse], window=4, stride=2, action_dim=4, state_dim=3)
    assert torch.equal(again[1][bk.FRAMES], frames[idx])


# ---------------------------------------------------------------- 6. shuffle, 7. batch


def test_shuffle_hands_out_every_item_once_in_a_seeded_random_order():
    groups = [list(range(i * 10, i * 10 + 7)) for i in range(5)]
    out = list(shuffle(groups, 8, np.random.default_rng(0)))
    assert sorted(out) == sorted(flatten(groups)) and out != list(flatten(groups))
    assert out == list(shuffle(groups, 8, np.random.default_rng(0)))
    assert sorted(shuffle(groups, 1000, np.random.default_rng(0))) == sorted(flatten(groups))  # left-overs flushed
    assert list(flatten(groups))[:8] == [0, 1, 2, 3, 4, 5, 6, 10]


def test_batched_collates_consecutive_windows(robot):
    samples = _samples(robot)
    windows = list(
        flatten(
            cut_windows(
                decode(tiled_starts(samples, 4, 1), window=4, stride=1, backend="pyav"),
                window=4,
                stride=1,
                action_dim=4,
                state_dim=3,
            )
        )
    )
    sizes = [b[bk.FRAMES].shape[0] for b in batched(windows, 5)]
    assert sum(sizes) == len(windows) and sizes[:-1] == [5] * (len(sizes) - 1)
    assert all(b[bk.FRAMES].shape[0] == 5 for b in batched(windows, 5, partial=False))
    first = next(batched(windows, 3))
    assert first[bk.ACTION_MASK].dtype == torch.bool and first[bk.START].tolist() == [w[bk.START] for w in windows[:3]]
    with pytest.raises(ValueError, match="batch_size"):
        next(batched(windows, 0))
