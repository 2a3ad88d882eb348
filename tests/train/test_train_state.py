"""TrainState: the one stored copy of a checkpoint's train state (issue 17)."""

from __future__ import annotations

import pytest

from sclabel_dist.errors import SclabelError
from sclabel_dist.train_state import TrainState


def test_round_trip_and_older_states() -> None:
    state = TrainState(
        step=5,
        loader={"seed": 0, "epoch": 1, "samples_seen": 64, "world_size": 2},
        world_size=2,
        config={"train": {"max_steps": 10}},
        model_args={"vocab_size": 12},
        vocab_hash="ab" * 32,
        metrics={"loss": 1.5},
    )
    assert TrainState.from_state_dict(state.state_dict()) == state
    older = {k: v for k, v in state.state_dict().items() if k != "metrics"}  # a key added later
    assert TrainState.from_state_dict(older).metrics == {}
    with pytest.raises(
        SclabelError, match=r"ckpt/step_00000005: not a complete train state \(missing \['loader'\]\)"
    ):
        TrainState.from_state_dict({k: v for k, v in older.items() if k != "loader"}, "ckpt/step_00000005")
