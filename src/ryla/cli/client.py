"""`ryla-client`: drive a ryla server (local `ryla serve` or the Modal deployment) from a
terminal. The spec's `ryla_client.py`.

    ryla-client flux-dev --prompt "a red fox in the snow" --output fox.jpg
    ryla-client workflow my_graph.json --output-dir out/
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ryla import catalogue
from ryla.cli.common import CliError, accept_anywhere, add_param, lora_line, output_paths, prefixed_paths, run_cli
from ryla.files import write_atomic

DEFAULT_URL = "http://127.0.0.1:8000"


class Client:
    """A thin HTTP client; every request asks for JSON so seeds and timings come back."""

    def __init__(self, url: str, api_key: str | None, timeout: float, modal_key: str | None = None,
                 modal_secret: str | None = None):
        import httpx

        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if modal_key and modal_secret:  # Modal's proxy auth (a deployment with RYLA_PROXY_AUTH=1)
            headers.update({"Modal-Key": modal_key, "Modal-Secret": modal_secret})
        self.url = url.rstrip("/")
        # Redirects are followed: a proxy in front (Modal's web endpoints past their request
        # time) answers 303 with where the result will be.
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, follow_redirects=True)

    def request(self, method: str, path: str, **kwargs) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise CliError(f"no answer from {self.url} within {self.http.timeout.read:g}s (--timeout)")
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the server at {self.url}: {exc}")
        if response.status_code >= 400:
            raise CliError(_error_message(response))
        return response.json() if "json" in response.headers.get("content-type", "") else response.content


def _error_message(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    error = body.get("error", {}) if isinstance(body, dict) else {}
    message = f"{error.get('message', 'request failed')} (HTTP {response.status_code}, {error.get('type', 'error')})"
    if isinstance(error.get("details"), str) and error["details"] and not body.get("node_errors"):
        message += f": {error['details']}"
    for node_id, entry in (body.get("node_errors") or {}).items():
        for err in entry.get("errors", []):
            message += f"\n  node {node_id} ({entry.get('class_type')}): {err.get('message')} {err.get('details', '')}"
    if response.status_code == 429 and response.headers.get("retry-after"):
        message += f"; retry after {response.headers['retry-after']}s"
    return message


def generate(client: Client, args: argparse.Namespace, path: str, body: dict, params: dict | None = None) -> dict:
    """POST an image request and return the JSON body with base64 images: at once (a spinner
    while the server works), or with --async as a job followed through its event stream (a
    progress bar), its images fetched when it is done."""
    if not getattr(args, "async_", False):
        return with_spinner("generating...", lambda: client.request("POST", path, json=body, params=params))
    job = client.request("POST", path, json=body, params=params, headers={"Prefer": "respond-async"})
    if not isinstance(job, dict) or "events_url" not in job:
        raise CliError(f"the server at {client.url} did not accept an asynchronous job")
    final = follow_events(client, job)
    if final.get("status") != "success":
        error = final.get("error") or {}
        raise CliError(f"job {final.get('job_id')} {final.get('status')}: {error.get('message', 'no details')}")
    fmt = body.get("output_format") or (params or {}).get("output_format") or "png"
    images = []
    for image in final["result"]["images"]:
        query = {"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]}
        if fmt in ("jpeg", "webp"):  # the server keeps PNGs; /view converts (ComfyUI's preview=)
            query["preview"] = f"{fmt};{body.get('quality', 90)}"
        data = client.request("GET", "/view", params=query)
        images.append({"data": base64.b64encode(data).decode(), "seed": image.get("seed"), "format": fmt,
                       "filename_prefix": re.sub(r"_\d+_?\.\w+$", "", image["filename"])})
    timings = final.get("timings", {})
    timings["total_s"] = timings.get("queue_s", 0) + timings.get("generation_s", 0)
    return {"images": images, "timings": timings, "request_id": final.get("request_id")}


def follow_events(client: Client, job: dict) -> dict:
    """Read the job's server-sent events until it finishes; show step progress. Returns the
    job's final state."""
    import httpx
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True) if console.is_terminal else None
    task = progress.add_task("queued", total=None) if progress else None
    final: dict = {}
    try:
        if progress:
            progress.start()
        with client.http.stream("GET", job["events_url"], timeout=httpx.Timeout(client.http.timeout.read,
                                                                                 read=None)) as stream:
            if stream.status_code >= 400:
                stream.read()
                raise CliError(_error_message(stream))
            event = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event:
                    data = json.loads(line[5:])
                    if event == "progress":
                        if progress:
                            progress.update(task, description=f"node {data['node']}", total=data["max"],
                                            completed=data["value"])
                        else:
                            print(f"  step {data['value']}/{data['max']} (node {data['node']})", file=sys.stderr)
                    elif event in ("queued", "started") and progress:
                        progress.update(task, description=event)
                    elif event in ("done", "error", "cancelled"):
                        final = data
                        break
    except httpx.HTTPError as exc:
        raise CliError(f"lost the event stream of job {job['job_id']}: {exc}")
    finally:
        if progress:
            progress.stop()
    if not final:
        final = client.request("GET", f"/jobs/{job['job_id']}")
    return final


