"""Retrieval and label-free generation machinery shared by ISARA and FEWL (issue 19).

Sentence encoders, exact cosine kNN with deterministic ties and near-duplicate exclusion, a text retriever,
pluggable similarities SIM(premise, hypothesis) in [0, 1], a generation cache with cached generation, and
set diversity measures. This layer sits above ``lit_align.engine`` and below the methods and metrics.
"""

from lit_align.retrieval.diversity import distinct_n, embedding_diversity
from lit_align.retrieval.encoders import (
    Encoder,
    HashEncoder,
    MeanPoolEncoder,
    SentenceEncoder,
    build_mean_pool_encoder,
)
from lit_align.retrieval.generation import (
    GenerationCache,
    GenerationReport,
    StopView,
    fingerprint_tokenizer,
    generate_texts,
)
from lit_align.retrieval.knn import Retriever, cosine_topk
from lit_align.retrieval.similarity import (
    CallableSimilarity,
    CrossEncoderSimilarity,
    EmbeddingCosine,
    ExactMatch,
    Similarity,
    TokenJaccard,
)

__all__ = [
    "CallableSimilarity",
    "CrossEncoderSimilarity",
    "EmbeddingCosine",
    "Encoder",
    "ExactMatch",
    "GenerationCache",
    "GenerationReport",
    "HashEncoder",
    "MeanPoolEncoder",
    "Retriever",
    "StopView",
    "SentenceEncoder",
    "Similarity",
    "TokenJaccard",
    "build_mean_pool_encoder",
    "cosine_topk",
    "distinct_n",
    "embedding_diversity",
    "fingerprint_tokenizer",
    "generate_texts",
]
