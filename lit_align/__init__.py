"""lit_align: Lightning-native alignment, unlearning and watermarking for language models.

Subpackages:
    models     builders from YAML specs (causal LMs, tokenizers, LoRA, references, reward heads, FSDP2)
    data       DataModules, typed batches, collators, record loaders, built-in tiny datasets
    losses     pure objective functions: tensors in, ``(loss, metrics)`` out
    rollout    generation and scoring: KV-cache sampler, log-probs, token statistics, KL, PPO experience
    methods    one LightningModule per method
    unlearning weight attribution (WAGLE and baselines) and parameter masks
    metrics    scoring functions and torchmetrics metrics (unlearning, detection)
    watermark  statistical text watermarks (KGW green-list baseline: bias + z-score detector)
    callbacks  Lightning callbacks (sample tables, HF export, weight masks, unlearning evaluation)

Modules: ``cli`` (the ``lit-align`` command), ``errors`` (``ConfigError``/``DataError``), ``paths``.
"""

__version__ = "0.1.0"
