"""Finding and embedding the reference face.

With insightface and the antelopev2 models in the store's insightface/ folder (the GPU
deployment), faces come from antelopev2: SCRFD detection, 5 keypoints, a 512-d ArcFace
embedding. Where they are absent (the embedded default, CI), OpenCV's bundled Haar cascade
finds faces for real (a photo without a face is still refused) and a small generated network
stands in for ArcFace; its keypoints are placed from the face box's proportions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ryla.imaging import ImageError, decode_image  # noqa: F401 (the decoder every image goes through)

log = logging.getLogger(__name__)

TINY_EMBEDDER = "tiny-arcface.safetensors"
@dataclass(frozen=True)
class Face:
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1
    kps: np.ndarray  # [5, 2]: right eye, left eye, nose, right mouth corner, left mouth corner
    score: float
    embedding: np.ndarray  # [512], L2-normalised

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.bbox
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class TinyFaceEmbedder(torch.nn.Module):
    """A small stand-in for ArcFace: aligned 112x112 face -> 512-d unit vector."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc = torch.nn.Linear(16 * 16, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.nn.functional.normalize(self.fc(self.pool(x).flatten(1)), dim=-1)


class FaceAnalyzer:
    """antelopev2 through insightface (detection, keypoints, ArcFace embedding)."""

    name = "antelopev2"

    def __init__(self, root: Path, provider: str, name: str = "antelopev2"):
        from insightface.app import FaceAnalysis

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "gpu" else ["CPUExecutionProvider"]
        self.app = FaceAnalysis(name=name, root=str(root), providers=providers,
                                allowed_modules=["detection", "recognition"])
        self.app.prepare(ctx_id=0 if provider == "gpu" else -1, det_size=(640, 640))

    def faces(self, image: Image.Image) -> list[Face]:
        bgr = np.asarray(image)[:, :, ::-1]
        found = []
        # As the InfiniteYou reference pipeline: try smaller detector sizes when none is found.
        for size in (640, 320, 160):
            self.app.det_model.input_size = (size, size)
            found = self.app.get(bgr)
            if found:
                break
        return [Face(tuple(map(float, f.bbox)), np.asarray(f.kps, dtype=np.float32), float(f.det_score),
                     np.asarray(f.normed_embedding, dtype=np.float32)) for f in found]


class HaarFaceAnalyzer:
    """OpenCV's frontal-face Haar cascade plus the tiny embedder (the embedded default)."""

    name = "haar+tiny-embedder"

    def __init__(self, embedder_path: Path):
        import cv2
        from safetensors.torch import load_file

        self.cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))
        self.embedder = TinyFaceEmbedder().eval()
        self.embedder.load_state_dict(load_file(str(embedder_path)))

    def faces(self, image: Image.Image) -> list[Face]:
        import cv2

        gray = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
        boxes = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(40, 40))
        faces = []
        for x, y, w, h in boxes:
            bbox = (float(x), float(y), float(x + w), float(y + h))
            # Keypoints from typical face proportions (the cascade gives only a box).
            kps = np.array([[x + 0.32 * w, y + 0.40 * h], [x + 0.68 * w, y + 0.40 * h], [x + 0.50 * w, y + 0.60 * h],
                            [x + 0.36 * w, y + 0.78 * h], [x + 0.64 * w, y + 0.78 * h]], dtype=np.float32)
            faces.append(Face(bbox, kps, 1.0, self.embed(image, bbox)))
        return faces

    @torch.no_grad()
    def embed(self, image: Image.Image, bbox) -> np.ndarray:
        crop = image.crop(tuple(int(round(v)) for v in bbox)).resize((112, 112), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        return self.embedder(x)[0].numpy()


def open_analyzer(store, provider: str = "cpu"):
    """antelopev2 when its files and insightface are there, else the bundled fallback."""
    root = store.folder("insightface")
    # The antelopev2 zip unpacks one folder too deep (antelopev2/antelopev2/*.onnx): accept both.
    for name in ("antelopev2", "antelopev2/antelopev2"):
        if any((root / "models" / name).glob("*.onnx")):
            try:
                return FaceAnalyzer(root, provider, name)
            except ImportError:
                log.warning("antelopev2 files found but insightface is not installed; using the Haar fallback")
            break
    embedder = root / TINY_EMBEDDER
    if not embedder.is_file():
        raise FileNotFoundError(f"no face models: put antelopev2 in {root}/models/ "
                                "(`ryla models download --preset identity`)")
    return HaarFaceAnalyzer(embedder)


def largest_face(faces: list[Face]) -> Face:
    return max(faces, key=lambda f: f.area)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
