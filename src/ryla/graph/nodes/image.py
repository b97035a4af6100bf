"""Decoding and output nodes: VAEDecode, SaveImage, PreviewImage."""

from __future__ import annotations

import re

from ryla import catalogue
from ryla.graph.executor import NodeUserError, SavedImages
from ryla.graph.registry import Node, Output, from_param, link, node


@node
class VAEDecode(Node):
    class_type = "VAEDecode"
    category = "latent"
    inputs = (link("samples", "LATENT"), link("vae", "VAE"))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, samples, vae):
        latent = samples["samples"]
        channels = context.engine.vae_latent_channels(vae)
        if latent.ndim != 4 or latent.shape[1] != channels:
            raise NodeUserError("shape_mismatch", f"VAEDecode: the latent from {context.input_sources.get('samples', 'its input')} "
                                f"has shape {tuple(latent.shape)}, but this VAE decodes {channels}-channel latents "
                                f"(from {context.input_sources.get('vae', 'the VAE')}); an EmptyLatentImage's "
                                "4-channel latent must go through a sampler first", details={"node_id": context.current_node,
                                                                                            "inputs": context.input_sources})
        return (context.engine.decode(vae, latent, cancel=context.cancel),)


_PARENT_STEP = re.compile(r"(^|[\\/])\.\.($|[\\/])")


def unsafe_prefix(prefix: str) -> str | None:
    """Why a filename_prefix cannot name files in the output folder, or None. ComfyUI's
    folder_paths.get_save_image_path refuses a prefix that leaves the output folder ("Saving
    image outside the output folder is not allowed.")."""
    if prefix.startswith(("/", "\\")) or _PARENT_STEP.search(prefix) or "\x00" in prefix or ":" in prefix:
        return f"filename_prefix {prefix!r}: saving images outside the output folder is not allowed"
    return None


@node
class SaveImage(Node):
    class_type = "SaveImage"
    category = "image"
    output_node = True
    description = "Return the images to the caller (the API response, or files written by the CLI)."
    inputs = (link("images", "IMAGE"), from_param(catalogue.FILENAME_PREFIX, default="ComfyUI"))

    def validate(self, context, filename_prefix=None, **_):
        return unsafe_prefix(filename_prefix) if filename_prefix is not None else None

    def run(self, context, images, filename_prefix):
        context.outputs.append(SavedImages(context.current_node, filename_prefix, images))
        return ()


@node
class PreviewImage(Node):
    class_type = "PreviewImage"
    category = "image"
    output_node = True
    inputs = (link("images", "IMAGE"),)

    def run(self, context, images):
        context.outputs.append(SavedImages(context.current_node, "preview", images))
        return ()


NODES = (VAEDecode, SaveImage, PreviewImage)
