"""Meta-World (MuJoCo, rendered on the CPU) as a small dict-observation environment.

``MetaWorldEnv(task, seed)`` wraps gymnasium's ``Meta-World/MT1`` for one of the 50 ``*-v3`` tasks
and returns observations as ``{"image": uint8 [H, W, 3], "state": float32 [39], "task": str}``.

Seeding (see docs/SIMULATION.md): an episode is a pure function of its seed. ``reset(seed=s)``
reseeds the simulator's generator and draws the episode's object/goal layout (MuJoCo's
``rand_vec``) from it, so one env (and its costly GL context) can be reused for many episodes and
``reset(seed=s)`` always gives the same episode whatever ran before. MT1's own goal list (50
layouts fixed at construction) is bypassed because it would make nearby seeds share layouts.

Rendering speed-ups (docs/SIMULATION.md has the numbers): the 4096x4096 shadow map is switched
off, the off-screen buffer is made exactly the requested size, and floor reflections are off.
The ``corner*`` cameras render upside down in Meta-World; their rows are flipped.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from wm_pipeline.exit_codes import UsageError

log = logging.getLogger(__name__)
# PyOpenGL logs an INFO line about an optional speed-up module in every process that imports it.
logging.getLogger("OpenGL.acceleratesupport").setLevel(logging.WARNING)

EMBODIMENT = "sawyer"
ACTION_DIM = 4
STATE_DIM = 39
MAX_PATH_LENGTH = 500  # Meta-World raises past this many steps in one episode
FLIPPED_CAMERAS = frozenset({"corner", "corner2", "corner3", "corner4"})
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")

# One readable sentence per task, used as the episode's language instruction.
INSTRUCTIONS = {
    "assembly": "Pick up the nut and place it onto the peg.",
    "basketball": "Pick up the ball and dunk it into the basket.",
    "bin-picking": "Pick the puck out of one bin and place it into the other bin.",
    "box-close": "Pick up the lid and place it on the box.",
    "button-press-topdown": "Press the button from the top.",
    "button-press-topdown-wall": "Press the button from the top, past the wall.",
    "button-press": "Press the button.",
    "button-press-wall": "Press the button, past the wall.",
    "coffee-button": "Push the button on the coffee machine.",
    "coffee-pull": "Pull the mug out of the coffee machine.",
    "coffee-push": "Push the mug under the coffee machine.",
    "dial-turn": "Rotate the dial 180 degrees.",
    "disassemble": "Pick the nut off the peg.",
    "door-close": "Close the door.",
    "door-lock": "Lock the door by rotating the lock clockwise.",
    "door-open": "Open the door.",
    "door-unlock": "Unlock the door by rotating the lock counter-clockwise.",
    "drawer-close": "Push the drawer closed.",
    "drawer-open": "Pull the drawer open.",
    "faucet-close": "Rotate the faucet clockwise.",
    "faucet-open": "Rotate the faucet counter-clockwise.",
    "hammer": "Hammer the nail into the wall.",
    "hand-insert": "Insert the gripper into the hole.",
    "handle-press-side": "Press the handle down sideways.",
    "handle-press": "Press the handle down.",
    "handle-pull-side": "Pull the handle up sideways.",
    "handle-pull": "Pull the handle up.",
    "lever-pull": "Pull the lever down 90 degrees.",
    "peg-insert-side": "Insert the peg sideways into the hole.",
    "peg-unplug-side": "Unplug the peg sideways.",
    "pick-out-of-hole": "Pick the puck up out of the hole.",
    "pick-place": "Pick up the puck and place it at the goal.",
    "pick-place-wall": "Pick up the puck and place it at the goal, past the wall.",
    "plate-slide-back-side": "Slide the plate sideways back into the cabinet.",
    "plate-slide-back": "Slide the plate back into the cabinet.",
    "plate-slide-side": "Slide the plate sideways into the cabinet.",
    "plate-slide": "Slide the plate into the cabinet.",
    "push-back": "Pull the puck back to the goal.",
    "push": "Push the puck to the goal.",
    "push-wall": "Push the puck to the goal, past the wall.",
    "reach": "Reach the goal position.",
    "reach-wall": "Reach the goal position, past the wall.",
    "shelf-place": "Pick up the puck and place it onto the shelf.",
    "soccer": "Kick the soccer ball into the goal.",
    "stick-pull": "Grasp the stick and pull the box with it.",
    "stick-push": "Grasp the stick and push the box with it.",
    "sweep-into": "Sweep the puck into the hole.",
    "sweep": "Sweep the puck off the table.",
    "window-close": "Push the window closed.",
    "window-open": "Push the window open.",
}


def list_tasks() -> list[str]:
    """The 50 Meta-World task names (``*-v3``), sorted."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted(ALL_V3_ENVIRONMENTS)


