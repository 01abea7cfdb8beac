"""Parallel degrees and the device mesh built from them.

The mesh always has the four named dims ``("pp", "dp_replicate", "dp_shard", "tp")``
(degree-1 dims included), plus the flattened ``dp_mesh`` (= dp_replicate x dp_shard) used for
data loading and loss averaging. Rank order: tp is innermost, so tensor-parallel peers are
neighbours (the same host on GPU clusters).
"""

from __future__ import annotations

from dataclasses import dataclass

from cairn.config.manager import ConfigError
from cairn.config.job_config import ParallelismSection

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int
    cp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        named = {"data_parallel_replicate_degree": self.dp_replicate, "tensor_parallel_degree": self.tp,
                 "pipeline_parallel_degree": self.pp, "context_parallel_degree": self.cp,
                 "expert_parallel_degree": self.ep}
        others = self.dp_replicate * self.tp * self.pp * self.cp * self.ep
        product = " x ".join(f"--parallelism.{k} ({v})" for k, v in named.items() if v != 1) or "1"
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ConfigError([
                    f"world size {self.world_size} (NGPU x nodes) is not divisible by {product} = {others}, so "
                    "--parallelism.data_parallel_shard_degree -1 cannot take the rest"])
            self.dp_shard = self.world_size // others
        if others * self.dp_shard != self.world_size:
            raise ConfigError([
                f"--parallelism.data_parallel_shard_degree ({self.dp_shard}) x {product} = "
                f"{others * self.dp_shard}, but the world size is {self.world_size} (NGPU x nodes)"])
        self._mesh = None

    @classmethod
    def from_config(cls, config: ParallelismSection, world_size: int) -> "ParallelDims":
        return cls(dp_replicate=config.data_parallel_replicate_degree, dp_shard=config.data_parallel_shard_degree,
                   tp=config.tensor_parallel_degree, pp=config.pipeline_parallel_degree, world_size=world_size,
                   cp=config.context_parallel_degree, ep=config.expert_parallel_degree)

    @property
    def dp_degree(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def degrees(self) -> dict[str, int]:
        """The layout, as recorded in checkpoint manifests."""
        return {"world_size": self.world_size, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard,
                "tp": self.tp, "pp": self.pp}

    def build_mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=MESH_DIMS)
        # Keep the flattened mesh: slicing "dp" back out of the root mesh is deprecated.
        self._dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self._mesh = mesh
        return mesh

    @property
    def dp_mesh(self):
        """The flattened data-parallel mesh (dp_replicate x dp_shard): data sharding, loss averaging."""
        if self._mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self._dp_mesh

    @property
    def mesh(self):
        if self._mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self._mesh
