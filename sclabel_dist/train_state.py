"""TrainState: what a pretraining checkpoint records beside DeepSpeed's shards (JSON, written once per save)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sclabel_dist.errors import SclabelError


@dataclass
class TrainState:
    """The run's place and provenance at a checkpoint: read back on resume, by export and by the model card."""

    step: int
    loader: dict[str, Any]  # StreamingCellDataset.state_dict(): a few integers
    world_size: int
    config: dict[str, Any]  # the whole run config (config.to_dict)
    model_args: dict[str, Any]
    vocab_hash: str
    metrics: dict[str, float] = field(
        default_factory=dict
    )  # the last logged ones (the model card shows them)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: the one copy stored (checkpoint.STATE_FILE)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, raw: dict[str, Any], where: object = "train state") -> TrainState:
        """Back from state_dict(); a missing key names the file (keys added later get their defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in raw]
        if missing:
            raise SclabelError(f"{where}: not a complete train state (missing {missing})")
        return cls(**{k: raw[k] for k in names if k in raw})
