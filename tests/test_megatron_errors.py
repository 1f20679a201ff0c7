"""RacoMegatron's constructor rejects bad inputs with errors that name the fix (no ranks, no megatron needed)."""

from __future__ import annotations

import pytest
import torch

from raco_ds.megatron import RacoMegatron, UnsupportedMegatronSetupError


class _FakeDDP:
    """Looks like megatron's DistributedDataParallel to the constructor's checks."""

    buffers = ()

    def zero_grad_buffer(self) -> None: ...

    def no_sync(self): ...


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weights": [0.5, 0.6]}, ValueError, "sum to 1"),
        ({"weights": [1.5, -0.5]}, ValueError, "non-negative"),
        ({"weights": [0.5, 0.5], "c": 1.0}, ValueError, r"\[0, 1\)"),
        ({"weights": [0.5, 0.5], "aggregator": "nope"}, ValueError, "unknown aggregator"),
        ({"weights": [0.5, 0.5], "on_nonfinite": "ignore"}, ValueError, "on_nonfinite"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        RacoMegatron(_FakeDDP(), object(), **kwargs)


def test_rejects_a_model_not_wrapped_in_megatron_ddp() -> None:
    with pytest.raises(UnsupportedMegatronSetupError, match="megatron.core.distributed.DistributedDataParallel"):
        RacoMegatron(torch.nn.Linear(2, 2), object(), [0.5, 0.5])


def test_rejects_an_optimizer_not_from_megatron() -> None:
    plain = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(UnsupportedMegatronSetupError, match="get_megatron_optimizer"):
        RacoMegatron(_FakeDDP(), plain, [0.5, 0.5])
