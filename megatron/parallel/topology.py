"""Process grid (pipeline x data x tensor) shared with DeepSpeed as its `mpu`.

Rank order follows DeepSpeed / NeoX: the tensor axis varies fastest, then data, then pipeline,
so tensor-parallel peers are neighbours (same node) and pipeline stages are furthest apart.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

from megatron.config.schema import ParallelConfig
from megatron.parallel.layers import SINGLE, TensorParallel


@dataclass
class Parallelism:
    grid: Any  # deepspeed PipelineParallelGrid (the `mpu`)
    tp: TensorParallel
    dp_rank: int
    dp_size: int
    dp_group: Any
    pp_size: int  # 1 without a pipeline engine
    pp_rank: int


def build_parallelism(p: ParallelConfig, world_size: int) -> Parallelism:
    # deferred: deepspeed is a heavy import, needed only once a run builds its grid
    from deepspeed.runtime.pipe.topology import (
        PipelineParallelGrid,
        PipeModelDataParallelTopology,
    )

    pp, tp = max(1, p.pipe_parallel_size), p.model_parallel_size
    dp = world_size // (pp * tp)
    # DeepSpeed prints "Using topology: {ProcessCoord(...): 0, ...}" (one entry per rank) to
    # stdout; the run's first line already gives the layout (world | ... x dp).
    with contextlib.redirect_stdout(io.StringIO()):
        grid = PipelineParallelGrid(topology=PipeModelDataParallelTopology(pp, tp, dp))
    tp_ctx = (
        TensorParallel(tp, grid.get_slice_parallel_rank(), grid.get_slice_parallel_group())
        if tp > 1
        else SINGLE
    )
    return Parallelism(
        grid=grid,
        tp=tp_ctx,
        dp_rank=grid.get_data_parallel_rank(),
        dp_size=grid.get_data_parallel_world_size(),
        dp_group=grid.get_data_parallel_group(),
        pp_size=pp,
        pp_rank=grid.get_pipe_parallel_rank(),
    )
