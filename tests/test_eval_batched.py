"""`wm eval --num-envs N`: episodes on N environments in lockstep with one batched policy call per step give
the same per-episode results as one at a time (seeds are per episode), for the chunk queue, the temporal
ensemble, the scripted expert and a (tiny, untrained) flow-matching decoder policy."""

from __future__ import annotations

import numpy as np
import pytest

from decoders.decoder import ActionDecoder, DecoderConfig
from decoders.policy import ChunkedPolicy, DecoderPolicy
from wm_pipeline.jobs import closed_loop_eval as ev
from wm_pipeline.jobs.policy import ExpertPolicy


class SeededChunks(ChunkedPolicy):
    """Chunk = a function of the episode's seed, its own step and the state history: any mix-up between
    episodes running side by side changes the actions."""

    action_dim = 2

    def predict_chunk(self, obs_history):
        rng = np.random.default_rng([self.episode_seed, self._step])
        return rng.normal(size=(5, 2)) + obs_history["state"].sum()


def _obs(seed, t):
    return {"image": np.zeros((2, 2, 3), np.uint8), "state": np.array([seed * 0.01 + t], np.float32), "task": "t"}


@pytest.mark.parametrize("kw", [dict(n_obs_steps=2, n_action_steps=3), dict(n_action_steps=1, temporal_ensemble=0.3)])
def test_act_batch_equals_act_per_episode(kw):
    lengths = {0: 7, 1: 4, 2: 9}
    single = SeededChunks(**kw)
    want = {}
    for seed, n in lengths.items():
        single.reset(seed)
        want[seed] = [single.act(_obs(seed, t)) for t in range(n)]
    batched = SeededChunks(**kw)
    got = {s: [] for s in lengths}
    batched.reset_slot(0, 0)
    batched.reset_slot(1, 1)
    slot_seed, calls = {0: 0, 1: 1}, 0
    while slot_seed:
        slots = sorted(slot_seed)
        actions = batched.act_batch([_obs(slot_seed[k], len(got[slot_seed[k]])) for k in slots], slots)
        calls += 1
        for k, a in zip(slots, actions):
            got[slot_seed[k]].append(a)
        for k in slots:
            if len(got[slot_seed[k]]) == lengths[slot_seed[k]]:
                if slot_seed[k] == 1:  # episode 2 starts in slot 1 while slot 0 is mid-episode
                    slot_seed[k] = 2
                    batched.reset_slot(k, 2)
                else:
                    del slot_seed[k]
    for seed in lengths:
        assert np.array_equal(np.stack(got[seed]), np.stack(want[seed])), seed
    assert len(batched.latencies) < len(single.latencies)  # chunks of several episodes in one call


class ChunkedExpert(ChunkedPolicy):
    """The scripted expert held for a chunk, plus noise from the episode's seed and its own step."""

    action_dim = 4

    def __init__(self):
        self.expert = ExpertPolicy()
        super().__init__(n_obs_steps=2, n_action_steps=3)

    def predict_chunk(self, obs_history):
        rng = np.random.default_rng([self.episode_seed, self._step])
        obs = {"state": obs_history["state"][-1], "task": obs_history["task"]}
        return np.repeat(self.expert.act(obs)[None], 4, axis=0) + rng.normal(0, 0.1, (4, 4))


def _rows(results):
    return [(r["seed"], r["success"], r["sum_reward"]) for r in results["tasks"]["reach-v3"]["per_episode"]]


@pytest.mark.parametrize("make", [ExpertPolicy, ChunkedExpert], ids=["expert", "chunked-expert"])
def test_num_envs_4_gives_the_episodes_of_num_envs_1(make):
    # 3 episodes on 2 envs: the third starts beside the second, when the first ends
    runs = {n: ev.evaluate(make(), ["reach-v3"], episodes=3, seed=2, resolution=16, num_envs=n) for n in (1, 2)}
    assert _rows(runs[1]) == _rows(runs[2])  # same seeds, successes, rewards (exactly)
    assert [e["length"] for e in runs[1]["episodes"]] == [e["length"] for e in runs[2]["episodes"]]
    assert len({e["length"] for e in runs[1]["episodes"]}) > 1  # episodes end at different steps
    assert runs[2]["num_envs"] == 2 and runs[1]["tasks"]["reach-v3"]["success_rate"] == 1.0


def test_num_envs_with_a_decoder_policy_batches_its_calls():
    stats = {
        "sawyer": {
            "action": {"mean": [0.0] * 4, "std": [0.5] * 4, "min": [-1.0] * 4, "max": [1.0] * 4},
            "state": {"mean": [0.0] * 39, "std": [1.0] * 39, "min": [-1.0] * 39, "max": [1.0] * 39},
        }
    }
    decoder = ActionDecoder(
        DecoderConfig.from_preset(
            "tiny", action_dim=4, state_dim=39, image_size=[16, 16], tasks=["reach-v3"], stats=stats
        )
    )
    runs = {}
    for n in (1, 3):
        policy = DecoderPolicy(decoder, n_action_steps=4)
        runs[n] = (
            ev.evaluate(policy, ["reach-v3"], episodes=3, seed=0, resolution=16, max_steps=8, num_envs=n),
            len(policy.latencies),
        )
    one, three = runs[1][0], runs[3][0]
    for a, b in zip(one["tasks"]["reach-v3"]["per_episode"], three["tasks"]["reach-v3"]["per_episode"]):
        assert (a["seed"], a["success"]) == (b["seed"], b["success"])
        assert b["sum_reward"] == pytest.approx(a["sum_reward"], rel=1e-4)  # batched kernels: rounding only
    assert [e["length"] for e in one["episodes"]] == [e["length"] for e in three["episodes"]]
    assert runs[1][1] == 3 * 2 and runs[3][1] == 2  # 8 steps / 4 per chunk: 6 single calls vs 2 batched
