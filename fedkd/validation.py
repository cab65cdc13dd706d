"""Validation of every client reply before the server uses it.

A reply is used only if:

* it carries one ArrayRecord under ``arrays`` whose names, shapes and dtypes are exactly
  those of the client's architecture group, with finite values only;
* its ``num-examples`` metric is a positive finite number, and its training loss (when
  sent) is finite;
* its label counts are ``num_classes`` non-negative integers summing to ``num-examples``;
* with ``validation.max-update-norm > 0``, ``‖w_client − w_global‖₂`` is within the bound.

Error replies (a crashed ClientApp) are not validated here: the Grid counts them as
``failures`` and the strategy skips them. Everything else that fails is ``rejected``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedkd import records


def _finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def check_reply(
    msg: Message, expected: ArrayRecord, num_classes: int, max_update_norm: float = 0.0, spec: ArrayRecord | None = None
) -> str | None:
    """Why ``msg`` must be rejected, or None when it is usable.

    ``expected`` is the server's current state of the client's group (names, shapes, and the
    reference of the update norm). ``spec`` is a freshly built model of the architecture: its
    dtypes are the ones a client must send. The current state's dtypes are no reference:
    Flower's averaging turns integer buffers (BatchNorm's ``num_batches_tracked``) into
    floats, and a client loads them back into its integer buffers. Without ``spec``, any
    numeric dtype is accepted.
    """
    content = msg.content
    arrays = content.array_records.get(records.ARRAYS)
    if arrays is None:
        return f"no '{records.ARRAYS}' ArrayRecord"
    if list(arrays.keys()) != list(expected.keys()):
        missing = sorted(set(expected) - set(arrays))[:3]
        extra = sorted(set(arrays) - set(expected))[:3]
        return f"array names do not match the architecture (missing {missing}, unexpected {extra})"
    sq = 0.0
    for name, arr in arrays.items():
        ref = expected[name]
        want = spec[name].dtype if spec is not None and name in spec else None
        a = arr.numpy()
        if (
            tuple(arr.shape) != tuple(ref.shape)
            or (want is not None and arr.dtype != want)
            or a.dtype.kind not in "biuf"
        ):
            return f"array {name!r} is {arr.dtype}{list(arr.shape)}, expected {want or 'numeric'}{list(ref.shape)}"
        if a.dtype.kind in "fc":
            if not np.isfinite(a).all():
                return f"array {name!r} holds NaN or Inf"
            if max_update_norm > 0:
                sq += float(np.sum((a.astype(np.float64) - ref.numpy().astype(np.float64)) ** 2))
    metrics = content.metric_records.get(records.METRICS)
    n = metrics.get(records.NUM_EXAMPLES) if metrics is not None else None
    if not _finite_number(n) or float(n) <= 0:  # type: ignore[arg-type]
        return f"'{records.NUM_EXAMPLES}' is missing or not a positive number: {n!r}"
    loss = metrics.get(records.TRAIN_LOSS) if metrics is not None else None
    if loss is not None and not _finite_number(loss):
        return f"'{records.TRAIN_LOSS}' is not finite: {loss!r}"
    info = content.config_records.get(records.INFO)
    counts = info.get(records.LABEL_COUNTS) if info is not None else None
    if (
        not isinstance(counts, list)
        or len(counts) != num_classes
        or any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in counts)
    ):
        return "label counts are missing or malformed"
    total = sum(int(c) for c in counts)  # type: ignore[arg-type]
    if total != int(n):  # type: ignore[arg-type]
        return f"label counts sum to {total} but num-examples is {n}"
    if max_update_norm > 0 and math.sqrt(sq) > max_update_norm:
        return f"update norm {math.sqrt(sq):.3g} exceeds validation.max-update-norm = {max_update_norm:g}"
    return None
