"""The processes training together (``mlx.launch``), or just this one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from afm_mlx.core.errors import UserError
from afm_mlx.data.corpus import corpus_digest
from afm_mlx.models.io import checkpoint_digest


@dataclass(frozen=True)
class World:
    """The processes training together (``mlx.launch``), or just this one.

    Data parallelism: every rank holds the whole model, reads its own slice of each global batch,
    and the gradients are combined across ranks before the (identical) optimizer step; rank 0
    alone writes checkpoints, logs, plots and the final model.
    """

    group: Any = None  # mx.distributed.Group, None when alone
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.main:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        if self.size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def check_agreement(self, parts: dict[str, Callable[[], str]]) -> None:
        """Refuse to start unless every rank computed the same value of each part (e.g. config,
        data, model). All ranks take part in one ``all_gather``, even a rank whose part failed
        (its error is what it reports), so a disagreement is one line on every rank, not a hang.
        """
        if self.size == 1:
            return
        digests, errors = [], {}
        for name, compute in parts.items():
            try:
                value = compute()
            except UserError as e:
                errors[name] = str(e)
                value = f"error on rank {self.rank}: {e}"
            digests.append(np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8))
        mine = mx.array(np.concatenate(digests))
        try:
            everyone = np.array(mx.distributed.all_gather(mine[None], group=self.group))
        except RuntimeError as e:  # a rank stopped before the check (its own error says why)
            raise UserError(
                f"rank {self.rank} of {self.size}: lost the other ranks before starting ({e}); "
                "see the first error above"
            ) from None
        everyone = everyone.reshape(self.size, len(parts), 32)
        differ = [
            name
            for i, name in enumerate(parts)
            if any((everyone[r, i] != everyone[0, i]).any() for r in range(self.size))
        ]
        if errors:
            raise UserError(f"rank {self.rank}: {next(iter(errors.values()))}")
        if differ:
            raise UserError(
                f"rank {self.rank} of {self.size}: the ranks do not agree on the "
                f"{' and '.join(differ)}; start every rank with the same flags, data and model"
            )

    def check_same_run(self, cfg: Any, data: str | None, models: Iterable[str | None]) -> None:
        """``check_agreement`` on what a training run starts from: its options (``cfg``, a
        dataclass), the contents of its corpus ``data`` (None: data made from the models) and
        of the checkpoints in ``models`` (empty entries skipped)."""
        self.check_agreement(
            {
                "configuration": lambda: json.dumps(dataclasses.asdict(cfg), sort_keys=True),
                "data": lambda: corpus_digest(data) if data else "from the models",
                "model": lambda: "|".join(checkpoint_digest(m) for m in models if m),
            }
        )


def init_world() -> World:
    """This process's ``World``: the ``mlx.launch`` group, or a world of one."""
    if not mx.distributed.is_available():
        return World()
    group = mx.distributed.init()
    return World(group, group.rank(), group.size()) if group.size() > 1 else World()
