"""Parallel degrees and the device meshes built from them.

Every mesh is a view of one root mesh, so parameters placed on different meshes still share a
root, as FSDP2 requires of a DTensor parameter it shards further:

- ``mesh``, the root: the dense mesh ``("pp", "dp_replicate", "dp_shard", "cp", "tp")``: every parameter
  but the routed experts. Degree-1 dims are kept, so code names dims without checking degrees.
  Rank order: tp innermost (tensor-parallel peers are neighbours, one host on GPU clusters),
  then cp, dp_shard, dp_replicate, pp.
- ``dp_mesh``: dp_replicate x dp_shard flattened: data sharding (the ``cp`` ranks of one dp
  rank read the same sequences, each keeping its own tokens of them).
- ``fsdp_mesh``: what FSDP2 shards parameters over, dp_shard x cp (as torchtitan folds context
  parallelism into FSDP's shard dim: the cp ranks hold the same parameters), with dp_replicate
  as HSDP's outer dim. Gradients are averaged over it: the loss mean over dp x cp ranks.
- ``cp_mesh``: the ranks that split each sequence (``cairn.distributed.context_parallel``).
- ``sparse_mesh``, ``("pp", "dp_replicate", "efsdp", "ep")``: the routed experts of a
  mixture-of-experts model. Expert parallelism borrows its ranks from the ranks that hold the
  same parameters otherwise, dp_shard x cp x tp (as torchtitan does): the ``ep`` ranks that
  exchange tokens are the innermost ``ep`` of them (the tp peers first), and ``efsdp`` =
  dp_shard x cp x tp / ep shards each rank's experts further. Over the same ranks, so the
  meshes line up: the dense mesh's (dp_shard, cp, tp) block is the sparse mesh's (efsdp, ep)
  block. It is the root flattened to one dim and unflattened again (``DeviceMesh._unflatten``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cairn.config.manager import ConfigError
from cairn.config.job_config import ParallelismSection

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
SPARSE_MESH_DIMS = ("pp", "dp_replicate", "efsdp", "ep")
_FLAGS = {"dp_replicate": "--parallelism.data_parallel_replicate_degree",
          "dp_shard": "--parallelism.data_parallel_shard_degree", "tp": "--parallelism.tensor_parallel_degree",
          "pp": "--parallelism.pipeline_parallel_degree", "cp": "--parallelism.context_parallel_degree",
          "ep": "--parallelism.expert_parallel_degree"}


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
        named = {_FLAGS[k]: getattr(self, k) for k in ("dp_replicate", "tp", "pp", "cp")}
        others = self.dp_replicate * self.tp * self.pp * self.cp
        product = " x ".join(f"{k} ({v})" for k, v in named.items() if v != 1) or "1"
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
        problem = self.expert_parallel_problem()
        if problem:
            raise ConfigError([problem])
        self._mesh = None

    def expert_parallel_problem(self) -> str | None:
        """EP borrows dp_shard x cp x tp ranks: its degree must divide their number."""
        if self.ep == 1 or self.ep_region % self.ep == 0:
            return None
        parts = " x ".join(f"{_FLAGS[k]} ({getattr(self, k)})" for k in ("dp_shard", "cp", "tp")
                           if k == "dp_shard" or getattr(self, k) != 1)
        return (f"--parallelism.expert_parallel_degree ({self.ep}) must divide {parts} = {self.ep_region}: "
                "expert parallelism borrows its ranks from those that shard the other parameters")

    @classmethod
    def from_config(cls, config: ParallelismSection, world_size: int) -> "ParallelDims":
        return cls(dp_replicate=config.data_parallel_replicate_degree, dp_shard=config.data_parallel_shard_degree,
                   tp=config.tensor_parallel_degree, pp=config.pipeline_parallel_degree, world_size=world_size,
                   cp=config.context_parallel_degree, ep=config.expert_parallel_degree)

    @property
    def dp_degree(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def ep_region(self) -> int:
        """Ranks of one pipeline stage and replica that hold the same parameters: dp_shard x cp x tp."""
        return self.dp_shard * self.cp * self.tp

    @property
    def efsdp(self) -> int:
        """FSDP degree of the routed experts: the EP region's ranks that hold the same experts."""
        return self.ep_region // self.ep

    @property
    def dp_cp_degree(self) -> int:
        """Ranks whose losses average into a step's (dp x cp): what gradients are divided by."""
        return self.dp_degree * self.cp

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP shards the parameters over dp_shard x cp."""
        return self.dp_shard * self.cp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

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
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def degrees(self) -> dict[str, int]:
        """The layout, as recorded in checkpoint manifests (cp and ep only when used, so a dense
        model's layouts read as they always have)."""
        out = {"world_size": self.world_size, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard,
               "tp": self.tp, "pp": self.pp}
        out.update({k: getattr(self, k) for k in ("cp", "ep") if getattr(self, k) != 1})
        return out

    def build_mesh(self, device_type: str):
        """Build the dense and sparse meshes; returns the dense one (also ``self.mesh``)."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp),
                                mesh_dim_names=MESH_DIMS)
        # Kept: slicing "dp" back out of the root mesh is deprecated.
        self._dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        # Every rank holding the same pipeline stage: the MoE balancing counts are summed over it.
        self._stage_mesh = mesh["dp_replicate", "dp_shard", "cp", "tp"]._flatten("stage")
        world = mesh._flatten("world")
        self._sparse_mesh = world._unflatten(0, (self.pp, self.dp_replicate, self.efsdp, self.ep), SPARSE_MESH_DIMS)
        self._fsdp_mesh = self._shard_mesh(mesh, world)
        self._mesh = mesh
        return mesh

    def _shard_mesh(self, mesh, world):
        if self.cp == 1:
            return mesh["dp_replicate", "dp_shard"] if self.dp_replicate_enabled else mesh["dp_shard"]
        # dp_shard x cp as one dim (slicing a flattened dim back out of the root mesh is
        # deprecated, hence the view of its own, over the same ranks in the same order).
        view = world._unflatten(0, (self.pp, self.dp_replicate, self.dp_shard * self.cp, self.tp),
                                ("pp", "dp_replicate", "dp_shard_cp", "tp"))
        return view["dp_replicate", "dp_shard_cp"] if self.dp_replicate_enabled else view["dp_shard_cp"]

    def _built(self, name: str):
        if self._mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return getattr(self, name)

    @property
    def mesh(self):
        """The dense mesh, ``("pp", "dp_replicate", "dp_shard", "cp", "tp")``."""
        return self._built("_mesh")

    @property
    def dp_mesh(self):
        """The flattened data-parallel mesh (dp_replicate x dp_shard): which sequences a rank reads."""
        return self._built("_dp_mesh")

    @property
    def fsdp_mesh(self):
        """What FSDP2 shards parameters over: dp_shard x cp, with dp_replicate outside for HSDP."""
        return self._built("_fsdp_mesh")

    @property
    def cp_mesh(self):
        """The ranks that split each sequence."""
        return self._built("_mesh")["cp"]

    @property
    def stage_mesh(self):
        """All ranks of one pipeline stage (dp_replicate x dp_shard x cp x tp), flattened."""
        return self._built("_stage_mesh")

    @property
    def sparse_mesh(self):
        """The routed experts' mesh, ``("pp", "dp_replicate", "efsdp", "ep")``."""
        return self._built("_sparse_mesh")
