"""The keys of a training batch (``shards.stream.collate_windows``; docs/CONTRACTS.md "shards.stream").

One name each, so that the stream that builds a batch and the recipes, models and jobs that read
it cannot drift apart. Sidecar fields join as ``<labeller>.<field>`` (``label_key``).
"""

FRAMES = "frames"  # uint8 [B, T, C, H, W]
ACTION = "action"  # float32 [B, T, A], raw units (zeros where the sample has none)
ACTION_MASK = "action_mask"  # bool [B]: the sample has real actions
STATE = "state"  # float32 [B, T, S]
STATE_MASK = "state_mask"  # bool [B]
EMBODIMENT = "embodiment"  # list[str]
TASK = "task"  # list[str]
KEY = "key"  # list[str]: the sample's key
START = "start"  # int64 [B]: the window's first frame in its episode
VALID = "valid"  # a sidecar's per-frame bool field: the row has a label
PRESENT = "present"  # optional_labels: the sidecar exists for this sample's data dir
PSEUDO_ACTION = "pseudo_action"  # an IDM sidecar's per-frame float32 [A] field: the action read, raw units


def label_key(labeller: str, field: str) -> str:
    """``<labeller>.<field>``: a sidecar field in the batch (e.g. ``idm.pseudo_action``)."""
    return f"{labeller}.{field}"
