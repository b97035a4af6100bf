"""`ryla`: generate images, run workflows, serve the API and manage models, locally."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ryla import catalogue, startup
from ryla.cli.common import CliError, accept_anywhere, add_param, lora_line, output_paths, prefixed_paths, run_cli
from ryla.files import write_atomic

log = logging.getLogger("ryla")


def setup_logging(verbose: bool) -> None:
    """Logs go to stderr (stdout carries results): rich on a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=verbose)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    from ryla.logs import RequestIdFilter

    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)
    for noisy in ("httpx", "httpcore", "diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


class GenerationProgress:
    """A rich progress bar on stderr, driven by the executor's (node, step, total) callbacks:
    sampling steps with the time left, then "decoding" once the last step is done; with several
    jobs (a --prompts batch) a second bar counts them. Shown on a terminal only: piped output
    stays plain lines."""

    def __init__(self, total_jobs: int = 1):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
        self.batch = self.progress.add_task("images", total=total_jobs) if total_jobs > 1 else None
        self.steps = self.progress.add_task("loading", total=None)

    def __enter__(self):
        if self.progress.console.is_terminal:  # elsewhere rich would leave blank lines in logs
            self.progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def on_progress(self, node_id: str, value: int, total: int) -> None:
        if value <= 1:  # a sampler starting: its own clock, so the time left is its own
            self.progress.reset(self.steps, total=total, completed=value, description="sampling")
        self.progress.update(self.steps, completed=value, total=total,
                             description="decoding" if value >= total else "sampling")

    def job_done(self) -> None:
        if self.batch is not None:
            self.progress.advance(self.batch)


# ---------------------------------------------------------------------------------- commands


def cmd_generate(args: argparse.Namespace) -> None:
    """One prompt, or with --prompts a file of them; through the Python API (ryla.pipeline),
    which fills the same templates as the typed endpoints."""
    from ryla import imaging
    from ryla.pipeline import Ryla, RylaError

    if (args.prompt is None) == (args.prompts is None):
        raise CliError("give --prompt, or --prompts FILE for a batch (one of them)")
    jobs = _prompt_jobs(args) if args.prompts else [{"prompt": args.prompt}]
    base = _generate_options(args)
    fmt = args.format or imaging.format_for_path(args.output or "ryla.jpg")
    ryla = Ryla(runtime=_open_runtime(args))
    if args.prompts is not None:
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []
    with GenerationProgress(total_jobs=len(jobs)) as progress:
        for index, job in enumerate(jobs):
            options = {**base, **{k: v for k, v in job.items() if k not in ("prompt", "line")}}
            try:
                if "edit" in options:
                    edit = dict(options)
                    unused = sorted(set(job) - {"prompt", "line", "steps", "seed", "num_images", "loras", "guidance"})
                    if unused:
                        raise RylaError(f"{', '.join(unused)} do not apply to --edit")
                    result = ryla.edit(job["prompt"], edit.pop("edit"), on_progress=progress.on_progress, **edit)
                else:
                    result = ryla.generate(job["prompt"], on_progress=progress.on_progress, **options)
            except RylaError as exc:
                raise CliError(f"line {job['line']} of {args.prompts}: {exc}" if "line" in job else str(exc))
            images, flags = _safety(args, result.images)
            if args.prompts is None:
                paths = output_paths(args.output, fmt, len(images))
            else:
                paths = prefixed_paths(out_dir, ["ryla"] * len(images), imaging.extension(fmt))
            for image, path in zip(images, paths):
                write_atomic(path, imaging.encode(image, fmt, args.quality, result.parameters))
                written.append((path, job["prompt"]))
            print(f"seed {result.seed}  {result.seconds:.2f}s  -> {', '.join(str(p) for p in paths)}", flush=True)
            progress.job_done()
            if flags is not None:
                verdicts = ", ".join(f"{path.name}: {'NSFW' if flag else 'safe'}" for path, flag in zip(paths, flags))
                print(f"safety ({args.safety}): {verdicts}" + ("; flagged images are black" if args.safety == "block"
                                                               and any(flags) else ""))
    if args.prompts is not None and written:
        sheet = prefixed_paths(out_dir, ["contact-sheet"], "jpg")[0]
        write_atomic(sheet, imaging.encode(contact_sheet(written), "jpeg", 90))
        print(f"{len(written)} image(s); contact sheet -> {sheet}")


def _generate_options(args: argparse.Namespace) -> dict:
    """`ryla generate`'s options as the Python API's keyword arguments."""
    options = {name: getattr(args, name) for name in
               ("negative_prompt", "width", "height", "steps", "guidance", "cfg", "seed", "checkpoint")}
    options["num_images"] = args.batch_size
    if problem := catalogue.QUALITY.check(args.quality):
        raise CliError(problem)
    if args.image is not None:
        options.update(image=Path(args.image), mask=Path(args.mask) if args.mask else None, strength=args.strength)
    elif args.mask is not None or args.strength is not None:
        raise CliError(f"{'--mask' if args.mask is not None else '--strength'} applies only with --image")
    if args.reference is not None:
        options.update(reference=Path(args.reference), pose=Path(args.pose) if args.pose else None,
                       identity_strength=args.instantid_strength, controlnet_strength=args.controlnet_strength)
    elif args.pose is not None:
        raise CliError("--pose applies only with --reference")
    options["loras"] = [_lora_option(text) for text in args.lora or []]
    if args.edit is not None:
        from ryla.pipeline import KONTEXT_GUIDANCE

        clashing = [flag for flag, value in (("--image", args.image), ("--reference", args.reference)) if value]
        if clashing:
            raise CliError(f"--edit cannot be combined with {' or '.join(clashing)}")
        return {"edit": Path(args.edit), "steps": args.steps, "seed": args.seed, "num_images": args.batch_size,
                "loras": options["loras"],
                "guidance": args.guidance if args.guidance is not None else KONTEXT_GUIDANCE}
    return options


def _lora_option(text: str) -> tuple[str, float]:
    lora_id, sep, strength = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        return (lora_id, float(strength)) if sep else (text, catalogue.LORA_STRENGTH.default)
    except ValueError:
        raise CliError(f"--lora expects ID or ID:STRENGTH, got {text!r}")


def _prompt_jobs(args: argparse.Namespace) -> list[dict]:
    """--prompts FILE: one prompt a line, or JSON Lines whose objects hold "prompt" and any of
    generate's options ("seed", "width", "loras", ...) for that line. Blank lines and lines
    starting with # are skipped. Read and checked whole before anything runs."""
    allowed = {"prompt", "negative_prompt", "width", "height", "steps", "guidance", "cfg", "seed", "num_images",
               "loras", "strength", "checkpoint"}
    try:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CliError(f"cannot read --prompts {args.prompts}: {exc.strerror}")
    except UnicodeDecodeError:
        raise CliError(f"--prompts {args.prompts} is not UTF-8 text")
    jobs = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("{"):
            try:
                job = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CliError(f"line {number} of {args.prompts}: not valid JSON ({exc.msg})")
            unknown = sorted(set(job) - allowed)
            if unknown or not isinstance(job.get("prompt"), str):
                raise CliError(f"line {number} of {args.prompts}: " + (f"unknown field {unknown[0]!r} (allowed: "
                               f"{', '.join(sorted(allowed))})" if unknown else "needs a \"prompt\" string"))
            if "loras" in job:
                loras = job["loras"] if isinstance(job["loras"], list) else [job["loras"]]
                if not all(isinstance(item, str) or (isinstance(item, list) and len(item) == 2) for item in loras):
                    raise CliError(f"line {number} of {args.prompts}: \"loras\" is a list of ids or [id, strength]")
                job["loras"] = [tuple(item) if isinstance(item, list) else item for item in loras]
        else:
            job = {"prompt": text}
        job["line"] = number
        jobs.append(job)
    if not jobs:
        raise CliError(f"no prompts in {args.prompts}")
    return jobs


def contact_sheet(tiles: list[tuple[Path, str]], tile: int = 256, label: int = 24):
    """The images of a batch on one page, each labelled with its number and prompt."""
    from PIL import Image, ImageDraw

    columns = min(4, len(tiles))
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * (tile + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (path, prompt) in enumerate(tiles):
        x, y = (index % columns) * tile, (index // columns) * (tile + label)
        with Image.open(path) as picture:
            picture = picture.convert("RGB")
            picture.thumbnail((tile, tile))
            sheet.paste(picture, (x + (tile - picture.width) // 2, y + (tile - picture.height) // 2))
        draw.text((x + 4, y + tile + 6), f"{index + 1}. {prompt}"[: tile // 7], fill="black")
    return sheet


def _safety(args: argparse.Namespace, images: list):
    if args.safety == "off":
        return images, None
    from ryla.safety import Safety, SafetyUnavailable

    try:
        return Safety(args.safety, os.environ.get("RYLA_SAFETY_CHECKER", "nudenet")).apply(images, args.safety)
    except SafetyUnavailable as exc:
        raise CliError(str(exc))


def read_workflow(path_text: str) -> dict:
    """A workflow file: API-format JSON, a /prompt or RunPod body, ComfyUI's UI format (converted
    when validated), or a PNG that ComfyUI saved (its embedded "prompt", else "workflow")."""
    from ryla.graph.executor import unwrap_workflow
    from ryla.graph.ui_format import UiFormatError, is_png, workflow_from_png

    path = Path(path_text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read workflow {path_text}: {exc.strerror}")
    if is_png(data):
        try:
            return workflow_from_png(data)
        except UiFormatError as exc:
            raise CliError(f"{path_text}: {exc}")
    try:
        graph = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CliError(f"cannot read workflow {path_text}: {exc}")
    except json.JSONDecodeError as exc:
        raise CliError(f"workflow {path_text} is not valid JSON: {exc}")
    graph, _ = unwrap_workflow(graph)  # a /prompt body, or RunPod's {"input": {"workflow": ...}}
    return graph


def cmd_convert_workflow(args: argparse.Namespace) -> None:
    from ryla.graph.executor import Executor, GraphValidationError, is_ui_format
    from ryla.graph.nodes import default_registry

    workflow = read_workflow(args.workflow)
    if not is_ui_format(workflow):
        raise CliError(f"{args.workflow} is already in the API format (no 'nodes' and 'links')")
    try:
        graph = Executor(default_registry()).from_ui_format(workflow)
    except GraphValidationError as exc:
        raise CliError(exc.summary())
    text = json.dumps(graph, indent=2) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        write_atomic(Path(args.output), text.encode())
        print(f"{len(graph)} nodes -> {args.output}")


def cmd_run_workflow(args: argparse.Namespace) -> None:
    """One workflow, or several one after another in one process (the models load once, and
    the checks of every file come first); with several, each one's images go to a folder of
    --output-dir named after its file."""
    from ryla import imaging

    graphs = [(path, read_workflow(path)) for path in args.workflow]
    stems = [Path(path).stem for path, _ in graphs]
    if len(set(stems)) != len(stems):
        raise CliError("two workflow files have the same name; give them different names")
    images = {}
    for spec in args.image or []:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise CliError(f"--image expects NAME=PATH, got {spec!r}")
        try:
            images[name] = Path(path).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read image {path}: {exc.strerror}")
    runtime = _open_runtime(args)
    for (path, graph), stem in zip(graphs, stems):
        if len(graphs) > 1:
            print(f"{path}:", flush=True)
        result = _run_with_progress(runtime, graph, images)
        out_dir = Path(args.output_dir) / stem if len(graphs) > 1 else Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for image, target in zip(result.images, prefixed_paths(out_dir, result.prefixes,
                                                                imaging.extension(args.format))):
            write_atomic(target, imaging.encode(image, args.format, args.quality))
            written.append(str(target))
        print(f"{len(written)} image(s) in {result.seconds:.2f}s -> {', '.join(written)}", flush=True)


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from ryla.api.app import ServerSettings, create_app

    loopback = _is_loopback(args.host)
    try:
        settings = ServerSettings.from_env(
            max_queue=args.max_queue, request_timeout_s=args.timeout,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024) if args.max_body_mb else None,
            data_dir=Path(args.data_dir) if args.data_dir else None,
            max_output_bytes=int(args.max_output_gb * 1024**3) if args.max_output_gb else None,
            allow_private_webhooks=args.allow_private_webhooks, safety=args.safety,
            allowed_hosts=LOOPBACK_NAMES | {args.host.strip("[]").lower()} if loopback else None)
    except ValueError as exc:
        raise CliError(str(exc))
    if not loopback and settings.api_key is None and not args.no_auth:
        raise CliError(f"refusing to serve on {args.host} without an API key: anyone who reaches it could use the "
                       "GPU. Set RYLA_API_KEY, or pass --no-auth if a proxy in front does the checking")
    listener = _bind(args.host, args.port)  # held while the models load: a second server fails at once
    logging.getLogger("ryla").setLevel(logging.INFO)  # a server logs its requests
    runtime, group = _serving_runtime(args, settings)
    shown_host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    url = f"http://{shown_host}:{args.port}"
    log.info("loading the %s model set from %s (auth %s)", "TINY" if runtime.store.tiny else "real",
             runtime.store.root, "on" if settings.api_key else "off")

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)  # the app's start-up (models loaded), then the socket bound
            if not self.should_exit:
                startup.finish()
                log.info("ready on %s  (API docs %s/docs)", url, url)

    # Connections beyond limit_concurrency get 503 at once; idle keep-alive connections close
    # after 5 s; a request head larger than 64 KiB is refused by the HTTP parser.
    config = uvicorn.Config(create_app(runtime, settings), host=args.host, port=args.port, log_config=None,
                            timeout_graceful_shutdown=5, limit_concurrency=args.max_connections,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)
    try:
        AnnouncingServer(config).run(sockets=[listener])
    finally:
        if group is not None:  # context parallel: the other ranks stop with rank 0
            runtime.stop_followers()
            group.join(timeout=30)


def _serving_runtime(args: argparse.Namespace, settings):
    """The runtime `ryla serve` runs: one engine; one per device (--parallel replicas); or rank
    0 of a context-parallel group, whose other ranks this starts (--parallel context)."""
    from ryla import multi_gpu

    try:
        devices = (args.devices.split(",") if args.devices else multi_gpu.gpu_devices(args.gpus) if args.gpus
                   else None)
    except ValueError as exc:
        raise CliError(str(exc))
    if devices is None or len(devices) == 1:
        if args.parallel is not None and devices is None:
            raise CliError("--parallel needs --gpus N (or --devices)")
        return _open_runtime(args, devices=devices), None
    if args.parallel == "replicas":
        log.info("replicas: one engine on each of %s", ", ".join(devices))
        return _open_runtime(args, devices=devices), None
    if args.parallel != "context":
        raise CliError("several devices need --parallel context (each image on all of them) or replicas "
                       "(one image per device)")
    backend = "gloo" if all(device.startswith("cpu") for device in devices) else "nccl"
    speed = "exact" if args.speed == "auto" else args.speed  # context parallel needs ryla's processors
    log.info("context parallel over %d %s processes (%s)", len(devices), backend, speed)
    try:
        return multi_gpu.start_context_group(len(devices), args.models_dir, speed, backend=backend,
                                             preload=settings.preload, verbose=args.verbose)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc))


def _bind(host: str, port: int):
    """The server's socket, bound and listening before the models load: a taken port fails in a
    second, not after a minute of loading (two bound sockets with SO_REUSEADDR clash only once
    one listens, so it listens now); connections made while loading wait in the backlog and are
    answered when the server is ready."""
    import socket

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host.strip("[]"), port))
        listener.listen(2048)  # uvicorn's default backlog
    except OSError as exc:
        listener.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}")
    return listener


def cmd_models_make_tiny(args: argparse.Namespace) -> None:
    from ryla.models.store import default_tiny_dir
    from ryla.models.tiny import make_tiny_models

    store = make_tiny_models(args.models_dir or default_tiny_dir())
    print(f"tiny FLUX.1-dev model set written to {store.root}")


def cmd_models_download(args: argparse.Namespace) -> None:
    """The plan first (files, sizes, free disk; token and licence access checked), then the
    files with one progress bar over the total size."""
    import threading

    from huggingface_hub.utils import disable_progress_bars
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from ryla.models.download import DownloadError, download, staged_bytes
    from ryla.models.store import ModelStore, default_models_dir

    store = ModelStore(args.models_dir or default_models_dir())
    disable_progress_bars()  # huggingface_hub's bar per file; ours counts the whole preset
    progress = Progress(TextColumn("[bold]downloading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TextColumn("left"), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    state = {"done": 0, "task": None}
    stop = threading.Event()

    def on_plan(plan) -> None:
        print(f"preset {plan.preset} into {store.root}:")
        for line in plan.lines():
            print(f"  {line}")
        if plan.to_fetch and plan.fetch_bytes + (1 << 30) <= plan.free_bytes:
            state["task"] = progress.add_task("files", total=plan.fetch_bytes)
            progress.start()
            threading.Thread(target=poll, daemon=True).start()

    def on_file(result) -> None:
        if result.downloaded:
            state["done"] += result.size

    def poll() -> None:
        while not stop.wait(0.5):
            progress.update(state["task"], completed=state["done"] + staged_bytes(store))

    try:
        results = download(store, args.preset, token=args.token, on_plan=on_plan, on_file=on_file)
    except DownloadError as exc:
        raise CliError(str(exc))
    finally:
        stop.set()
        progress.stop()
    fetched = sum(r.downloaded for r in results)
    print(f"{fetched} file(s) downloaded, {len(results) - fetched} already present and verified, in {store.root}")


def cmd_models_list(args: argparse.Namespace) -> None:
    from ryla.models.store import ModelStore, default_models_dir

    store = ModelStore(args.models_dir or default_models_dir())
    print(f"model store: {store.root}" + ("" if store.has_flux_weights() else "  (no FLUX weights: tiny model is used)"))
    for kind, names in store.inventory().items():
        print(f"  {kind}/: {', '.join(names) if names else '-'}")


def _lora_store(args):
    from ryla.flux.engine import FluxEngine
    from ryla.models.loras import LoraStore
    from ryla.runtime import describe_model, open_store

    store = open_store(args.models_dir)
    return LoraStore(store.folder("loras"), FluxEngine(store, device="cpu").lora_target_shapes,
                     model=describe_model(store))


def cmd_loras(args: argparse.Namespace) -> None:
    from ryla.models.lora_format import LoraFormatError
    from ryla.models.loras import InvalidLoraId, LoraExists, LoraNotFound

    loras = _lora_store(args)
    try:
        if args.loras_command == "add":
            if not Path(args.file).is_file():
                raise CliError(f"no such file: {args.file}")
            meta = loras.add_file(Path(args.file), args.id, args.trigger_word)
            print(f"added {meta['id']} ({meta['format']}, rank {meta['rank']}, {meta['targets']} layers"
                  f"{', trigger ' + repr(meta['trigger_word']) if meta['trigger_word'] else ''})")
        elif args.loras_command == "make-example":
            import tempfile

            from ryla.models.tiny import write_example_lora

            if any(entry["id"] == args.id for entry in loras.list()):  # run twice: nothing to do
                print(f"{args.id} is already in {loras.folder}; `ryla loras remove {args.id}` to make it again")
                return
            with tempfile.TemporaryDirectory() as scratch:
                source = write_example_lora(Path(scratch) / f"{args.id}.safetensors", loras.target_shapes()[0],
                                            rank=args.rank, seed=args.seed)
                meta = loras.add_file(source, args.id, args.trigger_word)
            print(f"added {meta['id']} (rank {meta['rank']}, {meta['targets']} layers, trigger "
                  f"{meta['trigger_word']!r}) to {loras.folder}; try: ryla generate --prompt \"{meta['trigger_word']}, "
                  f"a portrait\" --lora {meta['id']} --width 256 --height 256 --steps 4")
        elif args.loras_command == "list":
            entries = loras.list()
            if args.json:
                print(json.dumps(entries, indent=2))
            elif not entries:
                print(f"no LoRAs in {loras.folder}")
            for e in entries if not args.json else []:
                print(lora_line(e))
        else:
            loras.remove(args.id)
            print(f"removed {args.id}")
    except (InvalidLoraId, LoraNotFound) as exc:
        raise CliError(str(exc))
    except LoraExists as exc:
        raise CliError(f"{exc} (already exists)")
    except LoraFormatError as exc:
        raise CliError(f"not a FLUX LoRA for this model: {exc}")


def cmd_eval_identity(args: argparse.Namespace) -> None:
    """Likeness of each image's largest face to the reference face: the recogniser's cosine
    (ArcFace with antelopev2, else SFace), pass/fail at the backend's threshold, and the share
    of images that pass (images without a face count as failures)."""
    from ryla.identity.faces import ImageError, cosine, decode_image, largest_face, open_analyzer
    from ryla.runtime import open_store

    analyzer = open_analyzer(open_store(args.models_dir), args.face_provider)
    threshold = args.threshold if args.threshold is not None else analyzer.threshold

    def faces_of(path: Path):
        try:
            return analyzer.faces(decode_image(path.read_bytes()))
        except (OSError, ImageError) as exc:
            raise CliError(f"{path}: {exc}")

    reference_faces = faces_of(Path(args.reference))
    if not reference_faces:
        raise CliError(f"no face found in the reference {args.reference}")
    reference = largest_face(reference_faces)
    folder = Path(args.images)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")
                   and p.resolve() != Path(args.reference).resolve()) if folder.is_dir() else []
    if not paths:
        raise CliError(f"no JPEG, PNG or WebP images in {folder}")
    rows = []
    for path in paths:
        faces = faces_of(path)
        score = round(cosine(reference.identity, largest_face(faces).identity), 4) if faces else None
        rows.append({"image": path.name, "faces_found": len(faces), "score": score,
                     "same_person": score is not None and score >= threshold})
    scores = [r["score"] for r in rows if r["score"] is not None]
    summary = {"reference": args.reference, "detector": analyzer.name, "recognizer": analyzer.recognizer,
               "threshold": threshold, "images": len(rows), "with_a_face": len(scores),
               "mean_score": round(sum(scores) / len(scores), 4) if scores else None,
               "share_above_threshold": round(sum(r["same_person"] for r in rows) / len(rows), 4),
               "results": rows}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{'image':<40} {'faces':>5} {'score':>7}  same person (>= {threshold:g})")
    for row in rows:
        score = "-" if row["score"] is None else format(row["score"], ".4f")
        print(f"{row['image']:<40} {row['faces_found']:>5} {score:>7}  {'yes' if row['same_person'] else 'no'}")
    print(f"{summary['share_above_threshold'] * 100:.0f}% of {len(rows)} images show the reference's person "
          f"(mean score {summary['mean_score']}; {analyzer.recognizer} cosine, {analyzer.name})")


def _open_runtime(args, devices: list[str] | None = None):
    from ryla.flux.engine import SETTING_ERRORS
    from ryla.runtime import Runtime

    try:
        return Runtime.open(args.models_dir, speed=args.speed, devices=devices)
    except (FileNotFoundError, *SETTING_ERRORS) as exc:
        raise CliError(str(exc))


def _run_with_progress(runtime, graph, images: dict[str, bytes] | None = None):
    from ryla.graph.executor import ExecutionError, GraphValidationError

    progress = GenerationProgress()
    context = runtime.context(on_progress=progress.on_progress, request_images=images or {})
    try:
        validated = runtime.validate(graph, context)  # before the progress bar: errors print cleanly
        with progress:
            return runtime.execute(validated, context)
    except GraphValidationError as exc:
        raise CliError(f"invalid workflow: {exc.summary()}")
    except ExecutionError as exc:
        raise CliError(str(exc.user_error or exc))


# ---------------------------------------------------------------------------------- parser

SERVE_ENVIRONMENT = """\
environment variables (an option given on the command line wins):
  RYLA_API_KEY                 the key clients must send (Bearer token, or HTTP Basic password);
                               required to serve on a non-loopback --host, unless --no-auth
  RYLA_MODELS_DIR              the model store [default: ~/.cache/ryla/models]
  RYLA_TINY_MODELS_DIR         where the tiny model set is generated [default: ~/.cache/ryla/tiny-models]
  RYLA_DATA_DIR                input/, output/ and temp/ (--data-dir)
  RYLA_SPEED                   speed mode (--speed)
  RYLA_COMPILE_CACHE           compiled kernels [default: .compile-cache in the model store]
  RYLA_COMPILE_MODE            torch.compile mode for the compiled speed modes [default: Inductor's]
  RYLA_LORA_PLAN_MEMORY        share of GPU memory for recent LoRA sets' switch plans, 0 keeps none [default: 0.05]
  RYLA_CUDA_GRAPHS             1: fast mode replays each step from a CUDA graph, 0: launches from Python [default: 1]
  RYLA_MAX_QUEUE               requests that may wait for the GPU (--max-queue)
  RYLA_REQUEST_TIMEOUT         seconds per request (--timeout)
  RYLA_MAX_BODY_BYTES          largest request body [default: 32 MiB]
  RYLA_MAX_LORA_BYTES          largest LoRA upload
  RYLA_MAX_IMAGE_PIXELS        largest decoded input image, in pixels
  RYLA_MAX_PIXELS              largest image or latent a workflow may make, in pixels
  RYLA_MAX_STEPS               most sampling steps per sampler node
  RYLA_MAX_SCHEDULE            most sampling steps in one workflow, all samplers together
  RYLA_MAX_NODES               most nodes in one workflow
  RYLA_MAX_OUTPUT_BYTES        output/ is pruned past this size (--max-output-gb)
  RYLA_MAX_OUTPUT_AGE          output/ files older than this many seconds are pruned
  RYLA_SAFETY                  NSFW check: off, flag or block (--safety)
  RYLA_SAFETY_CHECKER          nudenet (default), clip, or module:function
  RYLA_SAFETY_MODEL            the clip checker's diffusers folder
  RYLA_ALLOW_PRIVATE_WEBHOOKS  1 to allow webhooks on private addresses (--allow-private-webhooks)
  HF_TOKEN                     Hugging Face token (only `ryla models download` uses it)
"""

_GENERATE_PARAMS = (catalogue.NEGATIVE_PROMPT, catalogue.WIDTH, catalogue.HEIGHT, catalogue.STEPS,
                    catalogue.GUIDANCE, catalogue.CFG, catalogue.SEED, catalogue.BATCH_SIZE, catalogue.QUALITY)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ryla", description="FLUX.1-dev image generation: locally, or as an HTTP API (`ryla serve`).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, handler: Callable, models_dir: bool = True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        if models_dir:
            p.add_argument("--models-dir", default=None,
                           help="model store folder [default: $RYLA_MODELS_DIR or ~/.cache/ryla/models]")
        return p

    gen = command("generate", "Generate images from a prompt with FLUX.1-dev: text-to-image, image-to-image, "
                  "inpainting, LoRAs, a reference face, and edits of an image (FLUX.1 Kontext), as the server's "
                  "typed endpoints do.", cmd_generate)
    add_param(gen, catalogue.PROMPT)
    gen.add_argument("--prompts", metavar="FILE", default=None,
                     help="a batch: one prompt a line, or JSON Lines with per-line options ({\"prompt\": ..., "
                          "\"seed\": 3, \"loras\": [[\"anna\", 0.8]]}); images and a contact sheet go to "
                          "--output-dir")
    for param in _GENERATE_PARAMS:
        add_param(gen, param, omit_default=param is catalogue.GUIDANCE,  # --edit has its own default
                  default_text=f"{param.default}; 2.5 with --edit, 30 with --mask on FLUX.1 Fill"
                  if param is catalogue.GUIDANCE else None)
    gen.add_argument("--output", "-o", default=None,
                     help="image file to write; batches get _1, _2... [default: ryla_00001.jpg, ryla_00002.jpg, "
                          "... in the current folder, never replacing an earlier image]")
    gen.add_argument("--output-dir", default="ryla-batch", help="with --prompts: the folder [default: ryla-batch]")
    gen.add_argument("--format", choices=catalogue.OUTPUT_FORMAT.choices, default=None,
                     help="image format [default: from the --output suffix, else jpeg]")
    gen.add_argument("--checkpoint", default=None, help="checkpoint in checkpoints/ [default: flux1-dev-fp8.safetensors]")
    gen.add_argument("--lora", action="append", metavar="ID[:STRENGTH]", default=None,
                     help="a LoRA from the store (`ryla loras list`), strength 1 unless given; repeat to stack "
                          "LoRAs; each trigger word goes into the prompt once")
    gen.add_argument("--reference", metavar="FACE", default=None,
                     help="a face photo whose identity the image keeps (as /flux-instantid)")
    gen.add_argument("--pose", metavar="PATH", default=None,
                     help="with --reference: a photo whose face position and pose to follow")
    add_param(gen, catalogue.INSTANTID_STRENGTH)
    add_param(gen, catalogue.CONTROLNET_STRENGTH)
    gen.add_argument("--image", metavar="PATH", default=None,
                     help="start from this image (image-to-image); the result has its size, cut to whole 8-pixel "
                          "blocks, and --width/--height are not used")
    gen.add_argument("--mask", metavar="PATH", default=None,
                     help="with --image: redraw only where this black-and-white mask is white (inpainting)")
    gen.add_argument("--edit", metavar="PATH", default=None,
                     help="edit this image as the prompt says, with FLUX.1 Kontext dev (as /flux-kontext): "
                          "\"make her jacket red\". The result has the Kontext size nearest the image's shape; "
                          "guidance is 2.5 unless --guidance is given; --lora applies; --width, --height, "
                          "--negative-prompt and --cfg are not used")
    add_param(gen, catalogue.STRENGTH, omit_default=True)
    gen.add_argument("--safety", choices=("off", "flag", "block"), default=os.environ.get("RYLA_SAFETY", "off"),
                     help="NSFW check: flag reports each image, block also blacks out flagged ones "
                          "(needs `pip install \"ryla[safety]\"`) [default: off, env RYLA_SAFETY]")

    serve = command("serve", "Serve the HTTP API (OpenAPI docs at /docs).", cmd_serve)
    serve.epilog = SERVE_ENVIRONMENT
    serve.formatter_class = argparse.RawDescriptionHelpFormatter
    serve.add_argument("--host", default="127.0.0.1", help="[default: 127.0.0.1]")
    serve.add_argument("--port", type=int, default=8000, help="[default: 8000]")
    serve.add_argument("--max-queue", type=int, default=None,
                       help="requests that may wait for the GPU; more get 429 [default: 8, env RYLA_MAX_QUEUE]")
    serve.add_argument("--timeout", type=float, default=None,
                       help="per-request time limit in seconds; then 504 [default: 300, env RYLA_REQUEST_TIMEOUT]")
    serve.add_argument("--speed", choices=("auto", "eager", "exact", "fast", "turbo"),
                       default=os.environ.get("RYLA_SPEED", "auto"),
                       help="transformer speed mode: exact (lossless compile), fast (+fp8 layers and attention, "
                            "for Hopper GPUs), turbo (+first-block cache); auto = exact on a GPU, eager on a CPU. "
                            "Compiled modes compile for 1024x1024 before the server answers /health (kernels "
                            "cached on disk: seconds after the first start) [default: auto, env RYLA_SPEED]")
    serve.add_argument("--gpus", type=int, default=None, metavar="N",
                       help="use the first N GPUs, with --parallel [default: one GPU]")
    serve.add_argument("--devices", default=None, metavar="LIST",
                       help="the devices by name instead of --gpus, e.g. cuda:2,cuda:3 (cpu,cpu runs two "
                            "CPU ranks: for trying it out)")
    serve.add_argument("--parallel", choices=("context", "replicas"), default=None,
                       help="with several GPUs: context computes each image on all of them (lower latency; "
                            "exact and fast modes), replicas runs one image per GPU (more images per second)")
    serve.add_argument("--max-body-mb", type=float, default=None, help="largest request body [default: 32]")
    serve.add_argument("--data-dir", default=None,
                       help="folder for input/ (uploads), output/ (saved images) and temp/ "
                            "[default: $RYLA_DATA_DIR or ~/.cache/ryla/data]")
    serve.add_argument("--max-output-gb", type=float, default=None,
                       help="output/ is pruned, oldest first, past this size [default: 10, env RYLA_MAX_OUTPUT_BYTES]")
    serve.add_argument("--no-auth", action="store_true",
                       help="serve on a non-loopback --host without RYLA_API_KEY (when a proxy in front checks "
                            "access); without it the server refuses to start that way")
    serve.add_argument("--safety", choices=("off", "flag", "block"), default=None,
                       help="NSFW check of every image: flag reports has_nsfw_concepts, block also replaces flagged "
                            "images by black ones; a request's enable_safety_checker can only be stricter "
                            "[default: off, env RYLA_SAFETY; checker: env RYLA_SAFETY_CHECKER, default nudenet]")
    serve.add_argument("--max-connections", type=int, default=256,
                       help="open connections at once; more get 503 [default: 256]")
    serve.add_argument("--allow-private-webhooks", action="store_true", default=None,
                       help="let requests name webhooks on loopback or private addresses "
                            "[default: refused; env RYLA_ALLOW_PRIVATE_WEBHOOKS]")

    run = command("run-workflow", "Run a ComfyUI workflow: API format, the editor's UI format, or a PNG "
                  "ComfyUI saved.", cmd_run_workflow)
    run.add_argument("workflow", nargs="+",
                     help="workflow file: API format (or a /prompt body), UI format as ComfyUI's editor saves it, "
                          "or a ComfyUI PNG with the workflow embedded; several run one after another in one "
                          "process, each one's images in OUTPUT_DIR/<file name>/")
    run.add_argument("--output-dir", default="output", help="folder for the images [default: output]")
    run.add_argument("--image", action="append", metavar="NAME=PATH",
                     help="an image for the workflow's LoadImage nodes, e.g. reference=face.jpg (repeatable)")
    run.add_argument("--format", choices=catalogue.OUTPUT_FORMAT.choices, default="png", help="[default: png]")
    add_param(run, catalogue.QUALITY)
    # One-off runs do not pay back a compile; `ryla serve` defaults to exact on a GPU.
    for p in (gen, run):
        p.add_argument("--speed", choices=("eager", "exact", "fast", "turbo"), default="eager",
                       help="transformer speed mode (see `ryla serve --help`) [default: eager]")

    convert = command("convert-workflow", "Convert a UI-format workflow (what ComfyUI's editor saves, or a "
                      "ComfyUI PNG) to the API format, as ComfyUI's editor does when it queues it.",
                      cmd_convert_workflow, models_dir=False)
    convert.add_argument("workflow", help="UI-format JSON file, or a PNG with an embedded workflow")
    convert.add_argument("--output", "-o", default=None, help="API-format file to write [default: standard output]")

    models = sub.add_parser("models", help="Inspect and prepare the model store.")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    tiny = models_sub.add_parser("make-tiny", help="Write the tiny random-weight FLUX model set (deterministic).")
    tiny.add_argument("--models-dir", default=None, help="where to write it [default: ~/.cache/ryla/tiny-models]")
    tiny.set_defaults(handler=cmd_models_make_tiny)
    dl = models_sub.add_parser("download", help="Download model files from the Hugging Face Hub into the store.")
    dl.add_argument("--preset", required=True, choices=("flux-dev", "flux-dev-transformer", "identity", "all"),
                    help="flux-dev: flux1-dev-fp8 checkpoint, clip_l, t5xxl_fp16, ae, tokenizers; identity: "
                         "InfiniteYou image projection, InfuseNet, antelopev2")
    dl.add_argument("--token", default=None, help="Hugging Face token [default: $HF_TOKEN]")
    dl.add_argument("--models-dir", default=None)
    dl.set_defaults(handler=cmd_models_download)
    lst = models_sub.add_parser("list", help="List the files in the model store, by folder.")
    lst.add_argument("--models-dir", default=None)
    lst.set_defaults(handler=cmd_models_list)

    loras = sub.add_parser("loras", help="Manage the LoRA store (the model store's loras/ folder).")
    loras_sub = loras.add_subparsers(dest="loras_command", required=True, metavar="ACTION")
    add = loras_sub.add_parser("add", help="Validate a .safetensors LoRA and add it to the store.")
    add.add_argument("file", help="LoRA file (PEFT/ai-toolkit, kohya or ComfyUI keys)")
    add.add_argument("--id", default=None, help="id to store it under [default: from the file name]")
    add.add_argument("--trigger-word", default=None, help="word that activates it; added to prompts once")
    lst2 = loras_sub.add_parser("list", help="List stored LoRAs.")
    lst2.add_argument("--json", action="store_true", help="print JSON")
    rm = loras_sub.add_parser("remove", help="Remove a LoRA.")
    rm.add_argument("id")
    example = loras_sub.add_parser("make-example", help="Write a small random LoRA that fits the current model "
                                   "(the tiny one too) into the store: something to try --lora and /flux-lora with.")
    example.add_argument("--id", default="example", help="[default: example]")
    example.add_argument("--trigger-word", default="ohwx", help="[default: ohwx]")
    example.add_argument("--rank", type=int, default=4, choices=range(1, 129), metavar="RANK",
                         help="1 to 128 [default: 4]")
    example.add_argument("--seed", type=int, default=0, help="[default: 0]")
    for p in (add, lst2, rm, example):
        p.add_argument("--models-dir", default=None)
        p.set_defaults(handler=cmd_loras)

    evaluate = sub.add_parser("eval", help="Measure generated images.")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    ident = eval_sub.add_parser("identity", help="Face consistency: each image's likeness to the reference face "
                                "(ArcFace with antelopev2, else SFace), pass/fail, and the share that passes.")
    ident.add_argument("--reference", required=True, help="the reference face photo")
    ident.add_argument("images", help="folder of generated images")
    ident.add_argument("--threshold", type=float, default=None,
                       help="cosine counted as the same person [default: the backend's: ArcFace 0.30, SFace 0.40]")
    ident.add_argument("--face-provider", choices=("cpu", "gpu"), default="cpu")
    ident.add_argument("--json", action="store_true", help="print JSON")
    ident.add_argument("--models-dir", default=None)
    ident.set_defaults(handler=cmd_eval_identity)
    accept_anywhere(parser, _global_options)
    return parser


def _global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="log loading and timing details")


def main(argv: list[str] | None = None) -> int:
    startup.begin()  # before the heavy imports: `serve` finishes the start once its models are loaded
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_cli(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
