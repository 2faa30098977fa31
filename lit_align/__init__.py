"""lit_align: Lightning-native alignment, unlearning and watermarking for language models.

Subpackages:
    models     builders from YAML specs (causal LMs, tokenizers, LoRA, references, reward heads, FSDP2)
    data       DataModules, typed batches, collators, record loaders, built-in tiny datasets
    losses     pure objective functions: tensors in, ``(loss, metrics)`` out
    rollout    generation and scoring: KV-cache sampler, sequence log-probs
    methods    one LightningModule per method
    callbacks  Lightning callbacks (sample tables, HF export, ...)
"""

__version__ = "0.1.0"
