"""The one place where checkpoint files are unpickled: `torch.load` is held to weights_only=True while DeepSpeed reads.

DeepSpeed calls `torch.load(..., weights_only=False)` for its `*_states.pt` files (and in its universal-checkpoint
and zero_to_fp32 tools), so a crafted checkpoint would run code on resume or export. Within `weights_only_loads()`
every such call is made with weights_only=True instead: torch's restricted unpickler then rebuilds tensors, plain
containers and numbers, plus the few DeepSpeed value classes named in `_deepspeed_value_classes` (an enum, a
dataclass of two ints and the loss scaler's attributes; none runs code when rebuilt). Anything else is refused
with a SclabelError naming the file.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sclabel_dist.errors import SclabelError

_lock = threading.RLock()
_depth = 0


def _deepspeed_value_classes() -> list[type]:
    """The non-tensor classes DeepSpeed 0.15-0.19 pickles into ZeRO 1-3 and universal checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def _restricted_load(original: Any) -> Any:
    def load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True  # whatever the caller asked for
        try:
            return original(f, map_location=map_location, **kwargs)
        except pickle.UnpicklingError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SclabelError(
                f"{f}: refusing to load a checkpoint file that holds more than tensors and plain values "
                f"(a pickle could run code): {reason}"
            ) from None

    load.__wrapped__ = original  # type: ignore[attr-defined]
    return load


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within this block `torch.load` unpickles tensors, plain values and DeepSpeed's value classes only."""
    global _depth
    with _lock:
        classes = _deepspeed_value_classes()
        if _depth == 0:
            torch.load = _restricted_load(torch.load)
        _depth += 1
    try:
        with torch.serialization.safe_globals(classes):
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.load = torch.load.__wrapped__
