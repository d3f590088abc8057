"""Face embeddings for MICo-Bench's visibility weight W.

:class:`FaceEmbedder` is the interface the MICo runner needs; :class:`ArcFaceEmbedder`
implements it with insightface's ArcFace models (an optional dependency). The model
files must already be on disk: insightface would otherwise download them silently, so
the constructor refuses a model directory that does not exist.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class FaceEmbedder(Protocol):
    """Detects faces in an image file and returns one embedding per face.

    ``embed`` returns a list of 1-D float arrays, **largest face first** (the MICo
    protocol takes a source portrait's largest face as its identity). An empty list means
    no face was found.
    """

    name: str

    def embed(self, image_path: str | os.PathLike[str]) -> list[np.ndarray]: ...


def cosine_similarity_matrix(sources: list[np.ndarray], outputs: list[np.ndarray]) -> np.ndarray:
    """``(len(sources), len(outputs))`` cosine similarities; zero-norm rows give similarity 0."""
    if not sources or not outputs:
        return np.zeros((len(sources), len(outputs)), dtype=np.float64)
    a = np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in sources])
    b = np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in outputs])
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: sources {a.shape[1]} vs outputs {b.shape[1]}")
    a_norm = np.linalg.norm(a, axis=1, keepdims=True)
    b_norm = np.linalg.norm(b, axis=1, keepdims=True)
    a = np.divide(a, a_norm, out=np.zeros_like(a), where=a_norm > 1e-12)
    b = np.divide(b, b_norm, out=np.zeros_like(b), where=b_norm > 1e-12)
    # Rounding can push a self-similarity a hair above 1; clip to the mathematical range.
    return np.clip(a @ b.T, -1.0, 1.0)


class ArcFaceEmbedder:
    """ArcFace embeddings via ``insightface.app.FaceAnalysis``.

    Args:
        model_root: insightface root directory containing ``models/<name>/`` (the layout
            insightface itself uses, e.g. ``~/.insightface``), or the ``<name>`` folder itself.
        name: model pack name (``buffalo_l`` is what MICo-Bench uses).
        ctx_id: ``-1`` for CPU, otherwise the GPU index.
        det_size: detector input size.
    """

    def __init__(self, model_root: str | os.PathLike[str], *, name: str = "buffalo_l", ctx_id: int = -1, det_size: tuple[int, int] = (640, 640)):
        root = Path(model_root).expanduser()
        if (root / "models" / name).is_dir():
            insight_root = root
        elif root.name == name and root.is_dir() and root.parent.name == "models":
            insight_root = root.parent.parent
        else:
            raise FileNotFoundError(
                f"model_root: no insightface model pack {name!r} under {root} (expected {root / 'models' / name}); "
                "download it yourself -- this tool never downloads weights"
            )
        try:
            from insightface.app import FaceAnalysis
        except ImportError as err:
            raise ImportError("ArcFaceEmbedder needs insightface: pip install insightface onnxruntime") from err
        self.name = f"insightface:{name}"
        self._app = FaceAnalysis(name=name, root=str(insight_root))
        self._app.prepare(ctx_id=ctx_id, det_size=tuple(det_size))
        self._lock = threading.Lock()

    def embed(self, image_path: str | os.PathLike[str]) -> list[np.ndarray]:
        from PIL import Image

        with Image.open(image_path) as img:
            rgb = np.asarray(img.convert("RGB"))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # insightface expects OpenCV's BGR order
        with self._lock:
            faces = self._app.get(bgr)

        def area(face) -> float:
            x1, y1, x2, y2 = face.bbox
            return float((x2 - x1) * (y2 - y1))

        faces = sorted(faces, key=area, reverse=True)
        return [np.asarray(face.embedding, dtype=np.float32) for face in faces]
