"""What the NSFW check costs per 1024x1024 image (ryla.safety), on the CPU and on the GPU.

    python bench/safety_speed.py --out bench/results

- nudenet: NudeNet 3.4's detector through onnxruntime (the image is letterboxed to 320x320 by
  the detector, so its cost barely depends on the image size); on the CPU, and on the GPU where
  onnxruntime offers CUDA.
- clip: diffusers' StableDiffusionSafetyChecker, CLIP ViT-L/14 at CompVis'
  stable-diffusion-safety-checker's sizes with random weights (its speed does not depend on
  their values), preprocessing included; fp16 on the GPU, fp32 on the CPU.

Median of 20 after 3 warm-ups, one image a call, the same decoded 1024x1024 image each time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 1024


def timed(fn, warmups: int = 3, runs: int = 20, sync=None) -> dict:
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return {"median_ms": round(statistics.median(times) * 1000, 2), "min_ms": round(min(times) * 1000, 2)}


def clip_checker(device: str):
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    # CompVis/stable-diffusion-safety-checker's config.json: CLIP ViT-L/14 vision tower,
    # projection 768.
    config = CLIPConfig(vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                       "num_hidden_layers": 24, "patch_size": 14, "image_size": 224},
                        projection_dim=768)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = StableDiffusionSafetyChecker(config).to(device, dtype).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})

    def check(image: Image.Image) -> bool:
        pixels = processor(images=[image], return_tensors="pt").pixel_values.to(device, dtype)
        with torch.no_grad():
            _, flags = model(images=np.zeros((1, 8, 8, 3)), clip_input=pixels)
        return bool(flags[0])

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    import torch

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    results: dict = {"image": f"{SIZE}x{SIZE}", "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import onnxruntime
        from nudenet import NudeDetector

        results["onnxruntime"] = onnxruntime.__version__
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        for device, providers in (("cpu", ["CPUExecutionProvider"]), ("gpu", ["CUDAExecutionProvider"])):
            if providers[0] not in onnxruntime.get_available_providers():
                results[f"nudenet_{device}"] = f"{providers[0]} not available in this onnxruntime"
                continue
            detector = NudeDetector(providers=providers)
            results[f"nudenet_{device}"] = timed(lambda detector=detector: detector.detect(bgr))
    except ImportError as exc:
        results["nudenet"] = f"not installed: {exc}"
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        check = clip_checker(device)
        sync = torch.cuda.synchronize if device == "cuda" else None
        results[f"clip_{'gpu' if device == 'cuda' else 'cpu'}"] = timed(lambda check=check: check(image), sync=sync)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "safety_speed.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
