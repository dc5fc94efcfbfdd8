from vllm_adaptive.patches import index_markdown

print(index_markdown())
