"""Let vLLM's Ray executor run on the CPU platform.

vLLM places one Ray actor per rank in a placement-group bundle holding one unit
of ``current_platform.ray_device_key``, and reads each actor's device ids from
Ray. The CPU platform leaves that key empty, so ``--distributed-executor-backend
ray`` fails with "current platform cpu does not support ray" (docs/VLLM_NOTES.md,
trap 5). Ray's own ``CPU`` resource cannot be the key: vLLM asks for it through
``resources=`` and Ray refuses that name there.

On the CPU platform only (CUDA keeps vLLM's behaviour untouched):

* ``CpuPlatform.ray_device_key`` becomes the custom Ray resource ``vllm_cpu``:
  one unit per vLLM rank a node may host.
* ``get_node_and_physical_gpu_ids`` of both Ray executors' actors answers ``(node id, [])``:
  a CPU worker has no device id to pin (its cores come from its local rank).
* ``initialize_ray_cluster`` first joins a running cluster (``ray start``,
  ``RAY_ADDRESS``) and otherwise starts a local one that offers ``vllm_cpu``
  for every rank, as vLLM starts one with ``num_gpus`` on CUDA. A cluster
  without enough ``vllm_cpu`` fails at once with the ``ray start`` line that
  fixes it, instead of waiting for a placement group that can never form.
* Ray compiled graphs pass pipeline-stage tensors through shared memory
  (``VLLM_USE_RAY_COMPILED_DAG_CHANNEL_TYPE=shm``, as vLLM sets for TPU and
  XPU) unless the user chose otherwise.
"""

from __future__ import annotations

import os

from vllm_adaptive.patches import PatchRecord

RAY_RESOURCE = "vllm_cpu"

RECORD = PatchRecord(
    area="Ray executor on the CPU platform",
    targets=(
        "vllm.platforms.cpu.CpuPlatform.ray_device_key",
        "vllm.v1.executor.ray_utils.RayWorkerWrapper.get_node_and_physical_gpu_ids",
        "vllm.v1.executor.ray_executor_v2.RayWorkerProc.get_node_and_physical_gpu_ids",
        "vllm.v1.executor.ray_utils.initialize_ray_cluster",
        "vllm.v1.executor.ray_executor.initialize_ray_cluster",
        "vllm.v1.executor.ray_executor_v2.initialize_ray_cluster",
    ),
    why="the CPU platform has no Ray resource key, so vLLM's Ray executor refuses "
    "it ('does not support ray')",
    how="CPU only: the custom resource vllm_cpu as the key, no device ids per actor, "
    "a local cluster that offers vllm_cpu per rank (or a clear error when a joined "
    "cluster lacks it), shm channels for compiled graphs",
    upstream="none filed yet",
    delete_when="CpuPlatform sets ray_device_key and its Ray workers need no device ids",
)


def missing_resource_message(have: float, need: int) -> str:
    return (
        f"the Ray cluster offers {have:g} '{RAY_RESOURCE}' resources but "
        f"--tensor-parallel-size x --pipeline-parallel-size needs {need}: on the CPU "
        f"platform each vLLM rank takes one '{RAY_RESOURCE}'. Start every node with "
        f"`ray start ... --resources '{{\"{RAY_RESOURCE}\": N}}'` (N = the ranks it may "
        "host), or let vLLM start a local cluster (no RAY_ADDRESS, no running cluster)"
    )


def _make_init(original):
    def initialize_ray_cluster(parallel_config, ray_address=None, require_gpu_on_driver=True):
        import ray

        need = parallel_config.world_size
        if not ray.is_initialized():
            try:  # join a running cluster, like vLLM does on ROCm and XPU
                ray.init(address=ray_address or "auto", runtime_env=parallel_config.ray_runtime_env)
            except ConnectionError:
                if ray_address or os.environ.get("RAY_ADDRESS"):
                    raise
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                ray.init(resources={RAY_RESOURCE: need}, runtime_env=parallel_config.ray_runtime_env)
        if parallel_config.placement_group is None and ray.util.get_current_placement_group() is None:
            have = ray.cluster_resources().get(RAY_RESOURCE, 0)
            if have < need:
                raise RuntimeError(missing_resource_message(have, need))
        return original(parallel_config, ray_address=ray_address,
                        require_gpu_on_driver=require_gpu_on_driver)

    return initialize_ray_cluster


def _make_ids(original):
    def get_node_and_physical_gpu_ids(self):
        import ray

        return ray.get_runtime_context().get_node_id(), []

    return get_node_and_physical_gpu_ids


def apply() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.platforms.cpu import CpuPlatform

    if not CpuPlatform.ray_device_key:
        CpuPlatform.ray_device_key = RAY_RESOURCE
    os.environ.setdefault("VLLM_USE_RAY_COMPILED_DAG_CHANNEL_TYPE", "shm")
    try:
        import ray  # noqa: F401
    except ImportError:  # no Ray installed: nothing else to patch
        return
    from vllm.v1.executor import ray_executor, ray_executor_v2, ray_utils

    from vllm_adaptive.patches import wrap

    wrap(ray_utils.RayWorkerWrapper, "get_node_and_physical_gpu_ids", _make_ids)
    wrap(ray_executor_v2.RayWorkerProc, "get_node_and_physical_gpu_ids", _make_ids)
    for module in (ray_utils, ray_executor, ray_executor_v2):
        wrap(module, "initialize_ray_cluster", _make_init)