def check_task(task: str) -> str:
    """Return ``task`` if it is a Meta-World task, else raise a UsageError listing the valid names."""
    tasks = list_tasks()
    if task not in tasks:
        raise UsageError(f"unknown Meta-World task {task!r}; valid tasks: {', '.join(tasks)}")
    return task


def parse_tasks(spec: str) -> list[str]:
    """``"reach-v3,push-v3"`` -> checked task list (``"all"`` gives all 50)."""
    if spec.strip() == "all":
        return list_tasks()
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise UsageError("no tasks given (e.g. --tasks reach-v3,push-v3)")
    return [check_task(t) for t in names]


def instruction(task: str) -> str:
    """A readable sentence for ``task`` (``"push-v3"`` -> ``"Push the puck to the goal."``)."""
    base = task.rsplit("-v", 1)[0]
    return INSTRUCTIONS.get(base, base.replace("-", " ").capitalize() + ".")


def expert_policy(task: str) -> Callable[[np.ndarray], np.ndarray]:
    """The scripted expert of ``task``: ``state float [39] -> action float32 [4]``.

    Found in ``metaworld.policies.ENV_POLICY_MAP`` when present, otherwise by class name
    (``push-back-v3`` -> ``SawyerPushBackV3Policy``; names are compared without case and dashes,
    and a policy class whose name starts with the task's words is accepted, which covers
    ``peg-insert-side`` -> ``SawyerPegInsertionSideV3Policy``).
    """
    import metaworld.policies as policies

    # The experts warn on every call that their gains exceed the action range; the env clips.
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", module="metaworld")
    check_task(task)
    cls = getattr(policies, "ENV_POLICY_MAP", {}).get(task)
    if cls is None:
        words = task.rsplit("-v", 1)[0].split("-")
        version = "V" + task.rsplit("-v", 1)[1]
        candidates = {
            n[len("Sawyer") : -len(version + "Policy")].lower(): n
            for n in dir(policies)
            if n.startswith("Sawyer") and n.endswith(version + "Policy")
        }
        key = "".join(words)
        name = candidates.get(key)
        if name is None:  # e.g. "peg insert side" vs "PegInsertionSide": match word prefixes in order
            name = next((n for c, n in sorted(candidates.items()) if _words_prefix_match(words, c)), None)
        if name is None:
            raise UsageError(f"no scripted expert policy for Meta-World task {task!r} in metaworld.policies")
        cls = getattr(policies, name)
    return cls().get_action


def _words_prefix_match(words: list[str], joined: str) -> bool:
    """True if ``joined`` is ``words`` in order, each but the last possibly lengthened
    (``["peg", "insert", "side"]`` matches ``"peginsertionside"``)."""
    pattern = "".join(re.escape(w) + "[a-z]*" for w in words[:-1]) + re.escape(words[-1])
    return re.fullmatch(pattern, joined) is not None


