"""``python -m vllm_adaptive.patches``: print the index of every recorded patch."""

from vllm_adaptive.patches import index_markdown

print(index_markdown())