def with_spinner(text: str, fn: Callable[[], Any]) -> Any:
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        return fn()
    with console.status(text, spinner="dots"):
        return fn()


def save_images(body: dict, output: str | None) -> list[Path]:
    """The response's images as files: --output as given, else ryla_00001.jpg, ... counting on
    in the current folder. The bytes are the server's, parameters inside (prompt, seed, ...)."""
    images = body.get("images", [])
    paths = output_paths(output, images[0].get("format", "jpeg") if images else "jpeg", len(images))
    for image, path in zip(images, paths):
        write_atomic(path, base64.b64decode(image["data"]))
    return paths


def report(body: dict, paths: list[Path]) -> None:
    seeds = sorted({str(i["seed"]) for i in body["images"] if i.get("seed") is not None})
    timings = body.get("timings", {})
    seed_text = f"seed {', '.join(seeds)}  " if seeds else ""
    print(f"{seed_text}{timings.get('generation_s', 0):.2f}s generation, {timings.get('total_s', 0):.2f}s total  "
          f"-> {', '.join(str(p) for p in paths)}  (request {body.get('request_id')})")


# ---------------------------------------------------------------------------------- commands

FLUX_FIELDS = (catalogue.NEGATIVE_PROMPT, catalogue.WIDTH, catalogue.HEIGHT, catalogue.STEPS, catalogue.GUIDANCE,
               catalogue.CFG, catalogue.SEED, catalogue.NUM_IMAGES, catalogue.OUTPUT_FORMAT, catalogue.QUALITY)


def flux_body(args: argparse.Namespace, fields=FLUX_FIELDS) -> dict:
    body = {"prompt": args.prompt}
    for param in fields:
        value = getattr(args, param.name)
        if value is not None:
            body[param.name] = value
    if "output_format" not in body:  # the file name decides, so fox.png gets PNG bytes
        from ryla.imaging import format_for_path

        body["output_format"] = format_for_path(args.output or "ryla.jpg")
    for name in ("image", "mask"):  # image-to-image and inpainting: the files, as base64
        if getattr(args, name, None):
            body[name] = _photo_b64(getattr(args, name), name)
    if getattr(args, "strength", None) is not None:
        body["strength"] = args.strength
    return body


def cmd_flux_dev(client: Client, args: argparse.Namespace) -> None:
    body = generate(client, args, "/flux-dev", flux_body(args))
    report(body, save_images(body, args.output))


