"""Pipeline parallelism on the CPU platform: allocate the stage buffers.

A non-first pipeline stage receives the previous stage's hidden states into
``GPUModelRunner.intermediate_tensors``, which vLLM allocates only inside
``_dummy_run`` (the warm-up). vLLM's CPU worker skips the warm-up when the
model is eager and the KV size explicit (``CPUWorker._should_warm_up_model``),
so the first real step of stage 2 fails ``assert self.intermediate_tensors is
not None`` (seen with stock CPU_ATTN and ``--pipeline-parallel-size 2``, Ray
executor). On CPU only, the wrap allocates the buffers as ``_dummy_run``
would, on first use.
"""

from __future__ import annotations

from vllm_adaptive.patches import PatchRecord

RECORD = PatchRecord(
    area="pipeline-parallel stage buffers on CPU",
    targets=("vllm.v1.worker.cpu_model_runner.CPUModelRunner.sync_and_gather_intermediate_tensors",),
    why="the CPU worker skips the warm-up that allocates intermediate_tensors, so every "
    "non-first pipeline stage fails on its first step",
    how="CPU only: allocate them (make_empty_intermediate_tensors, max_num_tokens rows) when "
    "still None, then call the original",
    upstream="none filed yet",
    delete_when="vLLM allocates intermediate_tensors outside _dummy_run, or the CPU worker "
    "warms up pipeline-parallel models",
)


def apply() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from vllm_adaptive.patches import wrap

    def make(original):
        def sync_and_gather_intermediate_tensors(self, num_tokens, intermediate_tensors, sync_self):
            if self.intermediate_tensors is None:
                self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                    batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
            return original(self, num_tokens, intermediate_tensors, sync_self)

        return sync_and_gather_intermediate_tensors

    wrap(CPUModelRunner, "sync_and_gather_intermediate_tensors", make)
