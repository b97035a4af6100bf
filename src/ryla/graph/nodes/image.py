"""Decoding and output nodes: VAEDecode, SaveImage, PreviewImage."""

from __future__ import annotations

from ryla import catalogue
from ryla.graph.executor import SavedImages
from ryla.graph.registry import Node, Output, from_param, link, node


@node
class VAEDecode(Node):
    class_type = "VAEDecode"
    category = "latent"
    inputs = (link("samples", "LATENT"), link("vae", "VAE"))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, samples, vae):
        return (context.engine.decode(vae, samples["samples"]),)


@node
class SaveImage(Node):
    class_type = "SaveImage"
    category = "image"
    output_node = True
    description = "Return the images to the caller (the API response, or files written by the CLI)."
    inputs = (link("images", "IMAGE"), from_param(catalogue.FILENAME_PREFIX, default="ComfyUI"))

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