def cmd_flux_lora(client: Client, args: argparse.Namespace) -> None:
    body = flux_body(args)
    body["lora_id"] = args.lora_id
    for name in ("lora_strength", "trigger_word"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.also:
        body["loras"] = [_lora_ref(text) for text in args.also]
    result = generate(client, args, "/flux-lora", body)
    report(result, save_images(result, args.output))


KONTEXT_FIELDS = (catalogue.STEPS, catalogue.GUIDANCE, catalogue.SEED, catalogue.NUM_IMAGES, catalogue.OUTPUT_FORMAT,
                  catalogue.QUALITY)


def cmd_flux_kontext(client: Client, args: argparse.Namespace) -> None:
    body = flux_body(args, KONTEXT_FIELDS)
    body["image"] = _photo_b64(args.image, "image")
    if args.lora_id is not None:
        body["lora_id"] = args.lora_id
        if args.lora_strength is not None:
            body["lora_strength"] = args.lora_strength
    result = generate(client, args, "/flux-kontext", body)
    report(result, save_images(result, args.output))


def _lora_ref(text: str) -> dict:
    lora_id, _, strength = text.partition(":")
    try:
        return {"id": lora_id, "strength": float(strength) if strength else 1.0}
    except ValueError:
        raise CliError(f"--also expects ID or ID:STRENGTH, got {text!r}")


def cmd_loras(client: Client, args: argparse.Namespace) -> None:
    if args.loras_command == "list":
        for e in client.request("GET", "/loras")["loras"]:
            print(lora_line(e))
    elif args.loras_command == "add":
        path = Path(args.file)
        if not path.is_file():
            raise CliError(f"no such file: {args.file}")
        fields = {k: v for k, v in (("id", args.id), ("trigger_word", args.trigger_word)) if v}
        with open(path, "rb") as f:
            meta = with_spinner("uploading...", lambda: client.request(
                "POST", "/loras", data=fields, files={"file": (path.name, f, "application/octet-stream")}))
        print(f"added {meta['id']} ({meta['format']}, rank {meta['rank']})")
    else:
        client.request("DELETE", f"/loras/{args.id}")
        print(f"removed {args.id}")


def _photo_b64(path: str, what: str) -> str:
    try:
        return base64.b64encode(Path(path).read_bytes()).decode()
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror}")


IDENTITY_FIELDS = (catalogue.INSTANTID_STRENGTH, catalogue.CONTROLNET_STRENGTH, catalogue.FACE_PROVIDER)


def identity_body(args: argparse.Namespace) -> dict:
    body = flux_body(args)
    body["reference_image"] = _photo_b64(args.reference, "reference image")
    if getattr(args, "pose", None):
        body["pose_image"] = _photo_b64(args.pose, "pose image")
    for param in IDENTITY_FIELDS:
        if getattr(args, param.name) is not None:
            body[param.name] = getattr(args, param.name)
    return body


def cmd_flux_instantid(client: Client, args: argparse.Namespace) -> None:
    body = identity_body(args)
    result = generate(client, args, "/flux-instantid", body)
    report(result, save_images(result, args.output))


# Angles, expressions and outfits for a character sheet (TSK-058-002-006).
SHEET_PROMPTS = (
    "front view portrait, neutral expression, plain grey background",
    "three-quarter view, smiling, casual denim jacket",
    "profile view facing left, serious expression, studio lighting",
    "looking over the shoulder, laughing, summer dress, outdoors",
    "close-up, surprised expression, soft window light",
    "full body, standing, business suit, city street",
    "low angle, confident expression, leather jacket, night city lights",
    "high angle, thoughtful expression, knitted sweater, cozy cafe",
    "profile view facing right, calm expression, evening gown",
    "front view, winking, sports clothes, park in autumn",
)