class MetaWorldEnv:
    """One Meta-World task with image + state observations.

    ``reset(seed=None) -> obs``; ``step(action [4]) -> (obs, reward, done, info)`` where ``done``
    is True once ``max_steps`` actions have been taken, ``info["success"]`` is whether the task
    was solved at ANY step so far (Meta-World's flag can drop back to 0 afterwards) and
    ``info["success_now"]`` is this step's flag. Observations are
    ``{"image": uint8 [H, W, 3], "state": float32 [39], "task": str}``.
    """

    action_dim = ACTION_DIM
    state_dim = STATE_DIM
    embodiment = EMBODIMENT

    def __init__(
        self,
        task: str,
        seed: int = 0,
        resolution: int = 64,
        camera: str = "corner",
        max_steps: int = 200,
        video_size: int | None = None,
    ):
        check_task(task)
        if camera not in CAMERAS:
            raise UsageError(f"unknown Meta-World camera {camera!r}; valid cameras: {', '.join(CAMERAS)}")
        if resolution <= 0 or resolution % 2:
            raise UsageError(f"--resolution must be a positive even number (H.264 needs it), got {resolution}")
        if video_size is not None and (video_size <= 0 or video_size % 2):
            raise UsageError(f"--video-size must be a positive even number (H.264 needs it), got {video_size}")
        if not 0 < max_steps <= MAX_PATH_LENGTH:
            raise UsageError(
                f"--max-steps must be in 1..{MAX_PATH_LENGTH} (Meta-World's episode limit), got {max_steps}"
            )
        os.environ.setdefault("MUJOCO_GL", "egl")
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
        import gymnasium as gym
        import metaworld  # noqa: F401  (registers the Meta-World/* gymnasium ids)

        self.task, self.seed, self.camera, self.max_steps = task, seed, camera, max_steps
        self.resolution = resolution
        self.image_size = (resolution, resolution)
        self._env = gym.make(
            "Meta-World/MT1",
            env_name=task,
            seed=seed,
            render_mode="rgb_array",
            camera_name=camera,
            width=resolution,
            height=resolution,
            terminate_on_success=False,
            max_episode_steps=MAX_PATH_LENGTH,
            disable_env_checker=True,
        )
        self._sim = self._env.unwrapped
        # Stop MT1's wrapper from replacing the layout with one of its 50 fixed tasks on reset,
        # and let the simulator draw the layout from its own (reseeded) generator instead.
        selector = self._task_selector()
        selector.sample_tasks_on_reset = False
        self._sim.set_task(selector.tasks[0])  # the task's fixed settings; the layout comes from reset
        self._sim._freeze_rand_vec = False
        self._sim.seeded_rand_vec = True
        # Must happen before the first render creates the GL context and its buffers.
        self._sim.model.vis.quality.shadowsize = 0
        # the off-screen buffer also holds the video frames when they are larger than the policy's images
        self.video_size = video_size
        self._sim.model.vis.global_.offwidth = max(resolution, video_size or 0)
        self._sim.model.vis.global_.offheight = max(resolution, video_size or 0)
        self._video_renderer = None
        self._flip = camera in FLIPPED_CAMERAS
        self._scene_ready = False
        self._steps = 0
        self._success = False
        self.render_seconds: list[float] = []  # wall time of each render, for benchmarks

    @property
    def fps(self) -> float:
        """Control rate: one action every ``frame_skip * timestep`` simulated seconds (80 Hz)."""
        return 1.0 / (self._sim.frame_skip * float(self._sim.model.opt.timestep))

    @property
    def steps(self) -> int:
        return self._steps

    def _task_selector(self):
        env = self._env
        while env is not None:
            if hasattr(env, "sample_tasks_on_reset"):
                return env
            env = getattr(env, "env", None)
        raise RuntimeError("Meta-World/MT1 has no task-selection wrapper; metaworld version not supported")

    def reset(self, seed: int | None = None) -> dict[str, Any]:
        """Start the episode of ``seed`` (default: the constructor's seed). Returns the first obs."""
        seed = self.seed if seed is None else int(seed)
        self._sim.seed(seed)
        self._sim._freeze_rand_vec = False
        state, _ = self._env.reset()
        # Meta-World moves the goal marker after its last kinematics update, so the first frame
        # would show the previous episode's marker: recompute positions (qpos/qvel are unchanged).
        import mujoco

        mujoco.mj_forward(self._sim.model, self._sim.data)
        self._steps, self._success = 0, False
        return self._observation(state)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        """Apply ``action`` float [4] (clipped to [-1, 1]); see the class docstring for the returns."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"Meta-World actions have {ACTION_DIM} dims, got shape {list(action.shape)}")
        if self._steps >= self.max_steps:
            raise RuntimeError(f"episode is over ({self.max_steps} steps): call reset()")
        state, reward, _, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        success_now = bool(info.get("success", 0.0) > 0.5)
        self._success = self._success or success_now
        done = self._steps >= self.max_steps
        info = {"success": self._success, "success_now": success_now, "steps": self._steps}
        return self._observation(state), float(reward), done, info

    def render(self) -> np.ndarray:
        """The current camera image, uint8 [H, W, 3], right side up."""
        if not self._scene_ready:
            self._env.render()  # creates the viewer, whose scene flags we can then change
            import mujoco

            viewer = self._sim.mujoco_renderer._get_viewer("rgb_array")
            viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            self._scene_ready = True
        start = time.perf_counter()
        image = self._env.render()
        self.render_seconds.append(time.perf_counter() - start)
        if self._flip:
            image = image[::-1]
        return np.ascontiguousarray(image, dtype=np.uint8)

    def render_video(self) -> np.ndarray:
        """The current camera image at ``video_size`` (uint8 [V, V, 3], right side up) for rollout videos,
        rendered apart from the policy's observation (which stays at ``resolution``); without
        ``video_size``, the observation image itself."""
        if self.video_size is None or self.video_size == self.resolution:
            return self.render()
        import mujoco

        if self._video_renderer is None:
            self._video_renderer = mujoco.Renderer(self._sim.model, self.video_size, self.video_size)
            self._video_renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._video_renderer.update_scene(self._sim.data, camera=self.camera)
        image = self._video_renderer.render()
        if self._flip:
            image = image[::-1]
        return np.ascontiguousarray(image, dtype=np.uint8)

    def _observation(self, state: np.ndarray) -> dict[str, Any]:
        return {"image": self.render(), "state": np.asarray(state, dtype=np.float32), "task": self.task}

    def close(self) -> None:
        if self._video_renderer is not None:
            self._video_renderer.close()
            self._video_renderer = None
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
