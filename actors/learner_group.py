"""The learner group: the driver-side handle that places N learner ranks (``actors/learner.py``) and drives them.

``LearnerGroup`` reserves a placement group (one bundle per rank, packed), starts one ``LearnerActor`` per bundle with
the driver's storage credentials, has them form their process group, and then calls every method on every rank at
once (FSDP's collectives need all of them) and returns rank 0's result. A rank that dies is reported as
``LearnerDied`` as soon as Ray knows, not when the others' collective times out.

Not here: what a rank does (``actors/learner.py``), when the driver trains, pushes or saves (``jobs/loop.py``,
``jobs/run.py``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.learner import LearnerActor
from torl.config import Config
from torl.infra.storage import StorageError, credential_env, run_storage
from torl.rollout.types import LearnerDied, Trajectory

log = logging.getLogger(__name__)


def _on_every_rank(refs: list[ray.ObjectRef], what: str) -> list[Any]:
    """Results of one call per rank. A rank that died is reported at once, even while the others still wait for it
    inside a collective (they would only time out much later)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except ray.exceptions.RayActorError as exc:
            raise LearnerDied(f"learner rank {refs.index(done[0])} died during {what}: {exc}") from exc
    return ray.get(refs)


class LearnerGroup:
    """Driver-side handle on N learner actors in one placement group (see the module docstring)."""

    def __init__(self, cfg: Config, model_path: str) -> None:
        lc = self.cfg_learner = cfg.learner
        self.cfg = cfg
        if lc.num_workers < 1:
            raise ValueError(f"learner.num_workers must be >= 1, got {lc.num_workers}")
        self.storage = run_storage(cfg.trainer.storage_path, cfg.trainer.output_dir)
        # The ranks reach the storage with the driver's credentials when it has them in its environment (only those
        # that are values, unless the cluster is the embedded local one: torl/infra/storage.py).
        local_cluster = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        env = credential_env(os.environ, local_cluster) if self.storage is not None else {}
        bundle: dict[str, float] = {"CPU": lc.num_cpus}
        if lc.num_gpus:
            bundle["GPU"] = lc.num_gpus
        self.pg = placement_group([dict(bundle) for _ in range(lc.num_workers)], strategy="PACK")
        ray.get(self.pg.ready())
        self.actors = [
            LearnerActor.options(
                num_cpus=lc.num_cpus,
                num_gpus=lc.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                **({"runtime_env": {"env_vars": env}} if env else {}),
            ).remote(cfg, model_path, i, lc.num_workers)
            for i in range(lc.num_workers)
        ]
        addr, port = ray.get(self.actors[0].master_address.remote())
        ray.get([a.setup.remote(addr, port) for a in self.actors])

    def train_step(self, trajs: list[Trajectory], ahead: list[ray.ObjectRef] | None = None) -> dict[str, float]:
        """One optimizer pass on every rank; ``ahead``: refs of rollouts decoding meanwhile (see ``Learner``)."""
        ref = ray.put(trajs)  # one copy in the object store, read by every rank
        # ``ahead`` travels inside a list, so Ray hands the refs over unresolved.
        calls = [a.train_step.remote(ref, list(ahead or [])) for a in self.actors]
        return _on_every_rank(calls, "a training step")[0]

    def logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        return _on_every_rank([a.logprobs.remote(sequences) for a in self.actors], "log-probs")[0]

    def connect_generators(self, generators: list[Any]) -> None:
        """Form the weight-transfer group of learner rank 0 and every generator's engine (collective route)."""
        master = ray.get(self.actors[0].master_address.remote())
        calls = [a.connect_generators.remote(generators, master) for a in self.actors]
        _on_every_rank(calls, "joining the generators")

    def push_weights(self, version: int) -> dict[str, float]:
        """One broadcast of the current weights to all generators (collective route); rank 0's timings."""
        return _on_every_rank([a.push_weights.remote(version) for a in self.actors], "a weight push")[0]

    def state_dict_ref(self) -> ray.ObjectRef:
        """ObjectRef to the full CPU state dict (rank 0's result); waits until every rank left the gather."""
        refs = [a.full_state_dict.remote() for a in self.actors]
        ray.get(refs[1:])
        ray.wait(refs[:1])
        return refs[0]

    def save(self, step_dir: str | Path, extra: dict[str, Any]) -> str:
        """Atomic checkpoint at ``step_dir`` (on rank 0's node), stored in ``trainer.storage_path`` if set; then keep
        only the last ``trainer.keep_last``. Returns where it is stored. Raises StorageError when the upload failed
        (the checkpoint is complete on rank 0's node; the next save tries again)."""
        rng = _on_every_rank([a.rng_state.remote() for a in self.actors], "a checkpoint")
        failed = _on_every_rank([a.save.remote(str(step_dir), extra, rng) for a in self.actors], "a checkpoint")[0]
        if failed:
            raise StorageError(failed)
        if self.storage is None:
            return str(step_dir)
        self.storage.prune(self.cfg.trainer.keep_last)
        return self.storage.location(Path(step_dir).name)

    def load(self, step_dir: str | Path, stored: bool = False) -> dict[str, Any]:
        """Every rank loads ``step_dir``; ``stored``: each node's copy of the stored checkpoint (see Learner.load)."""
        calls = [a.load.remote(str(step_dir), stored) for a in self.actors]
        return _on_every_rank(calls, "loading a checkpoint")[0]

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=60)
        except Exception as exc:  # noqa: BLE001 - a dead or stuck rank must not keep the job alive
            log.warning("learner shutdown: %s", exc)
        finally:
            for a in self.actors:
                ray.kill(a)
            remove_placement_group(self.pg)