def cmd_character_sheet(client: Client, args: argparse.Namespace) -> None:
    from PIL import Image, ImageDraw

    if args.prompts_file:
        try:
            prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise CliError(f"cannot read {args.prompts_file}: {exc.strerror}")
    else:
        prompts = list(SHEET_PROMPTS)
    if not prompts:
        raise CliError("no prompts")
    prompts = [prompts[i % len(prompts)] for i in range(args.count)]
    reference = _photo_b64(args.reference, "reference image")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    out = Path(args.output_dir)
    tiles = []
    passed, threshold, backend = 0, None, None
    for i, prompt in enumerate(prompts):
        full_prompt = f"{args.subject}, {prompt}" if args.subject else prompt
        body = {"prompt": full_prompt, "reference_image": reference, "width": args.width, "height": args.height,
                "steps": args.steps, "seed": seed if args.seed_policy == "same" else seed + i, "output_format": "png"}
        result = with_spinner(f"variation {i + 1}/{len(prompts)}...",
                              lambda body=body: client.request("POST", "/flux-instantid", json=body))
        path = save_images(result, str(out / f"sheet_{i + 1:02d}.png"))[0]
        tiles.append((path, prompt))
        identity = result.get("identity") or {}
        score = (identity.get("scores") or [None])[0]
        if identity:
            threshold, backend = identity["threshold"], identity["backend"]
            passed += score is not None and score >= threshold
        print(f"{path}  seed {body['seed']}  {'no face' if score is None else f'score {score:.3f}'}  {prompt}")
    # One labelled contact sheet.
    columns = min(4, len(tiles))
    rows = (len(tiles) + columns - 1) // columns
    tile_w, tile_h, label_h = args.width, args.height, 28
    sheet = Image.new("RGB", (columns * tile_w, rows * (tile_h + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (path, prompt) in enumerate(tiles):
        x, y = (index % columns) * tile_w, (index // columns) * (tile_h + label_h)
        with Image.open(path) as tile:
            sheet.paste(tile.convert("RGB").resize((tile_w, tile_h)), (x, y))
        draw.text((x + 4, y + tile_h + 6), f"{index + 1}. {prompt}"[: max(8, tile_w // 7)], fill="black")
    write_atomic(out / "contact_sheet.png", _png(sheet))
    print(f"contact sheet -> {out / 'contact_sheet.png'}")
    if threshold is not None:
        print(f"identity: {passed} of {len(tiles)} variations look like the reference "
              f"({passed / len(tiles) * 100:.0f}%; {backend} cosine >= {threshold:g})")


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def cmd_workflow(client: Client, args: argparse.Namespace) -> None:
    from ryla.graph.ui_format import UiFormatError, is_png, workflow_from_png

    try:
        data = Path(args.workflow).read_bytes()
        # a ComfyUI PNG carries its workflow; UI-format files go as they are (the server converts)
        graph = workflow_from_png(data) if is_png(data) else json.loads(data.decode("utf-8"))
    except OSError as exc:
        raise CliError(f"cannot read workflow {args.workflow}: {exc.strerror}")
    except (json.JSONDecodeError, UnicodeDecodeError, UiFormatError) as exc:
        raise CliError(f"workflow {args.workflow}: {exc}")
    params = {"output_format": args.format}
    if args.image:  # photos for LoadImage nodes travel beside the graph, as the API expects
        if not (isinstance(graph, dict) and isinstance(graph.get("prompt"), dict)):
            graph = {"prompt": graph}
        graph["images"] = {}
        for spec in args.image:
            name, sep, path = spec.partition("=")
            if not sep or not name:
                raise CliError(f"--image expects NAME=PATH, got {spec!r}")
            graph["images"][name] = _photo_b64(path, "image")
    body = generate(client, args, "/workflow", graph, params=params)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # named by each image's SaveImage prefix, counting on from the files already there
    paths = prefixed_paths(out, [image.get("filename_prefix") or "workflow" for image in body["images"]],
                           "jpg" if args.format == "jpeg" else args.format)
    for image, path in zip(body["images"], paths):
        write_atomic(path, base64.b64decode(image["data"]))
    report(body, paths)


def cmd_health(client: Client, args: argparse.Namespace) -> None:
    """The server's /health; with --wait, retried until it answers (a server still starting)."""
    import time

    deadline = time.monotonic() + (args.wait or 0)
    while True:
        try:
            health = client.request("GET", "/health")
            break
        except CliError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
    print(json.dumps(health, indent=2))


def add_flux_options(parser: argparse.ArgumentParser) -> None:
    add_param(parser, catalogue.PROMPT, required=True)
    for param in FLUX_FIELDS:
        add_param(parser, param, omit_default=True)  # not given: not sent, the server's default applies
    parser.add_argument("--output", "-o", default=None,
                        help="image file; several images get _1, _2... [default: ryla_00001.jpg, ryla_00002.jpg, "
                             "... in the current folder, never replacing an earlier image]")
    parser.add_argument("--image", metavar="PATH", default=None,
                        help="start from this image (image-to-image); the result has its size")
    parser.add_argument("--mask", metavar="PATH", default=None,
                        help="with --image: redraw only where this black-and-white mask is white (inpainting)")
    add_param(parser, catalogue.STRENGTH, omit_default=True)
    add_async_option(parser)


def add_async_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--async", dest="async_", action="store_true",
                        help="submit as a job (Prefer: respond-async) and follow its progress events; for long "
                             "jobs and proxies that cut long requests")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ryla-client", description="Call a ryla image API server. The "
                                     "connection options (--url, --api-key, ...) go before or after the command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    flux = sub.add_parser("flux-dev", help="Text-to-image with FLUX.1-dev.", description="Text-to-image with FLUX.1-dev.")
    add_flux_options(flux)
    flux.set_defaults(handler=cmd_flux_dev)

    ident = sub.add_parser("flux-instantid", help="Text-to-image keeping the face of a reference photo.",
                           description="Text-to-image keeping the face of a reference photo.")
    add_flux_options(ident)
    ident.add_argument("--reference", required=True, help="face photo (JPEG, PNG or WebP)")
    ident.add_argument("--pose", default=None, help="optional photo whose face position to follow")
    for param in IDENTITY_FIELDS:
        add_param(ident, param, omit_default=True)
    ident.set_defaults(handler=cmd_flux_instantid)

    sheet = sub.add_parser("character-sheet", help="N variations of one face (angles, expressions, outfits) "
                           "plus a labelled contact sheet.")
    sheet.add_argument("--reference", required=True, help="face photo")
    sheet.add_argument("--count", type=int, default=8, help="number of variations [default: 8]")
    sheet.add_argument("--prompts-file", default=None, help="one prompt per line [default: a built-in list]")
    sheet.add_argument("--subject", default="", help="prepended to every prompt, e.g. 'a woman with red hair'")
    sheet.add_argument("--seed", type=int, default=None, help="[default: random, printed]")
    sheet.add_argument("--seed-policy", choices=("same", "increment"), default="same",
                       help="same seed for every variation (only the prompt changes), or seed+i [default: same]")
    sheet.add_argument("--width", type=int, default=768)
    sheet.add_argument("--height", type=int, default=768)
    sheet.add_argument("--steps", type=int, default=28)
    sheet.add_argument("--output-dir", default="character_sheet", help="[default: character_sheet]")
    sheet.set_defaults(handler=cmd_character_sheet)

    lora = sub.add_parser("flux-lora", help="Text-to-image with a character LoRA from the server's store.",
                          description="Text-to-image with a character LoRA from the server's store.")
    add_flux_options(lora)
    add_param(lora, catalogue.LORA_ID, required=True)
    add_param(lora, catalogue.LORA_STRENGTH, omit_default=True)
    add_param(lora, catalogue.TRIGGER_WORD, omit_default=True)
    lora.add_argument("--also", action="append", metavar="ID[:STRENGTH]", help="stack another LoRA (repeatable)")
    lora.set_defaults(handler=cmd_flux_lora)

    edit = sub.add_parser("flux-kontext", help="Edit an image as the prompt says with FLUX.1 Kontext dev.",
                          description="Edit an image as the prompt says (\"make her jacket red\") with FLUX.1 Kontext "
                          "dev, keeping the person. The result has the Kontext size nearest the image's shape.")
    add_param(edit, catalogue.PROMPT, required=True)
    edit.add_argument("--image", required=True, metavar="PATH", help="the image to edit (JPEG, PNG or WebP)")
    for param in KONTEXT_FIELDS:
        add_param(edit, param, omit_default=True, default_text="2.5" if param is catalogue.GUIDANCE else None)
    edit.add_argument("--lora-id", default=None, help="a LoRA from the server's store, on the transformer")
    add_param(edit, catalogue.LORA_STRENGTH, omit_default=True)
    edit.add_argument("--output", "-o", default=None, help="image file; several images get _1, _2... "
                      "[default: ryla_00001.jpg, ... in the current folder]")
    add_async_option(edit)
    edit.set_defaults(handler=cmd_flux_kontext)

    loras = sub.add_parser("loras", help="List, upload or remove LoRAs on the server.")
    loras_sub = loras.add_subparsers(dest="loras_command", required=True, metavar="ACTION")
    loras_sub.add_parser("list", help="List the server's LoRAs.").set_defaults(handler=cmd_loras)
    add = loras_sub.add_parser("add", help="Upload a .safetensors LoRA.")
    add.add_argument("file")
    add.add_argument("--id", default=None, help="[default: from the file name]")
    add.add_argument("--trigger-word", default=None)
    add.set_defaults(handler=cmd_loras)
    rm = loras_sub.add_parser("remove", help="Remove a LoRA.")
    rm.add_argument("id")
    rm.set_defaults(handler=cmd_loras)

    wf = sub.add_parser("workflow", help="Run a ComfyUI workflow: API format, the editor's UI format, or a PNG "
                                         "ComfyUI saved.")
    wf.add_argument("workflow", help="workflow file: API format (or a /prompt body), UI format as ComfyUI's "
                                     "editor saves it, or a ComfyUI PNG with the workflow embedded")
    wf.add_argument("--output-dir", default="output", help="[default: output]")
    wf.add_argument("--format", choices=catalogue.OUTPUT_FORMAT.choices, default="png", help="[default: png]")
    wf.add_argument("--image", action="append", metavar="NAME=PATH",
                    help="an image for the workflow's LoadImage nodes, e.g. reference=face.jpg (repeatable)")
    add_async_option(wf)
    wf.set_defaults(handler=cmd_workflow)

    health = sub.add_parser("health", help="Show the server's health: model set, loaded models, queue.")
    health.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="keep trying until the server answers, up to this long (for scripts that start "
                             "one) [default: 0, ask once]")
    health.set_defaults(handler=cmd_health)
    accept_anywhere(parser, connection_options)
    return parser


def connection_options(parser: argparse.ArgumentParser, top: bool) -> None:
    def default(value):
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("connection")
    group.add_argument("--url", default=default(os.environ.get("RYLA_URL", DEFAULT_URL)),
                       help=f"server URL [default: $RYLA_URL or {DEFAULT_URL}]")
    group.add_argument("--api-key", default=default(os.environ.get("RYLA_API_KEY")),
                       help="API key sent as a Bearer token [default: $RYLA_API_KEY]")
    group.add_argument("--timeout", type=float, default=default(600.0),
                       help="seconds to wait for an answer [default: 600]")
    group.add_argument("--modal-key", default=default(os.environ.get("RYLA_MODAL_KEY")),
                       help="Modal proxy-auth token id, for a deployment with RYLA_PROXY_AUTH=1 "
                            "[default: $RYLA_MODAL_KEY]")
    group.add_argument("--modal-secret", default=default(os.environ.get("RYLA_MODAL_SECRET")),
                       help="Modal proxy-auth token secret [default: $RYLA_MODAL_SECRET]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.handler(Client(args.url, args.api_key, args.timeout, args.modal_key, args.modal_secret),
                                        args))


if __name__ == "__main__":
    sys.exit(main())
