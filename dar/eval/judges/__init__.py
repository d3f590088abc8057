"""Judges: MLLM clients and face embedders used by the benchmark runners.

- :class:`OpenAIJudge` -- any OpenAI-compatible endpoint (hosted APIs, a local vLLM server of Qwen3-VL, ...)
- :class:`TransformersJudge` -- a local image-text-to-text model
- :class:`ArcFaceEmbedder` -- insightface ArcFace embeddings behind :class:`FaceEmbedder`

Nothing heavy is imported here; ``openai``, ``transformers`` and ``insightface`` load
only when the corresponding class is instantiated.
"""

from .base import Judge, JudgeError, ParsedReply, ask_parsed, image_data_url, image_sha256
from .cache import ResponseCache
from .faces import ArcFaceEmbedder, FaceEmbedder, cosine_similarity_matrix
from .local import TransformersJudge
from .openai_compat import OpenAIJudge

__all__ = [
    "ArcFaceEmbedder",
    "FaceEmbedder",
    "Judge",
    "JudgeError",
    "OpenAIJudge",
    "ParsedReply",
    "ResponseCache",
    "TransformersJudge",
    "ask_parsed",
    "cosine_similarity_matrix",
    "image_data_url",
    "image_sha256",
]
